"""Latency: a model's LiteRT latency predicted from the gates and a measured table (issue 11).

``tflite_export.profile_latency(model)`` measures every MAC layer alone at a grid of kept input and output
channels (plain data); ``LatencyTable`` reads it. XNNPACK computes in tiles of channels, so a layer's latency is a
staircase in its kept channels: the prediction takes, per layer, the measured point at or above its kept channels
(the grid is 1/8 of the channels, finer than the tiles of LeNet-sized layers) and adds the table's ``other_us``
(pooling, reshapes, the interpreter: the whole model minus its layers, measured unpruned)::

    latency = other_us + sum over MAC layers of table(layer, kept inputs, kept outputs)

The prior (``quantize_model(cost=LatencyTable(...))``, ``bbits_tf.costs``) needs a slope, which a staircase does
not have (0 on a step): it charges each channel the slope of the least-squares line through the layer's table
along its output channels (and, for the layers that read it, along their input channels): the average cost of a
channel over the layer's range, which stays positive on the steps. Bit widths do not change the latency of
an int8 file (every weight INT8 or INT4, every activation int8): bit gates pay nothing.
"""
import dataclasses
import json

import numpy as np

from bbits_tf import bops as bops_lib
from bbits_tf import graph


class LatencyTable:
    """``tflite_export.profile_latency``'s data, interpolated (``LatencyTable(data)`` or ``LatencyTable.load(path)``)."""

    def __init__(self, data):
        if isinstance(data, LatencyTable):
            data = data.data
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or "other_us" not in data:
            raise ValueError("A latency table is the dict that `tflite_export.profile_latency(model)` returns "
                             "(keys 'layers', 'other_us', ...). Received: "
                             f"{type(data).__name__}{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''}")
        self.data = data
        self._grids = {}
        for name, layer in data["layers"].items():
            points = np.asarray(layer["points"], np.float64)
            ins, outs = np.unique(points[:, 0]), np.unique(points[:, 1])
            grid = np.full((len(ins), len(outs)), np.nan)
            for c_in, c_out, us in points:
                grid[np.searchsorted(ins, c_in), np.searchsorted(outs, c_out)] = us
            self._grids[name] = (ins, outs, grid, layer["kind"] in ("DepthwiseConv2D", "op"))

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)

    @property
    def other_us(self):
        return float(self.data["other_us"])

    def layers(self):
        return list(self._grids)

    def layer_us(self, name, kept_in, kept_out, smooth=False):
        """Microseconds of layer ``name`` with ``kept_in`` input and ``kept_out`` output channels: the grid point at
        or above them (``smooth``: bilinear interpolation, extrapolated linearly below the grid)."""
        if name not in self._grids:
            raise KeyError(f"The latency table has no layer {name!r} (it has {sorted(self._grids)}); profile this "
                           "model with `tflite_export.profile_latency`.")
        ins, outs, grid, depthwise = self._grids[name]
        if depthwise:  # one axis: a depthwise layer keeps its inputs' channels
            diag = np.array([grid[i, i] for i in range(len(ins))])
            return float(_axis(ins, diag, kept_in, smooth))
        rows = np.array([_axis(outs, grid[i], kept_out, smooth) for i in range(len(ins))])
        return float(_axis(ins, rows, kept_in, smooth))


def _axis(xs, ys, x, smooth):
    if len(xs) == 1:
        return ys[0]
    if not smooth:
        return ys[min(int(np.searchsorted(xs, x - 1e-9)), len(xs) - 1)]
    if x <= xs[0]:  # linear below the grid, towards zero channels, never below 0
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return max(ys[0] + slope * (x - xs[0]), 0.0)
    return np.interp(x, xs, ys)


@dataclasses.dataclass
class LayerLatency:
    name: str
    kept_in: float
    kept_out: float
    us: float


def _table(table):
    return table if isinstance(table, LatencyTable) else LatencyTable(table)


def layer_latency(model, table, *, expected=False, smooth=False):
    """Per MAC layer, its predicted microseconds at the kept channels (``LayerLatency`` rows)."""
    table = _table(table)
    records, tensors = bops_lib.walk(model, expected=expected)
    rows = []
    for layer in graph.topological_layers(model):  # weightless operators the table has (pooling, Add, ...)
        name = graph.inner_layer(layer).name
        if table.data["layers"].get(name, {}).get("kind") == "op":
            kept = sum(float(np.sum(tensors[id(src)].keep)) for src in graph.inbound_layers(model, layer))
            rows.append(LayerLatency(name, kept, kept, table.layer_us(name, kept, kept, smooth)))
    for r in records:
        if graph.mac_kind(r.layer) == "Dense" and r.total_in != _table_total_in(table, r):
            kept_in = r.kept_in * _table_total_in(table, r) / r.total_in
        else:
            kept_in = r.kept_in
        rows.append(LayerLatency(r.name, r.kept_in, r.kept_out, table.layer_us(r.name, kept_in, r.kept_out, smooth)))
    return rows


def _table_total_in(table, record):
    return table.data["layers"].get(record.name, {}).get("total_in", record.total_in)


def latency_us(model, table, *, expected=False):
    """Predicted LiteRT latency (microseconds) of the exported file under the table's delegate and threads."""
    table = _table(table)
    return table.other_us + sum(r.us for r in layer_latency(model, table, expected=expected))


def level_costs(model, table):
    """``{(wrapper name, "weight"): microseconds per level}`` of the latency prior (before scaling): a pruning
    gate's channel pays the smooth slope of its own layer in its output channels and of each reader's in its input
    channels; bit levels pay nothing."""
    table = _table(table)
    records, tensors = bops_lib.walk(model, expected=True)
    by_name = {r.layer.name: r for r in records}
    charge = {name: 0.0 for name in by_name}

    def slope(r, axis):
        """Microseconds per output channel (``"out"``) or per input element (``"in"``) of the layer: the least-squares
        line through the table along that axis at the other axis' current value (a staircase's local slope is 0
        on its steps, and a layer on a step would never be charged)."""
        ins, outs, _, depthwise = table._grids[r.name]  # pylint: disable=protected-access
        scale = _table_total_in(table, r) / max(r.total_in, 1)
        kept_in, kept_out = r.kept_in * scale, r.kept_out
        xs = outs if axis == "out" and not depthwise else ins
        if len(xs) < 2:
            return 0.0
        ys = [table.layer_us(r.name, kept_in if axis == "out" else x, x if axis == "out" else kept_out, smooth=True)
              for x in xs]
        per = float(np.polyfit(np.asarray(xs, np.float64), np.asarray(ys), 1)[0])
        return max(per, 0.0) * (scale if axis == "in" else 1.0)

    for r in records:
        charge[r.layer.name] += slope(r, "out")
        (src,) = graph.inbound_layers(model, r.layer)
        owner = tensors[id(src)].owner
        if owner is not None and owner.name in by_name and graph.mac_kind(r.layer) != "DepthwiseConv2D":
            per_owner_channel = r.total_in / by_name[owner.name].total_out  # positions after a Flatten
            charge[owner.name] += slope(r, "in") * per_owner_channel
    state = bops_lib._quantizer_state(model)  # pylint: disable=protected-access
    out = {}
    for name, r in by_name.items():
        levels = np.zeros(len(state[name]["weight"][0].bit_widths))
        levels[0] = charge[name] * r.total_out
        out[(name, "weight")] = levels
    return out
