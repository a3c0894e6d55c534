"""Collects ``runs/*/results.json`` (from ``examples/results_table.sh``) into one JSON and a Markdown table.

    python examples/summarize_runs.py [--runs runs] [--output results/mnist/summary.json]

Prints the Markdown table that the README shows: one row per run, plus the mean and spread (sample standard
deviation) of the runs whose name starts with ``fast-s`` (the default recipe over seeds).
"""
import argparse
import json
import os
import statistics
from pathlib import Path


def load_runs(folder):
    runs = {}
    for path in sorted(Path(folder).glob("*/results.json")):
        with open(path) as f:
            runs[path.parent.name] = json.load(f)
    return runs


def row(name, r):
    bits = "/".join(f"{layer['weight_bits']}" for layer in r["layers"])
    acts = "/".join("f" if layer["activation_bits"] >= 32 else f"{layer['activation_bits']}" for layer in r["layers"])
    kept = "/".join(f"{layer['kept_channels']}" for layer in r["layers"])
    command = r["settings"]["command_line"].split("examples/", 1)[-1]
    return (f"| {name} | {r['method']} | {100 * r['test_accuracy']:.2f} | {r['relative_bops']:.3f} | {r['epochs']} | "
            f"{r['wall_time_s'] / 60:.1f} | {bits} | {acts} | {kept} | `python examples/{command}` |")


def seed_stats(runs, prefix="fast-s"):
    chosen = [r for name, r in runs.items() if name.startswith(prefix)]
    if not chosen:
        return None
    acc = [100 * r["test_accuracy"] for r in chosen]
    bops = [r["relative_bops"] for r in chosen]
    spread = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return {"runs": len(chosen), "accuracy_mean": statistics.mean(acc), "accuracy_std": spread(acc),
            "relative_bops_mean": statistics.mean(bops), "relative_bops_std": spread(bops),
            "accuracy": acc, "relative_bops": bops}


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
    stats = seed_stats(runs)
    if stats:
        lines.append(f"\nfast recipe over {stats['runs']} seeds: {stats['accuracy_mean']:.2f} +- "
                     f"{stats['accuracy_std']:.2f} % test accuracy at {stats['relative_bops_mean']:.3f} +- "
                     f"{stats['relative_bops_std']:.3f} % relative BOPs")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    summary = {name: {k: r[k] for k in ("method", "test_accuracy", "relative_bops", "expected_relative_bops",
                                         "epochs", "wall_time_s", "layers", "settings", "history")}
               for name, r in runs.items()}
    with open(args.output, "w") as f:
        json.dump({"runs": summary, "fast_recipe_seeds": stats}, f, indent=1)
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
