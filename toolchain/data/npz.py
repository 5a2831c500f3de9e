"""A user's own data as one ``.npz`` file ("npz:PATH").

Arrays: ``x`` and ``y`` (the train/calibration split, used in file order), optionally ``x_eval``
and ``y_eval`` (both or neither), optionally ``class_names`` (rank-1 strings) and ``anomaly_eval``.
``x`` is ``(N, F)`` feature vectors, ``(N, H, W)`` grayscale images or ``(N, T, C)`` sequences
(read as images with a channel axis of 1 added; ``fit_to_model`` drops it again for a model on
``(T, C)``), or ``(N, H, W, C)`` images; any real dtype, cast to float32 as is (no rescaling: the
file must hold what the model takes).

The task follows from ``y`` (``task=`` overrides it):
* **classification**: ``y`` is ``(N,)`` integer class indices (floats holding whole numbers count),
  ``(N, 1)`` of them, or ``(N, K)`` one-hot/scores (argmax; then K is the class count). Without
  ``class_names`` the classes are named "0".."K-1", K being the one-hot width or the largest label + 1;
* **regression**: ``y`` holds non-integer floats (``(N,)`` becomes ``(N, 1)``; ``(N, K)`` that is
  not one-hot stays);
* **autoencoder**: no ``y`` (nor ``y_eval``), or anomaly labels given: the targets are the inputs.
  ``anomaly_eval`` (alias ``y_eval_anomaly``; 0/1 per ``x_eval`` sample, 1 = anomalous) adds the ROC
  AUC of the reconstruction error to the metrics. Anomaly labels are only ever read from those two
  keys: with ``task="autoencoder"`` any ``y``/``y_eval`` are not taken as anomaly labels but
  dropped (said in the provenance), since 0/1 class labels and anomaly labels cannot be told apart.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from toolchain.data.dataset import Dataset, count_nonfinite
from toolchain.errors import DataError


#: keys of the 0/1 anomaly labels per evaluation sample (autoencoders); the second is an alias
ANOMALY_KEYS = ("anomaly_eval", "y_eval_anomaly")


def _images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(
            f"array {key!r} in {path} is {x.dtype}, but inputs must be real numbers; save it as "
            "float32 or uint8"
        )
    if x.ndim == 3:  # (N, H, W) grayscale images, as before; fit_to_model drops the axis again
        x = x[..., np.newaxis]  # for a model on (T, C) sequences
    elif x.ndim not in (2, 4):
        raise DataError(
            f"array {key!r} in {path} has shape {x.shape} (rank {x.ndim}), but inputs must be "
            "(N, F) vectors, (N, T, C) sequences or (N, H, W[, C]) images; reshape it before saving"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported just below
        x = x.astype(np.float32)
    bad = count_nonfinite(x)
    if bad:
        raise DataError(
            f"array {key!r} in {path} has {bad} NaN/Inf values among {x.size} after casting to "
            "float32; clean or drop those samples before saving"
        )
    return x


def _looks_like_classes(y: np.ndarray) -> bool:
    """Integer labels, whole-number float labels, or one-hot/score rows: a classifier's targets."""
    if y.dtype.kind in "biu":
        return True
    if y.dtype.kind != "f" or count_nonfinite(y.astype(np.float64)):
        return y.dtype.kind not in "f"
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        return bool(np.all(y == np.round(y)))
    if y.ndim == 2:  # one-hot or per-class scores: non-negative rows summing to one
        return bool(np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))
    return False


def _targets(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Float32 regression targets, (N,) made (N, 1)."""
    if y.dtype.kind not in "biuf":
        raise DataError(f"array {key!r} in {path} is {y.dtype}, but regression targets must be numbers")
    y = y.astype(np.float32)
    bad = count_nonfinite(y)
    if bad:
        raise DataError(f"array {key!r} in {path} has {bad} NaN/Inf targets; clean or drop those samples")
    return y[:, np.newaxis] if y.ndim == 1 else y


def _class_indices(y: np.ndarray, key: str, path: Path) -> tuple[np.ndarray, int | None]:
    """int64 labels, and the class count when the encoding states it (one-hot width)."""
    width = None
    if y.ndim == 2 and y.shape[1] == 1:
        # A column of labels, as Keras's CIFAR loaders return them; argmax would make it all 0.
        y = y[:, 0]
    elif y.ndim == 2:
        if y.dtype.kind not in "biuf" or count_nonfinite(y.astype(np.float64)):
            raise DataError(
                f"array {key!r} in {path} is a {y.dtype} matrix {y.shape} with non-numeric or "
                "NaN/Inf entries; one-hot labels must be finite numbers"
            )
        width = y.shape[1]
        y = np.argmax(y, axis=1)
    elif y.ndim != 1:
        raise DataError(
            f"array {key!r} in {path} has shape {y.shape}, but labels must be (N,) class indices "
            "or (N, K) one-hot; reshape it before saving"
        )
    if y.dtype.kind == "f":
        not_whole = int(np.count_nonzero(~np.isfinite(y) | (y != np.round(y))))
        if not_whole:
            raise DataError(
                f"array {key!r} in {path} has {not_whole} labels that are not whole numbers; "
                "labels must be integer class indices 0..K-1"
            )
    elif y.dtype.kind not in "biu":
        raise DataError(
            f"array {key!r} in {path} is {y.dtype}, but labels must be integer class indices; "
            "map class names to 0..K-1 before saving"
        )
    negative = int(np.count_nonzero(y < 0))
    if negative:
        raise DataError(
            f"array {key!r} in {path} has {negative} negative labels (lowest {int(y.min())}); "
            "labels must be class indices 0..K-1"
        )
    return y.astype(np.int64), width


def load_npz(path: str, task: str | None = None) -> Dataset:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"npz file {file} does not exist; pass npz:PATH with an existing file")
    try:
        # Our own handle, because np.load leaks its file when the archive is corrupt; and no
        # pickles, because a data file must not be able to run code when loaded.
        with open(file, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(
                    f"{file} is a single .npy array, not an .npz archive; save it with "
                    "np.savez(path, x=..., y=...)"
                )
            arrays = {k: loaded[k] for k in loaded.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cannot read {file} as an .npz archive ({type(exc).__name__}: {exc}); save it with "
            "np.savez(path, x=..., y=...) and no object arrays"
        ) from None

    present = [k for k in ANOMALY_KEYS if k in arrays]
    if len(present) > 1:
        raise DataError(f"{file} has both {' and '.join(present)}; they are the same thing (0/1 anomaly "
                        "labels per 'x_eval' sample), save one of them")
    if task is None:
        if "y" not in arrays and "y_eval" not in arrays or present:
            task = "autoencoder"
        elif "y" in arrays and not _looks_like_classes(arrays["y"]):
            task = "regression"
        else:
            task = "classification"
    if task == "autoencoder":
        return _autoencoder(arrays, file)
    absent = [k for k in ("x", "y") if k not in arrays]
    if absent:
        raise DataError(
            f"{file} lacks the arrays {', '.join(absent)} (it has {', '.join(arrays) or 'none'}); "
            "save it with np.savez(path, x=inputs, y=labels[, x_eval=..., y_eval=...])"
        )
    if ("x_eval" in arrays) != ("y_eval" in arrays):
        given = "x_eval" if "x_eval" in arrays else "y_eval"
        raise DataError(
            f"{file} has {given} but not its partner; save x_eval and y_eval together, or neither"
        )

    splits = [("x", "y")] + ([("x_eval", "y_eval")] if "x_eval" in arrays else [])
    xs, ys, widths = [], [], []
    for x_key, y_key in splits:
        x = _images(arrays[x_key], x_key, file)
        if task == "regression":
            y, width = _targets(arrays[y_key], y_key, file), None
        else:
            y, width = _class_indices(arrays[y_key], y_key, file)
        if len(x) == 0:
            raise DataError(f"array {x_key!r} in {file} holds 0 samples; save at least one")
        if len(x) != len(y):
            raise DataError(
                f"{file} has {len(x)} samples in {x_key!r} but {len(y)} labels in {y_key!r}; "
                "save exactly one label per sample"
            )
        xs.append(x)
        ys.append(y)
        widths.append(width)
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(
            f"{file} has 'x' samples of shape {xs[0].shape[1:]} but 'x_eval' samples of shape "
            f"{xs[1].shape[1:]}; both splits must share one sample shape"
        )
    if len({w for w in widths if w is not None}) > 1:
        raise DataError(
            f"{file} has one-hot labels of widths {widths}; 'y' and 'y_eval' must encode the same "
            "classes"
        )

    if task == "regression":
        class_names: tuple = ()
    elif "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
            raise DataError(
                f"array 'class_names' in {file} is {names.dtype}{names.shape}, but it must be a "
                "non-empty rank-1 string array; save np.array(['cat', 'dog', ...])"
            )
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    else:
        k = next((w for w in widths if w is not None), None)
        if k is None:
            k = max(int(y.max()) for y in ys) + 1
        class_names = tuple(str(i) for i in range(k))

    return Dataset(
        name=f"npz:{file}",
        task=task,
        x_train=xs[0],
        y_train=ys[0],
        x_eval=xs[1] if len(xs) == 2 else None,
        y_eval=ys[1] if len(ys) == 2 else None,
        class_names=class_names,
        input_shape=tuple(int(d) for d in xs[0].shape[1:]),
        provenance=(
            f"npz file {file}: 'x'/'y' ({len(xs[0])} samples, file order) as train/calibration, "
            + (f"'x_eval'/'y_eval' ({len(xs[1])}) as eval" if len(xs) == 2 else "no eval split")
            + "; inputs cast to float32 without rescaling"
            + ("; float targets: regression" if task == "regression" else "")
        ),
    )


def _autoencoder(arrays: dict, file: Path) -> Dataset:
    """No labels: the targets are the inputs; ``anomaly_eval`` marks anomalous evaluation samples."""
    if "x" not in arrays:
        raise DataError(f"{file} lacks the array 'x' (it has {', '.join(arrays) or 'none'}); save "
                        "np.savez(path, x=inputs[, x_eval=..., anomaly_eval=...])")
    x = _images(arrays["x"], "x", file)
    x_eval = _images(arrays["x_eval"], "x_eval", file) if "x_eval" in arrays else None
    if len(x) == 0 or (x_eval is not None and len(x_eval) == 0):
        raise DataError(f"{file} has an empty 'x' or 'x_eval'; save at least one sample in each")
    anomaly = None
    key = next((k for k in ANOMALY_KEYS if k in arrays), None)
    if key is not None:
        a = arrays[key]
        if x_eval is None or a.shape != (len(x_eval),) or a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
            raise DataError(
                f"array {key!r} in {file} is {a.dtype}{a.shape}, but it must hold one 0/1 label per "
                "'x_eval' sample (1 = anomalous); save it beside x_eval"
            )
        anomaly = a.astype(np.int64)
    dropped = [k for k in ("y", "y_eval") if k in arrays]
    return Dataset(
        name=f"npz:{file}", task="autoencoder", x_train=x, y_train=x.copy(),
        x_eval=x_eval, y_eval=None if x_eval is None else x_eval.copy(), class_names=(),
        input_shape=tuple(int(d) for d in x.shape[1:]), anomaly_eval=anomaly,
        provenance=(f"npz file {file}: 'x' ({len(x)} samples, file order) as train/calibration, "
                    + (f"'x_eval' ({len(x_eval)}) as eval" if x_eval is not None else "no eval split")
                    + "; autoencoder: the targets are the inputs"
                    + (f"; {key!r} marks {int(anomaly.sum())} anomalous eval samples" if anomaly is not None
                       else "")
                    + (f"; {' and '.join(dropped)} not used (labels are no autoencoder targets)" if dropped else "")
                    + "; inputs cast to float32 without rescaling"))
