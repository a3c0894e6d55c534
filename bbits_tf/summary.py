"""Per-layer profile of a quantized model, as data; formatting and plotting are separate functions."""
import dataclasses
from typing import Optional

from bbits_tf import arena as arena_lib
from bbits_tf import bops as bops_lib
from bbits_tf import flash as flash_lib
from bbits_tf import latency as latency_lib


@dataclasses.dataclass
class LayerProfile:
    """One quantized layer at its deterministic (test-time) gates."""

    name: str
    layer_type: str
    weight_bits: int
    input_bits: int
    output_bits: int  # 32 = float output (the logits)
    kept_channels: int
    total_channels: int
    kept_inputs: int
    total_inputs: int
    macs: int
    bops: float
    expected_weight_bits: float
    expected_output_bits: float
    flash_bytes: Optional[float] = None  # its weights and biases in the exported file (``bbits_tf.flash``)
    arena_bytes: Optional[float] = None  # TFLM arena while its operator runs: live tensors + scratch (``arena``)
    latency_us: Optional[float] = None  # its LiteRT time from a latency table (``bbits_tf.latency``)


@dataclasses.dataclass
class ModelProfile:
    """Totals and per-layer rows of ``bbits_tf.summary``."""

    layers: list
    total_macs: int
    bops: float
    fp32_bops: float
    relative_bops: float  # percent, deterministic gates
    expected_relative_bops: float  # percent, gate probabilities
    flash_bytes: Optional[float] = None  # predicted bytes of the exported .tflite file (``bbits_tf.flash``)
    arena_bytes: Optional[float] = None  # predicted TFLite Micro arena (``bbits_tf.arena``)
    expected_flash_bytes: Optional[float] = None
    expected_arena_bytes: Optional[float] = None
    latency_us: Optional[float] = None  # predicted LiteRT latency with a latency table (``bbits_tf.latency``)
    expected_latency_us: Optional[float] = None

    def to_dict(self):
        return dataclasses.asdict(self)


def summary(model, print_fn=None, latency_table=None):
    """Profiles a quantized model; prints a table through ``print_fn`` (e.g. ``print``) when one is given.

    Besides the BOPs, each layer's bytes in the exported file and the TFLite Micro arena while its operator runs,
    and the predicted file and arena of the whole model (``bbits_tf.flash``, ``bbits_tf.arena``: an int8-io
    export with the exporter's defaults); with ``latency_table`` (``tflite_export.profile_latency``'s data; by
    default the one a model quantized with ``cost=table`` carries) each layer's and the model's LiteRT latency."""
    table = latency_table if latency_table is not None else getattr(model, "bbits_latency_table", None)
    exact = bops_lib.layer_bops(model)
    expected = bops_lib.layer_bops(model, expected=True)
    flash_rows = flash_lib.layer_flash(model, records=exact)
    plan = arena_lib.plan(model)
    op_bytes = {op.name: op.bytes for op in plan.operators}
    layer_us = {}
    if table is not None:
        layer_us = {r.name: r.us for r in latency_lib.layer_latency(model, table)}
    rows = [
        LayerProfile(
            name=r.name,
            layer_type=r.layer_type,
            weight_bits=int(r.weight_bits),
            input_bits=int(r.input_bits),
            output_bits=int(r.output_bits),
            kept_channels=int(round(r.kept_out)),
            total_channels=r.total_out,
            kept_inputs=int(round(r.kept_in)),
            total_inputs=r.total_in,
            macs=r.macs,
            bops=r.bops,
            expected_weight_bits=e.weight_bits,
            expected_output_bits=e.output_bits,
            flash_bytes=f.bytes,
            arena_bytes=op_bytes.get(r.layer.name),
            latency_us=layer_us.get(r.name),
        )
        for r, e, f in zip(exact, expected, flash_rows)
    ]
    total_macs = sum(r.macs for r in exact)
    fp32 = float(total_macs * bops_lib.FLOAT_BITS * bops_lib.FLOAT_BITS)
    profile = ModelProfile(
        layers=rows,
        total_macs=total_macs,
        bops=float(sum(r.bops for r in exact)),
        fp32_bops=fp32,
        relative_bops=100.0 * sum(r.bops for r in exact) / fp32,
        expected_relative_bops=100.0 * sum(r.bops for r in expected) / fp32,
        flash_bytes=flash_lib.flash_bytes(model),
        arena_bytes=plan.arena_bytes,
        expected_flash_bytes=flash_lib.flash_bytes(model, expected=True),
        expected_arena_bytes=arena_lib.arena_bytes(model, expected=True),
        latency_us=None if table is None else latency_lib.latency_us(model, table),
        expected_latency_us=None if table is None else latency_lib.latency_us(model, table, expected=True),
    )
    if print_fn is not None:
        print_fn(format_summary(profile))
    return profile


def format_summary(profile):
    """The profile as a text table."""
    name_w = max([16] + [len(r.name) + 1 for r in profile.layers])
    type_w = max([17] + [len(r.layer_type) + 2 for r in profile.layers])
    # Number columns as wide as their largest entry (VGG7's layers have 10^8 MACs and 10^11 BOPs) plus two spaces.
    macs_w = max([12] + [len(f"{r.macs:,}") + 2 for r in profile.layers])
    bops_w = max([14] + [len(f"{r.bops:,.0f}") + 2 for r in profile.layers])
    deploy = profile.flash_bytes is not None
    timed = profile.latency_us is not None
    flash_w = max([10] + [len(_bytes(r.flash_bytes)) + 2 for r in profile.layers])
    arena_w = max([10] + [len(_bytes(r.arena_bytes)) + 2 for r in profile.layers])
    header = (f"{'layer':<{name_w}}{'type':<{type_w}}{'w bits':>7}{'in bits':>8}{'out bits':>9}{'channels':>12}"
              f"{'MACs':>{macs_w}}{'BOPs':>{bops_w}}" + (f"{'flash B':>{flash_w}}{'arena B':>{arena_w}}" if deploy else "")
              + (f"{'us':>8}" if timed else ""))
    lines = [header, "-" * len(header)]
    for r in profile.layers:
        out_bits = "float" if r.output_bits >= 32 else str(r.output_bits)
        lines.append(
            f"{r.name:<{name_w}}{r.layer_type:<{type_w}}{r.weight_bits:>7}{r.input_bits:>8}{out_bits:>9}"
            f"{f'{r.kept_channels}/{r.total_channels}':>12}{r.macs:>{macs_w},}{r.bops:>{bops_w},.0f}"
            + (f"{_bytes(r.flash_bytes):>{flash_w}}{_bytes(r.arena_bytes):>{arena_w}}" if deploy else "")
            + (f"{r.latency_us:>8.1f}" if timed else "")
        )
    lines.append("-" * len(header))
    lines.append(
        f"total MACs {profile.total_macs:,}; BOPs {profile.bops:,.0f} = {profile.relative_bops:.3f}% of FP32 "
        f"(expected {profile.expected_relative_bops:.3f}%)"
    )
    if deploy:
        lines.append(
            f"predicted int8 .tflite {profile.flash_bytes:,.0f} B (expected {profile.expected_flash_bytes:,.0f} B), "
            f"TFLite Micro arena {profile.arena_bytes:,.0f} B (expected {profile.expected_arena_bytes:,.0f} B)"
            + (f", LiteRT {profile.latency_us:.1f} us (expected {profile.expected_latency_us:.1f} us; the layers'"
               f" column leaves out pooling and the interpreter)" if timed else "")
        )
    return "\n".join(lines)


def _bytes(value):
    return "" if value is None else f"{value:,.0f}"


def plot_summary(profile, path=None):
    """Bar charts of the per-layer bit widths and kept channels; saves a PNG to ``path`` if given."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no change of the user's backend

    names = [r.name for r in profile.layers]
    x = range(len(names))
    fig = Figure(figsize=(10, 3.6))
    ax_bits, ax_keep = fig.subplots(1, 2)
    ax_bits.bar([i - 0.2 for i in x], [r.weight_bits for r in profile.layers], width=0.4, label="weights")
    ax_bits.bar(
        [i + 0.2 for i in x],
        [r.output_bits if r.output_bits < 32 else 0 for r in profile.layers],
        width=0.4,
        label="output activations",
    )
    ax_bits.set_yscale("log", base=2)
    ax_bits.set_ylim(1, 48)  # bars start at 1 bit, so a 2-bit bar is visible
    ax_bits.set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    ax_bits.set_xticks(list(x), names)
    ax_bits.set_ylabel("bits")
    ax_bits.set_title(f"bit widths ({profile.relative_bops:.3f}% relative BOPs)")
    ax_bits.legend()
    ax_keep.bar(x, [100.0 * r.kept_channels / r.total_channels for r in profile.layers])
    for i, r in enumerate(profile.layers):
        ax_keep.text(i, 100.0 * r.kept_channels / r.total_channels, f"{r.kept_channels}/{r.total_channels}",
                     ha="center", va="bottom", fontsize=8)
    ax_keep.set_xticks(list(x), names)
    ax_keep.set_ylabel("kept output channels (%)")
    ax_keep.set_ylim(0, 110)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
