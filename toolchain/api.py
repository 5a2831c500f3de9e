"""The Python API for notebooks: the pipeline on an in-memory Keras model and numpy arrays.

    import toolchain
    result = toolchain.compress(model, (x_train, y_train, x_test, y_test), recipe={"prune": {"sparsity": 0.3}},
                                out="build/my_model")
    result.headline, result.artifacts["tflite-int8"], result.summary["original"]

Everything goes through the same code as ``toolchain compress``: an in-memory model is saved to a
``.keras`` file in a private temporary folder and loaded back (so the pipeline sees exactly what it
would see from a file), arrays become an ``npz:`` dataset (validated like one), and a recipe given as
a dict is validated like a YAML recipe. The caller's model and arrays are never modified.

The stage functions take in-memory objects already: ``toolchain.relevance.compute_relevance(model,
x, y)``, ``toolchain.prune.prune(model, dataset, ...)``, ``toolchain.export.export(model, dataset,
formats, out)``; :func:`dataset` turns arrays into the ``Dataset`` they take.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from toolchain.errors import ConfigError

#: array names of a tuple ``data`` argument, in order
ARRAY_ORDER = ("x", "y", "x_eval", "y_eval")


def _arrays(data: Union[Sequence, Mapping[str, Any]]) -> dict:
    if isinstance(data, Mapping):
        arrays = {k: np.asarray(v) for k, v in data.items()}
    elif isinstance(data, (tuple, list)) and 1 <= len(data) <= len(ARRAY_ORDER):
        arrays = {k: np.asarray(v) for k, v in zip(ARRAY_ORDER, data) if v is not None}
    else:
        raise ConfigError(
            f"data is a {type(data).__name__}; pass a dataset spec string (e.g. 'digits', 'npz:PATH'), "
            f"a tuple (x, y[, x_eval, y_eval]) of numpy arrays, or a dict of the npz keys "
            f"(x, y, x_eval, y_eval, class_names, anomaly_eval)"
        )
    if "x" not in arrays:
        raise ConfigError("data has no 'x' array; pass (x, y[, x_eval, y_eval]) or a dict with 'x'")
    return arrays


def dataset(data: Union[Sequence, Mapping[str, Any]], task: Optional[str] = None):
    """A validated ``Dataset`` from numpy arrays (the npz loader's rules: see ``toolchain/data/npz.py``)."""
    from toolchain.data import load_dataset

    with tempfile.TemporaryDirectory(prefix="toolchain-api-") as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, **_arrays(data))
        kwargs = {"task": task} if task is not None else {}
        return load_dataset(f"npz:{path}", **kwargs)


def compress(model, data, recipe: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
             out: Union[str, os.PathLike, None] = None, target: Optional[str] = None,
             quiet: bool = True):
    """Run the whole pipeline (``toolchain compress``) and return its ``CompressResult``.

    ``model``: a ``tf.keras.Model`` or a path; ``data``: a dataset spec string or numpy arrays as
    ``(x, y[, x_eval, y_eval])`` or a dict of npz keys; ``recipe``: ``None`` (the default recipe),
    a YAML path or a dict of recipe sections (omitted keys take the defaults); ``out``: the build
    directory (default ``build/<model name>``). ``result.artifacts`` maps each format to its file,
    ``result.summary`` is ``summary.json``.
    """
    from toolchain.compress import run_compress

    with tempfile.TemporaryDirectory(prefix="toolchain-api-") as tmp:
        work = Path(tmp)
        trust = False
        if isinstance(model, (str, os.PathLike)):
            model_path, name = str(model), Path(model).stem
        else:
            import tensorflow as tf

            from toolchain.model_io import save_model

            if not isinstance(model, tf.keras.Model):
                raise ConfigError(f"model is a {type(model).__name__}; pass a tf.keras.Model or a model file path")
            name = model.name or "model"
            model_path = str(save_model(model, work / f"{name}.keras"))
            trust = True  # the object is already in the caller's process: nothing new runs from the file
        if isinstance(data, str):
            spec = data
        else:
            path = work / "data.npz"
            np.savez(path, **_arrays(data))
            spec = f"npz:{path}"
        recipe_arg = dict(recipe) if isinstance(recipe, Mapping) else (None if recipe is None else str(recipe))
        out_dir = Path(out) if out is not None else Path("build") / name
        return run_compress(model_path, spec, str(out_dir), recipe_arg, target, trust_model=trust, quiet=quiet)
