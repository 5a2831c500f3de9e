"""Deployment: run an artifact where it will run, and measure it.

- ``deploy/runner.py``: the self-contained script copied to a device (numpy + a TFLite runtime or
  onnxruntime); ``deploy/keras_runner.py``: the same harness for Keras models (local only).
- ``deploy.targets``: ``local``, ``ssh://[user@]host[:port]``, ``emulated-pi4``/``emulated-pi5``
  behind one registry (``TARGETS``: ``target.local``, ``target.ssh``, ``target.emulated_pi4``,
  ``target.emulated_pi5``).
- ``bench``: the stage's verb, measuring one artifact in every requested configuration and
  returning a ``BenchResult`` (``toolchain bench`` on the command line).
"""
from deploy.bench import BenchResult, Measurement, bench, configurations
from deploy.targets import TARGETS, RunConfig, RunRequest, Target, resolve_target

__all__ = ["BenchResult", "Measurement", "RunConfig", "RunRequest", "TARGETS", "Target", "bench",
           "configurations", "resolve_target"]
