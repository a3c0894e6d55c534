"""Read a .tflite flatbuffer as plain data: tensors (type, shape, quantization, constant values) and operators.

Reading the flatbuffer instead of asking an interpreter matters: after ``allocate_tensors`` the default XNNPACK
delegate owns the constant tensors and the interpreter reports them with empty quantization, and packed INT4
buffers are not exposed unpacked.
"""
import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

TYPE_NAMES: Dict[int, str] = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
OP_NAMES: Dict[int, str] = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_NUMPY = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8,
          "INT16": np.int16, "INT64": np.int64}
BITS = {"INT2": 2, "INT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "FLOAT16": 16, "INT32": 32, "FLOAT32": 32,
        "INT64": 64}


@dataclasses.dataclass
class TensorInfo:
    """One tensor of the main subgraph.

    Attributes:
        index: tensor index in the subgraph.
        name: tensor name (the converter joins the names of fused ops with ';').
        type: TFLite type name, e.g. 'INT4', 'INT8', 'INT32', 'FLOAT32'.
        shape: the tensor shape.
        scale, zero_point: per-tensor quantization (first entry when per-axis), None if not quantized.
        num_scales: number of quantization scales (1 = per tensor).
        nbytes: bytes of the constant buffer (0 for activations).
        values: the constant's values unpacked to int64/float (None for activations).
    """

    index: int
    name: str
    type: str
    shape: tuple
    scale: Optional[float]
    zero_point: Optional[int]
    num_scales: int
    nbytes: int
    values: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    @property
    def is_constant(self) -> bool:
        return self.values is not None


@dataclasses.dataclass
class OpInfo:
    name: str
    inputs: List[int]
    outputs: List[int]


@dataclasses.dataclass
class FlatModel:
    tensors: List[TensorInfo]
    ops: List[OpInfo]
    inputs: List[int]
    outputs: List[int]


def unpack_int4(data: np.ndarray, count: int) -> np.ndarray:
    """Unpack TFLite's packed INT4 buffer (two's complement nibbles, low nibble first)."""
    data = np.asarray(data, np.uint8)
    nibbles = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(-1)[:count].astype(np.int64)
    return np.where(nibbles >= 8, nibbles - 16, nibbles)


def unpack_int2(data: np.ndarray, count: int) -> np.ndarray:
    """Unpack TFLite's packed INT2 buffer (two's complement crumbs, four a byte, lowest bits first)."""
    data = np.asarray(data, np.uint8)
    crumbs = np.stack([(data >> shift) & 0x03 for shift in (0, 2, 4, 6)], axis=-1).reshape(-1)[:count]
    crumbs = crumbs.astype(np.int64)
    return np.where(crumbs >= 2, crumbs - 4, crumbs)


def _buffer_bytes(model_bytes: bytes, buf) -> Optional[np.ndarray]:
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, np.uint8)
    if buf.offset > 1:  # large models keep buffers after the flatbuffer
        return np.frombuffer(model_bytes, np.uint8, count=buf.size, offset=buf.offset)
    return None


def read(model_bytes: bytes) -> FlatModel:
    """Parse the first subgraph of a .tflite model."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    tensors = []
    for i, t in enumerate(graph.tensors):
        type_name = TYPE_NAMES.get(t.type, str(t.type))
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else []))
        q = t.quantization
        scales = [] if q is None or q.scale is None else list(q.scale)
        zps = [] if q is None or q.zeroPoint is None else list(q.zeroPoint)
        raw = _buffer_bytes(model_bytes, model.buffers[t.buffer]) if t.buffer < len(model.buffers) else None
        values = None
        if raw is not None:
            count = int(np.prod(shape)) if shape else 1
            if type_name == "INT4":
                values = unpack_int4(raw, count)
            elif type_name == "INT2":
                values = unpack_int2(raw, count)
            elif type_name in _NUMPY:
                values = raw.view(_NUMPY[type_name])[:count]
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        tensors.append(TensorInfo(i, name, type_name, shape, float(scales[0]) if scales else None,
                                  int(zps[0]) if zps else None, len(scales), 0 if raw is None else raw.size, values))
    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        ops.append(OpInfo(OP_NAMES.get(builtin, str(builtin)), [int(i) for i in op.inputs],
                          [int(i) for i in op.outputs]))
    return FlatModel(tensors, ops, [int(i) for i in graph.inputs], [int(i) for i in graph.outputs])


_WEIGHT_INPUT = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1}


def weight_tensors(flat: FlatModel) -> List[tuple]:
    """(op, weight tensor, bias tensor or None, output tensor) for every conv / depthwise / fully connected op.

    The output tensor is taken after the MAXIMUM / MINIMUM ops with a constant operand that directly follow the op
    (the explicit clips of signed or non-ReLU activation grids).
    """
    out = []
    for op in flat.ops:
        if op.name in _WEIGHT_INPUT:
            w = flat.tensors[op.inputs[1]]
            b = flat.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            out.append((op, w, b, _after_clips(flat, flat.tensors[op.outputs[0]])))
    return out


def _after_clips(flat: FlatModel, tensor: TensorInfo) -> TensorInfo:
    while True:
        users = [op for op in flat.ops if tensor.index in op.inputs]
        if len(users) != 1 or users[0].name not in ("MAXIMUM", "MINIMUM"):
            return tensor
        other = [i for i in users[0].inputs if i != tensor.index]
        if len(other) != 1 or not flat.tensors[other[0]].is_constant:
            return tensor
        tensor = flat.tensors[users[0].outputs[0]]


def match_layer(tensor_names: Sequence[str], names: Sequence[str]) -> Optional[str]:
    """The layer an op belongs to, from the names of its tensors.

    Returns the one name among ``names`` that appears as a ``/name/`` scope in the first of ``tensor_names`` that
    holds exactly one of them (pass the weight tensor's name first, then the output's); None if none does.
    """
    for tensor_name in tensor_names:
        hits = [n for n in names if f"/{n}/" in tensor_name or tensor_name.startswith(f"{n}/")]
        if len(hits) == 1:
            return hits[0]
    return None
