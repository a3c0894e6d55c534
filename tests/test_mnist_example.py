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


# ---------------------------------------------------------------------------------------------------------------
# Interrupted runs resume; one folder holds one run (in this process: main() itself)


@pytest.fixture(scope="module")
def mnist_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mnist_example", ROOT / "examples" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args(output_dir, *more):
    return ["--epochs", "3", "--train-limit", "512", "--test-limit", "500", "--no-export", "--verbose", "0",
            "--bit-width-every", "0", "--output-dir", str(output_dir), *more]


def _interrupt_after_saves(monkeypatch, n):
    from bbits_tf import training

    save, count = training.EpochCheckpoint.on_epoch_end, [0]

    def on_epoch_end(checkpointer, epoch, logs=None):
        save(checkpointer, epoch, logs)
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt  # a kill right after the n-th checkpoint

    monkeypatch.setattr(training.EpochCheckpoint, "on_epoch_end", on_epoch_end)


def test_an_interrupted_run_resumes_with_the_same_command(mnist_example, tmp_path, monkeypatch, capsys):
    from bbits_tf import training

    monkeypatch.chdir(tmp_path)
    output_dir = Path("run")  # relative, as the default runs/mnist-bb-0 (a relative folder once broke the resume)
    _interrupt_after_saves(monkeypatch, 2)  # the float warm-up epoch and the first quantized epoch
    with pytest.raises(KeyboardInterrupt):
        mnist_example.main(_tiny_args(output_dir))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert "2 of 3 epochs are checkpointed" in capsys.readouterr().err
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint", "progress.json"]
    assert json.loads((output_dir / "progress.json").read_text())["completed_epochs"] == 2

    # Another command into the interrupted run's folder: refused, with the difference, and nothing changes.
    with pytest.raises(SystemExit) as exit_info:
        mnist_example.main(_tiny_args(output_dir, "--mu", "0.2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds an interrupted run (2 of 3 epochs done" in err and "recipe.mu: 0.1 -> 0.2" in err
    assert training.read_checkpoint(output_dir / "checkpoint")["completed_epochs"] == 2

    results = mnist_example.main(_tiny_args(output_dir, "--verbose", "2"))  # not a run option
    out = capsys.readouterr().out
    assert "resuming bb from" in out and "epoch 2 of 3 done" in out
    assert "epoch 3/3 - test accuracy" in out and "epoch 2/3 - test" not in out  # only the missing epoch
    assert [(h["epoch"], h["phase"]) for h in results["history"]] == [(1, "float_warmup"), (2, "bb"), (3, "bb")]
    assert results["resumed_at_epochs"] == [2] and results["complete"] is True
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["history"] == results["history"] and saved["settings"]["run_options"]["recipe"]["epochs"] == 3
    progress = json.loads((output_dir / "progress.json").read_text())
    assert [e["epoch"] for e in progress["epochs"]] == [1, 2, 3]
    assert [e["test_accuracy"] for e in progress["epochs"]] == pytest.approx(
        [h["test_accuracy"] for h in results["history"]])
    assert not (output_dir / "checkpoint").exists()  # finished: the checkpoint is gone
    assert (output_dir / "model.h5").exists() and (output_dir / "bops_accuracy.png").exists()

    # The identical command on the finished folder: nothing to do.
    monkeypatch.setattr(training, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = mnist_example.main(_tiny_args(output_dir))
    assert again == saved and "Nothing to do" in capsys.readouterr().out


def test_a_finished_folder_refuses_another_run_unless_overwrite(mnist_example, tmp_path, capsys):
    output_dir = tmp_path / "run"
    mnist_example.main(_tiny_args(output_dir, "--epochs", "1"))
    (output_dir / "model.tflite").write_bytes(b"from an older run")  # e.g. a run with --export
    (output_dir / "notes.txt").write_text("the user's own file")
    before = (output_dir / "results.json").read_bytes()
    capsys.readouterr()
    for other in (["--method", "tfmot_w8a8"], ["--seed", "1"], ["--export"], ["--train-limit", "256"]):
        with pytest.raises(SystemExit) as exit_info:
            mnist_example.main(_tiny_args(output_dir, "--epochs", "1", *other))
        assert exit_info.value.code == 2
        assert "holds a finished run" in capsys.readouterr().err
    assert (output_dir / "results.json").read_bytes() == before
    # Options that resolve to the same recipe are the same run (the fast recipe's warm-up does not fit in 1 epoch).
    assert mnist_example.main(_tiny_args(output_dir, "--epochs", "1", "--warmup-epochs", "0")) == json.loads(before)

    second = mnist_example.main(_tiny_args(output_dir, "--epochs", "1", "--method", "tfmot_w8a8", "--overwrite"))
    out = capsys.readouterr().out
    assert "--overwrite: deleted results.json, progress.json, model.h5, model.tflite" in out
    assert second["method"] == "tfmot_w8a8" and second["relative_bops"] == pytest.approx(6.25)
    assert not (output_dir / "model.tflite").exists()  # no file of the old run is left beside the new results
    assert not (output_dir / "bit_widths.png").exists()  # (a baseline has no bit-width plot)
    assert (output_dir / "notes.txt").read_text() == "the user's own file"
    assert json.loads((output_dir / "results.json").read_text())["method"] == "tfmot_w8a8"


def test_results_of_an_older_version_count_as_a_finished_run(mnist_example, tmp_path, capsys):
    output_dir = tmp_path / "old"
    output_dir.mkdir()
    command = ["--epochs", "3", "--train-limit", "512", "--no-export", "--output-dir", str(output_dir)]
    args = mnist_example.parse_args(command)
    old_args = {k: v for k, v in vars(args).items() if k not in ("test_limit", "overwrite")}  # options it lacked
    recipe = mnist_example.make_recipe(args).to_dict()
    (output_dir / "results.json").write_text(json.dumps({"test_accuracy": 0.5, "relative_bops": 6.25,
                                                         "settings": {"args": old_args, "recipe": recipe}}))
    assert mnist_example.main(command)["test_accuracy"] == 0.5
    for other, difference in ((["--seed", "4"], "seed: 0 -> 4"), (["--test-limit", "500"], "test_limit: None -> 500"),
                              (["--mu", "0.3"], "recipe.mu: 0.1 -> 0.3")):
        with pytest.raises(SystemExit):
            mnist_example.main(command + other)
        assert difference in capsys.readouterr().err


def test_files_of_an_unknown_run_without_results_or_checkpoint_are_refused(mnist_example, tmp_path, capsys):
    output_dir = tmp_path / "stale"
    output_dir.mkdir()
    (output_dir / "model.tflite").write_bytes(b"from a run that never wrote results.json")
    (output_dir / "layers.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        mnist_example.main(_tiny_args(output_dir))
    assert exit_info.value.code == 2
    assert "holds files of another run (model.tflite, layers.png)" in capsys.readouterr().err
    assert sorted(p.name for p in output_dir.iterdir()) == ["layers.png", "model.tflite"]


@pytest.mark.parametrize("options,message", [
    (["--decay-groups", "biases"], "`decay_groups` must be among"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--test-limit", "0"], "--test-limit must be >= 1"),
    (["--budget-bops", "200"], "--budget-bops must be in [0, 100]"),
    (["--budget-flash", "-5"], "--budget-flash must be a number of bytes > 0"),
    (["--cost", "flash+arena", "--method", "float"], "need a Bayesian Bits method"),
    (["--budget-arena", "nan"], "--budget-arena must be a number of bytes > 0"),
    (["--method", "tfmot_w8a8", "--cost", "flash"], "need a Bayesian Bits method"),
    (["--data-dir", "EMPTY"], "cannot load MNIST"),
])
def test_invalid_options_exit_before_creating_the_output_folder(mnist_example, tmp_path, capsys, options, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    options = [str(empty) if o == "EMPTY" else o for o in options]
    output_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        mnist_example.main(["--output-dir", str(output_dir), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


def test_default_run_lands_on_the_budget_and_ablations_do_not():
    sys.path.insert(0, str(ROOT / "examples"))
    import mnist  # examples/mnist.py

    assert mnist.parse_args([]).budget_bops == mnist.DEFAULT_BB_BUDGET == 0.33
    assert mnist.parse_args(["--budget-bops", "0"]).budget_bops is None  # off: mu stays at the recipe's 0.1
    assert mnist.parse_args(["--budget-bops", "0.5"]).budget_bops == 0.5
    for method in ("quant_only", "prune_only_w8", "gumbel", "float", "tfmot_w8a8"):
        assert mnist.parse_args(["--method", method]).budget_bops is None
    assert mnist.parse_args(["--method", "gumbel", "--budget-bops", "0.38"]).budget_bops == 0.38
    with pytest.raises(SystemExit):
        mnist.parse_args(["--budget-bops", "-1"])
    with pytest.raises(SystemExit):
        mnist.parse_args(["--method", "float", "--budget-bops", "0.3"])


def test_a_deployment_budget_replaces_the_default_bops_budget_and_picks_its_cost():
    sys.path.insert(0, str(ROOT / "examples"))
    import mnist  # examples/mnist.py

    args = mnist.parse_args(["--budget-flash", "32000"])
    assert (args.cost, args.budget_flash, args.budget_bops) == ("flash", 32000.0, None)
    assert mnist.parse_args(["--budget-arena", "16000"]).cost == "arena"
    both = mnist.parse_args(["--budget-flash", "32000", "--budget-arena", "16000", "--budget-bops", "0.5"])
    assert (both.cost, both.budget_bops) == ("flash+arena", 0.5)  # flash and arena: the prior charges both
    assert mnist.parse_args(["--cost", "arena", "--budget-flash", "9e4"]).cost == "arena"
    plain = mnist.parse_args([])
    assert plain.cost == "bops" and "cost" not in mnist.run_options(plain, mnist.make_recipe(plain, None))


def test_a_flash_budget_run_records_its_limit_prediction_and_cost(mnist_example, tmp_path):
    output_dir = tmp_path / "flash"
    results = mnist_example.main(_tiny_args(output_dir, "--budget-flash", "300000"))
    assert results["budget"]["flash_bytes"] == 300000.0
    assert results["deployment"]["cost"] == "flash"
    from bbits_tf import flash  # the saved model's own prediction
    import bbits_tf
    model = bbits_tf.load_model(str(output_dir / "model.h5"))
    assert results["deployment"]["flash_bytes"] == pytest.approx(flash.flash_bytes(model))
    assert [q.bit_widths for _, _, q, _ in bbits_tf.bayesian_bits_quantizers(model)][0] == (2, 4, 8)


def test_models_beyond_lenet_read_mnist_padded_to_32x32(mnist_example):
    """--model: MNIST zero-padded to 32x32 (pixels unchanged, centred), one channel repeated where MobileNetV2 wants 3."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    x = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    for name, shape in (("lenet5", (28, 28, 1)), ("vgg7", (32, 32, 1)), ("resnet20", (32, 32, 1)),
                        ("mobilenet_v2", (32, 32, 3))):
        images = mnist_example.model_images(x, name)
        assert images.shape == (3, *shape), name
        top, left = (shape[0] - 28) // 2, (shape[1] - 28) // 2
        np.testing.assert_array_equal(images[:, top:top + 28, left:left + 28], np.repeat(x, shape[2], -1))
        assert float(images.sum()) == pytest.approx(float(x.sum()) * shape[2], rel=1e-6)  # the border is 0
        model = mnist_example.build_model(name)()
        assert tuple(model.input_shape[1:]) == shape and model.output_shape == (None, 10)
    args = mnist_example.parse_args(["--model", "mobilenet_v2"])
    options = mnist_example.run_options(args, mnist_example.make_recipe(args, print_fn=None))
    assert options["model"] == "mobilenet_v2"
    lenet = mnist_example.parse_args([])
    assert "model" not in mnist_example.run_options(lenet, mnist_example.make_recipe(lenet, print_fn=None))


def test_reexport_reproduces_a_finished_run(smoke_run, tmp_path):
    """examples/reexport.py on a run of today's code: the same test accuracy and the same exported file."""
    import shutil  # pylint: disable=import-outside-toplevel
    source, _ = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = json.loads((run_dir / "results.json").read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "reexport.py"), str(run_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    after = json.loads((run_dir / "results.json").read_text())
    assert after["test_accuracy"] == before["test_accuracy"]
    assert after["reexported"]["replaced"]["test_accuracy"] == before["test_accuracy"]
    assert after["reexported"]["replaced"]["tflite"]["file_bytes"] == before["tflite"]["file_bytes"]
    assert after["tflite"]["file_bytes"] == before["tflite"]["file_bytes"] and after["tflite"]["passed"]
    assert after["tflite"]["verification"] == before["tflite"]["verification"]
    assert after["tflite"]["checks"]["biases_as_model"]
    assert (run_dir / "model.tflite").read_bytes() == (source / "model.tflite").read_bytes()
