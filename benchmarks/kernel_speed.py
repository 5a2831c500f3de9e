"""TFLite CPU latency by layer width and by weight format: what the default recipe's choices rest on.

1. DS-CNN-shaped models (conv 10x4/2 + 4 depthwise-separable blocks + pooling + dense; random
   weights, latency does not depend on them) at several channel widths, as float32 and as
   full-integer int8 TFLite, and the first convolution alone (one width: conv + pooling + dense,
   no blocks): where the time goes, and why narrowing below 32 channels buys little.
2. The MLPerf Tiny DS-CNN (../shared) as int8 and as tflite-mixed (relevance plan over
   {2,3,4,5,6,8} at 4 average bits: INT4 kernels where the plan puts <= 4 bits): how much the
   INT4 path costs (hence int8 in the default recipe).

Every latency is the runner's p50 (``deploy/runner.py``: 1 thread, XNNPACK on, single-sample
inference, a fresh process per measurement), median over ``--rounds`` rounds.

    python benchmarks/kernel_speed.py [--rounds 9] [--runs 1000]

Writes benchmarks/results/kernel_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from run_all import KWS_MODEL, RESULTS, measure  # the script's folder is on sys.path

#: (first conv, block 1..4 pointwise) channel widths; one width = the first conv alone
WIDTHS = [(64,) * 5, (48,) * 5, (40,) * 5, (32,) * 5, (28,) * 5, (24,) * 5, (16, 32, 32, 32, 32),
          (64,), (32,), (16,)]


def ds_cnn_shape(widths, seed=0):
    import tensorflow as tf

    L = tf.keras.layers
    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input((49, 10, 1))
    x = L.Conv2D(widths[0], (10, 4), strides=2, padding="same", activation="relu")(inp)
    for w in widths[1:]:
        x = L.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        x = L.Conv2D(w, 1, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, L.Dense(12, activation="softmax")(x))


def convert(model, int8: bool) -> bytes:
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([rng.normal(size=(1, 49, 10, 1)).astype(np.float32)] for _ in range(50))
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = c.inference_output_type = tf.int8
    return c.convert()


def p50(path, rounds, runs, work: Path, data=None) -> float:
    return float(np.median([measure(path, data, runs, work / f"r{k}")["p50_ms"] for k in range(rounds)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    widths, formats = [], []
    with tempfile.TemporaryDirectory(prefix="kernel-speed-") as tmp:
        work = Path(tmp)
        for ws in WIDTHS:
            row = {"widths": list(ws)}
            for fmt in ("fp32", "int8"):
                path = work / f"w{'-'.join(map(str, ws))}_{fmt}.tflite"
                path.write_bytes(convert(ds_cnn_shape(ws), fmt == "int8"))
                row[f"{fmt}_bytes"] = path.stat().st_size
                row[f"{fmt}_p50_ms"] = p50(path, args.rounds, args.runs, work / path.stem)
            widths.append(row)
            print(json.dumps(row), flush=True)
        if KWS_MODEL.exists():
            from toolchain.export import export
            from toolchain.pipeline import load_inputs
            from toolchain.quantize import plan_bits

            model, ds = load_inputs(str(KWS_MODEL), "kws01")
            plan = plan_bits(model, ds, allocator="relevance", candidates=(2, 3, 4, 5, 6, 8), budget="avg-bits=4",
                             quiet=True)
            bundle = export(model, ds, ["tflite-fp32", "tflite-int8", "tflite-mixed"], work / "kws", bitplan=plan,
                            quiet=True)
            for fmt, art in bundle.artifacts.items():
                row = {"format": fmt, "bytes": art.size_bytes,
                       "p50_ms": p50(art.path, args.rounds, args.runs, work / f"kws_{fmt}", data="kws01")}
                formats.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernel_speed.json").write_text(json.dumps({"rounds": args.rounds, "runs": args.runs,
                                                           "widths": widths, "formats": formats}, indent=2))
    md = ["# TFLite CPU latency by layer width and weight format", "",
          f"Command: `python benchmarks/kernel_speed.py --rounds {args.rounds} --runs {args.runs}`; runner p50 "
          "(1 thread, XNNPACK on, a fresh process per measurement), median over the rounds; this 2-core x86_64 VM.", "",
          "DS-CNN-shaped models (random weights) by channel width (first conv, then the 4 pointwise convs; "
          "one width: the first conv alone, with pooling and the dense layer):", "",
          "| widths | float32 B | float32 p50 ms | int8 B | int8 p50 ms |", "|---|---:|---:|---:|---:|"]
    md += [f"| {'-'.join(map(str, r['widths'])) + (' (first conv only)' if len(r['widths']) == 1 else '')} | {r['fp32_bytes']:,} | {r['fp32_p50_ms']:.4f} | {r['int8_bytes']:,} | "
           f"{r['int8_p50_ms']:.4f} |" for r in widths]
    if formats:
        md += ["", "MLPerf Tiny DS-CNN, unpruned (tflite-mixed: relevance plan over {2,3,4,5,6,8} at 4 average bits, "
                   "INT4 kernels where the plan puts <= 4 bits):", "",
               "| format | bytes | p50 ms |", "|---|---:|---:|"]
        md += [f"| {r['format']} | {r['bytes']:,} | {r['p50_ms']:.4f} |" for r in formats]
    (RESULTS / "kernel_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
