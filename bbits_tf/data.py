"""Dataset loading: MNIST from IDX files (a copy ships with the package) or from tensorflow_datasets.

The recipe of the paper (spec section 7.2) feeds MNIST through ``ToTensor`` only: pixels scaled to [0, 1], no
mean/std normalisation and no augmentation. ``load_mnist`` returns exactly that, as NumPy arrays in NHWC layout.

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

__all__ = ["MNIST_DIR", "MNIST_FILES", "load_mnist", "make_dataset", "read_idx"]

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
        x_train, y_train, x_test, y_test = _load_mnist_tfds(data_dir)
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


def make_dataset(x, y, batch_size=128, shuffle=False, seed=None):
    """Wraps arrays in a ``tf.data`` pipeline: optional shuffle (reshuffled every epoch), batch, prefetch.

    Args:
        x: inputs, first axis the examples.
        y: targets with the same first dimension as ``x``.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: shuffle over the whole array (the paper's training loader does; evaluation does not).
        seed: shuffle seed, for reproducible order.

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
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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


def _load_mnist_tfds(data_dir):
    import tensorflow_datasets as tfds  # lazy: heavy import, and only this path needs it

    train, test = tfds.as_numpy(
        tfds.load("mnist", split=["train", "test"], batch_size=-1, as_supervised=True,
                  data_dir=None if data_dir is None else os.fspath(data_dir))
    )
    return train + test
