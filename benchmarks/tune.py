"""``toolchain tune`` on the digits CNN: does a short search find a recipe that meets a flash limit,
does ``compress --recipe best.yaml`` reproduce the trial, and how many trials an hour run with 1 and
2 local workers and on a 2-process local Ray cluster; on the MLPerf Tiny DS-CNN: is the tuner's best
recipe for qemu-cortex-m4 under the issue's limits at least as good as the hand-tuned MCU default.

Parts (``--parts``, each merged into the results file as it finishes):

* ``search``: ``--trials`` (<= 12) trials, 2 local workers, constraints ``--constraint`` (default
  flash<=16KB and drop<=1 point); then ``toolchain compress --recipe best.yaml`` and the best
  trial's flash bytes and accuracy against the reproduction's;
* ``one``: ``--throughput-trials`` trials with 1 local worker (trials per hour);
* ``cluster``: the same on a local Ray cluster started here (``ray start --head --block
  --num-cpus=2`` in its own session, ended by its process group afterwards:
  ``toolchain.tune.cluster.local_ray_cluster``) via ``--address``.
* ``ds_cnn``: ``--ds-cnn-trials`` trials (2 workers, the shared stage cache) on the DS-CNN with kws01,
  ``--target qemu-cortex-m4`` (EMULATED INSTRUCTION COUNTS), ``flash<=27000B`` and a drop limit of
  1 point below the official int8 (``ds_cnn_constraints``); then ``compress --recipe best.yaml`` on
  ``COMPARE_TARGETS`` (firmware targets with the official int8 as ``--reference``) against the MCU
  default's numbers in benchmarks/results/firmware.json (``--time-budget-min`` ends the search early).

The digits parts start from an empty stage cache, so trials per hour include each part's relevance
and pruning. The model is benchmarks/families.py's digits CNN (30 epochs, cached). The trials' recipe
is a fast one (200 relevance samples, 3,000 distillation steps without a time budget, TFLite only, 50
benchmark runs). Run niced on a shared machine: times are upper bounds.

    nice -n 19 python benchmarks/tune.py [--parts search,one,cluster,ds_cnn] [--trials 8]
    nice -n 19 python benchmarks/tune.py --render   # tune.md again from tune.json

Writes benchmarks/results/tune.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
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
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
KWS_MODEL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model"
OFFICIAL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model_int8.tflite"
PARTS = ("search", "one", "cluster", "ds_cnn")
#: the stage cache the user's environment names (the digits parts replace it with an empty one)
USER_CACHE = os.environ.get("TOOLCHAIN_CACHE_DIR")
#: the trials' base recipe: recovery by a short distillation without a time budget (3,000 steps,
#: about 1.5 min on the digits CNN; deterministic, so compress --recipe best.yaml redoes the trial);
#: until 2026-12-06 it was 2 fine-tuning epochs, which do not recover 0.5 filter pruning (-2.2 points)
BASE_RECIPE = {"relevance": {"samples": 200},
               "prune": {"distill_steps": 3000, "distill_time_budget_s": None, "fine_tune_epochs": 0},
               "export": {"formats": ["tflite-fp32", "tflite-int8", "tflite-mixed"]}, "bench": {"runs": 50}}
DEFAULT_CONSTRAINTS = ("flash<=16KB", "drop<=1")
#: the DS-CNN part: the issue's limits (flash <= 27,000 B; at most 1 point below the official int8)
#: on the firmware target, whose latency is an EMULATED INSTRUCTION COUNT (load does not change it)
DS_CNN_TARGET = "qemu-cortex-m4"
DS_CNN_FLASH = "flash<=27000B"
DS_CNN_POINTS_BELOW_OFFICIAL = 1.0
#: the DS-CNN trials' base recipe: the search part's recovery (3,000 distillation steps, no time
#: budget) on the MCU default's fixed keys (3 QAT epochs, no float layer: TFLM's integer kernels take
#: none; CMSIS-NN kernels), exporting only what ships (tflite-mixed -> the MCU bundle) so that the
#: drop guard judges the shipped model; firmware over all 500 kws01 evaluation samples. Relevance on
#: the default 500 samples (kws01's whole calibration half; cached from earlier DS-CNN runs).
DS_CNN_RECIPE = {"prune": {"distill_steps": 3000, "distill_time_budget_s": None, "fine_tune_epochs": 0},
                 "quantize": {"qat_epochs": 3, "float_layers": []},
                 "export": {"formats": ["tflite-mixed", "mcu"], "mcu_source": "tflite-mixed"},
                 "bench": {"kernels": "cmsis-nn", "samples": None, "runs": 50}}
#: where compress --recipe best.yaml runs for the comparison with the hand-tuned default
COMPARE_TARGETS = ("qemu-cortex-m4", "qemu-cortex-m7", "local")
#: the hand-tuned MCU default's recorded firmware numbers (500 kws01 samples, 48,000 distillation
#: steps / 15 min) and host numbers (its compress summary, cached by benchmarks/firmware.py)
DEFAULT_FIRMWARE = RESULTS / "firmware.json"
#: what the recorded parts ran with (kept beside the numbers until the parts are re-run)
RUN_NOTE = ("What ran: the digits search part on 2026-12-06 with commit 0668945 plus the trials' base recipe "
            "of 3,000 distillation steps without a time budget (trial budgets clamped to their widths, no pruning "
            "backoff inside a trial, and with a flash limit the small-model plan as a second starting point; three "
            "earlier 12-trial searches that day met nothing, the closest 21,440 B / -0.89 points and 24,336 B / "
            "-0.44 points). The DS-CNN parts ran in session 10 from commit ad221cd with another engineer's "
            "uncommitted toolchain/compress.py and recipe.py changes in the tree (the pruning backoff's check, "
            "committed meanwhile as d329b83..7aef3d7; the DS-CNN trials set prune.backoff_sparsities: [] and do not "
            "use it): first over the whole space, then, "
            "because that search showed 3,000 distillation steps do not recover 0.5 filter pruning on DS-CNN (-5.4 "
            "points) while 0.25 kept the drop but missed the flash, a second with prune.sparsity 0.3 and filter "
            "granularity held fixed by the base recipe. The 1-worker and cluster parts re-ran in session 10 on commit "
            "01b6e9f with the current trial recipe (3 trials each, flash<=20KB, drop<=1, each from an empty stage "
            "cache); with so few trials, and trials that differ in cost (one stopped at the flash limit is not "
            "benchmarked), their rates compare settings only roughly.")


def _tune(model: Path, work: Path, name: str, trials: int, constraints, data: str = "digits",
          base_recipe: dict = BASE_RECIPE, fresh_cache: bool = True, **kwargs) -> dict:
    from toolchain.tune import tune

    if fresh_cache:
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["TOOLCHAIN_CACHE_DIR"] = str(cache)  # an empty stage cache per part
    elif USER_CACHE is None:
        os.environ.pop("TOOLCHAIN_CACHE_DIR", None)
    else:
        os.environ["TOOLCHAIN_CACHE_DIR"] = USER_CACHE
    recipe = work / f"base-{name}.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe))
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = tune(str(model), data, constraints=list(constraints), trials=trials, recipe=str(recipe),
                  out=str(out), **kwargs)
    seconds = time.perf_counter() - t0
    doc = json.loads((out / "tune.json").read_text())
    # a crashed or interrupted trial is not a trial done
    done = [t for t in result.trials if t["status"] not in ("crashed", "interrupted")]
    return {"part": name, "trials": len(done), "seconds": seconds, "crashed_or_interrupted": len(result.trials) - len(done),
            "trials_per_hour": len(done) / seconds * 3600, "concurrent": doc["concurrent_trials"],
            "ray": doc["ray"], "out": str(out), "tune": doc, "result": result, "base_recipe": base_recipe}


def part_search(model: Path, work: Path, trials: int, constraints) -> dict:
    from toolchain.compress import run_compress

    got = _tune(model, work, "search", trials, constraints, workers=2)
    result = got.pop("result")
    row = {k: v for k, v in got.items() if k != "tune"}
    row.update({"constraints": got["tune"]["constraints"], "latency": got["tune"]["latency"],
                "searched": got["tune"]["searched"], "trial_rows": _trial_rows(result.trials),
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
            "trial_rows": _trial_rows(trials)}


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


def reference_accuracies() -> dict:
    """The original float DS-CNN's (Keras) and the official int8's (TFLite) accuracy on the kws01
    evaluation split: the split and runtimes every trial's guard and host numbers use."""
    import numpy as np

    from toolchain.data import load_dataset
    from toolchain.export.tflite_backend import run_tflite
    from toolchain.model_io import load_model

    ds = load_dataset("kws01")
    y = np.asarray(ds.y_eval)
    official = float(np.mean(run_tflite(str(OFFICIAL), ds.x_eval).argmax(-1) == y))
    model = load_model(str(KWS_MODEL))
    original = float(np.mean(model.predict(ds.x_eval, batch_size=256, verbose=0).argmax(-1) == y))
    return {"samples": int(len(y)), "original": original, "official_int8": official,
            "official_int8_bytes": OFFICIAL.stat().st_size}


def ds_cnn_constraints(ref: dict) -> list:
    """The issue's "drop <= 1 point vs the official int8" as the tuner's drop constraint, which is
    against the original float model (compress's guard): 1 point plus how far the official int8 is
    below the float model on the same samples."""
    gap = (ref["original"] - ref["official_int8"]) * 100
    return [DS_CNN_FLASH, f"drop<={round(DS_CNN_POINTS_BELOW_OFFICIAL + gap, 2):g}"]


def with_fixed(recipe: dict, fixed) -> dict:
    """``recipe`` with ``section.key=value`` settings (values read as YAML): keys the search then holds fixed."""
    out = copy.deepcopy(recipe)
    for item in fixed or ():
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        out.setdefault(section, {})[key] = yaml.safe_load(value)
    return out


def part_ds_cnn(work: Path, trials: int, time_budget_s=None, fixed=()) -> dict:
    """``toolchain tune`` on the MLPerf Tiny DS-CNN for qemu-cortex-m4 under the issue's limits, then
    ``compress --recipe best.yaml`` on every comparison target. ``fixed``: ``section.key=value``
    settings added to the base recipe (held fixed by the search)."""
    ref = reference_accuracies()
    constraints = ds_cnn_constraints(ref)
    got = _tune(KWS_MODEL, work, "ds_cnn", trials, constraints, data="kws01",
                base_recipe=with_fixed(DS_CNN_RECIPE, fixed), fresh_cache=False, target=DS_CNN_TARGET, workers=2,
                time_budget_s=time_budget_s)
    result, doc = got.pop("result"), got.pop("tune")
    row = {**got, "references": ref, "default": default_numbers(), "constraints": doc["constraints"], "latency": doc["latency"],
           "searched": doc["searched"], "trial_rows": _trial_rows(result.trials),
           "front": [t["trial_id"] for t in result.front], "best": None}
    if result.best is not None:
        best = result.best
        row["best"] = {"trial_id": best["trial_id"], "numbers": best["numbers"], "recipe": best["best_recipe"]}
        # kept beside the search, so a comparison that fails leaves the search recorded
        (work / "ds_cnn_search.json").write_text(json.dumps(row, indent=2, default=str))
        row["compare"] = compare_best(Path(got["out"]) / "best.yaml", work)
    return row


def _trial_rows(trials) -> list:
    return [{"trial_id": t["trial_id"], "status": t["status"], "feasible": t.get("feasible"),
             "config": t.get("config") or {}, "recipe": t.get("recipe"), "numbers": t.get("numbers"),
             "violated": t.get("violated"), "error": t.get("error")} for t in trials]


def compare_best(best_yaml: Path, work: Path) -> dict:
    """``toolchain compress --recipe best.yaml`` on each of ``COMPARE_TARGETS``: on the firmware
    targets with the official int8 as ``--reference`` (built and run beside ours on the same
    samples); on the local CPU flash and accuracy only (its benchmark off: wall-clock latency on the
    shared machine would be distorted, and the default's has no paired measurement to compare with)."""
    from toolchain.compress import run_compress
    from toolchain.errors import ToolchainError
    from toolchain.tune.constraints import INSTRUCTION_TARGETS

    recipe = yaml.safe_load(best_yaml.read_text())
    out = {}
    for target in COMPARE_TARGETS:
        firmware = target in INSTRUCTION_TARGETS
        run = copy.deepcopy(recipe)
        if not firmware:
            run["bench"]["enabled"] = False
        t0 = time.perf_counter()
        command = (f"toolchain compress --model {KWS_MODEL} --data kws01 --recipe best.yaml --target {target}"
                   + (f" --reference {OFFICIAL}" if firmware else " (bench.enabled: false)"))
        try:
            got = run_compress(str(KWS_MODEL), "kws01", str(work / f"best-{target}"), run, target=target,
                               quiet=True, reference=str(OFFICIAL) if firmware else None)
        except ToolchainError as e:  # recorded as the row's result: the other targets still run
            out[target] = {"target": target, "command": command, "error": f"{type(e).__name__}: {e}"}
            continue
        s = got.summary
        head = next(r for r in s["artifacts"] if r["origin"] == "compressed" and r["format"] == s["headline_format"])
        bundle = next((r for r in s["artifacts"] if r["format"] == "mcu"), None)
        entry = {"target": target, "seconds": time.perf_counter() - t0, "command": command,
                 "headline_format": head["format"], "model_bytes": head["size_bytes"],
                 "mcu_bundle_bytes": bundle["size_bytes"] if bundle else None, "host_accuracy": head["accuracy"]}
        if firmware:
            fw = s["firmware"]
            keep = ("model_flash_bytes", "firmware_flash_bytes", "ram_bytes", "emulated_instructions_per_inference",
                    "accuracy")
            ours = next(e for e in fw["entries"] if e["mcu_bundle"])
            official = next(e for e in fw["entries"] if e["format"] == "reference")
            entry.update({"kernels": fw["kernels"], "samples": fw["samples"],
                          "firmware": {k: ours.get(k) for k in keep},
                          "official_firmware": {k: official.get(k) for k in keep}})
        out[target] = entry
    return out


def default_numbers() -> dict:
    """The hand-tuned MCU default's recorded numbers (benchmarks/results/firmware.json, 500 kws01
    samples, CMSIS-NN): per firmware target the model bytes, EMULATED instructions and accuracy of
    ours and the official int8; on the local CPU the headline's bytes and host accuracy."""
    doc = json.loads(DEFAULT_FIRMWARE.read_text())
    out = {"file": str(DEFAULT_FIRMWARE.relative_to(REPO)), "recipe": doc["models"]["ours"]["recipe"],
           "headline": doc["models"]["ours"]["headline"]}
    for target, cpu in (("qemu-cortex-m4", "m4"), ("qemu-cortex-m7", "m7")):
        rows = {r["model"]: r for r in doc["rows"] if r["cpu"] == cpu and r["kernels"] == "cmsis-nn"}
        out[target] = {m: {k: rows[m][k] for k in ("model_flash_bytes", "emulated_instructions_per_inference",
                                                    "accuracy", "ram_bytes", "samples")} for m in ("ours", "official")}
    # the local CPU runs the same tflite-mixed file: its bytes, and the host accuracy its compress headline recorded
    accuracy = re.search(r"accuracy ([0-9.]+)%", out["headline"])
    out["local"] = {"model_bytes": out["qemu-cortex-m4"]["ours"]["model_flash_bytes"],
                    "host_accuracy": float(accuracy.group(1)) / 100 if accuracy else None}
    return out


def _recipes_text(results: dict) -> str:
    """Each part's base recipe (parts run before it was recorded: 2 fine-tuning epochs, no distillation)."""
    said = []
    for name, part in results["parts"].items():
        recipe = part.get("base_recipe")
        text = (yaml.safe_dump(recipe, default_flow_style=True, sort_keys=False, width=10**6).strip() if recipe else
                "relevance.samples 200, prune.fine_tune_epochs 2 (no distillation), TFLite formats only, bench.runs 50")
        said.append(f"the {name} part's base recipe: {text}")
    return "Trials' recipes: " + "; ".join(said) + "."


def _verdict(ours, theirs, lower_is_better: bool) -> str:
    if ours is None or theirs is None:
        return "not measured"
    if ours == theirs:
        return "equal"
    return "better" if (ours < theirs) == lower_is_better else "worse"


def comparison_rows(part: dict) -> list:
    """(target, metric, best recipe, hand-tuned default, official int8, verdict) per target and
    metric: the best recipe against the MCU default's recorded numbers."""
    default, rows = part["default"], []
    for target, got in part.get("compare", {}).items():
        if "error" in got:
            rows.append((target, "compress --recipe best.yaml", got["error"], "", "", "not measured"))
            continue
        if "firmware" in got:
            fw, off, d = got["firmware"], got["official_firmware"], default[target]
            for key, name, lower in (("model_flash_bytes", "model bytes in flash", True),
                                     ("emulated_instructions_per_inference", "EMULATED instructions / inference", True),
                                     ("ram_bytes", "RAM (B)", True),
                                     ("accuracy", f"firmware accuracy ({got['samples']} samples)", False)):
                fmt = (lambda v: f"{v:.1%}") if key == "accuracy" else (lambda v: f"{v:,}")
                rows.append((target, name, fmt(fw[key]), fmt(d["ours"][key]), fmt(off[key]),
                             _verdict(fw[key], d["ours"][key], lower)))
        else:
            d = default["local"]
            rows.append((target, "model bytes (tflite-mixed)", f"{got['model_bytes']:,}", f"{d['model_bytes']:,}", f"{part['references']['official_int8_bytes']:,}",
                         _verdict(got["model_bytes"], d["model_bytes"], True)))
            rows.append((target, "host TFLite accuracy (500 samples)", f"{got['host_accuracy']:.1%}",
                         f"{d['host_accuracy']:.1%}", f"{part['references']['official_int8']:.1%}",
                         _verdict(round(got["host_accuracy"], 3), round(d["host_accuracy"], 3), False)))
    return rows


#: the DS-CNN parts in tune.json, in the order shown: an earlier search kept beside the last one
DS_CNN_PARTS = {"ds_cnn_first": "DS-CNN (MLPerf Tiny) on qemu-cortex-m4: first search (whole space)",
                "ds_cnn": "DS-CNN (MLPerf Tiny) on qemu-cortex-m4"}


def _refusal(trial: dict) -> str:
    """What compress's checks said about a refused trial, in a few words (its first offender)."""
    m = re.search(r"samples: (compressed/)?([^;]*)", trial.get("error") or "")
    if trial["status"] != "refused" or not m:
        return ""
    return f" ({m.group(2).split(', max |diff|')[0].strip()})"


def ds_cnn_markdown(p: dict, title: str = DS_CNN_PARTS["ds_cnn"]) -> list:
    ref = p["references"]
    official = ref["official_int8"]
    drop = next(c for c in p["constraints"] if c["name"] == "drop")
    fixed = {f"{sec}.{k}": v for sec, keys in p["base_recipe"].items() for k, v in keys.items()
             if f"{sec}.{k}" in ("prune.sparsity", "prune.granularity", "prune.criterion", "quantize.bits")}
    md = [f"## {title}", "",
          f"`toolchain tune` on the MLPerf Tiny DS-CNN SavedModel with kws01, `--target {DS_CNN_TARGET}`, "
          f"{p['trials']} trials, {p['concurrent']} at a time, {p['seconds'] / 60:.1f} min, on commit {p.get('commit', '?')}; "
          f"constraints {', '.join(c['text'] for c in p['constraints'])}"
          + (f"; held fixed by the base recipe: {', '.join(f'{k} {v}' for k, v in fixed.items())}" if fixed else "")
          + f". {p['latency']}. Flash is the MCU bundle "
          "the tuner constrains (the tflite-mixed model with tensor names stripped); the firmware tables below "
          "count the tflite-mixed file built into the firmware, as benchmarks/results/firmware.md does.", "",
          f"**Drop vs the official int8, as chosen here**: compress's guard (and so the tuner's `drop`) measures "
          f"against the original float model. On the same {ref['samples']} kws01 evaluation samples the original "
          f"(Keras) scores {ref['original']:.1%} and the official int8 (host TFLite) {official:.1%}, so \"at most "
          f"{DS_CNN_POINTS_BELOW_OFFICIAL:g} point below the official int8\" is `{drop['text']}` against the "
          "original (1 point plus the official's own gap, measured in this run). The trials export only what "
          "ships (tflite-mixed and the MCU bundle), so the guard judges the shipped model; each trial's accuracy "
          "against the official int8 is in its own column.", ""]
    head = ["trial", "status", "flash B (MCU bundle)", "tflite-mixed B", "accuracy", "vs original (points)",
            "vs official int8 (points)", "EMULATED instructions / inference", "meets constraints"] + list(p["searched"])
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in p["trial_rows"]:
        n = t.get("numbers") or {}
        recipe = t.get("recipe") or {}
        cells = [t["trial_id"], t["status"], f"{n['flash_bytes']:,}" if n else "-",
                 f"{n['headline_bytes']:,}" if n else "-", f"{n['value']:.1%}" if n else "-",
                 f"{-n['drop_points']:+.1f}" if n else "-",
                 f"{(n['value'] - official) * 100:+.1f}" if n else "-",
                 f"{n['instructions']:,.0f}" if n.get("instructions") else "-",
                 "yes" if t.get("feasible") else "no: " + ", ".join(t.get("violated") or ["-"]) + _refusal(t)]
        for key in p["searched"]:
            section, name = key.split(".", 1)
            v = (recipe.get(section) or {}).get(name, t["config"].get(key, ""))
            v = ",".join(map(str, v)) if isinstance(v, list) else v
            cells.append(str(v).replace("avg-bits=", ""))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "vs original: the worst shipped artifact (tflite-mixed on all 500 samples, the MCU bundle in "
           "TFLite Micro on its first 200) against the original on the same samples; accuracy: tflite-mixed on all 500.", ""]
    b = p.get("best")
    if not b:
        md += ["No trial met every constraint: there is no best recipe to compare with the hand-tuned default.", ""]
        return md
    n = b["numbers"]
    md += [f"Best (front: {', '.join(p['front'])}; objective: the smallest drop): trial {b['trial_id']}, flash "
           f"{n['flash_bytes']:,} B, accuracy {n['value']:.1%} ({(n['value'] - official) * 100:+.1f} points vs the "
           f"official int8), {n['instructions']:,.0f} EMULATED instructions on {DS_CNN_TARGET}.", "",
           "best.yaml:", "", "```yaml", yaml.safe_dump(b["recipe"], sort_keys=False).strip(), "```", ""]
    rows = comparison_rows(p)
    d = p["default"]
    md += ["### Best recipe vs the hand-tuned MCU default", "",
           f"The best recipe through `compress --recipe best.yaml` on each target (commands: "
           + "; ".join(f"`{g['command']}`" for g in p.get("compare", {}).values())
           + f"), against the default's recorded numbers ({d['file']}: the MCU default, 48,000 distillation steps "
           "capped at 15 min, 3 QAT epochs, int8; firmware over the same 500 kws01 samples, CMSIS-NN kernels). "
           "Instructions are EMULATED INSTRUCTION COUNTS (QEMU -icount), not cycles or time. Local CPU: flash "
           "and host accuracy only; latency is omitted because a wall-clock time on this shared machine would "
           "be distorted and the default has no paired measurement beside it.", "",
           "| target | metric | best recipe | hand-tuned default | official int8 | best vs default |",
           "|---|---|---:|---:|---:|---|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    worse = sorted({f"{r[1]} on {r[0]}" for r in rows if r[5] == "worse"})
    missing = [r for r in rows if r[5] == "not measured"]
    notes = [f"- {n}" for n in p.get("notes", [])]  # the finding, written after the run (kept by --render)
    md += ["", ("**At least as good as the hand-tuned default on every target and metric.**" if not worse and not missing
                else f"**Not at least as good as the hand-tuned default on every target**: worse in {', '.join(worse) or 'none'}"
                + (f"; not measured: {', '.join(r[0] for r in missing)}" if missing else "") + "."), ""]
    return md + (["What it found:", ""] + notes + [""] if notes else [])


def markdown(results: dict) -> str:
    from toolchain.tune.front import table

    commands = sorted({p.get("command", results["command"]) for p in results["parts"].values()})
    loads = "; ".join(f"{name} {p['load_start'][0]:.1f} at start, {p['load_end'][0]:.1f} at end"
                      for name, p in results["parts"].items() if p.get("load_start"))
    md = ["# toolchain tune on the digits CNN and the MLPerf Tiny DS-CNN", "",
          f"Commands: {', '.join('`' + c + '`' for c in commands)}; {results['machine']}. The machine was shared with other "
          "engineers' jobs and the benchmark ran at `nice -n 19`: times are upper bounds (1-minute load average "
          f"on 2 cores: {loads or 'not recorded'}; earlier runs 6-45). " + _recipes_text(results)
          + " The digits parts start from an empty stage cache; the DS-CNN part uses the shared one.", ""]
    md += [RUN_NOTE, ""]
    for name, title in DS_CNN_PARTS.items():
        if results["parts"].get(name):
            md += ds_cnn_markdown(results["parts"][name], title)
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
             "cluster": "2-process local Ray cluster (`ray start --head --num-cpus=2` + `--address`)",
             "ds_cnn": "2 local workers, the DS-CNN part (another model and target: qemu-cortex-m4 firmware)"}
    for key in ("one", "search", "cluster", "ds_cnn"):
        p = results["parts"].get(key)
        if p:
            cut = f" (+{p['crashed_or_interrupted']} interrupted or crashed)" if p.get("crashed_or_interrupted") else ""
            md.append(f"| {names[key]} | {p['trials']}{cut} | {p['concurrent']} | {p['seconds'] / 60:.1f} | "
                      f"{p['trials_per_hour']:.1f} |")
        elif key != "ds_cnn":
            md.append(f"| {names[key]} | not measured | | | |")
    md += ["", "Trials differ in cost (a trial that breaks the flash or drop limit after compressing is stopped "
           "before its benchmark), so throughput compares settings only roughly; on 2 shared cores two workers "
           "mostly compete for the same cores."]
    return "\n".join(md) + "\n"


def _commit() -> str:
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "toolchain", "deploy"], cwd=REPO,
                           capture_output=True, text=True)
    return head.stdout.strip() + (" (with uncommitted changes under toolchain/ or deploy/)" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    from families import prepare  # the script's folder is on sys.path

    from toolchain.compress import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--trials", type=int, default=8, help="trials of the search part (<= 12)")
    ap.add_argument("--throughput-trials", type=int, default=2, help="trials of the one and cluster parts")
    ap.add_argument("--constraint", action="append", help="default: flash<=16KB, drop<=1")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--ds-cnn-trials", type=int, default=8, help="trials of the ds_cnn part")
    ap.add_argument("--fix", action="append", metavar="SECTION.KEY=VALUE",
                    help="hold a key of the ds_cnn search fixed (added to its base recipe), e.g. prune.sparsity=0.3")
    ap.add_argument("--time-budget-min", type=float,
                    help="end the ds_cnn search after this many minutes (its finished trials count)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite tune.md from tune.json (the DS-CNN default's numbers read again from firmware.json)")
    ap.add_argument("--collect-search", metavar="OUT",
                    help="record the search part from the tune folder of an interrupted search part instead")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    path = RESULTS / "tune.json"
    if args.render:
        results = json.loads(path.read_text())
        for name in DS_CNN_PARTS:
            if results["parts"].get(name):
                results["parts"][name]["default"] = default_numbers()
                results["parts"][name]["references"].setdefault("official_int8_bytes", OFFICIAL.stat().st_size)
        path.write_text(json.dumps(results, indent=2, default=str))
        (RESULTS / "tune.md").write_text(markdown(results))
        return 0
    digits = [p for p in parts if p != "ds_cnn"]
    model = prepare("digits_cnn", 0)[0] if digits and not (digits == ["search"] and args.collect_search) else None
    work = Path(args.work or tempfile.mkdtemp(prefix="tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    constraints = args.constraint or DEFAULT_CONSTRAINTS
    results = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
    results.update({"command": "nice -n 19 python benchmarks/tune.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                    "machine": f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})"})
    run = {"search": (lambda: collect_search(Path(args.collect_search))) if args.collect_search else
           (lambda: part_search(model, work, args.trials, constraints)),
           "one": lambda: part_one(model, work, args.throughput_trials, constraints),
           "cluster": lambda: part_cluster(model, work, args.throughput_trials, constraints),
           "ds_cnn": lambda: part_ds_cnn(work, args.ds_cnn_trials,
                                         args.time_budget_min * 60 if args.time_budget_min else None, args.fix)}
    for part in parts:
        print(f"== {part}", flush=True)
        load_start = os.getloadavg()
        got = run[part]()
        got.update({"load_start": load_start, "load_end": os.getloadavg(), "commit": _commit()})
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

