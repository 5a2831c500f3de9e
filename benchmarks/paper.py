"""The paper's experiment: VGG16- and AlexNet-style CNNs on Fashion-MNIST and CIFAR-10, ours against
the standard flows.

The method's paper reports models 64% smaller than the originals with better accuracy than earlier
explainability-based compression, on VGG16 and AlexNet for Fashion-MNIST and CIFAR-10. For every
dataset found in the Keras cache (``toolchain.data.keras_cache``: never downloaded) and every
architecture, this trains the model from the zoo (``--epochs``, optionally on the first
``--train-samples`` training samples), then runs ``run_all.run_case``'s comparison on the test split:
float32, uniform int8 (the standard flow), magnitude pruning + int8, magnitude filters + fine-tuning
+ int8, and ours (``toolchain compress`` with ``benchmarks/recipes/paper.yaml`` or ``--recipe``).
Each row gets its size reduction against the float32 artifact and its accuracy change in points.
A dataset that is not cached is skipped with the loader's message (which file is missing, where it
was looked for, how to provide it).

    python benchmarks/paper.py [--data fashion_mnist cifar10] [--arch vgg16 alexnet] [--epochs 10]
                               [--train-samples N] [--recipe FILE] [--runs 200]

Writes benchmarks/results/paper.{md,json,png}; ``run_all.py`` runs it too and quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from run_all import RESULTS, run_case  # the script's folder is on sys.path

DATASETS = ("fashion_mnist", "cifar10")
ARCHS = ("vgg16", "alexnet")
PAPER_RECIPE = Path(__file__).resolve().parent / "recipes" / "paper.yaml"
#: what the paper reports for its own method: 64% smaller than the original
PAPER_REDUCTION = 0.64


def run_experiment(work: Path, datasets=DATASETS, archs=ARCHS, epochs: int = 10, train_samples=None,
                   recipe=PAPER_RECIPE, runs: int = 200, paired_runs=None) -> dict:
    """Train and compare every (dataset, architecture); unavailable datasets are listed in
    ``skipped`` with the reason. Returns {"cases": {name: case}, "skipped": [...], "settings": ...}."""
    from models import train_model
    from toolchain.data import load_dataset
    from toolchain.errors import DataError

    out = {"cases": {}, "skipped": [],
           "settings": {"epochs": epochs, "train_samples": train_samples, "recipe": str(recipe), "runs": runs}}
    for spec in datasets:
        try:
            ds = load_dataset(spec, samples=train_samples)
        except DataError as e:
            out["skipped"].append(f"{spec}: skipped — {e}")
            print(f"{spec}: skipped ({e})", flush=True)
            continue
        for arch in archs:
            name = f"{arch} on {spec}"
            print(name, flush=True)
            t0 = time.perf_counter()
            model_path = work / f"{arch}_{spec}.keras"
            trained = train_model(arch, ds, epochs, model_path, verbose=2)  # a line per epoch
            case = run_case(f"{arch}_{spec}", model_path, spec, runs, work / f"{arch}_{spec}",
                            recipe_path=str(recipe), paired_runs=paired_runs)
            case["train"] = {"epochs": epochs, "train_samples": len(ds.x_train), "accuracy": trained.accuracy,
                             "seconds": time.perf_counter() - t0 - case["seconds"]}
            case["reductions"] = reductions(case["rows"])
            out["cases"][name] = case
    return out


def reductions(rows) -> list:
    """Each TFLite row's size reduction against the float32 TFLite artifact and its accuracy change
    in points against it."""
    fp32 = next(r for r in rows if r["flow"] == "float32" and r["format"] == "tflite-fp32")
    return [{"flow": r["flow"], "format": r["format"], "bytes": r["bytes"],
             "reduction": 1.0 - r["bytes"] / fp32["bytes"],
             "accuracy": r["accuracy"], "accuracy_change_points": 100 * (r["accuracy"] - fp32["accuracy"])}
            for r in rows if r["format"].startswith("tflite")]


def markdown(results: dict, command: str) -> list:
    md = [f"Command: `{command}`; the paper reports {PAPER_REDUCTION:.0%} smaller models. Reduction = 1 - "
          "artifact bytes / float32 TFLite bytes; accuracy on the test split; latency 1 thread, XNNPACK on.", ""]
    for name, case in results["cases"].items():
        t = case["train"]
        md += [f"### {name}", "",
               f"Trained {t['epochs']} epochs on {t['train_samples']:,} samples ({t['accuracy']:.2%} float).", "",
               "| flow | format | accuracy | change (points) | artifact B | reduction | > 64% smaller |",
               "|---|---|---:|---:|---:|---:|---|"]
        for r in case["reductions"]:
            md.append(f"| {r['flow']} | {r['format']} | {r['accuracy']:.2%} | {r['accuracy_change_points']:+.1f} | "
                      f"{r['bytes']:,} | {r['reduction']:.1%} | "
                      f"{'yes' if r['reduction'] > PAPER_REDUCTION else 'no'} |")
        md.append("")
    md += [f"- {s}" for s in results["skipped"]]
    if not results["cases"]:
        md += ["", "Nothing ran: put the datasets in the Keras cache (or pass `--data-dir`) and run "
                   "`python benchmarks/paper.py`."]
    return md


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, (name, case) in zip(axes[0], cases.items()):
        for r in case["reductions"]:
            ax.scatter(100 * r["reduction"], r["accuracy_change_points"], s=36,
                       color="tab:green" if r["flow"].startswith("ours") else "tab:gray")
            ax.annotate(f"{r['flow']} ({r['format'].replace('tflite-', '')})",
                        (100 * r["reduction"], r["accuracy_change_points"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(100 * PAPER_REDUCTION, color="tab:red", ls="--", lw=1, label="paper: 64% smaller")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("size reduction vs float32 TFLite (%)")
        ax.set_ylabel("accuracy change (points)")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, results_dir: Path, command: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "paper.json").write_text(json.dumps(results, indent=2, default=str))
    md = ["# The paper's experiment: VGG16 / AlexNet on Fashion-MNIST and CIFAR-10", ""] + markdown(results, command)
    (results_dir / "paper.md").write_text("\n".join(md) + "\n")
    if results["cases"]:
        _plot(results, results_dir / "paper.png")
    return results_dir / "paper.md"


def main(argv=None) -> int:
    from toolchain.cli import positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    ap.add_argument("--epochs", type=positive_int, default=10)
    ap.add_argument("--train-samples", type=positive_int, default=None, help="train on the first N samples (default: all)")
    ap.add_argument("--data-dir", help="the folder holding fashion-mnist/ and cifar-10-batches-py/ "
                                       "(default: $TOOLCHAIN_DATA_DIR, then the Keras cache)")
    ap.add_argument("--recipe", default=str(PAPER_RECIPE), help="recipe for ours (default: %(default)s)")
    ap.add_argument("--runs", type=positive_int, default=200, help="timed inferences per artifact")
    ap.add_argument("--paired-runs", type=positive_int, default=None, help="runs per round of the paired speed-up")
    ap.add_argument("--results", default=str(RESULTS), help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    from toolchain.errors import ConfigError
    from toolchain.recipe import load_recipe

    try:
        load_recipe(args.recipe)  # before hours of training, not after
    except ConfigError as e:
        ap.error(str(e))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.data_dir:
        os.environ["TOOLCHAIN_DATA_DIR"] = args.data_dir  # every later load (compress, bench) sees it
    with tempfile.TemporaryDirectory(prefix="paper-") as tmp:
        results = run_experiment(Path(tmp), args.data, args.arch, args.epochs, args.train_samples, args.recipe,
                                 args.runs, args.paired_runs)
    command = "python benchmarks/paper.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write(results, Path(args.results), command.strip()).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
