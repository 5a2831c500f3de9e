"""Shared by the firmware tests: skip without the Arm toolchain / QEMU / kit, build the TFLM
library once per test session (M4, CMSIS-NN; cached under $TOOLCHAIN_CACHE_DIR/tflm)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from toolchain.errors import TargetUnavailableError


def missing_tools() -> str:
    from toolchain.firmware.build import kit_dir, require_newlib

    for program, package in (("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"),
                             ("make", "make")):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install {package})"
    try:
        kit_dir()
        require_newlib()
    except TargetUnavailableError as e:
        return str(e)
    return ""


MISSING = missing_tools()
needs_firmware_tools = pytest.mark.skipif(bool(MISSING), reason=MISSING or "tools present")


@pytest.fixture(scope="session")
def tflm_m4_cmsis():
    """libtflm.a for M4 + CMSIS-NN: built once (minutes), then taken from the cache."""
    from toolchain.firmware import library

    return library("m4", "cmsis-nn")


@pytest.fixture(scope="session")
def tiny_int8_cnn(tmp_path_factory):
    """A tiny int8 CNN (conv, depthwise, pool, dense, softmax) converted with full-integer
    quantization (the toolchain's tflite-int8, int8 I/O), and float inputs for it."""
    import tensorflow as tf

    from toolchain.export.tflite_backend import convert

    rng = np.random.default_rng(0)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.layers.Input((12, 12, 1)),
        tf.keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
        tf.keras.layers.DepthwiseConv2D(3, activation="relu"),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(5, activation="softmax"),
    ])
    x = rng.standard_normal((40, 12, 12, 1)).astype(np.float32)
    path = tmp_path_factory.mktemp("tiny") / "tiny_int8.tflite"
    path.write_bytes(convert(model, "int8", x, io="int8"))
    return path, x[:8]


#: a mixed 4/8-bit plan for tests.export.helpers.small_cnn: conv, dw and fc1 packed INT4, pw 8 bit,
#: fc2 (unplanned) int8, so CONV_2D and FULLY_CONNECTED each mix INT4 and INT8 kernels
MIXED_4_8 = {"conv": 4, "dw": 4, "pw": 8, "fc1": 4}


def export_int4_cnn(out_dir):
    """The digits CNN of tests.export.helpers (trained, a few seconds) as tflite-mixed under
    :data:`MIXED_4_8` (the QAT route, packed INT4 kernels): its Artifact."""
    from tests.export.helpers import calib, small_cnn
    from toolchain.export.tflite_backend import export_tflite
    from toolchain.quantize.bitplan import BitPlan, LayerBits

    plan = BitPlan({name: LayerBits(bits) for name, bits in MIXED_4_8.items()})
    return export_tflite(small_cnn(), "mixed", out_dir / "small_cnn_mixed.tflite", calib(200), plan=plan)


@pytest.fixture(scope="session")
def tiny_int4_cnn(tmp_path_factory):
    """(tflite-mixed Artifact with packed INT4 kernels, float digits evaluation inputs)."""
    from tests.export.helpers import digits

    return export_int4_cnn(tmp_path_factory.mktemp("int4")), digits().x_eval[:16]
