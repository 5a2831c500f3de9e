"""``run_quantize``: the quantize stage end to end, as the CLI (and the pipeline) call it.

Loads the model and data, gets relevance (``--relevance DIR`` or computed on the calibration split
and cached), plans, simulates, and writes ``DIR/bitplan.json``, ``DIR/model_qat.h5`` (the
simulated tfmot model; load it with ``toolchain.quantize.load_qat_model``), ``DIR/quantize.json``
and ``DIR/bitplan.png`` through ``staged_output`` (the directory is complete or absent).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from toolchain.outdir import check_output_dir, staged_output

BITPLAN_FILE = "bitplan.json"
REPORT_FILE = "quantize.json"
PLOT_FILE = "bitplan.png"


def run_quantize(model_path: str, data_spec: str, out: str, allocator: str = "relevance",
                 bits: Sequence[int] = (2, 4, 8), budget: Optional[str] = None, granularity: str = "layer",
                 group_size: int = 8, relevance_dir: Optional[str] = None, rule: Optional[str] = None,
                 weighting: Optional[str] = None, qat_epochs: int = 0, calibration_samples: Optional[int] = None,
                 int16_layers: int = 0, plan_path: Optional[str] = None, trust_model: bool = False,
                 use_cache: bool = True, quiet: bool = False, data_dir: Optional[str] = None):
    """``toolchain quantize``; returns the ``QuantizeResult``. ``plan_path`` applies an existing
    (e.g. hand-edited) ``bitplan.json`` instead of allocating."""
    from toolchain.pipeline import load_inputs
    from toolchain.quantize import (ALLOCATORS, DEFAULT_GROUP_SIZE, BitPlan, parse_bits, parse_budget, plan_bits,
                                    quantize)
    from toolchain.quantize.allocators import DEFAULT_WEIGHTING, allocator_key
    from toolchain.quantize.kernels import check_widths
    from toolchain.quantize.simulate import QAT_MODEL_FILE, save_qat_model

    # cheap checks first: a typo must not cost a model load
    plan = BitPlan.load(plan_path) if plan_path else None
    key = allocator_key(allocator)
    ALLOCATORS.get(key)
    check_widths(parse_bits(bits))
    parse_budget(budget)
    if rule is not None:
        from toolchain.relevance import RULES
        RULES.get(rule)
    check_output_dir(out)

    model, dataset = load_inputs(model_path, data_spec, None, trust_model, data_dir)
    relevance = None
    if plan is None and key == "quant.relevance" and relevance_dir:
        from toolchain.relevance import load_relevance
        relevance = load_relevance(relevance_dir)
    if plan is None:
        plan = plan_bits(model, dataset, key, bits, budget, granularity, group_size or DEFAULT_GROUP_SIZE,
                         relevance, rule, calibration_samples, weighting or DEFAULT_WEIGHTING, int16_layers,
                         use_cache, quiet)
    result = quantize(model, plan, dataset, qat_epochs=qat_epochs, calibration_samples=calibration_samples,
                      quiet=quiet)
    report = result.to_dict()
    report.update({"model": str(Path(model_path).resolve()), "data": data_spec,
                   "data_provenance": dataset.provenance, "plan_notes": dict(plan.notes),
                   "simulated_model": QAT_MODEL_FILE})
    with staged_output(out) as stage:
        plan.save(stage / BITPLAN_FILE)
        save_qat_model(result.model, stage / QAT_MODEL_FILE)
        (stage / REPORT_FILE).write_text(json.dumps(report, indent=2, default=_jsonable))
        plot_bitplan(plan, stage / PLOT_FILE, title=f"{plan.allocator} {plan.budget or ''} {plan.granularity}: "
                     f"{result.accuracy:.2%} simulated (float {result.float_accuracy:.2%})")
    return result


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def plot_bitplan(plan, path, title: str = "") -> Path:
    """Per layer: the width of every output channel (a heat strip) and the layer's mean width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.layers)
    rows = [np.asarray(plan.layers[n].channel_bits() if plan.layers[n].group_bits or plan.layers[n].num_channels
                       else (plan.layers[n].weight_bits,), dtype=float) for n in names]
    width = max(len(r) for r in rows)
    grid = np.full((len(names), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(names) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), [f"{n} ({np.nanmean(r):.2f} b)" for n, r in zip(names, rows)])
    ax.set_xlabel("output channel")
    fig.colorbar(im, ax=ax, label="weight bits")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
