"""Fixed-grid tfmot quantizers, the QuantizeConfig that places them, and a scheme that changes nothing else.

These are deployment quantizers: after Bayesian Bits training the grids are fixed, and these classes write them
into the graph as ``FakeQuantWithMinMaxVars`` ops that the TFLite converter turns into integer tensors.

How each grid reaches TFLite (checked on TF 2.21; tflite_export/README.md has the details):

* Weights, b <= 8 bits: ``fake_quant(w, -n*s, n*s, num_bits=b, narrow_range=True)`` with ``n = 2^(b-1) - 1`` has
  step exactly s. The converter stores b <= 4 as packed INT4 (2-bit as INT4 codes {-7, 0, 7} with scale s/7) and
  5..8 bits as INT8 with scale s.
* Activations, b <= 8 bits: TFLite activations are int8, so the b-bit grid ``k*s, k in [lo, hi]`` is carried with
  scale s and zero point ``127 - hi``: ``fake_quant(x, -(255 - hi)*s, hi*s, num_bits=8)``. The upper clip at
  ``hi*s`` is then int8 saturation and costs no op; the lower clip (0 or ``-hi*s``) is the layer's fused ReLU
  when it has one, else an explicit ``tf.maximum`` that the converter keeps as a MAXIMUM op on the same scale.
  (An explicit upper ``tf.minimum`` also works but costs a MINIMUM op per layer; ``tf.clip_by_value`` is worse: it
  stops the ReLU fusion and leaves a calibrated, lossy intermediate tensor.)
* 16 / 32 bits cannot be carried exactly: ``LayerPlan.deployed()`` maps them to the 8-bit grid over the same range
  before these quantizers see them. ``LayerPlan.weight_exact`` / ``act_exact`` say so and the export report too.
"""
import tensorflow as tf

from bbits_tf import configs
from bbits_tf._keras import keras, tfmot
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (  # noqa: E402
    model_transformer, transforms)

from .plan import LayerPlan, act_grid_limits, signed_levels

_Q = tfmot.quantization.keras
_PACKAGE = "tflite_export"
_NONNEGATIVE_ACTIVATIONS = configs.UNSIGNED_ACTIVATIONS  # the one list, bbits_tf.configs


def _register(cls):
    return keras.utils.register_keras_serializable(package=_PACKAGE)(cls)


class _EqualByConfig:
    """Equal when of the same class with the same ``get_config()`` (tfmot compares quantizers and configs)."""

    def __eq__(self, other):
        return isinstance(other, type(self)) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other


def _check_bits(bits):
    if not 2 <= bits <= 8:
        raise ValueError(f"Fixed-grid quantizers take 2..8 bits (use LayerPlan.deployed() for wider grids). "
                         f"Received: bits={bits}")


def weight_fake_quant_args(bits: int, step: float):
    """(min, max, num_bits) of the weight fake-quant op for a b-bit signed symmetric grid with step s."""
    _check_bits(bits)
    n = signed_levels(bits)
    return -n * step, n * step, bits


def act_fake_quant_args(bits: int, step: float, signed: bool):
    """(min, max, lower clip) of the 8-bit activation fake-quant op for a b-bit grid with step s."""
    _check_bits(bits)
    lo, hi = act_grid_limits(bits, signed)
    return -(255 - hi) * step, hi * step, lo * step


@_register
class FixedGridWeightQuantizer(_EqualByConfig, _Q.quantizers.Quantizer):
    """Weights onto the fixed signed grid ``k * step``, ``|k| <= 2^(b-1) - 1``.

    Forward: ``fake_quant_with_min_max_vars(w, -n*step, n*step, num_bits=b, narrow_range=True)``.
    Gradient: straight-through inside the range, zero outside (the fake-quant op's own gradient).

    Args:
        bits: 2..8.
        step: the learned step size s_b.
    """

    def __init__(self, bits: int, step: float):
        self.bits = int(bits)
        self.step = float(step)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        lo, hi, num_bits = weight_fake_quant_args(self.bits, self.step)
        return tf.quantization.fake_quant_with_min_max_vars(inputs, lo, hi, num_bits=num_bits, narrow_range=True)

    def get_config(self):
        return {"bits": self.bits, "step": self.step}


@_register
class FixedGridActivationQuantizer(_EqualByConfig, _Q.quantizers.Quantizer):
    """Activations onto the fixed grid ``k * step``, carried as int8 with scale ``step``.

    Forward: ``x = max(x, lo*step)`` (skipped when ``nonnegative_input`` and the grid is unsigned), then
    ``fake_quant_with_min_max_vars(x, -(255 - hi)*step, hi*step, num_bits=8)``, which rounds to the grid and clips at
    ``hi*step``. Gradient: straight-through inside the range, zero outside.

    Args:
        bits: 2..8.
        step: the learned step size s_b.
        signed: symmetric signed grid (``|k| <= 2^(b-1) - 1``) or unsigned (``0 <= k <= 2^b - 1``).
        nonnegative_input: the input is known to be >= 0 (a fused ReLU before it), so no lower clip op is needed.
    """

    def __init__(self, bits: int, step: float, signed: bool = False, nonnegative_input: bool = False):
        self.bits = int(bits)
        self.step = float(step)
        self.signed = bool(signed)
        self.nonnegative_input = bool(nonnegative_input)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        fq_min, fq_max, clip_lo = act_fake_quant_args(self.bits, self.step, self.signed)
        if not (self.nonnegative_input and clip_lo == 0):
            inputs = tf.maximum(inputs, clip_lo)
        return tf.quantization.fake_quant_with_min_max_vars(inputs, fq_min, fq_max, num_bits=8)

    def get_config(self):
        return {"bits": self.bits, "step": self.step, "signed": self.signed,
                "nonnegative_input": self.nonnegative_input}


@_register
class FixedRangeQuantizer(_Q.quantizers.Quantizer):
    """8 bits over a fixed range ``[lo, hi]`` (scale ``(hi - lo)/255``): the model input and float outputs (logits).

    TFLite full-integer ops need a range on their input and output; an op without one is re-quantized by the
    converter from calibration, weights included (per-channel INT8, off the learned grid). So the input and the
    float outputs get a fixed range too, taken from representative data.

    Forward: ``fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)`` (the op nudges the range so that 0 is a level).
    Gradient: straight-through inside the range.
    """

    def __init__(self, lo: float, hi: float):
        if not hi > lo:
            raise ValueError(f"The input range must have hi > lo. Received: lo={lo}, hi={hi}")
        self.lo = float(lo)
        self.hi = float(hi)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return tf.quantization.fake_quant_with_min_max_vars(inputs, self.lo, self.hi, num_bits=8)

    def get_config(self):
        return {"lo": self.lo, "hi": self.hi}


def _kernel_attr(layer) -> str:
    return configs.kernel_attribute(layer)  # the one lookup, bbits_tf.configs


@_register
class FixedGridQuantizeConfig(_EqualByConfig, _Q.QuantizeConfig):
    """Weight grid on the kernel, activation grid on the layer output (after its activation function).

    The layer's activation function itself is left alone (it fuses into the TFLite op). The bias stays float and
    becomes int32 with scale ``s_in * s_w`` in TFLite.

    Args:
        weight_bits, weight_step, act_bits, act_step, act_signed: as in `LayerPlan`, bits 2..8.
        output_range: (lo, hi) of the 8-bit output when ``act_bits`` is None; None leaves the output float (the
            converter then re-quantizes the whole layer from calibration).
    """

    def __init__(self, weight_bits: int, weight_step: float, act_bits=None, act_step=None, act_signed=False,
                 output_range=None):
        _check_bits(weight_bits)
        if act_bits is not None:
            _check_bits(act_bits)
        self.weight_bits = int(weight_bits)
        self.weight_step = float(weight_step)
        self.act_bits = None if act_bits is None else int(act_bits)
        self.act_step = None if act_step is None else float(act_step)
        self.act_signed = bool(act_signed)
        self.output_range = None if output_range is None else (float(output_range[0]), float(output_range[1]))

    @classmethod
    def from_plan(cls, plan: LayerPlan, output_range=None) -> "FixedGridQuantizeConfig":
        """The config of a plan's deployed (<= 8-bit) grids; ``output_range`` for a float output (act_bits None)."""
        plan = plan.deployed()
        return cls(plan.weight_bits, plan.weight_step, plan.act_bits, plan.act_step, plan.act_signed,
                   None if plan.act_bits is not None else output_range)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, _kernel_attr(layer)), FixedGridWeightQuantizer(self.weight_bits, self.weight_step))]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        setattr(layer, _kernel_attr(layer), quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        if self.act_bits is None:
            return [] if self.output_range is None else [FixedRangeQuantizer(*self.output_range)]
        act_name = getattr(getattr(layer, "activation", None), "__name__", "")
        return [FixedGridActivationQuantizer(self.act_bits, self.act_step, self.act_signed,
                                             nonnegative_input=act_name in _NONNEGATIVE_ACTIVATIONS)]

    def get_config(self):
        return {"weight_bits": self.weight_bits, "weight_step": self.weight_step, "act_bits": self.act_bits,
                "act_step": self.act_step, "act_signed": self.act_signed, "output_range": self.output_range}


@_register
class FixedGridOutputConfig(_EqualByConfig, _Q.QuantizeConfig):
    """Only an output grid, for a layer without weights whose output is new values (Add, average pooling, a
    separate ReLU / Activation layer): the tensor's scale is the learned step, as ``FixedGridQuantizeConfig``'s
    output. The layer's op (ADD, MEAN / AVERAGE_POOL_2D, a fused RELU) then requantizes onto it.

    Args:
        act_bits, act_step, act_signed: the learned grid (2..8 bits; ``LayerPlan.deployed()`` for wider ones).
        nonnegative_input: the layer's output is known to be >= 0 (a ReLU, or an average / sum of non-negative
            values), so an unsigned grid needs no lower clip op.
    """

    def __init__(self, act_bits: int, act_step: float, act_signed: bool = False, nonnegative_input: bool = False):
        _check_bits(act_bits)
        self.act_bits = int(act_bits)
        self.act_step = float(act_step)
        self.act_signed = bool(act_signed)
        self.nonnegative_input = bool(nonnegative_input)

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [FixedGridActivationQuantizer(self.act_bits, self.act_step, self.act_signed,
                                             nonnegative_input=self.nonnegative_input)]

    def get_config(self):
        return {"act_bits": self.act_bits, "act_step": self.act_step, "act_signed": self.act_signed,
                "nonnegative_input": self.nonnegative_input}


class _InputQuantize(transforms.Transform):
    """InputLayer => InputLayer -> QuantizeLayer(FixedRangeQuantizer(lo, hi))."""

    def __init__(self, input_range):
        self.input_range = input_range

    def pattern(self):
        return transforms.LayerPattern("InputLayer")

    def replacement(self, match_layer):
        name = match_layer.layer["config"]["name"] + "_quant"
        layer = QuantizeLayer(FixedRangeQuantizer(*self.input_range), name=name)
        config = keras.layers.serialize(layer, use_legacy_format=True)
        config["name"] = name
        return transforms.LayerNode(config, input_layers=[match_layer])

    def custom_objects(self):
        return {"QuantizeLayer": QuantizeLayer, "FixedRangeQuantizer": FixedRangeQuantizer}


class _InputRefine(transforms.Transform):
    """Layer L => QuantizeLayer(FixedRangeQuantizer(lo, hi)) -> L, for the layers named in ``ranges``.

    The range is the grid of L's input at a 2^j times finer scale (``refined_input_range``): the converter puts
    an exact requantization (QUANTIZE, codes times 2^j) before L's op, and L's int32 bias grid and requantization
    multiplier become 2^j times finer.
    """

    def __init__(self, ranges):
        self.ranges = dict(ranges)

    def pattern(self):
        return transforms.LayerPattern("Conv2D|DepthwiseConv2D|Dense")

    def replacement(self, match_layer):
        name = match_layer.layer["config"]["name"]
        if name not in self.ranges:
            return match_layer
        q_name = f"{name}_input_quant"
        layer = QuantizeLayer(FixedRangeQuantizer(*self.ranges[name]), name=q_name)
        config = keras.layers.serialize(layer, use_legacy_format=True)
        config["name"] = q_name
        match_layer.input_layers = [transforms.LayerNode(config)]
        return match_layer

    def custom_objects(self):
        return {"QuantizeLayer": QuantizeLayer, "FixedRangeQuantizer": FixedRangeQuantizer}


class _LayoutTransform(_Q.QuantizeLayoutTransform):
    """No BN folding, no fusing: only the fixed-range input quantizer (when an input range is given) and the
    refined input quantizers of ``input_refine``."""

    def __init__(self, input_range=None, input_refine=None):
        self.input_range = input_range
        self.input_refine = dict(input_refine or {})

    def apply(self, model, layer_quantize_map):
        todo = ([_InputQuantize(self.input_range)] if self.input_range is not None else []) + (
            [_InputRefine(self.input_refine)] if self.input_refine else [])
        if not todo:
            return model, layer_quantize_map
        layer_quantize_map = dict(layer_quantize_map)
        for layer in model._input_layers:  # pylint: disable=protected-access
            layer_quantize_map.setdefault(layer.name, {})  # tfmot adds only inputs that feed an annotated layer
        return model_transformer.ModelTransformer(model, todo, set(layer_quantize_map),
                                                  layer_quantize_map).transform()


class _AnnotatedOnlyRegistry(_Q.QuantizeRegistry):
    """Quantizes nothing on its own: only layers annotated with a FixedGridQuantizeConfig get quantizers."""

    def get_quantize_config(self, layer):
        return None

    def supports(self, layer):
        return False


class FixedGridScheme(_Q.QuantizeScheme):
    """tfmot scheme for ``quantize_apply`` that only wraps annotated layers (and fixes the input range).

    ``Default8BitQuantizeScheme`` would fold BatchNorm, fuse activations into ``QuantizeAwareActivation``s, put a
    trained-range QuantizeLayer on the input and add moving-average output quantizers to unannotated layers that feed
    annotated ones; none of that belongs in a model whose grids are already fixed.

    Args:
        input_range: (lo, hi) of the 8-bit model input, put after every InputLayer that feeds an annotated layer.
            None: no input quantizer (the converter then re-quantizes the first layer from calibration).
        input_refine: layer name -> (lo, hi) of an 8-bit fixed-range quantizer put on that layer's input (its
            input grid at a finer scale, see ``refined_input_range``).
    """

    def __init__(self, input_range=None, input_refine=None):
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.input_refine = {k: (float(v[0]), float(v[1])) for k, v in (input_refine or {}).items()}

    def get_layout_transformer(self):
        return _LayoutTransform(self.input_range, self.input_refine)

    def get_quantize_registry(self):
        return _AnnotatedOnlyRegistry()


def quantize_scope():
    """tfmot ``quantize_scope`` with this module's classes, for loading saved deployment models."""
    return _Q.quantize_scope({"FixedGridWeightQuantizer": FixedGridWeightQuantizer,
                              "FixedGridActivationQuantizer": FixedGridActivationQuantizer,
                              "FixedRangeQuantizer": FixedRangeQuantizer,
                              "FixedGridQuantizeConfig": FixedGridQuantizeConfig,
                              "FixedGridOutputConfig": FixedGridOutputConfig})


def refined_input_range(bits: int, step: float, signed: bool):
    """(lo, hi, factor) of an 8-bit fixed range that holds the b-bit activation grid ``k * step`` at the scale
    ``step / factor``, ``factor = 2^j`` the largest that fits the grid's codes into int8 (2 bits: 64, 4 bits: 16,
    8 bits: 1), its top at code 127 like the activation grids; ``factor == 1``: nothing to refine.

    Carrying a layer's input this way changes no value (``k * step == (k * factor) * (step / factor)``, and the
    requantization by a power of two is exact), but the layer's int32 bias grid and its requantization multiplier
    get ``factor`` times finer: the int32 bias then rounds ``factor`` times closer to the model's float bias.
    """
    lo, hi = act_grid_limits(bits, signed)
    factor = 1
    while (hi - lo) * factor * 2 <= 255:
        factor *= 2
    top = hi * factor
    fine = step / factor
    return -(255 - top) * fine, top * fine, factor
