"""Model builders and training for the architectures the toolchain compresses.

``ARCHITECTURES`` maps a key (``lenet5``, ``alexnet``, ``vgg16``, ``ds_cnn``, ``resnet8``,
``digits_cnn``) to an ``Architecture`` (builder + documented input shapes); ``build_model`` builds
one as a Functional model, ``train_model`` trains and saves it.
"""
from models.train import TrainResult, compile_classifier, recalibrate_batchnorm, train_model
from models.zoo import ARCHITECTURES, Architecture, build_model

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "TrainResult",
    "build_model",
    "compile_classifier",
    "recalibrate_batchnorm",
    "train_model",
]
