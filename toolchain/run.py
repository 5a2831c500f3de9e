"""Run an exported artifact on a batch of samples: the toolchain's one way to do it.

    scores = run_artifact(bundle.artifacts["tflite-int8"], x_eval)   # float inputs, float outputs

The work is done by the device runner's backends (``deploy/runner.py``: ``TFLiteBackend``,
``OnnxBackend``, ``infer``), the same code that measures an artifact on a Raspberry Pi, so
verification, the MCU check, benchmarks and ``toolchain bench`` run artifacts one way. Float
inputs are quantized with the artifact's own input scale and zero point and integer outputs
dequantized with the output's; integer inputs of the artifact's input type are fed as they are.

Export and verification both import this module and neither imports the other's internals
(``tests/test_import_structure.py`` checks it). The runner's errors become toolchain errors with
the runner's message: a missing runtime is :class:`TargetUnavailableError`, an unreadable
artifact :class:`ModelLoadError`, inputs of the wrong shape :class:`DataError`.
"""
from __future__ import annotations

import os
import numpy as np

from deploy import runner as _runner
from toolchain.errors import ConfigError, DataError, ModelLoadError, TargetUnavailableError

#: TFLite runs in TensorFlow's own interpreter (tf.lite, already in the toolchain's process), the
#: one the export and verification numbers were measured with. ai-edge-litert 1.4.0 (the device
#: default) is not interchangeable: its XNNPACK float kernels moved the MLPerf Tiny DS-CNN float32
#: softmax outputs by up to 0.20 on 500 kws01 samples, 3 top-1 changes (int8 and reference kernels
#: agree bit for bit).
TFLITE_RUNTIME = "tensorflow"
#: samples per invoke (a fixed batch dimension in the artifact wins)
BATCH_SIZE = _runner.INFER_BATCH

_ERRORS = {"missing_runtime": TargetUnavailableError, "usage": ConfigError,
           "artifact": ModelLoadError, "inputs": DataError}

def _target(artifact):
    """A path or ``.tflite`` bytes from an ``Artifact`` (anything with ``.path``), a path or bytes."""
    if isinstance(artifact, (bytes, bytearray)):
        return bytes(artifact)
    return os.fspath(getattr(artifact, "path", artifact))


def _toolchain_error(e: "_runner.RunnerError"):
    return _ERRORS.get(e.kind, ModelLoadError)(str(e))


def open_artifact(artifact, threads: int = 1, xnnpack: bool = True,
                  reference_kernels: bool = False):
    """The runner backend for ``artifact`` (``.tflite`` file or bytes, ``.onnx`` file)."""
    target = _target(artifact)
    try:
        if isinstance(target, bytes):
            return _runner.TFLiteBackend(target, threads, xnnpack, TFLITE_RUNTIME,
                                         reference_kernels=reference_kernels)
        runtime = TFLITE_RUNTIME if target.lower().endswith(".tflite") else None
        return _runner.open_backend(target, threads, xnnpack, runtime,
                                    reference_kernels=reference_kernels)
    except _runner.RunnerError as e:
        raise _toolchain_error(e) from None


def run_backend(backend, x, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Float32 outputs of an open backend on every sample of ``x``."""
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype != np.dtype(backend.input["dtype"]):
        x = x.astype(np.float32)  # integer values that are not the artifact's own grid
    try:
        return _runner.infer(backend, x, batch_size)
    except _runner.RunnerError as e:
        raise _toolchain_error(e) from None


def run_artifact(artifact, x, batch_size: int = BATCH_SIZE, threads: int = 1,
                 xnnpack: bool = True, reference_kernels: bool = False) -> np.ndarray:
    """Float32 outputs of ``artifact`` on every sample of ``x`` (N, ...), in its own runtime.

    ``xnnpack=False`` runs TFLite's builtin kernels without delegates, ``reference_kernels=True``
    its reference kernels."""
    backend = open_artifact(artifact, threads, xnnpack, reference_kernels)
    return run_backend(backend, x, batch_size)


__all__ = ["BATCH_SIZE", "TFLITE_RUNTIME", "open_artifact", "run_artifact", "run_backend"]
