"""A tune's results: the Pareto front (table and plot), every trial, and the best recipe as YAML."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

#: the front's axes, all minimised: the shipped size, the drop against the original, and latency
#: (or the emulated instruction count on qemu-cortex-m targets)
SIZE, DROP = "flash_bytes", "drop_points"


def latency_axis(trials: Sequence[dict]) -> Optional[str]:
    """``instructions`` (qemu-cortex-m), ``latency_ms`` or None: what the trials measured."""
    for key in ("instructions", "latency_ms"):
        if any((t.get("numbers") or {}).get(key) is not None for t in trials):
            return key
    return None


def pareto_front(trials: Sequence[dict], axes: Sequence[str]) -> List[dict]:
    """Trials no other trial beats on every axis (all minimised), sorted by size. A trial missing
    an axis value is left out."""
    pts = [t for t in trials if all((t.get("numbers") or {}).get(a) is not None for a in axes)]

    def dominates(a, b):
        va = [a["numbers"][k] for k in axes]
        vb = [b["numbers"][k] for k in axes]
        return all(x <= y for x, y in zip(va, vb)) and any(x < y for x, y in zip(va, vb))

    front = [t for t in pts if not any(dominates(o, t) for o in pts if o is not t)]
    return sorted(front, key=lambda t: (t["numbers"][SIZE], t["numbers"][DROP]))


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{int(value):,}"
    if kind == "points":
        return f"{value:+.2f}"
    if kind == "ms":
        return f"{value:.3f}"
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "metric":
        return f"{value:.4f}"
    return str(value)


def _value(v) -> str:
    """A searched value as a cell: quantised floats without their binary noise (0.35, not 0.35000000000000003)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _ran(trial: dict, name: str):
    """The value the trial's recipe ran with (a budget clamped to the trial's widths shows as
    clamped), else the sampled one."""
    section, key = name.split(".", 1)
    value = ((trial.get("recipe") or {}).get(section) or {}).get(key, (trial.get("config") or {}).get(name, ""))
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "none"
    return value.split("=", 1)[1] if isinstance(value, str) and value.startswith("avg-bits=") else value


def table(trials: Sequence[dict], searched: Sequence[str], latency_key: Optional[str], metric: str) -> str:
    """Markdown: one row per trial; latency as measured while trials ran in parallel and, for the
    front, re-measured serially (or the EMULATED INSTRUCTION COUNT on qemu-cortex-m)."""
    lat_cols = {"instructions": [("instructions", "EMULATED instructions/inference", "count")],
                "latency_ms": [("latency_ms", "p50 ms while trials ran (distorted)", "ms"),
                               ("latency_serial_ms", "p50 ms serial re-measure", "ms")]}.get(latency_key or "", [])
    head = ["trial", "status", "flash B", f"{metric}", "drop vs original (points)"] + \
        [c[1] for c in lat_cols] + ["meets constraints"] + list(searched)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        n = t.get("numbers") or {}
        cells = [t["trial_id"], t["status"], _fmt(n.get(SIZE), "bytes"), _fmt(n.get("value"), "metric"),
                 _fmt(n.get(DROP), "points")] + [_fmt(n.get(key), kind) for key, _, kind in lat_cols]
        cells.append("yes" if t.get("feasible") else ("no: " + ", ".join(t.get("violated") or [])
                                                        if t.get("violated") else "no"))
        cells += [_value(_ran(t, k)) for k in searched]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_front(trials: Sequence[dict], front: Sequence[dict], constraints: Sequence[dict], metric: str,
               path: Path) -> None:
    """Size (x, log) against the drop (y): every trial (grey: breaks a constraint), the front joined
    by a line, and the flash and drop limits as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t in trials:
        n = t.get("numbers") or {}
        if n.get(SIZE) is None or n.get(DROP) is None:
            continue
        ax.scatter(n[SIZE], n[DROP], s=36, color="tab:green" if t.get("feasible") else "tab:gray",
                   edgecolor="black", linewidth=0.4, alpha=0.8)
    if front:
        ax.plot([t["numbers"][SIZE] for t in front], [t["numbers"][DROP] for t in front], "-o",
                color="tab:blue", label="Pareto front", linewidth=1.2, markersize=4)
        for t in front:
            ax.annotate(t["trial_id"][-5:], (t["numbers"][SIZE], t["numbers"][DROP]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
    for c in constraints:
        if c["name"] == "flash":
            ax.axvline(c["limit"], color="tab:red", linestyle="--", linewidth=1, label=c["text"])
        if c["name"] == "drop":
            ax.axhline(c["limit"], color="tab:orange", linestyle="--", linewidth=1, label=c["text"])
    ax.set_xscale("log")
    ax.set_xlabel("flash bytes of the shipped artifact (log scale)")
    ax.set_ylabel(f"{metric} drop vs the original (points; lower is better)")
    ax.set_title("toolchain tune: every trial (green: meets the constraints) and the front", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_best(path: Path, best: dict, meta: Dict[str, str]) -> None:
    header = "".join(f"# {k}: {v}\n" for k, v in meta.items())
    path.write_text(header + yaml.safe_dump(best["best_recipe"], sort_keys=False))


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, default=str))
