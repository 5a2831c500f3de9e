"""Load, save and fingerprint the Keras source models the toolchain compresses.

``load_model`` accepts ``.keras`` archives, ``.h5``/``.hdf5`` files and SavedModel directories
and always returns a single-input, single-output Functional (or Sequential) model. Before anything
is deserialized, the stored architecture config is read as plain JSON and checked: ``Lambda``
layers and custom (non-Keras) objects can execute code while loading, so they are refused unless
the caller says the file is trusted (``trust_model=True``, the CLI's ``--trust-model``).
The input is only ever opened for reading.

TensorFlow is imported lazily, so ``file_sha256`` and the error paths for wrong files stay cheap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Tuple

from toolchain.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
SAVE_SUFFIXES = KERAS_SUFFIXES + H5_SUFFIXES
ALLOWED = "a .keras file, a .h5/.hdf5 file or a SavedModel directory"
# Compiled artifacts people pass by mistake, with what they are.
_ARTIFACTS = {
    ".tflite": "a TFLite flatbuffer",
    ".onnx": "an ONNX graph",
    ".pb": "a frozen graph / SavedModel protobuf",
    ".pbtxt": "a SavedModel protobuf",
    ".pt": "a PyTorch checkpoint",
    ".pth": "a PyTorch checkpoint",
}
_MODEL_CLASSES = ("Functional", "Sequential", "Model")
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Hashing


def file_sha256(path) -> str:
    """SHA-256 of a file, or of a directory: every file's relative path and bytes, sorted."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"cannot hash {str(p)!r}: no such file or directory; check the path")
    digest = hashlib.sha256()
    if p.is_file():
        _hash_file(p, digest)
        return digest.hexdigest()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix().encode()
        # Length-prefixed so ("ab", "c") and ("a", "bc") cannot collide.
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(f.stat().st_size.to_bytes(8, "little"))
        _hash_file(f, digest)
    return digest.hexdigest()


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)


def model_hash(model: "tf.keras.Model") -> str:
    """SHA-256 over the architecture (canonical ``model.to_json()``) and every weight's bytes.

    Stable across processes for the same architecture, layer names and weight values.
    """
    import numpy as np

    digest = hashlib.sha256()
    arch = json.dumps(json.loads(model.to_json()), sort_keys=True, separators=(",", ":"))
    digest.update(arch.encode())
    for w in model.weights:
        value = np.ascontiguousarray(w.numpy())
        header = f"{w.name}|{value.dtype.str}|{value.shape}".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(value.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Saving


def save_model(model: "tf.keras.Model", path) -> Path:
    """Save ``model`` to ``path`` (.keras or .h5/.hdf5 by suffix) atomically; return the path.

    The model is written to a temporary name in the same directory and moved into place with
    ``os.replace``, so readers never see a half-written file. The same model gives the same bytes:
    a ``.keras`` archive is written without Keras' save time (:func:`_without_save_time`).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ConfigError(
            f"cannot save a model to {str(target)!r}: the suffix must be one of "
            f"{', '.join(SAVE_SUFFIXES)}; change the output path"
        )
    if target.is_dir():
        raise ConfigError(
            f"cannot save a model to {str(target)!r}: it is a directory; pass a file path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf

    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")
    tf_logger = tf.get_logger()
    quiet = _DropWarnings(*_SAVE_NOISE)
    tf_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            # Keras calls HDF5 "legacy"; the toolchain supports it on purpose.
            warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`")
            model.save(str(tmp))
        if suffix == ".keras":
            _without_save_time(tmp)
        os.replace(tmp, target)
    finally:
        tf_logger.removeFilter(quiet)
        if tmp.exists():
            tmp.unlink()
    return target


#: zip member time of written ``.keras`` archives (the zip format's earliest date)
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _without_save_time(path: Path) -> None:
    """Rewrite a ``.keras`` archive without the moment it was saved: Keras stamps ``date_saved``
    into ``metadata.json`` and the current time on the weights member, so two identical runs
    would write different bytes. Member order, contents and compression are kept; tf.keras and
    :func:`load_model` read the result as before (``keras_version`` stays)."""
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    rewritten = path.with_name(path.name + ".zip")
    try:
        with zipfile.ZipFile(rewritten, "w") as dst:
            for info, data in members:
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta).encode()
                member = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
                member.compress_type, member.external_attr = info.compress_type, info.external_attr
                dst.writestr(member, data)
        os.replace(rewritten, path)
    finally:
        if rewritten.exists():
            rewritten.unlink()


# --------------------------------------------------------------------------------------------
# Loading


def load_model(path, trust_model: bool = False) -> "tf.keras.Model":
    """Load a single-input, single-output Functional/Sequential Keras model (uncompiled).

    Refuses ``Lambda`` layers and custom objects unless ``trust_model`` is True, because
    deserializing them can execute code from the file.
    """
    p = Path(path)
    kind = _model_kind(p)
    config = _read_config(p, kind)
    _check_model_class(p, config)
    from toolchain import keras3

    is_keras3 = kind in ("keras", "h5") and keras3.is_keras3(p, kind, config)
    if is_keras3:
        keras3.check_layers(p, config, _keras_layer_names(), _keras_module)
    if not trust_model:
        offenders = _unsafe_objects(config)
        if offenders:
            raise ModelLoadError(
                f"model {str(p)!r} contains objects that can execute code when loaded: "
                f"{', '.join(offenders)}; only built-in Keras layers load by default, so pass "
                f"--trust-model (trust_model=True) if you trust the file, or rebuild these "
                f"parts with built-in layers"
            )
    if is_keras3:
        model = keras3.load(p, kind, config)  # translated, never deserialized by Keras itself
    else:
        model = _deserialize(p, kind, trust_model, config)
    if kind == "savedmodel" and not trust_model:
        _check_not_revived(p, model)
    _check_loaded(p, model)
    return model


def _model_kind(p: Path) -> str:
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist; pass {ALLOWED}"
        )
    if p.is_dir():
        if not ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file()):
            raise ModelLoadError(
                f"directory {str(p)!r} is not a SavedModel (no saved_model.pb); pass {ALLOWED}"
            )
        return "savedmodel"
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in H5_SUFFIXES:
        return "h5"
    if suffix in (".tflite", ".onnx"):
        raise ModelLoadError(
            f"{str(p)!r} is {_ARTIFACTS[suffix]}, a converted artifact the toolchain cannot "
            f"analyse or compress; pass the Keras source model it was made from ({ALLOWED})"
        )
    if suffix in (".pb", ".pbtxt"):
        raise ModelLoadError(
            f"{str(p)!r} is {_ARTIFACTS[suffix]}, not a loadable model on its own; pass the "
            f"SavedModel directory that contains it (or a .keras or .h5/.hdf5 file)"
        )
    what = _ARTIFACTS.get(suffix, f"a file with suffix {suffix!r}" if suffix else
                          "a file without a suffix")
    raise ModelLoadError(
        f"{str(p)!r} is {what}, not a Keras model; pass {ALLOWED}"
    )


def _detail(err: BaseException, limit: int = 200) -> str:
    """The informative line of a (often very long) Keras/h5py error message."""
    text = str(err).strip()
    if "Exception encountered:" in text:  # Keras wraps the cause after a dump of the config
        text = text.rsplit("Exception encountered:", 1)[1].strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _corrupt(p: Path, what: str, err: BaseException) -> ModelLoadError:
    detail = _detail(err)
    return ModelLoadError(
        f"{str(p)!r} is not a readable {what} ({detail}); re-save the model with "
        f"model.save() as {ALLOWED}"
    )


def _read_config(p: Path, kind: str) -> dict:
    """The stored architecture as plain JSON, read without deserializing any object."""
    if kind == "keras":
        try:
            with zipfile.ZipFile(p) as archive:
                raw = archive.read("config.json")
            return json.loads(raw)
        except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError) as err:
            raise _corrupt(p, ".keras archive", err) from err
    if kind == "h5":
        import h5py

        try:
            with h5py.File(p, "r") as fh:
                raw = fh.attrs.get("model_config")
        except (OSError, ValueError) as err:
            raise _corrupt(p, "HDF5 model file", err) from err
        if raw is None:
            raise ModelLoadError(
                f"{str(p)!r} holds only weights (no model config); save the whole model with "
                f"model.save(), not model.save_weights()"
            )
        try:
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except ValueError as err:
            raise _corrupt(p, "HDF5 model file", err) from err
    return _read_savedmodel_config(p)


def _read_savedmodel_config(p: Path) -> dict:
    """The Keras metadata of a SavedModel: keras_metadata.pb (TF >= 2.5) or, for older
    SavedModels such as the MLPerf Tiny KWS reference, the user-object metadata in
    saved_model.pb. Returns the root model's metadata with every layer's metadata under
    ``"_layer_metadata"`` (a layer subclass has no config in the root)."""
    from google.protobuf.message import DecodeError

    nodes: List[Tuple[str, str, str]] = []  # (node path or id, identifier, metadata json)
    try:
        if (p / "keras_metadata.pb").is_file():
            from keras.protobuf import saved_metadata_pb2

            meta = saved_metadata_pb2.SavedMetadata()
            meta.ParseFromString((p / "keras_metadata.pb").read_bytes())
            nodes = [(n.node_path, n.identifier, n.metadata) for n in meta.nodes]
        elif (p / "saved_model.pb").is_file():
            from tensorflow.core.protobuf import saved_model_pb2

            sm = saved_model_pb2.SavedModel()
            sm.ParseFromString((p / "saved_model.pb").read_bytes())
            for graph in sm.meta_graphs:
                for i, node in enumerate(graph.object_graph_def.nodes):
                    if node.WhichOneof("kind") == "user_object":
                        obj = node.user_object
                        nodes.append(("root" if i == 0 else str(i), obj.identifier, obj.metadata))
        else:
            nodes = []  # text-format SavedModel: let the Keras loader decide below
    except (DecodeError, OSError) as err:
        raise _corrupt(p, "SavedModel", err) from err
    keras_nodes = [n for n in nodes if n[1].startswith("_tf_keras_") and n[2]]
    roots = [n for n in keras_nodes if n[0] == "root"]
    if not roots:
        raise ModelLoadError(
            f"SavedModel {str(p)!r} has no Keras model metadata (it was written by "
            f"tf.saved_model.save, not by Keras); save the Keras model with model.save() as "
            f"{ALLOWED}"
        )
    try:
        root = json.loads(roots[0][2])
        root["_layer_metadata"] = [
            json.loads(m) for path, ident, m in keras_nodes
            if path != "root" and ident in ("_tf_keras_layer", "_tf_keras_input_layer")
        ]
    except ValueError as err:
        raise _corrupt(p, "SavedModel", err) from err
    return root


def _check_model_class(p: Path, config: dict) -> None:
    cls = config.get("class_name")
    if cls not in _MODEL_CLASSES:
        raise ModelLoadError(
            f"model {str(p)!r} is a subclassed model (class {cls}), whose layers and graph the "
            f"toolchain cannot inspect; rebuild it as a Functional or Sequential model"
        )


def _keras_layer_names() -> frozenset:
    import tensorflow as tf

    return frozenset(
        name for name in dir(tf.keras.layers)
        if isinstance(getattr(tf.keras.layers, name), type)
        and issubclass(getattr(tf.keras.layers, name), tf.keras.layers.Layer)
    ) | frozenset(_MODEL_CLASSES)


def _keras_activation_names() -> frozenset:
    import tensorflow as tf

    return frozenset(n for n in dir(tf.keras.activations) if not n.startswith("_"))


def _walk(obj, is_layer: bool) -> Iterator[Tuple[dict, bool]]:
    """Every serialized object ``{"class_name": ...}`` in a config, flagged if it is a layer."""
    if isinstance(obj, list):
        for item in obj:
            yield from _walk(item, is_layer)
        return
    if not isinstance(obj, dict):
        return
    if "class_name" in obj:
        yield obj, is_layer
    for key, value in obj.items():
        if key in ("inbound_nodes", "build_config", "input_layers", "output_layers"):
            continue
        child_is_layer = key in ("layers", "layer", "forward_layer", "backward_layer",
                                 "_layer_metadata")
        yield from _walk(value, child_is_layer)


def _keras_module(module) -> bool:
    """``keras``, ``keras.layers``, ``keras.src.…``: Keras' own modules (not ``keras_evil``)."""
    return module is not None and (str(module) == "keras" or str(module).startswith("keras."))


def _unsafe_objects(config: dict) -> List[str]:
    """Lambda layers, Python lambdas and custom (non-Keras) objects, as 'name (Class)'."""
    layer_names = _keras_layer_names()
    activations = _keras_activation_names()
    found: List[str] = []
    for obj, is_layer in _walk(config, is_layer=False):
        cls = str(obj.get("class_name"))
        inner = obj.get("config")
        name = obj.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
        module = obj.get("module")
        registered = obj.get("registered_name")
        if cls in ("Lambda", "__lambda__"):
            bad = True
        elif is_layer:
            bad = cls not in layer_names or (module is not None and not _keras_module(module)) or (
                registered not in (None, cls))
        elif cls == "function":  # a function referenced by name (Keras 2.13+ and 3 configs): safe only
            # as a stock activation from a Keras module; Keras would import any other module named
            bad = not (_keras_module(module) and inner in activations)
        elif cls.startswith("__"):  # serialization helpers: __tuple__, __numpy__, ...
            bad = False
        elif "module" in obj:  # Keras 2.13+ serialization: built-ins live in keras.*
            bad = module is None or not _keras_module(module) or (
                registered not in (None, cls) and ">" in str(registered))
        else:  # older configs name registered custom objects "package>Class"
            bad = ">" in cls
        if bad:
            entry = f"{name} ({cls})" if name else cls
            if cls == "function":
                entry = f"{inner} (custom function)"
            if entry not in found:
                found.append(entry)
    return found


class _DropWarnings(logging.Filter):
    """Drops TF log warnings that are expected here and not actionable by the user."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


# The MLPerf Tiny KWS SavedModel predates TF 2.5; Keras loads it fine but warns each time.
_LOAD_NOISE = ("SavedModel saved prior to TF 2.5",)
# Keras' HDF5 writer tries to build the metrics of uncompiled models and warns that it cannot.
_SAVE_NOISE = ("compiled metrics have yet to be built",)


def _deserialize(p: Path, kind: str, trust_model: bool, config: dict):
    import tensorflow as tf

    tf_logger = tf.get_logger()
    quiet = _DropWarnings(*_LOAD_NOISE)
    tf_logger.addFilter(quiet)
    try:
        # safe_mode only affects .keras archives; for .h5 and SavedModel the config check above
        # is what keeps Lambda layers from being deserialized.
        return tf.keras.models.load_model(str(p), compile=False, safe_mode=not trust_model)
    except Exception as err:  # Keras raises many types for bad files; report them as one
        detail = _detail(err)
        if "Unknown" in str(err) or "custom_object" in str(err):
            custom = ", ".join(_unsafe_objects(config)) or "none found in the config"
            raise ModelLoadError(
                f"model {str(p)!r} uses non-built-in objects ({custom}) and Keras could not "
                f"resolve one of them ({detail}); import the code that registers them "
                f"(tf.keras.utils.register_keras_serializable) before loading, or rebuild the "
                f"model with built-in layers"
            ) from err
        raise _corrupt(p, {"keras": ".keras model", "h5": "HDF5 model file",
                           "savedmodel": "SavedModel"}[kind], err) from err
    finally:
        tf_logger.removeFilter(quiet)


def _builtin_layer(layer) -> bool:
    """``layer`` is an instance of the built-in Keras class of its own name (or a model), not a
    layer Keras revived from a SavedModel's traced functions under a borrowed name."""
    import tensorflow as tf
    from keras.src.engine.functional import Functional

    cls = type(layer)
    return cls in (Functional, tf.keras.Sequential) or getattr(tf.keras.layers, cls.__name__, None) is cls


def _check_not_revived(p: Path, model) -> None:
    """A SavedModel layer whose stored config Keras could not rebuild into its class (a custom
    layer labelled ``Dense`` in the metadata, say) comes back as a revived layer that runs the
    file's traced graph, i.e. the file's code; without trust that graph must never run."""
    revived = []
    stack = [model]
    while stack:
        layer = stack.pop()
        if not _builtin_layer(layer):
            revived.append(f"{layer.name} ({type(layer).__name__})")
        stack.extend(getattr(layer, "layers", []))  # nested models
    if revived:
        raise ModelLoadError(
            f"SavedModel {str(p)!r} has layers that Keras could only revive from the file's traced "
            f"graph, not rebuild from their config: {', '.join(sorted(revived))}; running them "
            f"executes the file's code, so pass --trust-model (trust_model=True) if you trust the "
            f"file, or save it with built-in layers only"
        )


def _check_loaded(p: Path, model) -> None:
    import tensorflow as tf

    if not isinstance(model, tf.keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ModelLoadError(
            f"model {str(p)!r} loaded as {type(model).__name__}, not a Functional or Sequential "
            f"model, so its layers and graph cannot be inspected; rebuild it as a Functional or "
            f"Sequential model"
        )
    n_in, n_out = len(model.inputs), len(model.outputs)
    if n_in != 1 or n_out != 1:
        ins = ", ".join(model.input_names)
        outs = ", ".join(model.output_names)
        raise ModelLoadError(
            f"model {str(p)!r} has {n_in} input(s) ({ins}) and {n_out} output(s) ({outs}); the "
            f"toolchain supports single-input single-output classifiers, so export one input "
            f"and one output"
        )

