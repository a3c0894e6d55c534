"""A Bayesian Bits model (``bbits_tf.quantize_model``) -> pruned integer .tflite, verified against that model.

``export`` (the public entry) sends a Bayesian Bits model to ``export_bbits``, the bridge between the training side
and the plain-data exporter (``export_plans``), and a float model with plans straight to ``export_plans``:

1. ``plans_from_bbits``: one ``LayerPlan`` per quantized layer from its quantizers at the deterministic (test-time)
   gates: weight bits and step, output activation bits, step and sign, kept output channels (``z_2``). Refused:
   quantizers whose range was never set from data, and quantizers the file could not carry exactly.
2. ``plain_model``: the same architecture as plain tf_keras layers (the QuantizeWrappers unwrapped), whose kernels
   and biases are what the bbits model uses in inference: ``quantizer(kernel, training=False)``, i.e. on the
   learned grid with pruned slices zeroed, and the bias masked by ``z_2`` when ``mask_bias``. A ``FoldedBatchNorm``
   (MAC layer + BatchNormalization + activation) becomes its MAC layer with ``folded_kernel()`` = Q(W_f) and
   ``folded_bias()``; output quantizers on Add / average pooling / ReLU layers become ``output_grids``.
3. ``export_plans`` of that model with those plans: pruning for real, fixed grids, conversion, grid checks.
4. Checks against the bbits model itself (``model.predict``, inference mode, which changes no variable): top-1
   agreement, per-layer LSB histograms (``verify.lsb_histograms``), kernels on their grids, distinct codes per
   weight tensor against the *learned* bit width, kept channel counts in the flatbuffer against the gates, TFLite
   Micro against LiteRT (within 1 LSB) and the TFLM arena size; optional C source and header next to the file.

The result is a ``BbitsExportReport`` (``report.py``): an ``ExportReport`` with the size accounting per layer
(learned bits x params vs the bytes the file holds), the verification and the check results.
"""
import dataclasses
from typing import Dict, Mapping, Optional

import numpy as np

from bbits_tf import configs
from bbits_tf.ops import int8_refinement
from bbits_tf._keras import keras, tfmot

from .edgetpu import edgetpu_check
from .export import OUTPUT_GRID_LAYERS, ExportReport, check_path, export_plans, write_file
from .micro import tflm_check, write_c_arrays
from .prune import PRODUCERS, graph_nodes
from .plan import WEIGHT_BITS, LayerPlan, signed_levels
from .report import BbitsExportReport, bias_check, layer_rows, off_grid_weights, predictions, to_int2, wide_layers
from .verify import LayerRef, bias_offsets, lsb_check, lsb_histograms, run_litert_any_batch, static_batch, verify

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_PREDICT_BATCH = 256


# ---------------------------------------------------------------------------------------------------- reading

def _bbits_config_class():
    from bbits_tf.configs import BayesianBitsQuantizeConfig  # pylint: disable=import-outside-toplevel
    return BayesianBitsQuantizeConfig


def is_bbits_model(model) -> bool:
    """Whether ``model`` is a Bayesian Bits model (it holds a QuantizeWrapper with a bbits_tf config)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    config_cls = _bbits_config_class()
    return any(isinstance(layer, _QuantizeWrapper) and isinstance(layer.quantize_config, config_cls)
               for layer in layers)


# A range at or below this (bbits_tf.ops.MIN_X_MAX is 1e-8) has collapsed in training: refused with the layer named.
COLLAPSED_X_MAX = 1e-7


def _quantizer_table(qmodel) -> Dict[str, Dict[str, tuple]]:
    """wrapper name -> {"weight": (quantizer, variables), "activation": (quantizer, variables)}.

    Raises ValueError when a quantizer's range was never set from data (its step sizes would come from the
    placeholder ``x_max``, not from training) or collapsed to ``COLLAPSED_X_MAX`` or below.
    """
    from bbits_tf.quantize import bayesian_bits_quantizers  # pylint: disable=import-outside-toplevel
    table: Dict[str, Dict[str, tuple]] = {}
    unset, collapsed = [], []
    for wrapper, role, quantizer, variables in bayesian_bits_quantizers(qmodel):
        table.setdefault(wrapper.name, {})[role] = (quantizer, variables)
        flag = variables.get("range_initialized")
        if flag is not None and not float(np.asarray(flag)) > 0.5:
            unset.append(f"{wrapper.layer.name} ({role})")
        elif float(np.asarray(variables["x_max"])) <= COLLAPSED_X_MAX:
            collapsed.append(f"{wrapper.layer.name} ({role}): x_max={float(np.asarray(variables['x_max'])):.3g}")
    if collapsed:
        raise ValueError(f"The quantization range of {len(collapsed)} quantizer(s) collapsed to the floor during "
                         f"training ({', '.join(collapsed)}): every value they quantize is 0 or nearly, and the file "
                         f"could not hold their grid. Train with a lower range learning rate (the recipes use 1e-3). "
                         f"Received: layers={list(dict.fromkeys(c.split(' ')[0] for c in collapsed))}")
    if unset:
        raise ValueError(f"The quantization ranges of {len(unset)} quantizer(s) were never set from data ("
                         f"{', '.join(unset)}): their grids are placeholders, not learned. Call "
                         f"`bbits_tf.initialize_ranges(model, x_train)` (or train the model) before exporting. "
                         f"Received: layers={list(dict.fromkeys(u.split(' ')[0] for u in unset))}")
    return table


def _wrappers(qmodel):
    """The QuantizeWrappers of the model, in layer order; any wrapper that is not Bayesian Bits is an error."""
    config_cls = _bbits_config_class()
    found, foreign = [], []
    for layer in qmodel.layers:
        if isinstance(layer, _QuantizeWrapper):
            if not isinstance(layer.quantize_config, config_cls):
                raise ValueError(f"Layer {layer.name!r} is quantized by {type(layer.quantize_config).__name__}, "
                                 f"not by Bayesian Bits; export_bbits takes models from bbits_tf.quantize_model only. "
                                 f"Received: model={qmodel.name!r}")
            found.append(layer)
        elif isinstance(layer, keras.Model):
            raise ValueError(f"Nested models are not supported; flatten the model first. Received: {layer.name!r}")
        elif layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            foreign.append(f"{layer.name} ({type(layer).__name__})")
    if foreign:  # e.g. a convolution with a folded BatchNorm: its grids are not read here
        raise ValueError(f"The exporter reads the grids of Conv2D, DepthwiseConv2D and Dense layers in Bayesian Bits "
                         f"wrappers; other layers with weights (BatchNormalization aside) would be converted without "
                         f"their grids. Received: layers={foreign}")
    if not found:
        raise ValueError(f"The model has no Bayesian Bits layer; pass the model that bbits_tf.quantize_model "
                         f"returned. Received: model={getattr(qmodel, 'name', qmodel)!r}")
    return found


def _kernel_attr(layer) -> str:
    return configs.kernel_attribute(layer)  # the one lookup, bbits_tf.configs


def _folded_class():
    from bbits_tf.folding import FoldedBatchNorm  # pylint: disable=import-outside-toplevel
    return FoldedBatchNorm


def _is_mac(layer) -> bool:
    """A Conv2D / DepthwiseConv2D / Dense layer, or a ``FoldedBatchNorm`` (one of them with its BN folded in)."""
    return isinstance(layer, PRODUCERS + (_folded_class(),))


def _folded_mac_layer(folded):
    """The plain MAC layer a ``FoldedBatchNorm`` deploys as: its MAC layer's settings, the activation after the
    fold, a bias (the folded one), the same name; weights set by ``plain_model``."""
    config = dict(folded._mac_config["config"])  # pylint: disable=protected-access
    config.update(name=folded.name, activation=keras.activations.serialize(folded.activation), use_bias=True)
    for key in [k for k in config if k.endswith(("_regularizer", "_constraint"))]:
        config[key] = None
    return folded.mac_class.from_config(config)


def _variable(wrapper, attr: str):
    """The wrapper's float variable ``attr`` (kernel / depthwise_kernel / bias), or None.

    ``wrapper.layer.kernel`` is the *quantized tensor* of the last call, not the variable, so look the variable up
    by name (``.../kernel:0``); the tfmot wrapper's own record of the quantized weight is the fallback.
    """
    hits = [v for v in wrapper.weights if v.name.endswith(f"/{attr}:0")]
    if len(hits) == 1:
        return hits[0]
    if attr != "bias":
        for weight, _, _ in wrapper._weight_vars:  # pylint: disable=protected-access
            return weight
    return None


def _quantized_kernel_bias(wrapper, table):
    """(kernel, bias or None) of a wrapped layer as the bbits model uses them in inference (NumPy).

    A ``FoldedBatchNorm`` gives its folded kernel on the learned grid, ``Q(W_f)`` with the inference gates, and
    its folded bias ``beta + gamma (b - mu) / sigma`` (pruned channels 0 with ``mask_bias``): what it computes
    in inference, before its activation."""
    inner = wrapper.layer
    if isinstance(inner, _folded_class()):
        return (np.asarray(inner.folded_kernel(quantized=True), np.float32),
                np.asarray(inner.folded_bias(), np.float32).reshape(-1))
    kernel_var = _variable(wrapper, _kernel_attr(inner))
    bias_var = _variable(wrapper, "bias") if getattr(inner, "use_bias", False) else None
    if kernel_var is None:
        raise ValueError(f"No kernel variable found in a Bayesian Bits wrapper. Received: layer={wrapper.name!r}")
    entry = table.get(wrapper.name, {}).get("weight")
    bias = None if bias_var is None else np.asarray(bias_var.numpy(), np.float32)
    if entry is None:  # weights left float by the config
        return np.asarray(kernel_var.numpy(), np.float32), bias
    quantizer, variables = entry
    out = quantizer(kernel_var, False, variables)
    if isinstance(out, (tuple, list)):  # mask_bias with pruning: (kernel * z2, bias * z2)
        kernel, bias_q = out
        return np.asarray(kernel, np.float32), np.asarray(bias_q, np.float32)
    return np.asarray(out, np.float32), bias


# Layers a grid passes through unchanged: quantize(f(x)) == f(quantize(x)) for these f (rounding and clipping are
# monotone and elementwise), so an output quantizer on them equals the same quantizer on each producer feeding them.
_GRID_COMMUTING = (keras.layers.Concatenate, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
                   keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten,
                   keras.layers.Reshape, keras.layers.Dropout, keras.layers.SpatialDropout2D)


def _activation_grid(entry, name):
    quantizer, variables = entry["activation"]
    bits, step = int(quantizer.bit_width(variables)), float(quantizer.step_size(variables))
    if bits not in WEIGHT_BITS:
        raise ValueError(f"TFLite export supports activation bit widths {WEIGHT_BITS}. Received: layer={name!r}, "
                         f"act_bits={bits}")
    return bits, step, bool(quantizer.signed)


def _moved_grids(qmodel, table):
    """Output quantizers on layers without weights, as ``bbits_tf.quantize_model`` places them.

    Returns ``(moved, own)``. ``moved``: producer layer name -> (bits, step, signed) of a quantizer on a
    Concatenate or max pooling layer, given to every Conv2D / DepthwiseConv2D / Dense (or folded) layer that feeds
    it through such layers (exact, because those layers commute with the quantizer). ``own``: layer name ->
    (bits, step, signed) of a quantizer on an Add, average pooling or separate ReLU / Activation layer, whose
    output is new values: that tensor is carried on the grid itself (``export_plans(output_grids=...)``).
    Anything else raises ValueError."""
    nodes = graph_nodes(qmodel)
    inbound = {layer.name: sources for layer, sources in nodes}
    by_name = {layer.name: layer for layer, _ in nodes}
    consumers: Dict[str, list] = {}
    for layer, sources in nodes:
        for src in sources:
            consumers.setdefault(src, []).append(layer.name)
    moved, own, unsupported, weighted = {}, {}, [], []
    for wrapper in _wrappers(qmodel):
        inner = wrapper.layer
        if _is_mac(inner):
            continue
        if inner.weights:
            weighted.append(f"{inner.name} ({type(inner).__name__})")
            continue
        entry = table.get(wrapper.name, {})
        if set(entry) == {"activation"} and isinstance(inner, OUTPUT_GRID_LAYERS):
            own[inner.name] = _activation_grid(entry, inner.name)
            continue
        if set(entry) - {"activation"} or not isinstance(inner, _GRID_COMMUTING):
            unsupported.append(f"{inner.name} ({type(inner).__name__})")
            continue
        grid = _activation_grid(entry, inner.name)
        todo, seen = list(inbound[wrapper.name]), set()
        while todo:
            src = todo.pop()
            if src in seen:
                continue
            seen.add(src)
            layer = by_name[src]
            inner_src = layer.layer if isinstance(layer, _QuantizeWrapper) else layer
            if len(consumers.get(src, [])) != 1:
                unsupported.append(f"{inner.name} (its input {inner_src.name} also feeds other layers)")
            elif _is_mac(inner_src) and "activation" not in table.get(src, {}):
                moved[inner_src.name] = grid
            elif isinstance(inner_src, _GRID_COMMUTING) and not isinstance(layer, _QuantizeWrapper):
                todo.extend(inbound[src])
            else:
                unsupported.append(f"{inner.name} (fed by {inner_src.name}, {type(inner_src).__name__})")
    if weighted:
        raise ValueError("The exporter reads the grids of Conv2D, DepthwiseConv2D and Dense layers (BatchNorm folded "
                         "in or not); other quantized layers with weights are not exported. "
                         f"Received: layers={weighted}")
    if unsupported:
        raise ValueError("The exporter carries an output quantizer of a layer without weights only where it equals "
                         "the same quantizer on the Conv2D / DepthwiseConv2D / Dense layers feeding it (through "
                         "Concatenate, max pooling, Flatten, Reshape, Dropout, each feeding only the next), and on "
                         "Add, average pooling, ReLU and Activation layers (their own grid). "
                         f"Received: layers={unsupported}")
    return moved, own


def plans_from_bbits(qmodel) -> Dict[str, LayerPlan]:
    """Original layer name -> ``LayerPlan`` from the quantizers at their deterministic gates.

    Weight bits and step (``quantizer.bit_width`` / ``step_size``), the output quantizer's bits, step and sign (None:
    float output, the logits), and the kept output channels (``channel_mask``; None without pruning). A layer whose
    config has no weight quantizer gets a 32-bit plan (carried as 8 bits over max|w|, reported as not exact). An
    output quantizer on a Concatenate or max pooling layer becomes the output grid of the layers feeding it.
    """
    table = _quantizer_table(qmodel)
    moved, _ = _moved_grids(qmodel, table)
    plans = {}
    for wrapper in _wrappers(qmodel):
        if not _is_mac(wrapper.layer):
            continue
        name = wrapper.layer.name
        entry = table.get(wrapper.name, {})
        if "weight" in entry:
            quantizer, variables = entry["weight"]
            bits, step = int(quantizer.bit_width(variables)), float(quantizer.step_size(variables))
            mask = quantizer.channel_mask(variables)
        else:
            kernel, _ = _quantized_kernel_bias(wrapper, table)
            bits, step, mask = 32, max(float(np.abs(kernel).max()), 1e-8) / (2 ** 31 - 1), None
        if bits not in WEIGHT_BITS:
            raise ValueError(f"TFLite export supports weight bit widths {WEIGHT_BITS}. Received: layer={name!r}, "
                             f"weight_bits={bits}")
        act_bits, act_step, act_signed = moved.get(name, (None, None, False))
        if "activation" in entry:
            act_bits, act_step, act_signed = _activation_grid(entry, name)
        out_mask = None
        if mask is not None:
            out_mask = np.asarray(mask).reshape(-1) > 0.5
            if not out_mask.any():
                raise ValueError(f"Every output channel of a layer is pruned (it outputs a constant); such a model "
                                 f"cannot be exported as a graph of convolutions. Received: layer={name!r}")
            if out_mask.all():
                out_mask = None
        plans[name] = LayerPlan(bits, step, act_bits, act_step, act_signed, out_mask)
    return plans


def output_grids_from_bbits(qmodel) -> Dict[str, tuple]:
    """Layer name -> (bits, step, signed) of the output quantizers on Add, AveragePooling2D,
    GlobalAveragePooling2D and separate ReLU / Activation layers (``export_plans(output_grids=...)``)."""
    return _moved_grids(qmodel, _quantizer_table(qmodel))[1]


def _fresh(layer):
    if isinstance(layer, _folded_class()):
        return _folded_mac_layer(layer)
    return layer.__class__.from_config(layer.get_config())


def plain_model(qmodel, *, batch_size: Optional[int] = None):
    """The bbits model as plain tf_keras layers, with the kernels and biases it uses in inference.

    Same graph and layer names as the original float model (``quant_conv1`` -> ``conv1``); kernels on the learned
    grids with pruned slices zero; biases masked like the bbits model masks them. Layers outside the wrappers
    (pooling, BatchNormalization, ...) keep their weights. Activation quantizers are not part of this model (the
    plans carry them).

    Args:
        qmodel: a model from ``bbits_tf.quantize_model`` whose ranges were set from data (trained, or after
            ``bbits_tf.initialize_ranges``).
        batch_size: fix the batch dimension of the input (e.g. 1 for the Edge TPU compiler); None keeps it free.
    """
    table = _quantizer_table(qmodel)
    wrappers = {w.name: w for w in _wrappers(qmodel)}

    def unwrap(layer):
        return _fresh(layer.layer if isinstance(layer, _QuantizeWrapper) else layer)

    input_tensors = None
    if batch_size is not None:
        input_tensors = [keras.Input(batch_shape=(batch_size,) + tuple(t.shape[1:]), dtype=t.dtype)
                         for t in qmodel.inputs]
        input_tensors = input_tensors[0] if len(input_tensors) == 1 else input_tensors
    plain = keras.models.clone_model(qmodel, input_tensors=input_tensors, clone_function=unwrap)
    for layer in qmodel.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.name in wrappers:
            if _is_mac(layer.layer):  # other wrappers hold only an output quantizer
                kernel, bias = _quantized_kernel_bias(layer, table)
                target = plain.get_layer(layer.layer.name)
                target.set_weights([kernel] + ([bias] if bias is not None else []))
        elif layer.get_weights():
            plain.get_layer(layer.name).set_weights(layer.get_weights())
    return plain


def _int8_storage(plan: LayerPlan, refine: bool = True) -> LayerPlan:
    """The plan with <= 4-bit weights stored as INT8 on a finer grid that holds the learned one exactly.

    The learned codes ``k`` (``|k| <= n = 2^(b-1) - 1``) are stored as ``k * m`` with scale ``step / m``,
    ``m = bbits_tf.ops.int8_refinement(b)`` (2 bits: 64, 4 bits: 16): the same weights, but the int32 bias grid
    (input scale x weight scale) is m times finer: the grid the Bayesian Bits model puts its inference bias on
    (``BayesianBitsQuantizer.bias_on_grid``), so the file holds the model's bias exactly. ``refine=False`` keeps
    ``m = 1`` (codes ``k``, scale ``step``), what ``pack_int2`` turns into INT2 without moving the bias.
    """
    if plan.weight_bits < 8:
        m = int8_refinement(plan.weight_bits) if refine else 1
        return dataclasses.replace(plan, weight_bits=8, weight_step=plan.weight_step / m)
    return plan


def _array(data) -> np.ndarray:
    if callable(data):
        return np.concatenate([np.asarray(batch[0], np.float32) for batch in data()])
    return np.asarray(data, np.float32)


def _float_output_ranges(qmodel, plans, x) -> Dict[str, tuple]:
    """(lo, hi) of every float-output layer (the logits) of the bbits model over ``x``, widened to include 0."""
    names = [n for n, p in plans.items() if p.act_bits is None]
    if not names:
        return {}
    wrappers = {w.layer.name: w for w in _wrappers(qmodel)}
    probe = keras.Model(qmodel.inputs, [wrappers[n].output for n in names])
    outs = probe.predict(x, verbose=0, batch_size=_PREDICT_BATCH)
    outs = outs if len(names) > 1 else [outs]
    ranges = {}
    for name, out in zip(names, outs):
        lo, hi = min(0.0, float(np.min(out))), max(0.0, float(np.max(out)))
        ranges[name] = (lo, hi) if hi > lo else (lo, lo + 1.0)
    return ranges


# ---------------------------------------------------------------------------------------------------- export

def _int4_layers(int4, plans, model) -> frozenset:
    """The layers whose <= 4-bit weights are stored as INT4: all (True), none (False), or those named or of the
    given layer classes (a class, a name, or a collection of them)."""
    if isinstance(int4, bool):
        return frozenset(n for n, p in plans.items() if p.weight_bits <= 4) if int4 else frozenset()
    items = [int4] if isinstance(int4, (str, type)) else list(int4)
    names = {x for x in items if isinstance(x, str)}
    classes = tuple(x for x in items if isinstance(x, type))
    bad = [x for x in items if not isinstance(x, (str, type))]
    unknown = sorted(names - set(plans))
    if bad or unknown:
        raise ValueError(f"`int4` must be True, False, a layer class, a layer name or a collection of them, naming "
                         f"layers the model has ({sorted(plans)}). Received: int4={int4!r}")
    names |= {n for n in plans if classes and isinstance(model.get_layer(n), classes)}
    return frozenset(n for n in names if plans[n].weight_bits <= 4)


def export_bbits(qmodel, path: Optional[str] = None, *, representative_data, io: str = "float",
                 validation_data=None, input_range=None, output_ranges=None, int4=keras.layers.Dense,
                 int2: bool = False,
                 batch_size: Optional[int] = None, c_array: bool = False, c_name: Optional[str] = None,
                 tflm: Optional[bool] = None, tflm_samples: int = 100, min_agreement: float = 0.999,
                 lsb_samples: int = 500, refine_inputs: bool = True, strict: bool = False,
                 latency_table=None) -> BbitsExportReport:
    """Export a Bayesian Bits model to integer TFLite and verify the file against the model.

    The model is only read: no variable of it changes (ranges, gates, weights, BatchNorm statistics).

    Args:
        qmodel: a model from ``bbits_tf.quantize_model``, trained (its deterministic gates are used). A model whose
            quantization ranges were never set from data is refused (ValueError).
        path: where to write the .tflite (None: do not write; the bytes are in ``report.model_bytes``).
        representative_data: model inputs (array) for the input range and the float-output (logits) range (min
            and max of the bbits model's logits over all of them) and for the converter.
        io: "float" (float32 input/output; phones) or "int8" (int8 input/output; microcontrollers, Edge TPU).
        validation_data: ``(x, y)`` (labels may be None) to verify on; None verifies on ``representative_data``.
        input_range: fixed (lo, hi) of the 8-bit model input, e.g. (0.0, 1.0); default from the data.
        output_ranges: layer name -> (lo, hi) of float outputs, overriding the data's.
        int4: which <= 4-bit weights are stored as INT4 (packed, half the bytes of INT8): the layers of the given
            class(es) or name(s), all (True) or none (False: every tensor 8-bit, as the Edge TPU compiler wants).
            The others sit in INT8 on a grid 2^8/2^b times finer that holds the learned one exactly. Default: the
            Dense layers only. Convolutions stay INT8 because XNNPACK (LiteRT's default CPU delegate) does not take
            INT4 convolutions: the builtin kernels requantize them with double rounding, which on a learned 2-bit
            grid flipped 1.4 % of the outputs of a first convolution (23 of 10,000 MNIST predictions changed);
            in INT8 they run in XNNPACK, bit-exact up to the int32 bias grid (README, "Agreement").
        int2: experimental: store 2-bit Dense (FULLY_CONNECTED) weights as packed INT2 codes {-1, 0, 1} with the
            learned step as scale (``pack_int2``, exact). LiteRT's builtin kernel runs it (XNNPACK does not take
            it); TFLite Micro cannot load it; 2-bit convolutions stay INT4 (no INT2 CONV_2D kernel).
        batch_size: fix the input batch dimension (1 for the Edge TPU); None keeps it dynamic.
        c_array: also write ``<stem>_data.cc`` / ``<stem>_data.h`` next to the file (needs ``path``).
        c_name: C array name (default ``g_<stem>``).
        tflm: run the file in the TFLite Micro interpreter and find its arena size (default: for io="int8" without
            ``int2``, which TFLM cannot load).
        tflm_samples: inputs TFLM runs (it runs one at a time).
        min_agreement: least top-1 agreement of the file with the model's output on the file's int8 output grid
            (``VerifyReport.top1_agreement_on_grid``).
        lsb_samples: validation inputs for the per-layer LSB histograms (``report.lsb_diffs``; 0: none).
        refine_inputs: carry a layer input that is a 2- or 4-bit grid at a 64 / 16 times finer scale (one exact
            QUANTIZE op each): that layer's int32 bias grid and requantization get as much finer, so its rounding
            agrees with the model's float arithmetic (``deployment_model``).
        strict: raise RuntimeError when a check fails (structural problems of the file always raise).
        latency_table: ``profile_latency``'s data: the report's ``predicted`` then also compares
            ``bbits_tf.latency``'s prediction with the file's measured LiteRT latency.

    Returns:
        BbitsExportReport.
    """
    path = check_path(path)
    if c_array and path is None:
        raise ValueError("`c_array=True` writes the C arrays next to the .tflite file, so it needs a `path`. "
                         "Received: path=None")
    plans = plans_from_bbits(qmodel)
    grids = output_grids_from_bbits(qmodel)
    plain = plain_model(qmodel, batch_size=batch_size)
    int2 = frozenset(n for n, p in plans.items() if int2 and p.weight_bits == 2
                     and isinstance(plain.get_layer(n), keras.layers.Dense))
    int4_option = int4
    int4 = _int4_layers(int4, plans, plain) - int2
    deployed_plans = {n: (p if n in int4 else _int8_storage(p, refine=n not in int2)) for n, p in plans.items()}
    x_rep = _array(representative_data)
    ranges = _float_output_ranges(qmodel, plans, x_rep)
    ranges.update(output_ranges or {})
    base = export_plans(plain, deployed_plans, None, representative_data=x_rep, io=io,
                        input_range=input_range, output_ranges=ranges, refine_inputs=refine_inputs,
                        output_grids=grids)
    if int2:
        to_int2(base, int2)
    if path is not None:
        write_file(base.model_bytes, path)
        base.path = path
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ExportReport)}
    in_channels = {n: int(plain.get_layer(n).input_shape[-1]) for n in plans}
    rows, problems = layer_rows(base, plans, int4, int2, in_channels)
    report = BbitsExportReport(**fields, bbits_layers=rows, plans={n: p.to_dict() for n, p in plans.items()},
                               wide_layers=wide_layers(plans), int4=sorted(int4),
                               edgetpu=edgetpu_check(base.model_bytes).to_dict())
    checks = {"grids": True,  # export raises when a weight or activation is off its planned grid
              "types_and_distinct_codes": not any("distinct" in p or "stored as" in p for p in problems),
              "kept_channels": not any("output channels" in p for p in problems)}
    off_grid = off_grid_weights(plain, plans)
    checks["weights_as_model"] = not off_grid
    for name, count in off_grid.items():
        problems.append(f"{name}: {count} kernel entries of the bbits model are off its {plans[name].weight_bits}-bit "
                        f"grid (|code| > {signed_levels(plans[name].weight_bits)} or between levels; e.g. code 128 "
                        f"from float32 rounding at the top of bbits_tf.ops.quantize's clip); the file holds them "
                        f"rounded and clipped to the grid")
    report.bias_offsets = bias_offsets(base.model_bytes, plain, base.prune.channel_maps)
    table = _quantizer_table(qmodel)
    weight_quantizers = {w.layer.name: table[w.name]["weight"][0] for w in qmodel.layers
                         if "weight" in table.get(w.name, {})}
    in_bits = {n: ((8 if q.input_step else None) if q.input_quantizer is None  # 8: the model input, on a grid
                   else q.input_quantizer[0].bit_width(q.input_quantizer[1])) for n, q in weight_quantizers.items()}
    checks["biases_as_model"] = bias_check(report, plans, in_bits, int4 | int2, problems)

    x_val, y_val = validation_data if validation_data is not None else (x_rep, None)
    x_val = np.asarray(x_val, np.float32)
    run = run_litert_any_batch if static_batch(base.model_bytes) else None
    report.verification = v = verify(base.model_bytes, qmodel, x_val, y_val, run=run)
    agreement = v.top1_agreement if v.top1_agreement_on_grid is None else v.top1_agreement_on_grid
    checks["top1_agreement"] = agreement >= min_agreement
    if not checks["top1_agreement"]:
        problems.append(f"top-1 agreement {100 * agreement:.2f}% < {100 * min_agreement:.2f}% (against the model's "
                        f"output on the file's output grid)")
    if lsb_samples:
        refs = _layer_refs(qmodel, base.prune.channel_maps, plans)
        report.lsb_diffs = lsb_histograms(base.model_bytes, qmodel, x_val[:lsb_samples], refs)
        checks["lsb_local_within_1"] = lsb_check(report.lsb_diffs, problems)

    if tflm if tflm is not None else (io == "int8" and not int2):
        n = min(tflm_samples, len(x_val))
        try:
            report.tflm_max_lsb_diff, report.tflm_arena_bytes = tflm_check(base.model_bytes, x_val[:n])
            report.tflm_samples = n
            checks["tflm_within_1_lsb"] = report.tflm_max_lsb_diff <= 1.0 + 1e-6
            if not checks["tflm_within_1_lsb"]:
                problems.append(f"TFLM differs from LiteRT by {report.tflm_max_lsb_diff:g} LSB")
        except RuntimeError as e:  # e.g. INT2 weights: TFLM's kernels do not take them
            checks["tflm_within_1_lsb"] = False
            problems.append(f"TFLite Micro cannot run the file: {str(e).splitlines()[0]}"
                            + (" (INT2 weights are not supported by TFLM)" if "INT2" in report.tensor_types else ""))

    if c_array:
        report.c_source_path, report.c_header_path = write_c_arrays(base.model_bytes, path, c_name)
    if not int2:
        report.predicted = predictions(qmodel, report, int4_option, latency_table)
    report.checks, report.problems = checks, problems
    report.notes = list(report.notes) + [f"{n}: {how}" for n, how in report.wide_layers.items()]
    if strict and problems:
        raise RuntimeError("Export checks failed:\n  " + "\n  ".join(problems))
    return report


def _layer_refs(qmodel, channel_maps, plans) -> Dict[str, LayerRef]:
    """Per planned layer: its wrapper in the bbits model and how the file's pruned tensors map onto it."""
    wrappers = {w.layer.name: w for w in _wrappers(qmodel)}
    nodes = graph_nodes(qmodel)
    inbound = {layer.name: sources for layer, sources in nodes}
    by_name = {layer.name: layer for layer, _ in nodes}  # InputLayers included (not in a Sequential's layers)
    refs = {}
    for n in plans:
        sources = inbound.get(wrappers[n].name, [])
        src = by_name[sources[0]] if len(sources) == 1 else None
        pad = src if isinstance(src, keras.layers.ZeroPadding2D) else None
        refs[n] = LayerRef(wrappers[n], channel_maps[n]["out_keep"], channel_maps[n]["in_keep"],
                           channel_maps[n]["in_const"], pad)
    return refs


_PLANS_OPTIONS = ("representative_data", "io", "input_range", "output_ranges", "refine_inputs", "output_grids")


def export(model, path=None, *, plans: Optional[Mapping[str, LayerPlan]] = None, **options):
    """Export a model to integer TFLite: the one public entry.

    * ``export(qmodel, "model.tflite", representative_data=x, ...)``: a trained Bayesian Bits model (from
      ``bbits_tf.quantize_model``) brings its own plans; this is ``export_bbits`` (any of its options as keywords)
      and the file is verified against the model.
    * ``export(float_model, "model.tflite", plans=plans, representative_data=x, ...)``: a float model with your
      own ``LayerPlan``s; this is ``export_plans`` (options ``representative_data``, ``io``, ``input_range``,
      ``output_ranges``).

    Args:
        model: a Bayesian Bits model, or a tf_keras model with float weights together with ``plans``.
        path: where to write the .tflite file (str or os.PathLike); None writes nothing (the bytes are in
            ``report.model_bytes``).
        plans: layer name -> LayerPlan, for a float model only.
        **options: passed on to ``export_bbits`` or ``export_plans``.

    Returns:
        ``BbitsExportReport`` for a Bayesian Bits model, ``ExportReport`` otherwise.
    """
    path = check_path(path)
    if is_bbits_model(model):
        if plans is not None:
            raise ValueError("A Bayesian Bits model brings its own plans (from its quantizers); call "
                             "`export(qmodel, path, representative_data=...)` without `plans`. "
                             f"Received: plans={type(plans).__name__} of {len(plans)} layer(s)")
        return export_bbits(model, path, **options)
    if plans is None:
        raise ValueError("`export` takes a Bayesian Bits model (from `bbits_tf.quantize_model`, trained) or a float "
                         "model together with `plans=` (layer name -> LayerPlan). Received: "
                         f"model={getattr(model, 'name', type(model).__name__)!r} (not a Bayesian Bits model), "
                         "plans=None")
    unknown = sorted(set(options) - set(_PLANS_OPTIONS))
    if unknown:
        raise TypeError(f"These options apply to Bayesian Bits models only, not to a float model with plans: "
                        f"{unknown}. Options for plans: {list(_PLANS_OPTIONS)}. Received: {unknown}")
    return export_plans(model, plans, path, **options)
