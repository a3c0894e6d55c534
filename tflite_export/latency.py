"""Measured LiteRT latency per layer at a grid of kept channels: the table ``bbits_tf.latency`` interpolates.

``profile_latency(model)`` rebuilds each Conv2D / DepthwiseConv2D / Dense layer of a float or Bayesian Bits model
alone (its kernel size, strides, padding and fused activation, at its input's spatial size) with a fraction of its
input and output channels, converts it to a full-integer int8 .tflite (INT8 weights; per-tensor scales as the
exporter writes them do not change the kernels' speed), and times it in LiteRT (batch 1, ``num_threads``
threads, XNNPACK or the builtin kernels): the median of ``runs`` invokes. The whole model, nothing pruned, is
timed the same way; ``other_us`` (the whole model minus the sum of its layers) covers the interpreter and what is not
profiled. Pooling, Flatten, Add, Concatenate and separate activation layers are profiled like the MAC layers,
on one axis (their input channels). The result is plain data (JSON-able), which ``bbits_tf.latency.LatencyTable`` reads: the library
does not import the exporter.

INT4 weights are not profiled: LiteRT runs an INT4 FULLY_CONNECTED at the speed of INT8 here (README,
"Deployment: TFLite": 30.2 vs 30.6 us), and the exporter stores convolutions as INT8.
"""
import datetime
import os
import platform
import time
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from bbits_tf import graph
from bbits_tf._keras import keras
from bbits_tf.folding import FoldedBatchNorm

from .verify import time_file

DEFAULT_FRACTIONS = tuple(k / 8 for k in range(1, 9))  # XNNPACK works in tiles of 8-16 channels


def _int8_file(model, xs):
    """Full-integer int8 .tflite of a float model, calibrated on ``xs`` (one array of 8 samples per input)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1] for x in xs] for i in range(len(xs[0])))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _float_layer(layer, channels_in, channels_out):
    """A float tf_keras layer like the MAC layer ``layer`` with ``channels_out`` outputs (its activation fused)."""
    inner = graph.inner_layer(layer)
    activation, cls = None, type(inner)
    if isinstance(inner, FoldedBatchNorm):  # its MAC layer, with the folded bias and the activation after the fold
        activation = keras.activations.serialize(inner.activation)
        mac = inner.get_config()["mac_layer"]
        cls, config = getattr(keras.layers, mac["class_name"]), dict(mac["config"])
    else:
        config = dict(inner.get_config())
    config.pop("name", None)
    for key in ("kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
                "bias_constraint", "kernel_initializer", "bias_initializer", "depthwise_initializer"):
        config.pop(key, None)
    if activation is not None:
        config["activation"] = activation
        config["use_bias"] = True  # the folded BatchNorm's shift
    kind = graph.mac_kind(layer)
    if kind == "Dense":
        config["units"] = channels_out
    elif kind == "Conv2D":
        config["filters"] = channels_out
    return cls.from_config(config)


def _layer_file(model, layer, f_in, f_out, seed):
    shape = list(graph.input_shape(model, layer)[1:])
    total_in, total_out = int(shape[-1]), int(graph.output_shape(model, layer)[-1])
    kind = graph.mac_kind(layer)
    c_in = max(1, int(round(f_in * total_in)))
    c_out = c_in * (total_out // total_in) if kind == "DepthwiseConv2D" else max(1, int(round(f_out * total_out)))
    shape[-1] = c_in
    inp = keras.Input(tuple(shape), batch_size=1)
    single = keras.Model(inp, _float_layer(layer, c_in, c_out)(inp))
    x = np.random.default_rng(seed).uniform(-1, 1, (8, *shape)).astype(np.float32)
    return _int8_file(single, [x]), c_in, c_out


# Layers without weights that become TFLite operators whose time scales with the channels: profiled too, so that
# what pruning saves in them is predicted (``other_us`` is then only the interpreter and what cannot be pruned).
_OP_LAYERS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
              keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Add, keras.layers.Concatenate,
              keras.layers.ReLU, keras.layers.Activation)


def _op_file(model, layer, fraction, seed):
    """An int8 file of the weightless ``layer`` alone, each input at ``fraction`` of its channels."""
    inputs = []
    for shape in graph.input_shapes(model, layer):
        shape = list(shape[1:])
        shape[-1] = max(1, int(round(fraction * shape[-1])))
        inputs.append(keras.Input(tuple(shape), batch_size=1))
    config = dict(layer.get_config())
    config.pop("name", None)
    out = type(layer).from_config(config)(inputs if len(inputs) > 1 else inputs[0])
    single = keras.Model(inputs, out)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, (8, *i.shape[1:])).astype(np.float32) for i in inputs]
    return _int8_file(single, xs), int(sum(int(i.shape[-1]) for i in inputs))


def _plain(model):
    """``model`` as plain tf_keras layers (a Bayesian Bits model: the exporter's ``plain_model``)."""
    from .bbits import is_bbits_model, plain_model  # pylint: disable=import-outside-toplevel
    return plain_model(model, batch_size=1) if is_bbits_model(model) else model


def profile_latency(model, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, runs: int = 500,
                    num_threads: int = 1, delegates: str = "default", seed: int = 0, print_fn=None) -> Dict:
    """Per-layer LiteRT latency of ``model`` (float or Bayesian Bits) at a grid of kept channel fractions.

    Layers without weights that are operators whose time scales with the channels (pooling, Flatten, Add,
    Concatenate, separate activations) are profiled too, at the same fractions of their input channels
    (``"kind": "op"``).

    Args:
        model: a built tf_keras model (Sequential or Functional) or a ``bbits_tf.quantize_model`` model.
        fractions: kept fractions of a layer's input channels (when a pruned layer can feed it: not for layers
            reading the model input) and of its output channels (not for layers that produce a model output,
            which are never pruned); 1.0 is added if missing.
        runs: invokes per timing (median).
        num_threads: LiteRT threads (1: the microcontroller-like setting the budgets assume).
        delegates: ``"default"`` (XNNPACK) or ``"none"`` (builtin kernels).
        print_fn: a line per layer (None: silent).

    Returns:
        ``{"delegates", "num_threads", "fractions", "full_model_us", "layers_full_us", "other_us", "layers":
        {name: {"kind", "total_in", "total_out", "points": [[kept_in, kept_out, us], ...]}}, "machine", "date"}``.
    """
    fractions = sorted(set(float(f) for f in fractions) | {1.0})
    if fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"`fractions` must lie in (0, 1]. Received: fractions={fractions}")
    plain = _plain(model)
    started = time.time()
    layers = {}
    for layer in graph.topological_layers(plain):
        if isinstance(layer, _OP_LAYERS) and not graph.is_mac(layer):
            fs = [1.0] if graph.reads_model_input(plain, layer) else fractions
            points = []
            for f in fs:
                data, channels = _op_file(plain, layer, f, seed)
                points.append([channels, channels, time_file(data, runs=runs, num_threads=num_threads,
                                                             delegates=delegates)])
            layers[layer.name] = {"kind": "op", "total_in": points[-1][0], "total_out": points[-1][1],
                                  "points": points}
            continue
        if not graph.is_mac(layer):
            continue
        kind = graph.mac_kind(layer)
        reads_input = graph.reads_model_input(plain, layer)
        f_ins = [1.0] if reads_input else fractions
        f_outs = [1.0] if graph.feeds_output(plain, layer) else fractions
        pairs = ([(f, f) for f in f_ins] if kind == "DepthwiseConv2D"
                 else [(fi, fo) for fi in f_ins for fo in f_outs])
        points = []
        for fi, fo in pairs:
            data, c_in, c_out = _layer_file(plain, layer, fi, fo, seed)
            points.append([c_in, c_out, time_file(data, runs=runs, num_threads=num_threads, delegates=delegates)])
        name = graph.inner_layer(layer).name
        layers[name] = {"kind": kind, "total_in": int(graph.input_shape(plain, layer)[-1]),
                        "total_out": int(graph.output_shape(plain, layer)[-1]), "points": points}
        if print_fn is not None:
            print_fn(f"profile_latency: {name}: {len(points)} points, full size {points[-1][2]:.1f} us")
    shape = list(plain.input_shape[1:])
    x = np.random.default_rng(seed).uniform(0, 1, (8, *shape)).astype(np.float32)
    full = time_file(_int8_file(plain, [x]), runs=runs, num_threads=num_threads, delegates=delegates)
    layers_full = sum(max(layer["points"], key=lambda p: (p[0], p[1]))[2] for layer in layers.values())
    return {"delegates": delegates, "num_threads": num_threads, "fractions": fractions, "full_model_us": full,
            "layers_full_us": layers_full, "other_us": full - layers_full, "layers": layers, "runs": runs,
            "profile_s": time.time() - started,
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "date": datetime.date.today().isoformat()}
