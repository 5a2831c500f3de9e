"""Tiny models shared by the export and verify tests (built once per process)."""
from __future__ import annotations

import functools

import numpy as np

#: epochs that take the small CNN above 90% on digits in a few seconds on 2 cores
TRAIN_EPOCHS = 8


@functools.lru_cache(maxsize=None)
def digits():
    from toolchain.data import load_dataset

    return load_dataset("digits")


@functools.lru_cache(maxsize=None)
def small_cnn():
    """Conv2D + BN + ReLU layer, DepthwiseConv2D, pointwise Conv2D, max pool, two Dense: every
    kernel type TFLite stores, and a BN to fold. Trained on digits (deterministic)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    inp = L.Input((8, 8, 1), name="input")
    x = L.Conv2D(16, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="act")(x)
    x = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = L.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="fc1")(x)
    out = L.Dense(10, activation="softmax", name="fc2")(x)
    model = tf.keras.Model(inp, out, name="small_cnn")
    model.compile(tf.keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    ds = digits()
    model.fit(ds.x_train, ds.y_train, epochs=TRAIN_EPOCHS, batch_size=64, verbose=0, shuffle=False)
    return model


def calib(n: int = 200) -> np.ndarray:
    return digits().calibration(n)[0]


def pruned_copy(model, sparsity: float = 0.8):
    """A clone whose kernels keep only their largest (1 - sparsity) weights (unstructured)."""
    import tensorflow as tf

    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for layer in clone.layers:
        for attr in ("kernel", "depthwise_kernel"):
            if hasattr(layer, attr):
                var = getattr(layer, attr)
                w = var.numpy()
                cut = np.quantile(np.abs(w), sparsity)
                var.assign(np.where(np.abs(w) > cut, w, 0.0).astype(w.dtype))
    return clone
