"""From a trained float model and its per-layer plans to a verified integer .tflite file.

``export`` composes four steps, each usable alone:

1. ``deployment_model``: put the weights on their grids, remove the pruned channels (``prune``), wrap the planned
   layers in fixed-grid tfmot configs (``FixedGridScheme``: no other layout change) -> a fake-quant Keras model
   whose float forward pass is what the integer model computes (up to int32-bias and requantization rounding).
2. ``convert``: TFLiteConverter, full-integer (int8 builtins), float or int8 model input/output.
3. ``inspect``: read the flatbuffer back and check every weight tensor against its plan (type INT4/INT8, number of
   distinct codes, codes on the grid, kept channel counts, activation scale and zero point) -> per-layer report.
4. write the file and run it once in the LiteRT interpreter.
"""
import dataclasses
import os
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from bbits_tf._keras import keras, tfmot

from . import flatbuffer
from .plan import LayerPlan, act_grid_limits, quantize_activation, quantize_weight, signed_levels, validate_plans
from .prune import PRODUCERS, PruneReport, graph_nodes, prune
from .quantizers import FixedGridQuantizeConfig, FixedGridScheme, quantize_scope
from .verify import run_litert

_Q = tfmot.quantization.keras
IO_TYPES = ("float", "int8")
_REP_SAMPLES = 200


@dataclasses.dataclass
class LayerExport:
    """One planned layer as it ended up in the .tflite file.

    Sizes: ``learned_bytes = params * weight_bits / 8`` is what the learned bit width costs; ``stored_bytes`` is the
    weight buffer in the file (INT4 packs two codes per byte, so 2-bit weights take twice their learned size).
    """

    name: str
    op: str
    weight_bits: int
    weight_type: str
    weight_shape: tuple
    weight_scale: float
    distinct_codes: int
    params: int
    learned_bytes: float
    stored_bytes: int
    act_bits: Optional[int]
    act_type: str
    act_scale: Optional[float]
    act_zero_point: Optional[int]
    kept_out: int
    total_out: int
    exact: bool
    bias_scale: Optional[float] = None


@dataclasses.dataclass
class ExportReport:
    """What ``export`` wrote, as data (no Keras objects)."""

    path: Optional[str]
    file_bytes: int
    io: str
    input_type: str  # of the model input tensor ("FLOAT32" for io="float")
    input_scale: Optional[float]
    input_zero_point: Optional[int]
    output_type: str
    output_scale: Optional[float]
    output_zero_point: Optional[int]
    layers: List[LayerExport]
    ops: List[str]
    tensor_types: Dict[str, int]
    prune: PruneReport
    ranges: Dict[str, tuple] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    model_bytes: bytes = dataclasses.field(default=b"", repr=False)

    @property
    def learned_weight_bytes(self) -> float:
        return float(sum(layer.learned_bytes for layer in self.layers))

    @property
    def stored_weight_bytes(self) -> int:
        return int(sum(layer.stored_bytes for layer in self.layers))

    def deployment_kwargs(self) -> Dict:
        """Keyword arguments that make ``deployment_model`` rebuild the Keras twin of the exported file."""
        return {"input_range": self.ranges.get("input"),
                "output_ranges": {k: v for k, v in self.ranges.items() if k != "input"},
                "bias_scales": {layer.name: layer.bias_scale for layer in self.layers if layer.bias_scale}}

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d.pop("model_bytes")
        d["learned_weight_bytes"] = self.learned_weight_bytes
        d["stored_weight_bytes"] = self.stored_weight_bytes
        return d


def planned_layers(model) -> Dict[str, object]:
    """Name -> layer for every Conv2D / DepthwiseConv2D / Dense layer of the model."""
    return {layer.name: layer for layer in model.layers if isinstance(layer, PRODUCERS)}


def _channels(layer) -> int:
    kernel = layer.get_weights()[0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return kernel.shape[2] * kernel.shape[3]
    return kernel.shape[-1]


def grid_weights(model, plans: Mapping[str, LayerPlan]):
    """A copy of ``model`` whose planned kernels lie on their (deployed) grids; pruned kernel slices are zero."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, plan in plans.items():
        dep = plan.deployed()
        layer = copy.get_layer(name)
        weights = layer.get_weights()
        kernel = quantize_weight(weights[0], dep.weight_bits, dep.weight_step)
        if plan.out_mask is not None:
            shape = kernel.shape
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = kernel * plan.out_mask.reshape(shape[2], shape[3])
            else:
                kernel = kernel * plan.out_mask
        layer.set_weights([kernel.astype(np.float32)] + weights[1:])
    return copy


def deployment_model(model, plans: Mapping[str, LayerPlan], *, representative_data=None, input_range=None,
                     output_ranges: Optional[Mapping[str, tuple]] = None,
                     bias_scales: Optional[Mapping[str, float]] = None):
    """The pruned fake-quant Keras model that ``convert`` turns into integer TFLite.

    Every tensor that TFLite needs a range for gets a fixed one here, because the converter re-quantizes an op that
    lacks one (weights included: per-channel INT8 from calibration, off the learned grid):

    * the model input: ``input_range`` (lo, hi), 8 bits, scale (hi - lo)/255; default from ``representative_data``
      (its min and max, widened to include 0);
    * layers with a float output (``act_bits`` None, e.g. logits): ``output_ranges[name]``; default the min and max
      of that output over ``representative_data`` (widened to include 0).

    Args:
        model: trained tf_keras model (float weights; the planned kernels are rounded onto their grids here).
        plans: layer name -> LayerPlan for Conv2D / DepthwiseConv2D / Dense layers.
        representative_data: array of model inputs, for the ranges not given.
        input_range: optional (lo, hi) of the 8-bit model input.
        output_ranges: optional layer name -> (lo, hi) for float-output layers.
        bias_scales: optional layer name -> scale of the layer's int32 bias in TFLite (input scale * weight
            scale): the bias is rounded onto that grid, as TFLite stores it, so that the Keras model computes what
            the integer model computes. ``export`` reads them from a first conversion.

    Returns:
        (deployment model, PruneReport, ranges) where ranges = {"input": (lo, hi), layer name: (lo, hi), ...}
        are the fixed ranges used.
    """
    layers = planned_layers(model)
    validate_plans(plans, {name: _channels(layer) for name, layer in layers.items()})
    missing_plans = sorted(set(layers) - set(plans))
    if missing_plans:  # the converter would re-quantize them, and their consumers, from calibration
        raise ValueError(f"Every Conv2D, DepthwiseConv2D and Dense layer needs a LayerPlan (use weight_bits=8 for a "
                         f"layer that was not learned). Received no plan for: {missing_plans}")
    on_grid = grid_weights(model, plans)
    masks = {name: p.out_mask for name, p in plans.items() if p.out_mask is not None}
    transforms = {}
    for name, plan in plans.items():
        dep = plan.deployed()
        if dep.act_bits is not None:
            transforms[name] = (lambda v, d=dep: quantize_activation(v, d.act_bits, d.act_step, d.act_signed))
    pruned, report = prune(on_grid, masks, output_transforms=transforms)
    for name, scale in (bias_scales or {}).items():
        layer = pruned.get_layer(name)
        if scale and layer.use_bias:
            weights = layer.get_weights()
            weights[-1] = (np.round(weights[-1].astype(np.float64) / scale) * scale).astype(np.float32)
            layer.set_weights(weights)

    ranges = dict(output_ranges or {})
    missing = [n for n, p in plans.items() if p.act_bits is None and n not in ranges]
    if (input_range is None or missing) and representative_data is None:
        raise ValueError(f"`representative_data` is needed to fix the input range and the float output ranges of "
                         f"{missing}. Received: representative_data=None, input_range={input_range}")
    if input_range is None:
        data = _as_array(representative_data)
        input_range = _range(data)
    ranges["input"] = tuple(float(v) for v in input_range)
    if missing:
        probe = _quantize(pruned, plans, ranges["input"], {})
        outs = keras.Model(probe.inputs, [probe.get_layer(n).output for n in missing]).predict(
            _as_array(representative_data), verbose=0, batch_size=256)
        for name, out in zip(missing, outs if len(missing) > 1 else [outs]):
            ranges[name] = _range(out)
    return _quantize(pruned, plans, ranges["input"], ranges), report, ranges


def _range(x) -> tuple:
    x = np.asarray(x)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _as_array(data) -> np.ndarray:
    if callable(data):
        return np.concatenate([np.asarray(batch[0], np.float32) for batch in data()])
    return np.asarray(data, np.float32)[:_REP_SAMPLES]


def _quantize(pruned, plans, input_range, output_ranges):
    def annotate(layer):
        if layer.name in plans:
            config = FixedGridQuantizeConfig.from_plan(plans[layer.name], output_ranges.get(layer.name))
            return _Q.quantize_annotate_layer(layer, config)
        return layer

    annotated = keras.models.clone_model(pruned, clone_function=annotate)
    with quantize_scope():
        return _Q.quantize_apply(annotated, scheme=FixedGridScheme(input_range), quantized_layer_name_prefix="")


def _representative(data) -> Callable[[], Iterable[List[np.ndarray]]]:
    if callable(data):
        return data
    arr = np.asarray(data, np.float32)

    def gen():
        for i in range(min(len(arr), _REP_SAMPLES)):
            yield [arr[i:i + 1]]
    return gen


def convert(deployed, representative_data, *, io: str = "float") -> bytes:
    """Full-integer TFLite conversion of a deployment model.

    Args:
        deployed: the model from ``deployment_model``.
        representative_data: array of inputs (the first 200 are used, one per batch) or a generator function in
            TFLiteConverter's format. It calibrates what has no fake-quant range: the float output (logits) and,
            without ``input_range``, the input.
        io: "float" (float32 input/output, QUANTIZE/DEQUANTIZE inside) or "int8" (int8 input/output tensors).
    """
    if io not in IO_TYPES:
        raise ValueError(f"`io` must be one of {IO_TYPES}. Received: io={io!r}")
    converter = tf.lite.TFLiteConverter.from_keras_model(deployed)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(representative_data)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io == "int8":
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():  # the input range is the fake-quant's; the converter still asks for stats
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def concat_fed(model, names) -> List[str]:
    """The named layers whose output reaches a Concatenate through layers without a kernel.

    TFLite gives all inputs of a CONCATENATION one scale (the union of their ranges), so their learned activation
    grids survive only when they are identical.
    """
    consumers: Dict[str, List] = {}
    for layer, inbound in graph_nodes(model):
        for src in inbound:
            consumers.setdefault(src, []).append(layer)
    hits = []
    for name in names:
        todo, seen = list(consumers.get(name, [])), set()
        while todo:
            layer = todo.pop()
            if layer.name in seen or isinstance(layer, PRODUCERS):
                continue
            seen.add(layer.name)
            if isinstance(layer, keras.layers.Concatenate):
                hits.append(name)
                break
            todo.extend(consumers.get(layer.name, []))
    return hits


def inspect(tflite_bytes: bytes, plans: Mapping[str, LayerPlan], prune_report: Optional[PruneReport] = None,
            shared_scale: Sequence[str] = ()):
    """Per planned layer: what the file holds, checked against the plan.

    Args:
        tflite_bytes: the converted model.
        plans: the plans it was built from.
        prune_report: the PruneReport of ``deployment_model`` (for kept channel counts).
        shared_scale: layers whose output scale TFLite unifies with others (``concat_fed``): not checked.

    Returns:
        (list of LayerExport, list of problems; empty when every check passed).
    """
    flat = flatbuffer.read(tflite_bytes)
    problems = []
    rows = []
    prune_report = prune_report or PruneReport()
    names = list(plans)
    seen = set()
    for op, w, b, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], names)
        if name is None:
            problems.append(f"{op.name} with weight tensor {w.name!r}: no unique planned layer matches")
            continue
        seen.add(name)
        plan, dep = plans[name], plans[name].deployed()
        want_type = "INT4" if dep.weight_bits <= 4 else "INT8"
        codes = w.values if w.values is not None else np.zeros(0, np.int64)
        distinct = int(np.unique(codes).size)
        if w.type != want_type:
            problems.append(f"{name}: weight type {w.type}, expected {want_type} for {dep.weight_bits}-bit weights")
        if distinct > 2 ** dep.weight_bits - 1:
            problems.append(f"{name}: {distinct} distinct weight codes > 2^{dep.weight_bits} - 1")
        if w.scale is not None and codes.size:
            k = codes * (w.scale / dep.weight_step)
            if np.abs(k - np.round(k)).max() > 1e-3 or np.abs(k).max() > signed_levels(dep.weight_bits) + 1e-3:
                problems.append(f"{name}: weight codes * scale are not on the grid k * {dep.weight_step:g}")
        if w.num_scales != 1:
            problems.append(f"{name}: weights have {w.num_scales} scales, expected per-tensor")
        mask = plan.out_mask
        total_out = mask.size if mask is not None else None
        kept_out = int(mask.sum()) if mask is not None else None
        lay = prune_report.layers.get(name)
        if lay is not None:
            kept_out, total_out = lay.kept_out, lay.total_out
        n_out = w.shape[-1] if op.name == "DEPTHWISE_CONV_2D" else w.shape[0]
        if kept_out is not None and n_out != kept_out:
            problems.append(f"{name}: weight tensor has {n_out} output channels, {kept_out} kept")
        if lay is not None and op.name != "DEPTHWISE_CONV_2D" and w.shape[-1] != lay.kept_in:
            problems.append(f"{name}: weight tensor has {w.shape[-1]} input channels, {lay.kept_in} kept")
        if dep.act_bits is not None and name not in shared_scale:
            lo, hi = act_grid_limits(dep.act_bits, dep.act_signed)
            if out.scale is None or abs(out.scale / dep.act_step - 1) > 1e-5 or out.zero_point != 127 - hi:
                problems.append(f"{name}: output scale/zero point {out.scale}/{out.zero_point}, expected "
                                f"{dep.act_step:g}/{127 - hi}")
        params = int(codes.size)
        rows.append(LayerExport(
            name=name, op=op.name, weight_bits=plan.weight_bits, weight_type=w.type, weight_shape=w.shape,
            weight_scale=w.scale, distinct_codes=distinct, params=params,
            learned_bytes=params * plan.weight_bits / 8, stored_bytes=w.nbytes, act_bits=plan.act_bits,
            act_type=out.type, act_scale=out.scale, act_zero_point=out.zero_point,
            kept_out=n_out, total_out=total_out if total_out is not None else n_out,
            exact=plan.weight_exact and plan.act_exact and name not in shared_scale,
            bias_scale=None if b is None else b.scale))
    for name in names:
        if name not in seen:
            problems.append(f"{name}: no CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op found for it")
    return rows, problems


def export(model, plans: Optional[Mapping[str, LayerPlan]] = None, output_path: Optional[str] = None, *,
           representative_data, io: str = "float", input_range=None, output_ranges=None,
           **bbits_options) -> ExportReport:
    """Prune, quantize onto the learned grids, convert to integer TFLite, check, and write.

    A Bayesian Bits model (from ``bbits_tf.quantize_model``) goes to ``export_bbits`` (plans from its quantizers):
    ``export(qmodel, "model.tflite", representative_data=x, ...)``, any ``export_bbits`` option as keyword.

    Args:
        model: trained tf_keras model with float weights (pruned or not), or a Bayesian Bits model.
        plans: layer name -> LayerPlan for every quantized Conv2D / DepthwiseConv2D / Dense layer (none for a
            Bayesian Bits model; its second positional argument is then ``output_path``).
        output_path: where to write the .tflite file (None: do not write).
        representative_data: model inputs (array, or generator function in TFLiteConverter's format) for the
            input and float-output ranges not given, and for the converter.
        io: "float" or "int8" model input/output.
        input_range: optional fixed (lo, hi) range of the 8-bit model input, e.g. (0.0, 1.0) for images in [0, 1].
        output_ranges: optional layer name -> (lo, hi) of float-output layers (see ``deployment_model``).

    Returns:
        ExportReport (``BbitsExportReport`` for a Bayesian Bits model). Raises RuntimeError when a check of the
        converted file fails.
    """
    from .bbits import export_bbits, is_bbits_model  # pylint: disable=import-outside-toplevel
    if is_bbits_model(model):
        if plans is not None and not isinstance(plans, (str, os.PathLike)):
            raise ValueError("A Bayesian Bits model brings its own plans (from its quantizers); call "
                             "export(qmodel, output_path, representative_data=...). Received: plans")
        if plans is not None:
            if output_path is not None:
                raise TypeError("export(qmodel, output_path, ...) takes one path. Received two")
            output_path = plans
        return export_bbits(model, output_path, representative_data=representative_data, io=io,
                            input_range=input_range, output_ranges=output_ranges, **bbits_options)
    if bbits_options:
        raise TypeError(f"export() got options that only apply to Bayesian Bits models: {sorted(bbits_options)}")
    if plans is None:
        raise ValueError("`plans` (layer name -> LayerPlan) is required for a plain float model")
    kwargs = dict(representative_data=representative_data, input_range=input_range, output_ranges=output_ranges)
    deployed, prune_report, ranges = deployment_model(model, plans, **kwargs)
    tflite_bytes = convert(deployed, representative_data, io=io)
    shared = concat_fed(deployed, [n for n, p in plans.items() if p.act_bits is not None])
    layers, problems = inspect(tflite_bytes, plans, prune_report, shared)
    scales = {layer.name: layer.bias_scale for layer in layers if layer.bias_scale}
    if not problems and scales:  # second pass: biases on their int32 grid, so Keras == TFLite arithmetic
        kwargs.update(input_range=ranges["input"], output_ranges={k: v for k, v in ranges.items() if k != "input"})
        deployed, prune_report, ranges = deployment_model(model, plans, bias_scales=scales, **kwargs)
        tflite_bytes = convert(deployed, representative_data, io=io)
        layers, problems = inspect(tflite_bytes, plans, prune_report, shared)
    flat = flatbuffer.read(tflite_bytes)
    tin, tout = _int8_boundary(flat)
    _smoke_run(tflite_bytes, np.asarray(_first_sample(representative_data)))
    notes = list(prune_report.inexact)
    for layer in layers:
        if layer.name in shared:
            notes.append(f"{layer.name}: feeds a Concatenate; TFLite gives its output the concatenation's scale "
                         f"{layer.act_scale:g} (learned step {plans[layer.name].act_step:g}): not exact")
    for name, plan in plans.items():
        if not plan.weight_exact:
            notes.append(f"{name}: {plan.weight_bits}-bit weights requantized to 8 bits over the same range")
        if not plan.act_exact:
            notes.append(f"{name}: {plan.act_bits}-bit activations requantized to 8 bits over the same range")
        if plan.act_bits is None:
            notes.append(f"{name}: float output carried as int8 over {ranges[name]}")
    notes.append(f"input carried as int8 over {ranges['input']}")
    types: Dict[str, int] = {}
    for t in flat.tensors:
        types[t.type] = types.get(t.type, 0) + 1
    report = ExportReport(
        path=output_path, file_bytes=len(tflite_bytes), io=io, input_type=flat.tensors[flat.inputs[0]].type,
        input_scale=tin.scale, input_zero_point=tin.zero_point, output_type=flat.tensors[flat.outputs[0]].type,
        output_scale=tout.scale,
        output_zero_point=tout.zero_point, layers=layers, ops=[op.name for op in flat.ops], tensor_types=types,
        prune=prune_report, ranges=ranges, notes=notes, model_bytes=tflite_bytes)
    if problems:
        raise RuntimeError("The converted model does not hold the planned grids:\n  " + "\n  ".join(problems))
    if output_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        with open(output_path, "wb") as f:
            f.write(tflite_bytes)
    return report


def _int8_boundary(flat):
    """The int8 model input and output tensors: the IO tensors, or behind QUANTIZE / DEQUANTIZE for float io."""
    tin, tout = flat.tensors[flat.inputs[0]], flat.tensors[flat.outputs[0]]
    for op in flat.ops:
        if op.name == "QUANTIZE" and op.inputs[0] == tin.index:
            tin = flat.tensors[op.outputs[0]]
        if op.name == "DEQUANTIZE" and op.outputs[0] == tout.index:
            tout = flat.tensors[op.inputs[0]]
    return tin, tout


def _first_sample(data):
    if callable(data):
        return next(iter(data()))[0]
    return np.asarray(data[:1], np.float32)


def _smoke_run(tflite_bytes: bytes, x: np.ndarray):
    run_litert(tflite_bytes, x)
