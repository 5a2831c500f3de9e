"""Verification: every exported artifact runs in its own runtime and is compared with its Keras model.

``verify(artifacts, reference, dataset)`` loads each exported artifact in the runtime that will
execute it on the device side (TFLite's interpreter for ``tflite-*``, ONNX Runtime for ``onnx-*``,
through the device runner's backends: :mod:`toolchain.run`), runs the evaluation split, and
reports per artifact

* ``accuracy`` on the evaluation labels, next to the Keras model's,
* ``agreement``: share of samples whose top-1 class equals the Keras model's,
* ``max_abs_diff`` / ``mean_abs_diff`` of the dequantized outputs.

Element-wise limits scale with the output: the max |diff| limit is ``max(max_abs_diff,
max_rel_diff * max|reference|)`` and the mean |diff| limit ``max(max_mean_abs_diff,
max_mean_rel_diff * range(reference))``, so softmax outputs (scale <= 1) are judged exactly as
before and a model whose outputs are in tens does not fail on float rounding.

Regressors and autoencoders (``task``) have no classes: the agreement and accuracy checks are
skipped and the artifact's error against the targets is compared with the reference's
(``toolchain.task.metric_change``): the relative MSE increase against ``max_mse_increase``, or, for
an autoencoder with anomaly labels, the ROC AUC drop against ``max_auc_drop``.

Each format kind has default :class:`Thresholds` (:data:`DEFAULT_THRESHOLDS`), overridable per
kind (``"int8"``) or per format (``"tflite-int8"``). Artifacts that miss a threshold raise one
:class:`~toolchain.errors.VerificationError` naming every failing artifact and its numbers
(``raise_on_failure=False`` returns the report instead). Each failure names the recipe key that
relaxes it (``recipe_key``): ``verify.min_agreement`` / ``verify.max_accuracy_drop`` for the
compressed (int8, mixed) artifacts as before, ``verify.<kind>.<field>`` for any other threshold
(``thresholds_from_recipe`` reads a recipe's ``verify`` section).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, DataError, VerificationError


@dataclass(frozen=True)
class Thresholds:
    """What an artifact must reach against its Keras model on the evaluation split.

    ``None`` disables a check. ``max_accuracy_drop`` and ``max_auc_drop`` are absolute (0.01 = one
    point); ``max_rel_diff`` is a fraction of max|reference output|, ``max_mean_rel_diff`` of the
    reference outputs' range, ``max_mse_increase`` a relative increase of the error against the
    targets (0.10 = 10% worse than the Keras model). The first four apply to classifiers only when
    they are about classes (agreement, accuracy); the diff limits apply to every task."""

    min_agreement: float
    max_abs_diff: Optional[float] = None
    max_mean_abs_diff: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    max_rel_diff: Optional[float] = None
    max_mean_rel_diff: Optional[float] = None
    max_mse_increase: Optional[float] = None
    max_auc_drop: Optional[float] = None


#: defaults per format kind, set from measurements on digits_cnn and the MLPerf Tiny DS-CNN
#: (docs: benchmarks/results/export.md): float32 must match to rounding; float16 weights move
#: probabilities by ~1e-3; integer formats are judged on decisions and mean error.
#: The relative limits equal the absolute ones, so they only loosen a check for outputs larger
#: than 1 (a softmax's are not). The MSE/AUC limits of non-classification tasks follow the accuracy
#: drops of the same kind (not yet measured on a regressor or autoencoder).
DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = {
    "fp32": Thresholds(min_agreement=0.99, max_abs_diff=1e-4, max_rel_diff=1e-4,
                       max_mse_increase=0.01, max_auc_drop=0.005),
    "fp16": Thresholds(min_agreement=0.99, max_abs_diff=1e-2, max_mean_abs_diff=1e-3, max_rel_diff=1e-2,
                       max_mean_rel_diff=1e-3, max_mse_increase=0.02, max_auc_drop=0.01),
    "dynamic": Thresholds(min_agreement=0.97, max_mean_abs_diff=0.02, max_accuracy_drop=0.02,
                          max_mean_rel_diff=0.02, max_mse_increase=0.10, max_auc_drop=0.02),
    "int16x8": Thresholds(min_agreement=0.97, max_mean_abs_diff=0.02, max_accuracy_drop=0.02,
                          max_mean_rel_diff=0.02, max_mse_increase=0.10, max_auc_drop=0.02),
    "int8": Thresholds(min_agreement=0.90, max_mean_abs_diff=0.05, max_accuracy_drop=0.03,
                       max_mean_rel_diff=0.05, max_mse_increase=0.25, max_auc_drop=0.03),
    "mixed": Thresholds(min_agreement=0.85, max_mean_abs_diff=0.08, max_accuracy_drop=0.05,
                        max_mean_rel_diff=0.08, max_mse_increase=0.50, max_auc_drop=0.05),
}
#: threshold fields a recipe sets at the top of ``verify`` (for the compressed int8/mixed artifacts)
FLAT_RECIPE_FIELDS = ("min_agreement", "max_accuracy_drop")
FLAT_RECIPE_KINDS = ("int8", "mixed")

#: format -> threshold kind
FORMAT_KINDS: Mapping[str, str] = {
    "tflite-fp32": "fp32", "onnx-fp32": "fp32",
    "tflite-fp16": "fp16",
    "tflite-dynamic": "dynamic",
    "tflite-int8": "int8", "tflite-sparse": "int8", "onnx-int8": "int8",
    "tflite-int16x8": "int16x8",
    "tflite-mixed": "mixed", "onnx-mixed": "mixed",
}


@dataclass(frozen=True)
class ArtifactCheck:
    """The numbers of one artifact against its Keras model."""

    format: str
    path: str
    samples: int
    accuracy: float
    reference_accuracy: float
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    thresholds: Thresholds
    failures: Tuple[str, ...] = ()
    task: str = "classification"
    #: non-classification: the artifact's and the Keras model's metrics against the targets
    metrics: Mapping[str, float] = field(default_factory=dict)
    reference_metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.task != "classification":
            shown = ", ".join(f"{k} {v:.4g} (Keras {self.reference_metrics[k]:.4g})" for k, v in self.metrics.items())
            return (f"{self.format}: {shown}, max |diff| {self.max_abs_diff:.3g}, "
                    f"mean |diff| {self.mean_abs_diff:.3g}")
        return (f"{self.format}: accuracy {self.accuracy:.4f} (Keras {self.reference_accuracy:.4f}), "
                f"agreement {self.agreement:.4f}, max |diff| {self.max_abs_diff:.3g}, "
                f"mean |diff| {self.mean_abs_diff:.3g}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        d["failures"] = list(self.failures)
        return d


@dataclass(frozen=True)
class VerifyReport:
    checks: Tuple[ArtifactCheck, ...]
    samples: int
    reference_accuracy: float
    split: str = "eval"
    task: str = "classification"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> Tuple[ArtifactCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def __getitem__(self, fmt: str) -> ArtifactCheck:
        for c in self.checks:
            if c.format == fmt:
                return c
        raise KeyError(fmt)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "split": self.split, "samples": self.samples, "task": self.task,
                "reference_accuracy": self.reference_accuracy,
                "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [f"{'format':16s} {'accuracy':>9s} {'agree':>7s} {'max|d|':>9s} {'mean|d|':>9s}  result"]
        for c in self.checks:
            rows.append(f"{c.format:16s} {c.accuracy:9.4f} {c.agreement:7.4f} {c.max_abs_diff:9.3g} "
                        f"{c.mean_abs_diff:9.3g}  {'ok' if c.passed else 'FAIL: ' + '; '.join(c.failures)}")
        return "\n".join(rows)


def thresholds_for(fmt: str, overrides: Optional[Mapping[str, Thresholds]] = None) -> Thresholds:
    """Thresholds of ``fmt``: a per-format override, else a per-kind override, else the default."""
    overrides = overrides or {}
    kind = FORMAT_KINDS.get(fmt)
    if kind is None:
        raise ConfigError(f"no verification kind for format {fmt!r}; known: {', '.join(sorted(FORMAT_KINDS))}")
    if fmt in overrides:
        return overrides[fmt]
    if kind in overrides:
        return overrides[kind]
    return DEFAULT_THRESHOLDS[kind]


def _check_overrides(overrides: Optional[Mapping[str, Thresholds]]) -> None:
    if not overrides:
        return
    bad = [k for k in overrides if k not in FORMAT_KINDS and k not in DEFAULT_THRESHOLDS]
    wrong = [k for k, v in overrides.items() if not isinstance(v, Thresholds)]
    if bad or wrong:
        parts = []
        if bad:
            parts.append(f"unknown keys {', '.join(sorted(bad))} (use a kind: {', '.join(DEFAULT_THRESHOLDS)} "
                         f"or a format: {', '.join(sorted(FORMAT_KINDS))})")
        if wrong:
            parts.append(f"values of {', '.join(sorted(wrong))} are not Thresholds")
        raise ConfigError("verification thresholds: " + "; ".join(parts))


def runtime_for(artifact) -> Callable[[np.ndarray], np.ndarray]:
    """A function float inputs -> float outputs running ``artifact`` in its own runtime
    (:func:`toolchain.run.run_artifact`)."""
    if artifact.format.startswith(("onnx", "tflite")):
        from toolchain.run import run_artifact

        return lambda x: run_artifact(artifact, x)
    raise ConfigError(f"artifact format {artifact.format!r} has no runtime to verify it in")


def recipe_key(kind: str, name: str) -> str:
    """The recipe key that sets threshold ``name`` of format kind ``kind``."""
    if name in FLAT_RECIPE_FIELDS and kind in FLAT_RECIPE_KINDS:
        return f"verify.{name}"
    return f"verify.{kind}.{name}"


def compare(fmt: str, path: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            thresholds: Thresholds, task: str = "classification",
            anomaly: Optional[np.ndarray] = None) -> ArtifactCheck:
    """Numbers and threshold failures of one artifact's outputs against the Keras outputs.

    ``labels`` are class indices for ``task`` classification, else the targets (with ``anomaly``,
    0/1 per sample, for an autoencoder's ROC AUC)."""
    from toolchain.task import evaluate, metric_change, mse_floor_for

    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(reference), -1)
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    if outputs.shape != reference.shape:
        raise VerificationError(f"{fmt} ({path}): outputs have shape {outputs.shape}, the Keras model's "
                                f"{reference.shape}; the artifact is not this model")
    classify = task == "classification"
    diff = np.abs(outputs - reference)
    nan = float("nan")
    if classify:
        pred, ref_pred = outputs.argmax(1), reference.argmax(1)
        accuracy, ref_accuracy = float(np.mean(pred == labels)), float(np.mean(ref_pred == labels))
        agreement = float(np.mean(pred == ref_pred))
    else:
        accuracy = ref_accuracy = agreement = nan
    check = ArtifactCheck(
        format=fmt, path=str(path), samples=len(labels),
        accuracy=accuracy, reference_accuracy=ref_accuracy, agreement=agreement,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        thresholds=thresholds, task=task)
    if not np.all(np.isfinite(outputs)):
        return replace(check, failures=(f"{int(np.sum(~np.isfinite(outputs)))} non-finite outputs",))
    t = thresholds
    kind = FORMAT_KINDS.get(fmt, fmt)

    def key(name):
        return f" ({recipe_key(kind, name)})"

    failures = []
    if classify and check.agreement < t.min_agreement:
        failures.append(f"agreement {check.agreement:.4f} < {t.min_agreement}{key('min_agreement')}")
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    limit = _scaled_limit(t.max_abs_diff, t.max_rel_diff, scale)
    if limit is not None and check.max_abs_diff > limit:
        n_off = int(np.sum(diff > limit))
        where = np.unravel_index(int(diff.argmax()), diff.shape)
        name = "max_abs_diff" if limit == t.max_abs_diff else "max_rel_diff"
        failures.append(f"max |diff| {check.max_abs_diff:.3g} > {limit:g} "
                        f"({n_off} of {diff.size} outputs off, worst at sample {where[0]} "
                        f"{'class' if classify else 'output'} {where[1]}){key(name)}")
    spread = float(np.ptp(reference)) if reference.size else 0.0
    limit = _scaled_limit(t.max_mean_abs_diff, t.max_mean_rel_diff, spread)
    if limit is not None and check.mean_abs_diff > limit:
        name = "max_mean_abs_diff" if limit == t.max_mean_abs_diff else "max_mean_rel_diff"
        failures.append(f"mean |diff| {check.mean_abs_diff:.3g} > {limit:g}{key(name)}")
    if classify:
        drop = check.reference_accuracy - check.accuracy
        if t.max_accuracy_drop is not None and drop > t.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.4f} > {t.max_accuracy_drop}{key('max_accuracy_drop')}")
        return replace(check, failures=tuple(failures))
    mine, ref = evaluate(task, labels, outputs, anomaly), evaluate(task, labels, reference, anomaly)
    mine.pop("reconstruction_error", None)
    ref.pop("reconstruction_error", None)
    mine.pop("samples"), ref.pop("samples")
    change = metric_change(task, ref, mine, mse_floor_for(labels))
    name = "max_auc_drop" if change.metric == "auc" else "max_mse_increase"
    limit = getattr(t, name)
    if limit is not None and change.drop > limit:
        what = "AUC drop" if change.metric == "auc" else "MSE increase"
        shown = f"{change.drop:.4f}" if change.metric == "auc" else f"{change.drop:.1%}"
        failures.append(f"{what} {shown} > {limit:g} ({change.describe()}){key(name)}")
    return replace(check, failures=tuple(failures), metrics=mine, reference_metrics=ref)


def _scaled_limit(absolute: Optional[float], relative: Optional[float], scale: float) -> Optional[float]:
    """The larger of an absolute limit and a limit relative to the output's scale (None: no check)."""
    if absolute is None and relative is None:
        return None
    return max(absolute if absolute is not None else 0.0,
               relative * scale if relative is not None else 0.0)


def eval_split(dataset, samples: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """(inputs, labels or targets, split name) of the evaluation split, the first ``samples``."""
    if dataset.x_eval is None:
        raise DataError(f"dataset {dataset.name!r} has no evaluation split; verification runs every "
                        "artifact on held-out samples, so use a dataset with an eval split")
    x, y = dataset.x_eval, dataset.y_eval
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return x, y, "eval"


def verify(artifacts: Sequence, reference, dataset, thresholds: Optional[Mapping[str, Thresholds]] = None,
           references: Optional[Mapping[str, object]] = None, samples: Optional[int] = None,
           raise_on_failure: bool = True, quiet: bool = True, task: Optional[str] = None) -> VerifyReport:
    """Run every artifact in its runtime on the evaluation split and compare with ``reference``.

    ``task`` (default: the dataset's, else classification) decides the checks: see the module
    docstring. An autoencoder dataset's ``anomaly_eval`` labels add the ROC AUC check.
    ``references`` optionally maps a format to another Keras model it came from. Raises
    :class:`VerificationError` naming all failing artifacts and their numbers unless
    ``raise_on_failure=False``.
    """
    _check_overrides(thresholds)
    x, y, split = eval_split(dataset, samples)
    task = task or getattr(dataset, "task", "classification")
    anomaly = getattr(dataset, "anomaly_eval", None) if task == "autoencoder" else None
    if anomaly is not None:
        anomaly = anomaly[: len(y)]
    cache: Dict[int, np.ndarray] = {}

    def keras_outputs(model):
        if id(model) not in cache:
            cache[id(model)] = np.asarray(model.predict(x, batch_size=256, verbose=0), dtype=np.float64)
        return cache[id(model)]

    base = keras_outputs(reference)
    checks = []
    iterator = artifacts
    if not quiet:
        from tqdm import tqdm

        iterator = tqdm(artifacts, desc="verify", unit="artifact")
    for art in iterator:
        ref_model = (references or {}).get(art.format, reference)
        run = runtime_for(art)
        checks.append(compare(art.format, str(art.path), run(x), keras_outputs(ref_model), y,
                              thresholds_for(art.format, thresholds), task=task, anomaly=anomaly))
    ref_accuracy = float(np.mean(base.reshape(len(base), -1).argmax(1) == y)) if task == "classification" \
        else float("nan")
    report = VerifyReport(tuple(checks), len(y), ref_accuracy, split, task)
    if raise_on_failure and not report.passed:
        raise VerificationFailed(report)
    return report


def failure_message(report: VerifyReport) -> str:
    parts = [f"{c.summary()} -> {'; '.join(c.failures)}" for c in report.failed()]
    return (f"{len(parts)} artifact(s) failed verification on {report.samples} {report.split} samples: "
            + " | ".join(parts) + "; failing artifacts are not written as outputs — fix the model or "
            "the plan, or relax the recipe key named in brackets beside each failure")


def thresholds_from_dict(d: Mapping[str, Mapping[str, float]]) -> Dict[str, Thresholds]:
    """``{"int8": {"min_agreement": 0.95, ...}, "tflite-fp16": {...}}`` -> Thresholds per key,
    starting from the key's default so a file only names what it changes."""
    out = {}
    problems = []
    fields = set(Thresholds.__dataclass_fields__)
    for key, values in d.items():
        kind = key if key in DEFAULT_THRESHOLDS else FORMAT_KINDS.get(key)
        if kind is None:
            problems.append(f"unknown key {key!r}")
            continue
        if not isinstance(values, Mapping):
            problems.append(f"{key}: expected an object of threshold fields")
            continue
        unknown = sorted(set(values) - fields)
        if unknown:
            problems.append(f"{key}: unknown fields {', '.join(unknown)} (allowed: {', '.join(sorted(fields))})")
            continue
        out[key] = replace(DEFAULT_THRESHOLDS[kind], **{k: (None if v is None else float(v)) for k, v in values.items()})
    if problems:
        raise ConfigError("verification thresholds: " + "; ".join(problems) +
                          f"; keys are kinds ({', '.join(DEFAULT_THRESHOLDS)}) or formats")
    return out


def thresholds_from_recipe(section: Mapping) -> Dict[str, Thresholds]:
    """Threshold overrides from a recipe's ``verify`` section: the flat ``min_agreement`` /
    ``max_accuracy_drop`` apply to the int8 and mixed kinds (the compressed artifacts), a nested
    ``<kind>`` or ``<format>`` object sets any field (``verify.fp32.max_rel_diff``); other keys
    at the top are not thresholds and are left to their owners."""
    nested = {k: v for k, v in section.items() if k in DEFAULT_THRESHOLDS or k in FORMAT_KINDS}
    out = thresholds_from_dict(nested)
    flat = {k: section[k] for k in FLAT_RECIPE_FIELDS if k in section}
    for kind in FLAT_RECIPE_KINDS:
        if flat:
            base = out.get(kind, DEFAULT_THRESHOLDS[kind])
            values = {k: v for k, v in flat.items() if kind not in nested or k not in nested[kind]}
            out[kind] = replace(base, **{k: (None if v is None else float(v)) for k, v in values.items()})
    return out


class VerificationFailed(VerificationError):
    """A ``VerificationError`` that carries the full report."""

    def __init__(self, report: VerifyReport):
        super().__init__(failure_message(report))
        self.report = report


__all__ = ["ArtifactCheck", "DEFAULT_THRESHOLDS", "FLAT_RECIPE_FIELDS", "FORMAT_KINDS", "Thresholds",
           "VerificationFailed", "VerifyReport", "compare", "recipe_key", "thresholds_for",
           "thresholds_from_dict", "thresholds_from_recipe", "verify"]
