"""Quantization math of Bayesian Bits, as pure functions (spec section 1).

Forward function of the gated residual quantizer, for ``bit_widths = (2, 4, 8, 16, 32)``::

    x_c  = clip(x, lo, hi),  hi = (1 - 1e-7) * x_max,  lo = -hi (signed) or 0 (unsigned)
    s_2  = (hi_range - lo_range) / (2^2 - 1),  s_4 = s_2 / (2^2 + 1),  s_8 = s_4 / (2^4 + 1), ...
    x_2  = s_2 * R(x_c / s_2),  e_4 = s_4 * R((x_c - x_2) / s_4),  e_8 = s_8 * R((x_c - x_2 - e_4) / s_8), ...
    x_q  = z_2 * (x_2 + z_4 * (e_4 + z_8 * (e_8 + z_16 * (e_16 + z_32 * e_32))))

``R`` rounds half to even in the forward pass; its gradient is the identity (straight-through estimator).
The decomposition reproduces direct b-bit rounding on the grid ``k * s_b`` exactly.

Any chain of doubling bit widths works: ``(8,)`` is a fixed 8-bit quantizer, ``(4, 8)`` starts at 4 bits.
All math runs in float32. Where the fused C++ op can be built (``bbits_tf.kernels``), ``quantize`` runs as one
op forward and one backward; elsewhere as the TensorFlow graph ``_fused_quantize``: same values and gradients.
"""
import tensorflow as tf

from bbits_tf import kernels

CLIP_SHRINK = 1.0 - 1e-7
MIN_X_MAX = 1e-8


def validate_bit_widths(bit_widths):
    """Checks that ``bit_widths`` is a non-empty chain of doubling widths of at least 2 bits; returns a tuple.

    Bit width 1 is rejected: the symmetric grid of this quantizer has ``2^b - 1`` levels, which at one bit is
    the single level 0 (every value would quantize to 0). The authors' binary grid ({-s, 0} / {0, s}) is not
    implemented.
    """
    if isinstance(bit_widths, (str, bytes)) or not hasattr(bit_widths, "__iter__"):
        raise ValueError(
            f"`bit_widths` must be a sequence of ints such as (2, 4, 8, 16, 32). Received: bit_widths={bit_widths!r}"
        )
    try:
        as_ints = tuple(int(b) for b in bit_widths)
        exact = all(int(b) == b for b in bit_widths)
    except (TypeError, ValueError):
        raise ValueError(f"`bit_widths` must be a sequence of ints. Received: bit_widths={bit_widths!r}") from None
    if not exact:
        raise ValueError(f"`bit_widths` must be whole numbers. Received: bit_widths={tuple(bit_widths)!r}")
    bit_widths = as_ints
    if not bit_widths or bit_widths[0] < 2:
        raise ValueError(
            "`bit_widths` must start with a width >= 2 (at 1 bit the symmetric grid has the single level 0 and "
            f"every weight would become 0). Received: bit_widths={bit_widths!r}"
        )
    for lower, upper in zip(bit_widths, bit_widths[1:]):
        if upper != 2 * lower:
            raise ValueError(
                "Each entry of `bit_widths` must double the previous one, e.g. (2, 4, 8, 16, 32). "
                f"Received: bit_widths={bit_widths!r}"
            )
    if bit_widths[-1] > 32:
        raise ValueError(f"`bit_widths` cannot exceed 32 bits. Received: bit_widths={bit_widths!r}")
    return bit_widths


@tf.custom_gradient
def round_ste(v):
    """``round`` (half to even) in the forward pass, identity gradient in the backward pass."""
    return tf.round(v), lambda dy: dy


def code_limits(signed, bit_widths):
    """``[(lo, hi)]``: the integer codes of each level's grid, ``+-(2^(b-1) - 1)`` (signed, ``2^b - 1`` levels) or
    ``[0, 2^b - 1]`` (unsigned).

    ``round(x_c / s_b)`` can land one code beyond them for a clipped value: the ``1 - 1e-7`` clip shrink is below
    float32's resolution once ``s_b`` is built by chained divisions, so ``(1 - 1e-7) * 127.5`` can come out as
    127.5 or more and round to 128. Every rounding is clipped to these codes, so the model's values lie exactly
    on the grid that the exported integer tensors can hold.
    """
    if signed:
        return [(-(2.0 ** (b - 1) - 1.0), 2.0 ** (b - 1) - 1.0) for b in bit_widths]
    return [(0.0, 2.0 ** b - 1.0) for b in bit_widths]


@tf.custom_gradient
def round_code_ste(v, lo, hi):
    """``clip(round(v), lo, hi)`` in the forward pass, identity gradient for ``v`` (the clip only removes float
    rounding at the grid's edge)."""
    return tf.clip_by_value(tf.round(v), lo, hi), lambda dy: (dy, None, None)


def clip(x, x_max, signed):
    """Clips ``x`` to ``[-hi, hi]`` (signed) or ``[0, hi]`` (unsigned), ``hi = (1 - 1e-7) * x_max``.

    Built from min/max so the gradient w.r.t. ``x`` is 1 inside the range and 0 outside, and ``x_max`` gets
    the gradient of the clipped values.
    """
    hi = CLIP_SHRINK * x_max
    lo = -hi if signed else tf.zeros_like(hi)
    return tf.maximum(tf.minimum(x, hi), lo)


def step_sizes(x_max, signed, bit_widths):
    """Step size of every level: ``s_b0 = range / (2^b0 - 1)``, then ``s_2b = s_b / (2^b + 1)``.

    ``range`` is ``2 * x_max`` (signed) or ``x_max`` (unsigned). Equivalently ``s_b = range / (2^b - 1)``.
    """
    width = 2.0 * x_max if signed else x_max
    steps = [width / (2.0 ** bit_widths[0] - 1.0)]
    for lower in bit_widths[:-1]:
        steps.append(steps[-1] / (2.0 ** lower + 1.0))
    return steps


def int8_refinement(bits):
    """The power of two ``f`` by which a signed b-bit grid can be made finer and still fit int8: the largest
    ``f = 2^j`` with ``(2^(b-1) - 1) f <= 127`` (2 bits: 64, 4 bits: 16, 8 bits and more: 1).

    ``tflite_export`` stores <= 4-bit weights as INT8 codes ``k f`` at scale ``s_w / f``, which makes the int32
    bias grid ``s_in s_w / f``; the model computes its inference bias on that grid
    (``BayesianBitsQuantizer.bias_on_grid``). Powers of two, so that a grid refined further (a refined input
    scale, ``tflite_export``) still holds the model's bias exactly.
    """
    top = 2 ** (int(bits) - 1) - 1
    factor = 1
    while top * factor * 2 <= 127:
        factor *= 2
    return factor


def residual_levels(x_c, steps, round_fn=round_ste):
    """The base term and the residual terms ``[x_b0, e_b1, e_b2, ...]`` of an already clipped tensor."""
    levels = []
    remainder = x_c
    for s in steps:
        term = s * round_fn(remainder / s)
        levels.append(term)
        remainder = remainder - term
    return levels


def gated_sum(levels, z_bits):
    """``levels[0] + z[0] * (levels[1] + z[1] * (levels[2] + ...))``, for scalar bit gates ``z_bits``."""
    out = levels[-1]
    for i in range(len(levels) - 2, -1, -1):
        out = levels[i] + z_bits[i] * out
    return out


def quantize(x, x_max, signed, bit_widths, z_bits=None, alive=None):
    """Quantizes ``x`` with the residual decomposition; ``z_bits=None`` means every bit gate open.

    ``alive`` (optional, one bool per residual gate) marks the gates that are not truncated; a truncated
    gate's level and every level above it are exactly 0 and are not computed (nested ``tf.cond``).

    ``x_2 + z4 (e_4 + z8 (e_8 + ...)) = sum_n c_n R_n`` with ``R_n = s_n round(x_c / s_n)`` the direct rounding at
    level n (the residual decomposition reproduces it exactly, spec 1.4) and scalar weights
    ``c_n = z_1 ... z_n (1 - z_n+1)``: same forward value and same straight-through gradients as the chain, with
    one tensor-sized rounding per level. The gradient is written out (``_fused_quantize``) rather than traced.
    """
    x_max = tf.maximum(tf.cast(x_max, tf.float32), MIN_X_MAX)
    x = tf.convert_to_tensor(tf.cast(x, tf.float32))
    coefs, on = level_weights(z_bits, alive, len(bit_widths) - 1)
    if kernels.enabled() and not kernels.in_xla_context():
        return _kernel_quantize(x, x_max, coefs, bool(signed), tuple(bit_widths), alive)
    return _fused_quantize(x, x_max, coefs, bool(signed), tuple(bit_widths), on)


def level_weights(z_bits, alive, n_gates):
    """``(c, on)``: the scalar weight ``c_n = z_1 ... z_n (1 - z_n+1)`` of every level as one tensor, and ``alive``
    unstacked (``None`` without it). A level that is not computed (a truncated gate below it) gets weight 0."""
    if z_bits is None:
        z_bits = tf.ones([n_gates], tf.float32)
    z = tf.unstack(z_bits, num=n_gates) if n_gates else []
    on = tuple(tf.unstack(alive, num=n_gates)) if alive is not None and n_gates else None
    reach, coefs = tf.constant(1.0), []
    for n in range(n_gates + 1):
        stay = z[n] if n < n_gates else 0.0
        coefs.append(reach * (1.0 - stay))
        reach = reach * stay if n < n_gates else reach
    coefs = tf.stack(coefs)
    if on is not None:  # its gate and those above are 0 anyway
        coefs = coefs * tf.concat([[1.0], tf.math.cumprod(tf.cast(tf.stack(on), tf.float32))], 0)
    return coefs, on


def _nested_sum(on, n_levels, term):
    """``term(0) + (term(1) + (...))`` where level n+1 and above are only computed if ``on[n]``: a skipped tail
    costs one tensor of zeros."""
    def from_level(n):
        value = term(n)
        if n == n_levels - 1:
            return value
        if on is None:
            return value + from_level(n + 1)
        return value + tf.cond(on[n], lambda: from_level(n + 1), lambda: tf.zeros_like(value))

    return from_level(0)


def _levels(on, n_levels, fn):
    """``[fn(0), fn(1), ...]`` where level n+1 is only computed if ``on[n]`` (zeros otherwise). Used for the
    per-level scalars of the backward pass, where a skipped level costs a scalar."""
    def from_level(n):
        value = fn(n)
        if n == n_levels - 1:
            return [value]
        if on is None:
            return [value] + from_level(n + 1)
        skipped = n_levels - 1 - n
        return [value] + tf.cond(on[n], lambda: from_level(n + 1), lambda: [tf.zeros_like(value)] * skipped)

    return from_level(0)


def _fused_quantize(x, x_max, coefs, signed, bit_widths, on):
    """``sum_n coefs[n] * s_n * R_n`` with ``R_n = round(clip(x) / s_n)`` clipped to the level's integer codes
    (``code_limits``), with straight-through gradients, written out.

    The traced gradient of the same expression (kept in ``residual_levels``/``gated_sum`` and tested equal) costs
    about two tensor-sized products, a division and two reductions per level; the written-out one needs one
    product-and-sum per level. With ``x_c = clip(x)``, ``R_n = round(x_c / s_n)``, ``s_n = k_n x_max``, upstream
    ``g``: ``dx = g * sum(c) * [lo <= x <= hi]``; ``dc_n = s_n sum(g R_n)``; ``dx_max = sum_n c_n (s_n sum(g R_n)
    - sum(g x_c)) / x_max`` plus the clipped values' ``+-(1 - 1e-7) sum(g sum(c))`` (as ``tf.minimum``/``maximum``
    route it: ties go to ``x``).
    """
    n_levels = len(bit_widths)
    limits = code_limits(signed, bit_widths)

    @tf.custom_gradient
    def fused(x, x_max, coefs):
        hi = CLIP_SHRINK * x_max
        lo = -hi if signed else tf.zeros_like(hi)
        x_c = tf.maximum(tf.minimum(x, hi), lo)
        steps = step_sizes(x_max, signed, bit_widths)
        c = tf.unstack(coefs, num=n_levels)

        def code(n):
            return tf.clip_by_value(tf.round(x_c / steps[n]), *limits[n])

        out = _nested_sum(on, n_levels, lambda n: (c[n] * steps[n]) * code(n))

        def grad(g):
            total = tf.reduce_sum(coefs)
            g_c = g * total
            dx = tf.where((x <= hi) & (x >= lo), g_c, tf.zeros_like(g_c))
            # R_n is recomputed: carrying it out of the forward pass's tf.cond would cost a tensor of zeros per
            # skipped level, where the forward pass needs one for the whole skipped tail.
            g_r = _levels(on, n_levels, lambda n: tf.reduce_sum(g * code(n)))
            dcoefs = tf.stack([steps[n] * g_r[n] for n in range(n_levels)])
            g_x = tf.reduce_sum(g * x_c)
            dx_max = tf.add_n([c[n] * (steps[n] * g_r[n] - g_x) for n in range(n_levels)]) / x_max
            dx_max += CLIP_SHRINK * tf.reduce_sum(tf.where(x > hi, g_c, tf.zeros_like(g_c)))
            if signed:
                dx_max -= CLIP_SHRINK * tf.reduce_sum(tf.where(x < lo, g_c, tf.zeros_like(g_c)))
            return dx, dx_max, dcoefs

        return out, grad

    return fused(x, x_max, coefs)


def _kernel_quantize(x, x_max, coefs, signed, bit_widths, alive):
    """``_fused_quantize`` as the C++ ops of ``bbits_tf.kernels``: one pass over the tensor forward (all levels up
    to the first truncated gate, summed in the graph's order: same float32 bits) and one backward, which returns
    the input gradient and the per-level sums ``sum(g R_n)``, ``sum(g x_c)`` and the clipped values' ``sum(g)``;
    the scalar gradients of ``x_max`` and the level weights are then formed here as in ``_fused_quantize``."""
    lib = kernels.library()
    n_levels = len(bit_widths)
    attrs = {"signed": signed, "bit_widths": list(bit_widths)}
    alive = (tf.ones([n_levels - 1], tf.bool) if alive is None
             else tf.reshape(tf.cast(alive, tf.bool), [n_levels - 1]))
    x_max = tf.reshape(x_max, [])

    @tf.custom_gradient
    def fused(x, x_max, coefs):
        out = lib.bbits_quantize(x, x_max, coefs, alive, **attrs)

        def grad(g):
            total = tf.reduce_sum(coefs)
            dx, sums = lib.bbits_quantize_grad(tf.cast(g, tf.float32), x, x_max, alive, total, **attrs)
            s = tf.unstack(sums, num=n_levels + 3)
            c = tf.unstack(coefs, num=n_levels)
            steps = step_sizes(x_max, signed, bit_widths)
            dcoefs = tf.stack([steps[n] * s[n] for n in range(n_levels)])
            g_x = s[n_levels]
            dx_max = tf.add_n([c[n] * (steps[n] * s[n] - g_x) for n in range(n_levels)]) / x_max
            dx_max += CLIP_SHRINK * total * s[n_levels + 1]
            if signed:
                dx_max -= CLIP_SHRINK * total * s[n_levels + 2]
            return dx, dx_max, dcoefs

        return out, grad

    return fused(x, x_max, coefs)


def quantize_traced(x, x_max, signed, bit_widths, z_bits=None, alive=None):
    """``quantize`` with TensorFlow's traced gradient (the previous implementation; reference and benchmark).

    ``alive`` (optional, one bool per residual gate) marks the gates that are not truncated; a truncated
    gate's level and every level above it are exactly 0 and are not computed (nested ``tf.cond``).
    """
    x_max = tf.maximum(tf.cast(x_max, tf.float32), MIN_X_MAX)
    x_c = clip(tf.cast(x, tf.float32), x_max, signed)
    coefs, on = level_weights(z_bits, alive, len(bit_widths) - 1)
    c = tf.unstack(coefs, num=len(bit_widths))
    steps = step_sizes(x_max, signed, bit_widths)
    limits = code_limits(signed, bit_widths)
    return _nested_sum(on, len(bit_widths),
                       lambda n: (c[n] * steps[n]) * round_code_ste(x_c / steps[n], *limits[n]))


def bits_from_gates(z_bits, bit_widths):
    """The bit width that deterministic gates select: ``bit_widths[n]`` with n the count of leading open gates."""
    n = 0
    for z in z_bits:
        if z <= 0:
            break
        n += 1
    return bit_widths[n]


def expected_bits(q_bits, bit_widths):
    """Expected bit width ``sum_n bit_widths[n] * P(chain stops at n)`` from (truncated) keep probabilities."""
    expected, reach = 0.0, 1.0
    for n, b in enumerate(bit_widths):
        stay = q_bits[n] if n < len(q_bits) else 0.0
        expected += b * reach * (1.0 - stay)
        reach *= stay
    return expected
