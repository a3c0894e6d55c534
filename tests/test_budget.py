"""Tests of bbits_tf.budget.BopsBudget: argument checks and the state that a checkpoint keeps (its controller and
landing behaviour are tested in test_tuning.py)."""
import json
import math

import numpy as np
import pytest

from bbits_tf import training
from bbits_tf._keras import keras
from bbits_tf.budget import BopsBudget
from bbits_tf.quantize import get_mu, quantize_model


@pytest.mark.parametrize("kwargs,error,match", [
    ({"target_relative_bops": "1"}, TypeError, r"`target_relative_bops` must be a number\. Received: "
                                               r"target_relative_bops='1' of type str"),
    ({"target_relative_bops": 200}, ValueError, r"percentage of the FP32 BOPs and must be in \(0, 100\]\. "
                                                r"Received: target_relative_bops=200"),
    ({"target_relative_bops": 100.5}, ValueError, "target_relative_bops=100.5"),
    ({"target_relative_bops": 0}, ValueError, "target_relative_bops=0"),
    ({"target_relative_bops": float("nan")}, ValueError, "`target_relative_bops` must be finite"),
    ({"target_relative_bops": float("inf")}, ValueError, "`target_relative_bops` must be finite"),
    ({"target_relative_bops": True}, TypeError, "target_relative_bops=True"),
    ({"every_n_steps": 2.5}, TypeError, "every_n_steps=2.5"),
    ({"every_n_steps": "5"}, TypeError, "every_n_steps='5'"),
    ({"kp": -0.5}, ValueError, "kp=-0.5"),
    ({"ki": float("nan")}, ValueError, "`ki` must be finite"),
    ({"kp": "0.5"}, TypeError, "kp='0.5'"),
    ({"integral_band": 0.0}, ValueError, "integral_band=0.0"),
    ({"shrink_tolerance": -1}, ValueError, "shrink_tolerance=-1"),
    ({"ramp_fraction": 1.5}, ValueError, "ramp_fraction=1.5"),
    ({"ramp_fraction": float("nan")}, ValueError, "`ramp_fraction` must be finite"),
    ({"freeze_band": 0.0}, ValueError, "freeze_band=0.0"),
    ({"freeze_band": "0.05"}, TypeError, "freeze_band='0.05'"),
    ({"mu_min": 0.0}, ValueError, "mu_min=0.0"),
    ({"mu_max": float("inf")}, ValueError, "`mu_max` must be finite"),
    ({"mu_min": 1.0, "mu_max": 0.5}, ValueError, "mu_min=1.0, mu_max=0.5"),
    ({"initial_mu": -0.1}, ValueError, "initial_mu=-0.1"),
    ({"initial_mu": "0.1"}, TypeError, "initial_mu='0.1'"),
    ({"horizon_steps": float("inf")}, ValueError, "`horizon_steps` must be finite"),
    ({"print_fn": "stdout"}, TypeError, "print_fn='stdout'"),
    ({"guard": "yes"}, TypeError, "guard='yes'"),
])
def test_bops_budget_rejects_bad_arguments_naming_them(kwargs, error, match):
    kwargs = {"target_relative_bops": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        BopsBudget(**kwargs)


def test_bops_budget_accepts_the_edges_and_numpy_numbers():
    budget = BopsBudget(100, every_n_steps=np.int64(3), ramp_fraction=0, freeze_band=None, initial_mu=0.0,
                       mu_min=np.float32(0.5), mu_max=0.5)
    assert (budget.target_relative_bops, budget.every_n_steps, budget.mu_min) == (100.0, 3, 0.5)
    assert BopsBudget.from_config(budget.get_config()).get_config() == budget.get_config()


def _started(budget, model, steps=20, epochs=1):
    budget.set_model(model)
    budget.set_params({"steps": steps, "epochs": epochs})
    budget.on_train_begin()
    return budget


@pytest.fixture
def quantized():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = quantize_model(keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 5, name="conv"),
                                             keras.layers.Flatten(), keras.layers.Dense(10, name="fc")]), mu=0.1)
    model.compile(training.make_optimizer(model, training.get_recipe("fast", epochs=1, warmup_epochs=0), 20),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_bops_budget_state_round_trips_through_json_and_continues_the_fit(quantized):
    budget = _started(BopsBudget(0.5, signal="projected", every_n_steps=1, ramp_fraction=1.0, initial_mu=0.2),
                      quantized)
    for _ in range(3):
        budget.on_train_batch_end(0)
        for g in budget._gates:  # pylint: disable=protected-access
            g.assign(g - 0.25)  # gates that move: a velocity for the projection
    state = json.loads(json.dumps(budget.get_state()))
    assert state["_step"] == 3 and state["_fit_start"] == 0 and len(state["history"]) == 3
    assert state["_log_mu0"] == pytest.approx(math.log(0.2)) and state["_start_bops"] is not None
    assert state["_snapshot"] is not None and state["_velocity"] is not None

    resumed = BopsBudget(0.5, signal="projected", every_n_steps=1, ramp_fraction=1.0, initial_mu=0.2)
    resumed.set_state(state)
    mu = get_mu(quantized)
    _started(resumed, quantized)
    # The interrupted fit goes on: same ramp start, same integral, same velocity; mu is left as the model has it.
    assert resumed._fit_start == 0 and resumed._start_bops == budget._start_bops  # pylint: disable=protected-access
    assert resumed._integral == budget._integral and get_mu(quantized) == mu  # pylint: disable=protected-access
    assert resumed._ramp_done() == pytest.approx(3 / 20)  # pylint: disable=protected-access
    for a, b in zip(resumed._velocity, budget._velocity):  # pylint: disable=protected-access
        np.testing.assert_array_equal(a, b)
    assert resumed.history == budget.history
    # Without set_state a second fit starts its own ramp (as before checkpoints existed).
    _started(budget, quantized)
    assert budget._fit_start == 3 and budget._start_bops is None  # pylint: disable=protected-access
    # A restored state only applies to the next fit.
    _started(resumed, quantized)
    assert resumed._fit_start == 3  # pylint: disable=protected-access


def test_bops_budget_keeps_its_frozen_gates_in_the_state(quantized):
    from bbits_tf import relative_bops

    budget = _started(BopsBudget(relative_bops(quantized), every_n_steps=1, ramp_fraction=0.0), quantized)
    budget.on_train_batch_end(0)
    assert budget.frozen_at_step == 1 and quantized.optimizer.frozen_groups() == ["gates"]
    resumed = BopsBudget(relative_bops(quantized), every_n_steps=1, ramp_fraction=0.0)
    resumed.set_state(json.loads(json.dumps(budget.get_state())))
    assert resumed.frozen_at_step == 1
    _started(resumed, quantized)
    resumed.on_train_batch_end(0)
    assert resumed.history == budget.history  # frozen: no more updates
    with pytest.raises(ValueError, match="Not a BopsBudget state"):
        resumed.set_state({"history": []})
