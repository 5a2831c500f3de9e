"""ONNX backend: float32 from Keras with tf2onnx, int8 and mixed (``BitPlan``) QDQ with ONNX Runtime.

    fp32  = export_onnx_fp32(model, "out/model_fp32.onnx")              # opset 13..18
    int8  = export_onnx_int8(model, x_cal, "out/model_int8.onnx")       # or the fp32 path
    mixed = export_onnx_mixed(model, x_cal, plan, "out/model_mixed.onnx")
    y     = run_onnx(mixed.path, x_eval)                                # float scores

What the converters do, found out on the MLPerf Tiny DS-CNN and the unit-test models (TF 2.14,
tf2onnx 1.17, onnxruntime 1.31), and why the code is shaped the way it is:

* Names. tf2onnx names nodes after the TF ops (``<model>/<layer>/Conv2D``), but not reliably:
  a ``DepthwiseConv2D`` with a bias is rebuilt by tf2onnx's transpose optimizer (Conv + Add
  fusion) into a node called ``Conv__95`` with initializers ``Conv__95_weights_fused_bn``; the
  Keras layer name is gone. A following BatchNormalization is folded into the kernel
  (``*_weights_fused_bn``, each output channel scaled). So Keras layers are matched to ONNX
  kernels by *value*: the Keras kernel, transposed to ONNX layout, must equal the initializer up
  to one scale per output channel (:data:`FOLD_RTOL`); the node name only breaks ties.
* Layouts. ``Conv2D`` → ``Conv`` (weight OIHW). ``DepthwiseConv2D`` → ``Conv`` with
  ``group = C_in`` and weight ``(C_in*multiplier, 1, kh, kw)``, so per-channel quantization on
  axis 0 is per depthwise filter (int4 per-channel there works and runs in ORT). ``Dense`` →
  ``MatMul`` + ``Add`` from tf2onnx, which ``quant_pre_process`` fuses into ``Gemm``
  (``MatMulAddFusion``, ``transB=0``: weight ``(in, out)``, channel axis 1).
* Activations. ``quant_pre_process`` fuses Conv + bias (+ BN) and the quantizer removes a
  following Relu, quantizing the *Relu output*; an override keyed on the Conv/BiasAdd output is
  silently ignored. Activation overrides are therefore keyed on the tensor after a Relu/Clip
  that is the kernel's only consumer, and every override is read back from the written file.
* Types. Activations are ``QUInt8`` (asymmetric): after ReLU they are non-negative, so uint8 with
  zero point 0 uses all 256 levels where symmetric int8 would waste the sign bit, and U8S8 is
  the ORT-recommended CPU format. Weights are symmetric per-channel ``QInt8``.
* Opset. tf2onnx ``from_keras`` converts at opsets 13..18 only. int4 / int16 weights and
  uint16 activations need QuantizeLinear/DequantizeLinear from opset 21 (or ORT's
  ``com.microsoft`` contrib domain, which other runtimes lack): the mixed export converts the
  graph to opset 21 itself before quantizing (``onnx.version_converter``), so the file holds
  standard ONNX Q/DQ, and fails rather than fall back when that conversion fails.
* Widths a runtime cannot store: 2 and 3 bits go into int4, 5..7 bits into int8, with per-channel
  scales fixed so each channel only uses the symmetric levels ``±(2**(b-1)-1)`` of its width;
  per-group plans (one width per group of output channels) share one container, the widest
  group's. The integers each channel needs are read back from the file and checked.
  16-bit weights are int16 (opset 21). Weight or activation width 32 keeps the layer's kernel
  and arithmetic in float (its node is excluded from quantization); tensors it shares with
  quantized neighbours are still quantized at their boundary, as TFLite's denylist does, and the
  metadata says so (``output_dtype``). A layer mixing float and integer groups cannot be one
  initializer and fails naming the layer.
* Determinism. tf2onnx makes names from a process-wide counter, and how many names it draws
  varies from call to call (``Conv__95`` once, ``Conv__94`` the next time, same graph); the
  suffixes are renumbered in graph order after conversion, so the same model gives the same
  bytes in any process. Artifacts are written to a temporary name and ``os.replace``-d into place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, ConversionError, DataError, UnsupportedLayerError
from toolchain.export.artifact import Artifact, make_artifact, write_bytes_atomic
from toolchain.layers import KERNEL_LAYERS as LAYER_FACTS

#: opsets tf2onnx 1.17's ``from_keras`` can produce
SUPPORTED_OPSETS = tuple(range(13, 19))
#: first standard opset whose QuantizeLinear/DequantizeLinear take int4, uint16 and int16
QDQ_WIDE_OPSET = 21
#: Keras layer classes whose kernel the ONNX backend maps to an ONNX node, and the node types
KERNEL_LAYERS: Mapping[str, Tuple[str, ...]] = {cls: k.onnx_ops for cls, k in LAYER_FACTS.items()}
#: plan weight width -> how the file stores it
WEIGHT_STORAGE: Mapping[int, str] = {2: "int4", 3: "int4", 4: "int4", 5: "int8", 6: "int8",
                                     7: "int8", 8: "int8", 16: "int16", 32: "float32"}
#: plan activation width -> activation type in the file
ACTIVATION_STORAGE: Mapping[int, str] = {8: "uint8", 16: "uint16", 32: "float32"}
#: bits of each storage type (symmetric: largest |q| is 2**(bits-1)-1 for a narrower plan width)
STORAGE_BITS: Mapping[str, int] = {"int4": 4, "int8": 8, "int16": 16}
#: relative tolerance of the kernel-by-value match (BN folding rescales each output channel)
FOLD_RTOL = 1e-3
CALIBRATION_BATCH = 32
#: ops whose output the quantizer quantizes in place of the kernel's (they get removed in QDQ)
_REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
_DEFAULT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _qtypes():
    from onnxruntime.quantization import QuantType

    return {"int4": QuantType.QInt4, "int8": QuantType.QInt8, "int16": QuantType.QInt16,
            "uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}


# --------------------------------------------------------------------------------------------
# Keras layer <-> ONNX kernel node


@dataclass(frozen=True)
class KernelNode:
    """Where one Keras kernel layer ended up in an ONNX graph."""

    layer: str
    layer_class: str
    node: str  # ONNX node name
    op_type: str  # Conv | MatMul | Gemm
    weight: str  # initializer name of the kernel
    channel_axis: int  # output-channel axis of that initializer
    group: int = 1


def _expected_rows(layer) -> Optional[Tuple[Tuple[int, ...], np.ndarray]]:
    """(ONNX weight shape, kernel as rows = output channels) of a supported Keras layer."""
    cls = type(layer).__name__
    if cls == "Conv2D":
        k = layer.kernel.numpy()  # (kh, kw, cin/g, cout)
        w = np.transpose(k, (3, 2, 0, 1))
        return w.shape, w.reshape(w.shape[0], -1)
    if cls == "Conv1D":
        # tf2onnx keeps TF's height-1 Conv2D (O, I, 1, k) or folds it to a 1-D Conv (O, I, k):
        # either way the rows (output channels) read (cin, k) in the same order
        k = layer.kernel.numpy()  # (k, cin/g, cout)
        w = np.transpose(k, (2, 1, 0))
        return None, w.reshape(w.shape[0], -1)
    if cls == "DepthwiseConv2D":
        k = layer.depthwise_kernel.numpy()  # (kh, kw, cin, mult); output channel = c*mult + m
        kh, kw, cin, mult = k.shape
        w = np.transpose(k.reshape(kh, kw, cin * mult), (2, 0, 1))[:, None]
        return w.shape, w.reshape(w.shape[0], -1)
    if cls == "Dense":
        k = layer.kernel.numpy()  # (in, out)
        return None, k.T
    return None


def _candidate_rows(node, init: np.ndarray) -> Tuple[int, np.ndarray]:
    """(channel axis, weight as rows = output channels) of a Conv/MatMul/Gemm initializer."""
    if node.op_type == "Conv":
        return 0, init.reshape(init.shape[0], -1)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, init) if trans_b else (1, init.T)
    return init.ndim - 1, init.reshape(-1, init.shape[-1]).T  # MatMul


def _proportional_rows(cand: np.ndarray, want: np.ndarray) -> bool:
    """Every row of ``cand`` is a scalar multiple of the same row of ``want`` (BN folding)."""
    if cand.shape != want.shape:
        return False
    c = cand.astype(np.float64)
    k = want.astype(np.float64)
    kk = np.einsum("ij,ij->i", k, k)
    scale = np.divide(np.einsum("ij,ij->i", c, k), kk, out=np.zeros_like(kk), where=kk > 0)
    resid = np.abs(c - scale[:, None] * k).max(axis=1)
    bound = FOLD_RTOL * np.abs(c).max(axis=1) + 1e-12
    return bool(np.all(resid <= bound))


def map_kernel_layers(model, onnx_model, layers: Optional[Sequence[str]] = None) -> Dict[str, KernelNode]:
    """Find, by value, the ONNX Conv/MatMul/Gemm node of each supported Keras kernel layer.

    ``layers`` restricts the search (default: every kernel layer of ``model``).
    Raises ``UnsupportedLayerError`` for named layers outside :data:`KERNEL_LAYERS` and
    ``ConversionError`` naming every layer that has no node or more than one.
    """
    from onnx import numpy_helper

    by_name = {l.name: l for l in model.layers}
    absent = [n for n in (layers or ()) if n not in by_name]
    if absent:
        raise ConfigError(f"layers {', '.join(absent)} are not in model {model.name!r}; name layers of this model")
    names = list(layers) if layers is not None else [
        l.name for l in model.layers if type(l).__name__ in KERNEL_LAYERS]
    unsupported = [f"{n} ({type(by_name[n]).__name__})" for n in names
                   if type(by_name[n]).__name__ not in KERNEL_LAYERS]
    if unsupported:
        raise UnsupportedLayerError(
            f"the ONNX backend cannot map {', '.join(unsupported)}; supported kernel layers are "
            f"{', '.join(KERNEL_LAYERS)}; leave these layers out of the bit plan")

    inits = {t.name: t for t in onnx_model.graph.initializer}
    candidates = []  # (node, weight name, axis, rows)
    for node in onnx_model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            if node.op_type == "MatMul" and node.input[0] in inits:
                continue
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.dtype.kind != "f":
                continue
            axis, rows = _candidate_rows(node, arr)
            candidates.append((node, node.input[1], axis, arr.shape, rows))

    found: Dict[str, KernelNode] = {}
    problems = []
    for name in names:
        layer = by_name[name]
        cls = type(layer).__name__
        shape, want = _expected_rows(layer)
        hits = [c for c in candidates if c[0].op_type in KERNEL_LAYERS[cls]
                and (shape is None or tuple(c[3]) == tuple(shape))
                and (LAYER_FACTS[cls].spatial_dims > 0 or c[0].op_type != "Conv")
                and _proportional_rows(c[4], want)]
        if len(hits) > 1:  # identical kernels: let the TF op name decide
            hits = [c for c in hits if f"/{name}/" in c[0].name or f"/{name}/" in c[1]] or hits
        if len(hits) != 1:
            problems.append(f"{name} ({cls}): {len(hits)} matching nodes")
            continue
        node, weight, axis, _, _ = hits[0]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        found[name] = KernelNode(name, cls, node.name, node.op_type, weight, axis, int(group))
    taken: Dict[str, List[str]] = {}
    for kn in found.values():
        taken.setdefault(kn.node, []).append(kn.layer)
    problems += [f"{', '.join(ls)} all match node {n}" for n, ls in taken.items() if len(ls) > 1]
    if problems:
        raise ConversionError(
            "cannot tell which ONNX node holds the kernel of: " + "; ".join(problems) +
            "; the layer must appear as exactly one Conv/MatMul/Gemm whose weight equals its kernel "
            "(up to a per-channel BatchNorm scale); report the model if this persists")
    return found


# --------------------------------------------------------------------------------------------
# float32


@contextlib.contextmanager
def _quiet_converters():
    saved = {}
    for name in ("tf2onnx", "onnxruntime", "root"):
        lg = logging.getLogger(None if name == "root" else name)
        saved[lg] = lg.level
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved.items():
            lg.setLevel(level)


def _check_opset(opset: int) -> int:
    if opset not in SUPPORTED_OPSETS:
        raise ConfigError(f"ONNX opset {opset!r} is not supported; tf2onnx's from_keras converts at "
                          f"opsets {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}; pass one of those")
    return int(opset)


def keras_to_onnx(model, opset: int = 13):
    """Convert a single-input Keras model to an ``onnx.ModelProto`` (deterministic names).

    Fails with ``ConversionError`` if tf2onnx left any op unconverted or the graph is invalid.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    opset = _check_opset(opset)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"model {model.name!r} has {len(model.inputs)} inputs and "
                          f"{len(model.outputs)} outputs; the ONNX export takes one of each")
    input_name = model.inputs[0].name.split(":")[0]
    spec = (tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name=input_name),)
    try:
        with _quiet_converters():
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as e:  # tf2onnx raises bare Exceptions of many kinds
        raise ConversionError(f"tf2onnx could not convert model {model.name!r} at opset {opset} "
                              f"({type(e).__name__}: {e}); try another opset in {SUPPORTED_OPSETS}") from e
    # from_keras runs with continue_on_error: an op it cannot convert stays behind as a TF op.
    foreign = sorted({f"{n.op_type} ({n.name})" for n in proto.graph.node if n.domain not in _DEFAULT_DOMAINS})
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        foreign.append(str(e).splitlines()[0])
    if foreign:
        raise ConversionError(f"tf2onnx left ops it could not convert in model {model.name!r}: "
                              f"{', '.join(foreign)}; replace those layers or use another opset")
    if any(n.op_type in ("If", "Loop", "Scan") for n in proto.graph.node):
        raise ConversionError(f"model {model.name!r} converts to control-flow ops (If/Loop/Scan), "
                              "which the ONNX backend does not support; export a plain feed-forward model")
    _renumber_generated_names(proto)
    return proto


_GENERATED = re.compile(r"__(\d+)")


def _renumber_generated_names(proto) -> None:
    """Renumber tf2onnx's ``name__<counter>`` suffixes 1, 2, ... in graph order, in place.

    tf2onnx draws these numbers from a process-wide counter, and how many names its optimizers
    create and discard varies between calls (set iteration over node objects), so the same model
    gives ``Conv__95`` once and ``Conv__94`` the next time. The graph is otherwise identical;
    renumbering by first appearance (one bijection over all names) makes the bytes reproducible.
    """
    graph = proto.graph
    # graph inputs/outputs carry the Keras names the user chose: never renamed
    kept = {v.name for v in list(graph.input) + list(graph.output)}
    order: Dict[str, int] = {}

    def see(name: str) -> None:
        if name not in kept:
            for num in _GENERATED.findall(name):
                order.setdefault(num, len(order) + 1)

    def dims(values):
        for v in values:
            for d in v.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    yield d

    for n in graph.node:
        see(n.name)
        for t in list(n.input) + list(n.output):
            see(t)
    for t in graph.initializer:
        see(t.name)
    for v in graph.value_info:
        see(v.name)
    for d in dims(list(graph.input) + list(graph.output) + list(graph.value_info)):
        see(d.dim_param)

    def sub(name: str) -> str:
        if name in kept:
            return name
        new = _GENERATED.sub(lambda m: f"__{order[m.group(1)]}", name)
        if new != name and new in kept:
            raise ConversionError(f"renumbering tf2onnx's generated names would turn {name!r} into the "
                                  f"model's input/output name {new!r}; rename that Keras layer")
        return new

    for v in graph.value_info:
        v.name = sub(v.name)
    for d in dims(list(graph.input) + list(graph.output) + list(graph.value_info)):
        d.dim_param = sub(d.dim_param)
    for n in graph.node:
        n.name = sub(n.name)
        n.input[:] = [sub(t) for t in n.input]
        n.output[:] = [sub(t) for t in n.output]
    for t in graph.initializer:
        t.name = sub(t.name)
    # tf2onnx lists initializers sorted by their (varying) names: sort by the stable ones
    for field in (graph.initializer, graph.value_info):
        items = sorted(field, key=lambda t: t.name)
        copies = [type(t)() for t in items]
        for c, t in zip(copies, items):
            c.CopyFrom(t)
        del field[:]
        field.extend(copies)


def _serialize(proto) -> bytes:
    return proto.SerializeToString(deterministic=True)


def _graph_io(proto) -> dict:
    import onnx

    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [desc(v) for v in proto.graph.input], "outputs": [desc(v) for v in proto.graph.output]}


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _op_counts(proto) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in proto.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def export_onnx_fp32(model, out_path, opset: int = 13) -> Artifact:
    """Write ``model`` as a float32 ONNX graph at ``opset`` (13..18); same model ⇒ same bytes."""
    proto = keras_to_onnx(model, opset)
    kernels = map_kernel_layers(model, proto)
    data = _serialize(proto)
    _check_ort_loads(data, out_path)
    path = write_bytes_atomic(out_path, data)
    meta = {
        "opset": _opset(proto), "producer": f"{proto.producer_name} {proto.producer_version}",
        **_graph_io(proto), "ops": _op_counts(proto),
        "layers": {k: {"node": v.node, "op_type": v.op_type, "group": v.group, "weight": v.weight,
                       "weight_dtype": "float32"} for k, v in kernels.items()},
    }
    return make_artifact("onnx-fp32", path, meta)


# --------------------------------------------------------------------------------------------
# quantization


def _calibration_reader(x: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH):
    """An ORT ``CalibrationDataReader`` feeding the real samples ``x`` in fixed batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class SampleReader(CalibrationDataReader):
        def __init__(self):
            self._i = 0

        def get_next(self):
            if self._i >= len(x):
                return None
            chunk = x[self._i:self._i + batch]
            self._i += batch
            return {input_name: chunk}

        def rewind(self):
            self._i = 0

        def __len__(self):
            return -(-len(x) // batch)

    return SampleReader()


def _check_calibration(calib_x, input_shape: Sequence[Optional[int]]) -> np.ndarray:
    x = np.asarray(calib_x)
    if x.dtype.kind != "f":
        raise DataError(f"calibration samples have dtype {x.dtype}; pass float inputs as the float "
                        "model sees them (dequantize int8 data first)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = tuple(input_shape[1:])
    if x.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, x.shape[1:])):
        raise DataError(f"calibration samples have shape {x.shape}; the model takes (N, "
                        f"{', '.join(str(w) for w in want)}); pass samples of the model's input shape")
    if len(x) == 0:
        raise DataError("no calibration samples given; pass at least one real input sample")
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataError(f"calibration samples contain {bad} NaN/Inf values; clean the data")
    return x


def _type_name(data_type: int) -> str:
    """``int4``, ``int8``, ``uint16``, ``float32``, ... for an ONNX TensorProto data type."""
    import onnx

    name = onnx.TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _bits_needed(v: int) -> int:
    """Smallest two's-complement width holding ``v`` (0 and -1 need 1 bit)."""
    return (v if v >= 0 else -v - 1).bit_length() + 1


def _read_back(qproto, kernels: Mapping[str, KernelNode]) -> Dict[str, dict]:
    """What each kernel node became in a quantized graph, read from the file's own tensors."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qproto.graph.initializer}
    producer = {o: n for n in qproto.graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for n in qproto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in qproto.graph.node}
    opset = _opset(qproto)

    def dq_type(dq) -> str:
        # DequantizeLinear(x, scale, zero_point): the integer type is x's (== zero point's)
        if dq.input[0] in inits:
            return _type_name(inits[dq.input[0]].data_type)
        if len(dq.input) > 2 and dq.input[2] in inits:
            return _type_name(inits[dq.input[2]].data_type)
        return "uint8"

    def q_type(q) -> str:
        if len(q.input) > 2 and q.input[2] in inits:
            return _type_name(inits[q.input[2]].data_type)
        return "uint8"

    out = {}
    for layer, kn in kernels.items():
        node = nodes.get(kn.node)
        if node is None:
            out[layer] = {"node": kn.node, "missing": True}
            continue
        rec = {"node": kn.node, "op_type": node.op_type, "group": kn.group, "opset": opset}
        w = node.input[1]
        src = producer.get(w)
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            q = numpy_helper.to_array(inits[src.input[0]]).astype(np.int64)
            rec["weight_dtype"] = dq_type(src)
            scale = numpy_helper.to_array(inits[src.input[1]])
            axis = int(next((a.i for a in src.attribute if a.name == "axis"), 1)) if scale.size > 1 else None
            rec["weight_axis"] = axis
            rows = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1) if axis is not None else q.reshape(1, -1)
            rec["weight_q_range"] = [int(q.min()), int(q.max())] if q.size else [0, 0]
            # two's-complement width each output channel's stored integers actually need
            rec["weight_channel_bits"] = [max(_bits_needed(int(r.min())), _bits_needed(int(r.max()))) for r in rows]
            rec["qdq_domain"] = src.domain or "ai.onnx"
        elif w in inits:
            rec["weight_dtype"] = _type_name(inits[w].data_type)
        else:
            rec["weight_dtype"] = "unknown"
        x_src = producer.get(node.input[0])
        rec["input_dtype"] = dq_type(x_src) if x_src is not None and x_src.op_type == "DequantizeLinear" else "float32"
        y = node.output[0]
        users = consumers.get(y, [])
        if len(users) == 1 and users[0].op_type in _REMOVABLE_ACTIVATIONS:
            y = users[0].output[0]
            users = consumers.get(y, [])
        qs = [u for u in users if u.op_type == "QuantizeLinear"]
        rec["output_tensor"] = y
        rec["output_dtype"] = q_type(qs[0]) if qs else "float32"
        out[layer] = rec
    return out


def _prune_opset_imports(proto) -> None:
    """Drop opset imports no node uses (quant_pre_process adds training/aten domains)."""
    used = {n.domain for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _check_ort_loads(data: bytes, out_path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes
        raise ConversionError(f"ONNX Runtime cannot load the graph meant for {out_path} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}); it was not written") from e


def _preprocess(proto, work: Path):
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = work / "fp32.onnx", work / "pre.onnx"
    src.write_bytes(_serialize(proto))
    try:
        with _quiet_converters():
            quant_pre_process(str(src), str(dst))
    except Exception as e:
        raise ConversionError(f"onnxruntime's quant_pre_process failed ({type(e).__name__}: {e}); "
                              "the float graph cannot be prepared for quantization") from e
    return onnx.load(str(dst))


def _quantize(pre, calib_x: np.ndarray, work: Path, overrides: dict, exclude: Sequence[str]):
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    dst = work / "q.onnx"
    reader = _calibration_reader(calib_x, pre.graph.input[0].name)
    # quantize_static moves a ModelProto's initializers to external data in place: give it a copy
    model_in = onnx.ModelProto()
    model_in.CopyFrom(pre)
    try:
        with _quiet_converters():
            quantize_static(
                model_in, str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude) or None,
                extra_options={"TensorQuantOverrides": overrides} if overrides else None)
    except (ValueError, RuntimeError, AssertionError, KeyError) as e:
        raise ConversionError(f"onnxruntime's quantize_static refused the request ({type(e).__name__}: "
                              f"{e}); check the bit plan layers named in the message") from e
    q = onnx.load(str(dst))
    _prune_opset_imports(q)
    return q


def _quant_metadata(fmt: str, qproto, calib: np.ndarray, layers: Mapping[str, dict]) -> dict:
    qdq = sorted({n.domain or "ai.onnx" for n in qproto.graph.node
                  if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    return {
        "opset": _opset(qproto), "qdq_domains": qdq, "quant_format": "QDQ", "per_channel": True,
        "activation_type": "uint8", "weight_type": "int8", "calibration_method": "MinMax",
        "calibration_samples": int(len(calib)),
        "calibration_sha256": hashlib.sha256(calib.tobytes()).hexdigest(),
        "preprocess": "onnxruntime.quantization.quant_pre_process",
        **_graph_io(qproto), "ops": _op_counts(qproto), "layers": dict(layers),
    }


def export_onnx_int8(model_or_fp32_path, calib_x, out_path, opset: int = 13) -> Artifact:
    """Static int8 QDQ export: per-channel int8 weights, uint8 activations, calibrated on ``calib_x``.

    ``model_or_fp32_path`` is a Keras model (converted at ``opset`` first; its layers are named in
    the metadata) or the path of a float ONNX file (nodes named instead).
    """
    import onnx

    keras_model = None
    if isinstance(model_or_fp32_path, (str, os.PathLike)):
        p = Path(model_or_fp32_path)
        if p.suffix.lower() != ".onnx" or not p.is_file():
            raise ConfigError(f"{str(p)!r} is not an .onnx file; pass a Keras model or a float ONNX file")
        fp32 = onnx.load(str(p))
    else:
        keras_model = model_or_fp32_path
        fp32 = keras_to_onnx(keras_model, opset)
    shape = [d.dim_value or None for d in fp32.graph.input[0].type.tensor_type.shape.dim]
    calib = _check_calibration(calib_x, shape)
    with tempfile.TemporaryDirectory(prefix="onnx-int8-") as tmp:
        pre = _preprocess(fp32, Path(tmp))
        if keras_model is not None:
            kernels = map_kernel_layers(keras_model, pre)
        else:
            kernels = {n.name: KernelNode(n.name, n.op_type, n.name, n.op_type, n.input[1], 0)
                       for n in pre.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                       and len(n.input) > 1 and n.input[1] in {t.name for t in pre.graph.initializer}}
        q = _quantize(pre, calib, Path(tmp), {}, ())
    layers = _read_back(q, kernels)
    bad = [f"{k} (weights {v.get('weight_dtype')})" for k, v in layers.items() if v.get("weight_dtype") != "int8"]
    if bad:
        raise ConversionError(f"the int8 export left kernels unquantized: {', '.join(bad)}; "
                              "the ORT quantizer does not support these nodes")
    data = _serialize(q)
    _check_ort_loads(data, out_path)
    path = write_bytes_atomic(out_path, data)
    return make_artifact("onnx-int8", path, _quant_metadata("onnx-int8", q, calib, layers))


# --------------------------------------------------------------------------------------------
# mixed precision from a BitPlan


@dataclass(frozen=True)
class LayerRequest:
    """What the plan asks of one layer, in ONNX terms."""

    layer: str
    kernel: KernelNode
    channel_bits: Tuple[int, ...]  # plan width of every output channel
    weight_storage: str  # int4 | int8 | int16 | float32
    activation_bits: int
    activation_tensor: str  # tensor the quantizer quantizes for this layer's output
    grid: Optional[object] = None  # toolchain.quantize.simulate.KernelGrid: the simulated graph's levels

    @property
    def float_kernel(self) -> bool:
        return self.weight_storage == "float32" or self.activation_bits == 32



def _activation_tensor(pre, node_name: str) -> str:
    """The tensor the QDQ quantizer quantizes after ``node``: after a sole Relu/Clip consumer."""
    node = next(n for n in pre.graph.node if n.name == node_name)
    y = node.output[0]
    users = [n for n in pre.graph.node if y in n.input]
    if len(users) == 1 and users[0].op_type in _REMOVABLE_ACTIVATIONS:
        return users[0].output[0]
    return y


def plan_requests(model, pre, plan, grids: Optional[Mapping[str, object]] = None) -> List[LayerRequest]:
    """Map every ``plan`` layer onto its ONNX kernel node and storage types (all problems at once);
    ``grids`` (``kernel_grids`` of the simulated graph) fix each kernel's scales."""
    plan.check_against(model)
    kernels = map_kernel_layers(model, pre, list(plan.layers))
    dims = {t.name: list(t.dims) for t in pre.graph.initializer}
    out, problems = [], []
    for name, lb in plan.layers.items():
        kn = kernels[name]
        cout = dims[kn.weight][kn.channel_axis]
        if lb.num_channels is not None and lb.num_channels != cout:
            problems.append(f"{name}: the plan counts {lb.num_channels} output channels, the kernel has {cout}")
            continue
        bits = dataclasses.replace(lb, num_channels=cout).channel_bits()
        if len(bits) != cout:
            problems.append(f"{name}: groups cover {len(bits)} channels, the kernel has {cout}")
            continue
        storages = {WEIGHT_STORAGE[b] for b in bits}
        if "float32" in storages and len(storages) > 1:
            problems.append(f"{name}: mixes float (32-bit) and integer channel groups, which one ONNX "
                            "initializer cannot hold")
            continue
        storage = max(storages, key=lambda s: STORAGE_BITS.get(s, 32))  # the widest group's container
        out.append(LayerRequest(name, kn, tuple(bits), storage, lb.activation_bits,
                                _activation_tensor(pre, kn.node), (grids or {}).get(name)))
    if problems:
        raise ConversionError("the bit plan cannot be expressed in ONNX for: " + "; ".join(problems) +
                              "; give each such layer one storable width")
    return out


def build_overrides(pre, requests: Sequence[LayerRequest]) -> Tuple[dict, List[str]]:
    """``TensorQuantOverrides`` and excluded nodes that realise ``requests`` on graph ``pre``."""
    from onnx import numpy_helper

    qt = _qtypes()
    inits = {t.name: t for t in pre.graph.initializer}
    overrides: dict = {}
    exclude: List[str] = []
    for r in requests:
        if r.float_kernel:
            exclude.append(r.kernel.node)
            continue
        full = STORAGE_BITS[r.weight_storage]
        w = numpy_helper.to_array(inits[r.kernel.weight]).astype(np.float64)
        w_rows = np.moveaxis(w, r.kernel.channel_axis, 0).reshape(w.shape[r.kernel.channel_axis], -1)
        # A width narrower than its container gets a fixed symmetric scale so only its levels are
        # used; ORT takes explicit scales for all channels of a tensor or none. With the simulated
        # graph's grid every scale is its step: the stored integers are its codes, exactly.
        explicit = r.grid is not None or any(b < full for b in r.channel_bits)
        per_channel = []
        for c, b in enumerate(r.channel_bits):
            entry = {"quant_type": qt[r.weight_storage], "axis": r.kernel.channel_axis}
            if r.grid is not None:
                step = float(r.grid.step[c])
                entry["scale"] = np.float32(step if step > 0 else 1.0)
                entry["zero_point"] = 0
            elif explicit:
                qmax = 2 ** (b - 1) - 1
                amax = float(np.abs(w_rows[c]).max())
                entry["scale"] = np.float32(amax / qmax if amax > 0 else 1.0)
                entry["zero_point"] = 0
            per_channel.append(entry)
        overrides[r.kernel.weight] = per_channel
        if r.activation_bits != 8:
            overrides[r.activation_tensor] = [{"quant_type": qt[ACTIVATION_STORAGE[r.activation_bits]]}]
    return overrides, exclude


def check_read_back(layers: Mapping[str, dict], requests: Sequence[LayerRequest]) -> None:
    """Raise ``ConversionError`` naming every layer whose file types differ from its request."""
    problems = []
    for r in requests:
        got = layers[r.layer]
        if r.float_kernel:
            if got.get("weight_dtype") != "float32":
                problems.append(f"{r.layer}: asked float32 kernel, file has {got.get('weight_dtype')}")
            continue
        if got.get("weight_dtype") != r.weight_storage:
            problems.append(f"{r.layer}: asked {r.weight_storage} weights ({min(r.channel_bits)}.."
                            f"{max(r.channel_bits)} bits), file has {got.get('weight_dtype')}")
        else:
            used = got.get("weight_channel_bits") or []
            over = [c for c, (u, b) in enumerate(zip(used, r.channel_bits)) if u > b]
            if len(used) != len(r.channel_bits) or over:
                problems.append(f"{r.layer}: stored weights of channels {over[:8] or 'all'} need more bits "
                                f"than the plan's {sorted(set(r.channel_bits))}")
        want_act = ACTIVATION_STORAGE[r.activation_bits]
        if r.activation_bits != 8 and got.get("output_dtype") != want_act:
            problems.append(f"{r.layer}: asked {want_act} output activations on tensor "
                            f"{r.activation_tensor!r}, file has {got.get('output_dtype')} on "
                            f"{got.get('output_tensor')!r}")
        if (r.weight_storage in ("int4", "int16") or r.activation_bits == 16) and got.get("opset", 0) < QDQ_WIDE_OPSET \
                and got.get("qdq_domain") != "com.microsoft":
            problems.append(f"{r.layer}: {r.weight_storage}/{want_act} needs opset {QDQ_WIDE_OPSET}, file has "
                            f"opset {got.get('opset')}")
    if problems:
        raise ConversionError("the quantized ONNX graph does not hold what the bit plan asked for: " +
                              "; ".join(problems) + "; the ORT quantizer ignored these overrides, so the "
                              "artifact was not written")


#: ONNX ops that apply a squashing activation after a kernel (the simulated grid is before them)
_SQUASHING_OPS = ("Softmax", "Sigmoid", "Tanh")


def activation_overrides(pre, grids: Mapping[str, object]) -> dict:
    """``TensorQuantOverrides`` giving each activation tensor of ``pre`` the simulated graph's grid
    (``toolchain.quantize.simulate.activation_grids``) instead of a range ORT calibrates itself.

    tf2onnx names a layer's nodes ``<model>/<layer>/<op>``: a layer's output is the last node of
    its group, its pre-activation (``<layer>/pre``) the last one that is not a squashing activation;
    the model input is the graph input. Only 8-bit grids are given (wider ones keep their quant
    type override and ORT's range)."""
    groups: Dict[str, list] = {}
    for node in pre.graph.node:
        parts = node.name.split("/")
        for part in parts[1:-1]:
            groups.setdefault(part, []).append(node)
    out: dict = {}

    def put(tensor: str, grid) -> None:
        if grid.bits == 8 and tensor not in out:
            out[tensor] = [{"scale": np.array(grid.scale, dtype=np.float32),
                            "zero_point": np.array(grid.zero_point, dtype=np.uint8)}]

    if "__input__" in grids and len(pre.graph.input) == 1:
        put(pre.graph.input[0].name, grids["__input__"])
    for key, grid in grids.items():
        layer, _, pre_act = key.partition("/")
        nodes = groups.get(layer)
        if not nodes:
            continue
        if pre_act:
            nodes = [n for n in nodes if n.op_type not in _SQUASHING_OPS]
            if nodes:
                put(nodes[-1].output[0], grid)
        elif nodes[-1].op_type not in _SQUASHING_OPS:
            put(nodes[-1].output[0], grid)
    return out


def quantize_requests(pre, calib: np.ndarray, requests: Sequence[LayerRequest], work: Path,
                      activation_grids: Optional[Mapping[str, object]] = None):
    """Quantize the pre-processed graph for ``requests``; return (model, per-layer read-back).
    ``activation_grids`` (the simulated graph's) fix the activation scales ORT would calibrate."""
    import onnx

    needs_wide = any(r.weight_storage in ("int4", "int16") or r.activation_bits == 16 for r in requests)
    if needs_wide and _opset(pre) < QDQ_WIDE_OPSET:
        try:
            pre = onnx.version_converter.convert_version(pre, QDQ_WIDE_OPSET)
        except Exception as e:
            wide = [r.layer for r in requests if r.weight_storage in ("int4", "int16") or r.activation_bits == 16]
            raise ConversionError(f"layers {', '.join(wide)} need opset {QDQ_WIDE_OPSET} for int4/16-bit "
                                  f"Q/DQ, but the graph cannot be converted from opset {_opset(pre)} "
                                  f"({type(e).__name__}: {e}); plan those layers at 8 bits") from e
    overrides, exclude = build_overrides(pre, requests)
    if activation_grids:
        for tensor, entry in activation_overrides(pre, activation_grids).items():
            overrides.setdefault(tensor, entry)
    q = _quantize(pre, calib, work, overrides, exclude)
    layers = _read_back(q, {r.layer: r.kernel for r in requests})
    for r in requests:
        layers[r.layer].update({"weight_bits": sorted(set(r.channel_bits)),
                                "activation_bits": r.activation_bits})
    return q, layers


def check_grid(qproto, requests: Sequence[LayerRequest]) -> None:
    """Raise ``ConversionError`` naming every layer whose stored integer codes are not the simulated
    graph's codes (its ``KernelGrid``): the file must compute what ``quantize`` simulated."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qproto.graph.initializer}
    producer = {o: n for n in qproto.graph.node for o in n.output}
    nodes = {n.name: n for n in qproto.graph.node}
    problems = []
    for r in requests:
        if r.grid is None or r.float_kernel:
            continue
        dq = producer.get(nodes[r.kernel.node].input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            problems.append(f"{r.layer}: no quantized weight initializer")
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
        stored = np.moveaxis(q, r.kernel.channel_axis, 0).reshape(q.shape[r.kernel.channel_axis], -1)
        codes = r.grid.codes()  # (weights per channel, channels); the layouts differ, so compare each
        # channel's integers as a multiset (their levels and how often each occurs)
        off = sum(int(np.sum(np.sort(row) != np.sort(col))) for row, col in zip(stored, codes.T)) \
            if stored.shape == codes.T.shape else stored.size
        if off:
            problems.append(f"{r.layer}: {off} of {stored.size} stored integers differ from the simulated codes")
    if problems:
        raise ConversionError("the ONNX weights are not the simulated graph's: " + "; ".join(problems) +
                              "; the artifact was not written")


def export_onnx_mixed(model, calib_x, plan, out_path, opset: int = 13, qat_model=None) -> Artifact:
    """Mixed-precision QDQ export from a ``BitPlan``; every layer's storage is read back and checked.

    The float graph is the simulated graph's (``qat_model``, else built from ``plan``; see
    ``toolchain.quantize.simulate.simulated_graph``) with its rounded kernels, and each kernel's
    per-channel scales are its simulated steps, so the stored integers are the simulated codes
    (checked, ``check_grid``); activation scales are the simulated graph's (``activation_overrides``;
    ORT calibrates on ``calib_x`` only tensors the simulation has no grid for). Layers not
    in the plan get 8 bits. Raises ``ConversionError`` naming every layer whose requested
    precision the file does not hold (nothing is written then).
    """
    from toolchain.quantize.simulate import (activation_grids, complete_plan, kernel_grids, simulated_graph,
                                             strip_quantization)

    calib = _check_calibration(calib_x, model.input_shape)
    qat = simulated_graph(model, plan, calib, qat_model)
    grids = kernel_grids(qat)
    rounded = strip_quantization(qat, model)
    fp32 = keras_to_onnx(rounded, opset)
    with tempfile.TemporaryDirectory(prefix="onnx-mixed-") as tmp:
        pre = _preprocess(fp32, Path(tmp))
        requests = plan_requests(rounded, pre, complete_plan(rounded, plan), grids)
        q, layers = quantize_requests(pre, calib, requests, Path(tmp), activation_grids(qat))
    check_read_back(layers, requests)
    check_grid(q, requests)
    for name in layers:
        if name not in plan.layers:
            layers[name].update({"weight_bits": None, "activation_bits": 8})
    data = _serialize(q)
    _check_ort_loads(data, out_path)
    path = write_bytes_atomic(out_path, data)
    meta = _quant_metadata("onnx-mixed", q, calib, dict(sorted(layers.items())))
    meta["weight_type"] = "mixed"
    meta["calibration_method"] = "the simulated graph's activation grids (MinMax on the calibration samples " \
                                 "for tensors it has none for)"
    meta["bitplan"] = {"allocator": plan.allocator, "budget": plan.budget, "granularity": plan.granularity}
    meta["simulated_graph"] = "given (quantize stage)" if qat_model is not None else "built from the plan"
    return make_artifact("onnx-mixed", path, meta)


# --------------------------------------------------------------------------------------------
# running


def run_onnx(path, x: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """Float32 outputs of an ONNX file on ``x`` in ONNX Runtime (CPU): float inputs quantized and
    integer outputs dequantized with the graph's own Q/DQ parameters when the file has integer I/O
    (:func:`toolchain.run.run_artifact`)."""
    from toolchain.run import BATCH_SIZE, run_artifact

    return run_artifact(path, x, batch_size or BATCH_SIZE)


__all__ = [
    "ACTIVATION_STORAGE", "CALIBRATION_BATCH", "FOLD_RTOL", "KERNEL_LAYERS", "KernelNode", "LayerRequest",
    "QDQ_WIDE_OPSET", "SUPPORTED_OPSETS", "WEIGHT_STORAGE", "build_overrides", "check_read_back",
    "export_onnx_fp32", "export_onnx_int8", "export_onnx_mixed", "keras_to_onnx", "map_kernel_layers",
    "plan_requests", "quantize_requests", "run_onnx",
]
