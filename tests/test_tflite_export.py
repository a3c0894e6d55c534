"""tflite_export: pruning for real, fixed grids in integer TFLite, LiteRT / TFLite Micro agreement, C arrays."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bbits_tf._keras import keras
import tflite_export as te
from export_helpers import images, lenet_tiny, random_biases  # tests/ is on sys.path (pytest rootdir-relative import)

L = keras.layers
N_EVAL = 48


# ---------------------------------------------------------------------------------------------------- models



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
    return random_biases(keras.Model(inp, out), seed, std=0.1)


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
        out[io] = te.export(model, path, plans=plans, representative_data=x_rep, io=io, input_range=(0.0, 1.0))
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
    # no MINIMUM/MAXIMUM clip ops; the QUANTIZE before conv2 carries conv1's 4-bit grid at a 16x finer scale
    assert report.ops == ["QUANTIZE", "CONV_2D", "MAX_POOL_2D", "QUANTIZE", "CONV_2D", "MAX_POOL_2D", "RESHAPE",
                          "FULLY_CONNECTED", "FULLY_CONNECTED", "DEQUANTIZE"]
    assert np.isclose(report.input_scale, 1 / 255) and report.input_zero_point == -128
    int8 = reports["int8"]
    assert (int8.input_type, int8.output_type) == ("INT8", "INT8")
    assert int8.ops == report.ops[1:-1]  # int8 io: no QUANTIZE of the input, no DEQUANTIZE of the output
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


def test_refined_input_is_exact_and_makes_the_bias_grid_finer(lenet_export):
    """conv2's input (conv1's 4-bit grid, step s) is requantized to codes x16 at scale s/16: the same values, and
    conv2's int32 bias grid (input scale x weight scale) 16x finer. fc1's input is an 8-bit grid (no room) and the
    logits layer fc2 has a float output: neither is refined."""
    model, plans, reports = lenet_export
    report = reports["float"]
    flat = te.read_flatbuffer(report.model_bytes)
    conv1, conv2 = ({layer.name: layer for layer in report.layers}[n] for n in ("conv1", "conv2"))
    requant = [op for op in flat.ops if op.name == "QUANTIZE"][1]
    t_in, t_out = flat.tensors[requant.inputs[0]], flat.tensors[requant.outputs[0]]
    assert np.isclose(t_in.scale, plans["conv1"].act_step, rtol=1e-6) and t_in.zero_point == 127 - 15
    assert np.isclose(t_out.scale, plans["conv1"].act_step / 16, rtol=1e-6) and t_out.zero_point == 127 - 15 * 16
    assert np.isclose(conv2.bias_scale, t_out.scale * conv2.weight_scale, rtol=1e-6)
    x = images(8, seed=3)
    io = te.layer_io(report.model_bytes, x, plans)
    grid = io["conv2"][0] / plans["conv1"].act_step  # conv2's input, dequantized: on conv1's grid, codes 0..15
    assert np.allclose(grid, np.round(grid), atol=1e-4) and 0 <= np.round(grid).min() <= np.round(grid).max() <= 15
    assert sorted(sys.modules["tflite_export.export"].input_grids(model, plans)) == ["conv2"]
    plain = te.export_plans(model, plans, None, representative_data=images(64, seed=1), input_range=(0.0, 1.0),
                            refine_inputs=False)
    assert plain.ops.count("QUANTIZE") == 1
    assert np.isclose({layer.name: layer for layer in plain.layers}["conv2"].bias_scale, 16 * conv2.bias_scale,
                      rtol=1e-5)


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
    report = te.export_plans(model, plans, None, representative_data=x, input_range=(0.0, 1.0))
    rows = {layer.name: layer for layer in report.layers}
    assert rows["a"].act_scale == rows["b"].act_scale  # TFLite gives both inputs of the concat one scale
    assert not rows["a"].exact and rows["c"].exact
    assert any("Concatenate" in note for note in report.notes)
    assert rows["c"].weight_shape == (masks["c"].sum(), 3, 3, masks["a"].sum() + masks["b"].sum())
    deployed = te.deployment_model(model, plans, **report.deployment_kwargs())[0]
    assert te.verify(report.model_bytes, deployed, x).top1_agreement >= 0.8


def test_export_concatenate_of_one_grid_is_exact():
    """Both branches on the same grid: CONCATENATION needs no requantization, the grids survive (exact)."""
    model = branch_model(seed=3)
    masks = random_masks(model, ["a", "b", "c"], seed=4, keep=0.6)
    plans = {"a": te.LayerPlan(4, 0.0513, 4, 0.0771, False, masks["a"]),
             "b": te.LayerPlan(8, 0.0107, 4, 0.0771, False, masks["b"]),
             "c": te.LayerPlan(2, 0.1037, 8, 0.0211, False, masks["c"]),
             "d": te.LayerPlan(8, 0.0101)}
    x = images(32, seed=5, shape=(12, 12, 3))
    report = te.export(model, None, plans=plans, representative_data=x, input_range=(0.0, 1.0))
    rows = {layer.name: layer for layer in report.layers}
    assert np.isclose(rows["a"].act_scale, 0.0771, rtol=1e-5) and np.isclose(rows["b"].act_scale, 0.0771, rtol=1e-5)
    assert rows["a"].exact and rows["b"].exact and not any("Concatenate" in note for note in report.notes)


def test_export_rejects_bad_plans():
    model = lenet_tiny()
    with pytest.raises(ValueError, match="Quantizable layers"):
        te.export_plans(model, {"pool1": te.LayerPlan(8, 0.1)}, None, representative_data=images(4))
    with pytest.raises(ValueError, match="needs a LayerPlan"):
        te.export_plans(model, {"conv1": te.LayerPlan(8, 0.1)}, None, representative_data=images(4))
    with pytest.raises(ValueError, match="out_mask"):
        te.export_plans(model, {"conv1": te.LayerPlan(8, 0.1, out_mask=np.ones(3, bool))}, None,
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
    report = te.export_plans(model, plans, None, representative_data=x, input_range=(0.0, 1.0))
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


# ---------------------------------------------------------------------------------------------------- package

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tflite_export")


def _module_imports():
    """module -> the tflite_export modules it imports (``from .x import``, ``from . import x``), anywhere in it."""
    import ast  # pylint: disable=import-outside-toplevel
    graph = {}
    for fname in sorted(os.listdir(PACKAGE)):
        if not fname.endswith(".py") or fname == "__init__.py":
            continue
        tree = ast.parse(open(os.path.join(PACKAGE, fname)).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[fname[:-3]] = deps
    return graph


def test_package_imports_have_no_cycle():
    """The stages hand plain data on in one direction (export.py once imported bbits.py inside ``export``)."""
    graph = _module_imports()
    assert "bbits" not in graph["export"]

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        for dep in graph.get(name, ()):
            visit(dep, path + [name])

    for name in graph:
        visit(name, [])


def test_readme_module_table_matches_the_modules():
    text = open(os.path.join(PACKAGE, "README.md")).read()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1][:-3] for line in table.splitlines() if line.startswith("| `")}
    assert listed == set(_module_imports())
    for fname in os.listdir(PACKAGE):
        if fname.endswith((".py", ".md")):
            assert "README_EXPORT" not in open(os.path.join(PACKAGE, fname)).read(), fname


def test_no_unused_functions():
    """Every module-level function of the package is used somewhere (package, tests, benchmarks, examples)."""
    import ast  # pylint: disable=import-outside-toplevel
    root = os.path.dirname(PACKAGE)
    sources = {}
    for folder in ("tflite_export", "tests", "benchmarks", "examples"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for fname in files:
                if fname.endswith(".py"):
                    sources[os.path.join(dirpath, fname)] = open(os.path.join(dirpath, fname)).read()
    unused = []
    for fname in os.listdir(PACKAGE):
        if not fname.endswith(".py"):
            continue
        path = os.path.join(PACKAGE, fname)
        for node in ast.parse(sources[path]).body:
            if isinstance(node, ast.FunctionDef):
                uses = sum(text.count(node.name) for text in sources.values()) - 1  # minus its definition
                if uses == 0:
                    unused.append(f"{fname}:{node.name}")
    assert not unused


def test_tflm_arena_search_survives_a_runtime_crash(monkeypatch):
    """TFLite Micro's Python runtime segfaults for some too-small arenas (MobileNetV2 at 60-70 KB): each size is tried
    in a child process, and a crash counts as "does not fit"."""
    from tflite_export import micro  # pylint: disable=import-outside-toplevel

    crash = "import os, signal, sys\nif int(sys.argv[2]) < 5000: os.kill(os.getpid(), signal.SIGSEGV)\n"
    monkeypatch.setattr(micro, "_PROBE", crash)
    assert micro.tflm_arena_bytes(b"x" * 100, granularity=64) in range(5000, 5064 + 1)
