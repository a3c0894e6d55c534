"""BatchNorm folded into a quantized Conv2D, DepthwiseConv2D or Dense layer during training (spec section 6).

The math is in pure functions (float32 TensorFlow ops); ``FoldedBatchNorm`` is the Keras shell. With the MAC
layer's kernel ``W``, optional bias ``b``, and the BatchNormalization's ``gamma``, ``beta``, running mean ``mu``,
running variance ``var`` and ``eps`` (``sigma = sqrt(var + eps)``), per output channel::

    W_f      = W * gamma / sigma_running                                       (fold_weight)
    y_q      = mac(x, Q(W_f))                                                  (Q: the weight quantizer, z_2 included)
    training:  y = mac(x, W) + b;  mu_B, var_B = mean and biased variance of y over every axis but the last
               out = y_q * sigma_running / sigma_B + beta + gamma * (b - mu_B) / sigma_B          (train_output)
               running stats <- (1 - p) * old + p * (stop_gradient(mu_B), unbiased var_B)  (update_running_stats)
    inference: out = y_q + beta + gamma * (b - mu_running) / sigma_running                      (inference_output)

then the activation. Conventions:

- **Conv bias.** The MAC layer's own bias (``use_bias=True``; the reference has none) is treated as Keras'
  ``Conv -> BN`` treats it: the batch statistics are those of ``mac(x, W) + b`` and the running mean tracks
  them, so in training ``b`` cancels exactly (it gets no gradient, as in Keras) and in inference it is folded,
  ``gamma * b / sigma_running``, into the bias. With ``b = 0`` the formulas are the spec's. Biases are never
  quantized (spec 1.4).
- **Momentum.** Keras' ``BatchNormalization(momentum=m)`` updates ``new = m * old + (1 - m) * batch``; PyTorch's
  ``momentum=p`` updates ``new = (1 - p) * old + p * batch``. The folded layer takes ``m`` from the Keras BN and
  uses ``p = 1 - m`` (``pytorch_momentum``): the reference's ``p = 0.1`` is Keras ``momentum=0.9``; Keras'
  default 0.99 is ``p = 0.01``. The running variance is updated with the *unbiased* batch variance (spec 6.5;
  Keras' own non-fused BN uses the biased one), the batch is normalised with the biased one.
- **Depthwise channel layout.** A ``DepthwiseConv2D`` kernel ``(kh, kw, c_in, mult)`` has output channel
  ``k = i * mult + m`` for input channel ``i`` and multiplier ``m`` (TensorFlow's layout): a per-channel vector of
  length ``c_in * mult`` is reshaped to ``(c_in, mult)`` to scale the kernel (``channel_ndims=2``), as the
  quantizer's pruning gates ``log_alpha_2`` of shape ``(c_in, mult)`` are flattened.
"""
import copy

import numpy as np
import tensorflow as tf

from bbits_tf import checks, configs
from bbits_tf._keras import keras, tfmot
from bbits_tf.quantizers import BayesianBitsQuantizer

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer
# Class name -> Keras class of the MAC layers that can take a BatchNormalization (their kernel attribute and
# channel axes are in ``configs.KERNELS``).
MAC_CLASSES = {cls.__name__: cls for cls in configs.KERNELS}


# ----------------------------------------------------------------------------------------------------------------
# Pure functions


def pytorch_momentum(keras_momentum):
    """The PyTorch momentum ``p = 1 - m`` of a Keras BatchNormalization ``momentum=m``."""
    return 1.0 - float(keras_momentum)


def fold_weight(kernel, gamma, running_variance, eps, channel_ndims=1):
    """``W * gamma / sqrt(running_variance + eps)`` per output channel.

    Args:
        kernel: ``(kh, kw, c_in, c_out)`` or ``(n_in, n_out)`` (``channel_ndims=1``), or a depthwise kernel
            ``(kh, kw, c_in, mult)`` (``channel_ndims=2``).
        gamma, running_variance: vectors over the output channels, length ``c_out`` or ``c_in * mult``.
        eps: the BatchNormalization's epsilon.
        channel_ndims: trailing kernel axes that index output channels.
    """
    kernel = tf.cast(kernel, tf.float32)
    scale = tf.cast(gamma, tf.float32) / tf.sqrt(tf.cast(running_variance, tf.float32) + eps)
    return kernel * tf.reshape(scale, kernel.shape[-channel_ndims:])


def fold_bias(gamma, beta, mean, variance, eps, bias=None):
    """``beta + gamma * (bias - mean) / sqrt(variance + eps)`` (``bias=None``: 0), per output channel."""
    offset = -mean if bias is None else bias - mean
    return beta + gamma * offset / tf.sqrt(variance + eps)


def batch_moments(y):
    """``(mean, biased variance, m)`` of ``y`` per channel (last axis), over the ``m`` values of every other axis."""
    axes = list(range(y.shape.rank - 1))
    mean = tf.reduce_mean(y, axes)
    variance = tf.reduce_mean(tf.square(y - mean), axes)
    count = tf.cast(tf.size(y) // tf.shape(y)[-1], tf.float32)
    return mean, variance, count


def unbiased_variance(variance, count):
    """The biased variance of ``count`` values times ``m / (m - 1)`` (for ``m = 1``, where it is undefined: 1)."""
    return variance * count / tf.maximum(count - 1.0, 1.0)


def update_running_stats(running_mean, running_variance, batch_mean, batch_variance, momentum):
    """``new = (1 - momentum) * old + momentum * batch`` for the mean and variance (PyTorch's convention).

    ``batch_variance`` is the unbiased variance; ``momentum`` is ``pytorch_momentum`` of the Keras layer's.
    """
    new_mean = (1.0 - momentum) * running_mean + momentum * batch_mean
    new_variance = (1.0 - momentum) * running_variance + momentum * batch_variance
    return new_mean, new_variance


def train_output(y_q, gamma, beta, batch_mean, batch_variance, running_variance, eps, bias=None,
                 channel_mask=None):
    """``y_q * sigma_running / sigma_B + fold_bias(batch stats)``; the bias term times ``channel_mask`` if given.

    ``batch_mean`` and the biased ``batch_variance`` are those of ``mac(x, W) + bias``, with the gradient.
    """
    correction = tf.sqrt(running_variance + eps) / tf.sqrt(batch_variance + eps)
    shift = fold_bias(gamma, beta, batch_mean, batch_variance, eps, bias)
    if channel_mask is not None:
        shift = shift * channel_mask
    return y_q * correction + shift


def inference_output(y_q, gamma, beta, running_mean, running_variance, eps, bias=None, channel_mask=None,
                     on_grid=None):
    """``y_q + fold_bias(running stats)``; the bias term times ``channel_mask`` if given, then ``on_grid(bias)``
    (the exported int32 bias grid, ``BayesianBitsQuantizer.bias_on_grid``) if given."""
    shift = fold_bias(gamma, beta, running_mean, running_variance, eps, bias)
    if channel_mask is not None:
        shift = shift * channel_mask
    if on_grid is not None:
        shift = on_grid(shift)
    return y_q + shift


def mac(kind, x, kernel, strides=(1, 1), padding="valid", dilation_rate=(1, 1)):
    """The linear op of a ``"Conv2D"``, ``"DepthwiseConv2D"`` or ``"Dense"`` layer (channels last, no bias)."""
    if kind == "Dense":
        if x.shape.rank == 2:
            return tf.matmul(x, kernel)
        out = tf.tensordot(x, kernel, [[x.shape.rank - 1], [0]])
        out.set_shape(x.shape[:-1].concatenate([kernel.shape[-1]]))
        return out
    if kind == "DepthwiseConv2D":
        return tf.nn.depthwise_conv2d(
            x, kernel, strides=(1, *strides, 1), padding=padding.upper(), dilations=dilation_rate
        )
    return tf.nn.convolution(x, kernel, strides=strides, padding=padding.upper(), dilations=dilation_rate)


def mac_moments(kind, x, kernel, bias=None, strides=(1, 1), padding="valid", dilation_rate=(1, 1)):
    """``batch_moments(mac(kind, x, kernel, ...) + bias)``, the batch statistics of a folded unit in training.

    A pointwise layer (Dense, 1x1 Conv2D) with more outputs than inputs gets them from its input's moments
    instead: ``mean = mean(x) W + b``, ``variance_c = w_c^T Cov(x) w_c`` (the biased covariance over the batch
    positions; a strided 1x1 convolution reads every ``stride``-th position, no padding): the same values up to
    float rounding, at ``n c_in^2`` multiply-adds instead of ``n c_in c_out`` (MobileNetV2's expansions have
    ``c_out = 6 c_in``), forward and backward.
    """
    c_in, c_out = int(kernel.shape[-2]), int(kernel.shape[-1])
    pointwise = kind == "Dense" or (kind == "Conv2D" and tuple(kernel.shape[:2]) == (1, 1))
    if not pointwise or c_in >= c_out:
        y = mac(kind, x, kernel, strides=strides, padding=padding, dilation_rate=dilation_rate)
        return batch_moments(y if bias is None else y + bias)
    if kind == "Conv2D" and tuple(strides) != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    flat = tf.reshape(x, [-1, c_in])
    count = tf.cast(tf.shape(flat)[0], tf.float32)
    x_mean = tf.reduce_mean(flat, 0)
    centered = flat - x_mean
    covariance = tf.matmul(centered, centered, transpose_a=True) / count
    w = tf.reshape(kernel, [c_in, c_out])
    mean = tf.linalg.matvec(w, x_mean, transpose_a=True)
    variance = tf.maximum(tf.reduce_sum(w * tf.matmul(covariance, w), 0), 0.0)
    return (mean if bias is None else mean + bias), variance, count


# ----------------------------------------------------------------------------------------------------------------
# Keras layer


def _load_quantizer(value):
    if value is None or isinstance(value, _Quantizer):
        return value
    return keras.utils.deserialize_keras_object(value, custom_objects={"BayesianBitsQuantizer": BayesianBitsQuantizer})


@keras.utils.register_keras_serializable(package="bbits_tf")
class FoldedBatchNorm(keras.layers.Layer):
    """A Conv2D, DepthwiseConv2D or Dense layer with the BatchNormalization after it folded in (spec section 6).

    Forward function (see the module docstring for the conventions)::

        training, BN not frozen: act(mac(x, Q(W_f)) * sigma_running / sigma_B + beta + gamma (b - mu_B) / sigma_B)
        inference or frozen BN:  act(mac(x, Q(W_f)) + beta + gamma (b - mu_running) / sigma_running)

    with ``W_f = W * gamma / sigma_running``. Training runs two MACs: ``mac(x, W) + b`` (unquantized, unfolded)
    gives the batch statistics ``mu_B``, ``sigma_B = sqrt(biased var + eps)``; the gradient flows through both.
    Then the running statistics are updated (``assign``; works in ``fit``/``tf.function``) from the detached
    batch mean and unbiased variance with PyTorch momentum ``1 - momentum`` of the Keras BN.

    The optional ``weight_quantizer`` (a ``BayesianBitsQuantizer``, signed, ``channel_ndims`` 2 for a depthwise
    kernel) is built on this layer (``quantizer.build(kernel_shape, kernel_name, self)``: its variables and its
    regularizer loss belong to this layer) and quantizes the *folded* kernel, so its range sees ``W_f`` and its
    pruning gates ``z_2`` multiply ``W_f``'s channels. With ``prune`` and ``mask_bias`` the folded bias is
    multiplied by the same ``z_2`` sample (``BayesianBitsQuantizer.quantize_with_gates``), so a pruned channel
    outputs ``act(0)``; ``mask_bias=False`` keeps the reference behaviour (the BN shift passes through).

    Like Keras' BatchNormalization, the BN runs on its running statistics (no update) when ``freeze_bn`` is set
    or the layer is not trainable; the quantizer still follows ``training`` (sampled gates in training). All
    math is float32 (the variables are float32 even under mixed precision); the output has the compute dtype.

    Build it from two built layers with ``FoldedBatchNorm.from_layers(conv, bn, activation=...)``. The MAC
    layer's activation must be linear (``Conv(relu) -> BN`` computes ``BN(relu(conv))``, which does not fold);
    ``activation`` is applied after the fold, e.g. the ReLU layer that follows the BN.

    Integration with a layout transform (tfmot ``transforms.Transform``, as in ``default_8bit_transforms``):
    match ``LayerPattern("BatchNormalization", inputs=[LayerPattern("Conv2D|DepthwiseConv2D|Dense",
    config={"activation": "linear"})])`` (optionally under a ``ReLU``/``Activation``) and return::

        name = conv_node.layer["config"]["name"]
        LayerNode({"class_name": "bbits_tf>FoldedBatchNorm", "name": name, "config": {"name": name,
                       "mac_layer": {"class_name": conv_node.layer["class_name"], "config": conv_node.layer["config"]},
                       "batch_norm": bn_node.layer["config"], "activation": "relu" or "linear",
                       "weight_quantizer": serialized BayesianBitsQuantizer or None, "freeze_bn": False}},
                  weights=OrderedDict(list(conv_node.weights.items()) + list(bn_node.weights.items())),
                  input_layers=conv_node.input_layers)

    The variables are named as in the original layers (``kernel`` or ``depthwise_kernel``, ``bias``, ``gamma``,
    ``beta``, ``moving_mean``, ``moving_variance``), so tfmot's ``ModelTransformer`` copies the merged weights by
    name (``tests/test_folding.py`` runs exactly this transform). The output quantizer then comes from a
    ``QuantizeWrapper`` around this layer whose config has no weight quantizer (the kernel's is inside).
    ``quantize_model`` does all this through ``bbits_tf.scheme.BayesianBitsLayoutTransform`` (units chosen by
    ``bbits_tf.graph.mac_units``); ``bayesian_bits_quantizers`` lists the inner weight quantizer with the wrapper.

    Args:
        mac_layer: ``{"class_name": "Conv2D" | "DepthwiseConv2D" | "Dense", "config": layer.get_config()}``.
        batch_norm: the BatchNormalization's ``get_config()`` (axis last; no renorm, virtual batches,
            adjustment or synchronisation).
        activation: applied after the fold (name, function or serialized); ``None`` is linear.
        weight_quantizer: a tfmot ``Quantizer`` (normally ``BayesianBitsQuantizer``) or its serialization, or
            ``None`` for a float fold. Each layer needs its own instance.
        freeze_bn: always use the running statistics and never update them.
        **kwargs: Keras ``Layer`` arguments (``name``, ...).
    """

    def __init__(self, mac_layer, batch_norm, activation=None, weight_quantizer=None, freeze_bn=False, **kwargs):
        if not isinstance(mac_layer, dict) or mac_layer.get("class_name") not in MAC_CLASSES:
            raise ValueError(
                f"`mac_layer` must be {{'class_name': one of {sorted(MAC_CLASSES)}, 'config': layer.get_config()}} "
                f"(use `FoldedBatchNorm.from_layers` to fold two built layers). Received: mac_layer={mac_layer!r}"
            )
        if not isinstance(batch_norm, dict):
            raise ValueError(
                f"`batch_norm` must be a BatchNormalization config dict. Received: batch_norm={batch_norm!r}")
        super().__init__(**kwargs)
        mac_config, bn_config = copy.deepcopy(dict(mac_layer)), copy.deepcopy(dict(batch_norm))
        template = MAC_CLASSES[mac_config["class_name"]].from_config(copy.deepcopy(mac_config["config"]))
        bn = keras.layers.BatchNormalization.from_config(copy.deepcopy(bn_config))
        _check_foldable(template, bn)
        # Plain attributes: Keras would wrap dicts and layers in trackable containers.
        object.__setattr__(self, "_mac_config", mac_config)
        object.__setattr__(self, "_bn_config", bn_config)
        object.__setattr__(self, "_mac_template", template)  # never built: it holds the MAC layer's settings only
        object.__setattr__(self, "_bn_template", bn)
        self.mac_kind = mac_config["class_name"]
        self.kernel_name, self.channel_ndims = configs.KERNELS[MAC_CLASSES[self.mac_kind]]
        self.use_bias = bool(template.use_bias)
        self.epsilon = float(bn.epsilon)
        self.momentum = float(bn.momentum)
        self.center, self.scale = bool(bn.center), bool(bn.scale)
        self.activation = keras.activations.get(activation)
        self.weight_quantizer = _load_quantizer(weight_quantizer)
        if self.weight_quantizer is not None:
            _check_quantizer(self.weight_quantizer, self.channel_ndims, self.mac_kind)
        self.freeze_bn = checks.boolean("freeze_bn", freeze_bn)
        object.__setattr__(self, "_quantizer_vars", {})
        object.__setattr__(self, "_calibration", None)  # accumulators while recalibrate_batch_norm runs
        if template.activity_regularizer is not None:
            self.activity_regularizer = template.activity_regularizer

    @classmethod
    def from_layers(cls, mac_layer, batch_norm, *, activation=None, weight_quantizer=None, freeze_bn=False,
                    name=None):
        """A built ``FoldedBatchNorm`` with the configs and weights of a built MAC layer and the BN after it.

        ``name`` defaults to the MAC layer's name (the BN disappears into it).
        """
        if configs.kernel_spec(mac_layer) is None:
            raise ValueError(
                "Only Conv2D, DepthwiseConv2D and Dense layers take a folded BatchNormalization. "
                f"Received: mac_layer={getattr(mac_layer, 'name', mac_layer)!r} of type {type(mac_layer).__name__}"
            )
        if not isinstance(batch_norm, keras.layers.BatchNormalization):
            raise ValueError(
                "`batch_norm` must be a tf_keras BatchNormalization layer. "
                f"Received: batch_norm={batch_norm!r} of type {type(batch_norm).__name__}"
            )
        if not (mac_layer.built and batch_norm.built):
            raise ValueError(
                "Both layers must be built (called on data or `build(input_shape)`) so that their weights can be "
                f"copied. Received: {mac_layer.name}.built={mac_layer.built}, "
                f"{batch_norm.name}.built={batch_norm.built}"
            )
        kind = next(c.__name__ for c in configs.KERNELS if isinstance(mac_layer, c))
        attr, channel_ndims = configs.kernel_spec(mac_layer)
        kernel = getattr(mac_layer, attr)
        n_out = int(np.prod(kernel.shape[-channel_ndims:]))
        if int(batch_norm.moving_mean.shape[0]) != n_out:
            raise ValueError(
                f"The BatchNormalization must have one channel per output channel of the MAC layer ({n_out}). "
                f"Received: {batch_norm.name} with {int(batch_norm.moving_mean.shape[0])} channels"
            )
        layer = cls(
            {"class_name": kind, "config": mac_layer.get_config()},
            batch_norm.get_config(),
            activation=activation,
            weight_quantizer=weight_quantizer,
            freeze_bn=freeze_bn,
            name=name or mac_layer.name,
        )
        if kind == "Dense":
            input_shape = (None, int(kernel.shape[0]))
        else:  # a grouped Conv2D kernel holds c_in / groups input channels
            groups = mac_layer.groups if kind == "Conv2D" else 1
            input_shape = (None, None, None, int(kernel.shape[2]) * groups)
        with tf.name_scope(layer.name):  # variable names as when built by a call: "<name>/kernel:0"
            layer.build(input_shape)
        layer.kernel.assign(kernel)
        for mine, theirs in ((layer.bias, getattr(mac_layer, "bias", None)), (layer.gamma, batch_norm.gamma),
                             (layer.beta, batch_norm.beta), (layer.moving_mean, batch_norm.moving_mean),
                             (layer.moving_variance, batch_norm.moving_variance)):
            if mine is not None:
                mine.assign(theirs)
        return layer

    @property
    def mac_class(self):
        """The Keras class of the folded MAC layer (``keras.layers.Conv2D``, ``DepthwiseConv2D`` or ``Dense``)."""
        return MAC_CLASSES[self.mac_kind]

    @property
    def weight_quantizer_vars(self):
        """The dict of variables ``weight_quantizer.build`` returned (empty without a quantizer)."""
        return self._quantizer_vars

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        rank, c_in = input_shape.rank, input_shape[-1]
        if c_in is None:
            raise ValueError(f"The last (channel) axis of the input must be known. Received: input_shape={input_shape}")
        axis = [a % rank if rank else a for a in tf.nest.flatten(self._bn_template.axis)]
        if rank is None or axis != [rank - 1]:
            raise ValueError(
                "The BatchNormalization must normalise the last (channel) axis to fold into the layer before it. "
                f"Received: axis={self._bn_template.axis} for inputs of rank {rank}"
            )
        m = self._mac_template
        if self.mac_kind == "Dense":
            kernel_shape = (c_in, m.units)
        elif self.mac_kind == "DepthwiseConv2D":
            kernel_shape = (*m.kernel_size, c_in, m.depth_multiplier)
        else:
            kernel_shape = (*m.kernel_size, c_in // m.groups, m.filters)
        n_out = int(np.prod(kernel_shape[-self.channel_ndims:]))
        prefix = "depthwise" if self.mac_kind == "DepthwiseConv2D" else "kernel"

        def add(name, shape, initializer, regularizer=None, constraint=None, trainable=True, **kwargs):
            return self.add_weight(
                name, shape=shape, initializer=initializer, regularizer=regularizer, constraint=constraint,
                trainable=trainable, dtype=tf.float32, experimental_autocast=False, **kwargs)

        self.kernel = add(self.kernel_name, kernel_shape, getattr(m, f"{prefix}_initializer"),
                          getattr(m, f"{prefix}_regularizer"), getattr(m, f"{prefix}_constraint"))
        self.bias = (add("bias", (n_out,), m.bias_initializer, m.bias_regularizer, m.bias_constraint)
                     if self.use_bias else None)
        bn = self._bn_template
        self.gamma = (add("gamma", (n_out,), bn.gamma_initializer, bn.gamma_regularizer, bn.gamma_constraint)
                      if self.scale else None)
        self.beta = (add("beta", (n_out,), bn.beta_initializer, bn.beta_regularizer, bn.beta_constraint)
                     if self.center else None)
        sync = dict(synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.MEAN)
        self.moving_mean = add("moving_mean", (n_out,), bn.moving_mean_initializer, trainable=False, **sync)
        self.moving_variance = add("moving_variance", (n_out,), bn.moving_variance_initializer, trainable=False, **sync)
        if self.weight_quantizer is not None:
            q = self.weight_quantizer
            object.__setattr__(self, "_quantizer_vars", q.build(tf.TensorShape(kernel_shape), self.kernel_name, self))
        self.input_spec = (keras.layers.InputSpec(min_ndim=2, axes={-1: c_in}) if self.mac_kind == "Dense"
                           else keras.layers.InputSpec(ndim=4, axes={-1: c_in}))
        super().build(input_shape)

    def _gamma_beta(self):
        n_out = self.moving_mean.shape[0]
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([n_out], tf.float32)
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([n_out], tf.float32)
        return gamma, beta

    def _masks_bias(self):
        q = self.weight_quantizer
        return bool(getattr(q, "prune", False) and getattr(q, "mask_bias", False))

    def _quantize(self, folded, training):
        """``(Q(W_f), channel mask or None)``: the mask is the pruning gates' sample when the bias is masked."""
        q = self.weight_quantizer
        if q is None:
            return folded, None
        if isinstance(q, BayesianBitsQuantizer):
            kernel_q, z2 = q.quantize_with_gates(folded, training, self._quantizer_vars)
            return kernel_q, (z2 if self._masks_bias() else None)
        out = q(folded, training, self._quantizer_vars)
        if isinstance(out, (tuple, list)):
            return out[0], out[1]
        return out, None

    def _bias_on_grid(self):
        """The weight quantizer's ``bias_on_grid`` for this layer's inference bias, or ``None``."""
        q = self.weight_quantizer
        if not isinstance(q, BayesianBitsQuantizer):
            return None
        return lambda shift: q.bias_on_grid(shift, self._quantizer_vars)

    def _mac(self, x, kernel):
        m = self._mac_template
        if self.mac_kind == "Dense":
            return mac("Dense", x, kernel)
        return mac(self.mac_kind, x, kernel, strides=m.strides, padding=m.padding, dilation_rate=m.dilation_rate)

    def _forward(self, inputs, training):
        x = tf.cast(inputs, tf.float32)
        kernel = tf.convert_to_tensor(self.kernel)
        gamma, beta = self._gamma_beta()
        running_mean = tf.convert_to_tensor(self.moving_mean)
        running_variance = tf.convert_to_tensor(self.moving_variance)
        bias = tf.convert_to_tensor(self.bias) if self.use_bias else None
        folded = fold_weight(kernel, gamma, running_variance, self.epsilon, self.channel_ndims)
        kernel_q, mask = self._quantize(folded, training)
        y_q = self._mac(x, kernel_q)
        stats = self._calibration
        if stats is not None or (training and self.trainable and not self.freeze_bn):
            m = self._mac_template
            conv = {} if self.mac_kind == "Dense" else dict(strides=m.strides, padding=m.padding,
                                                             dilation_rate=m.dilation_rate)
            mean, variance, count = mac_moments(self.mac_kind, x, kernel, bias, **conv)
            out = train_output(y_q, gamma, beta, mean, variance, running_variance, self.epsilon, bias, mask)
        if stats is not None:  # recalibrate_batch_norm: batch statistics, test-time gates, no update
            stats["count"] += float(count)
            stats["sum"] = stats["sum"] + mean.numpy().astype(np.float64) * float(count)
            stats["sum_sq"] = stats["sum_sq"] + (variance + tf.square(mean)).numpy().astype(np.float64) * float(count)
        elif training and self.trainable and not self.freeze_bn:
            new_mean, new_variance = update_running_stats(
                running_mean, running_variance, tf.stop_gradient(mean),
                tf.stop_gradient(unbiased_variance(variance, count)), pytorch_momentum(self.momentum))
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_variance)
        else:
            out = inference_output(y_q, gamma, beta, running_mean, running_variance, self.epsilon, bias, mask,
                                   self._bias_on_grid())
        return tf.cast(self.activation(out), self.compute_dtype)

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        if tf.is_tensor(training):
            static = tf.get_static_value(training)
            if static is None:
                return tf.cond(tf.cast(training, tf.bool), lambda: self._forward(inputs, True),
                               lambda: self._forward(inputs, False))
            training = static
        return self._forward(inputs, bool(training))

    def compute_output_shape(self, input_shape):
        return self._mac_template.compute_output_shape(input_shape)

    # Deterministic state for reports and export (NumPy, inference gates).

    def channel_mask(self):
        """The deterministic kept-channel mask (flat, ``c_out`` or ``c_in * mult``), or ``None`` without pruning."""
        q = self.weight_quantizer
        if q is None or not getattr(q, "prune", False):
            return None
        return q.channel_mask(self._quantizer_vars)

    def folded_kernel(self, quantized=True):
        """``Q(W_f)`` with the inference gates (pruned channels are 0), or the float ``W_f`` (``quantized=False``
        or no quantizer), from the running variance; NumPy, in the MAC layer's kernel layout."""
        gamma, _ = self._gamma_beta()
        folded = fold_weight(self.kernel, gamma, self.moving_variance, self.epsilon, self.channel_ndims)
        if quantized:
            folded, _ = self._quantize(folded, training=False)
        return np.asarray(folded)

    def folded_bias(self):
        """The inference bias ``beta + gamma * (b - mu_running) / sigma_running``, flat (NumPy); with a masked bias
        (``prune`` and ``mask_bias``) pruned channels are 0; on the exported int32 bias grid when the layer's input
        quantizer is linked (``BayesianBitsQuantizer.bias_on_grid``): what the layer adds in inference."""
        gamma, beta = self._gamma_beta()
        bias = fold_bias(gamma, beta, tf.convert_to_tensor(self.moving_mean),
                         tf.convert_to_tensor(self.moving_variance), self.epsilon,
                         tf.convert_to_tensor(self.bias) if self.use_bias else None)
        if self._masks_bias():
            bias = bias * self.channel_mask()
        on_grid = self._bias_on_grid()
        return np.asarray(bias if on_grid is None else on_grid(bias))

    def get_config(self):
        config = super().get_config()
        config.update(
            mac_layer=copy.deepcopy(self._mac_config),
            batch_norm=copy.deepcopy(self._bn_config),
            activation=keras.activations.serialize(self.activation),
            weight_quantizer=(None if self.weight_quantizer is None
                              else keras.utils.serialize_keras_object(self.weight_quantizer)),
            freeze_bn=self.freeze_bn,
        )
        return config


def _check_foldable(mac_layer, bn):
    """Raises a ``ValueError`` for a MAC layer / BatchNormalization pair that does not fold."""
    activation = getattr(mac_layer.activation, "__name__", str(mac_layer.activation))
    if mac_layer.activation is not keras.activations.linear:
        raise ValueError(
            "The MAC layer before a folded BatchNormalization must have a linear activation (`Conv(relu) -> BN` "
            "computes BN(relu(conv)), which does not fold); pass the activation that follows the BN as "
            f"`activation`. Received: {mac_layer.name} with activation={activation!r}"
        )
    if getattr(mac_layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"Only channels_last layers fold. Received: data_format={mac_layer.data_format!r}")
    unsupported = {"renorm": bool(bn.renorm), "virtual_batch_size": bn.virtual_batch_size,
                   "adjustment": bn.adjustment, "synchronized": bool(getattr(bn, "synchronized", False))}
    used = {k: v for k, v in unsupported.items() if v not in (False, None)}
    if used:
        raise ValueError(f"These BatchNormalization options do not fold. Received: {used}")
    if len(tf.nest.flatten(bn.axis)) != 1:
        raise ValueError(f"The BatchNormalization must normalise one (the last) axis. Received: axis={bn.axis}")


def _check_quantizer(quantizer, channel_ndims, kind):
    if not isinstance(quantizer, _Quantizer):
        raise TypeError(
            "`weight_quantizer` must be a tfmot Quantizer such as `bbits_tf.BayesianBitsQuantizer`. "
            f"Received: weight_quantizer={quantizer!r}"
        )
    ndims = getattr(quantizer, "channel_ndims", channel_ndims)
    if ndims != channel_ndims:
        raise ValueError(
            f"A {kind} kernel indexes its output channels with its last {channel_ndims} axes; the weight quantizer "
            f"must have channel_ndims={channel_ndims}. Received: channel_ndims={ndims}"
        )
    if getattr(quantizer, "signed", True) is not True:
        raise ValueError("The folded kernel has negative values; its quantizer must be signed. Received: signed=False")


def recalibrate_batch_norm(model, x, batch_size=500):
    """Sets every ``FoldedBatchNorm``'s running statistics to those of the network with its test-time gates.

    Training samples the gates (a pruning gate scales its channel by a value in [0, 1], a bit gate drops or keeps a
    level at random), so the running statistics describe the stochastic network. While gates are still moving,
    the deterministic network that inference and the exported file compute sees other activation statistics, and
    its BatchNorms normalise with the wrong ones: a ResNet20 trained two short epochs on MNIST read 95.9 % in
    training mode and 17 % in inference. This runs ``x`` through the model once with the test-time gates, each
    folded BN normalising with its batch statistics as in training, and sets its running mean and (unbiased)
    variance to the statistics of all of ``x`` (the "precise BN" of the NAS literature; not in the reference code).

    Args:
        model: a model with ``FoldedBatchNorm`` layers (from ``quantize_model``; bare or wrapped).
        x: input images, e.g. a few thousand training images.
        batch_size: images per forward pass (a large batch keeps each pass close to the population statistics).

    Returns:
        The number of layers recalibrated (0: the model has no folded BatchNorm, nothing changed).
    """
    layers = [getattr(layer, "layer", layer) for layer in model.layers]
    layers = [layer for layer in layers if isinstance(layer, FoldedBatchNorm)]
    if not layers:
        return 0
    checks.integer("batch_size", batch_size, minimum=1)
    if len(x) < 2:
        raise ValueError(f"`recalibrate_batch_norm` needs at least 2 images. Received: x with {len(x)}")
    for layer in layers:
        object.__setattr__(layer, "_calibration", {"count": 0.0, "sum": 0.0, "sum_sq": 0.0})
    try:
        for start in range(0, len(x), batch_size):
            model(tf.convert_to_tensor(x[start:start + batch_size]), training=False)
        for layer in layers:
            stats = layer._calibration  # pylint: disable=protected-access
            mean = stats["sum"] / stats["count"]
            variance = np.maximum(stats["sum_sq"] / stats["count"] - mean ** 2, 0.0)
            variance = variance * stats["count"] / max(stats["count"] - 1.0, 1.0)
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))
    finally:
        for layer in layers:
            object.__setattr__(layer, "_calibration", None)
    return len(layers)
