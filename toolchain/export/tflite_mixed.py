"""``tflite-mixed``: a ``BitPlan`` mapped onto what TFLite (TF 2.14) can store and run.

What TFLite can hold, measured with TF 2.14.1 / tfmot 0.8.0 (see the export tests):

* Weights of Conv2D, DepthwiseConv2D and Dense (FULLY_CONNECTED) are stored as packed INT4
  (TensorType 17, two weights per byte) when the converter sees a 4-bit (or 2-/3-bit) fake-quant
  on the kernel in a quantization-aware (tfmot) graph, and the interpreter runs them. Widths
  5..8 are stored as INT8. Conv2D and DepthwiseConv2D are per-channel; Dense is per-tensor (a
  per-axis fake-quant on a Dense kernel fails in the converter: "'tfl.transpose' op has
  mismatched quantized axes"), as in TFLite's own int8 conversion.
* The graph converted is the one ``toolchain.quantize`` simulates (``simulate.build_qat_model``,
  or the model ``quantize`` fine-tuned, passed as ``qat_model``): one builder, one rounding grid.
  Widths below the storage width keep only their own levels (the simulated quantizers round each
  channel to its ``2**b - 1`` symmetric levels on a grid the stored grid holds); the levels
  actually used are read back from the file and checked.
* int16 activations cannot be mixed per layer with int8 ones: a CONV_2D needs input and output of
  the same type, and QUANTIZE cannot requantize int8 to int16 (the converter accepts a 16-bit
  activation fake-quant, the interpreter then refuses the model). So a plan whose kernel layers
  all ask for 16-bit activations becomes a whole-model int16x8 model; a plan where only some do
  keeps those layers in float (strictly more precise than asked, and recorded as such).
* Float layers inside an integer model need ``tf.lite.experimental.QuantizationDebugger``'s
  ``denylisted_nodes``, which works on post-training quantization only (on a QAT graph it fails
  with "Please check if the quantized model is in debug mode"; a layer left unannotated in the
  QAT graph is still quantized by the converter). Plans with float layers therefore take the
  post-training route, where kernels are stored as INT8 (with their 2**b levels), never INT4.

Routes: ``qat`` (the simulated graph itself, INT4 where the plan has <= 4 bits), ``ptq_denylist``
(float layers) and ``int16x8``; the last two are post-training conversions, which cannot take a
fake-quant graph: they convert the simulated graph's rounded kernels (and trained weights) with
activation ranges calibrated anew, so they match the simulation less closely than ``qat``.
Every layer's outcome is read back from the flatbuffer and compared with the plan; a layer that
did not become what its route promises raises ``ConversionError`` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, ConversionError
from toolchain.export.flatbuffer import describe, read_flatbuffer
from toolchain.layers import KERNEL_ATTRS, KERNEL_LAYERS, kernel_names

#: storage width per requested weight width (TFLite 2.14: INT4 or INT8; above 8 bits: float)
INT4_MAX_BITS = 4
INT8_MAX_BITS = 8


def storage_bits(bits: int) -> int:
    """The width TFLite stores a ``bits``-bit kernel in (32 = float)."""
    return 4 if bits <= INT4_MAX_BITS else 8 if bits <= INT8_MAX_BITS else 32


# --------------------------------------------------------------------------------------------
# Plan -> per-layer request


@dataclass(frozen=True)
class LayerRequest:
    layer: str               # the user's layer name
    layer_class: str
    channel_bits: Tuple[int, ...]
    activation_bits: int
    planned: bool            # False: not in the plan, gets int8 defaults

    @property
    def weight_bits(self) -> int:
        return max(self.channel_bits)

    @property
    def is_float(self) -> bool:
        return self.activation_bits == 32 or self.weight_bits > INT8_MAX_BITS


def _channel_count(layer) -> int:
    facts = KERNEL_LAYERS[type(layer).__name__]
    return facts.num_channels(getattr(layer, facts.kernel_attr).shape)


def layer_requests(model, plan) -> List[LayerRequest]:
    """One request per kernel layer of ``model`` (unplanned layers: 8-bit weights/activations)."""
    plan.check_against(model)
    problems = []
    out = []
    for layer in model.layers:
        cls = type(layer).__name__
        if cls not in KERNEL_ATTRS:
            if layer.name in plan.layers:
                problems.append(f"{layer.name} ({cls}) is not {kernel_names()}")
            continue
        channels = _channel_count(layer)
        lb = plan.layers.get(layer.name)
        if lb is None:
            out.append(LayerRequest(layer.name, cls, (8,) * channels, 8, False))
            continue
        if lb.num_channels is not None and lb.num_channels != channels:
            problems.append(f"{layer.name}: plan has {lb.num_channels} channels, the kernel has {channels}")
            continue
        if lb.group_bits is None:
            bits = (lb.weight_bits,) * channels
        else:
            bits = []
            for b in lb.group_bits:
                bits.extend([b] * lb.group_size)
            if len(bits) < channels:
                problems.append(f"{layer.name}: {len(lb.group_bits)} groups of {lb.group_size} cover "
                                f"{len(bits)} of {channels} channels")
                continue
            bits = tuple(bits[:channels])
        out.append(LayerRequest(layer.name, cls, tuple(int(b) for b in bits), int(lb.activation_bits), True))
    if problems:
        raise ConfigError("bit plan does not fit the model: " + "; ".join(problems) +
                          "; make the plan for this model")
    return out


def choose_route(requests: Sequence[LayerRequest]) -> str:
    if any(r.is_float for r in requests):
        return "ptq_denylist"
    if requests and all(r.activation_bits == 16 for r in requests):
        return "int16x8"
    if any(r.activation_bits == 16 for r in requests):
        return "ptq_denylist"  # int16 islands are not expressible: those layers go float
    return "qat"


def float_layers(requests: Sequence[LayerRequest], route: str) -> List[str]:
    if route != "ptq_denylist":
        return []
    return [r.layer for r in requests if r.is_float or r.activation_bits == 16]


# --------------------------------------------------------------------------------------------
# Names and conversion of the simulated graph (toolchain.quantize.simulate builds it)


def _layer_names(model) -> Dict[str, Tuple[str, str]]:
    """Names that may appear in flatbuffer tensor names -> (user's layer name, Keras class)."""
    names = {}
    for layer in model.layers:
        names[layer.name] = (layer.name, type(layer).__name__)
        names["quant_" + layer.name] = (layer.name, type(layer).__name__)
    return names


# --------------------------------------------------------------------------------------------
# Conversion


def _convert_qat(qat, io):
    """The simulated graph itself through the converter (INT4 where a fake-quant has <= 4 bits)."""
    from toolchain.export.convert_worker import ConvertJob, convert_in_child

    io_type = None if io == "float" else "int8"
    return convert_in_child(qat, ConvertJob("tflite-mixed (route qat)", optimizations=("DEFAULT",),
                                            inference_input_type=io_type, inference_output_type=io_type,
                                            custom_objects="toolchain.quantize.simulate:CUSTOM_OBJECTS"))


def _convert_denylist(rounded, floats, names, calib_x, io):
    from dataclasses import replace

    from toolchain.export.convert_worker import ConvertJob, convert_in_child

    if io == "int8":
        raise ConversionError(
            "tflite-mixed with float layers (" + ", ".join(sorted(floats)) + ") has float I/O: "
            "QuantizationDebugger's quantizer keeps the model input and output in float; "
            "pass io='float' or leave io unset")
    job = ConvertJob("tflite-mixed (route ptq_denylist)", optimizations=("DEFAULT",), representative=True,
                     debugger="calibrated", debug_samples=8)
    info = read_flatbuffer(convert_in_child(rounded, job, calib_x))
    from toolchain.export.flatbuffer import match_layers

    matched = match_layers(info, names)
    nodes, missing = [], set(floats)
    for op_index, layer in matched.items():
        if layer in floats:
            nodes.append(info.tensors[info.ops[op_index].outputs[0]].name)
            missing.discard(layer)
    if missing:
        raise ConversionError("cannot find the TFLite ops of layers " + ", ".join(sorted(missing)) +
                              " to keep them in float; rename the layers so their names are unique")
    job = replace(job, debugger="denylisted", denylisted_nodes=tuple(sorted(nodes)))
    return convert_in_child(rounded, job, calib_x), sorted(nodes)


def _convert_int16x8(rounded, calib_x, io):
    from toolchain.export.tflite_backend import convert

    return convert(rounded, "int16x8", calib_x, io)


def expected_storage(r: LayerRequest, route: str, floats) -> Tuple[str, str]:
    """(weight TensorType, activation TensorType) the route promises for a layer."""
    if r.layer in floats:
        return "FLOAT32", "FLOAT32"
    if route == "int16x8":
        return "INT8", "INT16"
    if route == "qat":
        return ("INT4" if r.weight_bits <= INT4_MAX_BITS else "INT8"), "INT8"
    return "INT8", "INT8"


def convert_mixed(model, plan, calib_x, io: Optional[str] = None, qat_model=None):
    """``(tflite bytes, metadata, kernel-name map)`` for ``model`` under ``plan``.

    The artifact is converted from the simulated graph (``simulated_graph``): on the ``qat`` route
    that graph itself, so a QAT model's trained weights and ranges reach the file; the
    ``ptq_denylist`` and ``int16x8`` routes are post-training conversions, which cannot take a
    fake-quant graph, and get its rounded kernels (and trained weights) as a float model
    (``strip_quantization``), activation ranges calibrated anew on ``calib_x``.
    Raises ``ConversionError`` naming every layer whose stored type or level count (read back
    from the flatbuffer) differs from what its route promises."""
    from toolchain.export.tflite_backend import check_io
    from toolchain.quantize.simulate import simulated_graph, strip_quantization

    check_io(io)
    if calib_x is None or len(calib_x) == 0:
        raise ConfigError("tflite-mixed needs calibration samples; pass a dataset with a train split")
    requests = layer_requests(model, plan)
    route = choose_route(requests)
    floats = set(float_layers(requests, route))
    qat = simulated_graph(model, plan, calib_x, qat_model)
    names = _layer_names(model)
    denylisted: List[str] = []
    try:
        if route == "qat":
            data = _convert_qat(qat, io)
        else:
            rounded = strip_quantization(qat, model)
            names = _layer_names(rounded)
            if route == "int16x8":
                data = _convert_int16x8(rounded, calib_x, io)
            else:
                data, denylisted = _convert_denylist(rounded, floats, names, calib_x, io)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise ConversionError(f"TFLite converter failed for tflite-mixed (route {route}): "
                              f"{msg[-1] if msg else type(e).__name__}; run with --debug for the trace") from e

    meta = describe(read_flatbuffer(data), names, channel_levels=True)
    problems = []
    for r in requests:
        got = meta["layers"].get(r.layer)
        want_w, want_a = expected_storage(r, route, floats)
        if got is None:
            problems.append(f"{r.layer}: no kernel op found in the flatbuffer")
            continue
        got["requested"] = {"weight_bits": r.weight_bits, "activation_bits": r.activation_bits,
                            "channel_bits": _compress(r.channel_bits), "planned": r.planned}
        got["expected"] = {"weight_type": want_w, "activation_type": want_a}
        if got["weight_type"] != want_w or got["input_type"] != want_a:
            problems.append(f"{r.layer}: became {got['weight_type']} weights / {got['input_type']} "
                            f"activations, expected {want_w} / {want_a}")
        levels = got.get("levels_per_channel")
        if levels is not None and want_w in ("INT4", "INT8"):
            over = [c for c, (n, b) in enumerate(zip(levels, r.channel_bits)) if n > 2 ** b - 1]
            if over:
                problems.append(f"{r.layer}: channels {over[:5]} store more than 2**b - 1 levels")
            got["levels_ok"] = not over
        if r.layer in floats and r.activation_bits == 16:
            got["note"] = ("asked for int16 activations; kept in float (int16 islands inside an int8 "
                           "model are not expressible in TFLite)")
        elif route == "ptq_denylist" and r.weight_bits <= INT4_MAX_BITS and r.layer not in floats:
            got["note"] = (f"{r.weight_bits}-bit weights stored as INT8 with 2**{r.weight_bits}-1 levels: "
                           "INT4 storage needs the QAT route, which cannot keep layers in float")
        elif r.weight_bits < storage_bits(r.weight_bits) and r.layer not in floats:
            got["note"] = f"{r.weight_bits}-bit weights stored as {want_w} with at most {2 ** r.weight_bits - 1} levels"
    if problems:
        raise ConversionError("tflite-mixed did not honour the bit plan: " + "; ".join(problems) +
                              "; change the plan for these layers or report the TFLite version")
    meta.update({"variant": "mixed", "route": route, "float_layers": sorted(floats),
                 "denylisted_nodes": denylisted, "calibration_samples": int(len(calib_x)),
                 "io_requested": io, "plan_allocator": plan.allocator, "plan_budget": plan.budget,
                 "simulated_graph": "given (quantize stage)" if qat_model is not None else "built from the plan"})
    return data, meta, names


def export_tflite_mixed(model, plan, out_path, calib_x, io: Optional[str] = None, qat_model=None):
    """``convert_mixed`` written to ``out_path`` as a ``tflite-mixed`` Artifact."""
    from toolchain.export.tflite_backend import write_tflite

    data, meta, names = convert_mixed(model, plan, calib_x, io, qat_model)
    return write_tflite(data, out_path, "tflite-mixed", meta, names)


def _compress(bits: Sequence[int]) -> list:
    """Run-length form of per-channel widths: [[bits, count], ...]."""
    out: list = []
    for b in bits:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([int(b), 1])
    return out
