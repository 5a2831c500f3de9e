"""``toolchain train``: train a zoo architecture on a dataset and save it."""
import json

from toolchain.cli import add_common, bounded_int, positive_int
from toolchain.recipe import MAX_EPOCHS


def add_parser(sub):
    p = sub.add_parser("train", help="train a model from the zoo")
    p.add_argument("--arch", required=True, help="architecture; `toolchain list models` lists them")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--data-dir", help="where cached Keras datasets live")
    p.add_argument("--epochs", type=bounded_int(1, MAX_EPOCHS), default=10)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="model file to write (.keras or .h5)")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain import pipeline

    result = pipeline.run_train(args.arch, args.data, args.epochs, args.out, args.batch_size,
                                args.seed, args.quiet, args.data_dir)
    if args.json:
        print(json.dumps({"path": str(result.path), "accuracy": result.accuracy, "epochs": result.epochs}))
    else:
        print(f"saved {result.path} (eval accuracy {result.accuracy:.2%})")
    return 0
