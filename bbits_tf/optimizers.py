"""Optimizers for Bayesian Bits: one optimizer per variable group, and the paper's learning-rate schedule.

The paper trains three parameter groups (weights, quantization ranges, gates) with one Adam each, and decays the
weights' learning rate linearly over the last third of training, stepping once per epoch (spec 7.1)::

    groups = bbits_tf.variable_groups(qmodel)
    optimizer = GroupedOptimizer({"weights": keras.optimizers.Adam(ConstantThenLinearDecay(1e-3, 100, 469)),
                                  "ranges": keras.optimizers.Adam(1e-3), "gates": keras.optimizers.Adam(1e-3)},
                                 groups=groups)
"""
import tensorflow as tf

from bbits_tf._keras import keras

GROUPS = ("weights", "ranges", "gates")
# Name routing when no explicit groups are given: quantizer variables are named "<tensor>_x_max",
# "<tensor>_log_alpha" and "<tensor>_log_alpha_2" (see ``BayesianBitsQuantizer.build``).
_NAME_PATTERNS = (("x_max", "ranges"), ("log_alpha", "gates"))


@keras.utils.register_keras_serializable(package="bbits_tf")
class GroupedOptimizer(keras.optimizers.Optimizer):
    """Routes each variable group to its own optimizer (the paper's weights / ranges / gates Adams).

    Gradients are all-reduced once (under a ``tf.distribute`` strategy), split by group, and each group's
    optimizer applies its share; ``iterations`` counts training steps. Works in ``model.fit`` and under
    ``tf.distribute.MirroredStrategy``: create the optimizers inside ``strategy.scope()``, like any optimizer.

    Args:
        optimizers: dict group name -> optimizer (instance, name or config), e.g. ``{"weights": Adam(1e-3), ...}``.
        groups: dict group name -> list of variables (``bbits_tf.variable_groups(model)``). ``None`` routes by
            variable name: ``*x_max*`` -> ``"ranges"``, ``*log_alpha*`` -> ``"gates"``. Unlisted variables go
            to ``default``. Explicit groups are not serialized: ``from_config`` falls back to name routing.
        default: group of variables not listed in ``groups`` (``None``: such a variable is an error).
        name: optimizer name.
    """

    def __init__(self, optimizers, groups=None, default="weights", name="GroupedOptimizer", **kwargs):
        kwargs.pop("is_legacy_optimizer", None)
        super().__init__(name=name, jit_compile=False, **kwargs)
        if not isinstance(optimizers, dict) or not optimizers:
            raise ValueError(f"`optimizers` must be a non-empty dict of group -> optimizer. Received: {optimizers!r}")
        built = {}
        for key, opt in optimizers.items():
            if not isinstance(opt, keras.optimizers.Optimizer):
                opt = keras.optimizers.get(opt, use_legacy_optimizer=False)
            if not isinstance(opt, keras.optimizers.Optimizer):
                raise ValueError(
                    "GroupedOptimizer needs tf_keras (non-legacy) optimizers such as `keras.optimizers.Adam`. "
                    f"Received: optimizers[{key!r}]={opt!r}"
                )
            if opt._distribution_strategy is not self._distribution_strategy:  # pylint: disable=protected-access
                raise ValueError(
                    "Create the group optimizers and the GroupedOptimizer in the same `strategy.scope()`. "
                    f"Received: optimizers[{key!r}] created under another distribution strategy"
                )
            built[key] = opt
        if default is not None and default not in built:
            raise ValueError(
                f"`default` must be one of the groups {sorted(built)} or None. Received: default={default!r}"
            )
        self._optimizers = built
        self.default = default
        self._group_of = {}
        for key, variables in (groups or {}).items():
            if key not in built:
                raise ValueError(f"Group {key!r} has no optimizer. Expected one of {sorted(built)}. Received: groups")
            for variable in variables:
                self._group_of[self._var_key(variable)] = key
        self._explicit_groups = groups is not None
        # Tracked, so that a tf.train.Checkpoint of this optimizer holds what ``freeze`` changed: the scale of every
        # ``ConstantThenLinearDecay`` (a constant learning rate is a tracked variable of its optimizer already).
        scales = {}
        for key, opt in built.items():
            scale = getattr(getattr(opt, "_learning_rate", None), "scale", None)
            if isinstance(scale, tf.Variable):
                scales[key] = scale
        self._lr_scales = scales

    @property
    def optimizers(self):
        """The group optimizers, a dict group name -> optimizer."""
        return dict(self._optimizers)

    @property
    def learning_rate(self):
        """Learning rate of the default (weights) group, so that Keras' LR callbacks see one value."""
        return self._optimizers[self.default or next(iter(self._optimizers))].learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._optimizers[self.default or next(iter(self._optimizers))].learning_rate = value

    def freeze(self, group):
        """Stops ``group``'s variables from moving (learning rate 0; a ``ConstantThenLinearDecay`` schedule is
        scaled by 0). Returns whether it could: other schedules cannot be changed once traced."""
        if group not in self._optimizers:
            raise ValueError(f"Unknown group. Expected one of {sorted(self._optimizers)}. Received: group={group!r}")
        optimizer = self._optimizers[group]
        schedule = getattr(optimizer, "_learning_rate", None)
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            if not isinstance(getattr(schedule, "scale", None), tf.Variable):
                return False
            schedule.scale.assign(0.0)
            return True
        optimizer.learning_rate = 0.0
        return True

    def frozen_groups(self):
        """The groups that ``freeze`` stopped (a schedule scaled by 0, or a constant learning rate of 0)."""
        frozen = []
        for key, optimizer in self._optimizers.items():
            schedule = getattr(optimizer, "_learning_rate", None)
            if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
                value = self._lr_scales.get(key)
            else:
                value = optimizer.learning_rate
            if value is not None and float(tf.convert_to_tensor(value)) == 0.0:
                frozen.append(key)
        return frozen

    def learning_rates(self):
        """The current learning rate of every group, as floats."""
        return {key: float(tf.convert_to_tensor(opt.learning_rate)) for key, opt in self._optimizers.items()}

    def group_of(self, variable):
        """The group that ``variable`` belongs to."""
        key = self._group_of.get(self._var_key(variable))
        if key is None and not self._explicit_groups:
            key = next((g for pattern, g in _NAME_PATTERNS if pattern in variable.name and g in self._optimizers),
                       None)
        key = key or self.default
        if key is None:
            raise ValueError(f"Variable {variable.name!r} is in no group and `default` is None. Received: groups")
        return key

    def _split(self, items):
        split = {key: [] for key in self._optimizers}
        for item in items:
            split[self.group_of(item[1] if isinstance(item, tuple) else item)].append(item)
        return split

    def build(self, var_list):
        super().build(var_list)
        for key, variables in self._split(list(var_list)).items():
            if variables:
                self._optimizers[key].build(variables)

    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False, **kwargs):
        """All-reduces the gradients once, then lets each group's optimizer apply its share."""
        grads_and_vars = list(grads_and_vars)
        aggregate = kwargs.pop("experimental_aggregate_gradients", True)
        if not skip_gradients_aggregation and aggregate and tf.distribute.has_strategy():
            grads_and_vars = self.aggregate_gradients(grads_and_vars)
        for key, pairs in self._split(grads_and_vars).items():
            if pairs:
                self._optimizers[key].apply_gradients(pairs, skip_gradients_aggregation=True)
        # An empty update through the base class only counts the step (in cross-replica context).
        return self._internal_apply_gradients([])

    def get_config(self):
        return {
            "name": self.name,
            "optimizers": {k: keras.optimizers.serialize(o) for k, o in self._optimizers.items()},
            "default": self.default,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizers"] = {
            k: keras.optimizers.deserialize(v, custom_objects=custom_objects, use_legacy_optimizer=False)
            for k, v in config["optimizers"].items()
        }
        return cls(**config)


def constant_then_linear_decay(epoch, epochs, decay_start=None):
    """LR factor of 1-based ``epoch`` of ``epochs`` (spec 7.1): 1 up to epoch ``decay_start + 1``, then linear to 0.

    ``decay_start`` defaults to ``floor(2 * epochs / 3)``; with ``k = epoch - 1`` the factor is 1 for
    ``k <= decay_start`` and ``(k - epochs) / (decay_start - epochs)`` after. ``epochs=100``: epochs 1-67 at 1,
    then 33/34, 32/34, ..., 1/34.
    """
    decay_start = (2 * epochs) // 3 if decay_start is None else decay_start
    k = epoch - 1
    if k <= decay_start or decay_start >= epochs:
        return 1.0
    return max(0.0, (k - epochs) / (decay_start - epochs))


@keras.utils.register_keras_serializable(package="bbits_tf")
class ConstantThenLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``initial_learning_rate * constant_then_linear_decay(epoch, epochs)``, stepping once per epoch.

    Args:
        initial_learning_rate: the learning rate of the constant part.
        epochs: number of training epochs E.
        steps_per_epoch: optimizer steps per epoch; the epoch of step ``s`` (0-based) is ``s // steps_per_epoch``.
        decay_start: epochs (0-based index) of the constant part; ``None`` is ``floor(2E/3)``.
    """

    def __init__(self, initial_learning_rate, epochs, steps_per_epoch, decay_start=None):
        if int(epochs) < 1 or int(steps_per_epoch) < 1:
            raise ValueError(
                "`epochs` and `steps_per_epoch` must be >= 1. "
                f"Received: epochs={epochs}, steps_per_epoch={steps_per_epoch}"
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_start = (2 * self.epochs) // 3 if decay_start is None else int(decay_start)
        # Multiplies the schedule; ``GroupedOptimizer.freeze`` sets it to 0 (a variable, so that a traced train
        # step sees the change). Not part of the config: a reloaded schedule starts unfrozen.
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")

    def __call__(self, step):
        k = tf.math.floordiv(tf.cast(step, tf.float32), float(self.steps_per_epoch))
        if self.decay_start >= self.epochs:
            factor = tf.ones_like(k)
        else:
            decay = tf.maximum((k - self.epochs) / float(self.decay_start - self.epochs), 0.0)
            factor = tf.where(k <= float(self.decay_start), 1.0, decay)
        return self.initial_learning_rate * factor * self.scale

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch, "decay_start": self.decay_start}


