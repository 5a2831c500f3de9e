"""deploy/runner.py as a device runs it: a child process printing one JSON object. Every artifact
kind is checked against the Keras reference on the same inputs."""
from __future__ import annotations

import numpy as np
import pytest

from tests.deploy.conftest import describe_mismatch, run_runner

#: float TFLite / ONNX Runtime vs Keras on softmax outputs: only op ordering differs
FLOAT_ATOL = 1e-5
#: int8 TFLite vs Keras on softmax outputs: the output grid is 1/256, plus weight/activation
#: rounding in three layers of a tiny model
INT8_ATOL = 0.03
RUNS = 20
KEYS = {"schema", "artifact", "artifact_bytes", "format", "runtime", "threads", "xnnpack",
        "xnnpack_applied", "input", "output", "inputs", "import_ms", "load_ms", "runs", "warmup",
        "latency_ms", "throughput_per_s", "outputs_sha256", "accuracy", "accuracy_samples",
        "peak_rss_mib", "peak_rss_source", "peak_rss_before_load_mib", "peak_rss_after_load_mib",
        "machine"}


def _check_common(doc, artifacts, fmt):
    assert doc is not None and "error" not in doc, doc
    assert KEYS <= set(doc), KEYS - set(doc)
    assert doc["format"] == fmt
    lat = doc["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert doc["runs"] == RUNS and doc["throughput_per_s"] > 0
    assert doc["peak_rss_mib"] >= doc["peak_rss_after_load_mib"] >= \
        doc["peak_rss_before_load_mib"] > 0
    assert doc["machine"]["machine"] and doc["machine"]["python"]
    out = np.array(doc["outputs"])
    assert out.shape == artifacts.keras_out.shape
    # accuracy is what the reported outputs say it is
    assert doc["accuracy"] == pytest.approx(np.mean(out.argmax(1) == artifacts.y_eval))
    assert doc["accuracy_samples"] == len(artifacts.y_eval)
    return out


def test_float_tflite_matches_keras(artifacts):
    rc, doc, err = run_runner("--artifact", artifacts.tflite_float, "--inputs",
                              artifacts.inputs_float, "--runs", RUNS, "--include-outputs")
    assert rc == 0, err
    out = _check_common(doc, artifacts, "tflite")
    assert doc["runtime"]["name"] in ("ai_edge_litert", "tflite_runtime", "tensorflow.lite")
    assert doc["runtime"]["fallback"] == (doc["runtime"]["name"] == "tensorflow.lite")
    assert doc["xnnpack"] is True and doc["xnnpack_applied"] is not False
    assert np.allclose(out, artifacts.keras_out, atol=FLOAT_ATOL), \
        describe_mismatch(out, artifacts.keras_out, FLOAT_ATOL)


def test_int8_tflite_quantizes_float_inputs_and_dequantizes_outputs(artifacts, tmp_path):
    rc, doc, err = run_runner("--artifact", artifacts.tflite_int8, "--inputs",
                              artifacts.inputs_float, "--runs", RUNS, "--include-outputs",
                              "--xnnpack", "off", "--threads", 2)
    assert rc == 0, err
    out = _check_common(doc, artifacts, "tflite")
    assert doc["input"]["dtype"] == "int8" and doc["output"]["dtype"] == "int8"
    scale, zp = doc["input"]["quantization"]
    assert scale > 0 and -128 <= zp <= 127
    assert doc["xnnpack"] is False and doc["xnnpack_applied"] is False and doc["threads"] == 2
    assert np.allclose(out, artifacts.keras_out, atol=INT8_ATOL), \
        describe_mismatch(out, artifacts.keras_out, INT8_ATOL)
    # int8 inputs quantized beforehand (with x_quantization for reference) give the same bytes out
    q = np.clip(np.round(artifacts.x_eval / scale) + zp, -128, 127).astype(np.int8)
    np.savez(tmp_path / "int8.npz", x=q, y=artifacts.y_eval, x_quantization=np.array([scale, zp]))
    rc2, doc2, err2 = run_runner("--artifact", artifacts.tflite_int8, "--inputs",
                                 tmp_path / "int8.npz", "--runs", 2, "--xnnpack", "off",
                                 "--threads", 2)
    assert rc2 == 0, err2
    assert doc2["outputs_sha256"] == doc["outputs_sha256"]


def test_onnx_matches_keras(artifacts):
    rc, doc, err = run_runner("--artifact", artifacts.onnx, "--inputs", artifacts.inputs_float,
                              "--runs", RUNS, "--include-outputs", "--threads", 2)
    assert rc == 0, err
    out = _check_common(doc, artifacts, "onnx")
    assert doc["runtime"]["name"] == "onnxruntime" and doc["xnnpack"] is None
    assert doc["threads"] == 2
    assert np.allclose(out, artifacts.keras_out, atol=FLOAT_ATOL), \
        describe_mismatch(out, artifacts.keras_out, FLOAT_ATOL)


def test_random_inputs_without_labels(artifacts):
    rc, doc, err = run_runner("--artifact", artifacts.onnx, "--runs", 3, "--samples", 5)
    assert rc == 0, err
    assert doc["inputs"] == {"source": "random", "seed": 0, "samples": 5}
    assert doc["accuracy"] is None


def test_missing_runtime_names_the_pip_install(artifacts):
    hide = "sys.modules['onnxruntime'] = None"
    rc, doc, _ = run_runner("--artifact", artifacts.onnx, prelude=hide)
    assert rc == 3
    assert doc["error"] == "missing_runtime"
    assert "pip install" in doc["install"] and "onnxruntime==" in doc["install"]
    hide_all = ("sys.modules.update({m: None for m in ('ai_edge_litert', 'tflite_runtime', "
                "'tensorflow')})")
    rc, doc, _ = run_runner("--artifact", artifacts.tflite_float, prelude=hide_all)
    assert rc == 3 and "ai-edge-litert==" in doc["install"], doc
    assert "ai_edge_litert" in doc["message"] and "tensorflow" in doc["message"]
    rc, doc, _ = run_runner("--artifact", artifacts.onnx, prelude="sys.modules['numpy'] = None")
    assert rc == 3 and "numpy<2" in doc["install"], doc


def test_bad_inputs_and_artifacts_are_reported(artifacts, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 5, 5, 1), np.float32))
    rc, doc, _ = run_runner("--artifact", artifacts.onnx, "--inputs", tmp_path / "wrong.npz")
    assert rc == 2 and doc["error"] == "inputs"
    assert "(5, 5, 1)" in doc["message"] and "[8, 8, 1]" in doc["message"]
    np.savez(tmp_path / "nox.npz", y=np.zeros(2, np.int64))
    rc, doc, _ = run_runner("--artifact", artifacts.onnx, "--inputs", tmp_path / "nox.npz")
    assert rc == 2 and doc["error"] == "inputs" and "no 'x'" in doc["message"]
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    rc, doc, _ = run_runner("--artifact", tmp_path / "broken.onnx")
    assert rc == 2 and doc["error"] == "artifact"
    (tmp_path / "broken.tflite").write_bytes(b"not a flatbuffer")
    rc, doc, _ = run_runner("--artifact", tmp_path / "broken.tflite")
    assert rc == 2 and doc["error"] == "artifact" and "cannot load" in doc["message"]
    rc, doc, _ = run_runner("--artifact", tmp_path / "model.pt")
    assert rc == 2 and doc["error"] == "artifact" and "does not exist" in doc["message"]


def test_prepare_inputs_quantizes_with_the_model_parameters():
    from deploy.runner import RunnerError, prepare_inputs

    spec = {"name": "x", "dtype": "int8", "shape": [1, 2], "quantization": [0.5, -3]}
    x = np.array([[0.0, 1.0], [100.0, -100.0]], np.float32)
    assert prepare_inputs(x, spec).tolist() == [[-3, -1], [127, -128]]
    # int8 data with its own quantization is re-quantized for the model
    other = prepare_inputs(np.array([[4, 6]], np.int8), spec, x_quantization=[0.25, 0])
    assert other.tolist() == [[-1, 0]]
    fspec = {"name": "x", "dtype": "float32", "shape": [None, 2], "quantization": None}
    assert prepare_inputs(np.array([[2, 4]], np.int8), fspec, [0.5, 2]).tolist() == [[0.0, 1.0]]
    with pytest.raises(RunnerError, match="x_quantization"):
        prepare_inputs(np.array([[2, 4]], np.int8), fspec)


# ---- the same backends as the toolchain's one way to run an artifact (toolchain.run) ---------

#: ``--runtime`` name of the runtime a runner JSON reports
RUNTIME_FLAG = {"ai_edge_litert": "ai_edge_litert", "tflite_runtime": "tflite_runtime",
                "tensorflow.lite": "tensorflow"}


def test_infer_in_batches_equals_the_runners_single_sample_outputs(artifacts):
    """``infer`` quantizes float inputs, runs batches of 5 (the interpreter resized between the
    last short batch and the others) and dequantizes: the very outputs of the runner's
    one-sample-at-a-time pass, same runtime and kernels."""
    from deploy.runner import TFLiteBackend, infer

    rc, doc, err = run_runner("--artifact", artifacts.tflite_int8, "--inputs",
                              artifacts.inputs_float, "--runs", 1, "--include-outputs",
                              "--xnnpack", "off")
    assert rc == 0, err
    backend = TFLiteBackend(str(artifacts.tflite_int8), 1, xnnpack=False,
                            runtime=RUNTIME_FLAG[doc["runtime"]["name"]])
    got = infer(backend, artifacts.x_eval, batch_size=5)
    assert got.dtype == np.float32 and got.shape == artifacts.keras_out.shape
    assert np.array_equal(got, np.array(doc["outputs"], np.float32))


def test_reference_kernels_from_bytes(artifacts):
    from deploy.runner import TFLiteBackend, infer

    backend = TFLiteBackend(artifacts.tflite_int8.read_bytes(), 1, reference_kernels=True)
    assert backend.reference_kernels and backend.xnnpack is False
    assert backend.xnnpack_applied is False
    got = infer(backend, artifacts.x_eval)
    assert np.allclose(got, artifacts.keras_out, atol=INT8_ATOL), \
        describe_mismatch(got, artifacts.keras_out, INT8_ATOL)


def test_integer_outputs_without_a_grid_are_refused():
    from deploy.runner import RunnerError, dequantize

    spec = {"name": "y", "dtype": "int8", "shape": [1, 2], "quantization": None}
    with pytest.raises(RunnerError, match="without a quantization scale"):
        dequantize(np.array([[1, 2]], np.int8), spec)
    spec["quantization"] = [0.5, 1]
    assert dequantize(np.array([[1, 3]], np.int8), spec).tolist() == [[0.0, 1.0]]


def test_toolchain_run_raises_toolchain_errors(artifacts, tmp_path):
    from toolchain.errors import ConfigError, DataError, ModelLoadError
    from toolchain.run import run_artifact

    with pytest.raises(ModelLoadError, match="does not exist"):
        run_artifact(tmp_path / "absent.tflite", artifacts.x_eval)
    with pytest.raises(DataError, match=r"\(5, 5, 1\).*\[8, 8, 1\]"):
        run_artifact(artifacts.onnx, np.zeros((2, 5, 5, 1), np.float32))
    with pytest.raises(ConfigError, match="reference kernels are TFLite's"):
        run_artifact(artifacts.onnx, artifacts.x_eval, reference_kernels=True)
    got = run_artifact(artifacts.onnx, artifacts.x_eval, batch_size=7)
    assert np.allclose(got, artifacts.keras_out, atol=FLOAT_ATOL), \
        describe_mismatch(got, artifacts.keras_out, FLOAT_ATOL)


def test_tflite_micro_runtime_equals_tflite_reference_kernels(artifacts):
    """``--runtime tflite_micro`` (the MCU check's interpreter) runs the int8 file one sample at a
    time; its integer arithmetic is the reference kernels', so the outputs are TFLite's
    BUILTIN_REF outputs exactly."""
    pytest.importorskip("tflite_micro")
    from deploy.runner import TFLiteBackend, infer

    rc, doc, err = run_runner("--artifact", artifacts.tflite_int8, "--inputs",
                              artifacts.inputs_float, "--runs", 3, "--include-outputs",
                              "--runtime", "tflite_micro")
    assert rc == 0, err
    assert doc["runtime"]["name"] == "tflite_micro" and doc["xnnpack"] is None
    assert doc["input"]["dtype"] == "int8" and doc["input"]["quantization"][0] > 0
    micro = np.array(doc["outputs"], np.float32)
    reference = infer(TFLiteBackend(str(artifacts.tflite_int8), 1, reference_kernels=True),
                      artifacts.x_eval)
    assert np.array_equal(micro, reference), describe_mismatch(micro, reference, 0)
    rc, doc, _ = run_runner("--artifact", artifacts.onnx, "--runtime", "tflite_micro")
    assert rc == 2 and doc["error"] == "usage" and "runs .tflite files" in doc["message"]
