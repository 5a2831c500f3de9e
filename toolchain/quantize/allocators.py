"""Bit allocators: which width each kernel (or group of output channels) gets under a budget.

One registry, ``ALLOCATORS``, keys ``quant.relevance``, ``quant.sensitivity``, ``quant.uniform``.
An allocator takes an ``AllocationProblem`` and returns a ``BitPlan``.

Relevance and sensitivity allocation are the same multiple-choice knapsack: every group g picks
exactly one width b from the candidates, costing ``nonzero(g) * b`` bits (pruned zeros cost
nothing), and the plan minimises ``sum_g loss(g, b)`` subject to ``sum_g cost <= budget``. Only the
loss differs:

* ``quant.relevance`` -- ``loss(g, b)`` is relevance x the real quantisation error of g's weights
  at b bits (the symmetric per-channel fake quantisation the simulation applies). With
  ``R_g = sum_{w in g} |R_w|`` (|relevance| of the weights, aggregated per group) and ``E_g(b)`` the
  squared error of g's weights at b bits, the weightings (``WEIGHTINGS``) are:
  ``mse`` = R_g x E_g(b) / n_g (the plain reading of the paper; not scale-free, so layers with
  small weights look cheap to quantise); ``relative`` = R_g x E_g(b) / ||w_g||^2 (the share of
  g's signal lost); ``relative_sq`` (default) = R_g^2 x E_g(b) / ||w_g||^2 -- if R_g is g's
  contribution to the explained logit and quantisation perturbs that contribution by the relative
  error, independent perturbations add in variance, hence R_g squared; ``relative_layer`` =
  R_layer x R_g x E_g(b) / ||w_g||^2 (the same, but the groups of one layer perturb coherently:
  per layer it equals relative_sq, per group the layer's R^2 is shared out by relevance);
  ``taylor`` = sum_w (R_w / w)^2 (q_w - w)^2 (LRP-0/epsilon: R_w ~ w dF/dw, so R_w / w estimates
  dF/dw); ``taylor_channel`` = the same with one R_c / ||w_c||_1 per channel. The default is the
  weighting with the best simulated accuracy on the DS-CNN *calibration* split, per layer, at
  avg-bits=4 (benchmarks/quantization.py reports all of them, on both splits).
* ``quant.sensitivity`` -- the non-XAI baseline ORT / AIMET users rely on: quantise one layer alone
  at b bits (weights only, same fake quantisation), measure the mean squared change of the
  model's output on the calibration samples. Per group: the layer's sensitivity shared out in
  proportion to each group's squared quantisation error.

The solver is exact: dynamic programming over the bit budget (``solve_mckp``). Why not the
greedy marginal-gain-per-bit heuristic: its gap is one item's cost jump, which is large when there
are few items (per-layer plans have ~10 items on DS-CNN), and it is not monotone in the budget.
The DP is monotone (a larger budget never yields a larger loss) and cheap here: costs are divided
by their greatest common divisor, so DS-CNN at 4 bits is ~6k budget units x 74 groups. For very
large models (more than ``MAX_DP_CELLS`` table cells) the bit axis is coarsened, item costs
rounded up, so the budget still holds and the result stays within one unit per group of optimal
(recorded in the plan's notes).

Activations stay int8 unless ``int16_layers=N``: the N layers whose chosen widths leave the largest
loss get ``activation_bits=16`` (no effect on the weight budget).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError
from toolchain.quantize.bitplan import BitPlan, LayerBits
from toolchain.quantize.budget import Budget
from toolchain.quantize.kernels import FLOAT_BITS, Kernel, group_slices
from toolchain.registry import Registry

#: largest DP table (groups x budget units) solved at full resolution
MAX_DP_CELLS = 20_000_000
WEIGHTINGS = ("mse", "relative", "relative_sq", "relative_layer", "taylor", "taylor_channel")
DEFAULT_WEIGHTING = "relative_sq"
DEFAULT_GROUP_SIZE = 8
GRANULARITIES = ("layer", "group")


@dataclass(frozen=True)
class AllocationProblem:
    """Everything an allocator may use. ``kernels`` come from the BN-folded float model."""

    kernels: Mapping[str, Kernel]
    candidates: Tuple[int, ...]
    budget: Optional[Budget]
    granularity: str = "layer"
    group_size: int = DEFAULT_GROUP_SIZE
    relevance: object = None                  # RelevanceMap for quant.relevance
    model: object = None                      # BN-folded float model, for quant.sensitivity
    x_calibration: Optional[np.ndarray] = field(default=None, repr=False)
    weighting: str = DEFAULT_WEIGHTING
    int16_layers: int = 0
    quiet: bool = True

    @property
    def nonzero_weights(self) -> int:
        return sum(k.num_nonzero for k in self.kernels.values())

    def budget_bits(self) -> Optional[int]:
        return None if self.budget is None else self.budget.total_bits(self.nonzero_weights)


@dataclass(frozen=True)
class Group:
    layer: str
    channels: slice
    nonzero: int


ALLOCATORS: Registry[Callable[[AllocationProblem], BitPlan]] = Registry("bit allocator")


# ------------------------------------------------------------------------------------------
# The knapsack


def solve_mckp(costs: np.ndarray, losses: np.ndarray, budget: int,
               max_cells: int = MAX_DP_CELLS) -> Tuple[np.ndarray, str]:
    """Exact multiple-choice knapsack by dynamic programming: one choice per row of ``costs``
    (int bits, shape (groups, options)) minimising the summed ``losses`` with total cost <=
    ``budget``. Returns (choice per group, a note on how it was solved). On a tie the earlier
    (narrower) option wins. The caller checks feasibility first."""
    costs = np.asarray(costs, dtype=np.int64)
    losses = np.asarray(losses, dtype=np.float64)
    n_groups, n_opts = costs.shape
    positive = costs[costs > 0]
    unit = int(np.gcd.reduce(positive)) if positive.size else 1
    units = budget // unit
    note = f"exact DP (unit {unit} bits)"
    scaled = costs // unit
    if n_groups * (units + 1) > max_cells:
        unit = int(math.ceil(budget / max(1, max_cells // n_groups - 1)))
        units = budget // unit
        scaled = -(-costs // unit)  # rounded up: the budget still holds
        note = f"coarsened DP (unit {unit} bits, costs rounded up)"
        if scaled.min(axis=1).sum() > units:
            return np.argmin(costs, axis=1), note + "; infeasible at that resolution, narrowest widths"
    dp = np.zeros(units + 1)
    choice = np.zeros((n_groups, units + 1), dtype=np.int16)
    for g in range(n_groups):
        best = np.full(units + 1, np.inf)
        arg = np.zeros(units + 1, dtype=np.int16)
        for k in range(n_opts):
            c = int(scaled[g, k])
            if c > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[c:] = dp[: units + 1 - c] + losses[g, k]
            better = cand < best
            best[better] = cand[better]
            arg[better] = k
        dp = best
        choice[g] = arg
    picks = np.zeros(n_groups, dtype=np.int64)
    u = units
    for g in range(n_groups - 1, -1, -1):
        k = int(choice[g, u])
        picks[g] = k
        u -= int(scaled[g, k])
    return picks, note


# ------------------------------------------------------------------------------------------
# Shared pieces


def groups_of(problem: AllocationProblem) -> List[Group]:
    size = problem.group_size if problem.granularity == "group" else None
    out = []
    for name, k in problem.kernels.items():
        nz = k.nonzero_per_channel
        for sl in group_slices(k.num_channels, size):
            out.append(Group(name, sl, int(nz[sl].sum())))
    return out


def channel_errors(kernel: Kernel, candidates: Sequence[int]) -> Dict[int, np.ndarray]:
    """Squared quantisation error of every weight (the channel matrix's shape) at each width."""
    m = kernel.matrix.astype(np.float64)
    return {b: (kernel.fake_quant(b) - m) ** 2 for b in candidates}


def _check_problem(problem: AllocationProblem) -> None:
    if problem.granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {problem.granularity!r} is not one of {', '.join(GRANULARITIES)}; "
                          "pass --granularity layer or group")
    if problem.granularity == "group" and (not isinstance(problem.group_size, int) or problem.group_size <= 0):
        raise ConfigError(f"group size {problem.group_size!r} must be a positive integer; pass e.g. --group-size 8")
    if problem.int16_layers < 0:
        raise ConfigError(f"int16_layers {problem.int16_layers} must be >= 0")


def _infeasible(problem: AllocationProblem, budget: int, smallest: int, how: str) -> ConfigError:
    return ConfigError(
        f"budget {problem.budget} ({budget} weight bits for {problem.nonzero_weights} nonzero weights) is below "
        f"the smallest possible plan, {smallest} bits ({how}); raise the budget or add a narrower width to --bits")


def knapsack_plan(problem: AllocationProblem, losses: np.ndarray, allocator: str,
                  extra_notes: Optional[dict] = None) -> BitPlan:
    """Solve the knapsack for ``losses`` (groups x candidates) and turn the choice into a plan."""
    groups = groups_of(problem)
    widths = np.asarray(problem.candidates, dtype=np.int64)
    costs = np.array([[g.nonzero * b for b in widths] for g in groups], dtype=np.int64)
    budget = problem.budget_bits()
    if budget is None:
        raise ConfigError(f"allocator {allocator} needs a budget; pass --budget avg-bits=4 (or size-kb=..., bits=...)")
    smallest = int(costs.min(axis=1).sum())
    if smallest > budget:
        raise _infeasible(problem, budget, smallest, f"every weight at {widths.min()} bits")
    picks, note = solve_mckp(costs, losses, budget)
    chosen = widths[picks]
    per_group_loss = losses[np.arange(len(groups)), picks]
    notes = {"candidates": list(map(int, widths)), "budget_bits": budget,
             "planned_bits": int(costs[np.arange(len(groups)), picks].sum()),
             "nonzero_weights": problem.nonzero_weights, "objective": float(per_group_loss.sum()),
             "solver": note, **(extra_notes or {})}
    return _plan_from_groups(problem, groups, chosen, per_group_loss, allocator, notes)


def _plan_from_groups(problem: AllocationProblem, groups: List[Group], chosen: np.ndarray,
                      per_group_loss: np.ndarray, allocator: str, notes: dict) -> BitPlan:
    by_layer: Dict[str, List[int]] = {}
    layer_loss: Dict[str, float] = {}
    for g, b, loss in zip(groups, chosen, per_group_loss):
        by_layer.setdefault(g.layer, []).append(int(b))
        layer_loss[g.layer] = layer_loss.get(g.layer, 0.0) + float(loss)
    ranked = sorted((n for n in layer_loss if layer_loss[n] > 0), key=lambda n: -layer_loss[n])
    int16 = set(ranked[: problem.int16_layers])
    layers = {}
    for name, k in problem.kernels.items():
        bits = by_layer[name]
        act = 16 if name in int16 else 8
        if problem.granularity == "group":
            layers[name] = LayerBits(max(bits), act, tuple(bits), problem.group_size, k.num_channels, k.num_weights)
        else:
            layers[name] = LayerBits(bits[0], act, None, None, k.num_channels, k.num_weights)
    if int16:
        notes = dict(notes, int16_activation_layers=sorted(int16))
    return BitPlan(layers, allocator, None if problem.budget is None else str(problem.budget),
                   problem.granularity, notes)


# ------------------------------------------------------------------------------------------
# quant.relevance


def relevance_losses(problem: AllocationProblem) -> np.ndarray:
    """loss(group, width) = relevance x real quantisation error, per ``problem.weighting``."""
    if problem.weighting not in WEIGHTINGS:
        raise ConfigError(f"relevance weighting {problem.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    rmap = problem.relevance
    if rmap is None:
        raise ConfigError("allocator quant.relevance needs a relevance map; pass --relevance DIR or let "
                          "`toolchain quantize` compute it on the calibration split")
    problems = []
    for name, k in problem.kernels.items():
        if name not in rmap.layers:
            problems.append(f"{name} (no relevance)")
        elif tuple(rmap.layers[name].weight.shape) != tuple(k.weights.shape):
            problems.append(f"{name} (relevance shape {tuple(rmap.layers[name].weight.shape)}, kernel {tuple(k.weights.shape)})")
    if problems:
        raise ConfigError(f"relevance map does not fit the model: {', '.join(problems)}; compute relevance for "
                          "this model (omit --relevance to compute it)")
    size = problem.group_size if problem.granularity == "group" else None
    rows = []
    for name, k in problem.kernels.items():
        rel = np.abs(_matrix_like(k, rmap.layers[name].weight)).astype(np.float64)
        err = channel_errors(k, problem.candidates)
        m = k.matrix.astype(np.float64)
        # taylor: R_w / w estimates dF/dw (LRP-0 / epsilon: R_w ~ w dF/dw), zero where w == 0
        grad = np.divide(rel, np.abs(m), out=np.zeros_like(m), where=m != 0)
        chan_grad = np.divide(rel.sum(axis=0), np.abs(m).sum(axis=0), out=np.zeros(m.shape[1]),
                              where=np.abs(m).sum(axis=0) > 0)
        r_layer = rel.sum()
        for sl in group_slices(k.num_channels, size):
            r_g = rel[:, sl].sum()
            n_g = m[:, sl].size
            energy = (m[:, sl] ** 2).sum()
            row = []
            for b in problem.candidates:
                e = err[b][:, sl]
                if problem.weighting == "mse":
                    row.append(r_g * e.sum() / n_g)
                elif problem.weighting == "relative":
                    row.append(r_g * e.sum() / energy if energy > 0 else 0.0)
                elif problem.weighting == "relative_sq":
                    row.append(r_g ** 2 * e.sum() / energy if energy > 0 else 0.0)
                elif problem.weighting == "relative_layer":
                    row.append(r_layer * r_g * e.sum() / energy if energy > 0 else 0.0)
                elif problem.weighting == "taylor":
                    row.append(float((grad[:, sl] ** 2 * e).sum()))
                else:  # taylor_channel: one sensitivity per channel, |R_c| / ||w_c||_1
                    row.append(float((chan_grad[sl] ** 2 * e.sum(axis=0)).sum()))
            rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def _matrix_like(kernel: Kernel, array: np.ndarray) -> np.ndarray:
    from toolchain.quantize.kernels import channel_matrix
    return channel_matrix(kernel.layer_class, np.asarray(array))


@ALLOCATORS.register("quant.relevance")
def allocate_relevance(problem: AllocationProblem) -> BitPlan:
    """Relevance-weighted quantisation error, minimised under the budget (module docstring)."""
    _check_problem(problem)
    losses = relevance_losses(problem)
    rmap = problem.relevance
    return knapsack_plan(problem, losses, "quant.relevance",
                         {"weighting": problem.weighting, "relevance_rule": getattr(rmap, "rule", None),
                          "relevance_samples": getattr(rmap, "samples", None)})


# ------------------------------------------------------------------------------------------
# quant.sensitivity


def layer_sensitivity(problem: AllocationProblem) -> Dict[str, Dict[int, float]]:
    """Mean squared change of the model output on the calibration samples when one layer's
    kernel alone is fake-quantised at each candidate width (weights only)."""
    import tensorflow as tf
    from toolchain.quantize.kernels import KERNEL_ATTRS
    from toolchain.quantize.simulate import predict

    if problem.model is None or problem.x_calibration is None:
        raise ConfigError("allocator quant.sensitivity needs the model and calibration samples")
    model = tf.keras.models.clone_model(problem.model)
    model.set_weights(problem.model.get_weights())
    x = np.asarray(problem.x_calibration, dtype=np.float32)
    reference = predict(model, x).astype(np.float64)
    out: Dict[str, Dict[int, float]] = {}
    steps = [(n, b) for n in problem.kernels for b in problem.candidates]
    from tqdm import tqdm
    for name, b in tqdm(steps, desc="layer sensitivity", disable=problem.quiet):
        k = problem.kernels[name]
        layer = model.get_layer(name)
        var = getattr(layer, KERNEL_ATTRS[k.layer_class])
        if b >= FLOAT_BITS:
            out.setdefault(name, {})[b] = 0.0
            continue
        var.assign(k.fake_quant(b).reshape(k.weights.shape).astype(np.float32))
        out.setdefault(name, {})[b] = float(np.mean((predict(model, x) - reference) ** 2))
        var.assign(k.weights)
    return out


@ALLOCATORS.register("quant.sensitivity")
def allocate_sensitivity(problem: AllocationProblem) -> BitPlan:
    """Per-layer output sensitivity (non-XAI baseline), minimised under the budget."""
    _check_problem(problem)
    sens = layer_sensitivity(problem)
    size = problem.group_size if problem.granularity == "group" else None
    rows = []
    for name, k in problem.kernels.items():
        err = channel_errors(k, problem.candidates)
        for sl in group_slices(k.num_channels, size):
            row = []
            for b in problem.candidates:
                total = err[b].sum()
                share = err[b][:, sl].sum() / total if total > 0 else 0.0
                row.append(sens[name][b] * share)
            rows.append(row)
    return knapsack_plan(problem, np.asarray(rows), "quant.sensitivity",
                         {"layer_sensitivity": {n: {str(b): v for b, v in d.items()} for n, d in sens.items()}})


# ------------------------------------------------------------------------------------------
# quant.uniform


@ALLOCATORS.register("quant.uniform")
def allocate_uniform(problem: AllocationProblem) -> BitPlan:
    """One width everywhere: the only candidate, or, with several candidates and a budget, the
    widest that fits it."""
    _check_problem(problem)
    total_nonzero = problem.nonzero_weights
    widths = sorted(problem.candidates)
    budget = problem.budget_bits()
    if len(widths) > 1 and budget is None:
        raise ConfigError(f"uniform allocation got several widths {widths} and no budget; pass one width "
                          "(e.g. --bits 4) or a budget to pick the widest that fits")
    fitting = [b for b in widths if budget is None or b * total_nonzero <= budget]
    if not fitting:
        raise _infeasible(problem, budget, widths[0] * total_nonzero, f"every weight at {widths[0]} bits")
    width = fitting[-1]
    groups = groups_of(problem)
    chosen = np.full(len(groups), width)
    notes = {"candidates": widths, "budget_bits": budget, "planned_bits": int(width * total_nonzero),
             "nonzero_weights": total_nonzero, "solver": "uniform"}
    return _plan_from_groups(problem, groups, chosen, np.zeros(len(groups)), "quant.uniform", notes)


#: CLI names -> registry keys
ALLOCATOR_ALIASES = {"relevance": "quant.relevance", "sensitivity": "quant.sensitivity", "uniform": "quant.uniform"}


def allocator_key(name: str) -> str:
    """The registry key of a CLI name (``relevance``) or key (``quant.relevance``)."""
    key = ALLOCATOR_ALIASES.get(name, name)
    if key not in ALLOCATORS:
        raise ConfigError(f"unknown bit allocator {name!r}; known: {', '.join(ALLOCATOR_ALIASES)} "
                          f"(registry keys {', '.join(ALLOCATORS)}); pass --allocator relevance, sensitivity or uniform")
    return key
