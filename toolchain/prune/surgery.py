"""Structured (filter/channel) pruning surgery: physically rebuild a narrower Functional model.

Removing output channel ``c`` of a Conv1D/Conv2D/Dense ("producer") changes every layer that sees that
channel afterwards: BatchNormalization and DepthwiseConv2D carry it through ("tied": their input
*and* output channels shrink), and the next Conv2D/Dense ("consumer") loses the matching input
channel (kernel rows; for a Dense after ``Flatten`` of an HxWxC map, every row ``i`` with
``i % C == c``). A residual ``Add`` forces all of its inputs to drop the same channels, so the
producers feeding one ``Add`` chain form a single **channel group** (union-find over channel
spaces). ``channel_groups(model)`` finds these groups by walking the Functional graph;
``remove_channels(model, removals)`` returns a new model in which the chosen channels of each group
no longer exist (same layer names, same input and output shapes); ``zero_channels(model,
removals)`` is the masked reference: a clone whose chosen channels output exactly zero. The two
agree (the tests check ``max |narrow(x) - zeroed(x)| <= 1e-4``), which is what makes structured
pruning an honest size and speed win rather than zeros still stored and computed.

A group is excluded from pruning (``ChannelAnalysis.excluded``, with its reasons) when its
channels reach the model output un-consumed (so the classifier is never a producer), carry the
model input's channels, meet a layer that mixes or re-lays channels (``Concatenate``,
``Reshape``, ``Softmax``), pass an activation that does not map 0 to 0 (a removed channel would
then differ from a zeroed one), or meet an ``Add`` whose inputs are laid out differently.
Roles come from ``toolchain.layers`` (a kernel's input/output channel axes: Conv1D (k, cin, cout)
1 and 2, Conv2D 2 and 3, Dense 0 and 1). Layers outside ``CHANNEL_ROLES`` (and shared layers, nested models, grouped convolutions,
channels-first layouts) make the whole model unsupported: ``UnsupportedLayerError`` names every
offender at once.

Groups are named after their first producer in ``model.layers`` order; that name is the key of
``removals``. Nothing here mutates the user's model: weights are read, new layers are built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, UnsupportedLayerError
from toolchain.layers import (BOUNDARY, CARRY as PASS, ELEMENTWISE, FLATTEN, INPUT, KERNEL_LAYERS, MERGE,  # noqa: F401
                              PRODUCER, TIED)
from toolchain.layers import CHANNEL_ROLES as LAYER_CHANNEL_ROLES

#: layer class -> role in the channel walk (read from ``toolchain.layers``). Anything else is
#: refused with its name and class.
CHANNEL_ROLES: Mapping[str, str] = LAYER_CHANNEL_ROLES

#: activations that combine channels (not elementwise): a group meeting one is not prunable
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")

#: weight short name -> (input-channel axis, output-channel axis) per layer class
_WEIGHT_AXES: Mapping[str, Mapping[str, Tuple[Optional[int], Optional[int]]]] = {
    **{cls: facts.weight_axes() for cls, facts in KERNEL_LAYERS.items()},
    "BatchNormalization": {"gamma": (0, None), "beta": (0, None), "moving_mean": (0, None),
                           "moving_variance": (0, None)},
}
# Zeroing these per-channel BN parameters makes BN(0) == 0 whatever center/scale are.
_BN_ZEROED = ("gamma", "beta", "moving_mean")


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be removed together (one index space of ``num_channels``).

    ``producers``: Conv2D/Dense layers whose output channels these are (several when joined by a
    residual ``Add``). ``tied``: BatchNormalization/DepthwiseConv2D layers whose input and output
    channels are these channels. ``consumers``: Conv2D/Dense layers whose *input* channels shrink.
    """

    name: str
    producers: Tuple[str, ...]
    tied: Tuple[str, ...]
    consumers: Tuple[str, ...]
    num_channels: int


@dataclass(frozen=True)
class ExcludedGroup:
    """Producers whose channels cannot be removed, and why."""

    name: str
    producers: Tuple[str, ...]
    num_channels: int
    reasons: Tuple[str, ...]


@dataclass(frozen=True)
class ChannelAnalysis:
    """All channel groups of a model: the prunable ones and the excluded ones (with reasons)."""

    groups: Tuple[ChannelGroup, ...]
    excluded: Tuple[ExcludedGroup, ...] = ()

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(f"unknown channel group {name!r}; known: {_known(self)}")


# --------------------------------------------------------------------------------------------
# The channel walk


@dataclass
class _Space:
    """A channel index space under construction (merged by union-find)."""

    channels: int
    producers: List[str] = field(default_factory=list)
    tied: List[str] = field(default_factory=list)
    consumers: List[str] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Use:
    """How one layer sees one channel space.

    ``owner_in[i]`` / ``owner_out[i]`` is the group channel that position ``i`` of the layer's
    input / output channel axis belongs to (identity for a producer's output; tiled after Flatten;
    repeated after a DepthwiseConv2D with depth_multiplier > 1).
    """

    kind: str  # PRODUCER (output side), "consumer" (input side) or TIED (both)
    layer: str
    space: int
    owner_in: Optional[np.ndarray]
    owner_out: Optional[np.ndarray]


@dataclass
class _Walk:
    spaces: List[_Space]
    parent: List[int]
    uses: List[_Use]

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def new(self, channels: int, producer: str | None = None, reason: str | None = None) -> int:
        self.spaces.append(_Space(int(channels)))
        self.parent.append(len(self.parent))
        s = len(self.spaces) - 1
        if producer:
            self.spaces[s].producers.append(producer)
        if reason:
            self.spaces[s].reasons.append(reason)
        return s

    def space(self, s: int) -> _Space:
        return self.spaces[self.find(s)]

    def block(self, s: int, reason: str) -> None:
        reasons = self.space(s).reasons
        if reason not in reasons:
            reasons.append(reason)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        root, child = min(ra, rb), max(ra, rb)  # deterministic root: the older space
        dst, src = self.spaces[root], self.spaces[child]
        for attr in ("producers", "tied", "consumers", "reasons"):
            merged = getattr(dst, attr)
            merged.extend(x for x in getattr(src, attr) if x not in merged)
        self.parent[child] = root
        return root


def _model_nodes(model) -> list:
    depths = getattr(model, "_nodes_by_depth", None)
    if not getattr(model, "_is_graph_network", False) or depths is None:
        raise UnsupportedLayerError(
            f"model {getattr(model, 'name', model)!r} ({type(model).__name__}) is not a Functional "
            "or Sequential graph; channel pruning needs the layer graph, rebuild it as a "
            "Functional model")
    nodes = []
    for depth in sorted(depths, reverse=True):
        nodes.extend(depths[depth])
    return nodes


def _activation_name(fn) -> str:
    return getattr(fn, "__name__", str(fn))


def _zero_image(fn) -> float:
    """max |f(0)| of an elementwise function (0 means a zeroed channel stays zero)."""
    import tensorflow as tf

    return float(np.max(np.abs(np.asarray(fn(tf.zeros((1, 4), tf.float32))))))


def _check_supported(model, nodes) -> None:
    import tensorflow as tf

    offenders = []
    calls: Dict[str, int] = {}
    for node in nodes:
        calls[node.layer.name] = calls.get(node.layer.name, 0) + 1
    for layer in model.layers:
        cls = type(layer).__name__
        fmt = getattr(layer, "data_format", "channels_last")
        if isinstance(layer, tf.keras.Model):
            offenders.append(f"{layer.name} (nested model {cls}: flatten it into one Functional model)")
        elif cls not in CHANNEL_ROLES:
            offenders.append(f"{layer.name} ({cls})")
        elif calls.get(layer.name, 0) > 1:
            offenders.append(f"{layer.name} ({cls} applied {calls[layer.name]} times: shared layers)")
        elif getattr(layer, "groups", 1) != 1:
            offenders.append(f"{layer.name} ({cls} with groups={layer.groups})")
        elif fmt not in (None, "channels_last"):
            offenders.append(f"{layer.name} ({cls} with data_format={fmt!r})")
        elif cls == "BatchNormalization":
            axis = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]
            rank = len(layer.input_shape)
            if [a % rank for a in axis] != [rank - 1]:
                offenders.append(f"{layer.name} ({cls} over axis {layer.axis}, not the channel axis)")
    if offenders:
        raise UnsupportedLayerError(
            f"channel pruning cannot handle: {', '.join(offenders)}; supported: "
            f"{', '.join(sorted(CHANNEL_ROLES))} (channels_last, one call per layer); replace "
            "them or use weight (unstructured) granularity")


def _walk(model) -> Tuple[_Walk, list]:
    import tensorflow as tf

    nodes = _model_nodes(model)
    _check_supported(model, nodes)
    w = _Walk([], [], [])
    tensors: Dict[int, Tuple[int, np.ndarray]] = {}  # id(KerasTensor) -> (space, owner)

    for node in nodes:
        layer = node.layer
        name, cls = layer.name, type(layer).__name__
        role = CHANNEL_ROLES[cls]
        outs = tf.nest.flatten(node.outputs)
        out_channels = int(outs[0].shape[-1])
        if role == INPUT:
            s = w.new(out_channels, reason=f"carries the channels of model input {name!r}")
            tensors[id(outs[0])] = (s, np.arange(out_channels))
            continue
        in_tensors = tf.nest.flatten(node.keras_inputs)
        ins = [tensors[id(t)] for t in in_tensors]
        s_in, owner_in = ins[0]

        if role == PRODUCER:
            w.uses.append(_Use("consumer", name, s_in, owner_in, None))
            w.space(s_in).consumers.append(name)
            s = w.new(out_channels, producer=name)
            act = _activation_name(layer.activation)
            if act in _MIXING_ACTIVATIONS:
                w.block(s, f"{name} ({cls}) has activation {act!r}, which mixes channels")
            elif _zero_image(layer.activation) != 0.0:
                w.block(s, f"{name} ({cls}) has activation {act!r}, which maps 0 to a nonzero "
                           "value, so a removed channel would differ from a zeroed one")
            out = (s, np.arange(out_channels))
        elif role == TIED:
            owner_out = owner_in
            if cls in KERNEL_LAYERS and KERNEL_LAYERS[cls].depthwise:
                owner_out = np.repeat(owner_in, int(layer.depth_multiplier))
                act = _activation_name(layer.activation)
                if act in _MIXING_ACTIVATIONS or _zero_image(layer.activation) != 0.0:
                    w.block(s_in, f"{name} ({cls}) has activation {act!r}, which does not keep "
                                  "zeroed channels at zero")
            w.uses.append(_Use(TIED, name, s_in, owner_in, owner_out))
            w.space(s_in).tied.append(name)
            out = (s_in, owner_out)
        elif role == ELEMENTWISE:
            fn = layer.activation if cls == "Activation" else layer.call
            act = _activation_name(layer.activation) if cls == "Activation" else cls
            if act in _MIXING_ACTIVATIONS:
                w.block(s_in, f"feeds {name} (activation {act!r}), which mixes channels")
                out = (w.new(out_channels, reason=f"produced by {name} (activation {act!r})"),
                       np.arange(out_channels))
            else:
                if _zero_image(fn) != 0.0:
                    w.block(s_in, f"passes {name} ({act}), which maps 0 to a nonzero value, so a "
                                  "removed channel would differ from a zeroed one")
                out = (s_in, owner_in)
        elif role == PASS:
            out = (s_in, owner_in)
        elif role == FLATTEN:
            positions = int(np.prod(in_tensors[0].shape[1:-1]))  # 1 for an already flat input
            out = (s_in, np.tile(owner_in, positions))
        elif role == MERGE:
            same = all(len(o) == len(owner_in) and np.array_equal(o, owner_in)
                       and w.space(s).channels == w.space(s_in).channels for s, o in ins)
            if same:
                root = s_in
                for s, _ in ins[1:]:
                    root = w.union(root, s)
                out = (root, owner_in)
            else:
                for s, _ in ins:
                    w.block(s, f"feeds {name} ({cls}) whose inputs are laid out differently")
                out = (w.new(out_channels, reason=f"produced by {name} ({cls}) with mismatched inputs"),
                       np.arange(out_channels))
        else:  # BOUNDARY
            for s, _ in ins:
                w.block(s, f"feeds {name} ({cls}), which channel pruning does not support")
            out = (w.new(out_channels, reason=f"produced by {name} ({cls})"), np.arange(out_channels))
        tensors[id(outs[0])] = out

    for t in model.outputs:
        w.block(tensors[id(t)][0], f"reaches the model output {t.node.layer.name!r} un-consumed")
    return w, nodes


def _analyse(model) -> Tuple[ChannelAnalysis, _Walk, Dict[int, str]]:
    w, _ = _walk(model)
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    roots = sorted({w.find(s) for s in range(len(w.spaces)) if w.space(s).producers},
                   key=lambda r: min(order[p] for p in w.spaces[r].producers))
    groups, excluded, names = [], [], {}
    for r in roots:
        sp = w.spaces[r]
        producers = tuple(sorted(sp.producers, key=order.get))
        names[r] = producers[0]
        if sp.reasons:
            excluded.append(ExcludedGroup(producers[0], producers, sp.channels, tuple(sp.reasons)))
        else:
            groups.append(ChannelGroup(producers[0], producers, tuple(sorted(sp.tied, key=order.get)),
                                       tuple(sorted(sp.consumers, key=order.get)), sp.channels))
    return ChannelAnalysis(tuple(groups), tuple(excluded)), w, names


def channel_analysis(model) -> ChannelAnalysis:
    """The prunable channel groups of ``model`` and the excluded ones with their reasons."""
    return _analyse(model)[0]


def channel_groups(model) -> List[ChannelGroup]:
    """The sets of output channels of ``model`` that can be removed, each as one group."""
    return list(channel_analysis(model).groups)


# --------------------------------------------------------------------------------------------
# Validation of a removal request


def _known(analysis: ChannelAnalysis) -> str:
    return ", ".join(f"{g.name} ({g.num_channels})" for g in analysis.groups) or "none"


def _removed_channels(analysis: ChannelAnalysis, removals) -> Dict[str, np.ndarray]:
    """Group name -> sorted channel indices to remove; every problem reported at once."""
    if not isinstance(removals, Mapping):
        raise ConfigError(
            f"removals must be a mapping of group name to channel indices, got "
            f"{type(removals).__name__}; pass e.g. {{'conv1': [0, 3]}}")
    groups = {g.name: g for g in analysis.groups}
    excluded = {e.name: e for e in analysis.excluded}
    producer_of = {p: g.name for g in analysis.groups for p in g.producers if p != g.name}
    issues: List[str] = []
    plan: Dict[str, np.ndarray] = {}
    for key, indices in removals.items():
        if key not in groups:
            if key in excluded:
                issues.append(f"{key!r} is not prunable ({'; '.join(excluded[key].reasons)})")
            elif key in producer_of:
                issues.append(f"{key!r} is a producer of group {producer_of[key]!r}; use the group name")
            else:
                issues.append(f"{key!r} is not a channel group")
            continue
        n = groups[key].num_channels
        try:
            values = list(indices)
        except TypeError:
            issues.append(f"{key!r}: indices {indices!r} are not a sequence of integers")
            continue
        bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
        if bad:
            issues.append(f"{key!r}: non-integer indices {bad[:5]}")
            continue
        out = sorted({int(v) for v in values if not 0 <= int(v) < n})
        if out:
            issues.append(f"{key!r}: indices {out[:10]} outside [0, {n})")
            continue
        if len(set(int(v) for v in values)) != len(values):
            dup = sorted({int(v) for v in values if values.count(v) > 1})
            issues.append(f"{key!r}: duplicate indices {dup[:10]}")
            continue
        if len(values) >= n:
            issues.append(f"{key!r}: removing all {n} channels (at least 1 must remain)")
            continue
        if values:
            plan[key] = np.array(sorted(int(v) for v in values), dtype=np.int64)
    if issues:
        raise ConfigError(
            f"cannot remove channels: {'; '.join(issues)}; prunable groups (channels): "
            f"{_known(analysis)}; pass group names with distinct in-range indices that keep >= 1 "
            "channel per group")
    return plan


@dataclass(frozen=True)
class _LayerEdit:
    """Positions of one layer's input / output channel axes that are removed (None: untouched)."""

    removed_in: Optional[np.ndarray] = None
    removed_out: Optional[np.ndarray] = None


def _edits(model, removals) -> Tuple[Dict[str, _LayerEdit], Dict[str, int]]:
    """Per-layer removed positions and the new width of every narrowed producer."""
    analysis, w, names = _analyse(model)
    plan = _removed_channels(analysis, removals)
    masks: Dict[int, np.ndarray] = {}
    for root, name in names.items():
        if name in plan:
            mask = np.zeros(w.spaces[root].channels, dtype=bool)
            mask[plan[name]] = True
            masks[root] = mask  # True = removed
    edits: Dict[str, _LayerEdit] = {}
    widths: Dict[str, int] = {}
    for use in w.uses:
        mask = masks.get(w.find(use.space))
        if mask is None:
            continue
        old = edits.get(use.layer, _LayerEdit())
        if use.kind == "consumer":
            edits[use.layer] = _LayerEdit(np.flatnonzero(mask[use.owner_in]), old.removed_out)
        else:  # TIED
            edits[use.layer] = _LayerEdit(np.flatnonzero(mask[use.owner_in]),
                                          np.flatnonzero(mask[use.owner_out]))
    for root, mask in masks.items():
        for p in w.spaces[root].producers:
            old = edits.get(p, _LayerEdit())
            edits[p] = _LayerEdit(old.removed_in, np.flatnonzero(mask))
            widths[p] = int(mask.size - mask.sum())
    return edits, widths


def _short(weight) -> str:
    return weight.name.split("/")[-1].split(":")[0]


def _edited_weights(layer, edit: _LayerEdit, zero: bool) -> List[np.ndarray]:
    """``layer``'s weights with the edit's positions deleted (or zeroed when ``zero``)."""
    cls = type(layer).__name__
    axes = _WEIGHT_AXES[cls]
    result = []
    for var, value in zip(layer.weights, layer.get_weights()):
        short = _short(var)
        value = np.array(value, copy=True)
        in_axis, out_axis = axes.get(short, (None, None))
        if zero:
            if cls == "BatchNormalization" and short not in _BN_ZEROED:
                in_axis = None  # moving_variance stays: BN(0) is already 0
            if cls in KERNEL_LAYERS and KERNEL_LAYERS[cls].prune_role == PRODUCER:
                in_axis = None  # consumers see zeros; their rows may stay
            for axis, pos in ((in_axis, edit.removed_in), (out_axis, edit.removed_out)):
                if axis is not None and pos is not None and pos.size:
                    index = [slice(None)] * value.ndim
                    index[axis] = pos
                    value[tuple(index)] = 0.0
        else:
            for axis, pos in ((in_axis, edit.removed_in), (out_axis, edit.removed_out)):
                if axis is not None and pos is not None and pos.size:
                    value = np.delete(value, pos, axis=axis)
        result.append(value)
    return result


def _rebuild(model, edits: Dict[str, _LayerEdit], widths: Dict[str, int], zero: bool):
    import tensorflow as tf

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name in widths and not zero:
            config[KERNEL_LAYERS[type(layer).__name__].width_attr] = widths[layer.name]
        return layer.__class__.from_config(config)

    new = tf.keras.models.clone_model(model, clone_function=clone_layer)
    for layer in model.layers:
        if not layer.weights:
            continue
        target = new.get_layer(layer.name)
        if layer.name in edits:
            target.set_weights(_edited_weights(layer, edits[layer.name], zero))
        else:
            target.set_weights(layer.get_weights())
    return new


def remove_channels(model, removals: Mapping[str, Sequence[int]]):
    """A new, narrower Functional model without the given channels of each group.

    ``removals`` maps group names (see ``channel_groups``) to the channel indices to delete; every
    group keeps at least one channel. Producers lose kernel columns and biases, tied
    BatchNormalization / DepthwiseConv2D layers lose their per-channel parameters, consumers lose
    the matching kernel rows (after ``Flatten``: every row ``i`` with ``i % C == c``). Layer names,
    inputs and outputs stay the same; ``model`` is not modified.
    """
    edits, widths = _edits(model, removals)
    return _rebuild(model, edits, widths, zero=False)


def zero_channels(model, removals: Mapping[str, Sequence[int]]):
    """The masked reference of ``remove_channels``: a clone whose given channels output exactly 0.

    Producer kernel columns and biases, tied DepthwiseConv2D kernels and biases, and tied
    BatchNormalization gamma, beta and moving mean are zeroed on those channels (so BN(0) == 0);
    consumers are unchanged (they see zeros). ``model`` is not modified.
    """
    edits, _ = _edits(model, removals)
    return _rebuild(model, edits, {}, zero=True)


def count_params(model) -> int:
    """Number of scalars in every weight of ``model`` (trainable and not, e.g. BN statistics)."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights))
