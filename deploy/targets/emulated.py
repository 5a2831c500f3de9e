"""``emulated-pi4`` / ``emulated-pi5``: a Raspberry Pi's software on this machine under QEMU.

Debian bookworm arm64 (Raspberry Pi OS's base, Python 3.11) with numpy, ai-edge-litert and
onnxruntime, run through ``qemu-aarch64-static`` with the board's CPU model and /proc/cpuinfo (see
``deploy.emulated``). Every result carries ``"emulated": true`` and the QEMU CPU: these runs show
the artifact loads and computes the right outputs on aarch64 with the Pi's runtimes; their timings
are QEMU's on this host and are never Raspberry Pi timings.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from deploy import emulated
from deploy.targets.base import RunConfig, RunRequest, Target, stage_files
from deploy.targets.local import run_process
from toolchain.errors import ConfigError

EMULATION_NOTE = ("QEMU user-mode emulation on {host}: shows the artifact runs correctly on "
                  "aarch64 with Raspberry Pi OS's Python and runtimes; timings are not "
                  "Raspberry Pi timings")


class EmulatedPiTarget(Target):
    emulated = True
    board_name = "pi4"

    def __init__(self, rootfs_dir: Optional[str] = None, quiet: bool = False):
        self.rootfs_dir = None if rootfs_dir is None else Path(rootfs_dir).expanduser()
        self.quiet = quiet
        self.board = emulated.BOARDS[self.board_name]

    @property
    def spec(self) -> str:
        return f"emulated-{self.board_name}"

    def info(self):
        import platform

        return dict(super().info(), board=self.board.model, qemu_cpu=self.board.qemu_cpu,
                    rootfs=str(self.rootfs_dir or emulated.default_rootfs_dir()),
                    note=EMULATION_NOTE.format(host=platform.machine()))

    def check(self) -> None:
        emulated.check_host()

    def label(self, result: dict, request: RunRequest, config: RunConfig) -> dict:
        import platform

        result = super().label(result, request, config)
        result["emulation"] = {"board": self.board.model, "qemu_cpu": self.board.qemu_cpu,
                               "host_machine": platform.machine(),
                               "note": EMULATION_NOTE.format(host=platform.machine())}
        return result

    def run(self, request: RunRequest, configs: Sequence[RunConfig],
            on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
        if request.artifact.is_dir() or request.artifact.suffix.lower() not in (".tflite",
                                                                                ".onnx"):
            raise ConfigError(f"{request.artifact.name} cannot run on {self.spec}: only .tflite "
                              "and .onnx files run on a Pi; benchmark Keras models with "
                              "--target local")
        self.check()
        rootfs = emulated.ensure_rootfs(self.rootfs_dir, quiet=self.quiet)
        work = Path(tempfile.mkdtemp(prefix="bench-", dir=rootfs.root / "tmp"))
        inside = "/tmp/" + work.name
        try:
            names = stage_files(request, work)
            results = []
            for config in configs:
                where = f"{self.spec} ({config.label()})"
                inputs = None if names["inputs"] is None else f"{inside}/{names['inputs']}"
                argv = [emulated.VENV_PYTHON, f"{inside}/{names['runner']}"] + \
                    request.runner_args(config, f"{inside}/{names['artifact']}", inputs)
                done = run_process(emulated.emulated_argv(rootfs, self.board, argv),
                                   request.timeout_s, where, env=emulated.emulated_env(self.board))
                self.record(where, done, request, config, results, on_result)
            return results
        finally:
            shutil.rmtree(work, ignore_errors=True)


class EmulatedPi4Target(EmulatedPiTarget):
    key = "target.emulated_pi4"
    board_name = "pi4"


class EmulatedPi5Target(EmulatedPiTarget):
    key = "target.emulated_pi5"
    board_name = "pi5"
