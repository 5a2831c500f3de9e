"""The one layer table (toolchain.layers) is what every stage reads: the old public names are views
of it, and each kernel layer's channel facts agree with the kernel Keras actually builds."""
import numpy as np
import pytest
import tensorflow as tf

from toolchain import layers as T


def test_stage_names_are_views_of_the_table():
    from toolchain.canonicalize import SUPPORTED_LAYERS
    from toolchain.export.flatbuffer import LAYER_OPS
    from toolchain.export.onnx_backend import KERNEL_LAYERS as ONNX_OPS
    from toolchain.export.tflite_mixed import KERNEL_ATTRS as MIXED_ATTRS
    from toolchain.prune.criteria import PRUNABLE_LAYERS
    from toolchain.prune.surgery import CHANNEL_ROLES
    from toolchain.quantize.kernels import KERNEL_ATTRS, PER_TENSOR_LAYERS
    from toolchain.relevance.rules import LAYER_FAMILIES

    kernel_classes = set(T.KERNEL_LAYERS)
    assert {"Conv1D", "Conv2D", "DepthwiseConv2D", "Dense"} == kernel_classes
    assert set(KERNEL_ATTRS) == set(MIXED_ATTRS) == set(PRUNABLE_LAYERS) == set(ONNX_OPS) == kernel_classes
    assert {c for c, r in SUPPORTED_LAYERS.items() if r == T.KERNEL} == kernel_classes
    assert all(CHANNEL_ROLES[c] == T.KERNEL_LAYERS[c].prune_role for c in kernel_classes)
    assert all(LAYER_OPS[c] == T.KERNEL_LAYERS[c].tflite_op for c in kernel_classes)
    assert set(LAYER_FAMILIES["Any"]) == kernel_classes
    assert set(PER_TENSOR_LAYERS) == {"Dense", "Conv1D"}
    for cls in ("MaxPooling1D", "AveragePooling1D", "GlobalAveragePooling1D", "GlobalMaxPooling1D",
                "ZeroPadding1D", "SpatialDropout1D"):
        assert cls in SUPPORTED_LAYERS and cls in CHANNEL_ROLES


@pytest.mark.parametrize("cls,shape,args", [
    ("Conv1D", (9, 3), dict(filters=5, kernel_size=2)),
    ("Conv2D", (6, 6, 3), dict(filters=5, kernel_size=2)),
    ("DepthwiseConv2D", (6, 6, 3), dict(kernel_size=2, depth_multiplier=2)),
    ("Dense", (3,), dict(units=5)),
])
def test_channel_axes_match_the_built_kernel(cls, shape, args):
    facts = T.KERNEL_LAYERS[cls]
    layer = getattr(tf.keras.layers, cls)(**args)
    y = layer(tf.zeros((1, *shape)))
    kernel = facts.kernel(layer)
    assert kernel.shape[facts.in_axis] == shape[-1]
    assert facts.num_channels(kernel.shape) == y.shape[-1]
    if facts.out_axis is not None:
        assert kernel.shape[facts.out_axis] == y.shape[-1]
    m = facts.channel_matrix(kernel)
    assert m.shape == (kernel.size // y.shape[-1], y.shape[-1])
    # output channel c of the matrix is what Keras computes for channel c: zero it and see
    c = 1
    zeroed = m.copy()
    zeroed[:, c] = 0
    getattr(layer, facts.kernel_attr).assign(zeroed.reshape(kernel.shape))
    layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    out = layer(tf.ones((1, *shape))).numpy()
    assert np.all(out[..., c] == 0) and np.any(out[..., (c + 1) % out.shape[-1]] != 0)
