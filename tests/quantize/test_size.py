"""Sizes, three ways: packed weight bits (zeros free), artifacts, gzip."""
import gzip

import numpy as np
import pytest
import tensorflow as tf

from toolchain.errors import ConfigError
from toolchain.quantize.bitplan import BitPlan, LayerBits
from toolchain.quantize.kernels import SCALE_BYTES
from toolchain.quantize.size import artifact_sizes, packed_stream, plan_size


@pytest.fixture(scope="module")
def tiny():
    inp = tf.keras.Input((6, 6, 1))
    h = tf.keras.layers.Conv2D(8, 3, name="conv")(inp)
    h = tf.keras.layers.DepthwiseConv2D(3, name="dw")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    out = tf.keras.layers.Dense(4, name="fc")(h)
    model = tf.keras.Model(inp, out)
    rng = np.random.RandomState(0)
    for layer in (model.get_layer("conv"), model.get_layer("dw"), model.get_layer("fc")):
        w, b = layer.get_weights()
        w = rng.randn(*w.shape).astype(np.float32)
        w[rng.rand(*w.shape) < 0.25] = 0.0
        layer.set_weights([w, b])
    return model


def _plan(model, conv_groups=(2, 8)):
    return BitPlan({
        "conv": LayerBits(max(conv_groups), 8, tuple(conv_groups), 4, 8, 72),
        "dw": LayerBits(4, 8, None, None, 8, 72),
        "fc": LayerBits(32, 8, None, None, 4, 32 * 4),
    }, granularity="group")


def test_packed_bits_count_nonzero_weights_only(tiny):
    report = plan_size(tiny, _plan(tiny))
    conv = tiny.get_layer("conv").kernel.numpy().reshape(-1, 8)
    dw = tiny.get_layer("dw").depthwise_kernel.numpy()
    fc = tiny.get_layer("fc").kernel.numpy()
    want = (2 * np.count_nonzero(conv[:, :4]) + 8 * np.count_nonzero(conv[:, 4:]) + 4 * np.count_nonzero(dw)
            + 32 * np.count_nonzero(fc))
    assert report.packed_weight_bits == want
    assert report.packed_weight_bytes == -(-want // 8)
    assert report.nonzero_weights == np.count_nonzero(conv) + np.count_nonzero(dw) + np.count_nonzero(fc)
    assert report.avg_weight_bits == pytest.approx(want / report.nonzero_weights)
    dense_bits = 2 * 9 * 4 + 8 * 9 * 4 + 4 * dw.size + 32 * fc.size
    assert report.dense_packed_weight_bytes == -(-dense_bits // 8)
    # scales: one per quantised channel (conv 8, dw 8), none for the float Dense; biases 4 bytes each
    assert report.scale_overhead_bytes == (8 + 8) * SCALE_BYTES
    assert report.bias_bytes == (8 + 8 + 4) * 4


def test_gzip_is_of_the_real_packed_stream(tiny):
    plan = _plan(tiny)
    report = plan_size(tiny, plan)
    from toolchain.quantize.kernels import kernels_of
    stream = packed_stream(kernels_of(tiny), plan)
    assert len(stream) <= report.dense_packed_weight_bytes + len(plan.layers)  # byte-aligned per layer
    assert report.gzip_packed_weight_bytes == len(gzip.compress(stream, 9, mtime=0))
    # fewer bits, smaller stream
    smaller = plan_size(tiny, _plan(tiny, (2, 2)))
    assert smaller.packed_weight_bits < report.packed_weight_bits
    assert smaller.gzip_packed_weight_bytes < report.gzip_packed_weight_bytes


def test_artifact_sizes(tmp_path, tiny):
    a = tmp_path / "m.tflite"
    a.write_bytes(b"\0" * 1000)
    sizes = artifact_sizes([a])
    assert sizes[str(a)]["bytes"] == 1000 and sizes[str(a)]["gzip_bytes"] < 100
    report = plan_size(tiny, _plan(tiny)).with_artifacts([a])
    assert report.artifacts[str(a)]["bytes"] == 1000
    with pytest.raises(ConfigError, match="missing.onnx"):
        artifact_sizes([a, tmp_path / "missing.onnx"])


def test_plan_that_does_not_fit(tiny):
    bad = BitPlan({"nope": LayerBits(4)})
    with pytest.raises(ConfigError, match="nope"):
        plan_size(tiny, bad)
