"""Tests of bbits_tf.data.load_cifar10 (CIFAR-10's binary version) and of examples/cifar10.py.

The data are small files in CIFAR-10's binary layout written to tmp_path (20 records per file, known pixels and
labels); the loader's output is compared with a NumPy reference built pixel by pixel from the record layout.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bbits_tf import training
from bbits_tf.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, normalize_cifar10, read_cifar10_batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import cifar10  # noqa: E402  (examples/cifar10.py)

RECORDS = 20  # per file
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
# MACs of VGG7's MAC layers at 32x32 (spec section 5).
VGG7_MACS = {"conv1": 3_538_944, "conv2": 150_994_944, "conv3": 75_497_472, "conv4": 150_994_944,
             "conv5": 75_497_472, "conv6": 150_994_944, "fc1": 8_388_608, "fc2": 10_240}


def record_bytes(images_chw, labels):
    """CIFAR-10 binary records: per image, 1 label byte then the 3x32x32 uint8 pixels in CHW order."""
    return b"".join(bytes([int(label)]) + image.astype(np.uint8).tobytes() for image, label in zip(images_chw, labels))


def make_split(seed, n=RECORDS):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 2, 31, 31] = 0, 255  # both ends of the range: red 0 at (0, 0), blue 255 at (31, 31)
    return images, rng.integers(0, 10, size=n).astype(np.uint8)


def write_cifar(folder, n=RECORDS):
    """Writes the six files to ``folder``; returns {file name: (images CHW, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for i, name in enumerate(TRAIN_FILES + ["test_batch.bin"]):
        images, labels = make_split(i, n)
        (folder / name).write_bytes(record_bytes(images, labels))
        splits[name] = (images, labels)
    return splits


def reference_hwc(raw, n):
    """NumPy reference of the record layout: pixel (row r, column c) of channel ch of record k is the byte
    ``1 + ch * 1024 + r * 32 + c`` of that record; returned NHWC."""
    out = np.empty((n, 32, 32, 3), np.uint8)
    for k in range(n):
        base = k * 3073
        for ch in range(3):
            for r in range(32):
                start = base + 1 + ch * 1024 + r * 32
                out[k, r, :, ch] = np.frombuffer(raw[start:start + 32], np.uint8)
    return out


def reference_normalized(x_hwc):
    x = x_hwc.astype(np.float64) / 255.0
    return ((x - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)).astype(np.float32)


@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar"
    return folder, write_cifar(folder)


def expected_split(folder, names):
    xs, ys = [], []
    for name in names:
        raw = (folder / name).read_bytes()
        xs.append(reference_hwc(raw, len(raw) // 3073))
        ys.append(np.frombuffer(raw, np.uint8)[::3073])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


# --- the loader ----------------------------------------------------------------------------------------------------

def test_read_batch_transposes_chw_to_hwc(cifar_dir):
    folder, splits = cifar_dir
    images, labels = read_cifar10_batch(folder / "test_batch.bin")
    chw, expected_labels = splits["test_batch.bin"]
    assert images.shape == (RECORDS, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, reference_hwc((folder / "test_batch.bin").read_bytes(), RECORDS))
    np.testing.assert_array_equal(labels, expected_labels)
    # The same pixels, read from the arrays that were written: image 3, row 5, column 7.
    assert images[3, 5, 7].tolist() == [chw[3, 0, 5, 7], chw[3, 1, 5, 7], chw[3, 2, 5, 7]]


def test_load_raw_values_order_and_shapes(cifar_dir):
    folder, _ = cifar_dir
    (x_train, y_train), (x_test, y_test) = load_cifar10(folder, normalize=False)
    assert x_train.shape == (5 * RECORDS, 32, 32, 3) and x_test.shape == (RECORDS, 32, 32, 3)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    expected_x, expected_y = expected_split(folder, TRAIN_FILES)  # files 1..5 in order
    np.testing.assert_array_equal(x_train, expected_x)
    np.testing.assert_array_equal(y_train, expected_y)
    expected_x, expected_y = expected_split(folder, ["test_batch.bin"])
    np.testing.assert_array_equal(x_test, expected_x)
    np.testing.assert_array_equal(y_test, expected_y)


def test_load_normalizes_per_channel(cifar_dir):
    folder, _ = cifar_dir
    (x_train, _), (x_test, _) = load_cifar10(folder)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    np.testing.assert_allclose(x_train, reference_normalized(expected_split(folder, TRAIN_FILES)[0]), atol=2e-6)
    np.testing.assert_allclose(x_test, reference_normalized(expected_split(folder, ["test_batch.bin"])[0]), atol=2e-6)
    # Hand-computed ends of the range: red 0 -> -0.4914 / 0.2023; blue 255 -> (1 - 0.4465) / 0.2010.
    first = load_cifar10(folder)[0][0][0]  # data_batch_1.bin, record 0
    assert first[0, 0, 0] == pytest.approx(-2.4290657, abs=1e-6)
    assert first[31, 31, 2] == pytest.approx(2.7537313, abs=1e-6)


def test_normalize_cifar10_values():
    x = np.array([[[0, 128, 255]]], np.uint8)
    expected = [(0 - 0.4914) / 0.2023, (128 / 255 - 0.4822) / 0.1994, (1 - 0.4465) / 0.2010]
    np.testing.assert_allclose(normalize_cifar10(x)[0, 0], expected, atol=1e-6)  # float32 arithmetic
    with pytest.raises(ValueError, match=r"channel last \(NHWC\). Received: x with shape \(2, 3, 32, 32\)"):
        normalize_cifar10(np.zeros((2, 3, 32, 32), np.uint8))


def test_train_limit_keeps_the_first_examples(cifar_dir):
    folder, _ = cifar_dir
    (x_all, y_all), (x_test_all, _) = load_cifar10(folder)
    (x_train, y_train), (x_test, _) = load_cifar10(folder, train_limit=27)
    assert x_train.shape == (27, 32, 32, 3) and y_train.shape == (27,)
    np.testing.assert_array_equal(x_train, x_all[:27])
    np.testing.assert_array_equal(y_train, y_all[:27])
    np.testing.assert_array_equal(x_test, x_test_all)  # the test set stays whole


def test_files_inside_the_archive_folder(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-bin")
    (x_train, _), (x_test, _) = load_cifar10(tmp_path, normalize=False)
    assert len(x_train) == 5 * RECORDS and len(x_test) == RECORDS
    expected = expected_split(tmp_path / "cifar-10-batches-bin", ["test_batch.bin"])[0]
    np.testing.assert_array_equal(x_test, expected)


def test_missing_folder_and_files(tmp_path, cifar_dir):
    with pytest.raises(ValueError, match=r"no copy ships with the package. Received: data_dir=None"):
        load_cifar10()
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"existing folder .* Received: data_dir='.*nowhere'"):
        load_cifar10(missing)
    folder, _ = cifar_dir
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(ValueError, match=r"CIFAR-10 file 'data_batch_3.bin' not found in '.*cifar'\. "
                                         r"Received: data_dir='.*cifar'"):
        load_cifar10(folder)
    (folder / "test_batch.bin").unlink()
    (folder / "data_batch_3.bin").write_bytes((folder / "data_batch_1.bin").read_bytes())
    with pytest.raises(ValueError, match=r"'test_batch.bin' not found"):
        load_cifar10(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"'data_batch_1.bin' not found in '.*empty'"):
        load_cifar10(empty)


def test_python_version_folder_gets_a_hint(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"pickle")
    (tmp_path / "batches.meta").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"looks like CIFAR-10's Python version .* reads the binary version"):
        load_cifar10(tmp_path)


def test_wrong_file_size(cifar_dir):
    folder, _ = cifar_dir
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes() + b"\x00" * 5)
    with pytest.raises(ValueError, match=r"data_batch_2.bin is not a CIFAR-10 binary file: .* multiple of the "
                                         r"3073-byte record .* found 61465 bytes \(20 records and 5 bytes over\)"):
        load_cifar10(folder)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_2.bin .* found 0 bytes"):
        load_cifar10(folder)


def test_label_outside_0_to_9(cifar_dir):
    folder, _ = cifar_dir
    path = folder / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[7 * 3073] = 10  # record 7's label byte
    raw[9 * 3073] = 255
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"test_batch.bin holds labels outside 0..9 in 2 record\(s\); the first "
                                         r"is record 7 with label 10"):
        load_cifar10(folder)


def test_bad_arguments(cifar_dir):
    folder, _ = cifar_dir
    with pytest.raises(ValueError, match=r"`source` must be one of \('binary', 'tfds'\). Received: source='idx'"):
        load_cifar10(folder, source="idx")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"`train_limit` must be a positive int or None"):
            load_cifar10(folder, train_limit=bad)


# --- examples/cifar10.py -------------------------------------------------------------------------------------------

def test_paper_recipe_values():
    r = cifar10.PAPER_RECIPE
    assert (r.epochs, r.warmup_epochs, r.batch_size, r.mu) == (300, 0, 128, 0.01)  # spec 7.3
    assert (r.lr_weights, r.lr_ranges, r.lr_gates, r.adam_epsilon) == (1e-3, 1e-3, 1e-3, 1e-8)  # spec 7.1
    assert r.weight_schedule == "paper" and r.decay_groups == ("weights",) and r.decay_start is None
    assert r.init_log_alpha == (6.0, 6.0, 6.0, 6.0) and r.bit_widths == (2, 4, 8, 16, 32)
    # Constant for epochs 1-201, then 99/100 ... 1/100 (spec 7.1, E=300).
    from bbits_tf.optimizers import constant_then_linear_decay
    factors = [constant_then_linear_decay(e, r.epochs) for e in (1, 201, 202, 300)]
    assert factors == [1.0, 1.0, pytest.approx(0.99), pytest.approx(0.01)]


def test_arguments_data_and_recipe(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    args = cifar10.parse_args(["--data-dir", str(folder), "--epochs", "2", "--train-limit", "40", "--test-limit",
                               "20", "--output-dir", str(tmp_path / "out"), "--seed", "3", "--threads", "1",
                               "--deterministic"])
    assert (args.epochs, args.train_limit, args.test_limit, args.seed, args.threads) == (2, 40, 20, 3, 1)
    assert args.deterministic and not args.tfds and args.augment and args.recipe == "paper"
    assert args.budget_bops is None  # off by default: the paper's fixed mu
    recipe = cifar10.make_recipe(args)
    assert recipe == cifar10.PAPER_RECIPE.replace(epochs=2)
    assert cifar10.make_recipe(cifar10.parse_args(["--data-dir", str(folder), "--mu", "0.1"])).mu == 0.1
    (x_train, y_train), (x_test, y_test) = cifar10.load_data(args)
    assert x_train.shape == (40, 32, 32, 3) and x_test.shape == (20, 32, 32, 3)
    assert y_train.shape == (40,) and y_test.shape == (20,)
    (x_all, _), _ = load_cifar10(folder)
    np.testing.assert_array_equal(x_train, x_all[:40])
    options = cifar10.mnist.run_options(args, recipe)
    assert options["recipe"]["epochs"] == 2 and options["augment"] is True and options["train_limit"] == 40
    assert not (tmp_path / "out").exists()  # parsing and loading write nothing


@pytest.mark.parametrize("argv, message", [
    ([], r"--data-dir is required"),
    (["--data-dir", "/nonexistent/cifar"], r"--data-dir must be an existing folder .* Received: /nonexistent/cifar"),
    (["--data-dir", ".", "--epochs", "0"], r"--epochs must be >= 1. Received: 0"),
    (["--data-dir", ".", "--decay-groups", "biases"], r"decay_groups"),
    (["--data-dir", ".", "--method", "float", "--budget-bops", "0.5"], r"--budget-bops needs a Bayesian Bits method"),
    (["--data-dir", ".", "--model", "resnet20"], r"--model: invalid choice: 'resnet20'"),
    (["--data-dir", ".", "--budget-flash", "32000"], r"--budget-flash: deployment costs and budgets are wired in "
                                                     r"examples/mnist.py only"),
    (["--data-dir", ".", "--cost", "flash"], r"--cost: deployment costs"),
    (["--data-dir", ".", "--recipe", "fast"], r"--recipe: invalid choice: 'fast'"),
])
def test_bad_options_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar10.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_options_are_mnist_options_with_cifar_defaults():
    """The options come from examples/mnist.py's parser: a new option there must be checked for CIFAR-10 here."""
    parser = cifar10.make_parser()
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == {
        "recipe", "model", "method", "epochs", "warmup_epochs", "mu", "batch_size", "lr", "range_lr", "gate_lr",
        "decay_groups", "seed", "data_dir", "tfds", "augment", "train_limit", "test_limit", "output_dir",
        "overwrite", "log_dir", "bit_width_every", "export", "verbose", "threads", "deterministic", "budget_bops",
        "cost", "budget_flash", "budget_arena", "budget_latency_us", "budget_latency_ratio"}  # the last 5 refused
    defaults = parser.parse_args([])
    assert (defaults.recipe, defaults.model, defaults.method, defaults.budget_bops) == ("paper", "vgg7", "bb", 0)
    assert defaults.data_dir is None and defaults.augment and defaults.export


def test_folder_without_cifar_files_exits_with_status_2(tmp_path, capsys):
    args = cifar10.parse_args(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cifar10.load_data(args)
    assert exit_info.value.code == 2
    assert "cannot load CIFAR-10: CIFAR-10 file 'data_batch_1.bin' not found" in capsys.readouterr().err


def reference_crops(image, pad, pad_value):
    """Every (row offset, column offset, flip) -> the crop ``augment`` may return, in NumPy."""
    h, w, c = image.shape
    padded = np.empty((h + 2 * pad, w + 2 * pad, c), image.dtype)
    padded[:] = pad_value
    padded[pad:pad + h, pad:pad + w] = image
    crops = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            crops[(dy, dx, False)], crops[(dy, dx, True)] = crop, crop[:, ::-1]
    return crops


def test_augment_is_a_padded_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)  # distinct values: one crop matches
    out = cifar10.augment(images, tf.random.Generator.from_seed(1)).numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    pad_value = np.float32(cifar10.PAD_VALUE)
    np.testing.assert_allclose(pad_value, [-0.4914 / 0.2023, -0.4822 / 0.1994, -0.4465 / 0.2010], rtol=1e-6)
    draws = []
    for image, crop in zip(images, out):
        matches = [key for key, ref in reference_crops(image, 4, pad_value).items() if np.array_equal(ref, crop)]
        assert len(matches) == 1
        draws.append(matches[0])
    dys, dxs, flips = zip(*draws)
    assert set(dys) <= set(range(9)) and len(set(dys)) >= 6 and len(set(dxs)) >= 6
    assert 16 <= sum(flips) <= 48  # p = 1/2 over 64 images
    # The same seed draws the same crops and flips.
    np.testing.assert_array_equal(cifar10.augment(images, tf.random.Generator.from_seed(1)).numpy(), out)


def test_augmentation_maps_the_training_batches_only():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 32, 32, 3)).astype(np.float32), np.arange(10)
    # training.train(train_map=...) builds its pipelines here
    train, test, steps = training._as_datasets(((x, y), (x, y)), 4, 5, 0, train_map=cifar10.augmentation(seed=0))
    batches = train.as_numpy_iterator()  # repeats without end: fit takes `steps` batches per epoch
    epochs = [[next(batches) for _ in range(steps)] for _ in range(2)]
    test_batches = list(test.as_numpy_iterator())
    assert steps == 3 and [len(b[0]) for b in epochs[0]] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in test_batches]), x)  # test set untouched
    train_x = [np.concatenate([b[0] for b in e]) for e in epochs]
    train_y = [np.concatenate([b[1] for b in e]) for e in epochs]
    assert sorted(train_y[0].tolist()) == list(range(10))  # shuffled, labels kept with their images
    assert not np.array_equal(train_x[0], x[train_y[0]])  # augmented
    # Every augmented image is one of the allowed crops of its own image; epochs draw anew.
    for image, label in zip(train_x[0], train_y[0]):
        assert any(np.array_equal(ref, image) for ref in reference_crops(x[label], 4, cifar10.PAD_VALUE).values())
    assert not np.array_equal(train_x[0][np.argsort(train_y[0])], train_x[1][np.argsort(train_y[1])])


# 44-70 s on the 2-core machine; not marked slow: the only test of examples/cifar10.py's main() end to end.
def test_one_quantized_training_step_end_to_end(tmp_path):
    """main() on 8 training and 8 test images, one step of batch 8 (about 40-60 s on a 2-core CPU)."""
    folder = tmp_path / "cifar"
    write_cifar(folder, n=8)
    out = tmp_path / "run"
    results = cifar10.main(["--data-dir", str(folder), "--epochs", "1", "--train-limit", "8", "--test-limit", "8",
                            "--batch-size", "8", "--output-dir", str(out), "--no-export", "--verbose", "0",
                            "--bit-width-every", "0"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["epochs"] == 1 and saved["dataset"] == "cifar10" and saved["model"] == "vgg7"
    assert saved["settings"]["train_images"] == 8 and saved["settings"]["test_images"] == 8
    assert saved["settings"]["recipe"]["init_log_alpha"] == [6.0, 6.0, 6.0, 6.0]
    assert saved["settings"]["recipe"]["mu"] == 0.01 and saved["settings"]["recipe"]["batch_size"] == 8
    assert [layer["name"] for layer in saved["layers"]] == list(VGG7_MACS)
    assert {layer["name"]: layer["macs"] for layer in saved["layers"]} == VGG7_MACS
    assert saved["total_macs"] == sum(VGG7_MACS.values()) == 615_917_568
    # One step at gate lr 1e-3 leaves every gate near 6: 32-bit weights and activations, nothing pruned; only
    # conv1 reads the 8-bit input, so relative BOPs = 100 * (1 - conv1 MACs * (1 - 8/32) / total MACs).
    expected = 100 * (1 - VGG7_MACS["conv1"] * 0.75 / sum(VGG7_MACS.values()))
    assert expected == pytest.approx(99.56906, abs=1e-5)
    assert saved["relative_bops"] == pytest.approx(expected, rel=1e-9)
    for layer in saved["layers"]:
        assert layer["weight_bits"] == 32 and layer["kept_channels"] == layer["total_channels"]
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and len(saved["history"]) == 1
    assert results["test_accuracy"] == saved["test_accuracy"]
    assert (out / "model.h5").stat().st_size > 4 * 12_973_450  # float32 weights at least
    assert not (out / "checkpoint").exists() and (out / "bops_accuracy.png").exists()
    # The same command again finds the finished run and trains nothing.
    again = cifar10.main(["--data-dir", str(folder), "--epochs", "1", "--train-limit", "8", "--test-limit", "8",
                          "--batch-size", "8", "--output-dir", str(out), "--no-export", "--verbose", "0",
                          "--bit-width-every", "0"])
    assert again["relative_bops"] == saved["relative_bops"]
