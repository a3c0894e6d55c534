"""Small models and inputs shared by the tflite_export test files."""
import numpy as np

from bbits_tf._keras import keras

L = keras.layers


def lenet_tiny(seed=0, sequential=True):
    """conv(8) pool conv(16) pool flatten dense(32) dense(10), biases non-zero (pruned channels emit relu(b))."""
    keras.utils.set_random_seed(seed)
    layers = [L.Conv2D(8, 5, activation="relu", name="conv1"), L.MaxPooling2D(name="pool1"),
              L.Conv2D(16, 5, activation="relu", name="conv2"), L.MaxPooling2D(name="pool2"),
              L.Flatten(name="flat"), L.Dense(32, activation="relu", name="fc1"), L.Dense(10, name="fc2")]
    if sequential:
        model = keras.Sequential([keras.Input((28, 28, 1))] + layers, name="lenet_tiny")
    else:
        inp = keras.Input((28, 28, 1))
        x = inp
        for layer in layers:
            x = layer(x)
        model = keras.Model(inp, x, name="lenet_tiny")
    return random_biases(model, seed, std=0.05)


def random_biases(model, seed=0, std=0.05):
    """Non-zero biases, so that a pruned channel's constant output (act(bias)) matters in the tests."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, std, bias.shape).astype(np.float32)])
    return model


def images(n, seed=0, shape=(28, 28, 1)):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)
