"""A Bayesian Bits model (``bbits_tf.quantize_model``) -> pruned integer .tflite, verified against that model.

``export_bbits`` is the bridge between the training side and the plain-data exporter (``export``):

1. ``plans_from_bbits``: one ``LayerPlan`` per quantized layer from its quantizers at the deterministic (test-time)
   gates: weight bits and step, output activation bits, step and sign, kept output channels (``z_2``).
2. ``plain_model``: the same architecture as plain tf_keras layers (the QuantizeWrappers unwrapped), whose kernels
   and biases are what the bbits model uses in inference: ``quantizer(kernel, training=False)``, i.e. on the
   learned grid with pruned slices zeroed, and the bias masked by ``z_2`` when ``mask_bias``.
3. ``export`` of that model with those plans: pruning for real, fixed grids, conversion, grid checks.
4. Checks against the bbits model itself (``model.predict``, inference mode): top-1 agreement and accuracy on
   the given data, distinct codes per weight tensor against the *learned* bit width, kept channel counts in the
   flatbuffer against the gates, TFLite Micro against LiteRT (within 1 LSB) and the TFLM arena size; optional C
   source and header next to the file.

The result is a ``BbitsExportReport``: an ``ExportReport`` with the size accounting per layer (learned bits x
params vs the bytes the file holds), the verification and the check results.
"""
import dataclasses
import os
from typing import Dict, Mapping, Optional

import numpy as np

from bbits_tf._keras import keras, tfmot

from . import flatbuffer
from .int2 import pack_int2
from .report import BbitsExportReport, BbitsLayer
from .export import ExportReport
from .export import export as export_plans
from .micro import c_identifier, run_tflm, tflm_arena_bytes, to_c_array
from .plan import WEIGHT_BITS, LayerPlan
from .verify import VerifyReport, make_interpreter, output_scale, run_litert, verify

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_PREDICT_BATCH = 256


# ---------------------------------------------------------------------------------------------------- reading

def _bbits_config_class():
    from bbits_tf.configs import BayesianBitsQuantizeConfig  # pylint: disable=import-outside-toplevel
    return BayesianBitsQuantizeConfig


def is_bbits_model(model) -> bool:
    """Whether ``model`` is a Bayesian Bits model (it holds a QuantizeWrapper with a bbits_tf config)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    config_cls = _bbits_config_class()
    return any(isinstance(layer, _QuantizeWrapper) and isinstance(layer.quantize_config, config_cls)
               for layer in layers)


def _quantizer_table(qmodel) -> Dict[str, Dict[str, tuple]]:
    """wrapper name -> {"weight": (quantizer, variables), "activation": (quantizer, variables)}."""
    from bbits_tf.quantize import bayesian_bits_quantizers  # pylint: disable=import-outside-toplevel
    table: Dict[str, Dict[str, tuple]] = {}
    for wrapper, role, quantizer, variables in bayesian_bits_quantizers(qmodel):
        table.setdefault(wrapper.name, {})[role] = (quantizer, variables)
    return table


def _wrappers(qmodel):
    """The QuantizeWrappers of the model, in layer order; any wrapper that is not Bayesian Bits is an error."""
    config_cls = _bbits_config_class()
    found = []
    for layer in qmodel.layers:
        if isinstance(layer, _QuantizeWrapper):
            if not isinstance(layer.quantize_config, config_cls):
                raise ValueError(f"Layer {layer.name!r} is quantized by {type(layer.quantize_config).__name__}, "
                                 f"not by Bayesian Bits; export_bbits takes models from bbits_tf.quantize_model only")
            found.append(layer)
        elif isinstance(layer, keras.Model):
            raise ValueError(f"Nested models are not supported; flatten the model first. Received: {layer.name!r}")
    if not found:
        raise ValueError(f"The model has no Bayesian Bits layer; pass the model that bbits_tf.quantize_model "
                         f"returned. Received: model={getattr(qmodel, 'name', qmodel)!r}")
    return found


def _kernel_attr(layer) -> str:
    return "depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) else "kernel"


def _variable(wrapper, attr: str):
    """The wrapper's float variable ``attr`` (kernel / depthwise_kernel / bias), or None.

    ``wrapper.layer.kernel`` is the *quantized tensor* of the last call, not the variable, so look the variable up
    by name (``.../kernel:0``); the tfmot wrapper's own record of the quantized weight is the fallback.
    """
    hits = [v for v in wrapper.weights if v.name.endswith(f"/{attr}:0")]
    if len(hits) == 1:
        return hits[0]
    if attr != "bias":
        for weight, _, _ in wrapper._weight_vars:  # pylint: disable=protected-access
            return weight
    return None


def _quantized_kernel_bias(wrapper, table):
    """(kernel, bias or None) of a wrapped layer as the bbits model uses them in inference (NumPy)."""
    inner = wrapper.layer
    kernel_var = _variable(wrapper, _kernel_attr(inner))
    bias_var = _variable(wrapper, "bias") if getattr(inner, "use_bias", False) else None
    if kernel_var is None:
        raise ValueError(f"No kernel variable found in {wrapper.name!r}")
    entry = table.get(wrapper.name, {}).get("weight")
    bias = None if bias_var is None else np.asarray(bias_var.numpy(), np.float32)
    if entry is None:  # weights left float by the config
        return np.asarray(kernel_var.numpy(), np.float32), bias
    quantizer, variables = entry
    out = quantizer(kernel_var, False, variables)
    if isinstance(out, (tuple, list)):  # mask_bias with pruning: (kernel * z2, bias * z2)
        kernel, bias_q = out
        return np.asarray(kernel, np.float32), np.asarray(bias_q, np.float32)
    return np.asarray(out, np.float32), bias


def plans_from_bbits(qmodel) -> Dict[str, LayerPlan]:
    """Original layer name -> ``LayerPlan`` from the quantizers at their deterministic gates.

    Weight bits and step (``quantizer.bit_width`` / ``step_size``), the output quantizer's bits, step and sign (None:
    float output, the logits), and the kept output channels (``channel_mask``; None without pruning). A layer whose
    config has no weight quantizer gets a 32-bit plan (carried as 8 bits over max|w|, reported as not exact).
    """
    table = _quantizer_table(qmodel)
    plans = {}
    for wrapper in _wrappers(qmodel):
        name = wrapper.layer.name
        entry = table.get(wrapper.name, {})
        if "weight" in entry:
            quantizer, variables = entry["weight"]
            bits, step = int(quantizer.bit_width(variables)), float(quantizer.step_size(variables))
            mask = quantizer.channel_mask(variables)
        else:
            kernel, _ = _quantized_kernel_bias(wrapper, table)
            bits, step, mask = 32, max(float(np.abs(kernel).max()), 1e-8) / (2 ** 31 - 1), None
        if bits not in WEIGHT_BITS:
            raise ValueError(f"{name}: learned {bits}-bit weights; TFLite export supports {WEIGHT_BITS}")
        act_bits = act_step = None
        act_signed = False
        if "activation" in entry:
            quantizer, variables = entry["activation"]
            act_bits, act_step = int(quantizer.bit_width(variables)), float(quantizer.step_size(variables))
            act_signed = bool(quantizer.signed)
            if act_bits not in WEIGHT_BITS:
                raise ValueError(f"{name}: learned {act_bits}-bit activations; TFLite export supports {WEIGHT_BITS}")
        out_mask = None
        if mask is not None:
            out_mask = np.asarray(mask).reshape(-1) > 0.5
            if not out_mask.any():
                raise ValueError(f"{name}: every output channel is pruned (the layer outputs a constant); such a "
                                 f"model cannot be exported as a graph of convolutions")
            if out_mask.all():
                out_mask = None
        plans[name] = LayerPlan(bits, step, act_bits, act_step, act_signed, out_mask)
    return plans


def _fresh(layer):
    return layer.__class__.from_config(layer.get_config())


def plain_model(qmodel, *, batch_size: Optional[int] = None):
    """The bbits model as plain tf_keras layers, with the kernels and biases it uses in inference.

    Same graph and layer names as the original float model (``quant_conv1`` -> ``conv1``); kernels on the learned
    grids with pruned slices zero; biases masked like the bbits model masks them. Layers outside the wrappers
    (pooling, BatchNormalization, ...) keep their weights. Activation quantizers are not part of this model (the
    plans carry them).

    Args:
        qmodel: a model from ``bbits_tf.quantize_model`` (trained or not).
        batch_size: fix the batch dimension of the input (e.g. 1 for the Edge TPU compiler); None keeps it free.
    """
    table = _quantizer_table(qmodel)
    wrappers = {w.name: w for w in _wrappers(qmodel)}

    def unwrap(layer):
        return _fresh(layer.layer if isinstance(layer, _QuantizeWrapper) else layer)

    input_tensors = None
    if batch_size is not None:
        input_tensors = [keras.Input(batch_shape=(batch_size,) + tuple(t.shape[1:]), dtype=t.dtype)
                         for t in qmodel.inputs]
        input_tensors = input_tensors[0] if len(input_tensors) == 1 else input_tensors
    plain = keras.models.clone_model(qmodel, input_tensors=input_tensors, clone_function=unwrap)
    for layer in qmodel.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.name in wrappers:
            kernel, bias = _quantized_kernel_bias(layer, table)
            target = plain.get_layer(layer.layer.name)
            target.set_weights([kernel] + ([bias] if bias is not None else []))
        elif layer.get_weights():
            plain.get_layer(layer.name).set_weights(layer.get_weights())
    return plain


def _int8_storage(plan: LayerPlan) -> LayerPlan:
    """The plan with <= 4-bit weights stored as INT8 on the same grid (the b-bit grid is part of the 8-bit one)."""
    if plan.weight_bits < 8:
        return dataclasses.replace(plan, weight_bits=8)
    return plan


def _array(data) -> np.ndarray:
    if callable(data):
        return np.concatenate([np.asarray(batch[0], np.float32) for batch in data()])
    return np.asarray(data, np.float32)


def _float_output_ranges(qmodel, plans, x) -> Dict[str, tuple]:
    """(lo, hi) of every float-output layer (the logits) of the bbits model over ``x``, widened to include 0."""
    names = [n for n, p in plans.items() if p.act_bits is None]
    if not names:
        return {}
    wrappers = {w.layer.name: w for w in _wrappers(qmodel)}
    probe = keras.Model(qmodel.inputs, [wrappers[n].output for n in names])
    outs = probe.predict(x, verbose=0, batch_size=_PREDICT_BATCH)
    outs = outs if len(names) > 1 else [outs]
    ranges = {}
    for name, out in zip(names, outs):
        lo, hi = min(0.0, float(np.min(out))), max(0.0, float(np.max(out)))
        ranges[name] = (lo, hi) if hi > lo else (lo, lo + 1.0)
    return ranges


def _static_batch(tflite_bytes: bytes) -> bool:
    interp = make_interpreter(tflite_bytes)
    return int(interp.get_input_details()[0]["shape_signature"][0]) != -1


def run_litert_any_batch(tflite_bytes: bytes, x: np.ndarray, **kwargs) -> np.ndarray:
    """``run_litert``, one sample at a time when the model has a static batch dimension (batch_size=1 exports)."""
    if not _static_batch(tflite_bytes):
        return run_litert(tflite_bytes, x, **kwargs)
    return np.concatenate([run_litert(tflite_bytes, x[i:i + 1], **kwargs) for i in range(len(x))])


def _verify(tflite_bytes, qmodel, x, y) -> VerifyReport:
    run = run_litert_any_batch if _static_batch(tflite_bytes) else None
    return verify(tflite_bytes, qmodel, x, y, run=run)


def _bias_tensors(tflite_bytes: bytes, names) -> Dict[str, Optional[flatbuffer.TensorInfo]]:
    flat = flatbuffer.read(tflite_bytes)
    out = {}
    for op, w, b, o in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, o.name], list(names))
        if name is not None:
            out[name] = b
    return out


def _layer_rows(report: ExportReport, plans: Mapping[str, LayerPlan], int4: frozenset, int2: frozenset,
                in_channels: Mapping[str, int]):
    biases = _bias_tensors(report.model_bytes, list(plans))
    rows, problems = [], []
    for layer in report.layers:
        plan = plans[layer.name]
        stored_bits = flatbuffer.BITS.get(layer.weight_type, 0)
        max_codes = 2 ** min(plan.weight_bits, 8) - 1
        if layer.distinct_codes > max_codes:
            problems.append(f"{layer.name}: {layer.distinct_codes} distinct weight values > 2^{plan.weight_bits} - 1")
        want = "INT4" if layer.name in int4 else "INT8"
        if layer.name in int2:
            want = "INT2"
        if layer.weight_type != want:
            problems.append(f"{layer.name}: {plan.weight_bits}-bit weights stored as {layer.weight_type}, "
                            f"expected {want}")
        lay = report.prune.layers.get(layer.name)
        kept_in = lay.kept_in if lay is not None else in_channels[layer.name]
        total_in = lay.total_in if lay is not None else in_channels[layer.name]
        want_out = layer.total_out if plan.out_mask is None else int(plan.out_mask.sum())
        if layer.op != "DEPTHWISE_CONV_2D" and layer.kept_out != want_out:
            problems.append(f"{layer.name}: {layer.kept_out} output channels in the file, the gates keep {want_out}")
        if plan.act_bits is None:
            carried = "int8 over the representative range (float in the bbits model)"
        elif plan.act_bits <= 8:
            carried = f"int8, scale = learned step, zero point {layer.act_zero_point} (exact {plan.act_bits}-bit grid)"
        else:
            carried = f"int8 over the learned range (requantized from {plan.act_bits} bits)"
        b = biases.get(layer.name)
        rows.append(BbitsLayer(
            name=layer.name, op=layer.op, weight_bits=plan.weight_bits, weight_step=plan.weight_step,
            act_bits=plan.act_bits, act_step=plan.act_step, act_signed=plan.act_signed,
            stored_weight_type=layer.weight_type, stored_weight_bits=stored_bits, act_carried_as=carried,
            kept_out=layer.kept_out, total_out=layer.total_out, kept_in=int(kept_in), total_in=int(total_in),
            params=layer.params, distinct_codes=layer.distinct_codes, max_codes=max_codes,
            learned_weight_bytes=layer.params * plan.weight_bits / 8, stored_weight_bytes=layer.stored_bytes,
            bias_params=0 if b is None else int(np.prod(b.shape)), stored_bias_bytes=0 if b is None else b.nbytes,
            exact=layer.exact))
    return rows, problems


def _to_int2(report: ExportReport, names) -> None:
    """``pack_int2`` on the report's bytes, updating the report in place."""
    data, changed = pack_int2(report.model_bytes, names)
    if not changed:
        return
    flat = flatbuffer.read(data)
    tensors = {}
    for _, w, b, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], list(changed))
        if name is not None:
            tensors[name] = (w, b)
    for layer in report.layers:
        if layer.name in changed:
            w, b = tensors[layer.name]
            layer.weight_type, layer.weight_scale, layer.stored_bytes = w.type, w.scale, w.nbytes
            layer.bias_scale = None if b is None else b.scale
            moved = (f"; the int32 bias moved to the 7x coarser grid input scale x {w.scale:g}"
                     if changed[layer.name]["bias_rescaled"] else "")
            report.notes.append(f"{layer.name}: 2-bit weights stored as INT2 (experimental; LiteRT builtin kernels "
                                f"only, not TFLite Micro){moved}")
    report.model_bytes, report.file_bytes = data, len(data)
    report.tensor_types = {}
    for t in flat.tensors:
        report.tensor_types[t.type] = report.tensor_types.get(t.type, 0) + 1


def _wide_layers(plans: Mapping[str, LayerPlan]) -> Dict[str, str]:
    out = {}
    for name, plan in plans.items():
        parts = []
        if plan.weight_bits > 8:
            parts.append(f"{plan.weight_bits}-bit weights stored as INT8 over the same range")
        if plan.act_bits is not None and plan.act_bits > 8:
            parts.append(f"{plan.act_bits}-bit activations carried as int8 over the same range")
        if parts:
            out[name] = ("; ".join(parts) + " (not exact; TFLite's 16x8 mode would need int16 activations in the "
                         "whole model and is not used; nothing is kept float)")
    return out


def write_c_arrays(tflite_bytes: bytes, output_path: str, name: Optional[str] = None):
    """``<stem>_data.cc`` / ``<stem>_data.h`` next to ``output_path`` (array ``g_<stem>``, 16-byte aligned, const).

    The source includes its header: a namespace-scope ``const`` array has internal linkage in C++ unless an
    ``extern`` declaration is in scope.
    """
    stem = os.path.splitext(os.path.basename(output_path))[0]
    name = c_identifier(name or f"g_{stem}")
    base = os.path.join(os.path.dirname(os.path.abspath(output_path)), f"{stem}_data")
    source, header = to_c_array(tflite_bytes, name)
    with open(base + ".h", "w") as f:
        f.write(header)
    with open(base + ".cc", "w") as f:
        f.write(f'#include "{os.path.basename(base)}.h"\n\n' + source)
    return base + ".cc", base + ".h"


def tflm_check(tflite_bytes: bytes, x: np.ndarray):
    """(max |TFLM - LiteRT builtin| in output LSBs, arena bytes) on the inputs ``x`` (one at a time in TFLM)."""
    lite = run_litert_any_batch(tflite_bytes, x, raw=True, delegates="none")
    micro = run_tflm(tflite_bytes, x, raw=True)
    diff = np.abs(lite.astype(np.float64) - micro.astype(np.float64)).max() if len(x) else 0.0
    if lite.dtype == np.float32:  # float output: in steps of the int8 tensor behind the DEQUANTIZE
        diff = diff / output_scale(tflite_bytes)
    return float(diff), tflm_arena_bytes(tflite_bytes)


# ---------------------------------------------------------------------------------------------------- export

def _int4_layers(int4, plans) -> frozenset:
    """The layers whose <= 4-bit weights are stored as INT4: all (True), none (False) or the named ones."""
    if isinstance(int4, bool):
        return frozenset(n for n, p in plans.items() if p.weight_bits <= 4) if int4 else frozenset()
    names = frozenset([int4] if isinstance(int4, str) else int4)
    unknown = sorted(names - set(plans))
    if unknown:
        raise ValueError(f"`int4` names layers the model does not have: {unknown}. Layers: {sorted(plans)}")
    return frozenset(n for n in names if plans[n].weight_bits <= 4)


def export_bbits(qmodel, output_path: Optional[str] = None, *, representative_data, io: str = "float",
                 validation_data=None, input_range=None, output_ranges=None, int4=True, int2: bool = False,
                 batch_size: Optional[int] = None, c_array: bool = False, c_name: Optional[str] = None,
                 tflm: Optional[bool] = None, tflm_samples: int = 100, min_agreement: float = 0.995,
                 max_accuracy_drop: float = 0.001, strict: bool = False) -> BbitsExportReport:
    """Export a Bayesian Bits model to integer TFLite and verify the file against the model.

    Args:
        qmodel: a model from ``bbits_tf.quantize_model`` (trained; its deterministic gates are used).
        output_path: where to write the .tflite (None: do not write; the bytes are in ``report.model_bytes``).
        representative_data: model inputs (array) for the input range and the float-output (logits) range (min
            and max of the bbits model's logits over all of them) and for the converter.
        io: "float" (float32 input/output; phones) or "int8" (int8 input/output; microcontrollers, Edge TPU).
        validation_data: ``(x, y)`` (labels may be None) to verify on; None verifies on ``representative_data``.
        input_range: fixed (lo, hi) of the 8-bit model input, e.g. (0.0, 1.0); default from the data.
        output_ranges: layer name -> (lo, hi) of float outputs, overriding the data's.
        int4: store <= 4-bit weights as INT4 (True, default). False stores them as INT8 on the same grid (exact,
            2x / 4x the learned size): every tensor 8-bit, as the Edge TPU compiler wants, and every op runs in XNNPACK. A
            collection of layer names: INT4 for those only (e.g. the large Dense layers; convolutions stay INT8 and
            fast in XNNPACK).
        int2: experimental: store 2-bit Dense (FULLY_CONNECTED) weights as packed INT2 codes {-1, 0, 1} with the
            learned step as scale (``pack_int2``, exact). LiteRT's builtin kernel runs it (XNNPACK does not take
            it); TFLite Micro cannot load it; 2-bit convolutions stay INT4 (no INT2 CONV_2D kernel).
        batch_size: fix the input batch dimension (1 for the Edge TPU); None keeps it dynamic.
        c_array: also write ``<stem>_data.cc`` / ``<stem>_data.h`` next to the file (needs ``output_path``).
        c_name: C array name (default ``g_<stem>``).
        tflm: run the file in the TFLite Micro interpreter and find its arena size (default: for io="int8" without
            ``int2``, which TFLM cannot load).
        tflm_samples: inputs TFLM runs (it runs one at a time).
        min_agreement, max_accuracy_drop: thresholds of the top-1 agreement and |accuracy difference| checks.
        strict: raise RuntimeError when a check fails (structural problems of the file always raise).

    Returns:
        BbitsExportReport.
    """
    if c_array and output_path is None:
        raise ValueError("`c_array=True` writes next to the .tflite file; give `output_path`")
    plans = plans_from_bbits(qmodel)
    plain = plain_model(qmodel, batch_size=batch_size)
    int2 = frozenset(n for n, p in plans.items() if int2 and p.weight_bits == 2
                     and isinstance(plain.get_layer(n), keras.layers.Dense))
    int4 = _int4_layers(int4, plans) - int2  # INT2 layers go through INT8 codes {-1, 0, 1} (bias grid unchanged)
    deployed_plans = {n: (p if n in int4 else _int8_storage(p)) for n, p in plans.items()}
    x_rep = _array(representative_data)
    ranges = _float_output_ranges(qmodel, plans, x_rep)
    ranges.update(output_ranges or {})
    base = export_plans(plain, deployed_plans, None, representative_data=x_rep, io=io,
                        input_range=input_range, output_ranges=ranges)
    if int2:
        _to_int2(base, int2)
    if output_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        with open(output_path, "wb") as f:
            f.write(base.model_bytes)
        base.path = output_path
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ExportReport)}
    in_channels = {n: int(plain.get_layer(n).input_shape[-1]) for n in plans}
    rows, problems = _layer_rows(base, plans, int4, int2, in_channels)
    report = BbitsExportReport(**fields, bbits_layers=rows, plans={n: p.to_dict() for n, p in plans.items()},
                               wide_layers=_wide_layers(plans), int4=sorted(int4))
    checks = {"grids": True,  # export raises when a weight or activation is off its planned grid
              "types_and_distinct_codes": not any("distinct" in p or "stored as" in p for p in problems),
              "kept_channels": not any("output channels" in p for p in problems)}

    if validation_data is not None:
        x_val, y_val = validation_data
    else:
        x_val, y_val = x_rep, None
    x_val = np.asarray(x_val, np.float32)
    v = _verify(base.model_bytes, qmodel, x_val, y_val)
    report.verification = v
    checks["top1_agreement"] = v.top1_agreement >= min_agreement
    if not checks["top1_agreement"]:
        problems.append(f"top-1 agreement {100 * v.top1_agreement:.2f}% < {100 * min_agreement:.2f}%")
    if v.accuracy_tflite is not None:
        drop = abs(v.accuracy_tflite - v.accuracy_keras)
        checks["accuracy"] = drop <= max_accuracy_drop + 1e-12
        if not checks["accuracy"]:
            problems.append(f"accuracy differs by {100 * drop:.2f} pp > {100 * max_accuracy_drop:.2f} pp")

    if tflm if tflm is not None else (io == "int8" and not int2):
        n = min(tflm_samples, len(x_val))
        try:
            report.tflm_max_lsb_diff, report.tflm_arena_bytes = tflm_check(base.model_bytes, x_val[:n])
            report.tflm_samples = n
            checks["tflm_within_1_lsb"] = report.tflm_max_lsb_diff <= 1.0 + 1e-6
            if not checks["tflm_within_1_lsb"]:
                problems.append(f"TFLM differs from LiteRT by {report.tflm_max_lsb_diff:g} LSB")
        except RuntimeError as e:  # e.g. INT2 weights: TFLM's kernels do not take them
            checks["tflm_within_1_lsb"] = False
            problems.append(f"TFLite Micro cannot run the file: {str(e).splitlines()[0]}"
                            + (" (INT2 weights are not supported by TFLM)" if "INT2" in report.tensor_types else ""))

    if c_array:
        report.c_source_path, report.c_header_path = write_c_arrays(base.model_bytes, output_path, c_name)
    report.checks, report.problems = checks, problems
    report.notes = list(report.notes) + [f"{n}: {how}" for n, how in report.wide_layers.items()]
    if strict and problems:
        raise RuntimeError("Export checks failed:\n  " + "\n  ".join(problems))
    return report


def export_for_example(qmodel, output_dir, x_test, y_test, *, x_train=None, io: str = "int8",
                       input_range=(0.0, 1.0), print_fn=print) -> Dict:
    """What examples/mnist.py does after training: write ``model.tflite`` and ``model_data.cc/.h`` to
    ``output_dir``, verify on the test set (LiteRT vs the bbits model, TFLM vs LiteRT), print, return a summary.

    Args:
        qmodel: the trained bbits model.
        output_dir: folder for the files.
        x_test, y_test: the test set (verification on all of it).
        x_train: training images; the first 1000 are the representative data (default: the first 1000 test images,
            which only set the logits' int8 range).
        io: "int8" (default: the file runs on microcontrollers as-is, and on phones) or "float".
        input_range: range of the 8-bit model input ((0, 1): MNIST pixels, exactly on the grid k / 255).
        print_fn: where the table goes (None: silent).

    Returns:
        JSON-able dict: paths, sizes, checks, verification, per-layer accounting.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(str(output_dir), "model.tflite")
    rep = np.asarray(x_train if x_train is not None else x_test, np.float32)[:1000]
    report = export_bbits(qmodel, path, representative_data=rep, io=io, validation_data=(x_test, y_test),
                          input_range=input_range, c_array=True, tflm=True)
    if print_fn is not None:
        print_fn(f"TFLite export: {path} ({report.file_bytes} bytes), C arrays {report.c_source_path}, "
                 f"{report.c_header_path}")
        print_fn(report.format())
    d = report.to_dict()
    d.pop("prune", None)
    return jsonable(d)


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
