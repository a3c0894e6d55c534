"""Bayesian Bits on CIFAR-10 / VGG7 with the paper's recipe: train, evaluate every epoch, report, plot, save.

    python examples/cifar10.py --data-dir /path/to/cifar-10-batches-bin            # the paper's run, mu = 0.01
    python examples/cifar10.py --data-dir /path/to/cifar-10-batches-bin --mu 0.1   # the paper's other run

The full run is one for a GPU machine: 300 epochs of VGG7 (about 0.6 GMACs per image, 391 steps per epoch, 117k
steps; the authors' PyTorch run took about 18 h). What the paper's code reports for it (spec 7.3 and 8, README
of the reference code): mu = 0.01 gives about 93.23 % top-1 at 0.51 % relative BOPs, mu = 0.1 about 91.96 % at
0.29 %; the paper's Gumbel-softmax ablation 93.19 % at 0.44 %. Results vary between seeds.

The recipe (PAPER_RECIPE, spec 7.1 and 7.3): training from scratch with quantization active from the first step;
three Adams (weights, ranges, gates) at lr 1e-3, epsilon 1e-8; the weights' lr constant for epochs 1-201
(k = epoch - 1 <= floor(2E/3) = 200), then 99/100, 98/100, ..., 1/100 of it (the gates' and ranges' lrs stay
constant); batch 128, shuffled;
mu = 0.01; every gate (4, 8, 16, 32 bits) starts at log_alpha 6, so the network starts at 32 bits with every
channel kept. Data: pixels scaled to [0, 1] and normalised per channel (bbits_tf.data.load_cifar10); training
batches get the paper's augmentation, a random 32x32 crop of the image zero-padded by 4 pixels (black, padded
before normalisation) and a random horizontal flip; the test set is not augmented.

The data is CIFAR-10's binary version (cifar-10-binary.tar.gz unpacked: data_batch_1.bin .. data_batch_5.bin,
test_batch.bin); nothing is downloaded (--tfds reads a prepared tensorflow_datasets folder instead). The output
folder, resuming, --overwrite, the plots and the TFLite export work as in examples/mnist.py (see its help), with
runs/cifar10-<method>-<seed> as the default folder. A resumed run restarts the random stream of the augmentation
as well as the data order.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist  # noqa: E402  (examples/mnist.py: the options, output folder, progress, plots and results it shares)

import bbits_tf  # noqa: E402
from bbits_tf import data as data_lib  # noqa: E402
from bbits_tf import models, training  # noqa: E402

# Spec 7.1 (common settings) and 7.3 (CIFAR10 command of the reference code's README).
PAPER_RECIPE = training.Recipe(
    epochs=300,
    warmup_epochs=0,  # no pretraining: quantized from the first step
    batch_size=128,
    mu=0.01,  # the README's other run: mu = 0.1 (--mu 0.1)
    lr_weights=1e-3,
    lr_ranges=1e-3,
    lr_gates=1e-3,
    adam_epsilon=1e-8,
    weight_schedule="paper",  # constant for floor(2E/3) epochs, then linear decay to 0
    decay_groups=("weights",),
    init_log_alpha=(6.0, 6.0, 6.0, 6.0),  # gamma_4, gamma_8, gamma_16, gamma_32
)
RECIPES = {"paper": PAPER_RECIPE}

AUGMENT_PAD = 4  # RandomCrop(32, padding=4)
# Value of a black pixel after normalisation, per channel: the paper pads with 0 before normalising.
PAD_VALUE = data_lib.normalize_cifar10(np.zeros((1, 3), np.uint8))[0]
# Range of the normalised pixels (all channels): the 8-bit input range of the TFLite export.
INPUT_RANGE = tuple(float(f(data_lib.normalize_cifar10(np.array([[0] * 3, [255] * 3], np.uint8))))
                    for f in (np.min, np.max))


def make_parser():
    """examples/mnist.py's options, with CIFAR-10's data, recipe, output folder and budget default."""
    doc = __doc__.splitlines()
    parser = argparse.ArgumentParser(
        description=doc[0], epilog="\n".join(doc[doc.index("") + 1:]), formatter_class=mnist._HelpFormatter,
        parents=[mnist.make_parser()], conflict_handler="resolve", add_help=False)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper", help="training recipe")
    parser.add_argument("--model", choices=("vgg7",), default="vgg7",
                        help="network: the paper's VGG7 (bbits_tf.models.vgg7), the one this recipe is for")
    parser.add_argument("--data-dir", help="folder with CIFAR-10's binary version (data_batch_1.bin .. "
                        "data_batch_5.bin, test_batch.bin), or the folder holding cifar-10-batches-bin/")
    parser.add_argument("--tfds", action="store_true", help="load CIFAR-10 through tensorflow_datasets instead, "
                        "from --data-dir as its data folder (prepared beforehand: nothing is downloaded here)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="the paper's training augmentation (random crop of the 4-padded image, horizontal flip)")
    parser.add_argument("--output-dir", help="where results go (default: runs/cifar10-<method>-<seed>); an "
                        "interrupted run there resumes with the same command")
    parser.add_argument("--budget-bops", type=float, default=0, metavar="PERCENT",
                        help="land on this relative BOPs (%% of FP32) with bbits_tf.budget.BopsBudget, which adapts "
                             "mu during training (Bayesian Bits methods); 0: off, mu stays at the recipe's (the paper)")
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """examples/mnist.py's option checks (numbers, --budget-bops, --decay-groups), then CIFAR-10's data and recipe."""
    # mnist.check_args checks the data folder for MNIST and builds the overrides on an MNIST recipe: give it neither.
    shared = argparse.Namespace(**{**vars(args), "data_dir": None, "recipe": "paper"})
    mnist.check_args(parser, shared)
    args.budget_bops = shared.budget_bops
    deployment = [f"--{k.replace('_', '-')}" for k in ("budget_flash", "budget_arena", "budget_latency_us",
                                                        "budget_latency_ratio") if getattr(args, k) is not None]
    if deployment or args.cost not in (None, "bops"):
        parser.error(f"{', '.join(deployment or ['--cost'])}: deployment costs and budgets are wired in "
                     "examples/mnist.py only (a VGG7 latency table would take long to measure); here the prior is "
                     "the paper's BOPs")
    if args.data_dir is None and not args.tfds:
        parser.error("--data-dir is required: the folder with CIFAR-10's binary version (data_batch_1.bin .. "
                     "data_batch_5.bin, test_batch.bin); nothing ships with the package and nothing is downloaded")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir must be an existing folder with CIFAR-10's binary files. Received: {args.data_dir}")
    try:
        make_recipe(args, print_fn=None)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def make_recipe(args, print_fn=print):
    """``RECIPES[args.recipe]`` with the command's overrides (as examples/mnist.py's ``make_recipe``)."""
    recipe = RECIPES[args.recipe]
    epochs = args.epochs or recipe.epochs
    warmup = recipe.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs
    if warmup >= epochs:
        if print_fn is not None:
            print_fn(f"note: {warmup} warm-up epoch(s) do not fit in {epochs} epoch(s); warming up for {epochs - 1}")
        warmup = epochs - 1
    return training.get_recipe(recipe, epochs=epochs, warmup_epochs=warmup, mu=args.mu, batch_size=args.batch_size,
                               lr_weights=args.lr, lr_ranges=args.range_lr, lr_gates=args.gate_lr,
                               decay_groups=tuple(args.decay_groups.split(",")) if args.decay_groups else None)


def load_data(args):
    """CIFAR-10 as ``load_cifar10`` returns it (normalised), test set cut to ``--test-limit``; exits on an error."""
    try:
        data = data_lib.load_cifar10(args.data_dir, source="tfds" if args.tfds else "binary",
                                     train_limit=args.train_limit)
    except (ValueError, OSError, ImportError) as error:
        mnist.fail(f"cannot load CIFAR-10: {error}")
    if args.test_limit:
        (x_test, y_test) = data[1]
        data = (data[0], (x_test[:args.test_limit], y_test[:args.test_limit]))
    return data


# ---------------------------------------------------------------------------------------------------------------
# Training augmentation


def augment(images, generator, pad=AUGMENT_PAD, pad_value=PAD_VALUE):
    """The paper's training augmentation on a batch of normalised NHWC images: ``RandomCrop(32, padding=4)`` then
    ``RandomHorizontalFlip``, drawn independently per image from ``generator`` (a ``tf.random.Generator``).

    The crop window starts at a uniform offset in 0..2*pad on each axis of the image padded by ``pad`` pixels of
    ``pad_value`` (the normalised black pixel, as the paper pads before normalising); the flip has probability 1/2.
    Values are copied exactly (gathers), none is interpolated.
    """
    images = tf.convert_to_tensor(images)
    n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    offsets = generator.uniform([n, 2], minval=0, maxval=2 * pad + 1, dtype=tf.int32) - pad
    rows = offsets[:, :1] + tf.range(height)[None, :]  # (n, height): source row of each output row
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    out = tf.gather(images, tf.clip_by_value(rows, 0, height - 1), axis=1, batch_dims=1)
    out = tf.gather(out, tf.clip_by_value(cols, 0, width - 1), axis=2, batch_dims=1)
    inside = (((rows >= 0) & (rows < height))[:, :, None, None] & ((cols >= 0) & (cols < width))[:, None, :, None])
    out = tf.where(inside, out, tf.constant(pad_value, images.dtype))
    flip = generator.uniform([n], minval=0, maxval=2, dtype=tf.int32) > 0
    return tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)


def augmentation(seed=None):
    """``training.run(train_map=...)`` that applies ``augment`` to every training batch (not to the test set).

    The random draws come from one ``tf.random.Generator`` (on the CPU, where tf.data runs) seeded by ``seed``, so
    a seeded run repeats; each epoch draws new crops and flips.
    """
    with tf.device("/CPU:0"):
        generator = tf.random.Generator.from_seed(seed) if seed is not None else \
            tf.random.Generator.from_non_deterministic_state()

    def train_map(x, y):
        return augment(x, generator), y

    return train_map


def export_tflite(model, output_dir, data):
    """``mnist.export_tflite`` with CIFAR-10's normalised input range (``INPUT_RANGE``) as the 8-bit input."""
    if not bbits_tf.bayesian_bits_quantizers(model):
        print("tflite export skipped: tflite_export exports Bayesian Bits models (use --method bb or an ablation)")
        return None
    import tflite_export  # lazy: heavy, and only needed here

    (x_train, _), (x_test, y_test) = data
    return tflite_export.export_for_example(model, output_dir, x_test, y_test, x_train=x_train,
                                            input_range=INPUT_RANGE)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    mnist.configure_tensorflow(args)
    recipe = make_recipe(args)
    output_dir = Path(args.output_dir or f"runs/cifar10-{args.method}-{args.seed}")
    options = mnist.run_options(args, recipe)
    state, found = mnist.inspect_output_dir(output_dir, options, args.overwrite)
    if state == "finished":
        print(f"{output_dir} holds this run, finished: test accuracy {100 * found['test_accuracy']:.2f}%, relative "
              f"BOPs {found['relative_bops']:.3f}%. Nothing to do (--overwrite runs it again).")
        return found
    data = load_data(args)
    (x_train, _), (x_test, _) = data
    print(f"CIFAR-10: {len(x_train)} training, {len(x_test)} test images; augmentation "
          f"{'on' if args.augment else 'off'}; method {args.method}; recipe {args.recipe}: {recipe}")

    env = mnist.environment(args)
    budget = None
    if args.budget_bops is not None:
        from bbits_tf.budget import BopsBudget

        budget = BopsBudget(args.budget_bops, print_fn=print)
    if args.overwrite:
        removed = mnist.clear_run_files(output_dir) if output_dir.is_dir() else []
        if removed:
            print(f"--overwrite: deleted {', '.join(removed)} from {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad option or missing data leaves no folder
    progress = mnist.ProgressWriter(output_dir / "progress.json",
                                    {"args": vars(args), "recipe": recipe.to_dict(), "total_epochs": recipe.epochs,
                                     "environment": env, "run_options": options})
    callbacks = [progress] + ([budget] if budget is not None else [])
    checkpoint_dir = output_dir / mnist.CHECKPOINT_DIR
    try:
        result = training.run(models.vgg7, recipe, data, method=args.method, seed=args.seed,
                              verbose=args.verbose, log_dir=args.log_dir,
                              bit_width_every=args.bit_width_every or None, callbacks=callbacks,
                              checkpoint_dir=checkpoint_dir, checkpoint_config={"run_options": options},
                              train_map=augmentation(args.seed) if args.augment else None)
    except KeyboardInterrupt:
        meta = training.read_checkpoint(checkpoint_dir)
        done = f"{meta['completed_epochs']} of {meta['total_epochs']} epochs are" if meta else "no epoch is"
        print(f"\ninterrupted: {done} checkpointed in {checkpoint_dir}; the same command resumes the run",
              file=sys.stderr)
        raise
    return mnist.finish_run(
        args, recipe, options, result, env, budget, data, start, output_dir, export_tflite, extra={"dataset": "cifar10"},
        extra_settings={
            "augmentation": {"random_crop_padding": AUGMENT_PAD, "horizontal_flip": True} if args.augment else None,
            "normalization": {"mean": data_lib.CIFAR10_MEAN, "std": data_lib.CIFAR10_STD}})


if __name__ == "__main__":
    main()
