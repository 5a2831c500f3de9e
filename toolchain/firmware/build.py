"""Build firmware for QEMU's Cortex-M boards against the offline TFLM kit.

The kit (``$TOOLCHAIN_TFLM_KIT``, default ``<repo>/../shared/tflm-kit``) is a TFLM + CMSIS-NN source
tree with startup code, semihosting and a linker script for QEMU MPS2. It is read-only: the TFLM
library is built out of tree with the kit's Makefile (``make lib BUILD=...``) once per (kit content,
CPU, kernels) and cached under ``<toolchain cache>/tflm``; a firmware then only compiles the project
(with the project's own Makefile, using the kit's compiler flags) and links (seconds).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Tuple

from toolchain import stagecache
from toolchain.errors import ConfigError, TargetUnavailableError, ToolchainError

KIT_ENV = "TOOLCHAIN_TFLM_KIT"
REPO = Path(__file__).resolve().parents[2]
#: cpu -> (kit CPU, QEMU machine)
CPUS: Mapping[str, Tuple[str, str]] = {"m4": ("m4", "mps2-an386"), "m7": ("m7", "mps2-an500")}
#: kernels -> kit KERNELS
KERNELS: Mapping[str, str] = {"cmsis-nn": "cmsis_nn", "reference": "ref"}
BUILD_TYPE = "release_with_logs"
#: reserved stack and heap of the firmware (the harness prints the stack high-water mark; TFLM uses
#: no heap with TF_LITE_STATIC_MEMORY)
STACK_BYTES = 0x2000
HEAP_BYTES = 0
#: program -> the Debian package that provides it
TOOLS: Mapping[str, str] = {"arm-none-eabi-gcc": "gcc-arm-none-eabi", "arm-none-eabi-g++": "gcc-arm-none-eabi",
                            "qemu-system-arm": "qemu-system-arm", "make": "make"}
LIBRARY_BUILD_TIMEOUT_S = 3600
#: compiling model_runner.cc (TFLM's headers) takes seconds on an idle machine and took over 600 s
#: on this project's shared 2-core machine under load 50-77
LINK_TIMEOUT_S = 1800
KIT_FW_SOURCES = ("fw/startup.c", "fw/semihost.c", "fw/micro_time_qemu.cc")


def kit_dir() -> Path:
    """The TFLM kit: ``$TOOLCHAIN_TFLM_KIT`` or ``<repo>/../shared/tflm-kit``."""
    kit = Path(os.environ.get(KIT_ENV) or REPO.parent / "shared" / "tflm-kit").expanduser()
    if not (kit / "Makefile").is_file() or not (kit / "tflm").is_dir():
        raise TargetUnavailableError(
            f"the TFLM firmware kit was not found at {kit} (no Makefile and tflm/ there); set "
            f"{KIT_ENV} to the kit's directory (shared/tflm-kit)")
    return kit


def require_tool(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        package = TOOLS.get(program, program)
        raise TargetUnavailableError(
            f"{program} is not installed; it is needed to build and run Cortex-M firmware: "
            f"apt-get install {package}")
    return path


def require_newlib() -> None:
    """newlib-nano and libstdc++ for arm-none-eabi come in their own Debian packages."""
    gcc = require_tool("arm-none-eabi-gcc")
    for lib, package in (("libc_nano.a", "libnewlib-arm-none-eabi"), ("libstdc++_nano.a", "libstdc++-arm-none-eabi-newlib")):
        found = subprocess.run([gcc, "-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard", "-mthumb",
                                f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(found):
            raise TargetUnavailableError(f"arm-none-eabi-gcc has no {lib}; apt-get install {package}")


def check_cpu_kernels(cpu: str, kernels: str) -> None:
    if cpu not in CPUS:
        raise ConfigError(f"cpu {cpu!r} is not supported; use one of {', '.join(CPUS)}")
    if kernels not in KERNELS:
        raise ConfigError(f"kernels {kernels!r} are not supported; use one of {', '.join(KERNELS)}")


@lru_cache(maxsize=4)
def kit_hash(kit: Path) -> str:
    """sha256 over the kit's Makefile, fw/ and tflm/ (paths and contents)."""
    h = hashlib.sha256()
    paths = [kit / "Makefile"] + sorted(p for d in ("fw", "tflm") for p in (kit / d).rglob("*") if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(kit)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _make_vars(cpu: str, kernels: str, build: Path) -> list:
    return [f"CPU={CPUS[cpu][0]}", f"KERNELS={KERNELS[kernels]}", f"BUILD_TYPE={BUILD_TYPE}", f"BUILD={build}"]


def compiler_flags(cpu: str, kernels: str) -> Dict[str, str]:
    """The kit's CXXFLAGS/CFLAGS/ARCH_FLAGS for this CPU and kernel set (``make print-...``)."""
    kit = kit_dir()
    flags = {}
    for var in ("CXXFLAGS", "CFLAGS", "ARCH_FLAGS"):
        done = subprocess.run(["make", "-s", "-C", str(kit), f"print-{var}"] + _make_vars(cpu, kernels, Path("/nonexistent")),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolchainError(f"make print-{var} in {kit} failed: {done.stderr.strip()[-400:]}")
        flags[var] = done.stdout.strip()
    return flags


def cache_dir() -> Path:
    return stagecache.root().parent / "tflm"


def library_dir(cpu: str, kernels: str) -> Tuple[Path, dict]:
    """Where the library for (kit content, cpu, kernels, compiler, flags) is cached, and that key's parts."""
    check_cpu_kernels(cpu, kernels)
    kit = kit_dir()
    require_tool("make")
    require_tool("arm-none-eabi-g++")
    require_newlib()
    gcc_version = subprocess.run(["arm-none-eabi-gcc", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    parts = {"kit": str(kit), "kit_sha256": kit_hash(kit), "cpu": cpu, "kernels": kernels,
             "build_type": BUILD_TYPE, "gcc": gcc_version, "flags": compiler_flags(cpu, kernels)}
    key = hashlib.sha256(json.dumps({k: v for k, v in parts.items() if k != "kit"},
                                    sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"lib-{cpu}-{kernels}-{key}", parts


def library(cpu: str = "m4", kernels: str = "cmsis-nn", jobs: int = 0) -> Path:
    """The cached ``libtflm.a`` for (kit, cpu, kernels), built with the kit's Makefile when missing."""
    final, parts = library_dir(cpu, kernels)
    kit = kit_dir()
    lib = final / "libtflm.a"
    if lib.is_file():
        return lib
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{cpu}-{kernels}-", dir=str(final.parent)))
    try:
        jobs = jobs or os.cpu_count() or 2
        done = subprocess.run(["make", f"-j{jobs}", "-C", str(kit), "lib"] + _make_vars(cpu, kernels, work),
                              capture_output=True, text=True, timeout=LIBRARY_BUILD_TIMEOUT_S)
        built = work / f"lib_{CPUS[cpu][0]}_{KERNELS[kernels]}_{BUILD_TYPE}" / "libtflm.a"
        if done.returncode != 0 or not built.is_file():
            raise ToolchainError(f"building the TFLM library ({cpu}, {kernels}) in {work} failed: "
                                 f"{(done.stderr or done.stdout).strip()[-800:]}")
        staged = work / "out"
        staged.mkdir()
        shutil.copy2(built, staged / "libtflm.a")
        (staged / "build.json").write_text(json.dumps(parts, indent=2) + "\n")
        try:
            os.rename(staged, final)
        except OSError:
            if not lib.is_file():   # another process won the race only if its library is there
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def _run(cmd, cwd, what: str, timeout: float = LINK_TIMEOUT_S) -> str:
    try:
        done = subprocess.run([str(c) for c in cmd], cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"{what} did not finish within {timeout:.0f} s ({cmd[0]} in {cwd}); the machine is "
                             "overloaded or the compiler hangs: retry when it is idle") from None
    if done.returncode != 0:
        raise ToolchainError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-1200:]}")
    return done.stdout


def link_firmware(project_dir: Path, harness_dir: Path, build_dir: Path, cpu: str, kernels: str,
                  lib: Path) -> Path:
    """Compile the project (its own Makefile, the kit's flags), the harness and the kit's startup
    code, and link ``fw.elf`` with the kit's linker script."""
    kit = kit_dir()
    flags = compiler_flags(cpu, kernels)
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    tflm = kit / "tflm"
    # the project's Makefile, as a user would run it
    _run(["make", "-C", project_dir, f"TFLM_DIR={tflm}", "CXX=arm-none-eabi-g++", "AR=arm-none-eabi-ar",
          f"CPU_FLAGS={flags['ARCH_FLAGS']} -mthumb", f"TFLM_FLAGS={flags['CXXFLAGS']}", "OPT=-O2",
          f"BUILD={build_dir / 'project'}"], project_dir, "building the firmware project")
    includes = [f"-I{project_dir}", f"-I{harness_dir}", f"-I{kit / 'fw'}", f"-I{tflm}",
                f"-I{tflm / 'third_party/flatbuffers/include'}", f"-I{tflm / 'third_party/gemmlowp'}",
                f"-I{tflm / 'third_party/cmsis/CMSIS/Core/Include'}"]
    objects = []
    for src in [harness_dir / "main.cc"] + [kit / s for s in KIT_FW_SOURCES]:
        obj = build_dir / (src.stem + ".o")
        cxx = src.suffix == ".cc"
        _run(["arm-none-eabi-g++" if cxx else "arm-none-eabi-gcc",
              *(flags["CXXFLAGS"] if cxx else flags["CFLAGS"]).split(), "-O2", *includes, "-c", src, "-o", obj],
             build_dir, f"compiling {src.name}")
        objects.append(obj)
    elf = build_dir / "fw.elf"
    _run(["arm-none-eabi-g++", *flags["ARCH_FLAGS"].split(), "-mthumb", "--specs=nano.specs", "-nostartfiles",
          "-Wl,--gc-sections", f"-Wl,-T,{kit / 'fw/mps2.ld'}", f"-Wl,--defsym=__kit_stack_size={STACK_BYTES}",
          f"-Wl,--defsym=__kit_heap_size={HEAP_BYTES}", f"-Wl,-Map,{build_dir / 'fw.map'}",
          *objects, build_dir / "project" / "libmodel_runner.a", lib, "-lm", "-o", elf],
         build_dir, "linking fw.elf")
    return elf


@dataclass(frozen=True)
class ElfSizes:
    text: int
    rodata: int
    data: int
    bss: int
    arena_reserved: int       # the static tensor arena inside .bss
    model_bytes: int          # the model array inside .rodata

    @property
    def flash_bytes(self) -> int:
        """text + rodata (model included) + the .data initialisers stored in flash."""
        return self.text + self.rodata + self.data

    @property
    def static_ram_bytes(self) -> int:
        return self.data + self.bss


def elf_sizes(elf: Path, model_array: str) -> ElfSizes:
    sections = {}
    for line in _run(["arm-none-eabi-size", "-A", elf], elf.parent, "arm-none-eabi-size").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    symbols = {}
    for line in _run(["arm-none-eabi-nm", "-S", "-C", elf], elf.parent, "arm-none-eabi-nm").splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4:
            symbols[parts[3].split("::")[-1]] = int(parts[1], 16)
    extra = sum(sections.get(s, 0) for s in (".ARM.extab", ".ARM.exidx"))
    return ElfSizes(sections.get(".text", 0) + extra, sections.get(".rodata", 0), sections.get(".data", 0),
                    sections.get(".bss", 0), symbols.get("g_arena", 0), symbols.get(model_array, 0))
