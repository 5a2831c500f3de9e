"""``toolchain compress``: relevance → prune → quantize → export → verify → benchmark → report.

Every setting comes from a validated recipe (``toolchain.recipe``). Stage outputs are cached
(relevance in its own cache, pruning and the bit plan in ``toolchain.stagecache``), keyed by the
input model's hash, the data hash and the stage's settings. The output directory is assembled in a
temporary directory and moved into place at the end (``staged_output``): an interrupted or failed
run leaves the previous complete build or nothing. The input model file is never modified.
"""
from __future__ import annotations

import json
import platform
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from toolchain.errors import ConfigError

STAGES = ("relevance", "prune", "quantize", "export", "bench", "fidelity", "report")
#: evaluation samples used for the explanation-fidelity comparison (two LRP runs)
FIDELITY_SAMPLES = 200


@dataclass(frozen=True)
class CompressResult:
    out_dir: Path
    summary: dict

    @property
    def headline(self) -> str:
        return self.summary.get("headline", "")

    @property
    def artifacts(self) -> Dict[str, Path]:
        """Each compressed artifact's format -> its file (``mcu`` -> the bundle folder)."""
        out = {r["format"]: self.out_dir / r["path"] for r in self.summary.get("artifacts", [])
               if r["origin"] == "compressed" and "path" in r}
        if "mcu" in self.summary:
            out["mcu"] = self.out_dir / "artifacts" / "mcu"
        return out


class _Progress:
    """Stage lines on stderr, silent when quiet: ``[2/7] prune: ... (relevance took 12 s; 14 s
    elapsed)``: each line names the stage that just finished with its own duration, and the total."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = self.t_stage = time.perf_counter()
        self.current: Optional[str] = None

    def _timing(self) -> str:
        now = time.perf_counter()
        done = f"{self.current} took {now - self.t_stage:.0f} s; " if self.current else ""
        self.t_stage = now
        return f"({done}{now - self.t0:.0f} s elapsed)"

    def stage(self, name: str, text: str) -> None:
        timing = self._timing()
        self.current = name
        if not self.quiet:
            i = STAGES.index(name) + 1
            print(f"[{i}/{len(STAGES)}] {name}: {text} {timing}", file=sys.stderr, flush=True)

    def done(self) -> None:
        timing = self._timing()
        if not self.quiet:
            print(f"done {timing}", file=sys.stderr, flush=True)


def library_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "innvestigate", "tensorflow-model-optimization", "tf2onnx", "onnx",
                 "onnxruntime", "numpy", "protobuf", "scikit-learn", "matplotlib", "ai-edge-litert", "tflite-micro"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    from toolchain import __version__

    out["toolchain"] = __version__
    return out


def _predict_artifact(artifact, x: np.ndarray) -> np.ndarray:
    from toolchain.verify import runtime_for

    return np.asarray(runtime_for(artifact)(x))


def _calibration_metrics(model, x, y, task: str) -> dict:
    return _metrics(model.predict(x, batch_size=256, verbose=0), y, task)


def _metrics(outputs, y, task: str) -> dict:
    from toolchain.task import evaluate

    out = evaluate(task, y, outputs)
    out.pop("reconstruction_error", None)
    return out


def _prune(model, dataset, recipe, rmap, m_hash, d_hash, quiet):
    """Prune as the recipe says. ``mode: auto`` tries ``auto_sparsities`` from the largest down and
    keeps the first whose calibration-split accuracy (before fine-tuning) is within
    ``auto_max_drop`` of the original's; the evaluation split is never used to choose."""
    from toolchain import stagecache
    from toolchain.prune import prune

    from toolchain.prune.distill import DistillConfig
    from toolchain.relevance import resolve_class_selection

    p = recipe["prune"]
    distill = DistillConfig.from_recipe(p)
    settings = {k: p[k] for k in ("criterion", "granularity", "mode", "sparsity", "fine_tune_epochs",
                                  "auto_sparsities", "auto_max_drop", "channel_multiple", "backoff_sparsities",
                                  "backoff_max_drop")}
    settings["verify"] = {k: recipe["verify"][k] for k in GUARD_KEYS.values()}  # the backoff's limit
    # every distillation setting, not only the recipe's two: a changed default (augmentation) must
    # not reuse a model distilled the old way
    settings["distill"] = distill.to_dict()
    # what the backoff measures on and how it judges (a changed rule must not reuse a choice)
    settings["backoff_check"] = {"min": BACKOFF_CHECK_MIN, "max": BACKOFF_CHECK_MAX, "rule": BACKOFF_CHECK_RULE,
                                 "margin_se": BACKOFF_MARGIN_SE, "judge": backoff_judge(recipe)}
    entry = stagecache.key("prune", m_hash, d_hash, settings, recipe["relevance"])
    hit = stagecache.get(entry)
    if hit is not None and hit[0] is not None:
        return hit[0], hit[1], True

    # rounding channel counts only means something for filters removed to a sparsity target
    multiple = p["channel_multiple"] if p["granularity"] == "filter" and p["mode"] != "nonpositive" else 1

    def run(sparsity, epochs, distillation=None, data=dataset):
        return prune(model, data, criterion=p["criterion"], granularity=p["granularity"],
                     rule="nonpositive" if p["mode"] == "nonpositive" else None,
                     sparsity=None if p["mode"] == "nonpositive" else float(sparsity),
                     relevance=rmap if p["criterion"] == "relevance" else None,
                     lrp_rule=recipe["relevance"]["rule"],
                     class_selection=resolve_class_selection(dataset.task, recipe["relevance"]["classes"]),
                     samples=recipe["relevance"]["samples"], fine_tune_epochs=epochs, channel_multiple=multiple,
                     distill=distillation, quiet=quiet)

    auto = backoff = None
    if p["mode"] == "auto":
        from toolchain.task import metric_change, mse_floor_for, primary_metric

        x_cal, y_cal = dataset.calibration(min(recipe["relevance"]["samples"], len(dataset.x_train)))
        metric, _ = primary_metric(dataset.task)
        reference = _calibration_metrics(model, x_cal, y_cal, dataset.task)
        tried, chosen = [], None
        for s in sorted(p["auto_sparsities"], reverse=True):
            candidate = run(s, 0)
            got = _calibration_metrics(candidate.model, x_cal, y_cal, dataset.task)
            change = metric_change(dataset.task, reference, got, mse_floor_for(y_cal)).drop
            tried.append({"sparsity": s, f"calibration_{metric}": got[metric], "calibration_change": change})
            if change <= p["auto_max_drop"]:
                chosen = s
                break
        auto = {f"reference_calibration_{metric}": reference[metric], "metric": metric, "tried": tried,
                "chosen": chosen, "max_drop": p["auto_max_drop"]}
        if chosen is None:
            summary = {"criterion": p["criterion"], "granularity": p["granularity"], "rule": "auto: none",
                       "skipped": True, "auto": auto, "params_before": model.count_params(),
                       "params_after": model.count_params(), "layer_sparsity": {}, "removed_channels": {},
                       "accuracy_before": None, "accuracy_after": None}
            stagecache.put(entry, summary, model)
            return model, summary, False
        tuned = p["fine_tune_epochs"] or p["distill_steps"]
        result = run(chosen, p["fine_tune_epochs"], distill) if tuned else candidate
    elif p["mode"] == "nonpositive":
        result = run(None, p["fine_tune_epochs"], distill)
    else:
        result, backoff = _prune_with_backoff(run, model, dataset, recipe, distill, quiet)
    summary = result.summary()
    if auto is not None:
        summary["auto"] = auto
    if backoff is not None:
        summary["backoff"] = backoff
    stagecache.put(entry, summary, result.model)
    return result.model, summary, False


#: a failed backoff try whose distillation the time budget cut below this share of its step cap
#: skips the intermediate sparsities (they would get as few steps)
BACKOFF_STARVED_SHARE = 0.125
#: the backoff's check samples: the tail of the train split, held out of distillation and fine-tuning
#: (half of what the calibration prefix leaves, at most BACKOFF_CHECK_MAX), when that gives at least
#: BACKOFF_CHECK_MIN; else (kws01: its 500 training samples are the calibration samples) the check
#: runs on the calibration samples, which the student trained on, and measures fit
BACKOFF_CHECK_MIN = 200
BACKOFF_CHECK_MAX = 1000
#: how the backoff judges a try (in the prune stage's cache key): its loss on the check sets pooled,
#: plus BACKOFF_MARGIN_SE standard errors of that (paired) estimate, must be within the limit
BACKOFF_CHECK_RULE = "pooled check sets, loss + margin x standard error"
#: a try must be within the limit by this many standard errors: at 1 point on a few hundred samples
#: the estimate is as wide as the limit (the Keras 3 dsconv_residual pruned 15% lost 0.7 points in
#: int8 on both check sets and 2.2 on the evaluation split)
BACKOFF_MARGIN_SE = 1.0
#: the backoff's check sets, as its record and stage line name them
CHECK_SET_NAMES = {"held_out": "held-out training samples", "calibration": "calibration samples"}


#: what the backoff judges a try on, as its record names it (``backoff_judge``)
JUDGES = {"int8": "its int8 TFLite (post-training quantization, as tflite-int8 ships it)",
          "float": "the pruned float model"}


def backoff_judge(recipe) -> str:
    """``"int8"`` when the recipe quantizes after training (``quantize.qat_epochs: 0``) into an
    integer format: a try is judged on the int8 TFLite of its pruned model, what ships, because
    int8 quantization of a pruned model can lose what pruning alone did not (the Keras 3
    dsconv_residual pruned 15%: -0.7 points in float, -2.2 in int8, unpruned int8 +0.2). With
    quantization-aware training (which recovers quantization's loss) or no integer format:
    ``"float"``, the pruned model itself."""
    from toolchain.export import FORMATS, MCU

    q = recipe["quantize"]
    integer = any(f == MCU or FORMATS.get(f.replace("-", ".")).calibrated for f in recipe["export"]["formats"])
    return "int8" if q["enabled"] and not q["qat_epochs"] and integer else "float"


def _judged_outputs(judge: str, model, calib_x):
    """A function ``x -> outputs`` of ``model`` as the backoff judges it: the int8 TFLite converted
    from ``model`` (calibrated on ``calib_x``, as export does) or the model itself."""
    if judge == "float":
        return lambda x: model.predict(x, batch_size=256, verbose=0)
    from toolchain.export.tflite_backend import convert, run_tflite

    data = convert(model, "int8", calib_x)
    return lambda x: run_tflite(data, x)


def backoff_check_split(dataset, n_calibration: int):
    """``(training view, held-out (x, y) or None)``: the data the backoff's tries prune and recover
    on, and the training samples held out of it for the check. With enough training samples those
    are the train split's tail, cut from the view (no try trains on them: the check measures
    generalisation, not fit; the digits dsconv_residual lost 0.2 points on its distilled-on
    calibration samples and 1.3 on the evaluation split); else nothing is held out and the view is
    the dataset."""
    import dataclasses

    n_train = len(dataset.x_train)
    n_check = min(BACKOFF_CHECK_MAX, (n_train - n_calibration) // 2)
    if n_check < BACKOFF_CHECK_MIN:
        return dataset, None
    keep = n_train - n_check
    cut = lambda a: None if a is None else a[:keep]  # noqa: E731
    view = dataclasses.replace(dataset, x_train=cut(dataset.x_train), y_train=cut(dataset.y_train),
                               x_train_int8=cut(dataset.x_train_int8),
                               provenance=f"{dataset.provenance}; the last {n_check} training samples held out "
                                          "for the sparsity backoff's check")
    return view, (dataset.x_train[keep:], dataset.y_train[keep:])


def _prune_with_backoff(run, model, dataset, recipe, distill, quiet=True):
    """Prune (and distil) at ``prune.sparsity``; when the result, as ``backoff_judge`` says (its
    int8 TFLite, or the float model), may lose more than ``prune.backoff_max_drop`` x the verify
    limit of the task's metric against the original, redo it at the next lower of
    ``prune.backoff_sparsities``; the last one tried is kept. The check sets
    (``backoff_check_split``): training samples held out of every try's recovery AND the calibration
    samples when the split has enough, else the calibration samples alone; the evaluation split
    never chooses. Each set alone is noisy at the 1-point level on small data (the digits: 423 and
    500 samples; a pruned Keras 3 dsconv_residual gained 0.2 points on the held-out ones and lost
    3.4 on the calibration ones and 2.9 on the evaluation split), so the loss is measured on both
    pooled and a try passes only when that loss plus ``BACKOFF_MARGIN_SE`` standard errors of it is
    within the limit. Only with recovery (distillation or fine-tuning) on; without a lower sparsity
    to go to nothing is held out. Returns ``(PruneResult, record)``."""
    from toolchain.export import DEFAULT_CALIBRATION_SAMPLES
    from toolchain.task import metric_change, mse_floor_for, paired_change, primary_metric

    p = recipe["prune"]
    n_cal = min(recipe["relevance"]["samples"], len(dataset.x_train))
    # without recovery (no distillation, no fine-tuning) a sparsity is an experiment, run as asked
    recovers = bool(p["distill_steps"] or p["fine_tune_epochs"])
    lower = sorted({float(b) for b in p["backoff_sparsities"] if b < p["sparsity"]}, reverse=True)
    sparsities = [p["sparsity"]] + (lower if recovers else [])
    data, held_out = dataset, None
    if len(sparsities) > 1:  # something to decide: hold samples out of recovery when there are enough
        data, held_out = backoff_check_split(dataset, n_cal)
    checks = {**({"held_out": held_out} if held_out else {}), "calibration": dataset.calibration(n_cal)}
    metric, _ = primary_metric(dataset.task)
    limit = float(p["backoff_max_drop"]) * float(recipe["verify"][GUARD_KEYS[metric]])
    original = {k: model.predict(x, batch_size=256, verbose=0) for k, (x, _) in checks.items()}
    reference = {k: _metrics(original[k], y, dataset.task) for k, (_, y) in checks.items()}
    y_all = np.concatenate([y for _, y in checks.values()])
    floor = mse_floor_for(y_all)
    where = " and ".join(f"{len(x)} {CHECK_SET_NAMES[k]}" for k, (x, _) in checks.items())
    # with a single sparsity there is nothing to decide: the record's float check is enough
    judge = backoff_judge(recipe) if len(sparsities) > 1 else "float"
    calib_x = data.calibration(min(DEFAULT_CALIBRATION_SAMPLES, len(data.x_train)))[0] if judge == "int8" else None
    tried = []
    queue = list(sparsities)
    while queue:
        s = queue.pop(0)
        # sparsity 0 prunes nothing, so there is nothing to recover
        result = run(s, p["fine_tune_epochs"], distill, data) if s else run(0.0, 0)
        judged = _judged_outputs(judge, result.model, calib_x)
        changes, float_changes, outputs = {}, {}, {}
        for k, (x, y) in checks.items():
            outputs[k] = judged(x)
            changes[k] = metric_change(dataset.task, reference[k], _metrics(outputs[k], y, dataset.task),
                                       mse_floor_for(y))
            if judge != "float":  # what pruning alone lost: the rest is quantization's
                got = _calibration_metrics(result.model, x, y, dataset.task)
                float_changes[k] = metric_change(dataset.task, reference[k], got, mse_floor_for(y)).drop
        pooled, se = paired_change(dataset.task, y_all, np.concatenate(list(original.values())),
                                   np.concatenate(list(outputs.values())), floor)
        drop = pooled + BACKOFF_MARGIN_SE * se
        distilled = (result.settings.get("distill") or {})
        tried.append({"sparsity": s, "change": drop, "pooled_change": pooled, "standard_error": se,
                      "changes": {k: c.drop for k, c in changes.items()},
                      **({"float_changes": float_changes} if float_changes else {}),
                      "distill_steps_run": distilled.get("steps_run"), "distill_seconds": distilled.get("seconds")})
        # a distillation the time budget cut far below its cap was starved; every lower sparsity
        # would be starved alike (MobileNetV1 0.25 at 96x96 keeps 16.5% of its 46.8% at 0.3 and
        # 25.5% at 0.15 before recovery), so go straight to the last backoff sparsity
        starved = (distilled.get("stop_reason") in ("time_budget", "deadline")
                   and distilled.get("steps_run", 0) < BACKOFF_STARVED_SHARE * distilled.get("steps_cap", 0))
        tried[-1]["starved"] = starved
        last = drop <= limit or not queue
        if not last and starved:
            queue = queue[-1:]
        if not quiet:
            verdict = ("kept" if drop <= limit else "kept, the last backoff sparsity") if last else (
                f"distillation starved by the time budget ({distilled.get('steps_run')} of "
                f"{distilled.get('steps_cap')} steps): going to {queue[-1]:g}" if starved else "pruning less")
            seen = "; ".join(f"{CHECK_SET_NAMES[k]} {c.describe()}" for k, c in changes.items())
            unit = (lambda v: f"{100 * v:.1f} points") if metric == "accuracy" else (lambda v: f"{v:+.1%}")  # noqa: E731
            seen += (f"; pooled loss {unit(pooled)} + {BACKOFF_MARGIN_SE:g} x standard error {unit(se)} "
                     f"= {unit(drop)}")
            print(f"prune: sparsity {s:g}, {judge}: {seen}; backoff limit {limit:.3g} ({p['backoff_max_drop']:g} x "
                  f"verify.{GUARD_KEYS[metric]}): {verdict}", file=sys.stderr)
        if last:
            break
    return result, {"metric": metric, "checked_on": where, "judged": JUDGES[judge],
                    "check_samples": {k: int(len(x)) for k, (x, _) in checks.items()},
                    "reference": {k: r[metric] for k, r in reference.items()}, "max_drop": limit, "tried": tried,
                    "chosen": tried[-1]["sparsity"], "passed": tried[-1]["change"] <= limit}


def plan_from_recipe(model, dataset, recipe, quiet: bool = True):
    """The ``BitPlan`` a (validated) recipe's quantize section gives ``model``, float layers included."""
    from toolchain.quantize import keep_float, plan_bits

    q = recipe["quantize"]
    plan = plan_bits(model, dataset, allocator=q["allocator"], candidates=q["bits"],
                     budget=None if q["allocator"] == "uniform" and len(q["bits"]) == 1 else q["budget"],
                     granularity=q["granularity"], group_size=q["group_size"], rule=recipe["relevance"]["rule"],
                     calibration_samples=recipe["relevance"]["samples"], quiet=quiet)
    return keep_float(plan, model, q["float_layers"])


def _quantize(model, dataset, recipe, m_hash, d_hash, quiet):
    """``(plan, quantize.json content, cached?, simulated graph)``. The simulated (and, with
    ``qat_epochs``, fine-tuned) graph is what export converts into the mixed artifacts; it is cached
    beside the entry as ``model_qat.h5`` (an entry without it is recomputed)."""
    import os

    from toolchain import stagecache
    from toolchain.quantize import quantize
    from toolchain.quantize.bitplan import BitPlan
    from toolchain.quantize.simulate import QAT_MODEL_FILE, SIMULATION_VERSION, load_qat_model, save_qat_model

    q = recipe["quantize"]
    settings = {k: q[k] for k in ("allocator", "bits", "budget", "granularity", "group_size", "qat_epochs",
                                  "float_layers")}
    entry = stagecache.key("quantize", m_hash, d_hash, settings, recipe["relevance"], SIMULATION_VERSION)
    hit = stagecache.get(entry)
    graph = stagecache.root() / entry / QAT_MODEL_FILE
    if hit is not None and graph.is_file():
        return BitPlan.from_dict(hit[1]["plan"]), hit[1]["result"], True, load_qat_model(graph)
    plan = plan_from_recipe(model, dataset, recipe, quiet)
    quantized = quantize(model, plan, dataset, qat_epochs=q["qat_epochs"],
                         calibration_samples=recipe["relevance"]["samples"], quiet=quiet)
    result = quantized.to_dict()
    result.pop("history", None)
    stagecache.put(entry, {"plan": plan.to_dict(), "result": result})
    partial = graph.with_name(f".{QAT_MODEL_FILE}.{os.getpid()}.h5")
    save_qat_model(quantized.model, partial)
    os.replace(partial, graph)
    return plan, result, False, quantized.model


def _verify_overrides(recipe) -> dict:
    """Export's thresholds (each artifact vs the Keras model it was made from) from the recipe's
    verify section: the flat keys for int8/mixed, ``verify.<kind>.<field>`` for any other."""
    from toolchain.verify import thresholds_from_recipe

    return thresholds_from_recipe(recipe["verify"])


def run_compress(model_path: str, data_spec: str, out: str, recipe_path: Union[None, str, dict] = None,
                 target: Optional[str] = None, trust_model: bool = False, data_dir: Optional[str] = None,
                 quiet: bool = False, task: Optional[str] = None, reference: Optional[str] = None) -> CompressResult:
    """The whole pipeline. ``task`` (classification | regression | autoencoder) overrides the recipe's
    ``task`` key, whose ``auto`` infers it from the model and data (``toolchain.task``). ``target``
    overrides the recipe's ``bench.target`` and chooses the defaults the recipe is merged over
    (``toolchain.recipe.TARGET_DEFAULTS``: a microcontroller target gets int8 weights fine-tuned with
    QAT and a firmware made from that graph). ``reference`` (or ``bench.reference``): an integer .tflite, e.g. the
    official int8 model, built and run as firmware beside ours on a microcontroller target."""
    from toolchain.export import export, parse_formats
    from toolchain.export.convert_worker import converter_session
    from toolchain.model_io import file_sha256, model_hash
    from toolchain.pipeline import load_inputs
    from toolchain.outdir import check_output_dir, staged_output
    from toolchain.recipe import load_recipe, target_kind, validate
    from toolchain.relevance import compute_relevance, save_relevance
    from toolchain.relevance.plots import plot_layer_distributions

    # -- everything that can be checked is checked before any work ---------------------------
    # a dict is a recipe given in Python (toolchain.api), validated exactly like a YAML file
    recipe = (validate(recipe_path, "recipe (dict)", target) if isinstance(recipe_path, dict)
              else load_recipe(recipe_path, target))
    if reference is not None:
        recipe["bench"]["reference"] = str(reference)
    parse_formats(recipe["export"]["formats"])
    # the output must never be (or hold) what this run reads, also when called from Python
    data_file = data_spec.split(":", 1)[1].split("?", 1)[0] if ":" in data_spec else None
    out_dir = check_output_dir(out, inputs=[model_path, data_file,
                                            recipe_path if isinstance(recipe_path, (str, Path)) else None])
    progress = _Progress(quiet)
    input_hash = file_sha256(model_path) if Path(model_path).exists() else None
    task = task or (None if recipe["task"] == "auto" else recipe["task"])
    model, dataset = load_inputs(model_path, data_spec, trust_model=trust_model, data_dir=data_dir, task=task)
    if dataset.x_eval is None:
        raise ConfigError(f"dataset {data_spec!r} has no evaluation split; compress needs one to verify "
                          "artifacts (npz: add x_eval and y_eval)")
    if recipe["quantize"]["enabled"] and recipe["quantize"]["float_layers"]:
        from toolchain.quantize.bitplan import resolve_float_layers
        from toolchain.quantize.kernels import KERNEL_ATTRS

        # filter pruning keeps layer names, so the original model's kernels are the ones to name
        resolve_float_layers(recipe["quantize"]["float_layers"],
                             [l.name for l in model.layers if type(l).__name__ in KERNEL_ATTRS])
    if recipe["bench"]["enabled"]:
        from deploy.targets import resolve_target

        bench_target = resolve_target(recipe["bench"]["target"], kernels=recipe["bench"]["kernels"])
        if target_kind(recipe["bench"]["target"]) == "mcu":
            bench_target.check()  # a missing compiler, QEMU or kit is named (with its Debian package) now
            _check_reference(recipe["bench"]["reference"])
    qat_note = _qat_for_task(recipe, dataset)
    m_hash, d_hash = model_hash(model), dataset.content_hash()
    from toolchain.task import primary_metric

    summary: dict = {"model": str(Path(model_path).resolve()), "model_name": Path(model_path).name,
                     "data": data_spec, "data_provenance": dataset.provenance, "task": dataset.task,
                     "metric": primary_metric(dataset.task, dataset.anomaly_eval is not None)[0], "recipe": recipe,
                     "versions": library_versions(), "cached_stages": [],
                     "target_defaults": _target_defaults_text(recipe["bench"]["target"])}
    if qat_note:
        summary["target_defaults"]["text"] += f"; {qat_note}"

    # one converter child process serves the baseline's and the compressed model's exports
    with staged_output(out_dir) as stage, converter_session():
        # 1. relevance of the original model on the calibration samples
        rel = recipe["relevance"]
        x_cal, y_cal = dataset.calibration(min(rel["samples"], len(dataset.x_train)))
        progress.stage("relevance", f"{rel['rule']} on {len(x_cal)} calibration samples")
        rmap = compute_relevance(model, x_cal, y_cal, rule=rel["rule"], class_selection=rel["classes"],
                                 quiet=quiet, task=dataset.task)
        if rmap.cached:
            summary["cached_stages"].append("relevance")
        save_relevance(rmap, stage / "relevance")
        plot_layer_distributions(rmap, stage / "relevance_layers.png")
        summary["relevance"] = rmap.metadata()

        # 2. pruning
        compressed = model
        if recipe["prune"]["enabled"]:
            p = recipe["prune"]
            how = {"nonpositive": "nonpositive (the paper's rule)", "sparsity": f"sparsity {p['sparsity']}",
                   "auto": f"auto (largest of {p['auto_sparsities']} within {p['auto_max_drop']:.0%} on calibration)"}
            progress.stage("prune", f"{p['criterion']} / {p['granularity']} / {how[p['mode']]}")
            compressed, prune_summary, cached = _prune(model, dataset, recipe, rmap, m_hash, d_hash, quiet)
            if cached:
                summary["cached_stages"].append("prune")
            summary["prune"] = {**prune_summary, "channels": _channels(model, compressed)}
            from toolchain.model_io import save_model

            save_model(compressed, stage / "model_pruned.keras")
            if prune_summary.get("layer_sparsity"):
                _plot_sparsity(summary["prune"], stage / "prune_sparsity.png")

        # 3. mixed-precision bit plan, simulated
        plan = qat_model = None
        if recipe["quantize"]["enabled"]:
            q = recipe["quantize"]
            progress.stage("quantize", f"{q['allocator']} allocator, bits {q['bits']}, budget {q['budget']}")
            c_hash = model_hash(compressed)
            plan, quant_summary, cached, qat_model = _quantize(compressed, dataset, recipe, c_hash, d_hash, quiet)
            if cached:
                summary["cached_stages"].append("quantize")
            plan.save(stage / "bitplan.json")
            summary["quantize"] = {**quant_summary, "plan": plan.to_dict(), "allocator": plan.allocator,
                                   "budget": plan.budget, "budget_text": _budget_text(q)}
            _plot_bits(plan, stage / "bit_widths.png", _budget_text(q))

        # 4./5. export + verify (in their runtimes), then benchmark
        formats = [f for f in parse_formats(recipe["export"]["formats"]) if plan is not None or "mixed" not in f]
        progress.stage("export", ", ".join(formats))
        # the mixed artifacts are converted from the graph quantize simulated (and fine-tuned)
        bundle = export(compressed, dataset, formats, stage / "artifacts", bitplan=plan,
                        thresholds=_verify_overrides(recipe), mcu_source=recipe["export"]["mcu_source"],
                        qat_model=qat_model, quiet=quiet)
        # reference points: the original as float32 and as the standard flow's uniform int8
        # The baselines are reference points, not shipped artifacts: their numbers are reported as
        # measured, and a plain int8 that strays from the original must not fail the run
        from toolchain.verify import Thresholds

        baseline = export(model, dataset, ["tflite-fp32", "tflite-int8"], stage / "baseline", quiet=quiet,
                          thresholds={"int8": Thresholds(min_agreement=0.0)})
        summary["verify"] = bundle.verify.to_dict()
        packed = summary["quantize"]["packed_weight_bytes"] if plan is not None else None
        # the original's outputs on the evaluation split, once: every row and the guard compare with them
        original_out = model.predict(dataset.x_eval, batch_size=256, verbose=0)
        rows = _artifact_rows(bundle, baseline, original_out, dataset, packed)
        if plan is not None:  # simulated and artifact accuracy side by side (same evaluation split)
            summary["quantize"]["artifact_accuracy"] = {r["format"]: r.get("accuracy") for r in rows
                                                        if r["origin"] == "compressed" and "mixed" in r["format"]}
        # the guard: every compressed artifact against the USER'S ORIGINAL model, not the pruned
        # one export verified against; breaking a limit fails the run before anything is written
        summary["original"] = _compare_with_original(rows, bundle, original_out, dataset, recipe["verify"])
        if recipe["bench"]["enabled"]:
            b = recipe["bench"]
            if target_kind(b["target"]) == "mcu":
                n = min(b["samples"] or len(dataset.x_eval), len(dataset.x_eval))
                progress.stage("bench", f"firmware on {b['target']} ({b['kernels']} kernels), {n} evaluation samples")
                summary["firmware"] = _firmware_rows(rows, bundle, original_out, dataset, b, n)
            else:
                progress.stage("bench", f"target {b['target']}, {b['runs']} runs, threads {b['threads']}")
                _bench_rows(rows, data_spec, data_dir, b, stage / "bench", quiet)
        _gains(rows)
        summary["measured_on"] = _measured_on(rows, recipe["bench"])
        for row in rows:  # paths in summary.json are relative to the build directory
            if "path" in row:
                row["path"] = str(Path(row["path"]).resolve().relative_to(stage.resolve()))
        summary["artifacts"] = rows
        if bundle.mcu is not None:
            summary["mcu"] = dict(bundle.mcu.manifest)

        # 6. explanation fidelity on the evaluation split
        progress.stage("fidelity", f"LRP heatmaps of original vs compressed on {FIDELITY_SAMPLES} eval samples")
        summary["fidelity"] = _fidelity(model, compressed, plan, dataset, rel["rule"], stage, quiet)

        # 7. report
        progress.stage("report", "report.html, report.md")
        plot_tradeoff(rows, summary.get("original"), stage / "tradeoff.png")
        summary["headline"] = _headline(rows, summary["original"]["metric"]) + _firmware_headline(summary.get("firmware"))
        summary["headline_format"] = (_headline_row(rows) or {}).get("format")
        summary["input_model_sha256"] = input_hash
        (stage / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        from toolchain.report import write_report

        write_report(summary, stage)
    progress.done()
    if input_hash is not None and file_sha256(model_path) != input_hash:  # pragma: no cover - a guard
        raise ConfigError(f"the input model {model_path} changed during the run; it must be read-only to us")
    return CompressResult(out_dir, summary)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _artifact_rows(bundle, baseline, original_out, dataset, packed: Optional[int]) -> List[dict]:
    """One row per artifact: the task's metrics on the evaluation split (classifiers: accuracy and
    top-1 agreement with the ORIGINAL model; regressors/autoencoders: MSE, MAE, and ROC AUC with
    anomaly labels), sizes three ways (``packed``: the bit plan's packed weight bytes, shown on the
    mixed-precision rows)."""
    from toolchain.quantize.size import artifact_sizes
    from toolchain.task import evaluate, top1_agreement

    x, y, task = dataset.x_eval, dataset.y_eval, dataset.task
    rows = []
    for origin, b in (("baseline", baseline), ("compressed", bundle)):
        for fmt, art in b.artifacts.items():
            out = np.asarray(_predict_artifact(art, x))
            metrics = evaluate(task, y, out, dataset.anomaly_eval)
            metrics.pop("reconstruction_error", None)
            metrics.pop("samples", None)
            gzip_bytes = artifact_sizes([art.path])[str(art.path)]["gzip_bytes"]
            rows.append({
                "name": f"{origin}/{Path(art.path).name}", "format": fmt, "origin": origin,
                "path": str(art.path), **metrics,
                "agreement": top1_agreement(out, original_out) if task == "classification" else None,
                "size_bytes": int(art.size_bytes), "gzip_bytes": gzip_bytes,
                "packed_weight_bytes": packed if (origin == "compressed" and "mixed" in fmt) else None,
            })
    if bundle.mcu is not None:
        rows.append({"name": "compressed/mcu", "format": "mcu", "origin": "compressed",
                     "size_bytes": int(bundle.mcu.flash_bytes), "arena_bytes": int(bundle.mcu.arena_bytes)})
    return rows


#: the recipe key that limits each primary metric's loss against the original
GUARD_KEYS = {"accuracy": "max_accuracy_drop", "mse": "max_mse_increase", "auc": "max_auc_drop"}


def _compare_with_original(rows: List[dict], bundle, original_out, dataset, limits: dict) -> dict:
    """Annotate every artifact row with its change against the user's original Keras model in the
    task's primary metric, and raise ``VerificationError`` (naming each offender, by how much, and
    the recipe key) when a compressed artifact loses more than the recipe allows
    (``verify.max_accuracy_drop`` points of accuracy, ``verify.max_mse_increase`` relative MSE,
    ``verify.max_auc_drop`` of ROC AUC).

    The MCU row is the bundle's model run in tflite-micro on the first ``samples`` evaluation
    samples, so it is compared with the original on those same samples (classifiers only: the
    tflite-micro check reports accuracy)."""
    from toolchain.errors import VerificationError
    from toolchain.task import evaluate, metric_change, mse_floor_for, primary_metric

    y, task = dataset.y_eval, dataset.task
    reference = evaluate(task, y, original_out, dataset.anomaly_eval)
    reference.pop("reconstruction_error", None)
    metric, higher_better = primary_metric(task, "auc" in reference)
    reference["metric"] = metric
    floor = mse_floor_for(y) if task != "classification" else 0.0
    micro = (bundle.mcu.manifest.get("tflite_micro") if bundle.mcu is not None else None) or {}
    key = GUARD_KEYS[metric]
    limit = float(limits[key])
    offenders = []
    for row in rows:
        base = reference
        if row["format"] == "mcu":
            if task != "classification" or micro.get("micro_accuracy") is None:
                continue
            n = int(micro["samples"])
            row.update({"accuracy": float(micro["micro_accuracy"]), "accuracy_samples": n,
                        "accuracy_runtime": "tflite-micro"})
            base = evaluate(task, y[:n], original_out[:n])
        if row.get(metric) is None:
            continue
        change = metric_change(task, base, row, floor)
        row[f"original_{metric}"] = change.original
        row["change_vs_original"] = change.drop  # larger = worse: points lost, or relative increase
        if metric == "accuracy":
            row["accuracy_change"] = row["accuracy"] - change.original
        if row["origin"] == "compressed" and change.drop > limit + 1e-12:
            offenders.append(f"{row['name']} {change.describe()}")
    if offenders:
        allowed = f"{limit:.0%} more error" if metric == "mse" else f"{limit * 100:.1f} points"
        raise VerificationError(
            f"{len(offenders)} artifact(s) lose more {metric} against the original model than "
            f"verify.{key} allows ({allowed}) on {len(y)} evaluation samples: {'; '.join(offenders)}; "
            f"compress less (prune.sparsity, quantize.bits) or recover more (prune.distill_steps, "
            f"prune.fine_tune_epochs), or raise verify.{key} in the recipe to accept the loss")
    return reference


#: what each artifact is, in words (``origin``, ``format``) -> label
_LABELS = {("baseline", "tflite-fp32"): "original, float32 TFLite",
           ("baseline", "tflite-int8"): "original, uniform int8 TFLite (the standard flow)",
           ("compressed", "tflite-fp32"): "compressed, float32 TFLite (pruned, not quantized)",
           ("compressed", "tflite-int8"): "compressed, int8 TFLite",
           ("compressed", "tflite-mixed"): "compressed, mixed-precision TFLite (the bit plan)",
           ("compressed", "onnx-fp32"): "compressed, float32 ONNX (pruned, not quantized)",
           ("compressed", "onnx-int8"): "compressed, int8 ONNX",
           ("compressed", "onnx-mixed"): "compressed, mixed-precision ONNX",
           ("compressed", "mcu"): "compressed, microcontroller bundle (tflite-micro)"}


def _gains(rows: List[dict]) -> None:
    """``label``, ``x_smaller`` and ``x_faster`` against the original float32 TFLite, and a flag on
    artifacts slower than it (ONNX int8 on some CPUs, INT4 kernels on XNNPACK)."""
    base = next((r for r in rows if r["origin"] == "baseline" and r["format"] == "tflite-fp32"), None)
    for row in rows:
        row["label"] = _LABELS.get((row["origin"], row["format"]), f"{row['origin']}, {row['format']}")
        if base is None:
            continue
        row["x_smaller"] = base["size_bytes"] / row["size_bytes"] if row.get("size_bytes") else None
        if row.get("p50_ms") and base.get("p50_ms"):
            row["x_faster"] = base["p50_ms"] / row["p50_ms"]
            row["slower_than_float"] = row["x_faster"] < 1.0


def _measured_on(rows: List[dict], bench_recipe: dict) -> dict:
    """Where and how the latencies were measured, in words the report prints next to them."""
    from toolchain.recipe import target_kind

    timed = [r for r in rows if r.get("p50_ms")]
    if bench_recipe["enabled"] and target_kind(bench_recipe["target"]) == "mcu":
        return {"target": bench_recipe["target"], "emulated": True,
                "text": f"latency not measured on this host: {bench_recipe['target']} firmware reports "
                        "EMULATED INSTRUCTION COUNTS (see the firmware section), not time"}
    if not timed:
        return {"text": "latency not measured (bench.enabled: false)"}
    emulated = any(r.get("emulated") for r in timed)
    target = bench_recipe["target"]
    cpu = cpu_name() if target == "local" else None
    where = ("QEMU-emulated " + target + " (emulated timings, not board timings)" if emulated
             else f"this host ({cpu}, {platform.machine()})" if target == "local" else target)
    configs = sorted({f"{'ONNX Runtime' if r['format'].startswith('onnx') else 'TFLite'} {r['bench_config']}"
                      for r in timed if r.get("bench_config")})
    return {"target": target, "emulated": emulated, "cpu": cpu, "configs": configs,
            "text": f"latency: {where}; single-sample inference, p50/p99 of {bench_recipe['runs']} runs; "
                    f"{'; '.join(configs)}"}


def cpu_name() -> str:
    """This host's CPU model, as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _channels(original, compressed) -> Dict[str, dict]:
    """Output channels kept of each kernel layer (filter pruning keeps layer names)."""
    from toolchain.quantize.kernels import KERNEL_ATTRS

    def width(layer):
        return int(getattr(layer, KERNEL_ATTRS[type(layer).__name__]).shape[-1] *
                   (getattr(layer, KERNEL_ATTRS[type(layer).__name__]).shape[-2]
                    if type(layer).__name__ == "DepthwiseConv2D" else 1))

    kept = {l.name: width(l) for l in compressed.layers if type(l).__name__ in KERNEL_ATTRS}
    return {l.name: {"kept": kept[l.name], "total": width(l)} for l in original.layers
            if type(l).__name__ in KERNEL_ATTRS and l.name in kept}


def plot_tradeoff(rows: List[dict], original: Optional[dict], path: Path) -> None:
    """Size (x, log) against the task's metric (y), marker area by p50 latency: every artifact and
    the reference points (original float32, the standard flow's uniform int8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = (original or {}).get("metric", "accuracy")
    points = [r for r in rows if r.get(metric) is not None and r.get("size_bytes")]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lat = [r["p50_ms"] for r in points if r.get("p50_ms")]
    scale = 600 / max(lat) if lat else 0
    for r in points:
        ref = r["origin"] == "baseline"
        size = 40 + scale * r["p50_ms"] if r.get("p50_ms") else 40
        value = r[metric] * (100 if metric == "accuracy" else 1)  # MSE: lower is better
        ax.scatter(r["size_bytes"] / 1024, value, s=size, alpha=0.75, marker="s" if ref else "o",
                   color="tab:gray" if ref else "tab:green", edgecolor="black", linewidth=0.5)
        ax.annotate(r["label"].replace("compressed, ", "").replace("original, ", "original "),
                    (r["size_bytes"] / 1024, value), fontsize=7, xytext=(6, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (KiB, log scale)")
    ax.set_ylabel(f"{metric} on the evaluation split" + {"accuracy": " (%)", "mse": " (lower is better)",
                                                                "auc": " (anomaly ROC AUC)"}.get(metric, ""))
    ax.set_title("Size vs " + metric + " (grey squares: the original and the standard flow; "
                 "marker area: p50 latency)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bench_rows(rows, data_spec, data_dir, b, bench_dir: Path, quiet) -> None:
    from deploy.bench import bench

    for row in rows:
        if row["format"] == "mcu" or "path" not in row:
            continue
        out = bench_dir / row["name"].replace("/", "_")
        result = bench(row["path"], target=b["target"], data=data_spec, data_dir=data_dir, runs=b["runs"],
                       threads=tuple(b["threads"]), out=out, quiet=quiet)
        first = result.measurements[0]
        row.update({"p50_ms": first.p50_ms, "p99_ms": first.p99_ms, "peak_rss_mb": first.peak_rss_mib,
                    "bench_config": first.config.label(), "emulated": result.emulated})


def _qat_for_task(recipe: dict, dataset) -> Optional[str]:
    """QAT fine-tunes with the classification loss (``quantize.simulate.fine_tune``). A microcontroller
    default's QAT epochs apply to classifiers only (other tasks: none, said in the summary); QAT epochs
    the recipe sets for another task are refused with the fix."""
    from toolchain.recipe import TARGET_DEFAULTS, target_kind

    q = recipe["quantize"]
    if not (q["enabled"] and q["qat_epochs"]) or dataset.is_classification:
        return None
    default = TARGET_DEFAULTS[target_kind(recipe["bench"]["target"])].get("quantize", {}).get("qat_epochs")
    if q["qat_epochs"] != default:
        raise ConfigError(f"quantize.qat_epochs: {q['qat_epochs']} fine-tunes with the classification loss and "
                          f"this is a {dataset.task} task; set quantize.qat_epochs: 0")
    q["qat_epochs"] = 0
    return f"quantize.qat_epochs: 0 for this {dataset.task} task (QAT fine-tunes with the classification loss)"


def _target_defaults_text(target: str) -> dict:
    """Which per-target defaults the recipe was merged over, in words the summary prints."""
    from toolchain.recipe import TARGET_DEFAULTS, target_kind

    kind = target_kind(target)
    overrides = TARGET_DEFAULTS[kind]
    keys = ", ".join(f"{stage}.{k}: {v}" for stage, settings in overrides.items() for k, v in settings.items())
    text = (f"defaults for a microcontroller target ({target}), before your recipe's keys: {keys}" if overrides
            else f"defaults for a CPU target ({target}): the speed-oriented default recipe")
    return {"kind": kind, "target": target, "overrides": overrides, "text": text}


def _check_reference(path: Optional[str]) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.is_file() or p.suffix.lower() != ".tflite":
        from toolchain.errors import ModelLoadError

        raise ModelLoadError(f"the firmware reference {path} is not an existing .tflite file; pass an integer "
                             "TFLite model (e.g. the official int8 model) to --reference or bench.reference")


#: (origin, format) of the artifacts built into firmware, in the firmware table's order
FIRMWARE_CANDIDATES = (("compressed", "tflite-mixed"), ("compressed", "tflite-int8"))


def _firmware_rows(rows: List[dict], bundle, original_out, dataset, b: dict, n: int) -> dict:
    """Each integer TFLite artifact (and the reference, when given) as firmware on the emulated
    Cortex-M, on the first ``n`` evaluation samples: model and whole-firmware flash, RAM (static +
    arena + measured stack), EMULATED INSTRUCTION COUNT per inference, accuracy and agreement with
    TFLite's reference kernels on the same samples; the float model's host accuracy on those samples
    beside them. Non-integer artifacts are listed as not firmware candidates, with the reason."""
    from deploy.targets import resolve_target
    from toolchain.errors import ConversionError
    from toolchain.export.flatbuffer import read_flatbuffer
    from toolchain.export.mcu import check_integer_model
    from toolchain.task import evaluate

    target = resolve_target(b["target"], kernels=b["kernels"])
    x, y = dataset.x_eval[:n], dataset.y_eval[:n]
    labels = y if dataset.is_classification else None
    float_row = next((r for r in rows if r["origin"] == "baseline" and r["format"] == "tflite-fp32"), None)
    original = evaluate(dataset.task, y, original_out[:n])
    entries, skipped = [], []
    mcu_source = bundle.mcu.manifest.get("source", {}).get("format") if bundle.mcu is not None else None
    for origin, fmt in FIRMWARE_CANDIDATES:
        row = next((r for r in rows if r["origin"] == origin and r["format"] == fmt), None)
        if row is None:
            continue
        try:
            check_integer_model(read_flatbuffer(Path(row["path"]).read_bytes()), f"{Path(row['path']).name} ({fmt})")
        except ConversionError as e:
            skipped.append({"name": row["name"], "format": fmt, "reason": str(e)})
            continue
        measured = {k: v for k, v in target.measure(row["path"], x, labels).items() if k != "scores"}
        entries.append({"name": row["name"], "format": fmt, "label": _LABELS.get((origin, fmt), fmt),
                        "mcu_bundle": fmt == mcu_source, **measured})
        row["firmware"] = {k: measured[k] for k in ("emulated_instructions_per_inference", "firmware_flash_bytes",
                                                    "model_flash_bytes", "ram_bytes", "accuracy")}
    for r in rows:
        if r["format"] in ("tflite-fp32", "onnx-fp32", "onnx-int8", "onnx-mixed") and r["origin"] == "compressed":
            skipped.append({"name": r["name"], "format": r["format"],
                            "reason": "not a firmware candidate: " + ("float32 weights and activations (the "
                                      "microcontroller runs integer models)" if "fp32" in r["format"]
                                      else "ONNX does not run on TFLite Micro")})
    if b["reference"]:
        measured = {k: v for k, v in target.measure(b["reference"], x, labels).items() if k != "scores"}
        entries.append({"name": f"reference/{Path(b['reference']).name}", "format": "reference",
                        "label": f"reference: {Path(b['reference']).name} (given with --reference)",
                        "mcu_bundle": False, **measured})
    from toolchain.firmware import COUNT_LABEL

    return {"target": b["target"], "kernels": b["kernels"], "samples": int(n), "count_kind": COUNT_LABEL,
            "entries": entries, "not_firmware": skipped,
            "float_model": {"name": float_row["name"] if float_row else "original (Keras)",
                            "size_bytes": float_row["size_bytes"] if float_row else None,
                            "accuracy_same_samples": original.get("accuracy"),
                            "note": "the original float32 model on this host (not a firmware candidate)"}}


def _fidelity(model, compressed, plan, dataset, rule, stage: Path, quiet) -> dict:
    from toolchain.fidelity import dequantized_copy, explanation_fidelity, plot_fidelity

    n = min(FIDELITY_SAMPLES, len(dataset.x_eval))
    x, y = dataset.x_eval[:n], dataset.y_eval[:n]
    analysed = dequantized_copy(compressed, plan) if plan is not None else compressed
    result = explanation_fidelity(model, analysed, x, y, rule=rule, quiet=quiet, task=dataset.task)
    plot_fidelity(result, x, stage / "fidelity_heatmaps.png", class_names=list(dataset.class_names) or None,
                  y=y if dataset.is_classification else None)
    return result.summary()


def _headline_row(rows: List[dict]) -> Optional[dict]:
    """The artifact the summary leads with: the mixed-precision TFLite when exported, else the first
    other compressed TFLite."""
    best = [r for r in rows if r["origin"] == "compressed" and r["format"].startswith("tflite")
            and r["format"] != "tflite-fp32"]
    return next((r for r in best if r["format"] == "tflite-mixed"), best[0] if best else None)


def _headline(rows: List[dict], metric: str = "accuracy") -> str:
    base = next((r for r in rows if r["origin"] == "baseline" and r["format"] == "tflite-fp32"), None)
    pick = _headline_row(rows)
    if base is None or pick is None:
        return ""
    text = f"{pick['format']}: {pick['size_bytes']:,} bytes, {base['size_bytes'] / pick['size_bytes']:.1f}x smaller " \
           "than the original float32 TFLite; "
    if metric == "accuracy":
        text += (f"accuracy {pick['accuracy']:.2%} (original {base['accuracy']:.2%}, "
                 f"{(pick['accuracy'] - base['accuracy']) * 100:+.1f} points), agreement with the original "
                 f"{pick['agreement']:.2%}")
    elif metric == "mse":
        text += (f"MSE {pick['mse']:.4g} (original {base['mse']:.4g}, "
                 f"{(pick['mse'] / max(base['mse'], 1e-30) - 1) * 100:+.1f}%), MAE {pick['mae']:.4g}")
    else:
        text += (f"anomaly ROC AUC {pick['auc']:.4f} (original {base['auc']:.4f}, {pick['auc'] - base['auc']:+.4f}), "
                 f"MSE {pick['mse']:.4g} (original {base['mse']:.4g})")
    if pick.get("p50_ms") and base.get("p50_ms"):
        text += f"; p50 {pick['p50_ms']:.3f} ms, {base['p50_ms'] / pick['p50_ms']:.1f}x faster than float32"
    return text


def _firmware_headline(fw: Optional[dict]) -> str:
    """The MCU bundle's firmware numbers for the headline (empty without a firmware run)."""
    ours = next((e for e in (fw or {}).get("entries", []) if e["mcu_bundle"]), None)
    if ours is None:
        return ""
    acc = f", accuracy {ours['accuracy']:.2%} on {fw['samples']} samples" if ours.get("accuracy") is not None else ""
    return (f"; firmware ({ours['format']}) on {fw['target']}: {ours['emulated_instructions_per_inference']:,} "
            f"EMULATED instructions/inference, model {ours['model_flash_bytes']:,} B in flash of "
            f"{ours['firmware_flash_bytes']:,} B, RAM {ours['ram_bytes']:,} B{acc}")


def _budget_text(q: dict) -> str:
    """The quantize section's budget in words (a single-width uniform plan has none)."""
    if q["allocator"] == "uniform" and len(q["bits"]) == 1:
        return f"uniform {q['bits'][0]}-bit weights"
    return f"budget {q['budget']}, candidate widths {q['bits']}"


def _plot_sparsity(prune_summary: dict, path: Path) -> None:
    """Filter pruning: channels kept of each layer's original output channels. Weight pruning:
    the share of each kernel's weights set to zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(prune_summary["layer_sparsity"])
    channels = prune_summary.get("channels") or {}
    filters = prune_summary["granularity"] == "filter" and all(n in channels for n in names)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(names) + 1)))
    if filters:
        total = [channels[n]["total"] for n in names]
        kept = [channels[n]["kept"] for n in names]
        ax.barh(names, total, color="#dddddd", label="original output channels")
        ax.barh(names, kept, color="tab:purple", label="kept")
        for i, (k, t) in enumerate(zip(kept, total)):
            ax.text(t, i, f" {k} of {t}", va="center", fontsize=7)
        ax.set_xlabel("output channels (filters) per layer")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.barh(names, [prune_summary["layer_sparsity"][n] for n in names], color="tab:purple")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the layer's weights set to zero")
    ax.invert_yaxis()
    ax.set_title(f"{prune_summary['criterion']} / {prune_summary['granularity']}: parameters "
                 f"{prune_summary['params_before']:,} → {prune_summary['params_after']:,}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: colour of each weight width in the bit-plan plot (32 = kept in float)
BIT_COLOURS = {2: "#d73027", 3: "#f46d43", 4: "#fdae61", 5: "#fee08b", 6: "#d9ef8b", 7: "#a6d96a",
               8: "#1a9850", 16: "#4575b4", 32: "#888888"}


def _plot_bits(plan, path: Path, budget_text: str = "") -> None:
    """One bar per kernel layer at its average weight width; per-group widths (group granularity)
    as ticks on the bar; colours by width with a legend (grey: kept in float)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(plan.layers)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(names) + 1.2)))
    used = set()
    for i, name in enumerate(names):
        lb = plan.layers[name]
        widths = list(lb.group_bits) if lb.group_bits else [lb.weight_bits]
        avg = float(np.mean(widths))
        main = max(set(widths), key=widths.count)
        used.update(widths)
        ax.barh(i, min(avg, 8.6) if main == 32 else avg, color=BIT_COLOURS.get(main, "black"), edgecolor="white")
        label = "float32" if main == 32 else (f"{avg:.2g} (groups: {min(widths)}-{max(widths)})"
                                             if len(set(widths)) > 1 else f"{main}")
        ax.text(0.1, i, label, va="center", fontsize=7)
        if len(set(widths)) > 1:
            for w in widths:
                ax.plot([w, w], [i - 0.35, i + 0.35], color=BIT_COLOURS.get(w, "black"), linewidth=1.5)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 9)
    ax.set_xlabel("weight bits per weight (bar: layer average; ticks: each channel group's width)")
    ax.legend(handles=[Patch(color=BIT_COLOURS[w], label="float32" if w == 32 else f"{w}-bit")
                       for w in sorted(used) if w in BIT_COLOURS],
              fontsize=7, loc="lower right", title="width", title_fontsize=7)
    ax.set_title(f"bit plan: {plan.allocator} allocator{', ' + budget_text if budget_text else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _CallableModule(types.ModuleType):
    """``toolchain.compress(model, data, ...)`` is the notebook API (:func:`toolchain.api.compress`).
    Python binds an imported submodule to its package's attribute of the same name, so this module
    *is* ``toolchain.compress``: calling it runs the API, and ``run_compress`` stays importable."""

    def __call__(self, *args, **kwargs):
        from toolchain.api import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
