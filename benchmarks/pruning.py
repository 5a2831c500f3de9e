"""Pruning: does relevance beat magnitude? Accuracy against sparsity for ``toolchain.prune.prune``.

For the digits CNN (trained here with models.train_model, cached under the toolchain cache) with
and without fine-tuning, and the MLPerf Tiny DS-CNN on kws01 (relevance from the 500 calibration
samples, accuracy on the 500 evaluation samples, no fine-tuning: kws01 has no training data), at
weight and filter granularity, it compares

* ``relevance`` with the prune stage's defaults (LRP-epsilon, true class, |relevance|; filters:
  the relevance leaving each feature map), ``magnitude`` (tfmot's |w| / L1 filter norm) and
  ``random`` (mean over seeds) at sparsities 0.3 .. 0.95 (DS-CNN also 0.1 and 0.2, since it
  collapses early without fine-tuning);
* the paper's ``nonpositive`` rule as its own point, with magnitude and random at the sparsity it
  reached;
* iterative relevance pruning (relevance re-estimated at each of 4 steps) where it is cheap;
* relevance scoring variants (LRP rule, class selection, signed vs |relevance|, which layers'
  relevance scores a filter) at filter granularity without fine-tuning, with accuracy on the
  calibration split too: that is the split a user may pick a variant on;
* parameters and float ``.tflite`` bytes before and after filter pruning.

    python benchmarks/pruning.py [--quick] [--only digits|kws] [--kws-model PATH]

Writes benchmarks/results/pruning.{json,md,png} (``--quick``: fewer points, pruning_quick.*).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_KWS_MODEL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model"
SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_SPARSITIES = (0.3, 0.5, 0.7, 0.9)
#: DS-CNN without fine-tuning is at chance level beyond ~0.5 at any criterion: add the low end
KWS_EXTRA = (0.1, 0.2)
DIGITS_EPOCHS = 15
FINE_TUNE_EPOCHS = 3
RANDOM_SEEDS = (0, 1, 2)
ITERATIONS = 4
#: the issue's targets (DS-CNN, filter granularity, no fine-tuning)
TARGET_SPARSITY = 0.5
TARGET_MARGIN = 0.05
TARGET_MAX_DEFICIT = 0.01
#: points where both criteria are within this of chance (the most frequent class) say nothing
CHANCE_BAND = 0.05
VARIANT_SPARSITIES = (0.1, 0.2, 0.3, 0.5)
VARIANTS_SHOWN = 12
#: the prune stage's defaults, as a variant label
DEFAULT_VARIANT = "lrp.epsilon true abs consumer"
VARIANT_RULES = ("lrp.epsilon", "lrp.epsilon_0_1", "lrp.alpha_1_beta_0", "lrp.alpha_2_beta_1", "lrp.composite")
VARIANT_CLASSES = ("true", "predicted", "all")
VARIANT_SCORES = (("sum", "producer"), ("sum", "tied"), ("sum", "consumer"), ("abs", "tied"),
                  ("abs", "consumer"), ("abs_sum", "consumer"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digits_model(dataset):
    """The digits CNN, trained once and cached beside the relevance cache."""
    from models import train_model
    from toolchain.model_io import load_model
    from toolchain.relevance import cache_dir

    path = cache_dir().parent / "benchmarks" / f"digits_cnn_e{DIGITS_EPOCHS}_s0.keras"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"training digits_cnn for {DIGITS_EPOCHS} epochs -> {path}")
        train_model("digits_cnn", dataset, DIGITS_EPOCHS, path, verbose=0)
    return load_model(path), str(path)


def tflite_bytes(model) -> int:
    import tensorflow as tf

    return len(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def run_one(model, dataset, x_cal, y_cal, rmap, **kw):
    from toolchain.prune import accuracy, prune

    t0 = time.perf_counter()
    rel = rmap if kw.get("criterion") == "relevance" else None
    r = prune(model, dataset, relevance=rel, quiet=True, **kw)
    return r, {
        "sparsity": r.sparsity, "kernel_sparsity": r.kernel_sparsity, "accuracy": r.accuracy_after,
        "accuracy_calibration": accuracy(r.model, x_cal, y_cal), "params_before": r.params_before,
        "params_after": r.params_after, "nonzero_params_after": r.nonzero_params_after,
        "seconds": time.perf_counter() - t0,
    }


def bench_model(name, model, dataset, sparsities, fine_tune, quick, out_rows, sizes):
    from toolchain.prune import accuracy
    from toolchain.relevance import compute_relevance

    x_cal, y_cal = dataset.calibration()
    t0 = time.perf_counter()
    rmap = compute_relevance(model, x_cal, y_cal, quiet=True)
    log(f"{name}: relevance on {len(x_cal)} calibration samples in {time.perf_counter() - t0:.1f} s "
        f"({'cached' if rmap.cached else 'computed'})")
    chance = float(np.bincount(np.asarray(dataset.y_eval)).max() / len(dataset.y_eval))
    base = {"model": name, "accuracy_unpruned": accuracy(model, dataset.x_eval, dataset.y_eval), "chance": chance,
            "accuracy_unpruned_calibration": accuracy(model, x_cal, y_cal)}
    seeds = RANDOM_SEEDS[:1] if quick else RANDOM_SEEDS

    def add(row_kw, **prune_kw):
        _, m = run_one(model, dataset, x_cal, y_cal, rmap, **prune_kw)
        row = dict(base, **row_kw, **m)
        out_rows.append(row)
        return row

    for ft in fine_tune:
        for gran in ("weight", "filter"):
            tag = f"{name} {gran}" + (f" +FT{ft}" if ft else "")
            log(f"{tag}: nonpositive rule")
            npos = add(dict(granularity=gran, fine_tune_epochs=ft, criterion="relevance", variant="nonpositive",
                            target=None), criterion="relevance", granularity=gran, rule="nonpositive",
                       fine_tune_epochs=ft)
            # magnitude and random at the sparsity the paper's rule reached
            at = round(npos["sparsity"], 4)
            if 0 < at < 1:
                add(dict(granularity=gran, fine_tune_epochs=ft, criterion="magnitude", variant="at nonpositive",
                         target=at), criterion="magnitude", granularity=gran, sparsity=at, fine_tune_epochs=ft)
                add(dict(granularity=gran, fine_tune_epochs=ft, criterion="random", variant="at nonpositive",
                         target=at, seed=0), criterion="random", granularity=gran, sparsity=at,
                    fine_tune_epochs=ft, seed=0)
            for s in sparsities:
                log(f"{tag}: sparsity {s:g}")
                add(dict(granularity=gran, fine_tune_epochs=ft, criterion="relevance", variant="default", target=s),
                    criterion="relevance", granularity=gran, sparsity=s, fine_tune_epochs=ft)
                add(dict(granularity=gran, fine_tune_epochs=ft, criterion="magnitude", variant="default", target=s),
                    criterion="magnitude", granularity=gran, sparsity=s, fine_tune_epochs=ft)
                for seed in seeds:
                    add(dict(granularity=gran, fine_tune_epochs=ft, criterion="random", variant="default",
                             target=s, seed=seed), criterion="random", granularity=gran, sparsity=s,
                        fine_tune_epochs=ft, seed=seed)
                iterative = not quick and (ft or (name == "ds_cnn" and gran == "filter" and s <= 0.5))
                if iterative:
                    add(dict(granularity=gran, fine_tune_epochs=ft, criterion="relevance", variant="iterative",
                             target=s), criterion="relevance", granularity=gran, sparsity=s, fine_tune_epochs=ft,
                        schedule="iterative", iterations=ITERATIONS)

    # size: parameters and float .tflite bytes before / after filter pruning at the target sparsity
    r, _ = run_one(model, dataset, x_cal, y_cal, rmap, criterion="relevance", granularity="filter",
                   sparsity=TARGET_SPARSITY)
    sizes[name] = {"sparsity": TARGET_SPARSITY, "params_before": r.params_before, "params_after": r.params_after,
                   "tflite_bytes_before": tflite_bytes(model), "tflite_bytes_after": tflite_bytes(r.model)}
    return rmap


def bench_variants(name, model, dataset, quick, out_rows):
    """Relevance scoring variants at filter granularity, no fine-tuning."""
    from toolchain.relevance import compute_relevance

    if quick:
        return
    x_cal, y_cal = dataset.calibration()
    sparsities = VARIANT_SPARSITIES if name == "ds_cnn" else (0.3, 0.5, 0.7)
    for rule in VARIANT_RULES:
        for cls in VARIANT_CLASSES:
            rmap = compute_relevance(model, x_cal, y_cal, rule=rule, class_selection=cls, quiet=True)
            for score, source in VARIANT_SCORES:
                log(f"{name} variants: {rule} {cls} {score} {source}")
                for s in sparsities:
                    _, m = run_one(model, dataset, x_cal, y_cal, rmap, criterion="relevance",
                                   granularity="filter", sparsity=s, lrp_rule=rule, class_selection=cls,
                                   score=score, source=source)
                    out_rows.append(dict(model=name, granularity="filter", fine_tune_epochs=0,
                                         criterion="relevance", variant=f"{rule} {cls} {score} {source}",
                                         rule=rule, class_selection=cls, score=score, source=source,
                                         target=s, **m))
    for crit in ("magnitude", "random"):
        for s in sparsities:
            _, m = run_one(model, dataset, x_cal, y_cal, None, criterion=crit, granularity="filter", sparsity=s)
            out_rows.append(dict(model=name, granularity="filter", fine_tune_epochs=0, criterion=crit,
                                 variant=f"{crit} (baseline)", target=s, **m))


# ----------------------------------------------------------------------------------------------
# Tables and plot


def curve(rows, model, gran, ft, crit, variant="default"):
    """target sparsity -> (mean accuracy, min, max) over seeds."""
    pts = {}
    for r in rows:
        if (r["model"], r["granularity"], r["fine_tune_epochs"], r["criterion"], r["variant"]) == \
                (model, gran, ft, crit, variant) and r["target"] is not None:
            pts.setdefault(r["target"], []).append(r["accuracy"])
    return {s: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for s, v in sorted(pts.items())}


def panels(rows):
    seen = []
    for r in rows:
        key = (r["model"], r["granularity"], r["fine_tune_epochs"])
        if r["variant"] in ("default", "nonpositive") and key not in seen:
            seen.append(key)
    return seen


def verdict(rows):
    """The issue's targets on DS-CNN filter pruning, and every point where relevance loses."""
    out = {"losses": []}
    for model, gran, ft in panels(rows):
        rel, mag = curve(rows, model, gran, ft, "relevance"), curve(rows, model, gran, ft, "magnitude")
        for s in rel:
            if s in mag:
                d = rel[s][0] - mag[s][0]
                if d < -TARGET_MAX_DEFICIT:
                    out["losses"].append({"model": model, "granularity": gran, "fine_tune_epochs": ft,
                                          "sparsity": s, "relevance": rel[s][0], "magnitude": mag[s][0]})
        if model == "ds_cnn" and gran == "filter" and ft == 0:
            d50 = rel.get(TARGET_SPARSITY, (np.nan,))[0] - mag.get(TARGET_SPARSITY, (np.nan,))[0]
            worst = min((rel[s][0] - mag[s][0] for s in rel if s in mag), default=np.nan)
            chance = next(r["chance"] for r in rows if r["model"] == model and "chance" in r)
            informative = [s for s in rel if s in mag and max(rel[s][0], mag[s][0]) > chance + CHANCE_BAND]
            worst_inf = min((rel[s][0] - mag[s][0] for s in informative), default=np.nan)
            out["ds_cnn_filter"] = {
                "margin_at_target": d50, "margin_met": bool(d50 >= TARGET_MARGIN),
                "worst_margin": worst, "never_worse_met": bool(worst >= -TARGET_MAX_DEFICIT),
                "chance": chance, "worst_margin_above_chance": worst_inf,
                "sparsities_above_chance": informative}
    return out


def pct(v):
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(rows, sizes, meta, verd, quick) -> str:
    cmd = "python benchmarks/pruning.py" + (" --quick" if quick else "")
    lines = ["# Pruning: relevance vs magnitude vs random", "",
             f"`{cmd}` — {meta['date']}, {meta['machine']}; {meta['seconds']:.0f} s. "
             "Accuracy (%) on the evaluation split after one-shot pruning (FT: then fine-tuned on the "
             "training split with the masks held). Random: mean over seeds. Relevance: the prune stage's "
             f"defaults ({meta['defaults']}).", ""]
    names = {"digits_cnn": "digits CNN", "ds_cnn": "MLPerf Tiny DS-CNN (kws01)"}
    if "ds_cnn_filter" in verd:
        v = verd["ds_cnn_filter"]
        lines += [f"**Target (DS-CNN, filters, no fine-tuning):** relevance − magnitude at "
                  f"{TARGET_SPARSITY:.0%} = {100 * v['margin_at_target']:+.1f} points (target ≥ "
                  f"+{100 * TARGET_MARGIN:.0f}: {'met' if v['margin_met'] else 'NOT met'}); worst margin over "
                  f"all sparsities {100 * v['worst_margin']:+.1f} points (target ≥ −{100 * TARGET_MAX_DEFICIT:.0f}: "
                  f"{'met' if v['never_worse_met'] else 'NOT met'}). Chance level (most frequent evaluation "
                  f"class) is {100 * v['chance']:.1f}%; over the sparsities where either criterion is more than "
                  f"{100 * CHANCE_BAND:.0f} points above it ({', '.join(f'{s:.0%}' for s in v['sparsities_above_chance'])}) "
                  f"the worst margin is {100 * v['worst_margin_above_chance']:+.1f} points.", ""]
    for model, gran, ft in panels(rows):
        title = f"## {names.get(model, model)}, {gran} granularity" + (f", fine-tuned {ft} epochs" if ft else ", no fine-tuning")
        rel = curve(rows, model, gran, ft, "relevance")
        mag = curve(rows, model, gran, ft, "magnitude")
        rnd = curve(rows, model, gran, ft, "random")
        it = curve(rows, model, gran, ft, "relevance", "iterative")
        base = next(r["accuracy_unpruned"] for r in rows if r["model"] == model and "accuracy_unpruned" in r)
        chance = next(r["chance"] for r in rows if r["model"] == model and "chance" in r)
        lines += [title, "", f"Unpruned: {pct(base)}%; chance (most frequent class): {pct(chance)}%.", ""]
        head = "| sparsity | relevance | magnitude | random | relevance − magnitude |" + (" relevance iterative |" if it else "")
        lines += [head, "|" + "---:|" * (5 + bool(it))]
        for s in rel:
            d = rel[s][0] - mag[s][0] if s in mag else np.nan
            row = f"| {s:.0%} | {pct(rel[s][0])} | {pct(mag.get(s, (None,))[0])} | {pct(rnd.get(s, (None,))[0])} | {100 * d:+.1f} |"
            if it:
                row += f" {pct(it.get(s, (None,))[0])} |"
            lines.append(row)
        npos = [r for r in rows if (r["model"], r["granularity"], r["fine_tune_epochs"], r["variant"]) ==
                (model, gran, ft, "nonpositive")]
        at = {r["criterion"]: r for r in rows if (r["model"], r["granularity"], r["fine_tune_epochs"], r["variant"]) ==
              (model, gran, ft, "at nonpositive")}
        if npos:
            n = npos[0]
            lines += ["", f"Nonpositive rule (remove every {'weight' if gran == 'weight' else 'filter'} with "
                          f"relevance ≤ 0): sparsity {n['sparsity']:.1%}, accuracy {pct(n['accuracy'])}%"
                      + (f"; at that sparsity magnitude {pct(at['magnitude']['accuracy'])}%, random "
                         f"{pct(at['random']['accuracy'])}%" if at else "") + "."]
        lines.append("")
    if sizes:
        lines += ["## Size after filter pruning (relevance, defaults)", "",
                  "| model | sparsity | parameters | float .tflite bytes |", "|---|---:|---:|---:|"]
        for name, s in sizes.items():
            lines.append(f"| {names.get(name, name)} | {s['sparsity']:.0%} | {s['params_before']:,} → {s['params_after']:,} "
                         f"| {s['tflite_bytes_before']:,} → {s['tflite_bytes_after']:,} |")
        lines.append("")
    var = [r for r in rows if r["variant"] not in ("default", "nonpositive", "at nonpositive", "iterative")]
    for model in dict.fromkeys(r["model"] for r in var):
        vr = [r for r in var if r["model"] == model]
        sps = sorted({r["target"] for r in vr})
        lines += [f"## Relevance variants: {names.get(model, model)}, filters, no fine-tuning", "",
                  "Accuracy on the evaluation split / on the calibration split (the split a user may select on), "
                  "per sparsity. score: sum = signed relevance, abs = |relevance| per weight, abs_sum = |signed "
                  "sum| per filter; source: whose relevance scores a filter (producer weights, + tied depthwise, "
                  "the consumers' inputs = the feature map's relevance).", "",
                  "| variant | " + " | ".join(f"{s:.0%}" for s in sps) + " | mean |",
                  "|---|" + "---:|" * (len(sps) + 1)]
        by = {}
        for r in vr:
            by.setdefault(r["variant"], {})[r["target"]] = r
        # ranked on the calibration split, the split a user may select on
        ordered = sorted(by.items(), key=lambda kv: -np.mean([r["accuracy_calibration"] for r in kv[1].values()]))
        shown = [kv for i, kv in enumerate(ordered) if i < VARIANTS_SHOWN or "baseline" in kv[0]
                 or kv[0] == DEFAULT_VARIANT]
        for label, pts in shown:
            cells = [f"{pct(pts[s]['accuracy'])} / {pct(pts[s]['accuracy_calibration'])}" if s in pts else "—" for s in sps]
            mean = np.mean([p["accuracy"] for p in pts.values()])
            mean_cal = np.mean([p["accuracy_calibration"] for p in pts.values()])
            rank = [k for k, _ in ordered].index(label) + 1
            tag = " (default)" if label == DEFAULT_VARIANT else ""
            lines.append(f"| {rank}. {label}{tag} | " + " | ".join(cells) + f" | {pct(mean)} / {pct(mean_cal)} |")
        lines += ["", f"{len(ordered)} rows measured (relevance variants and baselines); the best {VARIANTS_SHOWN} by mean calibration accuracy "
                      "shown (all of them in the JSON).", ""]
    if verd["losses"]:
        lines += ["## Where relevance loses to magnitude by more than 1 point", ""]
        for l in verd["losses"]:
            lines.append(f"- {names.get(l['model'], l['model'])}, {l['granularity']}"
                         + (f" +FT{l['fine_tune_epochs']}" if l["fine_tune_epochs"] else "")
                         + f", {l['sparsity']:.0%}: relevance {pct(l['relevance'])}% vs magnitude {pct(l['magnitude'])}%")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(rows)
    cols = 2
    nrows = (len(ps) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.4 * nrows), squeeze=False)
    names = {"digits_cnn": "digits CNN", "ds_cnn": "DS-CNN kws01"}
    for ax, (model, gran, ft) in zip(axes.flat, ps):
        for crit, style in (("relevance", "o-"), ("magnitude", "s--"), ("random", "^:")):
            c = curve(rows, model, gran, ft, crit)
            if not c:
                continue
            xs = list(c)
            line, = ax.plot(xs, [c[s][0] for s in xs], style, label=crit)
            if crit == "random":
                ax.fill_between(xs, [c[s][1] for s in xs], [c[s][2] for s in xs], alpha=0.15, color=line.get_color())
        it = curve(rows, model, gran, ft, "relevance", "iterative")
        if it:
            ax.plot(list(it), [v[0] for v in it.values()], "o-.", label="relevance iterative")
        for r in rows:
            if (r["model"], r["granularity"], r["fine_tune_epochs"], r["variant"]) == (model, gran, ft, "nonpositive"):
                ax.plot([r["sparsity"]], [r["accuracy"]], "*", ms=14, color="k", label="nonpositive rule")
        base = next(r["accuracy_unpruned"] for r in rows if r["model"] == model and "accuracy_unpruned" in r)
        ax.axhline(base, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{names.get(model, model)} — {gran}" + (f", +FT {ft} ep" if ft else ", no FT"), fontsize=10)
        ax.set_xlabel("sparsity (fraction of weights / filters removed)")
        ax.set_ylabel("eval accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(ps):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sparsities, one random seed, no variants")
    ap.add_argument("--only", choices=("digits", "kws"))
    ap.add_argument("--kws-model", default=str(DEFAULT_KWS_MODEL))
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the .md and .png from the existing .json without measuring")
    args = ap.parse_args(argv)
    stem = "pruning_quick" if args.quick else "pruning"
    if args.render_only:
        data = json.loads((RESULTS / f"{stem}.json").read_text())
        write_atomic(RESULTS / f"{stem}.md", markdown(data["rows"], data["sizes"], data["meta"],
                                                      verdict(data["rows"]), args.quick))
        plot(data["rows"], RESULTS / f"{stem}.png")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from toolchain.data import load_dataset
    from toolchain.model_io import load_model
    from toolchain.prune.criteria import DEFAULT_SCORE, DEFAULT_SOURCE
    from toolchain.relevance import DEFAULT_RULE

    t0 = time.perf_counter()
    sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
    rows, sizes, notes = [], {}, []
    if args.only in (None, "digits"):
        ds = load_dataset("digits")
        model, path = digits_model(ds)
        bench_model("digits_cnn", model, ds, sparsities, (0, 1 if args.quick else FINE_TUNE_EPOCHS), args.quick,
                    rows, sizes)
        bench_variants("digits_cnn", model, ds, args.quick, rows)
    if args.only in (None, "kws"):
        if not Path(args.kws_model).exists():
            notes.append(f"DS-CNN skipped: {args.kws_model} is absent (set TOOLCHAIN_SHARED_DIR or --kws-model)")
            log(notes[-1])
        else:
            ds = load_dataset("kws01")
            model = load_model(args.kws_model)
            bench_model("ds_cnn", model, ds, tuple(sorted(set(KWS_EXTRA) | set(sparsities))), (0,), args.quick,
                        rows, sizes)
            bench_variants("ds_cnn", model, ds, args.quick, rows)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "seconds": time.perf_counter() - t0, "quick": args.quick,
            "defaults": f"{DEFAULT_RULE}, true class, score {DEFAULT_SCORE}, filter source {DEFAULT_SOURCE}, per-layer",
            "fine_tune_epochs": FINE_TUNE_EPOCHS, "random_seeds": list(RANDOM_SEEDS[:1] if args.quick else RANDOM_SEEDS),
            "notes": notes}
    verd = verdict(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / f"{stem}.json", json.dumps({"meta": meta, "verdict": verd, "sizes": sizes, "rows": rows},
                                                      indent=1, default=float))
    write_atomic(RESULTS / f"{stem}.md", markdown(rows, sizes, meta, verd, args.quick))
    plot(rows, RESULTS / f"{stem}.png")
    log(f"wrote {RESULTS}/{stem}.json, .md, .png in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
