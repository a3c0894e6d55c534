"""The exporter's input as plain data, and the grid math it implies (NumPy, no Keras).

A `LayerPlan` says, for one Conv2D / DepthwiseConv2D / Dense layer, which fixed grid its weights and its output
activation lie on after Bayesian Bits training, and which output channels survived the pruning gates. The grids
(BAYESIAN_BITS.md sections 1.2-1.4):

* weights, signed and symmetric: ``w = k * s_b`` with ``k`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (2^b - 1 levels, so
  2 bits is ternary);
* unsigned activations (after a ReLU): ``a = k * s_b`` with ``k`` in ``[0, 2^b - 1]`` (2^b levels);
* signed activations: the same symmetric grid as the weights.

Rounding is round-half-to-even (``np.round``), as ``torch.round`` and ``tf.round`` do.
"""
import dataclasses
from typing import Dict, Mapping, Optional

import numpy as np

WEIGHT_BITS = (2, 4, 8, 16, 32)
ACT_BITS = (2, 4, 8, 16, 32)
INT8_ACT_BITS = 8  # TFLite carries every activation as int8; wider learned activations are requantized


@dataclasses.dataclass
class LayerPlan:
    """The fixed grids and kept channels of one quantized layer, keyed by layer name in a plan dict.

    Attributes:
        weight_bits: 2, 4, 8, 16 or 32. Bit widths up to 8 are carried exactly (INT4 storage for <= 4 bits, INT8
            for 8); 16 and 32 bits are requantized to 8 bits over the same range (not exact; reported).
        weight_step: learned step ``s_b`` of the weight grid.
        act_bits: bits of the layer's output activation quantizer (applied after its activation function), or
            None for a float output (logits).
        act_step: learned step ``s_b`` of the activation grid, None when ``act_bits`` is None.
        act_signed: whether the activation grid is signed (symmetric) or unsigned (starts at zero).
        out_mask: bool per output channel, False = pruned. None keeps every channel.
    """

    weight_bits: int
    weight_step: float
    act_bits: Optional[int] = None
    act_step: Optional[float] = None
    act_signed: bool = False
    out_mask: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"`weight_bits` must be one of {WEIGHT_BITS}. Received: weight_bits={self.weight_bits}")
        if not (np.isfinite(self.weight_step) and self.weight_step > 0):
            raise ValueError(f"`weight_step` must be a positive number. Received: weight_step={self.weight_step}")
        if self.act_bits is not None:
            if self.act_bits not in ACT_BITS:
                raise ValueError(f"`act_bits` must be None or one of {ACT_BITS}. Received: act_bits={self.act_bits}")
            if self.act_step is None or not (np.isfinite(self.act_step) and self.act_step > 0):
                raise ValueError(f"`act_step` must be a positive number when act_bits is set. "
                                 f"Received: act_step={self.act_step}")
        if self.out_mask is not None:
            self.out_mask = np.asarray(self.out_mask, dtype=bool).reshape(-1)

    @property
    def weight_exact(self) -> bool:
        """Whether the TFLite weight tensor holds the learned grid exactly."""
        return self.weight_bits <= 8

    @property
    def act_exact(self) -> bool:
        """Whether the int8 TFLite activation tensor holds the learned activation grid exactly."""
        return self.act_bits is None or self.act_bits <= INT8_ACT_BITS

    def deployed(self) -> "LayerPlan":
        """The plan as int8 TFLite carries it: a grid wider than 8 bits becomes the 8-bit grid over its range."""
        w_bits, w_step = self.weight_bits, self.weight_step
        if w_bits > 8:
            w_bits, w_step = 8, signed_levels(w_bits) * w_step / signed_levels(8)
        a_bits, a_step = self.act_bits, self.act_step
        if a_bits is not None and a_bits > INT8_ACT_BITS:
            top = signed_levels if self.act_signed else unsigned_levels
            a_bits, a_step = 8, top(a_bits) * a_step / top(8)
        return dataclasses.replace(self, weight_bits=w_bits, weight_step=w_step, act_bits=a_bits, act_step=a_step)

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["out_mask"] = None if self.out_mask is None else self.out_mask.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerPlan":
        return cls(**d)


def signed_levels(bits: int) -> int:
    """Largest |k| of the signed symmetric grid: 2^(b-1) - 1 (1 for ternary 2-bit)."""
    return 2 ** (bits - 1) - 1


def unsigned_levels(bits: int) -> int:
    """Largest k of the unsigned grid: 2^b - 1."""
    return 2 ** bits - 1


def act_grid_limits(bits: int, signed: bool):
    """(k_min, k_max) of an activation grid."""
    if signed:
        return -signed_levels(bits), signed_levels(bits)
    return 0, unsigned_levels(bits)


def quantize_weight(w: np.ndarray, bits: int, step: float) -> np.ndarray:
    """Round ``w`` onto the signed symmetric grid ``k * step``, ``|k| <= 2^(b-1) - 1``."""
    n = signed_levels(bits)
    return (np.clip(np.round(np.asarray(w, np.float64) / step), -n, n) * step).astype(np.float32)


def quantize_activation(x: np.ndarray, bits: Optional[int], step: Optional[float], signed: bool) -> np.ndarray:
    """Clip and round ``x`` onto the activation grid (identity when ``bits`` is None)."""
    if bits is None:
        return np.asarray(x, np.float32)
    lo, hi = act_grid_limits(bits, signed)
    return (np.clip(np.round(np.asarray(x, np.float64) / step), lo, hi) * step).astype(np.float32)


def validate_plans(plans: Mapping[str, LayerPlan], layer_channels: Mapping[str, int]) -> None:
    """Check that every plan names a quantizable layer and that its mask fits the layer.

    Args:
        plans: layer name -> LayerPlan.
        layer_channels: layer name -> number of output channels, for every quantizable layer of the model.
    """
    for name, plan in plans.items():
        if not isinstance(plan, LayerPlan):
            raise TypeError(f"Plans must be LayerPlan instances. Received: plans[{name!r}]={plan!r}")
        if name not in layer_channels:
            raise ValueError(f"Plan for a layer that is not a Conv2D, DepthwiseConv2D or Dense layer of the model. "
                             f"Quantizable layers: {sorted(layer_channels)}. Received: {name!r}")
        if plan.out_mask is not None and plan.out_mask.shape != (layer_channels[name],):
            raise ValueError(f"`out_mask` of layer {name!r} must have one entry per output channel "
                             f"({layer_channels[name]}). Received: shape {plan.out_mask.shape}")
