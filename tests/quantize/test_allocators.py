"""Allocators and the knapsack, without TensorFlow: budgets, exactness, monotonicity, pruned
zeros, and one clear error per bad input."""
import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from toolchain.errors import ConfigError
from toolchain.quantize.allocators import (ALLOCATORS, WEIGHTINGS, AllocationProblem, allocate_relevance,
                                           allocate_uniform, knapsack_plan, solve_mckp)
from toolchain.quantize.budget import Budget, parse_bits, parse_budget
from toolchain.quantize.kernels import Kernel, check_widths

#: a DP objective may differ from brute force only by float summation order
OBJECTIVE_RTOL = 1e-9


@dataclass
class _Rel:
    weight: np.ndarray


@dataclass
class _RelevanceMap:
    layers: dict
    rule: str = "lrp.epsilon"
    samples: int = 1


def _kernels(seed=0, prune=0.0):
    rng = np.random.RandomState(seed)
    shapes = {"conv": ("Conv2D", (3, 3, 2, 12)), "dw": ("DepthwiseConv2D", (3, 3, 12, 1)),
              "fc": ("Dense", (24, 10))}
    kernels = {}
    for name, (cls, shape) in shapes.items():
        w = (rng.randn(*shape) * rng.uniform(0.2, 2.0)).astype(np.float32)
        if prune:
            w[rng.rand(*shape) < prune] = 0.0
        kernels[name] = Kernel(name, cls, w)
    return kernels


def _relevance(kernels, seed=1):
    rng = np.random.RandomState(seed)
    return _RelevanceMap({n: _Rel((rng.randn(*k.weights.shape) * np.abs(k.weights)).astype(np.float32))
                          for n, k in kernels.items()})


def _problem(budget="avg-bits=4", granularity="layer", candidates=(2, 4, 8), prune=0.0, **kw):
    kernels = _kernels(prune=prune)
    return AllocationProblem(kernels, check_widths(candidates), parse_budget(budget), granularity, 4,
                             _relevance(kernels), **kw)


def _planned_bits(plan, kernels):
    total = 0
    for name, lb in plan.layers.items():
        k = kernels[name]
        widths = np.asarray(lb.channel_bits())
        total += int((k.nonzero_per_channel * widths).sum())
    return total


# --- the knapsack ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force(seed):
    rng = np.random.RandomState(seed)
    groups, opts = 6, 3
    costs = rng.randint(1, 40, size=(groups, 1)) * np.array([2, 4, 8])
    losses = np.sort(rng.rand(groups, opts), axis=1)[:, ::-1] * rng.rand(groups, 1)
    budget = int(costs.min(axis=1).sum() + rng.randint(0, costs.max(axis=1).sum() - costs.min(axis=1).sum()))
    best = np.inf
    for pick in itertools.product(range(opts), repeat=groups):
        c = costs[np.arange(groups), pick].sum()
        if c <= budget:
            best = min(best, losses[np.arange(groups), pick].sum())
    picks, note = solve_mckp(costs, losses, budget)
    got = losses[np.arange(groups), picks].sum()
    assert costs[np.arange(groups), picks].sum() <= budget
    assert abs(got - best) <= OBJECTIVE_RTOL * max(1.0, best), f"DP {got} vs brute force {best} ({note})"


def test_coarsened_dp_still_meets_the_budget():
    rng = np.random.RandomState(3)
    costs = rng.randint(100, 5000, size=(40, 1)) * np.array([2, 4, 8])
    losses = np.sort(rng.rand(40, 3), axis=1)[:, ::-1]
    budget = int(costs[:, 1].sum())
    picks, note = solve_mckp(costs, losses, budget, max_cells=40 * 500)
    assert "coarsened" in note
    assert costs[np.arange(40), picks].sum() <= budget


# --- budgets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("allocator", ["quant.relevance", "quant.uniform"])
@pytest.mark.parametrize("granularity", ["layer", "group"])
@pytest.mark.parametrize("budget", ["avg-bits=4", "avg-bits=3.3", "size-kb=0.4", "bits=3000"])
def test_plans_meet_the_budget(allocator, granularity, budget):
    problem = _problem(budget, granularity, (2, 3, 4, 5, 8))
    if allocator == "quant.uniform" and problem.budget_bits() < 2 * problem.nonzero_weights:
        pytest.skip("budget below uniform 2-bit")
    plan = ALLOCATORS.get(allocator)(problem)
    planned = _planned_bits(plan, problem.kernels)
    assert planned <= problem.budget_bits(), f"{planned} bits planned, budget {problem.budget_bits()}"
    assert plan.notes["planned_bits"] == planned


def test_budget_met_exactly_when_it_is_reachable():
    problem = _problem("avg-bits=4", "layer", (2, 4, 8))
    plan = allocate_relevance(problem)
    assert _planned_bits(plan, problem.kernels) == problem.budget_bits()  # all 4 bits is one exact plan


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("granularity", ["layer", "group"])
def test_bigger_budget_never_lowers_fidelity(weighting, granularity):
    objectives = []
    for avg in np.arange(2.0, 8.01, 0.25):
        problem = _problem(f"avg-bits={avg}", granularity, (2, 3, 4, 8), weighting=weighting)
        plan = allocate_relevance(problem)
        objectives.append(plan.notes["objective"])
    diffs = np.diff(objectives)
    assert np.all(diffs <= OBJECTIVE_RTOL * max(objectives)), f"objective rose with the budget: {objectives}"
    assert objectives[-1] < objectives[0]


def test_pruned_zeros_cost_nothing():
    problem = _problem("avg-bits=4", "layer", (2, 4, 8), prune=0.5)
    assert problem.nonzero_weights < sum(k.num_weights for k in problem.kernels.values())
    plan = allocate_uniform(AllocationProblem(problem.kernels, (4,), None))
    assert plan.notes["planned_bits"] == 4 * problem.nonzero_weights
    # the same bit budget buys twice the bits per weight once half the weights are zero
    dense = _problem("bits=1800", "layer", (2, 4, 8))
    pruned = _problem("bits=1800", "layer", (2, 4, 8), prune=0.5)
    avg = lambda p, pl: _planned_bits(pl, p.kernels) / p.nonzero_weights  # noqa: E731
    assert avg(pruned, allocate_relevance(pruned)) > avg(dense, allocate_relevance(dense))


def test_fully_pruned_channel_is_free_and_harmless():
    kernels = _kernels()
    w = kernels["conv"].weights.copy()
    w[..., :4] = 0.0
    kernels["conv"] = Kernel("conv", "Conv2D", w)
    problem = AllocationProblem(kernels, (2, 4, 8), parse_budget("avg-bits=4"), "group", 4, _relevance(kernels))
    plan = allocate_relevance(problem)
    assert _planned_bits(plan, kernels) <= problem.budget_bits()
    assert plan.layers["conv"].group_bits[0] == 2  # an all-zero group takes the cheapest width


def test_int16_activations_mark_the_lossiest_layers():
    plan = allocate_relevance(_problem("avg-bits=3", "layer", (2, 4, 8), int16_layers=1))
    marked = [n for n, lb in plan.layers.items() if lb.activation_bits == 16]
    assert len(marked) == 1 and plan.notes["int16_activation_layers"] == marked


# --- errors ------------------------------------------------------------------------------------

def test_infeasible_budget_is_one_clear_error():
    with pytest.raises(ConfigError, match="below the smallest possible plan"):
        allocate_relevance(_problem("avg-bits=1.5", "layer", (2, 4, 8)))
    with pytest.raises(ConfigError, match="below the smallest possible plan"):
        allocate_uniform(_problem("avg-bits=3", "layer", (4, 8)))


def test_empty_or_bad_candidates():
    with pytest.raises(ConfigError, match="empty"):
        check_widths(parse_bits(""))
    with pytest.raises(ConfigError, match=r"\[1, 9\] are not allowed"):
        check_widths((1, 4, 9))
    with pytest.raises(ConfigError, match="not integers"):
        parse_bits("2,four")


def test_unknown_allocator_lists_the_known_ones():
    with pytest.raises(ConfigError, match="quant.relevance, quant.sensitivity, quant.uniform"):
        ALLOCATORS.get("quant.magic")


@pytest.mark.parametrize("text", ["avg-bits", "avg-bits=-1", "speed=3", "bits=1.5", "size-kb=abc"])
def test_bad_budget_text(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_budget_units():
    assert parse_budget("size-kb=12").total_bits(10) == 12 * 1024 * 8
    assert parse_budget("avg-bits=4").total_bits(1001) == 4004
    assert parse_budget("total_bits=77") == Budget("bits", 77)


def test_uniform_needs_one_width_or_a_budget():
    with pytest.raises(ConfigError, match="several widths"):
        allocate_uniform(_problem(None, "layer", (4, 8)))
    plan = allocate_uniform(_problem("avg-bits=6", "layer", (2, 4, 8)))
    assert {lb.weight_bits for lb in plan.layers.values()} == {4}


def test_relevance_that_does_not_fit_the_model():
    problem = _problem()
    bad = _RelevanceMap({"conv": _Rel(np.zeros((1, 1, 1, 1), np.float32))})
    from dataclasses import replace
    with pytest.raises(ConfigError, match=r"dw \(no relevance\).*fc \(no relevance\)|conv \(relevance shape"):
        allocate_relevance(replace(problem, relevance=bad))
    with pytest.raises(ConfigError, match="needs a budget"):
        knapsack_plan(replace(problem, budget=None), np.zeros((3, 3)), "quant.relevance")
