"""Per-weight LRP relevance from iNNvestigate: ``compute_relevance`` -> ``RelevanceMap``.

The model is canonicalized (BatchNorm folded, Dropout dropped, softmax stripped, layers renamed),
saved to a temporary file and analysed by ``toolchain.relevance._worker`` in a child process, the
only process where iNNvestigate switches TensorFlow to graph mode. The parent stays eager and gets
numpy arrays back. Results are cached on disk, keyed by model hash, data hash, rule, sample count
and class selection, so a second run with the same inputs does not recompute.

Regressors and autoencoders (``task`` other than classification) have no class to explain: LRP from
one output unit leaves every other output's weights without relevance (639 of the 640 outputs of
the MLPerf Tiny anomaly autoencoder). They are explained with class selection ``all_outputs``:
iNNvestigate's ``neuron_selection_mode="all"``, which starts the backward pass from the whole output
vector (the relevance of output k is its value y_k). Chosen over explaining the reconstruction error
because (1) it asks which weights carry the outputs the model produces, the same question as the
logit of a classifier, which is what pruning and bit allocation need to preserve; (2) it needs no
targets, so calibration and unlabelled data work alike; (3) the error of a well-trained model is
near zero on normal data and is not a function of the outputs alone (it involves the input a second
time), so it would need a modified model and would start LRP from almost no relevance. A caveat:
an output with a negative value starts with negative relevance, so signed sums over outputs can
cancel; the bit allocator and the ``abs`` pruning scores use magnitudes. ``RelevanceMap.task`` and
``class_selection`` record which explanation was computed, and both are part of the cache key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np

from toolchain.childproc import clean_stale_jobs, die_with_parent
from toolchain.errors import ConfigError, DataError, ToolchainError
from toolchain.relevance.rules import DEFAULT_RULE, LAYER_FAMILIES, RULES, RuleSet

__all__ = ["compute_relevance", "RelevanceMap", "LayerRelevance", "RULES", "DEFAULT_RULE",
           "CLASS_SELECTIONS", "load_relevance", "save_relevance", "cache_dir", "resolve_class_selection"]

CLASS_SELECTIONS = ("true", "predicted", "all", "all_outputs")
#: what each class selection starts LRP from, for the metadata
SELECTION_MEANING = {
    "true": "the true class's logit per sample",
    "predicted": "the predicted class's logit per sample",
    "all": "every class logit (iNNvestigate neuron_selection_mode='all')",
    "all_outputs": "the whole output vector, relevance of output k = its value "
                   "(iNNvestigate neuron_selection_mode='all'; regression/autoencoder)",
}
#: bump when the worker's output changes meaning, so stale caches are not reused
ENGINE_VERSION = "1"
WORKER_TIMEOUT_S = 3600
#: the worker checks its logits on this many samples against the parent's before analysing
LOGIT_CHECK_SAMPLES = 8


@dataclass(frozen=True)
class LayerRelevance:
    """Signed relevance of one layer's kernel, summed over the calibration samples."""

    name: str                 # the original model's layer name
    layer_class: str
    rule: str
    weight: np.ndarray        # same shape as the kernel
    relevance_out: float      # total relevance arriving at the layer's output
    relevance_in: float       # total relevance the layer passes to its input

    @property
    def per_filter(self) -> np.ndarray:
        """Relevance per output channel (for DepthwiseConv2D: per input channel x multiplier)."""
        if self.layer_class == "DepthwiseConv2D":
            return self.weight.sum(axis=(0, 1)).reshape(-1)
        return self.weight.reshape(-1, self.weight.shape[-1]).sum(axis=0)

    def summary(self) -> dict:
        w = self.weight
        n = w.size
        return {
            "class": self.layer_class, "rule": self.rule, "shape": list(w.shape),
            "sum": float(w.sum(dtype=np.float64)),
            "positive_share": float((w > 0).sum() / n), "zero_share": float((w == 0).sum() / n),
            "negative_share": float((w < 0).sum() / n),
            "relevance_out": self.relevance_out, "relevance_in": self.relevance_in,
        }


@dataclass(frozen=True)
class RelevanceMap:
    layers: Mapping[str, LayerRelevance]
    rule: str
    samples: int
    model_hash: str
    data_hash: str
    class_selection: str
    heatmaps: np.ndarray = field(repr=False)          # input relevance of the first samples
    heatmap_labels: np.ndarray = field(repr=False)    # the neuron explained for each heatmap
    input_relevance_per_sample: np.ndarray = field(repr=False)
    timings: Mapping[str, float] = field(default_factory=dict)
    cached: bool = False
    task: str = "classification"

    def __getitem__(self, layer_name: str) -> LayerRelevance:
        return self.layers[layer_name]

    def metadata(self) -> dict:
        return {
            "rule": self.rule, "rule_description": RULES.get(self.rule).description,
            "samples": self.samples, "model_hash": self.model_hash, "data_hash": self.data_hash,
            "class_selection": self.class_selection,
            "explains": SELECTION_MEANING.get(self.class_selection, self.class_selection),
            "task": self.task, "engine_version": ENGINE_VERSION,
            "timings_s": dict(self.timings),
            "layers": {name: lr.summary() for name, lr in self.layers.items()},
        }


def cache_dir() -> Path:
    from toolchain.stagecache import cache_root

    return cache_root() / "relevance"


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_relevance(rmap: RelevanceMap, out_dir: str | os.PathLike) -> None:
    """Write ``relevance.npz`` (one array per kernel, keyed by layer name) and ``relevance.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: lr.weight for name, lr in rmap.layers.items()}
    extras = {"__heatmaps__": rmap.heatmaps, "__heatmap_labels__": rmap.heatmap_labels,
              "__input_relevance_per_sample__": rmap.input_relevance_per_sample}
    _atomic_savez(out / "relevance.npz", {**arrays, **extras})
    _atomic_write_text(out / "relevance.json", json.dumps(rmap.metadata(), indent=2))


def load_relevance(path: str | os.PathLike) -> RelevanceMap:
    """Load a ``RelevanceMap`` from a directory written by ``save_relevance``."""
    d = Path(path)
    npz, meta = d / "relevance.npz", d / "relevance.json"
    if not npz.is_file() or not meta.is_file():
        raise ConfigError(f"relevance directory {d} lacks relevance.npz or relevance.json; "
                          "point --relevance at the output of `toolchain relevance`")
    try:
        md = json.loads(meta.read_text())
        arrays = np.load(npz)
        layers = {
            name: LayerRelevance(name, info["class"], info["rule"], arrays[name],
                                 info["relevance_out"], info["relevance_in"])
            for name, info in md["layers"].items()
        }
        return RelevanceMap(layers, md["rule"], md["samples"], md["model_hash"], md["data_hash"],
                            md["class_selection"], arrays["__heatmaps__"], arrays["__heatmap_labels__"],
                            arrays["__input_relevance_per_sample__"], md.get("timings_s", {}),
                            task=md.get("task", "classification"))
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"relevance directory {d} is corrupt ({e}); recompute it with `toolchain relevance`") from None


def _atomic_savez(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_class_selection(task: str, class_selection: str) -> str:
    """The class selection actually used: a regressor/autoencoder explains all its outputs
    (``all_outputs``) under the default ``true`` (its target is the whole output vector) and under
    ``all``; ``predicted`` has no meaning there and is refused."""
    from toolchain.task import TASKS

    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if class_selection not in CLASS_SELECTIONS:
        raise ConfigError(f"class selection {class_selection!r} is not one of {', '.join(CLASS_SELECTIONS)}")
    if task == "classification":
        return class_selection
    if class_selection == "predicted":
        raise ConfigError(f"class selection 'predicted' needs classes, but the model is a {task} model; "
                          "use 'all_outputs' (or the default 'true', which means all outputs here)")
    return "all_outputs"


def _neurons_to_explain(canonical_model, x: np.ndarray, y: Optional[np.ndarray], selection: str) -> np.ndarray:
    if selection in ("all", "all_outputs"):
        return np.full(len(x), -1, dtype=np.int64)
    if selection == "true":
        if y is None:
            raise DataError("class selection 'true' needs labels; pass labelled data or use --classes predicted")
        if np.asarray(y).dtype.kind == "f":
            raise DataError("class selection 'true' got float targets, not class labels; for a regression "
                            "or autoencoder model pass task='regression'/'autoencoder' (it explains all outputs)")
        return np.asarray(y, dtype=np.int64)
    return np.argmax(canonical_model.predict(x, batch_size=256, verbose=0), axis=-1).astype(np.int64)


def compute_relevance(model, x: np.ndarray, y: Optional[np.ndarray] = None, rule: str = DEFAULT_RULE,
                      class_selection: str = "true", batch_size: int = 64, heatmaps: int = 8,
                      use_cache: bool = True, quiet: bool = False, profile: bool = False,
                      task: Optional[str] = None) -> RelevanceMap:
    """Per-weight LRP relevance of every Conv2D / DepthwiseConv2D / Dense kernel of ``model``.

    ``x`` are the calibration samples (all of them are used: slice before calling), ``y`` their
    labels. ``class_selection`` picks the output neuron explained per sample: the true class
    (default), the predicted class, or all classes at once (the sum of all logits' explanations).
    For ``task`` regression/autoencoder it is ``all_outputs`` (see the module docstring and
    ``resolve_class_selection``); ``y`` is then not used. ``task=None`` reads it off ``y``: float
    targets are a regressor's (an autoencoder's when shaped like ``x``), anything else classes.
    ``profile=True`` (never cached) also times steady-state batches in the worker: LRP to the input,
    LRP plus per-weight relevance, and a plain input gradient, reported in ``timings``.
    """
    from toolchain.canonicalize import canonicalize
    from toolchain.model_io import model_hash

    ruleset: RuleSet = RULES.get(rule)
    if task is None:
        floats = y is not None and np.asarray(y).dtype.kind == "f"
        task = ("autoencoder" if np.shape(y) == np.shape(x) else "regression") if floats else "classification"
    class_selection = resolve_class_selection(task, class_selection)
    if batch_size <= 0:
        raise ConfigError(f"batch size {batch_size} must be a positive integer")
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        raise DataError("no calibration samples to compute relevance on; pass a non-empty dataset")
    if not np.all(np.isfinite(x)):
        raise DataError(f"calibration inputs contain {int((~np.isfinite(x)).sum())} NaN/Inf values; clean the data")
    expected = tuple(model.input_shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"data samples have shape {tuple(x.shape[1:])} but the model expects {expected}; "
                        "use data that matches the model's input")

    canonical = canonicalize(model, strip_softmax=True)
    neurons = _neurons_to_explain(canonical.model, x, y, class_selection)
    n_out = int(model.output_shape[-1])
    if np.any(neurons >= n_out):
        raise DataError(f"labels go up to {int(neurons.max())} but the model has {n_out} outputs; "
                        "use data whose labels match the model's classes")

    m_hash = model_hash(model)
    d_hash = _array_hash(x, neurons)
    key_parts = [ENGINE_VERSION, m_hash, d_hash, ruleset.to_dict(), class_selection, int(heatmaps)]
    if task != "classification":  # classification keys stay as before, so caches stay valid
        key_parts.append(task)
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    cached_dir = cache_dir() / key
    use_cache = use_cache and not profile
    if use_cache and (cached_dir / "relevance.json").is_file():
        try:
            return _replace_cached(load_relevance(cached_dir))
        except (ConfigError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            shutil.rmtree(cached_dir, ignore_errors=True)  # a broken (truncated) cache entry is recomputed

    _clean_stale_jobs()
    with tempfile.TemporaryDirectory(prefix=f"{_JOB_PREFIX}{os.getpid()}-") as job_dir:
        # HDF5, not .keras: under graph mode a .keras file loads with its initial (random) weights
        model_path = os.path.join(job_dir, "canonical.h5")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "HDF5 is legacy"
            canonical.model.save(model_path)
        reference_logits = canonical.model.predict(x[:LOGIT_CHECK_SAMPLES], verbose=0)
        np.savez(os.path.join(job_dir, "inputs.npz"), x=x, neurons=neurons, reference_logits=reference_logits)
        kernel_layers = canonical.kernel_layers()
        job = {
            "model_path": model_path, "batch_size": batch_size, "heatmaps": heatmaps, "quiet": quiet,
            "kernel_layers": kernel_layers, "profile": profile,
            "families": {k: list(v) for k, v in LAYER_FAMILIES.items()},
            "rules": [[family, rule.__dict__] for family, rule in ruleset.rules],
        }
        with open(os.path.join(job_dir, "job.json"), "w") as f:
            json.dump(job, f)
        t0 = time.perf_counter()
        result = _run_worker(job_dir, quiet)
        wall = time.perf_counter() - t0

        by_canonical = {l.name: l for l in canonical.model.layers}
        layers = {}
        for cname in kernel_layers:
            original = canonical.layer_map[cname]
            cls = type(by_canonical[cname]).__name__
            layers[original] = LayerRelevance(
                original, cls, ruleset.rule_for(cls).describe(), result[f"w/{cname}"].astype(np.float32),
                float(result[f"rout/{cname}"]), float(result[f"rin/{cname}"]))
        t_build, t_analyze = (float(v) for v in result["timings"])
        rmap = RelevanceMap(
            layers, rule, len(x), m_hash, d_hash, class_selection, result["heatmaps"],
            neurons[: len(result["heatmaps"])], result["input_relevance_per_sample"],
            {"worker_wall": wall, "analyzer_build": t_build, "analyze": t_analyze,
             **_profile_timings(result)}, task=task)
    if use_cache:
        staging = Path(tempfile.mkdtemp(prefix=key, dir=_ensure(cache_dir())))
        save_relevance(rmap, staging)
        shutil.rmtree(cached_dir, ignore_errors=True)
        os.replace(staging, cached_dir)
    return rmap


def _profile_timings(result) -> Dict[str, float]:
    if "profile" not in result:
        return {}
    lrp, lrp_weights, gradient, batch = (float(v) for v in result["profile"])
    return {"batch_size": batch, "lrp_input_per_batch": lrp, "lrp_per_weight_per_batch": lrp_weights,
            "gradient_per_batch": gradient}


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _replace_cached(rmap: RelevanceMap) -> RelevanceMap:
    from dataclasses import replace
    return replace(rmap, cached=True)


#: job folders (a copy of the model and the calibration data) are named by the creating pid, so a
#: run whose parent was killed leaves a folder the next run recognises and removes
_JOB_PREFIX = "toolchain-lrp-"
#: runs the worker isolated: ``-I`` keeps the working directory and PYTHON* variables off its
#: import path (a ``timeit.py`` in the cwd broke ``python -m``), the package root is added explicitly
_WORKER_BOOT = ("import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); "
                "runpy.run_module('toolchain.relevance._worker', run_name='__main__', alter_sys=True)")


def _clean_stale_jobs() -> None:
    clean_stale_jobs(_JOB_PREFIX)


def _run_worker(job_dir: str, quiet: bool) -> Mapping[str, np.ndarray]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    # the child must import this very package, wherever it was imported from
    pkg_root = str(Path(__file__).resolve().parents[2])
    log_path = os.path.join(job_dir, "worker.log")
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-I", "-c", _WORKER_BOOT, pkg_root, job_dir],
                              stdout=log, stderr=None if not quiet else log, env=env, cwd=job_dir,
                              preexec_fn=die_with_parent(os.getpid()), timeout=WORKER_TIMEOUT_S)
    err = os.path.join(job_dir, "error.txt")
    if proc.returncode != 0 or not os.path.exists(os.path.join(job_dir, "result.npz")):
        detail = Path(err).read_text().strip().splitlines()[-1] if os.path.exists(err) else \
            f"exit code {proc.returncode}"
        raise ToolchainError(f"the LRP worker (iNNvestigate) failed: {detail}; rerun with --debug for details")
    with np.load(os.path.join(job_dir, "result.npz")) as data:
        return {k: data[k] for k in data.files}
