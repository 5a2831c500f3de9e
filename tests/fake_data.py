"""Small learnable stand-ins for datasets this machine does not have: each of 10 classes lights a
different 7x7 patch of a noisy 28x28 image, so a CNN learns it in a few epochs."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def patch_images(n: int, rng: np.random.Generator):
    """(uint8 images of shape (n, 28, 28), uint8 labels)."""
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 4)
        x[i, 7 * r:7 * r + 7, 7 * q:7 * q + 7] += 150
    return x, y


def write_fashion_mnist_cache(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """``folder/fashion-mnist/*.gz`` in the IDX format Keras downloads."""
    rng = np.random.default_rng(seed)
    base = Path(folder) / "fashion-mnist"
    base.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = patch_images(n, rng)
        with gzip.open(base / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + y.tobytes())
        with gzip.open(base / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([2051, n, 28, 28], ">i4").tobytes() + x.tobytes())
