"""Canonicalization: equivalent rewrites of a Keras model that LRP needs (zennit's "canonizers").

``canonicalize(model)`` returns a new Functional model (the user's model is never touched) in which

* BatchNormalization directly after a kernel layer (``toolchain.layers``) with linear activation is
  folded into that layer's kernel and bias (unfolded BN makes iNNvestigate's relevance explode);
* Dropout-like layers (identity at inference) are dropped;
* optionally (``strip_softmax=True``) the final softmax is removed, since LRP explains logits;
* every layer is renamed ``c_<original name>``: iNNvestigate builds helper layers with Keras'
  automatic names (``add``, ``add_1``...), which clash with models such as MLPerf Tiny ResNet-8.

The result carries ``layer_map`` (canonical name -> original name) so relevance computed on the
canonical model is reported under the user's layer names; kernels keep their shapes, so the
per-weight scores of a folded layer line up one-to-one with the original kernel.
Every layer must be in ``SUPPORTED_LAYERS``; all offenders are reported at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import numpy as np

from toolchain.errors import UnsupportedLayerError

from toolchain.layers import CANONICAL_ROLES, DROP, FOLD, KERNEL, KERNEL_LAYERS, PASS, kernel_names  # noqa: F401

#: layer class -> role (KERNEL / PASS / DROP / FOLD), read from ``toolchain.layers``. Anything else
#: is refused with its name and class.
SUPPORTED_LAYERS: Mapping[str, str] = CANONICAL_ROLES

#: activations LRP handles (relevance passes through them unchanged)
SUPPORTED_ACTIVATIONS = ("linear", "relu", "relu6", "softmax")
CANONICAL_PREFIX = "c_"


@dataclass(frozen=True)
class CanonicalModel:
    """A canonicalized copy of a model and how it maps back to the original."""

    model: "object"  # tf.keras.Model
    layer_map: Dict[str, str] = field(default_factory=dict)  # canonical -> original name
    folded_batchnorm: Dict[str, str] = field(default_factory=dict)  # original BN -> original kernel layer
    dropped: tuple = ()
    softmax_stripped: bool = False

    def kernel_layers(self) -> List[str]:
        """Canonical names of the layers whose weights get per-weight relevance."""
        return [l.name for l in self.model.layers if SUPPORTED_LAYERS.get(type(l).__name__) == KERNEL]


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", str(act))


def check_supported(model) -> None:
    """Raise ``UnsupportedLayerError`` naming every layer the toolchain cannot handle."""
    import tensorflow as tf

    offenders = []
    for layer in model.layers:
        cls = type(layer).__name__
        if isinstance(layer, tf.keras.Model):
            offenders.append(f"{layer.name} (nested model {cls}: flatten it into one Functional model)")
        elif cls not in SUPPORTED_LAYERS:
            offenders.append(f"{layer.name} ({cls})")
        elif len(layer._inbound_nodes) > 1:
            offenders.append(f"{layer.name} ({cls} applied {len(layer._inbound_nodes)} times: shared layers are not supported)")
        elif getattr(layer, "groups", 1) != 1:
            offenders.append(f"{layer.name} ({cls} with groups={layer.groups})")
        else:
            act = _activation_name(layer) if hasattr(layer, "activation") else "linear"
            if act not in SUPPORTED_ACTIVATIONS:
                offenders.append(f"{layer.name} ({cls} with activation {act!r})")
    if offenders:
        supported = ", ".join(sorted(SUPPORTED_LAYERS))
        raise UnsupportedLayerError(
            f"unsupported layers: {', '.join(offenders)}; supported: {supported} "
            f"(activations: {', '.join(SUPPORTED_ACTIVATIONS)}); replace or remove them before compressing"
        )


def fold_batchnorm_weights(layer_class: str, weights: List[np.ndarray], bn) -> List[np.ndarray]:
    """Kernel and bias of ``layer`` followed by BatchNormalization ``bn``, folded into one affine op."""
    cfg = bn.get_config()
    params = dict(zip([w.name.split("/")[-1].split(":")[0] for w in bn.weights], bn.get_weights()))
    var = params["moving_variance"].astype(np.float64)
    mean = params["moving_mean"].astype(np.float64)
    gamma = params.get("gamma", np.ones_like(var))
    beta = params.get("beta", np.zeros_like(var))
    scale = gamma / np.sqrt(var + cfg["epsilon"])
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if len(weights) > 1 else np.zeros_like(var)
    if KERNEL_LAYERS[layer_class].depthwise:
        # output channel c * multiplier + m is kernel[..., c, m]
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * scale  # broadcasts over the last (output) axis
    bias = (bias - mean) * scale + beta
    return [kernel.astype(np.float32), bias.astype(np.float32)]


def _foldable_bn(layer, consumers, model_output_ids) -> "object | None":
    """The BatchNormalization that alone consumes ``layer``'s output and can be folded into it."""
    facts = KERNEL_LAYERS.get(type(layer).__name__)
    if facts is None or not facts.folds_bn or _activation_name(layer) != "linear":
        return None
    out = layer.output
    users = consumers.get(id(out), [])
    if len(users) != 1 or id(out) in model_output_ids:
        return None
    bn = users[0]
    if type(bn).__name__ != "BatchNormalization":
        return None
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis not in (-1, len(out.shape) - 1):
        return None
    return bn


def canonicalize(model, strip_softmax: bool = False) -> CanonicalModel:
    """An equivalent copy of ``model`` that LRP can analyse (see the module docstring)."""
    import tensorflow as tf

    check_supported(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayerError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "the toolchain supports single-input, single-output classifiers"
        )

    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        nodes.extend(model._nodes_by_depth[depth])

    consumers: Dict[int, list] = {}
    for node in nodes:
        for t in tf.nest.flatten(node.keras_inputs):
            consumers.setdefault(id(t), []).append(node.layer)
    output_ids = {id(t) for t in model.outputs}
    final_layer = model.outputs[0].node.layer

    new_tensor: Dict[int, object] = {}
    layer_map: Dict[str, str] = {}
    folded: Dict[str, str] = {}
    dropped: List[str] = []
    fold_into: Dict[str, bool] = {}  # BN names already folded into their producer
    softmax_stripped = False
    new_inputs = []

    for node in nodes:
        layer = node.layer
        cls = type(layer).__name__
        role = SUPPORTED_LAYERS[cls]
        outs = tf.nest.flatten(node.outputs)
        ins = tf.nest.flatten(node.keras_inputs)
        name = CANONICAL_PREFIX + layer.name

        if cls == "InputLayer":
            t = tf.keras.Input(batch_shape=layer.get_config()["batch_input_shape"], name=name,
                               dtype=layer.dtype)
            new_inputs.append(t)
            new_tensor[id(outs[0])] = t
            continue
        mapped = [new_tensor[id(t)] for t in ins]

        if role == DROP:
            new_tensor[id(outs[0])] = mapped[0]
            dropped.append(layer.name)
            continue
        if role == FOLD:
            if layer.name not in fold_into:
                raise UnsupportedLayerError(
                    f"unsupported layers: {layer.name} (BatchNormalization not directly after a "
                    f"{kernel_names()} with linear activation, so it cannot be folded); "
                    "move it right after such a layer"
                )
            new_tensor[id(outs[0])] = mapped[0]
            continue
        is_softmax_head = layer is final_layer and strip_softmax
        if is_softmax_head and (cls == "Softmax" or (cls == "Activation" and _activation_name(layer) == "softmax")):
            new_tensor[id(outs[0])] = mapped[0]
            softmax_stripped = True
            dropped.append(layer.name)
            continue

        config = dict(layer.get_config(), name=name)
        weights = layer.get_weights()
        if is_softmax_head and _activation_name(layer) == "softmax":
            config["activation"] = "linear"
            softmax_stripped = True
        bn = _foldable_bn(layer, consumers, output_ids)
        if bn is not None:
            weights = fold_batchnorm_weights(cls, weights, bn)
            config["use_bias"] = True
            fold_into[bn.name] = True
            folded[bn.name] = layer.name
        new_layer = type(layer).from_config(config)
        out = new_layer(mapped if len(mapped) > 1 else mapped[0])
        new_layer.set_weights(weights)
        layer_map[name] = layer.name
        new_tensor[id(outs[0])] = out

    canonical = tf.keras.Model(new_inputs, [new_tensor[id(t)] for t in model.outputs],
                               name=CANONICAL_PREFIX + model.name)
    return CanonicalModel(canonical, layer_map, folded, tuple(dropped), softmax_stripped)
