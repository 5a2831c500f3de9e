"""One trial of a tune: ``toolchain compress`` with the trial's recipe, in two reported steps.

Each trial's recipe is exactly the one ``best.yaml`` would hold (its verify guard is the drop
constraint): a trial that loses more than that is refused by compress's guard and listed as
``refused``. Step 1 runs compress with the benchmark off and reports what parallel trials cannot distort: the
shipped artifact's size (flash, and RAM for an MCU bundle), the task's metric and the worst
compressed artifact's drop against the original. A trial that already breaks a flash, ram or drop
constraint is stopped there (``ConstraintStopper``) and never benchmarked. Step 2 benchmarks the
headline artifact on the target with compress's own bench rows and reports its latency (on
``qemu-cortex-m*``: the EMULATED INSTRUCTION COUNT). Stage outputs (relevance, pruning, bit plan)
come from the shared stage cache, so trials that share a prune setting prune once.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import yaml

#: score of a trial that failed (compress refused the recipe or crashed); feasible trials score
#: their objective normalised to about [0, 1], infeasible ones INFEASIBLE_SCORE + their violation
FAILED_SCORE = 1e6
INFEASIBLE_SCORE = 10.0
#: a trial compress's guard refused (it loses more than the drop limit): infeasible, numbers unknown
REFUSED_SCORE = 2 * INFEASIBLE_SCORE
#: constraints known after step 1 (size and accuracy: parallel trials do not change them)
STEP1_CONSTRAINTS = ("flash", "ram", "drop")


@dataclass(frozen=True)
class TrialNumbers:
    """What one trial measured. ``latency_ms`` is the p50 of the headline artifact on the target
    while other trials ran (``latency_serial_ms``: re-measured after the search with no trial
    running); ``instructions`` is the EMULATED INSTRUCTION COUNT on qemu-cortex-m targets."""
    metric: str
    value: Optional[float]             # the headline artifact's metric (accuracy as a fraction)
    original: Optional[float]          # the original model's metric
    drop_points: Optional[float]       # worst compressed artifact vs the original, x 100
    flash_bytes: int
    ram_bytes: Optional[int]
    headline_format: str
    headline_bytes: int
    original_fp32_bytes: Optional[int]
    latency_ms: Optional[float] = None
    instructions: Optional[float] = None
    emulated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def numbers_from_summary(summary: dict) -> TrialNumbers:
    """The trial's numbers from compress's ``summary.json`` (no benchmark yet)."""
    rows = summary["artifacts"]
    metric = summary["original"]["metric"]
    compressed = [r for r in rows if r["origin"] == "compressed"]
    head = next(r for r in compressed if r["format"] == summary["headline_format"])
    mcu = next((r for r in compressed if r["format"] == "mcu"), None)
    base = next((r for r in rows if r["origin"] == "baseline" and r["format"] == "tflite-fp32"), None)
    drops = [r["change_vs_original"] for r in compressed if r.get("change_vs_original") is not None]
    return TrialNumbers(
        metric=metric, value=head.get(metric), original=head.get(f"original_{metric}"),
        drop_points=max(drops) * 100 if drops else None,
        flash_bytes=int(mcu["size_bytes"] if mcu else head["size_bytes"]),
        ram_bytes=int(mcu["arena_bytes"]) if mcu and mcu.get("arena_bytes") is not None else None,
        headline_format=head["format"], headline_bytes=int(head["size_bytes"]),
        original_fp32_bytes=int(base["size_bytes"]) if base else None)


def bench_headline(build: Path, summary: dict, bench_recipe: dict, data_spec: str, data_dir, out: Path,
                   quiet: bool = True) -> dict:
    """Benchmark the build's headline artifact with compress's bench rows; returns
    ``{latency_ms, instructions, emulated}``."""
    from toolchain.compress import _bench_rows

    head = next(r for r in summary["artifacts"] if r["origin"] == "compressed"
                and r["format"] == summary["headline_format"])
    row = {**head, "path": str(build / head["path"])}
    _bench_rows([row], data_spec, data_dir, {**bench_recipe, "enabled": True}, out, quiet)
    return latency_fields(row["p50_ms"], bool(row.get("emulated")), bench_recipe["target"])


def latency_fields(p50_ms: float, emulated: bool, target: str) -> dict:
    from toolchain.tune.constraints import INSTRUCTION_TARGETS

    if target in INSTRUCTION_TARGETS:
        from deploy.targets.qemu_cortex_m import VIRTUAL_NS_PER_INSTRUCTION

        # QEMU virtual time under -icount shift=0: a fixed number of ns per emulated instruction
        return {"latency_ms": None, "instructions": p50_ms * 1e6 / VIRTUAL_NS_PER_INSTRUCTION, "emulated": True}
    return {"latency_ms": p50_ms, "instructions": None, "emulated": emulated}


def score(numbers: dict, constraints: List[dict], objective: str) -> tuple:
    """``(score, violated)``: lower is better. Feasible: the objective normalised (size / original
    float32 size, drop points / 100, latency / 1 s, instructions / 1e9); infeasible: more than any
    feasible trial, ordered by how far it breaks its constraints."""
    from toolchain.tune.constraints import Constraint

    violated, total = [], 0.0
    for c in constraints:
        c = Constraint(**c)
        value = numbers.get(c.field)
        if c.name == "latency" and numbers.get("latency_serial_ms") is not None:
            value = numbers["latency_serial_ms"]  # the undistorted number, where there is one
        if value is None and c.name in ("latency", "instructions"):
            continue  # not measured yet (step 1)
        v = c.violation(value)
        if v > 0:
            violated.append(c.text)
            total += min(v, 1e3)
    if violated:
        return INFEASIBLE_SCORE + total, violated
    value = numbers.get(OBJECTIVE_FIELDS[objective])
    if objective == "latency" and numbers.get("latency_serial_ms") is not None:
        value = numbers["latency_serial_ms"]
    if value is None:
        return INFEASIBLE_SCORE / 2, violated
    scale = {"size": numbers.get("original_fp32_bytes") or 1, "metric": 100.0, "latency": 1000.0,
             "instructions": 1e9}[objective]
    return float(value) / scale, violated


def with_drop_limit(constraints: List[dict], guard_points: dict, metric: str) -> List[dict]:
    """The constraints plus, when none limits the drop, the recipe's own guard as one (a best
    recipe must pass compress's guard as is)."""
    from toolchain.tune.constraints import Constraint
    from toolchain.tune.space import GUARD_FOR_METRIC

    if any(c["name"] == "drop" for c in constraints):
        return list(constraints)
    limit = guard_points[metric]
    return list(constraints) + [Constraint("drop", limit, f"drop<={limit:g} (the recipe's verify."
                                                          f"{GUARD_FOR_METRIC[metric]})").to_dict()]


#: what ``--objective`` minimises among the trials that meet every constraint
OBJECTIVE_FIELDS = {"metric": "drop_points", "size": "flash_bytes", "latency": "latency_ms",
                    "instructions": "instructions"}


def run_trial(config: dict, ctx: dict) -> None:
    """The Ray Tune function trainable (runs in a Ray worker process)."""
    from ray import tune

    from toolchain.errors import ToolchainError
    from toolchain.errors import VerificationError
    from toolchain.tune.space import recipe_for

    for name, value in ctx["env"].items():
        os.environ[name] = value
    trial_id = tune.get_context().get_trial_id()
    folder = Path(ctx["trials_dir"]) / trial_id
    folder.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(ctx["raw_recipe"], config, ctx["target"], ctx["drop_points"])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_recipe = json.loads(json.dumps(recipe))
    bench = dict(run_recipe.get("bench") or {})
    run_recipe["bench"] = {**bench, "enabled": False}
    t0 = time.perf_counter()
    record = {"trial_id": trial_id, "config": config, "recipe": recipe, "build": str(folder / "build")}

    def report(step: int, numbers: Optional[dict], status: str, error: Optional[str] = None):
        if numbers is None:  # refused by the guard (the drop limit): infeasible; failed: worst
            s, violated = (REFUSED_SCORE, ["drop (compress's guard)"]) if status == "refused" else (FAILED_SCORE, [])
        else:
            s, violated = score(numbers, ctx["constraints"], ctx["objective"])
        out = {"score": s, "step": step, "status": status, "violated": violated, "error": error,
               "seconds": time.perf_counter() - t0, "numbers_json": json.dumps(numbers)}
        (folder / "trial.json").write_text(json.dumps({**record, **out, "numbers": numbers}, indent=2))
        tune.report(out)

    from toolchain.compress import run_compress

    try:
        result = run_compress(ctx["model"], ctx["data"], str(folder / "build"), run_recipe,
                              trust_model=ctx["trust_model"], data_dir=ctx["data_dir"], quiet=True, task=ctx["task"])
        numbers = numbers_from_summary(result.summary).to_dict()
    except ToolchainError as e:
        status = "refused" if isinstance(e, VerificationError) else "failed"
        report(1, None, status, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
        return
    measured = ctx["bench_enabled"]
    constraints = with_drop_limit(ctx["constraints"], ctx["guard_points"], numbers["metric"])
    ctx = {**ctx, "constraints": constraints}
    _, violated = score(numbers, [c for c in constraints if c["name"] in STEP1_CONSTRAINTS], ctx["objective"])
    report(1, numbers, "stopped" if violated else ("compressed" if measured else "done"))
    if violated or not measured:
        return
    try:
        numbers.update(bench_headline(result.out_dir, result.summary, result.summary["recipe"]["bench"],
                                      ctx["data"], ctx["data_dir"], folder / "bench"))
    except ToolchainError as e:
        report(2, numbers, "failed", f"bench: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
        return
    report(2, numbers, "done")

