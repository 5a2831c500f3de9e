"""``qemu-cortex-m4`` / ``qemu-cortex-m7``: the model as bare-metal TFLM firmware on QEMU's MPS2 boards
(mps2-an386 / mps2-an500), built with arm-none-eabi-gcc against the offline TFLM kit
(``toolchain.firmware``).

What is measured is an EMULATED INSTRUCTION COUNT per inference (QEMU ``-icount shift=0``), not
cycles and not time. The runner-JSON fields the benchmark reads as latency (``latency_ms``) hold
QEMU's *virtual* time, which under ``-icount shift=0`` is exactly 1 ns per emulated instruction;
the counts themselves, flash and RAM are under ``firmware``. Each sample's count is deterministic,
so ``runs``/``warmup`` do not apply: every sample of the inputs is run once.
"""
from __future__ import annotations

import platform
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from deploy.targets.base import RunConfig, RunRequest, Target, temp_dir
from toolchain.errors import ConfigError, DataError

#: samples run when the benchmark passes no inputs (seeded random, no accuracy)
RANDOM_SAMPLES = 4
RANDOM_SEED = 0
#: the harness's input arrays (``static``: C++-mangled ``_ZL<len>g_input_<i>``) and their table
HARNESS_INPUT_SYMBOL = re.compile(r"^(_ZL\d+)?g_input(s|_\d+)$")
#: QEMU virtual time per emulated instruction under -icount shift=0
VIRTUAL_NS_PER_INSTRUCTION = 1.0


class QemuCortexMTarget(Target):
    emulated = True
    cpu: str = ""

    def __init__(self, kernels: str = "cmsis-nn", quiet: bool = False):
        from toolchain.firmware import KERNELS

        if kernels not in KERNELS:
            raise ConfigError(f"kernels {kernels!r} are not supported on {self.spec}; use one of {', '.join(KERNELS)}")
        self.kernels = kernels
        self.quiet = quiet

    @property
    def spec(self) -> str:
        return f"qemu-cortex-{self.cpu}"

    def info(self):
        from toolchain.firmware import COUNT_LABEL, CPUS

        machine = CPUS[self.cpu][1]
        return dict(super().info(), cpu=f"cortex-{self.cpu}", machine=machine, kernels=self.kernels,
                    measures=COUNT_LABEL, board=f"QEMU {machine}", qemu_cpu=f"cortex-{self.cpu}",
                    note=("Bare-metal TFLM firmware; the ms columns are QEMU virtual time at 1 ns per "
                          "EMULATED INSTRUCTION (an instruction count, not device time)."))

    def check(self) -> None:
        from toolchain.firmware.build import kit_dir, require_newlib, require_tool

        kit_dir()
        for program in ("make", "arm-none-eabi-g++", "qemu-system-arm"):
            require_tool(program)
        require_newlib()

    def run(self, request: RunRequest, configs: Sequence[RunConfig],
            on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
        if request.artifact.suffix.lower() != ".tflite":
            raise ConfigError(f"{request.artifact.name} cannot run on {self.spec}: the firmware takes an "
                              "integer .tflite; export tflite-int8")
        x, y = self._inputs(request)
        doc = self._document(self.measure(request.artifact, x, y), request)
        results: List[dict] = []
        for config in configs:   # one deterministic firmware run answers every configuration
            self.emit(doc, request, config, results, on_result)
        return results

    def _inputs(self, request: RunRequest):
        from toolchain.firmware.project import write_firmware_project

        if request.inputs is not None:
            with np.load(request.inputs) as npz:
                if "x" not in npz:
                    raise DataError(f"{request.inputs} has no array 'x'; pass inputs saved by the benchmark")
                return npz["x"], (npz["y"] if "y" in npz else None)
        work = temp_dir("toolchain-qemu-spec-")
        try:
            spec = write_firmware_project(request.artifact, work).input
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rng = np.random.default_rng(RANDOM_SEED)
        shape = (RANDOM_SAMPLES,) + tuple(spec.shape[1:])
        if spec.dtype == "float32":
            return rng.standard_normal(shape).astype(np.float32), None
        info = np.iinfo(spec.dtype)
        return rng.integers(info.min, info.max + 1, size=shape).astype(spec.dtype), None

    def measure(self, tflite_path, x: np.ndarray, y: Optional[np.ndarray] = None) -> dict:
        """Build and run ``tflite_path`` as firmware on ``x`` (float, quantized with the model's input
        scale, or already in the model's dtype); see :func:`measure_firmware`."""
        return measure_firmware(tflite_path, x, y, cpu=self.cpu, kernels=self.kernels)

    def _document(self, fw: dict, request: RunRequest) -> dict:
        """The runner-JSON document of one :func:`measure_firmware` result."""
        from toolchain.firmware import kit_dir
        from toolchain.firmware.build import kit_hash

        counts = np.asarray(fw["emulated_instructions"], dtype=np.float64)
        virtual_ms = counts * VIRTUAL_NS_PER_INSTRUCTION / 1e6
        pcts = {f"p{p}": round(float(np.percentile(virtual_ms, p)), 4) for p in (50, 90, 99)}
        summary = {k: v for k, v in fw.items() if k not in ("scores", "accuracy", "accuracy_samples")}
        return {
            "runs": len(counts), "warmup": 0,
            "runtime": {"name": f"tflite-micro {self.kernels} firmware on QEMU {fw['machine']}",
                        "version": f"kit {kit_hash(kit_dir())[:12]}"},
            "latency_ms": dict(pcts, mean=round(float(virtual_ms.mean()), 4), min=round(float(virtual_ms.min()), 4),
                               max=round(float(virtual_ms.max()), 4)),
            "latency_kind": "QEMU virtual time at 1 ns per EMULATED INSTRUCTION (not device time)",
            "throughput_per_s": round(1e3 / float(virtual_ms.mean()), 2),
            "load_ms": round(fw["emulated_instructions_init"] * VIRTUAL_NS_PER_INSTRUCTION / 1e6, 4),
            "peak_rss_mib": None,
            "machine": {"machine": fw["machine"], "python": None},
            "emulation": {"host_machine": platform.machine(), "qemu": "qemu-system-arm -icount shift=0"},
            "accuracy": fw["accuracy"], "accuracy_samples": fw["accuracy_samples"],
            "firmware": summary,
            **({"outputs": fw["scores"]} if request.include_outputs else {}),
        }


def output_scores(fw) -> np.ndarray:
    """The firmware's outputs per sample, dequantized with the output's scale (float outputs as they are)."""
    out = fw.build.project.output
    scores = fw.outputs.reshape(len(fw.outputs), -1).astype(np.float64)
    if out.dtype != "float32" and out.scale:
        scores = (scores - out.zero_point) * out.scale
    return scores


def top1_accuracy(scores: np.ndarray, y: Optional[np.ndarray]) -> Optional[float]:
    """Top-1 accuracy of ``scores`` against class labels (or one-hot rows); ``None`` without labels."""
    if y is None:
        return None
    labels = np.asarray(y).reshape(len(y), -1)
    labels = labels.argmax(1) if labels.shape[1] > 1 else labels[:, 0]
    return round(float(np.mean(scores.argmax(1) == labels)), 6)


def harness_input_bytes(elf: Path) -> int:
    """Flash the QEMU harness's embedded test inputs take (``g_input_*`` arrays and their pointer
    table): not part of a firmware a user ships, so reported flash excludes it."""
    from toolchain.firmware.build import _run

    total = 0
    for line in _run(["arm-none-eabi-nm", "-S", elf], elf.parent, "arm-none-eabi-nm").splitlines():
        parts = line.split()
        if len(parts) == 4 and HARNESS_INPUT_SYMBOL.match(parts[3]):
            total += int(parts[1], 16)
    return total


def measure_firmware(tflite_path, x: np.ndarray, y: Optional[np.ndarray] = None, cpu: str = "m4",
                     kernels: str = "cmsis-nn") -> dict:
    """One integer ``.tflite`` as firmware on QEMU: build (cached TFLM library), run every sample of
    ``x`` once, and check the outputs against TFLite's reference kernels on the same quantized
    samples. Returns the firmware summary (EMULATED INSTRUCTION COUNTS, flash, RAM, arena, stack) with
    ``emulated_instructions`` (per sample), ``scores`` (dequantized outputs), ``model_flash_bytes``,
    ``firmware_flash_bytes`` (the harness's test inputs excluded), ``accuracy`` (with labels ``y``)
    and the agreement with TFLite (``tflite_reference``)."""
    from toolchain.firmware import build_firmware, compare_with_reference, reference_outputs, run_firmware

    work = temp_dir("toolchain-qemu-m-")
    try:
        build = build_firmware(tflite_path, x, cpu=cpu, kernels=kernels, out=work)
        fw = run_firmware(build)
        inputs_bytes = harness_input_bytes(build.elf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    agreement = compare_with_reference(fw, reference_outputs(tflite_path, build.inputs))
    summary = fw.summary()
    scores = output_scores(fw)
    return dict(summary, emulated_instructions=list(fw.instructions), scores=scores.tolist(),
                model_flash_bytes=build.sizes.model_bytes,
                firmware_flash_bytes=build.sizes.flash_bytes - inputs_bytes,
                harness_inputs_bytes=inputs_bytes,
                accuracy=top1_accuracy(scores, y), accuracy_samples=None if y is None else int(len(y)),
                tflite_reference={**agreement.to_dict(), "runtime": "TFLite BUILTIN_REF kernels (no XNNPACK)",
                                  "top1_agreement": agreement.top1_agree / max(agreement.samples, 1)})


class QemuCortexM4Target(QemuCortexMTarget):
    key = "target.qemu_cortex_m4"
    cpu = "m4"


class QemuCortexM7Target(QemuCortexMTarget):
    key = "target.qemu_cortex_m7"
    cpu = "m7"
