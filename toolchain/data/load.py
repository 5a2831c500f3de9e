"""``load_dataset``: one spec string names where the data comes from and how it is split."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from toolchain.data.dataset import TASKS, Dataset
from toolchain.data.digits import load_digits
from toolchain.data.keras_cache import load_cifar10, load_fashion_mnist, load_mnist
from toolchain.data.images import load_images
from toolchain.data.kws01 import load_kws01
from toolchain.data.npz import load_npz
from toolchain.errors import ConfigError
from toolchain.registry import Registry


@dataclass(frozen=True)
class DatasetKind:
    """How a spec kind is loaded and which parts of the spec it takes.

    ``path`` is "none", "optional" or "required" (the ``:PATH`` after the kind);
    ``uses_data_dir`` says whether the ``data_dir`` argument means anything to it. ``load`` takes
    (path, data_dir, options): ``options`` holds ``task`` (an override or None) and ``input_shape``
    (the model's sample shape or None) for the loaders that use them.
    """

    load: Callable[[Optional[str], Optional[str], dict], Dataset]
    path: str
    uses_data_dir: bool
    summary: str
    #: how the spec is written when ``key:PATH`` does not say it (``images:DIR[?scale=...]``)
    usage: Optional[str] = None

    def form(self, key: str) -> str:
        if self.usage:
            return self.usage
        return {"none": key, "optional": f"{key}[:PATH]", "required": f"{key}:PATH"}[self.path]


DATASETS: Registry[DatasetKind] = Registry("dataset")
DATASETS.register("digits", DatasetKind(
    lambda path, data_dir, o: load_digits(), "none", False,
    "scikit-learn 8x8 digits, bundled offline"))
DATASETS.register("kws01", DatasetKind(
    lambda path, data_dir, o: load_kws01(path), "optional", False,
    "MLPerf Tiny KWS eval set (EEMBC .bin files)"))
DATASETS.register("mnist", DatasetKind(
    lambda path, data_dir, o: load_mnist(data_dir), "none", True,
    "MNIST from the Keras cache"))
DATASETS.register("fashion_mnist", DatasetKind(
    lambda path, data_dir, o: load_fashion_mnist(data_dir), "none", True,
    "Fashion-MNIST from the Keras cache or Debian's dataset-fashion-mnist"))
DATASETS.register("cifar10", DatasetKind(
    lambda path, data_dir, o: load_cifar10(data_dir), "none", True,
    "CIFAR-10 from the Keras cache"))
DATASETS.register("images", DatasetKind(
    lambda path, data_dir, o: load_images(path, o.get("input_shape")), "required", False,
    "class folders of images (DIR/<class>/*.jpg; DIR/train + DIR/test), resized to the model's input; "
    "?scale=1|255|-1 (default 1: 0..1)",
    "images:DIR[?scale=1|255|-1&train_per_class=N&eval_per_class=N]"))
DATASETS.register("npz", DatasetKind(
    lambda path, data_dir, o: load_npz(path, o.get("task")), "required", False,
    "your own arrays x, y[, x_eval, y_eval, class_names] in one .npz"))


def known_specs() -> str:
    """The spec forms, for messages and ``--help``: "cifar10, digits, ..., npz:PATH"."""
    return ", ".join(DATASETS.get(k).form(k) for k in DATASETS.keys())


def load_dataset(spec: str, data_dir: str | None = None, samples: int | None = None,
                 task: str | None = None, input_shape: tuple | None = None) -> Dataset:
    """Load the dataset ``spec`` names; ``samples`` keeps only the first N train samples.

    ``task`` overrides the task the data implies (``classification``, ``regression``,
    ``autoencoder``; see ``toolchain.task``); ``input_shape`` is the model's sample shape, which
    loaders that resize (``images:``) need.

    Specs: ``digits``, ``kws01`` or ``kws01:PATH``, ``mnist``, ``fashion_mnist``, ``cifar10``
    (read from the Keras cache, searched in ``data_dir`` first; ``fashion_mnist`` also from
    /usr/share/datasets/fashion-mnist), ``images:DIR[?scale=..&train_per_class=..]`` (class
    folders, see ``toolchain.data.images``), ``npz:PATH``.
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

    if task is not None and task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}; pass one of them or None to infer it")
    dataset = with_task(kind.load(path.strip() if sep else None, data_dir,
                                  {"task": task, "input_shape": input_shape}), task)
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


def with_task(dataset: Dataset, task: str | None) -> Dataset:
    """``dataset`` as the ``task`` the user asked for. A labelled dataset becomes an autoencoder one
    (targets = inputs; its labels are dropped); any other change the targets cannot support is a
    ``ConfigError`` naming both."""
    if task is None or task == dataset.task:
        return dataset
    if task == "autoencoder":
        x_eval = dataset.x_eval
        return dataclasses.replace(
            dataset, task="autoencoder", y_train=dataset.x_train.copy(),
            y_eval=None if x_eval is None else x_eval.copy(), class_names=(), anomaly_eval=None,
            provenance=f"{dataset.provenance}; as an autoencoder dataset (targets = inputs, labels dropped)")
    if task == "regression" and dataset.task == "autoencoder":
        return dataclasses.replace(dataset, task="regression", anomaly_eval=None,
                                   provenance=f"{dataset.provenance}; as a regression dataset (targets = inputs)")
    raise ConfigError(
        f"dataset {dataset.name!r} holds {dataset.task} targets, so it cannot be used as a {task} dataset; "
        f"drop the task override (--task / recipe task) or give {task} targets"
    )
