"""Datasets: load one by spec, hand it on as a validated, read-only ``Dataset``.

    ds = load_dataset("kws01")            # or digits, mnist, fashion_mnist, cifar10, images:DIR, npz:PATH
    ds = fit_to_model(ds, model.input_shape[1:])   # add/drop a unit channel axis, flatten for (F,)
    x_cal, y_cal = ds.calibration(200)    # the first 200 train samples
    check_compatible(ds, model.input_shape, model.output_shape[-1])

A dataset carries its ``task``: classification (int64 labels), regression (float32 (N, K)
targets) or autoencoder (targets = inputs, optional 0/1 ``anomaly_eval``); see ``Dataset``.

Nothing here downloads, and TensorFlow / scikit-learn are imported only by the loaders that need
them, so importing this package is cheap.
"""
from toolchain.data.dataset import TASKS, Dataset, check_compatible, fit_to_model
from toolchain.data.keras_cache import DATA_DIR_ENV
from toolchain.data.kws01 import (
    KWS01_DIR_ENV,
    KWS_CLASS_NAMES,
    KWS_INT8_MODEL_ENV,
    default_kws01_dir,
    default_kws_int8_model,
    read_input_quantization,
)
from toolchain.data.load import DATASETS, DatasetKind, known_specs, load_dataset, with_task

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetKind",
    "KWS01_DIR_ENV",
    "KWS_CLASS_NAMES",
    "KWS_INT8_MODEL_ENV",
    "TASKS",
    "check_compatible",
    "fit_to_model",
    "default_kws01_dir",
    "default_kws_int8_model",
    "known_specs",
    "load_dataset",
    "with_task",
    "read_input_quantization",
]
