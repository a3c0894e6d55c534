"""Reading a Sequential or Functional tf_keras model as a graph: producers, consumers, MAC units, MACs.

One walker for quantize, BOP counting and export. Vocabulary:

- a **MAC layer** computes multiply-accumulates: Conv2D, DepthwiseConv2D, Dense, or a ``FoldedBatchNorm`` (such
  a layer with its BatchNormalization folded in), bare or inside a tfmot ``QuantizeWrapper``;
- a **MAC unit** of a float model is a MAC layer with the BatchNormalization it folds and the activation layer
  it absorbs (``mac_units``); after ``quantize_model`` a unit is one layer;
- a **pass-through** layer moves values or channels without computing new ones (pooling by max, Flatten,
  Reshape, padding, Dropout): a quantized tensor stays on its grid and a pruned channel stays pruned;
- a **grid** layer computes new values from its inputs (Add, Concatenate, average pooling, a separate
  activation layer): its output gets its own activation quantizer where it is consumed.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from bbits_tf import configs
from bbits_tf._keras import keras, tfmot
from bbits_tf.folding import FoldedBatchNorm

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper

PASSTHROUGH = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.InputLayer,
)
# Separate activation layers: absorbed into the MAC unit before them, or quantized on their own.
ACTIVATION_LAYERS = (keras.layers.ReLU, keras.layers.Activation)
# Layers whose output is new values on no input's grid: each gets an output quantizer where it is consumed.
GRID_LAYERS = (
    keras.layers.Add,
    keras.layers.Concatenate,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
) + ACTIVATION_LAYERS
# Grid layers whose output grid is also the grid of their inputs in an integer (TFLite) graph: an activation
# fused into the layer before it, a concatenation (one scale for all inputs and the output). A tensor read only
# by such layers gets no quantizer of its own.
REGRID_LAYERS = (keras.layers.Concatenate,) + ACTIVATION_LAYERS


def inner_layer(layer):
    """The layer a ``QuantizeWrapper`` wraps, or ``layer`` itself."""
    return layer.layer if isinstance(layer, _QuantizeWrapper) else layer


def is_passthrough(layer):
    return isinstance(inner_layer(layer), PASSTHROUGH)


def _node(model, layer):
    """The call node of ``layer`` that belongs to ``model`` (layers can be shared between cloned models)."""
    nodes = layer._inbound_nodes  # pylint: disable=protected-access
    keys = getattr(model, "_network_nodes", None)
    if keys:
        for index, node in enumerate(nodes):
            if f"{layer.name}_ib-{index}" in keys:
                return node
    return nodes[0] if nodes else None


def call_count(model, layer):
    """How many times ``model`` calls ``layer`` (more than 1: a shared layer)."""
    keys = getattr(model, "_network_nodes", None)
    if not keys:
        return len(layer._inbound_nodes)  # pylint: disable=protected-access
    return sum(1 for index in range(len(layer._inbound_nodes))  # pylint: disable=protected-access
               if f"{layer.name}_ib-{index}" in keys)


def inbound_layers(model, layer):
    """Layers that feed ``layer`` in ``model``."""
    node = _node(model, layer)
    return [] if node is None else tf.nest.flatten(node.inbound_layers)


def outbound_layers(model, layer):
    """Layers of ``model`` that read ``layer``'s output."""
    keys = getattr(model, "_network_nodes", None)
    found = []
    for node in layer._outbound_nodes:  # pylint: disable=protected-access
        nxt = node.outbound_layer
        index = nxt._inbound_nodes.index(node)  # pylint: disable=protected-access
        if not keys or f"{nxt.name}_ib-{index}" in keys:
            found.append(nxt)
    return found


def input_shape(model, layer):
    node = _node(model, layer)
    return tuple(tf.nest.flatten(node.input_tensors)[0].shape)


def input_shapes(model, layer):
    """Shapes of every input tensor of ``layer`` in ``model`` (a merge layer has several)."""
    node = _node(model, layer)
    return [tuple(t.shape) for t in tf.nest.flatten(node.input_tensors)] if node is not None else []


def output_shape(model, layer):
    node = _node(model, layer)
    return tuple(tf.nest.flatten(node.outputs)[0].shape)


def is_mac(layer):
    """Whether ``layer`` (bare or wrapped) is a Conv2D, DepthwiseConv2D, Dense or ``FoldedBatchNorm``."""
    inner = inner_layer(layer)
    return isinstance(inner, FoldedBatchNorm) or configs.kernel_spec(inner) is not None


def is_grid(layer):
    return isinstance(inner_layer(layer), GRID_LAYERS)


def mac_kind(layer):
    """``"Conv2D"``, ``"DepthwiseConv2D"`` or ``"Dense"`` of a MAC layer (a ``FoldedBatchNorm``: its MAC layer)."""
    inner = inner_layer(layer)
    if isinstance(inner, FoldedBatchNorm):
        return inner.mac_kind
    if configs.kernel_spec(inner) is not None:
        return next(cls.__name__ for cls in configs.KERNELS if isinstance(inner, cls))  # DepthwiseConv2D first
    raise ValueError(
        "MACs are counted for Conv2D, DepthwiseConv2D, Dense and FoldedBatchNorm layers only. "
        f"Received: layer={getattr(layer, 'name', layer)!r} of type {type(inner).__name__}"
    )


def kernel_shape(layer):
    """Shape of a MAC layer's kernel (for a ``FoldedBatchNorm``: the folded MAC layer's)."""
    inner = inner_layer(layer)
    if isinstance(inner, FoldedBatchNorm):
        return tuple(int(d) for d in inner.kernel.shape)
    attr = "depthwise_kernel" if mac_kind(layer) == "DepthwiseConv2D" else "kernel"
    return tuple(int(d) for d in getattr(inner, attr).shape)


def layer_macs(model, layer):
    """Multiply-accumulates of one MAC layer call at batch 1 (bias and folded BatchNorm ignored)."""
    kind = mac_kind(layer)
    shape = kernel_shape(layer)
    if kind == "Dense":
        n_in, n_out = shape
        return int(np.prod(input_shape(model, layer)[1:-1] or [1])) * n_in * n_out
    spatial = int(np.prod(output_shape(model, layer)[1:-1]))
    return spatial * int(np.prod(shape))  # (kh, kw, c_in, mult) or (kh, kw, c_in / groups, c_out)


def consumers(model, layer):
    """Layers that read ``layer``'s output, following pass-through layers (which are not listed)."""
    found, seen, stack = [], set(), list(outbound_layers(model, layer))
    while stack:
        nxt = stack.pop(0)
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if is_passthrough(nxt):
            stack.extend(outbound_layers(model, nxt))
        else:
            found.append(nxt)
    return found


def grid_source(layer, model=None):
    """The layer whose output quantizer puts ``layer``'s input on its grid: the producer of that input, through
    pass-through layers, if it is a ``QuantizeWrapper`` with an output quantizer. ``None`` when the input is the
    model input, a float tensor, a merge of several tensors, or when a layer on the way is called more than once.
    Without ``model`` each layer's first call node is followed (the model it was built in: a layer being called,
    ``bbits_tf.quantizers``, perhaps inside a larger model that calls the quantized one)."""
    def sources(current):
        if model is not None:
            return inbound_layers(model, current) if call_count(model, current) == 1 else []
        nodes = current._inbound_nodes  # pylint: disable=protected-access
        return tf.nest.flatten(nodes[0].inbound_layers) if nodes else []

    found = sources(layer)
    while len(found) == 1:
        (source,) = found
        if getattr(source, "_output_quantizers", None):
            return source
        if not is_passthrough(source):
            return None
        found = sources(source)
    return None


def reads_model_input(model, layer):
    """Whether ``layer``'s one input is the model input, directly or through pass-through layers."""
    found = inbound_layers(model, layer)
    while len(found) == 1:
        (source,) = found
        if isinstance(inner_layer(source), keras.layers.InputLayer):
            return True
        if not is_passthrough(source) or call_count(model, source) != 1:
            return False
        found = inbound_layers(model, source)
    return False


def quantizable_consumers(model, layer):
    """MAC layers that read ``layer``'s output, following pass-through layers."""
    return [c for c in consumers(model, layer) if is_mac(c)]


def consumer_macs(model, layer):
    """Summed MACs of the MAC layers that read ``layer``'s output (through pass-through layers)."""
    return sum(layer_macs(model, c) for c in quantizable_consumers(model, layer))


def layer_activation(layer):
    """The activation a ReLU or Activation layer applies, serialized (``"relu"``, ``"relu6"``, ...), or ``None``
    when it is not one a MAC unit can absorb (a leaky, thresholded or otherwise capped ReLU)."""
    if isinstance(layer, keras.layers.Activation):
        try:
            return keras.activations.serialize(layer.activation)
        except ValueError:  # e.g. a lambda: it cannot be saved as part of another layer's config
            return None
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    return None


def nonnegative(model, layer, _memo=None):
    """Whether ``layer``'s output is never negative (its output quantizer is then unsigned).

    True after a ReLU-like activation (fused, absorbed or a separate layer), and through pass-through layers,
    Add, Concatenate and average pooling of such tensors. The model input is not assumed non-negative.
    """
    memo = {} if _memo is None else _memo
    if id(layer) in memo:
        return memo[id(layer)]
    inner = inner_layer(layer)
    if is_mac(inner):
        result = configs.activation_is_unsigned(inner)
    elif isinstance(inner, keras.layers.ReLU):
        result = float(inner.negative_slope) == 0.0 and float(inner.threshold) >= 0.0
    elif isinstance(inner, keras.layers.Activation):
        result = configs.activation_is_unsigned(inner)
    elif isinstance(inner, keras.layers.InputLayer):
        result = False
    elif is_passthrough(inner) or isinstance(inner, GRID_LAYERS):
        sources = inbound_layers(model, layer)
        result = bool(sources) and all(nonnegative(model, src, memo) for src in sources)
    else:
        result = False
    memo[id(layer)] = result
    return result


@dataclasses.dataclass
class MacUnit:
    """A MAC layer of a float model, the BatchNormalization folded into it and the activation layer it absorbs.

    ``quantize_model`` turns a unit into one layer (a ``FoldedBatchNorm`` with a BatchNormalization, else the
    MAC layer with the absorbed activation fused) with one output quantizer after the activation.
    """

    mac: object
    batch_norm: object = None
    activation_layer: object = None
    unfolded_batch_norm: object = None  # a BatchNormalization after the MAC layer that does not fold
    not_folded: str = None  # why it does not fold

    @property
    def name(self):
        return self.mac.name

    @property
    def output(self):
        """The unit's last layer in the float model: its output is the unit's output."""
        for layer in (self.activation_layer, self.batch_norm):
            if layer is not None:
                return layer
        return self.mac

    @property
    def activation(self):
        """The serialized activation at the unit's output."""
        if self.activation_layer is not None:
            return layer_activation(self.activation_layer)
        return keras.activations.serialize(self.mac.activation)

    @property
    def absorbed(self):
        """The layers after the MAC layer that the unit replaces."""
        return [layer for layer in (self.batch_norm, self.activation_layer) if layer is not None]


def _single_consumer(model, layer):
    """The one layer that reads ``layer``'s output, or ``None`` (several readers, or a model output)."""
    if any(layer is out for out in model._output_layers):  # pylint: disable=protected-access
        return None
    readers = outbound_layers(model, layer)
    if len(readers) != 1 or call_count(model, readers[0]) != 1:
        return None
    return readers[0]


def _fold_problem(model, mac, bn):
    """Why ``bn`` (which reads ``mac``'s output) cannot fold into ``mac``, or ``None``."""
    from bbits_tf import folding  # pylint: disable=import-outside-toplevel

    activation = keras.activations.serialize(mac.activation)
    if mac.activation is not keras.activations.linear:
        return (f"it follows {mac.name}, whose {activation!r} activation comes before it "
                "(BatchNormalization(activation(conv)) does not fold); it runs in float")
    if _single_consumer(model, mac) is not bn:
        return f"{mac.name}'s unnormalised output is also read elsewhere, so it cannot fold; it runs in float"
    rank = len(output_shape(model, mac))
    axes = [a % rank for a in tf.nest.flatten(bn.axis)]
    if axes != [rank - 1]:
        return f"it normalises axis {bn.axis}, not the channel axis, so it cannot fold; it runs in float"
    try:
        folding._check_foldable(mac, bn)  # pylint: disable=protected-access
    except ValueError as error:
        return f"it cannot fold ({error}); it runs in float"
    return None


def mac_units(model):
    """``{MAC layer name: MacUnit}`` of a float model, in graph order (the one place that decides folding).

    A Conv2D, DepthwiseConv2D or Dense layer with a linear activation whose only reader is a (channels-last,
    plain) BatchNormalization folds it; the unit then absorbs a ReLU (uncapped or ReLU6) or ``Activation``
    layer that is the only reader of the BatchNormalization. Without a BatchNormalization, a MAC layer with a
    linear activation absorbs such an activation layer the same way. Layers read by several layers or that
    are model outputs are never absorbed (their value is needed as it is).
    """
    units = {}
    for layer in topological_layers(model):
        if configs.kernel_spec(layer) is None:
            continue
        unit = MacUnit(layer)
        norms = [r for r in outbound_layers(model, layer) if isinstance(r, keras.layers.BatchNormalization)]
        if norms:
            problem = _fold_problem(model, layer, norms[0])
            if problem is None:
                unit.batch_norm = norms[0]
            else:
                unit.unfolded_batch_norm, unit.not_folded = norms[0], problem
        if layer.activation is keras.activations.linear and unit.unfolded_batch_norm is None:
            act = _single_consumer(model, unit.output)
            if isinstance(act, ACTIVATION_LAYERS) and layer_activation(act) is not None:
                unit.activation_layer = act
        units[layer.name] = unit
    return units


def feeds_output(model, layer):
    """Whether ``layer``'s output reaches a model output through passthrough layers only."""
    output_layers = {id(x) for x in model._output_layers}  # pylint: disable=protected-access
    stack = [layer]
    while stack:
        cur = stack.pop()
        if id(cur) in output_layers:
            return True
        stack.extend(nxt for nxt in outbound_layers(model, cur) if is_passthrough(nxt))
    return False


def topological_layers(model):
    """Layers of ``model`` in an order where every layer comes after its inputs, input layers included."""
    ordered, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for src in inbound_layers(model, layer):
            visit(src)
        ordered.append(layer)

    for layer in model.layers:
        visit(layer)
    return ordered


def check_model(model):
    """Raises a ``ValueError`` that says what to do for models ``quantize_model`` cannot take."""
    module = type(model).__module__
    if not isinstance(model, keras.Model):
        if module.startswith("keras") and hasattr(model, "layers"):
            raise ValueError(
                "bbits_tf needs a tf_keras (Keras 2) model; this is a Keras 3 model (TensorFlow's own Keras on TF >= 2.16 "
                "is Keras 3, which tfmot does not support). Build it with `import tf_keras as keras` or "
                f"`from bbits_tf._keras import keras`. Received: model of type {module}.{type(model).__name__}"
            )
        raise ValueError(f"Expected a tf_keras Model. Received: model={model!r}")
    if not isinstance(model, keras.Sequential) and not model._is_graph_network:  # pylint: disable=protected-access
        raise ValueError(
            "bbits_tf quantizes Sequential and Functional models only; a subclassed model has no layer graph "
            "to annotate. Rebuild it with the Functional API (`keras.Model(inputs, outputs)`). "
            f"Received: model of type {type(model).__name__}"
        )
    if not model.built or getattr(model, "inputs", None) is None:
        raise ValueError(
            "The model has no defined input shape. Give its first layer `input_shape=...` or start it with "
            f"`keras.Input(shape)` before quantizing. Received: model={model.name} (not built)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Tied pruning gates


# Layers a pruned channel passes through channel by channel (it stays pruned): pass-through layers, separate
# activations, average pooling. (A pruned channel is 0; ``act(0) = 0`` for the activations a unit can absorb.)
_CHANNELWISE = PASSTHROUGH + ACTIVATION_LAYERS + (
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
)


@dataclasses.dataclass
class PruneGroups:
    """Which MAC units share pruning gates, and which cannot be pruned (``prune_groups``).

    ``leader``: unit name -> the unit that owns the group's gates (a leader maps to itself; units outside any
    group are not listed). ``unprunable``: units that get no pruning gates, with the reason.
    """

    leader: dict
    unprunable: dict

    def followers(self):
        return {name: lead for name, lead in self.leader.items() if name != lead}


def _channel_sources(model, layer, unit_of_output, found, seen):
    """Adds to ``found`` the MAC units whose output channels reach ``layer``'s output channel by channel, through
    pass-through, activation, average-pooling and Add layers; a ``None`` entry for anything else (the model
    input, a Concatenate, a float layer), whose channels cannot be pruned."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    if id(layer) in unit_of_output:
        found.append(unit_of_output[id(layer)])
        return
    inner = inner_layer(layer)
    if isinstance(inner, keras.layers.InputLayer) or not isinstance(inner, _CHANNELWISE + (keras.layers.Add,)):
        found.append(None)
        return
    for src in inbound_layers(model, layer):
        _channel_sources(model, src, unit_of_output, found, seen)


def prune_groups(model, units=None):
    """Ties the pruning gates of a float model's MAC units so that every pruned channel can really be removed.

    - Units whose outputs meet in a residual ``Add`` (through activations, pass-through layers and further
      Adds) share one gate vector: a channel of the residual stream is either kept by every layer that writes
      it or removed from all of them (and from the Add and every reader).
    - A ``DepthwiseConv2D`` unit is pruned with its input channels (it follows the unit that produced its
      input; with a depth multiplier ``m`` each input gate covers its ``m`` outputs): a depthwise layer cannot
      drop an output channel whose input channel lives, so independent gates would credit BOPs the file does
      not save.
    - A group is not pruned at all when one of its channels comes from something without gates (the model
      input, a Concatenate, a float layer), when one of its units feeds a model output, or when a depthwise
      layer with a depth multiplier above 1 writes into a residual Add (its channels are not the stream's).

    Returns:
        ``PruneGroups``. The leader of a group is its first unit in graph order that is not a depthwise layer.
    """
    units = mac_units(model) if units is None else units
    unit_of_output = {id(u.output): name for name, u in units.items()}
    order = {name: i for i, name in enumerate(units)}
    parent = {name: name for name in units}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def union(names):
        roots = sorted({root(n) for n in names}, key=order.get)
        for r in roots[1:]:
            parent[r] = roots[0]

    blocked = {}  # root-independent reasons, resolved per group at the end
    tied = set()
    for layer in topological_layers(model):
        if not isinstance(inner_layer(layer), keras.layers.Add):
            continue
        found, seen = [], set()
        for src in inbound_layers(model, layer):
            _channel_sources(model, src, unit_of_output, found, seen)
        members = [n for n in found if n is not None]
        tied.update(members)
        union(members)
        if None in found:
            for n in members:
                blocked.setdefault(n, f"its channels meet channels without gates in {layer.name}")
        for n in members:
            unit = units[n]
            if mac_kind(unit.mac) == "DepthwiseConv2D" and int(unit.mac.depth_multiplier) != 1:
                blocked.setdefault(n, f"a depthwise layer with depth multiplier {unit.mac.depth_multiplier} "
                                      f"writes into {layer.name}")
    unprunable = {}
    for name, unit in units.items():
        if mac_kind(unit.mac) != "DepthwiseConv2D":
            continue
        found = []
        for src in inbound_layers(model, unit.mac):
            _channel_sources(model, src, unit_of_output, found, set())
        if None in found or not found:
            unprunable[name] = ("a depthwise layer is pruned with its input channels, and its input has channels "
                                "without pruning gates")
            continue
        tied.add(name)
        tied.update(found)
        union([name] + found)
    for name, unit in units.items():
        if feeds_output(model, unit.output):
            blocked.setdefault(name, "it feeds a model output")
    groups = {}
    for name in tied:
        groups.setdefault(root(name), []).append(name)
    leader = {}
    for members in groups.values():
        members.sort(key=order.get)
        reasons = [f"{n}: {blocked[n]}" for n in members if n in blocked]
        if reasons:
            for n in members:
                unprunable.setdefault(n, "tied to layers that cannot be pruned (" + "; ".join(reasons) + ")")
            continue
        heads = [n for n in members if mac_kind(units[n].mac) != "DepthwiseConv2D"] or members
        for n in members:
            leader[n] = heads[0]
    for name in units:
        if name in blocked and name not in unprunable and name not in leader:
            unprunable[name] = blocked[name]
    return PruneGroups(leader=leader, unprunable=unprunable)
