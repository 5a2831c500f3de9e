"""Firmware for emulated Cortex-M: a firmware project (export format) built against the offline
TFLM kit and run on QEMU's MPS2 boards.

    build = build_firmware("model.tflite", inputs=x_int8, cpu="m4", kernels="cmsis-nn", out="fw/")
    run = run_firmware(build)            # EMULATED INSTRUCTION COUNTS, arena, stack, outputs
    agreement = compare_with_reference(run, reference_outputs("model.tflite", x_int8))

Instruction counts are QEMU ``-icount`` counts of executed guest instructions: not cycles, not time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from toolchain.errors import ConfigError
from toolchain.firmware.build import (CPUS, KERNELS, STACK_BYTES, ElfSizes, check_cpu_kernels, elf_sizes,
                                      kit_dir, library, link_firmware)
from toolchain.firmware.project import (ARENA_MARGIN, FirmwareProject, quantize_inputs, size_arena,
                                        write_firmware_project, write_qemu_harness)
from toolchain.firmware.qemu import decode_outputs, run_qemu

COUNT_LABEL = "EMULATED INSTRUCTION COUNT (QEMU -icount; not cycles, not time)"


@dataclass(frozen=True)
class FirmwareBuild:
    project: FirmwareProject
    elf: Path
    cpu: str
    kernels: str
    machine: str
    library: Path
    sizes: ElfSizes
    n_inputs: int
    inputs: np.ndarray      # the quantized samples embedded in the firmware

    @property
    def flash_bytes(self) -> int:
        return self.sizes.flash_bytes


@dataclass(frozen=True)
class FirmwareRun:
    build: FirmwareBuild
    instructions: Tuple[int, ...]   # per sample: EMULATED INSTRUCTION COUNT of one inference
    init_instructions: int
    outputs: np.ndarray
    arena_used: int
    stack_used: int

    @property
    def instructions_per_inference(self) -> int:
        """Median over the samples (each count is deterministic for its input)."""
        return int(np.median(self.instructions))

    @property
    def ram_bytes(self) -> int:
        """.data + .bss with the arena sized to what TFLM used, + the measured stack."""
        s = self.build.sizes
        return s.static_ram_bytes - s.arena_reserved + self.arena_used + ARENA_MARGIN + self.stack_used

    def summary(self) -> dict:
        s = self.build.sizes
        return {"cpu": self.build.cpu, "kernels": self.build.kernels, "machine": self.build.machine,
                "samples": len(self.instructions), "count_kind": COUNT_LABEL,
                "emulated_instructions_per_inference": self.instructions_per_inference,
                "emulated_instructions_min": min(self.instructions),
                "emulated_instructions_max": max(self.instructions),
                "emulated_instructions_init": self.init_instructions,
                "flash_bytes": s.flash_bytes, "flash": {"text": s.text, "rodata": s.rodata, "data": s.data,
                                                        "model": s.model_bytes},
                "ram_bytes": self.ram_bytes,
                "ram": {"data": s.data, "bss": s.bss, "arena_reserved": s.arena_reserved,
                        "arena_used": self.arena_used, "stack_used": self.stack_used,
                        "stack_reserved": STACK_BYTES},
                "arena_estimate_bytes": self.build.project.arena_estimate_bytes,
                "op_registrations": list(self.build.project.registrations),
                "model_weights": dict(self.build.project.weights["total"],
                                      int4_layers=len(self.build.project.weights["int4_layers"]))}


def build_firmware(tflite_path, inputs, cpu: str = "m4", kernels: str = "cmsis-nn", out=None,
                   arena_bytes: int = 0, name: str = "model", specialize: bool = True) -> FirmwareBuild:
    """Write the firmware project for ``tflite_path`` into ``out``/project, embed ``inputs`` (the
    model's dtype, or float to be quantized with the input's scale) in a QEMU harness and link it
    against the cached TFLM library for ``cpu``/``kernels``.

    The arena defaults to twice the MCU bundle's estimate plus 4 KiB, so the run can measure what
    TFLM needs (:func:`run_firmware` then writes the measured size into the project).
    ``specialize``: the op resolver registers TFLM's type-specialised kernels where the model allows
    (``False``: the generic ones, every type's code linked)."""
    check_cpu_kernels(cpu, kernels)
    if out is None:
        raise ConfigError("build_firmware needs out=<directory> for the project and the ELF")
    kit_dir()
    out = Path(out)
    options = dict(name=name, kernels=kernels, specialize=specialize)
    project = write_firmware_project(tflite_path, out / "project", **options)
    if not arena_bytes:
        project = write_firmware_project(tflite_path, out / "project",
                                         arena_bytes=2 * project.arena_estimate_bytes + 4096, **options)
    else:
        project = write_firmware_project(tflite_path, out / "project", arena_bytes=arena_bytes, **options)
    x = quantize_inputs(project, inputs)
    write_qemu_harness(project, x, out / "qemu")
    lib = library(cpu, kernels)
    elf = link_firmware(out / "project", out / "qemu", out / f"build-{cpu}-{kernels}", cpu, kernels, lib)
    sizes = elf_sizes(elf, f"g_{project.name}_model_data")
    return FirmwareBuild(project, elf, cpu, kernels, CPUS[cpu][1], lib, sizes, len(x), x)


def run_firmware(build: FirmwareBuild) -> FirmwareRun:
    """Run ``build`` on QEMU; also sizes the project's arena to what TFLM used there."""
    out = run_qemu(build.elf, build.machine, build.n_inputs)
    outputs = decode_outputs(out.outputs, build.project.output.dtype, build.project.output.shape)
    size_arena(build.project, out.arena_used, f"QEMU {build.machine} ({build.cpu}, {build.kernels})")
    return FirmwareRun(build, out.instructions, out.init_instructions, outputs, out.arena_used, out.stack_used)


#: what the firmware's outputs are checked against (both equal TFLM's integer arithmetic exactly;
#: TFLite's default XNNPACK path does not)
REFERENCE_RUNTIMES = {
    "tflite-reference": "TFLite BUILTIN_REF kernels (no XNNPACK)",
    "tflite-micro": "tflite-micro reference kernels (Python package, this host)",
}


def has_int4_weights(tflite_path) -> bool:
    from toolchain.export.flatbuffer import read_flatbuffer

    return any(t.type == "INT4" for t in read_flatbuffer(Path(tflite_path).read_bytes()).tensors)


def reference_runtime(tflite_path) -> str:
    """The reference for ``tflite_path``: TFLite's BUILTIN_REF kernels, except for a model with
    packed INT4 kernels, which TF 2.14's reference resolver cannot load (it has no CONV_2D version 7,
    the INT4 one): then the tflite-micro Python interpreter (TFLM's reference kernels)."""
    return "tflite-micro" if has_int4_weights(tflite_path) else "tflite-reference"


def reference_outputs(tflite_path, inputs: np.ndarray, runtime: Optional[str] = None) -> np.ndarray:
    """The model's raw outputs on the same quantized samples in ``runtime`` (a key of
    :data:`REFERENCE_RUNTIMES`; default :func:`reference_runtime`)."""
    runtime = runtime or reference_runtime(tflite_path)
    if runtime not in REFERENCE_RUNTIMES:
        raise ConfigError(f"reference runtime {runtime!r} is not known; use one of {', '.join(REFERENCE_RUNTIMES)}")
    if runtime == "tflite-micro":
        from toolchain.export.micro import micro_outputs

        return micro_outputs(Path(tflite_path).read_bytes(), np.asarray(inputs), name=Path(tflite_path).name)
    from toolchain.run import open_artifact

    backend = open_artifact(tflite_path, reference_kernels=True)
    x = np.asarray(inputs, dtype=backend.input["dtype"]).reshape([len(inputs)] + backend.input["shape"][1:])
    return np.stack([backend.predict(x[i:i + 1])[0] for i in range(len(x))])


@dataclass(frozen=True)
class Agreement:
    samples: int
    top1_agree: int
    identical: int          # samples whose whole output vector is identical
    max_abs_diff: float     # in output units (int8 LSB for an int8 output)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_with_reference(run: FirmwareRun, reference: np.ndarray) -> Agreement:
    got = run.outputs.reshape(len(run.outputs), -1).astype(np.float64)
    ref = np.asarray(reference).reshape(len(reference), -1).astype(np.float64)
    if got.shape != ref.shape:
        raise ConfigError(f"reference outputs of shape {ref.shape} do not match the firmware's {got.shape}")
    return Agreement(len(got), int(np.sum(got.argmax(1) == ref.argmax(1))), int(np.sum(np.all(got == ref, axis=1))),
                     float(np.max(np.abs(got - ref))) if got.size else 0.0)


__all__ = ["Agreement", "COUNT_LABEL", "CPUS", "FirmwareBuild", "FirmwareProject", "FirmwareRun", "KERNELS",
           "REFERENCE_RUNTIMES", "build_firmware", "compare_with_reference", "library", "reference_outputs",
           "reference_runtime", "run_firmware",
           "write_firmware_project"]
