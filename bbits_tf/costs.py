"""The prior under a deployment cost: each gate pays its share of the file's bytes or of the arena (issue 11).

Spec section 4 charges quantizer k, per level j its chain reaches, ``lambda_j = mu * c_k * b_j``: the BOPs that
level adds, in units of the largest layer's MACs, so the prior is a KL to an autoregressive prior whose gate j
closes with a cost ``lambda_j``. ``quantize_model(cost="flash" | "arena")`` keeps that form and puts the
deployment cost in place of ``c_k * b_j``: level j of a weight quantizer is charged what opening it adds to the
exported model (``l_j`` bytes), its pruning gates the bytes of a kept channel at the base width (``l_0``)::

    R_k = mean_c(q2_c) * (l_0 + l_1 q_1 + l_2 q_1 q_2 + ...)        (with pruning; l_0 + ... without)

With every probability 0 or 1 and the other layers fixed, ``sum_k s * R_k`` is the cost (``s``: the scale
below), and its expectation under independent gates, in which a level's charge is its *increment* (e.g. flash:
8-bit Dense weights add ``n_w * (1 - 0.5)`` bytes a channel over 4 bits, which the INT4 file already stores as 2
bits: ``l`` is 0 for the 4-bit level). Deviations from a literal cost, as in the spec's BOP prior: each tensor is
charged with the other tensors at their current state (a pruned input channel's weights are charged to the
producer's gates only through the current consumer counts), and:

- ``"flash"``: weights at their stored width (``bbits_tf.flash``) plus 4 bytes of int32 bias per kept channel;
  activation gates cost nothing (every activation is int8 in the file).
- ``"flash+arena"``: both, the arena's charges weighted so that the two priors are equal at quantization: the
  exporter's INT4/INT8 choice for a Dense layer (its 8-bit level) is then a trade between the file (INT8 doubles
  the layer's bytes) and the arena (INT4 is unpacked into it), for a run with a flash and an arena limit.
- ``"arena"``: the maximum over operators is charged as a smooth maximum: each operator t gets the weight
  ``softmax((bytes_t - peak) / (0.05 * peak))`` and every live tensor's pruning gates pay its bytes per channel
  times that weight; an INT4 Dense layer's bit gates pay its unpacked scratch (1 byte per weight at <= 4 bits,
  so opening 8 bits *lowers* the arena: ``l`` is negative there) with the weight its operator would have with the
  scratch; a convolution's channel pays TFLM's 8 persistent bytes. ``set_prior`` re-linearises from the current
  gates (``bbits_tf.budget.Budget`` calls it as the peak moves).

The scale ``s`` makes the prior at quantization time equal in size to the spec's BOP prior there, so the same
``mu`` puts the same pressure on the gates at the start whatever the cost; ``mu`` then sets the exchange rate
between cross-entropy and bytes. The quantizer's ``level_costs`` variable holds ``l / s``.
"""
import numpy as np
import tensorflow as tf

from bbits_tf import arena as arena_lib
from bbits_tf import bops as bops_lib
from bbits_tf import flash as flash_lib
from bbits_tf import gates as gates_lib
from bbits_tf import graph
from bbits_tf import latency as latency_lib
from bbits_tf.quantizers import COSTS

DEPLOYMENT_COSTS = tuple(c for c in COSTS if c != "bops")
_SOFTMAX_TEMPERATURE = 0.05


def check_cost(cost):
    """``cost`` as a name: one of ``COSTS``, or ``"latency"`` for a latency table (``bbits_tf.latency``)."""
    if isinstance(cost, (dict, latency_lib.LatencyTable)):
        return "latency"
    if cost not in COSTS or cost == "latency":
        raise ValueError(f"`cost` must be one of {tuple(c for c in COSTS if c != 'latency')} or a latency table "
                         "(`tflite_export.profile_latency(model)`'s data or a `bbits_tf.latency.LatencyTable`). "
                         f"Received: cost={cost!r}")
    return cost


def model_cost(model):
    """The cost a quantized model's prior charges (``"bops"``, ``"flash"`` or ``"arena"``)."""
    costs = {q.cost for _, _, q, _ in _quantizers(model)}
    return costs.pop() if len(costs) == 1 else "bops"


def _quantizers(model):
    from bbits_tf.quantize import bayesian_bits_quantizers  # pylint: disable=import-outside-toplevel
    return bayesian_bits_quantizers(model)


def _per_channel_weights(record):
    """Kept weights per output channel at the current (expected) input channels."""
    per_channel = float(np.prod(graph.kernel_shape(record.layer))) / record.total_out
    if graph.mac_kind(record.layer) == "DepthwiseConv2D":
        return per_channel  # a depthwise channel reads its own input channel only
    return per_channel * record.kept_in / max(record.total_in, 1)


def _increments(bit_widths, per_bits):
    values = [per_bits(b) for b in bit_widths]
    return np.array([values[0]] + [values[j] - values[j - 1] for j in range(1, len(values))])


def flash_level_costs(model, int4=flash_lib.DEFAULT_INT4):
    """``{(wrapper name, role): bytes per level}`` of the flash prior (before scaling)."""
    state = flash_lib.weight_state(model)
    out = {}
    for r in bops_lib.layer_bops(model, expected=True):
        quantizer, _ = state[r.layer.name]
        n_w, int4_layer = _per_channel_weights(r), flash_lib.is_int4_layer(r.layer, int4)
        levels = _increments(quantizer.bit_widths, lambda b: n_w * flash_lib.stored_bytes_per_weight(b, int4_layer))
        levels[0] += flash_lib.BIAS_BYTES if flash_lib.has_bias(r.layer) else 0.0
        out[(r.layer.name, "weight")] = levels * r.total_out
    return out


def arena_level_costs(model, int4=flash_lib.DEFAULT_INT4):
    """``{(wrapper name, role): bytes per level}`` of the arena prior (before scaling), at the current gates."""
    records = {r.layer.name: r for r in bops_lib.layer_bops(model, expected=True)}
    state = flash_lib.weight_state(model)
    plan = arena_lib.plan(model, expected=True, int4=int4)
    values = np.array([op.bytes for op in plan.operators])
    temperature = _SOFTMAX_TEMPERATURE * max(values.max(), 1.0)
    exps = np.exp((values - values.max()) / temperature)
    weights = exps / exps.sum()
    out = {(name, "weight"): np.zeros(len(state[name][0].bit_widths)) for name in records}
    for op, w, e in zip(plan.operators, weights, exps):
        for buf in op.live:
            if buf.owner is not None:
                out[(buf.owner.name, "weight")][0] += w * buf.per_channel * records[buf.owner.name].total_out
        r = records.get(getattr(op.layer, "name", None))
        if r is not None and flash_lib.is_int4_layer(r.layer, int4):
            n_w = _per_channel_weights(r)
            full = op.live_bytes + n_w * r.kept_out  # the operator's bytes if the layer were INT4
            share = 1.0 / (1.0 + (exps.sum() - e) * np.exp((values.max() - full) / temperature))
            out[(r.layer.name, "weight")] += share * r.total_out * _increments(
                state[r.layer.name][0].bit_widths, lambda b: n_w if b <= 4 else 0.0)
    for name, r in records.items():
        if graph.mac_kind(r.layer) != "Dense":
            out[(name, "weight")][0] += arena_lib.PERSISTENT_BYTES_PER_CHANNEL * r.total_out
    return out


def _prior_value(quantizer, variables, costs):
    """``R_k`` (numpy) with the given level costs, at the current gate probabilities."""
    kind = gates_lib.get_gate_kind(quantizer.gate)
    q = kind.prob_nonzero(tf.convert_to_tensor(variables["log_alpha"])).numpy() if quantizer.num_gates else []
    reach = np.concatenate([[1.0], np.cumprod(q)])
    chain = float(np.dot(costs[1:], reach[1:]))
    if quantizer.prune:
        keep = float(np.mean(kind.prob_nonzero(tf.convert_to_tensor(quantizer.gate_variable(variables))).numpy()))
        return keep * (costs[0] + chain)
    return costs[0] + chain


def _bops_prior_value(quantizer, variables):
    costs = np.array([1.0 if quantizer.mac_weight is None else quantizer.mac_weight * b for b in quantizer.bit_widths])
    if not quantizer.prune:
        costs[0] = 1.0
    return _prior_value(quantizer, variables, costs)


def level_costs(model, cost, int4=flash_lib.DEFAULT_INT4, table=None):
    """The unscaled per-level charges of every quantizer under ``cost`` (bytes or microseconds), zeros where it
    pays nothing."""
    if cost == "latency":
        found = latency_lib.level_costs(model, _latency_table(model, table))
    elif cost == "flash+arena":  # both, the arena weighted so that the two weigh the same at quantization
        flash_part, arena_part = flash_level_costs(model, int4), arena_level_costs(model, int4)
        weight = getattr(model, "bbits_arena_weight", None)
        if weight is None:
            quantizers = _quantizers(model)
            total = {name: sum(_prior_value(q, v, part.get((w.name, role), np.zeros(len(q.bit_widths))))
                               for w, role, q, v in quantizers) for name, part in (("f", flash_part), ("a", arena_part))}
            weight = total["f"] / max(total["a"], 1e-12)
            model.bbits_arena_weight = float(weight)
        found = {key: flash_part.get(key, 0.0) + weight * arena_part.get(key, 0.0)
                 for key in set(flash_part) | set(arena_part)}
    else:
        found = {"flash": flash_level_costs, "arena": arena_level_costs}[cost](model, int4)
    return {(w.name, role): found.get((w.name, role), np.zeros(len(q.bit_widths)))
            for w, role, q, _ in _quantizers(model)}


def _latency_table(model, table):
    table = table if table is not None else getattr(model, "bbits_latency_table", None)
    if table is None:
        raise ValueError("The latency prior needs the latency table: `set_prior(model, table=...)` (a model loaded "
                         "from a file has lost the one `quantize_model(cost=table)` attached).")
    return latency_lib.LatencyTable(table)


def set_prior(model, cost=None, scale=None, int4=flash_lib.DEFAULT_INT4, table=None):
    """Assigns the deployment-cost prior's level charges from the current gates; returns the scale ``s``.

    ``cost``: ``"flash"``, ``"arena"``, ``"latency"`` (with ``table``, or the table the model carries) or a latency
    table; ``None``: the model's.

    ``scale``: bytes per unit of the prior; ``None`` keeps the one this model had (``model.bbits_cost_scale``)
    or sets it so that the prior equals the BOP prior now (``quantize_model`` does this at quantization).
    """
    if isinstance(cost, (dict, latency_lib.LatencyTable)):
        cost, table = "latency", cost
    cost = cost or model_cost(model)
    if cost != "latency":
        cost = check_cost(cost)
    if cost == "latency":
        model.bbits_latency_table = _latency_table(model, table)
    if cost == "bops":
        raise ValueError("The BOP prior has no level charges to set (spec section 4, `mac_weight`). Quantize with "
                         f"`cost=` one of {DEPLOYMENT_COSTS}.")
    found = level_costs(model, cost, int4, table)
    quantizers = _quantizers(model)
    if any("level_costs" not in v for _, _, _, v in quantizers):
        raise ValueError(f"The model was quantized with the BOP prior; `set_prior` needs a model from "
                         f"`quantize_model(..., cost={cost!r})`.")
    if scale is None:
        scale = getattr(model, "bbits_cost_scale", None)
    if scale is None:
        bops_total = sum(_bops_prior_value(q, v) for _, _, q, v in quantizers)
        cost_total = sum(_prior_value(q, v, found[(w.name, role)]) for w, role, q, v in quantizers)
        scale = cost_total / max(bops_total, 1e-12)
    for w, role, _, v in quantizers:
        v["level_costs"].assign((found[(w.name, role)] / scale).astype(np.float32))
    model.bbits_cost_scale = float(scale)
    return float(scale)


def prior_bytes(model):
    """``s * sum_k R_k``: the prior's own estimate of the cost in bytes (microseconds for latency): the
    linearised expected cost."""
    scale = getattr(model, "bbits_cost_scale", None)
    if scale is None:
        raise ValueError("The model has no deployment-cost prior set (`bbits_tf.costs.set_prior`).")
    return scale * sum(_prior_value(q, v, v["level_costs"].numpy()) for _, _, q, v in _quantizers(model))
