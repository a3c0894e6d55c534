"""BOP counter against the spec's numbers (section 5)."""
import numpy as np
import pytest

import bbits_tf
from bbits_tf import models


def _set_gates(model, weight=None, activation=None, prune=None):
    for layer, role, _, v in bbits_tf.bayesian_bits_quantizers(model):
        la = weight if role == "weight" else activation
        if la is not None:
            v["log_alpha"].assign(np.asarray(la, np.float32))
        if prune and layer.layer.name in prune and "log_alpha_2" in v:
            v["log_alpha_2"].assign(prune[layer.layer.name])


@pytest.fixture()
def qlenet():
    return bbits_tf.quantize_model(models.lenet5())


def test_lenet5_macs_from_the_graph(qlenet):
    profile = bbits_tf.summary(qlenet)
    assert [r.macs for r in profile.layers] == [460_800, 3_276_800, 524_288, 5_120]
    assert profile.total_macs == 4_267_008
    assert profile.fp32_bops / 1e9 == pytest.approx(4.369, abs=1e-3)


def test_initial_gates_give_w8a8(qlenet):
    profile = bbits_tf.summary(qlenet)
    assert profile.relative_bops == pytest.approx(6.25)
    assert [(r.weight_bits, r.input_bits) for r in profile.layers] == [(8, 8)] * 4
    assert [r.output_bits for r in profile.layers] == [8, 8, 8, 32]
    # Expected BOPs: q(6) = 0.9995 per open gate, so slightly below 6.25 %.
    assert 6.2 < profile.expected_relative_bops < 6.25


@pytest.mark.parametrize(
    "weight, activation, want",
    [
        ((6, -6, -6, -6), None, 3.125),  # w4a8
        ((-6, -6, -6, -6), None, 1.5625),  # w2a8
        ((-6, -6, -6, -6), (-6, -6, -6, -6), 0.517177),  # w2a2, 8-bit input, unpruned
        ((6, 6, 6, 6), (6, 6, 6, 6), 100.0 * (460_800 * 8 * 32 + (4_267_008 - 460_800) * 32 * 32) / (4_267_008 * 1024)),
    ],
)
def test_relative_bops_at_fixed_bit_widths(qlenet, weight, activation, want):
    _set_gates(qlenet, weight, activation)
    assert bbits_tf.relative_bops(qlenet) == pytest.approx(want, rel=1e-5)


def test_spec_w4a4_and_w2a32():
    q = bbits_tf.quantize_model(models.lenet5())
    _set_gates(q, (6, -6, -6, -6), (6, -6, -6, -6))
    assert bbits_tf.relative_bops(q) == pytest.approx(1.731, abs=1e-3)
    _set_gates(q, (-6, -6, -6, -6), (6, 6, 6, 6))
    assert bbits_tf.relative_bops(q) == pytest.approx(5.744, abs=1e-3)


def test_pruned_channels_remove_consumer_inputs_across_flatten(qlenet):
    conv2_gates = np.where(np.arange(64) < 16, -6.0, 6.0).astype(np.float32)  # prune 16 of 64
    conv1_gates = np.where(np.arange(32) < 8, -6.0, 6.0).astype(np.float32)  # prune 8 of 32
    _set_gates(qlenet, prune={"conv1": conv1_gates, "conv2": conv2_gates})
    rows = {r.name: r for r in bbits_tf.summary(qlenet).layers}
    assert (rows["conv1"].kept_channels, rows["conv2"].kept_channels) == (24, 48)
    assert (rows["conv2"].kept_inputs, rows["conv2"].total_inputs) == (24, 32)
    # Flatten maps each of conv2's channels to 4 * 4 inputs of fc1.
    assert (rows["fc1"].kept_inputs, rows["fc1"].total_inputs) == (48 * 16, 1024)
    macs = {"conv1": 460_800, "conv2": 3_276_800, "fc1": 524_288, "fc2": 5_120}
    keep = {"conv1": 0.75, "conv2": 0.75 * 0.75, "fc1": 1.0 * 0.75, "fc2": 1.0}
    want = sum(macs[k] * 64 * keep[k] for k in macs) / (4_267_008 * 1024) * 100
    assert bbits_tf.relative_bops(qlenet) == pytest.approx(want, rel=1e-6)


def test_expected_bops_match_gate_probabilities(qlenet):
    _set_gates(qlenet, (0.0, -6, -6, -6), (0.0, -6, -6, -6))
    q = 1 / (1 + np.exp(-1.598597))  # P(z4 != 0) at log_alpha 0
    e_bits = 2 * (1 - q) + 4 * q
    records = bbits_tf.layer_bops(qlenet, expected=True)
    q6 = 1 / (1 + np.exp(-(6 + 1.598597)))
    assert records[0].weight_bits == pytest.approx(e_bits, rel=1e-5)
    assert records[0].input_bits == 8
    assert records[1].keep == pytest.approx(q6 * q6, rel=1e-5)
    # Deterministic: log_alpha 0 > -0.935, so 4 bits everywhere: w4a4.
    assert bbits_tf.relative_bops(qlenet) == pytest.approx(1.731, abs=1e-3)


def test_vgg7_macs_and_w8a8():
    q = bbits_tf.quantize_model(models.vgg7())
    profile = bbits_tf.summary(q)
    assert [r.macs for r in profile.layers] == [
        3_538_944, 150_994_944, 75_497_472, 150_994_944, 75_497_472, 150_994_944, 8_388_608, 10_240]
    assert profile.total_macs == 615_917_568
    # Each conv -> BN -> ReLU is one folded unit with an 8-bit output quantizer after the ReLU: w8a8 throughout.
    assert all(r.input_bits == 8 for r in profile.layers)
    assert profile.relative_bops == pytest.approx(6.25)


def test_summary_prints_a_table(qlenet, capsys):
    bbits_tf.summary(qlenet, print_fn=print)
    out = capsys.readouterr().out
    assert "conv2" in out and "6.250% of FP32" in out
    assert bbits_tf.summary(qlenet).to_dict()["relative_bops"] == pytest.approx(6.25)


def test_summary_of_a_float_model_says_what_to_pass():
    with pytest.raises(ValueError, match="no(ne)?.*quantize_model"):
        bbits_tf.summary(models.lenet5())
    with pytest.raises(ValueError, match="fixed_bit_profile"):
        bbits_tf.relative_bops(models.lenet5())


@pytest.mark.parametrize("weight, activation, want", [(2, 32, 6.223), (1, 32, 3.112), (4, 4, 1.571), (2, 2, 0.397),
                                                      (8, 8, 6.25)])
def test_one_counter_for_baselines_reproduces_the_spec_vgg7_table(weight, activation, want):
    from bbits_tf import training

    profile = training.fixed_bit_profile(models.vgg7(), weight, activation)  # bops.layer_bops(fixed_bits=...)
    assert round(profile.relative_bops, 3) == want
    assert profile.total_macs == 615_917_568


def test_summary_columns_stay_apart_for_large_layers():
    """VGG7's layers have up to 151M MACs and 10^10 BOPs: the number columns widen so that they never run together."""
    text = bbits_tf.format_summary(bbits_tf.summary(bbits_tf.quantize_model(models.vgg7())))
    row = next(line for line in text.splitlines() if line.startswith("conv2 "))
    macs, bops, flash_bytes, arena_bytes = row.split()[-4:]
    assert macs == "150,994,944" and bops == f"{150_994_944 * 64:,}"
    assert flash_bytes == f"{3 * 3 * 128 * 128 + 4 * 128:,}"  # w8: a byte a weight, int32 biases
    assert int(arena_bytes.replace(",", "")) >= 2 * 32 * 32 * 128  # its input and output, int8
    assert len(row) == len(text.splitlines()[0])  # aligned with the header
