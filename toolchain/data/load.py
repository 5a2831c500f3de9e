"""``load_dataset``: one spec string names where the data comes from and how it is split."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from toolchain.data.dataset import Dataset
from toolchain.data.digits import load_digits
from toolchain.data.keras_cache import load_cifar10, load_fashion_mnist, load_mnist
from toolchain.data.kws01 import load_kws01
from toolchain.data.npz import load_npz
from toolchain.errors import ConfigError
from toolchain.registry import Registry


@dataclass(frozen=True)
class DatasetKind:
    """How a spec kind is loaded and which parts of the spec it takes.

    ``path`` is "none", "optional" or "required" (the ``:PATH`` after the kind);
    ``uses_data_dir`` says whether the ``data_dir`` argument means anything to it.
    """

    load: Callable[[Optional[str], Optional[str]], Dataset]
    path: str
    uses_data_dir: bool
    summary: str

    def form(self, key: str) -> str:
        return {"none": key, "optional": f"{key}[:PATH]", "required": f"{key}:PATH"}[self.path]


DATASETS: Registry[DatasetKind] = Registry("dataset")
DATASETS.register("digits", DatasetKind(
    lambda path, data_dir: load_digits(), "none", False,
    "scikit-learn 8x8 digits, bundled offline"))
DATASETS.register("kws01", DatasetKind(
    lambda path, data_dir: load_kws01(path), "optional", False,
    "MLPerf Tiny KWS eval set (EEMBC .bin files)"))
DATASETS.register("mnist", DatasetKind(
    lambda path, data_dir: load_mnist(data_dir), "none", True,
    "MNIST from the Keras cache"))
DATASETS.register("fashion_mnist", DatasetKind(
    lambda path, data_dir: load_fashion_mnist(data_dir), "none", True,
    "Fashion-MNIST from the Keras cache"))
DATASETS.register("cifar10", DatasetKind(
    lambda path, data_dir: load_cifar10(data_dir), "none", True,
    "CIFAR-10 from the Keras cache"))
DATASETS.register("npz", DatasetKind(
    lambda path, data_dir: load_npz(path), "required", False,
    "your own arrays x, y[, x_eval, y_eval, class_names] in one .npz"))


def known_specs() -> str:
    """The spec forms, for messages and ``--help``: "cifar10, digits, ..., npz:PATH"."""
    return ", ".join(DATASETS.get(k).form(k) for k in DATASETS.keys())


def load_dataset(spec: str, data_dir: str | None = None, samples: int | None = None) -> Dataset:
    """Load the dataset ``spec`` names; ``samples`` keeps only the first N train samples.

    Specs: ``digits``, ``kws01`` or ``kws01:PATH``, ``mnist``, ``fashion_mnist``, ``cifar10``
    (read from the Keras cache, searched in ``data_dir`` first), ``npz:PATH``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"dataset spec {spec!r} is empty; pass one of {known_specs()}")
    key, sep, path = spec.strip().partition(":")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset kind {key!r} in spec {spec!r}; known: {known_specs()}")
    kind = DATASETS.get(key)
    if sep and kind.path == "none":
        raise ConfigError(
            f"dataset spec {spec!r} gives a path, but {key} takes none; pass just {key!r}"
        )
    if kind.path == "required" and not path.strip():
        raise ConfigError(
            f"dataset spec {spec!r} has an empty path; pass {key}:PATH with the file to load"
        )
    if sep and kind.path == "optional" and not path.strip():
        raise ConfigError(
            f"dataset spec {spec!r} has an empty path; pass {key}:PATH, or just {key!r} for the "
            "default location"
        )
    if data_dir is not None and not kind.uses_data_dir:
        users = ", ".join(k for k in DATASETS.keys() if DATASETS.get(k).uses_data_dir)
        raise ConfigError(
            f"data_dir {data_dir!r} was given for {key}, but only {users} read it; "
            + (f"pass the location as {key}:PATH instead" if kind.path != "none"
               else "leave data_dir unset")
        )
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0
    ):
        raise ConfigError(
            f"samples={samples!r} is not allowed; pass a positive int (the number of train "
            "samples to keep) or None for all"
        )

    dataset = kind.load(path.strip() if sep else None, data_dir)
    if samples is None:
        return dataset
    available = len(dataset.x_train)
    if samples > available:
        raise ConfigError(
            f"samples={samples} asks for more train samples than dataset {dataset.name!r} has "
            f"({available}); pass samples <= {available}, or None for all"
        )
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[:samples],
        y_train=dataset.y_train[:samples],
        x_train_int8=None if dataset.x_train_int8 is None else dataset.x_train_int8[:samples],
        provenance=f"{dataset.provenance}; train split cut to its first {samples} samples",
    )
