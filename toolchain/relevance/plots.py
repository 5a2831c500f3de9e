"""Plots a person would rather see than read: per-layer relevance distributions, input heatmaps."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_distributions(rmap, path: str | Path) -> Path:
    """Per layer: the spread of per-weight relevance (symlog), and the share of +/0/- weights."""
    plt = _pyplot()
    names = list(rmap.layers)
    data = [rmap[n].weight.ravel() for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.45 * len(names) + 1.5)),
                                   gridspec_kw={"width_ratios": [3, 1]})
    ax1.boxplot(data, vert=False, labels=names, showfliers=False, whis=(1, 99))
    ax1.axvline(0, color="grey", lw=0.8)
    scale = max(float(np.percentile(np.abs(np.concatenate(data)), 50)), 1e-12)
    ax1.set_xscale("symlog", linthresh=scale)
    ax1.invert_yaxis()
    ax1.set_xlabel("per-weight relevance (1st-99th percentile, symlog)")
    ax1.set_title(f"{rmap.rule}, {rmap.samples} samples, class: {rmap.class_selection}")
    pos = np.array([(rmap[n].weight > 0).mean() for n in names])
    zero = np.array([(rmap[n].weight == 0).mean() for n in names])
    neg = 1 - pos - zero
    y = np.arange(len(names))
    ax2.barh(y, pos, color="tab:red", label="> 0")
    ax2.barh(y, zero, left=pos, color="lightgrey", label="= 0")
    ax2.barh(y, neg, left=pos + zero, color="tab:blue", label="< 0")
    ax2.set_yticks(y, [""] * len(names))
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of weights")
    ax2.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(rmap, x: np.ndarray, path: str | Path, class_names=None) -> Path:
    """Input samples beside their LRP heatmaps (red: evidence for the class, blue: against)."""
    plt = _pyplot()
    n = len(rmap.heatmaps)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.8 * max(n, 1), 4), squeeze=False)
    for i in range(n):
        # images (H, W, C) average their channels; 1-D samples (F,) show as one row
        img = np.atleast_2d(x[i].mean(axis=-1) if x[i].ndim == 3 else x[i])
        heat = np.atleast_2d(rmap.heatmaps[i].sum(axis=-1) if rmap.heatmaps[i].ndim == 3 else rmap.heatmaps[i])
        lim = max(float(np.abs(heat).max()), 1e-12)
        axes[0, i].imshow(img, cmap="gray", aspect="auto")
        axes[1, i].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim, aspect="auto")
        label = int(rmap.heatmap_labels[i]) if len(rmap.heatmap_labels) > i else -1
        everything = "all outputs" if rmap.class_selection == "all_outputs" else "all classes"
        title = everything if label < 0 else (class_names[label] if class_names else str(label))
        axes[0, i].set_title(title, fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("relevance")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
