"""Pruning criteria (``prune.relevance``, ``prune.magnitude``, ``prune.random``) and the selection
of what to remove from their scores.

A criterion turns a model into *scores*: one per kernel weight (``weight_scores``, kernel-shaped
arrays keyed by layer name) or one per output channel of a channel group (``filter_scores``, keyed
by group name). The lower the score, the sooner the unit is removed. ``select`` turns scores into
keep-masks for a ``Target``:

* ``Target.nonpositive()`` — the paper's rule: remove every unit whose score is <= 0 (only
  meaningful for signed scores, i.e. relevance);
* ``Target.at(S)`` — remove the lowest-scored fraction ``S`` in [0, 1).

Scope of a sparsity target (``scope``):

* ``"layer"`` (default) — every layer (or channel group) loses the same fraction ``S``. LRP
  relevance grows and shrinks from layer to layer (conservation holds only approximately, and
  biases, epsilon and pooling leak relevance), so raw scores of different layers are not
  comparable; per-layer ranking is the safe default, and it is what tfmot's magnitude pruning does.
* ``"global"`` — one ranking over all layers. Relevance scores are first divided by their layer's
  total |relevance| (each unit's share of its layer), magnitude and random scores are ranked raw
  (global magnitude pruning as in Han et al.).

Relevance scores: the engine gives per-weight relevance summed over the calibration samples.
``score`` says how a unit's score is made from it (signed ``sum``, ``abs`` = sum of |relevance|,
``abs_sum`` = |sum|), ``source`` which layers' relevance scores a filter. The defaults
(``DEFAULT_SCORE``, ``DEFAULT_SOURCE``) are the variant that keeps the most accuracy on the MLPerf
Tiny DS-CNN without fine-tuning; they do not win everywhere: on the digits CNN and at weight
granularity magnitude does better (benchmarks/results/pruning.md has every variant measured).

Counting follows tfmot: a layer of ``n`` units keeps ``max(round(n * (1 - S)), 1)`` of them
(NumPy's round half to even, like ``tf.math.round``). Ties are broken by position (a stable sort),
so for a fixed score the mask at a higher sparsity always contains the mask at a lower one.
Channel groups always keep at least one channel (a zero-width layer cannot be rebuilt); at weight
granularity the nonpositive rule may empty a layer, as the paper's rule says.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from toolchain.errors import ConfigError
from toolchain.layers import KERNEL_LAYERS
from toolchain.registry import Registry

#: layer classes whose kernels can be pruned (per weight, or per output channel via surgery)
PRUNABLE_LAYERS = tuple(KERNEL_LAYERS)
SCOPES = ("layer", "global")
#: how per-weight relevance is aggregated into a unit's score
#: sum — the signed relevance summed over the unit's weights; abs — |relevance| of each weight
#: summed (contributions in either direction count); abs_sum — |signed sum| per unit (the same as
#: abs at weight granularity)
RELEVANCE_SCORES = ("sum", "abs", "abs_sum")
#: which layers' relevance makes a channel's score at filter granularity:
#: producer — the relevance through the producers' filters (their per-filter sums);
#: tied — that plus the tied depthwise layers' per-channel relevance;
#: consumer — the relevance flowing out of the channel's activation map into its consumers (the
#: relevance of the feature map itself, Yeom et al.'s filter relevance);
#: all — producer + tied + consumer
FILTER_SOURCES = ("producer", "tied", "consumer", "all")
#: defaults, chosen on the benchmark (benchmarks/results/pruning.md): on the MLPerf Tiny DS-CNN
#: without fine-tuning, |relevance| flowing out of each feature map (Yeom et al.'s filter relevance,
#: counted in either direction) keeps the most accuracy; signed sums cancel across samples there.
#: The nonpositive rule is defined on signed relevance and always uses ``SIGNED_SCORE``.
DEFAULT_SCORE = "abs"
SIGNED_SCORE = "sum"
DEFAULT_SOURCE = "consumer"
GRANULARITIES = ("weight", "filter")


# ----------------------------------------------------------------------------------------------
# What to remove


@dataclass(frozen=True)
class Target:
    """How much to remove: ``kind`` is "nonpositive" or "sparsity" (then ``sparsity`` in [0, 1))."""

    kind: str
    sparsity: float = 0.0

    @staticmethod
    def nonpositive() -> "Target":
        return Target("nonpositive")

    @staticmethod
    def at(sparsity) -> "Target":
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            raise ConfigError(f"sparsity {sparsity!r} is not a number; pass a fraction in [0, 1), "
                              "e.g. 0.5") from None
        if isinstance(sparsity, bool) or not (0.0 <= s < 1.0) or not np.isfinite(s):
            raise ConfigError(f"sparsity {sparsity!r} is outside [0, 1); pass the fraction of "
                              "weights (or filters) to remove, e.g. 0.5")
        return Target("sparsity", s)

    @staticmethod
    def parse(text: str) -> "Target":
        """``"nonpositive"`` or ``"sparsity=S"`` (the JSON / CLI spelling)."""
        if text == "nonpositive":
            return Target.nonpositive()
        if isinstance(text, str) and text.startswith("sparsity="):
            return Target.at(text.split("=", 1)[1])
        raise ConfigError(f"pruning rule {text!r} is not allowed; use 'nonpositive' or 'sparsity=S' "
                          "with S in [0, 1)")

    def __str__(self) -> str:
        return "nonpositive" if self.kind == "nonpositive" else f"sparsity={self.sparsity:g}"


def kept_count(n: int, sparsity: float) -> int:
    """Units kept out of ``n`` at ``sparsity`` (tfmot's rounding; at least one)."""
    return int(max(np.round(n * (1.0 - sparsity)), 1)) if n else 0


# ----------------------------------------------------------------------------------------------
# Scoring context and criteria


@dataclass(frozen=True)
class ScoringContext:
    """What a criterion may need besides the model: calibration data and LRP settings for
    relevance, the seed for random. ``relevance`` is a precomputed ``RelevanceMap`` of exactly the
    model being scored (``prune`` checks its model hash and passes it to the first step only)."""

    x: Optional[np.ndarray] = None
    y: Optional[np.ndarray] = None
    lrp_rule: str = "lrp.epsilon"
    class_selection: str = "true"
    relevance: object = None
    score: str = DEFAULT_SCORE
    normalize: bool = False
    source: str = DEFAULT_SOURCE
    seed: int = 0
    use_cache: bool = True
    quiet: bool = True


def kernel_of(layer) -> np.ndarray:
    """The kernel (``depthwise_kernel`` for DepthwiseConv2D) as a numpy array."""
    return KERNEL_LAYERS[type(layer).__name__].kernel(layer)


def per_channel(layer_class: str, scores: np.ndarray) -> np.ndarray:
    """Kernel-shaped scores summed per output channel (DepthwiseConv2D: per cin x multiplier)."""
    return KERNEL_LAYERS[layer_class].channel_matrix(np.asarray(scores)).sum(axis=0)


def prunable_layers(model) -> List[str]:
    return [l.name for l in model.layers if type(l).__name__ in PRUNABLE_LAYERS]


class Criterion:
    """A scoring rule. Subclasses implement ``weight_scores`` and ``channel_scores``."""

    key = ""
    description = ""
    signed = False          # scores can be negative (the nonpositive rule makes sense)
    normalize_global = False  # divide by the layer's total |score| before a global ranking

    def weight_scores(self, model, layer_names: Sequence[str], ctx: ScoringContext) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def channel_scores(self, model, layer_names: Sequence[str], ctx: ScoringContext) -> Dict[str, np.ndarray]:
        """Per-output-channel score of every named layer."""
        raise NotImplementedError

    def filter_scores(self, model, groups, ctx: ScoringContext) -> Dict[str, np.ndarray]:
        """One score per channel of every group: the sum of its producers' per-channel scores
        (several producers when a residual ``Add`` ties their channels)."""
        names = sorted({n for g in groups for n in g.producers if _has_kernel(model, n)})
        per_layer = self.channel_scores(model, names, ctx)
        return {g.name: np.sum([np.asarray(per_layer[n], np.float64) for n in g.producers if n in per_layer],
                               axis=0) for g in groups}


def _has_kernel(model, name: str) -> bool:
    try:
        return type(model.get_layer(name)).__name__ in PRUNABLE_LAYERS
    except ValueError:
        return False


class RelevanceCriterion(Criterion):
    key = "prune.relevance"
    description = ("LRP relevance aggregated over the calibration samples (per weight; per filter: "
                   "summed over the group's producers and tied depthwise layers, Yeom et al.)")
    signed = True
    normalize_global = True

    def relevance_map(self, model, ctx: ScoringContext):
        """``ctx.relevance`` when given (the caller vouches it belongs to ``model``), else relevance
        computed now on the calibration samples."""
        from toolchain.relevance import compute_relevance

        if ctx.relevance is not None:
            return ctx.relevance
        if ctx.x is None:
            raise ConfigError("the relevance criterion needs calibration samples or a relevance map "
                              "computed for this model; pass a dataset or relevance=")
        return compute_relevance(model, ctx.x, ctx.y, rule=ctx.lrp_rule,
                                 class_selection=ctx.class_selection, use_cache=ctx.use_cache,
                                 quiet=ctx.quiet)

    def _layer_relevance(self, model, layer_names, ctx, weight_level=False):
        rmap = self.relevance_map(model, ctx)
        missing = [n for n in layer_names if n not in rmap.layers]
        if missing:
            raise ConfigError(f"the relevance map has no scores for {', '.join(missing)}; compute "
                              "relevance for this model (toolchain relevance) or omit --relevance")
        out = {}
        for n in layer_names:
            w = np.asarray(rmap.layers[n].weight, dtype=np.float64)
            want = kernel_of(model.get_layer(n)).shape
            if w.shape != tuple(want):
                raise ConfigError(f"relevance of layer {n!r} has shape {w.shape} but its kernel is "
                                  f"{tuple(want)}; the relevance map belongs to another model")
            out[n] = np.abs(w) if ctx.score == "abs" or (ctx.score == "abs_sum" and weight_level) else w
        return out

    def weight_scores(self, model, layer_names, ctx):
        return self._layer_relevance(model, layer_names, ctx, weight_level=True)

    def channel_scores(self, model, layer_names, ctx):
        scores = self._layer_relevance(model, layer_names, ctx)
        return {n: per_channel(type(model.get_layer(n)).__name__, s) for n, s in scores.items()}

    def filter_scores(self, model, groups, ctx):
        rmap = self.relevance_map(model, ctx)
        layer_names = sorted({n for g in groups for n in (*g.producers, *g.tied, *g.consumers)
                              if _has_kernel(model, n)})
        rel = self._layer_relevance(model, layer_names, replace(ctx, relevance=rmap))
        out = {}
        for g in groups:
            parts = []
            if ctx.source in ("producer", "tied", "all"):
                parts += [per_channel(_cls(model, n), rel[n]) for n in g.producers if n in rel]
            if ctx.source in ("tied", "all"):
                parts += [per_channel(_cls(model, n), rel[n]) for n in g.tied if n in rel]
            if ctx.source in ("consumer", "all"):
                mult = int(np.prod([model.get_layer(n).depth_multiplier for n in g.tied
                                    if _is_depthwise(model, n)] or [1]))
                parts += [_consumer_channels(_cls(model, n), rel[n], g.num_channels, mult)
                          for n in g.consumers if n in rel]
            total = np.zeros(g.num_channels, dtype=np.float64)
            for part in parts:
                part = np.asarray(part, dtype=np.float64)
                if part.size != g.num_channels and part.size % g.num_channels == 0:
                    # a tied DepthwiseConv2D with depth_multiplier m: channel c owns outputs c*m..c*m+m-1
                    part = part.reshape(g.num_channels, -1).sum(axis=1)
                if part.shape != (g.num_channels,):
                    raise ConfigError(f"channel group {g.name!r} has {g.num_channels} channels but a layer "
                                      f"scores {part.shape}; the model and its channel groups disagree")
                total += part / max(float(np.abs(part).sum()), 1e-30) if ctx.normalize else part
            out[g.name] = np.abs(total) if ctx.score == "abs_sum" else total
        return out


def _cls(model, name: str) -> str:
    return type(model.get_layer(name)).__name__


def _is_depthwise(model, name: str) -> bool:
    facts = KERNEL_LAYERS.get(_cls(model, name))
    return facts is not None and facts.depthwise


def _consumer_channels(layer_class: str, scores: np.ndarray, channels: int, mult: int) -> np.ndarray:
    """Kernel-shaped scores of a consumer summed per *input* channel of the group: the relevance
    that leaves each of the group's activation maps through this consumer."""
    facts = KERNEL_LAYERS[layer_class]
    scores = np.asarray(scores)
    per_in = np.moveaxis(scores, facts.in_axis, 0).reshape(scores.shape[facts.in_axis], -1).sum(axis=1)
    width = channels * mult
    if facts.spatial_dims == 0 and per_in.size % width == 0:
        per_in = per_in.reshape(-1, width).sum(axis=0)  # after Flatten: flat index i -> i % width
    if per_in.size != width:
        raise ConfigError(f"a consumer has {per_in.size} input channels, not a multiple of its group's "
                          f"{width}; the model and its channel groups disagree")
    return per_in.reshape(channels, mult).sum(axis=1)  # depthwise output c*m+k belongs to channel c


class MagnitudeCriterion(Criterion):
    key = "prune.magnitude"
    description = "|w| per weight, L1 norm of the producers' filters per channel (tfmot, Li et al.)"

    def weight_scores(self, model, layer_names, ctx):
        return {n: np.abs(kernel_of(model.get_layer(n))).astype(np.float64) for n in layer_names}

    def channel_scores(self, model, layer_names, ctx):
        return {n: per_channel(type(model.get_layer(n)).__name__, s)
                for n, s in self.weight_scores(model, layer_names, ctx).items()}


class RandomCriterion(Criterion):
    key = "prune.random"
    description = "uniform random scores from a seeded generator (a control)"

    def _rng(self, ctx, name: str):
        # one stream per layer, so adding a layer does not reshuffle the others
        return np.random.default_rng([ctx.seed, *name.encode()])

    def weight_scores(self, model, layer_names, ctx):
        return {n: self._rng(ctx, n).random(kernel_of(model.get_layer(n)).shape) for n in layer_names}

    def channel_scores(self, model, layer_names, ctx):
        raise NotImplementedError  # random filter scores are drawn per group, below

    def filter_scores(self, model, groups, ctx):
        return {g.name: self._rng(ctx, "group/" + g.name).random(g.num_channels) for g in groups}


CRITERIA: Registry[Criterion] = Registry("pruning criterion")
for _c in (RelevanceCriterion(), MagnitudeCriterion(), RandomCriterion()):
    CRITERIA.register(_c.key, _c)


def get_criterion(name: str) -> Criterion:
    """``relevance`` or ``prune.relevance`` (and so on) -> the registered criterion."""
    key = name if isinstance(name, str) and name.startswith("prune.") else f"prune.{name}"
    if key not in CRITERIA:
        short = ", ".join(k.split(".", 1)[1] for k in CRITERIA)
        raise ConfigError(f"unknown pruning criterion {name!r}; known: {short} "
                          "(or their registry keys prune.<name>)")
    return CRITERIA.get(key)


# ----------------------------------------------------------------------------------------------
# Selection


def normalize_scores(scores: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Each unit's share of its layer's total |score|."""
    return {k: v / max(float(np.abs(v).sum()), 1e-30) for k, v in scores.items()}


def select(scores: Mapping[str, np.ndarray], target: Target, scope: str = "layer",
           pruned: Optional[Mapping[str, np.ndarray]] = None, min_keep: int = 0,
           normalize_global: bool = False) -> Dict[str, np.ndarray]:
    """Keep-masks (``True`` = kept) with the shapes of ``scores``.

    ``pruned`` are units removed earlier (iterative pruning): they stay removed and count towards
    the target. ``min_keep`` units with the best scores survive in every entry.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    flat = {}
    for k, v in scores.items():
        s = np.asarray(v, dtype=np.float64).reshape(-1).copy()
        if not np.all(np.isfinite(s)):
            raise ConfigError(f"scores of {k!r} contain {int((~np.isfinite(s)).sum())} NaN/Inf values; "
                              "recompute relevance (try --lrp-rule lrp.epsilon_0_1)")
        flat[k] = s
    gone = {k: (np.zeros(s.size, bool) if pruned is None or k not in pruned
                else ~np.asarray(pruned[k]).reshape(-1).astype(bool)) for k, s in flat.items()}
    if target.kind == "nonpositive":
        keep = {k: (s > 0) & ~gone[k] for k, s in flat.items()}
    elif scope == "layer":
        keep = {}
        for k, s in flat.items():
            keep[k] = _keep_lowest_removed(s, gone[k], s.size - kept_count(s.size, target.sparsity))
    else:
        if normalize_global:
            flat_n = normalize_scores(flat)
        else:
            flat_n = flat
        names = list(flat)
        allscores = np.concatenate([flat_n[k] for k in names]) if names else np.zeros(0)
        allgone = np.concatenate([gone[k] for k in names]) if names else np.zeros(0, bool)
        kept_all = _keep_lowest_removed(allscores, allgone,
                                        allscores.size - kept_count(allscores.size, target.sparsity))
        keep, at = {}, 0
        for k in names:
            keep[k] = kept_all[at: at + flat[k].size]
            at += flat[k].size
    if min_keep:
        for k, s in flat.items():
            if keep[k].sum() < min(min_keep, s.size):
                best = np.argsort(-s, kind="stable")
                best = [i for i in best if not gone[k][i]] or list(best)
                keep[k] = keep[k].copy()
                keep[k][best[: min_keep]] = True
    return {k: keep[k].reshape(np.shape(scores[k])) for k in scores}


def align_kept(keep: np.ndarray, scores: np.ndarray, previous: np.ndarray, multiple: int) -> np.ndarray:
    """``keep`` with its count rounded to the nearest multiple of ``multiple`` (halves up; at least
    one multiple, at most the units still alive in ``previous``): best-scored units are added back
    or lowest-scored kept units removed. Units already gone in ``previous`` stay gone."""
    keep = np.asarray(keep, bool).copy()
    alive = np.asarray(previous, bool)
    n_alive = int(alive.sum())
    if multiple <= 1 or n_alive <= multiple:
        return keep
    want = int(np.floor(keep.sum() / multiple + 0.5)) * multiple
    want = min(max(want, multiple), n_alive)
    order = np.argsort(-np.where(alive, scores, -np.inf), kind="stable")  # best alive first
    out = np.zeros_like(keep)
    out[order[:want]] = True
    return out


def _keep_lowest_removed(s: np.ndarray, gone: np.ndarray, n_remove: int) -> np.ndarray:
    """Remove the units already gone first, then the lowest scores, ``n_remove`` in total."""
    n_remove = max(int(n_remove), int(gone.sum()))
    key = np.where(gone, -np.inf, s)
    order = np.argsort(key, kind="stable")
    keep = np.ones(s.size, dtype=bool)
    keep[order[:n_remove]] = False
    return keep


def check_layer_names(model, requested: Optional[Iterable[str]], allowed: Sequence[str],
                      what: str) -> List[str]:
    """The requested layers (or every allowed one); all unknown / unprunable names at once."""
    if requested is None:
        return list(allowed)
    requested = list(requested)
    names = {l.name: type(l).__name__ for l in model.layers}
    bad = []
    for r in requested:
        if r in allowed:
            continue
        if r in names:
            bad.append(f"{r} ({names[r]})")
        else:
            bad.append(f"{r} (no such layer)")
    if bad:
        raise ConfigError(f"cannot prune {', '.join(bad)} at {what} granularity; prunable: "
                          f"{', '.join(allowed) or 'none'}; pass only those names")
    if not requested:
        raise ConfigError(f"no layers to prune were given; pass some of {', '.join(allowed)}")
    return requested
