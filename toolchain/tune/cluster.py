"""A local Ray cluster for ``toolchain tune --address``: started for a run, ended with it.

``local_ray_cluster()`` starts ``ray start --head --block`` in a session of its own and yields its
address (``127.0.0.1:PORT``) once the head listens; on exit it ends exactly that process group
(``ray start --block`` and the cluster processes it spawned), politely first, and removes Ray's
temp folder. Never ``ray stop``, which stops every Ray on the machine. The benchmark
(``benchmarks/tune.py``, part ``cluster``) and the slow test of a two-worker cluster use it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from toolchain.errors import TargetUnavailableError

#: a loaded 2-core machine starts a Ray head in 10-60 s
RAY_START_TIMEOUT_S = 300
#: the GCS listens before the raylet has registered: wait this long after the port opens
RAY_SETTLE_S = 3
#: how long the head gets to end after SIGTERM before its process group is killed
RAY_STOP_GRACE_S = 60


def ray_cli() -> Optional[str]:
    """The ``ray`` command installed beside this Python, or None."""
    return shutil.which("ray", path=str(Path(sys.executable).parent))


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 2, port: Optional[int] = None,
                      start_timeout_s: float = RAY_START_TIMEOUT_S) -> Iterator[str]:
    """Run a local Ray head with ``num_cpus`` worker slots for the duration of the ``with``
    block; yields its address for ``toolchain tune --address``."""
    ray = ray_cli()
    if ray is None:
        raise TargetUnavailableError(f"no `ray` command beside {sys.executable}, so a local Ray cluster cannot "
                                     "be started; install it with pip install -r requirements.txt")
    port = port or 6390 + os.getpid() % 500
    temp = Path("/tmp") / f"ray{os.getpid()}"  # Ray's socket paths must stay short
    temp.mkdir(exist_ok=True)
    # Ray 2.60 clusters authenticate with a token (~/.ray/auth_token): the head and the driver
    # (this process) both use it
    auth_before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    log = (temp / "head.log").open("wb")  # a file, not a pipe: a full pipe would block the head
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={port}",
                             f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, head, temp / "head.log", start_timeout_s)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_before


def _wait_for_port(port: int, head: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            tail = log.read_bytes()[-2000:].decode(errors="replace").strip().replace("\n", " | ")
            raise TargetUnavailableError(f"`ray start --head --port={port}` exited with {head.returncode} ({tail}); "
                                         "free the port or fix the Ray installation, then rerun")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(RAY_SETTLE_S)
                return
        time.sleep(1)
    raise TargetUnavailableError(f"the local Ray head did not listen on port {port} within {timeout_s:.0f} s; "
                                 "rerun on a less loaded machine or pass a longer start timeout")


def _stop_head(head: subprocess.Popen, grace_s: float = RAY_STOP_GRACE_S) -> None:
    """End the Ray head this run started: its process group, politely first."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # whatever of the group outlived the grace period
    except ProcessLookupError:
        pass
