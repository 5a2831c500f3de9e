"""Verification: every exported artifact runs in its own runtime and is compared with its Keras model.

``verify(artifacts, reference, dataset)`` loads each :class:`~toolchain.export.artifact.Artifact`
in the runtime that will execute it on the device side (``tf.lite.Interpreter`` for ``tflite-*``,
ONNX Runtime for ``onnx-*``), runs the evaluation split, and reports per artifact

* ``accuracy`` on the evaluation labels, next to the Keras model's,
* ``agreement``: share of samples whose top-1 class equals the Keras model's,
* ``max_abs_diff`` / ``mean_abs_diff`` of the dequantized outputs (softmax probabilities).

Each format kind has default :class:`Thresholds` (:data:`DEFAULT_THRESHOLDS`), overridable per
kind (``"int8"``) or per format (``"tflite-int8"``). Artifacts that miss a threshold raise one
:class:`~toolchain.errors.VerificationError` naming every failing artifact and its numbers
(``raise_on_failure=False`` returns the report instead).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, DataError, VerificationError


@dataclass(frozen=True)
class Thresholds:
    """What an artifact must reach against its Keras model on the evaluation split.

    ``None`` disables a check. ``max_accuracy_drop`` is in accuracy units (0.01 = one point)."""

    min_agreement: float
    max_abs_diff: Optional[float] = None
    max_mean_abs_diff: Optional[float] = None
    max_accuracy_drop: Optional[float] = None


#: defaults per format kind, set from measurements on digits_cnn and the MLPerf Tiny DS-CNN
#: (docs: benchmarks/results/export.md): float32 must match to rounding; float16 weights move
#: probabilities by ~1e-3; integer formats are judged on decisions and mean error.
DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = {
    "fp32": Thresholds(min_agreement=0.99, max_abs_diff=1e-4),
    "fp16": Thresholds(min_agreement=0.99, max_abs_diff=1e-2, max_mean_abs_diff=1e-3),
    "dynamic": Thresholds(min_agreement=0.97, max_mean_abs_diff=0.02, max_accuracy_drop=0.02),
    "int16x8": Thresholds(min_agreement=0.97, max_mean_abs_diff=0.02, max_accuracy_drop=0.02),
    "int8": Thresholds(min_agreement=0.90, max_mean_abs_diff=0.05, max_accuracy_drop=0.03),
    "mixed": Thresholds(min_agreement=0.85, max_mean_abs_diff=0.08, max_accuracy_drop=0.05),
}

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

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
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
        return {"passed": self.passed, "split": self.split, "samples": self.samples,
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
    """A function float inputs -> float outputs running ``artifact`` in its own runtime."""
    if artifact.format.startswith(("onnx", "tflite")):
        from toolchain.export.artifact import run_artifact

        return lambda x: run_artifact(artifact, x)
    raise ConfigError(f"artifact format {artifact.format!r} has no runtime to verify it in")


def compare(fmt: str, path: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            thresholds: Thresholds) -> ArtifactCheck:
    """Numbers and threshold failures of one artifact's outputs against the Keras outputs."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(reference), -1)
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    if outputs.shape != reference.shape:
        raise VerificationError(f"{fmt} ({path}): outputs have shape {outputs.shape}, the Keras model's "
                                f"{reference.shape}; the artifact is not this model")
    diff = np.abs(outputs - reference)
    pred, ref_pred = outputs.argmax(1), reference.argmax(1)
    check = ArtifactCheck(
        format=fmt, path=str(path), samples=len(labels),
        accuracy=float(np.mean(pred == labels)), reference_accuracy=float(np.mean(ref_pred == labels)),
        agreement=float(np.mean(pred == ref_pred)),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        thresholds=thresholds)
    if not np.all(np.isfinite(outputs)):
        return replace(check, failures=(f"{int(np.sum(~np.isfinite(outputs)))} non-finite outputs",))
    t = thresholds
    failures = []
    if check.agreement < t.min_agreement:
        failures.append(f"agreement {check.agreement:.4f} < {t.min_agreement}")
    if t.max_abs_diff is not None and check.max_abs_diff > t.max_abs_diff:
        n_off = int(np.sum(diff > t.max_abs_diff))
        where = np.unravel_index(int(diff.argmax()), diff.shape)
        failures.append(f"max |diff| {check.max_abs_diff:.3g} > {t.max_abs_diff:g} "
                        f"({n_off} of {diff.size} outputs off, worst at sample {where[0]} class {where[1]})")
    if t.max_mean_abs_diff is not None and check.mean_abs_diff > t.max_mean_abs_diff:
        failures.append(f"mean |diff| {check.mean_abs_diff:.3g} > {t.max_mean_abs_diff:g}")
    drop = check.reference_accuracy - check.accuracy
    if t.max_accuracy_drop is not None and drop > t.max_accuracy_drop:
        failures.append(f"accuracy drop {drop:.4f} > {t.max_accuracy_drop}")
    return replace(check, failures=tuple(failures))


def eval_split(dataset, samples: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    if dataset.x_eval is None:
        raise DataError(f"dataset {dataset.name!r} has no evaluation split; verification runs every "
                        "artifact on held-out samples, so use a dataset with an eval split")
    x, y = dataset.x_eval, dataset.y_eval
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return x, y, "eval"


def verify(artifacts: Sequence, reference, dataset, thresholds: Optional[Mapping[str, Thresholds]] = None,
           references: Optional[Mapping[str, object]] = None, samples: Optional[int] = None,
           raise_on_failure: bool = True, quiet: bool = True) -> VerifyReport:
    """Run every artifact in its runtime on the evaluation split and compare with ``reference``.

    ``references`` optionally maps a format to another Keras model it came from. Raises
    :class:`VerificationError` naming all failing artifacts and their numbers unless
    ``raise_on_failure=False``.
    """
    _check_overrides(thresholds)
    x, y, split = eval_split(dataset, samples)
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
                              thresholds_for(art.format, thresholds)))
    report = VerifyReport(tuple(checks), len(y), float(np.mean(base.argmax(1) == y)), split)
    if raise_on_failure and not report.passed:
        raise VerificationFailed(report)
    return report


def failure_message(report: VerifyReport) -> str:
    parts = [f"{c.summary()} -> {'; '.join(c.failures)}" for c in report.failed()]
    return (f"{len(parts)} artifact(s) failed verification on {report.samples} {report.split} samples: "
            + " | ".join(parts) + "; failing artifacts are not written as outputs — fix the model or "
            "the plan, or relax the thresholds (thresholds=..., CLI --thresholds FILE)")


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


class VerificationFailed(VerificationError):
    """A ``VerificationError`` that carries the full report."""

    def __init__(self, report: VerifyReport):
        super().__init__(failure_message(report))
        self.report = report


__all__ = ["ArtifactCheck", "DEFAULT_THRESHOLDS", "FORMAT_KINDS", "Thresholds", "VerificationFailed",
           "VerifyReport", "compare", "thresholds_for", "thresholds_from_dict", "verify"]
