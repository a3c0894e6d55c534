"""Train-step time of float, tfmot default 8-bit QAT and bbits_tf models, in one process (LeNet5 or MobileNetV2).

Usage: python benchmarks/train_step.py [--model lenet5] [--steps 30] [--trained runs/fast-v1-s1/model.h5]
       [--output benchmarks/results/train_step.json]
       python benchmarks/train_step.py --model mobilenet_v2 --steps 20 --rounds 2
       (writes benchmarks/results/train_step_mobilenet_v2.json)
       python benchmarks/train_step.py --model mobilenet_v2 --smoke    (2 timed steps; for the tests)

Models (``--model``):

* ``lenet5`` (default): ``bbits_tf.models.lenet5`` on a fixed MNIST batch of 128; variants float, tfmot_8bit,
  bbits_tf (mu 0.1, with the fused quantizer op where it is on), the same without the op ("graph quantizer":
  what a machine without a compiler runs), bbits_tf with TensorFlow's traced quantizer gradient, and a trained
  model (``--trained``).
* ``mobilenet_v2``: tf_keras ``applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
  classes=10, classifier_activation=None)`` on a fixed batch of 64 MNIST images padded to 32x32 with the channel
  repeated three times (``mnist_32x32x3``); variants float, tfmot_8bit (``tfmot.quantization.keras.quantize_model``)
  and bbits_tf (``bbits_tf.quantize_model``, mu 0.01, BatchNorm folded: in training each folded unit computes its
  convolution twice, once for the batch statistics and once with the quantized folded kernel), and the same without
  the fused op. If tfmot cannot
  quantize the model, its error is written in the JSON (``errors``) and the ratios to it are null.

Each variant is compiled with Adam and sparse cross-entropy and trained on the same fixed batch; the median of
``--steps`` timed steps (after ``--warmup`` untimed steps that trace the graph) is reported, plus ratios to the
tfmot and float steps; every timed step is in ``times_ms``. Variants run interleaved in ``--rounds`` rounds so that
machine noise hits all of them alike. (XLA, ``jit_compile=True``, was tried for bbits_tf and was slower: the
nested ``tf.cond`` that skips truncated levels does not fuse.)
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bbits_tf  # noqa: E402
from bbits_tf import data, kernels, models, ops  # noqa: E402
from bbits_tf._keras import keras, tfmot  # noqa: E402

MODELS = ("lenet5", "mobilenet_v2")
BATCH_SIZE = {"lenet5": 128, "mobilenet_v2": 64}
MU = {"lenet5": 0.1, "mobilenet_v2": 0.01}
WHAT = {"lenet5": "LeNet5 train step (forward + backward + Adam), MNIST batch, median over steps",
        "mobilenet_v2": "MobileNetV2 (alpha 0.35, 32x32x3, 10 classes) train step (forward + backward + Adam), "
                        "MNIST padded to 32x32 with 3 channels, median over steps"}
SMOKE = {"steps": 2, "rounds": 1, "warmup": 1}


def mobilenet_v2(seed=0):
    """``bbits_tf.models.mobilenet_v2()``: tf_keras MobileNetV2 at 32x32x3, width 0.35, 10 classes, logits out,
    random weights, BatchNorm momentum 0.9 (Keras' 0.999 leaves a briefly trained model at chance in inference)."""
    keras.utils.set_random_seed(seed)
    return models.mobilenet_v2()


def mnist_32x32x3(x):
    """MNIST images (N, 28, 28, 1) padded by 2 pixels on each side and repeated to 3 channels: (N, 32, 32, 3)."""
    return np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def batch(model_name, batch_size):
    """A fixed training batch ``(x, y)`` of MNIST in the model's input shape."""
    (x, y), _ = data.load_mnist(train_limit=batch_size)
    x, y = x[:batch_size], y[:batch_size]
    if model_name == "mobilenet_v2":
        x = mnist_32x32x3(x)
    return tf.constant(x), tf.constant(y)


BUILDERS = {"lenet5": models.lenet5, "mobilenet_v2": mobilenet_v2}


def _compiled(model, jit=False):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


TRACED = "bbits_tf (traced grad)"
GRAPH = "bbits_tf (graph quantizer)"


@contextlib.contextmanager
def quantizer_path(name):
    """While a variant's train step is traced: ``TRACED`` swaps ``bbits_tf.ops.quantize`` for ``quantize_traced``;
    ``GRAPH`` turns the fused C++ op off (``bbits_tf.kernels.set_enabled(False)``: the TensorFlow-graph quantizer
    with the written-out gradient)."""
    original = ops.quantize
    if name == TRACED:
        ops.quantize = ops.quantize_traced
    if name == GRAPH:
        kernels.set_enabled(False)
    try:
        yield
    finally:
        ops.quantize = original
        kernels.set_enabled(None)


def variants(trained=None, model="lenet5", errors=None):
    """The compiled models to time, by variant name; a variant that cannot be built goes to ``errors`` instead."""
    build, mu = BUILDERS[model], MU[model]
    errors = {} if errors is None else errors
    tf.random.set_seed(0)
    runs = {"float": _compiled(build())}
    try:
        runs["tfmot_8bit"] = _compiled(tfmot.quantization.keras.quantize_model(build()))
    except Exception as error:  # pylint: disable=broad-except
        errors["tfmot_8bit"] = f"tfmot.quantization.keras.quantize_model failed: {type(error).__name__}: {error}"
        print(f"tfmot_8bit: not timed, {errors['tfmot_8bit']}")
    runs["bbits_tf"] = _compiled(bbits_tf.quantize_model(build(), mu=mu))
    if kernels.enabled():  # the same model without the fused op (what machines without a compiler run)
        runs[GRAPH] = _compiled(bbits_tf.quantize_model(build(), mu=mu))
    if model == "lenet5":
        # The same model with TensorFlow's traced gradient of the quantizer (bbits_tf.ops.quantize_traced, the
        # implementation before the written-out gradient): traced with ops.quantize swapped, see TRACED.
        runs[TRACED] = _compiled(bbits_tf.quantize_model(build(), mu=mu))
    if trained:
        # A trained model: most gates truncated, so fewer residual levels are computed per step.
        with bbits_tf.quantize_scope():
            runs["bbits_tf (trained)"] = _compiled(keras.models.load_model(trained, compile=False))
    return runs


def _ratios(median_ms, reference):
    if reference not in median_ms:
        return {name: None for name in median_ms}
    return {name: ms / median_ms[reference] for name, ms in median_ms.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (tracing)")
    parser.add_argument("--batch-size", type=int, help="default 128 for lenet5, 64 for mobilenet_v2")
    parser.add_argument("--trained", help="also time a trained bbits_tf model (.h5 from examples/mnist.py)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a quick check ({SMOKE['steps']} timed steps, {SMOKE['warmup']} warm-up); default "
                             "output *_smoke.json")
    parser.add_argument("--output", help="default benchmarks/results/train_step.json (lenet5) or "
                                         "train_step_<model>.json")
    args = parser.parse_args(argv)
    if args.trained and args.model != "lenet5":
        parser.error(f"--trained takes a LeNet5 from examples/mnist.py. Received: --model {args.model}")
    if args.smoke:
        args.steps, args.rounds, args.warmup = SMOKE["steps"], SMOKE["rounds"], SMOKE["warmup"]
    if args.steps < args.rounds or args.rounds < 1:
        parser.error(f"--steps must be at least --rounds (>= 1). Received: --steps {args.steps} "
                     f"--rounds {args.rounds}")
    batch_size = args.batch_size or BATCH_SIZE[args.model]
    if args.output is None:
        stem = "train_step" + ("" if args.model == "lenet5" else f"_{args.model}") + ("_smoke" if args.smoke else "")
        args.output = os.path.join(os.path.dirname(__file__), "results", f"{stem}.json")

    x, y = batch(args.model, batch_size)
    errors = {}
    runs = variants(args.trained, args.model, errors)
    for name in ("bbits_tf", GRAPH, TRACED):
        if name in runs:
            bbits_tf.initialize_ranges(runs[name], x)  # as training.run does before fit
    times = {name: [] for name in runs}
    warmup_s = {}
    for name, model in runs.items():  # warm-up: trace, range initialisation
        start = time.perf_counter()
        with quantizer_path(name):
            for _ in range(args.warmup):
                model.train_on_batch(x, y)
        warmup_s[name] = time.perf_counter() - start
    for _ in range(args.rounds):
        for name, model in runs.items():
            for _ in range(args.steps // args.rounds):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    result = {
        "what": WHAT[args.model],
        "batch_size": batch_size,
        "steps": len(next(iter(times.values()))),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "tensorflow": tf.__version__,
        "median_ms": median_ms,
        "ratio_to_tfmot_8bit": _ratios(median_ms, "tfmot_8bit"),
        "ratio_to_float": _ratios(median_ms, "float"),
        "model": args.model,
        "mu": MU[args.model],
        "warmup_steps": args.warmup,
        "warmup_s": warmup_s,
        "times_ms": {name: [1000 * t for t in ts] for name, ts in times.items()},
        "errors": errors,
        "fused_op": kernels.status(),
        "smoke": args.smoke,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for name, ms in median_ms.items():
        to_tfmot, to_float = result["ratio_to_tfmot_8bit"][name], result["ratio_to_float"][name]
        print(f"{name:<20} {ms:8.1f} ms/step   " + (f"x{to_tfmot:.2f} of tfmot 8-bit   " if to_tfmot else "")
              + f"x{to_float:.2f} of float")
    for name, error in errors.items():
        print(f"{name}: {error}")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
