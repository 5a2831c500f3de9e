"""The shared result type of every export backend (TFLite, ONNX, MCU).

An :class:`Artifact` is plain data: which format, where the file is, how big it is,
its checksum, and ``metadata`` read back *from the written file* (per-layer storage
types, opset, input/output dtypes and quantization parameters).  Backends return one
per file they write; :mod:`toolchain.run` runs it in its own runtime.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One exported model file.

    ``format`` is a registry key (``tflite-int8``, ``onnx-fp32``, ...), ``path`` the final
    location, ``size_bytes``/``sha256`` describe the file's bytes, and ``metadata`` holds
    what was read back from the file (never what was merely requested).
    """

    format: str
    path: Path
    size_bytes: int
    sha256: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def runtime(self) -> str:
        """``tflite`` or ``onnx``: which runtime executes this artifact."""
        return "onnx" if self.format.startswith("onnx") else "tflite"

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "path": str(self.path),
            "size_bytes": int(self.size_bytes),
            "sha256": self.sha256,
            "metadata": dict(self.metadata),
        }


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and ``os.replace`` it into place,
    so an interrupted export never leaves a truncated file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def make_artifact(format: str, path, metadata: Mapping[str, Any] | None = None) -> Artifact:
    """Build an :class:`Artifact` for a file that is already in place."""
    path = Path(path)
    return Artifact(
        format=format,
        path=path,
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
        metadata=dict(metadata or {}),
    )

