"""Does the artifact compute what ``quantize`` simulated? Simulated accuracy next to tflite-mixed's
and onnx-mixed's, on the same evaluation split, for one quantization graph from plan to artifact.

For the digits CNN (trained here with models.train_model) and the MLPerf Tiny DS-CNN on kws01
(its 500 calibration samples are the only training data: relevance, calibration and QAT use
them; accuracy is measured on the other 500), at 4 and 6 average weight bits (candidates
2, 4, 6, 8), with the relevance and the uniform allocator, each without and with 2 epochs of
quantization-aware training (``quantize(..., qat_epochs=2)``), it:

1. simulates the plan (``toolchain.quantize.quantize``: the tfmot fake-quant graph, fine-tuned when
   asked) and scores it on the evaluation split;
2. converts *that graph* (``qat_model=``) to tflite-mixed and onnx-mixed and scores both in their
   runtimes with the toolchain's one runner (``toolchain.run.run_artifact``) on the same samples,
   recording each artifact's top-1 agreement with the simulation (share of samples where the
   artifact's and the simulated graph's predicted classes are the same).

A plan passes when both artifacts are within 0.5 points (``MAX_GAP``) of the simulated accuracy.

    nice -n 19 python benchmarks/quantization_fidelity.py [--models digits,ds_cnn] [--kws-model PATH] [--name N]
    python benchmarks/quantization_fidelity.py --merge N1,N2   # rows of runs made side by side

Writes benchmarks/results/quantization_fidelity.{md,json} (or NAME.*).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_KWS_MODEL = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared")) / "models" / \
    "mlperf-tiny" / "kws_ref_model"
#: the issue's bar: |artifact accuracy - simulated accuracy| in points
MAX_GAP = 0.5
CANDIDATES = (2, 4, 6, 8)
BUDGETS = (4, 6)
ALLOCATORS = ("relevance", "uniform")
QAT_EPOCHS = (0, 2)
DIGITS_EPOCHS = 15
CALIBRATION_SAMPLES = 500


def top1(scores, y) -> float:
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(y)))


def run_plan(model, dataset, plan, qat_epochs: int, work: Path) -> dict:
    from toolchain.export.onnx_backend import export_onnx_mixed
    from toolchain.export.tflite_mixed import export_tflite_mixed
    from toolchain.quantize import quantize
    from toolchain.quantize.simulate import predict
    from toolchain.run import run_artifact

    t0 = time.perf_counter()
    result = quantize(model, plan, dataset, qat_epochs=qat_epochs, calibration_samples=CALIBRATION_SAMPLES,
                      quiet=True)
    t_sim = time.perf_counter() - t0
    calib, _ = dataset.calibration(CALIBRATION_SAMPLES)
    tfl = export_tflite_mixed(model, plan, work / "m.tflite", calib, qat_model=result.model)
    onx = export_onnx_mixed(model, calib, plan, work / "m.onnx", qat_model=result.model)
    sim_class = np.argmax(predict(result.model, dataset.x_eval), axis=1)
    scores_t, scores_o = run_artifact(tfl.path, dataset.x_eval), run_artifact(onx.path, dataset.x_eval)
    acc_t, acc_o = top1(scores_t, dataset.y_eval), top1(scores_o, dataset.y_eval)
    agree_t = float(np.mean(np.argmax(scores_t, axis=1) == sim_class))
    agree_o = float(np.mean(np.argmax(scores_o, axis=1) == sim_class))
    gap_t, gap_o = (acc_t - result.accuracy) * 100, (acc_o - result.accuracy) * 100
    return {"avg_weight_bits": result.size.avg_weight_bits if result.size else None,
            "float_accuracy": result.float_accuracy, "accuracy_before_qat": result.accuracy_before_qat,
            "simulated": result.accuracy, "tflite_mixed": acc_t, "onnx_mixed": acc_o,
            "gap_tflite_points": gap_t, "gap_onnx_points": gap_o,
            "agreement_tflite": agree_t, "agreement_onnx": agree_o,
            "within": bool(abs(gap_t) <= MAX_GAP and abs(gap_o) <= MAX_GAP),
            "tflite_route": tfl.metadata["route"], "tflite_bytes": tfl.size_bytes, "onnx_bytes": onx.size_bytes,
            "seconds": time.perf_counter() - t0, "simulate_seconds": t_sim}


def bench_model(name, model, dataset, log, done=None) -> list:
    """Every plan of one model; ``done(rows)`` is called after each (partial results on disk)."""
    from toolchain.quantize import plan_bits

    rows = []
    for budget in BUDGETS:
        for allocator in ALLOCATORS:
            plan = plan_bits(model, dataset, allocator, CANDIDATES, f"avg-bits={budget}",
                             calibration_samples=CALIBRATION_SAMPLES, quiet=True)
            for qat in QAT_EPOCHS:
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_plan(model, dataset, plan, qat, Path(tmp))
                row.update({"model": name, "budget": f"avg-bits={budget}", "allocator": allocator, "qat_epochs": qat,
                            "eval_samples": int(len(dataset.x_eval))})
                log(f"{name} {allocator} avg-bits={budget} qat={qat}: simulated {row['simulated']:.2%}, "
                    f"tflite-mixed {row['tflite_mixed']:.2%}, onnx-mixed {row['onnx_mixed']:.2%} "
                    f"({row['seconds']:.0f} s)")
                rows.append(row)
                if done is not None:
                    done(rows)
    return rows


def _agreement(row: dict) -> str:
    if "agreement_tflite" not in row:
        return "not recorded"
    return f"{row['agreement_tflite']:.1%} / {row['agreement_onnx']:.1%}"


def markdown(results: dict) -> str:
    rows = results["rows"]
    md = ["# Quantization fidelity: simulated vs artifact accuracy", "",
          f"Command(s): `{results['command']}`; {results['machine']}, shared with other jobs (times are upper "
          f"bounds). Each plan is simulated by `toolchain.quantize.quantize` (the tfmot fake-quant graph, "
          f"fine-tuned for the QAT rows) and that very graph is converted to tflite-mixed and onnx-mixed (its kernels "
          f"and its activation grids); "
          f"all three are scored on the same evaluation split. Candidates {list(CANDIDATES)}; "
          f"digits CNN: scikit-learn digits, 450 evaluation samples; DS-CNN: MLPerf Tiny kws01, calibration "
          f"(and QAT) on the first 500 files, evaluation on the other 500. Pass: both artifacts within "
          f"{MAX_GAP} points of the simulated accuracy.", "",
          "| model | allocator | budget | QAT epochs | avg bits | float | simulated (before QAT) "
          "| tflite-mixed | onnx-mixed | top-1 agreement with simulated (tflite / onnx) | within 0.5 points "
          "| time (s) |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        before = f" ({r['accuracy_before_qat']:.2%})" if r["qat_epochs"] else ""
        md.append(f"| {r['model']} | {r['allocator']} | {r['budget']} | {r['qat_epochs']} | "
                  f"{r['avg_weight_bits']:.2f} | {r['float_accuracy']:.2%} | {r['simulated']:.2%}{before} | "
                  f"{r['tflite_mixed']:.2%} ({r['gap_tflite_points']:+.1f}) | "
                  f"{r['onnx_mixed']:.2%} ({r['gap_onnx_points']:+.1f}) | {_agreement(r)} | "
                  f"{'yes' if r['within'] else 'NO'} | "
                  f"{r['seconds']:.0f} |")
    failed = [r for r in rows if not r["within"]]
    md += ["", f"{len(rows) - len(failed)} of {len(rows)} plans have both artifacts within {MAX_GAP} points."]
    if failed:
        md += ["", "Outside the bar, and why:"]
        md += [f"- {r['model']} {r['allocator']} {r['budget']} QAT {r['qat_epochs']}: {r.get('why') or WHY}"
               for r in failed]
    for name, note in results.get("notes", {}).items():
        md += ["", f"- {name}: {note}"]
    md += ["", f"Total: {results['seconds'] / 60:.1f} min."
           + (" PARTIAL: the run was still going when this was written; the plans not listed were not measured."
              if results.get("partial") else "")]
    return "\n".join(md) + "\n"


#: why an artifact may leave the simulation: the weights are the simulated codes (checked at
#: export), the biases lie on the int32 grid the files store, and every activation grid is the
#: simulated one (tflite-mixed converts the graph itself, onnx-mixed gets the scales as overrides)
WHY = ("the weights, biases and activation grids are the simulated ones (onnx-mixed computes the simulation "
       "exactly), so the gap is TFLite's integer arithmetic: it requantizes each layer's int32 sum with a "
       "fixed-point multiplier that rounds twice, which puts some outputs one step above the simulation's "
       "rounding (see the DS-CNN note), and the top-1 decisions those steps flip (one sample = 0.2 points on 500)")

#: where the DS-CNN artifacts and the simulation part, measured layer by layer (2026-12-06)
FINDINGS = (
    "where the artifacts and the simulation parted, measured on the 4-bit relevance plan (tf.lite Interpreter "
    "with experimental_preserve_all_tensors and ONNX Runtime with every DequantizeLinear output as a graph output, "
    "vs sub-models of the tfmot graph, 100 evaluation samples; rerun with benchmarks/quantization_fidelity_layers.py, "
    "results in quantization_fidelity_layers.md). Input and stored kernels were identical. Fixed: "
    "(1) the average pool: TFLite's AVERAGE_POOL_2D writes its output on its input's grid (0.093) and a QUANTIZE "
    "then requantizes it to the simulated range (0.016), up to 16 steps from the simulation, which rounded on the "
    "fine grid only; the simulation now gives the pool its input's range (also during QAT). (2) The bias: the "
    "simulation added the float bias, the files an int32 one (input step x weight step); ORT's first conv output "
    "differed in 0.8% of values by one step, growing to 2% changed top-1 decisions; biases are now snapped to "
    "that grid after calibration and QAT. (3) onnx-mixed calibrated its own activation ranges; it now takes the "
    "simulated grids. After these, onnx-mixed matches the simulation at every layer (0 steps off) and in all "
    "500 top-1 decisions. Left: with INT4 kernels, each TFLite conv / depthwise layer's output, fed TFLite's own "
    "input, is one step above the simulation's exact rounding in 2-8% of values, always upwards, in TF 2.14's "
    "interpreter and ai-edge-litert alike, with or without XNNPACK (INT8 kernels, uniform 8 bits: 0.1-0.3%). A "
    "zero input shows the cause: conv2d channel 13 has bias 0.473 output steps, TFLite writes 1 (exact: 0): "
    "the fixed-point requantization rounds the product to an integer before the rounding shift, coarse when "
    "INT4 weight scales make the multiplier large. The simulation does not emulate it")


def main(argv=None) -> int:
    from toolchain.compress import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,ds_cnn")
    ap.add_argument("--kws-model", default=str(DEFAULT_KWS_MODEL))
    ap.add_argument("--name", default="quantization_fidelity", help="results file name (benchmarks/results/NAME.*)")
    ap.add_argument("--merge", default="", help="comma-separated results names to combine into --name "
                                                "(rows of separate runs, e.g. one per model run side by side)")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.merge.split(",")]
        results = {"command": "; ".join(p["command"] for p in parts), "machine": parts[0]["machine"],
                   "max_gap_points": MAX_GAP, "rows": [r for p in parts for r in p["rows"]],
                   "notes": {k: v for p in parts for k, v in p.get("notes", {}).items()},
                   "seconds": max(p["seconds"] for p in parts), "merged_from": args.merge.split(",")}
        _write(args.name, results)
        return 0
    from models import train_model
    from toolchain.data import load_dataset
    from toolchain.model_io import load_model

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python benchmarks/quantization_fidelity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    rows, notes = [], {}
    if "ds_cnn" in args.models.split(","):
        notes["ds_cnn (per layer)"] = FINDINGS
    wanted = args.models.split(",")
    from toolchain.export.convert_worker import converter_session

    def partial(done_rows):
        return {"command": command.strip(), "machine": f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})",
                "max_gap_points": MAX_GAP, "rows": done_rows, "notes": notes, "seconds": time.perf_counter() - t0}

    session = converter_session()  # one converter child for every TFLite conversion of the run
    session.__enter__()
    if "digits" in wanted:
        digits = load_dataset("digits")
        with tempfile.TemporaryDirectory() as tmp:
            trained = train_model("digits_cnn", digits, DIGITS_EPOCHS, Path(tmp) / "digits_cnn.h5", verbose=0)
            model = load_model(trained.path)
        log(f"digits_cnn trained {DIGITS_EPOCHS} epochs: {trained.accuracy:.2%}")
        rows += bench_model("digits_cnn", model, digits, log,
                            done=lambda part: _write(args.name, {**partial(rows + part), "partial": True}))
    if "ds_cnn" in wanted:
        if not Path(args.kws_model).exists():
            notes["ds_cnn"] = f"DS-CNN not measured: {args.kws_model} is absent"
        else:
            rows += bench_model("ds_cnn", load_model(args.kws_model), load_dataset("kws01"), log,
                                done=lambda part: _write(args.name, {**partial(rows + part), "partial": True}))
    session.__exit__(None, None, None)
    for r in rows:
        if not r["within"]:
            r["why"] = WHY
    results = {"command": command.strip(), "machine": f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})",
               "max_gap_points": MAX_GAP, "rows": rows, "notes": notes, "seconds": time.perf_counter() - t0}
    _write(args.name, results)
    return 0


def _write(name: str, results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
