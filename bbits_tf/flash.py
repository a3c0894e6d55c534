"""Flash: the bytes of the exported integer .tflite file, predicted from the gates (issue 11).

``tflite_export`` stores each MAC layer's kept weights at their *stored* width: 2- and 4-bit weights of the
layers it packs as INT4 (``int4``, by default the Dense layers, as ``tflite_export.export``'s ``int4`` default)
take half a byte, every other weight one byte (a 2- or 4-bit convolution sits in INT8 on a finer grid; 16- and
32-bit weights are carried as INT8 over the same range). Each kept output channel of a layer with a bias adds an
int32 bias (4 bytes). A pruned output channel removes its weights and the consumer's input channels (as in
``bbits_tf.bops``). The rest of the file (the flatbuffer's tensors, names, quantization parameters, operator
list) is ``overhead_bytes``: ``FIXED_BYTES``, ``BYTES_PER_TENSOR`` and the name of each tensor (the
converter names a tensor after the TensorFlow ops fused into it, ``model/layer/op;...``, which ``tensor_names``
rebuilds from the model's and layers' names), and ``BYTES_PER_REFINE`` for each QUANTIZE the exporter inserts to
carry a 2- or 4-bit layer input at a finer scale (``refine_inputs``). The constants are fitted to exported
LeNet5 and branched models (README, "Deployment budgets"): the prediction is within 2 % of the file there;
``flash_bytes(model, overhead=report.other_bytes)`` with an export's measured overhead is exact but for rounding.

Deterministic flash uses the test-time gates; expected flash uses the gates' keep probabilities: each layer's
bit-width distribution (``BayesianBitsQuantizer.bit_width_probs``) and its mean kept input and output channels.
"""
import dataclasses

import numpy as np

from bbits_tf import bops as bops_lib
from bbits_tf import graph
from bbits_tf._keras import keras
from bbits_tf.folding import FoldedBatchNorm

FIXED_BYTES = 964
BYTES_PER_TENSOR = 124  # table entry, shape, type, buffer, quantization parameters; its name comes on top
BYTES_PER_REFINE = 215  # a QUANTIZE operator and its output tensor
BIAS_BYTES = 4  # int32
DEFAULT_INT4 = (keras.layers.Dense,)  # tflite_export.export's default ``int4``
# Layers the converter removes (no TFLite operator).
_NO_OP = (keras.layers.InputLayer, keras.layers.Dropout, keras.layers.SpatialDropout1D,
          keras.layers.SpatialDropout2D)


@dataclasses.dataclass
class LayerFlash:
    """Stored bytes of one quantized layer."""

    name: str
    layer_type: str
    weight_bits: float  # learned (expected: the mean)
    stored_bits_per_weight: float  # 4 (INT4) or 8 (INT8), or their mean under the bit-width distribution
    weights: float  # kept weights (output x input channels x kernel positions)
    weight_bytes: float
    bias_bytes: float
    bytes: float


def stored_bytes_per_weight(bits, int4_layer):
    """Bytes the exporter stores one weight of a ``bits``-bit layer in: 0.5 (INT4) or 1 (INT8)."""
    return 0.5 if int4_layer and bits <= 4 else 1.0


def is_int4_layer(layer, int4=DEFAULT_INT4):
    """Whether the exporter stores this MAC layer's <= 4-bit weights as INT4 (``int4``: classes or names)."""
    inner = graph.inner_layer(layer)
    if isinstance(int4, bool):
        return int4
    items = int4 if isinstance(int4, (tuple, list, set, frozenset)) else (int4,)
    classes = tuple(i for i in items if isinstance(i, type))
    names = {i for i in items if isinstance(i, str)}
    return (bool(classes) and isinstance(inner, classes)) or inner.name in names


def kernel_elements_per_channel(record):
    """Weights per output channel of a MAC row at full input (``kernel size * input channels``)."""
    return int(np.prod(graph.kernel_shape(record.layer))) / record.total_out


def has_bias(layer):
    """Whether the file stores an int32 bias for this MAC layer (a folded BatchNorm's shift always makes one)."""
    inner = graph.inner_layer(layer)
    return isinstance(inner, FoldedBatchNorm) or bool(getattr(inner, "use_bias", True))


def weight_state(model):
    """Wrapper layer name -> (quantizer, variables) of its weight quantizer."""
    return {name: roles["weight"] for name, roles in bops_lib._quantizer_state(model).items() if "weight" in roles}


def layer_flash(model, *, expected=False, int4=DEFAULT_INT4, records=None):
    """Per quantized MAC layer, the bytes its weights and biases take in the exported file (``LayerFlash`` rows).

    ``records``: this model's ``bbits_tf.layer_bops(model, expected=expected)`` rows, if already computed.
    """
    records = bops_lib.layer_bops(model, expected=expected) if records is None else records
    state = weight_state(model)
    rows = []
    for r in records:
        quantizer, variables = state[r.layer.name]
        probs = quantizer.bit_width_probs(variables, expected=expected)
        int4_layer = is_int4_layer(r.layer, int4)
        per_weight = sum(p * stored_bytes_per_weight(b, int4_layer) for b, p in probs.items())
        weights = float(np.prod(graph.kernel_shape(r.layer))) * r.keep
        bias = BIAS_BYTES * r.kept_out if has_bias(r.layer) else 0.0
        rows.append(LayerFlash(name=r.name, layer_type=r.layer_type, weight_bits=r.weight_bits,
                               stored_bits_per_weight=8.0 * per_weight, weights=weights,
                               weight_bytes=weights * per_weight, bias_bytes=bias,
                               bytes=weights * per_weight + bias))
    return rows


def tflite_ops(model):
    """The layers that become TFLite operators, in graph order."""
    return [layer for layer in graph.topological_layers(model)
            if not isinstance(graph.inner_layer(layer), _NO_OP)
            and not (isinstance(graph.inner_layer(layer), keras.layers.Activation)
                     and graph.inner_layer(layer).get_config().get("activation") == "linear")]


# Layers between a coarse grid and its reader across which the exporter refines the reader's input (as
# ``tflite_export.export.input_grids``: where the reader reads the grid directly the converter drops the QUANTIZE).
_OP_BETWEEN = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling1D,
               keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Reshape)


def refined_inputs(model, records):
    """``[(source layer, reader)]``: the MAC layers whose input the exporter re-quantizes at a finer scale with one
    QUANTIZE operator each (``refine_inputs``): a 2- or 4-bit input grid reached through max pooling, Flatten or
    Reshape, read by a layer that has an output grid itself (not the float logits) and is not depthwise."""
    found = []
    for r in records:
        if r.input_bits > 4 or r.output_bits >= bops_lib.FLOAT_BITS or graph.mac_kind(r.layer) == "DepthwiseConv2D":
            continue
        sources = graph.inbound_layers(model, r.layer)
        if len(sources) == 1 and isinstance(graph.inner_layer(sources[0]), _OP_BETWEEN):
            found.append((sources[0], r.layer))
    return found


def tensor_names(model):
    """Estimated names of the file's tensors (weights, biases, activations), as TF 2.x's converter writes them."""
    names = ["serving_default_" + model.inputs[0].name.split(":")[0] + ":0"]
    for layer in tflite_ops(model):
        inner = graph.inner_layer(layer)
        p = f"{model.name}/{inner.name}/"
        is_output = not graph.outbound_layers(model, layer)
        out = None if is_output else ""
        if graph.is_mac(layer):
            op = {"Dense": "MatMul", "DepthwiseConv2D": "depthwise"}.get(graph.mac_kind(layer), "Conv2D")
            activation = getattr(inner, "activation", None)
            relu = activation is not None and getattr(activation, "__name__", "") != "linear"
            names.append(f"{p}{op};{p}FakeQuantWithMinMaxVars")
            if has_bias(layer):
                if op == "MatMul":
                    names.append(f"{p}Relu;{p}BiasAdd" if relu else f"{p}BiasAdd")
                else:
                    parts = ([f"{p}Relu"] if relu else []) + [f"{p}BiasAdd", f"{p}{op}", f"{p}BiasAdd/ReadVariableOp"]
                    names.append(";".join(parts))
            if out is not None:
                out = (f"{p}MatMul;" + (f"{p}Relu;" if relu else "") + f"{p}BiasAdd" if op == "MatMul"
                       else (names[-1] + "1" if has_bias(layer) else f"{p}{op}"))
        elif isinstance(inner, (keras.layers.Flatten, keras.layers.Reshape)):
            names.append("arith.constant")  # the new shape
            out = None if out is None else f"{p}Reshape"
        elif out is not None:
            out = p + {"MaxPooling2D": "MaxPool", "AveragePooling2D": "AvgPool", "Add": "add",
                       "Concatenate": "concat"}.get(type(inner).__name__, type(inner).__name__)
        names.append("StatefulPartitionedCall:0" if out is None else out)
    return names


def overhead_bytes(model, records):
    """The file's bytes beyond weights and biases, estimated from its tensors and their names."""
    names = tensor_names(model)
    return (FIXED_BYTES + BYTES_PER_TENSOR * len(names) + sum(len(n) for n in names)
            + BYTES_PER_REFINE * len(refined_inputs(model, records)))


def flash_bytes(model, *, expected=False, int4=DEFAULT_INT4, overhead=None):
    """Predicted bytes of the exported .tflite file (``overhead``: the non-weight bytes, e.g. an export report's
    ``other_bytes``; ``None`` estimates them)."""
    records = bops_lib.layer_bops(model, expected=expected)
    rows = layer_flash(model, expected=expected, int4=int4, records=records)
    if overhead is None:  # the QUANTIZE ops the file gets come from the test-time bits
        overhead = overhead_bytes(model, bops_lib.layer_bops(model) if expected else records)
    return float(sum(r.bytes for r in rows) + float(overhead))
