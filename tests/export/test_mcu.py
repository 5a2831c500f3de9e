"""MCU bundle: C arrays that compile for the host and a Cortex-M4, the exact op set, the arena
estimate from tensor lifetimes, the manifest, determinism."""
import hashlib
import json
import re
import shutil
import subprocess

import numpy as np

import pytest

tf = pytest.importorskip("tensorflow")

from tests.export.helpers import calib, digits, pruned_copy, small_cnn  # noqa: E402
from toolchain.errors import ConversionError  # noqa: E402
from toolchain.export.artifact import sha256_file  # noqa: E402
from toolchain.export.flatbuffer import read_flatbuffer  # noqa: E402
from toolchain.export.mcu import (  # noqa: E402
    MICRO_OP_METHODS, MICRO_OP_VARIANTS, buffer_alignments, cc_arrays, estimate_arena, greedy_plan, strip_strings,
    tensor_lifetimes, write_mcu_bundle)
from toolchain.export.tflite_backend import export_tflite  # noqa: E402

ARM_GCC = "arm-none-eabi-gcc"
ARM_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-std=c++11", "-Wall", "-Werror"]


@pytest.fixture(scope="module")
def int8_tflite(tmp_path_factory):
    return export_tflite(small_cnn(), "int8", tmp_path_factory.mktemp("mcu") / "small_cnn_int8.tflite", calib(100))


@pytest.fixture(scope="module")
def bundle(int8_tflite, tmp_path_factory):
    return write_mcu_bundle(int8_tflite.path, tmp_path_factory.mktemp("mcu_out") / "mcu", "small_cnn")


def _array_bytes(source: str) -> bytes:
    body = source.split("= {", 1)[1].split("};", 1)[0]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


def test_cc_arrays_hold_the_bytes_and_the_length():
    data = bytes(range(256)) * 3 + b"\x01"
    header, source = cc_arrays("my-model", data)
    assert "extern const unsigned char g_my_model_model_data[];" in header
    assert "extern const unsigned int g_my_model_model_data_len;" in header
    assert "alignas(16) const unsigned char g_my_model_model_data[] = {" in source
    assert f"const unsigned int g_my_model_model_data_len = {len(data)};" in source
    assert '#include "model_data.h"' in source
    assert _array_bytes(source) == data


def test_bundle_files_and_manifest(bundle, int8_tflite):
    names = sorted(p.name for p in bundle.out_dir.iterdir())
    assert names == ["manifest.json", "model_data.cc", "model_data.h", "op_resolver.h"]
    array = _array_bytes((bundle.out_dir / "model_data.cc").read_text())
    assert array == strip_strings(open(int8_tflite.path, "rb").read())[0]
    m = json.loads((bundle.out_dir / "manifest.json").read_text())
    assert m["source"]["sha256"] == sha256_file(int8_tflite.path)
    assert m["model"]["sha256"] == hashlib.sha256(array).hexdigest() == bundle.model_sha256
    assert m["model"]["strings_stripped"] and m["sizes"]["flash_bytes"] == len(array) == bundle.flash_bytes
    assert len(array) < int8_tflite.size_bytes - 500  # names and signatures are ~10% of this small model
    assert m["inputs"][0]["name"]  # still documented, read from the source
    interp = tf.lite.Interpreter(model_path=str(int8_tflite.path))
    d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert m["inputs"][0]["dtype"] == "int8" and m["inputs"][0]["shape"] == list(d_in["shape"])
    assert m["inputs"][0]["scale"] == pytest.approx(d_in["quantization"][0])
    assert m["inputs"][0]["zero_point"] == d_in["quantization"][1]
    assert m["outputs"][0]["zero_point"] == d_out["quantization"][1]
    for fname, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(bundle.out_dir / fname), fname


def test_stripped_model_computes_exactly_what_the_source_does(bundle, int8_tflite):
    array = _array_bytes((bundle.out_dir / "model_data.cc").read_text())
    source = open(int8_tflite.path, "rb").read()
    assert b"serving_default" in source and b"serving_default" not in array
    assert min(buffer_alignments(array)) >= max(4, min(buffer_alignments(source)))
    x = calib(16)
    outs = []
    for data in (source, array):
        interp = tf.lite.Interpreter(model_content=data, experimental_op_resolver_type=(
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        interp.allocate_tensors()
        d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
        scale, zp = d_in["quantization"]
        rows = []
        for i in range(len(x)):
            interp.set_tensor(d_in["index"], np.clip(np.round(x[i:i + 1] / scale) + zp, -128, 127).astype(np.int8))
            interp.invoke()
            rows.append(interp.get_tensor(d_out["index"]).copy())
        outs.append(np.concatenate(rows))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_unstripped_bundle_holds_the_source_bytes(int8_tflite, tmp_path):
    b = write_mcu_bundle(int8_tflite.path, tmp_path / "mcu", "small_cnn", strip=False)
    assert _array_bytes((b.out_dir / "model_data.cc").read_text()) == open(int8_tflite.path, "rb").read()
    m = json.loads((b.out_dir / "manifest.json").read_text())
    assert not m["model"]["strings_stripped"] and m["model"]["sha256"] == m["source"]["sha256"]


def test_source_with_16_byte_aligned_buffers_stays_unstripped():
    # the official MLPerf Tiny int8 file aligns every buffer to 16; TF's writer would align some to 4
    from tests.conftest import MLPERF, require

    data = require(MLPERF / "kws_ref_model_int8.tflite").read_bytes()
    assert set(buffer_alignments(data)) == {16}
    out, note = strip_strings(data)
    assert out == data and "aligns every buffer to 16" in note


def test_op_resolver_lists_exactly_the_ops_in_the_flatbuffer(bundle, int8_tflite):
    info = read_flatbuffer(open(int8_tflite.path, "rb").read())
    used = {op.op for op in info.ops}
    header = (bundle.out_dir / "op_resolver.h").read_text()
    calls = re.findall(r"resolver\.(Add\w+)\(", header)
    assert sorted(calls) == sorted(MICRO_OP_METHODS[o] for o in used)
    assert len(calls) == len(set(calls))
    assert f"tflite::MicroMutableOpResolver<{len(used)}>" in header
    assert set(bundle.ops) == used
    # an int8 model: every operator with an int8-only kernel registers it (the rest stay generic)
    specialised = dict(re.findall(r"resolver\.(Add\w+)\(tflite::(Register_\w+)\(\)\)", header))
    assert specialised == {MICRO_OP_METHODS[o]: MICRO_OP_VARIANTS[o][("INT8", "INT8")]
                           for o in used if o in MICRO_OP_VARIANTS}
    assert specialised["AddConv2D"] == "Register_CONV_2D_INT8"


def test_ops_without_a_micro_kernel_are_refused(tmp_path):
    sparse = export_tflite(pruned_copy(small_cnn(), 0.8), "sparse", tmp_path / "s.tflite", calib(50))
    with pytest.raises(ConversionError, match="DENSIFY"):
        write_mcu_bundle(sparse.path, tmp_path / "mcu", "s", "tflite-sparse")
    assert not (tmp_path / "mcu").exists()


def test_float_model_is_refused(tmp_path):
    fp32 = export_tflite(small_cnn(), "fp32", tmp_path / "f.tflite")
    with pytest.raises(ConversionError, match="full-integer"):
        write_mcu_bundle(fp32.path, tmp_path / "mcu", "f", "tflite-fp32")


def test_greedy_plan_reuses_memory_of_dead_tensors():
    # a (0..1) 100 B, b (1..2) 100 B, c (2..3) 100 B: a and c never overlap in time
    high, placed = greedy_plan([("a", 100, 0, 1), ("b", 100, 1, 2), ("c", 100, 2, 3)])
    by = {p.name: p for p in placed}
    assert high == 2 * 112  # two 16-byte aligned slots
    assert by["a"].offset == by["c"].offset != by["b"].offset


def test_arena_estimate_bounds(bundle, int8_tflite):
    info = read_flatbuffer(open(int8_tflite.path, "rb").read())
    life = tensor_lifetimes(info)
    size = {t: info.tensors[t].activation_bytes for t in life}
    # lower bound: what must be alive together at the busiest op; upper bound: no reuse at all
    busiest = max(sum(size[t] for t, (a, b) in life.items() if a <= i <= b) for i in range(len(info.ops)))
    est = estimate_arena(info)
    assert busiest <= est.planned_bytes <= sum(((s + 15) // 16) * 16 for s in size.values()) + \
        sum(b.size for b in est.buffers if b.name.startswith("scratch"))
    assert est.arena_bytes >= est.planned_bytes + est.persistent_bytes
    assert est.arena_bytes % 16 == 0
    assert bundle.arena == est


def test_bundle_is_deterministic(bundle, int8_tflite, tmp_path):
    again = write_mcu_bundle(int8_tflite.path, tmp_path / "mcu", "small_cnn")
    for fname in ("model_data.cc", "model_data.h", "op_resolver.h", "manifest.json"):
        assert (again.out_dir / fname).read_bytes() == (bundle.out_dir / fname).read_bytes(), fname


def _compile(compiler, flags, bundle, tmp_path):
    obj = tmp_path / f"{compiler}.o"
    proc = subprocess.run([compiler, *flags, "-c", str(bundle.out_dir / "model_data.cc"), "-o", str(obj)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return obj


def _global_symbols(nm, obj):
    out = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1]: line.split()[-2] for line in out.splitlines() if line.strip()}


def test_model_data_compiles_with_host_gcc(bundle, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("host g++ is not installed (apt-get install -y g++)")
    obj = _compile("g++", ["-std=c++11", "-Wall", "-Werror"], bundle, tmp_path)
    syms = _global_symbols("nm", obj)
    # external linkage (upper-case R): the .cc includes its header, so const arrays are exported
    assert syms.get("g_small_cnn_model_data") == "R"
    assert syms.get("g_small_cnn_model_data_len") == "R"


def test_model_data_compiles_for_cortex_m4(bundle, int8_tflite, tmp_path):
    if shutil.which(ARM_GCC) is None:
        pytest.skip(f"{ARM_GCC} is not installed (apt-get update && apt-get install -y gcc-arm-none-eabi)")
    obj = _compile(ARM_GCC, ARM_FLAGS, bundle, tmp_path)
    syms = _global_symbols("arm-none-eabi-nm", obj)
    assert syms.get("g_small_cnn_model_data") == "R"
    headers = subprocess.run(["arm-none-eabi-objdump", "-h", str(obj)], capture_output=True, text=True,
                             check=True).stdout
    rodata = [l for l in headers.splitlines() if ".rodata" in l]
    assert rodata and rodata[0].split()[-1] in ("2**4", "2**5", "2**6"), headers  # >= 16-byte aligned
    size = subprocess.run(["arm-none-eabi-size", str(obj)], capture_output=True, text=True, check=True).stdout
    text = int(size.splitlines()[1].split()[0])
    assert text >= bundle.flash_bytes  # the whole flatbuffer is in flash (.rodata counts as text)


# -- the bundle's model run in tflite-micro itself ------------------------------------------------

@pytest.fixture(scope="module")
def checked(int8_tflite, tmp_path_factory):
    pytest.importorskip("tflite_micro")
    ds = digits()
    return write_mcu_bundle(int8_tflite.path, tmp_path_factory.mktemp("mcu_checked") / "mcu", "small_cnn",
                            check_x=ds.x_eval, check_y=ds.y_eval)


def test_bundle_runs_in_tflite_micro_like_tflite(checked, int8_tflite):
    from toolchain.run import run_artifact

    m = checked.micro
    ds = digits()
    assert m.samples == min(200, len(ds.x_eval))
    assert m.top1_agreement >= 0.95
    tflite_acc = float((run_artifact(int8_tflite.path, ds.x_eval[:m.samples]).argmax(-1)
                        == ds.y_eval[:m.samples]).mean())
    assert m.tflite_accuracy == pytest.approx(tflite_acc)
    assert abs(m.micro_accuracy - tflite_acc) <= 1 - m.top1_agreement + 1e-9
    manifest = json.loads((checked.out_dir / "manifest.json").read_text())
    assert manifest["tflite_micro"]["top1_agreement"] == m.top1_agreement
    assert manifest["tflite_micro"]["arena_min_bytes"] == m.arena_min_bytes


def test_tflite_micro_arena_is_the_smallest_that_runs(checked, int8_tflite):
    from tflite_micro.python.tflite_micro import runtime

    from toolchain.export import micro

    data = _array_bytes((checked.out_dir / "model_data.cc").read_text())  # what was measured
    x_q = np.zeros(tuple(runtime.Interpreter.from_bytes(data).get_input_details(0)["shape"]), np.int8)
    n = checked.micro.arena_min_bytes
    assert n % 16 == 0 and n > 0
    with micro.quiet_native_output():
        assert micro._runs(runtime, data, n, x_q)
        assert not micro._runs(runtime, data, n - 16, x_q)
    # the arena to pass covers both the estimate and what tflite-micro measurably needs
    assert checked.arena_bytes == max(checked.arena.arena_bytes, n)
    manifest = json.loads((checked.out_dir / "manifest.json").read_text())
    assert manifest["sizes"]["arena_bytes"] == checked.arena_bytes


def test_disagreement_with_tflite_is_refused(int8_tflite, tmp_path, monkeypatch):
    from toolchain.export import micro

    pytest.importorskip("tflite_micro")
    monkeypatch.setattr(micro, "MIN_AGREEMENT", 1.01)  # nothing can agree on more than 100%
    with pytest.raises(ConversionError, match="tflite-micro"):
        write_mcu_bundle(int8_tflite.path, tmp_path / "mcu", "small_cnn", check_x=calib(20))
    assert not (tmp_path / "mcu" / "manifest.json").exists()


def test_arena_search_survives_tflite_micro_crashing_on_a_small_arena():
    """tflite-micro crashes (SIGSEGV) instead of failing when this pruned depthwise-separable model
    with a residual Add (tests/data/tflm/README.md) gets a 2,000-byte arena; the arena search probes
    each size in a forked process, so the crash counts as "does not run" and the search still
    finds the smallest arena, 4,640 bytes, and the bundle check still runs."""
    from pathlib import Path

    from toolchain.export import micro

    data = (Path(__file__).parents[1] / "data" / "tflm" / "dsconv_residual_pruned_stripped.tflite").read_bytes()
    x = digits().x_eval[:20].reshape(-1, 8, 8, 1).astype(np.float32)  # evaluation digits
    runtime = micro._runtime()
    from deploy.runner import MicroBackend, prepare_inputs

    x_q = prepare_inputs(x, MicroBackend(data, name="test").input)
    assert not micro._runs(runtime, data, 2000, x_q[:1])  # crashed in the probe's child, not here
    assert micro._runs(runtime, data, 4640, x_q[:1])
    assert micro.min_arena(data, x_q[:1]) == 4640
    check = micro.check_in_micro(data, x)
    assert check.arena_min_bytes == 4640 and check.top1_agreement == 1.0
