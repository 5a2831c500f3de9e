"""Writes the Keras 3 fixtures of tests/test_keras3.py: small models of each supported family,
saved by Keras 3 itself as ``.keras`` and ``.h5``, with the outputs Keras 3 computed for fixed inputs.

Keras 3 cannot be installed in the project's environment (innvestigate pins tensorflow < 2.15), so
run this in a side environment, never the project's .venv:

    python3.11 -m venv /tmp/k3venv
    /tmp/k3venv/bin/pip install keras==3.15.1 jax jaxlib scipy h5py numpy
    KERAS_BACKEND=jax /tmp/k3venv/bin/python tests/data/keras3/make_fixtures.py

(The files committed here were written by keras 3.15.1 on the jax 0.10.2 CPU backend.) Weights are
random but fixed (seed 0), including BatchNormalization's moving statistics, so a loader that drops
or misorders any variable changes the outputs.
"""
import os
from pathlib import Path

import numpy as np

import keras
from keras import layers

OUT = Path(__file__).resolve().parent
SAMPLES = 4


def cnn_bn():
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(5, activation="softmax")(x), name="cnn_bn")


def dsconv_residual():
    inp = keras.Input((16, 16, 1))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(max_value=6.0)(y)
    y = layers.Conv2D(8, 1)(y)
    x = layers.Add()([x, y])
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4, activation="softmax")(x), name="dsconv_residual")


def mlp():
    inp = keras.Input((64,))
    x = layers.Dense(32, activation="relu")(inp)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(16, activation="relu")(x)
    return keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="mlp")


def conv1d():
    inp = keras.Input((32, 3))
    x = layers.Conv1D(8, 3, activation="relu")(inp)
    x = layers.MaxPooling1D(2)(x)
    x = layers.Conv1D(16, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, layers.Dense(6, activation="softmax")(x), name="conv1d")


def sequential():
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
                             layers.Dense(10, activation="softmax")], name="sequential_cnn")


def autoencoder():
    inp = keras.Input((64,))
    x = inp
    for units in (32, 8, 32):
        x = layers.Dense(units, activation="relu")(x)
    return keras.Model(inp, layers.Dense(64)(x), name="autoencoder")


FAMILIES = {f.__name__: f for f in (cnn_bn, dsconv_residual, mlp, conv1d, sequential, autoencoder)}


def main() -> None:
    rng = np.random.default_rng(0)
    for name, build in FAMILIES.items():
        keras.utils.set_random_seed(0)
        model = build()
        # non-trivial values for every variable (moving statistics and biases included)
        for w in model.weights:
            value = rng.normal(0, 0.3, w.shape).astype("float32")
            if "moving_variance" in w.path or "gamma" in w.path:
                value = np.abs(value) + 0.5
            w.assign(value)
        x = rng.random((SAMPLES,) + tuple(model.input_shape[1:])).astype("float32")
        y = np.asarray(model.predict(x, verbose=0))
        model.save(OUT / f"{name}.keras")
        model.save(OUT / f"{name}.h5")
        np.savez(OUT / f"{name}_io.npz", x=x, y=y, keras_version=keras.__version__,
                 backend=keras.backend.backend())
        print(name, model.count_params(), "params")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
