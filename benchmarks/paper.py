"""The paper's experiment: VGG16- and AlexNet-style CNNs on Fashion-MNIST and CIFAR-10 (JPEG q75 copy),
five compression flows compared on the same test split.

The method's paper reports models 64% smaller overall (81% in the convolutional layers) than the
originals, with better accuracy than the earlier explainability-based method (Yeom et al.'s LRP
filter pruning). For every dataset and architecture this

1. carves a VALIDATION split (the last ``VAL_FRACTION`` of the training data) off the training
   data and trains the zoo model (``--width``, ``--epochs``) on the rest; trained baselines are
   cached under the toolchain cache (``paper-models/``, keyed by arch, width, data, samples,
   epochs and seed), so reruns skip training;
2. runs the five flows, every one of them on the training part only (``toolchain compress`` and
   ``prune`` see the validation split as their evaluation split; the test split is never seen
   before the final rows):
   (1) the paper's rule: prune every weight with relevance <= 0, then relevance mixed precision
       (``recipes/paper-rule.yaml``);
   (2) ours: ``recipes/paper.yaml`` with the filter sparsities of ``--ours-sparsities`` tried
       from the smallest model up; the first whose validation loss (mixed-precision TFLite against
       the float TFLite) plus ``TUNE_MARGIN_SE`` paired standard errors is within
       ``TUNE_MAX_DROP`` is kept (else the most accurate);
   (3) magnitude pruning of weights + int8 at the packed size of ours (the standard flow);
   (4) Yeom et al.-style LRP filter pruning (|relevance| flowing out of each feature map) + int8
       at the packed size of ours;
   (5) float32 and uniform int8 references;
3. measures every TFLite artifact on the TEST split in TFLite, its bytes, the packed weight bytes
   (the paper's count) and its latency on this CPU (1 thread).

    python benchmarks/paper.py [--data fashion_mnist cifar10] [--arch alexnet vgg16] [--epochs 10]
                               [--train-samples N] [--test-samples N] [--quick] [--cifar10-dir DIR]

Writes benchmarks/results/paper.{md,json,png} after every finished model (a partial run leaves the
finished tables); ``make bench-all`` runs it, README quotes it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import machine  # the script's folder is on sys.path
from run_all import RESULTS, SHARED, artifact_row

DATASETS = ("fashion_mnist", "cifar10")
ARCHS = ("vgg16", "alexnet")
#: how every table names the data (the CIFAR-10 copy here is re-encoded JPEG, not the original binaries)
LABELS = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG q75 copy)"}
#: the input each dataset's models are built for (the images' own size)
INPUT_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
CIFAR10_DIR = SHARED / "data" / "cifar10-jpeg"
RECIPES = Path(__file__).resolve().parent / "recipes"
OURS_RECIPE = RECIPES / "paper.yaml"
PAPER_RULE_RECIPE = RECIPES / "paper-rule.yaml"
#: the paper's headline numbers for its own method, and the issue's goal for ours
PAPER_OVERALL = 0.64
PAPER_CONV = 0.81
GOAL_OVERALL = 0.90
#: at most this much accuracy lost vs float (1 point): the issue's bar and the tuning rule
TUNE_MAX_DROP = 0.01
#: a candidate passes when its validation loss plus this many (paired) standard errors is within
#: TUNE_MAX_DROP: compress's backoff rule (BACKOFF_MARGIN_SE); without it VGG16 on Fashion-MNIST
#: passed at 50% filters with -0.8 points on the 600 validation images and lost 2.8 on the test split
TUNE_MARGIN_SE = 1.0
#: verification limits the benchmark lifts (compress's recipe keys verify.min_agreement /
#: max_accuracy_drop, the same fields of export's int8 guard): it measures every flow's loss on the
#: test split itself, so no artifact may be refused before it is measured (a weak model's int8 copy
#: can agree on fewer than 90% of samples with it and still be the row to report)
GUARD_OFF = {"min_agreement": 0.0, "max_accuracy_drop": 1.0}
#: and the output-difference limits of the compressed kinds: after quantization-aware training the
#: artifact's outputs move away from the pruned model's by design
DIFFS_OFF = {"max_abs_diff": None, "max_mean_abs_diff": None, "max_rel_diff": None, "max_mean_rel_diff": None}
#: the last fraction of the training data held out for tuning
VAL_FRACTION = 0.1
WIDTH = 0.25
#: filter sparsities ours tries, smallest model first
OURS_SPARSITIES = (0.5, 0.3, 0.15, 0.0)
#: quantization-aware training epochs after pruning, for every quantized flow but the references
#: (ours and the paper's rule: of their mixed-precision plan; flows 3 and 4: of int8), so all get
#: the same training: post-training int8 of a pruned, fine-tuned model lost 4 to 19 points on the
#: validation split where 1 QAT epoch lost at most 0.8 (2026-12-06)
QAT_EPOCHS = 1
#: bisection on the filter sparsity that gives flow 4 the packed size of ours
SIZE_MATCH_STEPS = 30
SEED = 0
#: settings of --quick: a few hundred samples, short training and fine-tuning (the CI test)
QUICK = {"train_samples": 600, "test_samples": 200, "epochs": 3, "fine_tune_epochs": 1, "relevance_samples": 64,
         "runs": 20, "sparsities": (0.5,)}


def _log(text: str) -> None:
    print(f"[paper {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------------------------------------------
# data


def load_splits(key: str, cifar10_dir: Path, train_samples=None, test_samples=None, shape=None):
    """(train, val, test) Datasets of ``key``: val is the last ``VAL_FRACTION`` of the training data,
    train the first ``train_samples`` of the rest; every Dataset's evaluation split is val except
    ``test``'s (x_eval = the first ``test_samples`` of the test split)."""
    from toolchain.data import Dataset, load_dataset

    spec = "fashion_mnist" if key == "fashion_mnist" else f"images:{cifar10_dir}"
    ds = load_dataset(spec, input_shape=INPUT_SHAPES[key] if key == "cifar10" else None)
    x, y = ds.x_train, ds.y_train
    n_val = int(round(len(x) * VAL_FRACTION))
    if train_samples is not None:  # a subset: keep the validation split in proportion
        n_val = max(100, int(round(train_samples * VAL_FRACTION)))
    x_val, y_val = x[len(x) - n_val:], y[len(y) - n_val:]
    n_train = len(x) - n_val if train_samples is None else min(train_samples, len(x) - n_val)
    x_test, y_test = ds.x_eval[:test_samples], ds.y_eval[:test_samples]

    def make(name, xe, ye):
        return Dataset(name=name, x_train=x[:n_train], y_train=y[:n_train], x_eval=xe, y_eval=ye,
                       class_names=ds.class_names, input_shape=ds.input_shape,
                       provenance=f"{ds.provenance}; benchmarks/paper.py: train = first {n_train:,} training "
                                  f"samples, val = last {n_val:,}")
    return make(f"{key}-train", x_val, y_val), make(f"{key}-test", x_test, y_test), spec


def write_npz(ds, path: Path) -> str:
    """The training part and the validation split as an npz (what ``compress`` and ``bench`` read):
    written once per content, in the cache, never in the repository."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds.x_train, y=ds.y_train, x_eval=ds.x_eval, y_eval=ds.y_eval)
        os.replace(tmp, path)
    return f"npz:{path}"


def cache_dir() -> Path:
    from toolchain import stagecache

    return stagecache.root().parent / "paper-models"


def baseline(arch: str, key: str, train_ds, epochs: int, width: float) -> tuple:
    """The trained model's path and its training record; cached by arch, width, data, samples,
    epochs and seed (the saved model plus a json beside it)."""

    stem = f"{arch}_w{width:g}_{key}_n{len(train_ds.x_train)}_e{epochs}_s{SEED}_{train_ds.content_hash()[:12]}"
    path, meta = cache_dir() / f"{stem}.keras", cache_dir() / f"{stem}.json"
    if path.exists() and meta.exists():
        _log(f"  baseline cached: {path}")
        return path, {**json.loads(meta.read_text()), "cached": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trained = _train(arch, train_ds, epochs, path, width)
    info = {"arch": arch, "width_multiplier": width, "epochs": epochs, "train_samples": len(train_ds.x_train),
            "val_samples": len(train_ds.x_eval), "val_accuracy": trained.accuracy, "seed": SEED,
            "seconds": time.perf_counter() - t0}
    meta.write_text(json.dumps(info, indent=2))
    return path, {**info, "cached": False}


def _train(arch, ds, epochs, path, width):
    from models import build_model, train_model

    model = build_model(arch, tuple(ds.input_shape), int(ds.num_classes), seed=SEED, width_multiplier=width)
    return train_model(model, ds, epochs, path, seed=SEED, verbose=2)  # a line per epoch


# ------------------------------------------------------------------------------------------------
# sizes the paper's way


def multiply_accumulates(model) -> int:
    """Multiply-accumulates of one inference through the model's Conv2D and Dense layers (what a
    step costs, to state each architecture's size next to its table)."""
    import tensorflow as tf

    total = 0
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
            kernel = layer.get_weights()[0]
            positions = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
            total += kernel.size * positions
    return total


def architecture(arch: str, model) -> dict:
    """What the table states about a model: the zoo's description, its input, parameters and MACs."""
    from models import ARCHITECTURES

    return {"key": arch, "description": ARCHITECTURES.get(arch).description,
            "input_shape": list(model.input_shape[1:]), "params": int(model.count_params()),
            "macs": multiply_accumulates(model)}


def packed_bits(model, bits: int) -> dict:
    """{layer: (class, packed bits, original-shape weights)} of ``model`` with every nonzero kernel
    weight at ``bits`` (float32 = 32)."""
    from toolchain.quantize.kernels import kernels_of

    return {n: (k.layer_class, k.num_nonzero * bits, k.num_weights) for n, k in kernels_of(model).items()}


def reduction(layers: dict, original: dict) -> dict:
    """The paper's two numbers: 1 - packed kernel bits / the original float32 kernel bits, over all
    kernel layers and over the convolutions only (biases and BatchNorm are not counted)."""
    conv = [n for n, (cls, _, _) in original.items() if "Conv" in cls]
    total = sum(32 * w for _, _, w in original.values())
    conv_total = sum(32 * original[n][2] for n in conv)
    return {"packed_weight_bytes": int(np.ceil(sum(b for _, b, _ in layers.values()) / 8)),
            "reduction_overall": 1 - sum(b for _, b, _ in layers.values()) / total,
            "reduction_conv": 1 - sum(layers[n][1] for n in conv if n in layers) / conv_total}


def compressed_layers(summary: dict) -> dict:
    """Per-layer packed bits of a ``compress`` run (its quantize summary)."""
    return {n: (None, int(v["packed_bits"]), None) for n, v in summary["quantize"]["layers"].items()}


# ------------------------------------------------------------------------------------------------
# flows


def _recipe(path: Path, fine_tune_epochs: int, relevance_samples: int, sparsity=None, qat_epochs: int = QAT_EPOCHS) -> dict:
    from toolchain.recipe import load_recipe

    r = copy.deepcopy(load_recipe(str(path)))
    r["prune"]["fine_tune_epochs"] = fine_tune_epochs
    r["quantize"]["qat_epochs"] = qat_epochs
    r["relevance"]["samples"] = relevance_samples
    if sparsity is not None:
        r["prune"]["sparsity"] = sparsity
    # the benchmark measures every flow's loss itself and tunes on it (TUNE_MAX_DROP on the
    # validation split), so compress's own guard must not refuse a candidate before it is measured
    r["verify"].update(GUARD_OFF)
    for kind in ("int8", "mixed"):
        r["verify"][kind] = dict(DIFFS_OFF)
    return r


def _unguarded_int8() -> dict:
    """export's thresholds with the int8 guard lifted as ``GUARD_OFF`` lifts compress's."""
    from dataclasses import replace

    from toolchain.verify import DEFAULT_THRESHOLDS

    return {kind: replace(DEFAULT_THRESHOLDS[kind], **GUARD_OFF, **DIFFS_OFF) for kind in ("int8", "mixed")}


def _compress(model_path, spec, out: Path, recipe: dict):
    from toolchain.compress import run_compress

    t0 = time.perf_counter()
    res = run_compress(str(model_path), spec, str(out), recipe_path=recipe, quiet=True)
    arts = {r["format"]: out / r["path"] for r in res.summary["artifacts"]
            if r["origin"] == "compressed" and r["format"].startswith("tflite")}
    return res, arts, time.perf_counter() - t0


def int8_artifact(model, ds, qat_epochs: int, out: Path, formats=("tflite-int8",)) -> dict:
    """``{label: path}`` of ``model``'s int8 TFLite: with ``qat_epochs``, quantization-aware training
    first (the quantize stage ours uses, a uniform 8-bit plan, then the converter's QAT route:
    label ``tflite-int8-qat``), so flows 3 and 4 get the training ours gets; without, post-training
    quantization. ``tflite-sparse`` (post-training: the converter's sparse format has no QAT route)
    when asked."""
    from toolchain.export import export
    from toolchain.quantize import plan_bits, quantize

    paths = {}
    ptq = [f for f in formats if not (qat_epochs and f == "tflite-int8")]
    if ptq:
        bundle = export(model, ds, ptq, out / "ptq", thresholds=_unguarded_int8(), quiet=True)
        paths.update({f: bundle.artifacts[f].path for f in ptq})
    if qat_epochs and "tflite-int8" in formats:
        plan = plan_bits(model, ds, allocator="uniform", candidates=[8], quiet=True)
        q = quantize(model, plan, ds, qat_epochs=qat_epochs, quiet=True)
        bundle = export(model, ds, ["tflite-mixed"], out / "qat", bitplan=plan, qat_model=q.model,
                        thresholds=_unguarded_int8(), quiet=True)
        paths["tflite-int8-qat"] = bundle.artifacts["tflite-mixed"].path
    return paths


def filter_pruned_weights(model, sparsity: float) -> int:
    """Kernel weights left when every kernel layer but the classifier keeps ``kept_count`` of its
    filters (layer scope, what ``prune`` does at filter granularity), for a chain of Conv2D/Dense
    layers like the zoo's VGG16 and AlexNet: a layer's inputs are its predecessor's kept channels (a
    Dense after Flatten: the same share of its input features)."""
    from toolchain.prune.criteria import kept_count
    from toolchain.quantize.kernels import kernels_of

    kernels = list(kernels_of(model).values())
    total, prev = 0, None  # prev = (channels, kept channels) of the previous kernel layer
    for i, k in enumerate(kernels):
        *_, n_in, n_out = k.weights.shape
        field = k.weights.size // (n_in * n_out)
        kept_in = n_in if prev is None else n_in * prev[1] // prev[0]
        kept_out = n_out if i == len(kernels) - 1 else kept_count(n_out, sparsity)
        total += field * kept_in * kept_out
        prev = (n_out, kept_out)
    return total


def filter_sparsity_for(model, target_weights: int) -> float:
    """The smallest filter sparsity whose pruned model keeps at most ``target_weights`` kernel weights."""
    lo, hi = 0.0, 0.99
    for _ in range(SIZE_MATCH_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filter_pruned_weights(model, mid) > target_weights else (lo, mid)
    return hi


def run_pair(arch, key, train_ds, test_ds, spec_note, work: Path, epochs, width, fine_tune_epochs,
             relevance_samples, sparsities, runs, qat_epochs: int = QAT_EPOCHS) -> dict:
    """Train (or load) the baseline and run the five flows; rows hold test accuracy and sizes."""
    from toolchain.export import export
    from toolchain.model_io import load_model
    from toolchain.prune import prune

    name = f"{arch} on {LABELS[key]}"
    times = {}
    t0 = time.perf_counter()
    _log(f"{name}: baseline ({arch} width {width:g}, {epochs} epochs, {len(train_ds.x_train):,} training samples)")
    model_path, train_info = baseline(arch, key, train_ds, epochs, width)
    times["train"] = time.perf_counter() - t0
    model = load_model(model_path)
    original = packed_bits(model, 32)
    tune_spec = write_npz(train_ds, cache_dir() / "data" / f"{key}_{train_ds.content_hash()[:16]}.npz")
    x_test, y_test = test_ds.x_eval, test_ds.y_eval
    tag = f"{arch}_{key}"
    rows = []

    def add(flow, fmt, path, layers, note=""):
        row = artifact_row(tag, flow, fmt, path, x_test, y_test, tune_spec, runs, work, note=note)
        row.update(reduction(layers, original) if layers is not None else {})
        row["packed_weight_bytes"] = row.get("packed_weight_bytes")
        rows.append(row)

    # (5) references
    t = time.perf_counter()
    _log(f"{name}: float32 and uniform int8")
    base = export(model, train_ds, ["tflite-fp32", "tflite-int8"], work / f"{tag}_base",
                  thresholds=_unguarded_int8(), quiet=True)
    add("float32", "tflite-fp32", base.artifacts["tflite-fp32"].path, original)
    add("uniform int8", "tflite-int8", base.artifacts["tflite-int8"].path, packed_bits(model, 8))
    times["references"] = time.perf_counter() - t

    # (2) ours, tuned on the validation split
    t = time.perf_counter()
    from toolchain.run import run_artifact
    from toolchain.task import paired_change

    x_val, y_val = train_ds.x_eval, train_ds.y_eval
    float_out = run_artifact(base.artifacts["tflite-fp32"].path, x_val)
    float_val = float(np.mean(np.argmax(float_out, -1) == y_val))
    tuning, chosen = [], None
    for s in sparsities:
        recipe = _recipe(OURS_RECIPE, fine_tune_epochs, relevance_samples, sparsity=s, qat_epochs=qat_epochs)
        _log(f"{name}: ours, filter sparsity {s:.0%}: compress on the training part, validation split")
        res, arts, secs = _compress(model_path, tune_spec, work / f"{tag}_ours_{s}", recipe)
        out = run_artifact(arts["tflite-mixed"], x_val)
        val = float(np.mean(np.argmax(out, -1) == y_val))
        drop, se = paired_change("classification", y_val, float_out, out)
        # the sparsity compress pruned at (the achieved fraction of weights differs by channel rounding)
        pruned = res.summary["prune"].get("backoff", {}).get("chosen", s)
        if abs(pruned - s) > 1e-9:
            from toolchain.errors import ConfigError

            raise ConfigError(f"ours was asked for filter sparsity {s:g} and compress pruned {pruned:g}; "
                               f"set prune.backoff_sparsities: [] in {OURS_RECIPE.name}")
        entry = {"sparsity": s, "val_accuracy": val, "float_val_accuracy": float_val, "seconds": secs,
                 "packed_weight_bytes": res.summary["quantize"]["packed_weight_bytes"],
                 "drop": drop, "standard_error": se,
                 "passes": drop + TUNE_MARGIN_SE * se <= TUNE_MAX_DROP + 1e-9}
        tuning.append(entry)
        _log(f"  val {val:.2%} (float {float_val:.2%}; loss + {TUNE_MARGIN_SE:g} s.e. "
             f"{100 * (drop + TUNE_MARGIN_SE * se):+.2f} points), packed {entry['packed_weight_bytes']:,} B, {secs:.0f} s")
        if entry["passes"]:
            chosen = (s, res, arts)
            break
        if chosen is None or val > max(e["val_accuracy"] for e in tuning[:-1]):
            chosen = (s, res, arts)
    s, ours, arts = chosen
    ours_layers = compressed_layers(ours.summary)
    note = f"filter sparsity {s:.0%} (tuned on val), {ours.summary['quantize']['avg_weight_bits']:.2f} avg bits"
    add("ours", "tflite-mixed", arts["tflite-mixed"], ours_layers, note)
    times["ours"] = time.perf_counter() - t
    target_bits = sum(b for _, b, _ in ours_layers.values())

    # (1) the paper's rule
    t = time.perf_counter()
    _log(f"{name}: the paper's rule (relevance <= 0 pruned, relevance mixed precision)")
    rule, rule_arts, _ = _compress(model_path, tune_spec, work / f"{tag}_rule",
                                   _recipe(PAPER_RULE_RECIPE, fine_tune_epochs, relevance_samples, qat_epochs=qat_epochs))
    zeros = rule.summary.get("prune", {}).get("sparsity")
    add("paper's rule", "tflite-mixed", rule_arts["tflite-mixed"], compressed_layers(rule.summary),
        f"{zeros:.0%} of weights zero" if isinstance(zeros, float) else "")
    times["paper's rule"] = time.perf_counter() - t

    # (3) magnitude pruning of weights + int8 at ours' packed size
    t = time.perf_counter()
    total = sum(w for _, _, w in original.values())
    s3 = float(min(0.99, max(0.0, 1 - target_bits / (8 * total))))
    _log(f"{name}: magnitude {s3:.1%} of weights + int8 (packed size of ours)")
    mag = prune(model, train_ds, criterion="magnitude", granularity="weight", sparsity=s3,
                fine_tune_epochs=fine_tune_epochs, quiet=True)
    fine_tuned = f"fine-tuned {fine_tune_epochs} epoch(s)"
    trained = fine_tuned + (f", QAT {qat_epochs}" if qat_epochs else "")
    for fmt, path in int8_artifact(mag.model, train_ds, qat_epochs, work / f"{tag}_magnitude",
                                   ("tflite-int8", "tflite-sparse")).items():
        sparse = fmt == "tflite-sparse"  # post-training: the sparse format has no QAT route
        add("magnitude + int8", fmt, path, packed_bits(mag.model, 8),
            f"{s3:.1%} of weights zero, {fine_tuned + ', post-training int8' if sparse else trained}")
    times["magnitude"] = time.perf_counter() - t

    # (4) Yeom et al.-style LRP filter pruning + int8 at ours' packed size
    t = time.perf_counter()
    s4 = filter_sparsity_for(model, target_bits // 8)
    _log(f"{name}: Yeom et al. LRP filters {s4:.1%} + int8 (packed size of ours)")
    yeom = prune(model, train_ds, criterion="relevance", granularity="filter", sparsity=s4, score="abs",
                 source="consumer", samples=relevance_samples, fine_tune_epochs=fine_tune_epochs, quiet=True)
    for fmt, path in int8_artifact(yeom.model, train_ds, qat_epochs, work / f"{tag}_yeom").items():
        add("Yeom et al. LRP filters + int8", fmt, path, packed_bits(yeom.model, 8),
            f"{s4:.1%} of filters per layer, {trained}")
    times["yeom"] = time.perf_counter() - t

    fp32 = rows[0]
    for r in rows:
        r["accuracy_change_points"] = 100 * (r["accuracy"] - fp32["accuracy"])
        r["bytes_reduction"] = 1 - r["bytes"] / fp32["bytes"]
    times["total"] = time.perf_counter() - t0
    _log(f"{name}: done in {times['total'] / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    return {"name": name, "arch": arch, "data": key, "data_label": LABELS[key], "spec": spec_note,
            "architecture": architecture(arch, model), "train": train_info, "test_samples": len(y_test), "rows": rows, "tuning": tuning,
            "seconds": times, "fine_tune_epochs": fine_tune_epochs, "qat_epochs": qat_epochs,
            "relevance_samples": relevance_samples}


def goal(case: dict) -> dict:
    ours = next(r for r in case["rows"] if r["flow"] == "ours")
    within = ours["accuracy_change_points"] >= -100 * TUNE_MAX_DROP - 1e-9
    return {"overall": ours["reduction_overall"], "conv": ours["reduction_conv"],
            "drop_points": -ours["accuracy_change_points"],
            "meets_paper": ours["reduction_overall"] >= PAPER_OVERALL and within,
            "meets_goal": ours["reduction_overall"] >= GOAL_OVERALL and within}


# ------------------------------------------------------------------------------------------------
# results


def markdown(results: dict, command: str) -> list:
    s = results["settings"]
    md = [f"Command: `{command}`. Machine: {os.cpu_count()} cores x86_64; "
          + machine.describe(results.get("other_cpu_share")) + ". Models: the zoo's VGG16- and AlexNet-style CNNs at width "
          f"{s['width']:g} ({s['epochs']} epochs, Adam 1e-3, batch 64, seed {SEED}"
          + ("" if s["train_samples"] is None else
             f", on the first {s['train_samples']:,} training images only: REDUCED to fit the shared machine")
          + f"; every pruning flow fine-tunes {s['fine_tune_epochs']} epoch(s) on the same images"
          + (f", then trains {s['qat_epochs']} epoch(s) quantization-aware (ours and the paper's rule: their "
             "mixed-precision plan; magnitude and Yeom: int8)" if s.get("qat_epochs") else "")
          + ", relevance from "
          f"{s['relevance_samples']} of them); the last {VAL_FRACTION:.0%} of "
          "the training data is the validation split every tuning decision is made on; accuracy is on the test "
          f"split{'' if s['test_samples'] is None else ' (first ' + format(s['test_samples'], ',') + ' samples)'}, "
          "in TFLite.", "",
          "Reduction overall / conv = 1 - packed kernel bits / the original float32 kernel bits (the paper's count: "
          "every nonzero kernel weight at its bit width, pruned weights and filters cost nothing, biases and "
          "BatchNorm not counted; 'conv' = the Conv2D layers only). Packed B = those packed kernel bits / 8. "
          ".tflite B = the deployable file (weight-level zeros do not shrink a .tflite; the sparse format does). "
          "Latency: p50 of single-sample inference, TFLite, 1 thread, XNNPACK on, on this CPU. "
          f"Paper: {PAPER_OVERALL:.0%} overall, {PAPER_CONV:.0%} conv; goal for ours: >= {GOAL_OVERALL:.0%} overall "
          f"within {100 * TUNE_MAX_DROP:g} point of float.", ""]
    if "--quick" in command:
        md = [f"**A `--quick` smoke run** ({s['train_samples']} training images, {s['epochs']} epochs, "
              f"{s['test_samples']} test images): it shows that every flow runs on the real data, not what the "
              "flows reach on the paper's experiment; do not compare its numbers with the paper's.", ""] + md
    by_data = {}
    for case in results["cases"].values():
        by_data.setdefault(case["data_label"], []).append(case)
    for label, cases in by_data.items():
        md += [f"### {label}", "",
               "| model | flow | test accuracy | vs float (points) | .tflite B | packed B | reduction overall | "
               "reduction conv | p50 ms | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for case in cases:
            arch = case["arch"]
            for r in case["rows"]:
                md.append(f"| {arch} | {r['flow']} ({r['format'].replace('tflite-', '')}) | {r['accuracy']:.2%} | "
                          f"{r['accuracy_change_points']:+.2f} | {r['bytes']:,} | {r['packed_weight_bytes']:,} | "
                          f"{r['reduction_overall']:.1%} | {r['reduction_conv']:.1%} | {r['p50_ms']:.3f} | {r['note']} |")
        md.append("")
        for case in cases:
            t, g = case["train"], goal(case)
            trained = f"{t['seconds'] / 60:.1f} min" + (" when first trained; cached here" if t.get("cached") else "")
            tune = "; ".join(f"{e['sparsity']:.0%} filters: val {e['val_accuracy']:.2%} vs float {e['float_val_accuracy']:.2%}"
                             + (f", loss + {TUNE_MARGIN_SE:g} s.e. {100 * (e['drop'] + TUNE_MARGIN_SE * e['standard_error']):.2f} points"
                                if "standard_error" in e else "")
                             + f" ({'kept' if e['passes'] else 'over 1 point'})" for e in case["tuning"])
            a = case.get("architecture")
            shape = "x".join(map(str, a["input_shape"])) if a else ""
            built = (f" (the zoo's, width {t['width_multiplier']:g}: {a['params']:,} parameters, "
                     f"{a['macs'] / 1e6:.1f} M multiply-accumulates per {shape} image at its native size)") if a else ""
            noise = 100 * np.sqrt(t["val_accuracy"] * (1 - t["val_accuracy"]) / t["val_samples"])
            rule = next((r for r in case["rows"] if r["flow"] == "paper's rule"), None)
            rule_text = (f"The paper's rule here: {rule['reduction_overall']:.1%} overall / {rule['reduction_conv']:.1%} "
                         f"conv at {rule['accuracy_change_points']:+.2f} points. ") if rule else ""
            md += [f"- {case['arch']}{built}: trained {t['epochs']} epochs on {t['train_samples']:,} samples "
                   f"(val {t['val_accuracy']:.2%}, {trained}); "
                   f"test on {case['test_samples']:,} samples; ours tuned on val ({t['val_samples']:,} samples: one "
                   f"binomial s.d. is {noise:.1f} points vs the {100 * TUNE_MAX_DROP:g}-point bar): {tune}. "
                   f"Ours: {g['overall']:.1%} overall / {g['conv']:.1%} conv at {-g['drop_points']:+.2f} points: "
                   f"paper's 64% {'met' if g['meets_paper'] else 'MISSED'}, goal 90% {'met' if g['meets_goal'] else 'MISSED'} "
                   f"(both need at most {100 * TUNE_MAX_DROP:g} point lost). "
                   f"Size alone against the paper's (reported without accuracy loss): overall "
                   f"{_versus(g['overall'], PAPER_OVERALL)}, conv {_versus(g['conv'], PAPER_CONV)}. {rule_text}"
                   f"At ours' packed size: {_equal_size(case)}. "
                   f"Time {case['seconds']['total'] / 60:.1f} min (" +
                   ", ".join(f"{k} {v / 60:.1f}" + (" (cached)" if k == "train" and t.get("cached") else "")
                             for k, v in case['seconds'].items() if k != "total") + " min)."]
        md.append("")
    md += [f"- {s}" for s in results.get("skipped", [])]
    when = ("its run's file was last written" if results.get("merged_from") else
            f"this file was written ({results.get('total_seconds', 0) / 60:.1f} min into the run)")
    md += [f"- Not finished when {when}, so the issue's goals are not measured for: {', '.join(results['pending'])}."] \
        if results.get("pending") else []
    if results.get("merged_from"):  # runs made one after another, each with its own command
        md += ["", "Runs merged into this file: " + "; ".join(
            f"`{m['command']}` (its file last written {m['total_seconds'] / 60:.1f} min into the run)"
            for m in results["merged_from"]) + "."]
    else:
        md += ["", f"Total time of this run: {results.get('total_seconds', 0) / 60:.1f} min."]
    return md


def _versus(ours: float, paper: float) -> str:
    word = "beats" if ours > paper + 0.005 else "matches" if ours >= paper - 0.005 else "misses"
    return f"{ours:.1%} {word} the paper's {paper:.0%} ({100 * (ours - paper):+.1f} points)"


def _equal_size(case: dict) -> str:
    rows = {r["flow"]: r for r in case["rows"] if r["format"] != "tflite-sparse"}
    ours = rows["ours"]["accuracy"]
    return "; ".join(f"ours {ours:.2%} vs {flow} {rows[flow]['accuracy']:.2%} ({100 * (ours - rows[flow]['accuracy']):+.2f} "
                     f"points for ours, packed {rows[flow]['packed_weight_bytes']:,} vs {rows['ours']['packed_weight_bytes']:,} B)"
                     for flow in ("magnitude + int8", "Yeom et al. LRP filters + int8") if flow in rows)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["cases"].values())
    colors = {"float32": "tab:gray", "uniform int8": "tab:blue", "ours": "tab:green", "paper's rule": "tab:red",
              "magnitude + int8": "tab:orange", "Yeom et al. LRP filters + int8": "tab:purple"}
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for r in case["rows"]:
            if r["format"] == "tflite-sparse":
                continue
            ax.scatter(r["packed_weight_bytes"] / 1024, 100 * r["accuracy"], s=40, color=colors.get(r["flow"], "k"),
                       label=r["flow"])
        ax.set_xscale("log")
        ax.set_xlabel("packed kernel weights (KiB, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(case["name"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, results_dir: Path, command: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    results["command"] = command
    (results_dir / "paper.json").write_text(json.dumps(results, indent=2, default=str))
    md = ["# The paper's experiment: VGG16 / AlexNet on Fashion-MNIST and CIFAR-10 (JPEG q75 copy)", ""] + \
        markdown(results, command)
    (results_dir / "paper.md").write_text("\n".join(md) + "\n")
    if results["cases"]:
        _plot(results, results_dir / "paper.png")
    return results_dir / "paper.md"


def run_experiment(work: Path, datasets=DATASETS, archs=ARCHS, epochs: int = 10, train_samples=None,
                   test_samples=None, width: float = WIDTH, fine_tune_epochs: int = 2, relevance_samples: int = 500,
                   sparsities=OURS_SPARSITIES, runs: int = 200, cifar10_dir=CIFAR10_DIR, on_case=None,
                   qat_epochs: int = QAT_EPOCHS) -> dict:
    """Every (dataset, architecture) in order; ``on_case(results)`` after each (to write partial
    results). A dataset that cannot be loaded is listed in ``skipped`` with the loader's reason."""
    from toolchain.errors import DataError

    t0, cpu0 = time.perf_counter(), machine.snapshot()
    out = {"cases": {}, "skipped": [], "pending": [f"{a} on {LABELS[d]}" for d in datasets for a in archs],
           "settings": {"epochs": epochs, "train_samples": train_samples, "test_samples": test_samples,
                        "width": width, "fine_tune_epochs": fine_tune_epochs, "qat_epochs": qat_epochs,
                        "relevance_samples": relevance_samples,
                        "ours_sparsities": list(sparsities), "runs": runs, "cifar10_dir": str(cifar10_dir),
                        "val_fraction": VAL_FRACTION, "seed": SEED}}
    for key in datasets:
        t = time.perf_counter()
        try:
            train_ds, test_ds, spec = load_splits(key, Path(cifar10_dir), train_samples, test_samples)
        except DataError as e:
            out["skipped"].append(f"{LABELS[key]}: skipped — {e}")
            out["pending"] = [p for p in out["pending"] if not p.endswith(LABELS[key])]
            _log(f"{key}: skipped ({e})")
            continue
        _log(f"{LABELS[key]}: loaded {len(train_ds.x_train):,} train / {len(train_ds.x_eval):,} val / "
             f"{len(test_ds.x_eval):,} test in {time.perf_counter() - t:.0f} s")
        if on_case is not None:  # the results file says what is running before the first model finishes
            out["total_seconds"] = time.perf_counter() - t0
            on_case(out)
        for arch in archs:
            case = run_pair(arch, key, train_ds, test_ds, spec, work, epochs, width, fine_tune_epochs,
                            relevance_samples, sparsities, runs, qat_epochs)
            out["cases"][case["name"]] = case
            out["pending"].remove(case["name"])
            out["total_seconds"] = time.perf_counter() - t0
            out["other_cpu_share"] = machine.other_cpu_share(cpu0)
            if on_case is not None:
                on_case(out)
    out["total_seconds"] = time.perf_counter() - t0
    out["other_cpu_share"] = machine.other_cpu_share(cpu0)
    return out


def reproducible(command: str) -> str:
    """The command without its ``--results DIR`` (where a run wrote its files does not change them)."""
    import re

    return re.sub(r"\s+--results(=|\s+)\S+", "", command)


def merge(paths, results_dir: Path) -> int:
    """One results file from runs made separately: their cases in order, their settings (which must
    agree apart from the datasets), the longest total time (they ran side by side). A case written
    before cases recorded their architecture gets it from the zoo (parameters and MACs do not
    depend on the trained weights)."""
    from models import build_model

    runs = [json.loads(p.read_text()) for p in paths]
    for r in runs:
        r["command"] = reproducible(r.get("command", "?"))
        for case in r["cases"].values():
            if "architecture" not in case:
                model = build_model(case["arch"], INPUT_SHAPES[case["data"]], 10,
                                    width_multiplier=case["train"]["width_multiplier"])
                case["architecture"] = architecture(case["arch"], model)
    out = {"cases": {}, "skipped": [], "pending": [], "settings": runs[0]["settings"], "merged_from": [],
           "total_seconds": max(r.get("total_seconds", 0) for r in runs),
           # side by side, each run's "others" include the other runs: the largest share says the most
           "other_cpu_share": max((r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None),
                                  default=None)}
    for p, r in zip(paths, runs):
        out["cases"].update(r["cases"])
        out["skipped"] += r.get("skipped", [])
        written = r.get("total_seconds", 0) / 60
        out["pending"] += [f"{name} (`{r.get('command', '?')}`, its file last written {written:.0f} min in)"
                           for name in r.get("pending", [])]
        out["merged_from"].append({"command": r.get("command"), "total_seconds": r.get("total_seconds", 0)})
    # a model one run left unfinished and a later run finished is not pending
    out["pending"] = [p for p in out["pending"] if not any(p.startswith(f"{name} (") for name in out["cases"])]
    command = " ; ".join(r.get("command", "?") for r in runs)
    print(write(out, results_dir, command).read_text())
    return 0


def main(argv=None) -> int:
    import tempfile

    from toolchain.cli import positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    ap.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default 10; --quick 3)")
    ap.add_argument("--width", type=float, default=WIDTH, help="the zoo's width_multiplier (default %(default)s)")
    ap.add_argument("--train-samples", type=positive_int, default=None,
                    help="train on the first N training samples (default: all but the validation split)")
    ap.add_argument("--test-samples", type=positive_int, default=None, help="first N test samples (default: all)")
    ap.add_argument("--fine-tune-epochs", type=int, default=None, help="fine-tuning after pruning (default 2)")
    ap.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS,
                    help="quantization-aware training after pruning, every quantized flow (default %(default)s)")
    ap.add_argument("--ours-sparsities", type=float, nargs="+", default=None,
                    help=f"filter sparsities ours tries on the validation split, smallest model first "
                         f"(default {' '.join(map(str, OURS_SPARSITIES))})")
    ap.add_argument("--quick", action="store_true", help=f"a smoke run on real samples: {QUICK}")
    ap.add_argument("--cifar10-dir", default=str(CIFAR10_DIR), help="CIFAR-10 class folders (default: %(default)s)")
    ap.add_argument("--runs", type=positive_int, default=None, help="timed inferences per artifact (default 200)")
    ap.add_argument("--results", default=str(RESULTS), help="output folder (default: %(default)s)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: merge the paper.json of runs made separately (e.g. one per dataset) into --results")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.results))
    if not 0 < args.width <= 4:
        ap.error(f"--width: {args.width} is not in (0, 4]; pass e.g. 0.25 (the zoo's default) or 1 (full width)")
    if args.fine_tune_epochs is not None and args.fine_tune_epochs < 0:
        ap.error(f"--fine-tune-epochs: {args.fine_tune_epochs} is negative; pass 0 or more")
    if args.ours_sparsities and not all(0 <= v < 1 for v in args.ours_sparsities):
        ap.error(f"--ours-sparsities: {args.ours_sparsities} must all be in [0, 1); pass e.g. 0.5 0.3 0")
    if args.qat_epochs < 0:
        ap.error(f"--qat-epochs: {args.qat_epochs} is negative; pass 0 (post-training quantization) or more")
    q = QUICK if args.quick else {}
    pick = lambda given, name, default: given if given is not None else q.get(name, default)  # noqa: E731
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = reproducible(("python benchmarks/paper.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip())
    results_dir = Path(args.results)
    with tempfile.TemporaryDirectory(prefix="paper-") as tmp:
        results = run_experiment(
            Path(tmp), args.data, args.arch, pick(args.epochs, "epochs", 10),
            pick(args.train_samples, "train_samples", None), pick(args.test_samples, "test_samples", None),
            args.width, pick(args.fine_tune_epochs, "fine_tune_epochs", 2), q.get("relevance_samples", 500),
            tuple(pick(args.ours_sparsities, "sparsities", OURS_SPARSITIES)), pick(args.runs, "runs", 200), args.cifar10_dir,
            on_case=lambda r: write(r, results_dir, command), qat_epochs=args.qat_epochs)
    print(write(results, results_dir, command).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
