"""Model zoo: every builder builds its documented shapes deterministically; ds_cnn and resnet8
match the MLPerf Tiny reference files layer for layer; digits_cnn trains quickly."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from models import (ARCHITECTURES, Architecture, TrainResult, build_model, compile_classifier,
                    recalibrate_batchnorm, train_model)
from toolchain.errors import ConfigError, DataError
from toolchain.model_io import load_model, model_hash

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", ROOT.parent / "shared"))
MLPERF = SHARED / "models" / "mlperf-tiny"
KWS_SAVEDMODEL = MLPERF / "kws_ref_model"
RESNET8_H5 = MLPERF / "resnet8_cifar10.h5"

EXPECTED_KEYS = {"lenet5", "alexnet", "vgg16", "ds_cnn", "resnet8", "digits_cnn", "mlp", "conv1d_classifier"}
# Same weights through the same graph: float32 differences come only from op ordering.
REFERENCE_ATOL = 1e-5
DIGITS_MIN_ACCURACY = 0.95
DIGITS_EPOCHS = 10


def _cases():
    return [(key, shape) for key in ARCHITECTURES for shape in ARCHITECTURES.get(key).input_shapes]


def _num_classes(key: str) -> int:
    return 12 if key == "ds_cnn" else 10


def _structure(model: tf.keras.Model):
    """(name, class, output shape, inbound layer names, key config) per layer."""
    keys = ("filters", "kernel_size", "strides", "padding", "activation", "units", "rate",
            "pool_size", "depth_multiplier", "use_bias", "epsilon", "momentum")
    rows = []
    for layer in model.layers:
        cfg = layer.get_config()
        inbound = []
        for node in layer.inbound_nodes:
            for t in tf.nest.flatten(node.input_tensors):
                inbound.append(t._keras_history.layer.name)
        rows.append((layer.name, type(layer).__name__, tuple(tf.nest.flatten(layer.output_shape)),
                     tuple(inbound), tuple((k, str(cfg[k])) for k in keys if k in cfg)))
    return rows


def _assert_same_structure(built, ref):
    got, want = _structure(built), _structure(ref)
    diff = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert len(got) == len(want), f"{len(got)} layers built, reference has {len(want)}"
    assert not diff, f"{len(diff)} layers differ; first: {diff[0]}"
    assert built.count_params() == ref.count_params()
    assert [w.shape for w in built.weights] == [w.shape for w in ref.weights]


def _assert_close(a, b, atol, what):
    off = np.abs(a - b) > atol
    assert not off.any(), (
        f"{what}: {int(off.sum())} of {off.size} elements differ by more than {atol}; "
        f"max {np.abs(a - b).max():.3g} at {np.unravel_index(np.abs(a - b).argmax(), a.shape)}"
    )


@pytest.fixture(scope="module")
def kws_reference():
    if not KWS_SAVEDMODEL.exists():
        pytest.skip(f"MLPerf Tiny KWS SavedModel not found at {KWS_SAVEDMODEL}; set "
                    f"TOOLCHAIN_SHARED_DIR to the shared/ folder")
    return load_model(KWS_SAVEDMODEL)


@pytest.fixture(scope="module")
def resnet8_reference():
    if not RESNET8_H5.exists():
        pytest.skip(f"MLPerf Tiny ResNet-8 not found at {RESNET8_H5}; set TOOLCHAIN_SHARED_DIR to "
                    f"the shared/ folder")
    return load_model(RESNET8_H5)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="scikit-learn is needed for load_digits")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target)

    class Digits:  # the attributes train_model reads from a toolchain.data Dataset
        input_shape = (8, 8, 1)
        num_classes = 10

    ds = Digits()
    ds.x_train, ds.y_train, ds.x_eval, ds.y_eval = x_train, y_train, x_eval, y_eval
    return ds


def test_registry_has_the_documented_architectures():
    assert set(ARCHITECTURES) == EXPECTED_KEYS
    for key in ARCHITECTURES:
        arch = ARCHITECTURES.get(key)
        assert isinstance(arch, Architecture) and arch.key == key and arch.input_shapes


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ConfigError, match="resnet8"):
        build_model("resnet50", (32, 32, 3), 10)


@pytest.mark.parametrize("key,shape", _cases())
def test_builds_documented_input_shapes(key, shape):
    n = _num_classes(key)
    model = build_model(key, shape, n)
    assert type(model).__name__ == "Functional"
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, n)
    last = model.layers[-1]
    assert isinstance(last, tf.keras.layers.Dense)
    assert last.get_config()["activation"] == "softmax"
    assert len({layer.name for layer in model.layers}) == len(model.layers)
    probs = model(np.zeros((2, *shape), np.float32), training=False).numpy()
    _assert_close(probs.sum(axis=1), np.ones(2), 1e-5, f"{key} softmax row sums")


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_deterministic_given_seed(key):
    shape = ARCHITECTURES.get(key).input_shapes[0]
    n = _num_classes(key)
    first = model_hash(build_model(key, shape, n, seed=3))
    assert model_hash(build_model(key, shape, n, seed=3)) == first
    assert model_hash(build_model(key, shape, n, seed=4)) != first


@pytest.mark.parametrize("key", ["alexnet", "vgg16"])
def test_width_multiplier_shrinks(key):
    small = build_model(key, (32, 32, 3), 10, width_multiplier=0.125)
    default = build_model(key, (32, 32, 3), 10)
    assert small.count_params() < default.count_params()


def test_vgg16_has_13_convs_and_5_pools():
    model = build_model("vgg16", (28, 28, 1), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 13
    assert kinds.count("BatchNormalization") == 13
    assert kinds.count("MaxPooling2D") == 5


@pytest.mark.parametrize("shape,n_classes,options,match", [
    ((28, 28), 10, {}, "input_shape"),
    ((28, 28, 0), 10, {}, "input_shape"),
    ((28, 28, 1), 1, {}, "num_classes"),
    ((28, 28, 1), 10, {"width": 2}, "width_multiplier"),
])
def test_bad_arguments_are_config_errors(shape, n_classes, options, match):
    with pytest.raises(ConfigError, match=match):
        build_model("alexnet", shape, n_classes, **options)


@pytest.mark.parametrize("key,shape", [("mlp", (8, 8, 1)), ("mlp", (64, 1)), ("conv1d_classifier", (64,)),
                                       ("conv1d_classifier", (32, 3, 1)), ("digits_cnn", (64,))])
def test_input_rank_must_match_the_architecture(key, shape):
    with pytest.raises(ConfigError, match="input_shape .* positive integer"):
        build_model(key, shape, 10)


def test_flat_and_1d_builders_use_the_1d_and_dense_layers():
    kinds = [type(layer).__name__ for layer in build_model("conv1d_classifier", (32, 3), 3).layers]
    assert kinds.count("Conv1D") == 2 and "MaxPooling1D" in kinds and "GlobalAveragePooling1D" in kinds
    kinds = {type(layer).__name__ for layer in build_model("mlp", (64,), 10).layers}
    assert kinds == {"InputLayer", "Dense", "Activation"}
    from toolchain.canonicalize import canonicalize
    from toolchain.prune.surgery import channel_groups

    for key, shape, producers in (("mlp", (64,), {"fc1", "fc2"}), ("conv1d_classifier", (32, 3), {"conv1", "conv2"})):
        model = build_model(key, shape, 3)
        assert len(canonicalize(model).kernel_layers()) == len(producers) + 1
        assert {g.name for g in channel_groups(model)} == producers


def test_ds_cnn_matches_mlperf_reference(kws_reference):
    built = build_model("ds_cnn", (49, 10, 1), 12)
    _assert_same_structure(built, kws_reference)
    assert built.count_params() == 24908
    # Reference weights in the built graph give the reference outputs.
    built.set_weights(kws_reference.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 49, 10, 1)).astype(np.float32)
    _assert_close(built(x, training=False).numpy(), kws_reference(x, training=False).numpy(),
                  REFERENCE_ATOL, "ds_cnn vs kws_ref_model")


def test_resnet8_matches_mlperf_reference(resnet8_reference):
    built = build_model("resnet8", (32, 32, 3), 10)
    kinds = [type(layer).__name__ for layer in built.layers]
    assert kinds.count("Add") == 3
    _assert_same_structure(built, resnet8_reference)
    assert built.count_params() == 78666
    built.set_weights(resnet8_reference.get_weights())
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    _assert_close(built(x, training=False).numpy(),
                  resnet8_reference(x, training=False).numpy(),
                  REFERENCE_ATOL, "resnet8 vs resnet8_cifar10.h5")


@pytest.fixture(scope="module")
def trained_digits(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "digits_cnn.h5"
    return train_model("digits_cnn", digits, DIGITS_EPOCHS, out, verbose=0)


def test_digits_cnn_trains_quickly(trained_digits):
    result = trained_digits
    assert isinstance(result, TrainResult)
    assert result.accuracy >= DIGITS_MIN_ACCURACY, f"accuracy {result.accuracy:.3f}"
    assert result.epochs == DIGITS_EPOCHS
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(result.history[key]) == DIGITS_EPOCHS
    assert Path(result.path).is_file()
    assert not [p for p in Path(result.path).parent.iterdir() if ".tmp" in p.name]


def test_saved_h5_reports_the_same_accuracy_after_reload(trained_digits, digits):
    # Guards the Keras 2.14 pitfall where a string "accuracy" metric evaluates to ~10% after
    # an .h5 round trip.
    model = load_model(trained_digits.path)
    probs = model.predict(digits.x_eval, verbose=0)
    assert float(np.mean(probs.argmax(1) == digits.y_eval)) == pytest.approx(
        trained_digits.accuracy)
    compile_classifier(model)
    _, accuracy = model.evaluate(digits.x_eval, digits.y_eval, verbose=0)
    assert accuracy == pytest.approx(trained_digits.accuracy, abs=1e-6)


def test_train_model_leaves_the_callers_model_untouched(digits, tmp_path):
    model = build_model("digits_cnn", (8, 8, 1), 10)
    before = model_hash(model)
    result = train_model(model, digits, 1, tmp_path / "m.keras", verbose=0)
    assert model_hash(model) == before
    assert model_hash(load_model(result.path)) != before


def test_train_model_rejects_bad_output_suffix(digits, tmp_path):
    with pytest.raises(ConfigError, match=".tflite"):
        train_model("digits_cnn", digits, 1, tmp_path / "m.tflite", verbose=0)


def test_train_model_rejects_labels_outside_the_classes(digits, tmp_path):
    class Bad:
        input_shape, num_classes = (8, 8, 1), 10
        x_train, x_eval = digits.x_train[:10], digits.x_eval[:10]
        y_train, y_eval = np.full(10, 12), digits.y_eval[:10]

    with pytest.raises(DataError, match="labels span"):
        train_model("digits_cnn", Bad(), 1, tmp_path / "m.keras", verbose=0)


def _bn_net(seed=0):
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    inp = tf.keras.Input((8, 8, 1))
    x = L.ReLU()(L.BatchNormalization(name="bn1")(L.Conv2D(16, 3, padding="same", name="conv1")(inp)))
    x = L.ReLU()(L.BatchNormalization(name="bn2")(L.Conv2D(32, 3, padding="same")(x)))
    x = L.Dropout(0.5, name="drop")(L.Flatten()(x))
    return tf.keras.Model(inp, L.Dense(10, activation="softmax")(x))


def test_recalibrated_batchnorm_holds_the_training_set_statistics(digits):
    model = _bn_net()
    x = digits.x_train
    assert recalibrate_batchnorm(model, x, batch_size=100) == 2
    conv1 = model.get_layer("conv1")(x).numpy()  # bn1's input does not depend on any BatchNorm
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), conv1.mean(axis=(0, 1, 2)), rtol=0.02, atol=1e-4)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), conv1.var(axis=(0, 1, 2)), rtol=0.05, atol=1e-4)
    assert bn1.momentum == 0.99 and model.get_layer("drop").rate == 0.5  # restored


def test_short_training_with_batchnorm_infers_as_well_as_it_trains(tmp_path):
    # AlexNet-style on 3,000 images for 4 epochs (188 steps): without recalibration the Keras
    # moving averages lag the weights and the test split scores 8.7% at 99.9% training accuracy
    from tests.fake_data import patch_images

    rng = np.random.default_rng(0)

    class Patches:
        input_shape, num_classes = (28, 28, 1), 10

    ds = Patches()
    (xt, ds.y_train), (xe, ds.y_eval) = patch_images(3000, rng), patch_images(300, rng)
    ds.x_train, ds.x_eval = (xt[..., None] / 255.0).astype(np.float32), (xe[..., None] / 255.0).astype(np.float32)
    result = train_model("alexnet", ds, 4, tmp_path / "a.keras", verbose=0)
    assert result.history["accuracy"][-1] > 0.95
    assert result.accuracy > 0.9, f"eval accuracy {result.accuracy:.3f} after BatchNorm recalibration"
