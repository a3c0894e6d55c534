"""quantize_model on LeNet5 and friends: structure, regularizer, training, serialization, bad input."""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import models
from bbits_tf._keras import keras


@pytest.fixture(scope="module")
def qlenet():
    return bbits_tf.quantize_model(models.lenet5(), mu=0.1)


def _quantizers(model):
    return {(layer.layer.name, role): (q, v) for layer, role, q, v in bbits_tf.bayesian_bits_quantizers(model)}


def _variable(model, layer, suffix):
    """A float variable of a wrapped layer (``layer.kernel`` is the quantized tensor after a call)."""
    (var,) = [v for v in model.get_layer(f"quant_{layer}").weights if v.name.endswith(f"/{suffix}:0")]
    return var


def test_lenet5_has_7_quantizers_and_636_gates(qlenet):
    quantizers = bbits_tf.bayesian_bits_quantizers(qlenet)
    assert len(quantizers) == 7  # 4 weight + 3 activation quantizers; the logits stay float
    z2 = sum(int(np.prod(v["log_alpha_2"].shape)) for _, _, _, v in quantizers if "log_alpha_2" in v)
    bit_gates = sum(int(np.prod(v["log_alpha"].shape)) for _, _, _, v in quantizers)
    assert (z2, bit_gates, z2 + bit_gates) == (608, 28, 636)


def test_roles_signs_pruning_and_regularizer_weights(qlenet):
    q = _quantizers(qlenet)
    # Spec 4, LeNet5 table of c_k.
    want = {
        ("conv1", "weight"): 0.140625, ("conv2", "weight"): 1.0, ("fc1", "weight"): 0.16,
        ("fc2", "weight"): 0.0015625, ("conv1", "activation"): 1.0, ("conv2", "activation"): 0.16,
        ("fc1", "activation"): 0.0015625,
    }
    assert {k: quantizer.mac_weight for k, (quantizer, _) in q.items()} == pytest.approx(want)
    assert all(quantizer.signed for (_, role), (quantizer, _) in q.items() if role == "weight")
    assert not any(quantizer.signed for (_, role), (quantizer, _) in q.items() if role == "activation")
    assert [name for (name, role), (quantizer, _) in q.items() if quantizer.prune] == ["conv1", "conv2", "fc1"]
    assert ("fc2", "activation") not in q


def test_regularizer_value_matches_spec_formula(qlenet):
    # Every gate at its initial value: q = sigmoid(6 + 1.5986) for gates 4, 8 and sigmoid(-6 + 1.5986) above.
    q6, qm6 = 1 / (1 + np.exp(-(6 + 1.598597))), 1 / (1 + np.exp(-(-6 + 1.598597)))
    chain = lambda c, first: c * (first + 4 * q6 + 8 * q6 * q6 + 16 * q6 * q6 * qm6 + 32 * q6 * q6 * qm6 * qm6)
    pruned = sum(q6 * chain(c, 2) for c in (0.140625, 1.0, 0.16))
    unpruned = sum(1 + chain(c, 0) for c in (0.0015625, 1.0, 0.16, 0.0015625))
    got = float(bbits_tf.regularization_loss(qlenet))
    assert got == pytest.approx(0.1 * (pruned + unpruned), rel=1e-5)
    assert float(sum(qlenet.losses)) == pytest.approx(got, rel=1e-6)


def test_set_mu_changes_the_loss_without_rebuilding():
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
    before = float(bbits_tf.regularization_loss(qmodel))
    bbits_tf.set_mu(qmodel, 0.3)
    assert bbits_tf.get_mu(qmodel) == pytest.approx(0.3)
    assert float(bbits_tf.regularization_loss(qmodel)) == pytest.approx(3 * before, rel=1e-6)
    with pytest.raises(ValueError, match="mu"):
        bbits_tf.set_mu(qmodel, -1.0)


def test_one_training_step_moves_weights_ranges_and_gates():
    tf.random.set_seed(0)
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
    rng = np.random.default_rng(0)
    x = rng.random((16, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    qmodel(x[:2], training=True)  # data-dependent range initialisation (spec 1.5)
    groups = bbits_tf.variable_groups(qmodel)
    assert [len(groups[k]) for k in ("weights", "ranges", "gates")] == [8, 7, 10]
    before = {k: [v.numpy().copy() for v in vs] for k, vs in groups.items()}
    qmodel.compile(keras.optimizers.Adam(1e-3, epsilon=1e-8), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = qmodel.train_on_batch(x, y)
    assert np.isfinite(loss)
    for key, variables in groups.items():
        for old, var in zip(before[key], variables):
            assert not np.allclose(old, var.numpy()), f"{key}: {var.name} did not move"


def test_range_initialised_from_data_on_first_call():
    qmodel = bbits_tf.quantize_model(models.lenet5())
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    qmodel(x, training=True)
    q = _quantizers(qmodel)
    kernel = _variable(qmodel, "conv1", "kernel").numpy()
    assert float(q[("conv1", "weight")][1]["x_max"].numpy()) == pytest.approx(np.abs(kernel).max(), rel=1e-6)
    assert float(q[("conv1", "weight")][1]["range_initialized"].numpy()) == 1.0


def test_inference_uses_deterministic_gates_and_lies_on_the_grid(qlenet):
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    out1 = qlenet(x, training=False).numpy()
    out2 = qlenet(x, training=False).numpy()
    np.testing.assert_array_equal(out1, out2)
    # Hidden activations of fc1 are unsigned 8-bit: integers times the step x_max / 255.
    fc1 = keras.Model(qlenet.inputs, qlenet.get_layer("quant_fc1").output)(x, training=False).numpy()
    step = float(_quantizers(qlenet)[("fc1", "activation")][1]["x_max"].numpy()) / 255
    np.testing.assert_allclose(fc1 / step, np.round(fc1 / step), atol=2e-3)


def test_pruned_channel_outputs_activation_of_zero():
    keras.utils.set_random_seed(0)  # the kept channels' outputs must be positive somewhere: a fixed init
    qmodel = bbits_tf.quantize_model(models.lenet5())
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    qmodel(x, training=True)
    _variable(qmodel, "conv1", "bias").assign(np.full(32, 0.5, np.float32))
    _, variables = _quantizers(qmodel)[("conv1", "weight")]
    variables["log_alpha_2"].assign(np.where(np.arange(32) < 5, -6.0, 6.0).astype(np.float32))
    conv1 = keras.Model(qmodel.inputs, qmodel.get_layer("quant_conv1").output)(x, training=False).numpy()
    assert np.count_nonzero(conv1[..., :5]) == 0  # bias masked too: relu(0) = 0
    assert np.all(conv1[..., 5:].max(axis=(0, 1, 2)) > 0)


def test_sequential_and_functional_with_a_branch():
    inputs = keras.Input((12, 12, 3))
    a = keras.layers.Conv2D(8, 3, activation="relu", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, activation="relu", name="b")(inputs)
    c = keras.layers.Concatenate(name="cat")([a, b])
    d = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(c)
    f = keras.layers.Flatten()(keras.layers.MaxPooling2D()(d))
    out = keras.layers.Dense(5, name="head")(f)
    model = keras.Model(inputs, out)
    qmodel = bbits_tf.quantize_model(model)
    q = _quantizers(qmodel)
    # The concatenation has one grid (one scale in TFLite): its inputs a and b get no quantizer of their own.
    assert sorted(q) == sorted([("a", "weight"), ("b", "weight"), ("cat", "activation"),
                                ("dw", "weight"), ("dw", "activation"), ("head", "weight")])
    # A depthwise conv is pruned with its input channels; these come out of a Concatenate, which has no gates.
    assert not q[("dw", "weight")][0].prune and "log_alpha_2" not in q[("dw", "weight")][1]
    assert [tuple(q[(n, "weight")][1]["log_alpha_2"].shape) for n in ("a", "b")] == [(8,), (4,)]
    # The concatenation feeds the depthwise conv: its quantizer is charged the conv's MACs.
    dw_macs = 8 * 8 * 9 * 12
    max_macs = max(10 * 10 * 27 * 8, 10 * 10 * 27 * 4, dw_macs, 4 * 4 * 12 * 5)
    assert q[("cat", "activation")][0].mac_weight == pytest.approx(dw_macs / max_macs)
    assert not q[("cat", "activation")][0].signed  # both inputs come out of a ReLU
    x = np.random.default_rng(0).random((3, 12, 12, 3), dtype=np.float32)
    qmodel.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(qmodel.train_on_batch(x, np.array([0, 1, 2])))
    profile = bbits_tf.summary(qmodel)
    assert [r.name for r in profile.layers] == ["a", "b", "dw", "head"]
    assert profile.relative_bops == pytest.approx(6.25)


def _subclassed():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 4), np.float32))
    return net


@pytest.mark.parametrize(
    "make, match",
    [
        (_subclassed, "subclassed"),
        (lambda: keras.Sequential([keras.layers.Dense(3)]), "no defined input shape"),
        (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Flatten()]), "no Conv2D"),
        (lambda: "not a model", "Expected a tf_keras Model"),
    ],
)
def test_bad_models_raise(make, match):
    with pytest.raises(ValueError, match=match):
        bbits_tf.quantize_model(make())


def test_keras3_model_raises_with_advice():
    import keras as keras3  # Keras 3 (what TensorFlow 2.21 bundles); only to check the error message

    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
    with pytest.raises(ValueError, match="Keras 3"):
        bbits_tf.quantize_model(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mu": -1}, "mu"), ({"gate": "gumbel"}, "gate"), ({"bit_widths": (2, 3)}, "bit_widths"),
     ({"init_log_alpha": (6,)}, "init_log_alpha")],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bbits_tf.quantize_model(models.lenet5(), **kwargs)


def test_report_lists_float_layers_with_reasons(qlenet):
    report = qlenet.bbits_report
    assert report.quantized == ["conv1", "conv2", "fc1", "fc2"]
    assert {name for name, _, _ in report.skipped} == {"pool1", "pool2", "flatten"}
    vgg = bbits_tf.quantize_model(models.vgg7())
    folded = {name: into for name, _, into in vgg.bbits_report.folded}
    assert folded["conv1_bn"] == "conv1" and folded["conv1_relu"] == "conv1"
    assert "conv1_bn" not in {name for name, _, _ in vgg.bbits_report.skipped}


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_save_and_reload_gives_identical_outputs(tmp_path, suffix):
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.05)
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    qmodel(x, training=True)
    _quantizers(qmodel)[("conv2", "weight")][1]["log_alpha_2"].assign(np.linspace(-3, 3, 64).astype(np.float32))
    bbits_tf.set_mu(qmodel, 0.2)
    want = qmodel(x, training=False).numpy()
    path = str(tmp_path / f"model{suffix}")
    qmodel.save(path)
    with bbits_tf.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), want)
    assert bbits_tf.get_mu(loaded) == pytest.approx(0.2)
    assert float(bbits_tf.regularization_loss(loaded)) == pytest.approx(float(bbits_tf.regularization_loss(qmodel)))
    assert bbits_tf.summary(loaded).relative_bops == pytest.approx(bbits_tf.summary(qmodel).relative_bops)


# --- bad input never yields a silently wrong model --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mu": float("nan")}, ValueError, "mu"),
        ({"mu": float("inf")}, ValueError, "mu"),
        ({"mu": "0.1"}, TypeError, "mu"),
        ({"mu": True}, TypeError, "mu"),
        ({"init_log_alpha": 6}, TypeError, "init_log_alpha"),
        ({"init_log_alpha": (6, 6, -6, -6, 6)}, ValueError, "exactly 4"),
        ({"init_log_alpha": (6, 6, float("nan"), -6)}, ValueError, "finite"),
        ({"bit_widths": "248"}, ValueError, "bit_widths"),
        ({"bit_widths": (1, 2)}, ValueError, "width >= 2"),
        ({"fixed_weight_bits": 1}, ValueError, "width >= 2"),
        ({"prune": "no"}, TypeError, "prune"),
        ({"mask_bias": 1}, TypeError, "mask_bias"),
    ],
)
def test_bad_arguments_raise_with_the_argument_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        bbits_tf.quantize_model(models.lenet5(), **kwargs)


def test_default_init_log_alpha_follows_a_shorter_chain():
    q = bbits_tf.quantize_model(models.lenet5(), bit_widths=(2, 4, 8))
    assert {quantizer.init_log_alpha for _, _, quantizer, _ in bbits_tf.bayesian_bits_quantizers(q)} == {(6.0, 6.0)}


@pytest.mark.parametrize("mu", [float("nan"), float("inf"), -0.5, "0.1"])
def test_set_mu_rejects_non_finite_and_negative(qlenet, mu):
    before = bbits_tf.get_mu(qlenet)
    with pytest.raises((ValueError, TypeError), match="mu"):
        bbits_tf.set_mu(qlenet, mu)
    assert bbits_tf.get_mu(qlenet) == before


def test_quantizing_a_quantized_model_says_so(qlenet):
    with pytest.raises(ValueError, match="already quantized"):
        bbits_tf.quantize_model(qlenet)


def test_shared_layer_is_rejected_with_its_call_count():
    inputs = keras.Input((8,))
    dense = keras.layers.Dense(8, activation="relu", name="shared")
    outputs = keras.layers.Dense(2, name="head")(dense(dense(inputs)))
    with pytest.raises(ValueError, match=r"shared layers \(name: calls\) \{'shared': 2\}"):
        bbits_tf.quantize_model(keras.Model(inputs, outputs))


def _zero_bias_mlp():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu", bias_initializer="zeros", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def test_all_zero_first_batch_does_not_fix_the_ranges_and_the_next_batch_sets_them():
    q = bbits_tf.quantize_model(_zero_bias_mlp())
    bbits_tf.initialize_ranges(q, np.zeros((2, 6), np.float32))  # every activation is relu(0) = 0
    state = bbits_tf.ranges_initialized(q)
    assert state == {"hidden/weight": True, "hidden/activation": False, "head/weight": True}
    x = np.random.default_rng(0).uniform(0.5, 1.0, (4, 6)).astype(np.float32)
    q(x, training=True)
    assert all(bbits_tf.ranges_initialized(q).values())
    (_, _, _, act_vars), = [e for e in bbits_tf.bayesian_bits_quantizers(q) if e[1] == "activation"]
    assert float(act_vars["x_max"].numpy()) > 1e-3  # set from the real batch, not the 1e-8 clamp


def test_inference_never_sets_the_ranges():
    q = bbits_tf.quantize_model(_zero_bias_mlp())
    x = np.random.default_rng(1).uniform(0.5, 1.0, (4, 6)).astype(np.float32)
    before = [v.numpy().copy() for v in q.variables]
    q(x, training=False)
    q.predict(x, verbose=0)
    assert not any(bbits_tf.ranges_initialized(q).values())
    for a, v in zip(before, q.variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_initialize_ranges_rejects_nan_data():
    q = bbits_tf.quantize_model(_zero_bias_mlp())
    x = np.ones((2, 6), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf.*1 of them not finite"):
        bbits_tf.initialize_ranges(q, x)
    assert not any(bbits_tf.ranges_initialized(q).values())


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_saved_model_loads_without_quantize_scope_after_import(tmp_path, suffix):
    q = bbits_tf.quantize_model(models.lenet5())
    x = np.random.default_rng(2).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    bbits_tf.initialize_ranges(q, x)
    path = str(tmp_path / f"m{suffix}")
    q.save(path)
    loaded = keras.models.load_model(path)  # no quantize_scope: `import bbits_tf` registered the classes
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())
    np.testing.assert_array_equal(bbits_tf.load_model(path)(x).numpy(), q(x).numpy())


def test_bbits_tf_offers_tf_keras():
    import tf_keras

    assert bbits_tf.keras is tf_keras


def test_conv2d_transpose_is_left_float_with_a_reason_not_taken_for_a_conv2d():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Conv2DTranspose(5, 3, strides=2, name="up")(x)  # filters != input channels
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    q = bbits_tf.quantize_model(keras.Model(inputs, outputs))
    assert q.bbits_report.quantized == ["conv", "head"]
    reasons = {name: reason for name, _, reason in q.bbits_report.skipped}
    assert "Conv2DTranspose is not supported" in reasons["up"]
    assert [r.name for r in bbits_tf.layer_bops(q)] == ["conv", "head"]
    assert q(np.ones((1, 6, 6, 3), np.float32)).shape == (1, 2)
