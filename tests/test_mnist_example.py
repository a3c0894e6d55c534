"""Smoke test of examples/mnist.py: the CI mode (--epochs 1 --train-limit 2000) end to end, in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mnist-smoke")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(ROOT / "examples" / "mnist.py"), "--epochs", "1", "--train-limit", "2000",
               "--output-dir", str(output_dir), "--verbose", "2"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return output_dir, proc.stdout


def test_smoke_run_writes_sane_results(smoke_run):
    output_dir, stdout = smoke_run
    results = json.loads((output_dir / "results.json").read_text())
    assert results["test_accuracy"] > 0.5  # 16 steps from scratch; chance is 0.1
    # One epoch at gate lr 1e-2 cannot push a gate from +6 below the threshold: still w8a8, nothing pruned.
    assert 0.0 < results["relative_bops"] <= 6.25 + 1e-9
    assert 0.0 < results["expected_relative_bops"] <= 6.25 + 1e-9
    assert results["epochs"] == 1 and results["warmup_epochs"] == 0  # fast recipe's warm-up does not fit in 1
    assert results["settings"]["train_images"] == 2000 and results["settings"]["test_images"] == 10_000
    assert "--train-limit 2000" in results["settings"]["command_line"]
    assert results["settings"]["recipe"]["lr_gates"] == 1e-2 and results["method"] == "bb"
    assert [layer["name"] for layer in results["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    for layer in results["layers"]:
        assert layer["weight_bits"] in (2, 4, 8, 16, 32) and layer["activation_bits"] in (2, 4, 8, 16, 32)
        assert 0 <= layer["kept_channels"] <= layer["total_channels"]
    assert results["layers"][-1]["activation_bits"] == 32  # the logits stay float
    assert results["total_macs"] == 4_267_008
    assert results["wall_time_s"] > 0
    (entry,) = results["history"]
    assert entry["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert entry["relative_bops"] == pytest.approx(results["relative_bops"])
    assert len(results["bit_width_history"]) >= 2
    # progress.json (rewritten after every epoch) holds the same epoch.
    progress = json.loads((output_dir / "progress.json").read_text())
    assert progress["completed_epochs"] == 1 and progress["settings"]["total_epochs"] == 1
    assert progress["epochs"][0]["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert progress["epochs"][0]["relative_bops"] == pytest.approx(results["relative_bops"])
    # Progress a person can follow: the per-epoch line and the per-layer table.
    assert "epoch 1/1 - test accuracy" in stdout and "relative BOPs" in stdout
    assert "conv2" in stdout and "total MACs 4,267,008" in stdout
    # The trained model is exported, verified against Keras, and written as a C array too.
    assert (output_dir / "model.tflite").stat().st_size == results["tflite"]["file_bytes"]
    assert (output_dir / "model_data.cc").exists() and (output_dir / "model_data.h").exists()
    assert results["tflite"]["verification"]["top1_agreement"] >= 0.99


def test_smoke_run_writes_plots_and_a_model_that_reloads(smoke_run):
    output_dir, _ = smoke_run
    for name in ("bops_accuracy.png", "bit_widths.png", "layers.png"):
        assert (output_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    import bbits_tf
    from bbits_tf._keras import keras

    with bbits_tf.quantize_scope():
        model = keras.models.load_model(output_dir / "model.h5", compile=False)
    results = json.loads((output_dir / "results.json").read_text())
    assert bbits_tf.summary(model).relative_bops == pytest.approx(results["relative_bops"])
