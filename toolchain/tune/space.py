"""What a tune searches: recipe keys and their candidate values, and the recipe of one trial.

Keys the user's ``--recipe`` sets are held fixed; every other key below is searched (a key that
means nothing under the recipe, e.g. ``prune.*`` with ``prune.enabled: false``, is left out).
Values are Ray Tune domains over plain numbers and strings, which Optuna's TPE samples; lists
(``quantize.bits``, ``quantize.float_layers``) are encoded as strings and decoded by ``recipe_for``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

#: candidate weight widths, as "4,8" strings
BITS_CHOICES = ("8", "4,8", "2,4,8", "4,6,8")
SPARSITY_RANGE = (0.0, 0.8, 0.05)      # quniform(lo, hi, step)
AVG_BITS_RANGE = (3.0, 8.0, 0.5)
CHANNEL_MULTIPLES = (1, 4, 8)
CRITERIA = ("relevance", "magnitude")
ALLOCATORS = ("relevance", "uniform", "sensitivity")
GRANULARITIES = ("filter", "weight")
#: ``prune.distill_steps`` candidates as fractions of the recipe's cap (0 = no distillation)
DISTILL_FRACTIONS = (0.0, 0.25, 1.0)
#: the guard key each task's drop constraint becomes in the best recipe (points -> fraction)
GUARD_FOR_METRIC = {"accuracy": "max_accuracy_drop", "mse": "max_mse_increase", "auc": "max_auc_drop"}


def _given(raw: dict, section: str, key: str) -> bool:
    return isinstance(raw.get(section), dict) and key in raw[section]


def search_space(base: dict, raw: dict, target: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(param_space, start)``: Ray Tune domains for every searched key (``section.key``), and the
    base recipe's own values for them (the first trial, so the search starts from the recipe the
    user would have run)."""
    from ray import tune

    from toolchain.recipe import SCHEMA

    space: Dict[str, Any] = {}
    start: Dict[str, Any] = {}
    p, q = base["prune"], base["quantize"]

    def add(name: str, domain, value):
        section, key = name.split(".", 1)
        if not _given(raw, section, key):
            space[name], start[name] = domain, value

    def choice(values, current):
        values = list(values)
        if current not in values:
            values.append(current)
        return tune.choice(values)

    if p["enabled"]:
        add("prune.criterion", choice(CRITERIA, p["criterion"]), p["criterion"])
        add("prune.granularity", choice(GRANULARITIES, p["granularity"]), p["granularity"])
        if p["mode"] == "sparsity":
            lo, hi, step = SPARSITY_RANGE
            add("prune.sparsity", tune.quniform(lo, hi, step), min(max(round(p["sparsity"] / step) * step, lo), hi))
        add("prune.channel_multiple", choice(CHANNEL_MULTIPLES, p["channel_multiple"]), p["channel_multiple"])
        if p["distill_steps"] > 0:
            steps = sorted({int(p["distill_steps"] * f) for f in DISTILL_FRACTIONS})
            add("prune.distill_steps", tune.choice(steps), p["distill_steps"])
    if q["enabled"]:
        add("quantize.allocator", choice(ALLOCATORS, q["allocator"]), q["allocator"])
        bits = ",".join(str(b) for b in q["bits"])
        add("quantize.bits", choice(BITS_CHOICES, bits), bits)
        avg = _avg_bits(q["budget"])
        if avg is not None:
            lo, hi, step = AVG_BITS_RANGE
            add("quantize.budget", tune.quniform(lo, hi, step), min(max(avg, lo), hi))
        if any("mixed" in f for f in base["export"]["formats"]):
            layers = "first" if q["float_layers"] == ["first"] else "none" if not q["float_layers"] else None
            if layers is not None:
                add("quantize.float_layers", tune.choice(["none", "first"]), layers)
    if "kernels" in SCHEMA["bench"] and target.startswith("qemu-cortex-m"):
        from toolchain.firmware import KERNELS

        add("bench.kernels", tune.choice(list(KERNELS)), base["bench"].get("kernels", next(iter(KERNELS))))
    return space, start


#: the second starting point of a search with a flash limit: the project's small-model plan
#: (relevance-chosen 4/8-bit weights at 4 average bits, stored as INT4 where 4-bit: no float layer,
#: which would send tflite-mixed down the int8-only converter route)
SMALL_START = {"quantize.allocator": "relevance", "quantize.bits": "4,8", "quantize.budget": 4.0,
               "quantize.float_layers": "none"}


def starting_points(space: Dict[str, Any], start: Dict[str, Any], limits_flash: bool) -> List[Dict[str, Any]]:
    """The trials TPE evaluates before it samples: the user's recipe (``start``) and, when the
    search has a flash limit, the same recipe with the small-model plan (``SMALL_START``, on the
    keys that are searched). A search of 12 trials on the digits CNN under flash<=20KB, started
    from the int8 default only, never sampled a 4-bit plan without a float layer."""
    points = [dict(start)]
    if limits_flash:
        small = {**start, **{k: v for k, v in SMALL_START.items() if k in space}}
        if small != start:
            points.append(small)
    return points


def _avg_bits(budget: str) -> Optional[float]:
    key, _, value = budget.partition("=")
    return float(value) if key == "avg-bits" else None


def decode(name: str, value: Any) -> Any:
    """A sampled value as the recipe key takes it."""
    if name == "quantize.bits":
        return [int(b) for b in str(value).split(",")]
    if name == "quantize.budget":
        return f"avg-bits={float(value):g}"
    if name == "quantize.float_layers":
        return ["first"] if value == "first" else []
    if name == "prune.sparsity":
        return round(float(value), 4)
    if name in ("prune.channel_multiple", "prune.distill_steps"):
        return int(value)
    return value


def recipe_for(raw: dict, config: Dict[str, Any], target: str, drop_points: Optional[float] = None) -> dict:
    """The recipe a trial runs and, for the best trial, ``best.yaml``: the user's own keys, the
    searched keys at the trial's values, the target, and a drop constraint as compress's guard
    (every task's key: points -> fraction). Trial and best recipe are the same recipe, so
    ``toolchain compress --recipe best.yaml`` redoes the trial (the guard also sets the pruning
    backoff's limit, so a trial with a looser guard would prune differently).

    Two keys follow from the sampled ones: an ``avg-bits`` budget is clamped to the trial's widths
    (every sampled plan is feasible), and when the sparsity is searched the pruning backoff is off
    (``prune.backoff_sparsities: []``, unless the user's recipe sets it): the trial prunes at the
    sparsity it was given, and a guard breach refuses the trial instead of pruning less."""
    recipe = copy.deepcopy(raw)
    if drop_points is not None:
        recipe["verify"] = {**(recipe.get("verify") or {}),
                            **{key: round(drop_points / 100, 6) for key in GUARD_FOR_METRIC.values()}}
    for name, value in sorted(config.items()):
        section, key = name.split(".", 1)
        recipe.setdefault(section, {})
        if recipe[section] is None:
            recipe[section] = {}
        recipe[section][key] = decode(name, value)
    if "quantize.budget" in config:
        from toolchain.recipe import defaults_for

        q = recipe["quantize"]  # set above: the budget is a searched key
        budget = _avg_bits(q["budget"])
        q.setdefault("bits", defaults_for(target)["quantize"]["bits"])
        # the budget is sampled on its own range, the widths on theirs: a budget outside what the
        # trial's widths can spend (avg-bits=3 with bits [8]) would only fail in the allocator, so
        # it is clamped to [narrowest, widest] (at the narrowest every weight gets that width)
        lo, hi = min(q["bits"]), max(q["bits"])
        q["budget"] = f"avg-bits={min(max(budget, lo), hi):g}"
    if "prune.sparsity" in config and "backoff_sparsities" not in (raw.get("prune") or {}):
        # the search chooses the sparsity: compress's own backoff would silently swap the sampled
        # sparsity for a lower one, so TPE would learn from a sparsity it did not get
        recipe["prune"]["backoff_sparsities"] = []
    recipe.setdefault("bench", {})
    recipe["bench"] = {**(recipe["bench"] or {}), "target": target}
    return recipe


def searched_keys(space: Dict[str, Any]) -> List[str]:
    return sorted(space)
