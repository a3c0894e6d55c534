"""BOP accounting (spec section 5): MACs from the model graph, bit widths and kept channels from the gates.

``BOPs = sum_L MACs_L * bits(input activation of L) * bits(weights of L) * keep_L`` and the reference is
``sum_L MACs_L * 32 * 32``, over the MAC layers L (Conv2D, DepthwiseConv2D, Dense, FoldedBatchNorm). The input
bits of L are those of the quantizer that really produced its input: the output quantizer of the MAC unit,
Add, Concatenate, pooling or activation layer before it, found through pass-through layers (which carry the
grid). The model input counts as 8 bits; a tensor that a float layer computed counts as 32 bits. ``keep_L``
is the fraction of (output channel, input channel) pairs still alive: a channel pruned by a producer also
removes the consumer's input channel, across pooling, Flatten (where one channel maps to H*W inputs),
Concatenate (masks concatenate) and Add (a channel is alive if any input keeps it; with tied gates, the
one gate's). A depthwise layer pruned with its input channels (tied gates) keeps a channel with that one gate.

Deterministic BOPs use the test-time gates; expected BOPs use the gates' keep probabilities (each quantizer's
expected bit width, with the truncation applied, and the mean keep probability of the channels).
"""
import dataclasses

import numpy as np

from bbits_tf import graph
from bbits_tf._keras import keras
from bbits_tf.quantize import bayesian_bits_quantizers

INPUT_BITS = 8
FLOAT_BITS = 32


@dataclasses.dataclass
class _Tensor:
    bits: float
    keep: np.ndarray  # per element of the last axis: 1/0 (deterministic) or keep probability (expected)
    owner: object = None  # the (wrapper) layer whose pruning gates set these channels, if one does


@dataclasses.dataclass
class LayerBops:
    """BOP accounting of one quantized layer."""

    name: str
    layer_type: str
    macs: int
    weight_bits: float
    input_bits: float
    output_bits: float  # FLOAT_BITS if the output is not quantized
    kept_out: float
    total_out: int
    kept_in: float
    total_in: int
    keep: float
    bops: float
    layer: object = None  # the model's layer (the QuantizeWrapper) this row counts


def _quantizer_state(model):
    """Layer name -> {"weight": (quantizer, vars), "activation": (quantizer, vars)}."""
    state = {}
    for layer, role, quantizer, variables in bayesian_bits_quantizers(model):
        state.setdefault(layer.name, {})[role] = (quantizer, variables)
    return state


def _bits(entry, expected):
    if entry is None:
        return float(FLOAT_BITS)
    quantizer, variables = entry
    return quantizer.expected_bit_width(variables) if expected else float(quantizer.bit_width(variables))


def _out_keep(entry, n_out, expected):
    quantizer, variables = entry if entry else (None, None)
    if quantizer is None or not quantizer.prune:
        return np.ones(n_out)
    return quantizer.channel_keep_prob(variables) if expected else quantizer.channel_mask(variables)


def _merge(model, layer, inputs):
    """The tensor a non-MAC layer outputs (before its own output quantizer, if any)."""
    inner = graph.inner_layer(layer)
    if isinstance(inner, keras.layers.Concatenate):  # several owners: the channels are charged to none
        return _Tensor(max(t.bits for t in inputs), np.concatenate([t.keep for t in inputs]))
    n_out = int(graph.output_shape(model, layer)[-1])
    if isinstance(inner, (keras.layers.Flatten, keras.layers.Reshape)):
        (t,) = inputs
        if len(t.keep) == n_out:
            return t
        positions = n_out // len(t.keep)
        if positions * len(t.keep) == n_out:  # channels last: output (h * W + w) * C + c is channel c
            return _Tensor(t.bits, np.tile(t.keep, positions), t.owner)
        return _Tensor(t.bits, np.full(n_out, float(np.mean(t.keep))))
    if graph.is_passthrough(layer):
        return inputs[0]
    if isinstance(inner, (keras.layers.Add, keras.layers.Maximum)):
        if all(np.array_equal(t.keep, inputs[0].keep) for t in inputs):  # tied gates: one channel, one gate
            return _Tensor(float(FLOAT_BITS), inputs[0].keep, inputs[0].owner)
        keep = 1.0 - np.prod([1.0 - t.keep for t in inputs], axis=0)
        return _Tensor(float(FLOAT_BITS), keep)
    if isinstance(inner, graph.GRID_LAYERS) and len(inputs) == 1 and len(inputs[0].keep) == n_out:
        return _Tensor(float(FLOAT_BITS), inputs[0].keep, inputs[0].owner)  # pooling, activation: channel-wise
    return _Tensor(float(FLOAT_BITS), np.ones(n_out))


def layer_bops(model, *, expected=False, input_bits=INPUT_BITS, fixed_bits=None):
    """Per-layer BOP accounting of a quantized model, in graph order (``LayerBops`` rows).

    With ``fixed_bits=(weight_bits, activation_bits)`` it counts any model (a float model, a fixed-bit baseline)
    as if every MAC layer's weights had ``weight_bits`` and every computed tensor ``activation_bits``, nothing
    pruned and the tensors that reach a model output float: the one counter for Bayesian Bits models and
    baselines alike.
    """
    return walk(model, expected=expected, input_bits=input_bits, fixed_bits=fixed_bits)[0]


def walk(model, *, expected=False, input_bits=INPUT_BITS, fixed_bits=None):
    """``(layer_bops rows, {id(layer): _Tensor})``: the rows and every layer's output tensor (bits, per-channel
    keep, owner of its pruning gates), for the deployment costs (``bbits_tf.flash``, ``bbits_tf.arena``)."""
    state = {} if fixed_bits is not None else _quantizer_state(model)
    if fixed_bits is None and not state:
        raise ValueError(
            "BOPs are counted from the gates of a Bayesian Bits model; this model has none. Pass the model that "
            "`bbits_tf.quantize_model` returned (for a float or fixed-bit model use "
            "`layer_bops(model, fixed_bits=(weight_bits, activation_bits))` or "
            f"`bbits_tf.training.fixed_bit_profile(model, weight_bits, activation_bits)`). "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    tensors, records = {}, []
    for layer in graph.topological_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            tensors[id(layer)] = _Tensor(float(input_bits), np.ones(int(graph.output_shape(model, layer)[-1])))
            continue
        inputs = [tensors[id(src)] for src in graph.inbound_layers(model, layer)]
        roles = state.get(layer.name, {})
        if not graph.is_mac(layer) or (fixed_bits is None and "weight" not in roles):
            tensor = _merge(model, layer, inputs)
            if "activation" in roles:
                tensor = _Tensor(_bits(roles["activation"], expected), tensor.keep, tensor.owner)
            elif fixed_bits is not None and not graph.is_passthrough(layer):
                tensor = _Tensor(float(FLOAT_BITS if graph.feeds_output(model, layer) else fixed_bits[1]),
                                 tensor.keep, tensor.owner)
            tensors[id(layer)] = tensor
            continue
        (t_in,) = inputs
        n_out = int(graph.output_shape(model, layer)[-1])
        keep_out = _out_keep(roles.get("weight"), n_out, expected)
        keep_in = t_in.keep
        weight = roles.get("weight")
        if weight is not None and getattr(weight[0], "gates_from", None) and graph.mac_kind(layer) == "DepthwiseConv2D":
            keep = float(np.mean(keep_out))  # pruned with its input channels: the same gates
        elif graph.mac_kind(layer) == "DepthwiseConv2D":  # a plain or a folded depthwise conv
            keep = float(np.mean(keep_out * np.repeat(keep_in, n_out // len(keep_in))))
        else:
            keep = float(np.mean(keep_out) * np.mean(keep_in))
        macs = graph.layer_macs(model, layer)
        if fixed_bits is None:
            w_bits = _bits(roles.get("weight"), expected)
            out_bits = _bits(roles.get("activation"), expected)
        else:
            w_bits = float(fixed_bits[0])
            out_bits = float(FLOAT_BITS if graph.feeds_output(model, layer) else fixed_bits[1])
        records.append(
            LayerBops(
                name=graph.inner_layer(layer).name,
                layer_type=type(graph.inner_layer(layer)).__name__,
                macs=macs,
                weight_bits=w_bits,
                input_bits=t_in.bits,
                output_bits=out_bits,
                kept_out=float(np.sum(keep_out)),
                total_out=n_out,
                kept_in=float(np.sum(keep_in)),
                total_in=len(keep_in),
                keep=keep,
                bops=macs * t_in.bits * w_bits * keep,
                layer=layer,
            )
        )
        owner = layer if weight is not None and weight[0].prune else None
        tensors[id(layer)] = _Tensor(out_bits, keep_out, owner)
    return records, tensors


def relative_bops(model, *, expected=False):
    """BOPs in percent of the same network at 32-bit weights and activations."""
    records = layer_bops(model, expected=expected)
    reference = sum(r.macs for r in records) * FLOAT_BITS * FLOAT_BITS
    return 100.0 * sum(r.bops for r in records) / reference
