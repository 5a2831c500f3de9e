"""scikit-learn's bundled 8x8 handwritten digits: the one image dataset that needs no download.

Samples are (8, 8, 1) images. There is no separate flat spec: a model on (64,) feature vectors (an
MLP) gets them flattened row-major, and a Conv1D model on (8, 8) gets the rows as a sequence, both
by ``fit_to_model`` when the data is loaded against the model (``pipeline.load_inputs``).
"""
from __future__ import annotations

import numpy as np

from toolchain.data.dataset import Dataset

# The split is part of the dataset's definition: change it and every cached result is stale.
DIGITS_TEST_SIZE = 0.25
DIGITS_RANDOM_STATE = 0


def load_digits() -> Dataset:
    # scikit-learn costs about a second to import; only pay it when digits is asked for.
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap), so 1/16 maps them onto [0, 1].
    x = (bunch.images / 16.0).astype(np.float32)[..., np.newaxis]
    y = bunch.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_RANDOM_STATE, stratify=y
    )
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_eval=np.ascontiguousarray(x_eval),
        y_eval=np.ascontiguousarray(y_eval),
        class_names=tuple(str(i) for i in range(10)),
        input_shape=tuple(int(d) for d in x.shape[1:]),
        provenance=(
            f"scikit-learn load_digits ({len(x)} 8x8 images, pixel values 0..16 divided by 16); "
            f"train_test_split(test_size={DIGITS_TEST_SIZE}, random_state={DIGITS_RANDOM_STATE}, "
            f"stratify=y): {len(x_train)} train / {len(x_eval)} eval"
        ),
    )
