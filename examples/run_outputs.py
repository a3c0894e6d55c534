"""What an ``examples/mnist.py`` run writes besides ``results.json``: the plots (matplotlib, Agg: relative BOPs and
accuracy per epoch, bit widths), the latency table, the deployment predictions.

Imported by ``examples/mnist.py`` (which re-exports them) and, through it, ``examples/summarize_runs.py``.
"""
import json
import math
from pathlib import Path

import bbits_tf


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_bops_accuracy(history, path, warmup_epochs=0):
    """Relative BOPs (log scale, left) and test accuracy (right) over the epochs."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax_bops = plt.subplots(figsize=(7, 4))
    if warmup_epochs:
        ax_bops.axvspan(0.5, warmup_epochs + 0.5, color="0.9", label="float warm-up")
    ax_bops.plot(epochs, [h.get("relative_bops", math.nan) for h in history], "o-", color="tab:blue",
                 label="relative BOPs (deterministic gates)")
    ax_bops.plot(epochs, [h.get("expected_relative_bops", math.nan) for h in history], "--", color="tab:blue",
                 alpha=0.6, label="expected relative BOPs")
    ax_bops.set_yscale("log")
    ticker = matplotlib_ticker()
    ax_bops.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax_bops.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax_bops.set_xlabel("epoch")
    ax_bops.set_ylabel("relative BOPs (% of FP32)", color="tab:blue")
    ax_acc = ax_bops.twinx()
    ax_acc.plot(epochs, [100 * h.get("test_accuracy", math.nan) for h in history], "s-", color="tab:red",
                label="test accuracy")
    ax_acc.set_ylabel("test accuracy (%)", color="tab:red")
    lines = ax_bops.get_legend_handles_labels()
    more = ax_acc.get_legend_handles_labels()
    ax_bops.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8, framealpha=0.9)
    last = history[-1]
    ax_bops.set_title(f"final: {100 * last.get('test_accuracy', math.nan):.2f}% at "
                      f"{last.get('relative_bops', math.nan):.3f}% relative BOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bit_widths(records, path, epoch_offset=0):
    """log2 of every quantizer's expected bit width over training (the paper's bit-width evolution figure)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(records[0]["log2_bits"]) if records else []
    x = [r["epoch"] + epoch_offset for r in records]
    for name in names:
        style = "-" if name.endswith("/weight") else "--"
        ax.plot(x, [r["log2_bits"][name] for r in records], style, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("log2(expected bit width)")
    ax.set_ylim(0.8, 5.2)
    ax.set_title("expected bit width per quantizer (solid: weights, dashed: activations)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_table(build, output_dir):
    """The LiteRT latency table of this run's model (``tflite_export.profile_latency``: every MAC layer at 1/8 ..
    8/8 of its channels, XNNPACK, one thread), read from ``latency_table.json`` in the output folder or measured
    and written there."""
    path = Path(output_dir) / "latency_table.json"
    if path.exists():
        return json.loads(path.read_text())
    import tflite_export  # lazy: heavy

    print("measuring the latency table (tflite_export.profile_latency) ...")
    table = tflite_export.profile_latency(build(), print_fn=print)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return table


def deployment_prediction(model, table=None):
    """Predicted flash (file bytes), TFLite Micro arena and, with a latency table, LiteRT latency of a Bayesian
    Bits model's export (None for other models)."""
    if not bbits_tf.bayesian_bits_quantizers(model):
        return None
    from bbits_tf import arena, costs, flash, latency  # pylint: disable=import-outside-toplevel
    found = {"cost": costs.model_cost(model), "flash_bytes": flash.flash_bytes(model),
             "arena_bytes": arena.arena_bytes(model)}
    if table is not None:
        found["latency_us"] = latency.latency_us(model, table)
    return found
