"""Remove pruned output channels from a tf_keras model for real.

Semantics (Bayesian Bits, BAYESIAN_BITS.md section 2): a pruned output channel of a Conv2D / DepthwiseConv2D /
Dense layer has its kernel slice multiplied by the gate z_2 = 0, so ``prune`` treats that slice as zero whatever
the stored kernel holds. The bias is kept, so the channel emits the constant ``activation(bias)`` (optionally passed
through ``output_transforms``, e.g. the layer's activation quantizer). Removing the channel is exact when that
constant is 0. Otherwise the constant is carried through the layers in between (pooling, Flatten, Concatenate,
elementwise activations, BatchNormalization) and folded into the bias of each consumer: exact for Dense and for
'valid'-padded convolutions, approximate near the border of a 'same'-padded convolution (reported in
``PruneReport.inexact``).

A consumer loses the input channels its producers lost, across Flatten too (NHWC flatten index
``(h*W + w)*C + c``, so channel c owns H*W inputs) and Concatenate (masks concatenate). A DepthwiseConv2D loses the
outputs of a removed input channel; its own pruned outputs stay (with a zero kernel) while their input channel lives,
because a depthwise layer cannot skip an input channel.
"""
import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from bbits_tf import graph
from bbits_tf._keras import keras

L = keras.layers

PRODUCERS = (L.Conv2D, L.Dense, L.DepthwiseConv2D)  # DepthwiseConv2D subclasses Conv2D in tf_keras: test it first
_PASS_CONST = (L.MaxPooling2D, L.AveragePooling2D, L.GlobalMaxPooling2D, L.GlobalAveragePooling2D,
               L.MaxPooling1D, L.AveragePooling1D, L.Dropout, L.SpatialDropout2D, L.GaussianNoise,
               L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization)
_ELEMENTWISE = (L.ReLU, L.Activation, L.LeakyReLU, L.ELU, L.ThresholdedReLU)
_MERGE = {L.Add: np.add, L.Subtract: np.subtract, L.Multiply: np.multiply, L.Maximum: np.maximum,
          L.Minimum: np.minimum, L.Average: lambda a, b: (a + b) / 2}


@dataclasses.dataclass
class LayerChannels:
    """Kept / total channels on the last axis of a layer's input and output."""

    kept_in: int
    total_in: int
    kept_out: int
    total_out: int


@dataclasses.dataclass
class PruneReport:
    """What ``prune`` did, as data.

    Attributes:
        layers: layer name -> kept/total channels for every layer whose input or output shrank.
        folded: layers whose bias absorbed the constant output of removed input channels.
        inexact: human-readable reasons why the pruned model may differ from the original (empty = exact).
        kept_pruned: DepthwiseConv2D channels that are pruned but could not be removed.
        channel_maps: per Conv2D / DepthwiseConv2D / Dense layer, how the pruned layer's tensors sit in the
            original's: ``{"in_keep": bool per input channel (per input feature of a Dense layer), "in_const": the
            value a removed input channel holds, "out_keep": bool per output channel}`` (NumPy arrays).
    """

    layers: Dict[str, LayerChannels] = dataclasses.field(default_factory=dict)
    folded: List[str] = dataclasses.field(default_factory=list)
    inexact: List[str] = dataclasses.field(default_factory=list)
    kept_pruned: Dict[str, int] = dataclasses.field(default_factory=dict)
    channel_maps: Dict[str, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def exact(self) -> bool:
        return not self.inexact


@dataclasses.dataclass
class _Chan:
    """Channel state of one tensor: which positions of the last axis survive, and the constant the others hold."""

    keep: np.ndarray  # bool [n]
    const: np.ndarray  # float64 [n], meaningful where ~keep
    exact: bool = True  # False once a removed channel is no longer a true constant (e.g. zero padding)

    @property
    def removed_nonzero(self) -> np.ndarray:
        return ~self.keep & (self.const != 0)


def graph_nodes(model) -> List[Tuple[object, List[str]]]:
    """(layer, names of the layers feeding it) in topological order, InputLayers included.

    The walk is ``bbits_tf.graph``'s (the one the quantizer, the BOP counter and the pruning gates use). Raises
    ValueError for shared layers and nested models, which the exporter does not handle.
    """
    if not model.built or not model.inputs:
        raise ValueError(f"The model must be built with a known input shape. Received: model={model.name!r}")
    out = []
    for layer in graph.topological_layers(model):
        if isinstance(layer, keras.Model):
            raise ValueError(f"Nested models are not supported; flatten the model first. Received: {layer.name!r}")
        if not isinstance(layer, L.InputLayer) and graph.call_count(model, layer) > 1:
            raise ValueError(f"Shared layers (called more than once) are not supported. Received: {layer.name!r}")
        out.append((layer, [src.name for src in graph.inbound_layers(model, layer)]))
    return out


def _np_call(fn, x: np.ndarray) -> np.ndarray:
    """Apply a Keras activation function / layer to a 1-D array of channel values."""
    return np.asarray(fn(tf.constant(x[None], tf.float32)), np.float64)[0]


def _check_activation(layer):
    act = getattr(layer, "activation", None)
    if act is not None and getattr(act, "__name__", "") == "softmax":
        raise ValueError(f"A pruned layer cannot have a softmax activation (not elementwise). Received: {layer.name!r}")


def _producer(layer, chan_in: _Chan, own_mask, transform, report: PruneReport):
    """New config, weights and output channel state of a Conv2D / Dense layer."""
    kernel, *rest = layer.get_weights()
    n_out = kernel.shape[-1]
    bias = rest[0].astype(np.float64) if layer.use_bias else np.zeros(n_out)
    keep_out = np.ones(n_out, bool) if own_mask is None else np.asarray(own_mask, bool)
    if keep_out.shape != (n_out,):
        raise ValueError(f"Mask of layer {layer.name!r} must have {n_out} entries. Received: shape {keep_out.shape}")
    if not keep_out.all():
        _check_activation(layer)
    if isinstance(layer, L.Conv2D) and layer.groups != 1 and not chan_in.keep.all():
        raise ValueError(f"Grouped convolutions cannot lose input channels. Received: {layer.name!r}")
    k = kernel.astype(np.float64) * keep_out  # pruned output slices count as zero (gate z_2 = 0)
    removed = chan_in.removed_nonzero
    delta = np.zeros(n_out)
    if removed.any():
        summed = k.reshape(-1, k.shape[-2], n_out).sum(axis=0)  # [C_in, C_out], spatial taps summed
        delta = chan_in.const[removed] @ summed[removed]
        report.folded.append(layer.name)
        if isinstance(layer, L.Conv2D) and layer.padding != "valid":
            report.inexact.append(f"{layer.name}: constant of removed input channels folded into the bias of a "
                                  f"'{layer.padding}'-padded convolution (the border sees the padding instead)")
        if not chan_in.exact:
            report.inexact.append(f"{layer.name}: a removed input channel is not a true constant (zero padding)")
    new_bias = bias + delta
    const_out = _np_call(layer.activation, bias) if layer.activation is not None else bias
    if transform is not None:
        const_out = np.asarray(transform(const_out), np.float64)
    new_k = k[..., chan_in.keep, :][..., keep_out].astype(np.float32)
    config = layer.get_config()
    config["filters" if "filters" in config else "units"] = int(keep_out.sum())
    config["use_bias"] = bool(layer.use_bias or np.any(new_bias != 0))
    weights = [new_k] + ([new_bias[keep_out].astype(np.float32)] if config["use_bias"] else [])
    return config, weights, _Chan(keep_out, const_out)


def _depthwise(layer, chan_in: _Chan, own_mask, transform, report: PruneReport):
    """New config, weights and output channel state of a DepthwiseConv2D layer."""
    kernel, *rest = layer.get_weights()  # [kh, kw, C_in, M]
    c_in, m = kernel.shape[2], kernel.shape[3]
    bias = rest[0].astype(np.float64) if layer.use_bias else np.zeros(c_in * m)
    own = np.ones(c_in * m, bool) if own_mask is None else np.asarray(own_mask, bool)
    if own.shape != (c_in * m,):
        raise ValueError(f"Mask of layer {layer.name!r} must have {c_in * m} entries. Received: shape {own.shape}")
    k = kernel.astype(np.float64) * own.reshape(c_in, m)
    keep_out = np.repeat(chan_in.keep, m)
    if (~own & keep_out).any():
        report.kept_pruned[layer.name] = int((~own & keep_out).sum())
    # removed input channel c: its outputs are the constant act(c * sum(kernel taps) + b)
    pre = np.repeat(np.where(chan_in.keep, 0.0, chan_in.const), m) * k.sum(axis=(0, 1)).reshape(-1) + bias
    if chan_in.removed_nonzero.any():
        if layer.padding != "valid":
            report.inexact.append(f"{layer.name}: removed input channels hold a non-zero constant and the "
                                  f"'{layer.padding}' padding makes the border differ")
    if not (keep_out.all() and own.all()):
        _check_activation(layer)
    const_out = _np_call(layer.activation, pre) if layer.activation is not None else pre
    if transform is not None:
        const_out = np.asarray(transform(const_out), np.float64)
    new_k = k[:, :, chan_in.keep, :].astype(np.float32)
    config = layer.get_config()
    weights = [new_k] + ([bias[keep_out].astype(np.float32)] if layer.use_bias else [])
    return config, weights, _Chan(keep_out, const_out, chan_in.exact)


def _batchnorm(layer, chan_in: _Chan):
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    if axis not in (-1, len(layer.input_shape) - 1):
        raise ValueError(f"Only channels-last BatchNormalization can be pruned through. Received: {layer.name!r}")
    w = layer.get_weights()
    gamma = w.pop(0) if layer.scale else np.ones_like(w[-1])
    beta = w.pop(0) if layer.center else np.zeros_like(w[-1])
    mean, var = w
    const = (chan_in.const - mean) / np.sqrt(var + layer.epsilon) * gamma + beta
    k = chan_in.keep
    weights = ([gamma[k]] if layer.scale else []) + ([beta[k]] if layer.center else []) + [mean[k], var[k]]
    return layer.get_config(), weights, _Chan(k, const, chan_in.exact)


def _passthrough_state(layer, ins: Sequence[_Chan], in_shapes) -> _Chan:
    """Output channel state of a layer without a kernel, or raise if it cannot be pruned through."""
    if isinstance(layer, _PASS_CONST):
        return ins[0]
    if isinstance(layer, _ELEMENTWISE):
        return _Chan(ins[0].keep, _np_call(layer, ins[0].const), ins[0].exact)
    if isinstance(layer, L.Flatten):
        if layer.data_format != "channels_last":
            raise ValueError(f"Only channels_last Flatten can be pruned through. Received: {layer.name!r}")
        positions = int(np.prod(in_shapes[0][1:-1]))  # NHWC: index (h*W + w)*C + c
        return _Chan(np.tile(ins[0].keep, positions), np.tile(ins[0].const, positions), ins[0].exact)
    if isinstance(layer, L.Concatenate) and layer.axis in (-1, len(in_shapes[0]) - 1):
        return _Chan(np.concatenate([c.keep for c in ins]), np.concatenate([c.const for c in ins]),
                     all(c.exact for c in ins))
    if type(layer) in _MERGE and all(np.array_equal(c.keep, ins[0].keep) for c in ins):
        const = ins[0].const
        for c in ins[1:]:
            const = _MERGE[type(layer)](const, c.const)
        return _Chan(ins[0].keep, const, all(c.exact for c in ins))
    if isinstance(layer, L.ZeroPadding2D):
        return _Chan(ins[0].keep, ins[0].const, ins[0].exact and not ins[0].removed_nonzero.any())
    if all(c.keep.all() for c in ins):
        return None  # untouched: output state computed from the output shape by the caller
    if type(layer) in _MERGE:
        kept = [int(c.keep.sum()) for c in ins]
        raise ValueError(f"Layer {layer.name!r} of type {type(layer).__name__} cannot be pruned through: its inputs "
                         f"lost different channels (kept {kept} of {ins[0].keep.size}). A residual merge needs the "
                         f"same channels pruned on every input (tied gates), which the exporter does not take yet; "
                         f"keep every channel of the layers feeding it. Received: {layer.name!r}")
    raise ValueError(f"Layer {layer.name!r} of type {type(layer).__name__} cannot be pruned through: its inputs lost "
                     f"channels. Supported: Conv2D, DepthwiseConv2D, Dense, BatchNormalization, pooling, Flatten, "
                     f"Concatenate (channel axis), merges of equally pruned inputs, elementwise activations, Dropout.")


def prune(model, masks: Mapping[str, np.ndarray], *,
          output_transforms: Optional[Mapping[str, Callable[[np.ndarray], np.ndarray]]] = None):
    """Build a smaller model with the pruned output channels (and the inputs that consume them) removed.

    Args:
        model: a built tf_keras Sequential or Functional model (channels-last).
        masks: layer name -> bool array over the layer's output channels, False = pruned. Layers must be Conv2D,
            DepthwiseConv2D or Dense.
        output_transforms: optional layer name -> function applied to the layer's post-activation channel values,
            e.g. its activation quantizer, so that the constant a pruned channel emits is the deployed one.

    Returns:
        (pruned model, PruneReport). The pruned model is Functional, its layers keep their names, and its output
        equals the original's (up to float rounding) when ``report.exact``.
    """
    output_transforms = dict(output_transforms or {})
    by_name = {layer.name: layer for layer in model.layers}
    for name in list(masks) + list(output_transforms):
        if name not in by_name or not isinstance(by_name[name], PRODUCERS):
            raise ValueError(f"Masks and output transforms must name Conv2D, DepthwiseConv2D or Dense layers of the "
                             f"model. Received: {name!r}")
    report = PruneReport()
    chans: Dict[str, _Chan] = {}
    tensors: Dict[str, object] = {}
    nodes = graph_nodes(model)
    for layer, inbound in nodes:
        if isinstance(layer, L.InputLayer):
            shape = layer.get_config()["batch_input_shape"]
            tensors[layer.name] = keras.Input(batch_shape=shape, dtype=layer.dtype, name=layer.name)
            chans[layer.name] = _Chan(np.ones(shape[-1], bool), np.zeros(shape[-1]))
            continue
        ins = [chans[n] for n in inbound]
        in_shapes = graph.input_shapes(model, layer)
        mask = masks.get(layer.name)
        transform = output_transforms.get(layer.name)
        if isinstance(layer, PRODUCERS):
            make = _depthwise if isinstance(layer, L.DepthwiseConv2D) else _producer
            config, weights, state = make(layer, ins[0], mask, transform, report)
            report.channel_maps[layer.name] = {"in_keep": ins[0].keep.copy(), "in_const": ins[0].const.copy(),
                                               "out_keep": state.keep.copy()}
        elif isinstance(layer, L.BatchNormalization):
            config, weights, state = _batchnorm(layer, ins[0])
        else:
            config, weights = layer.get_config(), layer.get_weights()
            state = _passthrough_state(layer, ins, in_shapes)
            if state is None:
                n = layer.output_shape[-1]
                state = _Chan(np.ones(n, bool), np.zeros(n))
        if any(not c.keep.all() for c in ins) or not state.keep.all():
            report.layers[layer.name] = LayerChannels(int(sum(c.keep.sum() for c in ins)),
                                                      int(sum(c.keep.size for c in ins)),
                                                      int(state.keep.sum()), int(state.keep.size))
        new_layer = layer.__class__.from_config(config)
        args = [tensors[n] for n in inbound]
        tensors[layer.name] = new_layer(args if len(args) > 1 else args[0])
        new_layer.set_weights(weights)
        chans[layer.name] = state
    outputs = []
    for t in model.outputs:
        name = t._keras_history.layer.name  # pylint: disable=protected-access
        if not chans[name].keep.all():
            raise ValueError(f"A model output cannot lose channels (the last layer is never pruned). "
                             f"Received: output {name!r} keeps {int(chans[name].keep.sum())}/{chans[name].keep.size}")
        outputs.append(tensors[name])
    inputs = [tensors[t._keras_history.layer.name] for t in model.inputs]  # pylint: disable=protected-access
    pruned = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                         name=model.name)
    return pruned, report


def prune_model(model, masks: Mapping[str, np.ndarray], **kwargs):
    """``prune`` without the report: the smaller tf_keras model."""
    return prune(model, masks, **kwargs)[0]
