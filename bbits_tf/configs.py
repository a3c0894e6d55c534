"""tfmot ``QuantizeConfig``: which tensors of a Conv2D, DepthwiseConv2D or Dense layer get which quantizer."""
from bbits_tf._keras import keras, tfmot
from bbits_tf.quantizers import BayesianBitsQuantizer

_QuantizeConfig = tfmot.quantization.keras.QuantizeConfig

# Layer type -> (name of its kernel attribute, trailing kernel axes that index output channels).
KERNELS = {
    keras.layers.DepthwiseConv2D: ("depthwise_kernel", 2),
    keras.layers.Conv2D: ("kernel", 1),
    keras.layers.Dense: ("kernel", 1),
}
# Subclasses of a supported type that compute something else: never mistaken for their base class.
# (Conv2DTranspose subclasses Conv2D in tf_keras, with the kernel laid out (kh, kw, out, in).)
UNSUPPORTED_SUBCLASSES = (keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
# Activations whose output is never negative: their output quantizer is unsigned.
UNSIGNED_ACTIVATIONS = ("relu", "relu6", "sigmoid", "softmax", "softplus", "elu_positive")


def kernel_spec(layer):
    """``(attribute, channel_ndims)`` of a supported layer, or ``None``."""
    if isinstance(layer, UNSUPPORTED_SUBCLASSES):
        return None
    for cls, spec in KERNELS.items():  # DepthwiseConv2D subclasses Conv2D: it comes first.
        if isinstance(layer, cls):
            return spec
    return None


def kernel_attribute(layer):
    """Name of a supported layer's kernel attribute (``"kernel"`` or ``"depthwise_kernel"``)."""
    spec = kernel_spec(layer)
    if spec is None:
        raise ValueError(
            "Only Conv2D, DepthwiseConv2D and Dense layers have a Bayesian Bits kernel. "
            f"Received: layer={getattr(layer, 'name', layer)!r} of type {type(layer).__name__}"
        )
    return spec[0]


def activation_is_unsigned(layer):
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return name in UNSIGNED_ACTIVATIONS


@keras.utils.register_keras_serializable(package="bbits_tf")
class BayesianBitsQuantizeConfig(_QuantizeConfig):
    """Kernel -> ``weight_quantizer``; the layer's output after its activation -> ``activation_quantizer``.

    Either quantizer can be ``None`` (float). Biases are never quantized; a pruning weight quantizer with
    ``mask_bias`` multiplies the bias by the same channel gates as the kernel.
    """

    def __init__(self, weight_quantizer=None, activation_quantizer=None):
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer

    def get_weights_and_quantizers(self, layer):
        if self.weight_quantizer is None:
            return []
        attr, _ = kernel_spec(layer)
        return [(getattr(layer, attr), self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if not quantize_weights:
            return
        attr, _ = kernel_spec(layer)
        quantized = quantize_weights[0]
        if isinstance(quantized, (tuple, list)):
            kernel, bias = quantized
            # Plain attribute: Keras' tracking would otherwise drop the bias variable from the layer's weights.
            object.__setattr__(layer, "bias", bias)
        else:
            kernel = quantized
        setattr(layer, attr, kernel)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [] if self.activation_quantizer is None else [self.activation_quantizer]

    def get_config(self):
        serialize = keras.utils.serialize_keras_object
        return {
            "weight_quantizer": None if self.weight_quantizer is None else serialize(self.weight_quantizer),
            "activation_quantizer": (
                None if self.activation_quantizer is None else serialize(self.activation_quantizer)
            ),
        }

    @classmethod
    def from_config(cls, config):
        def load(value):
            if value is None or isinstance(value, BayesianBitsQuantizer):
                return value
            return keras.utils.deserialize_keras_object(
                value, custom_objects={"BayesianBitsQuantizer": BayesianBitsQuantizer}
            )

        return cls(load(config.get("weight_quantizer")), load(config.get("activation_quantizer")))

    def __eq__(self, other):
        return isinstance(other, BayesianBitsQuantizeConfig) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)
