"""Output directories that are either complete or absent, and never in a place that would hurt.

``check_output_dir(out, inputs=[...])`` runs before any work: ``out`` must not be an input, hold an
input, sit inside an input (a SavedModel directory), be ``/``, the working directory or one of its
parents, or a system directory. ``staged_output(out)`` yields a fresh staging directory beside
``out`` (``.NAME.partial-PID-XXXX``); when the block succeeds the staging directory replaces ``out``
in one rename (the previous complete build is kept until then), and when it fails it is removed.
Staging folders of earlier runs whose process is dead (interrupted, SIGKILLed) are removed by the
next run. Files and directories get the user's normal mode (``0666/0777 & ~umask``).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from toolchain.errors import ConfigError

#: directories (and everything under them) that no run may write into or replace
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/boot", "/lib", "/lib32",
               "/lib64", "/libx32", "/run", "/var/lib", "/var/log", "/snap")
#: staging folders without a pid in their name (older toolchains) count as stale after this long
STALE_UNNAMED_S = 24 * 3600
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(out: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]] = ()) -> Path:
    """Fail early, before any work, when ``out`` cannot or must not become an output directory.

    ``inputs``: the paths this run reads (model, data file, recipe, bit plan, ...); ``None`` entries
    are skipped."""
    text = str(out)
    if not text.strip():
        raise ConfigError("--out is empty; pass a new directory such as --out build/run1")
    out = Path(text).expanduser()
    real = _real(out)
    if real == Path("/"):
        raise ConfigError(f"--out {text} is the root directory; pass a new directory such as --out build/run1")
    for system in SYSTEM_DIRS:
        if _within(real, Path(system)):
            raise ConfigError(f"--out {text} is inside the system directory {system}; "
                              "pass a directory of your own such as --out build/run1")
    cwd = _real(os.getcwd())
    if _within(cwd, real):
        raise ConfigError(f"--out {text} is the working directory or one of its parents, which the run "
                          "would replace; pass a new subdirectory such as --out build/run1")
    for given in inputs:
        if given is None or not str(given):
            continue
        inp = _real(given)
        if _within(inp, real):
            what = "is" if inp == real else "holds"
            raise ConfigError(f"--out {text} {what} the input {given}, which the run would replace; "
                              "pass a separate output directory")
        if inp.is_dir() and _within(real, inp):
            raise ConfigError(f"--out {text} is inside the input {given}; pass an output directory "
                              "outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file, not a directory; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out} cannot be written ({probe} is not writable); "
                          "choose a writable --out")
    return out


def check_output_file(path: str | os.PathLike) -> Path:
    """A single output file (``train --out model.keras``): not in a system directory, not a
    directory, FIFO or device."""
    real = _real(path)
    for system in SYSTEM_DIRS:
        if _within(real, Path(system)):
            raise ConfigError(f"--out {path} is inside the system directory {system}; "
                              "pass a file of your own such as --out models/model.keras")
    if real.exists() and not real.is_file():
        raise ConfigError(f"--out {path} exists and is not a regular file; pass a new file name")
    return Path(path)


def check_artifact_name(name: Optional[str]) -> Optional[str]:
    """``--name`` is a plain file name: the artifacts must land inside ``--out``."""
    if name is None:
        return None
    if (not name.strip() or name in (".", "..") or "/" in name or os.sep in name
            or (os.altsep and os.altsep in name) or "\x00" in name or name.startswith(".")):
        raise ConfigError(f"--name {name[:80]!r} is not a plain file name; pass a name without "
                          "path separators or a leading dot, such as --name kws_model")
    return name


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(root: Path) -> None:
    """Give ``root`` and everything in it the mode a plain ``open``/``mkdir`` would (mkstemp and
    mkdtemp create 0600/0700)."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                exe = os.stat(p).st_mode & 0o100
                os.chmod(p, (0o777 if exe else 0o666) & ~mask)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_staging(out: Path) -> list:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` beside ``out`` left by dead runs."""
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    if not parent.is_dir():
        return removed
    for prefix in (f".{out.name}.partial-", f".{out.name}.old-"):
        for p in parent.glob(glob_escape(prefix) + "*"):
            m = _STAGING.match(p.name)
            if m is not None and m.group("name") == out.name:
                stale = not _alive(int(m.group("pid")))
            else:
                try:
                    stale = time.time() - p.lstat().st_mtime > STALE_UNNAMED_S
                except FileNotFoundError:
                    continue
            if stale and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
        normal_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            if not out.exists() and (old / "previous").exists():  # put the previous build back
                os.replace(old / "previous", out)
            shutil.rmtree(old, ignore_errors=True)
