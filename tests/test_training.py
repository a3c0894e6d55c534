"""Tests of bbits_tf.training: grouped optimizer, schedule, recipes, callbacks, baselines, distribution."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import models, training
from bbits_tf._keras import keras, tfmot

ROOT = Path(__file__).resolve().parents[1]


def tiny_model():
    """A small Conv2D + Dense model on MNIST-shaped input: fast to trace and train."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 5, strides=3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, name="fc"),
    ], name="tiny")


@pytest.fixture(scope="module")
def small_data(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    return (x_train[:256], y_train[:256]), (x_test[:500], y_test[:500])


def quantized_tiny(mu=0.1, seed=0):
    keras.utils.set_random_seed(seed)
    return bbits_tf.quantize_model(tiny_model(), mu=mu)


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def max_change(variables, before):
    return max(float(np.max(np.abs(v.numpy() - b))) for v, b in zip(variables, before))


# --- GroupedOptimizer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frozen", training.GROUPS)
def test_grouped_optimizer_routes_each_group_to_its_optimizer(small_data, frozen):
    (x, y), _ = small_data
    model = quantized_tiny()
    groups = bbits_tf.variable_groups(model)
    lrs = {"weights": 1e-3, "ranges": 1e-2, "gates": 1e-1}
    lrs[frozen] = 0.0
    optimizer = training.GroupedOptimizer({g: keras.optimizers.Adam(lr) for g, lr in lrs.items()}, groups=groups)
    training.initialize_ranges(model, x)
    before = {g: snapshot(vs) for g, vs in groups.items()}
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:256], y[:256], batch_size=128, epochs=1, verbose=0, shuffle=False)  # 2 steps
    for group, variables in groups.items():
        change = max_change(variables, before[group])
        if group == frozen:
            assert change == 0.0, group
        else:
            # Adam moves a variable by at most about lr per step: 2 steps.
            assert 0.0 < change <= 2 * lrs[group] * 1.001, (group, change)
    assert int(optimizer.iterations.numpy()) == 2
    assert {g: int(o.iterations.numpy()) for g, o in optimizer.optimizers.items()} == {g: 2 for g in lrs}
    assert optimizer.learning_rates() == pytest.approx(lrs)


def test_grouped_optimizer_name_routing_matches_variable_groups():
    model = quantized_tiny()
    optimizer = training.GroupedOptimizer({g: keras.optimizers.Adam() for g in training.GROUPS})
    explicit = training.GroupedOptimizer({g: keras.optimizers.Adam() for g in training.GROUPS},
                                         groups=bbits_tf.variable_groups(model))
    for group, variables in bbits_tf.variable_groups(model).items():
        assert variables
        for variable in variables:
            assert optimizer.group_of(variable) == group
            assert explicit.group_of(variable) == group


def test_grouped_optimizer_config_round_trip():
    optimizer = training.GroupedOptimizer({
        "weights": keras.optimizers.Adam(training.ConstantThenLinearDecay(1e-3, 15, 10), epsilon=1e-8),
        "ranges": keras.optimizers.Adam(2e-3),
        "gates": "sgd",
    })
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer), use_legacy_optimizer=False)
    assert isinstance(restored, training.GroupedOptimizer)
    assert restored.get_config() == optimizer.get_config()
    assert isinstance(restored.optimizers["gates"], keras.optimizers.SGD)
    schedule = restored.optimizers["weights"].get_config()["learning_rate"]
    assert schedule["config"] == {"initial_learning_rate": 1e-3, "epochs": 15, "steps_per_epoch": 10, "decay_start": 10}


def test_grouped_optimizer_errors():
    with pytest.raises(ValueError, match="non-empty dict"):
        training.GroupedOptimizer({})
    with pytest.raises(ValueError, match="non-legacy"):
        training.GroupedOptimizer({"weights": keras.optimizers.legacy.Adam()})
    with pytest.raises(ValueError, match="`default`"):
        training.GroupedOptimizer({"gates": keras.optimizers.Adam()})
    model = quantized_tiny()
    with pytest.raises(ValueError, match="no optimizer"):
        training.GroupedOptimizer({"weights": keras.optimizers.Adam()}, groups=bbits_tf.variable_groups(model))
    optimizer = training.GroupedOptimizer({"gates": keras.optimizers.Adam()}, default=None,
                                          groups={"gates": bbits_tf.variable_groups(model)["gates"]})
    with pytest.raises(ValueError, match="in no group"):
        optimizer.group_of(bbits_tf.variable_groups(model)["weights"][0])


# --- schedule -----------------------------------------------------------------------------------------------------

def test_schedule_factor_100_epochs():
    factors = [training.constant_then_linear_decay(e, 100) for e in range(1, 101)]
    assert factors[:67] == [1.0] * 67
    assert factors[67:] == pytest.approx([k / 34 for k in range(33, 0, -1)])


def test_schedule_factor_15_epochs():
    factors = [training.constant_then_linear_decay(e, 15) for e in range(1, 16)]
    assert factors == pytest.approx([1.0] * 11 + [4 / 5, 3 / 5, 2 / 5, 1 / 5])


def test_schedule_steps_once_per_epoch():
    schedule = training.ConstantThenLinearDecay(1e-3, epochs=100, steps_per_epoch=469)
    steps = np.arange(0, 100 * 469, 7)
    values = schedule(tf.constant(steps)).numpy()
    expected = [1e-3 * training.constant_then_linear_decay(s // 469 + 1, 100) for s in steps]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert float(schedule(469 * 67 - 1)) == pytest.approx(1e-3)
    assert float(schedule(469 * 67)) == pytest.approx(1e-3 * 33 / 34)
    assert float(schedule(469 * 99)) == pytest.approx(1e-3 / 34)
    assert training.ConstantThenLinearDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()


# --- recipes and methods -----------------------------------------------------------------------------------------

def test_paper_recipe_is_the_spec():
    paper = training.RECIPES["paper"]
    assert (paper.epochs, paper.warmup_epochs, paper.batch_size, paper.mu) == (100, 0, 128, 0.1)
    assert (paper.lr_weights, paper.lr_ranges, paper.lr_gates, paper.adam_epsilon) == (1e-3, 1e-3, 1e-3, 1e-8)
    assert paper.init_log_alpha == (6.0, 6.0, -6.0, -6.0)
    assert (paper.weight_schedule, paper.decay_groups) == ("paper", ("weights",))
    fast = training.RECIPES["fast"]
    assert (fast.epochs, fast.warmup_epochs, fast.lr_gates, fast.mu) == (15, 1, 1e-2, 0.1)
    assert fast.decay_groups == ("weights", "ranges", "gates")


def test_recipe_overrides_and_validation():
    recipe = training.get_recipe("paper", epochs=15, mu=None, lr_gates=1e-2)
    assert (recipe.epochs, recipe.mu, recipe.lr_gates) == (15, 0.1, 1e-2)
    assert training.get_recipe("fast", warmup_epochs=3).quantized_epochs == 12
    with pytest.raises(ValueError, match="warmup_epochs"):
        training.Recipe(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="weight_schedule"):
        training.Recipe(weight_schedule="cosine")
    with pytest.raises(ValueError, match="Unknown recipe"):
        training.get_recipe("slow")


def test_make_optimizer_follows_the_recipe():
    model = quantized_tiny()
    optimizer = training.make_optimizer(model, training.RECIPES["paper"], steps_per_epoch=469)
    assert isinstance(optimizer, training.GroupedOptimizer)
    weights = optimizer.optimizers["weights"]
    assert isinstance(weights._learning_rate, training.ConstantThenLinearDecay)  # pylint: disable=protected-access
    assert weights._learning_rate.get_config()["decay_start"] == 66  # pylint: disable=protected-access
    assert optimizer.learning_rates() == pytest.approx({"weights": 1e-3, "ranges": 1e-3, "gates": 1e-3})
    assert {o.epsilon for o in optimizer.optimizers.values()} == {1e-8}
    plain = training.make_optimizer(tiny_model(), training.RECIPES["paper"], steps_per_epoch=469)
    assert isinstance(plain, keras.optimizers.Adam)


@pytest.fixture(scope="module")
def lenet():
    keras.utils.set_random_seed(0)
    return models.lenet5()


def test_ablations_build_the_right_quantizers(lenet):
    def quantizers(method):
        return training.build_method(method, lenet, training.RECIPES["paper"])

    bb = quantizers("bb")
    assert sum(int(np.prod(v.shape)) for v in bbits_tf.variable_groups(bb)["gates"]) == 636  # the paper's count
    assert bbits_tf.summary(bb).relative_bops == pytest.approx(6.25)

    quant_only = quantizers("quant_only")
    assert not any(q.prune for _, _, q, _ in bbits_tf.bayesian_bits_quantizers(quant_only))
    assert sum(int(np.prod(v.shape)) for v in bbits_tf.variable_groups(quant_only)["gates"]) == 28

    for method, bits, bops in (("prune_only_w8", 8, 6.25), ("prune_only_w4", 4, 3.125)):
        model = quantizers(method)
        found = bbits_tf.bayesian_bits_quantizers(model)
        assert {q.bit_widths for _, role, q, _ in found if role == "weight"} == {(bits,)}
        assert {q.bit_widths for _, role, q, _ in found if role == "activation"} == {(8,)}
        assert sum(q.prune for _, _, q, _ in found) == 3  # conv1, conv2, fc1
        assert bbits_tf.summary(model).relative_bops == pytest.approx(bops)

    gumbel = quantizers("gumbel")
    assert {q.gate for _, _, q, _ in bbits_tf.bayesian_bits_quantizers(gumbel)} == {"gumbel_sigmoid"}
    with pytest.raises(ValueError, match="Unknown method"):
        training.run(lenet, training.RECIPES["paper"], None, method="bb8")


# --- baselines ----------------------------------------------------------------------------------------------------

def test_baseline_relative_bops(lenet):
    expected = {"float": 100.0, "tfmot_w8a8": 6.25, "tfmot_w4a8": 3.125, "tfmot_w2a8": 1.5625}
    assert {k: training.baseline_relative_bops(k, lenet) for k in expected} == pytest.approx(expected)
    prof = training.fixed_bit_profile(lenet, 4, 8)
    assert [(r.name, r.macs, r.input_bits, r.weight_bits, r.output_bits) for r in prof.layers] == [
        ("conv1", 460_800, 8, 4, 8), ("conv2", 3_276_800, 8, 4, 8), ("fc1", 524_288, 8, 4, 8),
        ("fc2", 5_120, 8, 4, 32)]
    assert prof.total_macs == 4_267_008
    # w2a32 with an 8-bit input (spec section 5 table): 5.744 %.
    assert training.fixed_bit_profile(lenet, 2, 32).relative_bops == pytest.approx(5.744, abs=5e-4)


@pytest.mark.parametrize("kind,bits", [("tfmot_w8a8", 8), ("tfmot_w4a8", 4), ("tfmot_w2a8", 2)])
def test_build_baseline_uses_tfmot_with_the_right_bits(lenet, kind, bits):
    model = training.build_baseline(kind, lenet)
    wrappers = [layer for layer in model.layers if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)]
    assert [w.layer.name for w in wrappers if w.layer.name.startswith(("conv", "fc"))] == ["conv1", "conv2", "fc1",
                                                                                           "fc2"]
    for wrapper in wrappers:
        for _, quantizer in wrapper.quantize_config.get_weights_and_quantizers(wrapper.layer):
            assert quantizer.get_config()["num_bits"] == bits
    # The same count from the tfmot model itself (its QuantizeLayer passes the 8-bit input through).
    assert training.fixed_bit_profile(model, bits, 8).relative_bops == pytest.approx(100 * bits * 8 / 1024)
    assert training.build_baseline("float", lenet) is lenet
    with pytest.raises(ValueError, match="Unknown baseline"):
        training.build_baseline("tfmot_w3a8", lenet)


# --- callbacks and train ------------------------------------------------------------------------------------------

def read_scalars(folder):
    scalars = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def test_train_records_bops_bit_widths_and_tensorboard(small_data, tmp_path):
    """4 epochs of 2 steps with a very fast gate learning rate: the gates fall, the BOPs follow."""
    keras.utils.set_random_seed(0)
    model = bbits_tf.quantize_model(tiny_model(), mu=1.0)
    recipe = training.Recipe(epochs=4, batch_size=128, lr_gates=2.0, mu=1.0)
    lines = []
    summaries = training.BayesianBitsSummaries(tmp_path / "tb", update_freq=1, subdir="bb")
    own_eval = training.BopsLogger(test_data=small_data[1], print_fn=None)
    history, logger, bit_widths = training.train(model, recipe, small_data, verbose=0, seed=0, print_fn=lines.append,
                                                 log_dir=tmp_path / "logs", bit_width_every=1,
                                                 callbacks=[summaries, own_eval])
    # BopsLogger: one entry per epoch, also in Keras' History.
    assert [h["epoch"] for h in logger.history] == [1, 2, 3, 4]
    for key in ("test_accuracy", "relative_bops", "expected_relative_bops", "lr_weights", "lr_gates"):
        assert len(history.history[key]) == 4
    assert [h["lr_weights"] for h in logger.history] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])  # E=4: 1,1,1,1/2
    assert logger.history[0]["test_accuracy"] == pytest.approx(logger.history[0]["val_accuracy"])
    # A BopsLogger that evaluates by itself (deterministic gates) agrees with Keras' validation.
    assert [h["test_accuracy"] for h in own_eval.history] == pytest.approx(history.history["val_accuracy"])
    bops = [h["relative_bops"] for h in logger.history]
    assert bops[0] <= 6.25 and bops[-1] < 6.25 and bops[-1] < bops[0]
    assert bops[-1] == pytest.approx(bbits_tf.summary(model).relative_bops)
    assert len(lines) == 4 and lines[-1].startswith("epoch 4/4 - test accuracy ") and "relative BOPs" in lines[-1]
    # BitWidthHistory: start + every step (8) + every epoch end (4), 3 quantizers; bits fall from 8.
    records = bit_widths.history
    assert len(records) == 1 + 8 + 4
    assert sorted(records[0]["log2_bits"]) == ["conv/activation", "conv/weight", "fc/weight"]
    assert all(v == pytest.approx(3.0, abs=0.01) for v in records[0]["log2_bits"].values())
    assert records[-1]["epoch"] == 4.0 and records[-1]["step"] == 8
    assert min(records[-1]["log2_bits"].values()) < 2.5
    for wrapper, role, quantizer, variables in bbits_tf.bayesian_bits_quantizers(model):
        assert records[-1]["log2_bits"][f"{wrapper.layer.name}/{role}"] == pytest.approx(
            np.log2(quantizer.expected_bit_width(variables)))
        assert records[-1]["bits"][f"{wrapper.layer.name}/{role}"] == quantizer.bit_width(variables)
    # TensorBoard: the library callback (epochs and steps), and train()'s own writers.
    scalars = read_scalars(tmp_path / "tb" / "bb")
    assert [s for s, _ in scalars["bayesian_bits/relative_bops"]] == [0, 1, 2, 3]
    assert [v for _, v in scalars["bayesian_bits/relative_bops"]] == pytest.approx(bops)
    assert len(scalars["steps/log2_bit_width/conv/weight"]) == 8
    assert scalars["bayesian_bits/mu"][0][1] == pytest.approx(1.0)
    assert {"kept_channels/conv", "bit_width/fc/weight", "log2_bit_width/conv/activation"} <= set(scalars)
    assert read_scalars(tmp_path / "logs" / "bayesian_bits")["bayesian_bits/expected_relative_bops"]
    assert list((tmp_path / "logs" / "train" / "train").glob("events.out.tfevents.*"))


def test_run_with_warmup_and_a_baseline(small_data):
    lines = []
    recipe = training.Recipe(epochs=2, warmup_epochs=1, batch_size=32, lr_weights=1e-2)
    result = training.run(tiny_model, recipe, small_data, method="tfmot_w4a8", seed=1, verbose=0,
                          print_fn=lines.append)
    assert [(h["epoch"], h["phase"], h["relative_bops"]) for h in result.history] == [
        (1, "float_warmup", 100.0), (2, "tfmot_w4a8", pytest.approx(3.125))]
    assert result.relative_bops == pytest.approx(3.125)
    assert 0.3 < result.test_accuracy <= 1.0  # 16 steps of training on 10 classes (chance: 0.1)
    assert result.bit_widths == [] and result.wall_time_s > 0
    assert lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    with pytest.raises(ValueError, match="float warm-up"):
        training.train(tiny_model(), recipe, small_data, verbose=0)


# --- distribution -------------------------------------------------------------------------------------------------

MIRRORED_SCRIPT = r"""
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
import bbits_tf
from bbits_tf import data, training
from bbits_tf._keras import keras
from tests.test_training import tiny_model

(x, y), (xs, ys) = data.load_mnist(train_limit=256)
out = {}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out["replicas"] = strategy.num_replicas_in_sync

# 1. A regularizer-only step (zero task loss, SGD lr 1 on the gates, lr 0 elsewhere): the gates must move by
#    exactly -grad(mu * R) computed on one device, not by twice that.
keras.utils.set_random_seed(0)
with strategy.scope():
    model = bbits_tf.quantize_model(tiny_model(), mu=1.0)
    training.initialize_ranges(model, x)
    optimizer = training.GroupedOptimizer({"weights": keras.optimizers.SGD(0.0), "ranges": keras.optimizers.SGD(0.0),
                                           "gates": keras.optimizers.SGD(1.0)}, groups=bbits_tf.variable_groups(model))
    model.compile(optimizer, loss=lambda y_true, y_pred: 0.0 * tf.reduce_sum(y_pred))
gates = bbits_tf.variable_groups(model)["gates"]
with tf.GradientTape() as tape:
    reg = bbits_tf.regularization_loss(model)
grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(reg, gates)])
before = np.concatenate([g.numpy().ravel() for g in gates])
fit = model.fit(x[:128], y[:128], batch_size=128, epochs=1, verbose=0, shuffle=False)
delta = before - np.concatenate([g.numpy().ravel() for g in gates])
out["regularizer"] = float(reg)
out["reported_loss"] = fit.history["loss"][0]
out["update_over_gradient"] = float(np.dot(delta, grad) / np.dot(grad, grad))
out["max_deviation"] = float(np.max(np.abs(delta - grad)))
out["max_gradient"] = float(np.max(np.abs(grad)))
out["iterations"] = int(optimizer.iterations.numpy())

# 2. The same weights evaluated on two replicas and on one device: the same loss (cross-entropy + mu * R).
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
with strategy.scope():
    model.compile(loss=loss, metrics=["accuracy"])
out["mirrored_eval"] = model.evaluate(xs[:500], ys[:500], batch_size=100, verbose=0)
single = bbits_tf.quantize_model(tiny_model(), mu=1.0)
single.set_weights(model.get_weights())
single.compile(loss=loss, metrics=["accuracy"])
out["single_eval"] = single.evaluate(xs[:500], ys[:500], batch_size=100, verbose=0)

# 3. The whole pipeline under the strategy: replicas stay in sync and the model learns.
recipe = training.Recipe(epochs=1, batch_size=16, lr_weights=1e-2, lr_gates=1e-2)
result = training.run(tiny_model, recipe, ((x, y), (xs[:500], ys[:500])), method="bb", seed=0, strategy=strategy,
                      verbose=0, print_fn=None)
out["run_accuracy"] = result.test_accuracy
out["run_losses"] = [h["loss"] for h in result.history]
out["variable_kinds"] = sorted({type(v).__name__ for v in result.model.trainable_variables})
out["replicas_in_sync"] = all(np.array_equal(v.values[0].numpy(), v.values[1].numpy())
                              for v in result.model.trainable_variables)
print("RESULT " + json.dumps(out))
"""


def test_mirrored_strategy_counts_the_regularizer_once():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["replicas"] == 2
    assert out["reported_loss"] == pytest.approx(out["regularizer"], rel=1e-5)
    assert out["update_over_gradient"] == pytest.approx(1.0, abs=1e-3)  # 2.0 if counted once per replica
    assert out["max_deviation"] < 1e-3 * out["max_gradient"]
    assert out["iterations"] == 1
    assert out["mirrored_eval"] == pytest.approx(out["single_eval"], rel=1e-5)
    assert out["mirrored_eval"][0] > out["regularizer"]  # the evaluated loss includes mu * R
    assert out["variable_kinds"] == ["MirroredVariable"]
    assert out["replicas_in_sync"]
    assert np.isfinite(out["run_losses"][0]) and out["run_accuracy"] > 0.2  # 16 steps; chance is 0.1


# --- checkpoints and resuming -------------------------------------------------------------------------------------

class _StopAfterSaves:
    """Makes ``EpochCheckpoint`` raise KeyboardInterrupt right after its ``n``-th save: a kill between epochs."""

    def __init__(self, monkeypatch, n):
        self.n, self.saves = n, 0
        save = training.EpochCheckpoint.on_epoch_end

        def on_epoch_end(checkpointer, epoch, logs=None):
            save(checkpointer, epoch, logs)
            self.saves += 1
            if self.saves == self.n:
                raise KeyboardInterrupt

        monkeypatch.setattr(training.EpochCheckpoint, "on_epoch_end", on_epoch_end)


class _GateWatch(keras.callbacks.Callback):
    """Records the gates of a Bayesian Bits model at the start and the end of each fit."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = None, None

    def on_train_begin(self, logs=None):
        if bbits_tf.bayesian_bits_quantizers(self.model):
            self.begin = snapshot(bbits_tf.variable_groups(self.model)["gates"])

    def on_train_end(self, logs=None):
        if bbits_tf.bayesian_bits_quantizers(self.model):
            self.end = snapshot(bbits_tf.variable_groups(self.model)["gates"])


# 1 float warm-up epoch + 3 quantized epochs of 4 steps; decay_start=0: the weights' learning rate is 1, 2/3, 1/3 of
# 1e-3 in the quantized epochs (it only reaches 1/3 if the optimizer's step count survives the resume).
RESUME_RECIPE = training.Recipe(epochs=4, warmup_epochs=1, batch_size=64, lr_gates=1e-2, decay_start=0)


def _budget_that_freezes():
    from bbits_tf.budget import BopsBudget

    # Target = the 8-bit start (6.25 %), no ramp: the first update freezes the gates (step 6: its step count includes
    # the 4 warm-up steps).
    return BopsBudget(6.25, every_n_steps=2, ramp_fraction=0.0, freeze_band=0.05)


def test_run_resumes_after_an_interruption(small_data, tmp_path, monkeypatch):
    (x, y), test = small_data
    data = ((x, y), test)
    stop = _StopAfterSaves(monkeypatch, 3)  # after epoch 3: the warm-up and 2 quantized epochs
    budget = _budget_that_freezes()
    with pytest.raises(KeyboardInterrupt):
        training.run(tiny_model, RESUME_RECIPE, data, seed=0, verbose=0, print_fn=None, callbacks=[budget],
                     checkpoint_dir=tmp_path)
    assert stop.saves == 3
    meta = training.read_checkpoint(tmp_path)
    assert (meta["phase"], meta["epoch"], meta["completed_epochs"], meta["total_epochs"]) == ("bb", 2, 3, 4)
    assert [h["epoch"] for h in meta["extra"]["history_before"] + meta["history"]] == [1, 2, 3]
    assert budget.frozen_at_step == 6 and budget._step == 4 + 8  # pylint: disable=protected-access
    interrupted_budget = budget.get_state()

    monkeypatch.undo()
    budget = _budget_that_freezes()
    gates = _GateWatch()
    lines = []
    result = training.run(tiny_model, RESUME_RECIPE, data, seed=0, verbose=0, print_fn=lines.append,
                          callbacks=[budget, gates], checkpoint_dir=tmp_path)
    assert lines[0] == f"resuming bb from {tmp_path / 'ckpt-3'}: epoch 3 of 4 done"
    assert [line[:9] for line in lines[1:]] == ["epoch 4/4"]  # only the missing epoch is trained
    # Every epoch once, the first three as the interrupted run logged them.
    assert [(h["epoch"], h["phase"]) for h in result.history] == [(1, "float_warmup"), (2, "bb"), (3, "bb"), (4, "bb")]
    assert result.history[:3] == meta["extra"]["history_before"] + meta["history"]
    assert result.resumed_at == [3]
    # The optimizer state: each group's Adam went on counting (12 quantized steps), so the schedule is at its third
    # quantized epoch (1/3), and the gates stay frozen (BopsBudget does not freeze them again: its state says frozen).
    optimizer = result.model.optimizer
    assert int(optimizer.iterations.numpy()) == 12
    assert {g: int(o.iterations.numpy()) for g, o in optimizer.optimizers.items()} == {g: 12 for g in training.GROUPS}
    assert result.history[-1]["lr_weights"] == pytest.approx(1e-3 / 3)
    assert result.history[-1]["lr_gates"] == 0.0 and optimizer.frozen_groups() == ["gates"]
    for before, after in zip(gates.begin, gates.end):
        np.testing.assert_array_equal(before, after)
    # BopsBudget's state went on from the checkpoint.
    assert budget.frozen_at_step == 6 and budget._step == 4 + 12  # pylint: disable=protected-access
    assert budget.history == interrupted_budget["history"]  # frozen: no update since
    # BitWidthHistory: the start of the quantized phase and 3 epoch ends, each once.
    assert [r["epoch"] for r in result.bit_widths] == [0.0, 1.0, 2.0, 3.0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index",
                                            "ckpt-4.data-00000-of-00001", "ckpt-4.index"]

    # Calling it again on the finished checkpoint trains nothing and gives the same result.
    again = training.run(tiny_model, RESUME_RECIPE, data, seed=0, verbose=0, print_fn=None,
                         callbacks=[_budget_that_freezes()], checkpoint_dir=tmp_path)
    assert again.history == result.history and again.resumed_at == [3, 4]
    assert int(again.model.optimizer.iterations.numpy()) == 12
    # Another run into the same folder is refused, naming the difference.
    with pytest.raises(ValueError, match=r"recipe\.mu: 0\.1 -> 0\.2"):
        training.run(tiny_model, RESUME_RECIPE.replace(mu=0.2), data, seed=0, verbose=0, print_fn=None,
                     callbacks=[_budget_that_freezes()], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="callbacks with state"):
        training.run(tiny_model, RESUME_RECIPE, data, seed=0, verbose=0, print_fn=None, checkpoint_dir=tmp_path)


def test_run_resumes_inside_the_warmup_and_after_it(small_data, tmp_path, monkeypatch):
    recipe = training.Recipe(epochs=3, warmup_epochs=2, batch_size=64)
    for saves, resumed_phase in ((1, "float_warmup"), (2, "float_warmup")):
        folder = tmp_path / str(saves)
        _StopAfterSaves(monkeypatch, saves)
        with pytest.raises(KeyboardInterrupt):
            training.run(tiny_model, recipe, small_data, seed=0, verbose=0, print_fn=None, checkpoint_dir=folder)
        monkeypatch.undo()
        assert training.read_checkpoint(folder)["phase"] == resumed_phase
        lines = []
        result = training.run(tiny_model, recipe, small_data, seed=0, verbose=0, print_fn=lines.append,
                               checkpoint_dir=folder)
        assert lines[0].startswith(f"resuming float_warmup from {folder / f'ckpt-{saves}'}: epoch {saves} of 3 done")
        assert [(h["epoch"], h["phase"]) for h in result.history] == [(1, "float_warmup"), (2, "float_warmup"),
                                                                       (3, "bb")]
        assert result.resumed_at == [saves]
        # The quantized phase starts afresh after a finished warm-up: 4 steps.
        assert int(result.model.optimizer.iterations.numpy()) == 4


def test_checkpoints_leave_an_uninterrupted_run_unchanged(small_data, tmp_path):
    recipe = training.Recipe(epochs=3, warmup_epochs=1, batch_size=64, lr_gates=1e-2)
    plain = training.run(tiny_model, recipe, small_data, seed=3, verbose=0, print_fn=None)
    saved = training.run(tiny_model, recipe, small_data, seed=3, verbose=0, print_fn=None, checkpoint_dir=tmp_path)
    assert saved.history == plain.history and saved.bit_widths == plain.bit_widths and saved.resumed_at == []
    for a, b in zip(plain.model.weights, saved.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_train_resumes_its_phase_and_refuses_another(small_data, tmp_path, monkeypatch):
    recipe = training.Recipe(epochs=3, batch_size=64)
    _StopAfterSaves(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        training.train(quantized_tiny(), recipe, small_data, verbose=0, print_fn=None, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    history, logger, bit_widths = training.train(quantized_tiny(), recipe, small_data, verbose=0, print_fn=None,
                                                 checkpoint_dir=tmp_path)
    assert len(history.history["loss"]) == 2  # this call trained epochs 2 and 3
    assert [h["epoch"] for h in logger.history] == [1, 2, 3]
    assert [r["epoch"] for r in bit_widths.history] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="not of this phase 'bb'"):
        training.train(quantized_tiny(), recipe, small_data, verbose=0, print_fn=None, checkpoint_dir=tmp_path,
                       phase="bb")
    with pytest.raises(ValueError, match="epochs of the phase: 3 -> 4"):
        training.train(quantized_tiny(), recipe.replace(epochs=4), small_data, verbose=0, print_fn=None,
                       checkpoint_dir=tmp_path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(small_data, tmp_path, monkeypatch):
    recipe = training.Recipe(epochs=3, batch_size=64)
    _StopAfterSaves(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        training.train(quantized_tiny(), recipe, small_data, verbose=0, print_fn=None, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    data_file = tmp_path / "ckpt-2.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])  # a save cut short (without the index update's guard)
    (tmp_path / "ckpt-3_temp").mkdir()  # what a kill during a save leaves behind
    with pytest.warns(UserWarning, match="unreadable checkpoint .*ckpt-2"):
        meta = training.read_checkpoint(tmp_path)
    assert meta["epoch"] == 1 and meta["path"] == str(tmp_path / "ckpt-1")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        _, logger, _ = training.train(quantized_tiny(), recipe, small_data, verbose=0, print_fn=None,
                                      checkpoint_dir=tmp_path)
    assert [h["epoch"] for h in logger.history] == [1, 2, 3]
    assert training.read_checkpoint(tmp_path)["epoch"] == 3
    assert not (tmp_path / "ckpt-3_temp").exists()
    assert training.read_checkpoint(tmp_path / "nothing") is None


def test_recipe_rejects_non_finite_and_mistyped_values():
    for field, value, error in (("mu", float("nan"), ValueError), ("mu", "0.1", TypeError),
                                ("lr_weights", float("inf"), ValueError), ("lr_gates", -1e-3, ValueError),
                                ("lr_ranges", "1e-3", TypeError), ("lr_warmup", float("nan"), ValueError),
                                ("epochs", 15.0, TypeError), ("epochs", "15", TypeError), ("epochs", True, TypeError),
                                ("warmup_epochs", 1.5, TypeError), ("batch_size", "128", TypeError),
                                ("decay_start", 2.0, TypeError), ("adam_epsilon", 0.0, ValueError),
                                ("init_log_alpha", (6.0, "6", -6.0, -6.0), TypeError),
                                ("init_log_alpha", (6.0, float("nan"), -6.0, -6.0), ValueError),
                                ("bit_widths", (2, 4.0), TypeError), ("decay_groups", "weights", TypeError),
                                ("mask_bias", "yes", TypeError)):
        with pytest.raises(error, match=rf"{field}(\[\d\])?="):
            training.get_recipe("fast", **{field: value})
    with pytest.raises(ValueError, match="Unknown Recipe field.*'lr'.*Received: lr=0.1"):
        training.get_recipe("fast", lr=0.1)
    with pytest.raises(TypeError, match="recipe="):
        training.get_recipe({"epochs": 3})
    # NumPy numbers are numbers.
    recipe = training.get_recipe("fast", epochs=np.int64(3), mu=np.float32(0.5))
    assert (recipe.epochs, recipe.mu) == (3, 0.5)


