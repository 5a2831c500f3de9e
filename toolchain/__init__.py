"""Explainability-guided compression of Keras models for edge devices."""
__version__ = "0.1.0"
