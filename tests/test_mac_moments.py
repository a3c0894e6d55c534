"""``folding.mac_moments``: a folded unit's batch statistics, from its input's moments for pointwise layers with more
outputs than inputs, against the statistics of the layer's output (values and gradients)."""
import numpy as np
import pytest
import tensorflow as tf

from bbits_tf import folding


def _moments_and_grads(fn, x, kernel, bias):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel, bias])
        mean, variance, count = fn()
        loss = tf.reduce_sum(mean * tf.range(1.0, mean.shape[0] + 1)) + tf.reduce_sum(tf.sqrt(variance + 1e-3))
    return [mean.numpy(), variance.numpy(), float(count)] + [g.numpy() for g in tape.gradient(loss, [x, kernel, bias])]


@pytest.mark.parametrize("kind, x_shape, k_shape, strides, padding", [
    ("Conv2D", (4, 7, 7, 3), (1, 1, 3, 18), (1, 1), "valid"),   # an expansion: from the input's covariance
    ("Conv2D", (4, 7, 7, 3), (1, 1, 3, 18), (2, 2), "same"),    # strided: every other position
    ("Dense", (16, 5), (5, 12), None, None),
    ("Conv2D", (4, 7, 7, 6), (1, 1, 6, 4), (1, 1), "same"),     # a projection: the output's moments, as before
    ("Conv2D", (4, 7, 7, 3), (3, 3, 3, 8), (1, 1), "same"),     # not pointwise
])
def test_mac_moments_match_the_moments_of_the_output(kind, x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0.5, 1.0, x_shape), tf.float32)  # non-zero mean: the centring matters
    kernel = tf.constant(rng.normal(0.0, 0.5, k_shape), tf.float32)
    bias = tf.constant(rng.normal(0.0, 1.0, k_shape[-1]), tf.float32)
    conv = {} if kind == "Dense" else dict(strides=strides, padding=padding)

    def direct():
        return folding.batch_moments(folding.mac(kind, x, kernel, **conv) + bias)

    got = _moments_and_grads(lambda: folding.mac_moments(kind, x, kernel, bias, **conv), x, kernel, bias)
    want = _moments_and_grads(direct, x, kernel, bias)
    assert got[2] == want[2]  # count: positions of the output
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
