"""``toolchain tune`` on the digits CNN: does a short search find a recipe that meets a flash limit,
does ``compress --recipe best.yaml`` reproduce the trial, and how many trials an hour run with 1 and
2 local workers and on a 2-process local Ray cluster.

Parts (``--parts``, each merged into the results file as it finishes):

* ``search``: ``--trials`` (<= 12) trials, 2 local workers, constraints ``--constraint`` (default
  flash<=16KB and drop<=1 point); then ``toolchain compress --recipe best.yaml`` and the best
  trial's flash bytes and accuracy against the reproduction's;
* ``one``: ``--throughput-trials`` trials with 1 local worker (trials per hour);
* ``cluster``: the same on a local Ray cluster started here (``ray start --head --block
  --num-cpus=2`` in its own session, ended by its process group afterwards:
  ``toolchain.tune.cluster.local_ray_cluster``) via ``--address``.

Every part starts from an empty stage cache, so trials per hour include each part's relevance and
pruning. The model is benchmarks/families.py's digits CNN (30 epochs, cached). The trials' recipe
is a fast one (200 relevance samples, 3,000 distillation steps without a time budget, TFLite only, 50
benchmark runs). Run niced on a shared machine: times are upper bounds.

    nice -n 19 python benchmarks/tune.py [--parts search,one,cluster] [--trials 8]

Writes benchmarks/results/tune.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
PARTS = ("search", "one", "cluster")
#: the trials' base recipe: recovery by a short distillation without a time budget (3,000 steps,
#: about 1.5 min on the digits CNN; deterministic, so compress --recipe best.yaml redoes the trial);
#: until 2026-12-06 it was 2 fine-tuning epochs, which do not recover 0.5 filter pruning (-2.2 points)
BASE_RECIPE = {"relevance": {"samples": 200},
               "prune": {"distill_steps": 3000, "distill_time_budget_s": None, "fine_tune_epochs": 0},
               "export": {"formats": ["tflite-fp32", "tflite-int8", "tflite-mixed"]}, "bench": {"runs": 50}}
DEFAULT_CONSTRAINTS = ("flash<=16KB", "drop<=1")
#: what the recorded parts ran with (kept beside the numbers until the parts are re-run)
RUN_NOTE = ("The search part ran on 2026-12-06 with commit 0668945 plus the trials' new base recipe (3,000 "
            "distillation steps without a time budget instead of 2 fine-tuning epochs): trial budgets clamped "
            "to their widths, no pruning backoff inside a trial (it prunes at the sampled sparsity), and with a "
            "flash limit a second starting point, the small-model plan (relevance 4/8 bits at avg 4, no float "
            "layer). Three earlier 12-trial searches that day met nothing: the first wasted 3 trials on "
            "budgets below their widths and had TPE learn from sparsities the backoff had swapped; the second "
            "came closest at 21,440 B / -0.89 points; the third (with the starting point, still recovering by "
            "2 fine-tuning epochs) at 24,336 B / -0.44 points, its small-plan trial refused by the 1-point "
            "guard. The cluster and 1-worker parts ran in session 8 (commits 67f90dc and b38403c: a loose "
            "guard, then the pruning backoff inside trials, fine-tuning recovery) and were not re-run.")


def _tune(model: Path, work: Path, name: str, trials: int, constraints, **kwargs) -> dict:
    from toolchain.tune import tune

    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["TOOLCHAIN_CACHE_DIR"] = str(cache)  # an empty stage cache per part
    recipe = work / "base.yaml"
    recipe.write_text(yaml.safe_dump(BASE_RECIPE))
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = tune(str(model), "digits", constraints=list(constraints), trials=trials, recipe=str(recipe),
                  out=str(out), **kwargs)
    seconds = time.perf_counter() - t0
    doc = json.loads((out / "tune.json").read_text())
    # a crashed or interrupted trial is not a trial done
    done = [t for t in result.trials if t["status"] not in ("crashed", "interrupted")]
    return {"part": name, "trials": len(done), "seconds": seconds, "crashed_or_interrupted": len(result.trials) - len(done),
            "trials_per_hour": len(done) / seconds * 3600, "concurrent": doc["concurrent_trials"],
            "ray": doc["ray"], "out": str(out), "tune": doc, "result": result, "base_recipe": BASE_RECIPE}


def part_search(model: Path, work: Path, trials: int, constraints) -> dict:
    from toolchain.compress import run_compress

    got = _tune(model, work, "search", trials, constraints, workers=2)
    result = got.pop("result")
    row = {k: v for k, v in got.items() if k != "tune"}
    row.update({"constraints": got["tune"]["constraints"], "latency": got["tune"]["latency"],
                "searched": got["tune"]["searched"],
                "trial_rows": [{"trial_id": t["trial_id"], "status": t["status"], "feasible": t.get("feasible"),
                                "config": t["config"], "recipe": t.get("recipe"), "numbers": t.get("numbers"),
                                "violated": t.get("violated")} for t in result.trials],
                "front": [t["trial_id"] for t in result.front]})
    if result.best is None:
        row["best"] = None
        return row
    best = result.best
    row["best"] = {"trial_id": best["trial_id"], "numbers": best["numbers"], "recipe": best["best_recipe"]}
    t0 = time.perf_counter()
    again = run_compress(str(model), "digits", str(work / "reproduce"), str(Path(got["out"]) / "best.yaml"),
                         quiet=True)
    s = again.summary
    head = next(r for r in s["artifacts"] if r["origin"] == "compressed" and r["format"] == s["headline_format"])
    row["reproduced"] = {"flash_bytes": head["size_bytes"], "accuracy": head["accuracy"],
                         "p50_ms": head.get("p50_ms"), "seconds": time.perf_counter() - t0,
                         "same_flash": head["size_bytes"] == best["numbers"]["flash_bytes"],
                         "accuracy_diff": head["accuracy"] - best["numbers"]["value"]}
    return row


def collect_search(out: Path) -> dict:
    """The search part from an experiment that ended before its trials did (Ctrl+C or a crash
    after Ray had stopped): what OUT/tune.json and trials.json hold, no reproduction."""
    doc = json.loads((out / "tune.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    for t in trials:  # trials that never reported were running when the search ended
        if t["status"] == "crashed" and t.get("error") in (None, "None"):
            t["status"], t["error"] = "interrupted", None
    done = [t for t in trials if t["status"] != "interrupted"]
    if "bench.enabled: false" in doc["latency"] and BASE_RECIPE["bench"].get("enabled", True):
        # written by an earlier toolchain tune that named the wrong reason
        doc["latency"] = ("latency not measured: no trial reached its benchmark (each broke a flash, ram or "
                          "drop limit first)")
    return {"part": "search", "trials": len(done), "seconds": doc["seconds"],
            "trials_per_hour": len(done) / doc["seconds"] * 3600, "concurrent": doc["concurrent_trials"],
            "ray": doc["ray"], "out": str(out), "constraints": doc["constraints"], "latency": doc["latency"],
            "searched": doc["searched"], "front": doc["front"], "best": None, "interrupted": len(trials) - len(done),
            "trial_rows": [{"trial_id": t["trial_id"], "status": t["status"], "feasible": t.get("feasible"),
                            "config": t.get("config") or {}, "recipe": t.get("recipe"), "numbers": t.get("numbers"),
                            "violated": t.get("violated")} for t in trials]}


def part_one(model: Path, work: Path, trials: int, constraints) -> dict:
    got = _tune(model, work, "one", trials, constraints, workers=1)
    got.pop("result")
    got.pop("tune")
    return got


def part_cluster(model: Path, work: Path, trials: int, constraints) -> dict:
    from toolchain.tune.cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=2) as address:
        got = _tune(model, work, "cluster", trials, constraints, address=address)
    got.pop("result")
    got.pop("tune")
    return got


def _recipes_text(results: dict) -> str:
    """Each part's base recipe (parts run before it was recorded: 2 fine-tuning epochs, no distillation)."""
    said = []
    for name, part in results["parts"].items():
        recipe = part.get("base_recipe")
        text = (yaml.safe_dump(recipe, default_flow_style=True, sort_keys=False, width=10**6).strip() if recipe else
                "relevance.samples 200, prune.fine_tune_epochs 2 (no distillation), TFLite formats only, bench.runs 50")
        said.append(f"the {name} part's base recipe: {text}")
    return "Trials' recipes: " + "; ".join(said) + "."


def markdown(results: dict) -> str:
    from toolchain.tune.front import table

    commands = sorted({p.get("command", results["command"]) for p in results["parts"].values()})
    md = ["# toolchain tune on the digits CNN", "",
          f"Commands: {', '.join('`' + c + '`' for c in commands)}; {results['machine']}. The machine was shared with other "
          "engineers' jobs (load average 6-45 on 2 cores during these runs) and the benchmark ran at `nice -n 19`: "
          "times are upper bounds. " + _recipes_text(results) + " Every part starts from an empty stage cache.", ""]
    md += [RUN_NOTE, ""]
    s = results["parts"].get("search")
    if s:
        md += ["## Search", "",
               f"{s['trials']} trials, {s['concurrent']} at a time (Ray started by the command), "
               f"{s['seconds'] / 60:.1f} min"
               + (f" (stopped with Ctrl+C before the session deadline: {s['interrupted']} trials were still "
                  "running and are listed as interrupted)" if s.get("interrupted") else "")
               + f"; constraints {', '.join(c['text'] for c in s['constraints'])}. "
               f"{s['latency']}.", ""]
        rows = [{**t, "trial_id": t["trial_id"]} for t in s["trial_rows"]]
        md += [table(rows, s["searched"], "latency_ms", "accuracy"), ""]
        if s.get("best"):
            b, r = s["best"], s.get("reproduced") or {}
            n = b["numbers"]
            md += [f"Best (front: {', '.join(s['front'])}): trial {b['trial_id']}, flash {n['flash_bytes']:,} B, "
                   f"accuracy {n['value']:.2%} ({-n['drop_points']:+.2f} points vs the original), serial p50 "
                   f"{(n.get('latency_serial_ms') or float('nan')):.3f} ms. `toolchain compress --recipe best.yaml` "
                   f"reproduced flash {r.get('flash_bytes', 0):,} B ({'same' if r.get('same_flash') else 'DIFFERENT'}) "
                   f"and accuracy {r.get('accuracy', float('nan')):.2%} (difference {r.get('accuracy_diff', float('nan')):+.4f}).",
                   "", "best.yaml:", "", "```yaml", yaml.safe_dump(b["recipe"], sort_keys=False).strip(), "```", ""]
        else:
            md += ["No trial met every constraint, so there is no best.yaml to reproduce: this run does not "
                   "show the issue's first done-when (a flash limit met within 12 trials and reproduced by "
                   "`compress --recipe best.yaml`); more trials did not fit in the session on the shared machine.", ""]
    md += ["## Trials per hour", "", "| setting | trials | concurrent | minutes | trials per hour |", "|---|---|---|---|---|"]
    names = {"one": "1 local worker (Ray started by the command)", "search": "2 local workers (Ray started by the command)",
             "cluster": "2-process local Ray cluster (`ray start --head --num-cpus=2` + `--address`)"}
    for key in ("one", "search", "cluster"):
        p = results["parts"].get(key)
        if p:
            md.append(f"| {names[key]} | {p['trials']} | {p['concurrent']} | {p['seconds'] / 60:.1f} | {p['trials_per_hour']:.1f} |")
        else:
            md.append(f"| {names[key]} | not measured | | | |")
    md += ["", "Trials differ in cost (a trial that breaks the flash or drop limit after compressing is stopped "
           "before its benchmark), so throughput compares settings only roughly; on 2 shared cores two workers "
           "mostly compete for the same cores."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    from families import prepare  # the script's folder is on sys.path

    from toolchain.compress import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--trials", type=int, default=8, help="trials of the search part (<= 12)")
    ap.add_argument("--throughput-trials", type=int, default=2, help="trials of the one and cluster parts")
    ap.add_argument("--constraint", action="append", help="default: flash<=16KB, drop<=1")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--collect-search", metavar="OUT",
                    help="record the search part from the tune folder of an interrupted search part instead")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    model, _ = prepare("digits_cnn", 0)
    work = Path(args.work or tempfile.mkdtemp(prefix="tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    constraints = args.constraint or DEFAULT_CONSTRAINTS
    path = RESULTS / "tune.json"
    results = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
    results.update({"command": "nice -n 19 python benchmarks/tune.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                    "machine": f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})"})
    run = {"search": (lambda: collect_search(Path(args.collect_search))) if args.collect_search else
           (lambda: part_search(model, work, args.trials, constraints)),
           "one": lambda: part_one(model, work, args.throughput_trials, constraints),
           "cluster": lambda: part_cluster(model, work, args.throughput_trials, constraints)}
    for part in parts:
        print(f"== {part}", flush=True)
        got = run[part]()
        # parts may run as separate processes: merge into what is on disk now
        results["parts"] = (json.loads(path.read_text()) if path.is_file() else {"parts": {}})["parts"]
        results["parts"][part] = {**got, "command": results["command"]}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
        (RESULTS / "tune.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

