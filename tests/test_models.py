"""Tests of bbits_tf.models: LeNet5 and VGG7 shapes, parameter counts, initialisation, serialization."""
import math

import numpy as np
import pytest

from bbits_tf._keras import keras
from bbits_tf.models import FanInUniform, lenet5, resnet20, vgg7


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.fixture(scope="module")
def lenet():
    keras.utils.set_random_seed(0)
    return lenet5()


# --- LeNet5 -----------------------------------------------------------------------------------------------------

def test_lenet5_parameter_count(lenet):
    assert lenet.count_params() == 582_026
    assert count(lenet.trainable_weights) == 582_026
    per_layer = {layer.name: layer.count_params() for layer in lenet.layers if layer.count_params()}
    assert per_layer == {"conv1": 832, "conv2": 51_264, "fc1": 524_800, "fc2": 5_130}


def test_lenet5_layers(lenet):
    assert [layer.name for layer in lenet.layers] == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"]
    assert lenet.get_layer("conv1").padding == "valid" and lenet.get_layer("conv1").kernel_size == (5, 5)
    assert lenet.get_layer("flatten").output_shape == (None, 1024)
    for name in ("conv1", "conv2", "fc1"):
        assert lenet.get_layer(name).activation is keras.activations.relu
    assert lenet.get_layer("fc2").activation is keras.activations.linear  # logits, no softmax


def test_lenet5_output_is_logits(lenet):
    x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    y = lenet(x).numpy()
    assert y.shape == (3, 10)
    assert y.min() < 0  # a softmax output would be positive and sum to 1
    assert not np.allclose(y.sum(axis=1), 1.0)


@pytest.mark.parametrize("name, fan_in", [("conv1", 25), ("conv2", 800), ("fc1", 1024), ("fc2", 512)])
def test_lenet5_init_bounds(lenet, name, fan_in):
    """PyTorch defaults (spec 7.1): kernel and bias both U(+-1/sqrt(fan_in))."""
    limit = 1 / math.sqrt(fan_in)
    kernel, bias = (w.numpy() for w in lenet.get_layer(name).weights)
    assert np.abs(kernel).max() <= limit
    assert np.abs(bias).max() <= limit
    # Uniform: std = limit / sqrt(3); the kernels hold >= 800 values, so the estimate is within a few percent.
    np.testing.assert_allclose(kernel.std(), limit / math.sqrt(3), rtol=0.1)
    assert np.abs(kernel).max() > 0.9 * limit
    assert np.abs(bias).max() > (0.5 if bias.size == 10 else 0.8) * limit  # biases are not zero


def test_lenet5_other_input_shape():
    model = lenet5(input_shape=(32, 32, 3), num_classes=4)
    assert model.get_layer("flatten").output_shape == (None, 64 * 5 * 5)
    assert model.output_shape == (None, 4)
    assert model.get_layer("conv1").bias_initializer.fan_in == 75
    assert model.get_layer("fc1").bias_initializer.fan_in == 1600


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes=0"),
    ({"input_shape": (28, 28)}, "input_shape=\\(28, 28\\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lenet5(**kwargs)
    with pytest.raises(ValueError, match=match):
        vgg7(**kwargs)


def test_lenet5_save_and_reload(lenet, tmp_path):
    path = tmp_path / "lenet5.keras"
    lenet.save(path)
    reloaded = keras.models.load_model(path, compile=False)
    assert isinstance(reloaded.get_layer("fc1").bias_initializer, FanInUniform)
    assert reloaded.get_layer("fc1").bias_initializer.fan_in == 1024
    x = np.random.default_rng(1).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(reloaded(x).numpy(), lenet(x).numpy(), rtol=1e-6, atol=1e-6)


# --- FanInUniform -----------------------------------------------------------------------------------------------

def test_fan_in_uniform_values():
    values = FanInUniform(16, seed=3)((10_000,)).numpy()
    assert values.min() >= -0.25 and values.max() <= 0.25
    assert values.min() < -0.24 and values.max() > 0.24
    np.testing.assert_allclose(values.mean(), 0.0, atol=0.01)


def test_fan_in_uniform_serialization_round_trip():
    init = FanInUniform(800, seed=7)
    assert init.get_config() == {"fan_in": 800, "seed": 7}
    restored = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(restored, FanInUniform)
    assert restored.get_config() == {"fan_in": 800, "seed": 7}
    np.testing.assert_array_equal(restored((5,)).numpy(), init((5,)).numpy())  # same seed, same values


@pytest.mark.parametrize("fan_in", [0, -3, 2.0, True])
def test_fan_in_uniform_bad_fan_in(fan_in):
    with pytest.raises(ValueError, match="fan_in"):
        FanInUniform(fan_in)


# --- VGG7 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg():
    keras.utils.set_random_seed(0)
    return vgg7()


def test_vgg7_parameter_count(vgg):
    """Spec 7.3: 12,973,450 weights and biases + 5,632 BN affine values; Keras adds the BN moving statistics."""
    bn = [layer for layer in vgg.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert count(vgg.trainable_weights) == 12_973_450 + 5_632
    assert count(w for layer in bn for w in layer.trainable_weights) == 5_632  # gamma, beta
    assert count(vgg.non_trainable_weights) == 5_632  # moving mean and variance
    assert vgg.count_params() == 12_984_714
    conv_and_dense = [layer for layer in vgg.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert sum(layer.count_params() for layer in conv_and_dense) == 12_973_450


def test_vgg7_layers(vgg):
    convs = [layer for layer in vgg.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and not c.use_bias for c in convs)
    assert vgg.get_layer("flatten").output_shape == (None, 8192)
    assert not vgg.get_layer("fc1").use_bias and vgg.get_layer("fc2").use_bias
    assert [layer.name for layer in vgg.layers[-5:]] == ["flatten", "fc1", "fc1_bn", "fc1_relu", "fc2"]
    bn = vgg.get_layer("conv1_bn")
    assert bn.epsilon == pytest.approx(1e-5) and bn.momentum == pytest.approx(0.9)  # PyTorch eps, momentum 0.1


def test_vgg7_output_shape(vgg):
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    y = vgg(x, training=False).numpy()
    assert y.shape == (2, 10)
    assert np.all(np.isfinite(y)) and y.min() < 0


def _gate_parameters(qmodel):
    import bbits_tf  # pylint: disable=import-outside-toplevel

    found = bbits_tf.bayesian_bits_quantizers(qmodel)
    z2 = sum(count([v["log_alpha_2"]]) for _, _, _, v in found if "log_alpha_2" in v)
    return z2, sum(count([v["log_alpha"]]) for _, _, _, v in found)


def test_vgg7_quantizes_with_every_batch_norm_folded(vgg):
    """Spec 7.3: conv -> BN -> ReLU folds into one unit; relative BOPs at initialisation (w8a8) are 6.25 %."""
    import bbits_tf  # pylint: disable=import-outside-toplevel
    from bbits_tf import graph  # pylint: disable=import-outside-toplevel

    q = bbits_tf.quantize_model(vgg)
    kinds = [type(graph.inner_layer(layer)).__name__ for layer in q.layers]
    assert kinds.count("FoldedBatchNorm") == 7 and "BatchNormalization" not in kinds and "ReLU" not in kinds
    profile = bbits_tf.summary(q)
    assert [r.macs for r in profile.layers] == [
        3_538_944, 150_994_944, 75_497_472, 150_994_944, 75_497_472, 150_994_944, 8_388_608, 10_240]
    assert all((r.input_bits, r.weight_bits) == (8, 8) for r in profile.layers)
    assert profile.relative_bops == pytest.approx(6.25, rel=1e-12)
    # By hand: 8 weight + 7 activation quantizers (the logits stay float) with 4 bit gates each; one pruning
    # gate per output channel of conv1..6 and fc1 (fc2 is not pruned).
    assert _gate_parameters(q) == (128 + 128 + 256 + 256 + 512 + 512 + 1024, (8 + 7) * 4)
    activations = {w.layer.name: qz for w, role, qz, _ in bbits_tf.bayesian_bits_quantizers(q) if role == "activation"}
    assert not any(qz.signed for qz in activations.values())  # after the folded ReLUs
    # Spec 4: each activation quantizer takes the c of the next layer (max MACs = conv2's).
    assert activations["conv1"].mac_weight == pytest.approx(1.0)
    assert activations["conv6"].mac_weight == pytest.approx(8_388_608 / 150_994_944)
    assert activations["fc1"].mac_weight == pytest.approx(10_240 / 150_994_944)


# --- ResNet20 ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(0)
    return resnet20()


def test_resnet20_structure_and_parameter_count(resnet):
    convs = [layer for layer in resnet.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 9 * 2 + 2 and not any(c.use_bias for c in convs)
    assert count(resnet.trainable_weights) == 272_474
    assert resnet.count_params() == 274_042
    assert resnet.get_layer("stage2_block1_conv1").strides == (2, 2)
    assert resnet.get_layer("stage3_block1_shortcut").kernel_size == (1, 1)
    assert resnet.get_layer("pool").output_shape == (None, 64)
    assert [layer.name for layer in resnet.layers[-3:]] == ["stage3_block3_relu", "pool", "fc"]
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    y = resnet(x, training=False).numpy()
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="num_classes=0"):
        resnet20(num_classes=0)


def test_resnet20_quantizes_at_6_25_percent_with_gates_counted_by_hand(resnet):
    import bbits_tf  # pylint: disable=import-outside-toplevel
    from bbits_tf import graph  # pylint: disable=import-outside-toplevel

    q = bbits_tf.quantize_model(resnet)
    kinds = [type(graph.inner_layer(layer)).__name__ for layer in q.layers]
    assert kinds.count("FoldedBatchNorm") == 21 and "BatchNormalization" not in kinds
    profile = bbits_tf.summary(q)
    assert profile.total_macs == 40_813_184
    assert all((r.input_bits, r.weight_bits) == (8, 8) for r in profile.layers)
    assert profile.relative_bops == pytest.approx(6.25, rel=1e-12)
    # 22 weight quantizers; activation quantizers: the stem, per block conv1, conv2 and the post-add ReLU (the
    # Add itself takes the ReLU's grid), the 2 shortcuts, the average pooling: 1 + 9 * 3 + 2 + 1 = 31.
    # Pruning gates: every conv's output channels (the classifier is not pruned).
    z2 = 16 + 3 * (16 + 16) + 3 * (32 + 32) + 32 + 3 * (64 + 64) + 64
    assert _gate_parameters(q) == (z2, (22 + 31) * 4)
    act = {w.layer.name: qz for w, role, qz, _ in bbits_tf.bayesian_bits_quantizers(q) if role == "activation"}
    # The downsampling block's input is read by its conv1 and its shortcut: their MACs add up (spec 4).
    top = 2_359_296
    assert act["stage1_block3_relu"].mac_weight == pytest.approx((1_179_648 + 131_072) / top)
    assert act["stage1_block1_conv2"].signed and act["stage1_block1_conv2"].mac_weight == 0.0  # read by the Add
    assert not act["stage1_block1_relu"].signed
