"""Measure a Keras model (``.keras``, ``.h5`` or a SavedModel directory) with the runner's harness.

The same warm-up, timed single-sample loop, percentiles, accuracy pass, peak RSS and JSON as
``deploy/runner.py`` (whose ``measure`` does the work), so Keras, TFLite and ONNX Runtime numbers
are comparable. This one needs TensorFlow and the toolchain, so it runs on the local target only:

    python -m deploy.keras_runner --artifact model.keras --inputs inputs.npz --threads 1

The model is called through one ``tf.function`` with a fixed single-sample signature (what a
deployed TensorFlow model runs), with ``threads`` intra-op threads and one inter-op thread.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from deploy import runner

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class KerasBackend:
    format = "keras"

    def __init__(self, path: str, threads: int, xnnpack=None, runtime: str | None = None):
        if runtime not in (None, "tensorflow", "keras"):
            raise runner.RunnerError("usage", f"--runtime {runtime!r} cannot run a Keras model; "
                                              "use tensorflow")
        t0 = time.perf_counter()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        # Must happen before TensorFlow creates its thread pools (first op in this process).
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from toolchain.errors import ModelLoadError
        from toolchain.model_io import load_model

        self.import_ms = (time.perf_counter() - t0) * 1e3
        self.runtime = {"name": "keras", "version": tf.__version__, "fallback": False}
        t0 = time.perf_counter()
        try:
            model = load_model(path, trust_model=os.environ.get("TOOLCHAIN_TRUST_MODEL") == "1")
        except ModelLoadError as e:
            raise runner.RunnerError("artifact", str(e)) from None
        shape = [1] + [d for d in model.input_shape[1:]]
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec(shape, tf.float32)])
        self._fn.get_concrete_function()  # trace now: tracing is loading, not inference
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.input = runner._io_spec(model.input_names[0], np.float32, shape)
        self.output = runner._io_spec(model.output_names[0], np.float32,
                                      [1] + list(model.output_shape[1:]))
        self.xnnpack = None
        self.xnnpack_applied = None
        self.threads = threads

    def predict(self, x):
        return self._fn(x).numpy()


def is_keras_artifact(path: str) -> bool:
    return os.path.isdir(path) or os.path.splitext(path)[1].lower() in KERAS_SUFFIXES


# "/" is the runner's key for a directory (a SavedModel).
BACKENDS = {**{s: KerasBackend for s in KERAS_SUFFIXES}, "/": KerasBackend}


def main(argv=None) -> int:
    return runner.main(argv, backends=BACKENDS, prog="python -m deploy.keras_runner")


if __name__ == "__main__":
    sys.exit(main())
