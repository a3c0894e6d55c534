"""Keras callbacks for Bayesian Bits training: BOP logging, bit-width history, TensorBoard summaries."""
import math

import numpy as np
import tensorflow as tf

from bbits_tf import graph
from bbits_tf._keras import keras
from bbits_tf.optimizers import GroupedOptimizer
from bbits_tf.quantize import bayesian_bits_quantizers, get_mu
from bbits_tf.summary import summary


def quantizer_name(wrapper, role):
    return f"{graph.inner_layer(wrapper).name}/{role}"


def bayesian_bits_state(model):
    """Scalars that describe a Bayesian Bits model now: BOPs, each quantizer's bits, kept channel fractions."""
    prof = summary(model)
    state = {"relative_bops": prof.relative_bops, "expected_relative_bops": prof.expected_relative_bops,
             "log2_bits": {}, "bits": {}, "kept": {}}
    for wrapper, role, quantizer, variables in bayesian_bits_quantizers(model):
        name = quantizer_name(wrapper, role)
        state["log2_bits"][name] = math.log2(max(quantizer.expected_bit_width(variables), 1e-12))
        state["bits"][name] = int(quantizer.bit_width(variables))
    for row in prof.layers:
        state["kept"][row.name] = row.kept_channels / row.total_channels
    return state


def _float(value):
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):
        return value


class BopsLogger(keras.callbacks.Callback):
    """After each epoch: test accuracy, relative BOPs (deterministic gates) and expected relative BOPs.

    Adds ``test_accuracy``, ``relative_bops``, ``expected_relative_bops`` (and ``lr_<group>`` for a
    ``GroupedOptimizer``) to the epoch ``logs`` (so ``History`` and ``TensorBoard`` see them), keeps every
    epoch's logs in ``self.history`` and prints one line.

    Args:
        test_data: ``(x, y)`` or a dataset to evaluate on; ``None`` reads ``val_accuracy`` from the logs
            (``fit(validation_data=...)``).
        relative_bops: a constant for models without Bayesian Bits quantizers (baselines); ``None`` computes it.
        batch_size: evaluation batch size for array ``test_data``.
        print_fn: where the line goes (``None``: nowhere).
        epoch_offset: added to the epoch number in the line and the history (epochs of an earlier phase).
        phase: label stored in each history entry (e.g. ``"float_warmup"``).
        total_epochs: the epoch count shown in the line (``None``: this fit's epochs plus ``epoch_offset``).
    """

    def __init__(self, test_data=None, relative_bops=None, batch_size=1000, print_fn=print, epoch_offset=0,
                 phase="train", total_epochs=None):
        super().__init__()
        self.test_data, self.fixed_bops, self.batch_size = test_data, relative_bops, batch_size
        self.print_fn, self.epoch_offset, self.phase = print_fn, epoch_offset, phase
        self.total_epochs = total_epochs
        self.history = []

    def _accuracy(self, logs):
        if self.test_data is None:
            return logs.get("val_accuracy")
        if isinstance(self.test_data, tuple):
            result = self.model.evaluate(*self.test_data, batch_size=self.batch_size, verbose=0, return_dict=True)
        else:
            result = self.model.evaluate(self.test_data, verbose=0, return_dict=True)
        return result.get("accuracy")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        values = {"test_accuracy": self._accuracy(logs)}
        if bayesian_bits_quantizers(self.model):
            state = bayesian_bits_state(self.model)
            values.update(relative_bops=state["relative_bops"], expected_relative_bops=state["expected_relative_bops"])
        elif self.fixed_bops is not None:
            values.update(relative_bops=self.fixed_bops, expected_relative_bops=self.fixed_bops)
        optimizer = getattr(self.model, "optimizer", None)
        if isinstance(optimizer, GroupedOptimizer):
            values.update({f"lr_{k}": v for k, v in optimizer.learning_rates().items()})
        elif optimizer is not None:
            values["lr_weights"] = _float(tf.convert_to_tensor(optimizer.learning_rate))
        values = {k: v for k, v in values.items() if v is not None}
        logs.update(values)
        entry = {"epoch": epoch + 1 + self.epoch_offset, "phase": self.phase}
        entry.update({k: _float(v) for k, v in logs.items()})
        self.history.append(entry)
        if self.print_fn is not None:
            total = self.total_epochs or self.params.get("epochs", epoch + 1) + self.epoch_offset
            parts = [f"epoch {entry['epoch']}/{total}"]
            if "test_accuracy" in values:
                parts.append(f"test accuracy {100 * float(values['test_accuracy']):.2f}%")
            if "relative_bops" in values:
                parts.append(f"relative BOPs {values['relative_bops']:.3f}% "
                             f"(expected {values['expected_relative_bops']:.3f}%)")
            self.print_fn(" - ".join(parts))


class BitWidthHistory(keras.callbacks.Callback):
    """Records log2 of every quantizer's expected bit width (and its deterministic bits) during training.

    One record at the start, one per epoch end, and one every ``every_n_steps`` training steps if given.
    ``self.history`` is a list of ``{"epoch": float, "step": int, "log2_bits": {quantizer: value},
    "bits": {quantizer: int}, "kept": {layer: fraction}}``; quantizers are named ``"<layer>/weight"`` and
    ``"<layer>/activation"``.
    """

    def __init__(self, every_n_steps=None):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"`every_n_steps` must be >= 1 or None. Received: every_n_steps={every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.history = []
        self._step = 0
        self._epoch = 0

    def _record(self, epoch):
        state = bayesian_bits_state(self.model)
        self.history.append({"epoch": float(epoch), "step": self._step,
                             **{k: state[k] for k in ("log2_bits", "bits", "kept")}})

    def on_train_begin(self, logs=None):
        if bayesian_bits_quantizers(self.model) and not self.history:
            self._record(0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_n_steps and self._step % self.every_n_steps == 0 and bayesian_bits_quantizers(self.model):
            steps = self.params.get("steps") or (batch + 1)
            self._record(self._epoch + (batch + 1) / steps)

    def on_epoch_end(self, epoch, logs=None):
        if bayesian_bits_quantizers(self.model):
            self._record(epoch + 1)


class BayesianBitsSummaries(keras.callbacks.Callback):
    """Writes the Bayesian Bits series to TensorBoard, as tfmot's ``PruningSummaries`` does for sparsity.

    Per epoch (step = epoch index, as Keras' ``TensorBoard`` callback): ``bayesian_bits/relative_bops``,
    ``bayesian_bits/expected_relative_bops``, ``bayesian_bits/mu``, ``log2_bit_width/<quantizer>`` (log2 of
    the expected bit width), ``bit_width/<quantizer>`` (deterministic), ``kept_channels/<layer>`` (fraction).
    With ``update_freq=N`` the same series also go out every N training steps under ``steps/...``.

    Args:
        log_dir: TensorBoard log folder; events go to ``log_dir/subdir``.
        update_freq: ``"epoch"`` or a number of training steps.
        subdir: sub-folder for the event files.
    """

    def __init__(self, log_dir, update_freq="epoch", subdir="bayesian_bits"):
        super().__init__()
        if update_freq != "epoch" and (not isinstance(update_freq, int) or update_freq < 1):
            raise ValueError(f"`update_freq` must be 'epoch' or a positive int. Received: update_freq={update_freq!r}")
        self.log_dir, self.update_freq, self.subdir = str(log_dir), update_freq, subdir
        self._writer = None
        self._step = 0

    def _write(self, step, prefix=""):
        if not bayesian_bits_quantizers(self.model):
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(f"{self.log_dir}/{self.subdir}")
        state = bayesian_bits_state(self.model)
        with self._writer.as_default(), tf.summary.record_if(True):
            for key in ("relative_bops", "expected_relative_bops"):
                tf.summary.scalar(f"{prefix}bayesian_bits/{key}", state[key], step=step)
            tf.summary.scalar(f"{prefix}bayesian_bits/mu", get_mu(self.model), step=step)
            for group, tag in (("log2_bits", "log2_bit_width"), ("bits", "bit_width"), ("kept", "kept_channels")):
                for name, value in state[group].items():
                    tf.summary.scalar(f"{prefix}{tag}/{name}", value, step=step)
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.update_freq != "epoch" and self._step % self.update_freq == 0:
            self._write(self._step, prefix="steps/")

    def on_epoch_end(self, epoch, logs=None):
        self._write(epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()




class NonFiniteError(FloatingPointError):
    """Training produced a NaN or Inf; the message names the first layer and variable that went non-finite."""


def first_non_finite_variable(model):
    """``(layer name, variable name, count, size)`` of the first non-finite variable in layer order, or ``None``."""
    seen = set()
    for layer in model.layers:
        for variable in layer.weights:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            value = np.asarray(variable.numpy(), dtype=np.float64)
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            if bad:
                short = variable.name.rsplit("/", 1)[-1].split(":")[0]  # tfmot names kernels quantize_annotate/...
                return graph.inner_layer(layer).name, short, bad, int(np.size(value))
    return None


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training with ``NonFiniteError`` as soon as the loss or a variable is NaN or Inf.

    After every training step it reads the step's loss (already in the logs, so it costs nothing); when it is not
    finite, or at the end of an epoch, it looks through the model's variables in layer order and names the first
    layer and variable that went non-finite. Without it one NaN pixel turns kernels, ranges and gates into NaN
    while the reported bit widths and kept channels still look plausible. ``bbits_tf.training.run`` and the
    examples use it by default.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _check(self, where, loss=None):
        found = first_non_finite_variable(self.model)
        if found is None and (loss is None or math.isfinite(loss)):
            return
        if found is None:
            detail = "no variable is non-finite yet (the batch or the loss itself is)"
        else:
            layer, variable, bad, size = found
            detail = f"the first non-finite variable is layer {layer!r}, variable {variable!r} ({bad} of {size} values)"
        raise NonFiniteError(
            f"Training stopped at {where}: {detail}. This usually means NaN or Inf in the training data or a "
            f"learning rate that is too high. Received: loss={loss}"
        )

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(np.asarray(loss))
        if not math.isfinite(loss):
            self._check(f"epoch {self._epoch + 1}, batch {batch + 1}", loss)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        self._check(f"the end of epoch {epoch + 1}", None if loss is None else float(np.asarray(loss)))
