"""Train a zoo architecture (or a given Keras model) on a dataset and save it atomically."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import tensorflow as tf

from models.zoo import build_model
from toolchain.errors import ConfigError, DataError
from toolchain.model_io import SAVE_SUFFIXES, save_model

LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class TrainResult:
    """Where the trained model was saved and how well it does on the dataset's eval split."""

    path: str
    accuracy: float
    epochs: int
    history: Dict[str, List[float]] = field(default_factory=dict)


def compile_classifier(model: tf.keras.Model) -> tf.keras.Model:
    """Adam + sparse categorical cross-entropy on the softmax output, explicit accuracy metric.

    The metric is a ``SparseCategoricalAccuracy`` object, not the string ``"accuracy"``: in
    Keras 2.14 a model compiled with the string and saved to .h5 before any fit/evaluate resolves
    it to the wrong accuracy variant later and reports ~10%.
    """
    model.compile(
        optimizer=tf.keras.optimizers.Adam(LEARNING_RATE),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def _check_dataset(dataset, model: tf.keras.Model) -> None:
    missing = [a for a in ("x_train", "y_train", "x_eval", "y_eval", "input_shape", "num_classes")
               if not hasattr(dataset, a)]
    if missing:
        raise ConfigError(
            f"dataset {type(dataset).__name__} lacks {', '.join(missing)}; pass a "
            f"toolchain.data Dataset (x_train, y_train, x_eval, y_eval, input_shape, num_classes)"
        )
    want = tuple(model.input_shape[1:])
    classes = int(model.output_shape[-1])
    for split in ("train", "eval"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        if len(x) == 0 or len(x) != len(y):
            raise DataError(
                f"{split} split has {len(x)} inputs and {len(y)} labels; it needs at least one "
                f"example and one label per input"
            )
        if tuple(x.shape[1:]) != want:
            raise DataError(
                f"{split} inputs have shape {tuple(x.shape[1:])} but the model expects {want}; "
                f"build the model for the dataset's input_shape"
            )
        labels = np.asarray(y)
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise DataError(
                f"{split} labels are {labels.dtype} with shape {labels.shape}, not 1-D integer "
                f"class indices; convert one-hot labels with argmax"
            )
        if labels.min() < 0 or labels.max() >= classes:
            raise DataError(
                f"{split} labels span {labels.min()}..{labels.max()} but the model has {classes} "
                f"classes (0..{classes - 1}); build the model with the dataset's num_classes"
            )


def train_model(
    arch_or_model: Union[str, tf.keras.Model],
    dataset,
    epochs: int,
    out_path,
    batch_size: int = 64,
    seed: int = 0,
    verbose: int = 1,
) -> TrainResult:
    """Train ``arch_or_model`` on ``dataset`` (eval split as validation) and save it.

    An architecture key is built with ``build_model(key, dataset.input_shape,
    dataset.num_classes, seed)``; a model is cloned first, so the caller's model is untouched.
    The model is saved atomically to ``out_path`` (.keras or .h5/.hdf5) and its top-1 accuracy
    on the eval split is returned.
    """
    out = Path(out_path)
    if out.suffix.lower() not in SAVE_SUFFIXES:
        raise ConfigError(
            f"output path {str(out)!r} has suffix {out.suffix!r}; use one of "
            f"{', '.join(SAVE_SUFFIXES)}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs {epochs!r} is not a positive integer; pass e.g. 10")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size {batch_size!r} is not a positive integer; pass e.g. 64")

    if not getattr(dataset, "is_classification", True):
        raise ConfigError(
            f"dataset {getattr(dataset, 'name', '?')!r} holds {dataset.task} targets, but train_model "
            "trains classifiers only; train the regressor/autoencoder in Keras and pass the saved model"
        )

    if isinstance(arch_or_model, str):
        model = build_model(arch_or_model, tuple(dataset.input_shape), int(dataset.num_classes),
                            seed=seed)
    elif isinstance(arch_or_model, tf.keras.Model):
        tf.keras.utils.set_random_seed(seed)
        model = tf.keras.models.clone_model(arch_or_model)
        model.set_weights(arch_or_model.get_weights())
    else:
        raise ConfigError(
            f"arch_or_model is a {type(arch_or_model).__name__}; pass an architecture key "
            f"(see models.ARCHITECTURES) or a tf.keras.Model"
        )
    _check_dataset(dataset, model)

    tf.keras.utils.set_random_seed(seed)
    compile_classifier(model)
    fit = model.fit(
        np.asarray(dataset.x_train, dtype=np.float32), np.asarray(dataset.y_train),
        validation_data=(np.asarray(dataset.x_eval, dtype=np.float32),
                         np.asarray(dataset.y_eval)),
        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose,
    )
    recalibrate_batchnorm(model, np.asarray(dataset.x_train, dtype=np.float32))
    # Top-1 from the predictions themselves, independent of Keras metric bookkeeping.
    probs = model.predict(np.asarray(dataset.x_eval, dtype=np.float32), batch_size=256,
                          verbose=0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == np.asarray(dataset.y_eval)))
    saved = save_model(model, out)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    return TrainResult(path=str(saved), accuracy=accuracy, epochs=epochs, history=history)


#: training samples whose statistics ``recalibrate_batchnorm`` gives each BatchNormalization
RECALIBRATION_SAMPLES = 4096


def recalibrate_batchnorm(model: tf.keras.Model, x: np.ndarray, samples: int = RECALIBRATION_SAMPLES,
                          batch_size: int = 256) -> int:
    """Set every BatchNormalization's moving mean/variance to the statistics of the first
    ``samples`` of ``x`` under the final weights; returns how many layers were recalibrated.

    Keras keeps an exponential moving average (momentum 0.99) of batch statistics taken while
    the weights were still changing. After a few hundred steps (a small dataset, few epochs) it
    lags so far behind that inference collapses: AlexNet-style on 3,000 images, 4 epochs, 99.9%
    training accuracy and 8.7% on the test split, 100% after this. The fix is the usual BN
    re-estimation (PyTorch's ``swa_utils.update_bn``; Keras has none): forward passes in training
    mode with the momentum set so the moving statistics become the running mean of the batch
    statistics, Dropout off so the activations are those of inference.
    """
    bns = [l for l in model.submodules if isinstance(l, tf.keras.layers.BatchNormalization)]
    if not bns or len(x) == 0:
        return 0
    drops = [l for l in model.submodules if isinstance(l, tf.keras.layers.Dropout)]
    momenta, rates = [l.momentum for l in bns], [l.rate for l in drops]
    try:
        for l in drops:
            l.rate = 0.0
        for k, start in enumerate(range(0, min(len(x), samples), batch_size)):
            for l in bns:
                l.momentum = k / (k + 1)  # moving = mean of the k + 1 batch statistics so far
            model(x[start:min(start + batch_size, samples)], training=True)
    finally:
        for l, m in zip(bns, momenta):
            l.momentum = m
        for l, r in zip(drops, rates):
            l.rate = r
    return len(bns)
