"""Export benchmark: size and accuracy of every format on the MLPerf Tiny DS-CNN (kws01).

    python benchmarks/export.py [--out DIR] [--bitplan FILE] [--formats LIST]

Exports the float reference model (``../shared/models/mlperf-tiny/kws_ref_model``) to every
format with ``toolchain.export.export`` (each artifact verified in its own runtime on the kws01
evaluation split, the last 500 samples; calibration = the first 500), runs the official
``kws_ref_model_int8.tflite`` on the same samples, and writes ``benchmarks/results/export.md`` and
``export.json``. Check: ``tflite-int8`` must be within :data:`MAX_GAP_POINTS` of the official
int8 model on the evaluation split (exit code 1 otherwise).

Without ``--bitplan`` the mixed formats use :data:`DEFAULT_PLAN`: the four pointwise 1x1 convs
(conv2d_1..conv2d_4, 4,096 weights each: most of the model) at 4 bits, the rest at 8.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
KWS_MODEL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model"
KWS_INT8 = SHARED / "models" / "mlperf-tiny" / "kws_ref_model_int8.tflite"
RESULTS = REPO / "benchmarks" / "results"
MAX_GAP_POINTS = 1.0
ALL_FORMATS = ("tflite-fp32,tflite-fp16,tflite-dynamic,tflite-int8,tflite-int16x8,tflite-sparse,"
               "tflite-mixed,onnx-fp32,onnx-int8,onnx-mixed,mcu")
DEFAULT_PLAN = {f"conv2d_{i}": 4 for i in range(1, 5)}


def default_plan():
    from toolchain.quantize.bitplan import BitPlan, LayerBits

    return BitPlan({k: LayerBits(b) for k, b in DEFAULT_PLAN.items()}, allocator="manual",
                   notes={"why": "pointwise 1x1 convs at 4 bits (benchmarks/export.py DEFAULT_PLAN)"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="export directory (default: a temporary directory)")
    p.add_argument("--bitplan", help="bitplan.json for the mixed formats (default: DEFAULT_PLAN)")
    p.add_argument("--formats", default=ALL_FORMATS)
    p.add_argument("--results", default=str(RESULTS), help="where export.md / export.json go")
    args = p.parse_args(argv)
    for path in (KWS_MODEL, KWS_INT8):
        if not path.exists():
            print(f"error: {path} is absent (MLPerf Tiny material from ../shared; set TOOLCHAIN_SHARED_DIR)",
                  file=sys.stderr)
            return 2

    from toolchain.data import load_dataset
    from toolchain.export import export
    from toolchain.model_io import load_model
    from toolchain.quantize.bitplan import BitPlan
    from toolchain.run import run_artifact

    model = load_model(KWS_MODEL)
    ds = load_dataset("kws01")
    plan = BitPlan.load(args.bitplan) if args.bitplan else default_plan()
    tmp = None
    if args.out:
        out = Path(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="export-bench-")
        out = Path(tmp.name) / "kws"
    t0 = time.time()
    bundle = export(model, ds, args.formats, out, bitplan=plan, name="kws")
    seconds = time.time() - t0

    x_all = np.concatenate([ds.x_train, ds.x_eval])
    y_all = np.concatenate([ds.y_train, ds.y_eval])
    keras_all = model.predict(x_all, batch_size=256, verbose=0).argmax(1)
    keras_eval = keras_all[len(ds.y_train):]
    official_eval = run_artifact(KWS_INT8, ds.x_eval).argmax(1)
    official_all = run_artifact(KWS_INT8, x_all).argmax(1)
    rows = [{
        "format": "official kws_ref_model_int8.tflite", "bytes": KWS_INT8.stat().st_size,
        "accuracy_eval": float(np.mean(official_eval == ds.y_eval)),
        "accuracy_all": float(np.mean(official_all == y_all)),
        "agreement": float(np.mean(official_eval == keras_eval)),
        "max_abs_diff": None, "mean_abs_diff": None,
    }]
    for fmt, art in bundle.artifacts.items():
        c = bundle.verify[fmt]
        acc_all = float(np.mean(run_artifact(art, x_all).argmax(1) == y_all))
        rows.append({"format": fmt, "bytes": art.size_bytes, "accuracy_eval": c.accuracy,
                     "accuracy_all": acc_all, "agreement": c.agreement,
                     "max_abs_diff": c.max_abs_diff, "mean_abs_diff": c.mean_abs_diff})
    ours = bundle.verify["tflite-int8"].accuracy if "tflite-int8" in bundle.artifacts else None
    gap = None if ours is None else 100 * abs(ours - rows[0]["accuracy_eval"])
    notes = []
    if "tflite-sparse" in bundle.artifacts and not bundle.artifacts["tflite-sparse"].metadata["sparse_tensors"]:
        notes.append("tflite-sparse: the reference model is not pruned, so the converter stored no kernel "
                     "sparse (it is the int8 model); prune first to see the sparse encoding pay off.")
    mixed_layers = {}
    if "tflite-mixed" in bundle.artifacts:
        mixed_layers = {k: v["became"] for k, v in bundle.artifacts["tflite-mixed"].metadata["layers"].items()}
    result = {
        "command": "python benchmarks/export.py" + (f" --bitplan {args.bitplan}" if args.bitplan else ""),
        "model": str(KWS_MODEL.relative_to(SHARED.parent)) if SHARED.parent in KWS_MODEL.parents else str(KWS_MODEL),
        "dataset": ds.provenance.replace(str(SHARED), "../shared"), "eval_samples": int(len(ds.y_eval)), "all_samples": int(len(y_all)),
        "keras_accuracy_eval": bundle.verify.reference_accuracy,
        "keras_accuracy_all": float(np.mean(keras_all == y_all)),
        "bitplan": plan.to_dict(), "rows": rows, "tflite_mixed_layers": mixed_layers, "notes": notes,
        "mcu": ({"flash_bytes": bundle.mcu.flash_bytes, "arena_bytes": bundle.mcu.arena_bytes,
                 "source_bytes": bundle.mcu.manifest["source"]["bytes"],
                 "strip_note": bundle.mcu.manifest["model"]["note"],
                 "estimate_bytes": bundle.mcu.arena.arena_bytes,
                 "planned_bytes": bundle.mcu.arena.planned_bytes, "ops": list(bundle.mcu.ops),
                 "tflite_micro": bundle.mcu.micro.to_dict() if bundle.mcu.micro is not None else None}
                if bundle.mcu is not None else None),
        "int8_gap_points": gap, "max_gap_points": MAX_GAP_POINTS, "export_seconds": round(seconds, 1),
        "versions": _versions(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    _write(results / "export.json", json.dumps(result, indent=2) + "\n")
    _write(results / "export.md", markdown(result))
    print(markdown(result))
    if tmp is not None:
        tmp.cleanup()
    if gap is not None and gap > MAX_GAP_POINTS:
        print(f"FAIL: tflite-int8 is {gap:.2f} points from the official int8 model (> {MAX_GAP_POINTS})",
              file=sys.stderr)
        return 1
    return 0


def _versions() -> dict:
    import onnxruntime
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "onnxruntime": onnxruntime.__version__}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def markdown(r: dict) -> str:
    lines = [
        "# Export: sizes and accuracies of every format (MLPerf Tiny DS-CNN, kws01)", "",
        f"Command: `{r['command']}` ({r['export_seconds']} s export + verification; {r['machine']}; "
        f"TF {r['versions']['tensorflow']}, ORT {r['versions']['onnxruntime']}).",
        f"Float Keras model: {_pct(r['keras_accuracy_eval'])} on the eval split ({r['eval_samples']} samples), "
        f"{_pct(r['keras_accuracy_all'])} on all {r['all_samples']}. Calibration: the first 500 samples "
        "(so 'all' includes them). Agreement = top-1 equal to the float Keras model on the eval split; "
        "|diff| = softmax probabilities.", "",
        "| format | bytes | accuracy (eval) | accuracy (all) | agreement | max abs diff | mean abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        md = "–" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.3g}"
        mn = "–" if row["mean_abs_diff"] is None else f"{row['mean_abs_diff']:.3g}"
        lines.append(f"| {row['format']} | {row['bytes']:,} | {_pct(row['accuracy_eval'])} | "
                     f"{_pct(row['accuracy_all'])} | {row['agreement']:.3f} | {md} | {mn} |")
    if r.get("mcu"):
        m = r["mcu"]
        strip = (f" (tflite-int8 {m['source_bytes']:,} B; {m['strip_note']})" if "source_bytes" in m else "")
        lines += ["", f"MCU bundle (from tflite-int8): flash {m['flash_bytes']:,} bytes{strip}, tensor arena "
                      f"{m['arena_bytes']:,} bytes (estimate {m.get('estimate_bytes', m['arena_bytes']):,}: greedy plan "
                      f"{m['planned_bytes']:,} + persistent estimate + 10%), ops: {', '.join(m['ops'])}."]
        t = m.get("tflite_micro")
        if t:
            lines += ["", f"The bundle's model in tflite-micro {t['version']} (reference kernels, this host): accuracy "
                          f"{_pct(t['micro_accuracy'])} on {t['samples']} eval samples vs TFLite {_pct(t['tflite_accuracy'])}; "
                          f"top-1 agreement with TFLite {t['top1_agreement']:.1%}, largest output difference "
                          f"{t['max_abs_diff_steps']} int8 steps (TFLite's XNNPACK rounds differently from the reference "
                          f"kernels); smallest arena that runs {t['arena_min_bytes']:,} bytes (64-bit host)."]
    if r.get("int8_gap_points") is not None:
        lines += ["", f"Check: tflite-int8 is {r['int8_gap_points']:.2f} points from the official int8 model on "
                      f"the eval split (limit {r['max_gap_points']})."]
    for note in r.get("notes", []):
        lines += ["", note]
    if r.get("tflite_mixed_layers"):
        lines += ["", "tflite-mixed (plan: " + ", ".join(f"{k} {v['weight_bits']}-bit" for k, v in
                  r["bitplan"]["layers"].items()) + "; no fine-tuning), read back from the flatbuffer:", ""]
        lines += [f"- {k}: {v}" for k, v in r["tflite_mixed_layers"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
