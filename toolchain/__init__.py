"""Explainability-guided compression of Keras models for edge devices.

From Python (a notebook): ``toolchain.compress(model, (x, y, x_eval, y_eval), recipe={...})`` runs the
whole pipeline on an in-memory Keras model and numpy arrays; ``toolchain.dataset(arrays)`` builds the
``Dataset`` the stage functions take. Both are imported lazily, so ``import toolchain`` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "compress", "dataset"]


def __getattr__(name):
    if name == "compress":  # the module toolchain/compress.py is callable: it runs toolchain.api.compress
        import importlib

        return importlib.import_module("toolchain.compress")
    if name == "dataset":
        from toolchain import api

        return api.dataset
    raise AttributeError(f"module 'toolchain' has no attribute {name!r}")
