"""Child processes for work that can crash natively or leak process-wide state.

The relevance stage (iNNvestigate's graph mode) and the TFLite converter (C++ that can abort on an
odd graph) run in child Pythons. Both are started isolated (``python -I``: the user's working
directory and PYTHON* variables stay off the import path), die with the toolchain (Linux
``PR_SET_PDEATHSIG``), and keep their files in a temp folder named by the parent's pid, so a run
whose parent was killed leaves a folder the next run recognises and removes.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path


def die_with_parent(parent_pid: int):
    """``preexec_fn``: the kernel SIGKILLs the child when the toolchain process dies (Linux).
    Everything is looked up before the fork: the child of a threaded process must not import."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        sigkill = int(signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child still ends with its job
        return None

    def preexec():
        prctl(1, sigkill, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def job_dir(prefix: str) -> str:
    """A private (0700) temp folder ``<prefix><pid>-XXXX`` for one child's files."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def clean_stale_jobs(prefix: str) -> None:
    """Remove ``<prefix><pid>-*`` temp folders whose creating process is gone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    for p in Path(tempfile.gettempdir()).glob(prefix + "*"):
        m = pattern.match(p.name)
        if m is None or int(m.group(1)) == os.getpid() or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def signal_name(returncode: int) -> str:
    """``SIGSEGV`` for a child's return code -11 (``exit code N`` for a plain exit)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
