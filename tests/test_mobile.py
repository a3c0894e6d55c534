"""Beyond LeNet (issue 10): BatchNorm folded by the layout transform, activation quantizers where tensors are
consumed (after the activation, Add, Concatenate, average pooling), BOPs from the quantizers that really
produced each input, regularizer weights from the consumers' MACs; MobileNetV2 and a ResNet block at 6.25 %."""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import graph
from bbits_tf._keras import keras
from bbits_tf.folding import FoldedBatchNorm

L = keras.layers
BIT_GATES = 4  # log_alpha of the 4, 8, 16 and 32-bit gates of every quantizer (bit_widths 2..32)


def _quantizers(model):
    return {(w.layer.name, role): (q, v) for w, role, q, v in bbits_tf.bayesian_bits_quantizers(model)}


def _gate_parameters(model):
    found = bbits_tf.bayesian_bits_quantizers(model)
    tied = {id(v["log_alpha_2"]): v["log_alpha_2"] for _, _, _, v in found if "log_alpha_2" in v}  # shared: once
    z2 = sum(int(np.prod(v.shape)) for v in tied.values())
    bits = sum(int(np.prod(v["log_alpha"].shape)) for _, _, _, v in found)
    return z2, bits


def _gap_name(model):
    """The name Keras gave MobileNetV2's global average pooling (``global_average_pooling2d_<n>`` after others)."""
    (name,) = [graph.inner_layer(layer).name for layer in model.layers
               if isinstance(graph.inner_layer(layer), L.GlobalAveragePooling2D)]
    return name


def _inner_types(model):
    return [type(graph.inner_layer(layer)).__name__ for layer in model.layers]


# ----------------------------------------------------------------------------------------------------------------
# A ResNet basic block: stem Conv-BN-ReLU, then Conv-BN-ReLU, Conv-BN, Add (with the stem), ReLU, GAP, Dense


def resnet_block(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    stem = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same",
                                                                                     name="stem")(inputs)))
    h = L.ReLU(name="c1_relu")(L.BatchNormalization(name="c1_bn")(L.Conv2D(8, 3, padding="same", use_bias=False,
                                                                           name="c1")(stem)))
    h = L.BatchNormalization(name="c2_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="c2")(h))
    h = L.ReLU(name="out_relu")(L.Add(name="add")([h, stem]))
    outputs = L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(h))
    return keras.Model(inputs, outputs, name="resnet_block")


# MACs by hand (8x8 "same" outputs): stem 64*3*3*3*8, c1 and c2 64*3*3*8*8, head 8*10.
BLOCK_MACS = {"stem": 13_824, "c1": 36_864, "c2": 36_864, "head": 80}


@pytest.fixture(scope="module")
def qblock():
    return bbits_tf.quantize_model(resnet_block(), mu=0.01)


def test_resnet_block_folds_every_batch_norm_and_relu(qblock):
    assert _inner_types(qblock) == ["InputLayer", "FoldedBatchNorm", "FoldedBatchNorm", "FoldedBatchNorm", "Add",
                                    "ReLU", "GlobalAveragePooling2D", "Dense"]
    folded = {name: graph.inner_layer(qblock.get_layer(f"quant_{name}")) for name in ("stem", "c1", "c2")}
    assert [folded[n].activation.__name__ for n in ("stem", "c1", "c2")] == ["relu", "relu", "linear"]
    assert folded["stem"].use_bias and not folded["c1"].use_bias
    report = qblock.bbits_report
    assert report.quantized == ["stem", "c1", "c2", "head"]
    assert report.activations == ["out_relu", "gap"]
    assert {name: into for name, _, into in report.folded} == {
        "stem_bn": "stem", "stem_relu": "stem", "c1_bn": "c1", "c1_relu": "c1", "c2_bn": "c2"}
    assert [name for name, _, _ in report.skipped] == ["add"]  # its only reader, the ReLU, holds the grid


def test_resnet_block_quantizers_signs_and_gate_count_by_hand(qblock):
    q = _quantizers(qblock)
    assert sorted(q) == sorted([
        ("stem", "weight"), ("stem", "activation"), ("c1", "weight"), ("c1", "activation"), ("c2", "weight"),
        ("c2", "activation"), ("out_relu", "activation"), ("gap", "activation"), ("head", "weight")])
    signed = {k: quantizer.signed for k, (quantizer, _) in q.items() if k[1] == "activation"}
    # After a ReLU (folded or a layer) and the average of such values: unsigned; the linear c2 before the Add: signed.
    assert signed == {("stem", "activation"): False, ("c1", "activation"): False, ("c2", "activation"): True,
                      ("out_relu", "activation"): False, ("gap", "activation"): False}
    assert [k[0] for k, (quantizer, _) in q.items() if quantizer.prune] == ["stem", "c1", "c2"]  # not the head
    # stem and c2 meet in the Add: they share one gate vector, the stem's.
    assert [q[(n, "weight")][0].gates_from for n in ("stem", "c1", "c2")] == [None, None, "stem"]
    # 9 quantizers x 4 bit gates; pruning gates: 8 channels for the stem/c2 stream and 8 for c1 (never the head).
    assert _gate_parameters(qblock) == (2 * 8, 9 * BIT_GATES)


def test_resnet_block_regularizer_weights_are_consumer_macs(qblock):
    q = _quantizers(qblock)
    top = max(BLOCK_MACS.values())
    want = {
        ("stem", "weight"): BLOCK_MACS["stem"] / top, ("c1", "weight"): 1.0, ("c2", "weight"): 1.0,
        ("head", "weight"): BLOCK_MACS["head"] / top,
        ("stem", "activation"): BLOCK_MACS["c1"] / top,  # read by c1 and by the Add (no MACs)
        ("c1", "activation"): BLOCK_MACS["c2"] / top,
        ("c2", "activation"): 0.0,  # read by the Add only
        ("out_relu", "activation"): 0.0,  # read by the average pooling only
        ("gap", "activation"): BLOCK_MACS["head"] / top,
    }
    assert {k: quantizer.mac_weight for k, (quantizer, _) in q.items()} == pytest.approx(want)


def test_resnet_block_bops_at_initialisation(qblock):
    profile = bbits_tf.summary(qblock)
    assert [(r.name, r.layer_type, r.macs) for r in profile.layers] == [
        ("stem", "FoldedBatchNorm", 13_824), ("c1", "FoldedBatchNorm", 36_864), ("c2", "FoldedBatchNorm", 36_864),
        ("head", "Dense", 80)]
    assert [(r.input_bits, r.weight_bits) for r in profile.layers] == [(8, 8)] * 4  # the head reads the GAP grid
    assert profile.relative_bops == pytest.approx(6.25, rel=1e-12)
    assert float(bbits_tf.regularization_loss(qblock)) == pytest.approx(float(tf.add_n(qblock.losses)), rel=1e-6)


def test_resnet_block_bops_follow_the_producing_quantizer():
    q = bbits_tf.quantize_model(resnet_block())
    table = _quantizers(q)
    table[("gap", "activation")][1]["log_alpha"].assign([6.0, -6.0, -6.0, -6.0])  # 4-bit GAP output
    table[("c1", "activation")][1]["log_alpha"].assign([-6.0, -6.0, -6.0, -6.0])  # 2-bit c1 output
    table[("c1", "weight")][1]["log_alpha_2"].assign(np.where(np.arange(8) < 2, -6.0, 6.0).astype(np.float32))
    rows = {r.name: r for r in bbits_tf.summary(q).layers}
    assert (rows["head"].input_bits, rows["c2"].input_bits, rows["c1"].input_bits) == (4, 2, 8)
    assert rows["c1"].kept_channels == 6 and rows["c2"].kept_inputs == 6
    want = (13_824 * 64 + 36_864 * 64 * 0.75 + 36_864 * 2 * 8 * 0.75 + 80 * 4 * 8) / (sum(BLOCK_MACS.values()) * 1024)
    assert bbits_tf.relative_bops(q) == pytest.approx(100 * want, rel=1e-9)


def test_folded_model_fits_one_step_and_reloads_identically(tmp_path):
    q = bbits_tf.quantize_model(resnet_block(seed=1), mu=0.01)
    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 3), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    groups = bbits_tf.variable_groups(q)
    assert [len(groups[k]) for k in ("ranges", "gates")] == [9, 9 + 2]  # 9 quantizers; 2 pruning gate vectors
    stem = graph.inner_layer(q.get_layer("quant_stem"))
    assert any(v is stem.weight_quantizer_vars["log_alpha_2"] for v in groups["gates"])
    mean_before = stem.moving_mean.numpy().copy()
    before = {v.name: v.numpy().copy() for v in groups["weights"] + groups["ranges"] + groups["gates"]}
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(stem.moving_mean.numpy(), mean_before)  # the running statistics were updated
    for key in ("weights", "ranges", "gates"):
        moved = [v.name for v in groups[key] if not np.allclose(before[v.name], v.numpy())]
        assert moved, f"no {key} variable moved"
    assert all(bbits_tf.ranges_initialized(q).values())
    before_mu = float(bbits_tf.regularization_loss(q))
    bbits_tf.set_mu(q, 0.02)  # reaches the folded layers' weight quantizers too
    assert float(bbits_tf.regularization_loss(q)) == pytest.approx(2 * before_mu, rel=1e-6)
    assert float(tf.add_n(q.losses)) == pytest.approx(2 * before_mu, rel=1e-6)
    want = q.predict(x, verbose=0)
    for suffix in (".keras", ".h5"):
        path = str(tmp_path / f"block{suffix}")
        q.save(path)
        loaded = bbits_tf.load_model(path)
        c2 = graph.inner_layer(loaded.get_layer("quant_c2"))  # tied to the stem's gates, linked by load_model
        assert c2.weight_quantizer_vars["log_alpha_2"] is graph.inner_layer(
            loaded.get_layer("quant_stem")).weight_quantizer_vars["log_alpha_2"]
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)
        assert _inner_types(loaded) == _inner_types(q)
        assert bbits_tf.summary(loaded).relative_bops == pytest.approx(bbits_tf.summary(q).relative_bops)
        assert float(bbits_tf.regularization_loss(loaded)) == pytest.approx(float(bbits_tf.regularization_loss(q)))
    # A plain Keras load (after `import bbits_tf`) links the tied gates on the first call: same predictions.
    plain = keras.models.load_model(str(tmp_path / "block.h5"))
    np.testing.assert_array_equal(plain.predict(x, verbose=0), want)
    followers = [(q_, v) for w, role, q_, v in bbits_tf.bayesian_bits_quantizers(plain) if q_.gates_from]
    assert [q_.gates_from for q_, _ in followers] == ["stem"]
    stem_vars = graph.inner_layer(plain.get_layer("quant_stem")).weight_quantizer_vars
    assert followers[0][1]["log_alpha_2"] is stem_vars["log_alpha_2"]


def test_folded_unit_matches_the_float_model_before_quantization_noise():
    """At 32 bits the quantized block computes what the float Conv -> BN -> ReLU -> ... model computes."""
    model = resnet_block(seed=2)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i in (0, 3)
                               else rng.normal(0, 0.3, w.shape).astype(np.float32)
                               for i, w in enumerate(layer.get_weights())])
    q = bbits_tf.quantize_model(model, init_log_alpha=(6, 6, 6, 6))
    for _, _, _, variables in bbits_tf.bayesian_bits_quantizers(q):  # wide ranges: nothing is clipped
        variables["x_max"].assign(50.0)
        variables["range_initialized"].assign(1.0)
    x = rng.random((4, 8, 8, 3), dtype=np.float32)
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(q(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2 from tf_keras.applications


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)


@pytest.fixture(scope="module")
def qmobilenet(mobilenet):
    return bbits_tf.quantize_model(mobilenet, mu=0.01)


def test_mobilenet_v2_has_no_batch_norm_or_relu_left_float(mobilenet, qmobilenet):
    kinds = _inner_types(qmobilenet)
    assert "BatchNormalization" not in kinds and "ReLU" not in kinds
    n_bn = sum(isinstance(layer, L.BatchNormalization) for layer in mobilenet.layers)
    assert n_bn == 52 and kinds.count("FoldedBatchNorm") == 52
    assert kinds.count("Add") == 10 and kinds.count("Dense") == 1
    assert {kind for _, kind, _ in qmobilenet.bbits_report.skipped} == {"ZeroPadding2D"}


def test_mobilenet_v2_relative_bops_at_initialisation_is_w8a8(qmobilenet):
    profile = bbits_tf.summary(qmobilenet)
    assert len(profile.layers) == 53
    assert all((r.input_bits, r.weight_bits) == (8, 8) for r in profile.layers)
    assert profile.relative_bops == pytest.approx(6.25, rel=1e-12)
    assert 6.2 < profile.expected_relative_bops < 6.25


def test_mobilenet_v2_quantizers_gates_and_signs(mobilenet, qmobilenet):
    q = _quantizers(qmobilenet)
    weights = [k for k in q if k[1] == "weight"]
    activations = {k[0]: quantizer for k, (quantizer, _) in q.items() if k[1] == "activation"}
    assert len(weights) == 53  # 35 Conv2D, 17 DepthwiseConv2D, the classifier
    # Every folded unit's output, the 10 Adds and the average pooling; not the logits.
    assert len(activations) == 52 + 10 + 1 and "predictions" not in activations
    # By hand: one pruning gate per output channel of each Conv2D (not the classifier), except that the projections
    # of the blocks that end in an Add share the gates of their stage's first projection; depthwise layers are
    # pruned with their input channels (no gates of their own). 4 bit gates per quantizer.
    residual = {f"block_{i}_project" for i in (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)}
    channels = sum(layer.filters for layer in mobilenet.layers
                   if type(layer) is L.Conv2D and layer.name not in residual)
    expand = 3 * 48 + 3 * 96 + 4 * 144 + 3 * 192 + 3 * 336  # blocks 1-16: 6 x their input channels
    project = 8 + 8 + 16 + 24 + 32 + 56 + 112  # expanded_conv, then the first block of each stage
    assert channels == 16 + expand + project + 1280  # Conv1, ..., Conv_1
    assert _gate_parameters(qmobilenet) == (channels, (53 + 63) * BIT_GATES)
    # ReLU6 outputs (and their average) are unsigned; the linear bottlenecks and the Adds of them are signed.
    assert not activations["Conv1"].signed and not activations["block_1_expand"].signed
    assert not activations["block_1_depthwise"].signed and not activations[_gap_name(mobilenet)].signed
    assert activations["block_1_project"].signed and activations["block_2_add"].signed
    depthwise, expand = q[("block_1_depthwise", "weight")], q[("block_1_expand", "weight")]
    assert depthwise[0].gates_from == "block_1_expand" and depthwise[1]["log_alpha_2"] is expand[1]["log_alpha_2"]
    assert tuple(expand[1]["log_alpha_2"].shape) == (48,)
    assert q[("block_5_project", "weight")][0].gates_from == "block_3_project"


def test_mobilenet_v2_regularizer_weights_are_consumer_macs(mobilenet, qmobilenet):
    macs = {layer.name: graph.layer_macs(mobilenet, layer) for layer in mobilenet.layers
            if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense))}
    top = max(macs.values())
    assert top == macs["Conv_1"] == 143_360
    activations = {k[0]: quantizer for k, (quantizer, _) in _quantizers(qmobilenet).items() if k[1] == "activation"}
    by_hand = {
        "Conv1": macs["expanded_conv_depthwise"],
        "block_1_expand": macs["block_1_depthwise"],  # through the ZeroPadding2D
        "block_1_project": macs["block_2_expand"],  # and block_2_add, which has no MACs
        "block_2_add": macs["block_3_expand"],
        "block_4_add": macs["block_5_expand"],  # and block_5_add
        "Conv_1": 0,  # read by the average pooling only
        _gap_name(mobilenet): macs["predictions"],
    }
    assert {k: activations[k].mac_weight for k in by_hand} == pytest.approx({k: v / top for k, v in by_hand.items()})
    # Every activation quantizer: the MACs of every MAC layer that reads its tensor in the quantized model.
    for wrapper, role, quantizer, _ in bbits_tf.bayesian_bits_quantizers(qmobilenet):
        if role == "activation":
            readers = graph.quantizable_consumers(qmobilenet, wrapper)
            want = sum(macs[graph.inner_layer(r).name] for r in readers) / top
            assert quantizer.mac_weight == pytest.approx(want), wrapper.name


def test_mobilenet_v2_runs_in_training_and_inference(qmobilenet):
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    bbits_tf.initialize_ranges(qmobilenet, x)
    assert all(bbits_tf.ranges_initialized(qmobilenet).values())
    y = qmobilenet(x, training=False).numpy()
    assert y.shape == (4, 10) and np.all(np.isfinite(y))
    # The average pooling's output lies on its unsigned 8-bit grid.
    name = _gap_name(qmobilenet)
    gap = keras.Model(qmobilenet.inputs, qmobilenet.get_layer(f"quant_{name}").output)
    values = gap(x, training=False).numpy()
    (_, variables), = [(q, v) for (n, role), (q, v) in _quantizers(qmobilenet).items() if n == name]
    step = float(variables["x_max"].numpy()) / 255
    np.testing.assert_allclose(values / step, np.round(values / step), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Concatenate, separate activation layers, what does not fold, unsupported layers


def branch_model():
    inputs = keras.Input((10, 10, 3))
    a = L.Conv2D(6, 3, activation="relu", name="a")(inputs)
    b = L.Conv2D(4, 3, name="b")(inputs)  # linear: its quantizer is signed
    c = L.Concatenate(name="cat")([a, b])
    d = L.Conv2D(5, 1, name="d")(c)
    e = L.Conv2D(3, 1, activation="relu", name="e")(a)  # a is also read by a MAC layer directly
    f = L.Concatenate(name="cat2")([L.ReLU(name="d_relu")(d), e])
    out = L.Dense(2, name="head")(L.Flatten(name="flat")(L.MaxPooling2D(name="pool")(f)))
    return keras.Model(inputs, out)


def test_concatenate_has_one_grid_and_its_inputs_none_of_their_own():
    q = bbits_tf.quantize_model(branch_model())
    table = _quantizers(q)
    activations = {name: quantizer for (name, role), (quantizer, _) in table.items() if role == "activation"}
    # a keeps its quantizer (e reads it directly); b, d (absorbed ReLU) and e feed concatenations only.
    assert sorted(activations) == ["a", "cat", "cat2"]
    assert activations["cat"].signed and not activations["cat2"].signed
    macs = {"a": 8 * 8 * 27 * 6, "b": 8 * 8 * 27 * 4, "d": 64 * 10 * 5, "e": 64 * 6 * 3, "head": 4 * 4 * 8 * 2}
    top = max(macs.values())
    assert activations["a"].mac_weight == pytest.approx(macs["e"] / top)
    assert activations["cat"].mac_weight == pytest.approx(macs["d"] / top)
    assert activations["cat2"].mac_weight == pytest.approx(macs["head"] / top)
    assert graph.inner_layer(q.get_layer("quant_d")).activation is keras.activations.relu  # ReLU absorbed
    assert "d_relu" not in [layer.name for layer in q.layers]
    profile = bbits_tf.summary(q)
    assert profile.relative_bops == pytest.approx(6.25, rel=1e-12)
    rows = {r.name: r for r in profile.layers}
    assert rows["b"].output_bits == 32 and rows["d"].input_bits == 8  # the concatenation's grid
    x = np.random.default_rng(0).random((2, 10, 10, 3), dtype=np.float32)
    bbits_tf.initialize_ranges(q, x)
    cat = keras.Model(q.inputs, q.get_layer("quant_cat").output)(x, training=False).numpy()
    step = 2 * float(table[("cat", "activation")][1]["x_max"].numpy()) / 255
    np.testing.assert_allclose(cat / step, np.round(cat / step), atol=1e-3)
    assert np.any(cat[..., :6] > 0) and np.any(cat[..., 6:] < 0)  # both inputs on the one signed grid


def test_pruned_concat_inputs_remove_consumer_inputs():
    q = bbits_tf.quantize_model(branch_model())
    table = _quantizers(q)
    table[("b", "weight")][1]["log_alpha_2"].assign(np.array([-6.0, 6.0, 6.0, -6.0], np.float32))
    rows = {r.name: r for r in bbits_tf.summary(q).layers}
    assert (rows["d"].kept_inputs, rows["d"].total_inputs) == (8, 10)


def test_separate_relu_after_a_plain_conv_is_absorbed():
    inputs = keras.Input((6, 6, 2))
    h = L.ReLU(max_value=6.0, name="r1")(L.Conv2D(4, 3, name="c1")(inputs))
    h = L.Activation("relu", name="r2")(L.Dense(3, name="d1")(L.Flatten()(h)))
    q = bbits_tf.quantize_model(keras.Model(inputs, L.Dense(2, name="head")(h)))
    assert _inner_types(q) == ["InputLayer", "Conv2D", "Flatten", "Dense", "Dense"]
    assert graph.inner_layer(q.get_layer("quant_c1")).activation.__name__ == "relu6"
    table = _quantizers(q)
    assert not table[("c1", "activation")][0].signed and not table[("d1", "activation")][0].signed
    assert {name: into for name, _, into in q.bbits_report.folded} == {"r1": "c1", "r2": "d1"}


def test_what_does_not_fold_stays_float_with_a_reason():
    inputs = keras.Input((6, 6, 2))
    a = L.BatchNormalization(name="bn_after_relu")(L.Conv2D(4, 3, activation="relu", name="a")(inputs))
    b = L.Conv2D(4, 1, name="b")(a)
    bn_b = L.BatchNormalization(name="bn_shared_input")(b)
    c = L.Add(name="add")([bn_b, b])  # b's unnormalised output is read by the Add too
    d = L.LeakyReLU(name="leaky")(c)
    out = L.Dense(2, name="head")(L.Flatten(name="flat")(d))
    q = bbits_tf.quantize_model(keras.Model(inputs, out))
    reasons = {name: reason for name, _, reason in q.bbits_report.skipped}
    assert "'relu' activation comes before it" in reasons["bn_after_relu"]
    assert "also read elsewhere" in reasons["bn_shared_input"]
    assert "float" in reasons["leaky"]
    rows = {r.name: r for r in bbits_tf.summary(q).layers}
    assert rows["b"].input_bits == 32 and rows["head"].input_bits == 32  # read from float layers
    table = _quantizers(q)
    assert not table[("a", "activation")][0].signed and table[("a", "activation")][0].mac_weight == 0.0
    assert table[("add", "activation")][0].signed


@pytest.mark.parametrize("make, name, match", [
    (lambda: L.SeparableConv2D(4, 3, name="sep"), "sep", "SeparableConv2D is not supported"),
    (lambda: L.Conv2DTranspose(4, 3, name="up"), "up", "Conv2DTranspose is not supported"),
])
def test_unsupported_image_layers_are_left_float_with_a_reason(make, name, match):
    inputs = keras.Input((6, 6, 3))
    h = make()(L.Conv2D(3, 1, activation="relu", name="conv")(inputs))
    q = bbits_tf.quantize_model(keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(h))))
    assert q.bbits_report.quantized == ["conv", "head"]
    assert match in {n: r for n, _, r in q.bbits_report.skipped}[name]
    assert [r.input_bits for r in bbits_tf.summary(q).layers] == [8, 32]


def test_conv1d_and_recurrent_layers_are_left_float_with_a_reason():
    inputs = keras.Input((12, 4))
    h = L.Conv1D(5, 3, name="conv1d")(inputs)
    h = L.LSTM(6, name="lstm")(h)
    q = bbits_tf.quantize_model(keras.Model(inputs, L.Dense(2, name="head")(L.Dense(4, name="hidden")(h))))
    reasons = {name: reason for name, _, reason in q.bbits_report.skipped}
    assert "Conv1D is not supported" in reasons["conv1d"] and "recurrent" in reasons["lstm"]
    assert q.bbits_report.quantized == ["hidden", "head"]
    assert q(np.ones((1, 12, 4), np.float32)).shape == (1, 2)


def test_lenet5_is_not_transformed():
    q = bbits_tf.quantize_model(bbits_tf.models.lenet5())
    assert _inner_types(q) == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert q.bbits_report.folded == [] and q.bbits_report.activations == []
    assert not any(isinstance(graph.inner_layer(layer), FoldedBatchNorm) for layer in q.layers)


# ----------------------------------------------------------------------------------------------------------------
# Tied pruning gates (graph.prune_groups)


def test_resnet20_stages_share_one_gate_vector_each():
    groups = graph.prune_groups(bbits_tf.models.resnet20())
    stages = {}
    for name, lead in groups.leader.items():
        stages.setdefault(lead, set()).add(name)
    blocks = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    # Every layer that writes a stage's residual stream: the stem (stage 1) or the projection shortcut, and the
    # second conv of each block. The blocks' first convs keep gates of their own; the classifier has none.
    assert stages == {
        "conv1": {"conv1", "stage1_block1_conv2", "stage1_block2_conv2", "stage1_block3_conv2"},
        "stage2_block1_conv2": {"stage2_block1_conv2", "stage2_block1_shortcut", "stage2_block2_conv2",
                                "stage2_block3_conv2"},
        "stage3_block1_conv2": {"stage3_block1_conv2", "stage3_block1_shortcut", "stage3_block2_conv2",
                                "stage3_block3_conv2"},
    }
    assert groups.unprunable == {"fc": "it feeds a model output"}
    q = bbits_tf.quantize_model(bbits_tf.models.resnet20())
    found = _quantizers(q)
    own = [b + "_conv1" for b in blocks] + ["conv1", "stage2_block1_conv2", "stage3_block1_conv2"]
    assert sorted(n for (n, role), (quantizer, v) in found.items()
                  if role == "weight" and "log_alpha_2" in v and quantizer.gates_from is None) == sorted(own)
    assert _gate_parameters(q)[0] == 3 * (16 + 32 + 64) + (16 + 32 + 64)  # the 9 blocks' conv1, the 3 streams
    assert bbits_tf.summary(q).relative_bops == pytest.approx(6.25, rel=1e-12)


def test_depthwise_with_a_multiplier_follows_its_input_gates():
    inputs = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", name="dw")(h)
    h = L.Conv2D(3, 1, activation="relu", name="pw")(h)
    q = bbits_tf.quantize_model(keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(h))))
    found = _quantizers(q)
    (_, conv_v), (dw_q, dw_v) = found[("conv", "weight")], found[("dw", "weight")]
    assert dw_q.gates_from == "conv" and dw_v["log_alpha_2"] is conv_v["log_alpha_2"]
    conv_v["log_alpha_2"].assign([6.0, -6.0, 6.0, 6.0])  # input channel 1 of dw: its outputs 2 and 3 (k = i*2 + m)
    np.testing.assert_array_equal(dw_q.channel_mask(dw_v), [1, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(dw_q.channel_keep_prob(dw_v)[[2, 3]], 2 * [float(tf.sigmoid(-6.0 + 1.5985969))],
                               rtol=1e-5)
    rows = {r.name: r for r in bbits_tf.bops.layer_bops(q)}
    assert (rows["dw"].kept_in, rows["dw"].kept_out, rows["dw"].keep) == (3, 6, 0.75)  # one gate, counted once
    assert (rows["pw"].kept_in, rows["pw"].keep) == (6, 0.75)
    x = np.random.default_rng(0).random((2, 8, 8, 2), dtype=np.float32)
    dw_out = keras.Model(q.inputs, q.get_layer("quant_dw").output)(x, training=False).numpy()
    assert np.all(dw_out[..., 2:4] == 0) and np.any(dw_out[..., [0, 1, 4, 5, 6, 7]] != 0)


def test_keras_resnet50_quantizes_without_changes():
    """tf_keras.applications.ResNet50 as it is: every BN folded, 6.25 % at initialisation, one gate vector per stage."""
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None)
    q = bbits_tf.quantize_model(model)
    kinds = _inner_types(q)
    assert "BatchNormalization" not in kinds and kinds.count("FoldedBatchNorm") == 53 and kinds.count("Add") == 16
    assert bbits_tf.summary(q).relative_bops == pytest.approx(6.25, rel=1e-12)
    leaders = {}
    for (name, role), (quantizer, _) in _quantizers(q).items():
        if role == "weight" and quantizer.prune:
            leaders.setdefault(quantizer.gates_from or name, []).append(name)
    streams = {lead: sorted(names) for lead, names in leaders.items() if len(names) > 1}
    # Each of the 4 stages: its projection shortcut (conv_block ..._0_conv) and every block's last 1x1 conv (_3_conv).
    assert sorted(streams) == ["conv2_block1_0_conv", "conv3_block1_0_conv", "conv4_block1_0_conv", "conv5_block1_0_conv"]
    assert [len(streams[s]) for s in sorted(streams)] == [1 + 3, 1 + 4, 1 + 6, 1 + 3]
    assert all(n.endswith("_3_conv") for s in streams.values() for n in s if not n.endswith("block1_0_conv"))
