"""BatchNorm folding (spec section 6) against a NumPy reference: pure functions, the layer in training and
inference, the running-statistics update, quantized and float folds, gradients, fit, save and reload."""
import collections

import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import folding
from bbits_tf._keras import keras
from bbits_tf.folding import FoldedBatchNorm
from bbits_tf.quantizers import BayesianBitsQuantizer

KINDS = ("Conv2D", "DepthwiseConv2D", "Dense")

# ----------------------------------------------------------------------------------------------------------------
# NumPy reference of spec section 6


def np_mac(kind, x, w, stride=1, padding="valid"):
    """Conv2D / DepthwiseConv2D (channels last, TF's SAME padding) or Dense, in float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if kind == "Dense":
        return x @ w
    kh, kw = w.shape[:2]
    n, h, wd, c = x.shape
    if padding == "same":
        pads = []
        for size, k in ((h, kh), (wd, kw)):
            out = -(-size // stride)
            total = max((out - 1) * stride + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        n, h, wd, c = x.shape
    ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            if kind == "Conv2D":
                out = out + patch @ w[i, j]
            else:  # output channel c * mult + m
                out = out + (patch[..., :, None] * w[i, j]).reshape(n, ho, wo, -1)
    return out


def np_fold(kernel, gamma, var, eps):
    scale = gamma / np.sqrt(var + eps)
    return kernel * scale.reshape(kernel.shape[-1:] if kernel.ndim == 2 or kernel.shape[-1] == scale.size
                                  else kernel.shape[-2:])


def np_quantize(w, x_max, bits=8):
    """Signed symmetric b-bit grid of spec 1.2-1.4 with the (1 - 1e-7) clip shrink."""
    hi = np.float32(1 - 1e-7) * x_max
    step = 2.0 * x_max / (2.0**bits - 1.0)
    return step * np.round(np.clip(w, -hi, hi) / step)


def np_reference(kind, x, p, training, stride=1, padding="valid", quantize=None, mask=None, mask_bias=True,
                 momentum=0.1):
    """Spec section 6: ``(output, new running mean, new running var)``; ``quantize``: ``W_f -> Q(W_f)``;
    ``mask``: pruning gates on the kernel's output channels (and on the folded bias if ``mask_bias``)."""
    eps, bias = p["eps"], p.get("bias")
    w_f = np_fold(p["kernel"], p["gamma"], p["var"], eps)
    w_q = w_f if quantize is None else quantize(w_f)
    if mask is not None:
        w_q = w_q * mask.reshape(w_q.shape[-1:] if kind != "DepthwiseConv2D" else w_q.shape[-2:])
    y_q = np_mac(kind, x, w_q, stride, padding)
    keep = 1.0 if mask is None or not mask_bias else mask
    b = 0.0 if bias is None else bias
    if not training:
        shift = p["beta"] + p["gamma"] * (b - p["mean"]) / np.sqrt(p["var"] + eps)
        return y_q + keep * shift, p["mean"], p["var"]
    y = np_mac(kind, x, p["kernel"], stride, padding) + b
    axes = tuple(range(y.ndim - 1))
    mu, var_b = y.mean(axes), y.var(axes)  # biased
    m = y.size // y.shape[-1]
    sigma_b, sigma_run = np.sqrt(var_b + eps), np.sqrt(p["var"] + eps)
    out = y_q * (sigma_run / sigma_b) + keep * (p["beta"] + p["gamma"] * (b - mu) / sigma_b)
    new_mean = (1 - momentum) * p["mean"] + momentum * mu
    new_var = (1 - momentum) * p["var"] + momentum * var_b * m / (m - 1)  # unbiased
    return out, new_mean, new_var


# ----------------------------------------------------------------------------------------------------------------
# Float Keras layers with random weights


def float_pair(kind, *, use_bias=False, center=True, scale=True, momentum=0.9, eps=1e-3, seed=0,
               stride=1, padding="valid", activation=None):
    """A built MAC layer and BatchNormalization with random weights, an input batch, and the NumPy params."""
    rng = np.random.default_rng(seed)
    if kind == "Conv2D":
        x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
        mac = keras.layers.Conv2D(4, 3, strides=stride, padding=padding, use_bias=use_bias, activation=activation)
    elif kind == "DepthwiseConv2D":
        x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
        mac = keras.layers.DepthwiseConv2D(3, strides=stride, padding=padding, depth_multiplier=2,
                                           use_bias=use_bias, activation=activation)
    else:
        x = rng.normal(size=(8, 5)).astype(np.float32)
        mac = keras.layers.Dense(4, use_bias=use_bias, activation=activation)
    mac.build(x.shape)
    n_out = int(mac.compute_output_shape(x.shape)[-1])
    bn = keras.layers.BatchNormalization(momentum=momentum, epsilon=eps, center=center, scale=scale)
    bn.build(mac.compute_output_shape(x.shape))
    kernel = rng.normal(size=mac.weights[0].shape).astype(np.float32)
    mac.weights[0].assign(kernel)
    p = {"kernel": kernel, "eps": eps, "gamma": np.ones(n_out, np.float32), "beta": np.zeros(n_out, np.float32)}
    if use_bias:
        p["bias"] = rng.normal(size=n_out).astype(np.float32)
        mac.bias.assign(p["bias"])
    if scale:
        p["gamma"] = rng.uniform(0.5, 1.5, n_out).astype(np.float32)
        bn.gamma.assign(p["gamma"])
    if center:
        p["beta"] = rng.normal(size=n_out).astype(np.float32)
        bn.beta.assign(p["beta"])
    p["mean"] = rng.normal(size=n_out).astype(np.float32)
    p["var"] = rng.uniform(0.5, 2.0, n_out).astype(np.float32)
    bn.moving_mean.assign(p["mean"])
    bn.moving_variance.assign(p["var"])
    return mac, bn, x, p


def allclose(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions


def test_fold_weight_conv_dense_and_depthwise_channel_layout():
    rng = np.random.default_rng(1)
    gamma, var = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
    conv = rng.normal(size=(3, 3, 2, 6)).astype(np.float32)
    expected = conv * gamma / np.sqrt(var + 1e-5)
    allclose(folding.fold_weight(conv, gamma, var, 1e-5), expected, atol=1e-6)
    dense = rng.normal(size=(5, 6)).astype(np.float32)
    allclose(folding.fold_weight(dense, gamma, var, 1e-5), dense * gamma / np.sqrt(var + 1e-5), atol=1e-6)
    depthwise = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)  # c_in=3, mult=2: channel k = i * 2 + m
    folded = folding.fold_weight(depthwise, gamma, var, 1e-5, channel_ndims=2).numpy()
    for i in range(3):
        for m in range(2):
            k = i * 2 + m
            allclose(folded[:, :, i, m], depthwise[:, :, i, m] * gamma[k] / np.sqrt(var[k] + 1e-5), atol=1e-6)


def test_moments_update_and_outputs_match_numpy():
    rng = np.random.default_rng(2)
    y = rng.normal(2.0, 3.0, size=(4, 5, 5, 3)).astype(np.float32)
    mean, var, count = folding.batch_moments(tf.constant(y))
    allclose(mean, y.mean((0, 1, 2)))
    allclose(var, y.var((0, 1, 2)), rtol=1e-5)
    assert float(count) == 100.0
    allclose(folding.unbiased_variance(var, count), y.var((0, 1, 2), ddof=1), rtol=1e-5)
    old_m, old_v = np.array([1.0, -1.0, 0.0]), np.array([1.0, 2.0, 0.5])
    new_m, new_v = folding.update_running_stats(old_m, old_v, np.array([3.0, 1.0, 2.0]), np.array([2.0, 2.0, 1.5]), 0.1)
    allclose(new_m, [1.2, -0.8, 0.2])
    allclose(new_v, [1.1, 2.0, 0.6])
    assert folding.pytorch_momentum(0.99) == pytest.approx(0.01)
    assert folding.pytorch_momentum(0.9) == pytest.approx(0.1)
    gamma, beta = np.array([2.0, 0.5, 1.0]), np.array([0.1, 0.2, -0.3])
    b, mu, v, run_v, eps = np.array([0.5, 0.0, -1.0]), np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.25]), \
        np.array([1.0, 9.0, 4.0]), 1e-3
    yq = rng.normal(size=(2, 3))
    expected = yq * np.sqrt(run_v + eps) / np.sqrt(v + eps) + beta + gamma * (b - mu) / np.sqrt(v + eps)
    allclose(folding.train_output(yq, gamma, beta, mu, v, run_v, eps, b), expected)
    expected = yq + (beta + gamma * (b - mu) / np.sqrt(run_v + eps)) * np.array([1.0, 0.0, 1.0])
    allclose(folding.inference_output(yq, gamma, beta, mu, run_v, eps, b, np.array([1.0, 0.0, 1.0])), expected)


# ----------------------------------------------------------------------------------------------------------------
# The layer without a quantizer: exact float folding


CASES = [
    dict(kind="Conv2D"),
    dict(kind="Conv2D", use_bias=True),
    dict(kind="Conv2D", stride=2, padding="same"),
    dict(kind="DepthwiseConv2D"),
    dict(kind="DepthwiseConv2D", use_bias=True, stride=2, padding="same"),
    dict(kind="Dense"),
    dict(kind="Dense", use_bias=True, center=False),
    dict(kind="Conv2D", scale=False),
    dict(kind="DepthwiseConv2D", center=False, scale=False),
]


def _id(case):
    return "-".join(f"{k}={v}" if k != "kind" else v for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_float_fold_inference_equals_keras_mac_then_bn(case):
    mac, bn, x, p = float_pair(**case)
    layer = FoldedBatchNorm.from_layers(mac, bn)
    expected = bn(mac(x), training=False).numpy()
    allclose(layer(x, training=False), expected)
    allclose(layer(x), expected)  # training defaults to inference
    out, _, _ = np_reference(case["kind"], x, p, training=False, stride=case.get("stride", 1),
                             padding=case.get("padding", "valid"))
    allclose(layer(x, training=False), out)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), p["mean"])  # inference does not update


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_float_fold_training_uses_batch_stats_and_updates_running_stats(case):
    mac, bn, x, p = float_pair(**case)
    layer = FoldedBatchNorm.from_layers(mac, bn)
    out, new_mean, new_var = np_reference(case["kind"], x, p, training=True, stride=case.get("stride", 1),
                                          padding=case.get("padding", "valid"), momentum=0.1)  # Keras 0.9
    allclose(layer(x, training=True), out, atol=2e-5, rtol=2e-5)
    allclose(bn(mac(x), training=True), out, atol=2e-5, rtol=2e-5)  # same as Keras' BN in training
    allclose(layer.moving_mean.numpy(), new_mean)
    allclose(layer.moving_variance.numpy(), new_var)
    assert not np.allclose(layer.moving_variance.numpy(), p["var"])


def test_momentum_comes_from_the_keras_layer():
    mac, bn, x, p = float_pair("Conv2D", momentum=0.99)
    layer = FoldedBatchNorm.from_layers(mac, bn)
    assert layer.momentum == pytest.approx(0.99)
    _, new_mean, new_var = np_reference("Conv2D", x, p, training=True, momentum=0.01)
    layer(x, training=True)
    allclose(layer.moving_mean.numpy(), new_mean)
    allclose(layer.moving_variance.numpy(), new_var)


def test_freeze_bn_uses_running_stats_in_training():
    mac, bn, x, p = float_pair("Conv2D", use_bias=True)
    layer = FoldedBatchNorm.from_layers(mac, bn, freeze_bn=True)
    out, _, _ = np_reference("Conv2D", x, p, training=False)
    allclose(layer(x, training=True), out)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), p["mean"])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), p["var"])
    layer = FoldedBatchNorm.from_layers(mac, bn)
    layer.trainable = False  # as Keras' BatchNormalization: a frozen layer runs on its running statistics
    allclose(layer(x, training=True), out)


def test_activation_is_applied_after_the_fold():
    mac, bn, x, p = float_pair("Conv2D")
    layer = FoldedBatchNorm.from_layers(mac, bn, activation="relu")
    out, _, _ = np_reference("Conv2D", x, p, training=False)
    assert (out < 0).any()
    allclose(layer(x, training=False), np.maximum(out, 0.0))


def test_gradient_flows_through_both_macs_as_in_keras_bn():
    mac, bn, x, _ = float_pair("Conv2D", use_bias=True)
    layer = FoldedBatchNorm.from_layers(mac, bn)
    weights = tf.constant(np.random.default_rng(3).normal(size=(4, 4, 4, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) * weights)
    grads = dict(zip(["kernel", "bias", "gamma", "beta"],
                     tape.gradient(loss, [layer.kernel, layer.bias, layer.gamma, layer.beta])))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(bn(mac(x), training=True) * weights)
    keras_kernel, keras_gamma = tape.gradient(loss, [mac.kernel, bn.gamma])
    # Without the batch-statistics path (stop_gradient on mu_B, sigma_B) these would differ.
    allclose(grads["kernel"], keras_kernel.numpy(), atol=1e-4, rtol=1e-4)
    allclose(grads["gamma"], keras_gamma.numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(grads["kernel"].numpy()).max() > 1e-3
    allclose(grads["bias"], np.zeros(4), atol=1e-4)  # the conv bias cancels in training, as in Keras


def test_training_as_a_tensor_inside_tf_function():
    mac, bn, x, p = float_pair("Conv2D", use_bias=True)
    layer = FoldedBatchNorm.from_layers(mac, bn)
    run = tf.function(lambda x, training: layer(x, training=training))
    expected, new_mean, new_var = np_reference("Conv2D", x, p, training=False)
    allclose(run(x, tf.constant(False)), expected)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), p["mean"])
    expected, new_mean, new_var = np_reference("Conv2D", x, p, training=True)
    allclose(run(x, tf.constant(True)), expected, atol=2e-5, rtol=2e-5)
    allclose(layer.moving_mean.numpy(), new_mean)
    allclose(layer.moving_variance.numpy(), new_var)


def test_math_runs_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mac, bn, x, p = float_pair("Dense")
        layer = FoldedBatchNorm.from_layers(mac, bn, weight_quantizer=BayesianBitsQuantizer(bit_widths=(8,)))
        out = layer(x, training=False)
        assert out.dtype == tf.float16 and layer.kernel.dtype == tf.float32
        assert layer.weight_quantizer_vars["x_max"].dtype == tf.float32
        x_max = float(layer.weight_quantizer_vars["x_max"].numpy())  # placeholder: inference never sets it
        expected, _, _ = np_reference("Dense", x, p, training=False, quantize=lambda w: np_quantize(w, x_max))
        allclose(out.numpy(), expected, atol=5e-3, rtol=2e-3)  # float16 output rounding only
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------------------------------------------
# With the 8-bit quantizer


@pytest.mark.parametrize("kind", KINDS)
def test_8_bit_quantizer_on_the_folded_kernel(kind):
    mac, bn, x, p = float_pair(kind, use_bias=kind == "Conv2D")
    ndims = 2 if kind == "DepthwiseConv2D" else 1
    quantizer = BayesianBitsQuantizer(bit_widths=(8,), channel_ndims=ndims)
    layer = FoldedBatchNorm.from_layers(mac, bn, weight_quantizer=quantizer)
    w_f = np_fold(p["kernel"], p["gamma"], p["var"], p["eps"]).astype(np.float32)
    x_max = float(np.abs(w_f).max())  # set on the first training call from the folded kernel (spec 1.5)
    out, new_mean, new_var = np_reference(kind, x, p, training=True, quantize=lambda w: np_quantize(w, x_max))
    allclose(layer(x, training=True), out)
    assert float(layer.weight_quantizer_vars["x_max"].numpy()) == pytest.approx(x_max, rel=1e-6)
    allclose(layer.moving_variance.numpy(), new_var)
    # Inference: the new running variance gives a new W_f on the grid of the range learned so far.
    p_after = dict(p, mean=new_mean.astype(np.float32), var=new_var.astype(np.float32))
    out, _, _ = np_reference(kind, x, p_after, training=False, quantize=lambda w: np_quantize(w, x_max))
    allclose(layer(x, training=False), out)
    w_q = layer.folded_kernel()
    allclose(w_q, np_quantize(np_fold(p["kernel"], p["gamma"], p_after["var"], p["eps"]), x_max), atol=1e-6)
    levels = w_q / (2 * x_max / 255)
    allclose(levels, np.round(levels), atol=1e-3)  # on the 8-bit grid
    w_f_after = np_fold(p["kernel"], p["gamma"], p_after["var"], p["eps"])
    allclose(layer.folded_kernel(quantized=False), w_f_after)
    assert np.abs(w_q - w_f_after).max() > 1e-4  # and not the float kernel
    assert len(layer.losses) == 1 and np.isfinite(float(layer.losses[0]))


def test_gradients_with_the_quantizer_are_finite_and_nonzero():
    mac, bn, x, _ = float_pair("DepthwiseConv2D")
    layer = FoldedBatchNorm.from_layers(mac, bn, weight_quantizer=BayesianBitsQuantizer(
        bit_widths=(2, 4, 8), channel_ndims=2, prune=True))
    tf.random.set_seed(0)
    layer.weight_quantizer_vars["log_alpha_2"].assign(tf.zeros([3, 2]))  # gates inside (0, 1): a gradient
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True)))
    variables = [layer.kernel, layer.gamma, layer.beta, layer.weight_quantizer_vars["x_max"],
                 layer.weight_quantizer_vars["log_alpha_2"]]
    for var, grad in zip(variables, tape.gradient(loss, variables)):
        grad = grad.numpy()
        assert np.isfinite(grad).all() and np.abs(grad).max() > 0, var.name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_bias", [True, False])
def test_pruned_channel_in_training_and_inference(kind, mask_bias):
    mac, bn, x, p = float_pair(kind, use_bias=True)
    ndims = 2 if kind == "DepthwiseConv2D" else 1
    quantizer = BayesianBitsQuantizer(bit_widths=(8,), channel_ndims=ndims, prune=True, mask_bias=mask_bias)
    layer = FoldedBatchNorm.from_layers(mac, bn, weight_quantizer=quantizer)
    log_alpha_2 = layer.weight_quantizer_vars["log_alpha_2"]
    values = np.full(log_alpha_2.shape, 30.0, np.float32)  # gates exactly 1, even when sampled in training
    values.reshape(-1)[2] = -30.0  # output channel 2 (depthwise: input channel 1, multiplier 0) exactly 0
    log_alpha_2.assign(values)
    mask = np.ones(values.size, np.float32)
    mask[2] = 0.0
    x_max = float(np.abs(np_fold(p["kernel"], p["gamma"], p["var"], p["eps"])).max())
    quantize = lambda w: np_quantize(w, x_max)  # noqa: E731
    expected, new_mean, new_var = np_reference(kind, x, p, training=True, quantize=quantize, mask=mask,
                                               mask_bias=mask_bias)
    out = layer(x, training=True).numpy()  # the same z_2 sample masks the kernel and (mask_bias) the shift
    allclose(out, expected)
    pruned = out[..., 2]
    if mask_bias:
        np.testing.assert_array_equal(pruned, 0.0)
    else:  # the BN shift of the batch passes through (the reference's behaviour)
        np.testing.assert_allclose(pruned, pruned.reshape(-1)[0], atol=1e-6)
        assert abs(pruned.reshape(-1)[0]) > 1e-3
    p_after = dict(p, mean=new_mean.astype(np.float32), var=new_var.astype(np.float32))
    expected, _, _ = np_reference(kind, x, p_after, training=False, quantize=quantize, mask=mask, mask_bias=mask_bias)
    out = layer(x, training=False).numpy()
    allclose(out, expected)
    np.testing.assert_array_equal(layer.channel_mask(), mask)
    kernel = layer.folded_kernel()
    assert not (kernel[..., 1, 0] if kind == "DepthwiseConv2D" else kernel[..., 2]).any()
    assert np.count_nonzero(kernel) > 0.9 * (kernel.size - kernel.size // mask.size)
    shift = p["beta"] + p["gamma"] * (p["bias"] - p_after["mean"]) / np.sqrt(p_after["var"] + p["eps"])
    allclose(layer.folded_bias(), shift * mask if mask_bias else shift)
    allclose(out[..., 2], np.full(out.shape[:-1], 0.0 if mask_bias else shift[2]))


# ----------------------------------------------------------------------------------------------------------------
# Serialization, fit, save and reload


def test_config_round_trip():
    mac, bn, _, _ = float_pair("DepthwiseConv2D", use_bias=True, center=False)
    layer = FoldedBatchNorm.from_layers(mac, bn, activation="relu", freeze_bn=True, weight_quantizer=(
        BayesianBitsQuantizer(bit_widths=(4, 8), init_log_alpha=(3.0,), channel_ndims=2, prune=True)))
    config = layer.get_config()
    again = FoldedBatchNorm.from_config(config)
    assert again.get_config() == config
    assert again.weight_quantizer == layer.weight_quantizer and again.weight_quantizer is not layer.weight_quantizer
    assert again.mac_kind == "DepthwiseConv2D" and again.mac_class is keras.layers.DepthwiseConv2D
    assert again.channel_ndims == 2 and again.kernel_name == "depthwise_kernel"
    assert again.activation is keras.activations.relu and again.freeze_bn and not again.center
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, FoldedBatchNorm) and restored.get_config() == config


def _model(seed=0):
    mac, bn, x, p = float_pair("Conv2D", use_bias=True, seed=seed, momentum=0.99)  # Keras' default
    folded = FoldedBatchNorm.from_layers(mac, bn, activation="relu", weight_quantizer=BayesianBitsQuantizer(
        bit_widths=(2, 4, 8), prune=True, mu=0.01))
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(folded(inputs)))
    return keras.Model(inputs, outputs), x, p


def test_model_fits_one_step_and_reloads(tmp_path):
    tf.random.set_seed(0)
    model, x, p = _model()
    folded = model.layers[1]
    kernel_before = folded.kernel.numpy().copy()
    _, new_mean, new_var = np_reference("Conv2D", x, p, training=True, momentum=0.01)  # Keras default 0.99
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit(x, np.ones((len(x), 2), np.float32), batch_size=len(x), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(folded.kernel.numpy(), kernel_before)  # it trained
    # The forward pass of the step (before the weights changed) updated the running statistics.
    allclose(folded.moving_mean.numpy(), new_mean)
    allclose(folded.moving_variance.numpy(), new_var)
    assert float(folded.weight_quantizer_vars["range_initialized"].numpy()) == 1.0
    expected = model.predict(x, verbose=0)
    for name in ("model.keras", "model.h5"):
        path = str(tmp_path / name)
        model.save(path)
        with bbits_tf.quantize_scope():
            loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
        loaded_folded = loaded.layers[1]
        assert isinstance(loaded_folded, FoldedBatchNorm)
        for mine, theirs in zip(folded.weights, loaded_folded.weights):
            assert mine.name.split("/")[-1] == theirs.name.split("/")[-1]
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_tfmot_layout_transform_replaces_mac_then_bn_as_documented():
    """The replacement the class docstring describes, run by tfmot's ModelTransformer (weights copied by name)."""
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
        model_transformer, transforms)

    class FoldBatchNorm(transforms.Transform):
        def pattern(self):
            return transforms.LayerPattern("BatchNormalization", inputs=[transforms.LayerPattern(
                "Conv2D|DepthwiseConv2D|Dense", config={"activation": "linear"})])

        def replacement(self, match_layer):
            bn_node, mac_node = match_layer, match_layer.input_layers[0]
            name = mac_node.layer["config"]["name"]
            config = {"name": name, "mac_layer": {"class_name": mac_node.layer["class_name"],
                                                  "config": mac_node.layer["config"]},
                      "batch_norm": bn_node.layer["config"], "activation": "linear", "weight_quantizer": None,
                      "freeze_bn": False}
            weights = collections.OrderedDict(list(mac_node.weights.items()) + list(bn_node.weights.items()))
            return transforms.LayerNode({"class_name": "bbits_tf>FoldedBatchNorm", "name": name, "config": config},
                                        weights=weights, input_layers=mac_node.input_layers)

        def custom_objects(self):
            return {"FoldedBatchNorm": FoldedBatchNorm}

    rng = np.random.default_rng(4)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, use_bias=True)(inputs))
    h = keras.layers.ReLU()(h)
    h = keras.layers.BatchNormalization(scale=False)(keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(h))
    h = keras.layers.BatchNormalization(center=False)(keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    model = keras.Model(inputs, h)
    for w in model.weights:
        value = rng.uniform(0.5, 1.5, w.shape) if "variance" in w.name else 0.5 * rng.normal(size=w.shape)
        w.assign(value.astype(np.float32))
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    folded_model, _ = model_transformer.ModelTransformer(model, [FoldBatchNorm()]).transform()
    kinds = [type(layer).__name__ for layer in folded_model.layers]
    assert kinds == ["InputLayer", "FoldedBatchNorm", "ReLU", "FoldedBatchNorm", "Flatten", "FoldedBatchNorm"]
    allclose(folded_model(x, training=False), model(x, training=False).numpy(), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Rejected input


def test_rejects_what_does_not_fold():
    mac, bn, _, _ = float_pair("Conv2D", activation="relu")
    with pytest.raises(ValueError, match="linear activation.*Received: .*activation='relu'"):
        FoldedBatchNorm.from_layers(mac, bn)
    mac, bn, _, _ = float_pair("Conv2D")
    with pytest.raises(ValueError, match="must be built"):
        FoldedBatchNorm.from_layers(mac, keras.layers.BatchNormalization())
    wrong_axis = keras.layers.BatchNormalization(axis=1)
    wrong_axis.build((None, 4, 4, 4))
    with pytest.raises(ValueError, match="last \\(channel\\) axis"):
        FoldedBatchNorm.from_layers(mac, wrong_axis)
    wrong_channels = keras.layers.BatchNormalization()
    wrong_channels.build((None, 4, 4, 5))
    with pytest.raises(ValueError, match="one channel per output channel"):
        FoldedBatchNorm.from_layers(mac, wrong_channels)
    with pytest.raises(ValueError, match="BatchNormalization"):
        FoldedBatchNorm.from_layers(mac, keras.layers.LayerNormalization())
    with pytest.raises(ValueError, match="Conv2D, DepthwiseConv2D and Dense"):
        FoldedBatchNorm.from_layers(keras.layers.Flatten(), bn)
    depthwise, dbn, _, _ = float_pair("DepthwiseConv2D")
    with pytest.raises(ValueError, match="channel_ndims=2"):
        FoldedBatchNorm.from_layers(depthwise, dbn, weight_quantizer=BayesianBitsQuantizer())
    with pytest.raises(ValueError, match="signed"):
        FoldedBatchNorm.from_layers(mac, bn, weight_quantizer=BayesianBitsQuantizer(signed=False))
    with pytest.raises(TypeError, match="freeze_bn"):
        FoldedBatchNorm.from_layers(mac, bn, freeze_bn="yes")


def test_recalibrate_batch_norm_uses_the_test_time_gates():
    """The running statistics become those of the deterministic network on x: for the first unit, the mean and the
    unbiased variance of conv(x, W) + b over all of x (NumPy), with the gates as inference uses them."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(keras.layers.Conv2D(6, 3, name="c1")(inputs)))
    h = keras.layers.BatchNormalization(name="bn2")(keras.layers.Conv2D(4, 3, name="c2")(h))
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h)))
    q = bbits_tf.quantize_model(keras.Model(inputs, out))
    x = np.random.default_rng(0).normal(size=(40, 8, 8, 3)).astype(np.float32)
    bbits_tf.initialize_ranges(q, x)
    c1 = q.get_layer("quant_c1").layer
    c2 = q.get_layer("quant_c2").layer
    c2.moving_variance.assign(np.full(4, 50.0, np.float32))  # stale statistics
    q_out = {w.layer.name: v for w, role, _, v in bbits_tf.bayesian_bits_quantizers(q) if role == "activation"}
    q_out["c1"]["log_alpha"].assign([-6.0, -6.0, -6.0, -6.0])  # c1's output at 2 bits: c2's input changes
    before = q(x, training=False).numpy()
    assert folding.recalibrate_batch_norm(q, x, batch_size=16) == 2
    y = tf.nn.convolution(x, c1.kernel).numpy() + c1.bias.numpy()
    np.testing.assert_allclose(c1.moving_mean.numpy(), y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c1.moving_variance.numpy(), y.reshape(-1, 6).var(axis=0, ddof=1), rtol=1e-4)
    assert np.all(c2.moving_variance.numpy() < 50.0)
    assert c1._calibration is None and c2._calibration is None  # pylint: disable=protected-access
    after = q(x, training=False).numpy()
    assert np.all(np.isfinite(after)) and not np.allclose(after, before)
    # Nothing to do for a model without folded BatchNorm; too few images is an error.
    lenet = bbits_tf.quantize_model(bbits_tf.models.lenet5())
    assert folding.recalibrate_batch_norm(lenet, np.zeros((4, 28, 28, 1), np.float32)) == 0
    with pytest.raises(ValueError, match="at least 2 images"):
        folding.recalibrate_batch_norm(q, x[:1])


def tiny_bn_model():
    """tiny_model with a BatchNormalization after the conv (folded by quantize_model)."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 5, strides=3, use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, name="fc"),
    ], name="tiny_bn")


def test_run_recalibrates_folded_batch_norm_with_the_test_time_gates(mnist):
    from bbits_tf import training  # pylint: disable=import-outside-toplevel

    (x_train, y_train), (x_test, y_test) = mnist
    small_data = (x_train[:256], y_train[:256]), (x_test[:500], y_test[:500])
    lines = []
    recipe = training.Recipe(epochs=1, batch_size=32, lr_weights=1e-2)
    result = training.run(tiny_bn_model, recipe, small_data, seed=0, verbose=0, print_fn=lines.append)
    last = result.history[-1]
    assert 0.0 <= last["test_accuracy_before_bn_recalibration"] <= 1.0
    assert lines[-1].startswith("BatchNorm statistics recalibrated with the test-time gates on 256 training images")
    conv = result.model.get_layer("quant_conv").layer
    x = small_data[0][0]
    y = tf.nn.convolution(x, conv.kernel, strides=3).numpy()  # the first unit: its statistics over x exactly
    np.testing.assert_allclose(conv.moving_mean.numpy(), y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    acc = result.model.evaluate(*small_data[1], verbose=0, return_dict=True)["accuracy"]
    assert result.test_accuracy == last["test_accuracy"] == pytest.approx(acc)
    # Without folded BatchNorm nothing is added.
    def no_bn_model():
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 5, strides=3, activation="relu"),
                                 keras.layers.Flatten(), keras.layers.Dense(10)])

    plain = training.run(no_bn_model, recipe, small_data, seed=0, verbose=0, print_fn=None)
    assert "test_accuracy_before_bn_recalibration" not in plain.history[-1]
