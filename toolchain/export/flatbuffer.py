"""Read a ``.tflite`` flatbuffer with TensorFlow's own generated schema module.

Everything the export stage reports about a TFLite artifact (storage type of every weight, tensor
types per operator, input/output quantization, operators for the MCU op resolver, tensor
lifetimes for the arena estimate) is read back from the written bytes here, never taken from
what was requested. ``tensorflow.lite.python.schema_py_generated`` is the maintained reader
that ships with TensorFlow; no hand-rolled parsing.

``Interpreter.get_tensor`` returns garbage for INT4 tensors (TensorType 17, two weights per
byte), so :func:`decode_weights` unpacks them from the buffer itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from toolchain.errors import ConversionError
from toolchain.layers import KERNEL_LAYERS

#: operators whose second input is a weight kernel (one per layer the plan can name)
KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
#: bytes per element of each TensorType (INT4 packs two elements per byte)
TYPE_BYTES = {
    "FLOAT32": 4, "FLOAT16": 2, "FLOAT64": 8, "INT32": 4, "UINT32": 4, "INT16": 2, "UINT16": 2,
    "INT8": 1, "UINT8": 1, "INT64": 8, "UINT64": 8, "BOOL": 1, "INT4": 0.5, "COMPLEX64": 8,
    "COMPLEX128": 16,
}
NUMPY_DTYPES = {
    "FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "INT16": "int16", "INT8": "int8",
    "UINT8": "uint8", "INT64": "int64", "UINT16": "uint16", "UINT32": "uint32", "BOOL": "bool",
}


def schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


@lru_cache(maxsize=None)
def _enum_names(enum_name: str) -> Dict[int, str]:
    enum = getattr(schema(), enum_name)
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def tensor_type_name(code: int) -> str:
    return _enum_names("TensorType").get(code, f"TYPE_{code}")


def builtin_op_name(code: int) -> str:
    return _enum_names("BuiltinOperator").get(code, f"OP_{code}")


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    type: str
    shape: Tuple[int, ...]
    is_constant: bool
    nbytes: int  # bytes of the constant buffer (0 for activations)
    scales: Tuple[float, ...] = ()
    zero_points: Tuple[int, ...] = ()
    quantized_dimension: int = 0
    sparse: bool = False
    data: Optional[bytes] = field(default=None, repr=False, compare=False)

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def activation_bytes(self) -> int:
        """Bytes this tensor occupies when it lives in the arena."""
        return int(np.ceil(self.num_elements * TYPE_BYTES.get(self.type, 4)))

    def name_parts(self) -> List[str]:
        """Keras layer names mentioned in the tensor name (``model/<layer>/Op;model/<layer>/...``)."""
        parts = []
        for piece in self.name.split(";"):
            segs = piece.split("/")
            if len(segs) >= 2:
                parts.append(segs[1])
        return parts


@dataclass(frozen=True)
class OpInfo:
    index: int
    op: str
    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]
    custom_code: Optional[str] = None


@dataclass(frozen=True)
class FlatbufferInfo:
    tensors: Tuple[TensorInfo, ...]
    ops: Tuple[OpInfo, ...]
    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]
    num_subgraphs: int
    version: int
    size_bytes: int

    def op_names(self) -> List[str]:
        """Distinct operator names in order of first use."""
        seen: List[str] = []
        for op in self.ops:
            key = op.custom_code if op.op == "CUSTOM" else op.op
            if key not in seen:
                seen.append(key)
        return seen

    def kernel_ops(self) -> List[OpInfo]:
        return [op for op in self.ops if op.op in KERNEL_OPS and len(op.inputs) > 1]

    def weight_of(self, op: OpInfo) -> Optional[TensorInfo]:
        """The kernel tensor of a kernel op (through a DENSIFY op for sparse weights)."""
        if op.op not in KERNEL_OPS or len(op.inputs) < 2 or op.inputs[1] < 0:
            return None
        t = self.tensors[op.inputs[1]]
        if t.is_constant:
            return t
        for prod in self.ops:  # sparse weights: DENSIFY(constant) -> kernel
            if t.index in prod.outputs and prod.op in ("DENSIFY", "DEQUANTIZE"):
                src = self.tensors[prod.inputs[0]]
                if src.is_constant:
                    return src
        return t


def read_flatbuffer(data: bytes) -> FlatbufferInfo:
    """Parse ``.tflite`` bytes (subgraph 0) into plain data."""
    s = schema()
    try:
        if not s.Model.ModelBufferHasIdentifier(data, 0):
            raise ValueError("missing TFL3 identifier")
        model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a tflite file"
        raise ConversionError(f"bytes are not a TFLite flatbuffer ({e}); re-export the model") from None
    if not model.subgraphs:
        raise ConversionError("TFLite flatbuffer has no subgraph; re-export the model")
    sg = model.subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tensors or []):
        buf = model.buffers[t.buffer] if model.buffers is not None and t.buffer < len(model.buffers) else None
        raw = None
        if buf is not None and buf.data is not None and len(buf.data):
            raw = bytes(np.asarray(buf.data, dtype=np.uint8).tobytes())
        q = t.quantization
        scales = tuple(float(v) for v in (q.scale if q is not None and q.scale is not None else ()))
        zps = tuple(int(v) for v in (q.zeroPoint if q is not None and q.zeroPoint is not None else ()))
        qdim = int(q.quantizedDimension) if q is not None else 0
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
        tensors.append(TensorInfo(
            index=i, name=(t.name or b"").decode("utf-8", "replace"), type=tensor_type_name(t.type),
            shape=shape, is_constant=raw is not None, nbytes=len(raw) if raw is not None else 0,
            scales=scales, zero_points=zps, quantized_dimension=qdim,
            sparse=t.sparsity is not None, data=raw))
    ops = []
    for i, op in enumerate(sg.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        bc = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = builtin_op_name(bc)
        custom = code.customCode.decode() if name == "CUSTOM" and code.customCode else None
        ops.append(OpInfo(i, name, tuple(int(x) for x in (op.inputs if op.inputs is not None else ())),
                          tuple(int(x) for x in (op.outputs if op.outputs is not None else ())), custom))
    return FlatbufferInfo(tuple(tensors), tuple(ops), tuple(int(x) for x in sg.inputs),
                          tuple(int(x) for x in sg.outputs), len(model.subgraphs), int(model.version),
                          len(data))


def decode_weights(t: TensorInfo) -> np.ndarray:
    """The stored integer codes (or float values) of a constant tensor, in its shape.

    INT4: two's-complement nibbles, element ``2i`` in the low nibble of byte ``i``.
    """
    if t.data is None:
        raise ConversionError(f"tensor {t.name!r} has no constant buffer to decode")
    if t.sparse:
        raise ConversionError(f"tensor {t.name!r} is sparse-encoded; decode the dense model instead")
    n = t.num_elements
    if t.type == "INT4":
        raw = np.frombuffer(t.data, dtype=np.uint8)
        nib = np.empty(raw.size * 2, dtype=np.int8)
        nib[0::2] = (raw & 0x0F).astype(np.int8)
        nib[1::2] = (raw >> 4).astype(np.int8)
        nib = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
        return nib[:n].reshape(t.shape)
    dt = NUMPY_DTYPES.get(t.type)
    if dt is None:
        raise ConversionError(f"cannot decode tensor {t.name!r} of type {t.type}")
    return np.frombuffer(t.data, dtype=dt)[:n].reshape(t.shape)


def dequantize_weights(t: TensorInfo) -> np.ndarray:
    """Stored weights as float64 (``(code - zero_point) * scale`` along the quantized dimension)."""
    codes = decode_weights(t)
    if t.type in ("FLOAT32", "FLOAT16") or not t.scales:
        return codes.astype(np.float64)
    shape = [1] * codes.ndim
    if len(t.scales) > 1:
        shape[t.quantized_dimension] = len(t.scales)
    scale = np.asarray(t.scales, dtype=np.float64).reshape(shape)
    zp = np.asarray(t.zero_points or (0,) * len(t.scales), dtype=np.float64).reshape(shape)
    return (codes.astype(np.float64) - zp) * scale


def output_channel_axis(op: str) -> int:
    """Axis of the output channel in a TFLite kernel: OHWI for CONV_2D / TRANSPOSE_CONV,
    (out, in) for FULLY_CONNECTED, (1, H, W, C*mult) for DEPTHWISE_CONV_2D."""
    return 3 if op == "DEPTHWISE_CONV_2D" else 0


def levels_per_channel(t: TensorInfo, op: str) -> Optional[List[int]]:
    """Distinct stored codes per output channel of the kernel of ``op`` (integer weights only),
    also for per-tensor quantized kernels (FULLY_CONNECTED)."""
    if t.sparse or t.data is None or t.type not in ("INT4", "INT8", "INT16") or not t.shape:
        return None
    codes = decode_weights(t)
    axis = output_channel_axis(op)
    codes = np.moveaxis(codes, axis, -1)
    codes = codes.reshape(-1, codes.shape[-1])
    return [int(np.unique(codes[:, c]).size) for c in range(codes.shape[1])]


#: Keras layer class -> the TFLite operator its kernel becomes
LAYER_OPS = {**{cls: k.tflite_op for cls, k in KERNEL_LAYERS.items()}, "Conv2DTranspose": "TRANSPOSE_CONV"}


def match_layers(info: FlatbufferInfo, kernel_layers: Mapping[str, Tuple[str, str]]) -> Dict[int, str]:
    """Kernel op index -> Keras layer name.

    ``kernel_layers`` maps a name that may appear in tensor names (``conv1``, ``quant_c_conv1``)
    to ``(the user's layer name, its Keras class)``. Only layers whose class becomes the op's type
    are candidates. The kernel tensor's name decides; the converter sometimes merges unrelated
    names into it (a DS-CNN depthwise kernel is called ``...depthwise_conv2d/depthwise;...
    conv2d_4/Conv2D``), so an ambiguous kernel name is narrowed by the op's output name.
    """
    def hits(t: TensorInfo, op: str) -> List[str]:
        out: List[str] = []
        for part in t.name_parts():
            entry = kernel_layers.get(part)
            if entry is not None and LAYER_OPS.get(entry[1]) == op and entry[0] not in out:
                out.append(entry[0])
        return out

    found: Dict[int, str] = {}
    taken = set()
    for op in info.kernel_ops():
        w = info.weight_of(op)
        from_w = hits(w, op.op) if w is not None else []
        from_out = []
        for i in op.outputs:
            from_out.extend(h for h in hits(info.tensors[i], op.op) if h not in from_out)
        pick = None
        if len(from_w) == 1:
            pick = from_w[0]
        else:
            both = [h for h in from_w if h in from_out]
            if len(both) == 1:
                pick = both[0]
            elif not from_w and len(from_out) == 1:
                pick = from_out[0]
        if pick is not None and pick not in taken:
            found[op.index] = pick
            taken.add(pick)
    return found


def describe(info: FlatbufferInfo, kernel_layers: Mapping[str, Tuple[str, str]] = None,
             channel_levels: bool = False) -> dict:
    """JSON-ready metadata read back from the flatbuffer: I/O, ops and per-layer storage
    (``channel_levels``: also the distinct stored codes of every output channel)."""
    kernel_layers = kernel_layers or {}

    def io(idx):
        t = info.tensors[idx]
        return {"name": t.name, "shape": list(t.shape), "dtype": t.type.lower(),
                "scale": t.scales[0] if len(t.scales) == 1 else (list(t.scales) or None),
                "zero_point": t.zero_points[0] if len(t.zero_points) == 1 else (list(t.zero_points) or None)}

    ops = [{"op": op.custom_code or op.op,
            "inputs": [info.tensors[i].type if i >= 0 else None for i in op.inputs],
            "outputs": [info.tensors[i].type for i in op.outputs]} for op in info.ops]
    weight_bytes: Dict[str, int] = {}
    for t in info.tensors:
        if t.is_constant:
            weight_bytes[t.type] = weight_bytes.get(t.type, 0) + t.nbytes
    names = match_layers(info, kernel_layers)
    layers: Dict[str, dict] = {}
    unmatched = []
    for op in info.kernel_ops():
        w = info.weight_of(op)
        x = info.tensors[op.inputs[0]]
        y = info.tensors[op.outputs[0]]
        entry = {
            "op": op.op, "op_index": op.index,
            "weight_type": w.type if w is not None else None,
            "weight_bytes": w.nbytes if w is not None else 0,
            "weight_count": w.num_elements if w is not None else 0,
            "weight_scales": len(w.scales) if w is not None else 0,
            "per_channel": bool(w is not None and len(w.scales) > 1),
            "sparse": bool(w is not None and w.sparse),
            "input_type": x.type, "output_type": y.type,
        }
        lv = levels_per_channel(w, op.op) if w is not None else None
        if lv is not None:
            entry["max_levels_per_channel"] = max(lv)
            if channel_levels:
                entry["levels_per_channel"] = lv
        entry["became"] = _became(entry)
        if op.index in names and names[op.index] not in layers:
            layers[names[op.index]] = entry
        else:
            unmatched.append(entry)
    return {
        "inputs": [io(i) for i in info.inputs], "outputs": [io(i) for i in info.outputs],
        "ops": ops, "op_types": info.op_names(), "weight_bytes_by_type": weight_bytes,
        "layers": layers, "unmatched_kernel_ops": unmatched, "subgraphs": info.num_subgraphs,
        "schema_version": info.version, "sparse_tensors": [t.name for t in info.tensors if t.sparse],
    }


def _became(entry: dict) -> str:
    """One line: what a kernel layer is stored and computed as."""
    w, a = entry["weight_type"], entry["input_type"]
    if w in ("FLOAT32", "FLOAT16") and a in ("FLOAT32",):
        return f"float ({w.lower()} weights)"
    if a == "FLOAT32":
        return f"hybrid ({(w or '?').lower()} weights, float32 activations)"
    scope = "per-channel" if entry["per_channel"] else "per-tensor"
    return f"{(w or '?').lower()} {scope} weights, {a.lower()} activations"
