"""Dataset loading: MNIST from IDX files (a copy ships with the package) or from tensorflow_datasets; CIFAR-10
from its binary version or from tensorflow_datasets.

The recipe of the paper (spec section 7.2) feeds MNIST through ``ToTensor`` only: pixels scaled to [0, 1], no
mean/std normalisation and no augmentation. ``load_mnist`` returns exactly that, as NumPy arrays in NHWC layout.
For CIFAR-10 (spec 7.3) the paper also normalises each channel by a fixed mean and std; ``load_cifar10`` does
that, and leaves the training augmentation (crop and flip) to the training pipeline.

Example:

    (x_train, y_train), (x_test, y_test) = load_mnist()   # the shipped copy, offline
    train = make_dataset(x_train, y_train, batch_size=128, shuffle=True, seed=0)
"""
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["MNIST_DIR", "MNIST_FILES", "load_mnist", "make_dataset", "read_idx",
           "CIFAR10_FILES", "CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "normalize_cifar10", "read_cifar10_batch"]

MNIST_DIR = Path(__file__).resolve().parent / "datasets" / "mnist"
"""The MNIST copy shipped with the package (the four gzip-compressed IDX files)."""

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
"""Base names of the four MNIST IDX files; each may also carry a ``.gz`` suffix."""

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_IMAGE_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
_MNIST_LABEL_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension
_SOURCES = ("idx", "tfds")


def read_idx(path):
    """Reads one IDX file, gzip-compressed or not (detected from the content, not the name).

    The IDX format is a big-endian header (magic number ``0x0000TTDD`` with type code ``TT`` and ``DD``
    dimensions, then one uint32 size per dimension) followed by the raw values.

    Args:
        path: path of the file.

    Returns:
        A NumPy array with the shape given in the header and the file's element type (native byte order).

    Raises:
        ValueError: the file is missing, or its header or size does not describe a valid IDX array.
    """
    return _read_idx(path)[1]


def load_mnist(data_dir=None, *, source="idx", train_limit=None, normalize=True):
    """Loads MNIST (60,000 training and 10,000 test images) as NumPy arrays.

    Args:
        data_dir: for ``source="idx"``, the folder holding the four IDX files (``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
            ending in ``.gz``); ``None`` reads the copy shipped with the package (``MNIST_DIR``). For
            ``source="tfds"``, the tensorflow_datasets data folder (``None``: its default).
        source: ``"idx"`` reads IDX files from disk, offline; ``"tfds"`` goes through tensorflow_datasets, which
            downloads the data set on first use (needs internet access).
        train_limit: keep only the first ``train_limit`` training examples (the test set stays whole);
            ``None`` keeps all.
        normalize: ``True`` scales pixels to float32 in [0, 1] (the paper's ``ToTensor``, no mean/std
            normalisation); ``False`` keeps the raw uint8 values in [0, 255].

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images of shape ``(N, 28, 28, 1)`` and int64 labels of
        shape ``(N,)``.

    Raises:
        ValueError: bad ``source`` or ``train_limit``, a missing folder or file, or a file that is not MNIST IDX.
    """
    if source not in _SOURCES:
        raise ValueError(f"`source` must be one of {_SOURCES}. Received: source={source!r}")
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, int)
                                    or train_limit < 1):
        raise ValueError(f"`train_limit` must be a positive int or None. Received: train_limit={train_limit!r}")
    if source == "idx":
        x_train, y_train, x_test, y_test = _load_mnist_idx(MNIST_DIR if data_dir is None else Path(data_dir))
    else:
        x_train, y_train, x_test, y_test = _load_tfds("mnist", data_dir)
    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    train = (_images(x_train, normalize), y_train.astype(np.int64))
    test = (_images(x_test, normalize), y_test.astype(np.int64))
    return train, test


def check_finite(x, name="x"):
    """Raises ``ValueError`` if the array ``x`` holds a NaN or Inf, naming the first example that does."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.ndim > 1 else np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"`{name}` holds NaN or Inf values in {bad.size} example(s); the first is example {int(bad[0])}. "
            f"Clean or drop them before training (one NaN turns every weight, range and gate into NaN). "
            f"Received: {name} with shape {x.shape}"
        )


def make_dataset(x, y, batch_size=128, shuffle=False, seed=None, repeat=False):
    """Wraps arrays in a ``tf.data`` pipeline: optional shuffle (reshuffled every epoch), batch, repeat, prefetch.

    Args:
        x: inputs, first axis the examples.
        y: targets with the same first dimension as ``x``.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: shuffle over the whole array (the paper's training loader does; evaluation does not).
        seed: shuffle seed, for reproducible order.
        repeat: repeat the epochs without end (``fit`` then needs ``steps_per_epoch``): one iterator for the whole
            fit, so no pipeline is torn down and rebuilt between epochs (that stalled side-by-side runs for 10-20 s
            once per run), and the next epoch's shuffle buffer fills while the last batches train. The batches are
            the same, in the same order, as those of a new iterator per epoch (tested).

    Returns:
        A ``tf.data.Dataset`` of ``(x_batch, y_batch)``.

    Raises:
        ValueError: ``x`` and ``y`` differ in length, or ``batch_size`` is not a positive int.
    """
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length. Received: len(x)={len(x)}, len(y)={len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def _read_idx(path):
    """Returns ``(magic_number, array)``; see ``read_idx``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` must be an existing IDX file. Received: path={str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:  # truncated or corrupted download
            raise ValueError(
                f"The gzip file is damaged ({type(error).__name__}: {error}); download or copy it again. "
                f"Received: path={str(path)!r} ({len(raw)} bytes)"
            ) from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic is None or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            "Not an IDX file: the magic number must be 0x0000TTDD with a known type code TT. "
            f"Received: path={str(path)!r} with magic={magic if magic is None else hex(magic)}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file is truncated inside its header. Received: path={str(path)!r}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"IDX file size does not match its header (shape {shape}, {dtype}): expected {expected} bytes, "
            f"found {len(raw)}. Received: path={str(path)!r}"
        )
    return magic, np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _images(x, normalize):
    x = x.reshape(x.shape[:3] + (1,))
    return (x.astype(np.float32) / np.float32(255.0)) if normalize else x.astype(np.uint8)


def _find(data_dir, name):
    for candidate in (data_dir / (name + ".gz"), data_dir / name):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"MNIST file {name!r} (or {name + '.gz'!r}) not found in `data_dir`. Received: data_dir={str(data_dir)!r}"
    )


def _read_mnist_file(data_dir, name, expected_magic):
    path = _find(data_dir, name)
    magic, array = _read_idx(path)
    if magic != expected_magic:
        kind = "image" if expected_magic == _MNIST_IMAGE_MAGIC else "label"
        raise ValueError(
            f"{path.name} is not an MNIST {kind} file: magic number {magic} (expected {expected_magic}). "
            f"Received: data_dir={str(data_dir)!r}"
        )
    return array


def _load_mnist_idx(data_dir):
    if not data_dir.is_dir():
        raise ValueError(
            f"`data_dir` must be an existing folder holding the MNIST IDX files. Received: data_dir={str(data_dir)!r}"
        )
    arrays = {}
    for split in ("train", "test"):
        x = _read_mnist_file(data_dir, MNIST_FILES[f"x_{split}"], _MNIST_IMAGE_MAGIC)
        y = _read_mnist_file(data_dir, MNIST_FILES[f"y_{split}"], _MNIST_LABEL_MAGIC)
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(
                f"MNIST {split} files disagree: images {x.shape} (expected (N, 28, 28)), labels {y.shape} "
                f"(expected ({len(x)},)). Received: data_dir={str(data_dir)!r}"
            )
        arrays[split] = (x, y)
    return arrays["train"] + arrays["test"]


def _load_tfds(name, data_dir):
    """``(x_train, y_train, x_test, y_test)`` of the tfds data set ``name`` ("mnist", "cifar10"), as NumPy."""
    import tensorflow_datasets as tfds  # lazy: heavy import, and only this path needs it

    train, test = tfds.as_numpy(
        tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True,
                  data_dir=None if data_dir is None else os.fspath(data_dir))
    )
    return train + test


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 (spec section 7.3)

CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
"""Files of CIFAR-10's binary version (``cifar-10-binary.tar.gz``), per split."""

CIFAR10_SUBDIR = "cifar-10-batches-bin"
"""The folder the binary archive unpacks to; ``load_cifar10`` also looks for the files inside it."""

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
"""Per-channel (R, G, B) mean and std of the paper's loader (``benchmarks/cifar/cifar10_data_loader.py``,
``transforms.Normalize``), applied to pixels scaled to [0, 1]. The std values are those of the common PyTorch
CIFAR recipes, not the data set's per-channel std (about 0.247, 0.243, 0.261): kept as the paper used them."""

_CIFAR10_SHAPE = (3, 32, 32)  # channels, rows, columns of one stored image (CHW)
_CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes (row-major 32x32)
_CIFAR10_SOURCES = ("binary", "tfds")


def load_cifar10(data_dir=None, *, source="binary", train_limit=None, normalize=True):
    """Loads CIFAR-10 (50,000 training and 10,000 test images, 32x32 RGB, 10 classes) as NumPy arrays.

    The paper's loader (spec 7.3) scales pixels to [0, 1] and normalises each channel with ``CIFAR10_MEAN`` and
    ``CIFAR10_STD`` (``transforms.Normalize``), for the training and the test set alike; ``normalize=True`` returns
    exactly that. Its training augmentation (random 32x32 crop of the image padded by 4, random horizontal flip)
    changes every epoch and is the training pipeline's job (``examples/cifar10.py``), not the loader's.

    Args:
        data_dir: for ``source="binary"``, the folder holding CIFAR-10's binary version (``data_batch_1.bin`` ..
            ``data_batch_5.bin`` and ``test_batch.bin``), directly or in its ``cifar-10-batches-bin`` subfolder;
            required, since no copy ships with the package. For ``source="tfds"``, the tensorflow_datasets data
            folder (``None``: its default).
        source: ``"binary"`` reads the binary files from disk, offline; ``"tfds"`` goes through tensorflow_datasets,
            which downloads the data set on first use (needs internet access).
        train_limit: keep only the first ``train_limit`` training examples (the test set stays whole);
            ``None`` keeps all.
        normalize: ``True``: float32 ``(pixel / 255 - CIFAR10_MEAN) / CIFAR10_STD`` per channel (``normalize_cifar10``);
            ``False``: the raw uint8 values in [0, 255].

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images of shape ``(N, 32, 32, 3)`` (NHWC, channels R, G, B) and
        int64 labels in 0..9 of shape ``(N,)``.

    Raises:
        ValueError: bad ``source`` or ``train_limit``, a missing folder or file, a file whose size is not a multiple
            of the 3,073-byte record, or a label outside 0..9.
    """
    if source not in _CIFAR10_SOURCES:
        raise ValueError(f"`source` must be one of {_CIFAR10_SOURCES}. Received: source={source!r}")
    if train_limit is not None and (isinstance(train_limit, bool) or not isinstance(train_limit, int)
                                    or train_limit < 1):
        raise ValueError(f"`train_limit` must be a positive int or None. Received: train_limit={train_limit!r}")
    if source == "binary":
        x_train, y_train, x_test, y_test = _load_cifar10_binary(data_dir)
    else:
        x_train, y_train, x_test, y_test = _load_tfds("cifar10", data_dir)
    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    prepare = normalize_cifar10 if normalize else (lambda x: np.asarray(x, np.uint8))
    return (prepare(x_train), y_train.astype(np.int64)), (prepare(x_test), y_test.astype(np.int64))


def normalize_cifar10(x):
    """The paper's CIFAR-10 input: uint8 RGB pixels (last axis the channel) -> float32
    ``(x / 255 - CIFAR10_MEAN) / CIFAR10_STD``."""
    x = np.asarray(x)
    if x.shape[-1:] != (3,):
        raise ValueError(f"`x` must hold RGB images with the channel last (NHWC). Received: x with shape {x.shape}")
    mean, std = np.asarray(CIFAR10_MEAN, np.float32), np.asarray(CIFAR10_STD, np.float32)
    return (x.astype(np.float32) / np.float32(255.0) - mean) / std


def read_cifar10_batch(path):
    """Reads one file of CIFAR-10's binary version.

    Each record is 3,073 bytes: the label (0..9), then the image as 1024 red, 1024 green and 1024 blue bytes, each
    plane 32x32 row-major (CHW).

    Args:
        path: path of the file (e.g. ``data_batch_1.bin``).

    Returns:
        ``(images, labels)``: uint8 images of shape ``(N, 32, 32, 3)`` (NHWC) and uint8 labels of shape ``(N,)``.

    Raises:
        ValueError: the file is missing, empty, not a multiple of 3,073 bytes long, or holds a label above 9.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` must be an existing CIFAR-10 binary file. Received: path={str(path)!r}")
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR10_RECORD:
        raise ValueError(
            f"{path.name} is not a CIFAR-10 binary file: its size must be a positive multiple of the "
            f"{_CIFAR10_RECORD}-byte record (1 label byte + 3072 pixel bytes); found {len(raw)} bytes "
            f"({len(raw) // _CIFAR10_RECORD} records and {len(raw) % _CIFAR10_RECORD} bytes over). "
            f"Received: path={str(path)!r}"
        )
    records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].copy()
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ValueError(
            f"{path.name} holds labels outside 0..9 in {bad.size} record(s); the first is record {int(bad[0])} "
            f"with label {int(labels[bad[0]])}. (The CIFAR-100 binary version has 2 label bytes per record.) "
            f"Received: path={str(path)!r}"
        )
    images = records[:, 1:].reshape((-1,) + _CIFAR10_SHAPE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar10_folder(data_dir):
    """The folder that holds the binary files: ``data_dir`` itself or its ``cifar-10-batches-bin`` subfolder."""
    if data_dir is None:
        raise ValueError(
            "`data_dir` must be the folder holding CIFAR-10's binary version (data_batch_1.bin .. data_batch_5.bin, "
            f"test_batch.bin, or their {CIFAR10_SUBDIR}/ folder); no copy ships with the package. "
            "Received: data_dir=None"
        )
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(
            "`data_dir` must be an existing folder holding CIFAR-10's binary files. "
            f"Received: data_dir={str(data_dir)!r}"
        )
    names = CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
    if not any((data_dir / name).is_file() for name in names) and (data_dir / CIFAR10_SUBDIR).is_dir():
        return data_dir / CIFAR10_SUBDIR
    return data_dir


def _load_cifar10_binary(data_dir):
    folder = _cifar10_folder(data_dir)
    arrays = {}
    for split, names in CIFAR10_FILES.items():
        images, labels = [], []
        for name in names:
            if not (folder / name).is_file():
                hint = ""
                if (folder / name.replace(".bin", "")).is_file() or (folder / "batches.meta").is_file():
                    hint = (" This folder looks like CIFAR-10's Python version (pickles); this loader reads the "
                            "binary version (cifar-10-binary.tar.gz).")
                raise ValueError(
                    f"CIFAR-10 file {name!r} not found in {str(folder)!r}.{hint} Received: data_dir={str(data_dir)!r}"
                )
            x, y = read_cifar10_batch(folder / name)
            images.append(x)
            labels.append(y)
        arrays[split] = (np.concatenate(images), np.concatenate(labels))
    return arrays["train"] + arrays["test"]
