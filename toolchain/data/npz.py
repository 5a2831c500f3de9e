"""A user's own data as one ``.npz`` file ("npz:PATH").

Arrays: ``x`` and ``y`` (the train/calibration split, used in file order), optionally ``x_eval``
and ``y_eval`` (both or neither), optionally ``class_names`` (rank-1 strings).
``x`` is ``(N, H, W)`` (a channel axis is added) or ``(N, H, W, C)``, any real dtype, cast to
float32 as is (no rescaling: the file must hold what the model takes).
``y`` is ``(N,)`` integer class indices, ``(N, 1)`` of them, or ``(N, K)`` one-hot/scores (argmax;
then K is the class count). Without ``class_names`` the classes are named "0".."K-1", K being the
one-hot width or the largest label + 1.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from toolchain.data.dataset import Dataset, count_nonfinite
from toolchain.errors import DataError


def _images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(
            f"array {key!r} in {path} is {x.dtype}, but inputs must be real numbers; save it as "
            "float32 or uint8"
        )
    if x.ndim == 3:
        x = x[..., np.newaxis]
    elif x.ndim != 4:
        raise DataError(
            f"array {key!r} in {path} has shape {x.shape} (rank {x.ndim}), but inputs must be "
            "rank 3 (N, H, W) or rank 4 (N, H, W, C); reshape it before saving"
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


def load_npz(path: str) -> Dataset:
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

    if "class_names" in arrays:
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
        ),
    )
