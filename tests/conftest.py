"""Shared pytest setup: quiet TensorFlow's C++ logging, and load the shipped MNIST once per session."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST copy, as returned by ``bbits_tf.data.load_mnist()`` (read once per session)."""
    from bbits_tf.data import load_mnist

    return load_mnist()
