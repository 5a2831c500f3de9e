"""Pruning guided by LRP relevance: ``prune(model, dataset, ...) -> PruneResult``.

* **Criteria** (registry ``CRITERIA``: ``prune.relevance``, ``prune.magnitude``, ``prune.random``)
  score every kernel weight or every output channel; see ``toolchain.prune.criteria``.
* **Targets**: ``rule="nonpositive"`` (the paper's rule: remove everything whose aggregated
  relevance is <= 0) or ``sparsity=S`` (remove the lowest-scored fraction S, per layer by default).
* **Granularity** ``"weight"``: masks on the kernels; the result is a plain Keras model (same
  architecture) with exact zeros. ``"filter"``: whole output channels are removed and the model is
  physically rebuilt narrower (``toolchain.prune.surgery``), so parameters and ``.tflite`` bytes
  drop. Channel groups tied by a residual ``Add`` lose the same channels; the output layer is never
  a producer; every group keeps at least one channel.
* **Schedule**: one-shot, iterative (``RelevancePolynomialSchedule``, a tfmot ``PruningSchedule``)
  or any tfmot schedule. At every pruning step the current model is re-scored (relevance
  re-estimated on the calibration samples), then optionally fine-tuned on the training split with
  the masks held fixed (``toolchain.prune.schedule``).

The user's model is never modified: everything happens on a clone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, DataError
from toolchain.layers import KERNEL_ATTRS
from toolchain.prune.criteria import (CRITERIA, DEFAULT_SCORE, DEFAULT_SOURCE, FILTER_SOURCES,
                                      GRANULARITIES, RELEVANCE_SCORES, SIGNED_SCORE, SCOPES, Criterion,
                                      ScoringContext, Target, check_layer_names, get_criterion,
                                      kernel_of, prunable_layers, select)

#: pruning schedules and the iterative one's default step count (``toolchain.prune.schedule``); here,
#: not there, so the command line can list them without importing TensorFlow
SCHEDULES = ("one_shot", "iterative")
DEFAULT_ITERATIONS = 4

__all__ = ["prune", "PruneResult", "PruneStep", "CRITERIA", "Target", "GRANULARITIES", "SCOPES",
           "RELEVANCE_SCORES", "accuracy", "apply_weight_masks", "strip"]


@dataclass(frozen=True)
class PruneStep:
    """One pruning step of the schedule: the target and what it reached."""

    step: int
    target_sparsity: Optional[float]   # None for the nonpositive rule
    sparsity: float                    # fraction of the pruned units removed after the step
    accuracy: Optional[float]          # on the evaluation split, before any later fine-tuning


@dataclass(frozen=True)
class PruneResult:
    """A pruned (stripped, plain Keras) model and what pruning did to it.

    ``masks``: weight granularity — layer name -> kernel-shaped bool array (True = kept);
    filter granularity — channel group name -> bool array over the group's original channels.
    ``layer_sparsity``: every prunable layer -> fraction of its original kernel entries that are
    gone (zeroed or physically removed, including input channels lost to a pruned producer).
    ``removed_channels``: group name -> original indices of the removed output channels.
    ``sparsity``: fraction of the pruned units (weights of the pruned layers, or channels of the
    pruned groups) that were removed — what ``sparsity=S`` asks for. ``kernel_sparsity``: fraction
    of all prunable kernels' entries that are gone (at filter granularity larger than
    ``sparsity``, since consumers lose input channels too).
    """

    model: object = field(repr=False)
    criterion: str
    granularity: str
    rule: str
    scope: str
    masks: Mapping[str, np.ndarray] = field(repr=False)
    layer_sparsity: Mapping[str, float]
    removed_channels: Mapping[str, Tuple[int, ...]]
    sparsity: float
    kernel_sparsity: float
    params_before: int
    params_after: int
    nonzero_params_before: int
    nonzero_params_after: int
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]
    eval_samples: int
    steps: Tuple[PruneStep, ...] = ()
    settings: Mapping[str, object] = field(default_factory=dict)

    def summary(self) -> dict:
        """Everything but the model and the masks, as JSON-ready data."""
        return {
            "criterion": self.criterion, "granularity": self.granularity, "rule": self.rule,
            "scope": self.scope, "sparsity": self.sparsity, "kernel_sparsity": self.kernel_sparsity,
            "params_before": self.params_before, "params_after": self.params_after,
            "nonzero_params_before": self.nonzero_params_before,
            "nonzero_params_after": self.nonzero_params_after,
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "eval_samples": self.eval_samples,
            "layer_sparsity": dict(self.layer_sparsity),
            "removed_channels": {k: list(v) for k, v in self.removed_channels.items()},
            "steps": [s.__dict__ for s in self.steps],
            "settings": dict(self.settings),
        }


# ----------------------------------------------------------------------------------------------
# Small model helpers


def clone(model):
    """A plain copy of ``model`` (architecture and weights, no optimizer state)."""
    import tensorflow as tf

    copy = tf.keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


strip = clone  # the training model is a plain Keras model; stripping drops optimizer state only


def apply_weight_masks(model, masks: Mapping[str, np.ndarray]) -> None:
    """Multiply kernels of ``model`` by their masks, in place (``model`` must be a clone)."""
    for name, mask in masks.items():
        layer = model.get_layer(name)
        var = getattr(layer, KERNEL_ATTRS[type(layer).__name__])
        var.assign(var.numpy() * np.asarray(mask, dtype=var.dtype.as_numpy_dtype))


def accuracy(model, x: Optional[np.ndarray], y: Optional[np.ndarray]) -> Optional[float]:
    """Top-1 accuracy from argmax of the predictions (None without data, and without class labels:
    a regression or autoencoder dataset's float targets have no top-1)."""
    if x is None or y is None or len(x) == 0 or np.ndim(y) != 1:
        return None
    pred = model.predict(np.asarray(x, np.float32), batch_size=256, verbose=0)
    return float(np.mean(np.argmax(pred, axis=-1) == np.asarray(y)))


def _nonzero(model) -> int:
    return int(sum(int(np.count_nonzero(w)) for w in model.get_weights()))


def _kernel_sizes(model, names) -> Dict[str, Tuple[int, int]]:
    """name -> (kernel entries, nonzero kernel entries) for layers of ``model`` that exist."""
    out = {}
    for n in names:
        try:
            k = kernel_of(model.get_layer(n))
        except ValueError:
            continue
        out[n] = (int(k.size), int(np.count_nonzero(k)))
    return out


# ----------------------------------------------------------------------------------------------
# The verb


def prune(model, dataset, criterion: str = "relevance", granularity: str = "weight",
          rule: Optional[str] = None, sparsity: Optional[float] = None, relevance=None, *,
          lrp_rule: Optional[str] = None, class_selection: Optional[str] = None, samples: Optional[int] = None,
          scope: str = "layer", score: Optional[str] = None, normalize: bool = False,
          source: Optional[str] = None,
          layers: Optional[Sequence[str]] = None, fine_tune_epochs: int = 0, schedule="one_shot",
          iterations: Optional[int] = None, batch_size: Optional[int] = None,
          learning_rate: Optional[float] = None, seed: int = 0, use_cache: bool = True,
          distill=None, channel_multiple: int = 1, quiet: bool = False) -> PruneResult:
    """Prune ``model`` and return the stripped model with a report (``PruneResult``).

    ``dataset`` is a ``toolchain.data.Dataset``: its first ``samples`` training samples are the
    calibration set for relevance, its training split is used for fine-tuning, its evaluation
    split measures accuracy before and after. Give exactly one of ``rule="nonpositive"`` (relevance
    only, one-shot) or ``sparsity=S``. ``relevance`` is a precomputed ``RelevanceMap`` for
    ``model`` (used for the first pruning step; later steps re-estimate on the pruned model).
    ``lrp_rule`` / ``class_selection`` configure relevance; ``score`` ("sum": signed relevance,
    "abs": |relevance| per weight), ``normalize`` (filter scores: each layer's share before summing
    a group) and ``source`` (which layers' relevance scores a channel, see ``FILTER_SOURCES``) are
    relevance scoring variants.
    ``layers``: restrict pruning to these layers (weight) or channel groups / producers (filter).
    ``schedule``: "one_shot", "iterative" (``iterations`` relevance re-estimations, polynomial ramp)
    or a tfmot ``PruningSchedule`` whose steps count fine-tuning batches.
    ``distill``: a ``DistillConfig`` (or ``None``); after pruning and fine-tuning, the pruned model
    is distilled from ``model`` on augmented samples (no labels needed, see
    ``toolchain.prune.distill``): the whole training split when it holds more than the calibration
    samples and ``distill.data`` is "train", else the calibration samples.
    ``channel_multiple`` (filter granularity, sparsity targets): every pruned group keeps a
    multiple of this many channels (rounded to the nearest multiple, at least one multiple), the
    most relevant ones, for kernels that prefer some channel multiple (on XNNPACK here 24 and 28
    channels measure as fast as 32: ``benchmarks/kernel_speed.py``).
    """
    from toolchain.model_io import model_hash
    from toolchain.prune import schedule as sched_mod
    from toolchain.relevance import CLASS_SELECTIONS, DEFAULT_RULE, RULES

    # -- validate every option before any work ---------------------------------------------
    crit: Criterion = get_criterion(criterion)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if (rule is None) == (sparsity is None):
        raise ConfigError(f"give exactly one of rule='nonpositive' or sparsity=S (got rule={rule!r}, "
                          f"sparsity={sparsity!r})")
    target = Target.parse(rule) if rule is not None else Target.at(sparsity)
    if target.kind == "nonpositive" and not crit.signed:
        raise ConfigError(f"the nonpositive rule needs signed scores, but {crit.key} scores are never "
                          "negative; use criterion 'relevance' or a sparsity target")
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    source = source or DEFAULT_SOURCE
    if source not in FILTER_SOURCES:
        raise ConfigError(f"relevance source {source!r} is not one of {', '.join(FILTER_SOURCES)}")
    score = score or (SIGNED_SCORE if target.kind == "nonpositive" else DEFAULT_SCORE)
    if target.kind == "nonpositive" and score != SIGNED_SCORE:
        raise ConfigError(f"the nonpositive rule needs signed relevance (score {SIGNED_SCORE!r}), got "
                          f"score {score!r}; drop the score option or use a sparsity target")
    if score not in RELEVANCE_SCORES:
        raise ConfigError(f"relevance score {score!r} is not one of {', '.join(RELEVANCE_SCORES)}")
    if relevance is not None:
        conflicts = [f"{what} {mine!r} (the map has {theirs!r})" for what, mine, theirs in
                     (("lrp_rule", lrp_rule, relevance.rule),
                      ("class_selection", class_selection, relevance.class_selection))
                     if mine is not None and mine != theirs]
        if conflicts:
            raise ConfigError(f"the given relevance map disagrees with {', '.join(conflicts)}; drop "
                              "those options or recompute the map with them")
    lrp_rule = lrp_rule or (relevance.rule if relevance is not None else DEFAULT_RULE)
    class_selection = class_selection or (relevance.class_selection if relevance is not None else "true")
    RULES.get(lrp_rule)
    if class_selection not in CLASS_SELECTIONS:
        raise ConfigError(f"class selection {class_selection!r} is not one of {', '.join(CLASS_SELECTIONS)}")
    if isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int) or fine_tune_epochs < 0:
        raise ConfigError(f"fine_tune_epochs {fine_tune_epochs!r} is not an integer >= 0")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, (int, np.integer)) \
            or channel_multiple < 1:
        raise ConfigError(f"channel_multiple {channel_multiple!r} is not an integer >= 1")
    if channel_multiple > 1 and (granularity != "filter" or target.kind == "nonpositive"):
        raise ConfigError("channel_multiple applies to filter pruning with a sparsity target; drop it "
                          f"(granularity {granularity!r}, rule {str(target)!r})")
    if distill is not None:
        from toolchain.prune.distill import DistillConfig

        if not isinstance(distill, DistillConfig):
            raise ConfigError(f"distill must be a DistillConfig or None, got {type(distill).__name__}")
    iterations = sched_mod.DEFAULT_ITERATIONS if iterations is None else iterations
    batch_size = batch_size or sched_mod.FINE_TUNE_BATCH_SIZE
    learning_rate = learning_rate or sched_mod.FINE_TUNE_LEARNING_RATE
    if target.kind == "nonpositive" and schedule != "one_shot":
        raise ConfigError("the nonpositive rule prunes once (one_shot); for iterative pruning use a "
                          "sparsity target")
    for attr in ("x_train", "y_train", "x_eval", "y_eval"):
        if not hasattr(dataset, attr):
            raise ConfigError(f"dataset {type(dataset).__name__} lacks {attr}; pass a toolchain.data Dataset")
    if relevance is not None:
        if relevance.model_hash != model_hash(model):
            raise ConfigError("the given relevance map was computed for another model (model hash "
                              f"{relevance.model_hash[:12]} vs {model_hash(model)[:12]}); recompute it "
                              "for this model or omit it")
        if crit.key != "prune.relevance":
            raise ConfigError(f"a relevance map was given but the criterion is {crit.key}; drop it or "
                              "use criterion 'relevance'")

    x_cal, y_cal = dataset.calibration(samples)
    x_eval, y_eval = dataset.x_eval, dataset.y_eval
    per_epoch = int(np.ceil(len(dataset.x_train) / batch_size))
    total_steps = fine_tune_epochs * per_epoch
    schedule_obj = sched_mod.make_schedule(schedule, target.sparsity, iterations, total_steps)
    if target.kind == "nonpositive":
        plan = [(0, None)]
    else:
        end = sched_mod.schedule_end(schedule_obj)
        if end is None and total_steps == 0:
            raise ConfigError("the schedule never ends (end_step=-1) and there is no fine-tuning to "
                              "bound it; give it an end_step or fine_tune_epochs > 0")
        plan = sched_mod.pruning_steps(schedule_obj, max(total_steps, end or 0))

    ctx = ScoringContext(x_cal, y_cal, lrp_rule, class_selection, relevance, score, normalize, source,
                         seed, use_cache, quiet)
    work = clone(model)
    acc_before = accuracy(model, x_eval, y_eval)
    params_before, nonzero_before = int(model.count_params()), _nonzero(model)

    if granularity == "weight":
        names = check_layer_names(work, layers, prunable_layers(work), "weight")
        masks: Dict[str, np.ndarray] = {n: np.ones(kernel_of(work.get_layer(n)).shape, bool) for n in names}
    else:
        from toolchain.prune.surgery import channel_analysis

        analysis = channel_analysis(work)
        names = _check_groups(work, analysis, layers)
        widths = {g.name: g.num_channels for g in analysis.groups if g.name in names}
        alive = {g: np.arange(n) for g, n in widths.items()}
        masks = {g: np.ones(n, bool) for g, n in widths.items()}

    records = []
    steps_done = 0
    progress = _progress(len(plan), quiet, f"{crit.key} {granularity} pruning")
    for i, (step, s) in enumerate(plan):
        if fine_tune_epochs and step > steps_done:
            sched_mod.fine_tune(work, dataset.x_train, dataset.y_train, min(step, total_steps) - steps_done,
                                masks if granularity == "weight" else None, batch_size, learning_rate,
                                seed + i, quiet)
            steps_done = max(steps_done, min(step, total_steps))
        # the given map belongs to the unpruned model only; pruned models are not worth caching
        step_ctx = ctx if i == 0 else replace(ctx, relevance=None, use_cache=False)
        step_target = target if s is None else Target.at(s)
        if granularity == "weight":
            scores = crit.weight_scores(work, names, step_ctx)
            masks = select(scores, step_target, scope, pruned=masks, normalize_global=crit.normalize_global)
            apply_weight_masks(work, masks)
        else:
            work, masks, alive = _prune_filters(work, crit, names, step_ctx, step_target, scope, masks, alive,
                                                channel_multiple)
        records.append(PruneStep(int(step), None if s is None else float(s), _unit_sparsity(masks),
                                 accuracy(work, x_eval, y_eval)))
        progress.update(1)
    progress.close()
    if fine_tune_epochs and total_steps > steps_done:
        sched_mod.fine_tune(work, dataset.x_train, dataset.y_train, total_steps - steps_done,
                            masks if granularity == "weight" else None, batch_size, learning_rate,
                            seed + len(plan), quiet)
    distill_history = None
    if distill is not None and distill.steps:
        from toolchain.prune.distill import distill as run_distill

        # every training sample when the split has more than the calibration prefix (image folders:
        # thousands); early stopping and agreement still watch the clean calibration samples
        more = distill.data == "train" and len(dataset.x_train) > len(x_cal)
        distill_history = run_distill(work, model, dataset.x_train if more else x_cal, distill,
                                      masks=masks if granularity == "weight" else None, quiet=quiet,
                                      x_monitor=x_cal if more else None)
    stripped = strip(work)
    if granularity == "weight":
        apply_weight_masks(stripped, masks)  # exact zeros whatever the optimizer did last

    # -- report ----------------------------------------------------------------------------
    all_kernels = prunable_layers(model)
    before = _kernel_sizes(model, all_kernels)
    after = _kernel_sizes(stripped, all_kernels)
    if granularity == "weight":
        layer_sparsity = {n: float(1 - masks[n].mean()) if n in masks else 0.0 for n in all_kernels}
        removed = {}
    else:
        layer_sparsity = {n: float(1 - after[n][0] / before[n][0]) for n in all_kernels}
        removed = {g: tuple(int(c) for c in np.flatnonzero(~m)) for g, m in masks.items()}
    total = sum(before[n][0] for n in all_kernels)
    gone = sum(layer_sparsity[n] * before[n][0] for n in all_kernels)
    settings = {
        "lrp_rule": lrp_rule if crit.key == "prune.relevance" else None,
        "class_selection": class_selection if crit.key == "prune.relevance" else None,
        "score": score if crit.key == "prune.relevance" else None,
        "normalize": normalize if crit.key == "prune.relevance" else None,
        "source": source if crit.key == "prune.relevance" and granularity == "filter" else None,
        "calibration_samples": int(len(x_cal)),
        "fine_tune_epochs": fine_tune_epochs, "fine_tune_steps": total_steps,
        "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "schedule": schedule_obj.get_config() if target.kind != "nonpositive" else "one_shot",
        "layers": list(names),
        "channel_multiple": int(channel_multiple),
        "distill": distill_history,
    }
    return PruneResult(
        model=stripped, criterion=crit.key, granularity=granularity, rule=str(target), scope=scope,
        masks=masks, layer_sparsity=layer_sparsity, removed_channels=removed,
        sparsity=_unit_sparsity(masks), kernel_sparsity=float(gone / total) if total else 0.0,
        params_before=params_before, params_after=int(stripped.count_params()),
        nonzero_params_before=nonzero_before, nonzero_params_after=_nonzero(stripped),
        accuracy_before=acc_before, accuracy_after=accuracy(stripped, x_eval, y_eval),
        eval_samples=0 if x_eval is None else int(len(x_eval)), steps=tuple(records), settings=settings)


def _check_groups(model, analysis, requested) -> list:
    """Group names to prune: all prunable groups, or the requested groups / producer layers."""
    names = [g.name for g in analysis.groups]
    if not names:
        reasons = "; ".join(f"{e.name}: {', '.join(e.reasons)}" for e in analysis.excluded)
        raise ConfigError(f"model {model.name!r} has no prunable channel groups ({reasons or 'no producers'}); "
                          "use weight granularity")
    if requested is None:
        return names
    by_producer = {p: g.name for g in analysis.groups for p in g.producers}
    allowed = sorted(set(names) | set(by_producer))
    excluded = {e.name: e for e in analysis.excluded}
    bad, out = [], []
    for r in requested:
        if r in by_producer:
            if by_producer[r] not in out:
                out.append(by_producer[r])
        elif r in excluded:
            bad.append(f"{r} ({'; '.join(excluded[r].reasons)})")
        else:
            try:
                bad.append(f"{r} ({type(model.get_layer(r)).__name__}, not a channel producer)")
            except ValueError:
                bad.append(f"{r} (no such layer)")
    if bad or not out:
        raise ConfigError(f"cannot prune {', '.join(bad) or 'nothing'} at filter granularity; prunable "
                          f"groups and producers: {', '.join(allowed)}; pass only those names")
    return out


def _prune_filters(work, crit, names, ctx, target, scope, masks, alive, channel_multiple=1):
    """Re-score the current (narrow) model's channels and remove more of them."""
    from toolchain.prune.criteria import align_kept
    from toolchain.prune.surgery import channel_groups, remove_channels

    groups = [g for g in channel_groups(work) if g.name in names]
    missing = sorted(set(names) - {g.name for g in groups})
    if missing:
        raise DataError(f"channel groups {', '.join(missing)} vanished after surgery; this is a bug, "
                        "rerun with --debug and report it")
    current = crit.filter_scores(work, groups, ctx)
    full = {}
    for g in groups:
        s = np.zeros(masks[g.name].size)
        s[alive[g.name]] = current[g.name]
        full[g.name] = s
    keep = select(full, target, scope, pruned=masks, min_keep=1, normalize_global=crit.normalize_global)
    if channel_multiple > 1:
        keep = {g: align_kept(keep[g], full[g], masks[g], channel_multiple) for g in keep}
    removals = {}
    new_alive = {}
    for g in groups:
        local_keep = keep[g.name][alive[g.name]]
        drop = np.flatnonzero(~local_keep)
        if drop.size:
            removals[g.name] = [int(i) for i in drop]
        new_alive[g.name] = alive[g.name][local_keep]
    if removals:
        work = remove_channels(work, removals)
    return work, keep, new_alive


def _unit_sparsity(masks) -> float:
    total = sum(m.size for m in masks.values())
    return float(sum(int((~m).sum()) for m in masks.values()) / total) if total else 0.0


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, quiet: bool, desc: str):
    if quiet or total <= 1:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)
