"""Run an exported model in the LiteRT interpreter and compare it with Keras."""
import dataclasses
import time
import warnings
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from . import flatbuffer

_CHUNK = 256


@dataclasses.dataclass
class VerifyReport:
    """Agreement of a .tflite model with a Keras model on the same inputs.

    Attributes:
        n: number of samples.
        top1_agreement: fraction of samples whose argmax agrees (the file's output against the Keras output).
        accuracy_tflite, accuracy_keras: top-1 accuracy against the labels (None without labels).
        max_abs_diff: largest |tflite - keras| over all outputs (in output units).
        max_lsb_diff: the same in steps of the TFLite output scale (None for float outputs).
        top1_agreement_on_grid: the argmax of the file against the argmax of the Keras output put on the file's
            int8 output grid (``round(y / scale) + zero point``, clipped; ties go to the first class, as for the
            file): everything the file computes before its last rounding. None without an int8 output.
        grid_ties: samples whose Keras output, on that grid, has two or more classes at the top: the int8
            output cannot tell them apart, so the file's top-1 there is the first of them, whatever the model
            says (how often this happens depends on the output range, i.e. ``output_ranges``).
    """

    n: int
    top1_agreement: float
    accuracy_tflite: Optional[float]
    accuracy_keras: Optional[float]
    max_abs_diff: float
    max_lsb_diff: Optional[float]
    top1_agreement_on_grid: Optional[float] = None
    grid_ties: Optional[int] = None


def quantize_input(x: np.ndarray, detail) -> np.ndarray:
    """Float inputs to the dtype an interpreter input expects (int8 inputs: round(x / scale) + zero point)."""
    dtype = detail["dtype"]
    if dtype == np.float32:
        return np.asarray(x, np.float32)
    scale, zp = _scale_zp(detail)
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float64) / scale) + zp, info.min, info.max).astype(dtype)


def dequantize_output(y: np.ndarray, detail) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return np.asarray(y, np.float32)
    scale, zp = _scale_zp(detail)
    return ((np.asarray(y, np.float64) - zp) * scale).astype(np.float32)


def _scale_zp(detail):
    q = detail.get("quantization_parameters")
    if q is not None and len(q["scales"]):
        return float(q["scales"][0]), int(q["zero_points"][0])
    return detail["quantization"]


def make_interpreter(tflite_bytes: bytes, num_threads: int = 1, delegates: str = "default") -> Interpreter:
    """A LiteRT interpreter; ``delegates="none"`` uses the builtin kernels only (no XNNPACK)."""
    return Interpreter(model_content=tflite_bytes, num_threads=num_threads,
                       experimental_op_resolver_type=_resolver(delegates))


def run_litert(tflite_bytes: bytes, x: np.ndarray, *, raw: bool = False, num_threads: int = 1,
               delegates: str = "default") -> np.ndarray:
    """Outputs of the model on a batch of float inputs ``x`` (quantized for int8 inputs).

    Args:
        raw: return the output tensor as stored (int8 for int8 output) instead of dequantized floats.
    """
    x = np.asarray(x)
    interp = make_interpreter(tflite_bytes, num_threads, delegates)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    size = None
    for start in range(0, len(x), _CHUNK):
        chunk = x[start:start + _CHUNK]
        if size != len(chunk):
            interp.resize_tensor_input(inp["index"], (len(chunk),) + tuple(inp["shape"][1:]))
            interp.allocate_tensors()
            inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
            size = len(chunk)
        interp.set_tensor(inp["index"], quantize_input(chunk, inp))
        interp.invoke()
        y = interp.get_tensor(out["index"])
        results.append(y if raw else dequantize_output(y, out))
    return np.concatenate(results)


def static_batch(tflite_bytes: bytes) -> bool:
    interp = make_interpreter(tflite_bytes)
    return int(interp.get_input_details()[0]["shape_signature"][0]) != -1


def run_litert_any_batch(tflite_bytes: bytes, x: np.ndarray, **kwargs) -> np.ndarray:
    """``run_litert``, one sample at a time when the model has a static batch dimension (batch_size=1 exports)."""
    if not static_batch(tflite_bytes):
        return run_litert(tflite_bytes, x, **kwargs)
    return np.concatenate([run_litert(tflite_bytes, x[i:i + 1], **kwargs) for i in range(len(x))])


def output_grid(tflite_bytes: bytes):
    """(scale, zero point) of the last int8 tensor before the output (the output itself for int8 io), or None."""
    flat = flatbuffer.read(tflite_bytes)
    out = flat.tensors[flat.outputs[0]]
    if out.scale:
        return out.scale, out.zero_point
    for op in flat.ops:
        if op.name == "DEQUANTIZE" and op.outputs[0] == out.index:
            t = flat.tensors[op.inputs[0]]
            return (t.scale, t.zero_point) if t.scale else None
    return None


def output_scale(tflite_bytes: bytes) -> Optional[float]:
    """Scale of the last int8 tensor before the output (the output itself for int8 io), None if float."""
    grid = output_grid(tflite_bytes)
    return None if grid is None else grid[0]


def verify(tflite_bytes: bytes, keras_model, x: np.ndarray, y: Optional[np.ndarray] = None, *,
           run=None) -> VerifyReport:
    """Compare the .tflite model with Keras inference on ``x`` (labels ``y`` optional, integer or one-hot).

    ``run(tflite_bytes, x)`` runs the file (default ``run_litert``; e.g. one input at a time for a batch-1 file).
    """
    t = (run or run_litert)(tflite_bytes, x).reshape(len(x), -1)
    k = np.asarray(keras_model.predict(x, verbose=0, batch_size=_CHUNK)).reshape(len(x), -1)
    labels = None if y is None else (np.argmax(y, -1) if np.ndim(y) > 1 else np.asarray(y).reshape(-1))
    diff = float(np.abs(t - k).max()) if len(x) else 0.0
    grid = output_grid(tflite_bytes)
    on_grid = ties = None
    if grid is not None and len(x):
        k_codes = _codes(k, *grid)
        on_grid = float(np.mean(t.argmax(-1) == k_codes.argmax(-1)))
        ties = int(np.sum(np.sum(k_codes == k_codes.max(-1, keepdims=True), -1) > 1))
    return VerifyReport(
        n=len(x), top1_agreement=float(np.mean(t.argmax(-1) == k.argmax(-1))) if len(x) else 1.0,
        accuracy_tflite=None if labels is None else float(np.mean(t.argmax(-1) == labels)),
        accuracy_keras=None if labels is None else float(np.mean(k.argmax(-1) == labels)),
        max_abs_diff=diff, max_lsb_diff=None if grid is None else diff / grid[0],
        top1_agreement_on_grid=on_grid, grid_ties=ties)


def layer_io(tflite_bytes: bytes, x: np.ndarray, names, *, delegates: str = "none"):
    """Dequantized input and output of the conv / fully-connected op of each named layer, for a batch ``x``.

    Lets a test feed a reference layer exactly the input the integer op saw and compare outputs in LSBs.

    Returns:
        layer name -> (input float array, output float array, output scale).
    """
    x = np.asarray(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        interp = Interpreter(model_content=tflite_bytes, experimental_op_resolver_type=_resolver(delegates),
                             experimental_preserve_all_tensors=True)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], (len(x),) + tuple(inp["shape"][1:]))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], quantize_input(x, inp))
    interp.invoke()
    flat = flatbuffer.read(tflite_bytes)
    result = {}
    for op, w, _, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], list(names))
        if name is None:
            continue
        t_in = flat.tensors[op.inputs[0]]
        deq = lambda t: (interp.get_tensor(t.index).astype(np.float64) - t.zero_point) * t.scale  # noqa: E731
        result[name] = (deq(t_in).astype(np.float32), deq(out).astype(np.float32), out.scale)
    return result


def bias_offsets(tflite_bytes: bytes, model, channel_maps) -> Dict[str, float]:
    """Per conv / fully-connected op: the largest ``|file bias - model bias|`` over its kept channels, in steps of
    the op's output (after its clips), for the layers of ``model`` named in ``channel_maps`` (the prune report's:
    which output channels the file keeps). ``model`` holds the biases the Keras model adds in inference (a
    Bayesian Bits model's are on the file's int32 grid, ``BayesianBitsQuantizer.bias_on_grid``, so this is ~0).
    Layers whose removed input channels left a constant to fold into the bias are not compared."""
    flat = flatbuffer.read(tflite_bytes)
    out = {}
    for op, _, b, t_out in flatbuffer.weight_tensors(flat):
        w = flat.tensors[op.inputs[1]]
        name = flatbuffer.match_layer([w.name, t_out.name], list(channel_maps))
        if name is None or b is None or b.values is None or not t_out.scale:
            continue
        maps = channel_maps[name]
        removed = ~np.asarray(maps["in_keep"], bool)
        if np.any(np.asarray(maps["in_const"])[removed] != 0):
            continue
        layer = model.get_layer(name)
        weights = layer.get_weights()
        bias = weights[1] if getattr(layer, "use_bias", False) else np.zeros(b.values.size, np.float32)
        kept = np.asarray(bias, np.float64).reshape(-1)[np.asarray(maps["out_keep"], bool)]
        if kept.size != b.values.size:
            continue
        out[name] = float(np.max(np.abs(b.values.astype(np.float64) * b.scale - kept), initial=0.0) / t_out.scale)
    return out


@dataclasses.dataclass
class LayerRef:
    """Where one planned layer of a Keras reference model sits, for ``lsb_histograms``.

    Attributes:
        layer: the Keras layer (a QuantizeWrapper for a Bayesian Bits model) whose output is the tensor the file's
            conv / fully-connected op (and its clips) computes; callable on a full-width input.
        out_keep: bool per channel of the layer's output: the channels the file keeps.
        in_keep: bool per channel (per feature, for a Dense layer) of the layer's input: the ones the file keeps.
        in_const: the values the removed input channels hold (a pruned channel's constant output), per channel.
        pad: an optional layer (a ZeroPadding2D) between the file op's input and ``layer`` in the Keras model,
            applied when the converter fused it into the op (``padding=SAME``; the op then reads the unpadded
            tensor).
    """

    layer: object
    out_keep: np.ndarray
    in_keep: np.ndarray
    in_const: np.ndarray
    pad: object = None


KERNELS = {"xnnpack": "default", "builtin": "none"}  # kernel kind -> ``delegates`` of ``make_interpreter``


def _count(hist: Dict[int, int], diff: np.ndarray) -> None:
    values, counts = np.unique(np.asarray(diff, np.int64), return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        hist[v] = hist.get(v, 0) + c


def _codes(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float values on an int8 tensor's grid: ``clip(round(v / scale) + zero_point, -128, 127)``."""
    return np.clip(np.round(np.asarray(values, np.float64) / scale) + zero_point, -128, 127).astype(np.int64)


def _full_width(x: np.ndarray, keep: np.ndarray, const: np.ndarray) -> np.ndarray:
    """The file's (pruned) input of a layer spread back over the Keras layer's channels (removed ones: const)."""
    if x.shape[-1] != int(keep.sum()):  # e.g. a 4-D tensor feeding a fully connected op
        x = x.reshape(len(x), -1)
    if x.shape[-1] != int(keep.sum()):
        raise ValueError(f"The file's input of a layer must have as many channels as the reference keeps "
                         f"({int(keep.sum())} of {keep.size}). Received: {x.shape[-1]} channels")
    full = np.empty(x.shape[:-1] + (keep.size,), np.float32)
    full[..., keep] = x
    full[..., ~keep] = np.asarray(const, np.float32)[~keep]
    return full


def lsb_histograms(tflite_bytes: bytes, keras_model, x: np.ndarray, layers: Mapping[str, LayerRef], *,
                   kernels: Sequence[str] = tuple(KERNELS), batch_size: int = 250):
    """Per kernel kind and layer: histograms of (file code - Keras code) of the layer's output tensor.

    The Keras value is put on the file tensor's own grid (``round(v / scale) + zero point``, clipped to int8), so a
    difference is in units of that tensor's step (LSB). Two views:

    * ``"local"``: the Keras layer is fed exactly the input the file's op saw (dequantized, pruned channels put
      back at their constants): what this layer's integer arithmetic (int32 bias, requantization rounding) does.
    * ``"end_to_end"``: both models run on the same model inputs: ``local`` plus everything upstream.

    Args:
        tflite_bytes: the converted model.
        keras_model: the Keras model the file should agree with (inference mode).
        x: model inputs.
        layers: layer name -> LayerRef, for the planned layers.
        kernels: kernel kinds to run: "xnnpack" (LiteRT's default delegate; the ops it does not take run on the
            builtin kernels) and / or "builtin" (builtin kernels only, as TFLite Micro).
        batch_size: inputs per interpreter call.

    Returns:
        {kernel kind: {layer name: {"local": {lsb diff: count}, "end_to_end": {lsb diff: count}}}}.
    """
    from bbits_tf._keras import keras  # pylint: disable=import-outside-toplevel
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"`kernels` must be among {sorted(KERNELS)}. Received: kernels={list(kernels)}")
    x = np.asarray(x, np.float32)
    flat = flatbuffer.read(tflite_bytes)
    names = list(layers)
    ops = {}
    for op, w, _, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], names)
        if name is not None:
            ops[name] = (flat.tensors[op.inputs[0]], out)
    missing = sorted(set(names) - set(ops))
    if missing:
        raise ValueError(f"The file has no conv / fully-connected op for some layers. Received: layers={missing}")
    probe = keras.Model(keras_model.inputs, [layers[n].layer.output for n in names])
    result = {k: {n: {"local": {}, "end_to_end": {}} for n in names} for k in kernels}
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        ref = probe.predict(chunk, verbose=0, batch_size=batch_size)
        ref = dict(zip(names, ref if len(names) > 1 else [ref]))
        for kind in kernels:
            with warnings.catch_warnings():  # "intended for debugging purposes only": that is what this is
                warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
                interp = Interpreter(model_content=tflite_bytes, experimental_preserve_all_tensors=True,
                                     experimental_op_resolver_type=_resolver(KERNELS[kind]))
            inp = interp.get_input_details()[0]
            if tuple(inp["shape"]) != (len(chunk),) + tuple(inp["shape"][1:]):
                interp.resize_tensor_input(inp["index"], (len(chunk),) + tuple(inp["shape"][1:]))
            interp.allocate_tensors()
            inp = interp.get_input_details()[0]
            interp.set_tensor(inp["index"], quantize_input(chunk, inp))
            interp.invoke()
            for name in names:
                t_in, t_out = ops[name]
                ref_layer = layers[name]
                got = interp.get_tensor(t_out.index).astype(np.int64)
                keep = np.asarray(ref_layer.out_keep, bool)
                want = _codes(ref[name][..., keep], t_out.scale, t_out.zero_point).reshape(got.shape)
                _count(result[kind][name]["end_to_end"], got - want)
                q_in = interp.get_tensor(t_in.index).astype(np.float64)
                x_in = ((q_in - t_in.zero_point) * t_in.scale).astype(np.float32)
                full = _full_width(x_in, np.asarray(ref_layer.in_keep, bool), np.asarray(ref_layer.in_const))
                local = np.asarray(ref_layer.layer(full, training=False))[..., keep]
                if local.size != got.size and ref_layer.pad is not None:  # the PAD fused into the conv op
                    local = np.asarray(ref_layer.layer(ref_layer.pad(full), training=False))[..., keep]
                local = _codes(local, t_out.scale, t_out.zero_point).reshape(got.shape)
                _count(result[kind][name]["local"], got - local)
    return result


def _resolver(delegates: str):
    if delegates not in ("default", "none"):
        raise ValueError(f"`delegates` must be 'default' or 'none'. Received: delegates={delegates!r}")
    return OpResolverType.AUTO if delegates == "default" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def lsb_check(lsb_diffs, problems) -> bool:
    """Every local difference within 1 LSB: the int32 bias grid and the requantization rounding cannot do more;
    a larger one means different weights, biases, channels or grids."""
    ok = True
    for kind, layers in lsb_diffs.items():
        for name, views in layers.items():
            hist = views["local"]
            beyond = sum(c for d, c in hist.items() if abs(d) > 1)
            if beyond:
                ok = False
                problems.append(f"{name} ({kind}): {beyond} output elements differ from the model's fed the same "
                                f"input by more than 1 LSB (up to {max(abs(d) for d in hist)})")
    return ok


def time_file(tflite_bytes: bytes, *, runs: int = 500, warmup: int = 50, num_threads: int = 1,
              delegates: str = "default") -> float:
    """Median microseconds per invoke of a .tflite file on a constant input (LiteRT, batch 1)."""
    interp = make_interpreter(tflite_bytes, num_threads=num_threads, delegates=delegates)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    shape = [1] + list(detail["shape"][1:])
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    interp.set_tensor(detail["index"], quantize_input(x, detail))
    for _ in range(warmup):
        interp.invoke()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e6)
