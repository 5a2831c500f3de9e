"""Stages wired in order. The CLI parses arguments and calls these; each returns a stage's result
and writes its outputs through ``staged_output`` (complete or absent, never half-written)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from toolchain.errors import DataError
from toolchain.outdir import check_output_dir, staged_output


def load_inputs(model_path: str, data_spec: str, samples: Optional[int] = None,
                trust_model: bool = False, data_dir: Optional[str] = None, task: Optional[str] = None):
    """The user's model and a dataset checked against it.

    The dataset's ``task`` is resolved from the model and data (``toolchain.task.resolve_task``;
    ``task`` is the caller's override, refused when the targets contradict it) and set on the
    returned dataset. Classifiers must output one score per class; regressors and autoencoders one
    value per target value."""
    from toolchain.data import check_compatible, fit_to_model, load_dataset, with_task
    from toolchain.model_io import load_model
    from toolchain.task import resolve_task

    model = load_model(model_path, trust_model=trust_model)
    sample_shape = tuple(model.input_shape[1:])
    # the model's input shape: images: resize to it; any data: add/drop a unit channel axis to fit it
    dataset = fit_to_model(load_dataset(data_spec, data_dir=data_dir, samples=samples, task=task,
                                        input_shape=sample_shape), sample_shape)
    resolved = resolve_task(model, dataset, task)
    if resolved != dataset.task:
        dataset = with_task(dataset, resolved)
    if dataset.is_classification:
        check_compatible(dataset, tuple(model.input_shape[1:]), int(model.output_shape[-1]))
    else:
        check_targets_compatible(dataset, tuple(model.input_shape[1:]), tuple(model.output_shape[1:]))
    return model, dataset


def check_targets_compatible(dataset, input_shape: Sequence, output_shape: Sequence) -> None:
    """Raise ``DataError`` listing every way a regression/autoencoder ``dataset`` does not fit a
    model with these per-sample input and output shapes (``None`` dimensions match any size): the
    samples must have the input's shape and the targets as many values as the output."""
    def fits(model_shape, data_shape):
        return len(model_shape) == len(data_shape) and all(
            m is None or m < 0 or m == d for m, d in zip(model_shape, data_shape))

    problems = []
    if not fits(tuple(input_shape), tuple(dataset.input_shape)):
        problems.append(f"samples have shape {tuple(dataset.input_shape)} but the model expects {tuple(input_shape)}")
    target = tuple(dataset.target_shape)
    out = tuple(output_shape)
    same_width = None not in out and int(np.prod(out)) == int(np.prod(target))
    if not (fits(out, target) or same_width):
        problems.append(f"targets have shape {target} but the model outputs {out}")
    if problems:
        raise DataError(f"{dataset.task} dataset {dataset.name!r} does not fit the model: " + "; ".join(problems)
                        + "; use the dataset the model was trained on, or a model built for this dataset")


def relevance_summary_table(rmap) -> str:
    rows = [f"{'layer':24s} {'class':16s} {'weights':>8s} {'sum':>12s} {'>0':>6s} {'=0':>6s} {'<0':>6s}"]
    for name, lr in rmap.layers.items():
        s = lr.summary()
        rows.append(f"{name:24s} {lr.layer_class:16s} {lr.weight.size:8d} {s['sum']:12.4g} "
                    f"{s['positive_share']:6.1%} {s['zero_share']:6.1%} {s['negative_share']:6.1%}")
    return "\n".join(rows)


def run_relevance(model_path: str, data_spec: str, out: str, rule: str, samples: Optional[int] = None,
                  class_selection: str = "true", trust_model: bool = False, use_cache: bool = True,
                  quiet: bool = False, data_dir: Optional[str] = None):
    """``toolchain relevance``: per-weight relevance on the first ``samples`` calibration samples,
    written as ``relevance.npz`` + ``relevance.json`` + plots in ``out``."""
    from toolchain.relevance import RULES, compute_relevance, save_relevance
    from toolchain.relevance.plots import plot_heatmaps, plot_layer_distributions

    RULES.get(rule)  # unknown rule: fail before loading anything
    check_output_dir(out, inputs=[model_path, data_spec.split(":", 1)[1] if ":" in data_spec else None])
    model, dataset = load_inputs(model_path, data_spec, samples, trust_model, data_dir)
    x, y = dataset.calibration(samples)
    rmap = compute_relevance(model, x, y, rule=rule, class_selection=class_selection,
                             use_cache=use_cache, quiet=quiet, task=dataset.task)
    with staged_output(out) as stage:
        save_relevance(rmap, stage)
        meta = json.loads((stage / "relevance.json").read_text())
        meta.update({"model": str(Path(model_path).resolve()), "data": data_spec,
                     "data_provenance": dataset.provenance})
        (stage / "relevance.json").write_text(json.dumps(meta, indent=2))
        plot_layer_distributions(rmap, stage / "relevance_layers.png")
        plot_heatmaps(rmap, x[: len(rmap.heatmaps)], stage / "relevance_heatmaps.png", list(dataset.class_names))
    return rmap


def run_train(arch: str, data_spec: str, epochs: int, out: str, batch_size: int = 64, seed: int = 0,
              quiet: bool = False, data_dir: Optional[str] = None):
    from models import train_model
    from toolchain.data import load_dataset

    dataset = load_dataset(data_spec, data_dir=data_dir)
    return train_model(arch, dataset, epochs, out, batch_size=batch_size, seed=seed,
                       verbose=0 if quiet else 1)
