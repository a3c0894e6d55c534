"""The report of a Bayesian Bits export, as data: per-layer size accounting, verification, checks."""
import dataclasses
from typing import Dict, List, Mapping, Optional

import numpy as np

from . import flatbuffer
from .export import ExportReport
from .int2 import pack_int2
from .plan import LayerPlan, signed_levels
from .verify import VerifyReport


@dataclasses.dataclass
class BbitsLayer:
    """One quantized layer: what Bayesian Bits learned beside what the .tflite file holds.

    Sizes: ``learned_weight_bytes = params * weight_bits / 8`` over the kept kernel entries (the cost of the
    learned bit width); ``stored_weight_bytes`` is the weight buffer in the file (INT4 packs two codes a byte, so a
    2-bit layer costs twice its learned size; a 16/32-bit layer is stored as INT8, *below* its learned size, because
    it was requantized). Biases: float32 in the bbits model, int32 in the file.
    """

    name: str
    op: str
    weight_bits: int  # learned
    weight_step: float
    act_bits: Optional[int]  # learned; None = float output (logits)
    act_step: Optional[float]
    act_signed: bool
    stored_weight_type: str  # INT4 / INT8 in the file
    stored_weight_bits: int
    act_carried_as: str  # how the output activation is carried in the file
    kept_out: int
    total_out: int
    kept_in: int
    total_in: int
    params: int  # kernel entries in the file
    distinct_codes: int
    max_codes: int  # 2^b - 1 for the learned b (<= 8); for 16/32 the stored 8-bit bound
    learned_weight_bytes: float
    stored_weight_bytes: int
    bias_params: int
    stored_bias_bytes: int
    exact: bool


@dataclasses.dataclass
class BbitsExportReport(ExportReport):
    """``ExportReport`` of a Bayesian Bits model plus the learned-vs-stored accounting, verification and checks.

    Attributes (beyond ``ExportReport``):
        bbits_layers: per quantized layer, learned bits and sizes beside the stored ones (``BbitsLayer``).
        plans: the LayerPlans as dicts (learned bits, steps, masks).
        verification: agreement of the file with the bbits model in inference mode (LiteRT, default delegates).
        tflm_arena_bytes: smallest TFLite Micro tensor arena that runs the model (None when TFLM was not run).
        tflm_max_lsb_diff: largest |TFLM - LiteRT builtin kernels| output difference, in output LSBs.
        tflm_samples: how many inputs TFLM ran.
        c_source_path, c_header_path: the C array files written (None when not written).
        wide_layers: layers that learned 16 or 32 bits (weights or activations) and how the file carries them.
        checks: check name -> passed.
        problems: why a check failed (empty when all passed).
        int4: the layers whose weights are stored as INT4 (the others' <= 4-bit grids sit in INT8, e.g. for the Edge
            TPU).
        bias_offsets: per layer, the largest |file int32 bias - model inference bias| in output steps
            (``verify.bias_offsets``); ~0 where the file holds the model's bias grid.
        lsb_diffs: ``{kernel kind: {layer: {"local": {d: count}, "end_to_end": {d: count}}}}``: histograms of the
            file's output code minus the bbits model's value on the same grid, per element of each layer's output,
            with LiteRT's default delegate ("xnnpack"; ops it does not take run on the builtin kernels) and with
            the builtin kernels only ("builtin", as TFLite Micro). "local": the model's layer fed the input the
            file's op saw; "end_to_end": both run on the same model inputs (see ``verify.lsb_histograms``).
    """

    bbits_layers: List[BbitsLayer] = dataclasses.field(default_factory=list)
    plans: Dict[str, dict] = dataclasses.field(default_factory=dict)
    verification: Optional[VerifyReport] = None
    tflm_arena_bytes: Optional[int] = None
    tflm_max_lsb_diff: Optional[float] = None
    tflm_samples: int = 0
    c_source_path: Optional[str] = None
    c_header_path: Optional[str] = None
    wide_layers: Dict[str, str] = dataclasses.field(default_factory=dict)
    checks: Dict[str, bool] = dataclasses.field(default_factory=dict)
    problems: List[str] = dataclasses.field(default_factory=list)
    int4: List[str] = dataclasses.field(default_factory=list)
    lsb_diffs: Dict[str, Dict[str, Dict[str, Dict[int, int]]]] = dataclasses.field(default_factory=dict)
    bias_offsets: Dict[str, float] = dataclasses.field(default_factory=dict)
    edgetpu: Optional[dict] = None  # tflite_export.edgetpu.edgetpu_check(file).to_dict(): Coral's static rules
    # bbits_tf.flash / bbits_tf.arena's predictions from the gates beside the file's bytes and TFLM's arena:
    # {"flash_bytes", "file_bytes", "flash_error", "arena_bytes", "tflm_arena_bytes", "arena_error"} (errors relative)
    predicted: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)

    @property
    def learned_weight_bytes(self) -> float:
        return float(sum(layer.learned_weight_bytes for layer in self.bbits_layers))

    @property
    def stored_weight_bytes(self) -> int:
        return int(sum(layer.stored_weight_bytes for layer in self.bbits_layers))

    @property
    def stored_bias_bytes(self) -> int:
        return int(sum(layer.stored_bias_bytes for layer in self.bbits_layers))

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> Dict:
        d = super().to_dict()
        d["stored_bias_bytes"] = self.stored_bias_bytes
        d["other_bytes"] = self.file_bytes - self.stored_weight_bytes - self.stored_bias_bytes
        d["passed"] = self.passed
        return d

    def format_lsb_diffs(self) -> List[str]:
        """The LSB histograms as text lines: per layer and kernel kind, count per difference (local | end to end)."""
        if not self.lsb_diffs:
            return []
        lines = ["LSB differences, file - bbits model, per output element (local: the layer fed the file's own "
                 "input | end to end):"]
        for kind, layers in self.lsb_diffs.items():
            for name, views in layers.items():
                local, e2e = (_hist_text(views[k]) for k in ("local", "end_to_end"))
                lines.append(f"  {name:<12}{kind:<9}{local} | {e2e}")
        return lines

    def format(self) -> str:
        """The size accounting and checks as a text table."""
        head = (f"{'layer':<12}{'op':<18}{'w bits':>7}{'stored':>7}{'a bits':>7}{'channels':>10}{'params':>9}"
                f"{'distinct':>10}{'learned B':>11}{'stored B':>10}{'bias B':>8}")
        lines = [head, "-" * len(head)]
        for r in self.bbits_layers:
            a = "float" if r.act_bits is None else str(r.act_bits)
            lines.append(f"{r.name:<12}{r.op:<18}{r.weight_bits:>7}{r.stored_weight_type:>7}{a:>7}"
                         f"{f'{r.kept_out}/{r.total_out}':>10}{r.params:>9}{f'{r.distinct_codes}/{r.max_codes}':>10}"
                         f"{r.learned_weight_bytes:>11.1f}{r.stored_weight_bytes:>10}{r.stored_bias_bytes:>8}")
        lines.append("-" * len(head))
        other = self.file_bytes - self.stored_weight_bytes - self.stored_bias_bytes
        lines.append(f"weights: learned {self.learned_weight_bytes:.1f} B, stored {self.stored_weight_bytes} B; "
                     f"biases {self.stored_bias_bytes} B; graph and metadata {other} B; file {self.file_bytes} B "
                     f"(io={self.io}, weights {'/'.join(sorted({r.stored_weight_type for r in self.bbits_layers}))})")
        v = self.verification
        if v is not None:
            acc = ""
            if v.accuracy_tflite is not None:
                acc = (f", accuracy tflite {100 * v.accuracy_tflite:.2f}% vs bbits keras "
                       f"{100 * v.accuracy_keras:.2f}%")
            lines.append(f"verification on {v.n} inputs: top-1 agreement {100 * v.top1_agreement:.2f}%{acc}")
            if v.top1_agreement_on_grid is not None:
                lines.append(f"  against the model's output on the file's int8 output grid: "
                             f"{100 * v.top1_agreement_on_grid:.2f}%; {v.grid_ties} input(s) tie on that grid "
                             f"(two classes at the top code: the int8 output cannot separate them)")
        lines.extend(self.format_lsb_diffs())
        if self.tflm_arena_bytes is not None:
            lines.append(f"TFLite Micro: arena {self.tflm_arena_bytes} B, max |TFLM - LiteRT| "
                         f"{self.tflm_max_lsb_diff:g} LSB over {self.tflm_samples} inputs")
        for name, how in self.wide_layers.items():
            lines.append(f"{name}: {how}")
        p = self.predicted
        if p:
            line = (f"predicted from the gates (bbits_tf.flash/arena): file {p['flash_bytes']:,.0f} B "
                    f"({100 * p['flash_error']:+.2f}% of {p['file_bytes']:,} B)")
            if p.get("arena_error") is not None:
                line += (f", TFLM arena {p['arena_bytes']:,.0f} B ({100 * p['arena_error']:+.2f}% of "
                         f"{p['tflm_arena_bytes']:,} B)")
            if p.get("latency_error") is not None:
                line += (f", LiteRT {p['latency_us']:.1f} us ({100 * p['latency_error']:+.1f}% of "
                         f"{p['measured_latency_us']:.1f} us measured)")
            lines.append(line)
        lines.append("checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in self.checks.items()))
        lines.extend(f"  problem: {p}" for p in self.problems)
        if self.edgetpu is not None:
            tpu = self.edgetpu
            kinds = sorted({p["check"] for p in tpu["problems"]})
            lines.append(f"Edge TPU static check: {'passed' if tpu['passed'] else 'failed (' + ', '.join(kinds) + ')'}"
                         " (io='int8', int4=False, batch_size=1 for Coral; edgetpu_compiler was not run)")
        return "\n".join(lines)


def _hist_text(hist: Dict[int, int]) -> str:
    """``{-1: 3, 0: 99990, 1: 7}`` -> "exact 99.990%, +1: 7, -1: 3"; beyond +-1 only the share and the largest."""
    total = sum(hist.values())
    if not total:
        return "-"
    parts = [f"exact {100 * hist.get(0, 0) / total:.3f}%"]
    parts += [f"{d:+d}: {hist[d]}" for d in (1, -1) if hist.get(d)]
    beyond = sum(c for d, c in hist.items() if abs(d) > 1)
    if beyond:
        parts.append(f"|d|>1: {100 * beyond / total:.3f}% (max {max(abs(d) for d in hist)})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- building

def _bias_tensors(tflite_bytes: bytes, names) -> Dict[str, Optional[flatbuffer.TensorInfo]]:
    flat = flatbuffer.read(tflite_bytes)
    out = {}
    for op, w, b, o in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, o.name], list(names))
        if name is not None:
            out[name] = b
    return out


def layer_rows(report: ExportReport, plans: Mapping[str, LayerPlan], int4: frozenset, int2: frozenset,
               in_channels: Mapping[str, int]):
    """Per planned layer: learned bits and sizes beside the stored ones (``BbitsLayer``), and what does not match."""
    biases = _bias_tensors(report.model_bytes, list(plans))
    rows, problems = [], []
    for layer in report.layers:
        plan = plans[layer.name]
        stored_bits = flatbuffer.BITS.get(layer.weight_type, 0)
        max_codes = 2 ** min(plan.weight_bits, 8) - 1
        if layer.distinct_codes > max_codes:
            problems.append(f"{layer.name}: {layer.distinct_codes} distinct weight values > 2^{plan.weight_bits} - 1")
        want = "INT4" if layer.name in int4 else "INT8"
        if layer.name in int2:
            want = "INT2"
        if layer.weight_type != want:
            problems.append(f"{layer.name}: {plan.weight_bits}-bit weights stored as {layer.weight_type}, "
                            f"expected {want}")
        lay = report.prune.layers.get(layer.name)
        kept_in = lay.kept_in if lay is not None else in_channels[layer.name]
        total_in = lay.total_in if lay is not None else in_channels[layer.name]
        want_out = layer.total_out if plan.out_mask is None else int(plan.out_mask.sum())
        if layer.op != "DEPTHWISE_CONV_2D" and layer.kept_out != want_out:
            problems.append(f"{layer.name}: {layer.kept_out} output channels in the file, the gates keep {want_out}")
        if plan.act_bits is None:
            carried = "int8 over the representative range (float in the bbits model)"
        elif plan.act_bits <= 8:
            carried = f"int8, scale = learned step, zero point {layer.act_zero_point} (exact {plan.act_bits}-bit grid)"
        else:
            carried = f"int8 over the learned range (requantized from {plan.act_bits} bits)"
        b = biases.get(layer.name)
        rows.append(BbitsLayer(
            name=layer.name, op=layer.op, weight_bits=plan.weight_bits, weight_step=plan.weight_step,
            act_bits=plan.act_bits, act_step=plan.act_step, act_signed=plan.act_signed,
            stored_weight_type=layer.weight_type, stored_weight_bits=stored_bits, act_carried_as=carried,
            kept_out=layer.kept_out, total_out=layer.total_out, kept_in=int(kept_in), total_in=int(total_in),
            params=layer.params, distinct_codes=layer.distinct_codes, max_codes=max_codes,
            learned_weight_bytes=layer.params * plan.weight_bits / 8, stored_weight_bytes=layer.stored_bytes,
            bias_params=0 if b is None else int(np.prod(b.shape)), stored_bias_bytes=0 if b is None else b.nbytes,
            exact=layer.exact))
    return rows, problems


def to_int2(report: ExportReport, names) -> None:
    """``pack_int2`` on the report's bytes, updating the report in place."""
    data, changed = pack_int2(report.model_bytes, names)
    if not changed:
        return
    flat = flatbuffer.read(data)
    tensors = {}
    for _, w, b, out in flatbuffer.weight_tensors(flat):
        name = flatbuffer.match_layer([w.name, out.name], list(changed))
        if name is not None:
            tensors[name] = (w, b)
    for layer in report.layers:
        if layer.name in changed:
            w, b = tensors[layer.name]
            layer.weight_type, layer.weight_scale, layer.stored_bytes = w.type, w.scale, w.nbytes
            layer.bias_scale = None if b is None else b.scale
            moved = (f"; the int32 bias moved to the 7x coarser grid input scale x {w.scale:g}"
                     if changed[layer.name]["bias_rescaled"] else "")
            report.notes.append(f"{layer.name}: 2-bit weights stored as INT2 (experimental; LiteRT builtin kernels "
                                f"only, not TFLite Micro){moved}")
    report.model_bytes, report.file_bytes = data, len(data)
    report.tensor_types = {}
    for t in flat.tensors:
        report.tensor_types[t.type] = report.tensor_types.get(t.type, 0) + 1


def predictions(qmodel, report, int4, latency_table=None) -> Dict[str, Optional[float]]:
    """``bbits_tf.flash`` / ``bbits_tf.arena``'s predictions beside the file's bytes and the measured TFLM arena
    (``BbitsExportReport.predicted``); they model an int8-io file with ``refine_inputs``. With a latency table
    (``profile_latency``), ``bbits_tf.latency``'s prediction beside the file's LiteRT latency, timed as the table
    was (its delegate and threads)."""
    from bbits_tf import arena, flash  # pylint: disable=import-outside-toplevel
    predicted = flash.flash_bytes(qmodel, int4=int4)
    found = {"flash_bytes": predicted, "file_bytes": report.file_bytes,
             "flash_error": predicted / report.file_bytes - 1.0,
             "arena_bytes": arena.arena_bytes(qmodel, int4=int4), "tflm_arena_bytes": report.tflm_arena_bytes,
             "arena_error": None}
    if report.tflm_arena_bytes:
        found["arena_error"] = found["arena_bytes"] / report.tflm_arena_bytes - 1.0
    if latency_table is not None:
        from bbits_tf import latency  # pylint: disable=import-outside-toplevel
        from .verify import time_file  # pylint: disable=import-outside-toplevel
        table = latency.LatencyTable(latency_table)
        found["latency_us"] = latency.latency_us(qmodel, table)
        found["measured_latency_us"] = time_file(report.model_bytes, runs=int(table.data.get("runs", 500)),
                                                 num_threads=int(table.data.get("num_threads", 1)),
                                                 delegates=table.data.get("delegates", "default"))
        found["latency_error"] = found["latency_us"] / found["measured_latency_us"] - 1.0
    return found


def wide_layers(plans: Mapping[str, LayerPlan]) -> Dict[str, str]:
    """Layers that learned 16 or 32 bits, and how the file carries them."""
    out = {}
    for name, plan in plans.items():
        parts = []
        if plan.weight_bits > 8:
            parts.append(f"{plan.weight_bits}-bit weights stored as INT8 over the same range")
        if plan.act_bits is not None and plan.act_bits > 8:
            parts.append(f"{plan.act_bits}-bit activations carried as int8 over the same range")
        if parts:
            out[name] = ("; ".join(parts) + " (not exact; TFLite's 16x8 mode would need int16 activations in the "
                         "whole model and is not used; nothing is kept float)")
    return out


def jsonable(value):
    """``value`` with NumPy arrays and scalars as plain lists and numbers (for ``json.dumps``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def off_grid_weights(plain, plans) -> Dict[str, int]:
    """Per layer, how many kernel entries of the bbits model in inference lie off the learned b-bit grid
    (beyond its top code ``2^(b-1) - 1`` or between levels): the file holds them rounded and clipped."""
    out = {}
    for name, plan in plans.items():
        if not plan.weight_exact:
            continue
        kernel = plain.get_layer(name).get_weights()[0].astype(np.float64)
        codes = kernel / plan.weight_step
        n = signed_levels(plan.weight_bits)
        bad = int(np.sum((np.abs(np.round(codes)) > n) | (np.abs(codes - np.round(codes)) > 1e-3)))
        if bad:
            out[name] = bad
    return out


# Largest |file bias - model bias| (output steps) that counts as the same bias: float32 rounding of the scales.
BIAS_TOLERANCE = 1e-3


def bias_check(report, plans, input_bits, packed, problems) -> bool:
    """Whether every layer whose int32 bias grid can hold the model's bias does (``report.bias_offsets`` within
    ``BIAS_TOLERANCE``); the others get a note saying why their grid is coarser: INT4 / INT2 weights (``packed``)
    at their learned scale, 16- or 32-bit weights or inputs carried at 8 bits, or the model input (no quantizer:
    the model keeps its float bias). ``input_bits``: layer -> bits of its input quantizer (None: none)."""
    ok = True
    for name, offset in sorted(report.bias_offsets.items()):
        if offset <= BIAS_TOLERANCE:
            continue
        bits = input_bits.get(name)
        why = ("INT4 / INT2 weights at their learned scale" if name in packed else
               f"{plans[name].weight_bits}-bit weights carried at 8 bits" if not plans[name].weight_exact else
               "its input is the model input, no input_range given to quantize_model" if bits is None else
               f"its {bits}-bit input carried at 8 bits" if bits > 8 else None)
        if why is None:
            ok = False
            problems.append(f"{name}: the file's int32 bias is up to {offset:.3g} output steps off the bias the model "
                            f"adds in inference")
        else:
            report.notes.append(f"{name}: int32 bias up to {offset:.3g} output steps off the model's ({why})")
    return ok
