"""Keras 3 files, written by Keras 3 itself (tests/data/keras3/make_fixtures.py), load in tf.keras
2.14 with exactly their weights: the outputs equal what Keras 3 computed, and hostile Keras 3
configs are refused before anything is imported."""
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from toolchain.errors import ModelLoadError
from toolchain.model_io import file_sha256, load_model

FIXTURES = Path(__file__).resolve().parent / "data" / "keras3"
FAMILIES = ("cnn_bn", "dsconv_residual", "mlp", "conv1d", "sequential", "autoencoder", "layer_zoo", "nested")
#: float32 outputs of two frameworks (jax vs TensorFlow kernels) for the same weights
ATOL = 1e-5


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keras3_file_loads_with_its_exact_weights(family, suffix):
    path = FIXTURES / f"{family}{suffix}"
    io = np.load(FIXTURES / f"{family}_io.npz")
    assert str(io["keras_version"]).startswith("3.")
    before = file_sha256(path)
    model = load_model(path)
    got = model.predict(io["x"], verbose=0)
    diff = np.abs(got - io["y"])
    assert diff.max() <= ATOL, f"{int((diff > ATOL).sum())} of {diff.size} outputs off, worst {diff.max():.3g}"
    n_file = sum(int(np.prod(v.shape)) for v in _file_weights(path))
    assert model.count_params() == n_file
    assert file_sha256(path) == before


def _file_weights(path):
    from toolchain import keras3

    return keras3._arrays(keras3._weights_keras(path) if path.suffix == ".keras" else keras3._weights_h5(path))


def _rewrite_config(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    return dst


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module that would write a marker file if anything imported it."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_k3.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nrelu = lambda x: x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evil_k3", None)


def _layer(config, class_name):
    return next(l for l in config["config"]["layers"] if l["class_name"] == class_name)


@pytest.mark.parametrize("attack", ["layer_module", "registered_name", "activation_module"])
def test_hostile_keras3_configs_are_refused_before_any_import(attack, tmp_path, marker_module):
    def change(config):
        dense = _layer(config, "Dense")
        if attack == "layer_module":
            dense["module"] = "evil_k3"
        elif attack == "registered_name":
            dense["registered_name"] = "evil_k3>Dense"
        else:  # issue 15 item 8: a stock activation name under a foreign module
            dense["config"]["activation"] = {"module": "evil_k3", "class_name": "function", "config": "relu",
                                             "registered_name": "function"}

    path = _rewrite_config(FIXTURES / "mlp.keras", tmp_path / "hostile.keras", change)
    with pytest.raises(ModelLoadError, match="can execute code") as err:
        load_model(path)
    assert not marker_module.exists()
    assert "model.save" not in str(err.value)


def test_keras3_layer_tf_keras_lacks_is_named_without_resave_advice(tmp_path):
    def change(config):  # a Keras 3 built-in that tf.keras 2.14 never had
        dropout = _layer(config, "Dropout")
        dropout["class_name"] = "RMSNormalization"
        dropout["config"] = {"name": dropout["config"]["name"], "axis": -1, "epsilon": 1e-6}

    path = _rewrite_config(FIXTURES / "mlp.keras", tmp_path / "rms.keras", change)
    with pytest.raises(ModelLoadError, match=r"Keras 3 model with layers .*dropout \(RMSNormalization\)") as err:
        load_model(path, trust_model=True)
    assert "model.save" not in str(err.value) and "--trust-model" not in str(err.value)


def test_keras3_layer_option_tf_keras_lacks_is_named(tmp_path):
    def change(config):
        _layer(config, "Dense")["config"]["lora_rank"] = 4  # LoRA on: changes what the layer computes

    path = _rewrite_config(FIXTURES / "mlp.keras", tmp_path / "lora.keras", change)
    with pytest.raises(ModelLoadError, match=r"dense.*\(Dense\).*lora_rank") as err:
        load_model(path)
    assert "model.save" not in str(err.value)


def test_keras3_data_format_tf_keras_cannot_follow_is_named(tmp_path):
    def change(config):  # tf.keras 2.14's ZeroPadding1D pads channels_last only
        _layer(config, "ZeroPadding1D")["config"]["data_format"] = "channels_first"

    path = _rewrite_config(FIXTURES / "layer_zoo.keras", tmp_path / "cf.keras", change)
    with pytest.raises(ModelLoadError, match=r"zero_padding1d \(ZeroPadding1D\).*data_format"):
        load_model(path)


def test_keras3_weights_that_do_not_fit_are_refused(tmp_path):
    import h5py

    path = tmp_path / "cnn_bn.h5"
    shutil.copy(FIXTURES / "cnn_bn.h5", path)
    with h5py.File(path, "r+") as fh:
        group = fh["model_weights/dense/dense"]
        del group["bias"]
        group["bias"] = np.zeros(7, np.float32)
    with pytest.raises(ModelLoadError, match=r"do not match.*dense"):
        load_model(path)


def test_keras3_model_runs_through_the_pipeline_loader(tmp_path):
    from toolchain.pipeline import load_inputs

    io = np.load(FIXTURES / "mlp_io.npz")
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((20, 64)), y=np.arange(20) % 10, x_eval=io["x"], y_eval=io["y"].argmax(1))
    model, dataset = load_inputs(str(FIXTURES / "mlp.keras"), f"npz:{data}")
    assert dataset.input_shape == (64,) and model.output_shape == (None, 10)
