"""Every TFLite format of a tiny model, run in the interpreter against Keras; I/O, storage types and
determinism read back from the written flatbuffers."""
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tests.export.helpers import calib, digits, pruned_copy, small_cnn  # noqa: E402
from toolchain.errors import ConfigError, ConversionError  # noqa: E402
from toolchain.export import export  # noqa: E402
from toolchain.export.artifact import write_bytes_atomic  # noqa: E402
from toolchain.export.flatbuffer import read_flatbuffer  # noqa: E402
from toolchain.export.tflite_backend import convert, export_tflite, run_tflite  # noqa: E402

TFLITE_FORMATS = ["tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "tflite-int16x8",
                  "tflite-sparse"]
#: float32 conversion must equal Keras to float rounding
FP32_ATOL = 1e-4
#: int8 must keep the decisions
INT8_MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "out"
    return export(small_cnn(), digits(), TFLITE_FORMATS, out, calibration_samples=200, quiet=True)


def _diff_report(a, b, atol):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    off = np.argwhere(d > atol)
    return f"{len(off)} of {d.size} outputs off by > {atol} (worst {d.max():.3g} at {np.unravel_index(d.argmax(), d.shape)})"


def test_every_format_verified_in_the_interpreter(bundle):
    assert list(bundle.artifacts) == TFLITE_FORMATS
    for fmt in TFLITE_FORMATS:
        check = bundle.verify[fmt]
        assert check.passed, check.summary()
        assert check.samples == len(digits().y_eval)
        assert os.path.isfile(bundle.artifacts[fmt].path)
    assert bundle.verify["tflite-fp32"].max_abs_diff <= FP32_ATOL
    assert bundle.verify["tflite-int8"].agreement >= INT8_MIN_AGREEMENT


def test_fp32_outputs_equal_keras(bundle):
    x = digits().x_eval[:64]
    got = run_tflite(bundle.artifacts["tflite-fp32"].path, x)
    want = small_cnn().predict(x, verbose=0)
    assert np.allclose(got, want, atol=FP32_ATOL), _diff_report(got, want, FP32_ATOL)


def test_storage_and_io_read_back_from_the_file(bundle):
    meta = {fmt: bundle.artifacts[fmt].metadata for fmt in TFLITE_FORMATS}
    io = {fmt: (m["inputs"][0]["dtype"], m["outputs"][0]["dtype"]) for fmt, m in meta.items()}
    assert io["tflite-fp32"] == ("float32", "float32")
    assert io["tflite-int8"] == ("int8", "int8")
    assert io["tflite-int16x8"] == ("int16", "int16")
    assert "FLOAT16" in meta["tflite-fp16"]["weight_bytes_by_type"]
    for fmt in TFLITE_FORMATS:
        assert sorted(meta[fmt]["layers"]) == ["conv", "dw", "fc1", "fc2", "pw"], fmt
        assert not meta[fmt]["unmatched_kernel_ops"], fmt
    for layer in ("conv", "dw", "pw", "fc1", "fc2"):
        assert meta["tflite-int8"]["layers"][layer]["weight_type"] == "INT8", layer
        assert meta["tflite-int8"]["layers"][layer]["input_type"] == "INT8", layer
        assert meta["tflite-int16x8"]["layers"][layer]["input_type"] == "INT16", layer
        assert meta["tflite-dynamic"]["layers"][layer]["input_type"] == "FLOAT32", layer
    # per-channel conv kernels, per-tensor Dense (TFLite 2.14's own int8 scheme)
    assert meta["tflite-int8"]["layers"]["conv"]["per_channel"]
    assert meta["tflite-int8"]["layers"]["dw"]["weight_scales"] == 16
    assert not meta["tflite-int8"]["layers"]["fc1"]["per_channel"]
    q = meta["tflite-int8"]["inputs"][0]
    assert q["scale"] > 0 and isinstance(q["zero_point"], int)


def test_int8_float_io_option(tmp_path):
    art = export_tflite(small_cnn(), "int8", tmp_path / "f.tflite", calib(100), io="float")
    assert art.metadata["inputs"][0]["dtype"] == "float32"
    assert art.metadata["layers"]["conv"]["input_type"] == "INT8"


def test_bad_io_and_missing_calibration_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="io 'uint8'"):
        export_tflite(small_cnn(), "int8", tmp_path / "x.tflite", calib(10), io="uint8")
    with pytest.raises(ConfigError, match="calibration samples"):
        export_tflite(small_cnn(), "int8", tmp_path / "x.tflite", None)
    assert not (tmp_path / "x.tflite").exists()


def test_sparse_format_stores_pruned_kernels_sparse(tmp_path):
    pruned = pruned_copy(small_cnn(), 0.8)
    sparse = export_tflite(pruned, "sparse", tmp_path / "s.tflite", calib(100))
    dense = export_tflite(pruned, "int8", tmp_path / "d.tflite", calib(100))
    assert sparse.metadata["sparse_tensors"], "no kernel was stored sparse"
    assert "DENSIFY" in sparse.metadata["op_types"]
    assert sparse.metadata["layers"]["fc1"]["sparse"]
    assert sparse.size_bytes < dense.size_bytes
    x = digits().x_eval[:200]
    a = run_tflite(sparse.path, x).argmax(1)
    b = pruned.predict(x, verbose=0).argmax(1)
    assert np.mean(a == b) >= INT8_MIN_AGREEMENT


def test_conversion_is_deterministic(bundle):
    """Same model and calibration samples => byte-identical .tflite (a fresh conversion against
    the one export() wrote)."""
    again = convert(small_cnn(), "int8", calib(200))
    with open(bundle.artifacts["tflite-int8"].path, "rb") as f:
        assert f.read() == again


def test_flatbuffer_reader_rejects_other_bytes():
    with pytest.raises(ConversionError, match="not a TFLite flatbuffer"):
        read_flatbuffer(b"\x00" * 64)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.tflite"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"x" * 100)
    assert list(tmp_path.iterdir()) == []
