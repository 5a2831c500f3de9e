"""What every target shares: the configuration of one run, the target interface, and turning the
runner's JSON (or its failure) into a result or an error a user can act on."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence

from toolchain.errors import DataError, ModelLoadError, TargetUnavailableError, ToolchainError

RUNNER = Path(__file__).resolve().parents[1] / "runner.py"
#: default limit on one configuration's run on a device (load + warm-up + runs + accuracy pass)
DEFAULT_RUN_TIMEOUT_S = 900.0
#: how much of a failed runner's stderr goes into the error message
STDERR_TAIL = 1200


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration: runtime threads, and for TFLite whether XNNPACK is applied
    (``None`` for ONNX Runtime and Keras, where the switch does not exist)."""

    threads: int = 1
    xnnpack: Optional[bool] = None

    def label(self) -> str:
        xnn = "" if self.xnnpack is None else f", xnnpack {'on' if self.xnnpack else 'off'}"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}{xnn}"

    def runner_args(self) -> List[str]:
        args = ["--threads", str(self.threads)]
        if self.xnnpack is not None:
            args += ["--xnnpack", "on" if self.xnnpack else "off"]
        return args


@dataclass(frozen=True)
class RunRequest:
    """What is measured, the same on every target. Paths are on this machine; a target ships
    them under fixed names (``artifact_name``, ``inputs.npz``), never the user's file names."""

    artifact: Path
    inputs: Optional[Path] = None
    runs: int = 100
    warmup: int = 10
    include_outputs: bool = False
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S

    @property
    def artifact_name(self) -> str:
        return "model" + self.artifact.suffix.lower()

    def runner_args(self, config: RunConfig, artifact: str, inputs: Optional[str]) -> List[str]:
        args = ["--artifact", artifact, "--runs", str(self.runs), "--warmup", str(self.warmup)]
        if inputs is not None:
            args += ["--inputs", inputs]
        if self.include_outputs:
            args.append("--include-outputs")
        return args + config.runner_args()


class Target(ABC):
    """Where a runner executes. ``run`` returns one runner JSON per configuration, in order."""

    key: ClassVar[str]
    emulated: ClassVar[bool] = False

    @property
    @abstractmethod
    def spec(self) -> str:
        """The CLI string naming this target (``local``, ``ssh://pi@board``, ``emulated-pi4``)."""

    def info(self) -> Dict[str, object]:
        return {"spec": self.spec, "key": self.key, "emulated": self.emulated}

    def check(self) -> None:
        """Raise ``TargetUnavailableError`` now if the target cannot run anything."""

    @abstractmethod
    def run(self, request: RunRequest, configs: Sequence[RunConfig],
            on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Measure ``request`` once per configuration; ``on_result`` sees each result as it
        arrives (for progress)."""

    def label(self, result: dict, request: RunRequest, config: RunConfig) -> dict:
        """The runner's JSON, named after the user's artifact and stamped with where it ran."""
        result = dict(result)
        result["artifact"] = request.artifact.name
        result["config"] = config.label()
        result["target"] = self.spec
        result["emulated"] = self.emulated
        return result

    def record(self, where: str, done, request: RunRequest, config: RunConfig, results: List[dict],
               on_result: Optional[Callable[[dict], None]]) -> None:
        """Parse one finished runner process, label its JSON and hand it on."""
        self.emit(parse_runner_output(where, done.returncode, done.stdout, done.stderr), request, config,
                  results, on_result)

    def emit(self, doc: dict, request: RunRequest, config: RunConfig, results: List[dict],
             on_result: Optional[Callable[[dict], None]]) -> None:
        """Label one configuration's runner JSON, collect it and hand it on."""
        results.append(self.label(doc, request, config))
        if on_result is not None:
            on_result(results[-1])


def stage_files(request: RunRequest, into: Path) -> Dict[str, str]:
    """Copy the runner, artifact and inputs into ``into`` under fixed names; return the names."""
    shutil.copy2(RUNNER, into / "runner.py")
    names = {"runner": "runner.py", "artifact": request.artifact_name, "inputs": None}
    shutil.copy2(request.artifact, into / names["artifact"])
    if request.inputs is not None:
        shutil.copy2(request.inputs, into / "inputs.npz")
        names["inputs"] = "inputs.npz"
    return names


def parse_runner_output(where: str, returncode: int, stdout: str, stderr: str) -> dict:
    """The runner's JSON result, or the ``ToolchainError`` its output calls for."""
    doc = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            break
    if isinstance(doc, dict) and "error" in doc:
        message = str(doc.get("message", "")).replace("this machine", "the device")
        if doc["error"] == "missing_runtime":
            raise TargetUnavailableError(f"{where}: {message}")
        if doc["error"] == "artifact":
            raise ModelLoadError(f"{where}: {message}")
        if doc["error"] == "inputs":
            raise DataError(f"{where}: {message}")
        raise ToolchainError(f"{where}: runner error ({doc['error']}): {message}")
    if returncode != 0 or not isinstance(doc, dict):
        tail = stderr.strip()[-STDERR_TAIL:] or "(no output)"
        raise TargetUnavailableError(
            f"{where}: the runner exited with code {returncode} without a result; its stderr "
            f"ends: {tail}")
    return doc


def temp_dir(prefix: str, parent: Optional[Path] = None) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent)))


def tail(text: str, n: int = STDERR_TAIL) -> str:
    text = (text or "").strip()
    return text[-n:] if text else "(no output)"


def which_or_none(program: str) -> Optional[str]:
    return shutil.which(program, path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")
