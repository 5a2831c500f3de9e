"""Width trade-off on the MLPerf Tiny DS-CNN: accuracy vs speed-up vs size, one point per pruning
configuration, against the three targets at once.

Issue 6 asks for a DS-CNN int8 TFLite that is at most 27,000 bytes, at least 2.5x faster than the
float32 TFLite and within 1 point of the official int8 on the kws01 evaluation split. Each of the
three is reachable alone; this benchmark shows where they conflict. For every configuration
(relevance filter pruning at a sparsity, per layer or with one global ranking) and every seed, the
model is pruned and distilled with the default recipe's settings (only sparsity/scope change),
converted to full-integer int8 TFLite and to the default recipe's headline artifact (tflite-mixed:
int8 with the first conv kept in float, ``quantize.float_layers: [first]``), and evaluated on the
evaluation split. Latency is the paired speed-up against the float32 TFLite of the original model
(``run_all.paired_speedup``: fresh runner processes, interleaved rounds, 1 thread, XNNPACK),
measured on the first seed's artifacts (seeds change weights, not shapes).

    python benchmarks/tradeoff.py [--seeds 2] [--steps 8000]

Writes benchmarks/results/tradeoff.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distillation import load_kws, prune_distill_int8  # the script's folder is on sys.path
from run_all import (KWS_OFFICIAL, RESULTS, TARGET_ACC_GAP, TARGET_BYTES, TARGET_SPEEDUP, paired_speedup,
                     tflite_accuracy)

# (label, sparsity, scope): 50% per layer is the default recipe
CONFIGS = [("24 ch/layer", 0.625, "layer"), ("32 ch/layer (default)", 0.5, "layer"),
           ("50% global ranking", 0.5, "global"), ("40 ch/layer", 0.375, "layer"),
           ("48 ch/layer", 0.25, "layer")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the default recipe's)")
    ap.add_argument("--runs", type=int, default=2000, help="timed runs per latency round")
    ap.add_argument("--configs", nargs="+", metavar="LABEL",
                    help="only the configurations whose label starts with one of these (e.g. 32)")
    ap.add_argument("--name", default="tradeoff", help="results file name (default: %(default)s)")
    args = ap.parse_args()
    configs = [c for c in CONFIGS if not args.configs or any(c[0].startswith(p) for p in args.configs)]
    if not configs:
        ap.error(f"--configs {' '.join(args.configs)} matches none of: {', '.join(c[0] for c in CONFIGS)}")
    loaded = load_kws()
    if loaded is None:
        return 1
    model, ds = loaded
    from toolchain.export import export
    from toolchain.recipe import DEFAULT_RECIPE

    steps = args.steps or DEFAULT_RECIPE["prune"]["distill_steps"]
    official = tflite_accuracy(KWS_OFFICIAL, ds.x_eval, ds.y_eval) if KWS_OFFICIAL.exists() else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="tradeoff-") as tmp:
        work = Path(tmp)
        fp32 = export(model, ds, ["tflite-fp32"], work / "fp32", quiet=True).artifacts["tflite-fp32"].path
        for label, sparsity, scope in configs:
            accs, mixed_accs, first = [], [], None
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                out = work / f"{sparsity}_{scope}_{seed}"
                r, path, acc, paths = prune_distill_int8(model, ds, out, sparsity=sparsity, scope=scope, seed=seed,
                                                         steps=steps, formats=("tflite-int8", "tflite-mixed"))
                mixed = paths["tflite-mixed"]
                accs.append(acc)
                mixed_accs.append(tflite_accuracy(mixed, ds.x_eval, ds.y_eval))
                if first is None:
                    first = (path, mixed, r)
            path, mixed, r = first
            widths = [int(l.filters) for l in r.model.layers if type(l).__name__ == "Conv2D"]
            speed = paired_speedup(fp32, path, "kws01", args.runs, work / f"pair_{sparsity}_{scope}")
            mspeed = paired_speedup(fp32, mixed, "kws01", args.runs, work / f"pairm_{sparsity}_{scope}")
            row = {"config": label, "sparsity": sparsity, "scope": scope, "conv_widths": widths,
                   "params": r.params_after, "bytes": Path(path).stat().st_size, "int8_accuracy": accs,
                   "speedup": speed["speedup"], "p50_ms": speed["candidate_p50_ms"],
                   "fp32_p50_ms": speed["baseline_p50_ms"],
                   "mixed_bytes": Path(mixed).stat().st_size, "mixed_accuracy": mixed_accs,
                   "mixed_speedup": mspeed["speedup"], "mixed_p50_ms": mspeed["candidate_p50_ms"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for d in (f"pair_{sparsity}_{scope}", f"pairm_{sparsity}_{scope}"):
                shutil.rmtree(work / d, ignore_errors=True)
    command = "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:])
    write({"steps": steps, "seeds": args.seeds, "official_int8_accuracy": official, "rows": rows,
           "command": command.strip()}, args.name)
    return 0


def _meets(row, official, prefix="") -> dict:
    acc = float(np.mean(row[f"{prefix or 'int8_'}accuracy"]))
    size = row[f"{prefix}bytes"]
    return {"bytes": size <= TARGET_BYTES, "speedup": row[f"{prefix}speedup"] >= TARGET_SPEEDUP,
            "accuracy": official is not None and official - acc <= TARGET_ACC_GAP + 1e-9}


def write(results: dict, name: str = "tradeoff") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    official = results["official_int8_accuracy"]
    md = ["# DS-CNN width trade-off: accuracy vs speed-up vs size (kws01)", "",
          f"Command: `{results['command']}`; "
          "relevance filter pruning + "
          f"{results['steps']} distillation steps on the 500 calibration samples + full-integer int8 TFLite; "
          "accuracy on the 500 evaluation samples (one sample = 0.2 points), speed-up paired against the "
          "float32 TFLite (1 thread, XNNPACK). Targets: <= 27,000 B, >= 2.5x, accuracy >= official int8 "
          f"{'?' if official is None else f'{official:.1%}'} - 1 point.", "",
          "| configuration | conv widths | params | artifact | bytes | speed-up | accuracy (mean; per seed) | targets met |",
          "|---|---|---:|---|---:|---:|---:|---|"]
    all_three = []
    for r in results["rows"]:
        for prefix, artifact in (("", "int8"), ("mixed_", "int8, first conv float (default)")):
            if f"{prefix}bytes" not in r:
                continue
            ok = _meets(r, official, prefix)
            accs = r[f"{prefix or 'int8_'}accuracy"]
            met = ", ".join(k for k, v in ok.items() if v) or "none"
            if all(ok.values()):
                all_three.append(f"{r['config']} ({artifact})")
            md.append(f"| {r['config']} | {'-'.join(map(str, r['conv_widths']))} | {r['params']:,} | {artifact} | "
                      f"{r[f'{prefix}bytes']:,} | {r[f'{prefix}speedup']:.2f}x | {np.mean(accs):.1%}; "
                      f"{', '.join(f'{a:.1%}' for a in accs)} | {met} |")
    md += ["", "Configurations meeting all three targets: " + (", ".join(all_three) or "none") + "."]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    _plot(results, name)
    print("\n".join(md))


def _plot(results: dict, name: str = "tradeoff") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in results["rows"]:
        for prefix, marker in (("", "o"), ("mixed_", "s")):
            if f"{prefix}bytes" not in r:
                continue
            acc = 100 * np.array(r[f"{prefix or 'int8_'}accuracy"])
            color = "tab:green" if r[f"{prefix}bytes"] <= TARGET_BYTES else "tab:orange"
            ax.errorbar(r[f"{prefix}speedup"], acc.mean(), yerr=[[acc.mean() - acc.min()], [acc.max() - acc.mean()]],
                        fmt=marker, color=color, capsize=3)
            ax.annotate(f"{r['config'].replace(' (default)', '')}\n{r[f'{prefix}bytes']:,} B",
                        (r[f"{prefix}speedup"], acc.mean()), fontsize=6, xytext=(4, 4), textcoords="offset points")
    official = results["official_int8_accuracy"]
    if official is not None:
        ax.axhline(100 * (official - TARGET_ACC_GAP), color="tab:red", ls="--", lw=1,
                   label=f"accuracy target (official int8 {official:.1%} - 1 pt)")
    ax.axvline(TARGET_SPEEDUP, color="tab:blue", ls="--", lw=1, label=f"speed-up target {TARGET_SPEEDUP}x")
    ax.scatter([], [], color="tab:green", label=f"<= {TARGET_BYTES:,} B")
    ax.scatter([], [], color="tab:orange", label=f"> {TARGET_BYTES:,} B")
    ax.scatter([], [], color="gray", marker="o", label="full-integer int8")
    ax.scatter([], [], color="gray", marker="s", label="int8, first conv float (default)")
    ax.margins(x=0.2, y=0.15)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, max(hi, TARGET_SPEEDUP * 1.06))
    ax.set_xlabel("speed-up vs float32 TFLite (paired, 1 thread)")
    ax.set_ylabel("int8 accuracy on the evaluation split (%)")
    ax.set_title("MLPerf Tiny DS-CNN: pruning width vs the three targets")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
