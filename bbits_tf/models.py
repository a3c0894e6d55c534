"""Reference architectures of the paper (spec section 7): LeNet5 for MNIST and VGG7 for CIFAR10.

Both are plain float tf_keras ``Sequential`` models that end in logits (no softmax); ``quantize_model`` turns them
into Bayesian Bits models. Weights start from PyTorch's defaults for ``Conv2d``/``Linear`` (spec 7.1):
kernels ``VarianceScaling(scale=1/3, mode="fan_in", distribution="uniform")``, i.e. U(+-1/sqrt(fan_in)), and
biases U(+-1/sqrt(fan_in)) through ``FanInUniform``.
"""
import math

from bbits_tf._keras import keras

__all__ = ["FanInUniform", "lenet5", "vgg7"]

# PyTorch BatchNorm defaults (eps 1e-5, momentum 0.1); Keras' momentum is the weight of the old value.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9


@keras.utils.register_keras_serializable(package="bbits_tf")
class FanInUniform(keras.initializers.RandomUniform):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default bias initialisation for ``Conv2d`` and ``Linear``.

    A bias initializer only sees the bias shape, so the fan-in of the layer (``kh * kw * in_channels`` for a
    convolution, ``in_features`` for a dense layer) is given explicitly.

    Args:
        fan_in: number of inputs of one output unit of the layer.
        seed: optional seed, as for ``keras.initializers.RandomUniform``.
    """

    def __init__(self, fan_in, seed=None):
        if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
            raise ValueError(f"`fan_in` must be a positive int. Received: fan_in={fan_in!r}")
        limit = 1.0 / math.sqrt(fan_in)
        super().__init__(minval=-limit, maxval=limit, seed=seed)
        self.fan_in = fan_in

    def get_config(self):
        return {"fan_in": self.fan_in, "seed": self.seed}


def _kernel_init():
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def _check(input_shape, num_classes):
    if len(tuple(input_shape)) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(
            f"`input_shape` must be (height, width, channels) of positive ints. Received: input_shape={input_shape!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int. Received: num_classes={num_classes!r}")


def lenet5(input_shape=(28, 28, 1), num_classes=10):
    """LeNet5 of the paper's MNIST experiment (spec 7.2): 32C5-MP2-64C5-MP2-512-10.

    ``conv1`` (32 5x5, valid, ReLU), ``pool1``, ``conv2`` (64 5x5, valid, ReLU), ``pool2``, ``flatten``,
    ``fc1`` (512, ReLU), ``fc2`` (``num_classes`` logits). Every layer has a bias; there is no BatchNorm.
    With the defaults it has 582,026 parameters (conv1 832, conv2 51,264, fc1 524,800, fc2 5,130).

    Args:
        input_shape: ``(height, width, channels)`` of one image, NHWC.
        num_classes: number of logits.

    Returns:
        An uncompiled ``keras.Sequential`` named ``"lenet5"``.
    """
    _check(input_shape, num_classes)
    def conv(filters, fan_in, name):
        return keras.layers.Conv2D(filters, 5, padding="valid", activation="relu", kernel_initializer=_kernel_init(),
                                   bias_initializer=FanInUniform(fan_in), name=name)

    def dense(units, fan_in, activation, name):
        return keras.layers.Dense(units, activation=activation, kernel_initializer=_kernel_init(),
                                  bias_initializer=FanInUniform(fan_in), name=name)

    model = keras.Sequential([
        keras.Input(shape=tuple(input_shape)),
        conv(32, 5 * 5 * input_shape[-1], "conv1"),
        keras.layers.MaxPooling2D(2, name="pool1"),
        conv(64, 5 * 5 * 32, "conv2"),
        keras.layers.MaxPooling2D(2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
    ], name="lenet5")
    model.add(dense(512, model.output_shape[-1], "relu", "fc1"))  # fan-in = flattened size (1024 for MNIST)
    model.add(dense(num_classes, 512, None, "fc2"))
    return model


def vgg7(input_shape=(32, 32, 3), num_classes=10):
    """VGG7 of the paper's CIFAR10 experiment (spec 7.3).

    Six 3x3 "same" convolutions without bias, each followed by ``BatchNormalization`` and ``ReLU``
    (``convK``, ``convK_bn``, ``convK_relu``), with widths 128, 128, MP2, 256, 256, MP2, 512, 512, MP2 (``pool1..3``);
    then ``flatten``, ``fc1`` (1024, no bias) + ``fc1_bn`` + ``fc1_relu``, and ``fc2`` (``num_classes`` logits, with
    bias). BatchNorm uses PyTorch's defaults (epsilon 1e-5, momentum 0.1, i.e. Keras ``momentum=0.9``).

    Deviation from the paper (spec section 6): here BatchNorm is a separate Keras layer. The paper folds it into
    the quantized convolution during training (the quantizer sees ``W * gamma / sigma``); that folding is still
    to be done, so for now the weight quantizer would see the unfolded ``W``.

    Parameters with the defaults: 12,973,450 weights and biases plus 5,632 BN affine values (gamma, beta), which
    are the 12,979,082 trainable parameters; Keras adds 5,632 non-trainable BN moving means and variances, for
    12,984,714 in all.

    Args:
        input_shape: ``(height, width, channels)`` of one image, NHWC.
        num_classes: number of logits.

    Returns:
        An uncompiled ``keras.Sequential`` named ``"vgg7"``.
    """
    _check(input_shape, num_classes)
    layers = [keras.Input(shape=tuple(input_shape))]

    def block(layer, name):
        layers.extend([
            layer,
            keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}_bn"),
            keras.layers.ReLU(name=f"{name}_relu"),
        ])

    for i, filters in enumerate((128, 128, 256, 256, 512, 512), start=1):
        block(keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_kernel_init(),
                                  name=f"conv{i}"), f"conv{i}")
        if i % 2 == 0:
            layers.append(keras.layers.MaxPooling2D(2, name=f"pool{i // 2}"))
    layers.append(keras.layers.Flatten(name="flatten"))
    block(keras.layers.Dense(1024, use_bias=False, kernel_initializer=_kernel_init(), name="fc1"), "fc1")
    layers.append(keras.layers.Dense(num_classes, kernel_initializer=_kernel_init(),
                                     bias_initializer=FanInUniform(1024), name="fc2"))
    return keras.Sequential(layers, name="vgg7")
