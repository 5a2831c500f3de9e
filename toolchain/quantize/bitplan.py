"""``BitPlan``: which bit width each kernel (or group of its output channels) gets.

Plain data: it serialises to ``bitplan.json``, can be edited by hand and loaded back. The quantize
stage produces it (allocators) and simulates it (tfmot); the export stage maps it onto what TFLite
and ONNX Runtime can store (int4 / int8 weights, int8 / int16 activations, float fallback).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from toolchain.errors import ConfigError
from toolchain.quantize.kernels import FLOAT_BITS

#: weight widths a plan may name; widths TFLite/ORT cannot store go as the next storable width
#: with only 2**b levels used (see the export stage)
ALLOWED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
ALLOWED_ACTIVATION_BITS = (8, 16, 32)  # 32 = keep this layer in float
#: ``keep_float`` name for the model's first kernel layer
FIRST = "first"
BITPLAN_VERSION = 1


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer's kernel.

    ``group_bits`` is None for a per-layer width (``weight_bits``), or one width per group of
    ``group_size`` consecutive output channels (the last group may be smaller); then
    ``weight_bits`` is the widest group's width.
    """

    weight_bits: int
    activation_bits: int = 8
    group_bits: Optional[Tuple[int, ...]] = None
    group_size: Optional[int] = None
    num_channels: Optional[int] = None
    num_weights: Optional[int] = None

    def channel_bits(self) -> Tuple[int, ...]:
        """The width of every output channel (needs ``num_channels``)."""
        if self.group_bits is None:
            if self.num_channels is None:
                raise ConfigError("per-channel widths need num_channels in the plan")
            return (self.weight_bits,) * self.num_channels
        out = []
        for b in self.group_bits:
            out.extend([b] * self.group_size)
        return tuple(out[: self.num_channels]) if self.num_channels else tuple(out)


@dataclass(frozen=True)
class BitPlan:
    layers: Mapping[str, LayerBits]
    allocator: str = "manual"
    budget: Optional[str] = None
    granularity: str = "layer"  # "layer" | "group"
    notes: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        for name, lb in self.layers.items():
            widths = lb.group_bits if lb.group_bits is not None else (lb.weight_bits,)
            bad = [b for b in widths if b not in ALLOWED_WEIGHT_BITS]
            if bad:
                problems.append(f"{name}: weight bits {bad} not in {ALLOWED_WEIGHT_BITS}")
            if lb.activation_bits not in ALLOWED_ACTIVATION_BITS:
                problems.append(f"{name}: activation bits {lb.activation_bits} not in {ALLOWED_ACTIVATION_BITS}")
            if lb.group_bits is not None:
                if not lb.group_size or lb.group_size <= 0:
                    problems.append(f"{name}: group_bits given without a positive group_size")
                elif lb.weight_bits != max(lb.group_bits):
                    problems.append(f"{name}: weight_bits {lb.weight_bits} must equal the widest group {max(lb.group_bits)}")
        if self.granularity not in ("layer", "group"):
            problems.append(f"granularity {self.granularity!r} not in ('layer', 'group')")
        if problems:
            raise ConfigError("invalid bit plan: " + "; ".join(problems) + "; fix bitplan.json")

    def to_dict(self) -> dict:
        return {
            "version": BITPLAN_VERSION, "allocator": self.allocator, "budget": self.budget,
            "granularity": self.granularity, "notes": dict(self.notes),
            "layers": {name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(lb).items()}
                       for name, lb in self.layers.items()},
        }

    @staticmethod
    def from_dict(d: dict) -> "BitPlan":
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise ConfigError(f"bit plan is a {type(d).__name__}{'' if isinstance(d, dict) else ''}, not an object with "
                              "a 'layers' mapping; pass the bitplan.json written by `toolchain quantize`")
        try:
            if d.get("version") != BITPLAN_VERSION:
                raise ConfigError(f"bit plan version {d.get('version')!r} is not {BITPLAN_VERSION}; "
                                  "regenerate it with `toolchain quantize`")
            layers = {}
            for name, lb in d["layers"].items():
                lb = dict(lb)
                if lb.get("group_bits") is not None:
                    lb["group_bits"] = tuple(int(b) for b in lb["group_bits"])
                layers[name] = LayerBits(**lb)
            return BitPlan(layers, d.get("allocator", "manual"), d.get("budget"),
                           d.get("granularity", "layer"), d.get("notes", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"bit plan is malformed ({e}); regenerate it with `toolchain quantize` "
                              "or fix the named field") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "BitPlan":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"bit plan {path} does not exist; pass the bitplan.json written by `toolchain quantize`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"bit plan {path} is not valid JSON ({e}); fix or regenerate it") from None
        try:
            return BitPlan.from_dict(data)
        except ConfigError as e:  # name the file the user gave
            raise ConfigError(f"{path}: {e}") from None

    def check_against(self, model) -> None:
        """Every planned layer exists in ``model`` and has a kernel; report all mismatches."""
        names = {l.name: l for l in model.layers}
        missing = [n for n in self.layers if n not in names]
        no_kernel = [n for n in self.layers if n in names and not hasattr(names[n], "kernel")
                     and not hasattr(names[n], "depthwise_kernel")]
        if missing or no_kernel:
            parts = []
            if missing:
                parts.append(f"layers not in the model: {', '.join(missing)}")
            if no_kernel:
                parts.append(f"layers without a kernel: {', '.join(no_kernel)}")
            raise ConfigError("bit plan does not fit the model (" + "; ".join(parts) +
                              "); make the plan for this model")


def keep_float(plan: BitPlan, model, layers: Sequence[str]) -> BitPlan:
    """``plan`` with ``layers`` kept in float (weights and activations at 32 bits): TFLite's
    selective quantization (``QuantizationDebugger`` denylist, the ``tflite-mixed`` export's
    ``ptq_denylist`` route). ``"first"`` names the model's first kernel layer: XNNPACK's int8
    convolution over a one-channel input is slower than the float one (DS-CNN's 10x4 first conv at
    32 channels: 4.9 vs 3.1 us, ``benchmarks/kernel_speed.py``). Float layers are outside the
    plan's budget; the plan's notes list them."""
    if not layers:
        return plan
    kernels = [l for l in model.layers if l.name in plan.layers]
    skipped = None
    if FIRST in layers and kernels and not _slow_in_int8(kernels[0]):
        # the reason for "first" holds only for a convolution over (nearly) one input channel; an
        # MLP's first Dense or an RGB conv runs faster in int8, so "first" keeps nothing in float there
        first = kernels[0]
        skipped = (f"first: {first.name} is a {type(first).__name__} over {first.input_shape[-1]} input "
                   "channels, which XNNPACK runs faster in int8; kept quantized")
        layers = [n for n in layers if n != FIRST]
    names = resolve_float_layers(layers, [l.name for l in kernels]) if layers else []
    new = dict(plan.layers)
    for n in names:
        new[n] = replace(new[n], weight_bits=FLOAT_BITS, activation_bits=FLOAT_BITS, group_bits=None, group_size=None)
    notes = {**plan.notes, "float_layers": names}
    if skipped:
        notes["float_layers_skipped"] = skipped
    return replace(plan, layers=new, notes=notes)


#: input channels up to which XNNPACK's int8 convolution is slower than its float one
SLOW_INT8_CHANNELS = 2


def _slow_in_int8(layer) -> bool:
    """A convolution over at most ``SLOW_INT8_CHANNELS`` input channels (DS-CNN's first conv)."""
    return type(layer).__name__ in ("Conv2D", "Conv1D", "DepthwiseConv2D") and \
        int(layer.input_shape[-1]) <= SLOW_INT8_CHANNELS


def resolve_float_layers(layers: Sequence[str], kernels: Sequence[str]) -> list:
    """``layers`` (names or ``"first"``) as kernel layer names in order, without repeats;
    ``ConfigError`` naming every name that is not one of ``kernels``."""
    unknown = [n for n in layers if n != FIRST and n not in kernels]
    if unknown:
        raise ConfigError(f"float layer(s) {', '.join(map(repr, unknown))} are not kernel layers of the model; "
                          f"use {FIRST!r} or one of: {', '.join(kernels)}")
    return list(dict.fromkeys(kernels[0] if n == FIRST else n for n in layers if n != FIRST or kernels))
