"""bbits_tf.latency (the table, its interpolation, the prediction, the prior) and tflite_export.profile_latency.

The prediction's agreement with measured latencies is a timing, measured in benchmarks/costs.py, not asserted here.
"""
import numpy as np
import pytest
import tensorflow as tf

import bbits_tf
from bbits_tf import latency, models
from bbits_tf._keras import keras
from bbits_tf.budget import Budget

L = keras.layers


def tiny():
    return keras.Sequential([keras.Input((12, 12, 1)), L.Conv2D(8, 3, activation="relu", name="c1"),
                             L.MaxPooling2D(name="pool"), L.Flatten(name="flat"),
                             L.Dense(16, activation="relu", name="fc1"), L.Dense(10, name="fc2")], name="tiny")


def synthetic(model_kind="lenet"):
    """A LeNet5 table with latency = 1 us per (kept input x kept output) / 100 of each layer, other 5 us."""
    shapes = {"conv1": (1, 32), "conv2": (32, 64), "fc1": (1024, 512), "fc2": (512, 10)}
    layers = {}
    for name, (c_in, c_out) in shapes.items():
        ins = [c_in] if name == "conv1" else [c_in * k // 8 for k in range(1, 9)]
        outs = [c_out] if name == "fc2" else [c_out * k // 8 for k in range(1, 9)]
        layers[name] = {"kind": "Dense" if name.startswith("fc") else "Conv2D", "total_in": c_in, "total_out": c_out,
                        "points": [[i, o, i * o / 100.0] for i in ins for o in outs]}
    full = sum(shapes[n][0] * shapes[n][1] / 100.0 for n in shapes)
    return {"layers": layers, "other_us": 5.0, "full_model_us": full + 5.0, "layers_full_us": full}


def test_table_lookup_is_the_grid_point_at_or_above_and_smooth_is_bilinear():
    table = latency.LatencyTable(synthetic())
    assert table.layer_us("conv2", 32, 64) == pytest.approx(32 * 64 / 100)
    assert table.layer_us("conv2", 5, 9) == pytest.approx(8 * 16 / 100)  # up to the next grid point (tiles)
    assert table.layer_us("conv2", 5, 9, smooth=True) == pytest.approx(5 * 9 / 100)  # bilinear of i*o is exact
    assert table.layer_us("conv2", 2, 4, smooth=True) == pytest.approx(2 * 4 / 100)  # linear below the grid
    assert table.layer_us("conv1", 1, 18) == pytest.approx(20 / 100)  # conv1 grid: 4, 8, ..., 32 outputs
    with pytest.raises(KeyError, match="has no layer 'conv9'"):
        table.layer_us("conv9", 1, 1)
    with pytest.raises(ValueError, match="profile_latency"):
        latency.LatencyTable({"points": []})


def _force(qmodel, name, kept):
    for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel):
        if w.layer.name == name and role == "weight":
            la2 = np.full(v["log_alpha_2"].shape, -6.0, np.float32)
            la2.reshape(-1)[:kept] = 6.0
            v["log_alpha_2"].assign(la2)


def test_latency_of_lenet_sums_its_layers_at_the_kept_channels():
    table = synthetic()
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
    assert latency.latency_us(qmodel, table) == pytest.approx(table["full_model_us"])
    _force(qmodel, "conv2", 20)  # 20 of 64 -> the 24-channel grid point; fc1 reads 20 * 16 of 1024 inputs -> 384
    _force(qmodel, "fc1", 100)   # -> 128
    want = 5.0 + 32 / 100 + 32 * 24 / 100 + 384 * 128 / 100 + 128 * 10 / 100
    assert latency.latency_us(qmodel, table) == pytest.approx(want)
    rows = {r.name: r for r in latency.layer_latency(qmodel, table)}
    assert (rows["conv2"].kept_out, rows["fc1"].kept_in, rows["fc2"].kept_in) == (20, 320, 100)


def test_expected_latency_equals_the_deterministic_one_at_probabilities_0_and_1():
    table = synthetic()
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
    for name, kept in (("conv1", 9), ("conv2", 33), ("fc1", 200)):
        for w, role, q, v in bbits_tf.bayesian_bits_quantizers(qmodel):
            if w.layer.name == name and role == "weight":
                la2 = np.full(v["log_alpha_2"].shape, -30.0, np.float32)
                la2.reshape(-1)[:kept] = 30.0
                v["log_alpha_2"].assign(la2)
    assert latency.latency_us(qmodel, table, expected=True) == pytest.approx(latency.latency_us(qmodel, table))


def test_latency_prior_charges_channels_not_bits_and_its_gradient_closes_gates():
    table = synthetic()
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost=table)
    assert isinstance(qmodel.bbits_latency_table, latency.LatencyTable)
    costs = {(w.layer.name, role): v["level_costs"].numpy() for w, role, _, v in bbits_tf.bayesian_bits_quantizers(qmodel)}
    # conv2's channel: its own slope (32 inputs / 100 us) plus fc1's per input (512 / 100) x 16 positions
    assert costs[("conv2", "weight")][0] * qmodel.bbits_cost_scale / 64 == pytest.approx(0.32 + 5.12 * 16, rel=1e-3)
    assert costs[("fc2", "weight")] == pytest.approx([0, 0, 0])  # never pruned, bits are free
    assert all(np.all(c[1:] == 0) for c in costs.values())
    with tf.GradientTape() as tape:
        loss = bbits_tf.regularization_loss(qmodel)
    gates = bbits_tf.variable_groups(qmodel)["gates"]
    for v, g in zip(gates, tape.gradient(loss, gates)):
        if "log_alpha_2" in v.name:
            assert np.all(g.numpy() > 0), v.name


def test_budget_latency_needs_a_table():
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1)
    budget = Budget(latency_us=20.0)
    budget.set_model(qmodel)
    with pytest.raises(ValueError, match="needs the latency table"):
        budget.predict()
    with_table = Budget(latency_us=20.0, latency_table=synthetic())
    with_table.set_model(qmodel)
    assert with_table.predict()["latency_us"] == pytest.approx(synthetic()["full_model_us"])
    assert Budget.from_config(with_table.get_config()).limits == {"latency_us": 20.0}


def test_profile_latency_measures_every_layer_on_its_grid():
    import tflite_export  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    table = tflite_export.profile_latency(tiny(), fractions=(0.5,), runs=20)
    assert table["fractions"] == [0.5, 1.0]
    layers = table["layers"]
    assert sorted(layers) == ["c1", "fc1", "fc2", "flat", "pool"]
    assert [p[:2] for p in layers["pool"]["points"]] == [[4, 4], [8, 8]] and layers["pool"]["kind"] == "op"
    assert [p[:2] for p in layers["c1"]["points"]] == [[1, 4], [1, 8]]  # reads the model input: outputs only
    assert [p[:2] for p in layers["fc1"]["points"]] == [[100, 8], [100, 16], [200, 8], [200, 16]]
    assert [p[:2] for p in layers["fc2"]["points"]] == [[8, 10], [16, 10]]  # the logits are never pruned
    assert all(p[2] > 0 for layer in layers.values() for p in layer["points"])
    assert table["other_us"] == pytest.approx(table["full_model_us"] - table["layers_full_us"])
    qmodel = bbits_tf.quantize_model(tiny(), cost=table)
    assert latency.latency_us(qmodel, table) == pytest.approx(table["full_model_us"])


def test_summary_shows_each_layers_latency_with_a_table():
    table = synthetic()
    qmodel = bbits_tf.quantize_model(models.lenet5(), mu=0.1, cost=table)
    _force(qmodel, "conv2", 20)
    profile = bbits_tf.summary(qmodel)  # the table the model carries
    assert profile.latency_us == pytest.approx(latency.latency_us(qmodel, table))
    assert [r.latency_us for r in profile.layers] == pytest.approx([0.32, 32 * 24 / 100, 384 * 512 / 100, 51.2])
    assert "LiteRT" in bbits_tf.format_summary(profile)
    assert bbits_tf.summary(bbits_tf.quantize_model(models.lenet5())).latency_us is None  # no table, no latency
