"""What a model does with its inputs, in one place: classification, regression or autoencoder.

Every stage used to assume a classifier (``output_shape[-1]`` a class count, LRP from the true
class, distillation through a softmax, accuracy as the measure). The task decides instead:

* ``classification``: integer class labels, outputs are scores per class; measured by accuracy.
* ``regression``: float targets ``(N, K)``; measured by mean squared / absolute error.
* ``autoencoder``: the targets are the reconstruction (usually the inputs); measured by the
  reconstruction error, and by the ROC AUC of the per-sample reconstruction error when the
  evaluation samples carry anomaly labels (MLPerf Tiny anomaly detection's metric).

``infer_task`` reads the task off the model and the data, ``resolve_task`` checks a user's choice
against them, ``evaluate`` computes a task's metrics, ``primary_metric`` names the one a guard
watches, and ``metric_change`` expresses an artifact's loss in that metric as one number to
compare with a limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from toolchain.data.dataset import TASKS
from toolchain.errors import ConfigError, DataError

__all__ = ["TASKS", "MetricChange", "evaluate", "infer_task", "infer_task_from_model", "metric_change", "mse_floor_for",
           "paired_change", "primary_metric",
           "resolve_task", "top1_agreement"]

#: final activations that make outputs class scores
_CLASS_ACTIVATIONS = ("softmax", "sigmoid")


def _final_activation(model) -> str:
    last = model.layers[-1]
    if type(last).__name__ == "Softmax":
        return "softmax"
    return getattr(getattr(last, "activation", None), "__name__", "linear")


def _float_targets(y: np.ndarray) -> bool:
    return np.asarray(y).dtype.kind == "f"


def infer_task(model, dataset) -> str:
    """The task the model and data describe.

    Integer labels -> ``classification``. Float targets -> ``autoencoder`` when the dataset says so,
    when the targets equal the inputs, or when the model maps its input shape to the same output
    shape through a linear final activation; otherwise ``regression``.
    """
    y = dataset.y_train
    if not _float_targets(y):
        return "classification"
    if getattr(dataset, "task", None) == "autoencoder":
        return "autoencoder"
    x = dataset.x_train
    if y.shape == x.shape and np.array_equal(y, x):
        return "autoencoder"
    if model is not None and infer_task_from_model(model) == "autoencoder":
        return "autoencoder"
    return "regression"


def infer_task_from_model(model) -> str:
    """The task a model alone suggests (no data at hand): ``autoencoder`` when it maps its input
    shape to the same output shape through a linear final activation, else ``classification``. A
    regressor's outputs look like logits, so regression must be named by the caller."""
    out_shape, in_shape = tuple(model.output_shape[1:]), tuple(model.input_shape[1:])
    if out_shape == in_shape and _final_activation(model) not in _CLASS_ACTIVATIONS:
        return "autoencoder"
    return "classification"


def resolve_task(model, dataset, override: Optional[str] = None) -> str:
    """``override`` (the user's choice) checked against the data, else ``infer_task``.

    Raises ``ConfigError`` when ``override`` is not a task or contradicts the targets (classification
    needs integer labels, regression/autoencoder need float targets)."""
    if override is None:
        return infer_task(model, dataset)
    if override not in TASKS:
        raise ConfigError(f"task {override!r} is not one of {', '.join(TASKS)}; pick one of them or "
                          "leave it out to infer it from the model and data")
    floats = _float_targets(dataset.y_train)
    if override == "classification" and floats:
        raise ConfigError(f"task 'classification' was given but dataset {dataset.name!r} has float targets "
                          f"{dataset.y_train.dtype} {dataset.y_train.shape[1:]}; use task regression or "
                          "autoencoder, or give integer class labels")
    if override != "classification" and not floats:
        raise ConfigError(f"task {override!r} was given but dataset {dataset.name!r} has integer class "
                          "labels; use task classification, or give float targets")
    return override


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose highest-scoring class is the same in the two score arrays."""
    a = np.asarray(a).reshape(len(a), -1)
    b = np.asarray(b).reshape(len(b), -1)
    return float(np.mean(a.argmax(1) == b.argmax(1))) if len(a) else float("nan")


def evaluate(task: str, y_true: np.ndarray, y_pred: np.ndarray, anomaly: Optional[np.ndarray] = None) -> dict:
    """The task's metrics of predictions ``y_pred`` against ``y_true``.

    classification: ``accuracy`` (``y_true`` class indices, ``y_pred`` scores ``(N, C)``).
    regression: ``mse``, ``mae`` over all target elements. autoencoder: ``mse``, ``mae`` and the
    per-sample reconstruction error ``reconstruction_error`` (mean squared error of each sample);
    with ``anomaly`` (0/1 per sample, 1 = anomalous) also ``auc``: ROC AUC of that error as an
    anomaly score (left out when only one kind of sample is present). Every dict carries ``samples``.
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    y_pred = np.asarray(y_pred)
    n = len(y_pred)
    if len(y_true) != n:
        raise DataError(f"{len(y_true)} targets but {n} predictions; evaluate matching arrays")
    if task == "classification":
        pred = y_pred.reshape(n, -1).argmax(1)
        return {"samples": n, "accuracy": float(np.mean(pred == np.asarray(y_true).reshape(-1)))}
    t = np.asarray(y_true, np.float64).reshape(n, -1)
    p = y_pred.astype(np.float64).reshape(n, -1)
    if t.shape != p.shape:
        raise DataError(f"targets have {t.shape[1]} values per sample but predictions {p.shape[1]}; "
                        "the model's output must match the targets")
    err = p - t
    out = {"samples": n, "mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err)))}
    if task == "autoencoder":
        per_sample = np.mean(err ** 2, axis=1)
        out["reconstruction_error"] = per_sample
        if anomaly is not None:
            from sklearn.metrics import roc_auc_score

            labels = np.asarray(anomaly).reshape(-1)
            if len(labels) != n:
                raise DataError(f"{len(labels)} anomaly labels for {n} samples; give one 0/1 label per sample")
            if len(np.unique(labels)) == 2:  # AUC needs both normal and anomalous samples
                out["auc"] = float(roc_auc_score(labels, per_sample))
    return out


def primary_metric(task: str, has_anomaly: bool = False) -> tuple[str, bool]:
    """``(metric name, higher_is_better)`` a guard watches for ``task``."""
    if task == "classification":
        return "accuracy", True
    if task == "autoencoder" and has_anomaly:
        return "auc", True
    if task in TASKS:
        return "mse", False
    raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class MetricChange:
    """How much worse an artifact is than the original in the task's primary metric.

    ``drop`` is what a guard compares with its limit, larger = worse: for ``accuracy`` and ``auc``
    the absolute loss (0.01 = one point), for ``mse`` the relative increase
    ((artifact - original) / original; 0.10 = 10% worse)."""

    metric: str
    original: float
    artifact: float
    drop: float

    @property
    def relative(self) -> bool:
        return self.metric == "mse"

    def describe(self) -> str:
        if self.relative:
            return f"{self.metric} {self.original:.4g} -> {self.artifact:.4g} ({self.drop:+.1%})"
        return f"{self.metric} {self.original:.4f} -> {self.artifact:.4f} ({-self.drop * 100:+.1f} points)"


#: an original error this small counts as exact, so a relative increase stays finite
_MSE_FLOOR = 1e-12


#: the relative MSE increase is measured against at least this share of the targets' mean square
MSE_FLOOR_OF_TARGET_POWER = 1e-6


def mse_floor_for(y_true: np.ndarray) -> float:
    """The smallest MSE a relative increase is measured against, for targets ``y_true``."""
    return MSE_FLOOR_OF_TARGET_POWER * float(np.mean(np.square(np.asarray(y_true, np.float64))))


def paired_change(task: str, y_true: np.ndarray, original_outputs: np.ndarray, outputs: np.ndarray,
                  mse_floor: float = _MSE_FLOOR) -> tuple[float, float]:
    """``(drop, standard error of drop)`` of ``outputs`` against ``original_outputs`` on the same
    samples: the drop as ``metric_change`` measures it without anomaly labels (accuracy points lost;
    relative MSE increase), its standard error from the per-sample loss differences (0/1 errors;
    squared errors), the paired estimate: samples both get right or wrong add no noise."""
    n = len(y_true)
    if task == "classification":
        truth = np.asarray(y_true).reshape(-1)
        loss = lambda out: (np.asarray(out).reshape(n, -1).argmax(1) != truth).astype(np.float64)  # noqa: E731
        scale = 1.0
    else:
        t = np.asarray(y_true, np.float64).reshape(n, -1)
        loss = lambda out: np.mean((np.asarray(out, np.float64).reshape(n, -1) - t) ** 2, axis=1)  # noqa: E731
        scale = max(float(np.mean(loss(original_outputs))), mse_floor, _MSE_FLOOR)
    d = (loss(outputs) - loss(original_outputs)) / scale
    se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return float(np.mean(d)), se


def metric_change(task: str, original: dict, artifact: dict, mse_floor: float = _MSE_FLOOR) -> MetricChange:
    """The drop of the primary metric from ``original`` to ``artifact`` (dicts from ``evaluate``).

    A relative MSE increase divides by ``max(original mse, mse_floor)``: an original that fits its
    targets exactly would make any rounding an infinite increase; pass a floor on the targets'
    scale (``mse_floor_for``)."""
    name, higher_better = primary_metric(task, "auc" in original and "auc" in artifact)
    a, b = float(original[name]), float(artifact[name])
    if higher_better:
        drop = a - b
    else:
        drop = (b - a) / max(a, mse_floor, _MSE_FLOOR)
    return MetricChange(name, a, b, float(drop))
