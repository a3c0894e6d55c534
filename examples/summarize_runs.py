"""Collects ``runs/*/results.json`` (from ``examples/results_table.sh``) into one JSON and a Markdown table.

    python examples/summarize_runs.py [--runs runs] [--output results/mnist/summary.json]

Prints the Markdown table that the README shows: one row per run, plus the mean and spread (sample standard
deviation) of every group of runs named ``<group>-s<seed>`` (a recipe over seeds). A run still going (or
stopped) without ``results.json`` is shown from its ``progress.json`` (last completed epoch, marked partial).
"""
import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path


def load_runs(folder):
    runs = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        if (path / "results.json").exists():
            with open(path / "results.json") as f:
                runs[path.name] = json.load(f)
        elif (path / "progress.json").exists():
            runs[path.name] = partial_run(json.loads((path / "progress.json").read_text()))
    return runs


def partial_run(progress):
    """A results-like dict from ``progress.json`` of a run that has not finished (no per-layer rows)."""
    last = progress["epochs"][-1]
    args = progress["settings"]["args"]
    command = "python examples/mnist.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in args.items()
        if v is not None and k in ("recipe", "method", "output_dir", "seed", "mu", "decay_groups", "epochs"))
    return {"method": args["method"], "test_accuracy": last["test_accuracy"], "relative_bops": last["relative_bops"],
            "expected_relative_bops": last["expected_relative_bops"], "epochs": progress["settings"]["total_epochs"],
            "completed_epochs": progress["completed_epochs"], "wall_time_s": None, "layers": [],
            "settings": {"command_line": command, "args": args, "recipe": progress["settings"]["recipe"],
                         "environment": progress["settings"].get("environment")},
            "history": progress["epochs"]}


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bbits_tf.training import RECIPES  # noqa: E402  (today's recipes: what a row's command must add to)

# Recipe fields and the examples/mnist.py options that set them.
RECIPE_FLAGS = {"epochs": "--epochs", "warmup_epochs": "--warmup-epochs", "mu": "--mu", "batch_size": "--batch-size",
                "lr_weights": "--lr", "lr_ranges": "--range-lr", "lr_gates": "--gate-lr",
                "decay_groups": "--decay-groups"}


def command(r):
    """The run's command line, plus the options needed to reproduce its recipe under today's defaults."""
    line = "python examples/" + r["settings"]["command_line"].split("examples/", 1)[-1]
    recorded = r["settings"].get("recipe") or {}
    name = r["settings"].get("recipe_name") or (r["settings"].get("args") or {}).get("recipe") or "fast"
    if name not in RECIPES:
        return line
    today = RECIPES[name].to_dict()
    for field, flag in RECIPE_FLAGS.items():
        if field in recorded and list_or_value(recorded[field]) != list_or_value(today.get(field)) \
                and flag not in line.split():
            value = recorded[field]
            line += f" {flag} {','.join(value) if isinstance(value, (list, tuple)) else value}"
    args = r["settings"].get("args") or {}
    if r.get("method") == "bb" and args.get("budget_bops") is None and "--budget-bops" not in line.split():
        line += " --budget-bops 0"  # made with a fixed mu: today's default bb run lands on a budget
    return line


def list_or_value(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def row(name, r):
    bits = "/".join(f"{layer['weight_bits']}" for layer in r["layers"]) or "-"
    acts = "/".join("f" if layer["activation_bits"] >= 32 else f"{layer['activation_bits']}"
                    for layer in r["layers"]) or "-"
    kept = "/".join(f"{layer['kept_channels']}" for layer in r["layers"]) or "-"
    epochs = r["epochs"] if "completed_epochs" not in r else f"{r['completed_epochs']} of {r['epochs']} (partial)"
    wall = "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f}"
    return (f"| {name} | {r['method']} | {100 * r['test_accuracy']:.2f} | {r['relative_bops']:.3f} | {epochs} | "
            f"{wall} | {bits} | {acts} | {kept} | `{command(r)}` |")


def seed_groups(runs):
    """``{group: [run names]}`` for runs named ``<group>-s<seed>`` (finished runs only)."""
    groups = {}
    for name, r in runs.items():
        match = re.fullmatch(r"(.+)-s\d+", name)
        if match and "completed_epochs" not in r:
            groups.setdefault(match.group(1), []).append(name)
    return groups


def seed_stats(runs, prefix="fast-s"):
    chosen = [r for name, r in runs.items() if name.startswith(prefix) and "completed_epochs" not in r]
    if not chosen:
        return None
    acc = [100 * r["test_accuracy"] for r in chosen]
    bops = [r["relative_bops"] for r in chosen]
    spread = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return {"runs": len(chosen), "accuracy_mean": statistics.mean(acc), "accuracy_std": spread(acc),
            "relative_bops_mean": statistics.mean(bops), "relative_bops_std": spread(bops),
            "accuracy": acc, "relative_bops": bops}


def environments(runs):
    """``{description: [run names]}``: the versions, thread count and determinism each run recorded."""
    found = {}
    for name, r in runs.items():
        env = (r.get("settings") or {}).get("environment")
        if env is None:
            key = "not recorded (a run of older code)"
        else:
            versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
            op = env.get("fused_quantizer_op")
            fused = "off (a run from before the op)" if op is None else ("on" if op["enabled"] else "off")
            key = (f"threads {env['threads'] or 'all'}, deterministic {env['deterministic']}, {env['machine']}, "
                   f"fused quantizer op {fused}; {versions}")
        found.setdefault(key, []).append(name)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--output", default="results/mnist/summary.json")
    parser.add_argument("--plots", help="redraw this run's plots from its results.json next to --output")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    lines = ["| run | method | test acc. % | rel. BOPs % | epochs | wall min | weight bits | act. bits | kept channels "
             "| command |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(name, r) for name, r in runs.items()]
    groups = {group: seed_stats(runs, group + "-s") for group in seed_groups(runs)}
    lines.append("")
    for group, stats in groups.items():
        lines.append(f"{group} over {stats['runs']} seeds: {stats['accuracy_mean']:.2f} +- "
                     f"{stats['accuracy_std']:.2f} % test accuracy at {stats['relative_bops_mean']:.3f} +- "
                     f"{stats['relative_bops_std']:.3f} % relative BOPs")
    for env, names in environments(runs).items():
        lines.append(f"environment of {len(names)} run(s): {env}")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    summary = {name: {k: r[k] for k in ("method", "test_accuracy", "relative_bops", "expected_relative_bops",
                                         "epochs", "wall_time_s", "layers", "settings", "history", "completed_epochs")
                          if k in r}
               for name, r in runs.items()}
    with open(args.output, "w") as f:
        json.dump({"runs": summary, "seed_groups": groups}, f, indent=1)
    if args.plots:
        redraw(runs[args.plots], Path(args.output).parent)


def redraw(results, folder):
    """The example's plots of one run, from its results.json (no model needed)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import mnist  # examples/mnist.py

    import bbits_tf
    from bbits_tf.summary import LayerProfile, ModelProfile

    mnist.plot_bops_accuracy(results["history"], folder / "bops_accuracy.png", results["warmup_epochs"])
    if results.get("bit_width_history"):
        mnist.plot_bit_widths(results["bit_width_history"], folder / "bit_widths.png", results["warmup_epochs"])
    layers = [LayerProfile(name=r["name"], layer_type=r["type"], weight_bits=r["weight_bits"],
                           input_bits=r["input_bits"], output_bits=r["activation_bits"],
                           kept_channels=r["kept_channels"], total_channels=r["total_channels"],
                           kept_inputs=r["kept_inputs"], total_inputs=r["total_inputs"], macs=r["macs"],
                           bops=r["bops"], expected_weight_bits=r["expected_weight_bits"],
                           expected_output_bits=r["expected_activation_bits"]) for r in results["layers"]]
    profile = ModelProfile(layers=layers, total_macs=results["total_macs"], bops=sum(r.bops for r in layers),
                           fp32_bops=results["total_macs"] * 1024.0, relative_bops=results["relative_bops"],
                           expected_relative_bops=results["expected_relative_bops"])
    bbits_tf.plot_summary(profile, folder / "layers.png")


if __name__ == "__main__":
    main()
