"""tfmot ``QuantizeScheme`` of Bayesian Bits: layer type -> config, and the layout transforms."""
from bbits_tf import configs
from bbits_tf._keras import tfmot
from bbits_tf.quantizers import BayesianBitsQuantizer
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layout_transform import (
    QuantizeLayoutTransform,
)

_qkeras = tfmot.quantization.keras


class BayesianBitsQuantizeRegistry(_qkeras.QuantizeRegistry):
    """Conv2D, DepthwiseConv2D and Dense get a Bayesian Bits config; every other layer stays float.

    ``get_quantize_config`` gives the default config of a supported layer: a pruning weight quantizer and an
    output quantizer (unsigned after a non-negative activation, signed otherwise). ``quantize_model`` builds
    the per-layer configs itself (regularizer weights, last layer) from these defaults.
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


class IdentityLayoutTransform(QuantizeLayoutTransform):
    """No layout changes: the model input is not quantized and BatchNorm is not folded (yet).

    The reference folds BatchNorm into the preceding conv during training (spec section 6); bbits_tf does
    not yet, so a BatchNormalization layer stays a float layer after a quantized conv (a documented deviation).
    """

    def apply(self, model, layer_quantize_map):
        return model, layer_quantize_map


class BayesianBitsQuantizeScheme(_qkeras.QuantizeScheme):
    """The scheme ``quantize_model`` passes to ``tfmot.quantization.keras.quantize_apply``."""

    def __init__(self, **quantizer_kwargs):
        self.quantizer_kwargs = quantizer_kwargs

    def get_layout_transformer(self):
        return IdentityLayoutTransform()

    def get_quantize_registry(self):
        return BayesianBitsQuantizeRegistry(**self.quantizer_kwargs)
