"""A throw-away OpenSSH server on 127.0.0.1 for the SSH target tests.

Host and client keys are generated on the fly; the server gets its own sshd_config, the client its
own ssh config and known_hosts (passed with ``-F``), so neither the system's sshd/ssh settings nor
~/.ssh are read or changed.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
SSH_KEYGEN = shutil.which("ssh-keygen")
SSH = shutil.which("ssh")
STARTUP_TIMEOUT_S = 15


def missing_tools() -> str | None:
    missing = [n for n, p in (("sshd", SSHD), ("ssh", SSH), ("ssh-keygen", SSH_KEYGEN)) if not p]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install -y openssh-server "
                "openssh-client)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "toolchain-test", "-f",
                    str(path)], check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text()


@dataclass
class Server:
    dir: Path
    port: int
    user: str
    host_pub: str
    client_key: Path
    remote_tmp: Path
    proc: subprocess.Popen

    def known_hosts_line(self, pub: str | None = None) -> str:
        kind, key = (pub or self.host_pub).split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def client_config(self, name: str, known_hosts: str, strict: str = "yes",
                      port: int | None = None) -> Path:
        """An ssh config file with ``Host benchbox`` and the given known_hosts content."""
        kh = self.dir / f"{name}.known_hosts"
        kh.write_text(known_hosts)
        cfg = self.dir / f"{name}.ssh_config"
        cfg.write_text(
            "Host benchbox\n"
            "  HostName 127.0.0.1\n"
            f"  Port {port or self.port}\n"
            f"  User {self.user}\n"
            f"  IdentityFile {self.client_key}\n"
            "  IdentitiesOnly yes\n"
            "  IdentityAgent none\n"
            f"  UserKnownHostsFile {kh}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            f"  StrictHostKeyChecking {strict}\n"
            "  UpdateHostKeys no\n"
            f"  SetEnv TMPDIR={self.remote_tmp}\n"
            "  LogLevel ERROR\n")
        return cfg

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(tmp: Path) -> Server:
    host_pub = keygen(tmp / "host_ed25519")
    client_pub = keygen(tmp / "client_ed25519")
    (tmp / "authorized_keys").write_text(client_pub)
    os.chmod(tmp / "authorized_keys", 0o600)
    remote_tmp = tmp / "remote-tmp"
    remote_tmp.mkdir()
    user = getpass.getuser()
    port = free_port()
    cfg = tmp / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\n"
        f"HostKey {tmp / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        f"PidFile {tmp / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PubkeyAuthentication yes\nStrictModes no\nPermitRootLogin prohibit-password\n"
        f"AllowUsers {user}\nAcceptEnv TMPDIR\nPrintMotd no\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        # sshd's compiled-in privilege separation directory; a systemd boot would create it
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(tmp / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited at start: {(tmp / 'sshd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"sshd did not listen on {port}: {(tmp / 'sshd.log').read_text()}")
    return Server(tmp, port, user, host_pub, tmp / "client_ed25519", remote_tmp, proc)
