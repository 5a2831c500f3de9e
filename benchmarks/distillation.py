"""Pruning + knowledge distillation on the MLPerf Tiny DS-CNN: relevance vs magnitude filter
ranking, over several distillation seeds, with the int8 TFLite accuracy that ships.

kws01 has no training split (500 labelled calibration samples, 500 evaluation samples), so the
pruned model is distilled from the original on augmented calibration samples (mixup, time shift,
time/feature masks, noise; ``toolchain.prune.distill``) — the default recipe's flow. For each filter ranking (relevance,
magnitude) the model is pruned once (50% of the filters of every layer) and distilled with ``--seeds`` different seeds; each result is converted to full-integer
int8 TFLite and evaluated on the evaluation split. Seeds show how much of a difference is noise
(one evaluation sample is 0.2 points).

    python benchmarks/distillation.py [--seeds 3] [--steps 8000]

Writes benchmarks/results/distillation.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from run_all import KWS_MODEL, RESULTS, tflite_accuracy  # the script's folder is on sys.path


def load_kws():
    """(model, dataset) of the MLPerf Tiny DS-CNN on kws01, or None (with a message) when absent."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not KWS_MODEL.exists():
        print(f"{KWS_MODEL} is absent; set TOOLCHAIN_SHARED_DIR to the folder holding models/mlperf-tiny")
        return None
    from toolchain.pipeline import load_inputs

    return load_inputs(str(KWS_MODEL), "kws01")


def prune_distill_int8(model, ds, out_dir: Path, *, criterion: str = "relevance", sparsity=None,
                       scope: str = "layer", seed: int = 0, steps=None, formats=("tflite-int8",)):
    """The default recipe's prune + distill (only the given settings differ), then full-integer
    int8 TFLite: returns (PruneResult, .tflite path, int8 accuracy on the evaluation split,
    {format: path} of every exported format). Other ``formats`` (e.g. ``tflite-mixed``, from the
    default recipe's bit plan) come out of the same export, so verification runs once."""
    from toolchain.compress import plan_from_recipe
    from toolchain.export import export
    from toolchain.prune import prune
    from toolchain.prune.distill import DistillConfig
    from toolchain.recipe import DEFAULT_RECIPE

    p = DEFAULT_RECIPE["prune"]
    r = prune(model, ds, criterion=criterion, granularity="filter",
              sparsity=p["sparsity"] if sparsity is None else sparsity, scope=scope,
              channel_multiple=p["channel_multiple"],
              distill=DistillConfig.from_recipe(p, steps=steps or p["distill_steps"], seed=seed), quiet=True)
    formats = ["tflite-int8"] + [f for f in formats if f != "tflite-int8"]
    plan = plan_from_recipe(r.model, ds, DEFAULT_RECIPE, quiet=True) if "tflite-mixed" in formats else None
    paths = {f: a.path for f, a in export(r.model, ds, formats, out_dir, bitplan=plan, quiet=True).artifacts.items()}
    return r, paths["tflite-int8"], tflite_accuracy(paths["tflite-int8"], ds.x_eval, ds.y_eval), paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the default recipe's)")
    args = ap.parse_args()
    loaded = load_kws()
    if loaded is None:
        return 1
    model, ds = loaded
    from toolchain.recipe import DEFAULT_RECIPE

    p = DEFAULT_RECIPE["prune"]
    steps = args.steps or p["distill_steps"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        for criterion in ("relevance", "magnitude"):
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                r, path, int8, _ = prune_distill_int8(model, ds, Path(tmp) / f"{criterion}_{seed}",
                                                   criterion=criterion, seed=seed, steps=steps)
                d = r.settings["distill"]
                row = {"criterion": criterion, "seed": seed, "params": r.params_after,
                       "pruned_accuracy": r.steps[-1].accuracy, "distilled_accuracy": r.accuracy_after,
                       "int8_accuracy": int8, "int8_bytes": Path(path).stat().st_size,
                       "calibration_agreement": d["agreement_after"], "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distillation.json").write_text(json.dumps({"steps": steps, "rows": rows}, indent=2))
    command = ("python benchmarks/distillation.py " + " ".join(sys.argv[1:])).strip()
    md = ["# Pruning + distillation: relevance vs magnitude (DS-CNN, kws01)", "",
          f"Command: `{command}`; 50% of the filters of every layer "
          f"(channel_multiple {p['channel_multiple']}), {steps} distillation steps on the 500 calibration samples, "
          "accuracy on the 500 evaluation samples (original float 91.4%, official int8 90.6%).", "",
          "| ranking | seed | params | pruned, before distillation | distilled (float) | int8 TFLite | int8 bytes |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['criterion']} | {r['seed']} | {r['params']:,} | {r['pruned_accuracy']:.1%} | "
                  f"{r['distilled_accuracy']:.1%} | {r['int8_accuracy']:.1%} | {r['int8_bytes']:,} |")
    md.append("")
    for criterion in ("relevance", "magnitude"):
        v = np.array([r["int8_accuracy"] for r in rows if r["criterion"] == criterion])
        md.append(f"- {criterion}: int8 accuracy mean {v.mean():.2%}, min {v.min():.2%}, max {v.max():.2%} "
                  f"over {len(v)} seeds")
    (RESULTS / "distillation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
