"""Model builders: the architectures the toolchain compresses, as Keras Functional models.

Every builder takes ``(input_shape, num_classes, **options)`` and returns an uncompiled
Functional model whose last layer is ``Dense(num_classes, activation="softmax")`` (the relevance
stage strips the softmax). ReLUs are standalone ``Activation("relu")`` layers, as in the MLPerf
Tiny reference models, so BN folding and LRP rules see conv -> BN -> ReLU as separate steps.
Layers carry explicit names, so two builds with the same seed have the same JSON, weights and
``model_hash`` in any process.

``ds_cnn`` and ``resnet8`` reproduce the MLPerf Tiny reference models layer for layer (names,
classes, shapes, parameter counts, L2 1e-4 kernel regularizers, initializers); the tests compare
them with the shipped SavedModel / HDF5 files.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Tuple

import tensorflow as tf

from toolchain.errors import ConfigError
from toolchain.registry import Registry

layers = tf.keras.layers
Shape = Tuple[int, ...]  # one sample: (features,), (steps, channels) or (height, width, channels)
_AXES = {1: "features", 2: "steps, channels", 3: "height, width, channels"}

# MLPerf Tiny trains DS-CNN and ResNet-8 with this L2 weight decay on the conv kernels.
MLPERF_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class Architecture:
    """A registered model builder and the input shapes it is documented (and tested) for."""

    key: str
    build: Callable[..., tf.keras.Model]
    input_shapes: Tuple[Shape, ...]
    description: str


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def _register(key: str, input_shapes: Tuple[Shape, ...], description: str):
    def add(build):
        ARCHITECTURES.register(key, Architecture(key, build, input_shapes, description))
        return build

    return add


def _width(base: int, width_multiplier: float) -> int:
    return max(8, int(round(base * width_multiplier)))


def _relu(x, name: str):
    return layers.Activation("relu", name=name)(x)


def _classifier(x, num_classes: int):
    return layers.Dense(num_classes, activation="softmax", name="predictions")(x)


@_register(
    "digits_cnn",
    ((8, 8, 1),),
    "small CNN for the 8x8 sklearn digits: conv32-conv32-maxpool-conv64@valid-dropout 0.25-"
    "fc128-fc, 62k params; ~97% on the 25% stratified eval split after 10 epochs (~3 s on 2 CPU "
    "cores); the narrower 16-32-32-fc64 variant landed at 94.7-96.9% depending on the seed",
)
def digits_cnn(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    inputs = layers.Input(shape=input_shape, name="input")
    x = layers.Conv2D(32, 3, padding="same", name="conv1")(inputs)
    x = _relu(x, "relu1")
    x = layers.Conv2D(32, 3, padding="same", name="conv2")(x)
    x = _relu(x, "relu2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, padding="valid", name="conv3")(x)
    x = _relu(x, "relu3")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.25, name="dropout")(x)
    x = layers.Dense(128, name="fc1")(x)
    x = _relu(x, "fc1_relu")
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="digits_cnn")


@_register(
    "lenet5",
    ((28, 28, 1), (8, 8, 1), (32, 32, 3)),
    "LeNet-5 style (ReLU, max pooling): conv6@5x5 same - pool - conv16@5x5 - pool - "
    "fc120 - fc84 - fc; the second conv is 'valid' (classic 28-14-10-5 path) when the map is "
    "at least 10x10, else 'same' so 8x8 inputs work",
)
def lenet5(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    inputs = layers.Input(shape=input_shape, name="input")
    x = layers.Conv2D(6, 5, padding="same", name="conv1")(inputs)
    x = _relu(x, "relu1")
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    small = min(x.shape[1], x.shape[2]) < 10
    x = layers.Conv2D(16, 5, padding="same" if small else "valid", name="conv2")(x)
    x = _relu(x, "relu2")
    x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, name="fc1")(x)
    x = _relu(x, "fc1_relu")
    x = layers.Dense(84, name="fc2")(x)
    x = _relu(x, "fc2_relu")
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="lenet5")


@_register(
    "alexnet",
    ((28, 28, 1), (32, 32, 3)),
    "AlexNet style for small images: 5 conv+BN+ReLU (5x5, 5x5, 3x3, 3x3, 3x3; widths "
    "96-256-384-384-256 times width_multiplier, default 0.25) with 3x3/2 max pools after conv 1, "
    "2 and 5, then dropout-fc-dropout-fc (1024 times width_multiplier) - fc",
)
def alexnet(
    input_shape: Shape, num_classes: int, *, width_multiplier: float = 0.25
) -> tf.keras.Model:
    # (filters, kernel, pool after) per conv; AlexNet's 11x11/4 stem would erase a 32x32 image.
    convs = ((96, 5, True), (256, 5, True), (384, 3, False), (384, 3, False), (256, 3, True))
    inputs = layers.Input(shape=input_shape, name="input")
    x = inputs
    for i, (filters, kernel, pool) in enumerate(convs, start=1):
        x = layers.Conv2D(_width(filters, width_multiplier), kernel, padding="same",
                          name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"conv{i}_bn")(x)
        x = _relu(x, f"conv{i}_relu")
        if pool:
            x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    fc_units = _width(1024, width_multiplier)  # AlexNet's 4096 / 16 = 256 at the default 0.25
    for i in (1, 2):
        x = layers.Dropout(0.5, name=f"fc{i}_dropout")(x)
        x = layers.Dense(fc_units, name=f"fc{i}")(x)
        x = _relu(x, f"fc{i}_relu")
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="alexnet")


@_register(
    "vgg16",
    ((28, 28, 1), (32, 32, 3)),
    "VGG16 style: 13 conv3x3+BN+ReLU in 5 blocks (2-2-3-3-3; widths 64-128-256-512-512 times "
    "width_multiplier, default 0.25), a 'same'-padded 2x2 max pool after each block "
    "(28-14-7-4-2-1 and 32-16-8-4-2-1), then fc-dropout-fc-dropout (512 times "
    "width_multiplier) - fc",
)
def vgg16(
    input_shape: Shape, num_classes: int, *, width_multiplier: float = 0.25
) -> tf.keras.Model:
    blocks = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
    inputs = layers.Input(shape=input_shape, name="input")
    x = inputs
    for b, (filters, n_convs) in enumerate(blocks, start=1):
        for c in range(1, n_convs + 1):
            x = layers.Conv2D(_width(filters, width_multiplier), 3, padding="same",
                              name=f"block{b}_conv{c}")(x)
            x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = _relu(x, f"block{b}_relu{c}")
        x = layers.MaxPooling2D(2, padding="same", name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    fc_units = _width(512, width_multiplier)
    for i in (1, 2):
        x = layers.Dense(fc_units, name=f"fc{i}")(x)
        x = _relu(x, f"fc{i}_relu")
        x = layers.Dropout(0.5, name=f"fc{i}_dropout")(x)
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="vgg16")


def _auto_namer():
    """Keras-style default names (conv2d, conv2d_1, ...) as in the MLPerf Tiny reference files."""
    counts: dict = {}

    def name(base: str) -> str:
        n = counts.get(base, 0)
        counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    return name


@_register(
    "ds_cnn",
    ((49, 10, 1),),
    "MLPerf Tiny KWS DS-CNN: conv64@10x4/2 + BN + ReLU + dropout 0.2, 4 x (depthwise 3x3 + BN + "
    "ReLU + conv64@1x1 + BN + ReLU), dropout 0.4, global average pool, fc; 24,908 params at "
    "49x10x1 / 12 classes, same layer names as kws_ref_model",
)
def ds_cnn(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    # Mirrors mlcommons/tiny benchmark/training/keyword_spotting/keras_model.py (ds_cnn).
    name = _auto_namer()
    l2 = tf.keras.regularizers.l2(MLPERF_WEIGHT_DECAY)
    inputs = layers.Input(shape=input_shape, name="input_1")
    x = layers.Conv2D(64, (10, 4), strides=(2, 2), padding="same", kernel_regularizer=l2,
                      name=name("conv2d"))(inputs)
    x = layers.BatchNormalization(name=name("batch_normalization"))(x)
    x = layers.Activation("relu", name=name("activation"))(x)
    x = layers.Dropout(0.2, name=name("dropout"))(x)
    for _ in range(4):
        x = layers.DepthwiseConv2D(depth_multiplier=1, kernel_size=(3, 3), padding="same",
                                   name=name("depthwise_conv2d"))(x)
        x = layers.BatchNormalization(name=name("batch_normalization"))(x)
        x = layers.Activation("relu", name=name("activation"))(x)
        x = layers.Conv2D(64, (1, 1), padding="same", kernel_regularizer=l2,
                          name=name("conv2d"))(x)
        x = layers.BatchNormalization(name=name("batch_normalization"))(x)
        x = layers.Activation("relu", name=name("activation"))(x)
    x = layers.Dropout(0.4, name=name("dropout"))(x)
    x = layers.AveragePooling2D(pool_size=(x.shape[1], x.shape[2]),
                                name=name("average_pooling2d"))(x)
    x = layers.Flatten(name=name("flatten"))(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=name("dense"))(x)
    return tf.keras.Model(inputs, outputs, name="ds_cnn")


@_register(
    "resnet8",
    ((32, 32, 3),),
    "MLPerf Tiny image-classification ResNet-8: conv16 + 3 residual stacks (16, 32/2, 64/2; "
    "1x1/2 conv shortcuts without BN on the strided stacks), Add then ReLU, global average pool, "
    "fc; 78,666 params at 32x32x3 / 10 classes, same layer names as resnet8_cifar10.h5",
)
def resnet8(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    # Mirrors mlcommons/tiny benchmark/training/image_classification/keras_model.py
    # (resnet_v1_eembc), including the creation order that fixes the default layer names.
    name = _auto_namer()

    def conv(filters, kernel, strides):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same",
                             kernel_initializer="he_normal",
                             kernel_regularizer=tf.keras.regularizers.l2(MLPERF_WEIGHT_DECAY),
                             name=name("conv2d"))

    inputs = layers.Input(shape=input_shape, name="input_1")
    x = conv(16, 3, 1)(inputs)
    x = layers.BatchNormalization(name=name("batch_normalization"))(x)
    x = layers.Activation("relu", name=name("activation"))(x)
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        y = conv(filters, 3, strides)(x)
        y = layers.BatchNormalization(name=name("batch_normalization"))(y)
        y = layers.Activation("relu", name=name("activation"))(y)
        y = conv(filters, 3, 1)(y)
        y = layers.BatchNormalization(name=name("batch_normalization"))(y)
        if strides != 1:
            x = conv(filters, 1, strides)(x)  # projection shortcut, no BN (as in the reference)
        x = layers.Add(name=name("add"))([x, y])
        x = layers.Activation("relu", name=name("activation"))(x)
    x = layers.AveragePooling2D(pool_size=min(x.shape[1], x.shape[2]),
                                name=name("average_pooling2d"))(x)
    y = layers.Flatten(name=name("flatten"))(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer="he_normal",
                           name=name("dense"))(y)
    return tf.keras.Model(inputs, outputs, name="resnet8")


@_register(
    "mlp",
    ((64,), (16,)),
    "multilayer perceptron on flat (features,) inputs: fc64-fc32-fc, ReLU; e.g. the 8x8 digits "
    "flattened to 64 features",
)
def mlp(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    inputs = layers.Input(shape=input_shape, name="input")
    x = layers.Dense(64, name="fc1")(inputs)
    x = _relu(x, "fc1_relu")
    x = layers.Dense(32, name="fc2")(x)
    x = _relu(x, "fc2_relu")
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="mlp")


@_register(
    "conv1d_classifier",
    ((32, 3), (49, 10)),
    "1-D CNN on (steps, channels) signals (sensors, audio features): conv16@3-BN-ReLU-maxpool2-"
    "conv32@3-BN-ReLU-global average pool-dropout 0.1-fc",
)
def conv1d_classifier(input_shape: Shape, num_classes: int) -> tf.keras.Model:
    inputs = layers.Input(shape=input_shape, name="input")
    x = layers.Conv1D(16, 3, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = _relu(x, "relu1")
    x = layers.MaxPooling1D(2, name="pool1")(x)
    x = layers.Conv1D(32, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = _relu(x, "relu2")
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    x = layers.Dropout(0.1, name="dropout")(x)
    return tf.keras.Model(inputs, _classifier(x, num_classes), name="conv1d_classifier")


def _options(build: Callable) -> Tuple[str, ...]:
    params = inspect.signature(build).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_model(
    arch: str, input_shape, num_classes: int, seed: int = 0, **options
) -> tf.keras.Model:
    """Build the registered architecture ``arch`` as an uncompiled Functional model.

    The global TF/NumPy/Python seeds are set from ``seed`` first, so the same arguments give the
    same weights. ``options`` go to the builder (``alexnet`` and ``vgg16`` take
    ``width_multiplier``).
    """
    spec = ARCHITECTURES.get(arch)
    rank = len(spec.input_shapes[0])
    try:
        shape = tuple(int(d) for d in input_shape)
        ok = len(shape) == rank and all(d > 0 for d in shape) and tuple(input_shape) == shape
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"input_shape {input_shape!r} for {arch!r} is not {rank} positive integer(s) "
            f"({_AXES[rank]}); pass e.g. {spec.input_shapes[0]}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes {num_classes!r} for {arch!r} is not an integer >= 2; pass the number "
            f"of classes of the dataset"
        )
    allowed = _options(spec.build)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"architecture {arch!r} has no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(allowed) or 'none'}"
        )
    tf.keras.utils.set_random_seed(seed)
    try:
        return spec.build(shape, num_classes, **options)
    except ValueError as err:
        raise ConfigError(
            f"cannot build {arch!r} for input_shape {shape} ({err}); documented input shapes "
            f"are {', '.join(str(s) for s in spec.input_shapes)}"
        ) from err
