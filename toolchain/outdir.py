"""Output directories that are either complete or absent.

``staged_output(out)`` yields a fresh temporary directory beside ``out``; when the block succeeds
the temporary directory replaces ``out`` in one rename (the previous complete build is kept until
then), and when it fails the temporary directory is removed. An interrupted or failed run thus
leaves the previous complete build or nothing, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from toolchain.errors import ConfigError


def check_output_dir(out: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``out`` cannot become an output directory."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file, not a directory; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out} cannot be written ({probe} is not writable); "
                          "choose a writable --out")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(staging, out)
    os.chmod(out, 0o755)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
