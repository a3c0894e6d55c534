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


# ------------------------------------------------------------------------ inference bias on the int32 grid

LOG_ALPHA = {2: (-6.0, -6.0, -6.0, -6.0), 4: (6.0, -6.0, -6.0, -6.0), 8: (6.0, 6.0, -6.0, -6.0)}


def _two_conv_model():
    """c1 (ReLU) -> max pool -> c2 (bias) -> Flatten -> d; c1 -> pool -> c2 is read through a pass-through layer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.Conv2D(5, 2, activation="relu", name="c2")(keras.layers.MaxPooling2D(name="pool")(h))
    outputs = keras.layers.Dense(3, name="d")(keras.layers.Flatten(name="flat")(h))
    return keras.Model(inputs, outputs)


def _bias_model(c1_act_bits, c2_weight_bits):
    qmodel = bbits_tf.quantize_model(_two_conv_model())
    x = np.random.default_rng(1).random((16, 8, 8, 1), dtype=np.float32)
    bbits_tf.initialize_ranges(qmodel, x)
    table = {(w.layer.name, role): (q, v) for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel)}
    table[("c1", "activation")][1]["log_alpha"].assign(LOG_ALPHA[c1_act_bits])
    table[("c2", "weight")][1]["log_alpha"].assign(LOG_ALPHA[c2_weight_bits])
    bias = np.random.default_rng(2).normal(0.0, 0.3, 5).astype(np.float32)
    next(v for v in qmodel.get_layer("quant_c2").weights if v.name.endswith("/bias:0")).assign(bias)
    return qmodel, table, bias, x


@pytest.mark.parametrize("act_bits, weight_bits, refinement", [(2, 2, 64), (4, 4, 16), (2, 8, 1)])
def test_inference_bias_is_on_the_exported_int32_grid(act_bits, weight_bits, refinement):
    qmodel, table, bias, _ = _bias_model(act_bits, weight_bits)
    (q_in, v_in), (q_w, v_w) = table[("c1", "activation")], table[("c2", "weight")]
    assert q_w.input_quantizer[0] is q_in  # linked through the max pool by quantize_model
    assert bbits_tf.ops.int8_refinement(weight_bits) == refinement
    grid = q_in.step_size(v_in) * q_w.step_size(v_w) / refinement  # NumPy: s_in * s_w / f
    expected = np.round(bias.astype(np.float64) / grid) * grid
    kernel = qmodel.get_layer("quant_c2").weights[0]
    _, inference_bias = q_w(kernel, False, v_w)
    np.testing.assert_allclose(inference_bias.numpy(), expected, rtol=1e-5, atol=1e-7 * grid)
    assert np.abs(inference_bias.numpy() - bias).max() > 1e-3 * grid  # it really moved
    assert np.abs(inference_bias.numpy() - bias).max() <= 0.5 * grid * (1 + 1e-5)
    _, training_bias = q_w(kernel, True, v_w)  # training keeps the float bias
    np.testing.assert_array_equal(training_bias.numpy(), bias)
    # c1 reads the model input (no quantizer): its bias stays float
    q1, v1 = table[("c1", "weight")]
    assert q1.input_quantizer is None
    b1 = next(v for v in qmodel.get_layer("quant_c1").weights if v.name.endswith("/bias:0")).numpy()
    np.testing.assert_array_equal(q1(qmodel.get_layer("quant_c1").weights[0], False, v1)[1].numpy(), b1)


def test_plain_keras_load_finds_the_input_grid_on_the_first_call(tmp_path):
    qmodel, table, _, x = _bias_model(2, 2)
    path = str(tmp_path / "m.h5")
    qmodel.save(path)
    with bbits_tf.quantize_scope():
        loaded = keras.models.load_model(path, compile=False)
    q_w = loaded.get_layer("quant_c2")._weight_vars[0][1]  # pylint: disable=protected-access
    assert q_w.input_quantizer is None  # not linked by a plain load ...
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert q_w.input_quantizer is not None  # ... found in the Keras graph on the first call
    assert q_w.input_quantizer[0] is loaded.get_layer("quant_c1")._output_quantizers[0]  # pylint: disable=protected-access


def test_input_range_puts_the_first_layers_bias_on_the_input_grid(tmp_path):
    keras.utils.set_random_seed(0)
    qmodel = bbits_tf.quantize_model(_two_conv_model(), input_range=(0.0, 1.0))
    x = np.random.default_rng(1).random((16, 8, 8, 1), dtype=np.float32)
    bbits_tf.initialize_ranges(qmodel, x)
    table = {(w.layer.name, role): (q, v) for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel)}
    q1, v1 = table[("c1", "weight")]
    assert q1.input_step == pytest.approx(1 / 255) and table[("c2", "weight")][0].input_step is None
    bias_var = next(v for v in qmodel.get_layer("quant_c1").weights if v.name.endswith("/bias:0"))
    bias = np.random.default_rng(2).normal(0.0, 0.3, 4).astype(np.float32)
    bias_var.assign(bias)
    grid = (1 / 255) * q1.step_size(v1) / bbits_tf.ops.int8_refinement(q1.bit_width(v1))
    _, inference_bias = q1(qmodel.get_layer("quant_c1").weights[0], False, v1)
    np.testing.assert_allclose(inference_bias.numpy(), np.round(bias / grid) * grid, rtol=1e-5, atol=1e-7 * grid)
    assert np.abs(inference_bias.numpy() - bias).max() > 1e-3 * grid
    # saved with the model; set_input_range gives it to a model quantized without one
    path = str(tmp_path / "m.h5")
    qmodel.save(path)
    loaded = bbits_tf.load_model(path)
    assert loaded.get_layer("quant_c1")._weight_vars[0][1].input_step == pytest.approx(1 / 255)  # pylint: disable=protected-access
    plain = bbits_tf.quantize_model(_two_conv_model())
    assert bbits_tf.set_input_range(plain, (-1.0, 1.0)) == ["c1"]
    assert plain.get_layer("quant_c1")._weight_vars[0][1].input_step == pytest.approx(2 / 255)  # pylint: disable=protected-access
    for bad in [(1.0, 0.0), (0.0, float("inf")), "0,1", None]:
        with pytest.raises(ValueError, match="input_range"):
            bbits_tf.set_input_range(plain, bad)
