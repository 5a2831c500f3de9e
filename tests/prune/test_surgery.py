"""Structured pruning surgery: the narrow model equals the zeroed model, and really is smaller.

Property: for random removals of 30-50% of every channel group, ``remove_channels(m, r)(x)`` equals
``zero_channels(m, r)(x)`` within ``SURGERY_ATOL`` (softmax outputs and the final layer's logits),
on the zoo models (random BN statistics and biases, so BN and bias slicing are really exercised),
the MLPerf Tiny DS-CNN on real kws01 inputs and the MLPerf Tiny ResNet-8.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from toolchain.errors import ConfigError, UnsupportedLayerError
from toolchain.model_io import model_hash
from toolchain.prune.surgery import (
    ChannelGroup,
    channel_analysis,
    channel_groups,
    count_params,
    remove_channels,
    zero_channels,
)

#: narrow vs zeroed model, max abs difference of outputs and logits
SURGERY_ATOL = 1e-4
#: the removals must change the model by more than this (else the property is vacuous)
MIN_EFFECT = 1e-3
#: narrow float32 .tflite vs narrow Keras model
TFLITE_ATOL = 1e-4

layers = tf.keras.layers

ZOO = {
    "digits_cnn": ((8, 8, 1), 10, {}),
    "lenet5": ((28, 28, 1), 10, {}),
    "alexnet": ((32, 32, 3), 10, {}),
    "vgg16": ((32, 32, 3), 10, {"width_multiplier": 0.125}),
    "ds_cnn": ((49, 10, 1), 12, {}),
    "resnet8": ((32, 32, 3), 10, {}),
}

# The MLPerf Tiny ResNet-8 (and the zoo copy, which has the same layer names): Add joins the
# stem with the first stack's second conv, and each projection shortcut with its stack's conv.
RESNET8_GROUPS = [
    ChannelGroup("conv2d", ("conv2d", "conv2d_2"), ("batch_normalization", "batch_normalization_2"),
                 ("conv2d_1", "conv2d_3", "conv2d_5"), 16),
    ChannelGroup("conv2d_1", ("conv2d_1",), ("batch_normalization_1",), ("conv2d_2",), 16),
    ChannelGroup("conv2d_3", ("conv2d_3",), ("batch_normalization_3",), ("conv2d_4",), 32),
    ChannelGroup("conv2d_4", ("conv2d_4", "conv2d_5"), ("batch_normalization_4",),
                 ("conv2d_6", "conv2d_8"), 32),
    ChannelGroup("conv2d_6", ("conv2d_6",), ("batch_normalization_5",), ("conv2d_7",), 64),
    ChannelGroup("conv2d_7", ("conv2d_7", "conv2d_8"), ("batch_normalization_6",), ("dense",), 64),
]


def _assert_close(a, b, atol, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes differ {a.shape} vs {b.shape}"
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    off = diff > atol
    assert not off.any(), (
        f"{what}: {off.sum()} of {off.size} elements differ by more than {atol}; worst "
        f"{diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}, first offenders at "
        f"{[tuple(int(i) for i in ix) for ix in np.argwhere(off)[:5]]}")


def _logits(model, x):
    """The final Dense layer's pre-activation (softmax squashes differences)."""
    final = model.layers[-1]
    assert isinstance(final, layers.Dense), f"final layer {final.name} is {type(final).__name__}"
    features = tf.keras.Model(model.inputs, final.input)(x, training=False).numpy()
    kernel, bias = final.get_weights()
    return features.astype(np.float64) @ kernel + bias


def _randomize(model, seed=0):
    """Random biases and BN statistics (fresh layers have zero bias, mean 0, var 1, gamma 1)."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        values = []
        for var, w in zip(layer.weights, layer.get_weights()):
            short = var.name.split("/")[-1].split(":")[0]
            if short in ("gamma", "moving_variance"):
                w = rng.uniform(0.5, 1.5, w.shape)
            elif short in ("beta", "moving_mean", "bias"):
                w = rng.normal(0, 0.2, w.shape)
            values.append(np.asarray(w, dtype=np.float32))
        if values:
            layer.set_weights(values)
    return model


def _random_removals(groups, seed=0, low=0.3, high=0.5):
    rng = np.random.RandomState(seed)
    removals = {}
    for g in groups:
        k = int(round(rng.uniform(low, high) * g.num_channels))
        k = min(max(k, 1), g.num_channels - 1)
        removals[g.name] = sorted(rng.choice(g.num_channels, k, replace=False).tolist())
    return removals


@dataclass(frozen=True)
class Case:
    model: tf.keras.Model
    groups: list
    removals: dict
    narrow: tf.keras.Model
    zeroed: tf.keras.Model
    x: np.ndarray
    hash_before: str


def _case(model, x, seed=0) -> Case:
    before = model_hash(model)
    groups = channel_groups(model)
    removals = _random_removals(groups, seed)
    return Case(model, groups, removals, remove_channels(model, removals),
                zero_channels(model, removals), x, before)


@lru_cache(maxsize=None)
def zoo_case(arch) -> Case:
    shape, classes, options = ZOO[arch]
    model = _randomize(build_model(arch, shape, classes, seed=0, **options))
    x = np.random.RandomState(1).normal(0, 1, (8,) + shape).astype("float32")
    return _case(model, x)


def _check_case(case: Case):
    m, n, z, x = case.model, case.narrow, case.zeroed, case.x
    _assert_close(n(x, training=False), z(x, training=False), SURGERY_ATOL, "narrow vs zeroed outputs")
    narrow_logits, zeroed_logits = _logits(n, x), _logits(z, x)
    _assert_close(narrow_logits, zeroed_logits, SURGERY_ATOL, "narrow vs zeroed logits")
    effect = np.abs(_logits(m, x) - zeroed_logits).max()
    assert effect > MIN_EFFECT, f"removing channels changed the logits by only {effect:.3g}"
    assert model_hash(m) == case.hash_before, "the user's model was modified"
    # same names, inputs and outputs; every producer really narrower, every consumer too
    assert [l.name for l in n.layers] == [l.name for l in m.layers]
    assert n.input_shape == m.input_shape and n.output_shape == m.output_shape
    for g in case.groups:
        keep = g.num_channels - len(case.removals[g.name])
        for p in g.producers:
            assert n.get_layer(p).get_weights()[0].shape[-1] == keep, p
        for c in g.consumers:
            before = m.get_layer(c).get_weights()[0].shape
            after = n.get_layer(c).get_weights()[0].shape
            axis = 0 if isinstance(m.get_layer(c), layers.Dense) else 2
            assert after[axis] < before[axis], f"{c}: input channels {before[axis]} -> {after[axis]}"
    assert count_params(n) < count_params(m)
    assert count_params(z) == count_params(m)


@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_narrow_equals_zeroed(arch):
    case = zoo_case(arch)
    assert case.groups, f"{arch}: no prunable channel groups"
    _check_case(case)


def _tflite(model) -> bytes:
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _run_tflite(flatbuffer, x):
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


@pytest.mark.parametrize("arch", ["ds_cnn", "resnet8"])
def test_tflite_size_drops(arch):
    case = zoo_case(arch)
    original, narrow = _tflite(case.model), _tflite(case.narrow)
    assert len(narrow) < 0.8 * len(original), (
        f"{arch}: float32 .tflite {len(original)} -> {len(narrow)} bytes")
    _assert_close(_run_tflite(narrow, case.x), case.narrow(case.x, training=False),
                  TFLITE_ATOL, f"{arch}: narrow .tflite vs narrow Keras")


def test_flatten_index_mapping():
    """A Dense after Flatten of an HxWxC map loses every row i with i % C in the removed set."""
    case = zoo_case("digits_cnn")
    conv3 = next(g for g in case.groups if g.producers == ("conv3",))
    height, width, channels = case.model.get_layer("conv3").output_shape[1:]
    assert conv3.consumers == ("fc1",) and conv3.num_channels == channels
    assert height * width > 1, "the Flatten mapping is only exercised on a map larger than 1x1"
    removed = set(case.removals["conv3"])
    original = case.model.get_layer("fc1").get_weights()[0]
    assert original.shape[0] == height * width * channels
    rows = [i for i in range(original.shape[0]) if i % channels not in removed]
    cols = np.setdiff1d(np.arange(original.shape[1]), case.removals.get("fc1", []))  # fc1's own
    np.testing.assert_array_equal(case.narrow.get_layer("fc1").get_weights()[0],
                                  original[rows][:, cols])


def test_mismatched_removals_are_detected():
    """The property can fail: a narrow model from other channels differs from the zeroed one."""
    case = zoo_case("digits_cnn")
    shifted = {k: sorted((i + 1) % g.num_channels for i in case.removals[k])
               for k, g in ((g.name, g) for g in case.groups)}
    wrong = remove_channels(case.model, shifted)
    diff = np.abs(_logits(wrong, case.x) - _logits(case.zeroed, case.x)).max()
    assert diff > SURGERY_ATOL


def test_zoo_resnet8_add_groups_and_output_layer():
    case = zoo_case("resnet8")
    assert case.groups == RESNET8_GROUPS
    analysis = channel_analysis(case.model)
    assert [e.name for e in analysis.excluded] == ["dense"]
    assert any("model output" in r for r in analysis.excluded[0].reasons)
    for arch in ZOO:
        final = zoo_case(arch).model.layers[-1].name
        assert all(final not in g.producers for g in zoo_case(arch).groups), arch


# ---------------------------------------------------------------------------------------------
# The real MLPerf Tiny models


def test_real_ds_cnn_on_kws01(kws_model, kws01):
    groups = channel_groups(kws_model)
    assert [g.name for g in groups] == ["conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4"]
    assert groups[0].tied == ("batch_normalization", "depthwise_conv2d", "batch_normalization_1")
    assert groups[0].consumers == ("conv2d_1",) and groups[-1].consumers == ("dense",)
    assert all(g.num_channels == 64 and "dense" not in g.producers for g in groups)
    x = np.asarray(kws01.x_eval[:100], dtype=np.float32)
    case = _case(kws_model, x, seed=3)
    _check_case(case)


def test_real_resnet8(resnet8_model):
    x = np.random.RandomState(2).rand(16, 32, 32, 3).astype("float32")
    case = _case(resnet8_model, x, seed=4)
    assert case.groups == RESNET8_GROUPS
    _check_case(case)


# ---------------------------------------------------------------------------------------------
# Structures beyond the zoo


def _small(build, shape, seed=0):
    tf.keras.utils.set_random_seed(seed)
    inputs = layers.Input(shape, name="input")
    return _randomize(tf.keras.Model(inputs, build(inputs)), seed)


def test_depthwise_multiplier_and_plain_dense():
    def build(x):
        x = layers.Conv2D(6, 3, name="conv1")(x)
        x = layers.ReLU(name="relu1")(x)
        x = layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)   # 12 = 6 x 2 channels
        x = layers.BatchNormalization(name="dw_bn")(x)
        x = layers.Conv2D(5, 1, name="conv2")(x)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        x = layers.Dense(7, activation="relu", name="fc")(x)
        return layers.Dense(3, name="out")(x)

    model = _small(build, (9, 9, 2))
    groups = {g.name: g for g in channel_groups(model)}
    assert groups["conv1"] == ChannelGroup("conv1", ("conv1",), ("dw", "dw_bn"), ("conv2",), 6)
    assert set(groups) == {"conv1", "conv2", "fc"}
    removals = {"conv1": [1, 4], "conv2": [0, 2, 3], "fc": [6]}
    narrow = remove_channels(model, removals)
    assert narrow.get_layer("dw").get_weights()[0].shape == (3, 3, 4, 2)
    assert narrow.get_layer("dw_bn").get_weights()[0].shape == (8,)
    x = np.random.RandomState(0).normal(size=(4, 9, 9, 2)).astype("float32")
    _assert_close(narrow(x), zero_channels(model, removals)(x), SURGERY_ATOL, "narrow vs zeroed")


def test_concatenate_and_sigmoid_groups_are_excluded_with_reasons():
    def build(x):
        a = layers.Conv2D(4, 3, padding="same", name="a")(x)
        b = layers.Conv2D(4, 3, padding="same", name="b")(x)
        x = layers.Concatenate(name="cat")([a, b])
        x = layers.Conv2D(6, 3, name="c")(x)
        x = layers.Activation("sigmoid", name="sig")(x)
        x = layers.Conv2D(5, 3, name="d")(x)
        x = layers.Flatten(name="flat")(x)
        return layers.Dense(2, name="out")(x)

    model = _small(build, (8, 8, 1))
    analysis = channel_analysis(model)
    assert [g.name for g in analysis.groups] == ["d"]
    reasons = {e.name: " ".join(e.reasons) for e in analysis.excluded}
    assert set(reasons) == {"a", "b", "c", "out"}
    assert "Concatenate" in reasons["a"] and "Concatenate" in reasons["b"]
    assert "sig" in reasons["c"] and "nonzero" in reasons["c"]
    with pytest.raises(ConfigError, match=r"'a' is not prunable.*Concatenate"):
        remove_channels(model, {"a": [0]})
    x = np.random.RandomState(0).normal(size=(3, 8, 8, 1)).astype("float32")
    _assert_close(remove_channels(model, {"d": [1, 3]})(x), zero_channels(model, {"d": [1, 3]})(x),
                  SURGERY_ATOL, "narrow vs zeroed")


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_and_invalid_removals_are_all_reported():
    model = zoo_case("digits_cnn").model
    width = model.get_layer("conv1").filters
    with pytest.raises(ConfigError) as err:
        remove_channels(model, {"nope": [0], "conv1": [0, width], "conv2": [-1], "conv3": [2, 2],
                                "fc1": [1.5], "predictions": [0]})
    msg = str(err.value)
    for piece in ("'nope' is not a channel group", f"'conv1': indices [{width}] outside [0, {width})",
                  "'conv2': indices [-1]", "'conv3': duplicate indices [2]",
                  "'fc1': non-integer indices", "'predictions' is not prunable", f"conv1 ({width})"):
        assert piece in msg, f"{piece!r} missing from: {msg}"
    with pytest.raises(ConfigError, match=f"removing all {width} channels"):
        zero_channels(model, {"conv1": list(range(width))})
    with pytest.raises(ConfigError, match="non-integer"):
        remove_channels(model, {"conv1": [True]})
    with pytest.raises(ConfigError, match="mapping"):
        remove_channels(model, [("conv1", [0])])


def test_producer_name_points_to_group():
    with pytest.raises(ConfigError, match="'conv2d_2' is a producer of group 'conv2d'"):
        remove_channels(zoo_case("resnet8").model, {"conv2d_2": [0]})


def test_unsupported_structures_name_every_offender():
    inputs = layers.Input((8, 8, 4), name="input")
    x = layers.SeparableConv2D(4, 3, padding="same", name="sep")(inputs)
    x = layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)
    shared = layers.Conv2D(4, 1, name="shared")
    x = shared(shared(x))
    x = layers.Flatten(name="flat")(x)
    model = tf.keras.Model(inputs, layers.Dense(2, name="out")(x))
    with pytest.raises(UnsupportedLayerError) as err:
        channel_groups(model)
    msg = str(err.value)
    for piece in ("sep (SeparableConv2D)", "grouped (Conv2D with groups=2)",
                  "shared (Conv2D applied 2 times"):
        assert piece in msg, f"{piece!r} missing from: {msg}"

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.zeros((1, 3), np.float32))
    with pytest.raises(UnsupportedLayerError, match="not a Functional"):
        remove_channels(sub, {})
