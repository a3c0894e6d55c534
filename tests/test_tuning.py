"""Tests of bbits_tf.tuning: Pareto front and model choice (pure), the mu grid, BopsBudget, a tiny in-process
sweep, and examples/sweep_mnist.py in subprocesses: kill and resume, and Keras Tuner's chief/worker mode."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import training, tuning
from bbits_tf._keras import keras
from bbits_tf.quantize import bayesian_bits_quantizers, get_mu, quantize_model

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tiny trials for the subprocess tests: a 8C5-MP4-10 CNN, 200 training images, 4 steps, 1 epoch.
TINY = ["--model", "tiny", "--epochs", "1", "--train-limit", "200", "--val-size", "100", "--test-limit", "200",
        "--batch-size", "50"]


# ---------------------------------------------------------------------------------------------------------------
# Pareto front


def test_pareto_front_of_pairs_sorted_by_bops():
    points = [(0.99, 1.0), (0.98, 0.5), (0.97, 0.6), (0.95, 0.1), (0.99, 2.0), (0.90, 0.2)]
    assert tuning.pareto_front(points) == [(0.95, 0.1), (0.98, 0.5), (0.99, 1.0)]


def test_pareto_front_ties():
    # Same BOPs: only the more accurate survives. Same accuracy: only the cheaper survives.
    assert tuning.pareto_front([(0.9, 1.0), (0.95, 1.0)]) == [(0.95, 1.0)]
    assert tuning.pareto_front([(0.9, 1.0), (0.9, 0.5)]) == [(0.9, 0.5)]
    # A tie in one coordinate and a win in the other dominates; a trade-off does not.
    assert tuning.pareto_front([(0.9, 1.0), (0.9, 1.0 + 1e-9), (0.95, 2.0)]) == [(0.9, 1.0), (0.95, 2.0)]


def test_pareto_front_keeps_exact_duplicates_in_input_order():
    a, b, c = {"id": "a", "test_accuracy": 0.9, "relative_bops": 1.0}, {"id": "b", "test_accuracy": 0.9,
                                                                       "relative_bops": 1.0}, {
        "id": "c", "test_accuracy": 0.8, "relative_bops": 1.0}
    assert [p["id"] for p in tuning.pareto_front([a, c, b])] == ["a", "b"]


def test_pareto_front_ignores_unfinished_and_uses_keys():
    rows = [{"val_accuracy": 0.9, "test_accuracy": None, "relative_bops": 1.0},
            {"val_accuracy": 0.8, "test_accuracy": 0.99, "relative_bops": 2.0},
            {"val_accuracy": float("nan"), "test_accuracy": 0.5, "relative_bops": 0.1},
            {"val_accuracy": 0.95, "test_accuracy": 0.5, "relative_bops": None}]
    assert tuning.pareto_front(rows) == [rows[2], rows[1]]
    assert tuning.pareto_front(rows, accuracy_key="val_accuracy") == [rows[0]]
    assert tuning.pareto_front([]) == []


def test_pareto_front_matches_brute_force_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(20):
        # Rounded values make ties and duplicates common.
        points = [(float(a), float(b)) for a, b in np.round(rng.uniform(0, 1, (12, 2)), 1)]
        front = tuning.pareto_front(points)
        for p in points:
            dominated = any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)
            assert (p in front) == (not dominated)
        assert [p[1] for p in front] == sorted(p[1] for p in front)
        assert len(front) == sum(not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points) for p in points)


# ---------------------------------------------------------------------------------------------------------------
# Model choice


TRIALS = [
    {"trial_id": "0", "val_accuracy": 0.99, "relative_bops": 2.0},
    {"trial_id": "1", "val_accuracy": 0.98, "relative_bops": 0.7},
    {"trial_id": "2", "val_accuracy": 0.98, "relative_bops": 0.5},
    {"trial_id": "3", "val_accuracy": 0.96, "relative_bops": 0.2},
    {"trial_id": "4", "val_accuracy": None, "relative_bops": None},
]


def test_best_trial():
    assert tuning.best_trial(TRIALS)["trial_id"] == "0"
    assert tuning.best_trial(TRIALS, max_relative_bops=1.0)["trial_id"] == "2"  # tie on accuracy: fewer BOPs
    assert tuning.best_trial(TRIALS, max_relative_bops=0.3)["trial_id"] == "3"
    assert tuning.best_trial(TRIALS, min_accuracy=0.975)["trial_id"] == "2"
    assert tuning.best_trial(TRIALS, min_accuracy=0.99)["trial_id"] == "0"
    assert tuning.best_trial(TRIALS, max_relative_bops=1.0, min_accuracy=0.95)["trial_id"] == "2"


def test_best_trial_without_a_feasible_trial_raises():
    with pytest.raises(ValueError, match="max_relative_bops=0.1"):
        tuning.best_trial(TRIALS, max_relative_bops=0.1)
    with pytest.raises(ValueError, match="min_accuracy=0.999"):
        tuning.best_trial(TRIALS, min_accuracy=0.999)


# ---------------------------------------------------------------------------------------------------------------
# Search space, oracle


def test_grid_oracle_is_log_spaced_with_both_ends():
    oracle = tuning.MuGridOracle(max_trials=4, hyperparameters=tuning.search_space(mu=(1e-3, 1.0)))
    np.testing.assert_allclose(oracle.grid(), [1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    assert tuning.MuGridOracle(max_trials=1, hyperparameters=tuning.search_space(mu=(1e-2, 1.0))).grid() == [
        pytest.approx(0.1)]


def test_search_space_and_recipe_for():
    hp = tuning.search_space(mu=(1e-3, 1.0), lr_gates=(1e-3, 1e-1), init_log_alpha=(2.0, 6.0))
    assert [p.name for p in hp.space] == ["mu", "lr_gates", "init_log_alpha"]
    with pytest.raises(ValueError, match="mu="):
        tuning.search_space(mu=(1.0, 0.1))
    with pytest.raises(ValueError, match="lr_gates="):
        tuning.search_space(lr_gates=(0.0, 1.0))


def test_tuner_rejects_baselines(tmp_path):
    with pytest.raises(ValueError, match="method='float'"):
        tuning.MuTuner(method="float", directory=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# BopsBudget


def tiny_cnn():
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(8, 5, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="fc1"),
    ])


@pytest.fixture
def tiny_quantized():
    keras.backend.clear_session()
    model = quantize_model(tiny_cnn(), mu=0.1)
    model(np.zeros((2, 28, 28, 1), np.float32), training=True)
    recipe = training.get_recipe("fast", epochs=1, warmup_epochs=0)
    model.compile(training.make_optimizer(model, recipe, 10),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _assert_gates_frozen(model, steps=3):
    """Training steps leave every gate where it is and still move the weights."""
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 16)
    groups = bbits_tf.variable_groups(model)
    before = {k: [v.numpy().copy() for v in groups[k]] for k in ("gates", "weights")}
    for _ in range(steps):
        model.train_on_batch(x, y)
    for old, var in zip(before["gates"], groups["gates"]):
        np.testing.assert_array_equal(var.numpy(), old)
    assert any(not np.array_equal(var.numpy(), old) for old, var in zip(before["weights"], groups["weights"]))


@pytest.mark.parametrize("recipe", ["fast", "paper"])  # gates' learning rate: a schedule / a constant
def test_grouped_optimizer_freeze_stops_the_gates(recipe):
    keras.backend.clear_session()
    model = quantize_model(tiny_cnn(), mu=0.1)
    model(np.zeros((2, 28, 28, 1), np.float32), training=True)
    model.compile(training.make_optimizer(model, training.get_recipe(recipe, epochs=2, warmup_epochs=0), 10),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(np.zeros((2, 28, 28, 1), np.float32), np.zeros(2))  # traced before the freeze
    assert model.optimizer.freeze("gates") is True
    _assert_gates_frozen(model)
    with pytest.raises(ValueError, match="group="):
        model.optimizer.freeze("biases")


def _started(callback, model, steps=100):
    callback.set_model(model)
    callback.set_params({"steps": steps, "epochs": 1})
    callback.on_train_begin()
    return callback


def test_bops_budget_raises_mu_above_the_target_and_lowers_it_below(tiny_quantized):
    above = _started(tuning.BopsBudget(0.5, ramp_fraction=0.0, initial_mu=0.1), tiny_quantized)
    assert above.update() > 0.1 and get_mu(tiny_quantized) > 0.1  # 8-bit start: 6.25 % > 0.5 %
    below = _started(tuning.BopsBudget(50.0, ramp_fraction=0.0, initial_mu=0.1), tiny_quantized)
    assert below.update() < 0.1
    # The P term alone: log(mu / mu_0) = kp * log(bops / target).
    record = below.history[-1]
    assert math.log(record["mu"] / 0.1) == pytest.approx(0.5 * math.log(record["expected_relative_bops"] / 50.0))


def test_bops_budget_bounds_and_ramp(tiny_quantized):
    budget = _started(tuning.BopsBudget(1e-6, ramp_fraction=0.0, mu_max=0.2, initial_mu=0.1), tiny_quantized)
    for _ in range(5):
        budget.update()
    assert get_mu(tiny_quantized) == pytest.approx(0.2)
    ramp = _started(tuning.BopsBudget(0.5, ramp_fraction=1.0), tiny_quantized, steps=100)
    start = ramp.setpoint(6.25)
    assert start == pytest.approx(6.25)
    ramp._step = 50
    assert ramp.setpoint(1.0) == pytest.approx(math.sqrt(6.25 * 0.5))  # geometric halfway
    ramp._step = 200
    assert ramp.setpoint(1.0) == pytest.approx(0.5)


def test_bops_budget_freezes_the_gates_inside_the_band(tiny_quantized):
    from bbits_tf import relative_bops

    budget = _started(tuning.BopsBudget(relative_bops(tiny_quantized), ramp_fraction=0.0), tiny_quantized)
    budget._step = 5
    budget.update()
    assert budget.frozen_at_step == 5
    _assert_gates_frozen(tiny_quantized)


def test_bops_budget_guard_undoes_an_undershoot_with_the_fewest_gates_and_freezes(tiny_quantized):
    from bbits_tf import relative_bops

    start = relative_bops(tiny_quantized)
    target = 0.6 * start
    budget = _started(tuning.BopsBudget(target, ramp_fraction=0.0, freeze_band=0.05), tiny_quantized)
    budget.update()  # above the band: a snapshot, no freeze
    assert budget.frozen_at_step is None and budget.restored_gates == 0
    channel_gates = [v["log_alpha_2"] for _, _, _, v in bayesian_bits_quantizers(tiny_quantized)
                     if "log_alpha_2" in v]
    assert channel_gates, "the tiny model prunes channels"
    rng = np.random.default_rng(0)
    for g in channel_gates:  # a cliff: every channel gate falls below the threshold, to distinct values
        g.assign(rng.uniform(-5.0, -1.0, g.shape).astype(np.float32))
    assert relative_bops(tiny_quantized) < 0.95 * target
    cliff = [g.numpy().copy() for g in channel_gates]
    budget.update()
    bops = relative_bops(tiny_quantized)
    assert bops >= 0.95 * target and bops < start
    assert budget.history[-1]["relative_bops"] == pytest.approx(bops)
    assert budget.frozen_at_step is not None
    _assert_gates_frozen(tiny_quantized)
    # Restored: the gates closest to the threshold, back at their snapshot value (6); the rest untouched.
    restored = [(c[i], g, i) for g, c in zip(channel_gates, cliff) for i in np.ndindex(c.shape)
                if g.numpy()[i] != c[i]]
    assert len(restored) == budget.restored_gates == budget.history[-1]["restored_gates"] > 0
    assert all(g.numpy()[i] == pytest.approx(6.0) for _, g, i in restored)
    lowest_restored = min(v for v, _, _ in restored)
    assert all(c[i] <= lowest_restored for g, c in zip(channel_gates, cliff) for i in np.ndindex(c.shape)
               if g.numpy()[i] == c[i])
    # The fewest: closing the last one restored again drops below the band.
    _, g, i = min(restored, key=lambda r: r[0])
    g.assign(tf.tensor_scatter_nd_update(g, [list(i)], [-5.0]))
    assert relative_bops(tiny_quantized) < 0.95 * target


def test_bops_budget_without_guard_leaves_an_undershoot(tiny_quantized):
    from bbits_tf import relative_bops

    target = 0.6 * relative_bops(tiny_quantized)
    budget = _started(tuning.BopsBudget(target, ramp_fraction=0.0, guard=False), tiny_quantized)
    budget.update()
    for _, _, _, v in bayesian_bits_quantizers(tiny_quantized):
        if "log_alpha_2" in v:
            v["log_alpha_2"].assign(tf.fill(v["log_alpha_2"].shape, -5.0))
    budget.update()
    assert relative_bops(tiny_quantized) < 0.5 * target and budget.restored_gates == 0


def test_bops_budget_projected_signal_and_config(tiny_quantized):
    budget = _started(tuning.BopsBudget(0.5, signal="projected", horizon_steps=10), tiny_quantized)
    gates = budget._gates
    assert gates, "the tiny model has gates"
    budget.update()
    for g in gates:
        g.assign(g - 0.5)  # move every gate; the projection must restore the values it tried
    moved = [g.numpy().copy() for g in gates]
    budget.update()
    for g, m in zip(gates, moved):
        np.testing.assert_array_equal(g.numpy(), m)
    assert budget.history[-1]["projected_relative_bops"] <= budget.history[-1]["relative_bops"] + 1e-9
    config = budget.get_config()
    assert tuning.BopsBudget.from_config(config).get_config() == config


def test_bops_budget_validates():
    with pytest.raises(ValueError, match="signal="):
        tuning.BopsBudget(0.5, signal="exact")
    with pytest.raises(ValueError, match="target_relative_bops"):
        tuning.BopsBudget(0.0)
    with pytest.raises(ValueError, match="every_n_steps="):
        tuning.BopsBudget(0.5, every_n_steps=0)


def test_bops_budget_leaves_float_models_alone():
    model = tiny_cnn()
    budget = _started(tuning.BopsBudget(0.5), model)
    for _ in range(10):
        budget.on_train_batch_end(0)
    budget.on_epoch_end(0, {})
    assert budget.history == []


# ---------------------------------------------------------------------------------------------------------------
# A tiny sweep in this process


def _tiny_data(mnist, n_train=200, n_test=200):
    (x_train, y_train), (x_test, y_test) = mnist
    return (x_train[:n_train], y_train[:n_train]), (x_test[:n_test], y_test[:n_test])


def test_tiny_sweep_table_front_plot_choice_and_reload(mnist, tmp_path):
    recipe = training.get_recipe("fast", epochs=1, warmup_epochs=0, batch_size=50, lr_gates=0.1)
    tuner = tuning.MuTuner(tiny_cnn, recipe, max_trials=2, hyperparameters=tuning.search_space(mu=(1e-3, 10.0)),
                           directory=str(tmp_path), project_name="p")
    tuner.search(_tiny_data(mnist), verbose=0)
    rows = tuning.trials_table(tuner)
    assert rows == tuning.trials_table(tmp_path / "p")
    json.dumps(rows)  # JSON-ready
    assert [r["trial_id"] for r in rows] == ["0", "1"] and all(r["status"] == "COMPLETED" for r in rows)
    assert [r["mu"] for r in rows] == pytest.approx([1e-3, 10.0])
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        assert 0 < r["relative_bops"] <= 6.25 + 1e-9 and r["wall_time_s"] > 0 and r["attempts"] == 1
        assert (tmp_path / "p" / r["model_file"]).exists()
    result = json.loads((tmp_path / "p" / "trial_0" / "result.json").read_text())
    assert result["train_images"] == 180 and result["val_images"] == 20 and result["test_images"] == 200
    assert result["recipe"]["mu"] == pytest.approx(1e-3)

    front = tuning.pareto_front(rows)
    assert 1 <= len(front) <= 2
    path = tuning.plot_pareto(rows, tmp_path / "pareto.png", baselines=[
        {"label": "tfmot_w8a8", "test_accuracy": 0.9, "relative_bops": 6.25}])
    assert Path(path).read_bytes()[:8] == PNG_MAGIC

    choice = tuning.best_trial(rows)
    model = tuning.load_trial_model(tmp_path / "p", int(choice["trial_id"]))
    assert tuning.load_trial_model(tmp_path / "p", choice).count_params() == model.count_params()
    # The saved model is the trained one: it reproduces the recorded test accuracy.
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x_test, y_test = _tiny_data(mnist)[1]
    accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(choice["test_accuracy"], abs=1e-6)
    with pytest.raises(ValueError, match="trial_id=7"):
        tuning.load_trial_model(tmp_path / "p", 7)

    # A second search over the same folder resumes: nothing left to run.
    again = tuning.MuTuner(tiny_cnn, recipe, max_trials=2, hyperparameters=tuning.search_space(mu=(1e-3, 10.0)),
                           directory=str(tmp_path), project_name="p")
    assert again.remaining_trials == 0
    again.search(_tiny_data(mnist), verbose=0)
    assert [r["attempts"] for r in tuning.trials_table(again)] == [1, 1]


def test_a_sweep_under_the_flash_cost_records_and_plots_file_bytes(mnist, tmp_path):
    from bbits_tf import flash  # pylint: disable=import-outside-toplevel
    recipe = training.get_recipe("fast", epochs=1, warmup_epochs=0, batch_size=50, lr_gates=0.1)
    tuner = tuning.MuTuner(tiny_cnn, recipe, max_trials=1, hyperparameters=tuning.search_space(mu=(1e-3, 1e-3)),
                           directory=str(tmp_path), project_name="f", cost="flash")
    tuner.search(_tiny_data(mnist), verbose=0)
    (row,) = tuning.trials_table(tuner)
    model = tuning.load_trial_model(tmp_path / "f", row)
    assert row["flash_bytes"] == pytest.approx(flash.flash_bytes(model)) and row["arena_bytes"] > 0
    assert row["latency_us"] is None  # only under a latency table
    assert json.loads((tmp_path / "f" / "trial_0" / "result.json").read_text())["cost"] == "flash"
    assert {q.cost for _, _, q, _ in bbits_tf.bayesian_bits_quantizers(model)} == {"flash"}
    path = tuning.plot_pareto([row], tmp_path / "pareto_flash.png", bops_key="flash_bytes")
    assert Path(path).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="cost='latency'"):
        tuning.MuTuner(tiny_cnn, recipe, directory=str(tmp_path), project_name="g", cost="latency")


def test_read_baselines(tmp_path):
    for name, method in (("tfmot_w4a8", "tfmot_w4a8"), ("fast-s0", "bb")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "method": method, "test_accuracy": 0.99, "relative_bops": 3.125, "epochs": 15,
            "settings": {"train_images": 60000}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    found = tuning.read_baselines(tmp_path)
    assert [b["label"] for b in found] == ["tfmot_w4a8"] and found[0]["relative_bops"] == 3.125


# ---------------------------------------------------------------------------------------------------------------
# examples/sweep_mnist.py in subprocesses


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    for key in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _sweep_command(directory, *args):
    return [sys.executable, str(ROOT / "examples" / "sweep_mnist.py"), *TINY, "--directory", str(directory),
            "--baselines-dir", str(directory / "none"), *args]


def _status(path):
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    command = _sweep_command(tmp_path, "--trials", "3")
    project = tmp_path / "mnist_mu"
    first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        # Kill during trial 1: trial 0 has ended (the oracle wrote COMPLETED) and trial 1 has started.
        while not (_status(project / "trial_0" / "trial.json") == "COMPLETED"
                   and (project / "trial_1" / "attempts.log").exists()):
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the sweep did not reach trial 1"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert _status(project / "trial_1" / "trial.json") != "COMPLETED", "trial 1 finished before the kill"
    assert not (project / "trial_2").exists()
    trial_0 = (project / "trial_0" / "result.json").read_text()

    # The restart also runs the (tiny) BopsBudget run and its comparison with the sweep.
    second = subprocess.run(command + ["--budget", "5.0", "--budget-every", "1"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert (project / "trial_0" / "result.json").read_text() == trial_0  # not re-run
    rows = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert [r["trial_id"] for r in rows] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" and r["test_accuracy"] is not None for r in rows)
    assert [r["attempts"] for r in rows] == [1, 2, 1]  # only the interrupted trial ran again
    assert json.loads((project / "trial_0" / "result.json").read_text())["pid"] == first.pid
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "pareto.json").read_text())["front"]
    [budget] = json.loads((tmp_path / "budget.json").read_text())["budgets"]
    assert budget["target_relative_bops"] == 5.0 and budget["sweep"]["trials"] == 3
    assert budget["sweep"]["total_wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in rows))
    assert budget["budget_run"]["wall_time_s"] > 0 and isinstance(budget["within_10_percent"], bool)
    assert (tmp_path / "budget_5" / "model.h5").exists()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_runs_trials_of_a_chief_oracle_in_process(mnist, tmp_path, monkeypatch):
    """The chief/worker code path in one process: ``serve_oracle`` in a thread, a worker ``MuTuner`` here."""
    import threading

    port = str(_free_port())
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", port)
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "worker0")
    space = tuning.search_space(mu=(1e-2, 1.0))
    oracle = tuning.MuGridOracle(keras_tuner_objective(), max_trials=2, hyperparameters=space)
    oracle._set_project_dir(str(tmp_path), "p")
    errors = []

    def chief():
        try:
            tuning.serve_oracle(oracle, poll_seconds=0.1)
        except Exception as error:  # pragma: no cover  (reported below)
            errors.append(error)

    thread = threading.Thread(target=chief, daemon=True)
    thread.start()
    recipe = training.get_recipe("fast", epochs=1, warmup_epochs=0, batch_size=50)
    worker = tuning.MuTuner(tiny_cnn, recipe, max_trials=2, hyperparameters=space, directory=str(tmp_path),
                            project_name="p", overwrite=True)  # a worker never overwrites
    assert tuning.is_worker() and worker._is_worker()
    worker.search(_tiny_data(mnist), verbose=0)
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors
    rows = tuning.trials_table(tmp_path / "p")
    assert [r["trial_id"] for r in rows] == ["0", "1"]
    assert all(r["status"] == "COMPLETED" and r["tuner_id"] == "worker0" and r["attempts"] == 1 for r in rows)
    assert [r["mu"] for r in rows] == pytest.approx([1e-2, 1.0])
    assert sorted(oracle.end_order) == ["0", "1"] and not oracle.ongoing_trials


def keras_tuner_objective():
    import keras_tuner

    return keras_tuner.Objective("val_accuracy", "max")


# Three processes that each import TensorFlow: 64 s at load 6, over 90 s when busier (2 cores). Not marked slow: no
# other test covers Keras Tuner's chief/worker mode, so it stays in the default run.
def test_chief_and_two_workers_run_every_trial_once(tmp_path):
    port = str(_free_port())
    command = _sweep_command(tmp_path, "--trials", "4")
    common = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
    procs = {name: subprocess.Popen(command, cwd=ROOT, env=_env(KERASTUNER_TUNER_ID=name, **common),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("chief", "worker0", "worker1")}
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=300)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {outputs[name][-3000:]}"
    rows = json.loads((tmp_path / "trials.json").read_text())["trials"]  # written by the chief
    assert [r["trial_id"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["status"] == "COMPLETED" and r["test_accuracy"] is not None for r in rows)
    assert all(r["attempts"] == 1 for r in rows)
    assert {r["tuner_id"] for r in rows} <= {"worker0", "worker1"}
    assert "no trials left" in outputs["worker0"] and "no trials left" in outputs["worker1"]
    oracle = json.loads((tmp_path / "mnist_mu" / "oracle.json").read_text())
    assert sorted(oracle["end_order"]) == ["0", "1", "2", "3"]


def test_sweep_under_the_latency_cost_measures_a_table_and_plots_latency(tmp_path):
    """``sweep_mnist.py --cost latency``: the table is measured once (latency_table.json), trials charge it and
    record their predicted latency, and pareto_latency.png is drawn."""
    done = subprocess.run(_sweep_command(tmp_path, "--trials", "1", "--cost", "latency"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((tmp_path / "latency_table.json").read_text())
    assert sorted(table["layers"]) == ["conv1", "fc1", "flatten", "pool1"]  # tiny_cnn: 8C5-MP4-10
    (row,) = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert row["latency_us"] > 0 and row["flash_bytes"] > 0
    for name in ("pareto.png", "pareto_flash.png", "pareto_latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
