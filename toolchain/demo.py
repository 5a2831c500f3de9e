"""`make demo`: the whole job on the embedded default (scikit-learn digits, offline).

Trains a small CNN on digits (about a minute on 2 cores, skipped when build/demo/model.keras is
already there), then runs the toolchain on it and prints where the results are.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BUILD = Path(os.environ.get("TOOLCHAIN_DEMO_DIR", "build/demo"))


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from toolchain import pipeline
    from toolchain.errors import ToolchainError

    t0 = time.perf_counter()
    BUILD.mkdir(parents=True, exist_ok=True)
    model_path = BUILD / "model.keras"
    try:
        if not model_path.exists():
            print("== training digits_cnn on digits (8x8x1, 1347 train / 450 eval) ==", flush=True)
            result = pipeline.run_train("digits_cnn", "digits", 30, str(model_path))
            print(f"   eval accuracy {result.accuracy:.2%} -> {model_path}")
        else:
            print(f"== reusing {model_path} (delete it to retrain) ==")
        print("== per-weight LRP relevance (iNNvestigate, lrp.epsilon, 500 calibration samples) ==", flush=True)
        out = BUILD / "relevance"
        rmap = pipeline.run_relevance(str(model_path), "digits", str(out), "lrp.epsilon", samples=500)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pipeline.relevance_summary_table(rmap))
    print(f"\nplots: {out}/relevance_layers.png, {out}/relevance_heatmaps.png")
    print(f"scores: {out}/relevance.npz (one array per kernel), {out}/relevance.json")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
