"""Explanation fidelity: does the compressed model keep the original model's reasons?

Input relevance (LRP heatmaps) of the original and of the compressed model are computed on the
same evaluation samples, explaining the same class (the true label; for a regressor or autoencoder
all outputs, see ``toolchain.relevance``), and compared per sample with
the Pearson correlation of the flattened heatmaps. The compressed model analysed is a float Keras
model carrying the compressed weights (pruned, and quantised-then-dequantised to the planned widths):
iNNvestigate cannot analyse tfmot's fake-quant layers, and activation quantisation is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class FidelityResult:
    rule: str
    samples: int
    correlations: np.ndarray = field(repr=False)
    original_heatmaps: np.ndarray = field(repr=False)
    compressed_heatmaps: np.ndarray = field(repr=False)
    task: str = "classification"
    class_selection: str = "true"

    @property
    def mean_correlation(self) -> float:
        return float(np.nanmean(self.correlations))

    @property
    def median_correlation(self) -> float:
        return float(np.nanmedian(self.correlations))

    def summary(self) -> dict:
        return {"rule": self.rule, "samples": self.samples, "task": self.task,
                "class_selection": self.class_selection, "mean_correlation": self.mean_correlation,
                "median_correlation": self.median_correlation,
                "note": "The compressed model is analysed as float weights after pruning and weight "
                        "quantisation (activation quantisation is not modelled)."}


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def dequantized_copy(model, plan) -> "object":
    """A float, BatchNorm-folded copy of ``model`` whose planned kernels hold their
    quantised-then-dequantised values (each output channel at its planned width, the same
    quantiser the quantize stage simulates)."""
    from toolchain.canonicalize import CANONICAL_PREFIX, canonicalize
    from toolchain.quantize.kernels import Kernel

    folded = canonicalize(model).model
    for name, lb in plan.layers.items():
        layer = folded.get_layer(CANONICAL_PREFIX + name)
        weights = layer.get_weights()
        kernel = Kernel(name, type(layer).__name__, weights[0])
        bits = lb.channel_bits() if lb.group_bits is not None else lb.weight_bits
        weights[0] = kernel.fake_quant(bits).reshape(weights[0].shape).astype(np.float32)
        layer.set_weights(weights)
    return folded


def explanation_fidelity(original, compressed, x: np.ndarray, y: np.ndarray, rule: str = "lrp.epsilon",
                         quiet: bool = True, task: Optional[str] = None) -> FidelityResult:
    from toolchain.relevance import compute_relevance

    a = compute_relevance(original, x, y, rule=rule, heatmaps=len(x), quiet=quiet, task=task)
    b = compute_relevance(compressed, x, y, rule=rule, heatmaps=len(x), quiet=quiet, task=task)
    return FidelityResult(rule, len(x), pearson_rows(a.heatmaps, b.heatmaps), a.heatmaps, b.heatmaps,
                          a.task, a.class_selection)


def _image(a: np.ndarray, reduce) -> np.ndarray:
    """A 2-D picture of one sample or heatmap: channels of (H, W, C) reduced, (F,) as one row."""
    return np.atleast_2d(reduce(a, axis=-1) if a.ndim == 3 else a)


def plot_fidelity(result: FidelityResult, x: np.ndarray, path: str | Path, count: int = 6,
                  class_names: Optional[list] = None, y: Optional[np.ndarray] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(count, result.samples)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 5.4), squeeze=False)
    for i in range(n):
        img = _image(x[i], np.mean)
        h0 = _image(result.original_heatmaps[i], np.sum)
        h1 = _image(result.compressed_heatmaps[i], np.sum)
        lim = max(float(np.abs(h0).max()), float(np.abs(h1).max()), 1e-12)
        axes[0, i].imshow(img, cmap="gray", aspect="auto")
        axes[1, i].imshow(h0, cmap="bwr", vmin=-lim, vmax=lim, aspect="auto")
        axes[2, i].imshow(h1, cmap="bwr", vmin=-lim, vmax=lim, aspect="auto")
        label = class_names[int(y[i])] if (class_names and y is not None and result.task == "classification") else ""
        axes[0, i].set_title(f"{label} r={result.correlations[i]:.2f}", fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, text in enumerate(("input", "original", "compressed")):
        axes[row, 0].set_ylabel(text)
    fig.suptitle(f"LRP heatmaps ({result.rule}); mean correlation {result.mean_correlation:.3f} "
                 f"over {result.samples} samples", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
