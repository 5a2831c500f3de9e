"""``toolchain``: the command line. It parses arguments and calls ``toolchain.pipeline``.

A ``ToolchainError`` prints as one line ``error: ...`` with exit code 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Keras model: .keras, .h5 or a SavedModel directory")
    p.add_argument("--data", required=True,
                   help="dataset spec: digits, kws01[:PATH], mnist, fashion_mnist, cifar10, npz:PATH")
    p.add_argument("--data-dir", help="where cached Keras datasets live (default: the Keras cache)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers and custom objects (loading them can execute code)")


def build_parser() -> argparse.ArgumentParser:
    from toolchain.relevance import CLASS_SELECTIONS, DEFAULT_RULE

    parser = argparse.ArgumentParser(prog="toolchain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("relevance", help="per-weight LRP relevance (iNNvestigate)")
    _model_data(p)
    p.add_argument("--rule", default=DEFAULT_RULE, help=f"LRP rule set (default {DEFAULT_RULE}); "
                   "see `toolchain rules`")
    p.add_argument("--samples", type=_positive_int, help="first N calibration samples (default: all)")
    p.add_argument("--classes", default="true", choices=CLASS_SELECTIONS,
                   help="explain the true class (default), the predicted class, or all classes")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)

    p = sub.add_parser("train", help="train a model from the zoo")
    p.add_argument("--arch", required=True, help="architecture: see `toolchain models`")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="model file to write (.keras or .h5)")
    _common(p)

    p = sub.add_parser("rules", help="list the LRP rule sets")
    _common(p)
    p = sub.add_parser("models", help="list the model zoo architectures")
    _common(p)
    return parser


def _run(args) -> int:
    from toolchain import pipeline

    if args.command == "relevance":
        rmap = pipeline.run_relevance(args.model, args.data, args.out, args.rule, args.samples,
                                      args.classes, args.trust_model, not args.no_cache, args.quiet,
                                      args.data_dir)
        if args.json:
            print(json.dumps(rmap.metadata(), indent=2))
        else:
            print(pipeline.relevance_summary_table(rmap))
            how = "from cache" if rmap.cached else f"in {rmap.timings.get('worker_wall', 0):.1f} s"
            print(f"\n{rmap.rule} on {rmap.samples} samples ({how}); wrote {args.out}/relevance.npz, "
                  f"relevance.json, relevance_layers.png, relevance_heatmaps.png")
    elif args.command == "train":
        result = pipeline.run_train(args.arch, args.data, args.epochs, args.out, args.batch_size,
                                    args.seed, args.quiet, args.data_dir)
        if args.json:
            print(json.dumps({"path": str(result.path), "accuracy": result.accuracy, "epochs": result.epochs}))
        else:
            print(f"saved {result.path} (eval accuracy {result.accuracy:.2%})")
    elif args.command == "rules":
        from toolchain.relevance import RULES

        for key in RULES:
            print(f"{key:22s} {RULES.get(key).description}")
    elif args.command == "models":
        from models import ARCHITECTURES

        for key in ARCHITECTURES:
            arch = ARCHITECTURES.get(key)
            print(f"{key:12s} {getattr(arch, 'description', '')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from toolchain.errors import ToolchainError

    try:
        return _run(args)
    except ToolchainError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
