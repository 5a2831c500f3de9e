"""`make demo`: the whole job on the embedded default (scikit-learn digits, offline).

Trains a small CNN on digits (well under a minute on 2 cores; reused when build/demo/model.keras
exists), then runs `toolchain compress` on it with the default recipe and the local target, and
prints the report's path and the headline numbers.
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
    from toolchain.compress import run_compress
    from toolchain.errors import ToolchainError

    t0 = time.perf_counter()
    BUILD.mkdir(parents=True, exist_ok=True)
    model_path = BUILD / "model.keras"
    try:
        if not model_path.exists():
            print("== training digits_cnn on digits (8x8x1, 1347 train / 450 eval) ==", flush=True)
            result = pipeline.run_train("digits_cnn", "digits", 20, str(model_path), quiet=True)
            print(f"   eval accuracy {result.accuracy:.2%} -> {model_path}", flush=True)
        else:
            print(f"== reusing {model_path} (delete it to retrain) ==", flush=True)
        print("== toolchain compress (default recipe, local target) ==", flush=True)
        out = BUILD / "compress"
        result = run_compress(str(model_path), "digits", str(out))
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    print()
    print(s["headline"])
    for row in s["artifacts"]:
        acc = f"{row['accuracy']:.2%}" if row.get("accuracy") is not None else "–"
        p50 = f"{row['p50_ms']:.3f} ms" if row.get("p50_ms") else "–"
        print(f"  {row['name']:44s} {row['size_bytes']:>9,} B  accuracy {acc:>7s}  p50 {p50}")
    if s.get("fidelity"):
        print(f"explanation fidelity (LRP heatmap correlation, original vs compressed): "
              f"{s['fidelity']['mean_correlation']:.3f}")
    print(f"report: {(out / 'report.html').resolve()}  (also report.md, summary.json, artifacts/, mcu bundle "
          f"in artifacts/mcu/)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
