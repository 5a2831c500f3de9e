"""The kernels a bit plan covers, seen as (weights per channel) x (output channels) matrices, and
the symmetric per-channel fake quantisation every other part of the stage is checked against.

Output channel ``c`` of a Conv2D / Dense kernel is ``kernel[..., c]``; of a DepthwiseConv2D kernel
(kh, kw, cin, mult) it is ``kernel[:, :, c // mult, c % mult]`` (Keras' output order). A group is
``group_size`` consecutive output channels (the last may be smaller).

Quantisation is symmetric with the narrow range TFLite uses for weights, per output channel
(per tensor for Dense, ``PER_TENSOR_LAYERS``): ``s_c = max|w_c| / (2**(b-1) - 1)``,
``q = clip(floor(w / s_c + 1/2), -(2**(b-1) - 1), 2**(b-1) - 1) * s_c`` (floor(x + 1/2) is how
TensorFlow's FakeQuant rounds). Width 32 means "kept in float".
An exact zero stays an exact zero at every width, so pruned weights stay pruned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from toolchain.errors import ConfigError
from toolchain.layers import KERNEL_ATTRS as LAYER_KERNEL_ATTRS, KERNEL_LAYERS, kernel_names

#: layer class -> the attribute holding its kernel (read from ``toolchain.layers``)
KERNEL_ATTRS: Mapping[str, str] = LAYER_KERNEL_ATTRS
FLOAT_BITS = 32
#: bytes stored per output channel beside the packed weights: one float32 scale (symmetric, so no
#: zero point); reported as overhead, never counted in the bit budget
SCALE_BYTES = 4
#: layers whose weights share one range per tensor (``KernelLayer.per_tensor``: Dense, whose
#: per-channel FakeQuant TensorFlow 2.14's TFLite converter rejects)
PER_TENSOR_LAYERS = tuple(c for c, k in KERNEL_LAYERS.items() if k.per_tensor)


def channel_matrix(layer_class: str, kernel: np.ndarray) -> np.ndarray:
    """``kernel`` as a (weights per channel, output channels) matrix (a view when possible)."""
    return KERNEL_LAYERS[layer_class].channel_matrix(kernel)


def levels(bits) -> np.ndarray:
    """Largest integer code of a symmetric narrow-range ``bits``-bit quantiser: 2**(b-1) - 1."""
    return (2.0 ** (np.asarray(bits, dtype=np.float64) - 1) - 1)


def channel_scales(matrix: np.ndarray, bits, per_tensor: bool = False) -> np.ndarray:
    """Quantisation step of every channel (0 for an all-zero channel or a channel at 32 bits).

    Per channel: ``max|w_c| / L_c`` with ``L_c = 2**(b_c-1) - 1``. Per tensor (Dense, see
    ``PER_TENSOR_LAYERS``) all channels share one range M = max|W|; with one width that is
    ``M / L``, with several the steps must lie on one grid at the widest width B (the FakeQuant the
    converter reads): step_c = r_c * M / min_c(L_c r_c) with ``r_c = floor(L_B / L_c)``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (m.shape[1],))
    quant = bits < FLOAT_BITS
    scale = np.zeros(m.shape[1])
    if not quant.any():
        return scale
    top = levels(bits[quant])
    if per_tensor:
        widest = levels(bits[quant].max())
        ratio = np.floor(widest / top)
        amax = np.abs(m).max()
        scale[quant] = ratio * amax / (top * ratio).min()
    else:
        scale[quant] = np.abs(m[:, quant]).max(axis=0) / top
    return scale


def quantized_codes(matrix: np.ndarray, bits, per_tensor: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Integer codes (rows, channels) and per-channel steps; a channel at 32 bits or all zero has
    step 0 and codes 0."""
    m = np.asarray(matrix, dtype=np.float64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (m.shape[1],))
    scale = channel_scales(m, bits, per_tensor)
    top = levels(np.minimum(bits, 31))
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.floor(m / safe + 0.5), -top, top)
    codes = np.where(scale > 0, codes, 0.0).astype(np.int64)
    return codes, scale


def fake_quant_channels(matrix: np.ndarray, bits, per_tensor: bool = False) -> np.ndarray:
    """Reference fake quantisation of a (rows, channels) matrix, channel c at ``bits[c]`` bits.

    ``bits`` is one width or one per channel; 32 keeps a channel in float. float64 throughout.
    """
    m = np.asarray(matrix, dtype=np.float64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (m.shape[1],))
    codes, scale = quantized_codes(m, bits, per_tensor)
    return np.where(bits < FLOAT_BITS, codes * scale, m)


def group_slices(num_channels: int, group_size: int | None) -> List[slice]:
    """Consecutive channel groups; ``None`` = one group with every channel (per-layer width)."""
    if group_size is None or group_size >= num_channels:
        return [slice(0, num_channels)]
    return [slice(i, min(i + group_size, num_channels)) for i in range(0, num_channels, group_size)]


@dataclass(frozen=True)
class Kernel:
    """One quantisable kernel of the (BatchNorm-folded) float model."""

    name: str                 # the user's layer name
    layer_class: str
    weights: np.ndarray       # the kernel as the float model holds it (BN folded in)

    @property
    def matrix(self) -> np.ndarray:
        return channel_matrix(self.layer_class, self.weights)

    @property
    def per_tensor(self) -> bool:
        return self.layer_class in PER_TENSOR_LAYERS

    def fake_quant(self, bits) -> np.ndarray:
        """The kernel's matrix fake-quantised at ``bits`` (one width or one per channel)."""
        return fake_quant_channels(self.matrix, bits, self.per_tensor)

    @property
    def num_channels(self) -> int:
        return self.matrix.shape[1]

    @property
    def num_weights(self) -> int:
        return int(self.weights.size)

    @property
    def nonzero_per_channel(self) -> np.ndarray:
        return np.count_nonzero(self.matrix, axis=0)

    @property
    def num_nonzero(self) -> int:
        return int(np.count_nonzero(self.weights))


def kernels_of(model) -> Dict[str, Kernel]:
    """Every kernel of ``model`` (the classes of ``toolchain.layers.KERNEL_LAYERS``), in layer order."""
    out: Dict[str, Kernel] = {}
    for layer in model.layers:
        cls = type(layer).__name__
        if cls in KERNEL_ATTRS:
            out[layer.name] = Kernel(layer.name, cls, getattr(layer, KERNEL_ATTRS[cls]).numpy())
    if not out:
        raise ConfigError(f"model {model.name!r} has no {kernel_names()} layer, so there is "
                          "nothing to quantise; pass a model with at least one such layer")
    return out


def check_widths(candidates: Sequence[int]) -> Tuple[int, ...]:
    """Sorted distinct candidate widths, refusing empty sets and widths a plan cannot name."""
    from toolchain.quantize.bitplan import ALLOWED_WEIGHT_BITS

    widths = tuple(sorted({int(b) for b in candidates}))
    if not widths:
        raise ConfigError("the candidate bit widths are empty; pass at least one width, e.g. --bits 2,4,8")
    bad = [b for b in widths if b not in ALLOWED_WEIGHT_BITS]
    if bad:
        raise ConfigError(f"candidate bit widths {bad} are not allowed; allowed: "
                          f"{', '.join(map(str, ALLOWED_WEIGHT_BITS))} (32 = keep in float); pass e.g. --bits 2,4,8")
    return widths
