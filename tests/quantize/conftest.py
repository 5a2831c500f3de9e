"""A small trained digits CNN shared by the TensorFlow tests of the quantize stage."""
import pytest

DIGITS_EPOCHS = 8


@pytest.fixture(scope="session")
def digits_data():
    pytest.importorskip("sklearn", reason="scikit-learn is needed for the digits dataset")
    from toolchain.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_model_path(digits_data, tmp_path_factory):
    from models import train_model

    out = tmp_path_factory.mktemp("quantize_model") / "digits_cnn.h5"
    result = train_model("digits_cnn", digits_data, DIGITS_EPOCHS, out, verbose=0)
    assert result.accuracy > 0.9, f"the digits CNN trained to only {result.accuracy:.2%}"
    return out


@pytest.fixture(scope="session")
def digits_model(digits_model_path):
    from toolchain.model_io import load_model

    return load_model(digits_model_path)
