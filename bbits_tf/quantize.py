"""Entry points: ``quantize_model``, ``quantize_scope``, ``set_mu``, ``variable_groups``."""
import dataclasses
import logging

import tensorflow as tf

from bbits_tf import checks, configs, graph, kernels
from bbits_tf._keras import keras, tfmot
from bbits_tf.folding import FoldedBatchNorm
from bbits_tf.gates import DEFAULT_INIT_LOG_ALPHA, get_gate_kind
from bbits_tf.ops import validate_bit_widths
from bbits_tf.quantizers import BayesianBitsQuantizer, output_quantizer
from bbits_tf.scheme import BayesianBitsQuantizeScheme

logger = logging.getLogger("bbits_tf")
_qkeras = tfmot.quantization.keras



@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize_model`` did: quantized layers, and layers left float with the reason.

    ``quantized``: the MAC layers (each with a weight quantizer); ``activations``: other layers whose output
    got an activation quantizer (Add, Concatenate, average pooling, a separate activation layer); ``folded``:
    ``(layer, type, MAC layer)`` for each BatchNormalization or activation layer that became part of a MAC
    unit; ``skipped``: ``(layer, type, reason)`` for every other layer.
    """

    quantized: list
    skipped: list  # (layer name, layer type, reason)
    activations: list = dataclasses.field(default_factory=list)
    folded: list = dataclasses.field(default_factory=list)  # (layer name, layer type, MAC layer name)

    def format(self):
        lines = [f"bbits_tf: quantized {len(self.quantized)} layers: {', '.join(self.quantized)}"]
        if self.activations:
            lines.append(f"  output quantizers on: {', '.join(self.activations)}")
        lines += [f"  folded: {name} ({kind}) into {into}" for name, kind, into in self.folded]
        lines += [f"  left float: {name} ({kind}): {reason}" for name, kind, reason in self.skipped]
        return "\n".join(lines)


def _loading_objects():
    """``{name: class}`` of everything a saved bbits_tf model names: tfmot's wrappers and bbits_tf's classes."""
    from bbits_tf import models  # noqa: F401  (registers the reference models' initializers)

    objects = {}
    for extra in _qkeras.quantize_scope().custom_objects:
        objects.update(extra)
    objects.update({
        name.split(">", 1)[1]: obj
        for name, obj in keras.utils.get_custom_objects().items()
        if name.startswith("bbits_tf>")
    })
    return objects


def quantize_scope(*args):
    """Scope in which a saved bbits_tf model loads (``keras.models.load_model`` inside it).

    Importing ``bbits_tf`` also registers these objects with Keras (``register_loading_objects``), so a plain
    ``keras.models.load_model(path)`` works after ``import bbits_tf``; ``bbits_tf.load_model`` does both.
    """
    objects = _loading_objects()
    for extra in args:
        objects.update(extra)
    return _qkeras.quantize_scope(objects)


def register_loading_objects():
    """Registers tfmot's wrappers and bbits_tf's classes with Keras' global custom objects (done on import).

    Without it, loading a ``.keras`` file outside ``quantize_scope`` fails deep in Keras with "Received:
    layer=QuantizeWrapperV2 of type <class 'str'>". Names already registered by the user are left alone.
    """
    registry = keras.utils.get_custom_objects()
    for name, obj in _loading_objects().items():
        registry.setdefault(name, obj)


def load_model(path, **kwargs):
    """Loads a saved bbits_tf model (``.h5``, ``.keras`` or SavedModel) with everything it needs in scope.

    A SavedModel traced with the fused quantizer op holds it in its graph: the op library is loaded (built if
    needed) first. On a machine without a compiler such a SavedModel does not load; ``.h5`` / ``.keras`` files
    (configuration and weights) load anywhere."""
    kernels.library()
    with quantize_scope():
        model = keras.models.load_model(path, **kwargs)
    if isinstance(model, keras.Model):
        bayesian_bits_quantizers(model)  # links tied gates and input grids now (a plain load: on the first call)
    return model


# Layer types that compute with weights but are not supported: left float, with this reason.
_UNSUPPORTED = (
    (keras.layers.Conv1D, "Conv1D is not supported (Conv2D, DepthwiseConv2D and Dense are); its weights stay float"),
    (keras.layers.Conv3D, "Conv3D is not supported (Conv2D, DepthwiseConv2D and Dense are); its weights stay float"),
    (keras.layers.SeparableConv1D, "SeparableConv1D is not supported; its weights stay float"),
    (keras.layers.SeparableConv2D,
     "SeparableConv2D is not supported (build it as DepthwiseConv2D + 1x1 Conv2D to quantize it); "
     "its weights stay float"),
    (keras.layers.RNN, "recurrent layers are not supported; the layer runs in float"),
    (keras.layers.Bidirectional, "recurrent layers are not supported; the layer runs in float"),
    (keras.layers.Embedding, "Embedding is not supported; its weights stay float"),
)


def _skip_reason(model, layer, units):
    if graph.is_passthrough(layer):
        return "passes values through unchanged (nothing to quantize)"
    if isinstance(layer, configs.UNSUPPORTED_SUBCLASSES):
        return (f"{type(layer).__name__} is not supported (it subclasses Conv2D but its kernel is laid out "
                "(kh, kw, filters_out, filters_in) and its MACs differ); its weights stay float")
    for cls, reason in _UNSUPPORTED:
        if isinstance(layer, cls):
            return reason
    if isinstance(layer, keras.layers.BatchNormalization):
        for unit in units.values():
            if unit.unfolded_batch_norm is layer:
                return f"BatchNormalization not folded: {unit.not_folded}"
        return ("BatchNormalization not folded: it does not follow a Conv2D, DepthwiseConv2D or Dense layer "
                "with a linear activation; it runs in float")
    if graph.is_grid(layer):
        if graph.feeds_output(model, layer):
            return "its output is a model output, which stays float"
        return ("its readers (an activation or Concatenate layer) quantize it: in an integer graph they share "
                "one grid")
    if not layer.weights:
        return "computes in float (no Bayesian Bits config for this layer type)"
    return "layer type not supported (Conv2D, DepthwiseConv2D and Dense are); its weights stay float"


def _activation_sites(model, units):
    """``{name: (layer, signed, consumer MACs)}`` of the tensors that get an activation quantizer.

    Candidates are the outputs of the MAC units (keyed by the MAC layer's name) and of the grid layers (Add,
    Concatenate, average pooling, separate activation layers). A tensor that reaches a model output (through
    pass-through layers) stays float (the logits), and a tensor read only by quantized Concatenate or
    activation layers gets no quantizer of its own: in an integer graph it takes their grid (one scale per
    concatenation; a ReLU fused into the layer before it). ``signed`` is ``False`` for a tensor that cannot be
    negative; ``consumer MACs`` sums the MACs of every MAC layer that reads it through pass-through layers.
    """
    unit_of_output = {id(u.output): u for u in units.values()}
    absorbed = {id(layer) for u in units.values() for layer in u.absorbed}
    candidates = []
    for layer in graph.topological_layers(model):
        if id(layer) in unit_of_output:
            candidates.append((unit_of_output[id(layer)].name, layer))
        elif graph.is_grid(layer) and id(layer) not in absorbed:
            candidates.append((layer.name, layer))
    sites, memo = {}, {}
    for name, layer in reversed(candidates):  # readers before the tensors they read
        if graph.feeds_output(model, layer):
            continue
        readers = graph.consumers(model, layer)
        if readers and all(isinstance(r, graph.REGRID_LAYERS) and r.name in sites for r in readers):
            continue
        sites[name] = (layer, not graph.nonnegative(model, layer, memo), graph.consumer_macs(model, layer))
    return {name: sites[name] for name, _ in candidates if name in sites}


def quantize_model(
    model,
    *,
    mu=0.1,
    prune=True,
    bit_widths=None,
    init_log_alpha=None,
    gate="hard_concrete",
    mask_bias=True,
    fixed_weight_bits=None,
    input_range=None,
    cost="bops",
):
    """Returns a Bayesian Bits quantization-aware copy of a Sequential or Functional tf_keras model.

    Every Conv2D, DepthwiseConv2D and Dense layer gets a gated residual weight quantizer (with per-channel
    pruning gates if ``prune``) and a quantizer on its output after the activation function. A
    BatchNormalization right after such a layer (linear activation) is folded into it during training (spec
    section 6, ``bbits_tf.folding.FoldedBatchNorm``: the weight quantizer sees ``W * gamma / sigma``), and a
    ReLU, ReLU6 or ``Activation`` layer after the unit is absorbed, so the output quantizer sits after the
    activation (unsigned after a ReLU). The outputs of Add, Concatenate, average pooling and separate
    activation layers get their own quantizer where they are consumed (one grid for a concatenation, whose
    inputs then get none); pass-through layers (max pooling, Flatten, Reshape, padding, Dropout) carry the
    grid. The last layer's output (the logits) stays float and its weights are never pruned. The model input
    is not quantized and counts as 8 bits. The regularizer ``mu * sum_k R_k`` (spec section 4) is part of
    ``model.losses``, so an ordinary ``compile``/``fit`` trains weights, ranges and gates; an activation
    quantizer's ``c_k`` is the MACs of the layers that read it over the largest layer's. Other layers stay
    float; they are listed with a reason in ``model.bbits_report`` and in the log.

    Example:

    >>> from bbits_tf import models, quantize_model, summary
    >>> qmodel = quantize_model(models.lenet5(), mu=0.1)
    >>> round(summary(qmodel).relative_bops, 3)   # all gates at their initial values: w8a8
    6.25

    Args:
        model: a built Sequential or Functional tf_keras model.
        mu: regularizer strength; change it later with ``bbits_tf.set_mu``.
        prune: per-output-channel pruning gates on weight quantizers (never on the last layer).
        bit_widths: chain of doubling bit widths every quantizer can choose from; ``None``: ``(2, 4, 8, 16, 32)``
            (the paper) with ``cost="bops"``, ``(2, 4, 8)`` with a deployment cost (the int8 file carries 16- and
            32-bit tensors as 8 bits, so a deployment cost could not tell them apart).
        init_log_alpha: initial ``log_alpha`` of the gates for ``bit_widths[1:]``, one value each; ``None``
            takes ``bbits_tf.gates.DEFAULT_INIT_LOG_ALPHA`` (6, 6, -6, -6), cut to the chain's length: every
            tensor starts at 8 bits (the MNIST recipe); ``(6, 6, 6, 6)`` starts at 32 (the CIFAR recipe).
        gate: ``"hard_concrete"`` (the paper) or ``"gumbel_sigmoid"`` (the paper's ablation).
        mask_bias: a pruned channel's bias is masked too (deviation from the reference, see README).
        fixed_weight_bits: if set (e.g. 8 or 4; at least 2), weights use this fixed bit width (no bit gates),
            which with ``prune=True`` is the pruning-only ablation; activations keep ``bit_widths``.
        input_range: ``(lo, hi)`` of the model input as the exported file carries it in 8 bits (``tflite_export``'s
            ``input_range``; ``(0, 1)`` for images scaled to [0, 1]): the layers that read it add in inference the
            bias the file stores, on its grid ``(hi - lo) / 255`` times their weight step (``bias_on_grid``).
            ``None``: they keep their float bias, which the file rounds.
        cost: what the prior charges (``bbits_tf.costs``): ``"bops"`` (spec section 4), ``"flash"`` (the bytes
            of the exported file, ``bbits_tf.flash``), ``"arena"`` (TFLite Micro's tensor arena,
            ``bbits_tf.arena``) or a latency table (``tflite_export.profile_latency(model)``'s data or a
            ``bbits_tf.latency.LatencyTable``: LiteRT latency, ``bbits_tf.latency``; the model keeps it as
            ``bbits_latency_table``). A deployment cost is scaled to equal the BOP prior at quantization, so ``mu``
            keeps its meaning at the start.

    Returns:
        The quantized model.

    Raises:
        ValueError: for a subclassed model, a model without an input shape, a Keras 3 model, bad arguments.
    """
    graph.check_model(model)
    _check_not_quantized(model)
    mu = checks.number("mu", mu, minimum=0)
    prune = checks.boolean("prune", prune)
    mask_bias = checks.boolean("mask_bias", mask_bias)
    from bbits_tf import costs as costs_lib  # pylint: disable=import-outside-toplevel  (costs reads quantize)
    cost_arg, cost = cost, costs_lib.check_cost(cost)  # the name; ``cost_arg`` may be a latency table
    if bit_widths is None:
        bit_widths = (2, 4, 8, 16, 32) if cost == "bops" else (2, 4, 8)
    bit_widths = validate_bit_widths(bit_widths)
    if init_log_alpha is None:
        init_log_alpha = DEFAULT_INIT_LOG_ALPHA[: len(bit_widths) - 1]
    elif isinstance(init_log_alpha, (int, float)):
        raise TypeError(
            f"`init_log_alpha` must be a sequence of {len(bit_widths) - 1} values, one per gate of "
            f"bit_widths={bit_widths} above the first. Received: init_log_alpha={init_log_alpha!r}"
        )
    init_log_alpha = checks.numbers_of_length("init_log_alpha", init_log_alpha, len(bit_widths) - 1)
    get_gate_kind(gate)
    weight_bit_widths = bit_widths if fixed_weight_bits is None else validate_bit_widths((fixed_weight_bits,))
    input_step = None if input_range is None else _input_step(input_range)

    units = graph.mac_units(model)
    supported = [unit.mac for unit in units.values()]
    if not supported:
        raise ValueError(
            "The model has no Conv2D, DepthwiseConv2D or Dense layer to quantize. "
            f"Received: model with layers {[layer.name for layer in model.layers]}"
        )
    shared = {layer.name: n for layer in supported if (n := graph.call_count(model, layer)) > 1}
    if shared:
        raise ValueError(
            "bbits_tf quantizes each Conv2D/DepthwiseConv2D/Dense layer once, with one set of gates and one BOP "
            "count per call site; a layer called more than once (shared weights) would be counted once and its "
            "output quantizer would mix the ranges of different tensors. Give each call its own layer. "
            f"Received: shared layers (name: calls) {shared}"
        )
    macs = {name: graph.layer_macs(model, unit.mac) for name, unit in units.items()}
    max_macs = max(macs.values())
    sites = _activation_sites(model, units)
    groups = graph.prune_groups(model, units) if prune else None

    common = dict(gate=gate, mu=mu, mask_bias=mask_bias, cost=cost)
    registry = BayesianBitsQuantizeScheme(**common).get_quantize_registry()

    def activation_kwargs(name):
        _, signed, consumer_macs = sites[name]
        return dict(bit_widths=bit_widths, init_log_alpha=init_log_alpha[: len(bit_widths) - 1],
                    mac_weight=consumer_macs / max_macs, signed=signed)

    quantize_configs = {}
    for name, unit in units.items():
        prunes = prune and name not in groups.unprunable and not graph.feeds_output(model, unit.output)
        lead = groups.leader.get(name, name) if prunes else name
        weight_kwargs = dict(
            bit_widths=weight_bit_widths,
            init_log_alpha=init_log_alpha[: len(weight_bit_widths) - 1],
            prune=prunes,
            mac_weight=macs[name] / max_macs,
            gates_from=None if lead == name else lead,
            input_step=input_step if graph.reads_model_input(model, unit.mac) else None,
        )
        quantize_configs[name] = registry.get_quantize_config(
            unit.mac, weight_kwargs=weight_kwargs,
            activation_kwargs=activation_kwargs(name) if name in sites else None, quantize_output=name in sites,
        )
    for name, (layer, _, _) in sites.items():
        if name not in units:
            quantize_configs[name] = registry.get_output_quantize_config(layer, activation_kwargs(name))

    def annotate(layer):
        if layer.name in quantize_configs:
            return _qkeras.quantize_annotate_layer(layer, quantize_config=quantize_configs[layer.name])
        return layer

    with quantize_scope():
        annotated = keras.models.clone_model(model, input_tensors=None, clone_function=annotate)
        quantized = _qkeras.quantize_apply(annotated, scheme=BayesianBitsQuantizeScheme(**common))
    _check_units_fused(quantized, units)

    folded = [(layer.name, type(layer).__name__, name) for name, unit in units.items() for layer in unit.absorbed]
    done = set(quantize_configs) | {name for name, _, _ in folded}
    report = QuantizeReport(
        quantized=list(units),
        skipped=[
            (layer.name, type(layer).__name__, _skip_reason(model, layer, units))
            for layer in model.layers
            if layer.name not in done and not isinstance(layer, keras.layers.InputLayer)
        ],
        activations=[name for name in sites if name not in units],
        folded=folded,
    )
    quantized.bbits_report = report
    logger.info(report.format())
    bayesian_bits_quantizers(quantized)  # links tied pruning gates and each kernel quantizer to its input grid
    if cost != "bops":
        costs_lib.set_prior(quantized, cost_arg)
    return quantized


def set_input_range(model, input_range):
    """Sets ``quantize_model``'s ``input_range`` on a quantized model (one quantized without it, or loaded): the
    layers that read the model input then add the exported file's bias in inference. Keras' cached predict and
    evaluate functions are dropped so that the next call traces with it. Returns the names of those layers."""
    step = _input_step(input_range)
    found = [w for w, role, q, _ in bayesian_bits_quantizers(model)
             if role == "weight" and graph.reads_model_input(model, w)]
    for wrapper, role, quantizer, _ in bayesian_bits_quantizers(model):
        if role == "weight" and wrapper in found:
            quantizer.input_step = step
    model.predict_function = model.test_function = None
    return [graph.inner_layer(w).name for w in found]


def _input_step(input_range):
    """``(hi - lo) / 255`` of a valid ``input_range``."""
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not lo < hi or hi - lo == float("inf"):
        raise ValueError(f"`input_range` must be (lo, hi) with finite lo < hi, e.g. (0.0, 1.0). Received: "
                         f"input_range={input_range!r}")
    return (hi - lo) / 255.0


def _check_units_fused(quantized, units):
    """Every layer that ``graph.mac_units`` folded or absorbed is gone from the quantized model."""
    names = {layer.name for layer in quantized.layers}
    left = [layer.name for unit in units.values() for layer in unit.absorbed if layer.name in names]
    if left:
        raise RuntimeError(
            "Internal error: the layout transform did not fold these layers into their MAC layers, so their "
            f"quantizers would sit in the wrong place. Please report it. Received: layers {left}"
        )


def _check_not_quantized(model):
    kinds = ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeAnnotate", "QuantizeLayer")
    wrapped = [layer.name for layer in model.layers if type(layer).__name__ in kinds]
    if wrapped:
        raise ValueError(
            "The model is already quantized or annotated for quantization (tfmot wrappers); pass the float model "
            "to `quantize_model`. To change the regularizer strength of a quantized model use `bbits_tf.set_mu`. "
            f"Received: model with quantized layers {wrapped}"
        )


def bayesian_bits_quantizers(model):
    """``[(wrapper, role, quantizer, variables)]`` for every Bayesian Bits quantizer of a quantized model.

    ``role`` is ``"weight"`` or ``"activation"``; ``variables`` is the dict the quantizer built. ``wrapper``
    is the tfmot ``QuantizeWrapper`` (``wrapper.layer`` the wrapped layer); the weight quantizer of a
    ``FoldedBatchNorm`` lives inside the wrapped layer and is listed with its wrapper.
    """
    found = []
    for layer in model.layers:
        if not isinstance(layer, _qkeras.QuantizeWrapper):
            continue
        if not isinstance(layer.quantize_config, configs.BayesianBitsQuantizeConfig):
            continue
        inner = layer.layer
        if isinstance(inner, FoldedBatchNorm) and isinstance(inner.weight_quantizer, BayesianBitsQuantizer):
            found.append((layer, "weight", inner.weight_quantizer, inner.weight_quantizer_vars))
        for _, quantizer, variables in layer._weight_vars:  # pylint: disable=protected-access
            found.append((layer, "weight", quantizer, variables))
        for quantizer in layer._output_quantizers:  # pylint: disable=protected-access
            found.append((layer, "activation", quantizer, layer._output_quantizer_vars))  # pylint: disable=protected-access
    _link_tied_gates(found)
    _link_input_quantizers(model, found)
    return found


def _link_input_quantizers(model, found):
    """Gives every weight quantizer the activation quantizer that produces its layer's input (``bias_on_grid``)."""
    for wrapper, role, quantizer, _ in found:
        if role == "weight" and quantizer.input_quantizer is None:
            source = graph.grid_source(wrapper, model)
            quantizer.input_quantizer = None if source is None else output_quantizer(source)


def _link_tied_gates(found):
    """Gives every follower quantizer (``gates_from``) its leader's ``log_alpha_2`` variable."""
    owners = {graph.inner_layer(w).name: v for w, role, q, v in found if role == "weight" and "log_alpha_2" in v
              and q.gates_from is None}
    for wrapper, role, quantizer, variables in found:
        if role != "weight" or getattr(quantizer, "gates_from", None) is None or "log_alpha_2" in variables:
            continue
        if quantizer.gates_from not in owners:
            raise ValueError(
                f"Layer {graph.inner_layer(wrapper).name!r} shares the pruning gates of layer "
                f"{quantizer.gates_from!r}, which is not in this model (or has no pruning gates). Keep the layers "
                f"that share gates in one model. Received: layers with gates {sorted(owners)}"
            )
        variables["log_alpha_2"] = owners[quantizer.gates_from]["log_alpha_2"]


def _check_quantized(model):
    found = bayesian_bits_quantizers(model)
    if not found:
        raise ValueError(
            "The model has no Bayesian Bits quantizer; pass the model that `bbits_tf.quantize_model` returned. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    return found


def initialize_ranges(model, x):
    """Sets every quantizer's range from data: one training-mode forward pass on ``x[:2]`` (spec 1.5, 9.8).

    ``fit`` does this on its first step anyway; call it explicitly under a ``tf.distribute`` strategy (inside
    its scope, before ``fit``) so that every replica starts from the same ranges. A quantizer whose range in
    this batch is zero (e.g. all-zero images) stays unset and is set by the next training step instead.

    Raises:
        ValueError: ``x`` is not a model input batch, or holds NaN or Inf.
    """
    _check_quantized(model)
    batch = tf.convert_to_tensor(x[:2])
    if batch.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(batch))):
        raise ValueError(
            "`initialize_ranges` sets the quantization ranges from the data; this batch holds NaN or Inf, which "
            f"would make every range NaN. Received: x[:2] with {int(tf.size(batch))} values, "
            f"{int(tf.reduce_sum(tf.cast(~tf.math.is_finite(batch), tf.int32)))} of them not finite"
        )
    model(batch, training=True)


def ranges_initialized(model):
    """``{quantizer name: bool}``: whether each quantizer's range was set from data (``"<layer>/<role>"``)."""
    return {f"{graph.inner_layer(w).name}/{role}": bool(v["range_initialized"].numpy() > 0)
            for w, role, _, v in _check_quantized(model)}


def set_mu(model, mu):
    """Sets the regularizer strength of a quantized model in place (no rebuild, no retrace)."""
    mu = checks.number("mu", mu, minimum=0)
    for _, _, _, variables in _check_quantized(model):
        variables["mu"].assign(mu)


def get_mu(model):
    """The regularizer strength of a quantized model."""
    return float(_check_quantized(model)[0][3]["mu"].numpy())


def variable_groups(model):
    """Splits the trainable variables into ``{"weights", "ranges", "gates"}``, the paper's three groups."""
    quantizers = _check_quantized(model)
    ranges = [v["x_max"] for _, _, _, v in quantizers]
    gates = [v[key] for _, _, _, v in quantizers for key in ("log_alpha", "log_alpha_2") if key in v]
    gates = list({id(v): v for v in gates}.values())  # tied pruning gates are one variable
    special = {id(v) for v in ranges + gates}
    weights = [v for v in model.trainable_variables if id(v) not in special]
    return {"weights": weights, "ranges": ranges, "gates": gates}


def regularization_loss(model):
    """``mu * sum_k R_k`` of a quantized model, as a scalar tensor."""
    return sum(v["mu"] * q.regularization(v) for _, _, q, v in _check_quantized(model))
