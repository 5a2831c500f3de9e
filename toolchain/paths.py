"""Checks on the paths a user passes in, made before anything opens them."""
from __future__ import annotations

import os
import stat
from typing import Optional

from toolchain.errors import ConfigError, ModelLoadError


def check_input_path(path: Optional[str], what: str = "model", error=ModelLoadError) -> None:
    """``path`` must be a regular file or a directory: opening a FIFO blocks forever, a device
    streams forever, a socket cannot be opened. A missing path is left to the loader's own message."""
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror}); pass a readable file") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise error(f"{what} {path} is {kind}, not a file or directory; pass a regular {what} file")


def data_path(spec: Optional[str]) -> Optional[str]:
    """The file or folder a dataset spec reads (``npz:PATH``, ``kws01:PATH``), else ``None``."""
    if not spec or ":" not in spec:
        return None
    kind, _, rest = spec.partition(":")
    return (rest or None) if kind in ("npz", "kws01", "images") else None


def check_command_inputs(args) -> list:
    """Check every input path on ``args`` (model, artifact, recipe, bit plan, thresholds, data
    file); return them for ``check_output_dir(out, inputs=...)``."""
    inputs = []
    for attr, what, error in (("model", "model", ModelLoadError), ("artifact", "artifact", ModelLoadError),
                              ("recipe", "recipe", ConfigError), ("check", "recipe", ConfigError), ("bitplan", "bit plan", ConfigError),
                              ("thresholds", "thresholds file", ConfigError)):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_input_path(value, what, error)
            inputs.append(value)
    spec = data_path(getattr(args, "data", None))
    if spec is not None:
        from toolchain.errors import DataError

        check_input_path(spec, "dataset", DataError)
        inputs.append(spec)
    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        inputs.append(data_dir)
    return inputs
