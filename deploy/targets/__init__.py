"""Where a benchmark runs: one registry of targets, named on the command line as

    local | ssh://[user@]host[:port] | emulated-pi4 | emulated-pi5 | qemu-cortex-m4 | qemu-cortex-m7

``resolve_target(spec, **options)`` turns the string into a ``Target``; options a target does not
take are ignored (``config_file``/``remote_python``/``connect_timeout`` are SSH's,
``rootfs_dir``/``quiet`` the emulated boards', ``python`` local's).
"""
from __future__ import annotations

import inspect

from deploy.targets.base import RunConfig, RunRequest, Target
from deploy.targets.emulated import EmulatedPi4Target, EmulatedPi5Target
from deploy.targets.local import LocalTarget
from deploy.targets.qemu_cortex_m import QemuCortexM4Target, QemuCortexM7Target
from deploy.targets.ssh import SSH_FORM, SSHTarget
from toolchain.errors import ConfigError
from toolchain.registry import Registry

TARGETS: Registry[type] = Registry("target")
TARGETS.register("target.local", LocalTarget)
TARGETS.register("target.ssh", SSHTarget)
TARGETS.register("target.emulated_pi4", EmulatedPi4Target)
TARGETS.register("target.emulated_pi5", EmulatedPi5Target)
TARGETS.register("target.qemu_cortex_m4", QemuCortexM4Target)
TARGETS.register("target.qemu_cortex_m7", QemuCortexM7Target)

TARGET_FORMS = ("local", SSH_FORM, "emulated-pi4", "emulated-pi5", "qemu-cortex-m4", "qemu-cortex-m7")


def target_key(spec: str) -> str:
    """The registry key a CLI target string names."""
    if spec.startswith("ssh://"):
        return "target.ssh"
    key = "target." + spec.strip().replace("-", "_")
    if key == "target.ssh" or key not in TARGETS:
        raise ConfigError(f"target {spec!r} is not known; use one of: {'; '.join(TARGET_FORMS)}")
    return key


def resolve_target(spec: str, **options) -> Target:
    cls = TARGETS.get(target_key(spec))
    factory = cls.from_url if cls is SSHTarget else cls
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return factory(spec, **kwargs) if cls is SSHTarget else factory(**kwargs)


__all__ = ["RunConfig", "RunRequest", "TARGETS", "TARGET_FORMS", "Target", "resolve_target",
           "target_key"]
