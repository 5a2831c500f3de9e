"""The emulated Raspberry Pi targets. The slow test builds (or reuses) the cached Debian bookworm
arm64 rootfs and checks artifacts compute the same outputs under QEMU as on this machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from deploy import bench, emulated
from deploy.targets import RunConfig, RunRequest, resolve_target
from tests.deploy.conftest import describe_mismatch
from toolchain.errors import TargetUnavailableError

#: float kernels differ between x86 (AVX) and aarch64 (NEON) in accumulation order only; on
#: DS-CNN/kws01 the largest softmax difference seen was 5e-4 (Cortex-A76 XNNPACK kernels)
FLOAT_ATOL = 1e-3
#: int8 through XNNPACK: the same requantization on both; DS-CNN/kws01 showed one element of
#: 6000 one output step apart
INT8_XNNPACK_MAX_STEPS = 1
#: int8 through the builtin kernels (XNNPACK off): aarch64 has its own NEON depthwise/requantize
#: paths; DS-CNN/kws01 showed 430 of 6000 elements apart, at most 18 output steps, 2 of 500
#: predictions changed (the same with QEMU's "max" CPU, so not an emulation artefact)
INT8_BUILTIN_MAX_STEPS = 24
RUNS = 5


def test_boards_and_cpuinfo():
    pi4, pi5 = emulated.BOARDS["pi4"], emulated.BOARDS["pi5"]
    assert (pi4.qemu_cpu, pi5.qemu_cpu) == ("cortex-a72", "cortex-a76")
    info = pi4.cpuinfo()
    assert info.count("processor\t:") == 4 and "CPU part\t: 0xd08" in info
    assert "Raspberry Pi 4" in info and "CPU part\t: 0xd0b" in pi5.cpuinfo()
    assert emulated.recipe_hash() == emulated.recipe_hash()


def test_run_command_binds_cpuinfo_and_selects_the_cpu(tmp_path):
    rootfs = emulated.Rootfs(tmp_path, {})
    argv = emulated.emulated_argv(rootfs, emulated.BOARDS["pi5"], ["/opt/venv/bin/python", "x y"])
    script = argv[argv.index("-c") + 1]
    assert "mount --bind" in script and "chroot" in script and "qemu-aarch64-static" in script
    assert argv[-5:] == [str(tmp_path / "cpuinfo" / "pi5"), str(tmp_path / "root"),
                         "cortex-a76", "/opt/venv/bin/python", "x y"]
    assert emulated.emulated_env(emulated.BOARDS["pi4"])["QEMU_CPU"] == "cortex-a72"


def test_missing_host_tools_are_named_at_once(monkeypatch):
    monkeypatch.setattr(emulated, "_which", lambda tool: None)
    with pytest.raises(TargetUnavailableError) as e:
        emulated.check_host()
    for pkg in ("mmdebstrap", "qemu-user-static", "util-linux"):
        assert pkg in str(e.value)


def test_rootfs_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLCHAIN_ROOTFS_DIR", str(tmp_path / "r"))
    assert emulated.default_rootfs_dir() == tmp_path / "r"
    monkeypatch.delenv("TOOLCHAIN_ROOTFS_DIR")
    monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / "c"))
    assert emulated.default_rootfs_dir() == tmp_path / "c" / "rootfs-bookworm-arm64"


def _rootfs_dir() -> Path:
    # The session conftest points TOOLCHAIN_CACHE_DIR at a fresh temp dir; the rootfs is
    # expensive, so the test uses the machine's cache (or TOOLCHAIN_ROOTFS_DIR) instead.
    if os.environ.get(emulated.ROOTFS_ENV):
        return Path(os.environ[emulated.ROOTFS_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "toolchain" / emulated.ROOTFS_NAME


@pytest.fixture(scope="module")
def rootfs():
    try:
        emulated.check_host()
    except TargetUnavailableError as e:
        pytest.skip(str(e))
    return emulated.ensure_rootfs(_rootfs_dir())


@pytest.mark.slow
@pytest.mark.parametrize("board", ["pi4", "pi5"])
def test_emulated_outputs_match_this_machine(rootfs, artifacts, board):
    manifest = rootfs.manifest
    assert manifest["versions"]["machine"] == "aarch64"
    assert manifest["versions"]["python"].startswith("3.11.")
    target = resolve_target(f"emulated-{board}", rootfs_dir=str(rootfs.path), quiet=True)
    local = resolve_target("local")
    cases = [(artifacts.tflite_int8, RunConfig(1, True)),
             (artifacts.tflite_float, RunConfig(1, True)),
             (artifacts.tflite_int8, RunConfig(1, False)),
             (artifacts.onnx, RunConfig(1))]
    if board == "pi5":
        cases = cases[:2]
    for artifact, config in cases:
        request = RunRequest(artifact, artifacts.inputs_float, runs=RUNS, warmup=1,
                             include_outputs=True)
        (arm,) = target.run(request, [config])
        (x86,) = local.run(request, [config])
        assert arm["emulated"] is True and x86["emulated"] is False
        assert arm["machine"]["machine"] == "aarch64"
        assert arm["emulation"]["qemu_cpu"] == emulated.BOARDS[board].qemu_cpu
        assert arm["runtime"]["name"] in ("ai_edge_litert", "onnxruntime")
        assert arm["runtime"]["fallback"] is False
        a, b = np.array(arm["outputs"]), np.array(x86["outputs"])
        if arm["output"]["dtype"] == "int8":
            steps = INT8_XNNPACK_MAX_STEPS if config.xnnpack else INT8_BUILTIN_MAX_STEPS
            atol = steps * arm["output"]["quantization"][0] + 1e-6
        else:
            atol = FLOAT_ATOL
        assert np.allclose(a, b, atol=atol, rtol=0), \
            f"{artifact.name} {config.label()}: " + describe_mismatch(a, b, atol)
        assert arm["accuracy"] == pytest.approx(np.mean(a.argmax(1) == artifacts.y_eval))
    # nothing left in the rootfs's /tmp
    assert not [p for p in (rootfs.root / "tmp").iterdir() if p.name.startswith("bench-")]


@pytest.mark.slow
def test_emulated_bench_is_labelled_not_pi_timings(rootfs, artifacts, tmp_path):
    result = bench(artifacts.onnx, target="emulated-pi4", data=f"npz:{artifacts.data_npz}",
                   runs=RUNS, out=tmp_path / "b", rootfs_dir=str(rootfs.path), quiet=True)
    assert result.emulated and all(m.emulated for m in result.measurements)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "not Raspberry Pi timings" in md and "QEMU p50 ms" in md
    doc = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert doc["emulated"] is True and doc["target"]["qemu_cpu"] == "cortex-a72"
