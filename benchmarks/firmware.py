"""MLPerf Tiny DS-CNN on kws01 as TensorFlow Lite Micro firmware on emulated Cortex-M4 and M7.

Three models, each built into bare-metal TFLM firmware (``deploy.targets.qemu_cortex_m.measure_firmware``)
for every (CPU, kernels) pair and run on QEMU (``-icount``) over the 500 kws01 evaluation samples:

* ``official``  the official MLPerf Tiny full-integer int8 model (../shared/models/mlperf-tiny);
* ``ours``      ``toolchain compress --target qemu-cortex-m4`` with the microcontroller default recipe
                (``toolchain.recipe.TARGET_DEFAULTS``: relevance filter pruning + distillation, int8
                weights with quantization-aware fine-tuning, the MCU model from that graph);
* ``magnitude`` the tfmot-style baseline: magnitude weight pruning (50% of each kernel set to zero,
                the same distillation) + uniform int8.
* ``cpu-default`` (with ``--cpu-default``) the CPU/Pi default recipe's MCU bundle (pruned, uniform
                int8), to measure both defaults on the device;
* ``LABEL``     (with ``--recipe LABEL=FILE``) compress --target qemu-cortex-m4 with a candidate recipe
                (benchmarks/results/firmware_candidates/*.yaml: the runs that chose the MCU default).

Per row: model bytes in flash, whole-firmware flash (the QEMU harness's embedded test inputs
excluded), RAM (.data + .bss outside the arena + the arena TFLM used + the measured stack), EMULATED
INSTRUCTION COUNT per inference (QEMU -icount: an instruction count, not cycles, not time; median
over the samples), accuracy on the samples and top-1 agreement with TFLite's reference kernels.
Compress outputs are cached under the toolchain cache (``bench-models/firmware``) and reused across
the CPU/kernel variants and reruns.

    nice -n 10 python benchmarks/firmware.py [--samples 500] [--variants m4:cmsis-nn,m7:reference,...]
        [--recipe LABEL=FILE ...]   # a candidate recipe as its own row (compress --target qemu-cortex-m4)

Writes benchmarks/results/firmware.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
KWS_MODEL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model"
OFFICIAL = SHARED / "models" / "mlperf-tiny" / "kws_ref_model_int8.tflite"
VARIANTS = (("m4", "cmsis-nn"), ("m7", "cmsis-nn"), ("m4", "reference"), ("m7", "reference"))
#: the issue's goal for ours against the official model
GOAL_FLASH_RATIO = 0.5
GOAL_INSTRUCTION_RATIO = 0.5
GOAL_ACCURACY_POINTS = 1.0
#: tfmot-style baseline: magnitude weight pruning at this sparsity, then uniform int8
MAGNITUDE_SPARSITY = 0.5
MAGNITUDE_RECIPE = {"prune": {"criterion": "magnitude", "granularity": "weight", "sparsity": MAGNITUDE_SPARSITY},
                    "quantize": {"allocator": "uniform", "bits": [8], "float_layers": []},
                    "export": {"formats": ["tflite-fp32", "tflite-int8", "mcu"], "mcu_source": "tflite-int8"},
                    "bench": {"enabled": False}}


def cache_dir() -> Path:
    from toolchain import stagecache

    d = stagecache.root().parent / "bench-models" / "firmware"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compressed_model(name: str, recipe: dict, target: str | None) -> tuple:
    """(the MCU bundle's source .tflite, summary) of one compress run, reused when already built: the
    cache entry is keyed by the effective recipe (the target's defaults merged), so a changed
    ``TARGET_DEFAULTS`` or recipe file builds anew."""
    from toolchain.compress import run_compress
    from toolchain.recipe import validate

    effective = validate(copy.deepcopy(recipe), f"{name} recipe", target)
    key = hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cache_dir() / f"{name}-{key}"
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        t0 = time.perf_counter()
        run_compress(str(KWS_MODEL), "kws01", str(out), recipe_path=recipe, target=target, quiet=True)
        summary = json.loads(summary_path.read_text())
        summary["benchmark_compress_seconds"] = time.perf_counter() - t0
        summary_path.write_text(json.dumps(summary, indent=2))
    summary = json.loads(summary_path.read_text())
    source = summary["mcu"]["source"]["format"]
    row = next(r for r in summary["artifacts"] if r["origin"] == "compressed" and r["format"] == source)
    return out / row["path"], summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500, help="kws01 evaluation samples run in every firmware")
    ap.add_argument("--variants", default=",".join(f"{c}:{k}" for c, k in VARIANTS),
                    help="cpu:kernels pairs, comma-separated")
    ap.add_argument("--models", default="official,ours,magnitude", help="which rows (official,ours,magnitude,cpu-default)")
    ap.add_argument("--cpu-default", action="store_true", help="also the CPU default recipe's MCU bundle")
    ap.add_argument("--recipe", action="append", default=[], metavar="LABEL=FILE",
                    help="also a row named LABEL: compress --target qemu-cortex-m4 with the recipe FILE (YAML; "
                         "its bench stage is switched off, the firmware runs here measure); repeatable")
    ap.add_argument("--name", default="firmware")
    ap.add_argument("--prepare-only", action="store_true", help="run (and cache) the compress runs, measure nothing")
    ap.add_argument("--note", action="append", default=[], help="a sentence printed under the tables (kept by "
                    "--append; repeatable), e.g. what the measurements decided")
    ap.add_argument("--append", action="store_true", help="keep the rows of benchmarks/results/NAME.json that this "
                    "run does not measure (other models or variants)")
    ap.add_argument("--render-only", action="store_true", help="measure nothing: rewrite NAME.md from NAME.json "
                    "(with any --note added)")
    args = ap.parse_args()
    if args.render_only:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        results["notes"] = list(dict.fromkeys(results.get("notes", []) + args.note))
        write(results, args.name)
        return 0
    from deploy.targets.qemu_cortex_m import measure_firmware
    from toolchain.data import load_dataset

    ds = load_dataset("kws01")
    x, y = ds.x_eval[:args.samples], ds.y_eval[:args.samples]
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    models = [m for m in args.models.split(",") if m] + (["cpu-default"] if args.cpu_default else [])
    recipes = dict(_recipe_row(spec) for spec in args.recipe)
    models += [m for m in recipes if m not in models]
    tflites, notes = {}, {}
    for m in models:
        if m == "official":
            tflites[m], notes[m] = OFFICIAL, {"recipe": "official MLPerf Tiny int8 conversion"}
        elif m == "ours":
            # the firmware runs below, for every variant; the stages are the MCU default recipe's
            path, s = compressed_model("ours-mcu-default", {"bench": {"enabled": False}}, "qemu-cortex-m4")
            tflites[m], notes[m] = path, _compress_note(s)
        elif m == "magnitude":
            path, s = compressed_model("magnitude-int8", MAGNITUDE_RECIPE, None)
            tflites[m], notes[m] = path, _compress_note(s)
        elif m == "cpu-default":
            path, s = compressed_model("ours-cpu-default", {"bench": {"enabled": False}}, None)
            tflites[m], notes[m] = path, _compress_note(s)
        elif m in recipes:
            recipe_file, recipe = recipes[m]
            path, s = compressed_model(m, recipe, "qemu-cortex-m4")
            tflites[m], notes[m] = path, {**_compress_note(s), "recipe_file": recipe_file}
        else:
            raise SystemExit(f"unknown model {m!r}: official, ours, magnitude, cpu-default or a --recipe LABEL")
    if args.prepare_only:
        return 0
    rows = []
    for cpu, kernels in variants:
        for m in models:
            t0 = time.perf_counter()
            fw = measure_firmware(tflites[m], x, y, cpu=cpu, kernels=kernels)
            row = {"model": m, "cpu": cpu, "kernels": kernels, "tflite": tflites[m].name,
                   "model_flash_bytes": fw["model_flash_bytes"], "firmware_flash_bytes": fw["firmware_flash_bytes"],
                   "ram_bytes": fw["ram_bytes"], "ram": fw["ram"],
                   "emulated_instructions_per_inference": fw["emulated_instructions_per_inference"],
                   "emulated_instructions_min": fw["emulated_instructions_min"],
                   "emulated_instructions_max": fw["emulated_instructions_max"],
                   "accuracy": fw["accuracy"], "samples": fw["samples"],
                   "tflite_reference": fw["tflite_reference"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ram"}), flush=True)
    command = "nice -n 19 python benchmarks/firmware.py " + " ".join(_argv_without_notes(sys.argv[1:]))
    for row in rows:
        row["command"] = command
    previous = RESULTS / f"{args.name}.json"
    notes_text, old = list(args.note), {}
    if args.append and previous.is_file():  # rows measured by earlier runs (other models or variants) stay
        old = json.loads(previous.read_text())
        if old.get("samples") == len(x):
            fresh = {(r["model"], r["cpu"], r["kernels"]) for r in rows}
            rows = [r for r in old["rows"] if (r["model"], r["cpu"], r["kernels"]) not in fresh] + rows
            notes = {**old.get("models", {}), **notes}
            notes_text = list(dict.fromkeys(old.get("notes", []) + notes_text))
    # the commands that measured the rows kept (a row from before rows named theirs: the file's commands)
    command = "; ".join(dict.fromkeys(c for r in rows for c in (
        [r["command"]] if r.get("command") else old.get("command", "").split("; ")) if c))
    order = {m: i for i, m in enumerate(LABELS)}
    rows.sort(key=lambda r: ([v for v in VARIANTS].index((r["cpu"], r["kernels"])) if (r["cpu"], r["kernels"]) in VARIANTS
                             else len(VARIANTS), order.get(r["model"], len(order))))
    write({"samples": int(len(x)), "rows": rows, "models": notes, "notes": notes_text, "command": command.strip(),
           "count_kind": "EMULATED INSTRUCTION COUNT (QEMU -icount shift=0; not cycles, not time)",
           "machine_note": "built and emulated on a shared 2-core machine; counts are deterministic, "
                           "wall times are not reported"}, args.name)
    return 0


def _argv_without_notes(argv: list) -> list:
    """The command line as recorded: ``--note`` sentences are printed in the results, not repeated here."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def _recipe_row(spec: str) -> tuple:
    """``LABEL=FILE`` -> (LABEL, (FILE, the recipe with its bench stage off))."""
    import yaml

    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise SystemExit(f"--recipe {spec!r}: expected LABEL=FILE with an existing recipe file")
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    recipe.setdefault("bench", {})["enabled"] = False
    return label, (path, recipe)


def _compress_note(summary: dict) -> dict:
    q = summary.get("quantize") or {}
    pr = summary.get("prune") or {}
    return {"recipe": {k: summary["recipe"][k] for k in ("prune", "quantize", "export")},
            "target_defaults": (summary.get("target_defaults") or {}).get("text"),
            "params": [pr.get("params_before"), pr.get("params_after")],
            "avg_weight_bits": q.get("avg_weight_bits"), "bits": {n: l.get("weight_bits") for n, l in
                                                                   ((q.get("plan") or {}).get("layers") or {}).items()},
            "compress_seconds": summary.get("benchmark_compress_seconds"),
            "headline": summary.get("headline")}


def goals(rows: list, cpu: str, kernels: str, model: str = "ours") -> dict:
    """``model`` (ours) against the official model on one variant: flash <= 0.5x, instructions <= 0.5x,
    accuracy within 1 point."""
    pick = {r["model"]: r for r in rows if r["cpu"] == cpu and r["kernels"] == kernels}
    if model not in pick or "official" not in pick:
        return {}
    o, r = pick["official"], pick[model]
    flash = r["model_flash_bytes"] / o["model_flash_bytes"]
    instr = r["emulated_instructions_per_inference"] / o["emulated_instructions_per_inference"]
    gap = (o["accuracy"] - r["accuracy"]) * 100
    return {"flash_ratio": flash, "instruction_ratio": instr, "accuracy_gap_points": gap,
            "flash_met": flash <= GOAL_FLASH_RATIO, "instructions_met": instr <= GOAL_INSTRUCTION_RATIO,
            "accuracy_met": gap <= GOAL_ACCURACY_POINTS + 1e-9}


LABELS = {"official": "official int8", "ours": "ours (MCU default recipe)",
          "magnitude": f"magnitude weight pruning {MAGNITUDE_SPARSITY:.0%} + int8", "cpu-default": "ours, CPU default recipe (int8)"}


def write(results: dict, name: str = "firmware") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys((r["cpu"], r["kernels"]) for r in results["rows"]))
    results["goals"] = {f"{c}:{k}": goals(results["rows"], c, k) for c, k in variants}
    others = list(dict.fromkeys(r["model"] for r in results["rows"] if r["model"] != "official"))
    results["goals_by_model"] = {m: {f"{c}:{k}": goals(results["rows"], c, k, m) for c, k in variants}
                                 for m in others}
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    md = ["# DS-CNN firmware on emulated Cortex-M (TFLite Micro, kws01)", "",
          f"Command(s): `{results['command']}`. Every model is built into bare-metal TFLite Micro firmware "
          f"(arm-none-eabi-gcc) and run on QEMU (M4: mps2-an386, M7: mps2-an500) over the first "
          f"{results['samples']} kws01 evaluation samples. **Instructions are an EMULATED INSTRUCTION COUNT** "
          "(QEMU -icount; median per inference), not cycles and not time: QEMU models no pipeline, wait states "
          "or caches, so M4 and M7 differ only through code generation. Flash: the model array and the whole "
          "firmware (text + rodata + data, the harness's embedded test inputs excluded). RAM: .data + .bss "
          "outside the arena + the arena TFLM used + the measured stack. Agreement: top-1 against TFLite's "
          "reference kernels on the same int8 samples. Built on a shared 2-core machine (counts are "
          "deterministic).", "",
          "| CPU | kernels | model | model in flash (B) | firmware flash (B) | RAM (B) | EMULATED instructions / inference | accuracy | agreement with TFLite |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ref = r["tflite_reference"]
        md.append(f"| {r['cpu']} | {r['kernels']} | {LABELS.get(r['model'], r['model'])} | {r['model_flash_bytes']:,} | "
                  f"{r['firmware_flash_bytes']:,} | {r['ram_bytes']:,} | {r['emulated_instructions_per_inference']:,} | "
                  f"{r['accuracy']:.1%} | {ref['top1_agree']}/{ref['samples']} ({ref['identical']} bit-identical) |")
    md += ["", "## Goal for ours vs the official model", "",
           f"Model bytes in flash <= {GOAL_FLASH_RATIO}x, instructions <= {GOAL_INSTRUCTION_RATIO}x, accuracy within "
           f"{GOAL_ACCURACY_POINTS:g} point.", "",
           "| CPU | kernels | model | flash ratio | instruction ratio | accuracy vs official (points) | met |",
           "|---|---|---|---:|---:|---:|---|"]
    for v in results["goals"]:
        for m, by_variant in results["goals_by_model"].items():
            g = by_variant.get(v)
            if not g:
                continue
            met = [k for k in ("flash", "instructions", "accuracy") if g[f"{k}_met"]]
            missed = [k for k in ("flash", "instructions", "accuracy") if not g[f"{k}_met"]]
            cpu, kernels = v.split(":")
            md.append(f"| {cpu} | {kernels} | {LABELS.get(m, m)} | {g['flash_ratio']:.2f}x | {g['instruction_ratio']:.2f}x | "
                      f"{round(-g['accuracy_gap_points'], 1) + 0.0:+.1f} | met: {', '.join(met) or 'none'}"
                      + (f"; missed: {', '.join(missed)}" if missed else "") + " |")
    measured = {r["model"] for r in results["rows"]}
    missing = [LABELS[m] for m in ("official", "ours", "magnitude") if m not in measured]
    if missing and measured <= set(LABELS):  # a file of candidate recipes (--recipe) needs only the official row
        md += ["", f"Not measured in this file yet: {', '.join(missing)} (run the command with `--models` and "
               "`--append`); the goal can only be judged with both ours and the official model."]
    for note in results.get("notes", []):
        md += ["", note]
    md += ["", "## The models", ""]
    for m, n in results["models"].items():
        if isinstance(n.get("recipe"), str):
            md.append(f"* {LABELS.get(m, m)}: {n['recipe']}.")
            continue
        bits = n.get("bits") or {}
        md.append(f"* {LABELS.get(m, m)}: parameters {n['params'][0]:,} → {n['params'][1]:,}"
                  + (f", weight bits per layer {', '.join(f'{k} {v}' for k, v in bits.items())} "
                     f"(average {n['avg_weight_bits']:.2f})" if bits else "")
                  + (f"; compress took {n['compress_seconds'] / 60:.1f} min (shared machine: an upper bound)"
                     if n.get("compress_seconds") else "")
                  + (f"; recipe file {n['recipe_file']} over the qemu-cortex-m4 defaults: quantize "
                     + ", ".join(f"{k} {v}" for k, v in n["recipe"]["quantize"].items()
                                 if k in ("allocator", "bits", "budget", "qat_epochs"))
                     + f", firmware from {n['recipe']['export']['mcu_source']}" if n.get("recipe_file")
                     else f"; {n['target_defaults']}" if n.get("target_defaults") else "") + ".")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
