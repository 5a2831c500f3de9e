"""Measure integer ``.tflite`` models as firmware on emulated Cortex-M, side by side.

    python -m toolchain.firmware A.tflite B.tflite --data kws01 --samples 10 --kernels cmsis-nn,reference

Each model is built against the TFLM kit for every kernel set (the TFLM library is built once per
CPU and kernel set, then cached), run on QEMU on the first N evaluation samples, and checked against
its reference runtime (TFLite's BUILTIN_REF kernels; tflite-micro for packed INT4 models). Counts
are EMULATED INSTRUCTION COUNTS (QEMU -icount): not cycles, not time. ``--generic-ops`` registers
the generic kernels instead of the type-specialised ones (to measure what specialising saves).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def measure(model: Path, x, y, cpu: str, kernels: str, specialize: bool) -> dict:
    import numpy as np

    from toolchain.firmware import (COUNT_LABEL, build_firmware, compare_with_reference, reference_outputs,
                                    reference_runtime, run_firmware)

    with tempfile.TemporaryDirectory(prefix="toolchain-fw-") as work:
        build = build_firmware(model, x, cpu=cpu, kernels=kernels, out=Path(work), specialize=specialize)
        run = run_firmware(build)
    runtime = reference_runtime(model)
    agreement = compare_with_reference(run, reference_outputs(model, build.inputs, runtime))
    s = run.summary()
    scores = run.outputs.reshape(len(run.outputs), -1)
    return {"model": model.name, "cpu": cpu, "kernels": kernels, "specialized_ops": specialize,
            "count_kind": COUNT_LABEL, "samples": s["samples"],
            "emulated_instructions_per_inference": s["emulated_instructions_per_inference"],
            "model_bytes": build.sizes.model_bytes, "flash_bytes": s["flash_bytes"],
            "flash_without_model_bytes": s["flash_bytes"] - build.sizes.model_bytes,
            "arena_used": s["ram"]["arena_used"], "arena_estimate_bytes": s["arena_estimate_bytes"],
            "stack_used": s["ram"]["stack_used"], "model_weights": s["model_weights"],
            "op_registrations": s["op_registrations"],
            "reference": runtime, "bit_identical": agreement.identical,
            "accuracy": None if y is None else float(np.mean(scores.argmax(1) == np.asarray(y[:len(scores)])))}


def table(rows) -> str:
    head = ("| model | kernels | ops | EMULATED instr / inference | model B | flash B | flash w/o model B | "
            "INT4 layers | arena used B | stack B | bit-identical | accuracy |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        out.append(f"| {r['model']} | {r['cpu']} {r['kernels']} | {'specialised' if r['specialized_ops'] else 'generic'} "
                   f"| {r['emulated_instructions_per_inference']:,} | {r['model_bytes']:,} | {r['flash_bytes']:,} | "
                   f"{r['flash_without_model_bytes']:,} | {r['model_weights']['int4_layers']} | {r['arena_used']:,} | "
                   f"{r['stack_used']:,} | {r['bit_identical']}/{r['samples']} vs {r['reference']} | {acc} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from toolchain.errors import ToolchainError

    ap = argparse.ArgumentParser(prog="python -m toolchain.firmware", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="integer .tflite files (tflite-int8 or tflite-mixed)")
    ap.add_argument("--data", default="kws01", help="evaluation data (a toolchain dataset spec)")
    ap.add_argument("--samples", type=int, default=10, help="first N evaluation samples (default 10)")
    ap.add_argument("--cpu", default="m4", help="m4 (mps2-an386) or m7 (mps2-an500)")
    ap.add_argument("--kernels", default="cmsis-nn", help="comma list of cmsis-nn, reference")
    ap.add_argument("--generic-ops", action="store_true", help="register generic kernels, not type-specialised ones")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    try:
        from toolchain.data import load_dataset

        ds = load_dataset(args.data)
        n = args.samples
        x = ds.x_eval[:n]   # float: each model quantizes it with its own input scale
        y = ds.y_eval[:n] if getattr(ds, "is_classification", True) else None
        rows = [measure(m, x, y, args.cpu, k.strip(), not args.generic_ops)
                for m in args.models for k in args.kernels.split(",") if k.strip()]
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
