"""The ``Dataset`` every stage receives, and the check that it fits a model.

A ``Dataset`` validates itself on construction, so every stage downstream can rely on: float32
inputs of any rank the layers take ((N, F) vectors, (N, T, C) sequences, (N, H, W, C) images)
without NaN/Inf, targets that fit the task (int64 class indices inside ``class_names`` for a
classifier, finite float32 targets for a regressor or an autoencoder), matching lengths, and a
train split that is never empty. Its arrays are made read-only so ``content_hash`` stays a valid
cache key for the object's whole life.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from toolchain.errors import ConfigError, DataError

# Arrays that make up a dataset's content, in the order they are hashed.
_ARRAY_FIELDS = ("x_train", "y_train", "x_eval", "y_eval", "x_train_int8", "x_eval_int8", "anomaly_eval")
#: what a model does with its inputs; see ``toolchain.task``
TASKS = ("classification", "regression", "autoencoder")


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/Inf entries in a float array (0 for integer arrays)."""
    if x.dtype.kind not in "fc":
        return 0
    # A float64 sum of float32 values cannot overflow, and any NaN/Inf poisons it, so a finite
    # sum proves the array finite without allocating a full boolean mask of a large dataset.
    if np.isfinite(np.sum(x, dtype=np.float64)):
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def _read_only(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if x is not None:
        x.flags.writeable = False
    return x


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset split into a train/calibration part and an optional eval part.

    ``x_*`` are float32 ``(N, ...)`` (``input_shape`` is one sample's shape). ``task`` says what the
    targets are: ``classification``: ``y_*`` int64 class indices ``(N,)`` naming ``class_names``;
    ``regression``: ``y_*`` float32 ``(N, K...)`` and ``class_names == ()``; ``autoencoder``:
    ``y_*`` float32 reconstruction targets (the inputs themselves for the usual autoencoder) and
    ``class_names == ()``, with optional ``anomaly_eval`` (int64 0/1 per evaluation sample,
    1 = anomalous) for the ROC AUC of the reconstruction error.
    ``x_eval``/``y_eval`` are ``None`` when the source has no evaluation split.
    ``x_train_int8``/``x_eval_int8`` hold the source's original int8 samples when the data ships
    already quantized (kws01); ``input_quantization`` is then the ``(scale, zero_point)`` that maps
    them to the float arrays: ``float = (int8 - zero_point) * scale``.
    The arrays are made read-only on construction (copy one before changing it). Equality is
    identity (arrays have no single truth value); compare ``content_hash()`` instead.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: Optional[np.ndarray]
    y_eval: Optional[np.ndarray]
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    provenance: str
    x_train_int8: Optional[np.ndarray] = None
    x_eval_int8: Optional[np.ndarray] = None
    input_quantization: Optional[tuple[float, int]] = None
    task: str = "classification"
    anomaly_eval: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self._validate()
        for name in _ARRAY_FIELDS:
            _read_only(getattr(self, name))

    # -- invariants -------------------------------------------------------------------------
    def _validate(self) -> None:
        where = f"dataset {self.name!r}"
        if self.task not in TASKS:
            raise DataError(f"{where}: task is {self.task!r}; it must be one of {', '.join(TASKS)}")
        if not self.is_classification:
            if self.class_names != ():
                raise DataError(f"{where}: a {self.task} dataset has no classes, but class_names is "
                                f"{self.class_names!r}; pass class_names=()")
        elif not isinstance(self.class_names, tuple) or not self.class_names or not all(
            isinstance(c, str) for c in self.class_names
        ):
            raise DataError(
                f"{where}: class_names is {self.class_names!r}, but it must be a non-empty tuple "
                "of str; pass one name per class, e.g. tuple(str(i) for i in range(k))"
            )
        if not isinstance(self.input_shape, tuple) or not all(
            isinstance(d, int) for d in self.input_shape
        ):
            raise DataError(
                f"{where}: input_shape is {self.input_shape!r}, but it must be a tuple of int "
                "without the batch axis; pass x_train.shape[1:]"
            )
        self._validate_split("x_train", "y_train", required=True)
        if (self.x_eval is None) != (self.y_eval is None):
            raise DataError(
                f"{where}: x_eval is {_describe(self.x_eval)} but y_eval is "
                f"{_describe(self.y_eval)}; give both or neither"
            )
        if self.x_eval is not None:
            self._validate_split("x_eval", "y_eval", required=False)
        if self.anomaly_eval is not None:
            a = self.anomaly_eval
            if self.task != "autoencoder" or self.x_eval is None or not isinstance(a, np.ndarray) or \
                    a.dtype != np.int64 or a.shape != (len(self.x_eval),) or not np.isin(a, (0, 1)).all():
                raise DataError(
                    f"{where}: anomaly_eval is {_describe(a)}, but it must be an int64 0/1 array with one "
                    "entry per evaluation sample (1 = anomalous) of an autoencoder dataset with an eval split"
                )
        self._validate_int8("x_train_int8", "x_train")
        self._validate_int8("x_eval_int8", "x_eval")
        has_int8 = self.x_train_int8 is not None or self.x_eval_int8 is not None
        if has_int8 and self.input_quantization is None:
            raise DataError(
                f"{where}: int8 samples are given without input_quantization; pass the "
                "(scale, zero_point) that maps them to the float arrays"
            )
        if self.input_quantization is not None:
            q = self.input_quantization
            if not (
                isinstance(q, tuple)
                and len(q) == 2
                and isinstance(q[0], float)
                and isinstance(q[1], int)
                and q[0] > 0
            ):
                raise DataError(
                    f"{where}: input_quantization is {q!r}, but it must be (scale: float > 0, "
                    "zero_point: int); read it from the int8 model's input tensor"
                )

    def _validate_split(self, x_name: str, y_name: str, required: bool) -> None:
        where = f"dataset {self.name!r}"
        x, y = getattr(self, x_name), getattr(self, y_name)
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
            raise DataError(
                f"{where}: {x_name} is {_describe(x)}, but it must be a float32 array of shape "
                "(N, F), (N, T, C) or (N, H, W, C); cast with .astype(np.float32)"
            )
        if self.is_classification:
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise DataError(
                    f"{where}: {y_name} is {_describe(y)}, but it must be an int64 array of class "
                    "indices of shape (N,); convert one-hot labels with argmax(axis=1)"
                )
        elif not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.ndim < 2:
            raise DataError(
                f"{where}: {y_name} is {_describe(y)}, but the targets of a {self.task} dataset must be a "
                "float32 array of shape (N, K...); reshape a (N,) target to (N, 1)"
            )
        if len(x) == 0:
            raise DataError(
                f"{where}: {x_name} holds 0 samples; a dataset needs at least one "
                f"{'training' if required else 'evaluation'} sample"
                + ("" if required else ", or pass x_eval=None and y_eval=None")
            )
        if len(x) != len(y):
            raise DataError(
                f"{where}: {x_name} has {len(x)} samples but {y_name} has {len(y)} labels; "
                "give exactly one label per sample"
            )
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise DataError(
                f"{where}: {x_name} samples have shape {tuple(x.shape[1:])} but input_shape is "
                f"{tuple(self.input_shape)}; all splits must share one sample shape"
            )
        bad = count_nonfinite(x)
        if bad:
            raise DataError(
                f"{where}: {x_name} has {bad} NaN/Inf values among {x.size}; clean or drop those "
                "samples before loading"
            )
        if not self.is_classification:
            bad = count_nonfinite(y)
            if bad:
                raise DataError(f"{where}: {y_name} has {bad} NaN/Inf targets among {y.size}; clean or drop "
                                "those samples before loading")
            return
        lowest, highest = int(y.min()), int(y.max())
        if lowest < 0:
            raise DataError(
                f"{where}: {y_name} has {int(np.count_nonzero(y < 0))} negative labels (lowest "
                f"{lowest}); labels must be class indices 0..{len(self.class_names) - 1}"
            )
        if highest >= len(self.class_names):
            raise DataError(
                f"{where}: {y_name} reaches label {highest} but there are only "
                f"{len(self.class_names)} class names; give one class name per class"
            )

    def _validate_int8(self, q_name: str, x_name: str) -> None:
        q, x = getattr(self, q_name), getattr(self, x_name)
        if q is None:
            return
        if not isinstance(q, np.ndarray) or q.dtype != np.int8 or x is None or q.shape != x.shape:
            raise DataError(
                f"dataset {self.name!r}: {q_name} is {_describe(q)}, but it must be an int8 array "
                f"of the same shape as {x_name} ({_describe(x)}); pass the int8 samples "
                f"{x_name} was dequantized from, or None"
            )

    # -- views ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One sample's target: ``()`` for class indices, ``(K...)`` for float targets."""
        return tuple(self.y_train.shape[1:])

    def calibration(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` samples of the train split (all of them for ``None``), with labels.

        Calibration takes a prefix, not a random draw, so the same ``n`` always means the same
        samples and results are reproducible across runs and machines.
        """
        available = len(self.x_train)
        if n is None:
            return self.x_train, self.y_train
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ConfigError(
                f"calibration sample count {n!r} is not allowed; pass a positive int up to "
                f"{available}, or None for the whole train split"
            )
        if n > available:
            raise ConfigError(
                f"calibration asks for {n} samples but dataset {self.name!r} has only "
                f"{available} train samples; pass n <= {available}, or None for all of them"
            )
        return self.x_train[:n], self.y_train[:n]

    def content_hash(self) -> str:
        """SHA-256 over the class names and every array's dtype, shape and bytes.

        ``name`` and ``provenance`` are left out on purpose: the same samples loaded from a
        different path hash the same, so caches keyed on it are shared.
        """
        h = hashlib.sha256()
        if not self.is_classification:  # classification hashes as before, so caches stay valid
            h.update(f"task={self.task}".encode())
        h.update(repr(self.class_names).encode())
        h.update(repr(self.input_quantization).encode())
        for name in _ARRAY_FIELDS:
            a = getattr(self, name)
            if name == "anomaly_eval" and a is None:
                continue  # absent for every classification dataset: their hashes stay as before
            h.update(name.encode())
            if a is None:
                h.update(b"<none>")
                continue
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        return h.hexdigest()

    def summary(self) -> str:
        """One line for logs: name, shapes, split sizes, class count."""
        n_eval = 0 if self.x_eval is None else len(self.x_eval)
        what = f"{self.num_classes} classes" if self.is_classification else f"{self.task}, targets {self.target_shape}"
        return f"{self.name}: input {self.input_shape}, {what}, {len(self.x_train)} train / {n_eval} eval"


def _describe(a: object) -> str:
    if a is None:
        return "None"
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def fit_to_model(dataset: Dataset, input_shape: Sequence) -> Dataset:
    """``dataset`` with its samples shaped as the model takes them (``input_shape``: one sample's
    shape, no batch axis), when they differ only by a
    trailing channel axis of 1: (N, H, W) images for a model on (H, W, 1) gain it, and (N, T, C, 1)
    (a rank-3 array read as grayscale images) for a model on (T, C) sequences loses it; or when the
    model takes flat feature vectors (F,) and a sample holds exactly F values: (N, 8, 8, 1) digits
    for an MLP on (64,) are flattened row-major, as Keras' ``Flatten`` would. Anything else is left
    for ``check_compatible`` to report."""
    import dataclasses

    model_shape, sample = tuple(input_shape), tuple(dataset.input_shape)
    if len(model_shape) == len(sample) + 1 and model_shape[-1] == 1 and _same(model_shape[:-1], sample):
        fix = lambda a: None if a is None else a[..., np.newaxis]  # noqa: E731
        what = "a channel axis added"
    elif len(sample) == len(model_shape) + 1 and sample[-1] == 1 and _same(model_shape, sample[:-1]):
        fix = lambda a: None if a is None else a[..., 0]  # noqa: E731
        what = "the trailing channel axis of 1 dropped"
    elif (len(model_shape) == 1 and len(sample) > 1 and model_shape[0] is not None
          and int(np.prod(sample)) == model_shape[0]):
        fix = lambda a: None if a is None else a.reshape(len(a), -1)  # noqa: E731
        what = f"{sample} flattened to ({model_shape[0]},)"
    else:
        return dataset
    autoencoder = dataset.task == "autoencoder"
    return dataclasses.replace(
        dataset, x_train=fix(dataset.x_train), x_eval=fix(dataset.x_eval),
        y_train=fix(dataset.y_train) if autoencoder else dataset.y_train,
        y_eval=fix(dataset.y_eval) if autoencoder else dataset.y_eval,
        x_train_int8=fix(dataset.x_train_int8), x_eval_int8=fix(dataset.x_eval_int8),
        input_shape=tuple(fix(dataset.x_train).shape[1:]),
        provenance=f"{dataset.provenance}; samples reshaped to the model's input ({what})")


def _same(model_shape: Sequence, sample: Sequence) -> bool:
    return len(model_shape) == len(sample) and all(m is None or m < 0 or m == s for m, s in zip(model_shape, sample))


def check_compatible(dataset: Dataset, input_shape: Sequence, num_classes: int) -> None:
    """Raise ``DataError`` listing every way ``dataset`` does not fit a model.

    ``input_shape`` may carry a leading batch axis (Keras ``(None, 49, 10, 1)``, TFLite
    ``(1, 49, 10, 1)``); it is dropped when the shape has one axis more than a sample. ``None``
    (or -1) model dimensions match any size.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
        num_classes <= 0
    ):
        raise ConfigError(
            f"model class count {num_classes!r} is not allowed; pass the size of the model's "
            "output layer as a positive int"
        )
    try:
        model_shape = tuple(None if d is None else int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model input shape {input_shape!r} is not a sequence of int/None; pass e.g. "
            "model.input_shape"
        ) from None
    sample_shape = tuple(dataset.input_shape)
    if len(model_shape) == len(sample_shape) + 1:
        model_shape = model_shape[1:]

    problems = []
    shapes_match = len(model_shape) == len(sample_shape) and all(
        m is None or m < 0 or m == s for m, s in zip(model_shape, sample_shape)
    )
    if not shapes_match:
        problems.append(
            f"samples have shape {sample_shape} but the model expects {model_shape} (loading adapts "
            "only a trailing channel axis of 1 and flattening to (F,) feature vectors)"
        )
    if not dataset.is_classification:  # float targets: the model's output width must match theirs
        width = dataset.target_shape[-1] if dataset.target_shape else 1
        if width != num_classes:
            problems.append(f"{dataset.task} targets have width {width} but the model outputs {num_classes}")
        if problems:
            raise DataError(
                f"dataset {dataset.name!r} does not fit the model: " + "; ".join(problems)
                + "; use the dataset the model was trained on, or a model built for this dataset"
            )
        return
    max_label = int(dataset.y_train.max())
    if dataset.y_eval is not None:
        max_label = max(max_label, int(dataset.y_eval.max()))
    if max_label >= num_classes:
        problems.append(
            f"labels reach {max_label} but the model has only {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    if dataset.num_classes != num_classes:
        problems.append(
            f"the dataset names {dataset.num_classes} classes but the model outputs {num_classes}"
        )
    if problems:
        raise DataError(
            f"dataset {dataset.name!r} does not fit the model: " + "; ".join(problems)
            + "; use the dataset the model was trained on, or a model built for this dataset"
        )

