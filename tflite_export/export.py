"""From a trained float model and its per-layer plans to a verified integer .tflite file.

``export_plans`` composes these steps, each usable alone:

1. ``deployment_model``: put the weights on their grids, remove the pruned channels (``prune``), wrap the planned
   layers in fixed-grid tfmot configs (``FixedGridScheme``: no other layout change) -> a fake-quant Keras model
   whose float forward pass is what the integer model computes (up to int32-bias and requantization rounding).
2. ``convert``: TFLiteConverter, full-integer (int8 builtins), float or int8 model input/output.
3. ``inspect``: read the flatbuffer back and check every weight tensor against its plan (type INT4/INT8, number of
   distinct codes, codes on the grid, kept channel counts, activation scale and zero point) -> per-layer report.
4. write the file.

A Bayesian Bits model does not come here directly: ``tflite_export.export`` (in ``bbits.py``) reads its plans and
calls ``export_plans``; this module knows nothing of Bayesian Bits.
"""
import dataclasses
import os
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from bbits_tf import graph
from bbits_tf._keras import keras, tfmot

from . import flatbuffer
from .plan import LayerPlan, act_grid_limits, quantize_activation, quantize_weight, signed_levels, validate_plans
from .prune import PRODUCERS, PruneReport, graph_nodes, prune
from .quantizers import (FixedGridOutputConfig, FixedGridQuantizeConfig, FixedGridScheme, quantize_scope,
                         refined_input_range)

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
    """What ``export_plans`` wrote, as data (no Keras objects)."""

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
    refine_inputs: bool = True
    output_grids: Dict[str, tuple] = dataclasses.field(default_factory=dict)

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
                "bias_scales": {layer.name: layer.bias_scale for layer in self.layers if layer.bias_scale},
                "refine_inputs": self.refine_inputs, "output_grids": dict(self.output_grids)}

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
                     bias_scales: Optional[Mapping[str, float]] = None, refine_inputs: bool = True,
                     output_grids: Optional[Mapping[str, tuple]] = None):
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
            the integer model computes. ``export_plans`` reads them from a first conversion.
        refine_inputs: carry the input of a layer fed (through pooling / Flatten / Reshape / Dropout) by a coarse
            (2- or 4-bit) activation grid at a 64 / 16 times finer scale (``input_grids``): one exact QUANTIZE op
            each, and that layer's int32 bias and requantization multiplier get as much finer, so the file's
            rounding agrees with float arithmetic far more often.
        output_grids: layer name -> (bits, step, signed) of a fixed activation grid on the output of a layer
            without weights whose output is new values (Add, AveragePooling2D, GlobalAveragePooling2D, a separate
            ReLU / Activation layer): that tensor's scale is the step (``FixedGridOutputConfig``).

    Returns:
        (deployment model, PruneReport, ranges) where ranges = {"input": (lo, hi), layer name: (lo, hi), ...}
        are the fixed ranges used.
    """
    layers = planned_layers(model)
    validate_plans(plans, {name: _channels(layer) for name, layer in layers.items()})
    missing_plans = sorted(set(layers) - set(plans))
    if missing_plans:  # the converter would re-quantize them, and their consumers, from calibration
        raise ValueError(f"Every Conv2D, DepthwiseConv2D and Dense layer needs a LayerPlan (use weight_bits=8 for a "
                         f"layer that was not learned). Received: plans without layers={missing_plans}")
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
    grids = check_output_grids(pruned, plans, output_grids)
    refine = input_grids(pruned, plans) if refine_inputs else {}
    if missing:
        probe = _quantize(pruned, plans, ranges["input"], {}, refine, grids)
        outs = keras.Model(probe.inputs, [probe.get_layer(n).output for n in missing]).predict(
            _as_array(representative_data), verbose=0, batch_size=256)
        for name, out in zip(missing, outs if len(missing) > 1 else [outs]):
            ranges[name] = _range(out)
    return _quantize(pruned, plans, ranges["input"], ranges, refine, grids), report, ranges


OUTPUT_GRID_LAYERS = (keras.layers.Add, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
                      keras.layers.ReLU, keras.layers.Activation)


def check_output_grids(model, plans, output_grids) -> Dict[str, tuple]:
    """``output_grids`` (layer name -> (bits, step, signed)) checked against ``model`` and deployed (<= 8 bits),
    as layer name -> (bits, step, signed, nonnegative input); ``nonnegative`` (``bbits_tf.graph.nonnegative``)
    spares an unsigned grid its lower clip (a MAXIMUM op)."""
    out = {}
    for name, grid in (output_grids or {}).items():
        try:
            layer = model.get_layer(name)
        except ValueError:
            layer = None
        if layer is None or not isinstance(layer, OUTPUT_GRID_LAYERS) or name in plans:
            raise ValueError(f"Output grids go on Add, AveragePooling2D, GlobalAveragePooling2D, ReLU or Activation "
                             f"layers of the model. Received: output_grids[{name!r}]")
        bits, step, signed = int(grid[0]), float(grid[1]), bool(grid[2])
        dep = LayerPlan(8, 1.0, bits, step, signed).deployed()
        out[name] = (dep.act_bits, dep.act_step, dep.act_signed, bool(graph.nonnegative(model, layer)))
    return out


# Layers whose output stays on their input's grid: bbits_tf.graph's pass-through layers (max pooling, Flatten,
# Reshape, Dropout, padding, cropping).
_SAME_GRID = tuple(cls for cls in graph.PASSTHROUGH if cls is not keras.layers.InputLayer)


_OP_BETWEEN = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling1D,
               keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Reshape)


def input_grids(model, plans: Mapping[str, LayerPlan]) -> Dict[str, tuple]:
    """Planned layer -> (lo, hi) of a refined fixed range for its input (``refined_input_range``), for every
    planned layer whose input is another planned layer's <= 4-bit activation grid, reached through layers that
    keep values on their grid (max pooling, Flatten, Reshape, Dropout), if it has an activation grid itself (not
    for float outputs such as the logits). Only where an op sits between the two (max pooling, Flatten, Reshape):
    when a layer reads the other directly (or through Dropout), TF 2.21's converter drops the QUANTIZE op but keeps
    the bias on the refined grid (a Conv2D or DepthwiseConv2D right after a 4-bit Conv2D got a 16 times too large
    bias); and never for a DepthwiseConv2D (not checked after an op). Not through a Concatenate: TFLite gives a
    CONCATENATION's inputs its output scale, so the converter would put the finer scale on the branches' outputs
    (off their grids); nor from layers feeding a Concatenate of different grids."""
    nodes = graph_nodes(model)
    inbound = {layer.name: sources for layer, sources in nodes}
    by_name = {layer.name: layer for layer, _ in nodes}
    shared = set(concat_fed(model, plans))

    def grid_of(name):  # the grid the output of layer ``name`` is on, or None
        if name in plans:
            return None if name in shared else _grid(plans[name])
        layer = by_name[name]
        if isinstance(layer, _SAME_GRID) and len(inbound[name]) == 1:
            return grid_of(inbound[name][0])
        return None  # not through a Concatenate: the converter would move the refined scale onto its inputs

    out = {}
    for name, plan in plans.items():
        if plan.act_bits is None:  # a float (logits) output: its step is coarse anyway, and the converter's
            continue               # calibration rejects a refined input there (bias scale check of the FC op)
        if isinstance(by_name[name], keras.layers.DepthwiseConv2D):
            continue
        sources = inbound.get(name, [])
        if len(sources) != 1 or not isinstance(by_name[sources[0]], _OP_BETWEEN):
            continue  # read directly: the converter would drop the QUANTIZE op and keep the refined bias grid
        grid = grid_of(sources[0])
        if grid is None:
            continue
        lo, hi, factor = refined_input_range(*grid)
        if factor > 1:
            out[name] = (lo, hi)
    return out


def output_grid_problems(tflite_bytes: bytes, grids: Mapping[str, tuple]) -> List[str]:
    """Each output grid (``check_output_grids``' layer name -> (bits, step, signed, nonnegative)) against the file:
    the last op output whose tensor name holds ``/<name>/`` (the converter names tensors after the Keras layers;
    a fused ReLU's name joins the ADD's) must have scale ``step`` and zero point ``127 - hi``."""
    flat = flatbuffer.read(tflite_bytes)
    problems = []
    for name, (bits, step, signed, _) in grids.items():
        outs = [flat.tensors[op.outputs[0]] for op in flat.ops
                if any(part.split("/")[1:2] == [name] for part in flat.tensors[op.outputs[0]].name.split(";"))]
        if not outs:
            problems.append(f"{name}: no op output in the file is named after this layer (its grid is unchecked)")
            continue
        out = outs[-1]
        hi = act_grid_limits(bits, signed)[1]
        if out.scale is None or abs(out.scale / step - 1) > 1e-5 or out.zero_point != 127 - hi:
            problems.append(f"{name}: output scale/zero point {out.scale}/{out.zero_point}, expected "
                            f"{step:g}/{127 - hi}")
    return problems


def _range(x) -> tuple:
    x = np.asarray(x)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _as_array(data) -> np.ndarray:
    if callable(data):
        return np.concatenate([np.asarray(batch[0], np.float32) for batch in data()])
    return np.asarray(data, np.float32)[:_REP_SAMPLES]


def _quantize(pruned, plans, input_range, output_ranges, refine=None, output_grids=None):
    grids = output_grids or {}

    def annotate(layer):
        if layer.name in plans:
            config = FixedGridQuantizeConfig.from_plan(plans[layer.name], output_ranges.get(layer.name))
            return _Q.quantize_annotate_layer(layer, config)
        if layer.name in grids:
            bits, step, signed, nonnegative = grids[layer.name]
            return _Q.quantize_annotate_layer(layer, FixedGridOutputConfig(bits, step, signed, nonnegative))
        return layer

    annotated = keras.models.clone_model(pruned, clone_function=annotate)
    with quantize_scope():
        return _Q.quantize_apply(annotated, scheme=FixedGridScheme(input_range, refine),
                                 quantized_layer_name_prefix="")


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


def _grid(plan: LayerPlan):
    dep = plan.deployed()
    return (dep.act_bits, dep.act_step, dep.act_signed) if dep.act_bits is not None else None


def concat_fed(model, plans: Mapping[str, LayerPlan]) -> List[str]:
    """The planned layers whose output reaches a Concatenate (through layers without a kernel) whose inputs do not
    all carry one and the same activation grid.

    TFLite gives all inputs of a CONCATENATION one scale (the union of their ranges), so the learned grids survive
    only when they are identical (e.g. when the grid is the Concatenate's own output quantizer, given to each
    branch by ``plans_from_bbits``); otherwise the branches are requantized.
    """
    nodes = graph_nodes(model)
    consumers: Dict[str, List] = {}
    inbound = {layer.name: sources for layer, sources in nodes}
    for layer, sources in nodes:
        for src in sources:
            consumers.setdefault(src, []).append(layer)

    def source_grid(name):  # the grid a tensor carries, walking back through layers without a kernel
        while name not in plans and len(inbound.get(name, [])) == 1:
            name = inbound[name][0]
        return _grid(plans[name]) if name in plans else None

    hits = []
    for name in (n for n, p in plans.items() if p.act_bits is not None):
        todo, seen = list(consumers.get(name, [])), set()
        while todo:
            layer = todo.pop()
            if layer.name in seen or isinstance(layer, PRODUCERS):
                continue
            seen.add(layer.name)
            if isinstance(layer, keras.layers.Concatenate):
                grids = {source_grid(src) for src in inbound[layer.name]}
                if len(grids) != 1 or None in grids:
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


def export_plans(model, plans: Mapping[str, LayerPlan], path=None, *, representative_data, io: str = "float",
                 input_range=None, output_ranges=None, refine_inputs: bool = True,
                 output_grids: Optional[Mapping[str, tuple]] = None) -> ExportReport:
    """Prune, quantize onto the planned grids, convert to integer TFLite, check, and write (plans-level export).

    For people who bring their own plans. A trained Bayesian Bits model goes through ``tflite_export.export``
    (``export(qmodel, path, ...)``), which reads the plans from its quantizers and verifies the file against it.

    Args:
        model: trained tf_keras model with float weights (pruned or not).
        plans: layer name -> LayerPlan for every Conv2D / DepthwiseConv2D / Dense layer.
        path: where to write the .tflite file (None: do not write; the bytes are in ``report.model_bytes``).
        representative_data: model inputs (array, or generator function in TFLiteConverter's format) for the
            input and float-output ranges not given, and for the converter.
        io: "float" or "int8" model input/output.
        input_range: optional fixed (lo, hi) range of the 8-bit model input, e.g. (0.0, 1.0) for images in [0, 1].
        output_ranges: optional layer name -> (lo, hi) of float-output layers (see ``deployment_model``).
        refine_inputs: carry coarse (2-/4-bit) layer inputs at a finer scale (see ``deployment_model``).
        output_grids: layer name -> (bits, step, signed): learned grids on Add / average pooling / ReLU /
            Activation outputs (see ``deployment_model``); checked in the file like the planned layers' outputs.

    Returns:
        ExportReport. Raises RuntimeError when a check of the converted file fails.
    """
    path = check_path(path)
    if io not in IO_TYPES:
        raise ValueError(f"`io` must be one of {IO_TYPES}. Received: io={io!r}")
    if not isinstance(plans, Mapping):
        raise TypeError(f"`plans` must be a dict of layer name -> LayerPlan. Received: plans={type(plans).__name__}")
    kwargs = dict(representative_data=representative_data, input_range=input_range, output_ranges=output_ranges,
                  refine_inputs=refine_inputs, output_grids=output_grids)
    deployed, prune_report, ranges = deployment_model(model, plans, **kwargs)
    tflite_bytes = convert(deployed, representative_data, io=io)
    shared = concat_fed(deployed, plans)
    layers, problems = inspect(tflite_bytes, plans, prune_report, shared)
    grids = check_output_grids(model, plans, output_grids)
    problems += output_grid_problems(tflite_bytes, grids)
    scales = {layer.name: layer.bias_scale for layer in layers if layer.bias_scale}
    if not problems and scales:  # second pass: biases on their int32 grid, so Keras == TFLite arithmetic
        kwargs.update(input_range=ranges["input"], output_ranges={k: v for k, v in ranges.items() if k != "input"})
        deployed, prune_report, ranges = deployment_model(model, plans, bias_scales=scales, **kwargs)
        tflite_bytes = convert(deployed, representative_data, io=io)
        layers, problems = inspect(tflite_bytes, plans, prune_report, shared)
        problems += output_grid_problems(tflite_bytes, grids)
    flat = flatbuffer.read(tflite_bytes)
    tin, tout = _int8_boundary(flat)
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
    for name in (output_grids or {}):
        if isinstance(model.get_layer(name), keras.layers.AveragePooling2D):
            notes.append(f"{name}: AVERAGE_POOL_2D keeps its input's scale, so the mean is rounded to the input grid "
                         f"before it is requantized to the learned grid (up to half an input step off): not exact")
    notes.append(f"input carried as int8 over {ranges['input']}")
    types: Dict[str, int] = {}
    for t in flat.tensors:
        types[t.type] = types.get(t.type, 0) + 1
    report = ExportReport(
        path=path, file_bytes=len(tflite_bytes), io=io, input_type=flat.tensors[flat.inputs[0]].type,
        input_scale=tin.scale, input_zero_point=tin.zero_point, output_type=flat.tensors[flat.outputs[0]].type,
        output_scale=tout.scale,
        output_zero_point=tout.zero_point, layers=layers, ops=[op.name for op in flat.ops], tensor_types=types,
        prune=prune_report, ranges=ranges, notes=notes, model_bytes=tflite_bytes, refine_inputs=refine_inputs,
        output_grids={k: tuple(v) for k, v in (output_grids or {}).items()})
    if problems:
        raise RuntimeError("The converted model does not hold the planned grids:\n  " + "\n  ".join(problems))
    if path is not None:
        write_file(tflite_bytes, path)
    return report


def check_path(path):
    """``path`` as a str (None stays None); anything that is not a file path is an error."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path (str or os.PathLike) or None; plans go in `plans=`. "
                        f"Received: path={type(path).__name__}")
    return os.fspath(path)


def write_file(data: bytes, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _int8_boundary(flat):
    """The int8 model input and output tensors: the IO tensors, or behind QUANTIZE / DEQUANTIZE for float io."""
    tin, tout = flat.tensors[flat.inputs[0]], flat.tensors[flat.outputs[0]]
    for op in flat.ops:
        if op.name == "QUANTIZE" and op.inputs[0] == tin.index:
            tin = flat.tensors[op.outputs[0]]
        if op.name == "DEQUANTIZE" and op.outputs[0] == tout.index:
            tout = flat.tensors[op.inputs[0]]
    return tin, tout
