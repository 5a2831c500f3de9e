"""Shared fixtures: where ../shared lives, and a private relevance cache per test session."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOOLCHAIN_SHARED_DIR", REPO.parent / "shared"))
MLPERF = SHARED / "models" / "mlperf-tiny"
KWS_SAVEDMODEL = MLPERF / "kws_ref_model"
RESNET8_H5 = MLPERF / "resnet8_cifar10.h5"
KWS01_DIR = SHARED / "data" / "kws01"


def require(path: Path):
    """Skip (with the reason) when a piece of ../shared is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (MLPerf Tiny material from ../shared; set TOOLCHAIN_SHARED_DIR)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    if "TOOLCHAIN_CACHE_DIR" not in os.environ:
        os.environ["TOOLCHAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("toolchain-cache"))
    yield


@pytest.fixture(scope="session")
def kws_model():
    from toolchain.model_io import load_model

    return load_model(require(KWS_SAVEDMODEL))


@pytest.fixture(scope="session")
def resnet8_model():
    from toolchain.model_io import load_model

    return load_model(require(RESNET8_H5))


@pytest.fixture(scope="session")
def kws01():
    from toolchain.data import load_dataset

    require(KWS01_DIR)
    return load_dataset("kws01")
