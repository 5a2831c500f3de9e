"""Canonicalization is an equivalent rewrite: same outputs (max abs diff <= 1e-4) on real inputs,
BatchNorm folded, Dropout dropped, unsupported layers all named at once."""
import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from toolchain.canonicalize import SUPPORTED_LAYERS, canonicalize, check_supported
from toolchain.errors import UnsupportedLayerError

#: canonical vs original model outputs (softmax probabilities or logits)
EQUIVALENCE_ATOL = 1e-4


def _randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics, so folding is really exercised (fresh models have mean 0, var 1)."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.set_weights([
                rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in v.name or "gamma" in v.name
                else rng.normal(0, 0.3, w.shape).astype("float32")
                for v, w in zip(layer.weights, layer.get_weights())])
    return model


def _assert_equivalent(original, canonical, x):
    a, b = original.predict(x, verbose=0), canonical.predict(x, verbose=0)
    diff = np.abs(a - b)
    off = diff > EQUIVALENCE_ATOL
    assert not off.any(), (f"{off.sum()} of {off.size} outputs differ by more than {EQUIVALENCE_ATOL}; "
                           f"worst {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}")


ZOO = [("digits_cnn", (8, 8, 1), 10), ("lenet5", (28, 28, 1), 10), ("alexnet", (32, 32, 3), 10),
       ("vgg16", (32, 32, 3), 10), ("ds_cnn", (49, 10, 1), 12), ("resnet8", (32, 32, 3), 10)]


@pytest.mark.parametrize("arch,shape,classes", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_fold_equivalently(arch, shape, classes):
    model = _randomize_batchnorm(build_model(arch, shape, classes))
    before = [w.copy() for w in model.get_weights()]
    c = canonicalize(model)
    x = np.random.RandomState(1).rand(8, *shape).astype("float32")
    _assert_equivalent(model, c.model, x)
    bn = [l.name for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert sorted(c.folded_batchnorm) == sorted(bn)
    assert not any(isinstance(l, (tf.keras.layers.BatchNormalization, tf.keras.layers.Dropout))
                   for l in c.model.layers)
    for w0, w1 in zip(before, model.get_weights()):  # the user's model is untouched
        np.testing.assert_array_equal(w0, w1)


def test_real_ds_cnn_on_kws01(kws_model, kws01):
    c = canonicalize(kws_model)
    _assert_equivalent(kws_model, c.model, kws01.x_eval[:200])
    assert len(c.folded_batchnorm) == 9 and set(c.dropped) == {"dropout", "dropout_1"}


def test_real_resnet8_residual_adds(resnet8_model):
    c = canonicalize(resnet8_model)
    x = np.random.RandomState(0).rand(16, 32, 32, 3).astype("float32")
    _assert_equivalent(resnet8_model, c.model, x)
    assert len(c.folded_batchnorm) == 7
    # every layer renamed: no clash with the names iNNvestigate generates ("add", "add_1", ...)
    assert all(l.name.startswith("c_") for l in c.model.layers)
    assert c.layer_map["c_add"] == "add"


def test_strip_softmax_gives_logits():
    model = build_model("digits_cnn", (8, 8, 1), 10)
    c = canonicalize(model, strip_softmax=True)
    x = np.random.RandomState(0).rand(4, 8, 8, 1).astype("float32")
    logits = c.model.predict(x, verbose=0)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model.predict(x, verbose=0), atol=1e-5)
    assert c.softmax_stripped


def test_unsupported_layers_are_all_named_at_once():
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = tf.keras.layers.LayerNormalization(name="ln")(h)
    h = tf.keras.layers.Conv2D(4, 3, activation="tanh", name="tanh_conv")(h)
    h = tf.keras.layers.Flatten()(h)
    out = tf.keras.layers.Dense(3, name="head")(h)
    model = tf.keras.Model(inp, out)
    with pytest.raises(UnsupportedLayerError) as e:
        check_supported(model)
    msg = str(e.value)
    assert "ln (LayerNormalization)" in msg and "tanh_conv (Conv2D with activation 'tanh')" in msg
    assert "supported:" in msg


def test_batchnorm_that_cannot_be_folded_is_refused():
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.BatchNormalization(name="bn_first")(inp)
    h = tf.keras.layers.Flatten()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(2)(h))
    with pytest.raises(UnsupportedLayerError, match="bn_first .*cannot be folded"):
        canonicalize(model)


def test_supported_table_is_explicit():
    assert SUPPORTED_LAYERS["DepthwiseConv2D"] == "kernel" and SUPPORTED_LAYERS["BatchNormalization"] == "fold"
    assert "Lambda" not in SUPPORTED_LAYERS
