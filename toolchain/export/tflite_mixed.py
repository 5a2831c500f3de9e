"""``tflite-mixed``: a ``BitPlan`` mapped onto what TFLite (TF 2.14) can store and run.

What TFLite can hold, measured with TF 2.14.1 / tfmot 0.8.0 (see the export tests):

* Weights of Conv2D, DepthwiseConv2D and Dense (FULLY_CONNECTED) are stored as packed INT4
  (TensorType 17, two weights per byte) when the converter sees a 4-bit (or 2-/3-bit) fake-quant
  on the kernel in a quantization-aware (tfmot) graph, and the interpreter runs them. Widths
  5..8 are stored as INT8. Conv2D and DepthwiseConv2D are per-channel; Dense is per-tensor (a
  per-axis fake-quant on a Dense kernel fails in the converter: "'tfl.transpose' op has
  mismatched quantized axes"), as in TFLite's own int8 conversion.
* Widths below the storage width keep only their own levels: every output channel is rounded
  to its ``2**b - 1`` symmetric levels on a grid aligned with the stored grid (the fake-quant
  range is widened to ``step * (2**(B-1) - 1)``), so the stored codes are exactly those levels;
  the levels actually used are read back from the file and checked.
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

Routes: ``qat`` (INT4 where the plan has <= 4 bits), ``ptq_denylist`` (float layers), ``int16x8``.
Every layer's outcome is read back from the flatbuffer and compared with the plan; a layer that
did not become what its route promises raises ``ConversionError`` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, ConversionError
from toolchain.export.flatbuffer import describe, read_flatbuffer
from toolchain.layers import KERNEL_ATTRS, KERNEL_LAYERS, kernel_names

#: layer classes whose output gets an activation fake-quant (mirrors tfmot's default registry)
QUANTIZED_OUTPUT = ("ReLU", "Add", "Concatenate", "AveragePooling2D", "GlobalAveragePooling2D",
                    "AveragePooling1D", "GlobalAveragePooling1D")
RELU_NAMES = ("relu", "relu6")
#: storage width per requested weight width (TFLite 2.14: INT4 or INT8; above 8 bits: float)
INT4_MAX_BITS = 4
INT8_MAX_BITS = 8
CALIBRATION_BATCH = 64


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
# Weight grids aligned with the stored grid


def channel_matrix(layer_class: str, kernel: np.ndarray) -> np.ndarray:
    """Kernel as (weights per channel, output channels); depthwise channel c = cin * mult + m."""
    return KERNEL_LAYERS[layer_class].channel_matrix(kernel)


def aligned_grid(matrix: np.ndarray, bits: Sequence[int], store_bits: int, per_channel: bool):
    """Round each output channel of ``matrix`` (rows, C) to its ``2**b - 1`` symmetric levels on
    a grid that the ``store_bits``-bit stored grid holds exactly.

    Returns ``(rounded, lo, hi)``: the rounded float64 matrix and the fake-quant range (one per
    channel when ``per_channel``, else one) whose narrow-range ``store_bits`` grid contains every
    rounded value. Rounding is ``floor(x + 1/2)`` as TensorFlow's FakeQuant does; zeros stay zero.
    """
    m = np.asarray(matrix, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.int64)
    top = 2.0 ** (bits - 1) - 1                       # levels per side, per channel
    store_top = 2.0 ** (store_bits - 1) - 1
    amax = np.abs(m).max(axis=0) if m.size else np.zeros(m.shape[1])
    if per_channel:
        step = np.where(amax > 0, amax / top, 1.0)
        codes = np.clip(np.floor(m / step + 0.5), -top, top)
        hi = step * store_top
        return codes * step, -hi, hi
    amax_t = float(amax.max()) if amax.size and amax.max() > 0 else 1.0
    step_t = amax_t / float(top.max())
    mult = np.maximum(1.0, np.ceil(amax / (top * step_t) - 1e-9))
    reach = np.minimum(top, np.floor(store_top / mult))
    codes = np.clip(np.floor(m / (mult * step_t) + 0.5), -reach, reach)
    hi = np.array([step_t * store_top])
    return codes * mult * step_t, -hi, hi


# --------------------------------------------------------------------------------------------
# tfmot graph with fixed-range weight fake-quants and min/max-calibrated activations


def _tfmot_classes():
    """Quantizer / config classes, defined lazily so importing this module stays cheap."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from toolchain.quantize.simulate import OutputOnlyQuantizeConfig

    qk = tfmot.quantization.keras

    class FixedRangeWeightQuantizer(qk.quantizers.Quantizer):
        """Symmetric narrow-range fake-quant with a fixed range per output channel (or one).

        Depthwise kernels (kh, kw, cin, mult) are fake-quantized as (kh, kw, cin * mult) so the
        range is per output channel, not per depth multiplier."""

        def __init__(self, num_bits, per_axis, lo, hi, depthwise=False):
            self.num_bits, self.per_axis, self.depthwise = int(num_bits), bool(per_axis), bool(depthwise)
            self.lo, self.hi = [float(v) for v in lo], [float(v) for v in hi]

        def build(self, tensor_shape, name, layer):
            shape = (len(self.lo),) if self.per_axis else ()
            lo = self.lo if self.per_axis else self.lo[0]
            hi = self.hi if self.per_axis else self.hi[0]
            return {
                "min_var": layer.add_weight(name + "_min", shape=shape, trainable=False,
                                            initializer=tf.keras.initializers.Constant(lo)),
                "max_var": layer.add_weight(name + "_max", shape=shape, trainable=False,
                                            initializer=tf.keras.initializers.Constant(hi)),
            }

        def __call__(self, inputs, training, weights, **kwargs):
            if not self.per_axis:
                return tf.quantization.fake_quant_with_min_max_vars(
                    inputs, weights["min_var"], weights["max_var"], num_bits=self.num_bits, narrow_range=True)
            x = inputs
            if self.depthwise:
                kh, kw, cin, mult = inputs.shape
                x = tf.reshape(inputs, [kh, kw, cin * mult])
            y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                x, weights["min_var"], weights["max_var"], num_bits=self.num_bits, narrow_range=True)
            return tf.reshape(y, inputs.shape) if self.depthwise else y

        def get_config(self):
            return {"num_bits": self.num_bits, "per_axis": self.per_axis, "lo": self.lo, "hi": self.hi,
                    "depthwise": self.depthwise}

        def __eq__(self, other):
            return isinstance(other, FixedRangeWeightQuantizer) and self.get_config() == other.get_config()

        def __ne__(self, other):
            return not self.__eq__(other)

    def activation_quantizer():
        # min/max over every calibration batch, as TFLite's own calibrator does
        return qk.quantizers.AllValuesQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)

    class KernelQuantizeConfig(qk.QuantizeConfig):
        def __init__(self, attr, weight, quantize_activation):
            self.attr, self.weight, self.quantize_activation = attr, dict(weight), bool(quantize_activation)

        def get_weights_and_quantizers(self, layer):
            return [(getattr(layer, self.attr), FixedRangeWeightQuantizer(**self.weight))]

        def get_activations_and_quantizers(self, layer):
            return [(layer.activation, activation_quantizer())] if self.quantize_activation else []

        def set_quantize_weights(self, layer, quantize_weights):
            setattr(layer, self.attr, quantize_weights[0])

        def set_quantize_activations(self, layer, quantize_activations):
            if quantize_activations:
                layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {"attr": self.attr, "weight": self.weight, "quantize_activation": self.quantize_activation}

    class OutputQuantizeConfig(OutputOnlyQuantizeConfig):
        def __init__(self, quantize_output):
            self.quantize_output = bool(quantize_output)

        def get_output_quantizers(self, layer):
            return [activation_quantizer()] if self.quantize_output else []

        def get_config(self):
            return {"quantize_output": self.quantize_output}

    class InputOnlyLayout(qk.QuantizeLayoutTransform):
        """Only quantize the model input. The default 8-bit layout would replace the config of a
        kernel layer followed by a ReLU layer with a no-op config, dropping its weight quantizer."""

        def apply(self, model, layer_quantize_map):
            transforms = [qk.default_8bit.default_8bit_transforms.InputLayerQuantize()]
            return qk.graph_transformations.model_transformer.ModelTransformer(
                model, transforms, set(layer_quantize_map.keys()), layer_quantize_map).transform()

    class MixedScheme(qk.QuantizeScheme):
        def get_layout_transformer(self):
            return InputOnlyLayout()

        def get_quantize_registry(self):
            return qk.default_8bit.Default8BitQuantizeRegistry()

    scope = {"FixedRangeWeightQuantizer": FixedRangeWeightQuantizer,
             "KernelQuantizeConfig": KernelQuantizeConfig,
             "OutputQuantizeConfig": OutputQuantizeConfig}
    return qk, scope, KernelQuantizeConfig, OutputQuantizeConfig, MixedScheme


def _consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]


def _is_relu_layer(layer) -> bool:
    cls = type(layer).__name__
    if cls == "ReLU":
        return True
    return cls == "Activation" and getattr(layer.activation, "__name__", "") in RELU_NAMES


def _quantizes_output(layer) -> bool:
    cls = type(layer).__name__
    if cls in QUANTIZED_OUTPUT:
        return True
    return cls == "Activation" and getattr(layer.activation, "__name__", "") in RELU_NAMES


def build_qat_model(canonical, grids: Mapping[str, dict]):
    """The canonical model with fixed-range weight fake-quants (``grids``: canonical layer name ->
    FixedRangeWeightQuantizer config) and AllValues activation fake-quants, not yet calibrated."""
    import tensorflow as tf

    qk, scope, KernelCfg, OutputCfg, Scheme = _tfmot_classes()
    output_layers = {t.node.layer.name for t in canonical.outputs}

    def annotate(layer):
        cls = type(layer).__name__
        if cls == "InputLayer":
            return layer.__class__.from_config(layer.get_config())
        clone = layer.__class__.from_config(layer.get_config())
        if cls in KERNEL_ATTRS:
            cons = _consumers(layer)
            fused_relu = (getattr(layer.activation, "__name__", "") == "linear" and len(cons) == 1
                          and _is_relu_layer(cons[0]) and layer.name not in output_layers)
            cfg = KernelCfg(KERNEL_ATTRS[cls], grids[layer.name], quantize_activation=not fused_relu)
        else:
            cfg = OutputCfg(_quantizes_output(layer))
        return qk.quantize_annotate_layer(clone, cfg)

    annotated = tf.keras.models.clone_model(canonical, clone_function=annotate)
    annotated.set_weights(canonical.get_weights())
    with qk.quantize_scope(scope):
        qat = qk.quantize_apply(annotated, scheme=Scheme())
    # tfmot names the input QuantizeLayer from a process-wide counter (quantize_layer_1, _2, ...)
    # and the name ends up in the flatbuffer's tensor names: fix it so the bytes are reproducible.
    k = 0
    for layer in qat.layers:
        if type(layer).__name__ == "QuantizeLayer":
            layer._name = "quantize_layer" if k == 0 else f"quantize_layer_{k}"
            k += 1
    return qat


def calibrate(qat_model, calib_x: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
    """Run the calibration samples through in training mode: the AllValues quantizers record the
    min/max of every activation (weights use fixed ranges; BN is folded, Dropout dropped)."""
    x = np.asarray(calib_x, dtype=np.float32)
    for start in range(0, len(x), batch):
        qat_model(x[start:start + batch], training=True)


# --------------------------------------------------------------------------------------------
# Conversion


def _prepare(model, plan):
    from toolchain.canonicalize import canonicalize

    requests = layer_requests(model, plan)
    route = choose_route(requests)
    floats = set(float_layers(requests, route))
    cm = canonicalize(model)
    to_canonical = {orig: canon for canon, orig in cm.layer_map.items()}
    grids: Dict[str, dict] = {}
    for r in requests:
        if r.layer in floats:
            continue
        layer = cm.model.get_layer(to_canonical[r.layer])
        attr = KERNEL_ATTRS[r.layer_class]
        weights = layer.get_weights()
        kernel = getattr(layer, attr).numpy()
        idx = next(i for i, w in enumerate(layer.weights) if w is getattr(layer, attr))
        per_channel = not KERNEL_LAYERS[r.layer_class].per_tensor
        store = storage_bits(r.weight_bits) if route == "qat" else 8
        rounded, lo, hi = aligned_grid(channel_matrix(r.layer_class, kernel), r.channel_bits, store, per_channel)
        weights[idx] = rounded.reshape(kernel.shape).astype(np.float32)
        layer.set_weights(weights)
        grids[layer.name] = {"num_bits": store, "per_axis": per_channel, "lo": lo.tolist(), "hi": hi.tolist(),
                             "depthwise": KERNEL_LAYERS[r.layer_class].depthwise}
    names = {}
    for canon, orig in cm.layer_map.items():
        cls = type(cm.model.get_layer(canon)).__name__
        names[canon] = (orig, cls)
        names["quant_" + canon] = (orig, cls)
    return requests, route, floats, cm, grids, names


def _convert_qat(cm, grids, calib_x, io):
    from toolchain.export.convert_worker import ConvertJob, convert_in_child

    qat = build_qat_model(cm.model, grids)
    calibrate(qat, calib_x)
    io_type = None if io == "float" else "int8"
    job = ConvertJob("tflite-mixed (route qat)", optimizations=("DEFAULT",), inference_input_type=io_type,
                     inference_output_type=io_type, custom_objects=f"{__name__}:quantize_scope_objects")
    return convert_in_child(qat, job), qat


def quantize_scope_objects() -> dict:
    """The custom classes a saved QAT graph needs to load (the converter's child process)."""
    return _tfmot_classes()[1]


def _convert_denylist(cm, floats, names, calib_x, io):
    from dataclasses import replace

    from toolchain.export.convert_worker import ConvertJob, convert_in_child

    if io == "int8":
        raise ConversionError(
            "tflite-mixed with float layers (" + ", ".join(sorted(floats)) + ") has float I/O: "
            "QuantizationDebugger's quantizer keeps the model input and output in float; "
            "pass io='float' or leave io unset")
    job = ConvertJob("tflite-mixed (route ptq_denylist)", optimizations=("DEFAULT",), representative=True,
                     debugger="calibrated", debug_samples=8)
    info = read_flatbuffer(convert_in_child(cm.model, job, calib_x))
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
    return convert_in_child(cm.model, job, calib_x), sorted(nodes)


def _convert_int16x8(cm, calib_x, io):
    from toolchain.export.tflite_backend import convert

    return convert(cm.model, "int16x8", calib_x, io)


def expected_storage(r: LayerRequest, route: str, floats) -> Tuple[str, str]:
    """(weight TensorType, activation TensorType) the route promises for a layer."""
    if r.layer in floats:
        return "FLOAT32", "FLOAT32"
    if route == "int16x8":
        return "INT8", "INT16"
    if route == "qat":
        return ("INT4" if r.weight_bits <= INT4_MAX_BITS else "INT8"), "INT8"
    return "INT8", "INT8"


def convert_mixed(model, plan, calib_x, io: Optional[str] = None):
    """``(tflite bytes, metadata, kernel-name map)`` for ``model`` under ``plan``.

    Raises ``ConversionError`` naming every layer whose stored type or level count (read back
    from the flatbuffer) differs from what its route promises."""
    from toolchain.export.tflite_backend import check_io

    check_io(io)
    if calib_x is None or len(calib_x) == 0:
        raise ConfigError("tflite-mixed needs calibration samples; pass a dataset with a train split")
    requests, route, floats, cm, grids, names = _prepare(model, plan)
    denylisted: List[str] = []
    try:
        if route == "qat":
            data, _ = _convert_qat(cm, grids, calib_x, io)
        elif route == "int16x8":
            data = _convert_int16x8(cm, calib_x, io)
        else:
            data, denylisted = _convert_denylist(cm, floats, names, calib_x, io)
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
                 "io_requested": io, "plan_allocator": plan.allocator, "plan_budget": plan.budget})
    return data, meta, names


def _compress(bits: Sequence[int]) -> list:
    """Run-length form of per-channel widths: [[bits, count], ...]."""
    out: list = []
    for b in bits:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([int(b), 1])
    return out
