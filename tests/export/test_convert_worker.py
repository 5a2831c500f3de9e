"""The TFLite converter runs in a child process: same bytes as in the parent, errors come back as
``ConversionError`` with the converter's message, a crash of the child is one ``ConversionError``
naming the format and the signal, and the child's temp folder goes with it."""
import glob
import os
import sys
import tempfile

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from toolchain.errors import ConversionError  # noqa: E402
from toolchain.export.convert_worker import (  # noqa: E402
    ConvertJob, build_converter, convert_in_child, converter_session)
from toolchain.export.tflite_backend import converter_job  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.RandomState(0)
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = tf.keras.layers.Flatten()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax", name="head")(h), name="tiny")
    return model, rng.rand(16, 8, 8, 1).astype(np.float32)


def _job_folders():
    return glob.glob(os.path.join(tempfile.gettempdir(), f"toolchain-convert-{os.getpid()}-*"))


def test_child_gives_the_bytes_the_parent_would(tiny):
    model, calib = tiny
    with converter_session():
        for variant in ("fp32", "int8"):
            job = converter_job(variant, calib)
            x = calib if job.representative else None
            assert convert_in_child(model, job, x) == bytes(build_converter(model, job, x).convert()), variant
        assert len(_job_folders()) == 1  # one child serves the session
    assert not _job_folders(), "the converter's temp folder outlived its session"


def test_error_in_the_child_is_a_conversion_error_and_the_child_serves_on(tiny):
    model, calib = tiny
    with converter_session():
        # TensorFlow's QuantizationDebugger refuses a converter without optimizations
        with pytest.raises(ConversionError, match=r"TFLite converter failed for tflite-odd: .*Optimize.DEFAULT"):
            convert_in_child(model, ConvertJob("tflite-odd", debugger="calibrated", representative=True), calib)
        assert len(convert_in_child(model, converter_job("fp32"))) > 1000


def test_crash_of_the_child_names_the_format_and_the_signal(tiny, tmp_path, monkeypatch):
    """The child here is a shell that reads its first job and dies of SIGSEGV, as the converter does
    on a graph it cannot handle."""
    crasher = tmp_path / "python"
    crasher.write_text("#!/bin/sh\nread job\nkill -SEGV $$\n")
    crasher.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crasher))
    with pytest.raises(ConversionError, match=r"crashed \(SIGSEGV\) while converting tflite-fp32.*--debug"):
        convert_in_child(tiny[0], converter_job("fp32"))
    assert not _job_folders()
