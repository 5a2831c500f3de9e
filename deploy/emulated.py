"""A Debian bookworm arm64 root filesystem that runs the runner under QEMU user-mode emulation.

Raspberry Pi OS (64-bit) is Debian bookworm arm64 with Python 3.11, so this rootfs gives the Pi's
Python and the aarch64 wheels of numpy, ai-edge-litert and onnxruntime a Pi would install. It
proves an artifact loads and computes the same outputs on aarch64; its timings are QEMU's, never a
Pi's.

How it is built (``ensure_rootfs``; about two minutes, cached):

1. ``mmdebstrap --variant=extract`` unpacks python3, python3-venv, libstdc++6 and ca-certificates
   (with their dependencies) for arm64. The extract variant runs no maintainer script, so no
   binfmt_misc registration is needed: nothing on the host changes.
2. ``qemu-aarch64-static`` is copied in; every arm64 program is started through it explicitly
   (``chroot ROOT /usr/bin/qemu-aarch64-static -cpu cortex-a72 ...``).
3. ``python3 -m venv --without-pip /opt/venv``, then Debian's bundled pip wheel installs the pinned
   packages (``EMULATED_REQUIREMENTS``) inside, through the host's DNS and CA bundle.
4. A smoke test imports numpy, ai_edge_litert and onnxruntime; ``manifest.json`` records the
   recipe hash, versions, build time and size. The build happens in a staging directory renamed
   into place, under a lock, so a cache is complete or absent.

How it runs (``emulated_argv``): in a private mount namespace (``unshare --mount``) a fake
``/proc/cpuinfo`` of the board is bind-mounted into the rootfs, then ``chroot`` + QEMU with
``-cpu cortex-a72`` (Pi 4) or ``cortex-a76`` (Pi 5). Both matter: with QEMU's default ``max`` CPU
and the host's x86 cpuinfo, TFLite int8 kernels have been seen to return wrong results and
onnxruntime to crash at import. Needs root (or unprivileged user namespaces).

The cache lives at ``$TOOLCHAIN_ROOTFS_DIR``, else ``$TOOLCHAIN_CACHE_DIR/rootfs-bookworm-arm64``,
else ``~/.cache/toolchain/rootfs-bookworm-arm64``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from toolchain.errors import TargetUnavailableError

SUITE = "bookworm"
ARCH = "arm64"
ROOTFS_NAME = f"rootfs-{SUITE}-{ARCH}"
ROOTFS_ENV = "TOOLCHAIN_ROOTFS_DIR"
MIRROR_ENV = "TOOLCHAIN_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_PACKAGES = ("python3", "python3-venv", "libstdc++6", "ca-certificates")
#: what the venv installs: the runtimes a Pi would get, and every dependency pinned
EMULATED_REQUIREMENTS = ("numpy==1.26.4", "ai-edge-litert==1.4.0", "onnxruntime==1.31.1")
EMULATED_CONSTRAINTS = (
    "numpy==1.26.4", "ai-edge-litert==1.4.0", "onnxruntime==1.31.1", "backports.strenum==1.2.8",
    "flatbuffers==25.12.19", "protobuf==4.25.9", "packaging==26.3", "tqdm==4.67.1",
    "typing-extensions==4.16.0",
)
QEMU = "qemu-aarch64-static"
VENV_PYTHON = "/opt/venv/bin/python"
#: host tools and the Debian packages that provide them
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", QEMU: "qemu-user-static", "chroot": "coreutils",
              "unshare": "util-linux", "mount": "mount"}
#: one build step may take this long (pip downloads ~60 MB and runs under emulation)
STEP_TIMEOUT_S = 1800
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Board:
    """An emulated board: the QEMU CPU model and the /proc/cpuinfo its kernel shows."""

    name: str
    model: str
    qemu_cpu: str
    cpu_part: str
    cpu_variant: str
    cpu_revision: int
    features: str
    revision: str

    def cpuinfo(self, cores: int = 4) -> str:
        block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\n"
                 "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {v}\n"
                 "CPU part\t: {p}\nCPU revision\t: {r}\n\n")
        text = "".join(block.format(i=i, f=self.features, v=self.cpu_variant, p=self.cpu_part,
                                    r=self.cpu_revision) for i in range(cores))
        return text + (f"Hardware\t: BCM2835\nRevision\t: {self.revision}\n"
                       f"Serial\t\t: 100000000000000{cores}\nModel\t\t: {self.model}\n")


BOARDS: Dict[str, Board] = {
    # Raspberry Pi 4 Model B: BCM2711, 4x Cortex-A72 r0p3
    "pi4": Board("pi4", "Raspberry Pi 4 Model B Rev 1.4", "cortex-a72", "0xd08", "0x0", 3,
                 "fp asimd evtstrm crc32 cpuid", "c03114"),
    # Raspberry Pi 5 Model B: BCM2712, 4x Cortex-A76 r4p1
    "pi5": Board("pi5", "Raspberry Pi 5 Model B Rev 1.0", "cortex-a76", "0xd0b", "0x4", 1,
                 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                 "lrcpc dcpop asimddp", "d04170"),
}


@dataclass(frozen=True)
class Rootfs:
    """A built, cached rootfs: ``path`` holds ``root/`` (the filesystem) and ``manifest.json``."""

    path: Path
    manifest: Dict[str, object]

    @property
    def root(self) -> Path:
        return self.path / "root"

    def cpuinfo(self, board: str) -> Path:
        return self.path / "cpuinfo" / board


def default_rootfs_dir() -> Path:
    if os.environ.get(ROOTFS_ENV):
        return Path(os.environ[ROOTFS_ENV]).expanduser()
    from toolchain.stagecache import cache_root

    return cache_root() / ROOTFS_NAME


def _mirrors() -> List[str]:
    main = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    lines = [f"deb {main} {SUITE} main", f"deb {main} {SUITE}-updates main"]
    if not os.environ.get(MIRROR_ENV):
        lines.append(f"deb {DEFAULT_SECURITY_MIRROR} {SUITE}-security main")
    return lines


def recipe() -> Dict[str, object]:
    return {"version": RECIPE_VERSION, "suite": SUITE, "arch": ARCH,
            "debian_packages": list(DEBIAN_PACKAGES), "requirements": list(EMULATED_REQUIREMENTS),
            "constraints": list(EMULATED_CONSTRAINTS),
            "boards": {k: b.cpuinfo() for k, b in BOARDS.items()}}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def check_host() -> None:
    """Raise ``TargetUnavailableError`` naming everything missing on this machine at once."""
    missing = [f"{tool} (apt-get install -y {pkg})" for tool, pkg in HOST_TOOLS.items()
               if _which(tool) is None]
    problems = []
    if missing:
        problems.append("missing tools: " + ", ".join(missing) + " — install them as root")
    if sys.platform != "linux":
        problems.append(f"the host is {sys.platform}; QEMU user-mode emulation needs Linux")
    if not missing and sys.platform == "linux":
        probe = subprocess.run(_namespace_prefix() + ["--", "true"], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            problems.append("cannot create a mount namespace for chroot ("
                            + (probe.stderr.strip() or f"exit {probe.returncode}")
                            + "); run as root or enable unprivileged user namespaces")
    if problems:
        raise TargetUnavailableError(
            "the emulated Raspberry Pi target cannot run here: " + "; ".join(problems)
            + "; then retry")


def _which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")


def _namespace_prefix() -> List[str]:
    # root can mount in a fresh mount namespace; others need a user namespace mapping them to root
    prefix = [_which("unshare") or "unshare", "--mount", "--fork"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")
    return prefix


# The board's cpuinfo is bind-mounted over the rootfs's placeholder inside the private mount
# namespace, so concurrent runs for different boards do not see each other's file.
_RUN_SCRIPT = ('cpuinfo=$1; root=$2; cpu=$3; shift 3; '
               'mount --bind "$cpuinfo" "$root/proc/cpuinfo" || exit 126; '
               'exec chroot "$root" /usr/bin/' + QEMU + ' -cpu "$cpu" "$@"')


def emulated_argv(rootfs: Rootfs, board: Board, argv: Sequence[str]) -> List[str]:
    """The host command running ``argv`` (an arm64 program inside the rootfs) as on ``board``."""
    return (_namespace_prefix() + ["--", "/bin/sh", "-c", _RUN_SCRIPT, "sh",
                                   str(rootfs.cpuinfo(board.name)), str(rootfs.root),
                                   board.qemu_cpu] + list(argv))


def emulated_env(board: Board, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "QEMU_CPU": board.qemu_cpu, "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


def _host_ca_bundle() -> Path:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
                      "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise TargetUnavailableError(
        "no CA bundle found on this machine for pip inside the emulated rootfs; install "
        "ca-certificates or point SSL_CERT_FILE at a bundle")


def _du(path: Path) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def _step(argv: Sequence[str], what: str, log, env: Optional[Dict[str, str]] = None,
          quiet: bool = False) -> str:
    if not quiet:
        print(f"[emulated rootfs] {what}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(list(argv), env=env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TargetUnavailableError(f"building the emulated rootfs: {what} took more than "
                                     f"{STEP_TIMEOUT_S} s; check the network and retry") from None
    log.write(f"$ {' '.join(argv)}\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
        raise TargetUnavailableError(
            f"building the emulated rootfs failed at '{what}' (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-800:]}; see {log.name}")
    return done.stdout


def _read_manifest(path: Path) -> Optional[Dict[str, object]]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("recipe_hash") != recipe_hash() or not (path / "root" / VENV_PYTHON[1:]
                                                            ).exists():
        return None
    return manifest


def ensure_rootfs(path: Optional[Path] = None, quiet: bool = False,
                  rebuild: bool = False) -> Rootfs:
    """The cached rootfs at ``path`` (default ``default_rootfs_dir()``), built if absent or if
    its recipe changed."""
    path = Path(path) if path is not None else default_rootfs_dir()
    if not rebuild:
        manifest = _read_manifest(path)
        if manifest is not None:
            return Rootfs(path, manifest)
    check_host()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same cache
        manifest = None if rebuild else _read_manifest(path)
        if manifest is None:
            manifest = _build(path, quiet)
        return Rootfs(path, manifest)


def _build(path: Path, quiet: bool) -> Dict[str, object]:
    started = time.monotonic()
    staging = Path(f"{path}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    root = staging / "root"
    try:
        with open(staging / "build.log", "w") as log:
            mm = [_which("mmdebstrap"), "--variant=extract", f"--arch={ARCH}",
                  "--include=" + ",".join(DEBIAN_PACKAGES), "--skip=check/qemu",
                  SUITE, str(root)] + _mirrors()
            _step(mm, f"mmdebstrap {SUITE} {ARCH} (extract: {', '.join(DEBIAN_PACKAGES)})", log,
                  quiet=quiet)
            shutil.copy2(_which(QEMU), root / "usr" / "bin" / QEMU)
            for d in ("proc", "sys/devices/system/cpu", "tmp", "root", "etc/ssl/certs"):
                (root / d).mkdir(parents=True, exist_ok=True)
            os.chmod(root / "tmp", 0o1777)
            (root / "proc" / "cpuinfo").write_text("")  # bind-mount target for the board's file
            for name in ("possible", "present", "online"):  # four cores, like both Pis
                (root / "sys/devices/system/cpu" / name).write_text("0-3\n")
            (staging / "cpuinfo").mkdir()
            for key, board in BOARDS.items():
                (staging / "cpuinfo" / key).write_text(board.cpuinfo())
            rootfs = Rootfs(staging, {})
            pi4 = BOARDS["pi4"]
            run = lambda argv, what, extra=None: _step(  # noqa: E731
                emulated_argv(rootfs, pi4, argv), what, log, emulated_env(pi4, extra), quiet)
            run(["/usr/bin/python3", "-m", "venv", "--without-pip", "/opt/venv"],
                "python3 -m venv /opt/venv")
            # pip needs the host's DNS and CA bundle; both are removed again afterwards
            shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
            shutil.copy2(_host_ca_bundle(), root / "etc/ssl/certs/host-ca-bundle.crt")
            (root / "tmp" / "constraints.txt").write_text("\n".join(EMULATED_CONSTRAINTS) + "\n")
            pip_wheel = sorted((root / "usr/share/python-wheels").glob("pip-*.whl"))
            if not pip_wheel:
                raise TargetUnavailableError("the bookworm rootfs has no bundled pip wheel "
                                             "(python3-venv); the Debian recipe changed")
            proxies = {k: v for k, v in os.environ.items()
                       if k.lower() in ("http_proxy", "https_proxy", "no_proxy", "pip_index_url")}
            run([VENV_PYTHON, f"/usr/share/python-wheels/{pip_wheel[-1].name}/pip", "install",
                 "--isolated", "--disable-pip-version-check", "--no-cache-dir",
                 "--progress-bar", "off", "--only-binary=:all:",
                 "--cert", "/etc/ssl/certs/host-ca-bundle.crt", "-c", "/tmp/constraints.txt"]
                + list(EMULATED_REQUIREMENTS),
                "pip install " + " ".join(EMULATED_REQUIREMENTS) + " (under QEMU)", proxies)
            for leftover in ("etc/resolv.conf", "etc/ssl/certs/host-ca-bundle.crt",
                             "tmp/constraints.txt"):
                (root / leftover).unlink()
            probe = ("import json, platform, numpy, onnxruntime; "
                     "from importlib.metadata import version; "
                     "from ai_edge_litert import interpreter; "
                     "print(json.dumps({'python': platform.python_version(), "
                     "'machine': platform.machine(), 'numpy': numpy.__version__, "
                     "'onnxruntime': onnxruntime.__version__, "
                     "'ai_edge_litert': version('ai-edge-litert')}))")
            versions = json.loads(run([VENV_PYTHON, "-c", probe], "smoke test: import the "
                                      "runtimes").strip().splitlines()[-1])
        manifest = {
            "recipe_hash": recipe_hash(), "recipe": recipe(), "versions": versions,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - started, 1),
            "size_bytes": _du(root), "mirrors": _mirrors(),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if path.exists():  # an outdated recipe: replace it
            old = Path(f"{path}.old-{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, path)
        if not quiet:
            print(f"[emulated rootfs] built {path} in {manifest['build_seconds']} s "
                  f"({manifest['size_bytes'] / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
