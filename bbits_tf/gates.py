"""Stochastic gates, as pure functions (spec section 3).

A gate kind is three functions of ``log_alpha``: a training-time ``sample``, ``prob_nonzero`` (what the
regularizer charges), and the deterministic test-time gate ``deterministic``. Two kinds, chosen by value:

- ``"hard_concrete"`` (default): the L0 gate of Louizos et al. that Bayesian Bits uses,
  beta = 2/3 stretched to (gamma, zeta) = (-0.1, 1.1), test threshold P(z = 0) < 0.34.
- ``"gumbel_sigmoid"``: a binary-concrete (Gumbel-sigmoid) gate, the paper's ablation. It is not in the
  reference code; this follows the spec's proposal: ``z = sigmoid((log_alpha + logistic noise) / tau)`` with
  tau = 2/3, ``P(z != 0) = sigmoid(log_alpha)``, and ``z = 1`` at test time iff ``sigmoid(log_alpha) > 0.5``.
"""
import dataclasses
import math
from typing import Callable

import tensorflow as tf

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
THRESHOLD = 0.34
# log_alpha <= TRUNCATION switches a bit gate and every higher one off (spec 3.1, "hard truncation").
TRUNCATION = -2.0
_EPS = 1e-6
# Initial log_alpha of the bit gates z4, z8, z16, z32 in the MNIST recipe (spec 3.1): every tensor starts at
# 8 bits, gates 16 and 32 truncated; (6, 6, 6, 6) is the CIFAR recipe (32 bits).
DEFAULT_INIT_LOG_ALPHA = (6.0, 6.0, -6.0, -6.0)
# Initial log_alpha of the pruning gates z2 (gamma_2 in the reference code, hard-coded there).
PRUNE_INIT_LOG_ALPHA = 6.0
# beta * log(-gamma / zeta) = -1.598597...
_HC_SHIFT = BETA * math.log(-GAMMA / ZETA)
# The deterministic hard-concrete gate is 1 iff sigmoid(_HC_SHIFT - log_alpha) < THRESHOLD.
HC_LOG_ALPHA_THRESHOLD = _HC_SHIFT - math.log(THRESHOLD / (1.0 - THRESHOLD))  # = -0.935303


def _uniform(shape, seed=None):
    return tf.random.uniform(shape, _EPS, 1.0 - _EPS, dtype=tf.float32, seed=seed)


def hard_concrete_sample(log_alpha, seed=None):
    """One hard-concrete sample per element of ``log_alpha``, in [0, 1] (exactly 0 or 1 with mass)."""
    u = _uniform(tf.shape(log_alpha), seed)
    s = tf.sigmoid((tf.math.log(u) - tf.math.log(1.0 - u) + log_alpha) / BETA)
    return tf.clip_by_value(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_concrete_prob_nonzero(log_alpha):
    """P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)) = sigmoid(log_alpha + 1.598597)."""
    return tf.sigmoid(log_alpha - _HC_SHIFT)


def hard_concrete_deterministic(log_alpha):
    """Test-time gate: 1 iff P(z = 0) < 0.34, i.e. iff log_alpha > -0.935303."""
    p_zero = tf.sigmoid(_HC_SHIFT - log_alpha)
    return tf.cast(p_zero < THRESHOLD, tf.float32)


def gumbel_sigmoid_sample(log_alpha, seed=None, tau=BETA):
    """Binary-concrete sample ``sigmoid((log_alpha + log u - log(1-u)) / tau)``, in (0, 1)."""
    u = _uniform(tf.shape(log_alpha), seed)
    return tf.sigmoid((tf.math.log(u) - tf.math.log(1.0 - u) + log_alpha) / tau)


def gumbel_sigmoid_prob_nonzero(log_alpha):
    """Keep probability of the binary-concrete gate, ``sigmoid(log_alpha)``."""
    return tf.sigmoid(log_alpha)


def gumbel_sigmoid_deterministic(log_alpha):
    """Test-time gate: 1 iff sigmoid(log_alpha) > 0.5, i.e. iff log_alpha > 0."""
    return tf.cast(log_alpha > 0.0, tf.float32)


@dataclasses.dataclass(frozen=True)
class GateKind:
    """The three functions that define a gate kind."""

    name: str
    sample: Callable
    prob_nonzero: Callable
    deterministic: Callable
    # log_alpha above which the deterministic gate is 1; used by reports.
    log_alpha_threshold: float


GATE_KINDS = {
    "hard_concrete": GateKind(
        "hard_concrete",
        hard_concrete_sample,
        hard_concrete_prob_nonzero,
        hard_concrete_deterministic,
        HC_LOG_ALPHA_THRESHOLD,
    ),
    "gumbel_sigmoid": GateKind(
        "gumbel_sigmoid",
        gumbel_sigmoid_sample,
        gumbel_sigmoid_prob_nonzero,
        gumbel_sigmoid_deterministic,
        0.0,
    ),
}


def get_gate_kind(name):
    """Returns the ``GateKind`` called ``name``; raises ``ValueError`` for an unknown one."""
    if isinstance(name, GateKind):
        return name
    if name not in GATE_KINDS:
        raise ValueError(f"Unknown gate kind. Expected one of {sorted(GATE_KINDS)}. Received: gate={name!r}")
    return GATE_KINDS[name]


def truncation_mask(log_alpha):
    """1 for each bit gate before the first one with ``log_alpha <= -2``, 0 from there on.

    ``log_alpha`` holds the bit gates in increasing bit order (z4, z8, z16, z32). Once a gate falls to -2 it
    and every higher gate are exactly 0, in training and at test time (spec 3.1).
    """
    alive = tf.cast(log_alpha > TRUNCATION, tf.float32)
    return tf.math.cumprod(alive)


def chain_gates(log_alpha, kind, training, seed=None):
    """The bit gates (z4, z8, ...) of one quantizer: sampled in training, deterministic otherwise, truncated."""
    kind = get_gate_kind(kind)
    z = kind.sample(log_alpha, seed) if training else kind.deterministic(log_alpha)
    return z * truncation_mask(log_alpha)
