"""``toolchain relevance``: per-weight LRP relevance of a model on calibration data."""
import json

from toolchain.cli import add_common, add_model_data, positive_int


def add_parser(sub):
    from toolchain.relevance import CLASS_SELECTIONS, DEFAULT_RULE

    p = sub.add_parser("relevance", help="per-weight LRP relevance (iNNvestigate)")
    add_model_data(p)
    p.add_argument("--rule", default=DEFAULT_RULE,
                   help=f"LRP rule set (default {DEFAULT_RULE}); `toolchain list rules` lists them")
    p.add_argument("--samples", type=positive_int, help="first N calibration samples (default: all)")
    p.add_argument("--classes", default="true", choices=CLASS_SELECTIONS,
                   help="explain the true class (default), the predicted class, or all classes")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    p.add_argument("--out", required=True, help="output directory")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain import pipeline

    rmap = pipeline.run_relevance(args.model, args.data, args.out, args.rule, args.samples,
                                  args.classes, args.trust_model, not args.no_cache, args.quiet,
                                  args.data_dir)
    if args.json:
        print(json.dumps(rmap.metadata(), indent=2))
        return 0
    print(pipeline.relevance_summary_table(rmap))
    how = "from cache" if rmap.cached else f"in {rmap.timings.get('worker_wall', 0):.1f} s"
    print(f"\n{rmap.rule} on {rmap.samples} samples ({how}); wrote {args.out}/relevance.npz, "
          "relevance.json, relevance_layers.png, relevance_heatmaps.png")
    return 0
