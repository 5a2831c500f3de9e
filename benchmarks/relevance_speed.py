"""How fast is per-weight LRP on a real model?

On the MLPerf Tiny DS-CNN (../shared/models/mlperf-tiny/kws_ref_model) with the 500 kws01
calibration samples it measures
  1. the total wall time of `toolchain relevance` (a fresh CLI process, child process included,
     cache disabled), and
  2. the steady-state cost of LRP per batch of 64, relative to a plain input gradient of the same
     logit over the same batch: in the worker's graph (apples to apples) and as an eager
     tf.GradientTape in the parent.
Targets (issue 2): total <= 30 s on a 2-core machine; steady-state LRP <= 3x a gradient pass.
Writes benchmarks/results/relevance_speed.{json,md}.

    python benchmarks/relevance_speed.py [--model PATH] [--data SPEC] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "mlperf-tiny" / "kws_ref_model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default="kws01")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3, help="CLI runs (the median is reported)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    walls = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "toolchain.cli", "relevance", "--model", args.model,
                            "--data", args.data, "--samples", str(args.samples), "--no-cache", "--quiet",
                            "--out", os.path.join(out, "r")], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)

    import tensorflow as tf

    from toolchain.data import load_dataset
    from toolchain.model_io import load_model
    from toolchain.canonicalize import canonicalize
    from toolchain.relevance import compute_relevance

    model = load_model(args.model)
    x, y = load_dataset(args.data).calibration(args.samples)
    rmap = compute_relevance(model, x, y, quiet=True, profile=True)
    t = rmap.timings
    batch = int(t["batch_size"])

    logits_model = canonicalize(model, strip_softmax=True).model
    tape_times = []
    for r in range(4):
        for start in range(0, len(x) - batch + 1, batch):
            xb = tf.constant(x[start:start + batch])
            yb = tf.constant(y[start:start + batch])
            t0 = time.perf_counter()
            with tf.GradientTape() as tape:
                tape.watch(xb)
                target = tf.reduce_sum(tf.gather(logits_model(xb), yb, axis=1, batch_dims=1))
            tape.gradient(target, xb).numpy()
            if r > 0:
                tape_times.append(time.perf_counter() - t0)
    tape = float(np.median(tape_times))

    result = {
        "model": args.model, "data": args.data, "samples": args.samples, "batch_size": batch,
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "cli_total_s_median": float(np.median(walls)), "cli_total_s_runs": walls,
        "worker_wall_s": t["worker_wall"], "analyzer_build_s": t["analyzer_build"],
        "ms_per_batch": {"lrp_input": 1e3 * t["lrp_input_per_batch"],
                         "lrp_with_per_weight": 1e3 * t["lrp_per_weight_per_batch"],
                         "gradient_graph": 1e3 * t["gradient_per_batch"], "gradient_tape_eager": 1e3 * tape},
    }
    ms = result["ms_per_batch"]
    result["ratio_lrp_input_vs_gradient_graph"] = ms["lrp_input"] / ms["gradient_graph"]
    result["ratio_lrp_per_weight_vs_gradient_graph"] = ms["lrp_with_per_weight"] / ms["gradient_graph"]
    result["ratio_lrp_input_vs_gradient_tape"] = ms["lrp_input"] / ms["gradient_tape_eager"]
    result["ratio_lrp_per_weight_vs_gradient_tape"] = ms["lrp_with_per_weight"] / ms["gradient_tape_eager"]
    result["targets"] = {"cli_total_s_max": 30.0, "lrp_vs_gradient_max": 3.0}

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "relevance_speed.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Relevance speed (MLPerf Tiny DS-CNN, kws01 calibration split)", "",
        f"Command: `python benchmarks/relevance_speed.py` ({args.samples} samples, batch {batch}, "
        f"{os.cpu_count()} cores, {platform.machine()})", "",
        "| measure | value | target |", "|---|---|---|",
        f"| `toolchain relevance` total wall time (median of {args.repeats}, child process included) | "
        f"{result['cli_total_s_median']:.1f} s | <= 30 s |",
        f"| analyzer build in the child | {t['analyzer_build']:.1f} s | |",
        f"| LRP to the input, per batch | {ms['lrp_input']:.1f} ms | |",
        f"| LRP + per-weight relevance of all 10 kernels, per batch | {ms['lrp_with_per_weight']:.1f} ms | |",
        f"| input gradient (same graph), per batch | {ms['gradient_graph']:.1f} ms | |",
        f"| input gradient (eager tf.GradientTape), per batch | {ms['gradient_tape_eager']:.1f} ms | |",
        f"| LRP / gradient (graph) | {result['ratio_lrp_input_vs_gradient_graph']:.2f}x | <= 3x |",
        f"| LRP + per-weight / gradient (graph) | {result['ratio_lrp_per_weight_vs_gradient_graph']:.2f}x | |",
        f"| LRP / eager GradientTape | {result['ratio_lrp_input_vs_gradient_tape']:.2f}x | <= 3x |",
        f"| LRP + per-weight / eager GradientTape | {result['ratio_lrp_per_weight_vs_gradient_tape']:.2f}x | |",
    ]
    (RESULTS / "relevance_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
