"""Reference architectures: LeNet5 for MNIST and VGG7 for CIFAR10 (spec section 7), and a CIFAR-style ResNet20.

All are plain float tf_keras models that end in logits (no softmax); ``quantize_model`` turns them into Bayesian
Bits models (folding every BatchNormalization into the convolution before it, spec section 6). Weights start from PyTorch's defaults for ``Conv2d``/``Linear`` (spec 7.1):
kernels ``VarianceScaling(scale=1/3, mode="fan_in", distribution="uniform")``, i.e. U(+-1/sqrt(fan_in)), and
biases U(+-1/sqrt(fan_in)) through ``FanInUniform``.
"""
import math

from bbits_tf._keras import keras

__all__ = ["FanInUniform", "lenet5", "mobilenet_v2", "resnet20", "vgg7"]

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

    BatchNorm is a separate Keras layer in this float model; ``quantize_model`` folds each ``conv -> bn -> relu``
    into one ``FoldedBatchNorm`` unit whose weight quantizer sees ``W * gamma / sigma`` (spec section 6), with one
    unsigned output quantizer after the ReLU, as the paper does.

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


def resnet20(input_shape=(32, 32, 3), num_classes=10):
    """ResNet20 for CIFAR10 (He et al. 2016, section 4.2): a 3x3 stem and 3 stages of 3 basic blocks.

    ``conv1`` (16 3x3) + ``conv1_bn`` + ``conv1_relu``; stages with 16, 32 and 64 filters, the first block of
    stages 2 and 3 with stride 2. Block ``stageS_blockB``: ``_conv1`` (3x3, stride) + ``_bn1`` + ``_relu1``,
    ``_conv2`` (3x3) + ``_bn2``, the shortcut, ``_add``, ``_relu``. Then ``pool`` (global average) and ``fc``
    (``num_classes`` logits, with bias). Convolutions are "same" and have no bias; BatchNorm uses PyTorch's
    defaults (epsilon 1e-5, momentum 0.1). Initialisation as ``lenet5``.

    Deviation from the paper's option A (identity shortcut with zero-padded channels): a block that changes the
    shape uses a projection shortcut, ``_shortcut`` (1x1, stride 2) + ``_shortcut_bn`` (option B), so every
    layer is a Keras layer that Bayesian Bits quantizes (no Lambda). With the defaults it has 272,474 trainable
    parameters (269,722 in option A; 274,042 with the BN moving statistics) and 40,813,184 MACs at 32x32.

    Args:
        input_shape: ``(height, width, channels)`` of one image, NHWC.
        num_classes: number of logits.

    Returns:
        An uncompiled functional ``keras.Model`` named ``"resnet20"``.
    """
    _check(input_shape, num_classes)

    def conv(filters, kernel, strides, name):
        return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                                   kernel_initializer=_kernel_init(), name=name)

    def bn(name):
        return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)

    inputs = keras.Input(shape=tuple(input_shape))
    x = keras.layers.ReLU(name="conv1_relu")(bn("conv1_bn")(conv(16, 3, 1, "conv1")(inputs)))
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = keras.layers.ReLU(name=f"{name}_relu1")(bn(f"{name}_bn1")(conv(filters, 3, strides, f"{name}_conv1")(x)))
            y = bn(f"{name}_bn2")(conv(filters, 3, 1, f"{name}_conv2")(y))
            shortcut = x
            if strides != 1 or int(x.shape[-1]) != filters:
                shortcut = bn(f"{name}_shortcut_bn")(conv(filters, 1, strides, f"{name}_shortcut")(x))
            x = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=_kernel_init(), bias_initializer=FanInUniform(64),
                                 name="fc")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def mobilenet_v2(input_shape=(32, 32, 3), num_classes=10, alpha=0.35, bn_momentum=0.9):
    """Keras' ``applications.MobileNetV2`` (``weights=None``, logits) with PyTorch's BatchNorm momentum.

    The model is ``keras.applications.MobileNetV2(input_shape, alpha, weights=None, classes=num_classes,
    classifier_activation=None)`` with one change: every BatchNormalization's ``momentum`` is ``bn_momentum``
    (default 0.9, PyTorch's 0.1, as in ``vgg7`` and ``resnet20``). Keras' own 0.999 moves the running statistics
    0.1 % per step, so a model trained for a few hundred steps still normalises with its initial statistics in
    inference: on MNIST at 32x32 our short runs with 0.999 (40 to 150 steps) stayed near chance in inference, while
    with 0.9 one float and one quantized epoch of 94 steps reached 33 % and rising. ``bn_momentum=None`` keeps
    Keras' value.

    Args:
        input_shape: ``(height, width, 3)`` (MobileNetV2 wants 3 channels; at least 32x32).
        num_classes: number of logits.
        alpha: width multiplier (0.35, 0.5, 0.75, 1.0, 1.3 or 1.4 as in Keras).
        bn_momentum: Keras momentum of every BatchNormalization, or ``None``.

    Returns:
        An uncompiled functional ``keras.Model`` named ``"mobilenet_v2"`` (52 Conv2D/DepthwiseConv2D layers,
        each with its BatchNormalization, and the classifier).
    """
    _check(input_shape, num_classes)
    model = keras.applications.MobileNetV2(input_shape=tuple(input_shape), alpha=alpha, weights=None,
                                           classes=num_classes, classifier_activation=None)
    if bn_momentum is not None:
        if isinstance(bn_momentum, bool) or not 0.0 <= float(bn_momentum) < 1.0:
            raise ValueError(f"`bn_momentum` must be in [0, 1) or None. Received: bn_momentum={bn_momentum!r}")
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    model._name = "mobilenet_v2"  # pylint: disable=protected-access
    return model
