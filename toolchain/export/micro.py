"""Run the MCU bundle's model in tflite-micro itself, on this host.

The ``tflite-micro`` Python package wraps tflite-micro's C++ interpreter with its reference kernels,
the code a microcontroller build compiles (CMSIS-NN swaps in faster kernels with the same
arithmetic). ``check_in_micro`` runs the bundle's flatbuffer through it on evaluation samples and
records:

* top-1 agreement and the largest output difference (in int8 steps) against TFLite's interpreter
  on the same file. They are not bit-identical: TFLite's default XNNPACK delegate rounds
  requantization differently from the reference kernels (measured on the MLPerf Tiny DS-CNN int8
  model: up to 22 steps apart on the output, 99.0% top-1 agreement; TFLite without XNNPACK is
  within 1 step of tflite-micro). So the accuracy a microcontroller gives is ``micro_accuracy``,
  not the TFLite figure;
* the smallest tensor arena with which tflite-micro allocates and runs the model, found by
  bisection. This host build has 64-bit pointers, so its persistent structures are larger than on a
  32-bit Cortex-M: the figure is an upper bound for the non-persistent plan plus 64-bit
  bookkeeping, and a check on :func:`toolchain.export.mcu.estimate_arena`.

A bundle whose top-1 agrees with TFLite on fewer than :data:`MIN_AGREEMENT` of the samples is
refused: something in the graph runs differently on a microcontroller.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from toolchain.errors import ConfigError, ConversionError

TFLM_REQUIREMENT = "tflite-micro==0.dev20261023182759"
MIN_AGREEMENT = 0.95
DEFAULT_SAMPLES = 200
_ARENA_STEP = 16
#: the arena search of a microcontroller-sized model takes seconds; a stuck one is stopped
MICRO_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class MicroCheck:
    version: str
    samples: int
    top1_agreement: float          # with TFLite's interpreter (XNNPACK) on the same file
    max_abs_diff_steps: int        # largest output difference, in output quantization steps
    micro_accuracy: Optional[float]
    tflite_accuracy: Optional[float]
    arena_min_bytes: int           # smallest arena that allocates + invokes (64-bit host build)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["runtime"] = "tflite-micro reference kernels (Python package tflite-micro, this host)"
        d["arena_note"] = ("64-bit host build: persistent structures are larger than on a 32-bit "
                           "microcontroller, so this bounds the arena from above for the same kernels")
        return d


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as e:
        raise ConfigError(f"tflite-micro is not installed ({e}); `pip install {TFLM_REQUIREMENT}` "
                          "(it is in requirements.txt) to check the MCU bundle in tflite-micro") from e
    return runtime


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tflite-micro")
    except PackageNotFoundError:  # pragma: no cover - imported but not installed as a distribution
        return "unknown"


@contextlib.contextmanager
def quiet_native_output():
    """Native libraries' printf output (tflite-micro's failed allocations during the arena
    bisection, the TFLite converter's quantizer lines) kept off the user's terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def _runs(runtime, data: bytes, arena: int, x_q: np.ndarray) -> bool:
    """Whether tflite-micro allocates and invokes ``data`` in an ``arena``-byte arena. Each probe
    runs in a forked copy of this process: with some too-small arenas tflite-micro does not fail
    but crashes (SIGSEGV after "Failed to allocate tail memory": a Keras 3 depthwise-separable digits
    model with a residual Add, pruned, at 2,000 bytes), which then counts as "does not run"."""
    if not hasattr(os, "fork"):  # no fork (Windows): probe in place
        return _probe(runtime, data, arena, x_q)
    pid = os.fork()
    if pid == 0:  # the probe's child: report by exit code only, never return into the caller
        code = 1
        try:
            import faulthandler

            faulthandler.disable()  # a crash here is an expected answer, not a traceback to print
            code = 0 if _probe(runtime, data, arena, x_q) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _probe(runtime, data: bytes, arena: int, x_q: np.ndarray) -> bool:
    try:
        interp = runtime.Interpreter.from_bytes(data, arena_size=int(arena))
        interp.set_input(x_q, 0)
        interp.invoke()
        return True
    except (RuntimeError, ValueError):
        return False


def _in_child(func: str, data: bytes, x: np.ndarray, params: dict, name: str):
    """Run ``func(data, x, **params)`` of this module in a child Python (``-I``: the user's working
    directory stays off its import path) and return its JSON result and ``out.npy`` (if written).
    tflite-micro can crash natively (SIGSEGV on a too-small arena for some models); a crash there
    becomes a ``ConversionError`` naming ``name`` and the signal instead of killing the toolchain."""
    import json
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    _runtime()  # a missing package is a ConfigError here, not a child's traceback
    pkg_root = str(Path(__file__).resolve().parents[2])
    code = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); "
            "from toolchain.export import micro; d = sys.argv[2]; "
            "r = getattr(micro, sys.argv[3])(open(d + '/model.tflite', 'rb').read(), np.load(d + '/x.npy'), "
            "out_path=d + '/out.npy', **json.load(open(d + '/params.json'))); print(json.dumps(r))")
    with tempfile.TemporaryDirectory(prefix="toolchain-micro-") as job:
        Path(job, "model.tflite").write_bytes(data)
        np.save(os.path.join(job, "x.npy"), x)
        Path(job, "params.json").write_text(json.dumps(params))
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", code, pkg_root, job, func], cwd=job,
                                  capture_output=True, text=True, timeout=MICRO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"tflite-micro did not finish with {name} within {MICRO_TIMEOUT_S:g} s; "
                                  "the model is too large for a microcontroller: drop mcu from the formats") from None
        if proc.returncode < 0:
            try:
                sig = signal.Signals(-proc.returncode).name
            except ValueError:
                sig = f"signal {-proc.returncode}"
            raise ConversionError(f"tflite-micro crashed ({sig}) while allocating {name}; the model uses an "
                                  "operator or shape tflite-micro cannot run: drop mcu from the formats")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            if "ConversionError: " in tail:
                raise ConversionError(tail.split("ConversionError: ", 1)[1])
            raise ConversionError(f"tflite-micro failed on {name} ({tail[:200]}); drop mcu from the formats")
        out = Path(job, "out.npy")
        return json.loads(lines[-1]), (np.load(out) if out.exists() else None)


def min_arena(data: bytes, x_q: np.ndarray, upper: Optional[int] = None, name: str = "the MCU bundle's model") -> int:
    """Smallest arena (a multiple of 16 bytes) with which tflite-micro allocates and invokes (the
    search runs in a child process, see :func:`_in_child`)."""
    result, _ = _in_child("_min_arena_here", data, x_q, {"upper": upper}, name)
    return int(result)


def _min_arena_here(data: bytes, x_q: np.ndarray, upper: Optional[int] = None, out_path: str = "") -> int:
    """The arena bisection itself (runs in :func:`min_arena`'s child process)."""
    runtime = _runtime()
    hi = int(upper or len(data) * 10)
    with quiet_native_output():
        while not _runs(runtime, data, hi, x_q):
            if hi > 1 << 30:
                raise ConversionError("tflite-micro cannot allocate this model even with a 1 GiB arena; "
                                      "it needs an operator or tensor type tflite-micro lacks")
            hi *= 2
        lo = 0  # lo fails (or is 0), hi runs
        while hi - lo > _ARENA_STEP:
            mid = (lo + hi) // 2 // _ARENA_STEP * _ARENA_STEP
            if mid <= lo:
                break
            if _runs(runtime, data, mid, x_q):
                hi = mid
            else:
                lo = mid
    return hi


def check_in_micro(data: bytes, x: np.ndarray, y: Optional[np.ndarray] = None,
                   samples: int = DEFAULT_SAMPLES, reference: Optional[bytes] = None,
                   name: str = "the MCU bundle's model") -> MicroCheck:
    """Run ``data`` (an integer-I/O ``.tflite``) in tflite-micro on the first ``samples`` float
    inputs of ``x`` and compare with TFLite's interpreter on ``reference`` (the artifact the bundle
    was made from; default: the same bytes)."""
    from toolchain.run import run_artifact

    n = min(int(samples), len(x))
    if n == 0:
        raise ConversionError("no samples to check the MCU bundle in tflite-micro; give an evaluation split")
    x = np.asarray(x[:n], dtype=np.float32)
    info, micro = _in_child("_run_micro_here", data, x, {}, name)
    out_scale, arena = info["out_scale"], info["arena"]
    ref = run_artifact(reference if reference is not None else data, x).reshape(n, -1)
    steps = int(np.round(np.abs(micro - ref).max() / out_scale)) if out_scale > 0 else 0
    agreement = float((micro.argmax(-1) == ref.argmax(-1)).mean())
    if agreement < MIN_AGREEMENT:
        raise ConversionError(f"the MCU bundle's model gives a different top-1 in tflite-micro than in TFLite on "
                              f"{1 - agreement:.0%} of {n} samples (largest output difference {steps} steps); "
                              "a kernel runs differently on a microcontroller: check the graph's operators")
    acc = lambda p: None if y is None else float((p.argmax(-1) == np.asarray(y[:n])).mean())  # noqa: E731
    return MicroCheck(_version(), n, agreement, steps, acc(micro), acc(ref), arena)


def micro_outputs(data: bytes, x_q: np.ndarray, name: str = "the model") -> np.ndarray:
    """tflite-micro's raw output tensors (its reference kernels, this host) for already-quantized
    inputs ``x_q`` (one sample per row, the model's input dtype), one row per sample: what firmware
    built with TFLM must reproduce bit for bit (runs in a child process, see :func:`_in_child`)."""
    _, out = _in_child("_micro_outputs_here", data, np.asarray(x_q), {}, name)
    return out


def _micro_outputs_here(data: bytes, x_q: np.ndarray, out_path: str) -> dict:
    """In :func:`micro_outputs`' child process (the runner's :class:`~deploy.runner.MicroBackend`)."""
    from deploy.runner import MicroBackend, RunnerError

    _runtime()  # a missing package is a ConfigError naming the requirement
    try:
        backend = MicroBackend(data, name="the model")
    except RunnerError as e:
        raise ConversionError(str(e)) from None
    outs = [np.asarray(backend.predict(np.asarray(sample, dtype=backend.input["dtype"]))).reshape(-1)
            for sample in x_q]
    np.save(out_path, np.stack(outs))
    return {"samples": len(outs)}


def _run_micro_here(data: bytes, x: np.ndarray, out_path: str) -> dict:
    """In :func:`check_in_micro`'s child process: run every float sample of ``x`` through
    tflite-micro (the runner's :class:`~deploy.runner.MicroBackend`; inputs quantized and outputs
    dequantized with the model's own grids), save the outputs to ``out_path`` and return the
    output scale and the smallest arena."""
    from deploy.runner import MicroBackend, RunnerError, infer, prepare_inputs

    _runtime()  # a missing package is a ConfigError naming the requirement
    try:
        backend = MicroBackend(data, name="the MCU bundle's model")
        in_dtype, out_dtype = np.dtype(backend.input["dtype"]), np.dtype(backend.output["dtype"])
        if in_dtype.kind not in "iu" or out_dtype.kind not in "iu":
            raise ConversionError(f"the MCU bundle's model has {in_dtype}/{out_dtype} I/O; it needs integer I/O "
                                  "(export tflite-int8)")
        x_q = prepare_inputs(x, backend.input)
        np.save(out_path, infer(backend, x_q).reshape(len(x_q), -1))
    except RunnerError as e:
        raise ConversionError(str(e)) from None
    return {"out_scale": backend.output["quantization"][0], "arena": _min_arena_here(data, x_q[:1])}
