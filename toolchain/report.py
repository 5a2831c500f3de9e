"""``report.html`` (self-contained: plots embedded as base64 PNG) and ``report.md`` for a build.

The renderer is generic: it takes the build summary (plain JSON-able data assembled by the
pipeline) and the plots written beside it, so every number in the report is one the pipeline
measured and also wrote to ``summary.json``.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

#: (summary key, column title, formatter) of the artifact table
ARTIFACT_COLUMNS = (
    ("name", "artifact", str),
    ("format", "format", str),
    ("accuracy", "accuracy", lambda v: f"{v:.2%}"),
    ("accuracy_change", "vs original (points)", lambda v: f"{v * 100:+.1f}"),
    ("mse", "MSE", lambda v: f"{v:.4g}"),
    ("mae", "MAE", lambda v: f"{v:.4g}"),
    ("auc", "anomaly ROC AUC", lambda v: f"{v:.4f}"),
    ("agreement", "agreement with original", lambda v: f"{v:.2%}"),
    ("packed_weight_bytes", "packed weights (B)", lambda v: f"{int(v):,}"),
    ("size_bytes", "artifact (B)", lambda v: f"{int(v):,}"),
    ("gzip_bytes", "gzip (B)", lambda v: f"{int(v):,}"),
    ("p50_ms", "p50 (ms)", lambda v: f"{v:.3f}"),
    ("p99_ms", "p99 (ms)", lambda v: f"{v:.3f}"),
    ("peak_rss_mb", "peak RSS (MB)", lambda v: f"{v:.1f}"),
    ("arena_bytes", "MCU arena (B)", lambda v: f"{int(v):,}"),
)


#: captions of the plots, by file name
CAPTIONS = {
    "tradeoff.png": "Size against the evaluation metric for every artifact (grey squares: the original "
                    "float32 model and the standard flow's uniform int8; marker area: p50 latency).",
    "relevance_layers.png": "Distribution of LRP relevance over each layer's weights (calibration samples).",
    "prune_sparsity.png": "What pruning kept in each layer.",
    "bit_widths.png": "Weight width of each layer (and channel group) in the bit plan.",
    "fidelity_heatmaps.png": "Input relevance of the original and the compressed model on evaluation samples.",
}


#: how the first table shows a task's primary metric and its change against the original
METRIC_CELLS = {
    "accuracy": ("accuracy", lambda v: f"{v:.2%}", lambda d: f"{-d * 100:+.1f} points"),
    "mse": ("MSE", lambda v: f"{v:.4g}", lambda d: f"{d * 100:+.1f}% error"),
    "auc": ("anomaly ROC AUC", lambda v: f"{v:.4f}", lambda d: f"{-d:+.4f}"),
}


def _gain_rows(summary: Mapping) -> List[List[str]]:
    """The first table: per artifact what was gained (x smaller, x faster) and lost (metric vs the
    original), headline first."""
    art = list(summary.get("artifacts", []))
    head = summary.get("headline_format")
    art.sort(key=lambda r: (r.get("origin") != "compressed", r.get("format") != head))
    metric = (summary.get("original") or {}).get("metric", "accuracy")
    _, show, show_change = METRIC_CELLS[metric]
    rows = []
    for r in art:
        change = r.get("change_vs_original")
        if change is None and r.get("accuracy_change") is not None:
            change = -r["accuracy_change"]
        flag = " (slower than float32)" if r.get("slower_than_float") else ""
        rows.append([
            r.get("label", r.get("name", "–")), f"{int(r['size_bytes']):,} B" if r.get("size_bytes") else "–",
            f"{r['x_smaller']:.1f}x" if r.get("x_smaller") else "–",
            show(r[metric]) if r.get(metric) is not None else "–",
            show_change(change) if change is not None else "–",
            f"{r['p50_ms']:.3f} ms" if r.get("p50_ms") else "–",
            (f"{r['x_faster']:.1f}x{flag}" if r.get("x_faster") else "–"),
        ])
    return rows


def _cell(row: Mapping, key: str, fmt) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


def _table_md(headers: Sequence[str], rows: List[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _table_html(headers: Sequence[str], rows: List[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: the firmware table's columns
FIRMWARE_HEADERS = ("firmware", "model in flash (B)", "whole firmware flash (B)", "RAM: static + arena + stack (B)",
                    "EMULATED INSTRUCTIONS / inference", "accuracy", "agreement with TFLite (top-1)",
                    "bit-identical outputs")


def firmware_section(summary: Mapping, fw: Mapping) -> dict:
    """The microcontroller firmware: each integer artifact (and the reference, when given) built with
    TFLite Micro and run on the emulated Cortex-M, beside the float model's host accuracy."""
    def num(v):
        return "–" if v is None else f"{int(v):,}"

    rows = []
    for e in fw.get("entries", []):
        ram = e.get("ram") or {}
        static = (ram.get("data", 0) + ram.get("bss", 0) - ram.get("arena_reserved", 0))
        ref = e.get("tflite_reference") or {}
        rows.append([e["label"] + (" (the MCU bundle)" if e.get("mcu_bundle") else ""), num(e["model_flash_bytes"]),
                     num(e["firmware_flash_bytes"]),
                     f"{e['ram_bytes']:,} ({static:,} + {ram.get('arena_used', 0):,} + {ram.get('stack_used', 0):,})",
                     num(e["emulated_instructions_per_inference"]),
                     "–" if e.get("accuracy") is None else f"{e['accuracy']:.2%}",
                     f"{ref['top1_agreement']:.1%}" if ref else "–",
                     f"{ref['identical']} of {ref['samples']}" if ref else "–"])
    fl = fw.get("float_model") or {}
    rows.append([f"{fl.get('name', 'original')}: float32, on this host (not a firmware candidate)",
                 num(fl.get("size_bytes")), "–", "–", "–",
                 "–" if fl.get("accuracy_same_samples") is None else f"{fl['accuracy_same_samples']:.2%}", "–", "–"])
    skipped = "; ".join(f"{s['name']}: {s['reason']}" for s in fw.get("not_firmware", []))
    defaults = (summary.get("target_defaults") or {}).get("text", "")
    text = (f"TFLite Micro firmware ({fw['kernels']} kernels) built with arm-none-eabi-gcc and run on QEMU for "
            f"{fw['target']}, every one of the first {fw['samples']} evaluation samples once. Instructions are an "
            f"{fw['count_kind']}. Flash excludes the test inputs the QEMU harness embeds; RAM is .data + .bss "
            "outside the arena + the arena TFLM used + the measured stack. Agreement: the firmware's outputs "
            "against TFLite's reference kernels on the same quantized samples. The float row is the original "
            "model's accuracy on the same samples."
            + (f" Not built as firmware: {skipped}." if skipped else "")
            + (f" Recipe: {defaults}." if defaults else ""))
    return {"title": "Microcontroller firmware (emulated)", "text": text, "headers": list(FIRMWARE_HEADERS),
            "rows": rows, "plots": []}


def mcu_flash_section(weights: Mapping) -> dict:
    """The MCU bundle's kernel weights per layer, read from its flatbuffer: stored type and bytes in
    flash against the same layer in int8 (packed INT4 holds two weights per byte)."""
    rows = [[r["layer"], r["op"], r["stored"], f"{r['weights']:,}", f"{r['bytes']:,}", f"{r['int8_bytes']:,}",
             f"{r['saved_bytes']:,}" if r["saved_bytes"] else "–"] for r in weights["layers"]]
    t = weights["total"]
    rows.append(["total", "", "", f"{t['weights']:,}", f"{t['bytes']:,}", f"{t['int8_bytes']:,}",
                 f"{t['saved_bytes']:,}" if t["saved_bytes"] else "–"])
    int4 = weights.get("int4_layers") or []
    text = (f"Kernel weights of the microcontroller bundle, read from its flatbuffer: {t['bytes']:,} B in flash, "
            f"{t['int8_bytes']:,} B as int8" + (f"; {len(int4)} layer(s) stored as packed INT4 save "
                                                 f"{t['saved_bytes']:,} B" if int4 else "; no INT4 layers")
            + ". Biases, scales and the graph are the same either way and not counted.")
    return {"title": "Microcontroller flash per layer", "text": text,
            "headers": ["layer", "operator", "stored as", "weights", "bytes", "as int8", "saved"],
            "rows": rows, "plots": []}


def _simulated_vs_artifacts(qu: Mapping) -> str:
    """The mixed artifacts' accuracy next to the simulated graph they were converted from."""
    arts = {k: v for k, v in (qu.get("artifact_accuracy") or {}).items() if isinstance(v, float) and v == v}
    sim = qu.get("accuracy")
    if not arts or not isinstance(sim, float) or sim != sim:
        return ""
    qat = (f" after {qu['qat_epochs']} epochs of quantization-aware training (before: "
           f"{qu['accuracy_before_qat']:.2%})" if qu.get("qat_epochs") else "")
    return (f" Simulated {sim:.2%}{qat}; the artifacts converted from that graph score "
            + ", ".join(f"{k} {v:.2%} ({(v - sim) * 100:+.1f} points)" for k, v in sorted(arts.items()))
            + " on the same evaluation split.")


def sections(summary: Mapping) -> List[dict]:
    """The report's sections as (title, text, table headers, table rows, plots) in order."""
    out = []
    art = summary.get("artifacts", [])
    if art:
        measured = (summary.get("measured_on") or {}).get("text", "")
        original = summary.get("original") or {}
        metric = original.get("metric", "accuracy")
        title, show, _ = METRIC_CELLS[metric]
        task = summary.get("task", "classification")
        ref = (f"Task: {task}. The reference for every change is the original model: {title} "
               f"{show(original[metric])} on {original['samples']} evaluation samples. "
               if original.get(metric) is not None else f"Task: {task}. ")
        micro_note = (" The microcontroller row's accuracy comes from tflite-micro on its first evaluation samples "
                      "and is compared with the original on those same samples." if any(
                          r.get("format") == "mcu" and r.get("accuracy") is not None for r in art) else "")
        out.append({"title": "What you gain and what you lose", "text": ref + "x smaller and x faster are "
                    "against the original float32 TFLite model; " + (measured or "latency not measured") + "."
                    + micro_note,
                    "headers": ["artifact", "size", "x smaller", title, "change vs original", "p50",
                                "x faster"], "rows": _gain_rows(summary), "plots": ["tradeoff.png"]})
        text = ""
        micro = (summary.get("mcu") or {}).get("tflite_micro")
        if micro:
            acc = "–" if micro["micro_accuracy"] is None else f"{micro['micro_accuracy']:.2%}"
            tfl = "–" if micro["tflite_accuracy"] is None else f"{micro['tflite_accuracy']:.2%}"
            if summary.get("task", "classification") == "classification":
                agree = (f"accuracy {acc} (TFLite on the same samples: {tfl}), top-1 agreement with TFLite "
                         f"{micro['top1_agreement']:.1%}")
            else:
                agree = f"outputs within {micro['max_abs_diff_steps']} output quantization step(s) of TFLite's"
            text = (
                f"The MCU bundle's model, run in tflite-micro {micro['version']} (its reference kernels, on this "
                f"host) on the first {micro['samples']} evaluation samples: {agree}, smallest arena "
                f"that runs {micro['arena_min_bytes']:,} B (64-bit host; the MCU arena column is the larger of "
                "this and the estimate).")
        # only the columns some artifact has: a regressor shows no accuracy, a classifier no MSE
        columns = [c for c in ARTIFACT_COLUMNS if any(r.get(c[0]) is not None for r in art)]
        out.append({"title": "Artifacts", "text": text,
                    "headers": [c[1] for c in columns],
                    "rows": [[_cell(r, k, f) for k, _, f in columns] for r in art], "plots": []})
    fw = summary.get("firmware")
    if fw:
        out.append(firmware_section(summary, fw))
    weights = (summary.get("mcu") or {}).get("weights")
    if weights:
        out.append(mcu_flash_section(weights))
    rel = summary.get("relevance")
    if rel:
        rows = [[name, l["class"], f"{l['sum']:.4g}", f"{l['positive_share']:.1%}", f"{l['zero_share']:.1%}",
                 f"{l['negative_share']:.1%}"] for name, l in rel["layers"].items()]
        out.append({"title": "Relevance", "text": f"{rel['rule']} on {rel['samples']} calibration samples, "
                    f"explaining the {rel['class_selection']} class.",
                    "headers": ["layer", "layer type", "sum of relevance", "weights > 0", "= 0", "< 0"],
                    "rows": rows,
                    "plots": ["relevance_layers.png"]})
    pr = summary.get("prune")
    if pr:
        channels = pr.get("channels") or {}
        rows = []
        for name, share in pr["layer_sparsity"].items():
            removed = pr.get("removed_channels", {}).get(name, [])
            shown = ", ".join(map(str, removed[:12])) + (f", … ({len(removed)} in all)" if len(removed) > 12 else "")
            c = channels.get(name)
            rows.append([name, f"{c['kept']} of {c['total']}" if c else "–", f"{share:.1%}", shown or "–"])
        acc_b, acc_a = pr.get("accuracy_before"), pr.get("accuracy_after")
        acc = (f" Accuracy {acc_b:.2%} → {acc_a:.2%} on the evaluation split."
               if acc_b is not None and acc_a is not None else "")
        auto = pr.get("auto")
        auto_text = ""
        if auto:
            m = auto.get("metric", "accuracy")
            fmt = (lambda v: f"{v:.1%}") if m == "accuracy" else (lambda v: f"{v:.4g}")  # noqa: E731
            tried = ", ".join(f"{t['sparsity']:.0%}: {fmt(t[f'calibration_{m}'])}" for t in auto["tried"])
            auto_text = (f" Auto mode (calibration {m} of the original {fmt(auto[f'reference_calibration_{m}'])}, "
                         f"allowed loss {auto['max_drop']:.0%}; tried {tried}): "
                         + (f"chose {auto['chosen']:.0%}." if auto["chosen"] is not None else "no sparsity qualified, "
                            "so nothing was pruned."))
        dist = (pr.get("settings") or {}).get("distill")
        dist_text = ""
        if dist:
            steps = pr.get("steps") or []
            pruned_acc = steps[-1].get("accuracy") if steps else None
            run = dist.get("steps_run", dist["config"]["steps"])
            why = {"cap": "the recipe's cap", "time_budget": "the time budget",
                   "deadline": "the time budget's deadline (the machine slowed down after the timing steps)",
                   "early_stop":
                   "early stop: the held-out calibration samples stopped improving"}.get(dist.get("stop_reason"), "")
            if dist.get("agreement_before") is not None:
                closeness = (f"top-1 agreement with the original on the calibration samples "
                             f"{dist['agreement_before']:.1%} → {dist['agreement_after']:.1%}")
            else:
                closeness = (f"MSE to the original's outputs on the calibration samples "
                             f"{dist['teacher_mse_before']:.4g} → {dist['teacher_mse_after']:.4g}")
            dist_text = (f" Knowledge distillation from the original model: {run} steps"
                         + (f" ({why}; cap {dist['config']['steps']})" if why and run != dist["config"]["steps"] else "")
                         + (f" at temperature {dist['config']['temperature']:g}" if dist.get("agreement_before") is not None
                            else " matching outputs by MSE")
                         + f" on augmented calibration samples; {closeness}"
                         + (f" (evaluation accuracy before distillation {pruned_acc:.2%})." if pruned_acc is not None
                            else "."))
        out.append({"title": "Pruning", "text": f"{pr['criterion']} criterion, {pr['granularity']} granularity, "
                    f"{pr['rule']}: parameters {pr['params_before']:,} → {pr['params_after']:,}.{acc}{auto_text}"
                    + (" Removing a layer's output channels also removes the matching input channels of the "
                       "layer after it, so the share of a kernel removed can exceed the share of its "
                       "filters removed." if pr["granularity"] == "filter" else "")
                    + dist_text,
                    "headers": ["layer", "output channels kept", "share of the kernel removed",
                                "removed channel indices"], "rows": rows,
                    "plots": ["prune_sparsity.png"]})
    qu = summary.get("quantize")
    if qu:
        rows = []
        for name, lb in qu["plan"]["layers"].items():
            widths = lb["group_bits"] if lb.get("group_bits") else [lb["weight_bits"]]
            rows.append([name, " ".join(map(str, widths))[:80], str(lb["activation_bits"])])
        out.append({"title": "Bit widths", "text": f"{qu['allocator']} allocator, "
                    f"{qu.get('budget_text') or 'budget ' + str(qu.get('budget'))}: "
                    f"{qu['avg_weight_bits']:.2f} average bits per weight, {int(qu['packed_weight_bytes']):,} packed "
                    f"weight bytes"
                    + (f"; simulated accuracy {qu['accuracy']:.2%}." if isinstance(qu.get("accuracy"), float)
                       and qu["accuracy"] == qu["accuracy"] else ".") + _simulated_vs_artifacts(qu),
                    "headers": ["layer", "weight bits (per group)", "activation bits"], "rows": rows,
                    "plots": ["bit_widths.png"]})
    fid = summary.get("fidelity")
    if fid:
        out.append({"title": "Explanation fidelity", "text":
                    f"Input relevance (LRP, {fid['rule']}) of the original and the compressed model on "
                    f"{fid['samples']} evaluation samples: mean Pearson correlation "
                    f"{fid['mean_correlation']:.3f} (median {fid['median_correlation']:.3f}). "
                    f"{fid.get('note', '')}", "headers": [], "rows": [], "plots": ["fidelity_heatmaps.png"]})
    out.append({"title": "Recipe", "text": "", "code": json.dumps(summary.get("recipe", {}), indent=2),
                "headers": [], "rows": [], "plots": []})
    versions = summary.get("versions", {})
    out.append({"title": "Versions", "text": "", "headers": ["package", "version"],
                "rows": [[k, str(v)] for k, v in sorted(versions.items())], "plots": []})
    return out


def write_report(summary: Mapping, out_dir: str | Path) -> Dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (which holds the plots)."""
    out_dir = Path(out_dir)
    title = f"Compression report: {summary.get('model_name', 'model')} on {summary.get('data', '')}"
    md: List[str] = [f"# {title}", ""]
    body: List[str] = [f"<h1>{html.escape(title)}</h1>"]
    headline = summary.get("headline")
    if headline:
        md += [headline, ""]
        body.append(f"<p class='headline'>{html.escape(headline)}</p>")
    for sec in sections(summary):
        md += [f"## {sec['title']}", ""]
        body.append(f"<h2>{html.escape(sec['title'])}</h2>")
        if sec["text"]:
            md += [sec["text"], ""]
            body.append(f"<p>{html.escape(sec['text'])}</p>")
        if sec.get("code"):
            md += ["```json", sec["code"], "```", ""]
            body.append(f"<pre>{html.escape(sec['code'])}</pre>")
        if sec["rows"]:
            md += [_table_md(sec["headers"], sec["rows"]), ""]
            body.append(_table_html(sec["headers"], sec["rows"]))
        for plot in sec["plots"]:
            path = out_dir / plot
            if path.is_file():
                md += [f"![{CAPTIONS.get(plot, plot)}]({plot})", ""]
                data = base64.b64encode(path.read_bytes()).decode()
                caption = CAPTIONS.get(plot, plot)
                body.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}.headline{font-size:1.1em;font-weight:600}")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    (out_dir / "report.md").write_text("\n".join(md))
    (out_dir / "report.html").write_text(page)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html"}
