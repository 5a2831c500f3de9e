"""Microcontroller bundle for an integer ``.tflite`` (tflite-micro).

``write_mcu_bundle(tflite_path, out_dir, name)`` writes

* ``model_data.h`` / ``model_data.cc``: ``alignas(16) const unsigned char g_<name>_model_data[]``
  and ``const unsigned int g_<name>_model_data_len``, generated in Python the way tflite-micro's
  ``generate_cc_arrays.py`` does (the ``.cc`` includes its header, so the arrays have external
  linkage even though they are ``const``). The array is the model without the strings
  tflite-micro never reads (tensor names, signature defs; :func:`strip_strings`);
* ``op_resolver.h``: a ``tflite::MicroMutableOpResolver<N>`` alias and a registration function
  calling exactly one ``AddXxx()`` per builtin operator the flatbuffer uses (read with
  TensorFlow's generated schema module, mapped through :data:`MICRO_OP_METHODS`), with TFLM's
  type-specialised kernel (``AddConv2D(tflite::Register_CONV_2D_INT8())``,
  :data:`MICRO_OP_VARIANTS`) where every use of the operator has the same tensor types;
* ``manifest.json``: input/output names, shapes, dtypes, scales and zero points, operators and
  their registrations, flash and arena sizes, per kernel layer its stored type (INT4 / INT8) and
  bytes against int8 (``weights``), sha256 of the model and of every generated file.

INT4: ``tflite-mixed`` stores <= 4-bit Conv2D / DepthwiseConv2D / Dense kernels as packed INT4
(TensorType INT4, two weights per byte); the bundle keeps them packed. Measured with the kit's TFLM
(tflite-micro 90b983c2) and the tflite-micro Python package: both run TF 2.14's INT4 flatbuffers
as they are, bit-identical to each other and to TFLite's kernels without XNNPACK (TFLite's
BUILTIN_REF resolver in TF 2.14 has no CONV_2D version 7, the INT4 one, and refuses to load them).

Arena estimate (bytes): tensor lifetimes are read from the flatbuffer (first producing op to last
consuming op; graph inputs live from the start, outputs to the end) and the non-constant tensors
are placed by greedy offline planning, largest first, at the lowest 16-byte aligned offset that
does not overlap a placed tensor alive at the same time (tflite-micro's GreedyMemoryPlanner).
Each CONV_2D / DEPTHWISE_CONV_2D also gets a scratch buffer alive during that op only, sized as
CMSIS-NN's int8 im2col buffer (``2 * kh * kw * cin`` bytes), or, for a packed INT4 kernel (any
kernel op), as its int8 copy (one byte per weight) when that is larger: TFLM's reference kernels
unpack INT4 kernels into arena scratch on every invoke (the kit measured +4,128 B on DS-CNN).
The documented margin on top:
persistent allocations estimated as :data:`PERSISTENT_BYTES_PER_TENSOR` per tensor,
:data:`PERSISTENT_BYTES_PER_OP` per operator and 8 bytes per output channel of quantized kernels
(per-channel multiplier and shift), then :data:`ARENA_SAFETY` (10 %) of the total and rounded up
to 16 bytes. Flash is the model array (``g_<name>_model_data_len``); code size is not included.

When ``write_mcu_bundle`` gets evaluation inputs, the model also runs in tflite-micro itself
(``toolchain.export.micro``), which measures the smallest arena its interpreter needs on this
host. The manifest's ``sizes.arena_bytes`` (and ``McuBundle.arena_bytes``) is the larger of the two.
Measured: the activation plan matches tflite-micro's (its non-persistent "head" was 2,048 B vs
2,336 B planned here, which adds CMSIS-NN scratch), but the 64-bit host's persistent "tail" is
larger than the per-tensor/per-op estimate (2,832 B vs 1,552 B on the test CNN; DS-CNN 5,968 B vs
3,792 B), so on this host the estimate alone would be 2.5-12% short (13,616 vs 13,968 B; 4,288 vs 4,880 B).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError, ConversionError
from toolchain.export.artifact import sha256_bytes, write_bytes_atomic
from toolchain.export.flatbuffer import FlatbufferInfo, read_flatbuffer

ALIGNMENT = 16
BYTES_PER_LINE = 12
PERSISTENT_BYTES_PER_TENSOR = 16   # TfLiteEvalTensor (12 B on 32-bit) + bookkeeping
PERSISTENT_BYTES_PER_OP = 64       # TfLiteNode, registration pointer, kernel op data
PER_CHANNEL_BYTES = 8              # int32 multiplier + int32 shift per output channel
ARENA_SAFETY = 0.10

#: builtin operator -> tflite::MicroMutableOpResolver method (tflite-micro's
#: micro_mutable_op_resolver.h). Operators not listed have no tflite-micro kernel.
MICRO_OP_METHODS: Mapping[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D", "COS": "AddCos", "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv", "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOG_SOFTMAX": "AddLogSoftmax",
    "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic", "MAX_POOL_2D": "AddMaxPool2D", "MAXIMUM": "AddMaximum", "MEAN": "AddMean",
    "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "REDUCE_MAX": "AddReduceMax", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "ROUND": "AddRound", "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle", "READ_VARIABLE": "AddReadVariable",
    "ASSIGN_VARIABLE": "AddAssignVariable", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
_INTEGER_WEIGHTS = ("INT8", "INT4", "INT16", "INT32")

#: builtin operator -> {(input type, weight type for kernel ops / output type otherwise): TFLM's
#: type-specialised registration} (tflite-micro's kernels/*.h at the kit's commit 90b983c2). With
#: CMSIS-NN each one links a single eval path instead of every type's (MLPerf Tiny DS-CNN: ~32 KB less
#: flash); the reference kernels alias them to the generic registration. Release builds do not check
#: the tensor types these variants assume, so one is used only when every use of the operator in the
#: model has exactly its signature: a model with both INT4 and INT8 CONV_2D kernels gets the generic
#: CONV_2D (CMSIS-NN's native s4 kernels are behind both it and Register_CONV_2D_INT4).
MICRO_OP_VARIANTS: Mapping[str, Mapping[Tuple[str, str], str]] = {
    "CONV_2D": {("INT8", "INT8"): "Register_CONV_2D_INT8", ("INT8", "INT4"): "Register_CONV_2D_INT4"},
    "DEPTHWISE_CONV_2D": {("INT8", "INT8"): "Register_DEPTHWISE_CONV_2D_INT8",
                          ("INT8", "INT4"): "Register_DEPTHWISE_CONV_2D_INT4"},
    "FULLY_CONNECTED": {("INT8", "INT8"): "Register_FULLY_CONNECTED_INT8",
                        ("INT8", "INT4"): "Register_FULLY_CONNECTED_INT4"},
    "AVERAGE_POOL_2D": {("INT8", "INT8"): "Register_AVERAGE_POOL_2D_INT8"},
    "MAX_POOL_2D": {("INT8", "INT8"): "Register_MAX_POOL_2D_INT8"},
    "SOFTMAX": {("INT8", "INT8"): "Register_SOFTMAX_INT8"},
    "ADD": {("INT8", "INT8"): "Register_ADD_INT8"},
    "MUL": {("INT8", "INT8"): "Register_MUL_INT8"},
}


def c_identifier(name: str) -> str:
    """``name`` as a C identifier fragment: lower-case ``[a-z0-9_]``, starting with a letter."""
    ident = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_").lower()
    if not ident or not ident[0].isalpha():
        ident = "model_" + ident if ident else "model"
    return ident


# --------------------------------------------------------------------------------------------
# C arrays (generate_cc_arrays.py style)


def cc_arrays(name: str, data: bytes, header_name: str = "model_data.h",
              source_note: str = "") -> Tuple[str, str]:
    """``(header, source)`` text declaring/defining ``g_<name>_model_data`` and its length."""
    ident = c_identifier(name)
    array, length = f"g_{ident}_model_data", f"g_{ident}_model_data_len"
    guard = f"{ident.upper()}_MODEL_DATA_H_"
    note = f"// {source_note}\n" if source_note else ""
    header = (
        "// Generated by toolchain.export.mcu; do not edit.\n" + note +
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"extern const unsigned char {array}[];\n"
        f"extern const unsigned int {length};\n\n"
        f"#endif  // {guard}\n")
    lines = []
    for start in range(0, len(data), BYTES_PER_LINE):
        chunk = data[start:start + BYTES_PER_LINE]
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in chunk) + ",")
    source = (
        "// Generated by toolchain.export.mcu; do not edit.\n" + note +
        f'#include "{header_name}"\n\n'
        f"// Flatbuffers need 16-byte alignment for direct access on the device.\n"
        f"alignas({ALIGNMENT}) const unsigned char {array}[] = {{\n" + "\n".join(lines) + "\n};\n"
        f"const unsigned int {length} = {len(data)};\n")
    return header, source


# --------------------------------------------------------------------------------------------
# Op resolver


def micro_ops(info: FlatbufferInfo) -> List[Tuple[str, str]]:
    """``(builtin operator, AddXxx method)`` per distinct operator, in order of first use.

    Raises ``ConversionError`` naming every operator tflite-micro has no kernel for."""
    ops = info.op_names()
    missing = [op for op in ops if op not in MICRO_OP_METHODS]
    if missing:
        raise ConversionError(
            f"operators {', '.join(missing)} have no tflite-micro kernel (MicroMutableOpResolver "
            f"supports {len(MICRO_OP_METHODS)} builtins); build the MCU bundle from tflite-int8 "
            "(dense, full integer)")
    return [(op, MICRO_OP_METHODS[op]) for op in ops]


@dataclass(frozen=True)
class OpRegistration:
    """How one builtin operator is registered: ``resolver.<method>(tflite::<registration>())``, or
    the generic kernel when ``registration`` is empty."""

    op: str
    method: str
    registration: str = ""
    signatures: Tuple[Tuple[str, str], ...] = ()   # the (input, weight/output) types it runs on

    @property
    def call(self) -> str:
        arg = f"tflite::{self.registration}()" if self.registration else ""
        return f"{self.method}({arg})"

    def to_dict(self) -> dict:
        return {"op": self.op, "call": self.call, "kernel": self.registration or "generic (every type)",
                "types": ["/".join(s) for s in self.signatures]}


def _signature(info: FlatbufferInfo, op) -> Tuple[str, str]:
    """(input activation type, kernel type) of a kernel op; (input, output type) of any other op."""
    first = info.tensors[op.inputs[0]].type if op.inputs and op.inputs[0] >= 0 else "NONE"
    if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        w = info.weight_of(op)
        return first, (w.type if w is not None else "NONE")
    return first, (info.tensors[op.outputs[0]].type if op.outputs else "NONE")


def op_registrations(info: FlatbufferInfo, specialize: bool = True) -> List[OpRegistration]:
    """One :class:`OpRegistration` per distinct operator, in order of first use: the type-specialised
    kernel of :data:`MICRO_OP_VARIANTS` when ``specialize`` and every use of the operator has its
    signature, else the generic one. Raises ``ConversionError`` like :func:`micro_ops`."""
    out = []
    for op, method in micro_ops(info):
        sigs = tuple(sorted({_signature(info, o) for o in info.ops if o.op == op}))
        variants = MICRO_OP_VARIANTS.get(op, {})
        reg = variants.get(sigs[0], "") if specialize and len(sigs) == 1 else ""
        out.append(OpRegistration(op, method, reg, sigs))
    return out


def op_resolver_header(name: str, ops: Sequence[OpRegistration], source_note: str = "") -> str:
    ident = c_identifier(name)
    camel = "".join(p.capitalize() for p in ident.split("_"))
    guard = f"{ident.upper()}_OP_RESOLVER_H_"
    calls = "\n".join(f"  if ((status = resolver.{r.call}) != kTfLiteOk) return status;  // {r.op}"
                      + (f" ({', '.join('/'.join(s) for s in r.signatures)} only)" if r.registration else "")
                      for r in ops)
    note = f"// {source_note}\n" if source_note else ""
    special = ("// Type-specialised kernels (one eval path each, less flash with CMSIS-NN) where every use of an\n"
               "// operator has the same tensor types; they do not check those types in release builds.\n"
               if any(r.registration for r in ops) else "")
    return (
        "// Generated by toolchain.export.mcu; do not edit.\n" + note +
        f"// Exactly the builtin operators the flatbuffer uses: {', '.join(r.op for r in ops)}.\n" + special +
        f"#ifndef {guard}\n#define {guard}\n\n"
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
        f"constexpr unsigned int k{camel}OpCount = {len(ops)};\n"
        f"using {camel}OpResolver = tflite::MicroMutableOpResolver<{len(ops)}>;\n\n"
        f"inline TfLiteStatus Register{camel}Ops({camel}OpResolver& resolver) {{\n"
        "  TfLiteStatus status;\n" + calls + "\n  return kTfLiteOk;\n}\n\n"
        f"#endif  // {guard}\n")


# --------------------------------------------------------------------------------------------
# Arena estimate


@dataclass(frozen=True)
class PlannedBuffer:
    name: str
    size: int
    first_op: int
    last_op: int
    offset: int


@dataclass(frozen=True)
class ArenaEstimate:
    planned_bytes: int              # greedy plan of activations + scratch
    persistent_bytes: int           # documented estimate of tflite-micro's persistent data
    margin_bytes: int               # ARENA_SAFETY of the above
    arena_bytes: int                # what to pass as the tensor arena size
    buffers: Tuple[PlannedBuffer, ...] = field(repr=False, default=())

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "buffers"}
        d["method"] = ("greedy offline planning of tensor lifetimes (largest first, lowest 16-byte "
                       "aligned non-overlapping offset) + per-op scratch (CMSIS-NN conv im2col or the reference "
                       "kernels' unpacked INT4 kernel, whichever is larger); + persistent estimate "
                       f"({PERSISTENT_BYTES_PER_TENSOR} B/tensor, {PERSISTENT_BYTES_PER_OP} B/op, "
                       f"{PER_CHANNEL_BYTES} B/quantized output channel); + {int(ARENA_SAFETY * 100)}% margin")
        d["largest_buffers"] = [asdict(b) for b in sorted(self.buffers, key=lambda b: -b.size)[:5]]
        return d


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def tensor_lifetimes(info: FlatbufferInfo) -> Dict[int, Tuple[int, int]]:
    """Non-constant tensor index -> (first op, last op) it must be alive for."""
    last_op = max(len(info.ops) - 1, 0)
    life: Dict[int, List[int]] = {}
    for t in info.inputs:
        life[t] = [0, 0]
    for op in info.ops:
        for t in op.outputs:
            if t >= 0 and not info.tensors[t].is_constant:
                life.setdefault(t, [op.index, op.index])
                life[t][1] = max(life[t][1], op.index)
        for t in op.inputs:
            if t >= 0 and not info.tensors[t].is_constant:
                life.setdefault(t, [op.index, op.index])
                life[t][1] = max(life[t][1], op.index)
    for t in info.outputs:
        life.setdefault(t, [last_op, last_op])
        life[t][1] = last_op
    return {t: (a, b) for t, (a, b) in life.items()}


#: kernel sets the arena estimate can be specific to (None: bound both)
ARENA_KERNELS = ("cmsis-nn", "reference")


def _scratch(info: FlatbufferInfo, kernels: Optional[str] = None) -> List[Tuple[str, int, int]]:
    """Per-op scratch buffers, alive during their op only: CMSIS-NN's int8 im2col buffer of a
    CONV_2D / DEPTHWISE_CONV_2D (``2 * kh * kw * cin``; also its s4 depthwise buffer) and the
    reference kernels' int8 copy of a packed INT4 kernel (one byte per weight: they unpack the
    nibbles into scratch on every invoke; CMSIS-NN computes on them packed). ``kernels`` None: the
    larger of the two (one firmware links one kernel set, so that bounds both)."""
    if kernels is not None and kernels not in ARENA_KERNELS:
        raise ConfigError(f"kernels {kernels!r} are not known to the arena estimate; use one of "
                          f"{', '.join(ARENA_KERNELS)} (or None for both)")
    out = []
    for op in info.ops:
        if op.op not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2:
            continue
        x, w = info.tensors[op.inputs[0]], info.tensors[op.inputs[1]]
        im2col = 0
        if op.op != "FULLY_CONNECTED" and len(w.shape) == 4 and len(x.shape) == 4:
            im2col = 2 * w.shape[1] * w.shape[2] * x.shape[3]
        unpack = w.num_elements if w.type == "INT4" else 0
        im2col, unpack = (0 if kernels == "reference" else im2col), (0 if kernels == "cmsis-nn" else unpack)
        if max(im2col, unpack):
            kind = "int4-unpack" if unpack > im2col else "im2col"
            out.append((f"scratch:{kind}:{op.op}#{op.index}", max(im2col, unpack), op.index))
    return out


def greedy_plan(items: Sequence[Tuple[str, int, int, int]]) -> Tuple[int, Tuple[PlannedBuffer, ...]]:
    """Place ``(name, size, first, last)`` buffers; returns (arena high-water mark, placements)."""
    order = sorted(items, key=lambda it: (-it[1], it[2], it[0]))
    placed: List[PlannedBuffer] = []
    for name, size, first, last in order:
        size = _align(size)
        live = sorted((p for p in placed if not (p.last_op < first or p.first_op > last)),
                      key=lambda p: p.offset)
        offset = 0
        for p in live:
            if offset + size <= p.offset:
                break
            offset = max(offset, _align(p.offset + p.size))
        placed.append(PlannedBuffer(name, size, first, last, offset))
    high = max((p.offset + p.size for p in placed), default=0)
    return high, tuple(placed)


def estimate_arena(info: FlatbufferInfo, kernels: Optional[str] = None) -> ArenaEstimate:
    """The arena estimate (module docstring) for ``kernels`` (``cmsis-nn``, ``reference``, or None:
    an estimate that holds for both)."""
    items = [(info.tensors[t].name or f"t{t}", info.tensors[t].activation_bytes, a, b)
             for t, (a, b) in tensor_lifetimes(info).items()]
    items += [(name, size, i, i) for name, size, i in _scratch(info, kernels)]
    planned, buffers = greedy_plan(items)
    channels = 0
    for op in info.kernel_ops():
        w = info.weight_of(op)
        if w is not None and w.type in _INTEGER_WEIGHTS and w.shape:
            channels += w.shape[3] if op.op == "DEPTHWISE_CONV_2D" else w.shape[0]
    persistent = (PERSISTENT_BYTES_PER_TENSOR * len(info.tensors) + PERSISTENT_BYTES_PER_OP * len(info.ops)
                  + PER_CHANNEL_BYTES * channels)
    margin = int(np.ceil(ARENA_SAFETY * (planned + persistent)))
    return ArenaEstimate(planned, persistent, margin, _align(planned + persistent + margin), buffers)


# --------------------------------------------------------------------------------------------
# Bundle


@dataclass(frozen=True)
class McuBundle:
    out_dir: Path
    name: str
    files: Mapping[str, Path]
    model_sha256: str
    flash_bytes: int
    arena: ArenaEstimate
    ops: Tuple[str, ...]
    manifest: Mapping = field(repr=False, default_factory=dict)
    micro: Optional[object] = None   # toolchain.export.micro.MicroCheck when checked

    @property
    def arena_bytes(self) -> int:
        """The arena to pass: the estimate, or tflite-micro's measured minimum on this (64-bit)
        host when that is larger."""
        return recommended_arena(self.arena, self.micro)


def recommended_arena(arena: ArenaEstimate, micro=None) -> int:
    return max(arena.arena_bytes, micro.arena_min_bytes if micro is not None else 0)


def _io(info: FlatbufferInfo, idx: int) -> dict:
    t = info.tensors[idx]
    return {"name": t.name, "shape": list(t.shape), "dtype": t.type.lower(),
            "scale": t.scales[0] if len(t.scales) == 1 else (list(t.scales) or None),
            "zero_point": t.zero_points[0] if len(t.zero_points) == 1 else (list(t.zero_points) or None),
            "bytes": t.activation_bytes}


def _layer_label(op, layer_names: Optional[Mapping[int, str]]) -> str:
    name = (layer_names or {}).get(op.index)
    return f"{name} ({op.op} #{op.index})" if name else f"{op.op}#{op.index}"


def check_integer_model(info: FlatbufferInfo, source: str,
                        layer_names: Optional[Mapping[int, str]] = None) -> None:
    """Refuse a model with float kernel layers (tflite-micro runs integer kernels only; a hybrid or
    float layer would need float kernels and their flash), naming every such layer."""
    floats = []
    for op in info.kernel_ops():
        w = info.weight_of(op)
        x = info.tensors[op.inputs[0]]
        if (w is not None and w.type not in _INTEGER_WEIGHTS) or x.type == "FLOAT32":
            floats.append(_layer_label(op, layer_names))
    if floats:
        raise ConversionError(
            f"{source} is not a full-integer model: kernel layers {', '.join(floats)} compute in float, and the "
            "MCU bundle runs integer kernels only; give those layers <= 8-bit weights and 8-bit activations in "
            "the bit plan (no float_layers, no 16/32-bit entries), or build the MCU bundle from tflite-int8")


def weight_storage(info: FlatbufferInfo, layer_names: Optional[Mapping[int, str]] = None) -> dict:
    """Per kernel layer (``layer_names``: op index -> the user's layer name), read from the flatbuffer
    (:func:`toolchain.export.flatbuffer.describe`): the kernel's stored type, its bytes in flash and
    the bytes it would take as int8 (one per weight), and the totals. Biases and scales are the same
    in both and not counted."""
    from toolchain.export.flatbuffer import describe

    meta = describe(info)
    entries = sorted(list(meta["layers"].values()) + list(meta["unmatched_kernel_ops"]),
                     key=lambda e: e["op_index"])
    rows = []
    for e in entries:
        int8 = int(e["weight_count"]) if e["weight_type"] in ("INT4", "INT8") else int(e["weight_bytes"])
        rows.append({"layer": (layer_names or {}).get(e["op_index"]) or f"{e['op']}#{e['op_index']}",
                     "op": e["op"], "op_index": e["op_index"], "stored": e["weight_type"],
                     "weights": int(e["weight_count"]), "bytes": int(e["weight_bytes"]), "int8_bytes": int8,
                     "saved_bytes": int8 - int(e["weight_bytes"])})
    total = {k: sum(r[k] for r in rows) for k in ("weights", "bytes", "int8_bytes", "saved_bytes")}
    return {"layers": rows, "total": total,
            "int4_layers": [r["layer"] for r in rows if r["stored"] == "INT4"],
            "note": "kernel weights only (biases, scales and activations are the same either way); "
                    "int8_bytes = one byte per weight; INT4 packs two weights per byte"}


def buffer_alignments(data: bytes) -> List[int]:
    """For every non-empty buffer of the flatbuffer ``data``: the largest power of two (up to 16)
    dividing the offset of its first byte."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(data, 0)
    out = []
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            # the vector's length prefix (uint32) sits right before the data
            off = buf._tab.Vector(buf._tab.Offset(4))
            out.append(min(16, off & -off) if off else 16)
    return out


def strip_strings(data: bytes) -> Tuple[bytes, str]:
    """``data`` without tensor names, subgraph names, the description and signature defs, which
    tflite-micro never reads (TensorFlow's own ``tensorflow/lite/tools/strip_strings.py``); returns
    (bytes, "") or, when the rewritten flatbuffer would place a buffer less than 4-byte aligned
    (int32 biases are read in place on the microcontroller) or less aligned than the source places
    every buffer (some kernels want 16), (the original bytes, the reason). TensorFlow's flatbuffer
    writer aligns buffers to 4 bytes; TF 2.14's converter already writes 4-, 8- and 16-aligned ones,
    older converters 16 throughout (the MLPerf Tiny DS-CNN int8 file), which then stays unstripped."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    flatbuffer_utils.strip_strings(model)
    stripped = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    worst, before = min(buffer_alignments(stripped), default=16), min(buffer_alignments(data), default=16)
    if worst < max(4, before):
        return data, (f"not stripped: rewriting would align a buffer to {worst} bytes where the source "
                      f"aligns every buffer to {before}")
    return stripped, ""


def write_mcu_bundle(tflite_path, out_dir, name: str = "model", source_format: str = "tflite-int8",
                     check_x: Optional[np.ndarray] = None, check_y: Optional[np.ndarray] = None,
                     strip: bool = True, layer_names: Optional[Mapping[int, str]] = None,
                     specialize: bool = True) -> McuBundle:
    """Write the microcontroller bundle for the integer ``.tflite`` at ``tflite_path`` into ``out_dir``.

    Packed INT4 kernels (``tflite-mixed``'s QAT route for <= 4-bit layers) stay packed: TFLM runs
    them (CMSIS-NN natively, the reference kernels through an unpack scratch buffer the arena
    estimate includes). ``layer_names`` (kernel op index -> the user's layer name, from the source
    artifact's metadata) names layers in the manifest's per-layer flash table (``weights``) and in
    errors. ``specialize``: register TFLM's type-specialised kernels where every use of an operator
    has one signature (:func:`op_registrations`; less flash with CMSIS-NN).

    With ``strip`` the array holds the model without the strings tflite-micro never reads (tensor
    names, signatures: :func:`strip_strings`; DS-CNN int8: 48,808 -> 43,000 B); the manifest keeps the
    names, read from the source. With ``check_x`` (float inputs, e.g. the evaluation split;
    ``check_y`` its labels), the array's model is also run in tflite-micro itself and compared with
    the source file in TFLite (``toolchain.export.micro``); the result goes into the manifest under
    ``tflite_micro``."""
    tflite_path = Path(tflite_path)
    if not tflite_path.is_file():
        raise ConfigError(f"MCU bundle source {tflite_path} does not exist; export tflite-int8 first")
    source_data = tflite_path.read_bytes()
    info = read_flatbuffer(source_data)
    check_integer_model(info, f"{tflite_path.name} ({source_format})", layer_names)
    data, strip_note = strip_strings(source_data) if strip else (source_data, "not stripped (strip=False)")
    ops = op_registrations(info, specialize)
    ident = c_identifier(name)
    source_digest, digest = sha256_bytes(source_data), sha256_bytes(data)
    note = f"Source: {tflite_path.name} ({source_format}), {len(source_data)} bytes, sha256 {source_digest}"
    if data is not source_data:
        note += f"; strings stripped: {len(data)} bytes, sha256 {digest}"
    header, source = cc_arrays(ident, data, "model_data.h", note)
    resolver = op_resolver_header(ident, ops, note)
    arena = estimate_arena(info)
    micro = None
    if check_x is not None:
        from toolchain.export.micro import check_in_micro

        micro = check_in_micro(data, check_x, check_y, reference=source_data)
    out_dir = Path(out_dir)
    files = {"model_data.h": header.encode(), "model_data.cc": source.encode(), "op_resolver.h": resolver.encode()}
    camel = "".join(p.capitalize() for p in ident.split("_"))
    manifest = {
        "name": ident,
        "source": {"file": tflite_path.name, "format": source_format, "bytes": len(source_data),
                   "sha256": source_digest},
        "model": {"bytes": len(data), "sha256": digest, "strings_stripped": data is not source_data,
                  "note": strip_note or "tensor names and signature defs removed (tflite-micro reads neither)"},
        "arrays": {"data": f"g_{ident}_model_data", "length": f"g_{ident}_model_data_len", "alignment": ALIGNMENT},
        "inputs": [_io(info, i) for i in info.inputs],
        "outputs": [_io(info, i) for i in info.outputs],
        "ops": [r.op for r in ops],
        "op_resolver": {"type": f"tflite::MicroMutableOpResolver<{len(ops)}>", "alias": f"{camel}OpResolver",
                        "register": f"Register{camel}Ops", "methods": [r.method for r in ops],
                        "specialized": bool(specialize), "registrations": [r.to_dict() for r in ops]},
        "weights": weight_storage(info, layer_names),
        "sizes": {"flash_bytes": len(data), "arena_bytes": recommended_arena(arena, micro),
                  "arena_basis": ("max of the estimate and tflite-micro's measured minimum on this 64-bit host"
                                  if micro is not None else "estimate"),
                  "arena": arena.to_dict()},
        "tflite_micro": micro.to_dict() if micro is not None else None,
        "files": {fname: {"bytes": len(content), "sha256": sha256_bytes(content)} for fname, content in files.items()},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    paths = {fname: write_bytes_atomic(out_dir / fname, content) for fname, content in files.items()}
    return McuBundle(out_dir, ident, paths, digest, len(data), arena, tuple(r.op for r in ops), manifest, micro)
