"""Tests of bbits_tf.data: IDX reading, the shipped MNIST copy, and the tf.data pipeline."""
import gzip
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from bbits_tf import data, training
from bbits_tf._keras import keras
from bbits_tf.data import MNIST_DIR, load_mnist, make_dataset, read_idx

# From /work/shared/data/README.md (the copy shipped in bbits_tf/datasets/mnist).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
DECOMPRESSED_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array, dtype="u1"):
    """Encodes ``array`` as IDX: magic 0x0000TTDD, big-endian uint32 sizes, big-endian values."""
    dtype = np.dtype(dtype)
    header = bytes([0, 0, _TYPE_CODES[dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.asarray(array, dtype=dtype).tobytes()


def write_mnist(folder, x_train, y_train, x_test, y_test, compress):
    for key, array in {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}.items():
        raw = idx_bytes(array)
        name = data.MNIST_FILES[key]
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


@pytest.fixture
def tiny_mnist():
    """A small fake MNIST split: 7 training and 3 test images with distinct pixel values."""
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    x_train[0, 0, 0], x_train[0, 0, 1] = 0, 255  # make sure both ends of the range occur
    return x_train, np.array([3, 1, 4, 1, 5, 9, 2], np.uint8), x_test, np.array([6, 5, 3], np.uint8)


# --- the shipped copy -------------------------------------------------------------------------------------------

def test_shipped_mnist_shapes_and_dtypes(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64


def test_shipped_mnist_values_in_unit_range(mnist):
    (x_train, _), (x_test, _) = mnist
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # ToTensor only: pixels are k/255, no mean/std normalisation.
    np.testing.assert_allclose(np.round(x_test[:100] * 255) / 255, x_test[:100], atol=1e-7)
    assert 0.12 < x_train.mean() < 0.14  # the well-known MNIST pixel mean 0.1307


def test_shipped_mnist_class_counts(mnist):
    (_, y_train), (_, y_test) = mnist
    assert np.bincount(y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).tolist() == TEST_COUNTS


def test_shipped_files_decompressed_md5():
    for name, md5 in DECOMPRESSED_MD5.items():
        raw = gzip.decompress((MNIST_DIR / (name + ".gz")).read_bytes())
        assert hashlib.md5(raw).hexdigest() == md5, name


def test_train_limit_keeps_prefix_and_whole_test_set(mnist):
    (x_train, y_train), (x_test, _) = load_mnist(train_limit=1000)
    assert x_train.shape == (1000, 28, 28, 1) and y_train.shape == (1000,)
    assert x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(x_train, mnist[0][0][:1000])
    np.testing.assert_array_equal(y_train, mnist[0][1][:1000])


@pytest.mark.parametrize("limit", [0, -5, 2.5, True])
def test_bad_train_limit(limit):
    with pytest.raises(ValueError, match="train_limit"):
        load_mnist(train_limit=limit)


def test_bad_source():
    with pytest.raises(ValueError, match=r"Received: source='torchvision'"):
        load_mnist(source="torchvision")


# --- IDX reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["u1", ">i4", ">f4"])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    values = np.arange(24).reshape(2, 3, 4) * 10 if dtype == "u1" else np.arange(24).reshape(2, 3, 4) * 37.5 - 100
    array = values.astype(np.dtype(dtype).newbyteorder("="))
    raw = idx_bytes(array, dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(idx_bytes(np.zeros((4, 5), np.uint8))[:-3])
    with pytest.raises(ValueError, match="expected 32 bytes, found 29"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(ValueError, match="Received: path="):
        read_idx(tmp_path / "nothing")


# --- load_mnist from a folder -----------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_from_folder(tmp_path, tiny_mnist, compress):
    write_mnist(tmp_path, *tiny_mnist, compress=compress)
    (x_train, y_train), (x_test, y_test) = load_mnist(tmp_path)
    assert x_train.shape == (7, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(x_train[..., 0], tiny_mnist[0] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x_test[..., 0], tiny_mnist[2] / 255.0, rtol=1e-6)
    assert y_train.tolist() == [3, 1, 4, 1, 5, 9, 2] and y_test.tolist() == [6, 5, 3]
    assert x_train[0, 0, 0, 0] == 0.0 and x_train[0, 0, 1, 0] == 1.0


def test_load_mnist_raw_uint8(tmp_path, tiny_mnist):
    write_mnist(tmp_path, *tiny_mnist, compress=True)
    (x_train, _), _ = load_mnist(str(tmp_path), normalize=False, train_limit=2)
    assert x_train.dtype == np.uint8 and x_train.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(x_train[..., 0], tiny_mnist[0][:2])


def test_load_mnist_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="Received: data_dir=.*nowhere"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_missing_file(tmp_path, tiny_mnist):
    write_mnist(tmp_path, *tiny_mnist, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_wrong_magic(tmp_path, tiny_mnist):
    x_train, y_train, x_test, y_test = tiny_mnist
    write_mnist(tmp_path, x_train, y_train, x_test, y_test, compress=False)
    # A label file (magic 2049) where the training images (magic 2051) belong.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(y_train))
    with pytest.raises(ValueError, match="magic number 2049 \\(expected 2051\\)"):
        load_mnist(tmp_path)


def test_load_mnist_count_mismatch(tmp_path, tiny_mnist):
    x_train, y_train, x_test, y_test = tiny_mnist
    write_mnist(tmp_path, x_train, y_train[:5], x_test, y_test, compress=True)
    with pytest.raises(ValueError, match="train files disagree"):
        load_mnist(tmp_path)


# --- make_dataset -----------------------------------------------------------------------------------------------

def test_make_dataset_batches():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10, dtype=np.int64)
    batches = list(make_dataset(x, y, batch_size=4).as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert np.concatenate([b[1] for b in batches]).tolist() == list(range(10))  # no shuffle: order kept
    np.testing.assert_array_equal(batches[0][0][:, 0], [0, 1, 2, 3])


def test_make_dataset_shuffle_is_seeded_permutation():
    x = np.arange(50, dtype=np.float32)
    y = np.arange(50, dtype=np.int64)
    first = np.concatenate([b for _, b in make_dataset(x, y, 16, shuffle=True, seed=3).as_numpy_iterator()])
    again = np.concatenate([b for _, b in make_dataset(x, y, 16, shuffle=True, seed=3).as_numpy_iterator()])
    assert sorted(first.tolist()) == list(range(50))
    assert first.tolist() != list(range(50))
    np.testing.assert_array_equal(first, again)


def test_make_dataset_bad_arguments():
    with pytest.raises(ValueError, match="len\\(x\\)=3, len\\(y\\)=2"):
        make_dataset(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="batch_size=0"):
        make_dataset(np.zeros(3), np.zeros(3), batch_size=0)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_gzip_names_the_file(tmp_path, damage):
    raw = gzip.compress(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "u1"))
    raw = raw[: len(raw) // 2] if damage == "truncate" else raw[:12] + bytes(b ^ 0xFF for b in raw[12:30]) + raw[30:]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"gzip file is damaged.*train-images-idx3-ubyte\.gz"):
        read_idx(path)


def test_check_finite_names_the_first_bad_example():
    from bbits_tf.data import check_finite

    x = np.zeros((5, 2, 2, 1), np.float32)
    check_finite(x)  # clean: no error
    x[3, 1, 0, 0] = np.inf
    x[4, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="2 example\\(s\\); the first is example 3"):
        check_finite(x, "x_train")


def test_a_repeated_dataset_gives_each_epoch_the_batches_of_a_new_iterator():
    # training.train feeds fit one repeated iterator (no pipeline rebuilt between epochs); its epochs must be the
    # batches, in the order, that a new iterator per epoch gives (what a run made before it saw).
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    y = np.arange(1000) % 10
    per_epoch = make_dataset(x, y, batch_size=128, shuffle=True, seed=3)
    repeated = iter(make_dataset(x, y, batch_size=128, shuffle=True, seed=3, repeat=True))
    steps = 8  # 7 full batches and one of 104
    orders = []
    for _ in range(3):
        fresh = [b[0].numpy()[:, 0] for b in per_epoch]
        again = [next(repeated)[0].numpy()[:, 0] for _ in range(steps)]
        assert [len(b) for b in fresh] == [len(b) for b in again] == [128] * 7 + [104]
        np.testing.assert_array_equal(np.concatenate(fresh), np.concatenate(again))
        orders.append(np.concatenate(fresh))
    assert sorted(orders[0]) == list(range(1000)) and not np.array_equal(orders[0], orders[1])  # reshuffled

class _BatchRecorder(keras.Model):
    """Trains nothing; logs a fingerprint of every batch's labels (their order included)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, batch):
        _, y = batch
        weights = tf.range(1, tf.shape(y)[0] + 1, dtype=tf.float32)
        return {"fingerprint": tf.reduce_sum(tf.cast(y, tf.float32) * weights)}


def test_train_feeds_fit_the_batches_of_a_new_iterator_per_epoch():
    # training.train gives fit one repeated iterator (no pipeline torn down between epochs); every epoch must see
    # the batches that fit on the plain shuffled dataset sees, so runs made before it repeat bit for bit.
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    y = np.arange(1000)
    prints = {}
    for kind in ("per_epoch", "train"):
        keras.utils.set_random_seed(0)
        model = _BatchRecorder()
        model.compile()
        seen = []
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(float(logs["fingerprint"])))
        if kind == "per_epoch":
            dataset, steps = make_dataset(x, y, batch_size=128, shuffle=True, seed=5), None
        else:
            dataset, _, steps = training._as_datasets(((x, y), (x, y)), 128, 1000, 5)  # pylint: disable=protected-access
        model.fit(dataset, epochs=3, steps_per_epoch=steps, callbacks=[record], verbose=0)
        prints[kind] = seen
    assert len(prints["train"]) == 3 * 8
    assert prints["train"] == prints["per_epoch"]
    assert prints["train"][:8] != prints["train"][8:16]  # reshuffled every epoch
