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

``--keras3`` runs the files Keras 3 itself wrote (tests/data/keras3, keras 3.15.1; see its
make_fixtures.py) instead: every family of issue 14's done-when (``cnn_bn``, ``dsconv_residual``,
``mlp``, ``conv1d``, ``sequential``) and the dense ``autoencoder``, each as ``.keras`` and ``.h5``,
through ``run_compress`` with the default recipe on ``digits`` (fitted to each model's input; the
autoencoder on the flat digits with digits 5-9 labelled anomalous in the evaluation split, as
tests/test_families.py does). Each row sets Keras 3's own metric (``<family>_io.npz`` eval_metric:
accuracy, the autoencoder's MSE) beside the original as the toolchain loaded it and the compressed
full-integer TFLite's, against the issue's bar (int8 within 1 point; MSE within 10%):

    python benchmarks/families.py --keras3 [--families cnn_bn,mlp] [--files .keras,.h5] [--name keras3]
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

import machine  # the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from toolchain.errors import ToolchainError  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
FAMILIES = ("digits_cnn", "mlp", "conv1d", "autoencoder", "mobilenet")
#: digits 0..ANOMALY_FROM-1 are "normal" for the autoencoder; the others are anomalies
ANOMALY_FROM = 5
KERAS3_FIXTURES = REPO / "tests" / "data" / "keras3"
#: the Keras 3 fixtures of issue 14's done-when, and the dense autoencoder
KERAS3_FAMILIES = ("cnn_bn", "dsconv_residual", "mlp", "conv1d", "sequential", "autoencoder")
KERAS3_FILES = (".keras", ".h5")
#: issue 14's bar: the compressed int8 TFLite loses at most 1 point against Keras 3's own accuracy ...
KERAS3_MAX_INT8_DROP = 0.01
#: ... and an autoencoder's int8 reconstruction MSE is at most 10% above Keras 3's
KERAS3_MAX_INT8_MSE_INCREASE = 0.10
#: the original as loaded equals Keras 3's metric (accuracy: the same predictions; MSE: float noise)
KERAS3_ORIGINAL_TOLERANCE = 1e-6


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


def _compress(model_path: Path, spec: str, out: Path, recipe) -> tuple:
    """``toolchain compress`` timed: (its result or None, the refusal or None, the measured keys:
    compress_seconds and the CPU share other processes took meanwhile). A guard's refusal or a
    stopped stage is a finding, recorded as such."""
    from toolchain.compress import run_compress

    t, cpu = time.perf_counter(), machine.snapshot()
    try:
        result, refused = run_compress(str(model_path), spec, str(out), recipe_path=recipe, quiet=False), None
    except ToolchainError as e:
        result, refused = None, str(e)
    return result, refused, {"compress_seconds": time.perf_counter() - t, "other_cpu_share": machine.other_cpu_share(cpu)}


def run_family(family: str, recipe, work: Path, mobilenet_train: int) -> dict:
    t0 = time.perf_counter()
    model_path, spec = prepare(family, mobilenet_train)
    prepared = time.perf_counter() - t0
    print(f"{family}: compress {model_path.name} on {spec}", flush=True)
    result, refused, measured = _compress(model_path, spec, work / family, recipe)
    if refused:
        return {"family": family, "model": model_path.name, "data": spec, "refused": refused,
                "prepare_seconds": prepared, **measured}
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
            "prepare_seconds": prepared, **measured,
            "mcu_flash_bytes": next((r["size_bytes"] for r in rows if r["format"] == "mcu"), None)}


def prepare_keras3(family: str, suffix: str) -> tuple:
    """(Keras 3 file, data spec): ``digits`` (fitted to the model's input) for the classifiers; the
    autoencoder gets the flat digits with anomaly labels (digits >= ANOMALY_FROM), written once."""
    path = KERAS3_FIXTURES / f"{family}{suffix}"
    if family != "autoencoder":
        return path, "digits"
    data = cache_dir() / "keras3_autoencoder_digits.npz"
    if not data.exists():
        x, _, xe, ye = _digits_flat()
        np.savez(data, x=x, x_eval=xe, anomaly_eval=(ye >= ANOMALY_FROM).astype(np.int64))
    return path, f"npz:{data}"


def run_keras3(family: str, suffix: str, recipe, work: Path) -> dict:
    """One Keras 3 file through ``run_compress``; the row compares with Keras 3's own metric."""
    model_path, spec = prepare_keras3(family, suffix)
    io = np.load(KERAS3_FIXTURES / f"{family}_io.npz")
    metric = "mse" if family == "autoencoder" else "accuracy"
    row = {"family": family, "file": model_path.name, "data": spec, "metric": metric,
           "keras3": float(io["eval_metric"]), "keras3_version": str(io["keras_version"]),
           "keras3_backend": str(io["backend"])}
    print(f"{model_path.name}: compress on {spec}", flush=True)
    result, refused, measured = _compress(model_path, spec, work / model_path.name.replace(".", "_"), recipe)
    if refused:
        return {**row, "refused": refused, **measured}
    s = result.summary
    arts = s["artifacts"]
    pick = lambda origin, fmt: next((r for r in arts if r["origin"] == origin and r["format"] == fmt), None)  # noqa: E731
    base, int8 = pick("baseline", "tflite-fp32"), pick("compressed", "tflite-int8")
    head = pick("compressed", "tflite-mixed") or int8
    original = s.get("original", {})
    if metric == "accuracy":
        gap = int8[metric] - row["keras3"]  # + is better
        passed = gap >= -KERAS3_MAX_INT8_DROP
    else:
        gap = int8[metric] / row["keras3"] - 1  # + is worse
        passed = gap <= KERAS3_MAX_INT8_MSE_INCREASE
    backoff = (s.get("prune") or {}).get("backoff") or {}
    distill = ((s.get("prune") or {}).get("settings") or {}).get("distill") or {}
    return {**row, "task": s.get("task"), "summary_metric": s.get("metric"), "original": original.get(metric),
            "original_all": original,
            "original_equals_keras3": abs(original.get(metric) - row["keras3"]) <= KERAS3_ORIGINAL_TOLERANCE,
            "int8": int8[metric], "int8_gap": gap, "int8_passed": passed, "int8_row": int8,
            "baseline_int8": (pick("baseline", "tflite-int8") or {}).get(metric),
            # every artifact's metric: e.g. the compressed float32 TFLite tells pruning's loss from int8's
            "artifact_metrics": {f"{r['origin']}/{r['format']}": r.get(metric) for r in arts},
            "auc": {"original": original.get("auc"), "int8": int8.get("auc")} if metric == "mse" else None,
            "headline_format": head["format"], "headline": head.get(metric), "headline_row": head,
            "fp32_bytes": base["size_bytes"], "int8_bytes": int8["size_bytes"], "headline_bytes": head["size_bytes"],
            "params_before": (s.get("prune") or {}).get("params_before"),
            "params_after": (s.get("prune") or {}).get("params_after"),
            "distill_steps": distill.get("steps_run", (distill.get("config") or {}).get("steps")),
            "distill_stop": distill.get("stop_reason"), "sparsity": backoff.get("chosen"),
            "backoff": backoff or None, "cached_stages": s.get("cached_stages", []), **measured}


#: what the time column's marks mean (both tables)
SHARED_TIMES = (f"A time marked 'shared' ran while other processes took at least {machine.QUIET_BELOW:.0%} of the "
                "cores (the share in brackets; 'not measured': a row from before benchmarks/machine.py, when the "
                "cores were shared), so it is an upper bound.")


def _shared(row: dict) -> str:
    """The time cell's note on what else ran (``machine.other_cpu_share`` over the row's compress)."""
    if "other_cpu_share" not in row:
        return " (shared, not measured)"
    share = row["other_cpu_share"]
    if share is None:
        return " (others not measured)"
    return f" (shared: {share:.0%})" if share >= machine.QUIET_BELOW else ""


def markdown_keras3(results: dict) -> str:
    recipe = "the default recipe" if results["recipe"] == "default" else f"recipe {results['recipe']}"
    md = [f"# Keras 3 files through `toolchain compress` with {recipe}", "",
          f"Commands: {', '.join(sorted({'`' + r.get('command', results['command']) + '`' for r in results['rows']}))}; "
          f"{results['machine']}; recipe: {results['recipe']}. Files: tests/data/keras3, written by Keras "
          f"{_keras3_versions(results)} (its make_fixtures.py), trained there on the digits split the toolchain "
          "uses. Keras 3 is Keras 3's own evaluation-split metric (the fixture's `eval_metric`); original is the "
          "model as the toolchain loaded it (= when it equals Keras 3's); int8 is the compressed full-integer "
          "TFLite (`tflite-int8`: pruned, distilled, int8) and its gap to Keras 3, against issue 14's bar "
          f"(at most {KERAS3_MAX_INT8_DROP * 100:g} point lost; autoencoder MSE at most "
          f"{KERAS3_MAX_INT8_MSE_INCREASE:.0%} above; digits has 450 evaluation samples, one is 0.22 points). "
          "x smaller: the headline artifact against the float32 TFLite. "
          "Time is the whole `compress` run; a `.h5` run whose model loads identical to the `.keras` one "
          "(same architecture and weights, so the same stage-cache key) takes its relevance, prune and "
          "quantize stages from the cache (marked: cached). " + SHARED_TIMES, "",
          "| family | file | metric | Keras 3 | original as loaded | int8 TFLite | gap | bar | headline artifact | "
          "headline B | float32 TFLite B | x smaller | filter sparsity | compress time |",
          "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    refused, backoffs, aucs = [], [], []
    for r in results["rows"]:
        if "refused" in r:
            what = _refusal_kind(r["refused"])
            md.append(f"| {r['family']} | {r['file']} | {r['metric']} | {_fmt(r, r['keras3'])} | – | {what} | – | "
                      f"failed | – | – | – | – | – | {r['compress_seconds'] / 60:.1f} min |")
            refused.append(f"- {r['file']}: {r['refused']}")
            continue
        same = "=" if r["original_equals_keras3"] else "≠ "
        gap = (f"{r['int8_gap'] * 100:+.1f} points" if r["metric"] == "accuracy" else f"{r['int8_gap']:+.1%}")
        cached = " (cached)" if "prune" in r["cached_stages"] else ""
        md.append(f"| {r['family']} | {r['file']} | {r['metric']} | {_fmt(r, r['keras3'])} | "
                  f"{same}{_fmt(r, r['original'])} | {_fmt(r, r['int8'])} | {gap} | "
                  f"{'met' if r['int8_passed'] else '**missed**'} | {r['headline_format']} {_fmt(r, r['headline'])} | "
                  f"{r['headline_bytes']:,} | {r['fp32_bytes']:,} | {r['fp32_bytes'] / r['headline_bytes']:.1f}x | "
                  f"{_sparsity_cell(r)} | {r['compress_seconds'] / 60:.1f} min{cached}{_shared(r)} |")
        if r.get("auc"):
            aucs.append(f"- {r['file']}: anomaly ROC AUC (digits >= {ANOMALY_FROM} anomalous) original "
                        f"{r['auc']['original']:.4f}, int8 TFLite {r['auc']['int8']:.4f}")
        if r.get("backoff") and len(r["backoff"]["tried"]) > 1 and not cached:
            backoffs.append(_backoff_line(r["file"], r["backoff"]))
    if aucs:
        md += ["", "The autoencoder's summary metric is the anomaly ROC AUC; the bar is on its MSE:", ""] + aucs
    if backoffs:
        md += ["", "Sparsity backoff (after recovery, never on the evaluation split):", ""] + backoffs
    if refused:
        md += ["", "Runs that wrote nothing (compress exits 2):", ""] + refused
    for note in results.get("notes") or ():  # findings written beside the numbers (kept by --append)
        md += ["", note]
    md += ["", f"Total: {results['seconds'] / 60:.1f} min."]
    return "\n".join(md) + "\n"


def _fmt(r: dict, v) -> str:
    return "–" if v is None else (f"{v:.2%}" if r["metric"] == "accuracy" else f"{v:.5f}")


def _keras3_versions(results: dict) -> str:
    seen = sorted({f"{r['keras3_version']} ({r['keras3_backend']} backend)" for r in results["rows"]})
    return ", ".join(seen) or "3"


def markdown(results: dict) -> str:
    if results.get("kind") == "keras3":
        return markdown_keras3(results)
    md = ["# Model families through `toolchain compress`", "",
          f"Commands: {', '.join(sorted({'`' + r.get('command', results['command']) + '`' for r in results['rows']}))}; "
          f"{results['machine']}; recipe: {results['recipe']}. "
          "Time is the whole `compress` run (relevance, pruning with distillation, quantization, every "
          "export verified in its runtime, the local latency benchmark, fidelity, report) on this machine; "
          "training the original is not included. " + SHARED_TIMES, "",
          "| family | task | metric | original | headline artifact | change | float32 TFLite B | headline B | "
          "x smaller | filter sparsity | distillation steps | compress time |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    refused, backoffs = [], []
    for r in results["rows"]:
        if r.get("previous_default"):
            # rows kept from a run before the sparsity backoff (they record no distillation data)
            r = {**r, "family": f"{r['family']} (previous default)"}
        if "refused" in r:
            what = _refusal_kind(r["refused"])
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
                  f"{_sparsity_cell(r)} | {_distill_cell(r)} | {r['compress_seconds'] / 60:.1f} min{_shared(r)} |")
        if r.get("backoff") and len(r["backoff"]["tried"]) > 1:
            backoffs.append(_backoff_line(r["family"], r["backoff"]))
    if backoffs:
        md += ["", "Sparsity backoff (`prune.backoff_sparsities`: after recovery the pruned model is checked on "
                   "training samples held out of recovery and on the calibration samples (without enough training "
                   "samples, on the calibration samples alone), never the evaluation split, and pruned less when it "
                   "loses more than `prune.backoff_max_drop` x the verify limit on either):", ""] + backoffs
    if refused:
        md += ["", "Runs that wrote nothing (compress exits 2: the guard refused an artifact that loses more "
                   "than the recipe allows against the original, or a later stage stopped with an error):", ""] + refused
    if any(r.get("previous_default") for r in results["rows"]):
        md += ["", "(previous default): measured before the default recipe distilled on the whole training "
                   "split and backed off its sparsity on the calibration split; not rerun since."]
    notes = [f"- {r['family']}: {r['note']}" for r in results["rows"] if r.get("note")]
    if notes:
        md += ["", "Notes on single rows:", ""] + notes
    md += ["", f"Total: {results['seconds'] / 60:.1f} min."]
    return "\n".join(md) + "\n"


def _refusal_kind(error: str) -> str:
    """A refused row's cell: the guard (its error names a ``verify.`` key) or another error."""
    return "refused by the guard" if "verify." in error else "stopped by an error"


def _backoff_line(name: str, b: dict) -> str:
    """One bullet: every sparsity the backoff tried with its judged change (since 2026-12-06 the
    pooled loss plus one standard error, of the int8 TFLite when ``judged`` says so; before, the
    worse check set), its change on each check set, and the one kept; rows recorded before the
    held-out check name the calibration split."""
    where = b["checked_on"] if "checked_on" in b else "calibration samples (recorded before the held-out check)"
    pooled = any("pooled_change" in t for t in b["tried"])

    def one(t):
        sets = t.get("changes") or {}
        text = _change_text(b["metric"], t.get("change", t.get("calibration_change")))
        parts = []
        if "pooled_change" in t:
            se = f"{100 * t['standard_error']:.1f} points" if b["metric"] == "accuracy" else f"{t['standard_error']:.1%}"
            parts.append(f"pooled {_change_text(b['metric'], t['pooled_change'])}, s.e. {se}")
        if len(sets) > 1:
            parts += [f"{k.replace('_', '-')} {_change_text(b['metric'], v)}" for k, v in sets.items()]
        return f"{t['sparsity']:g}: {text}" + (" (" + "; ".join(parts) + ")" if parts else "")

    tries = "; ".join(one(t) for t in b["tried"])
    rule = "the pooled loss + 1 standard error judged" if pooled else "the worse set judged"
    judged = f", judged on {b['judged']}" if b.get("judged") else ""
    return (f"- {name}: {b['metric']} change vs the original on {where} per sparsity tried{judged}, {rule} "
            f"({tries}; limit {_change_text(b['metric'], b['max_drop'])}) -> {b['chosen']:g}")


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
    why = {"time_budget": "time budget", "deadline": "time budget's deadline", "early_stop": "early stop"}.get(r.get("distill_stop"), "")
    return f"{steps:,}" + (f" ({why})" if why else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=None,
                    help=f"comma-separated subset of {', '.join(FAMILIES)} (with --keras3: of "
                         f"{', '.join(KERAS3_FAMILIES)}); default: all")
    ap.add_argument("--keras3", action="store_true",
                    help="run the Keras 3 fixtures (tests/data/keras3) instead of the families (results name keras3)")
    ap.add_argument("--files", default=",".join(KERAS3_FILES),
                    help="with --keras3: which files of each family (.keras, .h5)")
    ap.add_argument("--recipe", help="recipe YAML (default: the default recipe)")
    ap.add_argument("--mobilenet-train", type=int, default=1000, help="CIFAR-10 training images per class")
    ap.add_argument("--name", default=None,
                    help="results file name (benchmarks/results/NAME.*; default families, with --keras3 keras3)")
    ap.add_argument("--append", action="store_true",
                    help="keep the other families' rows of an existing results file (each row keeps its command)")
    args = ap.parse_args(argv)
    known = KERAS3_FAMILIES if args.keras3 else FAMILIES
    args.name = args.name or ("keras3" if args.keras3 else "families")
    families = [f.strip() for f in (args.families or ",".join(known)).split(",") if f.strip()]
    bad = [f for f in families if f not in known]
    if bad:
        ap.error(f"unknown families {', '.join(bad)}; choose from {', '.join(known)}")
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    if args.keras3 and (not files or any(f not in KERAS3_FILES for f in files)):
        ap.error(f"--files {args.files!r}: choose from {', '.join(KERAS3_FILES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from toolchain.compress import cpu_name

    t0 = time.perf_counter()
    command = ("python benchmarks/families.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))).rstrip()
    host = f"{os.cpu_count()} cores {platform.machine()} ({cpu_name()})"
    rows = []
    if args.keras3:
        with tempfile.TemporaryDirectory(prefix="keras3-") as tmp:
            for family in families:
                for suffix in files:
                    rows.append({**run_keras3(family, suffix, args.recipe, Path(tmp)), "command": command})
                    results = _save(args.name, args.append, rows, command, host, args.recipe,
                                    time.perf_counter() - t0, kind="keras3")
                    print(markdown(results), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        for family in families:
            rows.append({**run_family(family, args.recipe, Path(tmp), args.mobilenet_train), "command": command})
            # written after every family, so a long run that is stopped keeps what it measured
            results = _save(args.name, args.append, rows, command, host, args.recipe,
                            time.perf_counter() - t0)
            print(markdown(results), flush=True)
    return 0


def _row_key(r: dict) -> str:
    """A row's identity in a results file: its family, or for Keras 3 rows its file."""
    return r.get("file", r["family"])


def _row_order(r: dict) -> tuple:
    if "file" in r:
        return KERAS3_FAMILIES.index(r["family"]), KERAS3_FILES.index(Path(r["file"]).suffix)
    return FAMILIES.index(r["family"]), 0


def _save(name: str, append: bool, rows: list, command: str, host: str, recipe, seconds: float,
          kind: str = "families") -> dict:
    """Write benchmarks/results/NAME.{json,md}: these rows, and with ``append`` the other families'
    rows of the existing file (re-read now: another run may have written it meanwhile)."""
    previous = RESULTS / f"{name}.json"
    done = {_row_key(r) for r in rows}
    notes = None
    if append and previous.is_file():
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if _row_key(r) not in done] + rows
        rows.sort(key=_row_order)
        notes = old.get("notes")
    total = sum(r.get("compress_seconds", 0) + r.get("prepare_seconds", 0) for r in rows)
    results = {"command": command, "machine": host, "recipe": recipe or "default", "rows": rows,
               "seconds": total if append else seconds}
    if notes:
        results["notes"] = notes
    if kind != "families":
        results["kind"] = kind
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(main())
