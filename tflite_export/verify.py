"""Run an exported model in the LiteRT interpreter and compare it with Keras."""
import dataclasses
from typing import Optional

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from . import flatbuffer

_CHUNK = 256


@dataclasses.dataclass
class VerifyReport:
    """Agreement of a .tflite model with a Keras model on the same inputs.

    Attributes:
        n: number of samples.
        top1_agreement: fraction of samples whose argmax agrees.
        accuracy_tflite, accuracy_keras: top-1 accuracy against the labels (None without labels).
        max_abs_diff: largest |tflite - keras| over all outputs (in output units).
        max_lsb_diff: the same in steps of the TFLite output scale (None for float outputs).
    """

    n: int
    top1_agreement: float
    accuracy_tflite: Optional[float]
    accuracy_keras: Optional[float]
    max_abs_diff: float
    max_lsb_diff: Optional[float]


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
    resolver = OpResolverType.AUTO if delegates == "default" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=tflite_bytes, num_threads=num_threads, experimental_op_resolver_type=resolver)


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


def output_scale(tflite_bytes: bytes) -> Optional[float]:
    """Scale of the last int8 tensor before the output (the output itself for int8 io), None if float."""
    flat = flatbuffer.read(tflite_bytes)
    out = flat.tensors[flat.outputs[0]]
    if out.scale:
        return out.scale
    for op in flat.ops:
        if op.name == "DEQUANTIZE" and op.outputs[0] == out.index:
            return flat.tensors[op.inputs[0]].scale
    return None


def verify(tflite_bytes: bytes, keras_model, x: np.ndarray, y: Optional[np.ndarray] = None, *,
           run=None) -> VerifyReport:
    """Compare the .tflite model with Keras inference on ``x`` (labels ``y`` optional, integer or one-hot).

    ``run(tflite_bytes, x)`` runs the file (default ``run_litert``; e.g. one input at a time for a batch-1 file).
    """
    t = (run or run_litert)(tflite_bytes, x).reshape(len(x), -1)
    k = np.asarray(keras_model.predict(x, verbose=0, batch_size=_CHUNK)).reshape(len(x), -1)
    labels = None if y is None else (np.argmax(y, -1) if np.ndim(y) > 1 else np.asarray(y).reshape(-1))
    diff = float(np.abs(t - k).max()) if len(x) else 0.0
    scale = output_scale(tflite_bytes)
    return VerifyReport(
        n=len(x), top1_agreement=float(np.mean(t.argmax(-1) == k.argmax(-1))),
        accuracy_tflite=None if labels is None else float(np.mean(t.argmax(-1) == labels)),
        accuracy_keras=None if labels is None else float(np.mean(k.argmax(-1) == labels)),
        max_abs_diff=diff, max_lsb_diff=None if scale is None else diff / scale)


def layer_io(tflite_bytes: bytes, x: np.ndarray, names, *, delegates: str = "none"):
    """Dequantized input and output of the conv / fully-connected op of each named layer, for a batch ``x``.

    Lets a test feed a reference layer exactly the input the integer op saw and compare outputs in LSBs.

    Returns:
        layer name -> (input float array, output float array, output scale).
    """
    x = np.asarray(x)
    resolver = OpResolverType.AUTO if delegates == "default" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = Interpreter(model_content=tflite_bytes, experimental_op_resolver_type=resolver,
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
