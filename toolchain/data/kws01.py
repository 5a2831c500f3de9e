"""MLPerf Tiny keyword spotting evaluation set in the EEMBC runner's format ("kws01").

The folder holds ``tst_NNNNNN_<Word>_<label>.bin`` files (490 bytes: a 49 x 10 MFCC spectrogram
already quantized to int8 with the reference int8 model's input quantization) and
``y_labels.csv`` with rows ``<file name>,<number of classes>,<true label>`` and no header.

The samples are kept as int8 (``x_train_int8``/``x_eval_int8``) and dequantized with the scale and
zero point read from the reference model's input tensor, so the float model sees exactly what the
int8 model sees.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from toolchain.data.dataset import Dataset
from toolchain.errors import DataError, ModelLoadError

KWS01_DIR_ENV = "TOOLCHAIN_KWS01_DIR"
KWS_INT8_MODEL_ENV = "TOOLCHAIN_KWS_INT8_MODEL"
KWS_CLASS_NAMES = (
    "down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "silence", "unknown",
)
KWS_SAMPLE_SHAPE = (49, 10, 1)
KWS_SAMPLE_BYTES = 49 * 10
LABELS_FILE = "y_labels.csv"

# toolchain/data/kws01.py -> parents[2] is the repository root; shared/ sits beside it.
_REPO = Path(__file__).resolve().parents[2]
_FILE_NAME = re.compile(r"^tst_(\d+)_([A-Za-z]+)_(\d+)\.bin$")
# Offender lists in messages are cut here so one bad folder does not print a thousand names.
_MAX_NAMED = 5


def default_kws01_dir() -> Path:
    """``$TOOLCHAIN_KWS01_DIR``, else ``<repo>/../shared/data/kws01``."""
    env = os.environ.get(KWS01_DIR_ENV)
    return Path(env) if env else _REPO.parent / "shared" / "data" / "kws01"


def default_kws_int8_model() -> Path:
    """``$TOOLCHAIN_KWS_INT8_MODEL``, else the MLPerf Tiny reference int8 model in shared/."""
    env = os.environ.get(KWS_INT8_MODEL_ENV)
    if env:
        return Path(env)
    return _REPO.parent / "shared" / "models" / "mlperf-tiny" / "kws_ref_model_int8.tflite"


def read_input_quantization(model_path: Path) -> tuple[float, int]:
    """``(scale, zero_point)`` of an int8 TFLite model's first input tensor."""
    if not model_path.is_file():
        raise ModelLoadError(
            f"kws01 needs the reference int8 model for its input quantization, but "
            f"{model_path} does not exist; set {KWS_INT8_MODEL_ENV} to "
            "kws_ref_model_int8.tflite from MLPerf Tiny"
        )
    # TensorFlow takes seconds to import; only kws01 needs it, and only here.
    import tensorflow as tf

    try:
        details = tf.lite.Interpreter(model_path=str(model_path)).get_input_details()[0]
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot read {model_path} as a TFLite model ({exc}); set {KWS_INT8_MODEL_ENV} to "
            "the MLPerf Tiny kws_ref_model_int8.tflite"
        ) from None
    scale, zero_point = details["quantization"]
    if details["dtype"] != np.int8 or not scale > 0:
        raise ModelLoadError(
            f"{model_path} has a {np.dtype(details['dtype']).name} input with scale {scale}, but "
            f"kws01 needs an int8-quantized input (scale > 0); set {KWS_INT8_MODEL_ENV} to the "
            "MLPerf Tiny kws_ref_model_int8.tflite"
        )
    if tuple(details["shape"][1:]) != KWS_SAMPLE_SHAPE:
        raise ModelLoadError(
            f"{model_path} takes input shape {tuple(details['shape'])}, but kws01 samples are "
            f"{KWS_SAMPLE_SHAPE}; set {KWS_INT8_MODEL_ENV} to the MLPerf Tiny KWS int8 model"
        )
    return float(scale), int(zero_point)


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    more = len(items) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def _read_labels(folder: Path) -> dict[str, int]:
    path = folder / LABELS_FILE
    if not path.is_file():
        raise DataError(
            f"kws01 folder {folder} has no {LABELS_FILE}; copy it from the EEMBC runner's "
            "kws01 dataset folder next to the .bin files"
        )
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            cells = [c.strip() for c in row]
            try:
                name, class_count, label = cells[0], int(cells[1]), int(cells[2])
            except (IndexError, ValueError):
                raise DataError(
                    f"{path} line {line_no} is {','.join(row)!r}, but each line must be "
                    "'<file name>,<number of classes>,<true label>' (no header); fix or replace "
                    "the file"
                ) from None
            if class_count != len(KWS_CLASS_NAMES) or not 0 <= label < len(KWS_CLASS_NAMES):
                raise DataError(
                    f"{path} line {line_no} gives {class_count} classes and label {label}, but "
                    f"kws01 has {len(KWS_CLASS_NAMES)} classes (labels 0..11); this is not the "
                    "MLPerf Tiny KWS label file"
                )
            if labels.setdefault(name, label) != label:
                raise DataError(
                    f"{path} labels {name} both {labels[name]} and {label}; keep one line per file"
                )
    return labels


def load_kws01(path: str | None = None) -> Dataset:
    if path is not None:
        folder, chosen_by = Path(path), "kws01:PATH"
    else:
        folder = default_kws01_dir()
        chosen_by = f"${KWS01_DIR_ENV}" if os.environ.get(KWS01_DIR_ENV) else "the default"
    if not folder.is_dir():
        raise DataError(
            f"kws01 folder {folder} (from {chosen_by}) does not exist; point {KWS01_DIR_ENV} or "
            "the spec kws01:PATH at the EEMBC MLPerf Tiny KWS folder of "
            "tst_NNNNNN_<Word>_<label>.bin files"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix == ".bin" and p.is_file())
    if not files:
        raise DataError(
            f"kws01 folder {folder} holds no .bin files; point {KWS01_DIR_ENV} or kws01:PATH at "
            "the folder of tst_NNNNNN_<Word>_<label>.bin files"
        )
    misnamed = [p.name for p in files if not _FILE_NAME.match(p.name)]
    if misnamed:
        raise DataError(
            f"kws01 files {_named(misnamed)} in {folder} are not named "
            "tst_NNNNNN_<Word>_<label>.bin; remove them or restore the EEMBC names"
        )
    wrong_size = [f"{p.name} ({p.stat().st_size} bytes)" for p in files
                  if p.stat().st_size != KWS_SAMPLE_BYTES]
    if wrong_size:
        raise DataError(
            f"kws01 files {_named(wrong_size)} in {folder} are not {KWS_SAMPLE_BYTES} bytes "
            "(49 x 10 int8 MFCC); replace them with intact copies"
        )

    if len(files) < 2:
        raise DataError(
            f"kws01 folder {folder} holds {len(files)} .bin file, but the first half is the train "
            "split and the second half the eval split; point kws01:PATH at a folder of at least 2"
        )

    csv_labels = _read_labels(folder)
    unlabelled = [p.name for p in files if p.name not in csv_labels]
    if unlabelled:
        raise DataError(
            f"kws01 files {_named(unlabelled)} have no line in {folder / LABELS_FILE}; add "
            "'<file name>,12,<label>' lines for them or remove the files"
        )
    # The file name repeats the label and its word; both must agree with the csv, which also
    # proves that KWS_CLASS_NAMES is in the order the labels were written in.
    disagree = []
    for p in files:
        _, word, suffix_label = _FILE_NAME.match(p.name).groups()
        label = csv_labels[p.name]
        if int(suffix_label) != label or word.lower() != KWS_CLASS_NAMES[label]:
            disagree.append(f"{p.name} (csv label {label} = {KWS_CLASS_NAMES[label]})")
    if disagree:
        raise DataError(
            f"kws01 labels in {LABELS_FILE} disagree with the file names of {_named(disagree)}; "
            "restore the original EEMBC label file"
        )

    q = np.stack([np.fromfile(p, dtype=np.int8) for p in files]).reshape(
        (len(files),) + KWS_SAMPLE_SHAPE
    )
    y = np.array([csv_labels[p.name] for p in files], dtype=np.int64)
    model_path = default_kws_int8_model()
    scale, zero_point = read_input_quantization(model_path)
    x = (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)

    n_train = len(files) // 2
    unused = len(csv_labels) - len(files)
    provenance = (
        f"EEMBC MLPerf Tiny KWS set at {folder}: {len(files)} int8 49x10 MFCC files, labels from "
        f"{LABELS_FILE}"
        + (f" ({unused} of its lines name files not in the folder)" if unused else "")
        + f"; sorted by file name, first {n_train} train/calibration "
        f"({files[0].name}..{files[n_train - 1].name}), last {len(files) - n_train} eval; "
        f"dequantized as (int8 - {zero_point}) * {scale!r}, the input quantization of {model_path}"
    )
    return Dataset(
        name="kws01",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_eval=x[n_train:],
        y_eval=y[n_train:],
        class_names=KWS_CLASS_NAMES,
        input_shape=KWS_SAMPLE_SHAPE,
        provenance=provenance,
        x_train_int8=q[:n_train],
        x_eval_int8=q[n_train:],
        input_quantization=(scale, zero_point),
    )
