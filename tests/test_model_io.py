"""toolchain.model_io: loading the real MLPerf Tiny files, round trips, hashing and every
refusal (missing, wrong kind, corrupt, subclassed, unsafe, multi-input/output)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from toolchain.errors import ConfigError, ModelLoadError, ToolchainError
from toolchain.model_io import file_sha256, load_model, model_hash, save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", ROOT.parent / "shared"))
MLPERF = SHARED / "models" / "mlperf-tiny"
KWS_SAVEDMODEL = MLPERF / "kws_ref_model"
RESNET8_H5 = MLPERF / "resnet8_cifar10.h5"
KWS_TFLITE = MLPERF / "kws_ref_model_float32.tflite"
# A save/load round trip stores float32 weights bit for bit.
ROUND_TRIP_ATOL = 0.0
L = tf.keras.layers


def _needs(path: Path):
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"MLPerf Tiny reference file not found at {path}; set TOOLCHAIN_SHARED_DIR to the "
               f"shared/ folder",
    )


def _assert_close(a, b, atol, what):
    off = np.abs(a - b) > atol
    assert not off.any(), (
        f"{what}: {int(off.sum())} of {off.size} elements differ by more than {atol}; "
        f"max {np.abs(a - b).max():.3g}"
    )


@pytest.fixture(scope="module")
def tiny():
    return build_model("digits_cnn", (8, 8, 1), 10, seed=0)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)


# ---------------------------------------------------------------------------- real files


@_needs(KWS_SAVEDMODEL)
def test_loads_the_mlperf_kws_savedmodel_as_functional():
    before = file_sha256(KWS_SAVEDMODEL)
    model = load_model(KWS_SAVEDMODEL)
    assert type(model).__name__ == "Functional"
    assert model.input_shape == (None, 49, 10, 1) and model.output_shape == (None, 12)
    assert len(model.layers) == 33 and model.count_params() == 24908
    # The Keras model computes what the SavedModel's own serving signature computes.
    x = np.random.default_rng(0).normal(size=(4, 49, 10, 1)).astype(np.float32)
    serving = tf.saved_model.load(str(KWS_SAVEDMODEL)).signatures["serving_default"]
    want = serving(input_1=tf.constant(x))["dense"].numpy()
    _assert_close(model(x, training=False).numpy(), want, 1e-6, "Keras vs serving signature")
    assert file_sha256(KWS_SAVEDMODEL) == before


@_needs(RESNET8_H5)
def test_loads_the_mlperf_resnet8_h5():
    before = file_sha256(RESNET8_H5)
    model = load_model(RESNET8_H5)
    assert type(model).__name__ == "Functional"
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert [type(layer).__name__ for layer in model.layers].count("Add") == 3
    assert model.count_params() == 78666
    assert file_sha256(RESNET8_H5) == before


@_needs(KWS_TFLITE)
def test_real_tflite_is_refused_with_the_fix():
    with pytest.raises(ModelLoadError, match="Keras source model"):
        load_model(KWS_TFLITE)


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".hdf5"])
def test_round_trip_keeps_outputs_and_hash(tiny, batch, tmp_path, suffix):
    path = save_model(tiny, tmp_path / f"model{suffix}")
    before = file_sha256(path)
    loaded = load_model(path)
    assert type(loaded).__name__ == "Functional"
    _assert_close(loaded(batch).numpy(), tiny(batch).numpy(), ROUND_TRIP_ATOL, suffix)
    assert model_hash(loaded) == model_hash(tiny)
    assert file_sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]


def test_sequential_round_trip(batch, tmp_path):
    model = tf.keras.Sequential([L.Input((8, 8, 1)), L.Flatten(), L.Dense(10, "softmax")])
    loaded = load_model(save_model(model, tmp_path / "seq.h5"))
    assert isinstance(loaded, tf.keras.Sequential)
    _assert_close(loaded(batch).numpy(), model(batch).numpy(), ROUND_TRIP_ATOL, "sequential")


def test_keras_savedmodel_directory_round_trip(tiny, batch, tmp_path):
    # A SavedModel written by Keras >= 2.5 (keras_metadata.pb), unlike the pre-2.5 KWS file.
    tiny.save(str(tmp_path / "sm"), save_format="tf")
    before = file_sha256(tmp_path / "sm")
    loaded = load_model(tmp_path / "sm")
    assert type(loaded).__name__ == "Functional"
    _assert_close(loaded(batch).numpy(), tiny(batch).numpy(), ROUND_TRIP_ATOL, "SavedModel")
    assert file_sha256(tmp_path / "sm") == before


def test_save_overwrites_atomically_and_keeps_old_file_on_failure(tiny, tmp_path, monkeypatch):
    path = save_model(tiny, tmp_path / "m.keras")
    other = build_model("digits_cnn", (8, 8, 1), 10, seed=1)
    save_model(other, path)  # overwrite in place
    # A .keras archive records when it was saved, so compare what it holds, not its bytes.
    reloaded = load_model(path)
    for got, want in zip(reloaded.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(got, want)
    good = file_sha256(path)

    def half_written(filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny, path)
    assert file_sha256(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


@pytest.mark.parametrize("name", ["m.tflite", "m.onnx", "m"])
def test_save_rejects_other_suffixes(tiny, tmp_path, name):
    with pytest.raises(ConfigError, match=r"\.keras, \.h5, \.hdf5"):
        save_model(tiny, tmp_path / name)


# ---------------------------------------------------------------------------- hashing


def test_model_hash_is_stable_across_processes(tiny):
    code = ("from models import build_model; from toolchain.model_io import model_hash; "
            "print(model_hash(build_model('digits_cnn', (8, 8, 1), 10, seed=0)))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert out == model_hash(tiny)


def test_model_hash_sees_weights_and_architecture(tiny):
    changed = tf.keras.models.clone_model(tiny)
    weights = tiny.get_weights()
    changed.set_weights(weights)
    assert model_hash(changed) == model_hash(tiny)
    weights[0] = weights[0].copy()
    weights[0].flat[0] += 1e-3
    changed.set_weights(weights)
    assert model_hash(changed) != model_hash(tiny)
    other = build_model("lenet5", (8, 8, 1), 10, seed=0)
    assert model_hash(other) != model_hash(tiny)


def test_file_sha256_of_files_and_directories(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "x").write_bytes(b"1")
    (d / "sub" / "y").write_bytes(b"2")
    first = file_sha256(d)
    assert file_sha256(d) == first
    (d / "sub" / "y").rename(d / "sub" / "z")
    assert file_sha256(d) != first
    with pytest.raises(ModelLoadError, match="no such file"):
        file_sha256(tmp_path / "missing")


# ---------------------------------------------------------------------------- refusals


def _refused(path, match, **kwargs):
    existed = Path(path).exists()
    before = file_sha256(path) if existed else None
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(path, **kwargs)
    if existed:
        assert file_sha256(path) == before, "loading modified the input"
    return str(info.value)


def test_missing_path(tmp_path):
    _refused(tmp_path / "nope.keras", "does not exist")


@pytest.mark.parametrize("name,what", [("m.tflite", "TFLite"), ("m.onnx", "ONNX")])
def test_converted_artifacts_ask_for_the_keras_source(tmp_path, name, what):
    (tmp_path / name).write_bytes(b"\x00" * 64)
    message = _refused(tmp_path / name, "Keras source model")
    assert what in message


@pytest.mark.parametrize("name", ["m.pt", "m.txt", "model"])
def test_unknown_suffix(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00" * 64)
    _refused(tmp_path / name, r"not a Keras model; pass a \.keras file")


def test_bare_saved_model_pb_points_to_its_directory(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\x00" * 64)
    _refused(tmp_path / "saved_model.pb", "SavedModel directory that contains it")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    _refused(tmp_path, "not a SavedModel")


def test_random_bytes_h5_is_corrupt(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(path, "not a readable HDF5 model file")


def test_truncated_keras_archive_is_corrupt(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m.keras")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, r"not a readable \.keras archive")


def test_keras_archive_with_damaged_weights_is_corrupt(tiny, tmp_path):
    good = save_model(tiny, tmp_path / "good.keras")
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:100] if item.filename.endswith(".h5") else data)
    _refused(bad, r"not a readable \.keras model")


def test_weights_only_h5(tiny, tmp_path):
    path = tmp_path / "weights.h5"
    tiny.save_weights(str(path))
    _refused(path, "only weights")


class _Subclassed(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

    def call(self, x):
        return self.dense(x)


@pytest.fixture(scope="module")
def subclassed():
    model = _Subclassed()
    model(np.zeros((1, 4), np.float32))
    return model


def test_subclassed_keras_archive(subclassed, tmp_path):
    subclassed.save(str(tmp_path / "sub.keras"))
    _refused(tmp_path / "sub.keras", "rebuild it as a Functional or Sequential model")


def test_subclassed_savedmodel(subclassed, tmp_path):
    subclassed.save(str(tmp_path / "sub_sm"), save_format="tf")
    _refused(tmp_path / "sub_sm", "subclassed model .*rebuild it as a Functional")


def test_plain_tf_savedmodel_without_keras_metadata(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([None])])
    tf.saved_model.save(module, str(tmp_path / "plain"))
    _refused(tmp_path / "plain", "no Keras model metadata")


def _lambda_model(marker: Path) -> tf.keras.Model:
    # The lambda touches ``marker`` when Keras calls it, i.e. when a loader rebuilds the graph:
    # proof that a refused load executed nothing from the file.
    touch = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]")
    inputs = L.Input((4,))
    outputs = L.Dense(2, activation="softmax")(L.Lambda(touch, name="touchy")(inputs))
    return tf.keras.Model(inputs, outputs)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layers_need_trust_and_run_nothing_when_refused(tmp_path, suffix):
    marker = tmp_path / "executed"
    path = save_model(_lambda_model(marker), tmp_path / f"lam{suffix}")
    marker.unlink(missing_ok=True)
    message = _refused(path, "touchy \\(Lambda\\)")
    assert "--trust-model" in message
    assert not marker.exists(), "the Lambda ran while refusing the model"
    model = load_model(path, trust_model=True)
    assert marker.exists() and model.output_shape == (None, 2)


def test_lambda_layers_in_a_savedmodel_need_trust(tmp_path):
    inputs = L.Input((4,))
    outputs = L.Dense(2)(L.Lambda(lambda t: t * 2.0, name="double")(inputs))
    tf.keras.Model(inputs, outputs).save(str(tmp_path / "sm"), save_format="tf")
    _refused(tmp_path / "sm", "double \\(Lambda\\).*--trust-model")


def test_savedmodel_custom_layer_labelled_as_builtin_needs_trust(tmp_path):
    # Issue 15 item 7: a custom layer whose class is named "Dense" is stored in the Keras metadata
    # as a Dense; Dense.from_config rejects its config, so Keras revives it from the traced graph,
    # which writes ``marker`` when it runs. Without trust the load must stop before it ever runs.
    marker = tmp_path / "executed"

    class Dense(L.Layer):
        def __init__(self, units=2, note="", **kwargs):
            super().__init__(**kwargs)
            self.units, self.note = units, note

        def build(self, shape):
            self.kernel = self.add_weight("kernel", (shape[-1], self.units))

        def call(self, x):
            tf.io.write_file(str(marker), "ran")
            return tf.matmul(x, self.kernel)

        def get_config(self):
            return {**super().get_config(), "units": self.units, "note": self.note}

    inputs = L.Input((4,))
    tf.keras.Model(inputs, Dense(name="dense")(inputs)).save(str(tmp_path / "sm"), save_format="tf")
    marker.unlink(missing_ok=True)
    _refused(tmp_path / "sm", "traced graph.*dense \\(Dense\\).*--trust-model")
    assert not marker.exists(), "the SavedModel's traced graph ran while refusing it"
    model = load_model(tmp_path / "sm", trust_model=True)
    model(np.ones((1, 4), np.float32))
    assert marker.exists()


@tf.keras.utils.register_keras_serializable(package="toolchain_tests")
class _Twice(L.Layer):
    def call(self, x):
        return 2.0 * x


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_custom_layers_need_trust(tmp_path, suffix):
    inputs = L.Input((4,))
    outputs = L.Dense(2)(_Twice(name="twice")(inputs))
    path = save_model(tf.keras.Model(inputs, outputs), tmp_path / f"custom{suffix}")
    _refused(path, "twice \\(.*_Twice\\).*--trust-model")
    assert load_model(path, trust_model=True).output_shape == (None, 2)


def test_unregistered_custom_objects_fail_clearly_even_when_trusted(tmp_path):
    def my_relu(x):
        return tf.nn.relu(x)

    inputs = L.Input((4,))
    outputs = L.Dense(2, activation=my_relu)(inputs)
    path = save_model(tf.keras.Model(inputs, outputs), tmp_path / "act.keras")
    _refused(path, r"my_relu \(custom function\)")
    _refused(path, "register", trust_model=True)


def test_multi_input_model_is_refused(tmp_path):
    a, b = L.Input((4,), name="a"), L.Input((4,), name="b")
    outputs = L.Dense(2, activation="softmax")(L.Concatenate()([a, b]))
    path = save_model(tf.keras.Model([a, b], outputs), tmp_path / "two_in.keras")
    _refused(path, r"2 input\(s\) \(a, b\).*single-input single-output")


def test_multi_output_model_is_refused(tmp_path):
    inputs = L.Input((4,))
    model = tf.keras.Model(inputs, [L.Dense(2)(inputs), L.Dense(3)(inputs)])
    path = save_model(model, tmp_path / "two_out.h5")
    _refused(path, "2 output.*single-input single-output")


def test_errors_are_toolchain_errors():
    assert issubclass(ModelLoadError, ToolchainError)
