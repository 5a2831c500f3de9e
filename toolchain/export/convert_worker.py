"""The TFLite converter in a child process, where a native crash becomes a ``ConversionError``.

TensorFlow's converter (MLIR passes, the calibrator, the quantizer) is C++: on an odd graph it can
abort or segfault, which would end ``toolchain compress`` with no message. Every TFLite conversion
goes through :func:`convert_in_child`: the parent saves the Keras model (``.keras``; the calibration
samples as ``.npy``) into a private temp folder, a child Python loads it, builds the converter from a
:class:`ConvertJob` (plain data: optimizations, op sets, I/O types, calibration) and writes the
flatbuffer back. A child that dies by a signal or exits is one ``ConversionError`` naming the
artifact, the signal and ``--debug``; nothing of the artifact is written.

The child is started isolated (``python -I``, its own working directory), dies with the toolchain
(``PR_SET_PDEATHSIG``), and its folder (the model copy and samples) is removed after each job and
when it stops; a folder left by a SIGKILLed run is removed by the next one. Starting a child costs a
TensorFlow import, so inside :func:`converter_session` (``toolchain.export.export`` opens one) one
child serves every conversion of the export; outside a session each call has its own child.
Bytes are the same as converting in the parent (tested): the model round-trips through ``.keras``
with its layer names, weights and calibrated quantizer ranges.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np

from toolchain.errors import ConversionError

#: a conversion that takes longer than this is stopped (a stuck converter must not hang compress)
CONVERT_TIMEOUT_S = 1800.0
_JOB_PREFIX = "toolchain-convert-"
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from toolchain.export.convert_worker import _serve; _serve(sys.argv[2], sys.argv[3] == '1')")


@dataclass(frozen=True)
class ConvertJob:
    """One ``tf.lite.TFLiteConverter.from_keras_model`` conversion, as plain data.

    Enum values are given by name (``optimizations=("DEFAULT",)`` is ``tf.lite.Optimize.DEFAULT``,
    ``supported_ops`` names ``tf.lite.OpsSet`` members, types name ``tf`` dtypes)."""

    name: str                                  # the artifact, for messages ("tflite-int8")
    optimizations: Tuple[str, ...] = ()
    supported_ops: Tuple[str, ...] = ()
    supported_types: Tuple[str, ...] = ()
    inference_input_type: Optional[str] = None
    inference_output_type: Optional[str] = None
    representative: bool = False               # calibrate on the samples, one per step, in order
    #: ``QuantizationDebugger`` route: "calibrated" returns its calibrated (not yet quantized)
    #: model, "denylisted" the quantized model with ``denylisted_nodes`` kept in float
    debugger: Optional[str] = None
    debug_samples: int = 8                     # the first N samples feed the debugger
    denylisted_nodes: Tuple[str, ...] = ()
    #: ``"module:name"`` of a dict (or a function returning one) of the custom classes the model
    #: needs to save and load (a tfmot QAT graph's quantizers; used inside tfmot's ``quantize_scope``)
    custom_objects: Optional[str] = None


def representative_dataset(calib_x: np.ndarray) -> Callable[[], Iterator[list]]:
    """One sample per step, in order (calibration is a prefix of the train split)."""
    x = np.asarray(calib_x, dtype=np.float32)

    def gen():
        for i in range(len(x)):
            yield [x[i:i + 1]]

    return gen


def build_converter(model, job: ConvertJob, calib_x: Optional[np.ndarray] = None):
    """The configured ``TFLiteConverter`` for ``job`` (runs in the child; importable for tests)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if job.optimizations:
        conv.optimizations = [getattr(tf.lite.Optimize, o) for o in job.optimizations]
    if job.supported_ops:
        conv.target_spec.supported_ops = [getattr(tf.lite.OpsSet, o) for o in job.supported_ops]
    if job.supported_types:
        conv.target_spec.supported_types = [tf.as_dtype(t) for t in job.supported_types]
    if job.inference_input_type:
        conv.inference_input_type = tf.as_dtype(job.inference_input_type)
    if job.inference_output_type:
        conv.inference_output_type = tf.as_dtype(job.inference_output_type)
    if job.representative:
        if calib_x is None or len(calib_x) == 0:
            raise ConversionError(f"{job.name} needs calibration samples; pass a dataset with a train split")
        conv.representative_dataset = representative_dataset(calib_x)
    return conv


def convert_here(model, job: ConvertJob, calib_x: Optional[np.ndarray] = None) -> bytes:
    """Run ``job`` in this process (the child's side of :func:`convert_in_child`)."""
    import tensorflow as tf

    conv = build_converter(model, job, calib_x)
    if job.debugger is None:
        return bytes(conv.convert())
    debug = representative_dataset(np.asarray(calib_x[: job.debug_samples], dtype=np.float32))
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(job.denylisted_nodes))
    dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=debug, debug_options=options)
    if job.debugger == "calibrated":
        return bytes(dbg.calibrated_model)
    if job.debugger == "denylisted":
        return bytes(dbg.get_nondebug_quantized_model())
    raise ConversionError(f"debugger step {job.debugger!r} is not one of calibrated, denylisted")


# --------------------------------------------------------------------------------------------
# Parent side


class _Worker:
    """One child Python serving conversions: a job folder name per line on its stdin, ``ok`` or
    ``err`` per line on its stdout (the child moves its own stdout out of the way first, so the
    converter's native prints cannot reach the protocol)."""

    def __init__(self):
        from toolchain.childproc import clean_stale_jobs, die_with_parent, job_dir

        clean_stale_jobs(_JOB_PREFIX)
        self.debug = bool(os.environ.get("TOOLCHAIN_DEBUG"))
        self.root = job_dir(_JOB_PREFIX)
        self.log_path = os.path.join(self.root, "worker.log")
        self.count = 0
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        if not self.debug:
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, pkg_root, self.root, "1" if self.debug else "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if self.debug else log,
                cwd=self.root, env=env, preexec_fn=die_with_parent(os.getpid()))

    def run(self, model, job: ConvertJob, calib_x: Optional[np.ndarray]) -> bytes:
        from toolchain.model_io import save_model

        self.count += 1
        name = f"job{self.count:04d}"
        folder = Path(self.root, name)
        folder.mkdir()
        try:
            try:
                with _object_scope(job):
                    save_model(model, folder / _model_file(job))
            except Exception as e:  # noqa: BLE001 - Keras raises many types for unsaveable models
                raise ConversionError(f"cannot hand the model to the TFLite converter's process for {job.name} "
                                      f"({type(e).__name__}: {str(e).strip()[:200]}); the model must save as "
                                      ".keras (custom layers need get_config)") from e
            if calib_x is not None:
                np.save(folder / "calib.npy", np.asarray(calib_x, dtype=np.float32))
            (folder / "job.json").write_text(json.dumps(asdict(job)))
            reply = self._ask(name, job)
            if reply == "ok":
                return (folder / "model.tflite").read_bytes()
            detail = (folder / "error.txt").read_text().strip() if (folder / "error.txt").exists() else reply
            raise ConversionError(f"TFLite converter failed for {job.name}: {detail}; run with --debug for the trace")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _ask(self, name: str, job: ConvertJob) -> str:
        from toolchain.childproc import signal_name

        try:
            self.proc.stdin.write((name + "\n").encode())
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], CONVERT_TIMEOUT_S)
            line = self.proc.stdout.readline().decode().strip() if ready else None
        except BrokenPipeError:
            line = ""
        if line is None:
            self.close()
            raise ConversionError(f"the TFLite converter did not finish {job.name} within {CONVERT_TIMEOUT_S:g} s "
                                  "and was stopped; leave this format out or simplify the model")
        if line:
            return line
        code = self.proc.wait()
        self.close()
        raise ConversionError(f"the TFLite converter crashed ({signal_name(code)}) while converting {job.name}, "
                              "so nothing was written: the graph has an operator or shape the converter "
                              "cannot handle; rerun with --debug to see the converter's output, or leave "
                              "this format out")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        shutil.rmtree(self.root, ignore_errors=True)


_lock = threading.RLock()
_worker: Optional[_Worker] = None
_sessions = 0


def _stop() -> None:
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


@contextlib.contextmanager
def converter_session():
    """Conversions inside share one child process (one TensorFlow import); it stops at the end."""
    global _sessions
    with _lock:
        _sessions += 1
    try:
        yield
    finally:
        with _lock:
            _sessions -= 1
            if _sessions == 0:
                _stop()


def convert_in_child(model, job: ConvertJob, calib_x: Optional[np.ndarray] = None) -> bytes:
    """``.tflite`` bytes of ``model`` converted as ``job`` says, in a child process.

    A converter error is a ``ConversionError`` with the converter's message; a crash of the child
    (a signal, an abort) is a ``ConversionError`` naming ``job.name`` and the signal."""
    global _worker
    with _lock:
        try:
            if _worker is None or _worker.proc.poll() is not None or \
                    _worker.debug != bool(os.environ.get("TOOLCHAIN_DEBUG")):
                _stop()
                _worker = _Worker()
            return _worker.run(model, job, calib_x)
        finally:
            if _sessions == 0:
                _stop()


# --------------------------------------------------------------------------------------------
# Child side


def _model_file(job: ConvertJob) -> str:
    # a tfmot QAT graph does not load back from .keras in Keras 2.14 ("Layer 'quantize_layer'
    # expected 5 variables, but received 3"); HDF5 keeps every range (toolchain.quantize.simulate)
    return "model.h5" if job.custom_objects is not None else "model.keras"


def _object_scope(job: ConvertJob):
    """The scope that saves and loads ``job``'s model (tfmot's ``quantize_scope`` with its classes)."""
    if job.custom_objects is None:
        return contextlib.nullcontext()
    import importlib

    import tensorflow_model_optimization as tfmot

    module, attr = job.custom_objects.split(":")
    objects = getattr(importlib.import_module(module), attr)
    return tfmot.quantization.keras.quantize_scope(objects() if callable(objects) else objects)


def _load(folder: Path, job: ConvertJob):
    import tensorflow as tf

    with _object_scope(job):
        # the file was written by the parent from a model it had already loaded (and the user
        # trusted), into a folder only this user can read
        return tf.keras.models.load_model(str(folder / _model_file(job)), compile=False,
                                          **({} if _model_file(job).endswith(".h5") else {"safe_mode": False}))


def fix_quantize_layer_names(qat) -> None:
    """Name a tfmot graph's input ``QuantizeLayer`` s ``quantize_layer``, ``quantize_layer_1``, ...

    tfmot names them from a process-wide counter and the name ends up in the flatbuffer's tensor
    names, so the bytes would depend on what ran before. Renaming a layer of a built Functional
    model breaks saving it (Keras keys the graph's nodes by the old name, and a reload then loops
    forever), so this runs here, on the child's own loaded copy, right before conversion."""
    k = 0
    for layer in qat.layers:
        if type(layer).__name__ == "QuantizeLayer":
            layer._name = "quantize_layer" if k == 0 else f"quantize_layer_{k}"
            k += 1


def _serve(root: str, debug: bool) -> None:
    import logging
    import traceback

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the converter's native prints go where stderr goes (worker.log, or the terminal)
    if not debug:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        folder = Path(root, line.strip())
        try:
            spec = json.loads((folder / "job.json").read_text())
            spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
            job = ConvertJob(**spec)
            calib = folder / "calib.npy"
            model = _load(folder, job)
            if job.custom_objects is not None:
                fix_quantize_layer_names(model)
            data = convert_here(model, job, np.load(calib) if calib.exists() else None)
            (folder / "model.tflite").write_bytes(data)
            reply.write("ok\n")
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises ConversionError
            traceback.print_exc()
            msg = str(e).strip().splitlines()
            (folder / "error.txt").write_text(msg[-1] if msg else type(e).__name__)
            reply.write("err\n")
