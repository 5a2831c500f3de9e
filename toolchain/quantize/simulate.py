"""Simulate a ``BitPlan`` in Keras with tensorflow-model-optimization (tfmot 0.8.0).

``build_qat_model(model, plan, x_calibration)`` returns the quantize-applied Keras model the export
stage converts to TFLite: BatchNormalization folded, every layer annotated, each planned kernel
fake-quantised at its planned width, activations at their planned width, ranges calibrated.

Choices, and why:

* **BatchNormalization is folded first** (``toolchain.canonicalize``; the canonical "c_" names are
  mapped back to the user's names). The plan's widths then apply to the folded kernel, which is
  the kernel TFLite stores, and the relevance of a folded layer lines up with it one to one.
  tfmot's own BN handling quantises the unfolded kernel and refolds at conversion.
* **Per-layer widths on Conv2D / Dense** use tfmot's ``LastValueQuantizer(num_bits=b,
  per_axis=True, symmetric=True, narrow_range=True)``, which the TFLite converter turns into
  per-channel int8 / int4 weights. Dense is quantised per tensor (``per_axis=False``, as tfmot's
  default does): TF 2.14's converter rejects a per-channel FakeQuant on a Dense kernel.
* **Per-group widths, DepthwiseConv2D and pruned (all-zero) channels** use
  ``ChannelBitsQuantizer``: channel c is fake-quantised with its own ``2**(b_c-1) - 1`` levels
  (straight-through gradient), then passed through one per-channel ``FakeQuant`` at the layer's
  widest width B whose per-channel range is chosen so that the b_c-bit grid lies exactly on the
  B-bit grid (scale s_c / floor(L_B / L_c)). The FakeQuant is the identity on those values but
  tells the converter the kernel is B-bit per-channel; the stored integers use only 2**b_c
  levels. DepthwiseConv2D needs it because tfmot's per-axis quantizer reduces over the depth
  multiplier axis (size 1), i.e. quantises a depthwise kernel per tensor; a zero channel needs it
  because FakeQuant with min = max = 0 is undefined.
* **Activations**: tfmot's default placement (``MovingAverageQuantizer``, 8-bit asymmetric),
  with the planned width where the plan says 16 (32 = left in float).
* **tfmot 0.8.0 drops custom weight quantizers** of a Conv2D / DepthwiseConv2D / Dense directly
  followed by a ReLU: its ``LayerReLUQuantize`` / ``LayerReluActivationQuantize`` layout transforms
  replace the layer's QuantizeConfig with a no-op (``quantize_model`` on a Conv -> ReLU model
  leaves the conv weights in float). ``_PlanLayoutTransform`` restores the planned weight
  quantizer there, keeping the output un-quantised as the transform intends.
* **Ranges are calibrated explicitly** (``calibrate``): weight ranges from the kernels, activation
  ranges as min / max of the float model's activations on the calibration samples (as TFLite's
  post-training calibrator does). A freshly quantize-applied model still holds tfmot's initial
  [-6, 6] ranges, and the moving average (decay 0.999) would take thousands of steps to move.
* **The graph computes what the artifacts store** (measured layer by layer on the MLPerf Tiny
  DS-CNN against TFLite and ONNX Runtime): an average pool's output gets its input's range
  (``tie_same_scale_ranges``: TFLite's AVERAGE_POOL_2D writes on its input's grid), and each bias
  is rounded to the int32 grid the files store it on (``snap_biases``), after calibration and QAT.
  The export backends that calibrate on their own take the simulated grids (``activation_grids``).
  Not emulated: TFLite's fixed-point requantization rounds twice, which with INT4 kernels puts a
  few percent of a layer's outputs one step higher (benchmarks/results/quantization_fidelity.md).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_configs,
    default_8bit_quantize_layout_transform,
    default_8bit_quantize_scheme,
)

from toolchain.errors import ConfigError, UnsupportedLayerError
from toolchain.quantize.bitplan import BitPlan, LayerBits
from toolchain.layers import KERNEL_LAYERS
from toolchain.quantize.kernels import FLOAT_BITS, KERNEL_ATTRS

Q = tfmot.quantization.keras
MAX_FAKE_QUANT_BITS = 16  # tf.quantization.fake_quant_* accepts 2..16
#: activation functions quantised after they are applied (tfmot's QuantizeAwareActivation)
_RELU_LIKE = ("relu", "relu6")


def _levels(bits) -> np.ndarray:
    return 2.0 ** (np.asarray(bits, dtype=np.float64) - 1) - 1


class ChannelBitsQuantizer(Q.quantizers.Quantizer):
    """Symmetric fake quantisation with one width per output channel, ``channel_bits[c]``.

    Channels are the kernel's last axis; a DepthwiseConv2D kernel (kh, kw, cin, mult) is viewed as
    (1, kh, kw, cin*mult), Keras' output-channel order and TFLite's filter layout. Channel c's step is ``max|w_c| / L_c``,
    ``L_c = 2**(b_c-1) - 1`` (``per_tensor``: all channels share max|W|, see
    ``toolchain.quantize.kernels.channel_scales``); ``q = clip(floor(w / step + 1/2), -L_c, L_c) *
    step``; gradients pass straight through. In training the range is the last value of max|w|
    (as ``LastValueQuantizer``); in inference the stored range is used. A channel at 32 bits stays
    float, and then the layer carries no FakeQuant (the converter keeps it in float). See the
    module docstring for the final FakeQuant that makes the kernel convertible.
    """

    def __init__(self, channel_bits: Sequence[int], per_tensor: bool = False, depthwise: bool = False):
        self.channel_bits = [int(b) for b in channel_bits]
        self.per_tensor = bool(per_tensor)
        self.depthwise = bool(depthwise)
        bad = [b for b in set(self.channel_bits) if not (2 <= b <= MAX_FAKE_QUANT_BITS or b == FLOAT_BITS)]
        if not self.channel_bits or bad:
            raise ConfigError(f"channel widths {sorted(bad)} cannot be simulated; use 2..16 bits or 32 (float)")
        bits = np.asarray(self.channel_bits)
        self._float = bits >= FLOAT_BITS
        quant_bits = np.where(self._float, 8, bits)
        self._outer_bits = int(bits[~self._float].max()) if (~self._float).any() else FLOAT_BITS
        self._levels = _levels(quant_bits)                              # L_c
        outer = _levels(min(self._outer_bits, MAX_FAKE_QUANT_BITS))       # L_B
        self._ratio = np.floor(outer / self._levels)                    # r_c: B-bit steps per channel step
        # stored range / max|w|: the B-bit grid (step range / L_B) must hold every channel's grid
        if self.per_tensor:
            self._gain = np.float64(outer / (self._levels * self._ratio)[~self._float].min()) \
                if (~self._float).any() else np.float64(1.0)
        else:
            self._gain = outer / (self._levels * self._ratio)
        self._outer_levels = outer

    @property
    def num_channels(self) -> int:
        return len(self.channel_bits)

    def build(self, tensor_shape, name, layer):
        shape = () if self.per_tensor else (self.num_channels,)
        min_var = layer.add_weight(name + "_min", shape=shape, initializer=tf.keras.initializers.Constant(-6.0),
                                   trainable=False)
        max_var = layer.add_weight(name + "_max", shape=shape, initializer=tf.keras.initializers.Constant(6.0),
                                   trainable=False)
        return {"min_var": min_var, "max_var": max_var}

    def __call__(self, inputs, training, weights, **kwargs):
        x = inputs
        if self.depthwise:
            # (kh, kw, cin, mult) -> (1, kh, kw, cin*mult): TFLite's depthwise filter layout, so the
            # converter reads the per-channel FakeQuant on its quantized dimension 3
            shape = tf.shape(inputs)
            x = tf.reshape(inputs, [1, shape[0], shape[1], self.num_channels])
        axes = list(range(len(x.shape) - 1))
        gain = tf.constant(self._gain, dtype=x.dtype)
        if training:
            amax = tf.reduce_max(tf.abs(x)) if self.per_tensor else tf.reduce_max(tf.abs(x), axis=axes)
            outer_max = amax * gain
            weights["max_var"].assign(outer_max)
            weights["min_var"].assign(-outer_max)
        else:
            outer_max = weights["max_var"]
        step = tf.constant(self._ratio / self._outer_levels, dtype=x.dtype) * outer_max   # r_c * range / L_B
        safe = tf.where(step > 0, step, tf.ones_like(step))
        top = tf.constant(self._levels, dtype=x.dtype)
        q = tf.clip_by_value(tf.floor(x / safe + 0.5), -top, top) * step
        if self._float.any():
            q = tf.where(tf.constant(self._float), x, q)
        y = x + tf.stop_gradient(q - x)  # straight-through estimator
        if not self._float.any():
            bound = tf.maximum(outer_max, 1e-30)  # FakeQuant needs min < max, even for a zero channel
            if self.per_tensor:
                y = tf.quantization.fake_quant_with_min_max_vars(
                    y, -bound, bound, num_bits=self._outer_bits, narrow_range=True)
            else:
                y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    y, -bound, bound, num_bits=self._outer_bits, narrow_range=True)
        return tf.reshape(y, tf.shape(inputs)) if self.depthwise else y

    def get_config(self):
        return {"channel_bits": list(self.channel_bits), "per_tensor": self.per_tensor, "depthwise": self.depthwise}

    def __eq__(self, other):
        return (isinstance(other, ChannelBitsQuantizer) and self.channel_bits == other.channel_bits
                and self.per_tensor == other.per_tensor and self.depthwise == other.depthwise)

    def __ne__(self, other):
        return not self.__eq__(other)


def _activation_quantizer(bits: int):
    return Q.quantizers.MovingAverageQuantizer(num_bits=int(bits), per_axis=False, symmetric=False,
                                               narrow_range=False)


_QUANTIZERS = {"LastValueQuantizer": Q.quantizers.LastValueQuantizer, "ChannelBitsQuantizer": ChannelBitsQuantizer}


class PlanQuantizeConfig(Q.QuantizeConfig):
    """QuantizeConfig of one planned kernel layer: its weight quantizer and activation width."""

    def __init__(self, weight_attr: str, weight_quantizer=None, activation_bits: int = 8,
                 quantize_activation: bool = True):
        self.weight_attr = weight_attr
        if isinstance(weight_quantizer, dict):  # from get_config
            weight_quantizer = _QUANTIZERS[weight_quantizer["class_name"]](**weight_quantizer["config"])
        self.weight_quantizer = weight_quantizer
        self.activation_bits = int(activation_bits)
        self.quantize_activation = bool(quantize_activation)

    def _quantizes_activation(self) -> bool:
        return self.quantize_activation and self.activation_bits < FLOAT_BITS

    def get_weights_and_quantizers(self, layer):
        if self.weight_quantizer is None:
            return []
        return [(getattr(layer, self.weight_attr), self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        if not self._quantizes_activation():
            return []
        return [(layer.activation, _activation_quantizer(self.activation_bits))]

    def set_quantize_weights(self, layer, quantize_weights):
        if self.weight_quantizer is not None:
            setattr(layer, self.weight_attr, quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        if self._quantizes_activation():
            layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def without_activation(self) -> "PlanQuantizeConfig":
        return PlanQuantizeConfig(self.weight_attr, self.weight_quantizer, self.activation_bits, False)

    def get_config(self):
        wq = None
        if self.weight_quantizer is not None:
            wq = {"class_name": type(self.weight_quantizer).__name__, "config": self.weight_quantizer.get_config()}
        return {"weight_attr": self.weight_attr, "weight_quantizer": wq,
                "activation_bits": self.activation_bits, "quantize_activation": self.quantize_activation}


class OutputOnlyQuantizeConfig(Q.QuantizeConfig):
    """A QuantizeConfig that quantizes only the layer's output (a ReLU / Activation after a kernel
    layer); subclasses say with which quantizers (``get_output_quantizers``)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass


class PlanOutputQuantizeConfig(OutputOnlyQuantizeConfig):
    """Output quantisation at a planned width for the ReLU / Activation after a planned kernel."""

    def __init__(self, bits: int = 8):
        self.bits = int(bits)

    def get_output_quantizers(self, layer):
        return [] if self.bits >= FLOAT_BITS else [_activation_quantizer(self.bits)]

    def get_config(self):
        return {"bits": self.bits}


#: what ``quantize_scope`` must know to load a simulated model back
CUSTOM_OBJECTS = {
    "ChannelBitsQuantizer": ChannelBitsQuantizer,
    "PlanQuantizeConfig": PlanQuantizeConfig,
    "PlanOutputQuantizeConfig": PlanOutputQuantizeConfig,
}


def quantize_scope():
    """``tfmot.quantization.keras.quantize_scope`` with this stage's quantizers and configs."""
    return Q.quantize_scope(CUSTOM_OBJECTS)


class _PlanLayoutTransform(default_8bit_quantize_layout_transform.Default8BitQuantizeLayoutTransform):
    """tfmot's default layout transforms, then the planned weight quantizers put back where a
    ReLU transform replaced them with a no-op (see the module docstring)."""

    def apply(self, model, layer_quantize_map):
        planned = {name: entry["quantize_config"] for name, entry in layer_quantize_map.items()
                   if isinstance(entry.get("quantize_config"), PlanQuantizeConfig)}
        model, layer_quantize_map = super().apply(model, layer_quantize_map)
        for name, config in planned.items():
            now = layer_quantize_map.get(name, {}).get("quantize_config")
            if isinstance(now, default_8bit_quantize_configs.NoOpQuantizeConfig):
                layer_quantize_map[name]["quantize_config"] = config.without_activation()
            elif now is None:
                layer_quantize_map.setdefault(name, {})["quantize_config"] = config
        return _named_quantize_layers(model, layer_quantize_map)


def _named_quantize_layers(model, layer_quantize_map):
    """``model`` rebuilt with its input ``QuantizeLayer`` s named ``quantize_layer``,
    ``quantize_layer_1``, ... in graph order (the names the converter child gives them too).

    tfmot names them from Keras' process-wide layer counter, so a second ``quantize`` in one
    process wrote ``quantize_layer_1`` into ``model_qat.h5`` (its config, layer and weight names)
    and identical runs gave different files. The model is rebuilt from its renamed config, not
    renamed in place: renaming a layer of a built Functional model breaks saving it."""
    config = model.get_config()
    quantize_layers = [layer["config"]["name"] for layer in config["layers"] if layer["class_name"] == "QuantizeLayer"]
    taken = {layer["config"]["name"] for layer in config["layers"]} - set(quantize_layers)
    free = (name for k in itertools.count() for name in [f"quantize_layer_{k}" if k else "quantize_layer"]
            if name not in taken)
    renames: Dict[str, str] = dict(zip(quantize_layers, free))
    if all(old == new for old, new in renames.items()):
        return model, layer_quantize_map
    named = type(model).from_config(_renamed_config(config, lambda name: renames.get(name, name)))
    named.set_weights(model.get_weights())
    named.use_legacy_config = getattr(model, "use_legacy_config", False)
    return named, {renames.get(name, name): entry for name, entry in layer_quantize_map.items()}


def _renamed_config(config: dict, rename) -> dict:
    """A Functional or Sequential ``config`` (modified in place and returned) with every layer
    name, and every reference to one, mapped through ``rename``."""
    for layer in config["layers"]:
        if "name" in layer:
            layer["name"] = rename(layer["name"])
        layer["config"]["name"] = rename(layer["config"]["name"])
        for node in layer.get("inbound_nodes", ()):
            for inbound in node:
                inbound[0] = rename(inbound[0])
    for key in ("input_layers", "output_layers"):
        entries = config.get(key)
        if entries and isinstance(entries[0], str):  # a single [name, node, tensor]
            entries[0] = rename(entries[0])
        else:
            for entry in entries or ():
                entry[0] = rename(entry[0])
    return config


#: layers tfmot 0.8's default registry lacks that pass quantized values through unchanged (as its
#: MaxPooling2D entry does): they get no quantizer of their own
_PASS_THROUGH_UNREGISTERED = ("MaxPooling1D",)


class _PlanScheme(default_8bit_quantize_scheme.Default8BitQuantizeScheme):
    def get_layout_transformer(self):
        return _PlanLayoutTransform()


# ------------------------------------------------------------------------------------------
# BatchNormalization folding with the user's layer names


def fold_batchnorm(model) -> tf.keras.Model:
    """An equivalent copy of ``model`` with BatchNormalization folded and Dropout dropped, whose
    layers keep the user's names (``toolchain.canonicalize`` renames them ``c_<name>``)."""
    from toolchain.canonicalize import CANONICAL_PREFIX, canonicalize

    canonical = canonicalize(model, strip_softmax=False).model

    def original(name: str) -> str:
        return name[len(CANONICAL_PREFIX):] if name.startswith(CANONICAL_PREFIX) else name

    config = _renamed_config(canonical.get_config(), original)
    config["name"] = model.name
    folded = tf.keras.Model.from_config(config)
    for layer in folded.layers:
        layer.set_weights(canonical.get_layer(CANONICAL_PREFIX + layer.name).get_weights())
    return folded


# ------------------------------------------------------------------------------------------
# Applying a plan


def weight_quantizer(layer_class: str, lb: LayerBits, kernel: np.ndarray):
    """The tfmot weight quantizer for one planned kernel (None: the kernel stays float)."""
    from toolchain.quantize.kernels import PER_TENSOR_LAYERS, channel_matrix

    matrix = channel_matrix(layer_class, kernel)
    channels = matrix.shape[1]
    widths = lb.channel_bits() if lb.group_bits is not None else (lb.weight_bits,) * channels
    if len(widths) != channels:
        raise ConfigError(f"plan gives {len(widths)} channel widths but the kernel has {channels} output channels; "
                          "regenerate the plan for this model")
    if all(b >= FLOAT_BITS for b in widths):
        return None
    too_wide = sorted({b for b in widths if MAX_FAKE_QUANT_BITS < b < FLOAT_BITS})
    if too_wide:
        raise ConfigError(f"weight widths {too_wide} cannot be simulated (FakeQuant takes 2..16 bits); use <= 16 or 32")
    per_tensor = layer_class in PER_TENSOR_LAYERS
    amax = np.abs(matrix).max() if per_tensor else np.abs(matrix).max(axis=0)
    uniform = len(set(widths)) == 1
    depthwise = KERNEL_LAYERS[layer_class].depthwise
    if uniform and not depthwise and np.all(amax > 0):
        return Q.quantizers.LastValueQuantizer(num_bits=int(widths[0]), per_axis=not per_tensor, symmetric=True,
                                               narrow_range=True)
    return ChannelBitsQuantizer(widths, per_tensor=per_tensor, depthwise=depthwise)


def _consumers(model) -> Dict[str, List]:
    out: Dict[str, List] = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for inbound in tf.nest.flatten(node.inbound_layers):
                out.setdefault(inbound.name, []).append(layer)
    return out


def apply_bitplan(folded: tf.keras.Model, plan: BitPlan) -> tf.keras.Model:
    """``quantize_apply`` of ``plan`` on a BN-folded float model (ranges not yet calibrated)."""
    plan.check_against(folded)
    by_name = {l.name: l for l in folded.layers}
    unplanned = [f"{l.name} ({type(l).__name__})" for l in folded.layers
                 if type(l).__name__ in KERNEL_ATTRS and l.name not in plan.layers]
    if unplanned:
        raise ConfigError(f"bit plan has no widths for kernel layers {', '.join(unplanned)}; "
                          "make the plan for this model (or add them to bitplan.json)")
    configs: Dict[str, Q.QuantizeConfig] = {}
    consumers = _consumers(folded)
    for name, lb in plan.layers.items():
        layer = by_name[name]
        cls = type(layer).__name__
        attr = KERNEL_ATTRS[cls]
        configs[name] = PlanQuantizeConfig(attr, weight_quantizer(cls, lb, getattr(layer, attr).numpy()),
                                           lb.activation_bits)
        users = consumers.get(name, [])
        if lb.activation_bits != 8 and len(users) == 1 and _relu_like(users[0]):
            configs[users[0].name] = PlanOutputQuantizeConfig(lb.activation_bits)

    def annotate(layer):
        fresh = type(layer).from_config(layer.get_config())
        if isinstance(layer, tf.keras.layers.InputLayer):
            return fresh
        config = configs.get(layer.name)
        if config is None and type(layer).__name__ in _PASS_THROUGH_UNREGISTERED:
            config = default_8bit_quantize_configs.NoOpQuantizeConfig()
        return Q.quantize_annotate_layer(fresh, config)

    with quantize_scope():
        annotated = tf.keras.models.clone_model(folded, clone_function=annotate)
        annotated.set_weights(folded.get_weights())
        try:
            return Q.quantize_apply(annotated, scheme=_PlanScheme())
        except (RuntimeError, ValueError) as e:
            raise UnsupportedLayerError(f"tfmot cannot quantise this model ({str(e).splitlines()[0]}); "
                                        "replace the named layer with one tfmot supports") from None


def _relu_like(layer) -> bool:
    if isinstance(layer, tf.keras.layers.ReLU):
        return True
    act = getattr(layer, "activation", None)
    return isinstance(layer, tf.keras.layers.Activation) and getattr(act, "__name__", "") in _RELU_LIKE


# ------------------------------------------------------------------------------------------
# Calibration


def _float_ranges(folded: tf.keras.Model, x: np.ndarray, batch_size: int = 128) -> Dict[str, Tuple[float, float]]:
    """min / max over ``x`` of every layer's output (``name``) and, for kernel layers with a
    squashing activation, of its pre-activation (``name/pre``)."""
    outputs, keys = [], []
    for layer in folded.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        outputs.append(layer.output)
        keys.append(layer.name)
        act = getattr(getattr(layer, "activation", None), "__name__", "linear")
        if type(layer).__name__ in KERNEL_ATTRS and act not in ("linear",) + _RELU_LIKE:
            linear = type(layer).from_config(dict(layer.get_config(), activation="linear", name=layer.name + "_pre"))
            pre = linear(layer.input)
            linear.set_weights(layer.get_weights())
            outputs.append(pre)
            keys.append(layer.name + "/pre")
    observer = tf.keras.Model(folded.inputs, outputs)
    lo = {k: np.inf for k in keys}
    hi = {k: -np.inf for k in keys}
    lo["__input__"], hi["__input__"] = float(np.min(x)), float(np.max(x))
    for start in range(0, len(x), batch_size):
        values = observer(x[start:start + batch_size], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for k, v in zip(keys, values):
            v = v.numpy()
            lo[k] = min(lo[k], float(v.min()))
            hi[k] = max(hi[k], float(v.max()))
    return {k: (min(lo[k], 0.0), max(hi[k], 0.0)) for k in lo}


def calibrate(qmodel: tf.keras.Model, folded: tf.keras.Model, x: np.ndarray) -> Dict[str, Tuple[float, float]]:
    """Set every range variable of ``qmodel``: weight ranges from the kernels (the quantizers'
    own last-value rule), activation ranges from the float model's activations on ``x``."""
    ranges = _float_ranges(folded, np.asarray(x, dtype=np.float32))
    for layer in qmodel.layers:
        if isinstance(layer, Q.QuantizeWrapperV2) or type(layer).__name__ == "QuantizeWrapper":
            for weight, quantizer, qvars in layer._weight_vars:
                quantizer(weight, True, qvars)
            inner = layer.layer.name
            for v in layer.non_trainable_weights:
                short = v.name.split("/")[-1].split(":")[0]
                for kind in ("pre_activation", "post_activation", "output"):
                    if short in (f"{kind}_min", f"{kind}_max"):
                        key = inner + "/pre" if kind == "pre_activation" else inner
                        lo, hi = ranges[key]
                        v.assign(np.full(v.shape, lo if short.endswith("_min") else hi, dtype=np.float32))
        elif type(layer).__name__ == "QuantizeLayer":
            lo, hi = ranges["__input__"]
            for v in layer.non_trainable_weights:
                short = v.name.split("/")[-1].split(":")[0]
                if short.endswith("_min"):
                    v.assign(np.full(v.shape, lo, dtype=np.float32))
                elif short.endswith("_max"):
                    v.assign(np.full(v.shape, hi, dtype=np.float32))
    tie_same_scale_ranges(qmodel)
    snap_biases(qmodel)
    return ranges


#: layers whose TFLite int8 kernel writes its output on its input's grid (AVERAGE_POOL_2D requires
#: equal input and output scales): where the simulated graph gives the output a range of its own,
#: the converter rounds the average to the input's grid and then adds a QUANTIZE op to the output's.
#: Measured on the MLPerf Tiny DS-CNN (4-bit plan): the pooled features on the 0.093 input grid,
#: requantized to the 0.016 output grid, were up to 16 output steps off the simulation's.
SAME_SCALE_LAYERS = ("AveragePooling1D", "AveragePooling2D", "AveragePooling3D")


def _range_vars(layer):
    """``(min, max)`` variables of the quantizer of ``layer``'s output, or None."""
    named = {_short(v.name): v for v in layer.non_trainable_weights}
    if type(layer).__name__ == "QuantizeLayer":
        mins = [v for k, v in named.items() if k.endswith("_min")]
        maxs = [v for k, v in named.items() if k.endswith("_max")]
        return (mins[0], maxs[0]) if len(mins) == 1 and len(maxs) == 1 else None
    for kind in ("output", "post_activation"):
        if f"{kind}_min" in named and f"{kind}_max" in named:
            return named[f"{kind}_min"], named[f"{kind}_max"]
    return None


def _input_range_vars(layer, with_producer: bool = False):
    """Range variables of the quantizer that rounds ``layer``'s input, found through layers that
    pass values through unquantized (Flatten, Reshape, MaxPooling under a no-op config); None if
    the input is not quantized or has several producers."""
    seen = 0
    while seen < 64:
        inbound = [l for node in layer._inbound_nodes for l in tf.nest.flatten(node.inbound_layers)]
        if len(inbound) != 1:
            return None
        layer = inbound[0]
        found = _range_vars(layer)
        if found is not None:
            return (*found, layer) if with_producer else found
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ in KERNEL_ATTRS or isinstance(layer, tf.keras.layers.InputLayer):
            return None  # an unquantized kernel output: nothing to share
        seen += 1
    return None


@dataclass(frozen=True)
class ActivationGrid:
    """The grid one simulated activation quantizer rounds to, as tfmot's FakeQuant nudges it:
    ``value = scale * (q - zero_point)``, ``q`` in ``0 .. 2**bits - 1``."""

    scale: float
    zero_point: int
    bits: int


def _nudged_grid(lo: float, hi: float, bits: int) -> ActivationGrid:
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-lo / scale), 0, qmax))
    return ActivationGrid(float(np.float32(scale)), zero_point, bits)


def _activation_bits(wrapper) -> int:
    config = getattr(wrapper, "quantize_config", None)
    if isinstance(config, PlanQuantizeConfig):
        return config.activation_bits
    if isinstance(config, PlanOutputQuantizeConfig):
        return config.bits
    return 8  # tfmot's default activation quantizers


def activation_grids(qmodel: tf.keras.Model) -> Dict[str, ActivationGrid]:
    """Every activation grid of a simulated model (after QAT, the trained ranges), keyed by what
    it rounds: ``__input__`` (the model input), ``<layer>`` (a layer's output, after its activation
    function), ``<layer>/pre`` (a kernel layer's output before a squashing activation). The
    export backends that calibrate on their own (onnx-mixed) take these instead."""
    out: Dict[str, ActivationGrid] = {}
    for layer in qmodel.layers:
        named = {_short(v.name): v for v in layer.non_trainable_weights}
        if type(layer).__name__ == "QuantizeLayer":
            found = _range_vars(layer)
            if found is not None:
                out["__input__"] = _nudged_grid(float(found[0].numpy()), float(found[1].numpy()), 8)
            continue
        inner = getattr(layer, "layer", None)
        if inner is None:
            continue
        bits = _activation_bits(layer)
        for kind, key in (("output", inner.name), ("post_activation", inner.name),
                          ("pre_activation", inner.name + "/pre")):
            if f"{kind}_min" in named and f"{kind}_max" in named and key not in out:
                lo = float(np.min(named[f"{kind}_min"].numpy()))
                hi = float(np.max(named[f"{kind}_max"].numpy()))
                out[key] = _nudged_grid(min(lo, 0.0), max(hi, 0.0), bits)
    return out


def _input_grid(layer):
    """The ``ActivationGrid`` ``layer``'s input is rounded to (None: not quantized)."""
    found = _input_range_vars(layer, with_producer=True)
    if found is None:
        return None
    lo, hi, producer = found
    bits = 8 if type(producer).__name__ == "QuantizeLayer" else _activation_bits(producer)
    return _nudged_grid(min(float(np.min(lo.numpy())), 0.0), max(float(np.max(hi.numpy())), 0.0), bits)


def snap_biases(qmodel: tf.keras.Model) -> List[str]:
    """Round every quantized kernel layer's bias to the int32 grid the artifacts store it on (input
    step x the channel's weight step), so the simulation adds the bias the runtimes add; the
    names of the layers snapped. Measured on the DS-CNN 4-bit plan: with the float bias, ORT's
    first conv output differed from the simulation's in 0.8% of values by one step. Called after
    calibration and at the end of QAT (the bias the artifact gets)."""
    grids = kernel_grids(qmodel)
    snapped = []
    for name, inner, wrapper in quantized_layers(qmodel):
        bias = getattr(inner, "bias", None)
        if name not in grids or bias is None or not getattr(inner, "use_bias", False):
            continue
        grid = _input_grid(wrapper)
        if grid is None:
            continue
        step = np.asarray(grids[name].step, dtype=np.float64)
        unit = np.float64(grid.scale) * step
        ok = np.isfinite(unit) & (unit > 0)
        b = bias.numpy().astype(np.float64)
        safe = np.where(ok, unit, 1.0)
        bias.assign(np.where(ok, np.round(b / safe) * safe, b).astype(np.float32))
        snapped.append(name)
    return snapped


def tie_same_scale_ranges(qmodel: tf.keras.Model) -> List[str]:
    """Give every ``SAME_SCALE_LAYERS`` layer's output quantizer its input's range, so the
    simulation rounds the pooled values to the grid TFLite's kernel writes them on (see
    ``SAME_SCALE_LAYERS``); the names of the layers tied. Called after calibration and after
    every QAT step (the moving averages move both ranges)."""
    tied = []
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        if inner is None or type(inner).__name__ not in SAME_SCALE_LAYERS:
            continue
        own, source = _range_vars(layer), _input_range_vars(layer)
        if own is None or source is None:
            continue
        own[0].assign(tf.reshape(source[0], own[0].shape))
        own[1].assign(tf.reshape(source[1], own[1].shape))
        tied.append(inner.name)
    return tied


def build_qat_model(model: tf.keras.Model, plan: BitPlan, x_calibration: np.ndarray) -> tf.keras.Model:
    """The quantize-applied, calibrated Keras model of ``plan`` (``model`` is not modified).

    This is what the export stage converts: ``tf.lite.TFLiteConverter.from_keras_model(...)``.
    Plan layer names are the user's names; the model's layers are ``quant_<name>``.
    """
    folded = fold_batchnorm(model)
    qmodel = apply_bitplan(folded, plan)
    calibrate(qmodel, folded, x_calibration)
    return qmodel


def complete_plan(model, plan: BitPlan) -> BitPlan:
    """``plan`` with every kernel layer it leaves out at 8 bits (weights and activations), the
    widths export gives an unplanned layer; ``quantize`` itself insists on a complete plan."""
    from dataclasses import replace

    missing = {l.name: LayerBits(8) for l in model.layers
               if type(l).__name__ in KERNEL_ATTRS and l.name not in plan.layers}
    return replace(plan, layers={**plan.layers, **missing}) if missing else plan


def quantized_layers(qmodel: tf.keras.Model):
    """``(user's layer name, inner Keras layer, wrapper)`` of every quantize wrapper in ``qmodel``."""
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None and hasattr(layer, "_weight_vars"):
            yield inner.name, inner, layer


@dataclass(frozen=True)
class KernelGrid:
    """The rounded kernel of one simulated layer and its grid: what every artifact must store.

    ``kernel`` is in the Keras layout; ``step`` and ``levels`` are per output channel in
    ``channel_matrix`` order (step NaN: a channel kept in float)."""

    layer: str
    layer_class: str
    kernel: np.ndarray
    step: np.ndarray
    levels: np.ndarray
    per_tensor: bool

    def codes(self) -> np.ndarray:
        """Integer codes (rows, channels) of the rounded kernel; float channels give 0."""
        from toolchain.quantize.kernels import channel_matrix

        m = channel_matrix(self.layer_class, self.kernel).astype(np.float64)
        safe = np.where(np.isfinite(self.step) & (self.step > 0), self.step, 1.0)
        return np.where(np.isfinite(self.step), np.round(m / safe), 0.0).astype(np.int64)


#: rounded / step must be an integer to this many steps (float32 kernels, float64 steps)
GRID_CODE_ATOL = 1e-3


def kernel_grids(qmodel: tf.keras.Model) -> Dict[str, KernelGrid]:
    """Every quantised kernel of a simulated model, rounded as the model computes it in inference
    (the stored ranges, i.e. after QAT the trained ones), with its per-channel grid. Raises
    ``ConversionError`` if a kernel does not lie on its grid (a quantizer this stage does not know)."""
    from toolchain.errors import ConversionError
    from toolchain.quantize.kernels import channel_matrix

    out: Dict[str, KernelGrid] = {}
    for name, inner, wrapper in quantized_layers(qmodel):
        cls = type(inner).__name__
        if cls not in KERNEL_ATTRS:
            continue
        for weight, quantizer, qvars in wrapper._weight_vars:
            rounded = quantizer(weight, False, qvars).numpy()
            channels = channel_matrix(cls, rounded).shape[1]
            hi = np.asarray(qvars["max_var"].numpy(), dtype=np.float64)
            if isinstance(quantizer, ChannelBitsQuantizer):
                with np.errstate(invalid="ignore"):  # float channels: NaN step, masked below
                    step = quantizer._ratio / quantizer._outer_levels * np.broadcast_to(hi, (channels,))
                    step = np.where(quantizer._float, np.nan, step)
                top = np.where(quantizer._float, np.nan, quantizer._levels)
                per_tensor = quantizer.per_tensor
            elif isinstance(quantizer, Q.quantizers.LastValueQuantizer):
                lo = np.asarray(qvars["min_var"].numpy(), dtype=np.float64)
                bits = int(quantizer.num_bits)
                step = np.broadcast_to((hi - lo) / (2.0 ** bits - 2), (channels,)).astype(np.float64)
                top = np.full(channels, _levels(bits))
                per_tensor = not quantizer.per_axis
            else:
                raise ConversionError(f"layer {name} has weight quantizer {type(quantizer).__name__}, which the "
                                      "export stage cannot read a grid from; build it with apply_bitplan")
            grid = KernelGrid(name, cls, rounded, step, top, per_tensor)
            m = channel_matrix(cls, rounded).astype(np.float64)
            codes = grid.codes()
            off = np.abs(m - codes * np.where(np.isfinite(step), step, 0.0)[None, :])
            off = np.where(np.isfinite(step)[None, :], off / np.where(step > 0, step, 1.0)[None, :], 0.0)
            over = np.abs(codes) > np.where(np.isfinite(top), top, np.inf)[None, :]
            if off.max(initial=0.0) > GRID_CODE_ATOL or over.any():
                raise ConversionError(f"the simulated kernel of {name} is off its grid by {off.max():.3g} steps; "
                                      "rebuild the simulated model with this toolchain version")
            out[name] = grid
    return out


def strip_quantization(qmodel: tf.keras.Model, model: tf.keras.Model) -> tf.keras.Model:
    """The float Keras model a simulated model computes with its activations left in float: the
    BN-folded ``model`` (user's layer names) holding ``qmodel``'s weights (after QAT, the trained
    ones), every planned kernel replaced by its rounded value. ``model`` is not modified; the
    inverse of ``apply_bitplan`` as ``strip_pruning`` is of ``prune_low_magnitude``."""
    from toolchain.errors import ConfigError as _ConfigError

    folded = fold_batchnorm(model)
    grids = kernel_grids(qmodel)
    wrappers = {name: wrapper for name, _, wrapper in quantized_layers(qmodel)}
    for layer in folded.layers:
        if not layer.weights:
            continue
        wrapper = wrappers.get(layer.name)
        if wrapper is None:
            raise ConfigError(f"the simulated model has no layer {layer.name!r} of the model it is applied to; "
                              "pass the model the simulated model was built from")
        # the inner layer keeps its other variables (bias, ...); a quantized kernel lives in the
        # wrapper's _weight_vars (variable names differ once loaded from .h5: match short names)
        kernel_attr = KERNEL_ATTRS.get(type(layer).__name__)
        trained = {_short(v.name): v for v in wrapper.layer.weights}
        trained.update({kernel_attr: weight for weight, _, _ in wrapper._weight_vars})
        values = []
        for target in layer.weights:
            short = _short(target.name)
            if short not in trained:
                raise ConfigError(f"the simulated layer {layer.name} lacks weight {short!r}; pass the model "
                                  "the simulated model was built from")
            if layer.name in grids and short == kernel_attr:
                values.append(grids[layer.name].kernel)
            else:
                values.append(trained[short].numpy())
        layer.set_weights(values)
    return folded


def _short(variable_name: str) -> str:
    return variable_name.split("/")[-1].split(":")[0]


def simulated_graph(model: tf.keras.Model, plan: BitPlan, calib_x: np.ndarray, qat_model=None) -> tf.keras.Model:
    """What the export backends convert: ``qat_model`` (the graph ``quantize`` simulated and possibly
    fine-tuned; ``save_qat_model`` / ``load_qat_model``), checked to be of ``model``, or without it
    ``build_qat_model`` on ``calib_x``. Unplanned kernel layers get 8 bits (``complete_plan``)."""
    if qat_model is None:
        return build_qat_model(model, complete_plan(model, plan), calib_x)
    kernels = {l.name for l in model.layers if type(l).__name__ in KERNEL_ATTRS}
    simulated = {name for name, inner, _ in quantized_layers(qat_model) if type(inner).__name__ in KERNEL_ATTRS}
    if kernels != simulated:
        raise ConfigError(f"the simulated model's kernel layers ({', '.join(sorted(simulated)) or 'none'}) are not "
                          f"the model's ({', '.join(sorted(kernels))}); pass the model_qat.h5 that `toolchain "
                          "quantize` wrote for this model")
    grids = kernel_grids(qat_model)
    differ = []
    for name, lb in complete_plan(model, plan).layers.items():
        want = _levels(np.minimum(lb.channel_bits() if lb.group_bits else (lb.weight_bits,), MAX_FAKE_QUANT_BITS))
        want = np.where(np.asarray(lb.channel_bits() if lb.group_bits else (lb.weight_bits,)) >= FLOAT_BITS,
                        np.nan, want)
        got = grids[name].levels if name in grids else np.array([np.nan])
        if not np.array_equal(np.broadcast_to(want, got.shape), got, equal_nan=True):
            differ.append(name)
    if differ:
        raise ConfigError(f"the simulated model quantizes {', '.join(differ)} at other widths than the bit plan; "
                          "pass the model_qat.h5 written with this bitplan.json (rerun `toolchain quantize`)")
    return qat_model


# ------------------------------------------------------------------------------------------
# Evaluation, fine-tuning, saving


def predict(model: tf.keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outs = [model(np.asarray(x[i:i + batch_size], dtype=np.float32), training=False).numpy()
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def accuracy(model: tf.keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy from the model's own predictions (no Keras metric bookkeeping); NaN for
    targets that are not class indices (regression, autoencoder: no top-1 to measure)."""
    if np.ndim(y) != 1:
        return float("nan")
    return float(np.mean(np.argmax(predict(model, x), axis=-1) == np.asarray(y)))


def fine_tune(qmodel: tf.keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int = 64,
              learning_rate: float = 1e-4, seed: int = 0, quiet: bool = False) -> Dict[str, List[float]]:
    """Quantisation-aware fine-tuning in place (the QAT model is this stage's own object)."""
    tf.keras.utils.set_random_seed(seed)
    qmodel.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                   loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                   metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    tie = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: tie_same_scale_ranges(qmodel))
    hist = qmodel.fit(np.asarray(x, dtype=np.float32), np.asarray(y), epochs=epochs, batch_size=batch_size,
                      shuffle=True, verbose=0 if quiet else 2, callbacks=[tie])
    snap_biases(qmodel)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


#: the simulated model's file name. HDF5, because a tfmot model saved as .keras does not load back
#: in Keras 2.14 ("Layer 'quantize_layer' expected 5 variables, but received 3"); .h5 loads under
#: quantize_scope with every range (tests/quantize/test_simulate.py::test_saved_model_round_trip)
#: what the simulated graph computes, for the stage cache's key: bump it whenever a change here
#: changes the graph's numbers (2: average pools on their input's grid, biases on the stored int32
#: grid, 2026-12-06), so a cached quantize stage of an older simulation is recomputed, not shipped
SIMULATION_VERSION = 2
QAT_MODEL_FILE = "model_qat.h5"


def save_qat_model(qmodel: tf.keras.Model, path) -> None:
    from toolchain.model_io import save_model

    with quantize_scope():
        save_model(qmodel, path)


def load_qat_model(path) -> tf.keras.Model:
    """Load a simulated model written by ``save_qat_model`` (it holds this stage's custom objects,
    so it loads only through here or under ``quantize_scope()``)."""
    from toolchain.errors import ModelLoadError

    with quantize_scope():
        try:
            return tf.keras.models.load_model(str(path), compile=False)
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"cannot load the simulated model {path} ({str(e).splitlines()[0]}); "
                                 "rerun `toolchain quantize` to write it again") from None
