"""Errors a user can act on.

Every error the toolchain raises on purpose derives from ``ToolchainError``. A message says what was
given, what is allowed, and the fix, in one sentence; the CLI prints it as one line (no traceback
unless ``--debug``).
"""


class ToolchainError(Exception):
    """Base class of every error the toolchain raises on purpose."""


class ConfigError(ToolchainError):
    """A bad option, spec or configuration value."""


class DataError(ToolchainError):
    """A dataset that is missing, corrupt, empty, non-finite or of the wrong shape."""


class ModelLoadError(ToolchainError):
    """A model file that is missing, corrupt, of the wrong kind, or unsafe to load."""


class UnsupportedLayerError(ToolchainError):
    """One or more layers the requested stage cannot handle (all offenders are named at once)."""


class ConversionError(ToolchainError):
    """A converter (TFLite, tf2onnx, ORT quantizer) failed or silently dropped a request."""


class VerificationError(ToolchainError):
    """An artifact that does not match its reference within the configured thresholds."""


class TargetUnavailableError(ToolchainError):
    """A deployment target that cannot be reached or lacks a runtime."""
