"""Reading a Sequential or Functional tf_keras model as a graph: producers, consumers, MACs."""
import numpy as np
import tensorflow as tf

from bbits_tf import configs
from bbits_tf._keras import keras, tfmot

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper

# Layers that move values or channels around without computing new values: a quantized tensor stays on its
# grid and a pruned channel stays pruned when it passes through them.
PASSTHROUGH = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Flatten,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Concatenate,
    keras.layers.InputLayer,
)


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


def output_shape(model, layer):
    node = _node(model, layer)
    return tuple(tf.nest.flatten(node.outputs)[0].shape)


def layer_macs(model, layer):
    """Multiply-accumulates of one Conv2D, DepthwiseConv2D or Dense call at batch 1 (bias ignored)."""
    inner = inner_layer(layer)
    out_shape = output_shape(model, layer)
    in_shape = input_shape(model, layer)
    if isinstance(inner, keras.layers.DepthwiseConv2D):
        kh, kw, c_in, mult = (int(d) for d in inner.depthwise_kernel.shape)
        return int(np.prod(out_shape[1:-1])) * kh * kw * c_in * mult
    if isinstance(inner, keras.layers.Conv2D):
        kh, kw, c_in_per_group, c_out = (int(d) for d in inner.kernel.shape)
        return int(np.prod(out_shape[1:-1])) * kh * kw * c_in_per_group * c_out
    if isinstance(inner, keras.layers.Dense):
        n_in, n_out = (int(d) for d in inner.kernel.shape)
        return int(np.prod(in_shape[1:-1] or [1])) * n_in * n_out
    raise ValueError(f"MACs are counted for Conv2D, DepthwiseConv2D and Dense only. Received: layer={layer.name}")


def quantizable_consumers(model, layer):
    """Supported layers that read ``layer``'s output, following passthrough layers."""
    found, stack = [], list(outbound_layers(model, layer))
    while stack:
        nxt = stack.pop()
        if configs.kernel_spec(inner_layer(nxt)) is not None:
            found.append(nxt)
        elif is_passthrough(nxt):
            stack.extend(outbound_layers(model, nxt))
    return found


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
