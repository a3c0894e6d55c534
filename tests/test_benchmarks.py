"""benchmarks/train_step.py, benchmarks/export.py and benchmarks/epoch.py: their --smoke modes end to end (in a subprocess, as a user runs
them) write JSON with every field and finite positive numbers; the MobileNetV2 helpers; per-model defaults."""
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
    """``benchmarks.<name>`` (the scripts put the repository root on sys.path themselves; so does this)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def _run(script, *args, timeout=1200):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------------- helpers


def test_mnist_32x32x3_pads_by_two_and_repeats_the_channel():
    train_step = _module("train_step")
    x = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    out = train_step.mnist_32x32x3(x)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(out[:, 2:30, 2:30, c], x[..., 0])
    assert not out[:, :2].any() and not out[:, 30:].any() and not out[:, :, :2].any() and not out[:, :, 30:].any()


def test_export_defaults_per_model_and_smoke_never_overwrites_results():
    export = _module("export")
    lenet = export.parse_args([])
    assert (lenet.model, lenet.io, lenet.test_images, lenet.qat_steps) == ("lenet5", "float", None, 100)
    assert lenet.output == os.path.join("benchmarks", "results", "export.json")
    mobile = export.parse_args(["--model", "mobilenet_v2"])
    assert (mobile.io, mobile.test_images, mobile.output) == (
        "int8", 2000, os.path.join("benchmarks", "results", "export_mobilenet_v2.json"))
    smoke = export.parse_args(["--model", "mobilenet_v2", "--smoke"])
    assert smoke.output.endswith("export_mobilenet_v2_smoke.json")
    assert (smoke.train_steps, smoke.qat_steps, smoke.runs) == (2, 2, 20)
    with pytest.raises(SystemExit):
        export.parse_args(["--model", "mobilenet_v2", "--bbits-model", "model.h5"])


# ---------------------------------------------------------------------------------------------------- train_step
# (LeNet5 smoke: about 30 s on 2 shared cores)


def _check_train_step(result, variants, steps):
    for key in ("what", "batch_size", "steps", "machine", "tensorflow", "median_ms", "ratio_to_tfmot_8bit",
                "ratio_to_float", "times_ms", "warmup_s", "model", "errors"):
        assert key in result, key
    assert result["steps"] == steps and result["errors"] == {}
    for field in ("median_ms", "ratio_to_tfmot_8bit", "ratio_to_float", "times_ms", "warmup_s"):
        assert set(result[field]) == set(variants), field
    for name in variants:
        assert _positive(result["median_ms"][name]) and _positive(result["warmup_s"][name])
        assert len(result["times_ms"][name]) == steps and all(map(_positive, result["times_ms"][name]))
        assert _positive(result["ratio_to_tfmot_8bit"][name]) and _positive(result["ratio_to_float"][name])
    median = result["median_ms"]
    assert result["ratio_to_tfmot_8bit"]["bbits_tf"] == pytest.approx(median["bbits_tf"] / median["tfmot_8bit"])
    assert result["ratio_to_float"]["bbits_tf"] == pytest.approx(median["bbits_tf"] / median["float"])
    assert result["ratio_to_float"]["float"] == result["ratio_to_tfmot_8bit"]["tfmot_8bit"] == 1.0


def test_train_step_smoke_lenet5_keeps_its_variants(tmp_path):
    out = tmp_path / "train_step.json"
    stdout = _run("train_step.py", "--smoke", "--output", str(out))
    result = json.loads(out.read_text())
    # The graph-quantizer variant (the op off) is timed where the fused op is on, as on this machine.
    assert result["fused_op"]["enabled"] is True
    _check_train_step(result, ["float", "tfmot_8bit", "bbits_tf", "bbits_tf (graph quantizer)",
                               "bbits_tf (traced grad)"], steps=2)
    assert result["model"] == "lenet5" and result["batch_size"] == 128 and "LeNet5" in result["what"]
    assert "x1.00 of tfmot 8-bit" in stdout


@pytest.mark.slow  # about 6 minutes on 2 shared cores: tracing bbits_tf's MobileNetV2 train step takes most
def test_train_step_smoke_mobilenet_v2(tmp_path):
    out = tmp_path / "train_step_mobilenet_v2.json"
    _run("train_step.py", "--model", "mobilenet_v2", "--smoke", "--output", str(out))
    result = json.loads(out.read_text())
    _check_train_step(result, ["float", "tfmot_8bit", "bbits_tf", "bbits_tf (graph quantizer)"], steps=2)
    assert result["model"] == "mobilenet_v2" and result["batch_size"] == 64 and result["smoke"] is True


# ---------------------------------------------------------------------------------------------------- export


def _check_export(summary, model, io, bbits_variants):
    assert summary["model_name"] == model and summary["io"] == io and summary["errors"] == {}
    assert summary["test_images"] == 100 and summary["model"]["source"] == "trained here" and summary["smoke"]
    variants = summary["variants"]
    assert list(variants) == ["float", "tfmot_int8", *bbits_variants]
    for name, result in variants.items():
        assert isinstance(result["file_bytes"], int) and result["file_bytes"] > 0, name
        assert 0.0 <= result["accuracy"] <= 1.0 and _positive(result["convert_s"]), name
        for kernels in ("latency_xnnpack", "latency_builtin"):
            assert _positive(result[kernels]["median_us"]) and _positive(result[kernels]["p90_us"]), name
            assert result[kernels]["n"] == 20
    for name in bbits_variants:
        assert variants[name]["export"]["verification"]["n"] == 100
    expected = {"float_size_over_bbits"} | {f"{name}_size_over_tfmot_int8" for name in bbits_variants} | {
        f"tfmot_int8_over_{name}_latency_{kernels}" for name in bbits_variants for kernels in ("xnnpack", "builtin")}
    assert set(summary["ratios"]) == expected and all(map(_positive, summary["ratios"].values()))
    ratios, bbits, tfmot = summary["ratios"], variants["bbits"], variants["tfmot_int8"]
    assert ratios["bbits_size_over_tfmot_int8"] == pytest.approx(bbits["file_bytes"] / tfmot["file_bytes"])
    assert ratios["tfmot_int8_over_bbits_latency_xnnpack"] == pytest.approx(
        tfmot["latency_xnnpack"]["median_us"] / bbits["latency_xnnpack"]["median_us"])


def test_export_smoke_lenet5(tmp_path):  # about 45 s on 2 shared cores
    out = tmp_path / "export.json"
    _run("export.py", "--smoke", "--output", str(out))
    summary = json.loads(out.read_text())
    _check_export(summary, "lenet5", "float", ["bbits", "bbits_int4_all", "bbits_int2", "bbits_int8w"])
    assert summary["model"]["train_images"] == 1024 and summary["qat_steps"] == 2


@pytest.mark.slow  # about 8 minutes on 2 shared cores: tracing the bbits training step and exporting 52 conv layers
def test_export_smoke_mobilenet_v2(tmp_path):
    out = tmp_path / "export_mobilenet_v2.json"
    _run("export.py", "--model", "mobilenet_v2", "--smoke", "--output", str(out))
    summary = json.loads(out.read_text())
    _check_export(summary, "mobilenet_v2", "int8", ["bbits"])
    ops = summary["variants"]["bbits"]["ops"]
    assert ops.count("CONV_2D") + ops.count("DEPTHWISE_CONV_2D") == 52 and "MUL" not in ops  # BatchNorm folded
    assert len(summary["bbits_profile"]) == 53


def test_epoch_benchmark_smoke(tmp_path):
    out = tmp_path / "epoch.json"
    stdout = _run("epoch.py", "--smoke", "--output", str(out))
    result = json.loads(out.read_text())
    assert result["train_images"] == 512 and result["rounds"] == 1 and result["smoke"] is True
    for name in ("tfmot_8bit", "bbits_tf", "bbits_tf (graph quantizer)"):
        (seconds,) = result["epoch_s"][name]  # one round of two epochs
        assert len(seconds) == 2 and all(s > 0 for s in seconds)
        assert result["median_steady_epoch_s"][name] == seconds[1]
        assert result["train_call_s"][name][0] >= sum(seconds)
    assert result["ratio_steady_epoch"] == pytest.approx(
        result["median_steady_epoch_s"]["bbits_tf"] / result["median_steady_epoch_s"]["tfmot_8bit"])
    assert result["ratio_steady_epoch_to_graph_quantizer"] == pytest.approx(
        result["median_steady_epoch_s"]["bbits_tf"] / result["median_steady_epoch_s"]["bbits_tf (graph quantizer)"])
    assert result["fused_op"]["enabled"] is True
    assert "steady epoch" in stdout


def test_costs_benchmark_smoke(tmp_path):
    """benchmarks/costs.py: the predictions against two exported files; bytes and arena are deterministic (the
    latency is a timing: recorded, not asserted)."""
    out = tmp_path / "costs.json"
    _run("costs.py", "--smoke", "--output", str(out))
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["rows"]] == ["init_w8a8", "light"]
    for row in result["rows"]:
        assert abs(row["flash_error"]) < 0.02 and abs(row["arena_error"]) < 0.05 and row["checks_passed"]
        assert row["measured_latency_us"] > 0 and row["predicted_latency_us"] > 0
    assert result["rows"][0]["file_bytes"] == 587_776  # LeNet5 at w8a8, nothing pruned
    assert result["smoke"] and result["latency_table"]["fractions"] == [0.5, 1.0]
