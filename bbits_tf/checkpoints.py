"""Checkpoints of ``bbits_tf.training``: an interrupted ``train`` or ``run`` resumes after its last completed epoch.

``EpochCheckpoint`` saves, after every epoch, one ``tf.train.Checkpoint`` holding the model's variables, the
optimizer (each Adam's slots and step count, the learning-rate scales that ``GroupedOptimizer.freeze`` sets) and a
JSON state (phase, epoch, config, the epoch and bit-width histories, the state of callbacks with
``get_state``/``set_state`` such as ``BopsBudget``). ``read_checkpoint`` reads the newest complete one back.
"""
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from bbits_tf._keras import keras


CHECKPOINT_FORMAT = 1
_STATE_KEY = "run_state/.ATTRIBUTES/py_state"
WARMUP_PHASE = "float_warmup"


def _json_default(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"Not JSON-able: {value!r} of type {type(value).__name__}")


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so that a saved config compares equal."""
    return json.loads(json.dumps(value, default=_json_default))


class _JsonState(tf.train.experimental.PythonState):
    """JSON-able data saved inside a ``tf.train.Checkpoint``: written in the same atomic save as the variables."""

    def __init__(self):
        self.value = None

    def serialize(self):
        return json.dumps(self.value, default=_json_default)

    def deserialize(self, string_value):
        self.value = json.loads(string_value)


def config_differences(saved, current, prefix=""):
    """Lines ``"key: saved -> current"`` for every (nested) key where two JSON-able configs differ."""
    saved, current = _as_json(saved), _as_json(current)
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [f"{prefix or 'value'}: {saved!r} -> {current!r}"]
    lines = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in saved or key not in current:
            lines.append(f"{name}: {saved.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}")
        else:
            lines.extend(config_differences(saved[key], current[key], name))
    return lines


def read_checkpoint(checkpoint_dir):
    """The state saved with the newest readable checkpoint in ``checkpoint_dir`` (``None``: there is none).

    Every tensor of a candidate is read back (checksums included); one that cannot be read (a kill or a full disk
    while it was written, a truncated file) is skipped with a warning and the one before it is used (``train``
    keeps two).

    Returns:
        ``None``, or a dict: ``path`` (the checkpoint's prefix), ``phase``, ``epoch_offset``, ``epoch`` (epochs
        completed in the phase), ``epochs`` (of the phase), ``completed_epochs`` (``epoch_offset + epoch``),
        ``total_epochs``, ``config``, ``history`` (``BopsLogger`` entries of the phase), ``bit_widths``
        (``BitWidthHistory``), ``callbacks`` (states of the callbacks with ``get_state``), ``extra``.
    """
    checkpoint_dir = str(checkpoint_dir)
    state = tf.train.get_checkpoint_state(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if state is None:
        return None
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    for path in reversed(paths):
        # get_checkpoint_state already puts the folder in front of a relative path (a relative folder stays
        # relative): join only a bare name, or a relative folder such as runs/x/checkpoint is doubled.
        if not os.path.isabs(path) and not tf.io.gfile.exists(path + ".index"):
            path = os.path.join(checkpoint_dir, os.path.basename(path))
        try:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            meta = json.loads(reader.get_tensor(_STATE_KEY))
        except (tf.errors.OpError, ValueError, LookupError, OSError) as error:
            warnings.warn(f"Skipping the unreadable checkpoint {path}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}", stacklevel=2)
            continue
        meta["path"] = path
        return meta
    return None


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model, its optimizer and ``state_fn(epochs done)`` after every epoch (``train``'s checkpoints).

    One ``tf.train.Checkpoint`` holds the model's variables (``mu`` included), the optimizer's (a
    ``GroupedOptimizer``: each group's Adam slots and iterations, and the learning-rate scales that ``freeze``
    sets) and the JSON state. ``tf.train.CheckpointManager`` writes it under temporary names and points the
    ``checkpoint`` index file at it (an atomic rename) only once it is complete, so a kill during a save leaves the
    previous checkpoint in charge; the newest ``max_to_keep`` are kept. Must come after the callbacks whose state it
    saves.
    """

    def __init__(self, directory, model, state_fn, epoch_offset=0, max_to_keep=2):
        super().__init__()
        # Under tf.distribute.MultiWorkerMirroredStrategy only the chief writes ``directory``; the other workers
        # save the same checkpoint into a temporary folder of their own (every worker runs the same save), removed
        # at the end of training.
        self.chief = is_chief(model.distribute_strategy)
        if not self.chief:
            directory = tempfile.mkdtemp(prefix="bbits_tf_worker_checkpoint_")
        self.directory, self.state_fn, self.epoch_offset = str(directory), state_fn, epoch_offset
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # half-written saves of a killed process
            if "_temp" in name and os.path.isdir(os.path.join(self.directory, name)):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._state = _JsonState()
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, run_state=self._state)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=max_to_keep)
        self._status = None

    def restore(self, path):
        """Reads checkpoint ``path``; optimizer slots are restored when the first training step creates them."""
        status = self.checkpoint.read(path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as error:
            raise ValueError(f"The checkpoint does not fit this model or optimizer ({str(error)[:300]}). "
                             f"Received: checkpoint={path}") from None
        self._status = status

    def on_epoch_end(self, epoch, logs=None):
        self._state.value = self.state_fn(epoch + 1)
        self.manager.save(checkpoint_number=self.epoch_offset + epoch + 1)

    def on_train_end(self, logs=None):
        if not self.chief:
            shutil.rmtree(self.directory, ignore_errors=True)


def is_chief(strategy):
    """Whether this process writes shared files: always, except under a multi-worker strategy, where the task
    ``chief`` does (or worker 0 of a cluster without one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster or resolver.task_type is None:
        return True
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0


def _stateful(callbacks):
    """The callbacks with ``get_state``/``set_state`` (``BopsBudget``...), keyed by position and class name."""
    return {f"{i}:{type(c).__name__}": c for i, c in enumerate(callbacks)
            if callable(getattr(c, "get_state", None)) and callable(getattr(c, "set_state", None))}


def _check_resumable(meta, phase, epoch_offset, epochs, config, stateful, checkpoint_dir):
    where = f"Received: checkpoint_dir={str(checkpoint_dir)!r}"
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"The checkpoint has format {meta.get('format')!r}, this code reads {CHECKPOINT_FORMAT}. "
                         f"{where}")
    if (meta["phase"], meta["epoch_offset"]) != (phase, epoch_offset):
        raise ValueError(
            f"The checkpoint is of phase {meta['phase']!r} (after epoch {meta['epoch_offset']}), not of this phase "
            f"{phase!r} (after epoch {epoch_offset}); pass resume=False to start this phase afresh. {where}")
    differences = config_differences(meta["config"], config)
    if meta["epochs"] != epochs:
        differences.insert(0, f"epochs of the phase: {meta['epochs']} -> {epochs}")
    if sorted(meta["callbacks"]) != sorted(stateful):
        differences.append(f"callbacks with state: {sorted(meta['callbacks'])} -> {sorted(stateful)}")
    if differences:
        raise ValueError("The checkpoint is of another run (checkpoint -> now: " + "; ".join(differences) +
                         f"). Use another checkpoint_dir, or delete it to start afresh. {where}")


def _epoch_checkpoints(model, recipe, logger, bit_widths, callbacks, *, checkpoint_dir, checkpoint_config,
                       checkpoint_extra, resume, phase, epoch_offset, total_epochs, print_fn):
    """``train``'s ``EpochCheckpoint`` and the epoch to start from (with ``resume``: after the newest checkpoint)."""
    stateful = _stateful(callbacks)
    config = _as_json({"recipe": recipe.to_dict()} if checkpoint_config is None else checkpoint_config)

    def state(epoch):
        return {"format": CHECKPOINT_FORMAT, "phase": phase, "epoch_offset": epoch_offset, "epoch": epoch,
                "epochs": recipe.epochs, "completed_epochs": epoch_offset + epoch, "total_epochs": total_epochs,
                "config": config, "history": logger.history,
                "bit_widths": {"history": bit_widths.history,
                               "step": bit_widths._step},  # pylint: disable=protected-access
                "callbacks": {key: c.get_state() for key, c in stateful.items()},
                "extra": checkpoint_extra() if checkpoint_extra is not None else None}

    checkpointer = EpochCheckpoint(checkpoint_dir, model, state, epoch_offset)
    meta = read_checkpoint(checkpoint_dir) if resume else None
    if meta is None:
        return checkpointer, 0
    _check_resumable(meta, phase, epoch_offset, recipe.epochs, config, stateful, checkpoint_dir)
    checkpointer.restore(meta["path"])
    logger.history = list(meta["history"])
    bit_widths.history = list(meta["bit_widths"]["history"])
    bit_widths._step = meta["bit_widths"]["step"]  # pylint: disable=protected-access
    for key, callback in stateful.items():
        callback.set_state(meta["callbacks"][key])
    if print_fn is not None:
        print_fn(f"resuming {phase} from {meta['path']}: epoch {meta['completed_epochs']} of {total_epochs} done")
    return checkpointer, meta["epoch"]
