"""The search: Ray Tune runs the trials, Optuna's TPE (``OptunaSearch``) proposes recipes, and a
constraint stop ends trials that break a flash, ram or drop limit before they are benchmarked.

Ray starts inside the command by default (``ray.init()`` with this machine's cores, nothing to set
up); ``address`` (``auto`` or ``ray://HOST:PORT``) runs the same search on an existing cluster,
whose workers must see the same files (model, data, output folder) and have the toolchain installed.
The experiment folder (``OUT/experiment``) holds Ray's state: an interrupted search continues from
it with ``resume=True`` (``Tuner.restore``).

Latency under parallel trials is distorted (trials share the cores), so after the search the
front's artifacts are benchmarked again one at a time with no trial running, and those serial
numbers are the ones reported and checked against a latency constraint. On ``qemu-cortex-m*``
targets latency is an EMULATED INSTRUCTION COUNT, which parallel load does not change.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from toolchain.errors import ConfigError, TargetUnavailableError
from toolchain.tune.constraints import INSTRUCTION_TARGETS, Constraint, parse_constraints
from toolchain.tune.trial import OBJECTIVE_FIELDS

EXPERIMENT = "experiment"
#: TPE samples this share of the trials at random before modelling (at least MIN_STARTUP)
STARTUP_SHARE, MIN_STARTUP = 1 / 3, 2
MAX_TRIALS = 10_000
#: tries at starting the local Ray instance (its raylet has a fixed 30 s to register)
RAY_START_ATTEMPTS = 3


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    trials: List[dict]
    front: List[dict]
    best: Optional[dict]
    latency_note: str
    seconds: float

    @property
    def best_recipe(self) -> Optional[Path]:
        return self.out_dir / "best.yaml" if self.best is not None else None


def _raw_recipe(path: Optional[str]) -> dict:
    """The keys the user's recipe file sets (already validated by ``load_recipe``)."""
    if path is None:
        return {}
    import yaml

    from toolchain.recipe import load_recipe

    load_recipe(path)  # every check (size, encoding, aliases, keys) before reading it plainly
    return yaml.safe_load(Path(path).read_text()) or {}


def _guard_points(recipe: dict) -> dict:
    """The recipe's guard limits as drop points per metric: the implicit drop constraint."""
    from toolchain.tune.space import GUARD_FOR_METRIC

    return {m: float(recipe["verify"][k]) * 100 for m, k in GUARD_FOR_METRIC.items()}


def tune(model: str, data: str, target: str = "local", constraints: Sequence[str] = (), trials: int = 12,
         recipe: Optional[str] = None, out: Optional[str] = None, address: Optional[str] = None,
         workers: Optional[int] = None, resume: bool = False, objective: str = "metric",
         trust_model: bool = False, data_dir: Optional[str] = None, task: Optional[str] = None,
         seed: int = 0, quiet: bool = False, time_budget_s: Optional[float] = None) -> TuneResult:
    """Search recipes for ``model`` on ``target`` under ``constraints`` (``flash<=32KB`` ...).

    Every trial is ``toolchain compress`` with one recipe; the result is the Pareto front of size,
    the task's metric and latency (or emulated instructions), and the best recipe: the one that
    meets every constraint with the lowest ``objective`` (``metric``: the drop against the original;
    ``size``; ``latency``; ``instructions``). Writes ``OUT/front.md``, ``front.png``,
    ``trials.json``, ``tune.json`` and ``best.yaml``. ``time_budget_s`` (like Ctrl+C) ends the search
    early: running trials stop, the results cover the finished ones, and ``resume=True`` continues."""
    from toolchain.outdir import check_output_dir
    from toolchain.recipe import validate

    raw = _raw_recipe(recipe)
    raw_bench = raw.get("bench") if isinstance(raw.get("bench"), dict) else {}
    base = validate({**raw, "bench": {**raw_bench, "target": target}}, f"recipe {recipe or '(default)'} with --target")
    from deploy.targets import resolve_target

    resolve_target(target)
    cons = parse_constraints(constraints, target, base["export"]["formats"])
    problems = []
    if objective not in OBJECTIVE_FIELDS:
        problems.append(f"--objective {objective!r} is not one of {', '.join(OBJECTIVE_FIELDS)}")
    elif objective == "latency" and (target in INSTRUCTION_TARGETS or not base["bench"]["enabled"]):
        problems.append(f"--objective latency needs a timed target with bench.enabled (target {target}; "
                        "on qemu-cortex-m use --objective instructions)")
    elif objective == "instructions" and target not in INSTRUCTION_TARGETS:
        problems.append(f"--objective instructions needs a qemu-cortex-m target, not {target}")
    if not 1 <= trials <= MAX_TRIALS:
        problems.append(f"--trials {trials} is not in [1, {MAX_TRIALS}]")
    if problems:
        raise ConfigError("; ".join(problems) + "; see `toolchain tune --help`")
    out_dir = check_output_dir(out or f"build/tune-{Path(model).stem}", inputs=[model, recipe])
    experiment = out_dir / EXPERIMENT
    if resume and not experiment.is_dir():
        raise ConfigError(f"--resume: {out_dir} has no {EXPERIMENT}/ folder from an earlier tune; drop "
                          "--resume to start one, or pass the --out of the interrupted search")
    if not resume and experiment.exists():
        raise ConfigError(f"{out_dir} already holds a tune ({EXPERIMENT}/); pass --resume to continue it "
                          "or a new --out to start another")
    out_dir.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import tune as rtune

    from toolchain import stagecache
    from toolchain.tune.space import search_space, starting_points
    from toolchain.tune.trial import run_trial

    space, start = search_space(base, raw, target)
    if not space:
        raise ConfigError(f"recipe {recipe} fixes every key the tuner searches; remove some of them "
                          "(e.g. prune.sparsity, quantize.bits) from the recipe")
    env = {"TOOLCHAIN_CACHE_DIR": str(stagecache.cache_root().resolve()), "TF_CPP_MIN_LOG_LEVEL": "3",
           "RAY_AIR_NEW_OUTPUT": "0"}
    ctx = {"model": str(Path(model).resolve()), "data": data, "data_dir": data_dir, "trust_model": trust_model,
           "task": task, "target": target, "raw_recipe": {**raw, "bench": {**raw_bench, "target": target}},
           "constraints": [c.to_dict() for c in cons], "objective": objective, "env": env,
           "bench_enabled": bool(base["bench"]["enabled"]), "trials_dir": str(out_dir / "trials"),
           "guard_points": _guard_points(base),
           "drop_points": next((c.limit for c in cons if c.name == "drop"), None)}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    t0 = time.perf_counter()
    _start_ray(ray, address, quiet)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        concurrent = max(1, min(workers or cpus, cpus))
        trainable = rtune.with_resources(rtune.with_parameters(run_trial, ctx=ctx), {"cpu": 1})
        callbacks = [_progress_callback(rtune, trials, concurrent, quiet)]
        if resume:
            tuner = rtune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        else:
            import optuna
            from optuna.samplers import TPESampler
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = TPESampler(seed=seed, n_startup_trials=max(MIN_STARTUP, math.ceil(trials * STARTUP_SHARE)))
            searcher = OptunaSearch(sampler=sampler, seed=seed, points_to_evaluate=starting_points(
                space, start, any(c.name == "flash" for c in cons)))
            tuner = rtune.Tuner(
                trainable, param_space=space,
                tune_config=rtune.TuneConfig(metric="score", mode="min", search_alg=searcher, num_samples=trials,
                                             max_concurrent_trials=concurrent, time_budget_s=time_budget_s),
                run_config=rtune.RunConfig(name=EXPERIMENT, storage_path=str(out_dir), stop=_constraint_stopper(rtune),
                                           callbacks=callbacks, verbose=0,
                                           failure_config=rtune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        records = _records(grid, out_dir / "trials")
    finally:
        ray.shutdown()  # on a cluster: disconnects this driver, the cluster keeps running
    seconds = time.perf_counter() - t0
    return _finish(out_dir, records, cons, base, ctx, space, objective, target, data, data_dir,
                   concurrent, address, seconds, quiet)


def _start_ray(ray, address: Optional[str], quiet: bool) -> None:
    # the trials' own output (TensorFlow's warnings) stays in Ray's session logs unless --debug;
    # the command prints one progress line per trial instead
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=bool(os.environ.get("TOOLCHAIN_DEBUG")),
                  configure_logging=True)
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            if address is None:
                # "local": a private instance, never a cluster someone started on this machine
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - ray.init fails with bare Exception too
            ray.shutdown()
            # Ray waits a fixed 30 s for its raylet: a heavily loaded machine can miss that, so retry
            if address is None and attempt < RAY_START_ATTEMPTS and "timed out during startup" in str(e):
                continue
            where = f"at {address}" if address else "locally"
            raise TargetUnavailableError(
                f"could not start or reach Ray {where} ({' '.join(str(e).split())[:200]}); start a cluster with "
                "`ray start --head` (see docs/tune.md) or drop --address to run on this machine") from None


def _constraint_stopper(rtune):
    class ConstraintStopper(rtune.Stopper):
        """Stops a trial whose first step (compressed, not yet benchmarked) breaks a flash, ram or
        drop constraint, or failed: its benchmark would only cost time."""

        def __call__(self, trial_id, result):
            return result.get("status") in ("stopped", "failed", "refused")

        def stop_all(self):
            return False

    return ConstraintStopper()


def _progress_callback(rtune, total: int, concurrent: int, quiet: bool):
    class Progress(rtune.Callback):
        """One line per finished trial with an estimate of the time left."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.done = 0

        def _line(self, trial, text):
            self.done += 1
            elapsed = time.perf_counter() - self.t0
            left = max(total - self.done, 0)
            eta = elapsed / self.done * left / 1.0
            if not quiet:
                print(f"[tune] trial {self.done}/{total} ({trial.trial_id}) {text}; {elapsed / 60:.1f} min "
                      f"elapsed, about {eta / 60:.1f} min left ({concurrent} at a time)", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            import json

            n = json.loads(r.get("numbers_json") or "null") or {}
            if r.get("status") in ("failed", "refused"):
                text = f"{r.get('status')}: {r.get('error')}"
            else:
                text = (f"{r.get('status')}: flash {n.get('flash_bytes', 0):,} B, drop "
                        f"{n.get('drop_points', float('nan')):+.2f} points"
                        + (f", breaks {', '.join(r.get('violated') or [])}" if r.get("violated") else ", meets constraints"))
            self._line(trial, text)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "crashed (see its error.txt in the experiment folder)")

    return Progress()


def _records(grid, trials_dir: Path) -> List[dict]:
    """Every trial of the experiment (also those of a run that was resumed), from its trial.json."""
    import json

    out = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        f = trials_dir / str(trial_id) / "trial.json"
        if f.is_file():
            rec = json.loads(f.read_text())
        else:
            # no report at all: it crashed before compress returned, or the search was interrupted
            # (Ctrl+C, --time-budget) while it ran
            rec = {"trial_id": str(trial_id), "config": result.config or {}, "numbers": None,
                   "status": "crashed" if result.error is not None else "interrupted",
                   "error": " ".join(str(result.error).split())[:500] if result.error is not None else None,
                   "violated": []}
        out.append(rec)
    return sorted(out, key=lambda r: r["trial_id"])


def _finish(out_dir: Path, records: List[dict], cons: List[Constraint], base: dict, ctx: dict, space: dict,
            objective: str, target: str, data: str, data_dir, concurrent: int, address, seconds: float,
            quiet: bool) -> TuneResult:
    from toolchain.tune import front as fr
    from toolchain.tune.space import recipe_for
    from toolchain.tune.trial import score, with_drop_limit

    metric = next((r["numbers"]["metric"] for r in records if r.get("numbers")), "accuracy")
    all_cons = with_drop_limit([c.to_dict() for c in cons], ctx["guard_points"], metric)

    def judge(rec):
        usable = rec.get("numbers") and rec["status"] in ("done", "compressed", "stopped")
        _, violated = score(rec["numbers"], all_cons, objective) if usable else (None, rec.get("violated") or [])
        rec["violated"] = violated
        rec["feasible"] = bool(usable) and rec["status"] != "stopped" and not violated

    for rec in records:
        judge(rec)
    feasible = [r for r in records if r["feasible"]]
    lat = fr.latency_axis(records)
    axes = [fr.SIZE, fr.DROP] + ([lat] if lat else [])
    front = fr.pareto_front(feasible or [r for r in records if r.get("numbers")], axes)
    note = ("latency not measured (bench.enabled: false)" if not base["bench"]["enabled"] else
            "latency not measured: no trial reached its benchmark (each broke a flash, ram or drop limit first)")
    if lat == "instructions":
        note = f"EMULATED INSTRUCTION COUNTS on {target} (QEMU -icount; parallel trials do not change them)"
    elif lat == "latency_ms":
        note = _remeasure(front, base, data, data_dir, out_dir, quiet)
        for rec in front:
            judge(rec)
    best = None
    candidates = [r for r in front if r["feasible"]]
    if candidates:
        field = OBJECTIVE_FIELDS[objective]
        best = min(candidates, key=lambda r: (score(r["numbers"], all_cons, objective)[0], r["numbers"][fr.SIZE],
                                              r["numbers"][fr.DROP]))
        best["best_recipe"] = recipe_for(ctx["raw_recipe"], best["config"], target, ctx["drop_points"])
    searched = sorted(space)
    hours = seconds / 3600
    doc = {"model": ctx["model"], "data": data, "target": target, "constraints": all_cons, "objective": objective,
           "searched": searched, "trials": records, "front": [r["trial_id"] for r in front],
           "best": best["trial_id"] if best else None, "latency": note, "seconds": seconds,
           "trials_per_hour": len(records) / hours if hours > 0 else None, "concurrent_trials": concurrent,
           "ray": address or "local (started by the command)", "cpus": os.cpu_count()}
    fr.write_json(out_dir / "trials.json", records)
    fr.write_json(out_dir / "tune.json", {k: v for k, v in doc.items() if k != "trials"})
    fr.plot_front(records, front, all_cons, metric, out_dir / "front.png")
    md = [f"# toolchain tune: {Path(ctx['model']).name} on {data}, target {target}", "",
          f"Constraints: {', '.join(c['text'] for c in all_cons) or 'none'}; objective: {objective}; "
          f"{len(records)} trials in {seconds / 60:.1f} min ({concurrent} at a time). {note}.", "",
          "## Pareto front" + ("" if feasible else " (no trial met every constraint: the front of all trials)"), "",
          fr.table(front, searched, lat, metric), "",
          f"Best: {best['trial_id'] if best else 'none'}" + (" -> best.yaml" if best else ""), "",
          "## Every trial", "", fr.table(records, searched, lat, metric), ""]
    (out_dir / "front.md").write_text("\n".join(md))
    if best is not None:
        n = best["numbers"]
        fr.write_best(out_dir / "best.yaml", best, {
            "tuned by": f"toolchain tune, trial {best['trial_id']} of {len(records)}",
            "measured": f"flash {n['flash_bytes']:,} B, {metric} {n['value']}, drop {n['drop_points']:+.2f} points",
            "use": "toolchain compress --recipe best.yaml"})
    elif (out_dir / "best.yaml").exists():
        (out_dir / "best.yaml").unlink()  # a resumed search that no longer has a best must not keep an old one
    return TuneResult(out_dir, records, front, best, note, seconds)


def _remeasure(front: List[dict], base: dict, data: str, data_dir, out_dir: Path, quiet: bool) -> str:
    """Benchmark each front trial's headline artifact again, one at a time, with no trial running:
    the numbers parallel trials took share the cores and are distorted."""
    import json

    from toolchain.tune.trial import bench_headline

    for rec in front:
        build = Path(rec["build"])
        summary = json.loads((build / "summary.json").read_text())
        n = rec["numbers"]
        got = bench_headline(build, summary, copy.deepcopy(base["bench"]), data, data_dir,
                             out_dir / "remeasure" / rec["trial_id"], quiet=True)
        n["latency_serial_ms"] = got["latency_ms"]
    return ("latency: the front re-measured serially after the search with no trial running (p50 of "
            f"{base['bench']['runs']} runs on {base['bench']['target']}); other trials' latencies were taken "
            "while trials ran in parallel and are distorted")
