"""TFLite backend: every ``tflite-*`` format, written atomically, described from the written bytes.

Variants (``tf.lite.TFLiteConverter``):

==========  ==================================================================================
fp32        no optimization
fp16        float16 weights (``supported_types=[tf.float16]``)
dynamic     dynamic-range: int8 weights, float activations computed on the fly
int8        full integer, representative dataset from real calibration samples; int8 I/O by
            default, float I/O on request
int16x8     int16 activations, int8 weights (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_
            WEIGHTS_INT8``)
sparse      full integer int8 plus ``Optimize.EXPERIMENTAL_SPARSITY``: kernels of unstructured-
            pruned models stored sparse (DENSIFY ops in front of the kernels)
mixed       per-layer widths from a ``BitPlan`` (see :mod:`toolchain.export.tflite_mixed`)
==========  ==================================================================================

Conversion is deterministic (same model and samples give the same bytes; tested). It runs in a
child process (:mod:`toolchain.export.convert_worker`): a converter that crashes natively on an odd
graph is a ``ConversionError`` naming the format and the signal, not a silent exit.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from toolchain.errors import ConfigError
from toolchain.export.artifact import Artifact, make_artifact, write_bytes_atomic
from toolchain.export.convert_worker import ConvertJob, convert_in_child
from toolchain.export.flatbuffer import LAYER_OPS, describe, read_flatbuffer

VARIANTS = ("fp32", "fp16", "dynamic", "int8", "int16x8", "sparse", "mixed")
#: variants that need calibration samples
CALIBRATED = ("int8", "int16x8", "sparse", "mixed")
#: I/O choices: None = the format's natural I/O (integer where the format allows it)
IO_CHOICES = (None, "int8", "float")


def check_io(io: Optional[str]) -> None:
    if io not in IO_CHOICES:
        raise ConfigError(f"io {io!r} is not one of int8, float (or None for the format's default); "
                          "pass io='int8' or io='float'")


def converter_job(variant: str, calib_x: Optional[np.ndarray] = None, io: Optional[str] = None) -> ConvertJob:
    """The converter settings of ``variant`` (all but ``mixed``), as a :class:`ConvertJob`."""
    check_io(io)
    if variant not in VARIANTS or variant == "mixed":
        raise ConfigError(f"TFLite variant {variant!r} is not one of {', '.join(v for v in VARIANTS if v != 'mixed')}")
    if variant in CALIBRATED and (calib_x is None or len(calib_x) == 0):
        raise ConfigError(f"tflite-{variant} needs calibration samples; pass a dataset with a train split")
    name = f"tflite-{variant}"
    if variant == "fp32":
        return ConvertJob(name)
    if variant == "fp16":
        return ConvertJob(name, optimizations=("DEFAULT",), supported_types=("float16",))
    if variant == "dynamic":
        return ConvertJob(name, optimizations=("DEFAULT",))
    if variant in ("int8", "sparse"):
        io_type = None if io == "float" else "int8"
        return ConvertJob(name, optimizations=("DEFAULT", "EXPERIMENTAL_SPARSITY") if variant == "sparse" else ("DEFAULT",),
                          supported_ops=("TFLITE_BUILTINS_INT8",), representative=True,
                          inference_input_type=io_type, inference_output_type=io_type)
    if io == "int8":  # int16x8
        raise ConfigError("tflite-int16x8 has int16 I/O or float I/O, not int8; pass io='float' or leave it unset")
    io_type = "int16" if io is None else None
    return ConvertJob(name, optimizations=("DEFAULT",), representative=True,
                      supported_ops=("EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",),
                      inference_input_type=io_type, inference_output_type=io_type)


def convert(model, variant: str, calib_x: Optional[np.ndarray] = None, io: Optional[str] = None) -> bytes:
    """``.tflite`` bytes of ``model`` in ``variant`` (all but ``mixed``), converted in a child process
    (:func:`~toolchain.export.convert_worker.convert_in_child`)."""
    job = converter_job(variant, calib_x, io)
    return convert_in_child(model, job, calib_x if job.representative else None)


def kernel_layer_names(model) -> dict:
    """Names a kernel layer may carry inside tensor names -> (the user's layer name, class)."""
    names = {}
    for layer in model.layers:
        cls = type(layer).__name__
        if cls in LAYER_OPS:
            names[layer.name] = (layer.name, cls)
            names["quant_" + layer.name] = (layer.name, cls)
    return names


def write_tflite(data: bytes, out_path, fmt: str, metadata: Mapping | None = None,
                 kernel_layers: Mapping[str, tuple] | None = None) -> Artifact:
    """Write ``data`` atomically and return its :class:`Artifact` with metadata read back."""
    info = read_flatbuffer(data)
    meta = describe(info, kernel_layers or {})
    meta.update(dict(metadata or {}))
    meta["runtime"] = "tflite"
    path = write_bytes_atomic(out_path, data)
    return make_artifact(fmt, path, meta)


def export_tflite(model, variant: str, out_path, calib_x: Optional[np.ndarray] = None,
                  io: Optional[str] = None, plan=None) -> Artifact:
    """Convert ``model`` to ``tflite-<variant>`` at ``out_path``.

    ``calib_x``: real calibration samples (float32, NHWC) for the calibrated variants.
    ``plan``: the :class:`~toolchain.quantize.bitplan.BitPlan` for ``mixed``.
    """
    fmt = f"tflite-{variant}"
    if variant == "mixed":
        from toolchain.export.tflite_mixed import convert_mixed

        if plan is None:
            raise ConfigError("tflite-mixed needs a bit plan; pass bitplan= (CLI: --bitplan bitplan.json)")
        data, meta, names = convert_mixed(model, plan, calib_x, io)
        return write_tflite(data, out_path, fmt, meta, names)
    data = convert(model, variant, calib_x, io)
    meta = {"variant": variant, "calibration_samples": int(len(calib_x)) if variant in CALIBRATED else 0,
            "io_requested": io}
    return write_tflite(data, out_path, fmt, meta, kernel_layer_names(model))


# --------------------------------------------------------------------------------------------
# Runtime


def run_tflite(path_or_bytes, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Float outputs of a ``.tflite`` (file or bytes) on float inputs ``x`` (integer I/O handled):
    :func:`toolchain.run.run_artifact`."""
    from toolchain.run import run_artifact

    return run_artifact(path_or_bytes, x, batch_size)
