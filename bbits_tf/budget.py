"""BOP-budget targeting: a callback that adapts ``mu`` during training to end near a relative-BOP budget."""
import math
import warnings

import numpy as np

from bbits_tf import checks
from bbits_tf import flash as flash_lib
from bbits_tf import gates as gates_lib
from bbits_tf._keras import keras
from bbits_tf.bops import relative_bops as _relative_bops
from bbits_tf.quantize import bayesian_bits_quantizers, get_mu, set_mu


class BopsBudget(keras.callbacks.Callback):
    """Adapts ``mu`` during training so that the model ends near ``target_relative_bops``.

    Every ``every_n_steps`` training steps it measures the relative BOPs (``signal``: ``"expected"``, from the
    gate probabilities; ``"deterministic"``, the test-time gates; or ``"projected"``, the test-time BOPs the gates
    reach in ``horizon_steps`` steps if every ``log_alpha`` keeps its recent velocity) and, with the error
    ``e = log(bops / setpoint)`` and the sum ``I`` of the errors, sets::

        log(mu) = log(mu_0) + kp * e + ki * I,   clipped to [log(mu_min), log(mu_max)]

    a PI controller on log mu. The setpoint falls geometrically from the BOPs at the start to the target over the
    first ``ramp_fraction`` of the training steps (of each ``fit``), then stays at the target. The sum only takes
    errors within ``integral_band`` of the setpoint, and not while ``|e|`` is shrinking by more than
    ``shrink_tolerance`` per update, nor while ``mu`` is at a bound. After the ramp, the first time the test-time
    BOPs are within ``freeze_band`` of the target, the gates are frozen (their learning rate set to 0) for the
    rest of the training, as in the paper's final fine-tuning with fixed gates.

    The landing guard (``guard=True``) handles what the controller cannot: when an update finds the test-time BOPs
    below ``target * (1 - band)`` (``band``: ``freeze_band``, or 0.05), the gates that were switched off since the
    last update at or above that line are switched back on (their ``log_alpha`` restored to that update's value),
    the ones closest to their threshold first and only as many as it takes to get back to the line; then the gates
    are frozen. Without it the landing point moves in jumps with ``mu`` (all gates of a kind cross the threshold
    within a few steps), and a target between two jumps is missed by 30-50 %.

    Why: the gates move by about their learning rate per step whatever ``mu`` is (Adam), so ``mu`` mostly sets
    where they settle, not how fast they get there; they all start at the same ``log_alpha``, cross the threshold
    together, and the BOPs fall off a cliff whose landing point is set by ``mu`` at that moment. An integral that
    summed the large errors of the descent would wind up and overshoot, and undershooting is nearly irreversible
    (bit gates below the truncation point never come back; once the accuracy has recovered the task loss has
    little reason to reopen a gate). Models without Bayesian Bits quantizers (a float warm-up phase) are left
    alone.

    Args:
        target_relative_bops: the budget, percent of FP32 BOPs (as ``bbits_tf.relative_bops``).
        signal: ``"expected"``, ``"deterministic"`` or ``"projected"``.
        every_n_steps: steps between updates.
        kp, ki: gains on the log error and on its sum.
        integral_band: the sum only takes errors with ``|e| < integral_band``.
        shrink_tolerance: ``|e|`` falling by more than this between updates counts as shrinking.
        ramp_fraction: fraction of the training steps over which the setpoint falls to the target (0: none).
        freeze_band: relative distance to the target within which the gates are frozen after the ramp
            (``None``: never freeze).
        mu_min, mu_max: bounds of ``mu``.
        initial_mu: ``mu_0``; ``None``: the model's ``mu`` when training starts.
        horizon_steps: look-ahead of ``"projected"``, in training steps.
        print_fn: where a line per epoch goes (``None``: nowhere).
        guard: undo an undershoot below the band and freeze the gates there (needs a ``GroupedOptimizer``).

    Attributes:
        history: ``[{"step", "epoch", "relative_bops", "expected_relative_bops", "projected_relative_bops",
            "setpoint", "mu", "restored_gates"}]``, one per update.
        frozen_at_step: the step at which the gates were frozen, or ``None``.
        restored_gates: how many gate elements the landing guard switched back on (0: it never acted).
    """

    def __init__(self, target_relative_bops, signal="expected", every_n_steps=5, kp=0.5, ki=0.05,
                 integral_band=math.log(2.0), shrink_tolerance=0.01, ramp_fraction=0.5, freeze_band=0.05,
                 mu_min=1e-4, mu_max=10.0, initial_mu=None, horizon_steps=50, print_fn=None, guard=True):
        super().__init__()
        target_relative_bops = checks.number("target_relative_bops", target_relative_bops)
        if not 0 < target_relative_bops <= 100:
            raise ValueError("`target_relative_bops` is a percentage of the FP32 BOPs and must be in (0, 100]. "
                             f"Received: target_relative_bops={target_relative_bops!r}")
        if signal not in ("expected", "deterministic", "projected"):
            raise ValueError(
                f"`signal` must be 'expected', 'deterministic' or 'projected'. Received: signal={signal!r}")
        every_n_steps = checks.integer("every_n_steps", every_n_steps, minimum=1)
        kp, ki = checks.number("kp", kp, minimum=0), checks.number("ki", ki, minimum=0)
        integral_band = checks.number("integral_band", integral_band, minimum=0, strict_minimum=True)
        shrink_tolerance = checks.number("shrink_tolerance", shrink_tolerance, minimum=0)
        ramp_fraction = checks.number("ramp_fraction", ramp_fraction, minimum=0, maximum=1)
        if freeze_band is not None:
            freeze_band = checks.number("freeze_band", freeze_band, minimum=0, strict_minimum=True)
        mu_min = checks.number("mu_min", mu_min, minimum=0, strict_minimum=True)
        mu_max = checks.number("mu_max", mu_max, minimum=0, strict_minimum=True)
        if mu_min > mu_max:
            raise ValueError(f"Need 0 < mu_min <= mu_max. Received: mu_min={mu_min}, mu_max={mu_max}")
        if initial_mu is not None:
            initial_mu = checks.number("initial_mu", initial_mu, minimum=0)
        checks.number("horizon_steps", horizon_steps, minimum=0)
        if print_fn is not None and not callable(print_fn):
            raise TypeError(f"`print_fn` must be callable or None. Received: print_fn={print_fn!r}")
        guard = checks.boolean("guard", guard)
        self.target_relative_bops, self.signal, self.every_n_steps = float(target_relative_bops), signal, every_n_steps
        self.kp, self.ki, self.integral_band = float(kp), float(ki), float(integral_band)
        self.shrink_tolerance, self.ramp_fraction = float(shrink_tolerance), float(ramp_fraction)
        self.freeze_band = freeze_band
        self.mu_min, self.mu_max, self.initial_mu = float(mu_min), float(mu_max), initial_mu
        self.horizon_steps, self.print_fn, self.guard = horizon_steps, print_fn, bool(guard)
        self.history, self.frozen_at_step, self.restored_gates = [], None, 0
        self._snapshot, self._thresholds = None, []
        self._active, self._integral, self._step, self._epoch, self._log_mu0 = False, 0.0, 0, 0, None
        self._start_bops, self._fit_start, self._ramp_steps, self._last_error = None, 0, 0, None
        self._gates, self._last_gates, self._velocity = [], None, None
        self._resumed = False

    def get_config(self):
        keys = ("target_relative_bops", "signal", "every_n_steps", "kp", "ki", "integral_band", "shrink_tolerance",
                "ramp_fraction", "freeze_band", "mu_min", "mu_max", "initial_mu", "horizon_steps", "guard")
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # The state that a checkpoint keeps (``get_state``): the controller, the counters, the landing guard's snapshot.
    _STATE = ("history", "frozen_at_step", "restored_gates", "_integral", "_step", "_epoch", "_log_mu0",
              "_start_bops", "_fit_start", "_last_error")
    _ARRAY_STATE = ("_snapshot", "_last_gates", "_velocity")

    def get_state(self):
        """The controller's state as JSON-able data (``bbits_tf.training.run`` keeps it in its checkpoints)."""
        state = {key: getattr(self, key) for key in self._STATE}
        state["history"] = [dict(record) for record in self.history]
        for key in self._ARRAY_STATE:
            value = getattr(self, key)
            state[key] = None if value is None else [np.asarray(v).tolist() for v in value]
        return state

    def set_state(self, state):
        """Restores ``get_state``'s data: the next ``fit`` continues the interrupted one (same ramp, same integral,
        gates still frozen: ``mu`` and the frozen learning rates are the model's and optimizer's, restored with
        them)."""
        missing = set(self._STATE + self._ARRAY_STATE) - set(state)
        if missing:
            raise ValueError(f"Not a BopsBudget state: {sorted(missing)} missing. Received: state keys {sorted(state)}")
        for key in self._STATE:
            setattr(self, key, state[key])
        self.history = [dict(record) for record in state["history"]]
        for key in self._ARRAY_STATE:
            value = state[key]
            setattr(self, key, None if value is None else [np.asarray(v, dtype=np.float32) for v in value])
        self._resumed = True

    def on_train_begin(self, logs=None):
        resumed, self._resumed = self._resumed, False
        self._active = bool(bayesian_bits_quantizers(self.model))
        if not self._active:
            return
        if self._log_mu0 is None:
            mu0 = self.initial_mu if self.initial_mu is not None else get_mu(self.model)
            self._log_mu0 = math.log(min(max(mu0, self.mu_min), self.mu_max))
            set_mu(self.model, math.exp(self._log_mu0))
        if not resumed:  # a new fit starts its own ramp (a resumed one goes on with the interrupted fit's)
            self._start_bops, self._fit_start, self._last_error = None, self._step, None
            self._last_gates, self._velocity, self._snapshot = None, None, None
        pairs = [(v[k], gates_lib.get_gate_kind(q.gate).log_alpha_threshold)
                 for _, _, q, v in bayesian_bits_quantizers(self.model) for k in ("log_alpha", "log_alpha_2") if k in v]
        self._gates = [g for g, _ in pairs]
        self._thresholds = [t for _, t in pairs]
        self._ramp_steps = self.ramp_fraction * (self.params.get("steps") or 0) * (self.params.get("epochs") or 0)

    @property
    def _target(self):
        """The value the controller aims at, in the units of ``measure``."""
        return self.target_relative_bops

    def measure(self, expected=False):
        """The controlled quantity: the relative BOPs (test-time gates, or their probabilities)."""
        return _relative_bops(self.model, expected=expected)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _ramp_done(self):
        return (self._step - self._fit_start) / self._ramp_steps if self._ramp_steps else 1.0

    def setpoint(self, measured):
        """The relative BOPs the controller aims at now (``measured``: the BOPs now, kept at the first call)."""
        if self._start_bops is None:
            self._start_bops = max(measured, self._target)
        ratio = self._start_bops / self._target
        return self._target * ratio ** max(0.0, 1.0 - self._ramp_done())

    def projected_bops(self):
        """Test-time relative BOPs after ``horizon_steps`` more steps at the gates' recent velocity."""
        now = [v.numpy() for v in self._gates]
        if self._last_gates is not None:
            velocity = [(a - b) / self.every_n_steps for a, b in zip(now, self._last_gates)]
            self._velocity = velocity if self._velocity is None else [
                0.5 * (a + b) for a, b in zip(velocity, self._velocity)]
        self._last_gates = now
        if self._velocity is None:
            return self.measure()
        try:
            for var, value, speed in zip(self._gates, now, self._velocity):
                var.assign(value + self.horizon_steps * speed)
            return self.measure()
        finally:
            for var, value in zip(self._gates, now):
                var.assign(value)

    def freeze_gates(self):
        """Stops the gates (``GroupedOptimizer.freeze("gates")``; a ``GroupedOptimizer`` is needed); returns whether
        it did."""
        optimizer = getattr(self.model, "optimizer", None)
        if not hasattr(optimizer, "freeze") or "gates" not in getattr(optimizer, "optimizers", {}):
            return False
        if not optimizer.freeze("gates"):
            return False
        self.frozen_at_step = self._step
        return True

    @property
    def band(self):
        """Relative half-width of the band around the target (``freeze_band``, or 0.05)."""
        return self.freeze_band if self.freeze_band is not None else 0.05

    def _restore_candidates(self, now):
        """``[(log_alpha now, gate index, element index)]``: the gate elements on in the snapshot and off ``now``,
        closest to their threshold first."""
        candidates = []
        for i, (snap, cur, threshold) in enumerate(zip(self._snapshot, now, self._thresholds)):
            for index in zip(*np.nonzero((snap > threshold) & (cur <= threshold))):
                candidates.append((float(cur[index]), i, index))
        return sorted(candidates, key=lambda c: -c[0])

    def restore_to(self, floor):
        """Switches gates closed since the last snapshot back on until the test-time BOPs are >= ``floor``.

        Candidates are the gate elements on in the snapshot and off now; they are restored closest-to-threshold
        first, and a binary search finds the fewest that reach ``floor`` (BOPs only grow as gates open). Returns
        ``(relative BOPs after the restore, number of gate elements restored)``.
        """
        now = [v.numpy() for v in self._gates]
        candidates = self._restore_candidates(now)

        def apply(k):
            values = [c.copy() for c in now]
            for _, i, index in candidates[:k]:
                values[i][index] = self._snapshot[i][index]
            for var, value in zip(self._gates, values):
                var.assign(value)
            return self.measure()

        lo, hi = 0, len(candidates)
        while lo < hi:  # the smallest k with bops(k) >= floor (bops(len) >= floor: it is the snapshot's state)
            mid = (lo + hi) // 2
            if apply(mid) >= floor:
                hi = mid
            else:
                lo = mid + 1
        return apply(lo), lo

    def update(self):
        """Measures the BOPs and sets ``mu`` once (or freezes the gates); returns the new ``mu``."""
        projected = self.projected_bops() if self.signal == "projected" else None
        exact = self.measure()
        restored = 0
        floor = self._target * (1.0 - self.band)
        if self.guard and exact >= floor:
            self._snapshot = [v.numpy() for v in self._gates]
        elif self.guard and self._snapshot is not None:
            exact, restored = self.restore_to(floor)
            self.restored_gates += restored
            if not self.freeze_gates():
                warnings.warn("BopsBudget: the landing guard restored gates but cannot freeze them (the model's "
                              "optimizer is not a GroupedOptimizer); they will keep moving.", stacklevel=2)
            self._snapshot = None
        expected = self.measure(expected=True)
        measured = {"projected": projected, "expected": expected, "deterministic": exact}[self.signal]
        setpoint = self.setpoint(measured)
        error = math.log(max(measured, 1e-12) / setpoint)
        shrinking = self._last_error is not None and abs(error) < abs(self._last_error) - self.shrink_tolerance
        self._last_error = error
        integral = self._integral + (error if abs(error) < self.integral_band and not shrinking else 0.0)
        lo, hi = math.log(self.mu_min), math.log(self.mu_max)
        log_mu = self._log_mu0 + self.kp * error + self.ki * integral
        if lo <= log_mu <= hi:
            self._integral = integral  # conditional integration: no wind-up at the bounds
        else:
            log_mu = min(max(self._log_mu0 + self.kp * error + self.ki * self._integral, lo), hi)
        mu = math.exp(log_mu)
        set_mu(self.model, mu)
        self.history.append({"step": self._step, "epoch": self._epoch, "relative_bops": exact,
                             "expected_relative_bops": expected, "projected_relative_bops": projected,
                             "setpoint": setpoint, "mu": mu, "restored_gates": restored})
        if (self.freeze_band is not None and self._ramp_done() >= 1.0
                and abs(exact / self._target - 1.0) <= self.freeze_band):
            self.freeze_gates()
        return mu

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._active and self.frozen_at_step is None and self._step % self.every_n_steps == 0:
            self.update()

    def on_epoch_end(self, epoch, logs=None):
        if not self._active:
            return
        mu = get_mu(self.model)
        if logs is not None:
            logs["mu"] = mu
        if self.print_fn is not None and self.history:
            frozen = f", gates frozen at step {self.frozen_at_step}" if self.frozen_at_step is not None else ""
            self.print_fn(f"{type(self).__name__}: epoch {epoch + 1}: mu {mu:.4g}, {self._describe(self.history[-1])}"
                          f"{frozen}")

    def _describe(self, last):
        """The measured values of an update record, for the epoch line."""
        return (f"relative BOPs {last['relative_bops']:.3f}% (expected {last['expected_relative_bops']:.3f}%), "
                f"target {self.target_relative_bops}%")


class Budget(BopsBudget):
    """Adapts ``mu`` so that the model ends near one or several deployment limits at once (issue 11).

    Limits: ``flash_bytes`` (the exported file, ``bbits_tf.flash``), ``arena_bytes`` (TFLite Micro's tensor arena,
    ``bbits_tf.arena``), ``latency_us`` (LiteRT microseconds, ``bbits_tf.latency``, with ``latency_table`` or the
    table of a model quantized with ``cost=table``), ``relative_bops`` (percent, ``bbits_tf.relative_bops``). The controlled quantity is the
    largest ratio of a predicted value to its limit (the binding one). A limit is a ceiling (the file must fit the
    flash), so the controller aims just under it, at ``1 - band`` (``band``: ``freeze_band``, default 0.025):
    ``BopsBudget``'s PI controller on ``log mu``, its ramp, its freeze band (the gates freeze once the ratio is
    within ``band`` of that aim: between 0.951 and 0.999 of the limit) and its landing guard (which restores gates
    until the ratio is back at ``(1 - band)^2``) act on that ratio; a run lands within 5 % under the limit.
    Under ``quantize_model(cost="arena")`` or ``"flash+arena"`` the prior's
    charges are re-linearised at every update (``bbits_tf.costs.set_prior``): the operator at the arena's peak
    moves as channels go. Which cost the prior charges is the model's (``quantize_model(cost=...)``); the budget
    only sets ``mu``, so charge the cost you limit (a flash limit on a BOP prior lands by pruning what BOPs
    favour, not what the file pays for).

    Args:
        flash_bytes, arena_bytes, latency_us, relative_bops: the limits (``None``: not limited); at least one.
        latency_table: ``tflite_export.profile_latency``'s data (or a ``LatencyTable``) for ``latency_us``.
        int4: the layers the exporter stores as INT4 (as ``tflite_export.export``'s ``int4``; default Dense).
        **kwargs: ``BopsBudget``'s controller arguments (``signal``, ``every_n_steps``, ``kp``, ``ki``,
            ``ramp_fraction``, ``freeze_band``, ``guard``, ...).

    Attributes:
        history: as ``BopsBudget``'s, with ``"ratio"``, ``"expected_ratio"`` and the predicted value of each limit
            (``"flash_bytes"``, ``"arena_bytes"``, ``"relative_bops"``) at the test-time gates.
    """

    LIMITS = ("flash_bytes", "arena_bytes", "latency_us", "relative_bops")

    def __init__(self, *, flash_bytes=None, arena_bytes=None, latency_us=None, relative_bops=None, int4=None,
                 latency_table=None, **kwargs):
        kwargs.setdefault("freeze_band", 0.025)
        super().__init__(100.0, **kwargs)
        limits = {"flash_bytes": flash_bytes, "arena_bytes": arena_bytes, "latency_us": latency_us,
                  "relative_bops": relative_bops}
        limits = {k: checks.number(k, v, minimum=0, strict_minimum=True) for k, v in limits.items() if v is not None}
        if not limits:
            raise ValueError(f"`Budget` needs at least one limit: {', '.join(self.LIMITS)}. Received: none")
        if "relative_bops" in limits and limits["relative_bops"] > 100:
            raise ValueError("`relative_bops` is a percentage of the FP32 BOPs and must be in (0, 100]. "
                             f"Received: relative_bops={limits['relative_bops']!r}")
        self.limits = {k: float(v) for k, v in limits.items()}
        self.int4 = int4  # as given (get_config); ``_int4``: what the cost models use
        self._int4 = flash_lib.DEFAULT_INT4 if int4 is None else int4
        self.latency_table = None
        if latency_table is not None:
            from bbits_tf.latency import LatencyTable  # pylint: disable=import-outside-toplevel
            self.latency_table = LatencyTable(latency_table)

    def get_config(self):
        config = super().get_config()
        del config["target_relative_bops"]
        table = None if self.latency_table is None else self.latency_table.data
        return {**config, **self.limits, "int4": self.int4, "latency_table": table}

    @property
    def _target(self):
        return 1.0 - self.band  # just under the limit

    def predict(self, expected=False):
        """``{limit name: predicted value}`` of the model now."""
        from bbits_tf import arena  # pylint: disable=import-outside-toplevel
        found = {}
        if "flash_bytes" in self.limits:
            found["flash_bytes"] = flash_lib.flash_bytes(self.model, expected=expected, int4=self._int4)
        if "arena_bytes" in self.limits:
            found["arena_bytes"] = arena.arena_bytes(self.model, expected=expected, int4=self._int4)
        if "latency_us" in self.limits:
            from bbits_tf import latency  # pylint: disable=import-outside-toplevel
            table = self.latency_table or getattr(self.model, "bbits_latency_table", None)
            if table is None:
                raise ValueError("Budget(latency_us=...) needs the latency table: `latency_table=` "
                                 "(`tflite_export.profile_latency(model)`), or a model quantized with `cost=table`.")
            found["latency_us"] = latency.latency_us(self.model, table, expected=expected)
        if "relative_bops" in self.limits:
            found["relative_bops"] = _relative_bops(self.model, expected=expected)
        return found

    def measure(self, expected=False):
        """The binding ratio: the largest predicted value over its limit."""
        return max(value / self.limits[key] for key, value in self.predict(expected).items())

    def restore_to(self, floor):
        """The landing guard for a ceiling: switches gates closed since the last snapshot back on, closest to their
        threshold first, skipping any that would take the binding ratio above 1 (over a limit: a bit gate can
        double a layer's bytes), until the ratio is >= ``floor``. Returns ``(ratio, number restored)``."""
        now = [v.numpy() for v in self._gates]
        candidates = self._restore_candidates(now)
        values = [c.copy() for c in now]
        ratio, restored = self.measure(), 0
        for _, i, index in candidates:
            if ratio >= floor:
                break
            old = values[i][index]
            values[i][index] = self._snapshot[i][index]
            self._gates[i].assign(values[i])
            trial = self.measure()
            if trial > 1.0:
                values[i][index] = old
                self._gates[i].assign(values[i])
            else:
                ratio, restored = trial, restored + 1
        return ratio, restored

    def update(self):
        from bbits_tf import costs  # pylint: disable=import-outside-toplevel
        if costs.model_cost(self.model) in ("arena", "flash+arena"):
            costs.set_prior(self.model, int4=self._int4)
        mu = super().update()
        record = self.history[-1]
        record["ratio"] = record.pop("relative_bops")
        record["expected_ratio"] = record.pop("expected_relative_bops")
        record["projected_ratio"] = record.pop("projected_relative_bops")
        record.update(self.predict())
        return mu

    def _describe(self, last):
        return ", ".join(f"{k} {last[k]:,.4g} (limit {v:,.4g})" for k, v in self.limits.items())
