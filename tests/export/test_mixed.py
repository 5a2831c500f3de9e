"""tflite-mixed from a BitPlan: INT4 storage read back from the flatbuffer, levels per channel,
float / int16 layers, and the stored weights equal to the planned grid."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tests.export.helpers import calib, digits, small_cnn  # noqa: E402
from toolchain.errors import ConfigError, ConversionError  # noqa: E402
from toolchain.export.flatbuffer import dequantize_weights, read_flatbuffer  # noqa: E402
from toolchain.export.tflite_backend import export_tflite, run_tflite  # noqa: E402
from toolchain.export.tflite_mixed import convert_mixed  # noqa: E402
from toolchain.quantize.kernels import channel_matrix, fake_quant_channels  # noqa: E402
from toolchain.quantize.bitplan import BitPlan, LayerBits  # noqa: E402

#: a 4-bit plan without fine-tuning must still keep most decisions of the float model
MIXED_MIN_AGREEMENT = 0.85
#: stored weights equal the planned grid up to float32 rounding of the scale
GRID_RTOL = 1e-5

FOUR_BIT = BitPlan({"conv": LayerBits(4), "dw": LayerBits(4), "pw": LayerBits(4), "fc1": LayerBits(4)})


@pytest.fixture(scope="module")
def four_bit(tmp_path_factory):
    return export_tflite(small_cnn(), "mixed", tmp_path_factory.mktemp("mixed") / "m.tflite", calib(200),
                         plan=FOUR_BIT)


def _agreement(path, model):
    x = digits().x_eval
    return float(np.mean(run_tflite(path, x).argmax(1) == model.predict(x, verbose=0).argmax(1)))


def test_int4_storage_for_conv_depthwise_and_dense(four_bit):
    layers = four_bit.metadata["layers"]
    assert four_bit.metadata["route"] == "qat"
    for name in ("conv", "dw", "pw", "fc1"):
        e = layers[name]
        assert e["weight_type"] == "INT4", (name, e)
        assert e["weight_bytes"] == (e["weight_count"] + 1) // 2, (name, e)  # two weights per byte
        assert e["input_type"] == "INT8" and e["levels_ok"], (name, e)
        assert max(e["levels_per_channel"]) <= 15, (name, e)
    assert layers["conv"]["per_channel"] and layers["dw"]["per_channel"] and layers["pw"]["per_channel"]
    assert not layers["fc1"]["per_channel"]  # FULLY_CONNECTED: per-tensor in TF 2.14
    assert layers["fc2"]["weight_type"] == "INT8" and not layers["fc2"]["requested"]["planned"]
    # independent read of the written file
    info = read_flatbuffer(open(four_bit.path, "rb").read())
    assert sum(1 for t in info.tensors if t.type == "INT4") == 4


def test_int4_model_runs_and_agrees_with_keras(four_bit):
    assert _agreement(four_bit.path, small_cnn()) >= MIXED_MIN_AGREEMENT


def test_stored_int4_weights_equal_the_planned_grid(four_bit):
    from toolchain.canonicalize import canonicalize

    folded = canonicalize(small_cnn()).model  # BN folded into conv, as TFLite stores it
    info = read_flatbuffer(open(four_bit.path, "rb").read())
    for name, cls in (("conv", "Conv2D"), ("dw", "DepthwiseConv2D"), ("pw", "Conv2D"), ("fc1", "Dense")):
        entry = four_bit.metadata["layers"][name]
        op = info.ops[entry["op_index"]]
        stored = dequantize_weights(info.weight_of(op))
        layer = folded.get_layer("c_" + name)
        kernel = (layer.depthwise_kernel if cls == "DepthwiseConv2D" else layer.kernel).numpy()
        if cls == "Conv2D":
            stored = np.transpose(stored, (1, 2, 3, 0))          # OHWI -> HWIO
        elif cls == "DepthwiseConv2D":
            stored = stored[0].reshape(kernel.shape)            # (1, H, W, C*m) -> (H, W, C, m)
        else:
            stored = stored.T                                   # (out, in) -> (in, out)
        m = channel_matrix(cls, kernel)
        want = fake_quant_channels(m, [4] * m.shape[1], per_tensor=cls == "Dense")  # the simulated grid
        got = channel_matrix(cls, stored)
        tol = GRID_RTOL * np.abs(m).max()
        bad = np.argwhere(np.abs(got - want) > tol)
        assert not len(bad), f"{name}: {len(bad)} of {got.size} weights off the grid, worst {np.abs(got - want).max():.3g}"


def test_narrow_widths_and_groups_keep_only_their_levels(tmp_path):
    plan = BitPlan({"conv": LayerBits(2), "dw": LayerBits(3), "pw": LayerBits(6),
                    "fc1": LayerBits(6, group_bits=(3, 6), group_size=16)}, granularity="group")
    art = export_tflite(small_cnn(), "mixed", tmp_path / "n.tflite", calib(200), plan=plan)
    layers = art.metadata["layers"]
    assert layers["conv"]["weight_type"] == "INT4" and max(layers["conv"]["levels_per_channel"]) <= 3
    assert layers["dw"]["weight_type"] == "INT4" and max(layers["dw"]["levels_per_channel"]) <= 7
    assert layers["pw"]["weight_type"] == "INT8" and max(layers["pw"]["levels_per_channel"]) <= 63
    fc1 = layers["fc1"]["levels_per_channel"]
    assert layers["fc1"]["weight_type"] == "INT8"
    assert max(fc1[:16]) <= 7 and max(fc1[16:]) <= 63, fc1
    assert "levels" in layers["dw"]["note"]
    assert _agreement(art.path, small_cnn()) >= 0.5  # 2-bit first layer, no fine-tuning: still runs


def test_float_and_int16_layers_go_through_the_denylist(tmp_path):
    plan = BitPlan({"conv": LayerBits(4), "dw": LayerBits(8, activation_bits=32),
                    "pw": LayerBits(8, activation_bits=16)})
    art = export_tflite(small_cnn(), "mixed", tmp_path / "f.tflite", calib(200), plan=plan)
    meta = art.metadata
    assert meta["route"] == "ptq_denylist"
    assert meta["float_layers"] == ["dw", "pw"] and len(meta["denylisted_nodes"]) == 2
    for name in ("dw", "pw"):
        assert meta["layers"][name]["weight_type"] == "FLOAT32", meta["layers"][name]
        assert meta["layers"][name]["input_type"] == "FLOAT32", meta["layers"][name]
    assert "int16" in meta["layers"]["pw"]["note"]
    conv = meta["layers"]["conv"]
    assert conv["weight_type"] == "INT8" and max(conv["levels_per_channel"]) <= 15  # 4-bit levels in INT8
    assert meta["inputs"][0]["dtype"] == "float32"
    assert _agreement(art.path, small_cnn()) >= MIXED_MIN_AGREEMENT


def test_all_int16_activations_become_int16x8(tmp_path):
    plan = BitPlan({n: LayerBits(8, activation_bits=16) for n in ("conv", "dw", "pw", "fc1", "fc2")})
    art = export_tflite(small_cnn(), "mixed", tmp_path / "a.tflite", calib(100), plan=plan)
    assert art.metadata["route"] == "int16x8"
    assert all(e["input_type"] == "INT16" for e in art.metadata["layers"].values())


def test_plan_errors_name_the_layers(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        export_tflite(small_cnn(), "mixed", tmp_path / "x.tflite", calib(20),
                      plan=BitPlan({"nope": LayerBits(4)}))
    with pytest.raises(ConfigError, match="pool"):
        export_tflite(small_cnn(), "mixed", tmp_path / "x.tflite", calib(20),
                      plan=BitPlan({"pool": LayerBits(4)}))
    with pytest.raises(ConfigError, match="bit plan"):
        export_tflite(small_cnn(), "mixed", tmp_path / "x.tflite", calib(20))
    assert not (tmp_path / "x.tflite").exists()


def test_int8_io_cannot_be_promised_with_float_layers():
    plan = BitPlan({"dw": LayerBits(8, activation_bits=32)})
    with pytest.raises(ConversionError, match="dw"):
        convert_mixed(small_cnn(), plan, calib(50), io="int8")


def test_mixed_conversion_is_deterministic_and_leaves_the_model_alone(four_bit):
    before = [w.copy() for w in small_cnn().get_weights()]
    data, _, _ = convert_mixed(small_cnn(), FOUR_BIT, calib(200))
    assert data == open(four_bit.path, "rb").read()
    for a, b in zip(before, small_cnn().get_weights()):
        assert np.array_equal(a, b)
