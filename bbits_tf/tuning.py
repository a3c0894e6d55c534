"""Keras Tuner search over ``mu``, the Pareto front of accuracy against relative BOPs, model choice, BOP budgets.

A sweep trains one Bayesian Bits model per value of the regularizer strength ``mu`` (optionally also the gate
learning rate and the gates' initial ``log_alpha``), keeps every trial (validation and test accuracy, relative and
expected relative BOPs, wall time, the model as ``model.h5``) and lets you pick a model from the front::

    tuner = MuTuner(models.lenet5, training.get_recipe("fast", epochs=2), max_trials=6,
                    directory="runs/sweep", project_name="mnist_mu")
    tuner.search(bbits_tf.data.load_mnist(train_limit=10000))
    rows = trials_table(tuner)                     # one dict per trial, JSON-ready
    front = pareto_front(rows)                     # non-dominated: higher accuracy, lower relative BOPs
    plot_pareto(rows, "pareto.png", baselines=read_baselines("runs"))
    choice = best_trial(rows, max_relative_bops=0.5)
    model = load_trial_model(tuner.project_dir, choice["trial_id"])

The search resumes from its directory (``overwrite=False``): finished trials are kept, an interrupted one runs
again. Keras Tuner's chief/worker mode runs trials in parallel processes: start the same script with
``KERASTUNER_TUNER_ID=chief`` (it serves the oracle and collects the results) and with ``KERASTUNER_TUNER_ID=worker0``,
``worker1``... (they train), all with ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` set.

``BopsBudget`` instead reaches a BOP budget in one training run, by adapting ``mu`` while training.

keras-tuner's ``Tuner`` accepts only Keras 3 models, so ``MuTuner`` subclasses its ``BaseTuner`` and trains the
tf_keras model itself (``bbits_tf.training.run``).
"""
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import keras_tuner
import numpy as np
from keras_tuner.engine import base_tuner
from keras_tuner.engine.trial import TrialStatus
from keras_tuner.src.distribute import utils as dist_utils  # no public name for has/is_chief_oracle

from bbits_tf import training
from bbits_tf.budget import BopsBudget  # noqa: F401  (re-exported)
from bbits_tf._keras import keras
from bbits_tf.quantize import quantize_scope

__all__ = ["BopsBudget", "MuGridOracle", "MuTuner", "best_trial", "is_worker", "load_trial_model", "pareto_front",
           "plot_pareto", "read_baselines", "save_h5", "search_space", "serve_oracle", "trials_table", "write_json"]

RESULT_FILE = "result.json"
MODEL_FILE = "model.h5"
ATTEMPTS_FILE = "attempts.log"  # one line per start of the trial: tuner id, process id, time
TABLE_KEYS = ("val_accuracy", "test_accuracy", "relative_bops", "expected_relative_bops", "flash_bytes",
              "arena_bytes", "latency_us", "wall_time_s")


def is_worker():
    """True in a Keras Tuner worker process (chief/worker mode, ``KERASTUNER_TUNER_ID`` without "chief")."""
    return "KERASTUNER_ORACLE_IP" in os.environ and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "")


def _json_ready(value):
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_json(path, value):
    """Writes JSON atomically (temporary file, then rename), so that a killed process leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_ready(value), indent=1))
    os.replace(tmp, path)


def save_h5(model, path):
    """``model.save(path)`` as HDF5 without the optimizer (what ``load_trial_model`` reads), quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HDF5 file.*")
        model.save(path, include_optimizer=False)


# ----------------------------------------------------------------------------------------------------------------
# Search space and oracle


def _check_range(name, value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not 0 < float(value[0]) <= float(value[1])):
        raise ValueError(f"`{name}` must be a (min, max) pair with 0 < min <= max. Received: {name}={value!r}")
    return float(value[0]), float(value[1])


def search_space(mu=(1e-3, 1.0), lr_gates=None, init_log_alpha=None):
    """The ``keras_tuner.HyperParameters`` of a sweep.

    Args:
        mu: ``(min, max)`` of the regularizer strength, sampled on a log scale.
        lr_gates: ``(min, max)`` of the gates' learning rate (log scale), or ``None`` for the recipe's.
        init_log_alpha: ``(min, max)`` of the magnitude of the gates' initial ``log_alpha`` (linear scale; the
            signs stay the recipe's, e.g. ``(m, m, -m, -m)`` starts at 8 bits), or ``None`` for the recipe's.
    """
    hp = keras_tuner.HyperParameters()
    lo, hi = _check_range("mu", mu)
    hp.Float("mu", lo, hi, sampling="log", default=math.sqrt(lo * hi))
    if lr_gates is not None:
        lo, hi = _check_range("lr_gates", lr_gates)
        hp.Float("lr_gates", lo, hi, sampling="log", default=math.sqrt(lo * hi))
    if init_log_alpha is not None:
        lo, hi = _check_range("init_log_alpha", init_log_alpha)
        hp.Float("init_log_alpha", lo, hi, default=0.5 * (lo + hi))
    return hp


class MuGridOracle(keras_tuner.Oracle):
    """``max_trials`` values of ``mu`` evenly spaced on a log scale from its minimum to its maximum, in order.

    Other hyperparameters of the space keep their defaults (use ``keras_tuner.oracles.RandomSearchOracle`` to
    sample them). Trial ``i`` gets ``mu = min * (max / min) ** (i / (max_trials - 1))``; a sweep resumed with
    another ``max_trials`` keeps its finished trials and continues with the new grid's later points.
    """

    def __init__(self, objective=None, max_trials=6, hyperparameters=None, **kwargs):
        if not isinstance(max_trials, int) or max_trials < 1:
            raise ValueError(f"`max_trials` must be a positive int. Received: max_trials={max_trials!r}")
        hyperparameters = hyperparameters or search_space()
        if "mu" not in [hp.name for hp in hyperparameters.space]:
            raise ValueError("`hyperparameters` must define 'mu'. Received: "
                             f"{[hp.name for hp in hyperparameters.space]}")
        super().__init__(objective=objective, max_trials=max_trials, hyperparameters=hyperparameters, **kwargs)

    def grid(self):
        """The values of ``mu``, trial by trial."""
        mu = next(hp for hp in self.hyperparameters.space if hp.name == "mu")
        lo, hi, n = float(mu.min_value), float(mu.max_value), self.max_trials
        return [lo * (hi / lo) ** (i / (n - 1)) if n > 1 else math.sqrt(lo * hi) for i in range(n)]

    def populate_space(self, trial_id):
        index = len(self.trials)
        if index >= self.max_trials:
            return {"status": TrialStatus.STOPPED, "values": None}
        values = {hp.name: hp.default for hp in self.hyperparameters.space}
        values["mu"] = self.grid()[index]
        return {"status": TrialStatus.RUNNING, "values": values}


def _make_oracle(oracle, max_trials, hyperparameters, objective, seed):
    if isinstance(oracle, keras_tuner.Oracle):
        return oracle
    if oracle == "grid":
        return MuGridOracle(objective, max_trials, hyperparameters)
    if oracle == "random":
        return keras_tuner.oracles.RandomSearchOracle(objective, max_trials, hyperparameters=hyperparameters,
                                                      seed=seed + 1)
    raise ValueError(f"`oracle` must be 'grid', 'random' or a keras_tuner.Oracle. Received: oracle={oracle!r}")


# ----------------------------------------------------------------------------------------------------------------
# The tuner


class MuTuner(base_tuner.BaseTuner):
    """Keras Tuner search over ``mu`` (and optionally the gate learning rate and initial ``log_alpha``).

    Each trial builds the float model (``build_model()``), quantizes it (``method``), trains it with
    ``bbits_tf.training.run`` on the recipe with the trial's values, evaluates it on the validation and the
    test set, and writes ``result.json`` and ``model.h5`` into its trial folder. ``run_trial`` returns
    ``val_accuracy`` (the oracle's objective), ``test_accuracy``, ``relative_bops``,
    ``expected_relative_bops`` and ``wall_time_s``.

    Args:
        build_model: function without arguments that returns the float tf_keras model (default: LeNet5).
        recipe: a ``training.Recipe`` or a name in ``training.RECIPES``; the trial's values replace its fields.
        method: a Bayesian Bits method of ``training.ABLATIONS`` (``"bb"``...).
        max_trials: number of trials.
        hyperparameters: a ``keras_tuner.HyperParameters`` with ``mu`` (``search_space()``).
        oracle: ``"grid"`` (``MuGridOracle``), ``"random"`` or a ``keras_tuner.Oracle``.
        seed: training seed (the same for every trial, so that trials differ only by their values).
        validation_split: fraction of the training set held out for validation when ``search`` gets no
            ``validation_data``.
        save_models: write each trial's ``model.h5``.
        verbose: Keras ``fit`` verbosity inside trials; the epoch lines print when ``verbose`` is not 0.
        directory, project_name, overwrite: the project folder ``directory/project_name``; with ``overwrite=False``
            an existing project resumes. Worker processes never overwrite.
    """

    def __init__(self, build_model=None, recipe="fast", *, method="bb", max_trials=6, hyperparameters=None,
                 oracle="grid", seed=0, validation_split=0.1, save_models=True, verbose=0, directory="runs/sweep",
                 project_name="mu_sweep", overwrite=False, test_batch_size=1000, cost="bops"):
        from bbits_tf.costs import check_cost  # pylint: disable=import-outside-toplevel
        self.cost_name = check_cost(cost)  # a latency table is passed on as it is
        self.cost = cost
        if method not in training.ABLATIONS:
            raise ValueError(f"`method` must be a Bayesian Bits method {sorted(training.ABLATIONS)} (baselines "
                             f"have no mu). Received: method={method!r}")
        if not 0 < validation_split < 1:
            raise ValueError(f"`validation_split` must be in (0, 1). Received: validation_split={validation_split!r}")
        if build_model is None:
            from bbits_tf import models

            build_model = models.lenet5
        self.build_model = build_model
        self.recipe = training.get_recipe(recipe)
        self.method, self.seed, self.validation_split = method, seed, validation_split
        self.save_models, self.verbose, self.test_batch_size = save_models, verbose, test_batch_size
        hyperparameters = hyperparameters or search_space()
        objective = keras_tuner.Objective("val_accuracy", "max")
        super().__init__(_make_oracle(oracle, max_trials, hyperparameters, objective, seed), directory=directory,
                         project_name=project_name, overwrite=overwrite and not is_worker())
        if not self._is_worker() and not Path(self._get_tuner_fname()).exists():
            self.save()  # so that a sweep killed during its first trial resumes from here

    def recipe_for(self, hp):
        """The recipe of a trial: ``self.recipe`` with the trial's values of ``hp``."""
        values = hp.values if hasattr(hp, "values") else dict(hp)
        changes = {"mu": values.get("mu"), "lr_gates": values.get("lr_gates")}
        if values.get("init_log_alpha") is not None:
            m = float(values["init_log_alpha"])
            changes["init_log_alpha"] = tuple(math.copysign(m, a) for a in self.recipe.init_log_alpha)
        return self.recipe.replace(**changes)

    def _split(self, data, validation_data):
        (x_train, y_train), (x_test, y_test) = data
        if validation_data is None:
            n_val = max(1, int(round(len(x_train) * self.validation_split)))
            validation_data = (x_train[-n_val:], y_train[-n_val:])
            x_train, y_train = x_train[:-n_val], y_train[:-n_val]
        return (x_train, y_train), validation_data, (x_test, y_test)

    def run_trial(self, trial, data, validation_data=None, callbacks=(), verbose=None, **kwargs):
        """Trains and evaluates one trial.

        Args:
            trial: the ``keras_tuner`` trial.
            data: ``((x_train, y_train), (x_test, y_test))`` NumPy arrays (``bbits_tf.data.load_mnist``).
            validation_data: ``(x_val, y_val)``; ``None`` holds out ``validation_split`` of the training set.
            callbacks: extra Keras callbacks for the training.
            verbose: Keras Tuner's display verbosity, passed along by ``search`` (the training's verbosity is
                ``self.verbose``).

        Returns:
            dict of ``val_accuracy``, ``test_accuracy``, ``relative_bops``, ``expected_relative_bops``,
            ``wall_time_s``.
        """
        if kwargs:
            raise ValueError(f"Unknown arguments for `MuTuner.run_trial`. Received: {sorted(kwargs)}")
        keras.backend.clear_session()
        started = time.time()
        trial_dir = Path(self.get_trial_dir(trial.trial_id))
        with open(trial_dir / ATTEMPTS_FILE, "a") as log:
            log.write(f"{self.tuner_id} {os.getpid()} {started:.3f}\n")
        recipe = self.recipe_for(trial.hyperparameters)
        train, val, test = self._split(data, validation_data)
        verbose = self.verbose
        result = training.run(self.build_model, recipe, (train, val), method=self.method, seed=self.seed,
                              verbose=verbose, print_fn=print if verbose else None, callbacks=list(callbacks),
                              cost=self.cost)
        test_accuracy = result.model.evaluate(*test, batch_size=self.test_batch_size, verbose=0,
                                              return_dict=True)["accuracy"]
        metrics = {"val_accuracy": float(result.test_accuracy), "test_accuracy": float(test_accuracy),
                   "relative_bops": float(result.profile.relative_bops),
                   "expected_relative_bops": float(result.profile.expected_relative_bops),
                   "flash_bytes": float(result.profile.flash_bytes), "arena_bytes": float(result.profile.arena_bytes),
                   "wall_time_s": float(result.wall_time_s)}
        if self.cost_name == "latency":
            from bbits_tf import latency  # pylint: disable=import-outside-toplevel
            metrics["latency_us"] = float(latency.latency_us(result.model, self.cost))
        record = {"trial_id": trial.trial_id, "hyperparameters": dict(trial.hyperparameters.values), **metrics,
                  "trial_time_s": time.time() - started, "method": self.method, "seed": self.seed,
                  "recipe": recipe.to_dict(), "cost": self.cost_name, "train_images": len(train[0]), "val_images": len(val[0]),
                  "test_images": len(test[0]), "tuner_id": self.tuner_id, "pid": os.getpid(),
                  "started": started, "finished": time.time(),
                  "model_file": MODEL_FILE if self.save_models else None,
                  "layers": [vars(row) for row in result.profile.layers], "history": result.history}
        if self.save_models:
            save_h5(result.model, trial_dir / MODEL_FILE)
        write_json(trial_dir / RESULT_FILE, record)
        return metrics

    def save_model(self, trial_id, model, step=0):
        save_h5(model, Path(self.get_trial_dir(trial_id)) / MODEL_FILE)

    def load_model(self, trial):
        return load_trial_model(self.project_dir, trial.trial_id)

    def search(self, data, validation_data=None, callbacks=(), verbose=None):
        """Runs the trials that are left (all of them in a fresh project). In chief/worker mode, the chief serves
        the oracle until every trial has ended (``serve_oracle``); workers train.

        ``verbose`` sets Keras Tuner's trial display (default 1).
        """
        if verbose is not None and not self._is_worker():
            self.oracle.verbose = verbose
        if dist_utils.is_chief_oracle():
            self.save()
            serve_oracle(self.oracle)
            return
        super().search(data, validation_data=validation_data, callbacks=callbacks)


def serve_oracle(oracle, ip=None, port=None, poll_seconds=0.5):
    """Serves ``oracle`` to worker tuners over gRPC until the search is over (Keras Tuner's chief).

    Keras Tuner's own chief loop checks for the end every 20 s; this one every ``poll_seconds``. ``ip`` and
    ``port`` default to ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT``.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    ip = ip or os.environ["KERASTUNER_ORACLE_IP"]
    port = port or os.environ["KERASTUNER_ORACLE_PORT"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"{ip}:{port}"):
        raise ValueError(f"Cannot serve the oracle on this address. Received: ip={ip!r}, port={port!r}")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Results as data


def _project_dir(tuner_or_dir):
    return Path(tuner_or_dir.project_dir if isinstance(tuner_or_dir, base_tuner.BaseTuner) else tuner_or_dir)


def _trial_dirs(project_dir):
    return sorted((p for p in project_dir.glob("trial_*") if p.is_dir()), key=lambda p: int(p.name[6:]))


def trials_table(tuner_or_dir):
    """Every trial of a sweep as a JSON-ready dict, in trial order.

    Args:
        tuner_or_dir: a ``MuTuner`` or its project folder (``directory/project_name``).

    Returns:
        ``[{"trial_id", "status", "mu", ... (the trial's values), "val_accuracy", "test_accuracy",
        "relative_bops", "expected_relative_bops", "wall_time_s", "tuner_id", "attempts", "model_file"}]``
        (``attempts``: how many times the trial was started, e.g. 2 after a resume); metrics are
        ``None`` for a trial without results (running, interrupted or failed).
    """
    project_dir = _project_dir(tuner_or_dir)
    if not project_dir.is_dir():
        raise ValueError(f"No sweep project folder here. Received: tuner_or_dir={str(project_dir)!r}")
    rows = []
    for trial_dir in _trial_dirs(project_dir):
        state = json.loads((trial_dir / "trial.json").read_text()) if (trial_dir / "trial.json").exists() else {}
        result = json.loads((trial_dir / RESULT_FILE).read_text()) if (trial_dir / RESULT_FILE).exists() else {}
        values = state.get("hyperparameters", {}).get("values", result.get("hyperparameters", {}))
        row = {"trial_id": state.get("trial_id", trial_dir.name[6:]), "status": state.get("status", "UNKNOWN")}
        row.update(values)
        completed = row["status"] == "COMPLETED" and result
        row.update({key: result.get(key) if completed else None for key in TABLE_KEYS})
        model_file = result.get("model_file") if completed else None
        row["tuner_id"] = result.get("tuner_id")
        attempts = trial_dir / ATTEMPTS_FILE
        row["attempts"] = len(attempts.read_text().splitlines()) if attempts.exists() else 0
        row["model_file"] = f"{trial_dir.name}/{model_file}" if model_file else None
        rows.append(row)
    return rows


def _coordinates(point, accuracy_key, bops_key):
    if isinstance(point, Mapping):
        accuracy, bops = point.get(accuracy_key), point.get(bops_key)
    else:
        accuracy, bops = point[0], point[1]
    try:
        accuracy, bops = float(accuracy), float(bops)
    except (TypeError, ValueError):
        return None
    return (accuracy, bops) if math.isfinite(accuracy) and math.isfinite(bops) else None


def pareto_front(points, accuracy_key="test_accuracy", bops_key="relative_bops"):
    """The points that no other point dominates (at least as accurate and at most as many BOPs, one strictly).

    Args:
        points: dicts (``trials_table`` rows) or ``(accuracy, relative_bops)`` pairs. Points without finite
            values (unfinished trials) are ignored.
        accuracy_key, bops_key: the dict keys to compare.

    Returns:
        The non-dominated points themselves, by increasing BOPs (then decreasing accuracy, then input order).
        Exact duplicates are all kept: neither dominates the other.
    """
    coords = [(i, p, _coordinates(p, accuracy_key, bops_key)) for i, p in enumerate(points)]
    coords = [(i, p, c) for i, p, c in coords if c is not None]

    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    front = [(i, p, c) for i, p, c in coords if not any(dominates(other, c) for _, _, other in coords)]
    front.sort(key=lambda item: (item[2][1], -item[2][0], item[0]))
    return [p for _, p, _ in front]


def best_trial(trials, max_relative_bops=None, min_accuracy=None, accuracy_key="val_accuracy",
               bops_key="relative_bops"):
    """Picks a trial: the most accurate one within ``max_relative_bops``, or, with only ``min_accuracy``,
    the one with the fewest BOPs that reaches it; with neither, the most accurate one.

    Ties go to the fewer BOPs (then the higher accuracy). Choose on validation accuracy (the default), report
    test accuracy.

    Raises:
        ValueError: no finished trial meets the limits.
    """
    rows = [(t, c) for t in trials if (c := _coordinates(t, accuracy_key, bops_key)) is not None]
    feasible = [(t, c) for t, c in rows if (max_relative_bops is None or c[1] <= max_relative_bops)
                and (min_accuracy is None or c[0] >= min_accuracy)]
    if not feasible:
        raise ValueError(
            f"No finished trial meets the limits ({len(rows)} finished). "
            f"Received: max_relative_bops={max_relative_bops}, min_accuracy={min_accuracy}"
        )
    if max_relative_bops is None and min_accuracy is not None:
        return min(feasible, key=lambda tc: (tc[1][1], -tc[1][0]))[0]
    return min(feasible, key=lambda tc: (-tc[1][0], tc[1][1]))[0]


def load_trial_model(tuner_dir, trial_id, compile=False):
    """Loads the ``model.h5`` of trial ``trial_id`` (``"3"``, ``3`` or a ``trials_table`` row) of the project
    folder ``tuner_dir``, inside ``bbits_tf.quantize_scope()``."""
    project_dir = _project_dir(tuner_dir)
    if isinstance(trial_id, Mapping):
        trial_id = trial_id["trial_id"]
    matches = [d for d in _trial_dirs(project_dir) if d.name[6:] == str(trial_id)
               or (str(trial_id).isdigit() and int(d.name[6:]) == int(trial_id))]
    if not matches or not (matches[0] / MODEL_FILE).exists():
        raise ValueError(f"No saved model for this trial in {str(project_dir)!r}. Received: trial_id={trial_id!r}")
    with quantize_scope():
        return keras.models.load_model(matches[0] / MODEL_FILE, compile=compile)


def read_baselines(runs_dir="runs"):
    """Fixed-bit baselines (``training.BASELINES``) from ``runs_dir/*/results.json`` (``examples/mnist.py``)."""
    found = []
    for path in sorted(Path(runs_dir).glob("*/results.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("method") not in training.BASELINES:
            continue
        settings = result.get("settings", {})
        found.append({"label": path.parent.name, "method": result["method"],
                      "test_accuracy": result.get("test_accuracy"), "relative_bops": result.get("relative_bops"),
                      "epochs": result.get("epochs"), "train_images": settings.get("train_images"),
                      "path": str(path)})
    return found


_UNITS = {"relative_bops": "%", "flash_bytes": " B", "arena_bytes": " B", "latency_us": " us"}
AXIS_NAMES = {"relative_bops": "relative BOPs (% of FP32)", "flash_bytes": "predicted .tflite bytes (bbits_tf.flash)",
              "arena_bytes": "predicted TFLite Micro arena bytes (bbits_tf.arena)",
              "latency_us": "predicted LiteRT latency, us (bbits_tf.latency)"}


def plot_pareto(trials, path, front=None, baselines=(), extra_points=(), accuracy_key="test_accuracy",
                bops_key="relative_bops", title=None):
    """Accuracy (y, percent) against relative BOPs (x, log scale): every trial, the front as a line, and the
    ``baselines`` (``read_baselines`` rows) and ``extra_points`` (dicts with ``label``, ``accuracy_key``,
    ``bops_key``) as labelled markers. Writes a PNG (matplotlib's object API: the user's backend is left alone)."""
    from matplotlib.figure import Figure

    front = pareto_front(trials, accuracy_key, bops_key) if front is None else front
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    done = [(t, c) for t in trials if (c := _coordinates(t, accuracy_key, bops_key)) is not None]
    ax.scatter([c[1] for _, c in done], [100 * c[0] for _, c in done], color="tab:blue", alpha=0.6,
               label="trials (mu sweep)", zorder=3)
    for i, (t, c) in enumerate(sorted(done, key=lambda tc: tc[1][1])):
        if "mu" in t:  # labels alternate below and above the points, so that neighbours do not collide
            ax.annotate(f"mu={t['mu']:.2g}", (c[1], 100 * c[0]), fontsize=7, xytext=(3, -10 if i % 2 else 4),
                        textcoords="offset points")
    fc = [_coordinates(p, accuracy_key, bops_key) for p in front]
    ax.plot([c[1] for c in fc], [100 * c[0] for c in fc], "-", color="tab:blue", label="Pareto front")
    styles = iter(["s", "^", "v", "D", "P", "X", "<", ">"] * 4)
    for point in list(baselines) + list(extra_points):
        c = _coordinates(point, accuracy_key, bops_key)
        if c is None:
            continue
        marker = point.get("marker") or next(styles)
        ax.scatter([c[1]], [100 * c[0]], marker=marker, s=50, zorder=4, color=point.get("color"),
                   label=f"{point.get('label', '?')} ({100 * c[0]:.2f}%, {c[1]:.3g}{_UNITS.get(bops_key, '')})")
    ax.set_xscale("log")
    x_name = AXIS_NAMES.get(bops_key, bops_key.replace("_", " "))
    ax.set_xlabel(f"{x_name} (log scale)")
    ax.set_ylabel(f"{accuracy_key.replace('_', ' ')} (%)")
    ax.set_title(title or f"accuracy against {x_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
