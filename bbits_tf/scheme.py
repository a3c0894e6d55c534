"""tfmot ``QuantizeScheme`` of Bayesian Bits: layer type -> config, and the layout transforms.

The layout transforms follow tfmot's ``default_8bit_transforms``: tfmot's ``ModelTransformer`` matches layer
patterns in the (annotated, then unwrapped) model and replaces them. ``graph.mac_units`` is the one place that
decides what folds; a transform replaces a match only if it is exactly such a unit, so the quantizers that
``quantize_model`` configured for the unit land where it planned them.
"""
import collections
import copy

from bbits_tf import configs, graph
from bbits_tf._keras import keras, tfmot
from bbits_tf.folding import FoldedBatchNorm
from bbits_tf.quantizers import BayesianBitsQuantizer
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
    model_transformer,
    transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layout_transform import (
    QuantizeLayoutTransform,
)

_qkeras = tfmot.quantization.keras
_MAC_PATTERN = "Conv2D|DepthwiseConv2D|Dense"
_ACTIVATION_PATTERN = "ReLU|Activation"


class BayesianBitsQuantizeRegistry(_qkeras.QuantizeRegistry):
    """Conv2D, DepthwiseConv2D and Dense get a Bayesian Bits config; every other layer stays float.

    ``get_quantize_config`` gives the default config of a supported layer: a pruning weight quantizer and an
    output quantizer (unsigned after a non-negative activation, signed otherwise). ``quantize_model`` builds
    the per-layer configs itself (regularizer weights, last layer) from these defaults, and output-only
    configs (``get_output_quantize_config``) for the Add, Concatenate, pooling and activation layers whose
    output it quantizes.
    """

    def __init__(self, **quantizer_kwargs):
        self.quantizer_kwargs = quantizer_kwargs

    def supports(self, layer):
        return configs.kernel_spec(layer) is not None

    def get_quantize_config(self, layer, *, weight_kwargs=None, activation_kwargs=None, quantize_output=True):
        if not self.supports(layer):
            raise ValueError(
                "Bayesian Bits quantizes Conv2D, DepthwiseConv2D and Dense layers only. "
                f"Received: layer={layer.name} of type {type(layer).__name__}"
            )
        _, channel_ndims = configs.kernel_spec(layer)
        weight = dict(self.quantizer_kwargs, signed=True, channel_ndims=channel_ndims)
        weight.update(weight_kwargs or {})
        weight_quantizer = BayesianBitsQuantizer(**weight)
        activation_quantizer = None
        if quantize_output:
            activation = dict(self.quantizer_kwargs, signed=not configs.activation_is_unsigned(layer))
            activation.update(prune=False, channel_ndims=1)
            activation.update(activation_kwargs or {})
            activation_quantizer = BayesianBitsQuantizer(**activation)
        return configs.BayesianBitsQuantizeConfig(weight_quantizer, activation_quantizer)

    def get_output_quantize_config(self, layer, activation_kwargs=None):
        """A config with only an output quantizer, for a layer without weights to quantize (e.g. an Add)."""
        if layer.weights and not isinstance(layer, graph.GRID_LAYERS):
            raise ValueError(
                "An output-only config is for layers without weights (Add, Concatenate, pooling, activations). "
                f"Received: layer={layer.name} of type {type(layer).__name__}"
            )
        activation = dict(self.quantizer_kwargs, signed=True, prune=False, channel_ndims=1)
        activation.update(activation_kwargs or {})
        return configs.BayesianBitsQuantizeConfig(None, BayesianBitsQuantizer(**activation))


# ----------------------------------------------------------------------------------------------------------------
# Layout transforms (tfmot ModelTransformer patterns)


def _name(node):
    return node.layer["config"]["name"]


def _bbits_config(node):
    config = (node.metadata or {}).get("quantize_config")
    return config if isinstance(config, configs.BayesianBitsQuantizeConfig) else None


class _UnitTransform(transforms.Transform):
    """A transform that replaces a match only if it is exactly one ``graph.MacUnit`` of the model."""

    def __init__(self, units):
        self.units = units

    def _unit(self, mac_node, bn_node=None, act_node=None):
        """The unit the matched layers form, or ``None`` (then the match is left as it is)."""
        unit = self.units.get(_name(mac_node))
        if unit is None or _bbits_config(mac_node) is None:
            return None
        same = lambda layer, node: (layer is None and node is None) or (
            layer is not None and node is not None and layer.name == _name(node))
        if not (same(unit.batch_norm, bn_node) and same(unit.activation_layer, act_node)):
            return None
        return unit

    def custom_objects(self):
        return {"FoldedBatchNorm": FoldedBatchNorm, "BayesianBitsQuantizer": BayesianBitsQuantizer,
                "BayesianBitsQuantizeConfig": configs.BayesianBitsQuantizeConfig}


def _folded_node(unit, mac_node, bn_node):
    """The ``FoldedBatchNorm`` node replacing MAC -> BN (-> activation); the kernel's quantizer moves inside it."""
    config = _bbits_config(mac_node)
    name = _name(mac_node)
    mac_config = copy.deepcopy(mac_node.layer["config"])
    layer_config = {
        "name": name,
        "trainable": mac_config.get("trainable", True),
        "dtype": mac_config.get("dtype"),
        "mac_layer": {"class_name": mac_node.layer["class_name"], "config": mac_config},
        "batch_norm": copy.deepcopy(bn_node.layer["config"]),
        "activation": unit.activation,
        "weight_quantizer": (None if config.weight_quantizer is None
                             else keras.utils.serialize_keras_object(config.weight_quantizer)),
        "freeze_bn": not bn_node.layer["config"].get("trainable", True),
    }
    weights = collections.OrderedDict(list(mac_node.weights.items()) + list(bn_node.weights.items()))
    metadata = dict(mac_node.metadata or {})
    metadata["quantize_config"] = configs.BayesianBitsQuantizeConfig(None, config.activation_quantizer)
    return transforms.LayerNode(
        {"class_name": "bbits_tf>FoldedBatchNorm", "name": name, "config": layer_config},
        weights=weights, input_layers=mac_node.input_layers, metadata=metadata)


class FoldBatchNormActivation(_UnitTransform):
    """Conv2D/DepthwiseConv2D/Dense -> BatchNormalization -> ReLU/Activation  =>  FoldedBatchNorm(activation)."""

    def pattern(self):
        return transforms.LayerPattern(_ACTIVATION_PATTERN, inputs=[transforms.LayerPattern(
            "BatchNormalization", inputs=[transforms.LayerPattern(_MAC_PATTERN)])])

    def replacement(self, match_layer):
        act_node = match_layer
        bn_node = act_node.input_layers[0]
        mac_node = bn_node.input_layers[0]
        unit = self._unit(mac_node, bn_node, act_node)
        return match_layer if unit is None else _folded_node(unit, mac_node, bn_node)


class FoldBatchNorm(_UnitTransform):
    """Conv2D/DepthwiseConv2D/Dense -> BatchNormalization  =>  FoldedBatchNorm (linear)."""

    def pattern(self):
        return transforms.LayerPattern("BatchNormalization", inputs=[transforms.LayerPattern(_MAC_PATTERN)])

    def replacement(self, match_layer):
        bn_node = match_layer
        mac_node = bn_node.input_layers[0]
        unit = self._unit(mac_node, bn_node)
        return match_layer if unit is None else _folded_node(unit, mac_node, bn_node)


class AbsorbActivation(_UnitTransform):
    """Conv2D/DepthwiseConv2D/Dense (linear) -> ReLU/Activation  =>  the MAC layer with the activation fused."""

    def pattern(self):
        return transforms.LayerPattern(_ACTIVATION_PATTERN, inputs=[transforms.LayerPattern(_MAC_PATTERN)])

    def replacement(self, match_layer):
        act_node = match_layer
        mac_node = act_node.input_layers[0]
        unit = self._unit(mac_node, None, act_node)
        if unit is None:
            return match_layer
        layer = copy.deepcopy(mac_node.layer)
        layer["config"]["activation"] = unit.activation
        return transforms.LayerNode(layer, weights=mac_node.weights, input_layers=mac_node.input_layers,
                                    metadata=mac_node.metadata)


class BayesianBitsLayoutTransform(QuantizeLayoutTransform):
    """Folds each MAC unit of ``graph.mac_units`` into one layer; the model input is not quantized.

    Conv2D/DepthwiseConv2D/Dense -> BatchNormalization (-> ReLU/ReLU6/Activation) becomes a ``FoldedBatchNorm``
    (spec section 6) that holds the MAC layer's weight quantizer, with the unit's output quantizer on its
    tfmot wrapper; a MAC layer with a linear activation followed by an activation layer takes that activation
    (``activation="relu6"``), so its output quantizer sits after it. A model without such units is returned
    unchanged (no rebuild).
    """

    def apply(self, model, layer_quantize_map):
        units = graph.mac_units(model)
        if not any(unit.absorbed for unit in units.values()):
            return model, layer_quantize_map
        steps = [FoldBatchNormActivation(units), FoldBatchNorm(units), AbsorbActivation(units)]
        return model_transformer.ModelTransformer(model, steps, layer_metadata=layer_quantize_map).transform()


class BayesianBitsQuantizeScheme(_qkeras.QuantizeScheme):
    """The scheme ``quantize_model`` passes to ``tfmot.quantization.keras.quantize_apply``."""

    def __init__(self, **quantizer_kwargs):
        self.quantizer_kwargs = quantizer_kwargs

    def get_layout_transformer(self):
        return BayesianBitsLayoutTransform()

    def get_quantize_registry(self):
        return BayesianBitsQuantizeRegistry(**self.quantizer_kwargs)
