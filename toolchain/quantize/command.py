"""``toolchain quantize``: plan mixed-precision weight widths under a budget and simulate them."""
import json

from toolchain.cli import add_common, add_model_data, positive_int, non_negative_int


def add_parser(sub):
    p = sub.add_parser("quantize", help="relevance-driven mixed-precision bit plan, simulated with tfmot")
    add_model_data(p)
    p.add_argument("--allocator", default="relevance",
                   help="relevance (default), sensitivity, uniform, or a registry key quant.*")
    p.add_argument("--bits", default="2,4,8", help="candidate weight widths, e.g. 2,4,8 (uniform: one width)")
    p.add_argument("--budget", help="avg-bits=4 | size-kb=12 | bits=N (packed nonzero weight bits); "
                   "required for relevance and sensitivity")
    p.add_argument("--granularity", default="layer", choices=("layer", "group"),
                   help="one width per layer, or per group of output channels")
    p.add_argument("--group-size", type=positive_int, default=8, help="output channels per group (default 8)")
    p.add_argument("--relevance", metavar="DIR", help="relevance from `toolchain relevance` (default: computed on "
                   "the calibration split and cached)")
    p.add_argument("--rule", help="LRP rule when relevance is computed here (default lrp.epsilon)")
    p.add_argument("--weighting", help="how relevance weights the quantisation error: relative_sq (default), "
                   "relative, relative_layer, mse, taylor, taylor_channel")
    p.add_argument("--qat-epochs", type=non_negative_int, default=0,
                   help="quantisation-aware fine-tuning epochs on the train split (default 0)")
    p.add_argument("--samples", type=positive_int, help="first N calibration samples (default: all)")
    p.add_argument("--int16-layers", type=non_negative_int, default=0,
                   help="give the N layers with the largest remaining loss 16-bit activations (default 0)")
    p.add_argument("--plan", metavar="BITPLAN_JSON", help="apply this (e.g. hand-edited) bitplan.json instead of "
                   "allocating")
    p.add_argument("--no-cache", action="store_true", help="recompute relevance even if cached")
    p.add_argument("--out", required=True, help="output directory")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.quantize.stage import run_quantize

    result = run_quantize(args.model, args.data, args.out, args.allocator, args.bits, args.budget,
                          args.granularity, args.group_size, args.relevance, args.rule, args.weighting,
                          args.qat_epochs, args.samples, args.int16_layers, args.plan, args.trust_model,
                          not args.no_cache, args.quiet, args.data_dir)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=float))
        return 0
    size = result.size
    print(f"{'layer':24s} {'widths':>24s} {'act':>4s} {'nonzero':>8s} {'avg bits':>8s}")
    for name, lb in result.plan.layers.items():
        info = size.layers[name]
        widths = str(lb.weight_bits) if lb.group_bits is None else ",".join(map(str, lb.group_bits))
        if len(widths) > 24:
            widths = widths[:21] + "..."
        print(f"{name:24s} {widths:>24s} {lb.activation_bits:4d} {info['nonzero_weights']:8d} {info['avg_bits']:8.2f}")
    print(f"\n{result.plan.allocator} ({result.plan.granularity}, {result.plan.budget or 'no budget'}): "
          f"{size.avg_weight_bits:.3f} bits/weight, {size.packed_weight_bytes} B packed "
          f"(+{size.scale_overhead_bytes} B scales, {size.bias_bytes} B biases; dense {size.dense_packed_weight_bytes} B, "
          f"gzip {size.gzip_packed_weight_bytes} B)")
    qat = f" after {result.qat_epochs} QAT epochs (before: {result.accuracy_before_qat:.2%})" if result.qat_epochs else ""
    print(f"simulated accuracy {result.accuracy:.2%}{qat}, float {result.float_accuracy:.2%} "
          f"on {result.eval_samples} eval samples; wrote {args.out}/bitplan.json, model_qat.h5, quantize.json, bitplan.png")
    return 0
