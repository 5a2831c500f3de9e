"""Model size, three honest ways (never only the flattering one).

1. **Packed weight bits** (``packed_weight_bits`` / ``packed_weight_bytes``): nonzero kernel
   weights x their planned width -- what the paper calls model size. Pruned zeros cost 0, which
   assumes their positions are free; ``dense_packed_weight_bytes`` is the same stream with every
   weight (zeros included) at its width, i.e. what a plain bit-packed format stores. Per-channel
   scales (``scale_overhead_bytes``: one float32 per quantised output channel) and biases
   (``bias_bytes``: int32 / float32, 4 bytes each) are separate numbers, not in the budget.
2. **Deployable artifacts**: bytes of each file the export stage writes
   (``artifact_sizes(paths)``, ``SizeReport.with_artifacts(paths)``).
3. **gzip'd bytes**: ``gzip -9`` of the dense bit-packed weight codes
   (``gzip_packed_weight_bytes``) and of each artifact.

The packed stream is channel-major: for each planned layer (plan order) and each output channel,
that channel's weights as ``b``-bit two's-complement codes (the symmetric codes of
``toolchain.quantize.kernels``), MSB first; channels at 32 bits are their float32 bytes.
"""
from __future__ import annotations

import gzip
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Mapping

import numpy as np

from toolchain.errors import ConfigError
from toolchain.quantize.bitplan import BitPlan
from toolchain.quantize.kernels import FLOAT_BITS, SCALE_BYTES, Kernel, quantized_codes

BIAS_BYTES = 4
GZIP_LEVEL = 9


@dataclass(frozen=True)
class SizeReport:
    packed_weight_bits: int
    packed_weight_bytes: int
    avg_weight_bits: float                 # packed bits / nonzero weights
    nonzero_weights: int
    total_weights: int
    dense_packed_weight_bytes: int
    scale_overhead_bytes: int
    bias_bytes: int
    gzip_packed_weight_bytes: int
    layers: Mapping[str, dict] = field(default_factory=dict)
    artifacts: Mapping[str, dict] = field(default_factory=dict)   # path -> {bytes, gzip_bytes}

    def with_artifacts(self, paths: Iterable) -> "SizeReport":
        """This report plus the bytes and gzip'd bytes of each deployable artifact."""
        return replace(self, artifacts={**self.artifacts, **artifact_sizes(paths)})

    def to_dict(self) -> dict:
        return asdict(self)


def artifact_sizes(paths: Iterable) -> Dict[str, dict]:
    """``{path: {"bytes": file size, "gzip_bytes": gzip -9 size}}``; a missing path is an error
    naming every missing one."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"artifacts not found: {', '.join(missing)}; pass the files the export stage wrote")
    out = {}
    for p in paths:
        data = p.read_bytes()
        out[str(p)] = {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, GZIP_LEVEL, mtime=0))}
    return out


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """b-bit two's-complement codes, MSB first, as a flat 0/1 uint8 array."""
    u = np.asarray(codes, dtype=np.int64) & ((1 << bits) - 1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return ((u[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)


def packed_stream(kernels: Mapping[str, Kernel], plan: BitPlan) -> bytes:
    """The dense bit-packed weight codes of ``plan`` (module docstring)."""
    chunks = []
    for name, lb in plan.layers.items():
        k = kernels[name]
        widths = np.asarray(_widths(lb, k))
        codes, _ = quantized_codes(k.matrix, widths, k.per_tensor)
        bits_out = []
        for c in range(k.num_channels):
            b = int(widths[c])
            if b >= FLOAT_BITS:
                raw = np.ascontiguousarray(k.matrix[:, c], dtype=">f4").view(np.uint8)
                bits_out.append(np.unpackbits(raw))
            else:
                bits_out.append(_pack(codes[:, c], b))
        chunks.append(np.packbits(np.concatenate(bits_out)).tobytes())
    return b"".join(chunks)


def _widths(lb, k: Kernel):
    if lb.group_bits is None:
        return [lb.weight_bits] * k.num_channels
    widths = list(lb.channel_bits())
    if len(widths) != k.num_channels:
        raise ConfigError(f"plan layer {k.name} has widths for {len(widths)} channels but the kernel has "
                          f"{k.num_channels}; regenerate the plan for this model")
    return widths


def plan_size(model, plan: BitPlan) -> SizeReport:
    """Sizes of ``plan`` applied to ``model`` (the BN-folded float model, or the user's model)."""
    from toolchain.quantize.kernels import kernels_of

    kernels = kernels_of(model)
    missing = [n for n in plan.layers if n not in kernels]
    if missing:
        raise ConfigError(f"plan layers not among the model's kernels: {', '.join(missing)}; "
                          "make the plan for this model")
    biases = {l.name: (int(np.prod(l.bias.shape)) if getattr(l, "use_bias", False) and l.bias is not None else 0)
              for l in model.layers if l.name in plan.layers}
    layers = {}
    packed = dense = scales = bias = nonzero = total = 0
    for name, lb in plan.layers.items():
        k = kernels[name]
        widths = np.asarray(_widths(lb, k), dtype=np.int64)
        nz = k.nonzero_per_channel
        per_channel = k.matrix.shape[0]
        l_packed = int((nz * widths).sum())
        l_dense = int((per_channel * widths).sum())
        quantised = widths < FLOAT_BITS
        l_scales = (1 if k.per_tensor and quantised.any() else int(quantised.sum())) * SCALE_BYTES
        l_bias = biases.get(name, 0) * BIAS_BYTES
        layers[name] = {"weight_bits": lb.weight_bits, "group_bits": list(lb.group_bits) if lb.group_bits else None,
                        "activation_bits": lb.activation_bits, "weights": k.num_weights,
                        "nonzero_weights": int(nz.sum()), "packed_bits": l_packed,
                        "avg_bits": l_packed / max(1, int(nz.sum())), "scale_bytes": l_scales,
                        "bias_bytes": l_bias}
        packed += l_packed
        dense += l_dense
        scales += l_scales
        bias += l_bias
        nonzero += int(nz.sum())
        total += k.num_weights
    stream = packed_stream(kernels, plan)
    return SizeReport(
        packed_weight_bits=packed, packed_weight_bytes=int(math.ceil(packed / 8)),
        avg_weight_bits=packed / max(1, nonzero), nonzero_weights=nonzero, total_weights=total,
        dense_packed_weight_bytes=int(math.ceil(dense / 8)), scale_overhead_bytes=scales, bias_bytes=bias,
        gzip_packed_weight_bytes=len(gzip.compress(stream, GZIP_LEVEL, mtime=0)), layers=layers)
