"""One table of the layer facts every stage reads (tfmot's supported-layer maps, in one place).

``KERNEL_LAYERS`` holds one frozen :class:`KernelLayer` per Keras layer class whose weights the
toolchain scores, prunes, quantizes and exports: where its kernel lives, which kernel axes are its
input and output channels, how it is quantized, what the converters turn it into, its role in
channel pruning and whether a following BatchNormalization folds into it. ``OTHER_LAYERS`` holds
every other supported layer class with its canonicalization role (kept, dropped, folded) and its
role in the channel walk of filter pruning.

Adding a layer type is one entry here plus whatever rule only that layer needs (e.g. the kernel
layout its converter uses). Stages import these tables; they never restate them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import numpy as np

# canonicalization roles (zennit's canonizers)
KERNEL = "kernel"          # has weights LRP scores per weight
PASS = "pass"              # kept as is; iNNvestigate has a mapping for it
DROP = "drop"              # identity at inference: removed
FOLD = "fold"              # folded into the preceding kernel layer

# channel-walk roles of filter pruning (toolchain.prune.surgery)
INPUT = "input"              # a model input: its channels are fixed
PRODUCER = "producer"        # new output channels; its input channels are consumed
TIED = "tied"                # per-channel layer: input and output channels shrink together
ELEMENTWISE = "elementwise"  # channel-preserving if it maps 0 to 0 (checked per layer)
CARRY = "pass"               # channel-preserving, keeps zeros zero
FLATTEN = "flatten"          # channel c of an ...xC map -> flat indices i with i % C == c
MERGE = "merge"              # residual Add: all inputs share one channel group
BOUNDARY = "boundary"        # mixes or re-lays channels: groups touching it are not prunable


@dataclass(frozen=True)
class KernelLayer:
    """Facts about one kernel layer class.

    ``in_axis`` / ``out_axis``: kernel axes of the input / output channels (``None`` when the
    kernel has no such axis: a depthwise kernel's output channel is (input channel, multiplier),
    its last two axes, in Keras' order ``c * mult + m``).
    """

    cls: str
    kernel_attr: str                 # attribute holding the kernel variable
    in_axis: Optional[int]
    out_axis: Optional[int]
    depthwise: bool                  # output channels = last two kernel axes flattened
    per_tensor: bool                 # weights share one quantization range (else per channel)
    tflite_op: str                   # the builtin op the TFLite converter emits for it
    onnx_ops: Tuple[str, ...]        # the ONNX node types tf2onnx (+ ORT pre-processing) emit
    prune_role: str                  # PRODUCER or TIED
    width_attr: Optional[str]        # config key of the output width (None: follows its input)
    folds_bn: bool                   # a following BatchNormalization folds into it
    lrp_family: str                  # zennit-style layer family for LRP rule composites
    spatial_dims: int                # kernel spatial axes (0 for Dense)

    def channel_matrix(self, kernel: np.ndarray) -> np.ndarray:
        """``kernel`` as a (weights per output channel, output channels) matrix (a view when
        possible). Depthwise: output channel ``c * mult + m`` is ``kernel[..., c, m]``."""
        if self.depthwise:
            return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
        return kernel.reshape(-1, kernel.shape[-1])

    def num_channels(self, kernel_shape) -> int:
        shape = tuple(kernel_shape)
        return int(shape[-2] * shape[-1]) if self.depthwise else int(shape[-1])

    def kernel(self, layer) -> np.ndarray:
        return getattr(layer, self.kernel_attr).numpy()

    def weight_axes(self) -> Mapping[str, Tuple[Optional[int], Optional[int]]]:
        """Weight short name -> (input-channel axis, output-channel axis), for channel surgery."""
        return {self.kernel_attr: (self.in_axis, self.out_axis), "bias": (None, 0)}


def _conv(cls, dims, per_tensor=False) -> KernelLayer:
    # kernel (*spatial, cin, cout)
    return KernelLayer(cls, "kernel", dims, dims + 1, False, per_tensor, "CONV_2D", ("Conv",), PRODUCER,
                       "filters", True, "Conv", dims)


def _depthwise(cls, dims) -> KernelLayer:
    # kernel (*spatial, cin, mult)
    return KernelLayer(cls, "depthwise_kernel", dims, None, True, False, "DEPTHWISE_CONV_2D", ("Conv",),
                       TIED, None, True, "Conv", dims)


#: layer class -> its kernel facts
KERNEL_LAYERS: Mapping[str, KernelLayer] = {k.cls: k for k in (
    _conv("Conv2D", 2),
    # TFLite and tf2onnx both run a Conv1D as a 2-D convolution over a height-1 image
    # (EXPAND_DIMS/RESHAPE around CONV_2D; Unsqueeze + Conv + Squeeze or a 1-D Conv). A bit plan's
    # widths are per tensor: TF 2.14's converter rejects a per-channel FakeQuant on the kernel
    # ExpandDims feeds to that Conv2D ("'tfl.transpose' op has mismatched quantized axes", also
    # when the FakeQuant is applied to the expanded 4-D kernel), as for Dense
    _conv("Conv1D", 1, per_tensor=True),
    _depthwise("DepthwiseConv2D", 2),
    # TensorFlow 2.14's converter rejects a per-channel FakeQuant on a Dense kernel
    # ("'tfl.transpose' op has mismatched quantized axes"); tfmot's default is per tensor too
    KernelLayer("Dense", "kernel", 0, 1, False, True, "FULLY_CONNECTED", ("MatMul", "Gemm"), PRODUCER,
                "units", True, "Dense", 0),
)}


@dataclass(frozen=True)
class OtherLayer:
    """A supported layer without a kernel: what canonicalization and the channel walk do with it.
    ``canonical`` is ``None`` for layers only the channel walk accepts (not LRP-analysable)."""

    cls: str
    canonical: Optional[str]
    channel: str


#: every supported layer class without a kernel
OTHER_LAYERS: Mapping[str, OtherLayer] = {o.cls: o for o in (
    OtherLayer("InputLayer", PASS, INPUT),
    OtherLayer("BatchNormalization", FOLD, TIED),
    OtherLayer("ReLU", PASS, ELEMENTWISE),
    OtherLayer("Activation", PASS, ELEMENTWISE),
    OtherLayer("LeakyReLU", None, ELEMENTWISE),
    OtherLayer("ELU", None, ELEMENTWISE),
    OtherLayer("Softmax", PASS, BOUNDARY),
    OtherLayer("Flatten", PASS, FLATTEN),
    OtherLayer("Reshape", PASS, BOUNDARY),
    OtherLayer("MaxPooling2D", PASS, CARRY),
    OtherLayer("AveragePooling2D", PASS, CARRY),
    OtherLayer("GlobalAveragePooling2D", PASS, CARRY),
    OtherLayer("GlobalMaxPooling2D", PASS, CARRY),
    OtherLayer("ZeroPadding2D", PASS, CARRY),
    OtherLayer("MaxPooling1D", PASS, CARRY),
    OtherLayer("AveragePooling1D", PASS, CARRY),
    OtherLayer("GlobalAveragePooling1D", PASS, CARRY),
    OtherLayer("GlobalMaxPooling1D", PASS, CARRY),
    OtherLayer("ZeroPadding1D", PASS, CARRY),
    OtherLayer("Cropping2D", None, CARRY),
    OtherLayer("UpSampling2D", None, CARRY),
    OtherLayer("Add", PASS, MERGE),
    OtherLayer("Concatenate", PASS, BOUNDARY),
    OtherLayer("Dropout", DROP, CARRY),
    OtherLayer("SpatialDropout1D", DROP, CARRY),
    OtherLayer("SpatialDropout2D", DROP, CARRY),
    OtherLayer("GaussianNoise", DROP, CARRY),
    OtherLayer("GaussianDropout", DROP, CARRY),
    OtherLayer("AlphaDropout", DROP, CARRY),
)}

#: layer class -> attribute holding its kernel
KERNEL_ATTRS: Mapping[str, str] = {c: k.kernel_attr for c, k in KERNEL_LAYERS.items()}
#: layer class -> canonicalization role (KERNEL / PASS / DROP / FOLD)
CANONICAL_ROLES: Mapping[str, str] = {**{c: KERNEL for c in KERNEL_LAYERS},
                                      **{c: o.canonical for c, o in OTHER_LAYERS.items() if o.canonical}}
#: layer class -> channel-walk role of filter pruning
CHANNEL_ROLES: Mapping[str, str] = {**{c: k.prune_role for c, k in KERNEL_LAYERS.items()},
                                    **{c: o.channel for c, o in OTHER_LAYERS.items()}}
#: layer families for LRP rule composites (zennit's LayerMapComposite names)
LAYER_FAMILIES: Mapping[str, Tuple[str, ...]] = {
    fam: tuple(c for c, k in KERNEL_LAYERS.items() if k.lrp_family == fam) for fam in ("Dense", "Conv")}


def kernel_layer(layer_or_class) -> Optional[KernelLayer]:
    """The facts of a layer (or class name), ``None`` when it has no kernel the toolchain handles."""
    cls = layer_or_class if isinstance(layer_or_class, str) else type(layer_or_class).__name__
    return KERNEL_LAYERS.get(cls)


def kernel_names(joiner: str = ", ") -> str:
    """``Conv2D, Conv1D, DepthwiseConv2D or Dense`` for messages."""
    names = list(KERNEL_LAYERS)
    return joiner.join(names[:-1]) + " or " + names[-1]
