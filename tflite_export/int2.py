"""Experimental INT2 storage: rewrite 2-bit Dense weights of a converted .tflite as packed INT2 tensors.

The converter has no INT2 path (2-bit weights come out as INT4 with codes {-7, 0, 7}); this rewrites such tensors
in the flatbuffer as four two's complement 2-bit codes a byte with the learned step as the scale. LiteRT's
builtin fully connected kernel runs them; conv has no INT2 kernel, XNNPACK does not take them, TFLM cannot load them.
"""

import numpy as np

from . import flatbuffer


def _pack_crumbs(codes: np.ndarray) -> np.ndarray:
    """INT2 packing: four two's complement 2-bit codes a byte, lowest bits first (as INT4 puts the low nibble first)."""
    codes = np.asarray(codes, np.int64).reshape(-1)
    c = np.concatenate([codes, np.zeros((-codes.size) % 4, np.int64)]).reshape(-1, 4) & 3
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8)


def _pack_model(model) -> bytes:
    """Serialize a ``schema.ModelT`` with every buffer 16-byte aligned (as the converter writes them)."""
    import flatbuffers  # pylint: disable=import-outside-toplevel
    from ai_edge_litert import schema_py_generated as schema  # pylint: disable=import-outside-toplevel

    original = schema.BufferT.Pack

    def pack_aligned(self, builder):
        data = None
        if self.data is not None and len(self.data):
            payload = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)

    schema.BufferT.Pack = pack_aligned
    try:
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
    finally:
        schema.BufferT.Pack = original


def pack_int2(tflite_bytes: bytes, names) -> tuple:
    """Rewrite the ternary (2-bit) weights of FULLY_CONNECTED ops as packed INT2 (experimental).

    INT8 codes {-1, 0, 1} with scale s (``int4=False`` storage; what ``export_bbits(int2=True)`` converts) become
    INT2 codes, four a byte, same scale: exact. INT4 codes {-7, 0, 7} with scale s/7 (the converter's 2-bit INT4)
    become {-1, 0, 1} with scale s; TFLite requires the int32 bias scale to equal input scale x weight scale, so
    their bias moves to the 7x coarser grid, ``round(b / 7)`` (up to half an input scale x s per channel).
    LiteRT's builtin FULLY_CONNECTED kernel runs INT2 weights (XNNPACK leaves the op to it); its CONV_2D does not,
    so 2-bit convolutions stay INT4. TFLite Micro does not load INT2 tensors.

    Args:
        tflite_bytes: the converted model.
        names: the layer names that learned 2 bits.

    Returns:
        (new model bytes, {layer name: {"bytes_before", "bytes_after", "type_before", "bias_rescaled"}}).
    """
    from ai_edge_litert import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
    flat = flatbuffer.read(tflite_bytes)
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)
    graph = model.subgraphs[0]
    changed = {}
    for op, w, b, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], list(names))
        if name is None or op.name != "FULLY_CONNECTED" or w.type not in ("INT4", "INT8"):
            continue
        factor = int(round(np.abs(w.values).max())) if w.values.size and np.abs(w.values).max() else 1
        codes = w.values // factor
        if factor not in (1, 7) or np.any(codes * factor != w.values) or np.abs(codes).max() > 1:
            raise ValueError(f"{name}: weights are not ternary codes (k or 7k): cannot store them as INT2")
        t = graph.tensors[w.index]
        model.buffers[t.buffer].data = _pack_crumbs(codes)
        t.type = schema.TensorType.INT2
        t.quantization.scale = [float(s) * factor for s in t.quantization.scale]
        if b is not None:
            bt = graph.tensors[b.index]
            bias = np.round(b.values.astype(np.float64) / factor).astype("<i4")
            model.buffers[bt.buffer].data = np.frombuffer(bias.tobytes(), np.uint8)
            bt.quantization.scale = [float(s) * factor for s in bt.quantization.scale]
        changed[name] = {"bytes_before": w.nbytes, "bytes_after": int(np.ceil(w.values.size / 4)),
                         "type_before": w.type, "bias_rescaled": factor != 1 and b is not None}
    return (_pack_model(model) if changed else tflite_bytes), changed
