"""``local``: this machine, with the Python running the toolchain.

The runner runs in a fresh temporary directory as its own process per configuration (so peak RSS
and load time belong to that configuration alone), on copies of the artifact and inputs under the
same fixed names a device gets. Keras models go through ``deploy.keras_runner`` (TensorFlow), in
place.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from deploy.targets.base import (
    RunConfig,
    RunRequest,
    Target,
    stage_files,
    tail,
    temp_dir,
)
from toolchain.errors import TargetUnavailableError

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def run_process(argv: List[str], timeout_s: float, where: str, cwd: Optional[str] = None,
                env: Optional[dict] = None, stdin=None) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own process group; on timeout kill the whole group and say so."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin if stdin is not None else
                            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TargetUnavailableError(
            f"{where}: no result within {timeout_s:g} s (killed); raise --timeout or lower "
            f"--runs. stderr ends: {tail(err, 400)}") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class LocalTarget(Target):
    key = "target.local"

    def __init__(self, python: Optional[str] = None, trust_model: bool = False):
        self.python = python or sys.executable
        self.trust_model = trust_model  # Keras models with Lambda layers / custom objects

    @property
    def spec(self) -> str:
        return "local"

    def info(self):
        return dict(super().info(), python=self.python)

    def run(self, request: RunRequest, configs: Sequence[RunConfig],
            on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
        from deploy.keras_runner import is_keras_artifact

        keras = is_keras_artifact(str(request.artifact))
        work = temp_dir("toolchain-bench-")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["TOOLCHAIN_TRUST_MODEL"] = "1" if self.trust_model else "0"
        try:
            if keras:
                entry = [self.python, "-m", "deploy.keras_runner"]
                artifact = str(request.artifact.resolve())
                inputs = None
                if request.inputs is not None:
                    inputs = str(work / "inputs.npz")
                    shutil.copy2(request.inputs, inputs)
            else:
                names = stage_files(request, work)
                entry = [self.python, names["runner"]]
                artifact, inputs = names["artifact"], names["inputs"]
            results = []
            for config in configs:
                where = f"local ({config.label()})"
                argv = entry + request.runner_args(config, artifact, inputs)
                done = run_process(argv, request.timeout_s, where, cwd=str(work), env=env)
                self.record(where, done, request, config, results, on_result)
            return results
        finally:
            shutil.rmtree(work, ignore_errors=True)
