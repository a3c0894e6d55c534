"""Deployment costs (issue 11): bbits_tf.flash and bbits_tf.arena against exported files, the expected costs, the
prior under cost="flash"/"arena" and the Budget callback."""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import arena, costs, flash, models, training
from bbits_tf._keras import keras
from bbits_tf.budget import Budget
from export_helpers import images, random_biases
from test_tflite_export_bbits import force_gates

L = keras.layers


def branched():
    """A Functional model with a branch: conv -> (conv3x3, conv1x1) -> Add -> pool -> flatten -> fc -> fc."""
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    a = L.Conv2D(16, 3, padding="same", activation="relu", name="a")(x)
    b = L.Conv2D(16, 1, padding="same", activation="relu", name="b")(x)
    y = L.MaxPooling2D(name="pool")(L.Add(name="add")([a, b]))
    y = L.Dense(10, name="fc2")(L.Dense(32, activation="relu", name="fc1")(L.Flatten(name="flat")(y)))
    return random_biases(keras.Model(inp, y, name="branched"), seed=1)


# name -> (model, input shape, forced gates: layer -> (weight bits, activation bits, pruned fraction))
CASES = {
    "lenet_init": (models.lenet5, (28, 28, 1), {}),
    "lenet_forced": (models.lenet5, (28, 28, 1),
                     {"conv1": (4, 8, 0.25), "conv2": (2, 4, 0.4), "fc1": (2, 8, 0.6), "fc2": (8, None, 0.0)}),
    "lenet_small": (models.lenet5, (28, 28, 1),
                    {"conv1": (8, 2, 0.7), "conv2": (8, 2, 0.8), "fc1": (8, 4, 0.9), "fc2": (2, None, 0.0)}),
    "branched_forced": (branched, (16, 16, 3), {"c1": (4, 4, 0.5), "a": (2, 8, 0.3), "fc1": (2, 8, 0.5)}),
}


def _quantized(case, **kwargs):
    build, shape, spec = CASES[case]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    qmodel = bbits_tf.quantize_model(build(), mu=0.01, **kwargs)
    x = images(64, shape=shape)
    qmodel(x[:32], training=True)  # ranges from data
    force_gates(qmodel, spec)
    return qmodel, x


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request):
    import tflite_export as te  # pylint: disable=import-outside-toplevel
    qmodel, x = _quantized(request.param)
    report = te.export(qmodel, None, representative_data=x, io="int8", lsb_samples=0, tflm_samples=2)
    return request.param, qmodel, report


def test_predicted_flash_is_the_exported_file_within_2_percent(exported):
    name, qmodel, report = exported
    predicted = flash.flash_bytes(qmodel)
    assert abs(predicted / report.file_bytes - 1) < 0.02, (name, predicted, report.file_bytes)
    assert report.predicted["flash_bytes"] == pytest.approx(predicted)
    assert report.predicted["file_bytes"] == report.file_bytes
    # weights and biases exactly: what the layers store is the file's per-layer accounting
    rows = {r.name: r for r in flash.layer_flash(qmodel)}
    for layer in report.bbits_layers:
        assert rows[layer.name].weight_bytes == pytest.approx(layer.stored_weight_bytes), (name, layer.name)
        assert rows[layer.name].bias_bytes == layer.stored_bias_bytes, (name, layer.name)


def test_predicted_arena_is_tflm_within_5_percent(exported):
    name, qmodel, report = exported
    predicted = arena.arena_bytes(qmodel)
    assert report.tflm_arena_bytes is not None
    assert abs(predicted / report.tflm_arena_bytes - 1) < 0.05, (name, predicted, report.tflm_arena_bytes)
    assert report.predicted["arena_error"] == pytest.approx(predicted / report.tflm_arena_bytes - 1)


def test_lenet_flash_by_hand():
    """LeNet5 at initialisation (w8a8, nothing pruned): every weight one byte, 4 bytes a bias, the overhead of 7
    operators; with fc1 at 2 bits its weights take half a byte (INT4) and the 8-bit level costs the other half."""
    qmodel, _ = _quantized("lenet_init")
    weights = 5 * 5 * 32 + 5 * 5 * 32 * 64 + 1024 * 512 + 512 * 10
    names = flash.tensor_names(qmodel)  # 17 tensors: input, 4 x (weights, bias, output), 2 pooled, shape, flat
    assert len(names) == 17 and sum(map(len, names)) == 824  # the names in the exported file (checked by hand)
    overhead = flash.FIXED_BYTES + 17 * flash.BYTES_PER_TENSOR + 824
    assert flash.flash_bytes(qmodel) == weights + 4 * (32 + 64 + 512 + 10) + overhead == 587_776  # the file
    force_gates(qmodel, {"fc1": (2, 8, 0.0)})
    assert flash.flash_bytes(qmodel) == weights - 1024 * 512 / 2 + 4 * (32 + 64 + 512 + 10) + overhead
    assert flash.flash_bytes(qmodel, overhead=1000) == weights - 1024 * 512 / 2 + 4 * 618 + 1000


def _saturate(qmodel, seed=0):
    """Every gate at +-30: keep probabilities of exactly 0 or 1 in float32, random which."""
    rng = np.random.default_rng(seed)
    for _, _, _, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        for key in ("log_alpha", "log_alpha_2"):
            if key in v:
                shape = v[key].shape
                value = np.where(rng.random(shape) < 0.7, 30.0, -30.0).astype(np.float32)
                if key == "log_alpha_2" and value.size > 1:
                    value.reshape(-1)[0] = 30.0  # a layer keeps a channel
                v[key].assign(value)


@pytest.mark.parametrize("case", ["lenet_init", "branched_forced"])
def test_expected_costs_equal_the_deterministic_ones_at_probabilities_0_and_1(case):
    qmodel, _ = _quantized(case)
    for seed in range(3):
        _saturate(qmodel, seed)
        assert flash.flash_bytes(qmodel, expected=True) == pytest.approx(flash.flash_bytes(qmodel), rel=1e-6)
        assert arena.arena_bytes(qmodel, expected=True) == pytest.approx(arena.arena_bytes(qmodel), rel=1e-6)


def _gate_gradients(qmodel):
    with tf.GradientTape() as tape:
        loss = bbits_tf.regularization_loss(qmodel)
    gates = bbits_tf.variable_groups(qmodel)["gates"]
    return {v.name: g for v, g in zip(gates, tape.gradient(loss, gates))}


def _quantizer(qmodel, layer, role="weight"):
    return next((q, v) for w, r, q, v in bbits_tf.bayesian_bits_quantizers(qmodel)
                if w.layer.name == layer and r == role)


def test_flash_prior_gradients_point_to_smaller_files():
    """Closing a gate lowers the flash prior where it lowers the file, and costs nothing where the file does not
    change: a pruning gate always pays; fc1's 8-bit gate pays (INT4 -> INT8 doubles its bytes), its 4-bit gate
    and the convolutions' bit gates do not (2 and 4 bits are stored like the level below), nor activations."""
    qmodel, _ = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost="flash"), None
    assert [q.bit_widths for _, _, q, _ in bbits_tf.bayesian_bits_quantizers(qmodel)][0] == (2, 4, 8)
    for _, _, _, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        if "log_alpha" in v:
            v["log_alpha"].assign(np.zeros(v["log_alpha"].shape, np.float32))  # gradients not saturated
    grads = _gate_gradients(qmodel)
    fc1, conv2 = _quantizer(qmodel, "fc1")[1], _quantizer(qmodel, "conv2")[1]
    assert np.all(grads[fc1["log_alpha_2"].name].numpy() > 0)
    assert np.all(grads[conv2["log_alpha_2"].name].numpy() > 0)
    g_fc1 = grads[fc1["log_alpha"].name].numpy()
    assert g_fc1[1] > 0 and g_fc1[0] > 0  # the 4-bit gate pays through the 8-bit level it opens the way to
    assert grads[conv2["log_alpha"].name].numpy() == pytest.approx([0, 0], abs=1e-12)
    for name in ("conv1", "conv2", "fc1"):
        act = _quantizer(qmodel, name, "activation")[1]
        assert grads[act["log_alpha"].name].numpy() == pytest.approx([0, 0], abs=1e-12)
    # the sign agrees with the expected flash model: closing one fc1 channel or its 8-bit level shrinks the file
    before = flash.flash_bytes(qmodel, expected=True)
    la2 = fc1["log_alpha_2"].numpy()
    fc1["log_alpha_2"].assign(np.where(np.arange(la2.size) == 0, -5.0, la2).astype(np.float32))
    assert flash.flash_bytes(qmodel, expected=True) < before


def test_arena_prior_opens_int4_dense_layers_to_8_bits_and_prunes_the_peak():
    """Under the arena cost fc1's unpacked INT4 weights are the peak when it is at <= 4 bits: its 8-bit gate's
    gradient is negative (opening it removes the scratch buffer), and the channels of the tensors at the peak
    pay; the cost model agrees (2-bit fc1 has the larger arena)."""
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost="arena")
    fc1 = _quantizer(qmodel, "fc1")[1]
    fc1["log_alpha"].assign([3.0, -1.0])  # 4 bits likely, 8 bits not: the scratch is likely
    costs.set_prior(qmodel)
    grads = _gate_gradients(qmodel)
    assert grads[fc1["log_alpha"].name].numpy()[1] < 0
    assert np.all(grads[_quantizer(qmodel, "conv1")[1]["log_alpha_2"].name].numpy() >= 0)
    fc1["log_alpha"].assign([-6.0, -6.0])  # 2 bits: INT4, unpacked into the arena
    at_2 = arena.arena_bytes(qmodel)
    fc1["log_alpha"].assign([6.0, 6.0])  # 8 bits: INT8, read from flash
    at_8 = arena.arena_bytes(qmodel)
    assert at_2 > 1024 * 512 > 20 * at_8  # fc1's 524,288 unpacked weights vs conv1's 24x24x32 output and pool1's


def test_prior_scale_matches_the_bop_prior_at_quantization():
    bops_model = bbits_tf.quantize_model(models.lenet5(), mu=0.1, bit_widths=(2, 4, 8))
    for cost in ("flash", "arena"):
        qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost=cost)
        assert float(bbits_tf.regularization_loss(qmodel)) == pytest.approx(
            float(bbits_tf.regularization_loss(bops_model)), rel=0.02)
        assert costs.model_cost(qmodel) == cost and qmodel.bbits_cost_scale > 0
        # the prior, in bytes, is the linearised expected cost (arena: the peak's share, no persistent base)
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost="flash")
    overhead = flash.overhead_bytes(qmodel, bbits_tf.layer_bops(qmodel))
    assert costs.prior_bytes(qmodel) + overhead == pytest.approx(flash.flash_bytes(qmodel, expected=True), rel=0.01)


def test_cost_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`cost` must be one of \('bops', 'flash', 'arena', 'flash\+arena'\) or a "
                                         r"latency table .*Received: cost='latency'"):
        bbits_tf.quantize_model(models.lenet5(), cost="latency")  # the table, not its name
    with pytest.raises(ValueError, match="quantized with the BOP prior"):
        costs.set_prior(bbits_tf.quantize_model(models.lenet5()), "flash")
    with pytest.raises(ValueError, match="at least one limit"):
        Budget()
    with pytest.raises(ValueError, match="flash_bytes"):
        Budget(flash_bytes=-3)
    with pytest.raises(ValueError, match="relative_bops=120"):
        Budget(relative_bops=120)
    assert Budget.from_config(Budget(flash_bytes=32000, ramp_fraction=0.2).get_config()).limits == {
        "flash_bytes": 32000.0}


def test_budget_lands_a_flash_target_on_a_short_run(mnist):
    """A short run from gates near their threshold (so that 150 steps can move them) lands within 10 %."""
    (x, y), _ = mnist
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost="flash", init_log_alpha=(2.0, 2.0))
    for _, _, _, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        if "log_alpha_2" in v:
            v["log_alpha_2"].assign(np.full(v["log_alpha_2"].shape, 1.0, np.float32))
    recipe = training.get_recipe("fast", epochs=3, warmup_epochs=0, lr_gates=0.05)
    steps = 50
    qmodel.compile(training.make_optimizer(qmodel, recipe, steps),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    target = 60000.0
    budget = Budget(flash_bytes=target, ramp_fraction=0.5, every_n_steps=5)
    ds = tf.data.Dataset.from_tensor_slices((x[:6400], y[:6400])).shuffle(6400, seed=0).batch(128).repeat()
    qmodel.fit(ds, steps_per_epoch=steps, epochs=3, verbose=0, callbacks=[budget])
    landed = flash.flash_bytes(qmodel)
    assert abs(landed / target - 1) < 0.10, (landed, budget.history[-3:])
    assert budget.history[-1]["flash_bytes"] == pytest.approx(landed)
    assert {"ratio", "expected_ratio", "mu", "flash_bytes"} <= set(budget.history[-1])


def test_flash_plus_arena_prior_adds_the_two_weighted_equal_at_quantization():
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost="flash+arena")
    weight = qmodel.bbits_arena_weight
    flash_part, arena_part = costs.flash_level_costs(qmodel), costs.arena_level_costs(qmodel)
    for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        want = flash_part.get((w.name, role), 0.0) + weight * arena_part.get((w.name, role), 0.0)
        assert v["level_costs"].numpy() * qmodel.bbits_cost_scale == pytest.approx(
            np.broadcast_to(want, (len(q.bit_widths),)), rel=1e-5, abs=1e-3)
    quantizers = bbits_tf.bayesian_bits_quantizers(qmodel)
    flash_total = sum(costs._prior_value(q, v, flash_part.get((w.name, r), np.zeros(3))) for w, r, q, v in quantizers)
    arena_total = sum(costs._prior_value(q, v, arena_part.get((w.name, r), np.zeros(3))) for w, r, q, v in quantizers)
    assert weight * arena_total == pytest.approx(flash_total, rel=1e-6)  # equal weight at quantization
    # fc1's 8-bit level: INT8 costs flash (+) and saves the unpacked INT4 arena (-): the sum of both
    fc1 = _quantizer(qmodel, "fc1")[1]["level_costs"].numpy() * qmodel.bbits_cost_scale
    assert fc1[2] == pytest.approx(flash_part[("quant_fc1", "weight")][2] + weight * arena_part[("quant_fc1", "weight")][2])
