"""Keras 3 model files (every TensorFlow since 2.16) loaded into tf.keras 2.14.

tf.keras 2.14 cannot read them: a Keras 3 ``.keras`` archive names ``keras.src.models.functional``
as its class's module, and its ``.h5`` files carry ``batch_shape``/``optional`` on the InputLayer.
Keras 3 itself cannot live in this environment (innvestigate needs tensorflow < 2.15), so the
file is *translated*, never executed:

1. the stored architecture (plain JSON, already checked by ``model_io`` for unsafe objects) is
   rewritten into the tf.keras 2.14 form: ``batch_shape`` -> ``batch_input_shape``, dtype policies
   -> their name, serialized objects ``{"module", "class_name", "config", "registered_name"}`` ->
   ``{"class_name", "config"}``, Keras 3 call nodes ``{"args": [keras tensors], "kwargs"}`` ->
   ``[[layer, node, tensor, kwargs]]``; keys that only Keras 3 knows and that do not change what a
   layer computes (``optional``, ``quantization_config``, LoRA off, initializer axes) are dropped,
   and any other unknown key is refused with the layer's name rather than silently ignored;
2. the model is built from that config with ``tf.keras.Model.from_config`` (known layer classes only);
3. every weight is read with h5py (``model.weights.h5`` of the archive: ``layers/<name>/vars/<i>``;
   an ``.h5``: ``model_weights/<name>/`` in its ``weight_names`` order) and assigned layer by layer
   after checking its shape. Keras 3 and tf.keras 2.14 keep a layer's variables in the same order
   (kernel, bias; gamma, beta, moving mean, moving variance).
"""
from __future__ import annotations

import inspect
import io
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from toolchain.errors import ModelLoadError

#: Keras-3-only layer config keys that do not change what an inference or training step computes
#: when they hold these values (None: any value)
HARMLESS_KEYS = {"optional": None, "quantization_config": None, "lora_rank": (None, 0), "lora_alpha": None,
                 "synchronized": (False,), "gradient_checkpointing": None}
#: keys some tf.keras 2.14 layers lack (ZeroPadding1D's data_format) where the value is the only
#: behaviour tf.keras has; dropped only for a layer that does not accept them
IMPLIED_KEYS = {"data_format": ("channels_last",)}
#: keys of a serialized initializer's config that tf.keras 2.14 does not know
_INITIALIZER_DROP = ("input_axes", "output_axes")


def keras_version(path: Path, kind: str) -> Optional[str]:
    """The Keras version that wrote a .keras/.h5 file, or None when it does not say."""
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                if "metadata.json" in archive.namelist():
                    return str(json.loads(archive.read("metadata.json")).get("keras_version") or "") or None
            return None
        if kind == "h5":
            import h5py

            with h5py.File(path, "r") as fh:
                v = fh.attrs.get("keras_version")
            return (v.decode() if isinstance(v, bytes) else str(v)) if v is not None else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return None


def is_keras3(path: Path, kind: str, config: dict) -> bool:
    version = keras_version(path, kind)
    if version is not None:
        return version.split(".")[0] == "3"
    return "keras.src" in json.dumps(config)[:100_000]


def check_layers(path: Path, config: dict, tf_keras_layers, is_keras_module) -> None:
    """Refuse Keras 3 built-in layers that tf.keras 2.14 does not have (``RMSNormalization``, ...),
    naming all of them: they are not custom code, so ``--trust-model`` would not help."""
    missing = []
    stack = list((config.get("config") or {}).get("layers", []))
    while stack:
        layer = stack.pop(0)
        stack.extend((layer.get("config") or {}).get("layers", []) if isinstance(layer.get("config"), dict) else [])
        cls = layer.get("class_name")
        builtin = is_keras_module(layer.get("module")) and layer.get("registered_name") in (None, cls)
        if builtin and cls not in tf_keras_layers:
            missing.append(f"{(layer.get('config') or {}).get('name', layer.get('name'))} ({cls})")
    if missing:
        raise ModelLoadError(
            f"{str(path)!r} is a Keras 3 model with layers tf.keras 2.14 (the TensorFlow this toolchain "
            f"runs on) does not have: {', '.join(missing)}; replace them with layers both versions have "
            f"(Conv/Dense/BatchNormalization/pooling/merge layers) before compressing the model"
        )


# --------------------------------------------------------------------------------------------
# config translation


def _object(obj):
    """A Keras 3 serialized object (initializer, regularizer, constraint, activation) in tf.keras 2
    form; dtype policies become their name."""
    if not isinstance(obj, dict) or "class_name" not in obj:
        return obj
    cls = obj["class_name"]
    cfg = obj.get("config")
    if cls in ("DTypePolicy", "Policy", "FloatDTypePolicy"):
        return cfg.get("name") if isinstance(cfg, dict) else cfg
    if cls == "function":  # a stock activation referenced by name
        return cfg
    if isinstance(cfg, dict):
        cfg = {k: _object(v) for k, v in cfg.items() if k not in _INITIALIZER_DROP}
    return {"class_name": cls, "config": cfg}


def _inbound(nodes, shifted=frozenset()) -> list:
    """Keras 3 call nodes -> tf.keras 2 inbound_nodes. tf.keras counts a nested model's own
    construction as its node 0, Keras 3 does not: references to those models (``shifted``) move up one."""
    out = []
    for node in nodes or []:
        if isinstance(node, list):  # already the Keras 2 form
            out.append(node)
            continue
        args = node.get("args", [])
        kwargs = {k: v for k, v in (node.get("kwargs") or {}).items() if v is not None}
        tensors = []

        def collect(a):
            if isinstance(a, dict) and a.get("class_name") == "__keras_tensor__":
                layer, n, t = a["config"]["keras_history"]
                tensors.append([layer, n + (layer in shifted), t, {}])
            elif isinstance(a, (list, tuple)):
                for b in a:
                    collect(b)

        for a in args:
            collect(a)
        if not tensors:
            raise ModelLoadError("a Keras 3 layer call has no tensor inputs; the file's graph cannot be rebuilt")
        if kwargs:
            tensors[-1][3] = kwargs
        out.append(tensors)
    return out


def _io_list(value, shifted=frozenset()) -> list:
    """``["input_layer", 0, 0]`` or ``[["a", 0, 0], ...]`` -> the nested form."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = [value]
    return [[name, n + (name in shifted), t] for name, n, t in value or []]


def _accepted_keys(cls_name: str) -> Optional[set]:
    import tensorflow as tf

    cls = getattr(tf.keras.layers, cls_name, None)
    if cls is None:
        return None
    keys = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            keys |= set(inspect.signature(klass.__init__).parameters)
        except (TypeError, ValueError):
            continue
    return keys | {"name", "trainable", "dtype", "batch_input_shape", "batch_size", "input_shape",
                   "dynamic", "input_dim"}


_MODELS = ("Functional", "Sequential", "Model")


def _has_own_inputs(layer: dict) -> bool:
    """A nested Functional, or a nested Sequential that starts with its InputLayer."""
    inner = (layer.get("config") or {}).get("layers") or [{}]
    return layer.get("class_name") in ("Functional", "Model") or (
        layer.get("class_name") == "Sequential" and inner[0].get("class_name") == "InputLayer")


def _layer(layer: dict, shifted=frozenset()) -> dict:
    cls = layer["class_name"]
    if cls in _MODELS:  # a nested model: its own layers are translated the same way
        out = dict(translate(layer), name=layer.get("name", (layer.get("config") or {}).get("name")))
        if "inbound_nodes" in layer:
            out["inbound_nodes"] = _inbound(layer["inbound_nodes"], shifted)
        return out
    cfg = {k: _object(v) for k, v in dict(layer.get("config") or {}).items()}
    if cls == "InputLayer" and "batch_shape" in cfg:
        cfg["batch_input_shape"] = cfg.pop("batch_shape")
    if isinstance(cfg.get("activation"), dict):
        cfg["activation"] = cfg["activation"].get("config", cfg["activation"])
    name = cfg.get("name", layer.get("name"))
    for key, allowed in HARMLESS_KEYS.items():
        if key in cfg and (allowed is None or cfg[key] in allowed):
            cfg.pop(key)
    accepted = _accepted_keys(cls)
    if accepted is not None:
        for key, allowed in IMPLIED_KEYS.items():
            if key in cfg and key not in accepted and cfg[key] in allowed:
                cfg.pop(key)
        unknown = sorted(k for k in cfg if k not in accepted - {"self", "args", "kwargs"})
        if unknown:
            raise ModelLoadError(
                f"layer {name} ({cls}) of this Keras 3 file sets {', '.join(unknown)}, which tf.keras 2.14 "
                f"(the TensorFlow this toolchain runs on) does not have; rebuild the layer without them"
            )
    out = {"class_name": cls, "config": cfg, "name": layer.get("name", name)}
    if "inbound_nodes" in layer:
        out["inbound_nodes"] = _inbound(layer["inbound_nodes"], shifted)
    return out


def translate(config: dict) -> dict:
    """A Keras 3 Functional/Sequential config as tf.keras 2.14's ``Model.from_config`` takes it."""
    cls = config.get("class_name")
    inner = dict(config.get("config") or {})
    shifted = frozenset(l.get("name") or (l.get("config") or {}).get("name")
                        for l in inner.get("layers", []) if _has_own_inputs(l))
    layers = [_layer(l, shifted) for l in inner.get("layers", [])]
    if cls == "Sequential":
        return {"class_name": "Sequential", "config": {"name": inner.get("name", "sequential"), "layers": layers}}
    out = {"name": inner.get("name", "model"), "layers": layers,
           "input_layers": _io_list(inner.get("input_layers"), shifted),
           "output_layers": _io_list(inner.get("output_layers"), shifted)}
    return {"class_name": "Functional", "config": out}


# --------------------------------------------------------------------------------------------
# weights


def _weights_keras(path: Path) -> dict:
    """``model.weights.h5`` of the archive as ``{"vars": [arrays], "layers": {key: node}}``."""
    import h5py

    def node(group) -> dict:
        vars_ = group.get("vars")
        layers = group.get("layers")
        return {"vars": [np.asarray(vars_[str(i)]) for i in range(len(vars_))] if vars_ is not None else [],
                "layers": {name: node(layers[name]) for name in layers} if layers is not None else {}}

    with zipfile.ZipFile(path) as archive:
        raw = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(raw), "r") as fh:
        return node(fh)


def _weights_h5(path: Path) -> dict:
    """``model_weights`` of a Keras 3 ``.h5`` as the same tree, each layer's variables in its
    ``weight_names`` order; a nested model's go to its inner layers by name."""
    import h5py

    root: dict = {"vars": [], "layers": {}}
    with h5py.File(path, "r") as fh:
        group = fh.get("model_weights", fh)
        for name in group:
            g = group[name]
            top = root["layers"].setdefault(name, {"vars": [], "layers": {}})
            for weight in g.attrs.get("weight_names", []):
                weight = weight.decode() if isinstance(weight, bytes) else str(weight)
                # "dense/kernel", "sequential/dense/kernel" (the outer model's scope) or, in a
                # nested model "block", "block/dense/kernel": what follows the group's own name
                scopes = weight.split("/")[:-1]
                inner_path = scopes[len(scopes) - scopes[::-1].index(name):] if name in scopes else []
                target = top
                for inner in inner_path:
                    target = target["layers"].setdefault(inner, {"vars": [], "layers": {}})
                target["vars"].append(np.asarray(g[weight]))
    return root


def _arrays(node: dict) -> List[np.ndarray]:
    """Every array of a weight tree."""
    return list(node["vars"]) + [a for child in node["layers"].values() for a in _arrays(child)]


def _snake_case(name: str) -> str:
    """Keras 3's ``naming.to_snake_case``."""
    import re

    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _archive_names(layers) -> List[str]:
    """The names Keras 3's saving_lib gives a model's layers in ``model.weights.h5``: the snake-case
    class name, numbered by order within the model (``conv2d``, ``conv2d_1``, ...), not the layers'
    own names."""
    used: Dict[str, int] = {}
    out = []
    for layer in layers:
        name = _snake_case(type(layer).__name__)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        out.append(name)
    return out


def _assign(layers, node: dict, kind: str, prefix: str, missing, problems, extra) -> None:
    """Give each layer its stored variables after a shape check; nested models recurse."""
    import tensorflow as tf

    keys = _archive_names(layers) if kind == "keras" else [layer.name for layer in layers]
    children = dict(node["layers"])
    for layer, key in zip(layers, keys):
        child = children.pop(key, None)
        if not layer.weights:
            continue
        if child is None:
            missing.append(prefix + layer.name)
        elif isinstance(layer, tf.keras.Model):
            _assign(layer.layers, child, kind, f"{prefix}{layer.name}/", missing, problems, extra)
        else:
            values, expected = child["vars"], layer.weights
            if len(values) != len(expected) or any(tuple(v.shape) != tuple(w.shape) for v, w in zip(values, expected)):
                problems.append(f"{prefix}{layer.name}: file {[tuple(v.shape) for v in values]} vs layer "
                                f"{[tuple(w.shape) for w in expected]}")
            else:
                layer.set_weights(values)
    extra.extend(prefix + key for key, child in children.items() if _arrays(child))


def load(path: Path, kind: str, config: dict):
    """Build the tf.keras model from a Keras 3 file's config and give it the file's weights."""
    import tensorflow as tf

    translated = translate(config)
    try:
        if translated["class_name"] == "Sequential":
            model = tf.keras.Sequential.from_config(translated["config"])
        else:
            model = tf.keras.Model.from_config(translated["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"{str(path)!r} (Keras 3) could not be rebuilt in tf.keras 2.14 "
                             f"({str(err).splitlines()[0][:200]}); only built-in Keras layers are supported") from err
    try:
        weights = _weights_keras(path) if kind == "keras" else _weights_h5(path)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ModelLoadError(f"{str(path)!r} (Keras 3): its weights cannot be read ({err}); re-save the model") from err
    missing: List[str] = []
    problems: List[str] = []
    extra: List[str] = []
    _assign(model.layers, weights, kind, "", missing, problems, extra)
    if missing or problems or extra:
        parts = ([f"no weights for {', '.join(missing)}"] if missing else []) + problems + (
            [f"weights for unknown layers {', '.join(sorted(extra))}"] if extra else [])
        raise ModelLoadError(f"{str(path)!r} (Keras 3): the weights do not match the architecture "
                             f"({'; '.join(parts)}); the file is inconsistent, re-save it")
    return model
