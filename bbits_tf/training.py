"""Training Bayesian Bits models: recipes, ablations and baselines, ``train`` and ``run``.

The optimizer and schedule live in ``bbits_tf.optimizers``, the callbacks in ``bbits_tf.callbacks``; both are
re-exported here.

``run`` does everything from a float model and a ``Recipe`` (``RECIPES["paper"]``, ``RECIPES["fast"]``), for
Bayesian Bits, its ablations and the fixed-bit baselines (``METHODS``); ``bbits_tf.optimizers`` shows the paper's
three optimizers in a plain ``compile``/``fit``.

With ``checkpoint_dir``, ``run`` and ``train`` save a checkpoint after every epoch (``EpochCheckpoint``) and, called
again the same way after an interruption, resume after the last completed epoch (``read_checkpoint`` shows what a
folder holds)::

    result = training.run(models.lenet5, recipe, data, seed=0, checkpoint_dir="runs/x/checkpoint")
"""
import dataclasses
import math
import time
from typing import Optional

import tensorflow as tf

from bbits_tf import checks, graph
from bbits_tf import data as data_lib
from bbits_tf._keras import keras, tfmot
from bbits_tf import bops as bops_lib
from bbits_tf.bops import FLOAT_BITS, INPUT_BITS
from bbits_tf.gates import DEFAULT_INIT_LOG_ALPHA
from bbits_tf.folding import recalibrate_batch_norm
from bbits_tf.checkpoints import (WARMUP_PHASE, EpochCheckpoint, _as_json, _epoch_checkpoints,  # noqa: F401
                                  config_differences, read_checkpoint)
from bbits_tf.callbacks import (BayesianBitsSummaries, BitWidthHistory, BopsLogger, NonFiniteGuard,  # noqa: F401
                                bayesian_bits_state)
from bbits_tf.optimizers import GROUPS, ConstantThenLinearDecay, GroupedOptimizer, constant_then_linear_decay  # noqa: F401
from bbits_tf.quantize import bayesian_bits_quantizers, initialize_ranges, quantize_model, variable_groups
from bbits_tf.summary import LayerProfile, ModelProfile, summary

# ----------------------------------------------------------------------------------------------------------------
# Recipes and methods


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe as data. ``RECIPES["paper"]`` is the paper's MNIST recipe (spec 7.1-7.2).

    Attributes:
        epochs: total epochs, float warm-up included.
        warmup_epochs: epochs of training the float model (Adam at ``lr_warmup``) before quantizing it.
        batch_size: training batch size.
        mu: regularizer strength.
        lr_weights, lr_ranges, lr_gates: Adam learning rates of the three groups.
        lr_warmup: learning rate of the float warm-up (``None``: ``lr_weights``).
        adam_epsilon: Adam epsilon (PyTorch's 1e-8).
        weight_schedule: ``"paper"`` (constant, then linear decay to 0 from ``decay_start``) or ``"constant"``.
        decay_groups: groups whose learning rate follows ``weight_schedule`` (the paper: weights only).
        decay_start: constant epochs of the quantized phase before the decay; ``None``: floor(2E/3).
        init_log_alpha: initial log_alpha of the bit gates 4, 8, 16, 32.
        bit_widths: the bit-width chain.
        mask_bias: pruned channels also mask their bias.
    """

    epochs: int = 100
    warmup_epochs: int = 0
    batch_size: int = 128
    mu: float = 0.1
    lr_weights: float = 1e-3
    lr_ranges: float = 1e-3
    lr_gates: float = 1e-3
    lr_warmup: Optional[float] = None
    adam_epsilon: float = 1e-8
    weight_schedule: str = "paper"
    decay_groups: tuple = ("weights",)
    decay_start: Optional[int] = None
    init_log_alpha: tuple = DEFAULT_INIT_LOG_ALPHA
    bit_widths: tuple = (2, 4, 8, 16, 32)
    mask_bias: bool = True

    def __post_init__(self):
        for name in ("epochs", "warmup_epochs", "batch_size"):
            checks.integer(name, getattr(self, name))
        if self.decay_start is not None:
            checks.integer("decay_start", self.decay_start, minimum=0)
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                "`epochs` must be >= 1 and `warmup_epochs` in [0, epochs). "
                f"Received: epochs={self.epochs}, warmup_epochs={self.warmup_epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={self.batch_size}")
        for name in ("mu", "lr_weights", "lr_ranges", "lr_gates", "lr_warmup"):
            if name != "lr_warmup" or self.lr_warmup is not None:
                checks.number(name, getattr(self, name), minimum=0)
        checks.number("adam_epsilon", self.adam_epsilon, minimum=0, strict_minimum=True)
        if self.weight_schedule not in ("paper", "constant"):
            raise ValueError(f"`weight_schedule` must be 'paper' or 'constant'. Received: {self.weight_schedule!r}")
        if isinstance(self.decay_groups, str):
            raise TypeError(
                f"`decay_groups` must be a tuple of group names. Received: decay_groups={self.decay_groups!r}")
        unknown = set(self.decay_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"`decay_groups` must be among {GROUPS}. Received: decay_groups={self.decay_groups!r}")
        for name, kind in (("init_log_alpha", "numbers"), ("bit_widths", "ints")):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise TypeError(f"`{name}` must be a tuple of {kind}. Received: {name}={value!r}")
        checks.numbers_of_length("init_log_alpha", self.init_log_alpha, len(self.init_log_alpha))
        for i, bits in enumerate(self.bit_widths):
            checks.integer(f"bit_widths[{i}]", bits, minimum=1)
        checks.boolean("mask_bias", self.mask_bias)

    @property
    def quantized_epochs(self):
        return self.epochs - self.warmup_epochs

    def replace(self, **changes):
        """A copy with ``changes`` applied; ``None`` values are ignored (handy for optional CLI flags)."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"Unknown Recipe field(s) {unknown}. Expected some of {fields}. "
                             f"Received: {', '.join(f'{k}={changes[k]!r}' for k in unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self):
        return dataclasses.asdict(self)


RECIPES = {
    # Spec 7.2: from scratch, three Adams at 1e-3, batch 128, mu 0.1, gates 6/6/-6/-6, 100 epochs.
    "paper": Recipe(),
    # 15 epochs in all: 1 float warm-up epoch, then 14 quantized epochs of the paper's recipe with the gates'
    # learning rate raised to 1e-2, and the gates' and ranges' learning rates following the weights' schedule
    # (constant for 2/3 of the 14 epochs, then linear decay to 0: the architecture settles while the weights
    # fine-tune). Deviation from the paper, which keeps the gates' learning rate constant. Results: README.
    "fast": Recipe(epochs=15, warmup_epochs=1, lr_gates=1e-2, decay_groups=("weights", "ranges", "gates")),
}

# Bayesian Bits and its ablations: extra ``quantize_model`` arguments. The pruning-only ablations fix the
# weights at 8 or 4 bits and the activations at 8 bits (w8a8 / w4a8 plus learned pruning).
ABLATIONS = {
    "bb": {},
    "quant_only": {"prune": False},
    "prune_only_w8": {"fixed_weight_bits": 8, "bit_widths": (8,)},
    "prune_only_w4": {"fixed_weight_bits": 4, "bit_widths": (8,)},
    "gumbel": {"gate": "gumbel_sigmoid"},
}
# Fixed-bit baselines: (weight bits, activation bits, model input bits) for the BOP count.
BASELINES = {
    "float": (FLOAT_BITS, FLOAT_BITS, FLOAT_BITS),
    "tfmot_w8a8": (8, 8, INPUT_BITS),
    "tfmot_w4a8": (4, 8, INPUT_BITS),
    "tfmot_w2a8": (2, 8, INPUT_BITS),
}
METHODS = tuple(ABLATIONS) + tuple(BASELINES)


def get_recipe(recipe="fast", **overrides):
    """``RECIPES[recipe]`` (or a ``Recipe``) with the non-``None`` ``overrides`` applied."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"Unknown recipe. Expected one of {sorted(RECIPES)}. Received: recipe={recipe!r}")
        recipe = RECIPES[recipe]
    if not isinstance(recipe, Recipe):
        raise TypeError(f"`recipe` must be a name in RECIPES or a Recipe. Received: recipe={recipe!r}")
    return recipe.replace(**overrides)


def build_method(method, model, recipe, input_range=None, cost="bops"):
    """The model to train for ``method`` (one of ``METHODS``) from the float ``model``; ``input_range`` and
    ``cost`` go to ``quantize_model`` (Bayesian Bits methods). Under a deployment cost the recipe's bit widths stop
    at 8 (``quantize_model``'s ``bit_widths``: the int8 file carries wider ones as 8 bits)."""
    if method in ABLATIONS:
        bit_widths = recipe.bit_widths if cost == "bops" else tuple(b for b in recipe.bit_widths if b <= 8)
        kwargs = dict(mu=recipe.mu, bit_widths=bit_widths, mask_bias=recipe.mask_bias, input_range=input_range,
                      cost=cost)
        kwargs.update(ABLATIONS[method])
        kwargs["init_log_alpha"] = recipe.init_log_alpha[: len(kwargs["bit_widths"]) - 1]
        return quantize_model(model, **kwargs)
    return build_baseline(method, model)


def build_baseline(kind, model):
    """A fixed-bit baseline of the float ``model``: ``"float"`` (the model itself), ``"tfmot_w8a8"`` (tfmot's
    default 8-bit QAT), ``"tfmot_w4a8"`` / ``"tfmot_w2a8"`` (tfmot's experimental n-bit scheme)."""
    qkeras = tfmot.quantization.keras
    if kind not in BASELINES:
        raise ValueError(f"Unknown baseline. Expected one of {sorted(BASELINES)}. Received: kind={kind!r}")
    if kind == "float":
        return model
    if kind == "tfmot_w8a8":
        return qkeras.quantize_model(model)
    weight_bits, activation_bits, _ = BASELINES[kind]
    scheme = qkeras.experimental.default_n_bit.DefaultNBitQuantizeScheme(
        num_bits_weight=weight_bits, num_bits_activation=activation_bits)
    with qkeras.quantize_scope():
        return qkeras.quantize_apply(qkeras.quantize_annotate_model(model), scheme=scheme)


def fixed_bit_profile(model, weight_bits, activation_bits, input_bits=INPUT_BITS):
    """``ModelProfile`` of ``model`` at fixed bit widths, counted by ``bbits_tf.bops.layer_bops`` (spec 5).

    Every MAC layer costs ``MACs * input bits * weight bits``, where the input bits are those of the tensor it
    reads (``input_bits`` for the model input, ``activation_bits`` for a computed tensor); tensors that reach a
    model output stay float; the reference is ``sum MACs * 32 * 32``. No channel is pruned. The same counter
    as for Bayesian Bits models, so baselines and Bayesian Bits runs compare.
    """
    records = bops_lib.layer_bops(model, input_bits=input_bits, fixed_bits=(weight_bits, activation_bits))
    rows = [LayerProfile(r.name, r.layer_type, int(r.weight_bits), int(r.input_bits), int(r.output_bits),
                         int(r.kept_out), r.total_out, int(r.kept_in), r.total_in, r.macs, r.bops,
                         float(r.weight_bits), float(r.output_bits)) for r in records]
    total = sum(r.macs for r in rows)
    fp32 = float(total * FLOAT_BITS * FLOAT_BITS)
    bops = sum(r.bops for r in rows)
    return ModelProfile(rows, total, bops, fp32, 100.0 * bops / fp32, 100.0 * bops / fp32)


def baseline_relative_bops(kind, model):
    """Relative BOPs (percent) of baseline ``kind`` for the float ``model`` (LeNet5: w8a8 6.25, w4a8 3.125...)."""
    if kind not in BASELINES:
        raise ValueError(f"Unknown baseline. Expected one of {sorted(BASELINES)}. Received: kind={kind!r}")
    return fixed_bit_profile(model, *BASELINES[kind]).relative_bops


def profile(model, method=None):
    """``bbits_tf.summary`` of a Bayesian Bits model, or the fixed-bit profile of a baseline ``method``."""
    if method in BASELINES:
        return fixed_bit_profile(model, *BASELINES[method])
    return summary(model)


def make_optimizer(model, recipe, steps_per_epoch):
    """``GroupedOptimizer`` of the recipe for a Bayesian Bits model; one Adam (weights group) for another model."""
    def lr(group, value):
        if recipe.weight_schedule == "paper" and group in recipe.decay_groups:
            return ConstantThenLinearDecay(value, recipe.epochs, steps_per_epoch, recipe.decay_start)
        return value

    def adam(group, value):
        return keras.optimizers.Adam(lr(group, value), epsilon=recipe.adam_epsilon)

    if not bayesian_bits_quantizers(model):
        return adam("weights", recipe.lr_weights)
    values = {"weights": recipe.lr_weights, "ranges": recipe.lr_ranges, "gates": recipe.lr_gates}
    return GroupedOptimizer({g: adam(g, values[g]) for g in GROUPS}, groups=variable_groups(model))


# ----------------------------------------------------------------------------------------------------------------
# Training


def _as_datasets(data, batch_size, test_batch_size, seed, train_map=None):
    (x_train, y_train), (x_test, y_test) = data
    # One iterator for the whole fit (repeat + steps_per_epoch): no pipeline rebuilt between epochs. Keras' fit on
    # a finite dataset makes an iterator it never uses and starts on the next one, so its first epoch is the
    # seed's second shuffle: skipping one epoch keeps the batches every run saw before (tests/test_training.py).
    steps = math.ceil(len(x_train) / batch_size)
    train = data_lib.make_dataset(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed,
                                  repeat=True).skip(steps)
    if train_map is not None:
        train = train.map(train_map).prefetch(tf.data.AUTOTUNE)  # sequential: random draws keep their order
    test = data_lib.make_dataset(x_test, y_test, batch_size=test_batch_size)
    return train, test, steps


def train(model, recipe, data, *, callbacks=(), verbose=1, seed=None, test_batch_size=1000, print_fn=print,
          log_dir=None, bit_width_every=None, relative_bops=None, epoch_offset=0, phase="train", total_epochs=None,
          guard_non_finite=True, checkpoint_dir=None, checkpoint_config=None, checkpoint_extra=None, resume=True,
          train_map=None):
    """Compiles ``model`` with the recipe's optimizer(s) and fits it for ``recipe.epochs`` epochs.

    Evaluates on the test set after every epoch (Keras progress bar, then ``BopsLogger``'s line), records the
    bit widths (``BitWidthHistory``) and, with ``log_dir``, writes TensorBoard summaries (Keras' ``TensorBoard``
    and ``BayesianBitsSummaries``). A float warm-up is ``run``'s job: ``recipe.warmup_epochs`` must be 0 here.

    Args:
        model: a model from ``build_method`` (Bayesian Bits, or a float/tfmot baseline), built under the
            distribution strategy it should train with.
        recipe: a ``Recipe``.
        data: ``((x_train, y_train), (x_test, y_test))`` NumPy arrays (``bbits_tf.data.load_mnist``).
        callbacks: extra Keras callbacks.
        verbose: Keras ``fit`` verbosity (1: progress bar).
        seed: shuffle seed.
        test_batch_size: evaluation batch size.
        print_fn: where the per-epoch line goes.
        log_dir: TensorBoard folder or ``None``.
        bit_width_every: also record bit widths every this many steps.
        relative_bops: constant relative BOPs to log for a model without Bayesian Bits quantizers.
        epoch_offset, phase, total_epochs: numbering and label of the epochs (see ``BopsLogger``).
        guard_non_finite: refuse non-finite training data and stop at the first NaN/Inf loss or variable
            (``NonFiniteGuard``), naming the layer and variable.
        checkpoint_dir: save a checkpoint there after every epoch (``EpochCheckpoint``: model and optimizer
            variables, ``BopsLogger``/``BitWidthHistory`` histories, the state of every callback with
            ``get_state``/``set_state`` such as ``BopsBudget``) and, with ``resume``, continue from the newest one:
            the fit starts at the epoch after it. ``None``: no checkpoints.
        checkpoint_config: JSON-able description of the run, saved with each checkpoint; resuming from a checkpoint
            with another one (or another phase, epoch count or set of stateful callbacks) is refused with the
            differences. ``None``: ``{"recipe": recipe.to_dict()}``.
        checkpoint_extra: a function without arguments whose JSON-able result is saved with each checkpoint
            (``read_checkpoint(dir)["extra"]``).
        resume: continue from a checkpoint in ``checkpoint_dir``; ``False`` starts afresh (later saves replace the
            checkpoints there).
        train_map: a function ``(x, y) -> (x, y)`` of TensorFlow ops applied to every training batch (e.g. data
            augmentation, ``examples/cifar10.py``); never to the test set. ``None``: none.

    Returns:
        ``(keras History, BopsLogger, BitWidthHistory)``. After a resume the History holds the epochs of this call,
        the BopsLogger and BitWidthHistory all epochs of the phase.
    """
    if recipe.warmup_epochs:
        raise ValueError(
            "`train` trains one phase; use `run` for a recipe with a float warm-up, or "
            f"`recipe.replace(warmup_epochs=0)`. Received: recipe.warmup_epochs={recipe.warmup_epochs}"
        )
    if guard_non_finite:
        data_lib.check_finite(data[0][0], "x_train")
        data_lib.check_finite(data[1][0], "x_test")
    train_ds, test_ds, steps = _as_datasets(data, recipe.batch_size, test_batch_size, seed, train_map)
    with model.distribute_strategy.scope():
        if bayesian_bits_quantizers(model):
            initialize_ranges(model, data[0][0])
        model.compile(optimizer=make_optimizer(model, recipe, steps),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    logger = BopsLogger(relative_bops=relative_bops, print_fn=print_fn, epoch_offset=epoch_offset, phase=phase,
                        total_epochs=total_epochs)
    bit_widths = BitWidthHistory(every_n_steps=bit_width_every)
    # Our own progress bar first, so that the epoch line of BopsLogger follows the bar's last line.
    all_callbacks = [keras.callbacks.ProgbarLogger(count_mode="steps"), logger, bit_widths]
    if guard_non_finite:
        all_callbacks.insert(0, NonFiniteGuard())
    if log_dir is not None:
        all_callbacks.append(BayesianBitsSummaries(log_dir))
        all_callbacks.append(keras.callbacks.TensorBoard(f"{log_dir}/{phase}", histogram_freq=0, profile_batch=0))
    all_callbacks.extend(callbacks)
    initial_epoch = 0
    if checkpoint_dir is not None:
        checkpointer, initial_epoch = _epoch_checkpoints(
            model, recipe, logger, bit_widths, callbacks, checkpoint_dir=checkpoint_dir,
            checkpoint_config=checkpoint_config, checkpoint_extra=checkpoint_extra, resume=resume, phase=phase,
            epoch_offset=epoch_offset, total_epochs=total_epochs or recipe.epochs + epoch_offset, print_fn=print_fn)
        all_callbacks.append(checkpointer)  # last: it saves what the others did with the epoch
    history = model.fit(train_ds, epochs=recipe.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                        validation_data=test_ds, callbacks=all_callbacks, verbose=verbose)
    return history, logger, bit_widths


RECALIBRATION_IMAGES = 5000


def _recalibrate(model, data, history, print_fn):
    """``folding.recalibrate_batch_norm`` on the training images, then the test accuracy again (``run``)."""
    (x_train, _), (x_test, y_test) = data
    if not recalibrate_batch_norm(model, x_train[:RECALIBRATION_IMAGES]):
        return
    before = history[-1].get("test_accuracy")
    after = float(model.evaluate(x_test, y_test, batch_size=1000, verbose=0, return_dict=True)["accuracy"])
    history[-1].update(test_accuracy=after, test_accuracy_before_bn_recalibration=before)
    if print_fn is not None:
        print_fn(f"BatchNorm statistics recalibrated with the test-time gates on "
                 f"{min(len(x_train), RECALIBRATION_IMAGES)} training images: test accuracy "
                 f"{100 * before:.2f}% -> {100 * after:.2f}%")


@dataclasses.dataclass
class TrainingRun:
    """Result of ``run``: the trained model and what happened on the way."""

    model: object
    method: str
    recipe: Recipe
    history: list  # one dict per epoch (both phases), BopsLogger's entries
    bit_widths: list  # BitWidthHistory records of the quantized phase
    profile: ModelProfile
    test_accuracy: float
    wall_time_s: float  # training time, summed over the sessions of a resumed run
    resumed_at: list = dataclasses.field(default_factory=list)  # completed epochs at each resume

    @property
    def relative_bops(self):
        return self.profile.relative_bops


def run(model, recipe, data, *, method="bb", seed=None, strategy=None, verbose=1, print_fn=print, log_dir=None,
        bit_width_every=None, callbacks=(), guard_non_finite=True, checkpoint_dir=None, checkpoint_config=None,
        train_map=None, recalibrate_bn=True, input_range=None, cost="bops"):
    """Float warm-up (if the recipe has one), ``build_method``, then ``train``: the whole experiment.

    With ``checkpoint_dir`` it saves a checkpoint after every epoch of both phases and, called again with the same
    arguments after an interruption (a kill, Ctrl-C, a crash), continues after the last completed epoch: a
    completed warm-up is not repeated, the quantized phase goes on with its variables, optimizer state (each
    group's Adam slots and iteration count, so the learning-rate schedule too), frozen gates and the state of
    callbacks with ``get_state``/``set_state`` (``BopsBudget``'s controller). The history holds every epoch once.
    A resumed run is not bit-identical to an uninterrupted one: the random streams of the gates and the order of
    the training data restart at the resume. Without ``checkpoint_dir`` nothing changes.

    Args:
        model: the float model, or a function without arguments that builds it (needed with ``strategy``, whose
            scope must hold the model's variables, and for a seeded initialisation).
        recipe: a ``Recipe`` (``recipe.epochs`` counts the warm-up; the method trains the rest). The ``"float"``
            method trains the float model for all ``recipe.epochs``.
        data: ``((x_train, y_train), (x_test, y_test))``.
        method: one of ``METHODS``.
        seed: seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``) and the shuffling.
        strategy: a ``tf.distribute.Strategy`` or ``None``.
        verbose, print_fn, log_dir, bit_width_every, callbacks, guard_non_finite, train_map: passed to ``train``
            (both phases).
        checkpoint_dir: folder for the checkpoints (``None``: none). A finished run's last checkpoint stays; calling
            ``run`` again only rebuilds its result.
        checkpoint_config: JSON-able data that, with ``method``, ``recipe`` and ``seed``, identifies the run (the data,
            say); a checkpoint of a run that differs is refused with a ``ValueError`` that lists the differences.
        recalibrate_bn: after training a model with folded BatchNorms, set their running statistics from the first
            ``RECALIBRATION_IMAGES`` training images with the test-time gates (``folding.recalibrate_batch_norm``)
            and evaluate again; the last history entry keeps the accuracy from before as
            ``test_accuracy_before_bn_recalibration``. No effect on models without folded BatchNorm (LeNet5).

        input_range: ``(lo, hi)`` of the model input in the exported file (``quantize_model``'s): with it the layers
            that read the input add the file's bias in inference. ``examples/mnist.py`` passes (0, 1).
        cost: what the prior charges (``quantize_model``'s ``cost``: ``"bops"``, ``"flash"``, ``"arena"``).

    Returns:
        A ``TrainingRun``.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method. Expected one of {list(METHODS)}. Received: method={method!r}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"`recipe` must be a Recipe (see get_recipe). Received: recipe={recipe!r}")
    start = time.time()
    meta, resumed_at, prior_time, history = None, [], 0.0, []
    config = _as_json({"method": method, "recipe": recipe.to_dict(), "seed": seed, **(checkpoint_config or {})})
    if checkpoint_dir is not None:
        meta = read_checkpoint(checkpoint_dir)
        if meta is not None:
            differences = config_differences(meta["config"], config)
            if differences:
                raise ValueError("`checkpoint_dir` holds a checkpoint of another run (checkpoint -> now: " +
                                 "; ".join(differences) + "). Use another checkpoint_dir, or delete it to start "
                                 f"afresh. Received: checkpoint_dir={str(checkpoint_dir)!r}")
            extra = meta.get("extra") or {}
            resumed_at = list(extra.get("resumed_at", [])) + [meta["completed_epochs"]]
            prior_time = float(extra.get("wall_time_s", 0.0))
    if seed is not None:
        keras.utils.set_random_seed(seed)
    strategy = strategy or tf.distribute.get_strategy()

    def extra_state():
        return {"history_before": history, "resumed_at": resumed_at, "wall_time_s": prior_time + time.time() - start}

    common = dict(verbose=verbose, seed=seed, print_fn=print_fn, log_dir=log_dir, callbacks=callbacks,
                  total_epochs=recipe.epochs, guard_non_finite=guard_non_finite, checkpoint_dir=checkpoint_dir,
                  checkpoint_config=config, checkpoint_extra=extra_state, train_map=train_map)
    with strategy.scope():
        float_model = model() if callable(model) and not isinstance(model, keras.Model) else model
    warmup = 0 if method == "float" else recipe.warmup_epochs
    in_main_phase = meta is not None and meta["phase"] != WARMUP_PHASE
    if warmup and not in_main_phase:
        warm = recipe.replace(epochs=warmup, warmup_epochs=0, weight_schedule="constant",
                              lr_weights=recipe.lr_warmup or recipe.lr_weights)
        _, logger, _ = train(float_model, warm, data, relative_bops=100.0, phase=WARMUP_PHASE, **common)
        history += logger.history
    elif in_main_phase:
        history += meta["extra"]["history_before"]
    with strategy.scope():
        trained = build_method(method, float_model, recipe, input_range, cost)
    main = recipe.replace(epochs=recipe.epochs - warmup, warmup_epochs=0)
    fixed = baseline_relative_bops(method, float_model) if method in BASELINES else None
    _, logger, bit_widths = train(trained, main, data, relative_bops=fixed, epoch_offset=warmup, phase=method,
                                  bit_width_every=bit_width_every, resume=in_main_phase, **common)
    history += logger.history
    if recalibrate_bn and method not in BASELINES:
        _recalibrate(trained, data, history, print_fn)
    prof = profile(float_model if method in BASELINES else trained, method)
    return TrainingRun(model=trained, method=method, recipe=recipe, history=history,
                       bit_widths=bit_widths.history, profile=prof,
                       test_accuracy=float(history[-1].get("test_accuracy", float("nan"))),
                       wall_time_s=prior_time + time.time() - start, resumed_at=resumed_at)
