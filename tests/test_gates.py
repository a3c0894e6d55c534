"""Gate math against the spec's constants (spec 3.1)."""
import math

import numpy as np
import pytest
import tensorflow as tf

from bbits_tf import gates


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_hard_concrete_prob_nonzero():
    la = np.linspace(-8, 8, 33).astype(np.float32)
    np.testing.assert_allclose(gates.hard_concrete_prob_nonzero(la).numpy(), sigmoid(la + 1.598597), rtol=1e-5)
    assert gates.hard_concrete_prob_nonzero(tf.constant(6.0)).numpy() == pytest.approx(0.9995, abs=1e-4)


def test_deterministic_gate_flips_at_minus_0_9353():
    assert gates.HC_LOG_ALPHA_THRESHOLD == pytest.approx(-0.935303, abs=1e-6)
    z = gates.hard_concrete_deterministic(tf.constant([-0.9363, -0.9343, 6.0, -6.0])).numpy()
    np.testing.assert_array_equal(z, [0, 1, 1, 0])


def test_samples_lie_in_unit_interval_with_mass_at_the_ends():
    tf.random.set_seed(0)
    z = gates.hard_concrete_sample(tf.fill([20000], 0.0)).numpy()
    assert z.min() >= 0.0 and z.max() <= 1.0
    # P(z = 0) at log_alpha 0 is sigmoid(-1.598597) = 0.168; same for z = 1 by symmetry.
    assert np.mean(z == 0.0) == pytest.approx(sigmoid(-1.598597), abs=0.01)
    assert np.mean(z == 1.0) == pytest.approx(sigmoid(-1.598597), abs=0.01)
    # P(z = 1) at log_alpha 6 is sigmoid(6 - (2/3) ln 11) = 0.988.
    z6 = gates.hard_concrete_sample(tf.fill([20000], 6.0)).numpy()
    assert np.mean(z6 == 1.0) == pytest.approx(sigmoid(6 - 2 / 3 * math.log(11)), abs=0.005)


def test_gumbel_sigmoid_gate():
    z = gates.gumbel_sigmoid_sample(tf.fill([5000], 0.5)).numpy()
    assert 0.0 <= z.min() and z.max() <= 1.0 and 0.55 < np.mean(z) < 0.65
    np.testing.assert_allclose(gates.gumbel_sigmoid_prob_nonzero(tf.constant([0.0, 2.0])).numpy(), [0.5, sigmoid(2.0)], rtol=1e-6)
    np.testing.assert_array_equal(gates.gumbel_sigmoid_deterministic(tf.constant([-0.1, 0.1])).numpy(), [0, 1])


def test_truncation_switches_off_the_gate_and_every_higher_one():
    mask = gates.truncation_mask(tf.constant([6.0, -2.0, 6.0, 6.0])).numpy()
    np.testing.assert_array_equal(mask, [1, 0, 0, 0])
    mask = gates.truncation_mask(tf.constant([6.0, 6.0, -6.0, -6.0])).numpy()
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])
    # Truncated gates are exactly 0 even when sampled.
    z = gates.chain_gates(tf.constant([6.0, -2.5, 50.0, 50.0]), "hard_concrete", training=True).numpy()
    np.testing.assert_array_equal(z[1:], [0, 0, 0])
    # -1.9 is not truncated: deterministic gate 0 (below -0.935) but a later gate is not forced off by it.
    np.testing.assert_array_equal(gates.truncation_mask(tf.constant([-1.9, 6.0])).numpy(), [1, 1])


def test_unknown_gate_kind_raises():
    with pytest.raises(ValueError, match="Received: gate='gumbel'"):
        gates.get_gate_kind("gumbel")
