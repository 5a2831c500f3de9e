"""On-disk cache of stage outputs (a Keras model and/or a JSON document per entry), so that
``toolchain compress`` reuses a stage when its inputs are unchanged.

An entry's key is the sha256 of everything the stage's output depends on (input model hash, data
hash, the stage's settings, the toolchain version); entries are written to a temporary directory
and renamed into place, so a reader never sees half an entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple

from toolchain import __version__


def cache_root() -> Path:
    """Where every toolchain cache lives: ``$TOOLCHAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/toolchain``
    (``~/.cache/toolchain``)."""
    base = os.environ.get("TOOLCHAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "toolchain")
    return Path(base).expanduser()


def root() -> Path:
    return cache_root() / "stages"


def key(stage: str, *parts: Any) -> str:
    payload = json.dumps([__version__, stage, *parts], sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def get(entry: str) -> Optional[Tuple[Optional[object], dict]]:
    """``(model or None, document)`` of a complete entry, or None."""
    d = root() / entry
    doc = d / "doc.json"
    if not doc.is_file():
        return None
    try:
        document = json.loads(doc.read_text())
        model = None
        if (d / "model.keras").is_file():
            from toolchain.model_io import load_model

            model = load_model(d / "model.keras")
        return model, document
    except Exception:  # a damaged entry is recomputed, never trusted
        shutil.rmtree(d, ignore_errors=True)
        return None


def put(entry: str, document: dict, model=None) -> None:
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry}-", dir=base))
    try:
        if model is not None:
            from toolchain.model_io import save_model

            save_model(model, staging / "model.keras")
        (staging / "doc.json").write_text(json.dumps(document, default=str))
        target = base / entry
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
