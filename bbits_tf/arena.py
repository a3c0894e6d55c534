"""Arena: the TFLite Micro tensor arena the exported int8 model needs, predicted from the gates (issue 11).

TFLite Micro plans the non-persistent part of its arena offline: each int8 activation tensor lives from the
operator that writes it to the last one that reads it, and an operator's scratch buffers live while it runs. The
INT4 weights of a FULLY_CONNECTED layer (``bbits_tf.flash``: the exporter's ``int4`` layers at <= 4 bits) are
unpacked into such a scratch buffer, one byte per kept weight. The prediction is::

    arena = max over operators t of (bytes of the tensors live at t + scratch of t)
            + PERSISTENT_BYTES + PERSISTENT_BYTES_PER_CHANNEL * (kept output channels of the convolutions)
            + PERSISTENT_BYTES_PER_REFINE * (QUANTIZE operators of the exporter's ``refine_inputs``)

with the model's operators in graph order (``io="int8"``: the model input is one int8 tensor), each tensor's
size its positions times its kept channels (a pruned channel is gone from the file), and a layer input that the
exporter re-quantizes at a finer scale (2- or 4-bit) copied by a QUANTIZE operator just before its first reader.
The sum of the live tensors is the lower bound of TFLM's greedy planner; on chains and residual blocks it is
what the planner finds. The persistent part (interpreter and operator data, per-channel requantization
multipliers and shifts of a convolution: 8 bytes a channel) was fitted to exported LeNet5 and branched models
(README, "Deployment budgets"), within 5 % of ``tflite_export``'s measured ``tflm_arena_bytes`` there.

Deterministic: the test-time gates. Expected: each tensor's expected kept channels, each INT4 scratch buffer
times the probability that its layer stores <= 4 bits (the arena of the expected model, not the expectation of
the maximum).
"""
import dataclasses

import numpy as np

from bbits_tf import bops as bops_lib
from bbits_tf import flash as flash_lib
from bbits_tf import graph

PERSISTENT_BYTES = 2300
PERSISTENT_BYTES_PER_CHANNEL = 8
PERSISTENT_BYTES_PER_REFINE = 100


@dataclasses.dataclass
class Operator:
    """One TFLite operator of the predicted plan."""

    name: str
    live_bytes: float  # the int8 tensors alive while it runs (its inputs and output among them)
    scratch_bytes: float  # unpacked INT4 weights
    bytes: float  # live + scratch
    live: list = dataclasses.field(default_factory=list, repr=False)  # its live buffers (their gates: the prior)
    layer: object = None  # the layer it runs (None: an exporter QUANTIZE)


@dataclasses.dataclass
class Plan:
    """The predicted arena: operators, peak and persistent parts."""

    operators: list
    peak_bytes: float
    peak_operator: str
    persistent_bytes: float
    arena_bytes: float


@dataclasses.dataclass
class _Buffer:
    key: object
    bytes: float
    owner: object  # wrapper layer whose pruning gates set its channels (None: none)
    per_channel: float  # bytes per channel of the owner (positions, times the tiling of a Flatten)
    start: int
    end: int


def _tensor_bytes(model, layer, tensor):
    """(bytes, number of channel groups) of a layer's int8 output at the kept channels."""
    shape = graph.output_shape(model, layer)
    positions = int(np.prod(shape[1:-1] or [1]))
    return positions * float(np.sum(tensor.keep)), len(tensor.keep)


def plan(model, *, expected=False, int4=flash_lib.DEFAULT_INT4):
    """The predicted TFLite Micro arena of the exported int8 model (a ``Plan``)."""
    records, tensors = bops_lib.walk(model, expected=expected)
    by_layer = {id(r.layer): r for r in records}
    state = flash_lib.weight_state(model)
    ops = flash_lib.tflite_ops(model)
    test_time = bops_lib.layer_bops(model) if expected else records  # the file's QUANTIZE ops: test-time bits
    refined = {(id(src), id(reader)) for src, reader in flash_lib.refined_inputs(model, test_time)}
    alias = {}  # removed layers (Dropout, ...) read as their input

    def source(layer):
        while id(layer) in alias:
            layer = alias[id(layer)]
        return layer

    for layer in graph.topological_layers(model):
        if layer not in ops and graph.inbound_layers(model, layer):
            alias[id(layer)] = graph.inbound_layers(model, layer)[0]
    buffers, schedule = {}, []

    def add_buffer(key, layer, start):
        t = tensors[id(layer)]
        size, groups = _tensor_bytes(model, layer, t)
        per_channel = 0.0
        if t.owner is not None:
            per_channel = size / max(float(np.sum(t.keep)), 1e-12) * groups / by_layer[id(t.owner)].total_out
        buffers[key] = _Buffer(key, size, t.owner, per_channel, start, start)

    inputs = [layer for layer in graph.topological_layers(model) if not graph.inbound_layers(model, layer)]
    for layer in inputs:
        add_buffer(id(layer), layer, 0)
    step = 0
    for layer in ops:
        reads = [source(src) for src in graph.inbound_layers(model, layer)]
        keys = []
        for src in reads:
            key = id(src)
            if (id(src), id(layer)) in refined:  # the exporter's QUANTIZE copy of a coarse input
                key = ("refined", id(src), id(layer))
                if key not in buffers:
                    buffers[id(src)].end = step
                    schedule.append((f"quantize {src.name}", None, 0.0))
                    add_buffer(key, src, step)
                    step += 1
            keys.append(key)
        for key in keys:
            buffers[key].end = step
        add_buffer(id(layer), layer, step)
        record = by_layer.get(id(layer))
        unpack = 0.0
        if record is not None and flash_lib.is_int4_layer(layer, int4):
            quantizer, variables = state[layer.name]
            p_int4 = sum(p for b, p in quantizer.bit_width_probs(variables, expected=expected).items() if b <= 4)
            unpack = p_int4 * float(np.prod(graph.kernel_shape(layer))) * record.keep
        schedule.append((layer.name, layer, unpack))
        step += 1
    for layer in graph.topological_layers(model):  # the model's outputs live to the end
        if not graph.outbound_layers(model, layer) and id(source(layer)) in buffers:
            buffers[id(source(layer))].end = step
    operators = []
    for t, (name, layer, unpack) in enumerate(schedule):
        live = [b for b in buffers.values() if b.start <= t <= b.end]
        size = sum(b.bytes for b in live)
        operators.append(Operator(name, size, unpack, size + unpack, live, layer))
    peak = max(operators, key=lambda o: o.bytes)
    conv_channels = sum(r.kept_out for r in records if graph.mac_kind(r.layer) != "Dense")
    persistent = (PERSISTENT_BYTES + PERSISTENT_BYTES_PER_CHANNEL * conv_channels
                  + PERSISTENT_BYTES_PER_REFINE * len(refined))
    return Plan(operators, peak.bytes, peak.name, persistent, peak.bytes + persistent)


def arena_bytes(model, *, expected=False, int4=flash_lib.DEFAULT_INT4):
    """Predicted TFLite Micro arena bytes of the exported int8 model."""
    return plan(model, expected=expected, int4=int4).arena_bytes
