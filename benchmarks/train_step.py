"""Train-step time of LeNet5 at batch 128: float, tfmot default 8-bit QAT, and bbits_tf, in one process.

Usage: python benchmarks/train_step.py [--steps 30] [--trained runs/fast-v1-s1/model.h5]
       [--output benchmarks/results/train_step.json]

Each variant is compiled with Adam and sparse cross-entropy and trained on the same fixed MNIST batch; the
median of ``--steps`` timed steps (after warm-up) is reported, plus ratios to the tfmot step. Variants run
interleaved in rounds so that machine noise hits all of them alike. (XLA, ``jit_compile=True``, was tried for
bbits_tf and was slower: the nested ``tf.cond`` that skips truncated levels does not fuse.)
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

import tensorflow as tf  # noqa: E402

import bbits_tf  # noqa: E402
from bbits_tf import data, models, ops  # noqa: E402
from bbits_tf._keras import keras, tfmot  # noqa: E402


def _compiled(model, jit=False):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


TRACED = "bbits_tf (traced grad)"


@contextlib.contextmanager
def traced_gradient(active):
    """Swaps ``bbits_tf.ops.quantize`` for ``quantize_traced`` while a variant's train step is traced."""
    original = ops.quantize
    if active:
        ops.quantize = ops.quantize_traced
    try:
        yield
    finally:
        ops.quantize = original


def variants(trained=None):
    tf.random.set_seed(0)
    runs = {
        "float": _compiled(models.lenet5()),
        "tfmot_8bit": _compiled(tfmot.quantization.keras.quantize_model(models.lenet5())),
        "bbits_tf": _compiled(bbits_tf.quantize_model(models.lenet5(), mu=0.1)),
        # The same model with TensorFlow's traced gradient of the quantizer (bbits_tf.ops.quantize_traced, the
        # implementation before the written-out gradient): traced with ops.quantize swapped, see TRACED.
        TRACED: _compiled(bbits_tf.quantize_model(models.lenet5(), mu=0.1)),
    }
    if trained:
        # A trained model: most gates truncated, so fewer residual levels are computed per step.
        with bbits_tf.quantize_scope():
            runs["bbits_tf (trained)"] = _compiled(keras.models.load_model(trained, compile=False))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--trained", help="also time a trained bbits_tf model (.h5 from examples/mnist.py)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    args = parser.parse_args(argv)

    (x, y), _ = data.load_mnist(train_limit=args.batch_size)
    x, y = tf.constant(x[: args.batch_size]), tf.constant(y[: args.batch_size])
    runs = variants(args.trained)
    for name in ("bbits_tf", TRACED):
        bbits_tf.initialize_ranges(runs[name], x)  # as training.run does before fit
    times = {name: [] for name in runs}
    for name, model in runs.items():  # warm-up: trace, range initialisation
        with traced_gradient(name == TRACED):
            for _ in range(3):
                model.train_on_batch(x, y)
    for _ in range(args.rounds):
        for name, model in runs.items():
            for _ in range(args.steps // args.rounds):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    result = {
        "what": "LeNet5 train step (forward + backward + Adam), MNIST batch, median over steps",
        "batch_size": args.batch_size,
        "steps": len(next(iter(times.values()))),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "tensorflow": tf.__version__,
        "median_ms": median_ms,
        "ratio_to_tfmot_8bit": {name: ms / median_ms["tfmot_8bit"] for name, ms in median_ms.items()},
        "ratio_to_float": {name: ms / median_ms["float"] for name, ms in median_ms.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for name, ms in median_ms.items():
        print(f"{name:<20} {ms:8.1f} ms/step   x{result['ratio_to_tfmot_8bit'][name]:.2f} of tfmot 8-bit   "
              f"x{result['ratio_to_float'][name]:.2f} of float")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
