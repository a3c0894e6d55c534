"""Callbacks: NonFiniteGuard stops training at the first NaN/Inf and names the layer and variable."""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import models, training
from bbits_tf._keras import keras
from bbits_tf.callbacks import NonFiniteError, NonFiniteGuard, first_non_finite_variable


def _poisoned(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    x[70, 5, 5, 0] = np.nan  # in the 3rd batch of 32
    return x, y


def _compiled_lenet():
    tf.random.set_seed(0)
    q = bbits_tf.quantize_model(models.lenet5())
    bbits_tf.initialize_ranges(q, _poisoned()[0])  # x[:2]: finite
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q


def test_guard_stops_at_the_first_nan_and_names_the_first_layer():
    q, (x, y) = _compiled_lenet(), _poisoned()
    # The NaN pixel is in batch 3; ReLU turns the NaN activations into 0 so batch 3's loss is finite, but its
    # update makes conv1's kernel NaN, which batch 4's loss shows: the guard stops there.
    with pytest.raises(NonFiniteError,
                       match=r"epoch 1, batch 4: the first non-finite variable is layer 'conv1', variable 'kernel'"):
        q.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[NonFiniteGuard()])
    layer, variable, bad, size = first_non_finite_variable(q)
    assert layer == "conv1" and bad > 0 and size >= bad


def test_without_the_guard_the_same_data_silently_poisons_the_model():
    # What the guard prevents: training goes on and every variable of conv1 is NaN afterwards.
    q, (x, y) = _compiled_lenet(), _poisoned()
    q.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert first_non_finite_variable(q)[0] == "conv1"


def test_training_run_refuses_non_finite_data_before_training():
    x, y = _poisoned(80)
    data = ((x, y), (x[:8] * 0, y[:8]))
    recipe = training.get_recipe("fast", epochs=1, warmup_epochs=0)
    with pytest.raises(ValueError, match="x_train.*first is example 70"):
        training.run(models.lenet5, recipe, data, verbose=0, print_fn=None)


def test_guard_is_silent_on_clean_training():
    rng = np.random.default_rng(3)
    q = bbits_tf.quantize_model(models.lenet5())
    x = rng.uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    bbits_tf.initialize_ranges(q, x)
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[NonFiniteGuard()])
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert first_non_finite_variable(q) is None
