"""tflite_export: pruning for real, fixed grids in integer TFLite, LiteRT / TFLite Micro agreement, C arrays."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from bbits_tf._keras import keras
import tflite_export as te

L = keras.layers
N_EVAL = 48


# ---------------------------------------------------------------------------------------------------- models

def lenet_tiny(seed=0, sequential=True):
    """conv(8) pool conv(16) pool flatten dense(32) dense(10), biases non-zero (pruned channels emit relu(b))."""
    keras.utils.set_random_seed(seed)
    layers = [L.Conv2D(8, 5, activation="relu", name="conv1"), L.MaxPooling2D(name="pool1"),
              L.Conv2D(16, 5, activation="relu", name="conv2"), L.MaxPooling2D(name="pool2"),
              L.Flatten(name="flat"), L.Dense(32, activation="relu", name="fc1"), L.Dense(10, name="fc2")]
    if sequential:
        model = keras.Sequential([keras.Input((28, 28, 1))] + layers, name="lenet_tiny")
    else:
        inp = keras.Input((28, 28, 1))
        x = inp
        for layer in layers:
            x = layer(x)
        model = keras.Model(inp, x, name="lenet_tiny")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape).astype(np.float32)])
    return model


def branch_model(seed=0):
    """Two convs on the input, concatenated, then conv, pool, flatten, dense."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(4, 3, activation="relu", name="a")(inp)
    b = L.Conv2D(6, 3, activation="relu", name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(8, 3, activation="relu", name="c")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flat")(x)
    out = L.Dense(10, name="d")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    return model


def random_masks(model, names, seed=0, keep=0.65):
    rng = np.random.default_rng(seed)
    masks = {}
    for name in names:
        n = model.get_layer(name).get_weights()[0].shape[-1]
        mask = rng.uniform(size=n) < keep
        mask[rng.integers(n)] = True
        masks[name] = mask
    return masks


def zero_pruned_kernels(model, masks):
    """What the gates do: z_2 = 0 multiplies the pruned kernel slices (the bias stays)."""
    for name, mask in masks.items():
        layer = model.get_layer(name)
        kernel, *rest = layer.get_weights()
        layer.set_weights([kernel * mask] + rest)


LENET_BITS = {"conv1": (4, 4), "conv2": (2, 8), "fc1": (8, 2), "fc2": (8, None)}


def lenet_plans(model, x, masks):
    """Plans with 'learned' steps: weight step from max|w|, act step from the 99th percentile of the activation."""
    rng = np.random.default_rng(1)
    plans = {}
    for name, (wb, ab) in LENET_BITS.items():
        kernel = model.get_layer(name).get_weights()[0]
        w_step = float(np.abs(kernel).max() / te.plan.signed_levels(wb) * rng.uniform(0.8, 0.95))
        a_step = None
        if ab is not None:
            act = keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0)
            a_step = float(np.percentile(act, 99) / te.plan.unsigned_levels(ab) * rng.uniform(0.9, 1.1))
        plans[name] = te.LayerPlan(wb, w_step, ab, a_step, False, masks.get(name))
    return plans


def images(n, seed=0, shape=(28, 28, 1)):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def grid_layer(plan):
    """Reference activation quantizer in plain TF ops: clip(round(x / s), lo, hi) * s."""
    lo, hi = te.plan.act_grid_limits(plan.act_bits, plan.act_signed)
    s = plan.act_step
    return L.Lambda(lambda v: tf.clip_by_value(tf.round(v / s), lo, hi) * s)


def reference_model(model, plans, report):
    """Float pruned model, weights on their grids, biases on TFLite's int32 grid, activations rounded to grids.

    Returns a list of callables (input quantizer first) and, per planned layer, the segment [layer, grid] so that a
    single layer can be fed the input the integer op saw.
    """
    on_grid = te.grid_weights(model, plans)
    transforms = {n: (lambda v, p=p: te.quantize_activation(v, p.act_bits, p.act_step, p.act_signed))
                  for n, p in plans.items() if p.act_bits is not None}
    pruned = te.prune_model(on_grid, {n: p.out_mask for n, p in plans.items() if p.out_mask is not None},
                            output_transforms=transforms)
    for layer in report.layers:
        if layer.bias_scale:
            k, b = pruned.get_layer(layer.name).get_weights()
            pruned.get_layer(layer.name).set_weights([k, np.round(b / layer.bias_scale) * layer.bias_scale])
    lo, hi = report.ranges["input"]
    chain = [L.Lambda(lambda v: tf.round((v - lo) / ((hi - lo) / 255)) * ((hi - lo) / 255) + lo)]
    segments = {}
    for layer in pruned.layers[1:]:
        seg = [layer] + ([grid_layer(plans[layer.name])] if layer.name in transforms else [])
        segments[layer.name] = seg
        chain.extend(seg)
    return chain, segments


def run_chain(chain, x):
    for f in chain:
        x = f(x)
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------- grids

def test_weight_grid_levels():
    w = np.random.default_rng(0).normal(size=1000) * 20
    for bits in (2, 4, 8):
        q = te.quantize_weight(w, bits, 0.1)
        k = np.round(q / 0.1)
        assert np.allclose(q, k * 0.1, atol=1e-6)
        assert len(np.unique(k)) <= 2 ** bits - 1
        assert np.abs(k).max() == 2 ** (bits - 1) - 1  # clipped: symmetric narrow range
    assert set(np.unique(np.round(te.quantize_weight(w, 2, 0.5) / 0.5))) == {-1, 0, 1}  # ternary


def test_activation_grid():
    x = np.array([-1.0, 0.04, 0.06, 0.5, 100.0])
    assert np.allclose(te.quantize_activation(x, 2, 0.1, False), [0, 0, 0.1, 0.3, 0.3])
    assert np.allclose(te.quantize_activation(x, 2, 0.1, True), [-0.1, 0, 0.1, 0.1, 0.1])
    assert te.quantize_activation(x, None, None, False) is not None


def test_plan_validation_and_deployed_16_bit():
    with pytest.raises(ValueError, match="weight_bits"):
        te.LayerPlan(3, 0.1)
    with pytest.raises(ValueError, match="act_step"):
        te.LayerPlan(4, 0.1, act_bits=4)
    plan = te.LayerPlan(16, 1e-4, 16, 1e-3, False)
    dep = plan.deployed()
    assert (dep.weight_bits, dep.act_bits) == (8, 8)
    assert np.isclose(dep.weight_step * 127, 1e-4 * (2 ** 15 - 1))
    assert np.isclose(dep.act_step * 255, 1e-3 * (2 ** 16 - 1))
    assert not plan.weight_exact and te.LayerPlan(8, 0.1).weight_exact
    assert te.LayerPlan.from_dict(plan.to_dict()) == plan


def test_quantizers_round_trip_config():
    config = te.FixedGridQuantizeConfig(2, 0.1, 4, 0.2, False, None)
    assert te.FixedGridQuantizeConfig.from_config(config.get_config()) == config
    for q in (te.FixedGridWeightQuantizer(4, 0.05), te.FixedGridActivationQuantizer(4, 0.1, True)):
        assert type(q).from_config(q.get_config()) == q
    with pytest.raises(ValueError, match="2..8"):
        te.FixedGridWeightQuantizer(16, 0.1)(tf.zeros(3), False, {})


def test_activation_quantizer_matches_numpy():
    x = tf.constant(np.linspace(-3, 3, 601, dtype=np.float32))
    for bits, signed in ((2, False), (4, False), (8, False), (4, True), (8, True)):
        q = te.FixedGridActivationQuantizer(bits, 0.0371, signed)(x, False, {})
        ref = te.quantize_activation(x.numpy(), bits, 0.0371, signed)
        assert np.abs(q.numpy() - ref).max() < 1e-5, (bits, signed)


# ---------------------------------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("sequential", [True, False])
def test_prune_lenet_equals_original(sequential):
    model = lenet_tiny(sequential=sequential)
    masks = random_masks(model, ["conv1", "conv2", "fc1"])
    zero_pruned_kernels(model, masks)
    pruned, report = te.prune(model, masks)
    x = images(8)
    assert np.abs(model.predict(x, verbose=0) - pruned.predict(x, verbose=0)).max() < 1e-5
    assert report.exact and "fc1" in report.folded  # non-zero relu(bias) folded through Flatten
    # shapes: kept channels only
    assert pruned.get_layer("conv1").get_weights()[0].shape == (5, 5, 1, masks["conv1"].sum())
    assert pruned.get_layer("conv2").get_weights()[0].shape == (5, 5, masks["conv1"].sum(), masks["conv2"].sum())
    # Flatten mapping: NHWC index (h*W + w)*C + c, so input rows of fc1 are the kept channels at every position
    keep_flat = np.tile(masks["conv2"], 4 * 4)
    w_orig = model.get_layer("fc1").get_weights()[0]
    w_new = pruned.get_layer("fc1").get_weights()[0]
    assert np.array_equal(w_new, w_orig[keep_flat][:, masks["fc1"]])
    assert report.layers["flat"].kept_out == 16 * masks["conv2"].sum()


def test_prune_ignores_pruned_kernel_values():
    """The gate multiplies the pruned slices by zero, so their stored values do not matter."""
    model = lenet_tiny()
    masks = random_masks(model, ["conv1", "conv2", "fc1"], seed=3)
    pruned_a = te.prune_model(model, masks)
    zero_pruned_kernels(model, masks)
    x = images(4)
    assert np.abs(pruned_a.predict(x, verbose=0) - model.predict(x, verbose=0)).max() < 1e-5


def test_prune_branch_concatenate():
    model = branch_model()
    masks = random_masks(model, ["a", "b", "c"], seed=2, keep=0.6)
    zero_pruned_kernels(model, masks)
    pruned, report = te.prune(model, masks)
    x = images(6, shape=(12, 12, 3))
    assert np.abs(model.predict(x, verbose=0) - pruned.predict(x, verbose=0)).max() < 1e-5
    keep_cat = np.concatenate([masks["a"], masks["b"]])
    assert np.array_equal(pruned.get_layer("c").get_weights()[0],
                          model.get_layer("c").get_weights()[0][:, :, keep_cat][..., masks["c"]])
    assert report.exact


def test_prune_depthwise_and_same_padding_report():
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(6, 3, activation="relu", name="c1")(inp)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(x)
    x = L.Conv2D(5, 3, padding="same", name="c2")(x)
    out = L.Dense(4, name="d")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    kernel, _ = model.get_layer("c1").get_weights()
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    model.get_layer("c1").set_weights([kernel * mask, np.full(6, 0.2, np.float32)])  # relu(0.2) != 0
    pruned, report = te.prune(model, {"c1": mask})
    assert pruned.get_layer("dw").get_weights()[0].shape == (3, 3, 4, 2)
    assert report.layers["dw"].kept_out == 8
    assert any("c2" in reason for reason in report.inexact)  # constant through 'same' padding: border differs
    # with zero constants (negative bias -> relu = 0) it is exact
    model.get_layer("c1").set_weights([kernel * mask, np.full(6, -0.2, np.float32)])
    pruned, report = te.prune(model, {"c1": mask})
    x = images(3, shape=(10, 10, 3))
    assert report.exact
    assert np.abs(model.predict(x, verbose=0) - pruned.predict(x, verbose=0)).max() < 1e-5


def test_prune_errors():
    model = lenet_tiny()
    with pytest.raises(ValueError, match="Conv2D, DepthwiseConv2D or Dense"):
        te.prune(model, {"pool1": np.ones(8, bool)})
    with pytest.raises(ValueError, match="output cannot lose channels"):
        te.prune(model, {"fc2": np.arange(10) < 5})


# ---------------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def lenet_export(tmp_path_factory):
    model = lenet_tiny(seed=1)
    x_rep = images(64, seed=1)
    masks = random_masks(model, ["conv1", "conv2", "fc1"], seed=1)
    plans = lenet_plans(model, x_rep, masks)
    out = {}
    for io in ("float", "int8"):
        path = str(tmp_path_factory.mktemp("export") / f"lenet_{io}.tflite")
        out[io] = te.export(model, plans, path, representative_data=x_rep, io=io, input_range=(0.0, 1.0))
    return model, plans, out


def test_export_tensor_types_codes_shapes(lenet_export):
    _, plans, reports = lenet_export
    report = reports["float"]
    assert os.path.getsize(report.path) == report.file_bytes
    rows = {layer.name: layer for layer in report.layers}
    assert set(rows) == set(plans)
    for name, plan in plans.items():
        row = rows[name]
        assert row.weight_type == ("INT4" if plan.weight_bits <= 4 else "INT8")
        assert 1 < row.distinct_codes <= 2 ** plan.weight_bits - 1
        kept = plan.out_mask.sum() if plan.out_mask is not None else 10
        assert row.weight_shape[0] == kept
        if plan.act_bits is not None:  # the learned step is the int8 scale; zero point puts the top at 127
            assert np.isclose(row.act_scale, plan.act_step, rtol=1e-5)
            assert row.act_zero_point == 127 - (2 ** plan.act_bits - 1)
    assert rows["conv2"].distinct_codes == 3  # ternary, stored as INT4 codes {-7, 0, 7}
    assert np.isclose(rows["conv2"].weight_scale, plans["conv2"].weight_step / 7, rtol=1e-6)
    assert rows["conv2"].stored_bytes >= 2 * rows["conv2"].learned_bytes - 1  # INT4 holds 2-bit at twice the size
    assert rows["conv1"].stored_bytes == int(np.ceil(rows["conv1"].params / 2))
    assert report.ops == ["QUANTIZE", "CONV_2D", "MAX_POOL_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE",
                          "FULLY_CONNECTED", "FULLY_CONNECTED", "DEQUANTIZE"]  # no MINIMUM/MAXIMUM clip ops
    assert np.isclose(report.input_scale, 1 / 255) and report.input_zero_point == -128
    int8 = reports["int8"]
    assert (int8.input_type, int8.output_type) == ("INT8", "INT8")
    assert "QUANTIZE" not in int8.ops and "DEQUANTIZE" not in int8.ops
    assert report.to_dict()["stored_weight_bytes"] == report.stored_weight_bytes


def test_export_agrees_with_reference_layer_by_layer(lenet_export):
    model, plans, reports = lenet_export
    report = reports["float"]
    chain, segments = reference_model(model, plans, report)
    x = images(N_EVAL, seed=7)
    io = te.layer_io(report.model_bytes, x, plans)
    for name in plans:
        x_in, y_out, scale = io[name]
        if name.startswith("fc"):
            x_in = x_in.reshape(len(x), -1)
        y_ref = run_chain(segments[name], x_in).reshape(y_out.shape)
        if plans[name].act_bits is None:  # float output: int8 over the range seen in the representative data
            y_ref = np.clip(y_ref, *report.ranges[name])
        lsb = np.abs(y_ref - y_out) / scale
        # TFLite's builtin kernels requantize with double rounding (round(acc * m) then a rounding shift), so an
        # output within 2^-shift of a half step may round the other way: within 1 LSB always, and mostly exact
        # (how often depends on how many bits the output multiplier shifts; conv2 here shifts by only 1)
        assert lsb.max() <= 1.001, name
        assert np.mean(lsb > 0.5) < 0.3, name
    y_ref = run_chain(chain, x)
    y_tfl = te.run_litert(report.model_bytes, x)
    assert np.mean(y_ref.argmax(-1) == y_tfl.argmax(-1)) >= 0.9
    v = te.verify(report.model_bytes, te.deployment_model(model, plans, **report.deployment_kwargs())[0], x,
                  np.zeros(len(x), int))
    assert v.top1_agreement >= 0.9 and v.n == len(x)


def test_tflm_matches_litert_int8_io(lenet_export):
    _, _, reports = lenet_export
    data = reports["int8"].model_bytes
    x = images(8, seed=9)
    lite = te.run_litert(data, x, raw=True, delegates="none")
    micro = te.run_tflm(data, x, raw=True)
    assert lite.dtype == np.int8 and micro.dtype == np.int8
    assert np.abs(lite.astype(int) - micro.astype(int)).max() <= 1
    arena = te.tflm_arena_bytes(data)
    assert 0 < arena < 10 * len(data)
    assert np.array_equal(te.run_tflm(data, x[:2], raw=True, arena_size=arena), micro[:2])


def test_c_array_like_xxd(lenet_export, tmp_path):
    data = lenet_export[2]["int8"].model_bytes
    source, header = te.to_c_array(data, "model.tflite", qualifiers=te.micro.XXD_QUALIFIERS)
    assert "unsigned char model_tflite[]" in source and f"model_tflite_len = {len(data)};" in source
    assert "extern unsigned char model_tflite[];" in header
    if shutil.which("xxd"):
        (tmp_path / "model.tflite").write_bytes(data)
        xxd = subprocess.run(["xxd", "-i", "model.tflite"], cwd=tmp_path, capture_output=True, text=True).stdout
        assert source == xxd
    mcu, mcu_header = te.to_c_array(data, "g_model")
    assert mcu.startswith("alignas(16) const unsigned char g_model[]") and "extern const" in mcu_header


def test_export_branch_concatenate_is_reported():
    model = branch_model(seed=3)
    masks = random_masks(model, ["a", "b", "c"], seed=4, keep=0.6)
    plans = {"a": te.LayerPlan(4, 0.0513, 4, 0.0771, False, masks["a"]),
             "b": te.LayerPlan(8, 0.0107, 8, 0.0123, False, masks["b"]),
             "c": te.LayerPlan(2, 0.1037, 8, 0.0211, False, masks["c"]),
             "d": te.LayerPlan(8, 0.0101)}
    x = images(32, seed=5, shape=(12, 12, 3))
    report = te.export(model, plans, None, representative_data=x, input_range=(0.0, 1.0))
    rows = {layer.name: layer for layer in report.layers}
    assert rows["a"].act_scale == rows["b"].act_scale  # TFLite gives both inputs of the concat one scale
    assert not rows["a"].exact and rows["c"].exact
    assert any("Concatenate" in note for note in report.notes)
    assert rows["c"].weight_shape == (masks["c"].sum(), 3, 3, masks["a"].sum() + masks["b"].sum())
    deployed = te.deployment_model(model, plans, **report.deployment_kwargs())[0]
    assert te.verify(report.model_bytes, deployed, x).top1_agreement >= 0.8


def test_export_rejects_bad_plans():
    model = lenet_tiny()
    with pytest.raises(ValueError, match="Quantizable layers"):
        te.export(model, {"pool1": te.LayerPlan(8, 0.1)}, None, representative_data=images(4))
    with pytest.raises(ValueError, match="needs a LayerPlan"):
        te.export(model, {"conv1": te.LayerPlan(8, 0.1)}, None, representative_data=images(4))
    with pytest.raises(ValueError, match="out_mask"):
        te.export(model, {"conv1": te.LayerPlan(8, 0.1, out_mask=np.ones(3, bool))}, None,
                  representative_data=images(4))


def test_export_depthwise_signed_and_16_bit():
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(6, 3, activation="relu", name="c1")(inp)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(x)
    x = L.Conv2D(5, 3, name="c2")(x)  # no activation: signed grid, lower clip is an explicit MAXIMUM op
    x = L.Flatten(name="flat")(x)
    x = L.Dense(16, activation="relu", name="d1")(x)
    model = keras.Model(inp, L.Dense(4, name="d")(x))
    c1_mask = np.array([1, 0, 1, 1, 0, 1], bool)
    plans = {"c1": te.LayerPlan(4, 0.0513, 8, 0.0113, False, c1_mask),
             "dw": te.LayerPlan(4, 0.0371, 4, 0.0417, False),
             "c2": te.LayerPlan(8, 0.0101, 4, 0.0331, True),
             "d1": te.LayerPlan(16, 1e-5, 16, 1e-4, False),
             "d": te.LayerPlan(8, 0.0101)}
    x = images(32, shape=(10, 10, 3))
    report = te.export(model, plans, None, representative_data=x, input_range=(0.0, 1.0))
    rows = {layer.name: layer for layer in report.layers}
    assert rows["dw"].op == "DEPTHWISE_CONV_2D" and rows["dw"].weight_type == "INT4"
    assert rows["dw"].weight_shape == (1, 3, 3, 2 * c1_mask.sum())  # removed inputs take their outputs along
    assert rows["c2"].act_zero_point == 127 - 7 and "MAXIMUM" in report.ops
    assert not rows["d1"].exact and rows["d1"].weight_type == "INT8"
    assert any("16-bit weights requantized" in note for note in report.notes)
    deployed = te.deployment_model(model, plans, **report.deployment_kwargs())[0]
    io = te.layer_io(report.model_bytes, x, plans)
    for name in plans:
        x_in, y_out, scale = io[name]
        if name.startswith("d") and name != "dw":
            x_in = x_in.reshape(len(x), -1)
        y = np.asarray(deployed.get_layer(name)(x_in)).reshape(y_out.shape)
        assert np.abs(y - y_out).max() / scale <= 1.001, name


# ---------------------------------------------------------------------------------------------------- Bayesian Bits

# log_alpha of the bit gates (z4, z8, z16, z32) whose deterministic gates pick a bit width (-6: truncated)
LOG_ALPHA = {2: (-6., -6., -6., -6.), 4: (6., -6., -6., -6.), 8: (6., 6., -6., -6.), 16: (6., 6., 6., -6.)}
BB_LENET = {"conv1": (4, 8, 0.25), "conv2": (2, 4, 0.4), "fc1": (2, 8, 0.6), "fc2": (8, None, 0.0)}


def bb_quantizers(qmodel):
    import bbits_tf  # pylint: disable=import-outside-toplevel
    return {(w.layer.name, role): (q, v) for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel)}


def force_gates(qmodel, spec, seed=0):
    """Fix the deterministic gates by assignment: name -> (weight bits, activation bits, pruned fraction)."""
    rng = np.random.default_rng(seed)
    table = bb_quantizers(qmodel)
    for name, (w_bits, a_bits, frac) in spec.items():
        q, v = table[(name, "weight")]
        v["log_alpha"].assign(LOG_ALPHA[w_bits])
        if a_bits is not None:
            table[(name, "activation")][1]["log_alpha"].assign(LOG_ALPHA[a_bits])
        if frac:
            la2 = v["log_alpha_2"].numpy().reshape(-1)
            la2[rng.permutation(la2.size)[:int(frac * la2.size)]] = -6.0
            v["log_alpha_2"].assign(la2.reshape(v["log_alpha_2"].shape))


def train_bbits(qmodel, x, y, steps, lr=3e-3, batch=64, seed=0):
    """A few Adam steps on all variables (forced gates at +-6 barely move)."""
    qmodel(x[:2], training=True)  # sets the quantization ranges from data
    qmodel.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(batch).repeat()
    qmodel.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return qmodel


def kept(qmodel, name):
    q, v = bb_quantizers(qmodel)[(name, "weight")]
    mask = q.channel_mask(v)
    return None if mask is None else mask > 0.5


@pytest.fixture(scope="module")
def bbits_lenet(mnist, tmp_path_factory):
    """bbits_tf LeNet5 with forced 2/4/8-bit gates and pruned channels, trained 40 steps on 512 MNIST images,
    exported with int8 io (TFLM run, C arrays) through ``te.export``'s Bayesian Bits dispatch."""
    import bbits_tf  # pylint: disable=import-outside-toplevel
    from bbits_tf import models  # pylint: disable=import-outside-toplevel
    (x_train, y_train), (x_test, y_test) = mnist
    keras.utils.set_random_seed(0)
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.01)
    force_gates(qmodel, BB_LENET)
    train_bbits(qmodel, x_train[:512], y_train[:512], steps=40)
    path = str(tmp_path_factory.mktemp("bbits") / "lenet.tflite")
    report = te.export(qmodel, path, representative_data=x_train[:512], io="int8",
                       validation_data=(x_test, y_test), c_array=True)
    return qmodel, report


def test_bbits_export_agrees_with_bbits_model(bbits_lenet, mnist):
    qmodel, report = bbits_lenet
    assert isinstance(report, te.BbitsExportReport) and isinstance(report, te.ExportReport)
    assert os.path.getsize(report.path) == report.file_bytes == len(report.model_bytes)
    v = report.verification
    assert v.n == len(mnist[1][0])  # the whole MNIST test set
    assert v.top1_agreement >= 0.995
    assert abs(v.accuracy_tflite - v.accuracy_keras) <= 0.001 + 1e-9
    assert v.accuracy_keras > 0.6  # trained, not chance
    assert report.passed, report.problems
    # the plans are the deterministic gates
    plans = te.plans_from_bbits(qmodel)
    for name, (w_bits, a_bits, _) in BB_LENET.items():
        assert (plans[name].weight_bits, plans[name].act_bits) == (w_bits, a_bits)
    assert report.io == "int8" and (report.input_type, report.output_type) == ("INT8", "INT8")


def test_bbits_export_types_codes_and_kept_shapes(bbits_lenet):
    qmodel, report = bbits_lenet
    rows = {r.name: r for r in report.bbits_layers}
    flat = te.read_flatbuffer(report.model_bytes)
    weights = {te.flatbuffer.match_layer([w.name, o.name], list(rows)): (w, o)
               for _, w, _, o in te.flatbuffer.weight_tensors(flat)}
    for name, (w_bits, a_bits, _) in BB_LENET.items():
        row = rows[name]
        assert row.stored_weight_type == ("INT4" if w_bits <= 4 else "INT8"), name
        assert weights[name][0].type == row.stored_weight_type
        assert 1 < row.distinct_codes <= 2 ** w_bits - 1, name
        assert len(np.unique(weights[name][0].values)) == row.distinct_codes
        if a_bits is not None:  # the learned step is the int8 scale, the grid's top at 127
            q, v = bb_quantizers(qmodel)[(name, "activation")]
            assert np.isclose(weights[name][1].scale, q.step_size(v), rtol=1e-5)
            assert weights[name][1].zero_point == 127 - (2 ** a_bits - 1)
    assert rows["conv2"].distinct_codes <= 3 and rows["fc1"].distinct_codes <= 3  # ternary
    k1, k2, k3 = (int(kept(qmodel, n).sum()) for n in ("conv1", "conv2", "fc1"))
    assert k1 < 32 and k2 < 64 and k3 < 512
    assert weights["conv1"][0].shape == (k1, 5, 5, 1)
    assert weights["conv2"][0].shape == (k2, 5, 5, k1)
    assert weights["fc1"][0].shape == (k3, 4 * 4 * k2)
    assert weights["fc2"][0].shape == (10, k3)
    assert [(r.kept_out, r.total_out) for r in report.bbits_layers] == [(k1, 32), (k2, 64), (k3, 512), (10, 10)]
    assert [(r.kept_in, r.total_in) for r in report.bbits_layers] == [(1, 1), (k1, 32), (16 * k2, 1024), (k3, 512)]
    assert "INT4" in report.tensor_types and not report.wide_layers


def test_export_dispatch_errors(bbits_lenet):
    qmodel, _ = bbits_lenet
    assert te.is_bbits_model(qmodel) and not te.is_bbits_model(lenet_tiny())
    with pytest.raises(ValueError, match="brings its own plans"):
        te.export(qmodel, {"conv1": te.LayerPlan(8, 0.1)}, None, representative_data=images(4))
    with pytest.raises(ValueError, match="`plans`"):
        te.export(lenet_tiny(), representative_data=images(4))
    with pytest.raises(TypeError, match="only apply to Bayesian Bits"):
        te.export(lenet_tiny(), {}, None, representative_data=images(4), int4=False)
    with pytest.raises(ValueError, match="names layers the model does not have"):
        te.export_bbits(qmodel, None, representative_data=images(4), int4=["nope"])


def test_bbits_export_flatten_mapping(bbits_lenet):
    """fc1's rows in the file are the bbits kernel's rows of the kept conv2 channels at every position
    (NHWC flatten index (h*W + w)*C + c), its columns the kept fc1 units, values = learned grid."""
    qmodel, report = bbits_lenet
    wrapper = qmodel.get_layer("quant_fc1")
    q, v = bb_quantizers(qmodel)[("fc1", "weight")]
    kernel_var = [w for w in wrapper.weights if w.name.endswith("/kernel:0")][0]
    kernel_q = np.asarray(q(kernel_var, False, v)[0])
    keep_flat = np.tile(kept(qmodel, "conv2"), 4 * 4)
    expected = kernel_q[keep_flat][:, kept(qmodel, "fc1")].T  # FULLY_CONNECTED weights are [out, in]
    flat = te.read_flatbuffer(report.model_bytes)
    w = [w for _, w, _, o in te.flatbuffer.weight_tensors(flat)
         if te.flatbuffer.match_layer([w.name, o.name], ["fc1"]) == "fc1"][0]
    got = w.values.reshape(w.shape) * w.scale
    assert got.shape == expected.shape
    assert np.allclose(got, expected, atol=1e-6 * np.abs(expected).max())
    # the plain model the exporter started from is the bbits model minus its activation quantizers
    plain = te.plain_model(qmodel)
    assert [layer.name for layer in plain.layers] == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"]
    assert np.array_equal(plain.get_layer("fc1").get_weights()[0], kernel_q)


def test_bbits_export_size_accounting(bbits_lenet):
    _, report = bbits_lenet
    rows = {r.name: r for r in report.bbits_layers}
    for r in report.bbits_layers:
        assert r.learned_weight_bytes == r.params * r.weight_bits / 8
        assert r.stored_weight_bytes == (int(np.ceil(r.params / 2)) if r.stored_weight_type == "INT4" else r.params)
        assert r.stored_bias_bytes == 4 * r.kept_out  # int32
    assert rows["conv2"].stored_weight_bytes >= 2 * rows["conv2"].learned_weight_bytes - 1  # 2-bit in INT4
    assert report.learned_weight_bytes == sum(r.learned_weight_bytes for r in report.bbits_layers)
    assert report.stored_weight_bytes + report.stored_bias_bytes < report.file_bytes
    d = report.to_dict()
    json.dumps(te.bbits.jsonable(d))
    assert d["other_bytes"] == report.file_bytes - report.stored_weight_bytes - report.stored_bias_bytes
    assert "learned" in report.format() and "TFLite Micro" in report.format()


def test_bbits_export_tflm_and_c_arrays(bbits_lenet, mnist):
    _, report = bbits_lenet
    assert report.tflm_samples > 0 and report.tflm_max_lsb_diff <= 1.0
    assert 0 < report.tflm_arena_bytes
    x = mnist[1][0][:16]
    lite = te.run_litert(report.model_bytes, x, raw=True, delegates="none")
    micro = te.run_tflm(report.model_bytes, x, raw=True, arena_size=report.tflm_arena_bytes)
    assert micro.dtype == np.int8 and np.abs(lite.astype(int) - micro.astype(int)).max() <= 1
    assert report.c_source_path.endswith("lenet_data.cc") and report.c_header_path.endswith("lenet_data.h")
    source = open(report.c_source_path).read()
    header = open(report.c_header_path).read()
    assert source.startswith('#include "lenet_data.h"')
    assert "alignas(16) const unsigned char g_lenet[]" in source and "extern const unsigned char g_lenet[];" in header
    body = source.split("{", 1)[1].split("}", 1)[0]
    assert bytes(int(b, 16) for b in body.replace(",", " ").split()) == report.model_bytes
    assert f"g_lenet_len = {report.file_bytes};" in source


def test_bbits_int2_fully_connected(bbits_lenet, mnist):
    """Experimental INT2: the ternary fc1 as packed 2-bit codes {-1, 0, 1} (LiteRT builtin FULLY_CONNECTED runs
    it); the ternary conv2 stays INT4 (no INT2 CONV_2D kernel); the file still agrees with the bbits model."""
    import copy  # pylint: disable=import-outside-toplevel
    qmodel, report = bbits_lenet
    data, changed = te.bbits.pack_int2(report.model_bytes, ["conv2", "fc1"])
    assert list(changed) == ["fc1"]
    params = {r.name: r.params for r in report.bbits_layers}
    assert changed["fc1"] == {"bytes_before": int(np.ceil(params["fc1"] / 2)),
                              "bytes_after": int(np.ceil(params["fc1"] / 4)), "type_before": "INT4",
                              "bias_rescaled": True}
    flat = te.read_flatbuffer(data)
    w = {te.flatbuffer.match_layer([w.name, o.name], ["conv2", "fc1"]): w
         for _, w, _, o in te.flatbuffer.weight_tensors(flat)}
    assert w["fc1"].type == "INT2" and set(np.unique(w["fc1"].values)) <= {-1, 0, 1}
    assert w["conv2"].type == "INT4"
    old = {r.name: r for r in report.layers}["fc1"]
    assert np.isclose(w["fc1"].scale, 7 * old.weight_scale)
    x = mnist[1][0][:2000]
    t, k = te.run_litert(data, x), qmodel.predict(x, verbose=0)
    assert np.mean(t.argmax(-1) == k.argmax(-1)) >= 0.995
    twin = copy.deepcopy(report)
    te.bbits._to_int2(twin, ["conv2", "fc1"])  # pylint: disable=protected-access
    rows = {r.name: r for r in twin.layers}
    assert rows["fc1"].weight_type == "INT2" and twin.file_bytes == len(data) and "INT2" in twin.tensor_types
    assert any("INT2" in note for note in twin.notes)


def test_bbits_export_for_example(bbits_lenet, mnist, tmp_path):
    """The hook examples/mnist.py calls: model.tflite, model_data.cc/.h, verification, a JSON-able summary."""
    qmodel, _ = bbits_lenet
    (x_train, _), (x_test, y_test) = mnist
    lines = []
    summary = te.export_for_example(qmodel, tmp_path, x_test[:500], y_test[:500], x_train=x_train[:256],
                                    print_fn=lines.append)
    json.dumps(summary)
    assert {p.name for p in tmp_path.iterdir()} == {"model.tflite", "model_data.cc", "model_data.h"}
    assert summary["file_bytes"] == os.path.getsize(tmp_path / "model.tflite")
    assert summary["verification"]["n"] == 500 and summary["tflm_arena_bytes"] > 0
    assert "top-1 agreement" in "\n".join(lines)


def bb_branch_model():
    """Functional, two branches from the input concatenated: conv a | conv b -> concat -> conv c -> pool -> dense."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((28, 28, 1))
    a = L.Conv2D(8, 5, strides=2, activation="relu", name="a")(inp)
    b = L.Conv2D(8, 5, strides=2, activation="relu", name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(16, 3, activation="relu", name="c")(x)
    x = L.MaxPooling2D(name="pool")(x)
    out = L.Dense(10, name="d")(L.Flatten(name="flat")(x))
    return keras.Model(inp, out, name="branch")


def test_bbits_export_functional_branch_edgetpu_layout(mnist):
    """A branch through Concatenate (pruned on both sides), exported the Edge TPU way: int8 io, no INT4, batch 1;
    a 16-bit layer is carried as INT8 and reported."""
    import bbits_tf  # pylint: disable=import-outside-toplevel
    (x_train, y_train), (x_test, y_test) = mnist
    qmodel = bbits_tf.quantize_model(bb_branch_model(), mu=0.01)
    force_gates(qmodel, {"a": (4, 4, 0.25), "b": (2, 8, 0.5), "c": (4, 8, 0.25), "d": (16, None, 0.0)}, seed=1)
    train_bbits(qmodel, x_train[:512], y_train[:512], steps=30)
    report = te.export_bbits(qmodel, None, representative_data=x_train[:256], io="int8", int4=False, batch_size=1,
                             validation_data=(x_test[:500], y_test[:500]), tflm_samples=10)
    assert "INT4" not in report.tensor_types and report.int4 == []
    assert set(report.tensor_types) <= {"INT8", "INT32"}  # every tensor 8-bit (biases int32)
    flat = te.read_flatbuffer(report.model_bytes)
    assert flat.tensors[flat.inputs[0]].shape == (1, 28, 28, 1)
    rows = {r.name: r for r in report.bbits_layers}
    ka, kb, kc = (int(kept(qmodel, n).sum()) for n in ("a", "b", "c"))
    c_weights = [w for _, w, _, o in te.flatbuffer.weight_tensors(flat)
                 if te.flatbuffer.match_layer([w.name, o.name], list(rows)) == "c"][0]
    assert c_weights.shape == (kc, 3, 3, ka + kb)  # the concatenation lost both branches' pruned channels
    assert rows["b"].stored_weight_type == "INT8" and rows["b"].distinct_codes <= 3  # ternary, stored as INT8
    assert rows["a"].distinct_codes <= 15 and rows["b"].learned_weight_bytes * 4 == rows["b"].stored_weight_bytes
    assert "d" in report.wide_layers and rows["d"].weight_bits == 16 and rows["d"].stored_weight_type == "INT8"
    assert any("Concatenate" in note for note in report.notes)  # TFLite unifies the branch scales: not exact
    assert report.verification.top1_agreement >= 0.97  # (concat requantization and 16 -> 8 bits)
    assert report.tflm_max_lsb_diff <= 1.0
