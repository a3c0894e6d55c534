"""Static Edge TPU (Coral) compatibility check of a .tflite file, as data: ``edgetpu_check(model_bytes)``.

``edgetpu_compiler`` is not run (it cannot be installed on this machine): this reads the file against what Coral
documents; the compiler stays the final word (an op it does not map runs on the CPU, and so does every op after it).

Source: Coral, "TensorFlow models on the Edge TPU", "Model requirements" and "Supported operations",
https://coral.ai/docs/edgetpu/models-intro/#supported-operations. The page was read through stored copies: the
current table as Axis reproduces it for the Edge TPU in its ARTPEC-7 cameras (Add .. ResizeBilinear;
https://developer.axis.com/computer-vision/on-device/system-on-chip/artpec-7/supported-ops/) and an earlier copy of
Coral's page (github.com/dgist-datalab/Datalab_Intern, Edge_TPU/convert_model_for_Edge_TPU.md: the requirements,
ResizeNearestNeighbor .. StridedSlice). Rsqrt, Sum, Squared-difference, Transpose, TransposeConv (current table,
runtime 14) were not re-read; their limitations are not checked.

Model requirements (Coral): tensor parameters quantized to 8 bits (int8 or uint8); tensor sizes constant at compile
time (no dynamic sizes); model parameters such as bias tensors constant at compile time; "Tensors are either 1-,
2-, or 3-dimensional. If a tensor has more than 3 dimensions, then only the 3 innermost dimensions may have a size
greater than 1"; only the supported operations below.

Supported operations (Coral name: known limitation): Add; AveragePool2d: no fused activation function;
Concatenation: no fused activation function, and if any input is a compile-time constant tensor there must be only
2 inputs and that tensor must be all zeros (a zero-padding op); Conv2d: same dilation in x and y; DepthwiseConv2d:
same dilation in x and y; ExpandDims; FullyConnected: only the default weights format, output tensor is
one-dimensional; L2Normalization; Logistic; LSTM: unidirectional only; Maximum; MaxPool2d: no fused activation
function; Mean: no reduction in the batch dimension, a z-reduction needs z a multiple of 4; Minimum; Mul; Pack: no
packing in the batch dimension; Pad: no padding in the batch dimension; PReLU: alpha 1-dimensional (only the
innermost dimension > 1); Quantize; ReduceMax, ReduceMin: not on the batch dimension; ReLU; ReLU6; ReLUN1To1;
Reshape: certain reshapes might not be mapped for large tensor sizes; ResizeBilinear, ResizeNearestNeighbor:
input/output a 3-dimensional tensor, and depending on the sizes may stay on the CPU to avoid loss of precision;
Rsqrt; Slice; Softmax: only a 1D input tensor of at most 16,000 elements; SpaceToDepth; Split; Squeeze: only when
the squeezed dimensions are leading 1s (no relayout: [y][x][z] = 1,1,10 or 1,5,10 ok, 5,1,10 not); StridedSlice: all
strides 1, ellipsis-axis-mask 0 and new-axis-mask 0; Sub; Sum; Squared-difference; Tanh; Transpose; TransposeConv.

Checks (``EdgeTpuReport.checks``; each violation names its tensor or op): ``types``: every tensor int8/uint8 with
quantization parameters, except int32 biases (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV) and int32
parameters of listed ops (RESHAPE's shape; axes, paddings, begin/end/strides, perm, sizes); no float tensor (so no
float io), no INT4/INT2/INT16. ``constant_parameters``: weights, biases and those parameters are constants.
``static_shapes``: no -1 in a shape_signature, batch 1 on the inputs. ``ops``: every op on the list
(``SUPPORTED_OPS``, TFLite names), one subgraph. ``op_constraints``: the limitations above the file states precisely
(``_CONSTRAINTS``; the others: ``NOT_CHECKED``). ``dimensions``: at most 3 dimensions > 1, and only the 3 innermost
(convolution filters, O x H x W x I in TFLite, are exempt: every Edge TPU convolution has them).
"""
import collections
import dataclasses
import os
from typing import Dict, List, Tuple

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from . import flatbuffer

DOCS_URL = "https://coral.ai/docs/edgetpu/models-intro/#supported-operations"
COMPILER_NOTE = ("edgetpu_compiler was not run (it cannot be installed on this machine): this is a static reading "
                 "of the file against Coral's documented requirements. The compiler is the final word; an op it does "
                 "not map to the Edge TPU runs on the CPU, and so does every op after it.")

# Coral's supported-operations table in TFLite builtin names (LSTM: the cell and the unidirectional sequence op).
SUPPORTED_OPS = frozenset((
    "ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D EXPAND_DIMS FULLY_CONNECTED L2_NORMALIZATION LOGISTIC "
    "LSTM UNIDIRECTIONAL_SEQUENCE_LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MUL PACK PAD PRELU QUANTIZE REDUCE_MAX "
    "REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SLICE SOFTMAX "
    "SPACE_TO_DEPTH SPLIT SQUEEZE STRIDED_SLICE SUB SUM SQUARED_DIFFERENCE TANH TRANSPOSE TRANSPOSE_CONV").split())

NOT_CHECKED: Tuple[str, ...] = (
    "Reshape: 'certain reshapes might not be mapped for large tensor sizes' (no size is documented).",
    "ResizeBilinear / ResizeNearestNeighbor: may stay on the CPU 'depending on input/output size' (no rule given).",
    "Rsqrt, Sum, Squared-difference, Transpose, TransposeConv: on the list, their limitations were not re-read.",
    "Each op's minimum Edge TPU runtime version, and op versions the compiler (last release 16.0, older than TF "
    "2.21) may not know: `op_versions` lists them, unjudged.",
    "Where the compiler cuts the graph: after the first op it does not map, everything runs on the CPU.")

CHECKS = ("types", "constant_parameters", "static_shapes", "ops", "op_constraints", "dimensions")

_BIAS = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}  # the weights: input 1
_FILTERS = {("CONV_2D", 1), ("TRANSPOSE_CONV", 1)}  # O x H x W x I: exempt from the dimension rule
_INT32_PARAMS = {"RESHAPE": (1,), "MEAN": (1,), "SUM": (1,), "REDUCE_MAX": (1,), "REDUCE_MIN": (1,), "PAD": (1,),
                 "SLICE": (1, 2), "STRIDED_SLICE": (1, 2, 3), "TRANSPOSE": (1,), "SPLIT": (0,), "EXPAND_DIMS": (1,),
                 "RESIZE_BILINEAR": (1,), "RESIZE_NEAREST_NEIGHBOR": (1,), "TRANSPOSE_CONV": (0,)}
_ACTIVATIONS = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}


@dataclasses.dataclass(frozen=True)
class EdgeTpuProblem:
    """One violation: which check, the tensor or op it is about, and what is wrong."""

    check: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: {self.message}"


@dataclasses.dataclass(frozen=True)
class EdgeTpuReport:
    """The static Edge TPU check of one .tflite file.

    Attributes:
        problems: every violation found (``EdgeTpuProblem``), in check order.
        op_counts: op name -> how many the (first) subgraph has.
        op_versions: op name -> the op versions in the file.
        not_checked: documented constraints this reading cannot judge.
        compiler: says that ``edgetpu_compiler`` was not run.
        source: the Coral documentation the rules come from.
    """

    problems: Tuple[EdgeTpuProblem, ...]
    op_counts: Dict[str, int]
    op_versions: Dict[str, Tuple[int, ...]]
    not_checked: Tuple[str, ...] = NOT_CHECKED
    compiler: str = COMPILER_NOTE
    source: str = DOCS_URL

    @property
    def checks(self) -> Dict[str, bool]:  # check name -> passed
        failed = {p.check for p in self.problems}
        return {c: c not in failed for c in CHECKS}

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> Dict:
        return {"passed": self.passed, "checks": self.checks,
                "problems": [dataclasses.asdict(p) for p in self.problems], "op_counts": dict(self.op_counts),
                "op_versions": {k: list(v) for k, v in self.op_versions.items()},
                "not_checked": list(self.not_checked), "compiler": self.compiler, "source": self.source}

    def format(self) -> str:
        head = "passed" if self.passed else f"FAILED ({len(self.problems)} problem(s))"
        lines = [f"Edge TPU static check: {head}",
                 "ops: " + ", ".join(f"{name} x{n}" for name, n in self.op_counts.items()),
                 "checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in self.checks.items())]
        lines += [f"  problem: {p}" for p in self.problems] + ["not checked:"]
        lines += [f"  {item}" for item in self.not_checked] + [self.compiler, f"rules: {self.source}"]
        return "\n".join(lines)


def edgetpu_check(model) -> EdgeTpuReport:
    """Check a .tflite model against the Edge TPU's documented requirements, without the compiler.

    Args:
        model: the .tflite flatbuffer (bytes) or a path to the file.

    Returns:
        EdgeTpuReport: ``passed``, ``problems`` (each naming its tensor or op), ``checks``, ``op_counts``.
    """
    data = _model_bytes(model)
    flat = flatbuffer.read(data)
    raw = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = raw.subgraphs[0]
    problems = (_types(flat) + _constant_parameters(flat) + _static_shapes(flat, graph) + _ops(flat, raw)
                + _op_constraints(flat, graph) + _dimensions(flat))
    counts, versions = collections.Counter(), collections.defaultdict(set)
    for op in graph.operators or []:
        name = _op_name(raw, op)
        counts[name] += 1
        versions[name].add(int(raw.operatorCodes[op.opcodeIndex].version))
    return EdgeTpuReport(tuple(problems), dict(counts), {k: tuple(sorted(v)) for k, v in versions.items()})


def _model_bytes(model) -> bytes:
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            model = f.read()
    if not isinstance(model, (bytes, bytearray)):
        raise TypeError(f"`model` must be the .tflite bytes or a path to the file. Received: model of type "
                        f"{type(model).__name__}")
    if len(model) < 8 or bytes(model[4:8]) != b"TFL3":
        raise ValueError(f"`model` is not a TFLite flatbuffer (no 'TFL3' identifier at bytes 4..8). Received: "
                         f"{len(model)} bytes starting {bytes(model[:8])!r}")
    return bytes(model)


def _op_name(raw, op) -> str:
    code = raw.operatorCodes[op.opcodeIndex]
    name = flatbuffer.OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
    if name == "CUSTOM" and code.customCode:
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
        name = f"CUSTOM({custom})"
    return name


def _op_label(flat, i: int) -> str:
    op = flat.ops[i]
    out = flat.tensors[op.outputs[0]].name if op.outputs else "?"
    return f"{op.name} #{i} (output '{out}')"


def _uses(flat) -> Dict[int, List[Tuple[str, int]]]:
    """Tensor index -> [(op name, input position)] for every op input."""
    uses = collections.defaultdict(list)
    for op, pos, t in ((op, pos, t) for op in flat.ops for pos, t in enumerate(op.inputs) if t >= 0):
        uses[t].append((op.name, pos))
    return uses


def _role(flat, t) -> str:
    if t.index in flat.inputs or t.index in flat.outputs:
        return "model input" if t.index in flat.inputs else "model output"
    return "constant" if t.is_constant else "tensor"


def _types(flat) -> List[EdgeTpuProblem]:
    out, uses = [], _uses(flat)
    for t in flat.tensors:
        msg = f"{t.type} tensor; the Edge TPU takes only 8-bit quantized tensors (int8/uint8)"
        if t.type in ("INT8", "UINT8"):
            msg = None if t.scale is not None else f"{t.type} without quantization parameters"
        elif t.type == "INT32":
            used = uses.get(t.index, [])  # (an unlisted op's parameters: the op is reported under `ops`)
            bad = [f"{op} input {pos}" for op, pos in used
                   if op in SUPPORTED_OPS and _BIAS.get(op) != pos and pos not in _INT32_PARAMS.get(op, ())]
            what = f"INT32 used as {', '.join(bad)}" if bad else "INT32 tensor that is no op's bias or parameter"
            msg = None if used and not bad else f"{what}; int32 is allowed only for biases and parameters of listed ops"
        elif t.type in ("INT4", "INT2"):
            msg = f"packed {t.type} weights; the Edge TPU takes only 8-bit tensors (store them as INT8)"
        elif t.type.startswith("FLOAT") and (t.index in flat.inputs or t.index in flat.outputs):
            msg += " (float io: export with int8 input and output)"
        if msg:
            out.append(EdgeTpuProblem("types", f"{_role(flat, t)} '{t.name}'", msg))
    return out


def _constant_parameters(flat) -> List[EdgeTpuProblem]:
    out = []
    for i, op in enumerate(flat.ops):
        positions = ({1, _BIAS[op.name]} if op.name in _BIAS else set()) | set(_INT32_PARAMS.get(op.name, ()))
        for pos in sorted(p for p in positions if p < len(op.inputs)):
            t = op.inputs[pos]
            if t >= 0 and not flat.tensors[t].is_constant:
                out.append(EdgeTpuProblem("constant_parameters", _op_label(flat, i),
                                          f"input {pos} '{flat.tensors[t].name}' is computed at run time; model "
                                          f"parameters must be constant at compile time"))
    return out


def _static_shapes(flat, graph) -> List[EdgeTpuProblem]:
    out = []
    for t, raw_t in zip(flat.tensors, graph.tensors):
        sig = tuple(int(d) for d in raw_t.shapeSignature) if raw_t.shapeSignature is not None else ()
        if -1 in sig:
            out.append(EdgeTpuProblem("static_shapes", f"{_role(flat, t)} '{t.name}'",
                                      f"dynamic shape_signature {sig}; sizes must be constant at compile time"))
    for i in flat.inputs:
        t = flat.tensors[i]
        if len(t.shape) >= 2 and t.shape[0] != 1:
            out.append(EdgeTpuProblem("static_shapes", f"model input '{t.name}'",
                                      f"batch dimension {t.shape[0]} (shape {t.shape}); the Edge TPU needs 1"))
    return out


def _ops(flat, raw) -> List[EdgeTpuProblem]:
    out = []
    if len(raw.subgraphs) > 1:
        out.append(EdgeTpuProblem("ops", "model", f"{len(raw.subgraphs)} subgraphs; the compiler maps one (only the "
                                  f"first is checked here)"))
    for i, op in enumerate(raw.subgraphs[0].operators or []):
        name = _op_name(raw, op)
        if name not in SUPPORTED_OPS:
            out.append(EdgeTpuProblem("ops", _op_label(flat, i), f"{name} is not on the Edge TPU's supported "
                                      f"operations list: it runs on the CPU, and so does every op after it"))
    return out


# ---------------------------------------------------------------------------------------------- op constraints

def _const(flat, op, pos):
    """The int values of constant input ``pos`` of ``op`` (None when absent or not constant)."""
    if pos >= len(op.inputs) or op.inputs[pos] < 0:
        return None
    t = flat.tensors[op.inputs[pos]]
    return None if t.values is None else np.asarray(t.values).astype(np.int64).reshape(t.shape or (-1,))


def _in_shape(flat, op, pos=0):
    return flat.tensors[op.inputs[pos]].shape


def _fused(flat, op, opts):
    act = getattr(opts, "fusedActivationFunction", 0)
    return [f"fused activation {_ACTIVATIONS.get(act, act)}; no fused activation function is allowed"] if act else []


def _concatenation(flat, op, opts):
    msgs = _fused(flat, op, opts)
    consts = [flat.tensors[i] for i in op.inputs if flat.tensors[i].is_constant]
    if consts and len(op.inputs) != 2:
        msgs.append(f"{len(op.inputs)} inputs with a constant one ('{consts[0].name}'); with a constant input "
                    f"only 2 inputs are allowed")
    for t in consts:
        zero = t.zero_point if t.zero_point is not None else 0
        if np.any(np.asarray(t.values) != zero):
            msgs.append(f"constant input '{t.name}' is not all zeros (only a zero-padding concatenation maps)")
    return msgs


def _dilation(flat, op, opts):
    h, w = opts.dilationHFactor, opts.dilationWFactor
    return [] if h == w else [f"dilation {h} (y) != {w} (x); the docs need the same dilation in x and y"]


def _fully_connected(flat, op, opts):
    msgs = []
    if opts.weightsFormat != schema.FullyConnectedOptionsWeightsFormat.DEFAULT:
        msgs.append(f"weights format {opts.weightsFormat}; only the default format is supported")
    shape = flat.tensors[op.outputs[0]].shape
    if sum(d > 1 for d in shape) > 1:
        msgs.append(f"output shape {shape} is not one-dimensional")
    return msgs


def _reduce(flat, op, opts):
    """MEAN, REDUCE_MAX, REDUCE_MIN: not over the batch dimension; MEAN over z only for z a multiple of 4."""
    shape, values = _in_shape(flat, op), _const(flat, op, 1)
    if values is None or not shape:
        return ["reduction axes are not constant"] if shape else []
    axes = {int(a) % len(shape) for a in values.reshape(-1)}
    msgs = ["reduces the batch dimension"] if 0 in axes and len(shape) > 1 else []
    if op.name == "MEAN" and len(shape) - 1 in axes and shape[-1] % 4:
        msgs.append(f"z-reduction over {shape[-1]} channels, not a multiple of 4")
    return msgs


def _pack(flat, op, opts):
    rank = len(flat.tensors[op.outputs[0]].shape)
    return ["packs along the batch dimension"] if rank and opts.axis % rank == 0 else []


def _pad(flat, op, opts):
    pads = _const(flat, op, 1)
    if pads is None:
        return ["paddings are not constant"]
    return [f"pads the batch dimension by {tuple(int(p) for p in pads[0])}"] if len(pads) and np.any(pads[0]) else []


def _prelu(flat, op, opts):
    alpha = _in_shape(flat, op, 1)
    return [f"alpha shape {alpha}: only its innermost dimension may be > 1"] if any(d > 1 for d in alpha[:-1]) else []


def _softmax(flat, op, opts):
    shape = _in_shape(flat, op)
    size = int(np.prod(shape)) if shape else 1
    msgs = [f"input shape {shape} is not 1D"] if sum(d > 1 for d in shape) > 1 else []
    return msgs + ([f"input of {size} elements > 16,000"] if size > 16000 else [])


def _squeeze(flat, op, opts):
    shape = _in_shape(flat, op)
    dims = [int(d) % len(shape) for d in (opts.squeezeDims if opts.squeezeDims is not None else [])]
    dims = dims or [i for i, d in enumerate(shape) if d == 1]
    first_big = next((i for i, d in enumerate(shape) if d > 1), len(shape))
    inner = [d for d in dims if d > first_big]
    return [f"squeezes dimension(s) {inner} of {shape}, not leading 1s (needs a relayout)"] if inner else []


def _strided_slice(flat, op, opts):
    strides = _const(flat, op, 3)
    msgs = []
    if strides is None or np.any(strides != 1):
        msgs.append(f"strides {None if strides is None else tuple(int(v) for v in strides)}; only all strides 1 "
                    f"are supported")
    if opts.ellipsisMask or opts.newAxisMask:
        msgs.append(f"ellipsis_mask {opts.ellipsisMask}, new_axis_mask {opts.newAxisMask}; both must be 0")
    return msgs


_CONSTRAINTS = {"AVERAGE_POOL_2D": _fused, "MAX_POOL_2D": _fused, "CONCATENATION": _concatenation,
                "CONV_2D": _dilation, "DEPTHWISE_CONV_2D": _dilation, "FULLY_CONNECTED": _fully_connected,
                "MEAN": _reduce, "REDUCE_MAX": _reduce, "REDUCE_MIN": _reduce, "PACK": _pack,
                "PAD": _pad, "PRELU": _prelu, "SOFTMAX": _softmax, "SQUEEZE": _squeeze,
                "STRIDED_SLICE": _strided_slice}


def _op_constraints(flat, graph) -> List[EdgeTpuProblem]:
    out = []
    for i, (op, raw_op) in enumerate(zip(flat.ops, graph.operators or [])):
        check = _CONSTRAINTS.get(op.name)
        if check is not None:
            out += [EdgeTpuProblem("op_constraints", _op_label(flat, i), m)
                    for m in check(flat, op, raw_op.builtinOptions)]
    return out


def _dimensions(flat) -> List[EdgeTpuProblem]:
    filters = {op.inputs[pos] for op in flat.ops for name, pos in _FILTERS if op.name == name and pos < len(op.inputs)}
    out = []
    for t in flat.tensors:
        if t.index in filters or len(t.shape) <= 3 or all(d <= 1 for d in t.shape[:-3]):
            continue
        big, outer = sum(d > 1 for d in t.shape), sum(d > 1 for d in t.shape[:-3])
        out.append(EdgeTpuProblem("dimensions", f"{_role(flat, t)} '{t.name}'",
                                  f"shape {t.shape} has {big} dimensions > 1, {outer} outside the 3 innermost; the "
                                  f"Edge TPU takes at most 3, only the 3 innermost"))
    return out
