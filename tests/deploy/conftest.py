"""Tiny artifacts made on the fly: one Keras model, its float and int8 .tflite, its .onnx, and a
labelled npz dataset for it. The export stage is not used: these tests stand on their own."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

INPUT_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
EVAL_SAMPLES = 24


@dataclass(frozen=True)
class Artifacts:
    dir: Path
    keras: Path
    tflite_float: Path
    tflite_int8: Path
    onnx: Path
    data_npz: Path          # npz:PATH dataset (x, y, x_eval, y_eval)
    inputs_float: Path      # runner inputs: float x, y
    x_eval: np.ndarray
    y_eval: np.ndarray
    keras_out: np.ndarray   # Keras softmax outputs on x_eval


def _build(tmp: Path) -> Artifacts:
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(INPUT_SHAPE, name="x")
    h = tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = tf.keras.layers.DepthwiseConv2D(3, name="dw")(h)
    h = tf.keras.layers.ReLU(name="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = tf.keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probs")(h)
    model = tf.keras.Model(inp, out, name="tiny")
    rng = np.random.default_rng(0)
    x_train = rng.uniform(0, 1, (64,) + INPUT_SHAPE).astype(np.float32)
    x_eval = rng.uniform(0, 1, (EVAL_SAMPLES,) + INPUT_SHAPE).astype(np.float32)
    keras_out = model.predict(x_eval, verbose=0)
    # labels: the model's own predictions, with every fourth flipped, so accuracy is 0.75-ish
    # and not trivially 0 or 1
    y_eval = keras_out.argmax(1).astype(np.int64)
    y_eval[::4] = (y_eval[::4] + 1) % NUM_CLASSES
    y_train = model.predict(x_train, verbose=0).argmax(1).astype(np.int64)

    keras_path = tmp / "tiny.keras"
    model.save(keras_path)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (tmp / "tiny_float.tflite").write_bytes(conv.convert())
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x_train[i:i + 1]] for i in range(len(x_train)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (tmp / "tiny_int8.tflite").write_bytes(conv.convert())
    tf2onnx.convert.from_keras(model, input_signature=[tf.TensorSpec((None,) + INPUT_SHAPE,
                                                                     tf.float32, name="x")],
                               opset=13, output_path=str(tmp / "tiny.onnx"))
    np.savez(tmp / "data.npz", x=x_train, y=y_train, x_eval=x_eval, y_eval=y_eval,
             class_names=np.array(["a", "b", "c"]))
    np.savez(tmp / "inputs_float.npz", x=x_eval, y=y_eval)
    return Artifacts(tmp, keras_path, tmp / "tiny_float.tflite", tmp / "tiny_int8.tflite",
                     tmp / "tiny.onnx", tmp / "data.npz", tmp / "inputs_float.npz", x_eval,
                     y_eval, keras_out)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return _build(tmp_path_factory.mktemp("deploy-artifacts"))


RUNNER = Path(__file__).resolve().parents[2] / "deploy" / "runner.py"


def run_runner(*args, python=None, prelude: str | None = None, timeout=300):
    """Run deploy/runner.py in a child process; ``prelude`` runs first (e.g. to hide a module).
    Returns (returncode, parsed JSON of the last stdout line, stderr)."""
    import json

    argv = [python or sys.executable]
    if prelude:
        argv += ["-c", f"import runpy, sys; {prelude}; sys.argv = ['runner.py'] + sys.argv[1:]; "
                       f"runpy.run_path({str(RUNNER)!r}, run_name='__main__')"]
    else:
        argv.append(str(RUNNER))
    done = subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, (json.loads(lines[-1]) if lines else None), done.stderr


def describe_mismatch(actual, expected, atol) -> str:
    """How many elements are off, where the worst is, and by how much."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    diff = np.abs(actual - expected)
    bad = diff > atol
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    return (f"{int(bad.sum())} of {diff.size} elements differ by more than {atol}; worst at "
            f"{tuple(int(i) for i in worst)}: {actual[worst]!r} vs {expected[worst]!r} "
            f"(|diff| {diff[worst]:.3g})")
