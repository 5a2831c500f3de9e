"""Writes the Keras 3 fixtures of tests/test_keras3.py: small models of each supported family,
trained by Keras 3 on scikit-learn's digits (the toolchain's ``digits`` split: test_size 0.25,
random_state 0, stratified), saved by Keras 3 itself as ``.keras`` and ``.h5``, with the outputs
Keras 3 computed for fixed inputs and its accuracy (the autoencoder: MSE) on the evaluation split.

Keras 3 cannot be installed in the project's environment (innvestigate pins tensorflow < 2.15), so
run this in a side environment, never the project's .venv:

    python3.11 -m venv /tmp/k3venv
    /tmp/k3venv/bin/pip install keras==3.15.1 jax jaxlib scipy h5py numpy scikit-learn
    KERAS_BACKEND=jax /tmp/k3venv/bin/python tests/data/keras3/make_fixtures.py [family ...]

(no family names: all of them; naming some rewrites only those files)

(The files committed here were written by keras 3.15.1 on the jax 0.10.2 CPU backend.) Training is
seeded; BatchNormalization's moving statistics are trained, so a loader that drops or misorders any
variable changes the outputs. Inputs: (8, 8, 1) images, (64,) vectors, or (8, 8) sequences (the
digit's rows as 8 time steps) for the Conv1D model.
"""
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported, or it picks its default
import keras  # noqa: E402
from keras import layers  # noqa: E402

OUT = Path(__file__).resolve().parent
SAMPLES = 4


def cnn_bn():
    inp = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="cnn_bn")


def dsconv_residual():
    inp = keras.Input((8, 8, 1))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(max_value=6.0)(y)
    y = layers.Conv2D(16, 1)(y)
    x = layers.Add()([x, y])
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="dsconv_residual")


def mlp():
    inp = keras.Input((64,))
    x = layers.Dense(32, activation="relu")(inp)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(16, activation="relu")(x)
    return keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="mlp")


def conv1d():
    inp = keras.Input((8, 8))
    x = layers.Conv1D(16, 3, padding="same", activation="relu")(inp)
    x = layers.MaxPooling1D(2)(x)
    x = layers.Conv1D(32, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, layers.Dense(10, activation="softmax")(x), name="conv1d")


def sequential():
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
                             layers.Dense(10, activation="softmax")], name="sequential_cnn")


def autoencoder():
    inp = keras.Input((64,))
    x = inp
    for units in (32, 8, 32):
        x = layers.Dense(units, activation="relu")(x)
    return keras.Model(inp, layers.Dense(64)(x), name="autoencoder")


def layer_zoo():
    """The remaining supported layers: padding, separable conv, average/max pooling in 1-D and 2-D,
    Concatenate, Reshape and a Softmax layer."""
    inp = keras.Input((8, 8, 1))
    x = layers.ZeroPadding2D(1)(inp)
    x = layers.SeparableConv2D(16, 3, activation="relu")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Concatenate()([layers.GlobalMaxPooling2D()(x), layers.GlobalAveragePooling2D()(x)])
    x = layers.Reshape((8, 4))(x)
    x = layers.ZeroPadding1D(1)(x)
    x = layers.Conv1D(16, 3, activation="relu")(x)
    x = layers.AveragePooling1D(2)(x)
    x = layers.GlobalMaxPooling1D()(x)
    x = layers.Dense(10)(x)
    return keras.Model(inp, layers.Softmax()(x), name="layer_zoo")


def nested():
    """A Sequential block (with BatchNormalization) used as a layer of a Functional model."""
    block = keras.Sequential([keras.Input((64,)), layers.Dense(32), layers.BatchNormalization(), layers.ReLU()],
                             name="block")
    inp = keras.Input((64,))
    return keras.Model(inp, layers.Dense(10, activation="softmax")(block(inp)), name="nested")


FAMILIES = {f.__name__: f for f in (cnn_bn, dsconv_residual, mlp, conv1d, sequential, autoencoder, layer_zoo,
                                    nested)}


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype("float32")
    return train_test_split(x, bunch.target.astype("int64"), test_size=0.25, random_state=0, stratify=bunch.target)


def main(names) -> None:
    x_train, x_eval, y_train, y_eval = digits()
    for name in names or FAMILIES:
        build = FAMILIES[name]
        keras.utils.set_random_seed(0)
        model = build()
        shape = tuple(model.input_shape[1:])
        fit = lambda a: a.reshape((len(a),) + shape)  # noqa: E731
        if name == "autoencoder":
            model.compile("adam", "mse")
            model.fit(fit(x_train), fit(x_train), epochs=100, batch_size=32, verbose=0)
            metric = float(np.mean((model.predict(fit(x_eval), verbose=0) - fit(x_eval)) ** 2))
        else:
            model.compile("adam", "sparse_categorical_crossentropy")
            model.fit(fit(x_train), y_train, epochs=40, batch_size=32, verbose=0)
            metric = float(np.mean(model.predict(fit(x_eval), verbose=0).argmax(1) == y_eval))
        x = fit(x_eval[:SAMPLES])
        y = np.asarray(model.predict(x, verbose=0))
        model.save(OUT / f"{name}.keras")
        model.save(OUT / f"{name}.h5")
        np.savez(OUT / f"{name}_io.npz", x=x, y=y, eval_metric=metric, keras_version=keras.__version__,
                 backend=keras.backend.backend())
        print(name, model.count_params(), "params", "eval", metric)


if __name__ == "__main__":
    main(sys.argv[1:])
