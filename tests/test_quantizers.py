"""The quantizer and config shells: serialization round trips, fixed-bit mode, float32 under mixed precision."""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf._keras import keras
from bbits_tf.configs import BayesianBitsQuantizeConfig
from bbits_tf.quantizers import BayesianBitsQuantizer


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bit_widths": (8,), "prune": True, "mac_weight": 0.5},
     {"signed": False, "gate": "gumbel_sigmoid", "init_log_alpha": (6, 6, 6, 6), "mu": 0.3}],
)
def test_quantizer_round_trips_through_config(kwargs):
    q = BayesianBitsQuantizer(**kwargs)
    again = BayesianBitsQuantizer.from_config(q.get_config())
    assert again == q and again.get_config() == q.get_config()
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q))
    assert restored == q


def test_config_round_trips():
    config = BayesianBitsQuantizeConfig(BayesianBitsQuantizer(prune=True), BayesianBitsQuantizer(signed=False))
    again = BayesianBitsQuantizeConfig.from_config(config.get_config())
    assert again == config
    assert BayesianBitsQuantizeConfig.from_config(BayesianBitsQuantizeConfig().get_config()) == BayesianBitsQuantizeConfig()


def test_scheme_registry_supports_exactly_three_layer_types():
    registry = bbits_tf.BayesianBitsQuantizeScheme().get_quantize_registry()
    assert registry.supports(keras.layers.Dense(2))
    assert registry.supports(keras.layers.Conv2D(2, 3))
    assert registry.supports(keras.layers.DepthwiseConv2D(3))
    assert not registry.supports(keras.layers.BatchNormalization())
    with pytest.raises(ValueError, match="Received: layer="):
        registry.get_quantize_config(keras.layers.BatchNormalization())


def test_bad_init_log_alpha_raises():
    with pytest.raises(ValueError, match="init_log_alpha"):
        BayesianBitsQuantizer(init_log_alpha=(6.0,))


def test_fixed_8_bit_quantizer_and_pruning_only():
    qmodel = bbits_tf.quantize_model(bbits_tf.models.lenet5(), fixed_weight_bits=8)
    weight_quantizers = [q for _, role, q, _ in bbits_tf.bayesian_bits_quantizers(qmodel) if role == "weight"]
    assert all(q.bit_widths == (8,) and q.num_gates == 0 for q in weight_quantizers)
    assert bbits_tf.summary(qmodel).relative_bops == pytest.approx(6.25)
    qmodel = bbits_tf.quantize_model(bbits_tf.models.lenet5(), fixed_weight_bits=4)
    assert bbits_tf.summary(qmodel).relative_bops == pytest.approx(3.125)


def test_quantizer_math_runs_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
        qmodel = bbits_tf.quantize_model(model)
        x = np.random.default_rng(0).random((4, 16), dtype=np.float32)
        hidden = keras.Model(qmodel.inputs, qmodel.layers[0].output)(x, training=True)
        assert hidden.dtype == tf.float16
        variables = [v for _, role, _, v in bbits_tf.bayesian_bits_quantizers(qmodel) if role == "activation"][0]
        assert variables["x_max"].dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
