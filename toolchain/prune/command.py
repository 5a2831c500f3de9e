"""``toolchain prune``: prune a model by relevance (or magnitude / random) and save it."""
import argparse
import json

from toolchain.cli import add_common, add_model_data, positive_int, non_negative_int


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a fraction in [0, 1), e.g. 0.5") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1); pass the fraction to remove, e.g. 0.5")
    return value




def add_parser(sub):
    from toolchain.prune.criteria import (DEFAULT_SCORE, DEFAULT_SOURCE, FILTER_SOURCES, GRANULARITIES,
                                          RELEVANCE_SCORES, SCOPES)
    from toolchain.prune import DEFAULT_ITERATIONS, SCHEDULES
    from toolchain.relevance import CLASS_SELECTIONS

    p = sub.add_parser("prune", help="prune weights or whole filters by LRP relevance",
                       description="Prune a model by LRP relevance (or magnitude / random as baselines) "
                                   "and write DIR/model.keras and DIR/prune.json.")
    add_model_data(p)
    p.add_argument("--criterion", default="relevance", choices=("relevance", "magnitude", "random"),
                   help="what ranks weights / filters (default relevance)")
    p.add_argument("--granularity", default="weight", choices=GRANULARITIES,
                   help="weight: masks with exact zeros; filter: remove whole channels, smaller model")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--rule", choices=("nonpositive",),
                        help="nonpositive: remove everything whose relevance is <= 0 (the paper's rule)")
    target.add_argument("--sparsity", type=_sparsity, help="fraction in [0, 1) to remove")
    p.add_argument("--scope", default="layer", choices=SCOPES,
                   help="rank per layer (default, same sparsity everywhere) or over the whole model")
    p.add_argument("--relevance", metavar="DIR",
                   help="relevance from `toolchain relevance --out DIR` (default: computed and cached)")
    p.add_argument("--lrp-rule", help="LRP rule set for relevance (default: the --relevance map's rule, "
                                      "else the library default); `toolchain list rules` lists them")
    p.add_argument("--classes", choices=CLASS_SELECTIONS,
                   help="relevance of the true class (default; with --relevance: the map's), the "
                        "predicted class, or all classes")
    p.add_argument("--score", choices=RELEVANCE_SCORES,
                   help=f"relevance score: {DEFAULT_SCORE} (default for --sparsity), sum (signed; always "
                        "used by --rule nonpositive) or abs_sum")
    p.add_argument("--source", choices=FILTER_SOURCES,
                   help=f"filter granularity: whose relevance scores a channel (default {DEFAULT_SOURCE})")
    p.add_argument("--samples", type=positive_int, help="first N calibration samples (default: all)")
    p.add_argument("--schedule", default="one_shot", choices=SCHEDULES,
                   help="prune once, or in --iterations steps with relevance re-estimated each time")
    p.add_argument("--iterations", type=positive_int, default=DEFAULT_ITERATIONS,
                   help=f"pruning steps of the iterative schedule (default {DEFAULT_ITERATIONS})")
    p.add_argument("--fine-tune-epochs", type=non_negative_int, default=0,
                   help="epochs of fine-tuning on the training split, masks held fixed (default 0)")
    p.add_argument("--distill-steps", type=non_negative_int, default=0,
                   help="knowledge distillation from the original model on augmented calibration "
                        "samples after pruning (no labels needed; 48000 in the default recipe)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--channel-multiple", type=positive_int, default=1,
                   help="filter granularity: keep a multiple of this many channels per layer (e.g. 16 "
                        "for XNNPACK's int8 kernels; default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute relevance even if cached")
    p.add_argument("--out", required=True, help="output directory")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.prune.run import run_prune

    result = run_prune(
        args.model, args.data, args.out, criterion=args.criterion, granularity=args.granularity,
        rule=args.rule, sparsity=args.sparsity, scope=args.scope, relevance_dir=args.relevance,
        lrp_rule=args.lrp_rule, class_selection=args.classes, score=args.score, source=args.source,
        samples=args.samples,
        schedule=args.schedule, iterations=args.iterations, fine_tune_epochs=args.fine_tune_epochs,
        distill_steps=args.distill_steps, distill_temperature=args.distill_temperature,
        channel_multiple=args.channel_multiple, seed=args.seed, trust_model=args.trust_model, use_cache=not args.no_cache, quiet=args.quiet,
        data_dir=args.data_dir)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
        return 0
    print(format_result(result))
    print(f"\nwrote {args.out}/model.keras and {args.out}/prune.json")
    return 0


def format_result(result) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.2%}"

    rows = [f"{'layer':28s} {'sparsity':>9s}"]
    rows += [f"{name:28s} {s:9.1%}" for name, s in result.layer_sparsity.items()]
    rows.append("")
    rows.append(f"{result.criterion} {result.granularity} {result.rule} ({result.scope}): "
                f"{result.sparsity:.1%} of the pruned units removed, kernels {result.kernel_sparsity:.1%} sparse")
    rows.append(f"parameters {result.params_before:,} -> {result.params_after:,} "
                f"(nonzero {result.nonzero_params_before:,} -> {result.nonzero_params_after:,})")
    rows.append(f"accuracy {pct(result.accuracy_before)} -> {pct(result.accuracy_after)} "
                f"on {result.eval_samples} evaluation samples")
    return "\n".join(rows)
