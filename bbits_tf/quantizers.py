"""tfmot ``Quantizer`` shells around the math in ``ops`` and ``gates``."""
import numpy as np
import tensorflow as tf

from bbits_tf import checks, ops
from bbits_tf import gates as gates_lib
from bbits_tf._keras import call_context, keras, tfmot

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer

# Placeholder range before the first call sets it from the data (spec 1.5).
_PLACEHOLDER_X_MAX = 10.0
# What the regularizer charges (spec section 4 for "bops"; bbits_tf.costs for the deployment costs).
COSTS = ("bops", "flash", "arena", "flash+arena", "latency")
# A batch whose range (max |x|, or max x when unsigned) is not above this does not initialise the range.
MIN_INIT_X_MAX = 1e-6


def _keep_layer_weights_first(wrapper):
    """Puts the wrapped layer's own trainable weights first in the wrapper's list, in every build path.

    ``QuantizeWrapperV2`` lists the inner layer's weights before the quantizer's only when the inner layer was
    built before the wrapper (as in ``quantize_apply``), not when a saved model is loaded. The quantizer's
    variables are trainable, so without this the weight order differs and a saved model does not reload.
    """
    inner = getattr(wrapper, "layer", None)
    if inner is None:
        return
    own = wrapper._trainable_weights  # pylint: disable=protected-access
    missing = [w for w in inner.trainable_weights if all(w is not x for x in own)]
    own[:0] = missing


def weight_quantizer_vars(layer):
    """The variables dict of the weight quantizer of a (wrapped) MAC layer, or ``None``."""
    inner = getattr(layer, "layer", layer)
    folded = getattr(inner, "weight_quantizer_vars", None)  # a FoldedBatchNorm holds its weight quantizer
    if folded:
        return folded
    for _, quantizer, variables in getattr(layer, "_weight_vars", ()):
        if isinstance(quantizer, BayesianBitsQuantizer):
            return variables
    return None


@tf.autograph.experimental.do_not_convert
def _find_leader_gates(leader):
    """The ``log_alpha_2`` of layer ``leader``'s weight quantizer, searched in the Keras graph of the layer being
    called (its inbound and outbound nodes, transitively); ``None`` if not found."""
    start = call_context().layer
    if start is None:
        return None
    stack, seen = [start], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if getattr(getattr(layer, "layer", layer), "name", None) == leader:
            variables = weight_quantizer_vars(layer)
            if variables and "log_alpha_2" in variables:
                return variables["log_alpha_2"]
        for node in getattr(layer, "_inbound_nodes", ()):
            stack.extend(tf.nest.flatten(node.inbound_layers))
        for node in getattr(layer, "_outbound_nodes", ()):
            stack.append(node.outbound_layer)
    return None


def output_quantizer(layer):
    """``(quantizer, variables)`` of a wrapper's Bayesian Bits output quantizer, or ``None``."""
    quantizers = getattr(layer, "_output_quantizers", None) or ()
    if len(quantizers) == 1 and isinstance(quantizers[0], BayesianBitsQuantizer):
        return quantizers[0], layer._output_quantizer_vars  # pylint: disable=protected-access
    return None


@tf.autograph.experimental.do_not_convert
def _find_input_quantizer():
    """``output_quantizer`` of the layer whose grid the input of the layer being called is on
    (``bbits_tf.graph.grid_source``), or ``None``."""
    from bbits_tf import graph  # pylint: disable=import-outside-toplevel  (graph imports this module)

    start = call_context().layer
    source = None if start is None else graph.grid_source(start)
    return None if source is None else output_quantizer(source)


@tf.autograph.experimental.do_not_convert
def _building_model():
    """Whether Keras is tracing a layer call on symbolic inputs to build a model (only shapes matter)."""
    if tf.executing_eagerly():
        return False
    name = str(getattr(tf.compat.v1.get_default_graph(), "name", ""))
    return name == "keras_graph" or name.endswith("_scratch_graph")


@keras.utils.register_keras_serializable(package="bbits_tf")
class BayesianBitsQuantizer(_Quantizer):
    """Gated residual quantizer of Bayesian Bits, for one weight or activation tensor.

    Forward function (``bit_widths = (2, 4, 8, 16, 32)``, see ``bbits_tf.ops``)::

        x_q = z_2 * (x_2 + z_4 * (e_4 + z_8 * (e_8 + z_16 * (e_16 + z_32 * e_32))))

    on the clipped input, with step sizes ``s_b = range / (2^b - 1)`` from the learned ``x_max``. ``x_max``
    is set on the first call to ``max(|x|)`` (signed) or ``max(x)`` (unsigned) and then learned.

    Gradient estimator: rounding uses a straight-through estimator (identity gradient), so
    ``d x_q / d x = z_2`` inside the clipping range and 0 outside; ``x_max`` gets LSQ-like gradients from every
    open level plus the clipping term; each gate gets ``d x_q / d z_b`` through the hard-concrete sample.

    Gates: one scalar gate per residual level (``log_alpha``, in increasing bit order), sampled in training
    and deterministic in inference, cut at the first ``log_alpha <= -2``; with ``prune=True`` one gate ``z_2``
    per output channel (``log_alpha_2``, the trailing ``channel_ndims`` axes of the kernel).

    Regularizer (spec section 4), added to the layer's losses, ``mu * R`` with ``q = P(z != 0)``::

        prune:     R = mean_c(q2_c) * c * (b0 + b1 q1 + b2 q1 q2 + ...)
        otherwise: R = 1 + c * (b1 q1 + b2 q1 q2 + ...)

    where ``c = mac_weight`` (this tensor's share of the largest layer's MACs; ``None`` charges 1 per level).
    With a deployment ``cost`` (``"flash"``, ``"arena"``) the level costs ``c * b`` (and the constant 1) are the
    entries of a non-trainable ``level_costs`` variable that ``bbits_tf.costs.set_prior`` assigns::

        prune:     R = mean_c(q2_c) * (l_0 + l_1 q1 + l_2 q1 q2 + ...)
        otherwise: R = l_0 + l_1 q1 + l_2 q1 q2 + ...

    Args:
        bit_widths: chain of doubling bit widths; ``(8,)`` is a fixed 8-bit quantizer.
        init_log_alpha: initial ``log_alpha`` of each residual gate, one per entry of ``bit_widths[1:]``.
        signed: signed symmetric grid ``[-x_max, x_max]`` (2^b - 1 levels) or unsigned ``[0, x_max]`` (2^b).
        prune: whether this quantizer has per-output-channel pruning gates.
        channel_ndims: trailing axes of the tensor that index output channels (2 for a depthwise kernel).
        mask_bias: with ``prune``, also multiply the layer's bias by ``z_2`` (a deliberate deviation from
            the reference code so that a pruned channel outputs exactly ``activation(0)``).
        gate: gate kind, ``"hard_concrete"`` or ``"gumbel_sigmoid"``.
        mac_weight: ``c_k`` of the regularizer, or ``None`` for unit cost.
        mu: initial regularizer strength; it lives in a variable that ``bbits_tf.set_mu`` changes.
        input_step: for the kernel quantizer of a layer that reads the model input: the step of that input's
            8-bit grid in the exported file (``quantize_model(input_range=...)``), for ``bias_on_grid``.
        cost: what the regularizer charges: ``"bops"`` (spec section 4) or a deployment cost (``"flash"``,
            ``"arena"``, ``"latency"``) whose per-level charges live in the ``level_costs`` variable (``bbits_tf.costs``).
        gates_from: with ``prune``, the name of the layer whose weight quantizer owns this quantizer's pruning
            gates (tied gates, ``bbits_tf.graph.prune_groups``): no ``log_alpha_2`` of its own; it uses the
            leader's variable (found in the model when first needed). A leader's gates of shape ``(C,)`` cover a
            depthwise follower's ``(C, mult)`` channels, each input gate its ``mult`` outputs. Each member draws
            its own training sample of the shared gates (deviation: the exported, deterministic masks are
            identical, the training noise is not shared).
    """

    def __init__(
        self,
        bit_widths=(2, 4, 8, 16, 32),
        init_log_alpha=gates_lib.DEFAULT_INIT_LOG_ALPHA,
        signed=True,
        prune=False,
        channel_ndims=1,
        mask_bias=True,
        gate="hard_concrete",
        mac_weight=None,
        mu=0.0,
        gates_from=None,
        input_step=None,
        cost="bops",
    ):
        self.bit_widths = ops.validate_bit_widths(bit_widths)
        if isinstance(init_log_alpha, (int, float)) or init_log_alpha is None:
            raise TypeError(
                "`init_log_alpha` must be a sequence with one value per residual level (len(bit_widths) - 1 = "
                f"{len(self.bit_widths) - 1}). Received: init_log_alpha={init_log_alpha!r}"
            )
        if len(init_log_alpha) > len(self.bit_widths) - 1 and tuple(init_log_alpha) == gates_lib.DEFAULT_INIT_LOG_ALPHA:
            init_log_alpha = init_log_alpha[: len(self.bit_widths) - 1]  # the default, for a shorter chain
        self.init_log_alpha = checks.numbers_of_length("init_log_alpha", init_log_alpha, len(self.bit_widths) - 1)
        self.signed = checks.boolean("signed", signed)
        self.prune = checks.boolean("prune", prune)
        self.channel_ndims = int(channel_ndims)
        self.mask_bias = checks.boolean("mask_bias", mask_bias)
        self.gate = gates_lib.get_gate_kind(gate).name
        self.mac_weight = None if mac_weight is None else checks.number("mac_weight", mac_weight, minimum=0)
        self.mu = checks.number("mu", mu, minimum=0)
        if gates_from is not None and (not isinstance(gates_from, str) or not gates_from or not self.prune):
            raise ValueError("`gates_from` names the layer that owns the pruning gates of a pruning quantizer "
                             f"(prune=True). Received: gates_from={gates_from!r}, prune={self.prune}")
        self.gates_from = gates_from
        self.input_step = (None if input_step is None
                           else checks.number("input_step", input_step, minimum=0, strict_minimum=True))
        if cost not in COSTS:
            raise ValueError(f"`cost` must be one of {COSTS}. Received: cost={cost!r}")
        self.cost = cost
        self._bias = None
        self._channel_shape = None
        # (quantizer, variables) of the activation quantizer that produces the layer's input: its grid step times
        # this quantizer's is the step of the exported int32 bias (``bias_on_grid``). Linked by
        # ``bbits_tf.bayesian_bits_quantizers`` or found in the Keras graph on the first inference call.
        self.input_quantizer = None

    @property
    def num_gates(self):
        return len(self.bit_widths) - 1

    def build(self, tensor_shape, name, layer):
        """Creates ``x_max``, ``log_alpha``, ``log_alpha_2`` and ``mu`` on the wrapper ``layer``."""
        _keep_layer_weights_first(layer)

        def add(var_name, **kwargs):  # float32 even under mixed precision (no autocast to float16)
            return layer.add_weight(var_name, dtype=tf.float32, experimental_autocast=False, **kwargs)

        weights = {
            "x_max": add(
                f"{name}_x_max",
                shape=(),
                initializer=keras.initializers.Constant(_PLACEHOLDER_X_MAX),
                trainable=True,
            ),
            "range_initialized": add(
                f"{name}_range_initialized", shape=(), initializer="zeros", trainable=False
            ),
            "mu": add(
                f"{name}_mu", shape=(), initializer=keras.initializers.Constant(self.mu), trainable=False
            ),
        }
        if self.num_gates:
            weights["log_alpha"] = add(
                f"{name}_log_alpha",
                shape=(self.num_gates,),
                initializer=keras.initializers.Constant(self.init_log_alpha),
                trainable=True,
            )
        if self.prune:
            channel_shape = tuple(int(d) for d in tensor_shape[-self.channel_ndims :])
            self._channel_shape = channel_shape
        if self.prune and self.gates_from is None:
            weights["log_alpha_2"] = add(
                f"{name}_log_alpha_2",
                shape=channel_shape,
                initializer=keras.initializers.Constant(gates_lib.PRUNE_INIT_LOG_ALPHA),
                trainable=True,
            )
        if self.cost != "bops":  # the deployment cost of each level (bbits_tf.costs.set_prior assigns it)
            weights["level_costs"] = add(
                f"{name}_level_costs", shape=(len(self.bit_widths),), initializer="zeros", trainable=False
            )
        inner = getattr(layer, "layer", None)
        if name != "output" and getattr(inner, "use_bias", False):  # a kernel's quantizer (tfmot names outputs so)
            self._bias = inner.bias
        @tf.autograph.experimental.do_not_convert
        def loss():
            return weights["mu"] * self.regularization(weights)

        layer.add_loss(loss)
        return weights

    def _range(self, x, weights, training=True):
        """``x_max``, set from the data on the first training call (spec 1.5), clamped to >= 1e-8.

        Deviations that keep a degenerate batch from poisoning the model: a batch whose value is not finite
        or not above ``MIN_INIT_X_MAX`` (e.g. an all-zero batch after a ReLU) does not count; the range stays
        at its placeholder for that call and the next training call tries again. Inference
        (``training=False``) never sets the range. A graph traced after the range was set has no
        initialisation branch at all.
        """
        x_max, done = weights["x_max"], weights["range_initialized"]
        with tf.init_scope():
            initialized = bool(done.numpy() > 0) if tf.executing_eagerly() else False
        if initialized or not training:
            return tf.maximum(tf.identity(x_max), ops.MIN_X_MAX)
        strategy = tf.distribute.get_strategy()
        if tf.distribute.in_cross_replica_context() is False and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "Quantization ranges are set from the data on the first forward pass, which must not run in a "
                "replica context (each replica would see its own share of the batch). Call "
                "`bbits_tf.initialize_ranges(model, x)` inside `strategy.scope()` before `fit`. "
                f"Received: {strategy.num_replicas_in_sync} replicas, ranges not initialised"
            )

        def initialize():
            value = tf.stop_gradient(tf.reduce_max(tf.abs(x)) if self.signed else tf.reduce_max(x))
            usable = tf.logical_and(tf.math.is_finite(value), value > MIN_INIT_X_MAX)

            def accept():
                with tf.control_dependencies([x_max.assign(value), done.assign(1.0)]):
                    return tf.identity(x_max)

            return tf.cond(usable, accept, lambda: tf.identity(x_max))

        value = tf.cond(done > 0.0, lambda: tf.identity(x_max), initialize)
        return tf.maximum(value, ops.MIN_X_MAX)

    def channel_gates(self, weights, training):
        """``z_2`` per output channel (shape of ``log_alpha_2``), or ``None`` without pruning."""
        if not self.prune:
            return None
        kind = gates_lib.get_gate_kind(self.gate)
        log_alpha_2 = self.gate_variable(weights)
        if log_alpha_2 is None:  # a follower traced while Keras builds the model: shapes only
            return tf.ones(self._channel_shape, tf.float32)
        z = kind.sample(log_alpha_2) if training else kind.deterministic(log_alpha_2)
        return self._to_channels(z)

    def _to_channels(self, per_gate):
        """A tensor over the (leader's) gates, laid out over this quantizer's channels."""
        shape = self._channel_shape
        if shape is None or tuple(per_gate.shape) == tuple(shape):
            return per_gate
        per_gate = tf.reshape(per_gate, [-1] + [1] * (len(shape) - 1))
        return tf.broadcast_to(per_gate, shape)

    def gate_variable(self, weights):
        """The ``log_alpha_2`` variable of this quantizer's pruning gates (the leader's for tied gates).

        A follower (``gates_from``) links to its leader the first time it is needed: ``bayesian_bits_quantizers``
        does it for the whole model, and a call finds the leader in the Keras graph of the layer being called.
        Returns ``None`` only while Keras builds the model (a shape-only trace); raises if the leader is missing.
        """
        if "log_alpha_2" in weights:
            return weights["log_alpha_2"]
        found = _find_leader_gates(self.gates_from)
        if found is not None:
            weights["log_alpha_2"] = found
            return found
        if _building_model():
            return None
        raise ValueError(
            f"This quantizer's pruning gates are tied to layer {self.gates_from!r}, which was not found in the model "
            "being called. Load saved models with `bbits_tf.load_model(path)` (or call "
            "`bbits_tf.bayesian_bits_quantizers(model)` once) so that tied gates are linked, and keep the layers "
            f"that share gates in one model. Received: gates_from={self.gates_from!r}"
        )

    def quantize_with_gates(self, inputs, training, weights):
        """``(x_q, z_2)``: ``inputs`` quantized (pruning gates applied) and the flat ``z_2`` sample it used.

        ``z_2`` is ``None`` without pruning. A layer that needs to mask another per-channel tensor with the
        same sample as the kernel (a folded BatchNorm bias, ``bbits_tf.folding``) calls this instead of
        ``__call__``; ``__call__`` is this plus the masked bias of the wrapped layer.
        """
        dtype = inputs.dtype
        x = tf.cast(inputs, tf.float32)
        x_max = self._range(x, weights, training)
        z_bits = alive = None
        if self.num_gates:
            z_bits = gates_lib.chain_gates(weights["log_alpha"], self.gate, training)
            alive = gates_lib.truncation_mask(weights["log_alpha"]) > 0
        out = ops.quantize(x, x_max, self.signed, self.bit_widths, z_bits, alive)
        z2 = self.channel_gates(weights, training)
        if z2 is None:
            return tf.cast(out, dtype), None
        return tf.cast(out * z2, dtype), tf.reshape(z2, [-1])

    def __call__(self, inputs, training, weights, **kwargs):
        """Quantizes ``inputs``; for a kernel whose layer has a bias returns ``(kernel, bias)``: the bias masked by
        the pruning gates (``mask_bias``) and, in inference, on the exported int32 grid (``bias_on_grid``). Always
        both, also where the bias is unchanged: the wrapper sets the layer's bias to what this returns, and a
        bias left from another call (another graph) must not stay."""
        out, z2 = self.quantize_with_gates(inputs, training, weights)
        if self._bias is None:
            return out
        masked = z2 is not None and self.mask_bias
        bias = tf.convert_to_tensor(self._bias)  # float16 inside a mixed-precision layer call
        dtype, bias = bias.dtype, tf.cast(bias, tf.float32)
        if masked:
            bias = bias * z2
        if not training:
            bias = self.bias_on_grid(bias, weights)
        return out, tf.cast(bias, dtype)

    def grid_step(self, weights, int8_refined=False):
        """The step of the test-time grid as a tensor: the step of the finest level the deterministic gates keep
        (``step_size`` in graph code); with ``int8_refined`` divided by ``ops.int8_refinement`` of that level's
        bit width (the scale ``tflite_export`` stores such weights at)."""
        x_max = tf.maximum(tf.convert_to_tensor(weights["x_max"]), ops.MIN_X_MAX)
        steps = ops.step_sizes(x_max, self.signed, self.bit_widths)
        if int8_refined:
            steps = [s / ops.int8_refinement(b) for s, b in zip(steps, self.bit_widths)]
        step = steps[0]
        if self.num_gates:
            z = gates_lib.chain_gates(tf.convert_to_tensor(weights["log_alpha"]), self.gate, training=False)
            reach = 1.0
            for i in range(self.num_gates):
                reach = reach * z[i]
                step = step + reach * (steps[i + 1] - steps[i])
        return step

    def bias_on_grid(self, bias, weights):
        """Inference bias of this kernel's layer on the grid of the exported int32 bias, ``s_in * s_w / f``.

        TFLite stores a conv / fully-connected bias as int32 at the input scale times the weight scale. A layer
        that reads a 2-bit tensor with 2-bit weights has a coarse bias grid: on a ResNet20 the file's bias was up
        to 0.045 output steps off the float bias, and where thousands of equal values (a constant background) sat
        near a rounding boundary every one of them crossed it, block after block (top-1 agreement 95.6 %; with
        the model's biases moved onto the file's grid, 99.8 %). So in inference the model adds the bias the file
        holds: ``round(b / g) g`` with ``g = s_in * s_w / f``, ``s_in`` the test-time step of the activation
        quantizer that produces the layer's input (through pass-through layers), ``s_w`` this quantizer's and
        ``f = ops.int8_refinement(weight bits)`` (64 for 2-bit weights, 16 for 4-bit, else 1), the scale at
        which ``tflite_export`` stores the weights. The bias moves by at most ``g / 2`` (0.05 output steps on
        that ResNet20). Training keeps the float bias (deviation: the reference has no such rounding). A layer
        that reads the model input uses ``input_step`` (its 8-bit grid in the file) as ``s_in``, or keeps its
        float bias without one.
        """
        source = self.input_quantizer or _find_input_quantizer()
        if source is not None:
            self.input_quantizer = source
            in_quantizer, in_weights = source
            s_in = in_quantizer.grid_step(in_weights)
        elif self.input_step is not None:
            s_in = tf.constant(self.input_step, tf.float32)
        else:
            return bias
        grid = s_in * self.grid_step(weights, int8_refined=True)
        return ops.round_ste(bias / grid) * grid

    def regularization(self, weights):
        """``R_k`` of spec section 4 (without ``mu``)."""
        if self.num_gates:
            kind = gates_lib.get_gate_kind(self.gate)
            q = tf.unstack(kind.prob_nonzero(weights["log_alpha"]), num=self.num_gates)
        else:
            q = []
        if "level_costs" in weights:  # a deployment cost (bbits_tf.costs): every level, the base too, in its variable
            costs = tf.unstack(weights["level_costs"], num=len(self.bit_widths))
        else:
            costs = [1.0 if self.mac_weight is None else self.mac_weight * b for b in self.bit_widths]
        chain, reach = 0.0, 1.0
        for q_n, cost in zip(q, costs[1:]):
            reach = reach * q_n
            chain = chain + cost * reach
        if self.prune:
            kind = gates_lib.get_gate_kind(self.gate)
            keep = tf.reduce_mean(kind.prob_nonzero(self.gate_variable(weights)))
            return keep * (costs[0] + chain)
        return (costs[0] if "level_costs" in weights else 1.0) + chain

    def get_config(self):
        return {
            "bit_widths": list(self.bit_widths),
            "init_log_alpha": list(self.init_log_alpha),
            "signed": self.signed,
            "prune": self.prune,
            "channel_ndims": self.channel_ndims,
            "mask_bias": self.mask_bias,
            "gate": self.gate,
            "mac_weight": self.mac_weight,
            "mu": self.mu,
            "gates_from": self.gates_from,
            "input_step": self.input_step,
            "cost": self.cost,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, BayesianBitsQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    # Deterministic state for reports and export (NumPy, not graph code).

    def bit_width(self, weights):
        """Bit width the deterministic gates select (spec 5, ``get_bw``)."""
        if not self.num_gates:
            return self.bit_widths[0]
        z = gates_lib.chain_gates(tf.convert_to_tensor(weights["log_alpha"]), self.gate, training=False)
        return ops.bits_from_gates(z.numpy(), self.bit_widths)

    def expected_bit_width(self, weights):
        """Expected bit width from the gates' keep probabilities, with the truncation applied."""
        if not self.num_gates:
            return float(self.bit_widths[0])
        log_alpha = tf.convert_to_tensor(weights["log_alpha"])
        kind = gates_lib.get_gate_kind(self.gate)
        q = (kind.prob_nonzero(log_alpha) * gates_lib.truncation_mask(log_alpha)).numpy()
        return float(ops.expected_bits(q, self.bit_widths))

    def bit_width_probs(self, weights, expected=True):
        """``{bits: probability}`` of the bit width: the chain's distribution from the gates' keep probabilities
        (truncation applied), or ``{bit_width: 1.0}`` at the deterministic gates (``expected=False``)."""
        if not expected or not self.num_gates:
            return {int(self.bit_width(weights)): 1.0}
        log_alpha = tf.convert_to_tensor(weights["log_alpha"])
        kind = gates_lib.get_gate_kind(self.gate)
        q = (kind.prob_nonzero(log_alpha) * gates_lib.truncation_mask(log_alpha)).numpy()
        reach = np.concatenate([[1.0], np.cumprod(q), [0.0]])
        return {int(b): float(reach[j] - reach[j + 1]) for j, b in enumerate(self.bit_widths)}

    def channel_mask(self, weights):
        """Deterministic kept-channel mask, flat, as floats (all ones without pruning)."""
        if not self.prune:
            return None
        return self.channel_gates(weights, training=False).numpy().reshape(-1)

    def channel_keep_prob(self, weights):
        """P(z_2 != 0) per output channel, flat (``None`` without pruning)."""
        if not self.prune:
            return None
        kind = gates_lib.get_gate_kind(self.gate)
        return self._to_channels(kind.prob_nonzero(self.gate_variable(weights))).numpy().reshape(-1)

    def step_size(self, weights):
        """Step size of the deterministic bit width, ``range / (2^b - 1)``."""
        b = self.bit_width(weights)
        x_max = max(float(np.asarray(weights["x_max"])), ops.MIN_X_MAX)
        width = 2.0 * x_max if self.signed else x_max
        return width / (2.0**b - 1.0)
