"""The pruning stage on files: load a model and data, prune, write ``model.keras`` + ``prune.json``.

This is what ``toolchain prune`` calls (the pipeline's ``run_prune``): the output directory is
written through ``staged_output``, so it is complete or absent, never half-written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from toolchain.outdir import check_output_dir, staged_output


def run_prune(model_path: str, data_spec: str, out: str, *, criterion: str = "relevance",
              granularity: str = "weight", rule: Optional[str] = None, sparsity: Optional[float] = None,
              scope: str = "layer", relevance_dir: Optional[str] = None, lrp_rule: Optional[str] = None,
              class_selection: Optional[str] = None, score: Optional[str] = None,
              source: Optional[str] = None, samples: Optional[int] = None,
              schedule: str = "one_shot", iterations: Optional[int] = None, fine_tune_epochs: int = 0,
              distill_steps: int = 0, distill_temperature: float = 1.0, channel_multiple: int = 1,
              seed: int = 0, trust_model: bool = False, use_cache: bool = True, quiet: bool = False,
              data_dir: Optional[str] = None):
    """Prune the model at ``model_path`` on ``data_spec`` and write ``out/model.keras`` and
    ``out/prune.json`` (the ``PruneResult`` summary plus where the inputs came from)."""
    from toolchain.errors import ConfigError
    from toolchain.model_io import file_sha256, save_model
    from toolchain.pipeline import load_inputs
    from toolchain.prune import prune
    from toolchain.prune.criteria import GRANULARITIES, Target, get_criterion
    from toolchain.relevance import RULES, load_relevance

    # cheap checks first: a typo should not cost a model load
    crit = get_criterion(criterion)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if (rule is None) == (sparsity is None):
        raise ConfigError("give exactly one of --rule nonpositive or --sparsity S")
    Target.parse(rule) if rule is not None else Target.at(sparsity)
    if lrp_rule is not None:
        RULES.get(lrp_rule)
    if relevance_dir is not None and crit.key != "prune.relevance":
        raise ConfigError(f"--relevance was given but the criterion is {criterion}; drop it or use "
                          "--criterion relevance")
    from toolchain.prune.distill import DistillConfig

    distill = DistillConfig(steps=distill_steps, temperature=distill_temperature, seed=seed) if distill_steps else None
    check_output_dir(out)
    rmap = load_relevance(relevance_dir) if relevance_dir is not None else None

    model, dataset = load_inputs(model_path, data_spec, None, trust_model, data_dir)
    result = prune(model, dataset, criterion=crit.key, granularity=granularity, rule=rule,
                   sparsity=sparsity, relevance=rmap, lrp_rule=lrp_rule, class_selection=class_selection,
                   samples=samples, scope=scope, score=score, source=source, fine_tune_epochs=fine_tune_epochs,
                   schedule=schedule, iterations=iterations, seed=seed, use_cache=use_cache,
                   distill=distill, channel_multiple=channel_multiple, quiet=quiet)
    summary = result.summary()
    summary.update({
        "model": str(Path(model_path).resolve()), "model_sha256": file_sha256(model_path),
        "data": data_spec, "data_provenance": dataset.provenance,
        "relevance_source": str(Path(relevance_dir).resolve()) if relevance_dir else
        ("computed (cached)" if crit.key == "prune.relevance" else None),
    })
    with staged_output(out) as stage:
        save_model(result.model, stage / "model.keras")
        (stage / "prune.json").write_text(json.dumps(summary, indent=2))
    return result
