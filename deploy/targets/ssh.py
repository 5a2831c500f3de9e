"""``ssh://[user@]host[:port]``: a real board, through the system OpenSSH client.

Using ``ssh`` itself means ``~/.ssh/config`` (so ``ssh://NAME`` takes a Host alias), agents,
ProxyJump and known_hosts all work as they do for the user. Host keys are always checked:
``StrictHostKeyChecking`` keeps the default (``ask``, which batch mode turns into a refusal) or
``yes``, and is forced to ``yes`` where a config says ``no`` or ``accept-new`` (a benchmark run
never trusts a key on first sight); a mismatch is refused with a message saying so.
``BatchMode=yes`` means no password or passphrase prompt can hang a run.

One run: ``mktemp -d`` on the device receiving a tar stream of the runner, the artifact and the
inputs under fixed names (so no user file name ever reaches a remote shell), one ``ssh`` per
configuration running the runner with the remote ``python3`` under ``timeout``, then ``rm -rf`` of
that directory whatever happened. Every remote word goes through ``shlex.quote``.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence
from urllib.parse import urlsplit

from deploy.targets.base import (
    RUNNER,
    RunConfig,
    RunRequest,
    Target,
    tail,
    which_or_none,
)
from deploy.targets.local import run_process
from toolchain.errors import ConfigError, TargetUnavailableError

DEFAULT_CONNECT_TIMEOUT_S = 10
#: seconds allowed for the copy and the clean-up calls (the run has its own timeout)
TRANSFER_TIMEOUT_S = 300
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._%-]*)$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
SSH_FORM = "ssh://[user@]host[:port] (host may be a Host alias from ~/.ssh/config)"


def parse_ssh_url(url: str):
    """``(user or None, host, port or None)`` from ``ssh://[user@]host[:port]``."""
    def bad():
        return ConfigError(f"target {url!r} is not a valid SSH address; use {SSH_FORM}, "
                           "e.g. ssh://pi@raspberrypi.local or ssh://mypi")

    parts = urlsplit(url)
    if parts.scheme != "ssh" or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad()
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo if at else None
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    else:
        host, colon, port_text = hostport.partition(":")
        port_text = port_text if colon else None
    if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise bad()
    # ssh aliases are case-sensitive and must never start with "-" (it would read as an option)
    if not _HOST.match(host if not hostport.startswith("[") else f"[{host}]") or (
            user is not None and not _USER.match(user)):
        raise bad()
    return user, host, None if port_text is None else int(port_text)


class SSHTarget(Target):
    key = "target.ssh"

    def __init__(self, host: str, user: Optional[str] = None, port: Optional[int] = None,
                 config_file: Optional[str] = None, remote_python: str = "python3",
                 connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S, ssh: str = "ssh"):
        self.host, self.user, self.port = host, user, port
        self.config_file = None if config_file is None else str(Path(config_file).expanduser())
        self.remote_python = remote_python
        self.connect_timeout = int(connect_timeout)
        self.ssh = ssh
        self._forced_strict = None

    @classmethod
    def from_url(cls, url: str, **options) -> "SSHTarget":
        user, host, port = parse_ssh_url(url)
        return cls(host, user, port, **options)

    @property
    def spec(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}"

    def info(self):
        return dict(super().info(), remote_python=self.remote_python,
                    config_file=self.config_file)

    # -- the ssh command ------------------------------------------------------------------
    def _options(self) -> List[str]:
        opts = []
        if self.config_file:
            opts += ["-F", self.config_file]
        opts += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.port:
            opts += ["-p", str(self.port)]
        if self.user:
            opts += ["-l", self.user]
        return opts

    def _strict_option(self) -> List[str]:
        """``-o StrictHostKeyChecking=yes`` when the effective config would accept a key it
        does not know (``no``/``off`` or ``accept-new``)."""
        if self._forced_strict is None:
            argv = [self.ssh, "-G"] + self._options() + ["--", self.host]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            except FileNotFoundError:
                raise TargetUnavailableError(
                    f"{self.spec}: the OpenSSH client `{self.ssh}` is not installed; install it "
                    "(apt-get install openssh-client)") from None
            if done.returncode != 0:
                raise ConfigError(f"{self.spec}: ssh cannot read its configuration: "
                                  f"{tail(done.stderr, 400)}; fix the ssh config file")
            values = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
            setting = values.get("stricthostkeychecking", "ask").strip().lower()
            self._forced_strict = setting not in ("ask", "true", "yes")
        return ["-o", "StrictHostKeyChecking=yes"] if self._forced_strict else []

    def _argv(self, remote_command: str) -> List[str]:
        return [self.ssh] + self._options() + self._strict_option() + ["--", self.host,
                                                                        remote_command]

    def _call(self, remote_command: str, timeout_s: float, what: str, stdin=None):
        done = run_process(self._argv(remote_command), timeout_s, f"{self.spec} ({what})",
                           stdin=stdin)
        if done.returncode == 255:
            raise self._connection_error(done.stderr)
        return done

    def _connection_error(self, stderr: str) -> TargetUnavailableError:
        s = stderr or ""
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s or "Host key for" in s and \
                "has changed" in s:
            return TargetUnavailableError(
                f"{self.spec}: the host key does not match the one in known_hosts (the device "
                "was reinstalled, or someone is intercepting the connection); check its "
                f"fingerprint and, if it is right, remove the old key with `ssh-keygen -R "
                f"{self.host}` and connect once with `ssh {self.host}` — the toolchain never "
                "disables host key checking")
        if "Host key verification failed" in s or "No " in s and "host key is known" in s:
            return TargetUnavailableError(
                f"{self.spec}: the host key is not in known_hosts, so the device cannot be "
                f"verified; connect once with `ssh {self.host}` and check the fingerprint, then "
                "retry — the toolchain never disables host key checking")
        if "Permission denied" in s or "Too many authentication failures" in s:
            return TargetUnavailableError(
                f"{self.spec}: key authentication failed (no password prompts in batch mode); "
                "install your public key on the device (`ssh-copy-id`) or load it into an "
                "agent, and check the user name")
        if "Could not resolve hostname" in s:
            return TargetUnavailableError(
                f"{self.spec}: the host name does not resolve; check the name or add a Host "
                "entry to ~/.ssh/config")
        return TargetUnavailableError(
            f"{self.spec}: cannot connect ({tail(s, 400)}); check that the device is on, reachable"
            f" and running sshd (connect timeout {self.connect_timeout} s)")

    # -- one benchmark -----------------------------------------------------------------------
    def check(self) -> None:
        if which_or_none(self.ssh) is None:
            raise TargetUnavailableError(f"{self.spec}: the OpenSSH client `{self.ssh}` is not "
                                         "installed; install it (apt-get install openssh-client)")
        self._strict_option()

    def _upload(self, request: RunRequest) -> str:
        with tempfile.TemporaryFile() as stream:
            with tarfile.open(fileobj=stream, mode="w") as tar:
                tar.add(str(RUNNER), arcname="runner.py")
                tar.add(str(request.artifact), arcname=request.artifact_name)
                if request.inputs is not None:
                    tar.add(str(request.inputs), arcname="inputs.npz")
            stream.seek(0)
            script = ('d=$(mktemp -d "${TMPDIR:-/tmp}/toolchain-bench.XXXXXXXX") && '
                      'tar -xf - -C "$d" && printf "%s\\n" "$d"')
            done = self._call("sh -c " + shlex.quote(script), TRANSFER_TIMEOUT_S,
                              "copying the runner", stdin=stream)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines or not lines[-1].startswith("/"):
            raise TargetUnavailableError(
                f"{self.spec}: cannot create a temporary directory and unpack the runner there "
                f"(exit {done.returncode}: {tail(done.stderr, 400)}); the device needs a "
                "POSIX shell, mktemp and tar")
        return lines[-1]

    def _remove(self, remote_dir: str) -> None:
        try:
            self._call("rm -rf -- " + shlex.quote(remote_dir), TRANSFER_TIMEOUT_S, "cleaning up")
        except TargetUnavailableError:
            pass  # the result stands; a leftover temp dir is not worth failing the run

    def run(self, request: RunRequest, configs: Sequence[RunConfig],
            on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
        if request.artifact.is_dir():
            raise ConfigError(f"{request.artifact} is a directory; only .tflite and .onnx files "
                              "run on a device, benchmark Keras models with --target local")
        self.check()
        remote_dir = self._upload(request)
        try:
            results = []
            for config in configs:
                where = f"{self.spec} ({config.label()})"
                args = request.runner_args(config, request.artifact_name,
                                           "inputs.npz" if request.inputs is not None else None)
                py = " ".join(shlex.quote(w) for w in [self.remote_python, "runner.py"] + args)
                limit = int(request.timeout_s)
                script = (f"cd {shlex.quote(remote_dir)} || exit 125; "
                          f"if command -v timeout >/dev/null 2>&1; "
                          f"then exec timeout {limit} {py}; else exec {py}; fi")
                done = self._call("sh -c " + shlex.quote(script),
                                  request.timeout_s + self.connect_timeout + 30, config.label())
                if done.returncode == 127:
                    raise TargetUnavailableError(
                        f"{where}: `{self.remote_python}` was not found on the device; install "
                        "Python 3 there (apt install python3) or name the interpreter with "
                        "--remote-python")
                if done.returncode == 124:
                    raise TargetUnavailableError(
                        f"{where}: no result within {limit} s on the device (stopped); raise "
                        "--timeout or lower --runs")
                self.record(where, done, request, config, results, on_result)
            return results
        finally:
            self._remove(remote_dir)
