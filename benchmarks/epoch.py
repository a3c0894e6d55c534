"""Whole training epochs: the default recipe's quantized phase (bbits_tf) against a tfmot 8-bit QAT epoch.

    python benchmarks/epoch.py                      # 60,000 MNIST images, 2 rounds, one thread
    python benchmarks/epoch.py --smoke              # 512 images, 1 round: checks that it runs

Both variants go through ``bbits_tf.training.train`` (the same data pipeline, the recipe's batch size and
optimizers, evaluation on the 10,000 test images after every epoch, the per-epoch line and its callbacks), each
for two epochs on a model built from the same float LeNet5: epoch 1 includes tracing the train and test steps,
epoch 2 is the steady state. ``tfmot_8bit`` is ``training.build_method("tfmot_w8a8")`` (tfmot's default 8-bit
QAT); ``bbits_tf`` is ``build_method("bb")`` with the default recipe (every gate at its initial 8 bits, mu 0.1);
``bbits_tf (graph quantizer)`` the same without the fused quantizer op (``bbits_tf.kernels``).
The variants alternate for ``--rounds`` rounds so that machine noise hits both; the medians and their ratio go to
``benchmarks/results/epoch.json`` with every epoch's time. Wall time is measured around each epoch (Keras'
``on_epoch_begin`` to ``on_epoch_end``, evaluation included) and around each whole ``train`` call.
"""
import argparse
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
from bbits_tf import data as data_lib, kernels, models, training  # noqa: E402
from bbits_tf._keras import keras  # noqa: E402

GRAPH = "bbits_tf (graph quantizer)"
# name -> (training method, fused quantizer op on); GRAPH is bbits_tf without the op (a machine without a compiler)
VARIANTS = {"tfmot_8bit": ("tfmot_w8a8", True), "bbits_tf": ("bb", True), GRAPH: ("bb", False)}
SMOKE = {"train_limit": 512, "rounds": 1}


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch (``on_epoch_begin`` to ``on_epoch_end``, the test-set evaluation included)."""

    def __init__(self):
        super().__init__()
        self.seconds, self._start = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def one_variant(method, data, recipe, seed, use_op=True):
    """``(per-epoch seconds, whole train call seconds)`` of two epochs of ``method`` on a fresh LeNet5, traced
    with the fused quantizer op on or off."""
    keras.utils.set_random_seed(seed)
    model = training.build_method(method, models.lenet5(), recipe, input_range=(0.0, 1.0))
    timer = EpochTimer()
    start = time.perf_counter()
    kernels.set_enabled(use_op)
    try:
        training.train(model, recipe, data, callbacks=[timer], verbose=0, seed=seed, print_fn=None,
                       relative_bops=None if bbits_tf.bayesian_bits_quantizers(model) else 6.25)
    finally:
        kernels.set_enabled(None)
    return timer.seconds, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, help="training images (default: all 60,000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra- and inter-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="512 images, 1 round")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "epoch.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_limit, args.rounds = SMOKE["train_limit"], SMOKE["rounds"]
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    data = data_lib.load_mnist(train_limit=args.train_limit)
    recipe = training.get_recipe("fast").replace(epochs=2, warmup_epochs=0)
    epochs = {name: [] for name in VARIANTS}
    calls = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name, (method, use_op) in VARIANTS.items():
            seconds, call = one_variant(method, data, recipe, args.seed, use_op)
            epochs[name].append(seconds)
            calls[name].append(call)
            print(f"round {round_index + 1}/{args.rounds} {name:11s} epochs " +
                  " ".join(f"{s:.1f} s" for s in seconds) + f", train call {call:.1f} s", flush=True)
    first = {n: statistics.median(e[0] for e in epochs[n]) for n in VARIANTS}
    steady = {n: statistics.median(e[1] for e in epochs[n]) for n in VARIANTS}
    result = {
        "what": "LeNet5 on MNIST: two epochs of training.train per variant (tracing in the first), the default "
                "recipe's quantized phase (bbits_tf) against tfmot's default 8-bit QAT; batch "
                f"{recipe.batch_size}, evaluation on the test set after every epoch",
        "train_images": len(data[0][0]), "rounds": args.rounds, "threads": args.threads, "smoke": args.smoke,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "tensorflow": tf.__version__, "date": time.strftime("%Y-%m-%d"),
        "epoch_s": epochs, "train_call_s": calls,
        "median_first_epoch_s": first, "median_steady_epoch_s": steady,
        "ratio_first_epoch": first["bbits_tf"] / first["tfmot_8bit"],
        "ratio_steady_epoch": steady["bbits_tf"] / steady["tfmot_8bit"],
        "ratio_steady_epoch_to_graph_quantizer": steady["bbits_tf"] / steady[GRAPH],
        "fused_op": kernels.status(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"first epoch (tracing): bbits_tf {first['bbits_tf']:.1f} s, tfmot {first['tfmot_8bit']:.1f} s, "
          f"x{result['ratio_first_epoch']:.2f}; steady epoch: bbits_tf {steady['bbits_tf']:.1f} s, "
          f"tfmot {steady['tfmot_8bit']:.1f} s, x{result['ratio_steady_epoch']:.2f}; without the fused op "
          f"{steady[GRAPH]:.1f} s")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
