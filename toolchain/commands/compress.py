"""``toolchain compress``: the whole pipeline from a Keras model to verified, benchmarked artifacts."""
import json


def add_parser(sub):
    from toolchain.cli import add_common, add_model_data

    p = sub.add_parser("compress", help="relevance → prune → quantize → export → verify → bench → report")
    add_model_data(p)
    p.add_argument("--recipe", help="YAML recipe (default: the built-in one; `toolchain recipe --example`)")
    p.add_argument("--target", help="override the recipe's bench target: local | ssh://[user@]host[:port] | "
                   "emulated-pi4 | emulated-pi5 | qemu-cortex-m4 | qemu-cortex-m7 (a microcontroller target "
                   "also changes the default recipe: `toolchain recipe --example --target qemu-cortex-m4`)")
    p.add_argument("--reference", metavar="TFLITE", help="on a qemu-cortex-m target: an integer .tflite (e.g. the "
                   "official int8 model) built and run as firmware the same way, for comparison")
    p.add_argument("--out", required=True, help="output directory (replaced only when the run succeeds)")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.compress import run_compress

    task = getattr(args, "task", None)
    result = run_compress(args.model, args.data, args.out, args.recipe, args.target, args.trust_model,
                          args.data_dir, quiet=args.quiet or args.json, task=None if task == "auto" else task,
                          reference=getattr(args, "reference", None))
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "headline": result.headline, "task": result.summary.get("task"),
                          "artifacts": result.summary.get("artifacts", []),
                          "fidelity": result.summary.get("fidelity")}, indent=2, default=str))
        return 0
    print(result.headline)
    print(f"report: {result.out_dir / 'report.html'} (and report.md, summary.json)")
    return 0
