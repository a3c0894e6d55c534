"""The report of a Bayesian Bits export, as data: per-layer size accounting, verification, checks."""
import dataclasses
from typing import Dict, List, Optional

from .export import ExportReport
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
        if self.tflm_arena_bytes is not None:
            lines.append(f"TFLite Micro: arena {self.tflm_arena_bytes} B, max |TFLM - LiteRT| "
                         f"{self.tflm_max_lsb_diff:g} LSB over {self.tflm_samples} inputs")
        for name, how in self.wide_layers.items():
            lines.append(f"{name}: {how}")
        lines.append("checks: " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in self.checks.items()))
        lines.extend(f"  problem: {p}" for p in self.problems)
        return "\n".join(lines)
