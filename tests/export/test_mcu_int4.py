"""MCU bundle from tflite-mixed with packed INT4 kernels: they stay packed in the array, the op
resolver registers the kernels that run them, the arena estimate holds the reference kernels'
unpack scratch, the manifest shows flash per layer against int8, tflite-micro runs the model
bit-identically to TFLite's kernels, and float layers are refused by name."""
import json
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tests.export.helpers import digits, small_cnn  # noqa: E402
from tests.firmware.conftest import MIXED_4_8, export_int4_cnn  # noqa: E402
from toolchain.errors import ConversionError  # noqa: E402
from toolchain.export.flatbuffer import read_flatbuffer  # noqa: E402
from toolchain.export.mcu import (  # noqa: E402
    check_integer_model, estimate_arena, op_registrations, write_mcu_bundle)

#: samples run through tflite-micro against TFLite
MICRO_SAMPLES = 32


@pytest.fixture(scope="module")
def int4_tflite(tmp_path_factory):
    return export_int4_cnn(tmp_path_factory.mktemp("int4"))


@pytest.fixture(scope="module")
def layer_names(int4_tflite):
    return {int(e["op_index"]): name for name, e in int4_tflite.metadata["layers"].items()}


@pytest.fixture(scope="module")
def int4_bundle(int4_tflite, layer_names, tmp_path_factory):
    pytest.importorskip("tflite_micro")
    ds = digits()
    return write_mcu_bundle(int4_tflite.path, tmp_path_factory.mktemp("int4_mcu") / "mcu", "small_cnn",
                            "tflite-mixed", check_x=ds.x_eval, check_y=ds.y_eval, layer_names=layer_names)


def _array_bytes(source: str) -> bytes:
    body = source.split("= {", 1)[1].split("};", 1)[0]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


def test_int4_kernels_stay_packed_in_the_array(int4_bundle, int4_tflite):
    array = _array_bytes((int4_bundle.out_dir / "model_data.cc").read_text())
    source, packed = read_flatbuffer(open(int4_tflite.path, "rb").read()), read_flatbuffer(array)
    int4 = [t for t in packed.tensors if t.type == "INT4"]
    assert len(int4) == sum(1 for b in MIXED_4_8.values() if b <= 4) == 3
    assert sorted(t.data for t in int4) == sorted(t.data for t in source.tensors if t.type == "INT4")
    for t in int4:
        assert t.nbytes == (t.num_elements + 1) // 2


def test_manifest_shows_flash_per_layer_against_int8(int4_bundle, int4_tflite):
    m = json.loads((int4_bundle.out_dir / "manifest.json").read_text())
    rows = {r["layer"]: r for r in m["weights"]["layers"]}
    assert set(rows) == {"conv", "dw", "pw", "fc1", "fc2"}
    for name, entry in int4_tflite.metadata["layers"].items():   # what the converter's metadata says
        r = rows[name]
        assert r["stored"] == entry["weight_type"] and r["bytes"] == entry["weight_bytes"], (name, r, entry)
        assert r["int8_bytes"] == r["weights"] == entry["weight_count"]
        if MIXED_4_8.get(name, 8) <= 4:
            assert r["stored"] == "INT4" and r["saved_bytes"] == r["weights"] - (r["weights"] + 1) // 2, r
        else:
            assert r["stored"] == "INT8" and r["saved_bytes"] == 0, r
    total = m["weights"]["total"]
    assert total["saved_bytes"] == total["int8_bytes"] - total["bytes"] == sum(r["saved_bytes"] for r in rows.values())
    assert total["saved_bytes"] > 0.4 * total["int8_bytes"]   # fc1 (8,192 weights) dominates and is INT4
    assert m["weights"]["int4_layers"] == ["conv", "dw", "fc1"]


def test_op_resolver_registers_int4_kernels_only_where_every_use_is_int4(int4_bundle):
    header = (int4_bundle.out_dir / "op_resolver.h").read_text()
    calls = dict(re.findall(r"resolver\.(Add\w+)\((tflite::\w+\(\))?\)", header))
    # dw is the only DEPTHWISE_CONV_2D and it is INT4; CONV_2D and FULLY_CONNECTED mix INT4 and INT8
    assert calls["AddDepthwiseConv2D"] == "tflite::Register_DEPTHWISE_CONV_2D_INT4()"
    assert calls["AddConv2D"] == "" and calls["AddFullyConnected"] == ""
    assert calls["AddSoftmax"] == "tflite::Register_SOFTMAX_INT8()"
    regs = {r["op"]: r for r in int4_bundle.manifest["op_resolver"]["registrations"]}
    assert regs["CONV_2D"]["types"] == ["INT8/INT4", "INT8/INT8"]
    array = _array_bytes((int4_bundle.out_dir / "model_data.cc").read_text())
    assert all(not r.registration for r in op_registrations(read_flatbuffer(array), specialize=False))


def test_arena_estimate_holds_the_int4_unpack_scratch(int4_tflite):
    info = read_flatbuffer(open(int4_tflite.path, "rb").read())
    ref, cmsis, both = (estimate_arena(info, k) for k in ("reference", "cmsis-nn", None))
    unpack = {b.name: b.size for b in ref.buffers if b.name.startswith("scratch:int4-unpack")}
    int4_ops = [op for op in info.kernel_ops() if info.weight_of(op).type == "INT4"]
    assert len(unpack) == len(int4_ops) == 3
    for op in int4_ops:   # one int8 byte per weight, 16-byte aligned
        assert unpack[f"scratch:int4-unpack:{op.op}#{op.index}"] == -(-info.weight_of(op).num_elements // 16) * 16
    assert not any("int4-unpack" in b.name for b in cmsis.buffers)
    assert cmsis.arena_bytes < ref.arena_bytes <= both.arena_bytes


def test_tflite_micro_runs_int4_bit_identical_to_tflite(int4_bundle, int4_tflite):
    from toolchain.export.micro import micro_outputs

    m = int4_bundle.micro
    assert m.top1_agreement >= 0.95 and m.micro_accuracy is not None
    array = _array_bytes((int4_bundle.out_dir / "model_data.cc").read_text())
    interp = tf.lite.Interpreter(model_path=str(int4_tflite.path), experimental_op_resolver_type=(
        tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    interp.allocate_tensors()
    d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zp = d_in["quantization"]
    x_q = np.clip(np.round(digits().x_eval[:MICRO_SAMPLES] / scale) + zp, -128, 127).astype(np.int8)
    ref = []
    for x in x_q:
        interp.set_tensor(d_in["index"], x[None])
        interp.invoke()
        ref.append(interp.get_tensor(d_out["index"]).reshape(-1).copy())
    got = micro_outputs(array, x_q)
    off = np.argwhere(got != np.stack(ref))
    assert off.size == 0, f"{len(off)} output elements differ (first at {off[:5].tolist()})"


def test_float_layers_are_refused_by_name(tmp_path, int4_tflite, layer_names):
    from toolchain.export import export
    from toolchain.quantize.bitplan import BitPlan, LayerBits

    plan = BitPlan({"conv": LayerBits(4), "dw": LayerBits(32, 32), "fc1": LayerBits(8)})
    with pytest.raises(ConversionError, match=r"layers dw in float.*mcu_source tflite-int8"):
        export(small_cnn(), digits(), ["mcu"], tmp_path / "out", bitplan=plan, mcu_source="tflite-mixed", quiet=True)
    assert not (tmp_path / "out").exists()
    # a float kernel that reaches the bundle anyway is named with its layer
    fp32 = tf.lite.TFLiteConverter.from_keras_model(small_cnn()).convert()
    info = read_flatbuffer(fp32)
    names = {op.index: f"layer{op.index}" for op in info.kernel_ops()}
    with pytest.raises(ConversionError, match=r"kernel layers layer0 \(CONV_2D #0\),.* compute in float"):
        check_integer_model(info, "f.tflite", names)


def test_report_shows_flash_per_layer(int4_bundle):
    from toolchain.report import sections

    (section,) = [s for s in sections({"mcu": int4_bundle.manifest}) if s["title"] == "Microcontroller flash per layer"]
    rows = {r[0]: r for r in section["rows"]}
    total = int4_bundle.manifest["weights"]["total"]
    assert rows["fc1"][2] == "INT4" and rows["fc2"][2] == "INT8" and rows["fc2"][6] == "–"
    assert rows["total"][4:7] == [f"{total['bytes']:,}", f"{total['int8_bytes']:,}", f"{total['saved_bytes']:,}"]
    assert "3 layer(s) stored as packed INT4" in section["text"]
