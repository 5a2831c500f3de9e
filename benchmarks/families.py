"""Every model family a user brings, through ``toolchain compress`` with the default recipe.

One row per family: the task the toolchain inferred, the original model's metric, the headline
artifact's metric and its change against the original, the float32 TFLite and headline artifact
sizes, and how long compress took on this machine (all stages, benchmark included). Families:

* ``digits_cnn``   image classifier, scikit-learn digits (8x8x1), the project's demo model;
* ``mlp``          the zoo's Dense-only classifier on the flat digits (64 features);
* ``conv1d``       the zoo's 1-D CNN over time on the MLPerf Tiny kws01 MFCCs as (49 time steps, 10
                   coefficients) sequences: calibration = first 500 files, evaluation = last 500;
* ``autoencoder``  dense autoencoder (64-32-8-32-64, linear output; defined here, the zoo builds
                   classifiers) on flat digits, trained on
                   digits 0-4 only; the evaluation split has every digit and digits 5-9 are
                   labelled anomalous, so the metric is the ROC AUC of the reconstruction error
                   (the MLPerf Tiny anomaly-detection metric) next to the MSE;
* ``mobilenet``    MobileNetV1 (alpha 0.25) at 96x96x3, the MLPerf Tiny VWW architecture, trained
                   here on CIFAR-10 images read from their class folders (JPEG q75 copy in
                   ../shared/data/cifar10-jpeg, upscaled from 32x32): ``--mobilenet-train`` per
                   class from train/, 100 per class from test/ for evaluation.

Trained models and prepared data are cached under the toolchain cache (``bench-models/``), so
reruns only compress. ``--recipe`` replaces the default recipe. A run the guard refuses (an artifact
loses more than the recipe allows against the original) is a row of its own, with the guard's message.

    python benchmarks/families.py [--families mlp,conv1d,...] [--recipe R.yaml] [--name families]

Writes benchmarks/results/<name>.{json,md}.
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
from toolchain.errors import ToolchainError  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
FAMILIES = ("digits_cnn", "mlp", "conv1d", "autoencoder", "mobilenet")
#: digits 0..ANOMALY_FROM-1 are "normal" for the autoencoder; the others are anomalies
ANOMALY_FROM = 5


def cache_dir() -> Path:
    from toolchain import stagecache

    d = stagecache.root().parent / "bench-models" / "families"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digits_flat():
    from toolchain.data import load_dataset

    ds = load_dataset("digits")
    flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)  # noqa: E731
    return flat(ds.x_train), np.asarray(ds.y_train), flat(ds.x_eval), np.asarray(ds.y_eval)


def prepare(family: str, mobilenet_train: int) -> tuple:
    """(model path, data spec) of one family; trains and writes data once, then reuses them."""
    import tensorflow as tf

    from models.train import recalibrate_batchnorm
    from toolchain.model_io import save_model

    d = cache_dir()
    if family == "digits_cnn":
        from models import train_model
        from toolchain.data import load_dataset

        path = d / "digits_cnn.keras"
        if not path.exists():
            train_model("digits_cnn", load_dataset("digits"), 30, path, verbose=0)
        return path, "digits"

    tf.keras.utils.set_random_seed(0)
    if family == "mlp":  # the zoo's mlp (64-32 ReLU) on the flat digits
        from models import train_model
        from toolchain.data import load_dataset

        data = d / "digits_flat.npz"
        x, y, xe, ye = _digits_flat()
        if not data.exists():
            np.savez(data, x=x, y=y, x_eval=xe, y_eval=ye)
        path = d / "mlp.keras"
        if not path.exists():
            train_model("mlp", load_dataset(f"npz:{data}"), 60, path, batch_size=32, verbose=0)
        return path, f"npz:{data}"

    if family == "autoencoder":
        data = d / "digits_anomaly.npz"
        x, y, xe, ye = _digits_flat()
        normal = x[y < ANOMALY_FROM]
        if not data.exists():
            np.savez(data, x=normal, x_eval=xe, anomaly_eval=(ye >= ANOMALY_FROM).astype(np.int64))
        path = d / "autoencoder.keras"
        if not path.exists():
            inp = tf.keras.Input((64,))
            h = inp
            for units in (32, 8, 32):
                h = tf.keras.layers.Dense(units, activation="relu")(h)
            out = tf.keras.layers.Dense(64)(h)
            model = tf.keras.Model(inp, out, name="dense_autoencoder")
            model.compile(tf.keras.optimizers.Adam(1e-3), "mse")
            model.fit(normal, normal, epochs=150, batch_size=32, verbose=0)
            save_model(model, path)
        return path, f"npz:{data}"

    if family == "conv1d":
        from toolchain.data import load_dataset

        data = d / "kws01_sequences.npz"
        if not data.exists():
            ds = load_dataset("kws01")
            seq = lambda a: np.asarray(a, np.float32).reshape(len(a), 49, 10)  # noqa: E731
            np.savez(data, x=seq(ds.x_train), y=np.asarray(ds.y_train), x_eval=seq(ds.x_eval),
                     y_eval=np.asarray(ds.y_eval), class_names=np.asarray(ds.class_names))
        path = d / "conv1d.keras"
        if not path.exists():  # the zoo's conv1d_classifier over the 49 time steps
            from models import train_model

            from toolchain.data import fit_to_model

            # the npz's (N, 49, 10) reads as images with a channel axis; fitted to the model's (49, 10)
            dataset = fit_to_model(load_dataset(f"npz:{data}"), (49, 10))
            train_model("conv1d_classifier", dataset, 80, path, batch_size=32, verbose=0)
        return path, f"npz:{data}"

    if family == "mobilenet":
        from toolchain.data import load_dataset

        if not CIFAR_JPEG.is_dir():
            raise SystemExit(f"mobilenet needs CIFAR-10 images in {CIFAR_JPEG} (set TOOLCHAIN_SHARED_DIR)")
        spec = f"images:{CIFAR_JPEG}?train_per_class={mobilenet_train}&eval_per_class=100&scale=1"
        path = d / f"mobilenet_96_{mobilenet_train}.keras"
        if not path.exists():
            ds = load_dataset(spec, input_shape=(96, 96, 3))
            model = tf.keras.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, weights=None,
                                                    classes=10)
            model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
            model.fit(np.asarray(ds.x_train), np.asarray(ds.y_train), epochs=15, batch_size=64, verbose=2)
            recalibrate_batchnorm(model, np.asarray(ds.x_train))
            save_model(model, path)
        return path, spec
    raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def run_family(family: str, recipe, work: Path, mobilenet_train: int) -> dict:
    from toolchain.compress import run_compress

    t0 = time.perf_counter()
    model_path, spec = prepare(family, mobilenet_train)
    prepared = time.perf_counter() - t0
    print(f"{family}: compress {model_path.name} on {spec}", flush=True)
    t1 = time.perf_counter()
    try:
        result = run_compress(str(model_path), spec, str(work / family), recipe_path=recipe, quiet=False)
    except ToolchainError as e:  # a guard refused the result: that is the finding, recorded as such
        return {"family": family, "model": model_path.name, "data": spec, "refused": str(e),
                "compress_seconds": time.perf_counter() - t1, "prepare_seconds": prepared}
    seconds = time.perf_counter() - t1
    s = result.summary
    rows = s["artifacts"]
    base = next(r for r in rows if r["origin"] == "baseline" and r["format"] == "tflite-fp32")
    head = next((r for r in rows if r["origin"] == "compressed" and r["format"] == "tflite-mixed"),
                next(r for r in rows if r["origin"] == "compressed" and r["format"] == "tflite-int8"))
    original = s.get("original", {})
    metric = original.get("metric", "accuracy")
    distill = ((s.get("prune") or {}).get("settings") or {}).get("distill") or {}
    backoff = (s.get("prune") or {}).get("backoff") or {}
    return {"family": family, "model": model_path.name, "data": spec, "task": s.get("task", "classification"),
            "metric": metric, "original": original.get(metric), "original_all": original,
            "headline_format": head["format"], "headline": head.get(metric), "headline_row": head,
            "fp32_bytes": base["size_bytes"], "headline_bytes": head["size_bytes"],
            "params_before": (s.get("prune") or {}).get("params_before"),
            "params_after": (s.get("prune") or {}).get("params_after"),
            "distill_steps": distill.get("steps_run", (distill.get("config") or {}).get("steps")),
            "distill_stop": distill.get("stop_reason"), "distill_train_samples": distill.get("train_samples"),
            "sparsity": backoff.get("chosen"), "backoff": backoff or None,
            "compress_seconds": seconds, "prepare_seconds": prepared,
            "mcu_flash_bytes": next((r["size_bytes"] for r in rows if r["format"] == "mcu"), None)}


def markdown(results: dict) -> str:
    md = ["# Model families through `toolchain compress`", "",
          f"Commands: {', '.join(sorted({'`' + r.get('command', results['command']) + '`' for r in results['rows']}))}; "
          f"{results['machine']}; recipe: {results['recipe']}. "
          "Time is the whole `compress` run (relevance, pruning with distillation, quantization, every "
          "export verified in its runtime, the local latency benchmark, fidelity, report) on this machine; "
          "training the original is not included. The 2 cores were shared with other jobs while these "
          "ran, so the times are upper bounds.", "",
          "| family | task | metric | original | headline artifact | change | float32 TFLite B | headline B | "
          "x smaller | filter sparsity | distillation steps | compress time |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    refused, backoffs = [], []
    for r in results["rows"]:
        if r.get("previous_default"):
            # rows kept from a run before the sparsity backoff (they record no distillation data)
            r = {**r, "family": f"{r['family']} (previous default)"}
        if "refused" in r:
            what = "refused by the guard" if "verify." in r["refused"] else "stopped by an error"
            md.append(f"| {r['family']} | – | – | – | {what} (see below) | – | – | – | – | – | – | "
                      f"{r['compress_seconds'] / 60:.1f} min |")
            refused.append(f"- {r['family']}: {r['refused']}")
            continue
        higher = r["metric"] in ("accuracy", "auc")
        fmt = (lambda v: f"{v:.2%}") if r["metric"] == "accuracy" else (lambda v: f"{v:.4g}")
        if r["original"] is None or r["headline"] is None:
            change = "–"
        elif r["metric"] == "accuracy":
            change = f"{(r['headline'] - r['original']) * 100:+.1f} points"
        elif higher:
            change = f"{r['headline'] - r['original']:+.3f}"
        else:
            change = f"{(r['headline'] / r['original'] - 1) * 100:+.1f}%" if r["original"] else "–"
        md.append(f"| {r['family']} | {r['task']} | {r['metric']} | "
                  f"{'–' if r['original'] is None else fmt(r['original'])} | {r['headline_format']} "
                  f"{'–' if r['headline'] is None else fmt(r['headline'])} | {change} | {r['fp32_bytes']:,} | "
                  f"{r['headline_bytes']:,} | {r['fp32_bytes'] / r['headline_bytes']:.1f}x | "
                  f"{_sparsity_cell(r)} | {_distill_cell(r)} | {r['compress_seconds'] / 60:.1f} min |")
        if r.get("backoff") and len(r["backoff"]["tried"]) > 1:
            b = r["backoff"]
            tries = "; ".join(f"{t['sparsity']:g}: {_change_text(b['metric'], t['calibration_change'])}"
                              for t in b["tried"])
            backoffs.append(f"- {r['family']}: calibration {b['metric']} change vs the original per sparsity "
                            f"tried ({tries}; limit {_change_text(b['metric'], b['max_drop'])}) -> "
                            f"{b['chosen']:g}")
    if backoffs:
        md += ["", "Sparsity backoff (`prune.backoff_sparsities`: after recovery the pruned model is checked on the "
                   "calibration split, never the evaluation split, and pruned less when it loses more than "
                   "`prune.backoff_max_drop` x the verify limit):", ""] + backoffs
    if refused:
        md += ["", "Runs that wrote nothing (compress exits 2: the guard refused an artifact that loses more "
                   "than the recipe allows against the original, or a later stage stopped with an error):", ""] + refused
    if any(r.get("previous_default") for r in results["rows"]):
        md += ["", "(previous default): measured before the default recipe distilled on the whole training "
                   "split and backed off its sparsity on the calibration split; not rerun since."]
    md += ["", f"Total: {results['seconds'] / 60:.1f} min."]
    return "\n".join(md) + "\n"


def _change_text(metric: str, drop: float) -> str:
    """A calibration loss in the metric's units (accuracy: points; mse: relative; auc: absolute)."""
    return f"{-drop * 100:+.1f} points" if metric == "accuracy" else (
        f"{drop:+.1%}" if metric == "mse" else f"{-drop:+.3f}")


def _sparsity_cell(r: dict) -> str:
    if r.get("sparsity") is None:
        return "–"
    tried = len((r.get("backoff") or {}).get("tried") or [])
    return f"{r['sparsity']:g}" + (f" (after {tried - 1} backoff{'s' if tried > 2 else ''})" if tried > 1 else "")


def _distill_cell(r: dict) -> str:
    steps = r.get("distill_steps")
    if steps is None:
        return "–"
    why = {"time_budget": "time budget", "early_stop": "early stop"}.get(r.get("distill_stop"), "")
    return f"{steps:,}" + (f" ({why})" if why else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--recipe", help="recipe YAML (default: the default recipe)")
    ap.add_argument("--mobilenet-train", type=int, default=1000, help="CIFAR-10 training images per class")
    ap.add_argument("--name", default="families", help="results file name (benchmarks/results/NAME.*)")
    ap.add_argument("--append", action="store_true",
                    help="keep the other families' rows of an existing results file (each row keeps its command)")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {', '.join(bad)}; choose from {', '.join(FAMILIES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from toolchain.compress import cpu_name

    t0 = time.perf_counter()
    command = ("python benchmarks/families.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))).rstrip()
    machine = f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})"
    rows = []
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        for family in families:
            rows.append({**run_family(family, args.recipe, Path(tmp), args.mobilenet_train), "command": command})
            # written after every family, so a long run that is stopped keeps what it measured
            results = _save(args.name, args.append, rows, command, machine, args.recipe,
                            time.perf_counter() - t0)
            print(markdown(results), flush=True)
    return 0


def _save(name: str, append: bool, rows: list, command: str, machine: str, recipe, seconds: float) -> dict:
    """Write benchmarks/results/NAME.{json,md}: these rows, and with ``append`` the other families'
    rows of the existing file (re-read now: another run may have written it meanwhile)."""
    previous = RESULTS / f"{name}.json"
    done = {r["family"] for r in rows}
    if append and previous.is_file():
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["family"] not in done] + rows
        rows.sort(key=lambda r: FAMILIES.index(r["family"]))
    total = sum(r.get("compress_seconds", 0) + r.get("prepare_seconds", 0) for r in rows)
    results = {"command": command, "machine": machine, "recipe": recipe or "default", "rows": rows,
               "seconds": total if append else seconds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(main())
