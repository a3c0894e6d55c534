"""Quantization math against NumPy references (spec 1.3-1.4)."""
import numpy as np
import pytest
import tensorflow as tf

from bbits_tf import ops

CHAIN = (2, 4, 8, 16, 32)


def direct_rounding(x, x_max, signed, bits):
    """NumPy reference: clip, then round onto the grid k * range / (2^b - 1) in float64."""
    hi = (1 - 1e-7) * x_max
    lo = -hi if signed else 0.0
    width = 2 * x_max if signed else x_max
    s = width / (2.0**bits - 1)
    return s * np.round(np.clip(x, lo, hi) / s)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n_open", [0, 1, 2, 3, 4])
def test_decomposition_equals_direct_rounding(signed, n_open):
    rng = np.random.default_rng(0)
    x = rng.normal(size=4096).astype(np.float32) * 1.3
    x_max = 2.0
    z = np.array([1.0] * n_open + [0.0] * (4 - n_open), np.float32)
    got = ops.quantize(x, x_max, signed, CHAIN, z).numpy()
    bits = CHAIN[n_open]
    want = direct_rounding(x.astype(np.float64), x_max, signed, bits)
    step = ((2 if signed else 1) * x_max) / (2.0**bits - 1)
    if bits <= 8:
        np.testing.assert_allclose(got, want, atol=1e-6 * x_max)
    else:
        # At 16 and 32 bits float32 cannot resolve every tie: at most one step off, and (at 16 bits) rarely.
        assert np.max(np.abs(got - want)) <= step + 1e-6
        if bits == 16:
            assert np.mean(np.abs(got - want) < 1e-6) > 0.999
    if bits <= 8:
        levels = np.unique(np.round(got / (((2 if signed else 1) * x_max) / (2**bits - 1))))
        assert len(levels) <= (2**bits - 1 if signed else 2**bits)


def test_two_bit_signed_grid_is_ternary():
    x = np.linspace(-5, 5, 1001).astype(np.float32)
    got = ops.quantize(x, 3.0, True, CHAIN, np.zeros(4, np.float32)).numpy()
    np.testing.assert_allclose(np.unique(got), [-2.0, 0.0, 2.0], rtol=1e-6)  # s_2 = 2*3/3 = 2


def test_unsigned_grids_have_2_to_the_b_levels():
    x = np.linspace(-1, 2, 20001).astype(np.float32)
    for n_open, bits in enumerate((2, 4, 8)):
        z = np.array([1.0] * n_open + [0.0] * (4 - n_open), np.float32)
        got = ops.quantize(x, 1.0, False, CHAIN, z).numpy()
        assert len(np.unique(np.round(got * (2**bits - 1)))) == 2**bits
        assert got.min() == 0.0


def test_edge_value_does_not_round_outside_the_grid():
    # x / s_2 = 1.5 exactly at x = x_max; the (1 - 1e-7) shrink keeps it at +1, never +2.
    got = ops.quantize(np.array([3.0, -3.0], np.float32), 3.0, True, (2,)).numpy()
    np.testing.assert_allclose(got, [2.0, -2.0])


def test_all_gates_closed_with_zero_z2_gives_zero():
    x = np.random.default_rng(1).normal(size=(3, 3, 2, 4)).astype(np.float32)
    q = ops.quantize(x, 1.0, True, CHAIN, np.zeros(4, np.float32)) * tf.zeros([4])
    assert np.count_nonzero(q.numpy()) == 0


def test_step_sizes_follow_the_chain():
    steps = [float(s) for s in ops.step_sizes(tf.constant(1.0), True, CHAIN)]
    np.testing.assert_allclose(steps, [2 / 3, 2 / 3 / 5, 2 / 3 / 5 / 17, 2 / 3 / 5 / 17 / 257, 2 / 3 / 5 / 17 / 257 / 65537])
    np.testing.assert_allclose(steps[2], 2 / 255, rtol=1e-6)  # s_b = range / (2^b - 1)


def test_ste_gradients():
    x = tf.constant([-5.0, -0.3, 0.2, 0.77, 5.0])
    x_max = tf.constant(1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, x_max])
        q = ops.quantize(x, x_max, True, CHAIN)
        first = q[0]
    # d q / d x = 1 inside the clip range, 0 outside.
    np.testing.assert_allclose(tape.gradient(q, x).numpy(), [0, 1, 1, 1, 0])
    # A clipped value moves with x_max: d q / d x_max = -(1 - 1e-7) at the lower edge.
    g = tape.gradient(first, x_max).numpy()
    np.testing.assert_allclose(g, -(1 - 1e-7), rtol=1e-5)


def test_round_ste_is_half_to_even():
    np.testing.assert_array_equal(ops.round_ste(tf.constant([0.5, 1.5, 2.5, -0.5])).numpy(), [0, 2, 2, -0])


@pytest.mark.parametrize("bad", [(), (3, 5), (2, 4, 8, 16, 32, 64), (0,), "abc"])
def test_bad_bit_widths_raise(bad):
    with pytest.raises(ValueError, match="bit_widths"):
        ops.validate_bit_widths(bad)


def test_bits_from_gates_and_expected_bits():
    assert ops.bits_from_gates([1, 1, 0, 0], CHAIN) == 8
    assert ops.bits_from_gates([0, 1, 1, 1], CHAIN) == 2
    assert ops.bits_from_gates([1, 1, 1, 1], CHAIN) == 32
    assert ops.expected_bits([1, 1, 0, 0], CHAIN) == 8
    # q4 = 0.5: half 2 bits, half 4 bits.
    assert ops.expected_bits([0.5, 0, 0, 0], CHAIN) == pytest.approx(3.0)
    assert ops.expected_bits([], (8,)) == 8


@pytest.mark.parametrize("signed", [True, False])
def test_fast_form_equals_the_residual_chain_values_and_gradients(signed):
    """``quantize`` (sum of direct roundings) equals the spec's x_2 + z4 (e_4 + z8 (e_8 + ...)) chain."""
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=2000).astype(np.float32))
    x_max = tf.constant(1.7)
    z = tf.constant([0.9, 0.4, 0.7, 0.2])
    upstream = tf.constant(rng.normal(size=2000).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, x_max, z])
        fast = tf.reduce_sum(upstream * ops.quantize(x, x_max, signed, CHAIN, z))
        x_c = ops.clip(x, x_max, signed)
        chain = ops.gated_sum(ops.residual_levels(x_c, ops.step_sizes(x_max, signed, CHAIN)), tf.unstack(z))
        ref = tf.reduce_sum(upstream * chain)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-5)
    for var in (x, x_max, z):
        np.testing.assert_allclose(tape.gradient(fast, var).numpy(), tape.gradient(ref, var).numpy(), rtol=2e-3, atol=2e-3)


def test_truncated_levels_are_skipped_but_equal():
    x = tf.constant(np.linspace(-2, 2, 101).astype(np.float32))
    z = tf.constant([1.0, 1.0, 0.0, 0.0])
    alive = tf.constant([True, True, False, False])
    np.testing.assert_array_equal(
        ops.quantize(x, 1.5, True, CHAIN, z, alive).numpy(), ops.quantize(x, 1.5, True, CHAIN, z).numpy()
    )


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("alive", [None, (True, True, False, False), (False, False, False, False)])
def test_written_out_gradient_equals_the_traced_one(signed, alive):
    """``quantize``'s hand-written gradient == TensorFlow's gradient of the same expression (``quantize_traced``),
    for x, x_max and the gate values, with clipped values, values on the clip edges and truncated levels."""
    rng = np.random.default_rng(7)
    x_max = tf.constant(1.3)
    edge = float(ops.CLIP_SHRINK * 1.3)
    x = tf.constant(np.concatenate([rng.normal(scale=1.2, size=3000), [edge, -edge, 0.0, 5.0, -5.0]]).astype(np.float32))
    z = tf.constant([0.8, 0.3, 0.6, 0.5]) if alive is None else tf.constant([0.8, 0.3, 0.0, 0.0])
    if alive == (False, False, False, False):
        z = tf.zeros([4])
    mask = None if alive is None else tf.constant(alive)
    upstream = tf.constant(rng.normal(size=x.shape[0]).astype(np.float32))
    results = []
    for fn in (ops.quantize, ops.quantize_traced):
        with tf.GradientTape() as tape:
            tape.watch([x, x_max, z])
            loss = tf.reduce_sum(upstream * fn(x, x_max, signed, CHAIN, z, mask))
        results.append((loss.numpy(), *[g.numpy() for g in tape.gradient(loss, [x, x_max, z])]))
    (loss, dx, dx_max, dz), (ref_loss, ref_dx, ref_dx_max, ref_dz) = results
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(dx[-2:]) == 0  # clipped values pass no gradient to x
    np.testing.assert_allclose(dx_max, ref_dx_max, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dz, ref_dz, rtol=1e-4, atol=1e-3)


def test_written_out_gradient_inside_a_tf_function():
    x = tf.constant(np.linspace(-2, 2, 257).astype(np.float32))

    @tf.function
    def grads(x_max, z, alive):
        with tf.GradientTape() as tape:
            tape.watch([x_max, z])
            loss = tf.reduce_sum(tf.sin(x) * ops.quantize(x, x_max, True, CHAIN, z, alive))
        return tape.gradient(loss, [x_max, z])

    def traced(x_max, z, alive):
        with tf.GradientTape() as tape:
            tape.watch([x_max, z])
            loss = tf.reduce_sum(tf.sin(x) * ops.quantize_traced(x, x_max, True, CHAIN, z, alive))
        return tape.gradient(loss, [x_max, z])

    for alive in ([True, True, True, False], [True, False, False, False]):
        args = (tf.constant(1.5), tf.constant([0.9, 0.7, 0.4, 0.0]), tf.constant(alive))
        for got, want in zip(grads(*args), traced(*args)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [(1,), (1, 2), (1, 2, 4), (2.5, 5), b"248", 8])
def test_bit_width_1_and_non_sequences_are_rejected(bad):
    # At 1 bit the symmetric grid (2^b - 1 levels) is the single level 0: every weight would become 0.
    with pytest.raises(ValueError, match="bit_widths"):
        ops.validate_bit_widths(bad)


@pytest.mark.parametrize("bits", [(2,), (2, 4), (2, 4, 8), (8,)])
def test_clipped_values_stay_on_the_grid(bits):
    # For this x_max the chained 8-bit step makes (1 - 1e-7) * x_max / s_8 round to 128 in float32 (about 5 % of
    # x_max values do): without clipping the codes, clipped weights sat one step beyond the 255-level grid, where
    # the exported int8 tensor cannot follow them.
    x_max = np.float32(2.6695685)
    x = tf.constant([-10.0, -x_max, -1.0, 0.3, x_max, 10.0], tf.float32)
    out = ops.quantize(x, x_max, True, bits).numpy()
    step = 2.0 * x_max / (2.0 ** bits[-1] - 1.0)
    codes = np.round(out / step)
    top = 2 ** (bits[-1] - 1) - 1
    assert codes.max() == top and codes.min() == -top
    np.testing.assert_allclose(out / step, codes, atol=1e-3)  # on the grid
    traced = ops.quantize_traced(x, x_max, True, bits).numpy()
    np.testing.assert_array_equal(out, traced)


def test_code_limits():
    assert ops.code_limits(True, (2, 4, 8)) == [(-1.0, 1.0), (-7.0, 7.0), (-127.0, 127.0)]
    assert ops.code_limits(False, (2, 8)) == [(0.0, 3.0), (0.0, 255.0)]
