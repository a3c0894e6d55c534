"""Sweep mu on MNIST / LeNet5 with Keras Tuner: every trial, the Pareto front, and one run to a BOP budget.

    python examples/sweep_mnist.py                       # small default: 6 trials, 2 epochs, 10k training images
    python examples/sweep_mnist.py --budget 0.5 1.0      # also one BopsBudget run to each relative BOPs (%)
    python examples/sweep_mnist.py --cost flash          # the prior charges the .tflite bytes (bbits_tf.costs)
    python examples/sweep_mnist.py --cost latency        # ... LiteRT latency (a table is measured first)
    python examples/sweep_mnist.py --trials 12 --epochs 15 --warmup-epochs 1 --train-limit 55000 \\
        --batch-size 128 --gate-lr 1e-2 --directory runs/sweep-full  # full-size sweep (the "fast" recipe)

The sweep resumes from ``--directory`` (finished trials are kept; ``--overwrite`` starts afresh). Parallel trials
(Keras Tuner chief/worker mode): run the same command once with ``KERASTUNER_TUNER_ID=chief`` and once per worker
with ``KERASTUNER_TUNER_ID=worker0``, ``worker1``..., all with ``KERASTUNER_ORACLE_IP=127.0.0.1`` and
``KERASTUNER_ORACLE_PORT=<port>``; the chief collects the results and writes the reports.

Writes to ``--directory`` (default ``runs/sweep``): the Keras Tuner project ``<project>/trial_*/`` (``trial.json``,
``result.json``, ``model.h5``), ``trials.json`` (all trials), ``pareto.json`` (the front, on test accuracy),
``pareto.png`` (with the fixed-bit baselines from ``runs/*/results.json`` when present), ``pareto_flash.png`` and
``pareto_arena.png`` (accuracy against the predicted file bytes and TFLite Micro arena; ``pareto_latency.png``
with ``--cost latency``) and, with ``--budget``,
``budget_<target>/`` and ``budget.json`` (each budget run against the sweep: accuracy at the same BOPs, compute).
"""
import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import bbits_tf  # noqa: E402
from bbits_tf import data as data_lib  # noqa: E402
from bbits_tf import models, training, tuning  # noqa: E402
from bbits_tf._keras import keras  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="number of trials (values of mu)")
    parser.add_argument("--cost", choices=("bops", "flash", "arena", "latency"), default="bops",
                        help="what the prior charges (bbits_tf.costs; latency: a table measured first with "
                             "tflite_export.profile_latency, saved as latency_table.json); a deployment cost trains "
                             "2/4/8-bit chains")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial, float warm-up included")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="float epochs before quantizing")
    parser.add_argument("--train-limit", type=int, default=10000, help="train on the first N training images")
    parser.add_argument("--val-size", type=int, default=5000,
                        help="validation images, taken from the training images after the first N (or held out "
                             "from them when fewer are left)")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images only (default: all)")
    parser.add_argument("--recipe", choices=sorted(training.RECIPES), default="fast", help="base recipe")
    parser.add_argument("--decay-groups", default="weights",
                        help="comma-separated groups whose learning rate decays (default: weights only, as in the "
                             "paper; empty: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--gate-lr", type=float, default=3e-2, help="gate learning rate (unless tuned)")
    parser.add_argument("--mu-min", type=float, default=1e-3, help="smallest mu")
    parser.add_argument("--mu-max", type=float, default=1.0, help="largest mu")
    parser.add_argument("--tune-gate-lr", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="also tune the gate learning rate in [MIN, MAX] (log scale; use --oracle random)")
    parser.add_argument("--tune-init-log-alpha", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="also tune the magnitude of the initial gate log_alpha (use --oracle random)")
    parser.add_argument("--oracle", choices=("grid", "random"), default="grid",
                        help="grid: mu evenly spaced on a log scale; random: random search over the space")
    parser.add_argument("--model", choices=("lenet5", "tiny"), default="lenet5",
                        help="lenet5, or a tiny CNN for smoke tests")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the same for every trial)")
    parser.add_argument("--directory", default="runs/sweep", help="output folder")
    parser.add_argument("--project-name", default="mnist_mu", help="Keras Tuner project name")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    parser.add_argument("--budget", type=float, nargs="+",
                        help="also train once with BopsBudget to each of these relative BOPs (%%)")
    parser.add_argument("--budget-guard", action=argparse.BooleanOptionalAction, default=True,
                        help="BopsBudget: undo an undershoot of the target and freeze the gates there")
    parser.add_argument("--budget-every", type=int, default=5, help="BopsBudget: steps between mu updates")
    parser.add_argument("--budget-signal", choices=("expected", "deterministic", "projected"), default="expected",
                        help="BopsBudget: which relative BOPs the controller follows")
    parser.add_argument("--budget-horizon", type=int, default=50,
                        help="BopsBudget: look-ahead of the projected signal, in steps")
    parser.add_argument("--budget-freeze-band", type=float, default=0.05,
                        help="BopsBudget: freeze the gates after the ramp once within this fraction of the target "
                             "(0: never)")
    parser.add_argument("--budget-initial-mu", type=float, help="BopsBudget: mu at the start (default: the recipe's)")
    parser.add_argument("--budget-gains", type=float, nargs=2, metavar=("KP", "KI"), default=(0.5, 0.05),
                        help="BopsBudget: gains on the log error and on its sum")
    parser.add_argument("--baselines-dir", default="runs", help="where examples/mnist.py wrote the baselines")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0, help="Keras fit verbosity in trials")
    return parser.parse_args(argv)


def tiny_cnn(input_shape=(28, 28, 1), num_classes=10):
    """A small CNN (8C5-MP4-10) for smoke tests: seconds per trial."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        keras.layers.Conv2D(8, 5, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(4, name="pool1"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(num_classes, name="fc1"),
    ], name="tiny_cnn")


def make_recipe(args):
    return training.get_recipe(args.recipe, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                               batch_size=args.batch_size, lr_gates=args.gate_lr,
                               decay_groups=tuple(args.decay_groups.split(",")) if args.decay_groups else None)


def load_data(args):
    """``(train, validation, test)`` as ``(x, y)`` pairs."""
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist()
    n = min(args.train_limit, len(x_train))
    if n + args.val_size <= len(x_train):
        val = (x_train[n:n + args.val_size], y_train[n:n + args.val_size])
        train = (x_train[:n], y_train[:n])
    else:
        n_val = min(args.val_size, n // 2)
        val = (x_train[n - n_val:n], y_train[n - n_val:n])
        train = (x_train[:n - n_val], y_train[:n - n_val])
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    return train, val, (x_test, y_test)


def settings(args, recipe, train, val, test):
    return {"command_line": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "args": vars(args),
            "recipe": recipe.to_dict(), "train_images": len(train[0]), "val_images": len(val[0]),
            "test_images": len(test[0]), "tensorflow": tf.__version__, "bbits_tf": bbits_tf.__version__,
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"}


def interpolate_front(front, relative_bops, key="test_accuracy"):
    """Accuracy of the front at ``relative_bops``, linear in log BOPs between its neighbours (None outside)."""
    pts = sorted((p["relative_bops"], p[key]) for p in front)
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
        if b0 <= relative_bops <= b1:
            t = 0.0 if b1 == b0 else (math.log(relative_bops) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return a0 + t * (a1 - a0)
    return pts[0][1] if len(pts) == 1 and math.isclose(pts[0][0], relative_bops) else None


def budget_run(args, target, recipe, build_model, train, val, test, rows, front, output, cost="bops"):
    """One training run with ``BopsBudget`` to ``target``, and its comparison with the sweep."""
    run_dir = output / f"budget_{target:g}"
    run_dir.mkdir(parents=True, exist_ok=True)
    keras.backend.clear_session()
    controller = tuning.BopsBudget(target, signal=args.budget_signal, every_n_steps=args.budget_every,
                                   horizon_steps=args.budget_horizon, kp=args.budget_gains[0],
                                   ki=args.budget_gains[1], initial_mu=args.budget_initial_mu,
                                   freeze_band=args.budget_freeze_band or None, guard=args.budget_guard,
                                   print_fn=print)
    previous = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    same = (previous.get("controller") == json.loads(json.dumps(controller.get_config()))
            and previous.get("recipe") == json.loads(json.dumps(recipe.to_dict())))
    if same and not args.overwrite:
        record = previous
        print(f"budget run: reusing {run_dir / 'result.json'}")
    else:
        result = training.run(build_model, recipe, (train, val), seed=args.seed, verbose=args.verbose,
                              print_fn=print if args.verbose else None, callbacks=[controller], cost=cost)
        test_accuracy = result.model.evaluate(*test, batch_size=1000, verbose=0, return_dict=True)["accuracy"]
        record = {"target_relative_bops": target, "val_accuracy": result.test_accuracy,
                  "test_accuracy": float(test_accuracy), "relative_bops": result.profile.relative_bops,
                  "expected_relative_bops": result.profile.expected_relative_bops,
                  "wall_time_s": result.wall_time_s, "final_mu": bbits_tf.get_mu(result.model),
                  "gates_frozen_at_step": controller.frozen_at_step,
                  "restored_gates": controller.restored_gates, "controller": controller.get_config(), "recipe": recipe.to_dict(),
                  "controller_history": controller.history, "history": result.history}
        tuning.save_h5(result.model, run_dir / "model.h5")
        tuning.write_json(run_dir / "result.json", record)
    bops = record["relative_bops"]
    done = [r for r in rows if r["test_accuracy"] is not None]
    sweep_time = sum(r["wall_time_s"] for r in done)
    near = min(done, key=lambda r: abs(math.log(r["relative_bops"] / bops))) if done else None
    within = [r for r in done if r["relative_bops"] <= 1.1 * target]
    at_same_bops = interpolate_front(front, bops) if front else None
    return {
        "target_relative_bops": target,
        "budget_run": {k: record[k] for k in ("test_accuracy", "val_accuracy", "relative_bops",
                                               "expected_relative_bops", "wall_time_s", "final_mu",
                                               "gates_frozen_at_step", "restored_gates") if k in record},
        "relative_error": bops / target - 1.0,
        "within_10_percent": abs(bops / target - 1.0) <= 0.1,
        "sweep": {
            "trials": len(done),
            "total_wall_time_s": sweep_time,
            "front_test_accuracy_at_budget_run_bops": at_same_bops,
            "budget_run_minus_front_test_accuracy": (record["test_accuracy"] - at_same_bops
                                                     if at_same_bops is not None else None),
            "nearest_trial": near,
            "best_trial_within_budget": (max(within, key=lambda r: (r["val_accuracy"], -r["relative_bops"]))
                                         if within else None),
        },
        "compute_ratio_sweep_over_budget_run": sweep_time / record["wall_time_s"] if done else None,
        "budget_run_dir": str(run_dir),
    }


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    recipe = make_recipe(args)
    output = Path(args.directory)
    output.mkdir(parents=True, exist_ok=True)
    train, val, test = load_data(args)
    build_model = models.lenet5 if args.model == "lenet5" else tiny_cnn
    print(f"MNIST: {len(train[0])} training, {len(val[0])} validation, {len(test[0])} test images; "
          f"{args.trials} trials of {recipe}")
    space = tuning.search_space(mu=(args.mu_min, args.mu_max), lr_gates=args.tune_gate_lr,
                                init_log_alpha=args.tune_init_log_alpha)
    cost = args.cost
    if cost == "latency":
        table_path = output / "latency_table.json"
        if not table_path.exists():
            import tflite_export  # pylint: disable=import-outside-toplevel  (heavy: only for this cost)
            table_path.write_text(json.dumps(tflite_export.profile_latency(build_model()), indent=1))
        cost = json.loads(table_path.read_text())
    tuner = tuning.MuTuner(build_model, recipe, max_trials=args.trials, hyperparameters=space, oracle=args.oracle,
                           seed=args.seed, verbose=args.verbose, directory=str(output),
                           project_name=args.project_name, overwrite=args.overwrite, cost=cost)
    tuner.search((train, test), validation_data=val)
    if tuning.is_worker():
        print(f"worker {tuner.tuner_id}: no trials left")
        return None

    rows = tuning.trials_table(tuner)
    front = tuning.pareto_front(rows)
    info = settings(args, recipe, train, val, test)
    tuning.write_json(output / "trials.json", {"trials": rows, "settings": info})
    tuning.write_json(output / "pareto.json", {"accuracy_key": "test_accuracy", "front": front, "settings": info})
    extra, budgets = [], []
    for target in args.budget or ():
        budgets.append(budget_run(args, target, recipe, build_model, train, val, test, rows, front, output, cost))
        tuning.write_json(output / "budget.json", {"budgets": budgets, "settings": info})
        extra.append({"label": f"BopsBudget run (target {target:g}%)", "marker": "*", "color": "tab:red",
                      **budgets[-1]["budget_run"]})
    baselines = tuning.read_baselines(args.baselines_dir)
    for b in baselines:
        b["label"] = f"{b['label']} ({b['epochs']} ep, {b['train_images']} imgs)"
    n_done = sum(r["test_accuracy"] is not None for r in rows)
    title = (f"MNIST {args.model}: {n_done} trials, {recipe.epochs} epochs, {len(train[0])} training images")
    tuning.plot_pareto(rows, output / "pareto.png", front=front, baselines=baselines, extra_points=extra,
                       title=title)
    for key, name in (("flash_bytes", "pareto_flash.png"), ("arena_bytes", "pareto_arena.png"),
                      ("latency_us", "pareto_latency.png")):
        if any(r.get(key) is not None for r in rows):  # trials of this version (older ones have no prediction)
            tuning.plot_pareto(rows, output / name, bops_key=key, title=f"{title}, cost {args.cost}")
    for r in rows:
        acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        bops = "-" if r["relative_bops"] is None else f"{r['relative_bops']:.3f}%"
        size = "" if r.get("flash_bytes") is None else f", file {r['flash_bytes']:,.0f} B, arena {r['arena_bytes']:,.0f} B"
        print(f"trial {r['trial_id']}: mu {r.get('mu', float('nan')):.4g} {r['status']} test {acc} BOPs {bops}{size}")
    for budget in budgets:
        run = budget["budget_run"]
        print(f"budget run: {run['relative_bops']:.3f}% BOPs (target {budget['target_relative_bops']:g}%, "
              f"{100 * budget['relative_error']:+.1f}%), test {100 * run['test_accuracy']:.2f}%, "
              f"{run['wall_time_s']:.0f} s; sweep {budget['sweep']['total_wall_time_s']:.0f} s")
    print(f"{len(rows)} trials, {len(front)} on the front; wrote {output}/trials.json, pareto.json, pareto.png"
          f"{', budget.json' if budgets else ''} in {time.time() - start:.0f} s")
    return {"trials": rows, "front": front, "budgets": budgets}


if __name__ == "__main__":
    main()
