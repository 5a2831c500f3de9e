"""Firmware on emulated Cortex-M: the project builds against the TFLM kit, runs on QEMU, and its
outputs equal TFLite's reference kernels on the same int8 samples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.firmware.conftest import needs_firmware_tools
from toolchain.errors import TargetUnavailableError

DSCNN = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "mlperf-tiny" / "kws_ref_model_int8.tflite"
KWS_SAMPLES = 10
#: CMSIS-NN and TFLM's reference kernels implement TFLite's integer arithmetic exactly
#: (the kit measured 1000/1000 bit-identical DS-CNN outputs), so no LSB of slack
MAX_INT8_DIFF = 0
#: the MCU bundle's arena estimate may exceed what TFLM uses by at most this factor
MAX_ARENA_OVERESTIMATE = 1.5


def _check_against_reference(run, tflite_path):
    from toolchain.firmware import compare_with_reference, reference_outputs

    ref = reference_outputs(tflite_path, run.build.inputs)
    agreement = compare_with_reference(run, ref)
    off = np.argwhere(run.outputs.reshape(len(ref), -1) != ref.reshape(len(ref), -1))
    assert agreement.max_abs_diff <= MAX_INT8_DIFF, (
        f"{len(off)} output elements differ from TFLite BUILTIN_REF (first at {off[:5].tolist()}), "
        f"max {agreement.max_abs_diff} LSB")
    assert agreement.top1_agree == agreement.samples
    return agreement


@pytest.mark.skipif(not DSCNN.is_file(), reason=f"the MLPerf Tiny DS-CNN is not at {DSCNN} (../shared absent)")
def test_project_files_name_ops_and_arena(tmp_path):
    from toolchain.firmware import write_firmware_project

    project = write_firmware_project(DSCNN, tmp_path / "p", name="kws")
    assert project.ops == ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX")
    resolver = (tmp_path / "p" / "op_resolver.h").read_text()
    assert resolver.count("resolver.Add") == 6 and "MicroMutableOpResolver<6>" in resolver
    assert f"#define MODEL_RUNNER_ARENA_SIZE {project.arena_estimate_bytes}" in (tmp_path / "p" / "model_arena.h").read_text()
    data = (tmp_path / "p" / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_kws_model_data[]" in data
    assert f"g_kws_model_data_len = {DSCNN.stat().st_size}" in data
    for name in ("Makefile", "CMakeLists.txt", "README.md", "model_runner.h", "model_runner.cc"):
        assert (tmp_path / "p" / name).is_file()
    assert project.input.dtype == "int8" and project.input.nbytes == 490


def test_missing_tools_and_kit_are_named(monkeypatch, tmp_path):
    from toolchain.firmware.build import kit_dir, require_tool

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetUnavailableError, match="apt-get install qemu-system-arm"):
        require_tool("qemu-system-arm")
    with pytest.raises(TargetUnavailableError, match="apt-get install gcc-arm-none-eabi"):
        require_tool("arm-none-eabi-gcc")
    monkeypatch.setenv("TOOLCHAIN_TFLM_KIT", str(tmp_path / "no-kit"))
    with pytest.raises(TargetUnavailableError, match="TOOLCHAIN_TFLM_KIT"):
        kit_dir()


@needs_firmware_tools
def test_tiny_cnn_on_qemu_m4_equals_tflite_reference(tflm_m4_cmsis, tiny_int8_cnn, tmp_path):
    from toolchain.firmware import build_firmware, run_firmware

    path, x = tiny_int8_cnn
    build = build_firmware(path, x, cpu="m4", kernels="cmsis-nn", out=tmp_path)
    assert build.library == tflm_m4_cmsis
    run = run_firmware(build)
    assert len(run.instructions) == len(x) and min(run.instructions) > 0
    _check_against_reference(run, path)
    assert 0 < run.arena_used <= build.sizes.arena_reserved
    assert build.sizes.model_bytes == path.stat().st_size


@needs_firmware_tools
def test_dscnn_kws01_on_qemu_m4(tflm_m4_cmsis, tmp_path):
    from toolchain.data import load_dataset
    from toolchain.firmware import build_firmware, run_firmware
    from toolchain.firmware.project import ARENA_MARGIN

    x = load_dataset("kws01").x_eval_int8[:KWS_SAMPLES]
    build = build_firmware(DSCNN, x, cpu="m4", kernels="cmsis-nn", out=tmp_path / "a")
    run = run_firmware(build)
    agreement = _check_against_reference(run, DSCNN)
    assert agreement.identical == KWS_SAMPLES
    # the counts are deterministic: the same input gives the same count on a second run
    assert run_firmware(build).instructions == run.instructions
    # the MCU bundle's arena estimate covers what TFLM used on the M4, without gross waste
    estimate = build.project.arena_estimate_bytes
    assert run.arena_used <= estimate <= MAX_ARENA_OVERESTIMATE * run.arena_used, (estimate, run.arena_used)
    # the project now carries the measured arena, and a firmware with exactly that arena runs
    arena_h = (tmp_path / "a" / "project" / "model_arena.h").read_text()
    assert f"MODEL_RUNNER_ARENA_SIZE {run.arena_used + ARENA_MARGIN}" in arena_h
    tight = build_firmware(DSCNN, x[:2], cpu="m4", kernels="cmsis-nn", out=tmp_path / "b",
                           arena_bytes=run.arena_used + ARENA_MARGIN)
    tight_run = run_firmware(tight)
    assert tight_run.instructions == run.instructions[:2]
    assert tight.sizes.flash_bytes > tight.sizes.model_bytes == DSCNN.stat().st_size


@needs_firmware_tools
def test_bench_on_qemu_cortex_m4(tflm_m4_cmsis, tmp_path):
    from deploy.bench import bench

    result = bench(DSCNN, target="qemu-cortex-m4", data="kws01", samples=4, quiet=True)
    (m,) = result.measurements
    fw = m.raw["firmware"]
    assert result.emulated and fw["samples"] == 4 and "EMULATED INSTRUCTION COUNT" in fw["count_kind"]
    assert m.p50_ms == pytest.approx(fw["emulated_instructions_per_inference"] / 1e6, abs=1e-3)
    assert m.accuracy is not None


def _tflite_builtin_outputs(tflite_path, x_q):
    """TFLite's own kernels without XNNPACK (TF 2.14's BUILTIN_REF cannot load INT4 models)."""
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(tflite_path), experimental_op_resolver_type=(
        tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    interp.allocate_tensors()
    d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
    out = []
    for x in x_q:
        interp.set_tensor(d_in["index"], x[None])
        interp.invoke()
        out.append(interp.get_tensor(d_out["index"]).reshape(-1).copy())
    return np.stack(out)


def _check_int4_run(run, tflite_path):
    """The firmware's outputs equal tflite-micro's (the reference for INT4 models) and TFLite's
    kernels without XNNPACK, bit for bit, on every sample."""
    from toolchain.firmware import compare_with_reference, reference_outputs, reference_runtime

    assert reference_runtime(tflite_path) == "tflite-micro"
    micro = reference_outputs(tflite_path, run.build.inputs)
    agreement = compare_with_reference(run, micro)
    got = run.outputs.reshape(len(micro), -1)
    for name, ref in (("tflite-micro", micro), ("TFLite (no XNNPACK)", _tflite_builtin_outputs(tflite_path, run.build.inputs))):
        off = np.argwhere(got != ref.reshape(len(ref), -1))
        assert off.size == 0, f"{len(off)} output elements differ from {name} (first at {off[:5].tolist()})"
    assert agreement.identical == agreement.samples == len(run.build.inputs)
    return agreement


@needs_firmware_tools
def test_int4_cnn_on_qemu_m4_equals_tflite_micro(tflm_m4_cmsis, tiny_int4_cnn, tmp_path):
    """Packed INT4 kernels (a trained CNN under a mixed 4/8-bit plan) in firmware: CMSIS-NN's s4
    kernels, bit-identical outputs, the arena within the estimate, the kernels stay packed."""
    from toolchain.firmware import build_firmware, run_firmware

    artifact, x = tiny_int4_cnn
    build = build_firmware(artifact.path, x, cpu="m4", kernels="cmsis-nn", out=tmp_path)
    regs = build.project.registrations
    assert "AddDepthwiseConv2D(tflite::Register_DEPTHWISE_CONV_2D_INT4())" in regs   # dw: INT4 only
    assert "AddConv2D()" in regs and "AddFullyConnected()" in regs                    # INT4 and INT8 mixed
    run = run_firmware(build)
    _check_int4_run(run, artifact.path)
    assert run.arena_used <= build.project.arena_estimate_bytes
    weights = build.project.weights
    assert weights["int4_layers"] and weights["total"]["saved_bytes"] > 0
    assert build.sizes.model_bytes == artifact.size_bytes
    assert run.summary()["model_weights"]["int4_layers"] == len(weights["int4_layers"]) == 3


@pytest.mark.slow
@needs_firmware_tools
@pytest.mark.parametrize("cpu,kernels", [("m7", "cmsis-nn"), ("m4", "reference"), ("m7", "reference")])
def test_dscnn_other_cores_and_kernels(cpu, kernels, tmp_path):
    from toolchain.data import load_dataset
    from toolchain.firmware import build_firmware, run_firmware

    x = load_dataset("kws01").x_eval_int8[:KWS_SAMPLES]
    run = run_firmware(build_firmware(DSCNN, x, cpu=cpu, kernels=kernels, out=tmp_path))
    assert _check_against_reference(run, DSCNN).identical == KWS_SAMPLES


@pytest.mark.slow
@needs_firmware_tools
def test_dscnn_int4_relevance_plan_on_qemu_m4(tflm_m4_cmsis, tmp_path):
    """DS-CNN under a relevance plan over 4/8-bit weights (the microcontroller default's allocator),
    exported as tflite-mixed with packed INT4 kernels, as firmware on the M4 with CMSIS-NN: outputs
    bit-identical to tflite-micro and TFLite (no XNNPACK) on kws01 samples. Minutes: relevance, QAT
    conversion and the firmware run."""
    from toolchain.data import load_dataset
    from toolchain.export.tflite_backend import export_tflite
    from toolchain.firmware import build_firmware, run_firmware
    from toolchain.model_io import load_model
    from toolchain.quantize import plan_bits

    saved = DSCNN.parent / "kws_ref_model"
    if not saved.exists():
        pytest.skip(f"the MLPerf Tiny DS-CNN SavedModel is not at {saved}")
    kws = load_dataset("kws01")
    model = load_model(saved)
    plan = plan_bits(model, kws, allocator="relevance", candidates=(4, 8), budget="avg-bits=5", quiet=True)
    art = export_tflite(model, "mixed", tmp_path / "ds_cnn_mixed.tflite", kws.calibration(500)[0], plan=plan)
    int4 = sorted(n for n, e in art.metadata["layers"].items() if e["weight_type"] == "INT4")
    assert int4, art.metadata["layers"]
    build = build_firmware(art.path, kws.x_eval[:KWS_SAMPLES], cpu="m4", kernels="cmsis-nn", out=tmp_path / "fw")
    run = run_firmware(build)
    _check_int4_run(run, art.path)
    assert len(build.project.weights["int4_layers"]) == len(int4)
    assert build.sizes.model_bytes < DSCNN.stat().st_size
    assert run.arena_used <= build.project.arena_estimate_bytes
