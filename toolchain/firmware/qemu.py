"""Run a firmware ELF on QEMU's MPS2 board and parse what its harness prints over semihosting.

QEMU runs with ``-icount shift=0``: virtual time advances 1 ns per executed guest instruction, and
the CMSDK timer (25 MHz) ticks once per 40 instructions, so the harness's counts are deterministic
EMULATED INSTRUCTION COUNTS (resolution 40), not cycles or time: QEMU models no pipeline, wait
states, caches or multi-cycle instructions.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from toolchain.errors import TargetUnavailableError, ToolchainError

#: seconds of wall time per emulated inference allowed on top of QEMU's start (reference kernels on
#: DS-CNN: 43 M instructions, ~1 s)
RUN_TIMEOUT_BASE_S = 120.0
RUN_TIMEOUT_PER_INPUT_S = 10.0
LOG_TAIL = 1500


@dataclass(frozen=True)
class HarnessOutput:
    init_instructions: int
    instructions: Tuple[int, ...]       # per input, EMULATED INSTRUCTION COUNT of one Invoke()
    outputs: Tuple[bytes, ...]          # raw output tensor bytes per input
    arena_used: int
    stack_used: int
    log: str


def qemu_command(elf: Path, machine: str) -> list:
    return ["qemu-system-arm", "-M", machine, "-nographic", "-monitor", "none", "-serial", "null",
            "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", str(elf)]


def run_qemu(elf: Path, machine: str, n_inputs: int) -> HarnessOutput:
    from toolchain.firmware.build import require_tool

    require_tool("qemu-system-arm")
    timeout = RUN_TIMEOUT_BASE_S + RUN_TIMEOUT_PER_INPUT_S * n_inputs
    try:
        done = subprocess.run(qemu_command(elf, machine), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TargetUnavailableError(f"qemu-system-arm -M {machine} running {elf} did not finish within "
                                     f"{timeout:.0f} s; check the firmware with fewer inputs") from exc
    log = done.stdout + done.stderr
    if done.returncode != 0 or "DONE" not in log:
        raise ToolchainError(f"the firmware {elf} on qemu-system-arm -M {machine} exited with code "
                             f"{done.returncode} before finishing; its output ends: {log.strip()[-LOG_TAIL:]}")
    return parse_harness(log, n_inputs)


def parse_harness(log: str, n_inputs: int) -> HarnessOutput:
    init = arena = stack = -1
    instr: Dict[int, int] = {}
    chunks: Dict[int, Dict[int, bytes]] = {}
    for line in log.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "INIT":
            init = int(parts[1])
        elif parts[0] == "INSTR":
            instr[int(parts[1])] = int(parts[2])
        elif parts[0] == "OUT":
            chunks.setdefault(int(parts[1]), {})[int(parts[2])] = bytes.fromhex(parts[3] if len(parts) > 3 else "")
        elif parts[0] == "ARENA_USED":
            arena = int(parts[1])
        elif parts[0] == "STACK_USED":
            stack = int(parts[1])
    if sorted(instr) != list(range(n_inputs)) or sorted(chunks) != list(range(n_inputs)) or min(init, arena, stack) < 0:
        raise ToolchainError(f"the firmware's output is incomplete (expected {n_inputs} inputs, got counts for "
                             f"{len(instr)}); it ends: {log.strip()[-LOG_TAIL:]}")
    outputs = tuple(b"".join(chunks[k][off] for off in sorted(chunks[k])) for k in range(n_inputs))
    return HarnessOutput(init, tuple(instr[k] for k in range(n_inputs)), outputs, arena, stack, log)


def decode_outputs(outputs: Tuple[bytes, ...], dtype: str, shape: Tuple[int, ...]) -> np.ndarray:
    per_sample = tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
    return np.stack([np.frombuffer(b, dtype=dtype).reshape(per_sample) for b in outputs])
