"""ONNX backend: fp32 equals Keras, int8 agrees, mixed stores int4 exactly where planned, overrides
that do not take effect fail naming the layer, and the same model gives the same bytes."""
import dataclasses

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from toolchain.errors import ConfigError, ConversionError  # noqa: E402
from toolchain.quantize.bitplan import BitPlan, LayerBits  # noqa: E402

FP32_ATOL = 1e-4  # ONNX float32 vs Keras, per output element
INT8_MIN_AGREEMENT = 0.90  # top-1 agreement of int8 QDQ with Keras on the digits eval split
MIXED_MIN_AGREEMENT = 0.80  # int4 weights on two of four kernels of a tiny model
KWS_INT8_MAX_DROP = 0.02  # accuracy points int8 may lose against float on kws01 eval
KWS_MIXED_MAX_DROP = 0.04  # ... and 4-bit pointwise convs
CALIBRATION_SAMPLES = 200


def _diff_report(a, b, atol):
    d = np.abs(a - b)
    off = np.argwhere(d > atol)
    return (f"{len(off)} of {d.size} elements off by more than {atol}; worst {d.max():.3g} at "
            f"{np.unravel_index(d.argmax(), d.shape)}; first offenders {off[:5].tolist()}")


@pytest.fixture(scope="module")
def digits():
    from toolchain.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny(digits):
    """Conv -> DepthwiseConv -> BN -> ReLU -> 1x1 Conv(relu) -> Dense, trained a few epochs."""
    import tensorflow as tf
    from tensorflow.keras import layers

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(digits.input_shape, name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="dw_relu")(x)
    x = layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(10, activation="softmax", name="fc")(x)
    model = tf.keras.Model(inp, out, name="tiny")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy())
    model.fit(digits.x_train, digits.y_train, epochs=6, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def keras_scores(tiny, digits):
    return tiny.predict(digits.x_eval, verbose=0)


def _weight_types(path):
    """{weight initializer feeding each Conv/Gemm/MatMul node: stored TensorProto type name}."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            src = producer.get(n.input[1])
            t = inits[src.input[0]] if src is not None and src.op_type == "DequantizeLinear" else inits[n.input[1]]
            out[n.name] = onnx.TensorProto.DataType.Name(t.data_type)
    return out


def test_fp32_equals_keras(tiny, digits, keras_scores, tmp_path):
    from toolchain.export.onnx_backend import export_onnx_fp32, run_onnx

    art = export_onnx_fp32(tiny, tmp_path / "m.onnx")
    got = run_onnx(art.path, digits.x_eval)
    assert got.shape == keras_scores.shape
    assert np.allclose(got, keras_scores, atol=FP32_ATOL, rtol=0), _diff_report(got, keras_scores, FP32_ATOL)
    assert art.metadata["opset"] == 13 and art.format == "onnx-fp32"
    layers = art.metadata["layers"]
    assert set(layers) == {"conv", "dw", "pw", "fc"}
    # DepthwiseConv2D becomes a grouped Conv with one group per input channel
    assert layers["dw"]["op_type"] == "Conv" and layers["dw"]["group"] == 8
    assert layers["fc"]["op_type"] in ("MatMul", "Gemm")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "temporary files left behind"


def test_fp32_is_deterministic_and_leaves_model_alone(tiny, tmp_path):
    import tensorflow as tf

    from toolchain.export.onnx_backend import export_onnx_fp32
    from toolchain.model_io import model_hash

    before = model_hash(tiny)
    a = export_onnx_fp32(tiny, tmp_path / "a.onnx")
    # another conversion in between moves tf2onnx's process-wide name counter
    other = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, name="d")], name="other")
    export_onnx_fp32(other, tmp_path / "other.onnx")
    b = export_onnx_fp32(tiny, tmp_path / "b.onnx")
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    assert model_hash(tiny) == before, "export changed the user's model"


def test_fp32_rejects_unsupported_opset(tiny, tmp_path):
    from toolchain.export.onnx_backend import export_onnx_fp32

    with pytest.raises(ConfigError, match="opset 21"):
        export_onnx_fp32(tiny, tmp_path / "m.onnx", opset=21)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_agrees_with_keras(tiny, digits, keras_scores, tmp_path):
    from toolchain.export.onnx_backend import export_onnx_fp32, export_onnx_int8, run_onnx

    cal = digits.x_train[:CALIBRATION_SAMPLES]
    art = export_onnx_int8(tiny, cal, tmp_path / "q.onnx")
    got = run_onnx(art.path, digits.x_eval)
    agree = float(np.mean(got.argmax(1) == keras_scores.argmax(1)))
    assert agree >= INT8_MIN_AGREEMENT, f"int8 top-1 agreement {agree:.3f} < {INT8_MIN_AGREEMENT}"
    assert set(_weight_types(art.path).values()) == {"INT8"}
    meta = art.metadata
    assert meta["activation_type"] == "uint8" and meta["calibration_samples"] == CALIBRATION_SAMPLES
    assert {v["weight_dtype"] for v in meta["layers"].values()} == {"int8"}
    assert meta["layers"]["dw"]["weight_axis"] == 0  # per depthwise filter
    # from a float ONNX file instead of the Keras model: same graph, same bytes
    fp32 = export_onnx_fp32(tiny, tmp_path / "f.onnx")
    again = export_onnx_int8(fp32.path, cal, tmp_path / "q2.onnx")
    assert again.sha256 == art.sha256


def test_mixed_stores_int4_exactly_where_planned(tiny, digits, keras_scores, tmp_path):
    from toolchain.export.onnx_backend import export_onnx_mixed, run_onnx

    plan = BitPlan({"conv": LayerBits(8), "dw": LayerBits(4), "pw": LayerBits(3, activation_bits=16),
                    "fc": LayerBits(8)})
    art = export_onnx_mixed(tiny, digits.x_train[:CALIBRATION_SAMPLES], plan, tmp_path / "m.onnx")
    layers = art.metadata["layers"]
    stored = _weight_types(art.path)  # read from the file, not from the metadata
    want = {"conv": "INT8", "dw": "INT4", "pw": "INT4", "fc": "INT8"}
    got = {name: stored[layers[name]["node"]] for name in want}
    assert got == want
    assert art.metadata["opset"] >= 21 and art.metadata["qdq_domains"] == ["ai.onnx"]
    # 3 bits stored as int4 use only the 3-bit levels; 4 bits may use the whole int4 range
    assert max(layers["pw"]["weight_channel_bits"]) <= 3 and -3 <= layers["pw"]["weight_q_range"][0]
    assert layers["dw"]["group"] == 8 and len(layers["dw"]["weight_channel_bits"]) == 8
    assert layers["pw"]["output_dtype"] == "uint16" and layers["conv"]["output_dtype"] == "uint8"
    got_scores = run_onnx(art.path, digits.x_eval)
    agree = float(np.mean(got_scores.argmax(1) == keras_scores.argmax(1)))
    assert agree >= MIXED_MIN_AGREEMENT, f"mixed top-1 agreement {agree:.3f} < {MIXED_MIN_AGREEMENT}"


def test_ignored_override_fails_naming_the_layer(tiny, digits, tmp_path):
    """Keyed on the Conv output instead of the Relu output, the uint16 override is silently
    ignored by the ORT quantizer: the read-back must catch it."""
    from toolchain.export import onnx_backend as ob

    plan = BitPlan({"pw": LayerBits(8, activation_bits=16)})
    fp32 = ob.keras_to_onnx(tiny)
    pre = ob._preprocess(fp32, tmp_path)
    (req,) = ob.plan_requests(tiny, pre, plan)
    conv_out = next(n for n in pre.graph.node if n.name == req.kernel.node).output[0]
    assert conv_out != req.activation_tensor, "the 1x1 conv should be followed by a Relu"
    wrong = dataclasses.replace(req, activation_tensor=conv_out)
    _, layers = ob.quantize_requests(pre, digits.x_train[:64], [wrong], tmp_path)
    with pytest.raises(ConversionError, match=r"pw: asked uint16 output activations"):
        ob.check_read_back(layers, [wrong])
    _, right = ob.quantize_requests(pre, digits.x_train[:64], [req], tmp_path)
    ob.check_read_back(right, [req])  # keyed correctly it takes effect


def test_inexpressible_plan_fails_naming_the_layer(tiny, digits, tmp_path):
    from toolchain.export.onnx_backend import export_onnx_mixed

    # half the channels float, half int4: one ONNX initializer cannot hold both
    plan = BitPlan({"pw": LayerBits(32, group_bits=(4, 32), group_size=8)}, granularity="group")
    out = tmp_path / "m.onnx"
    with pytest.raises(ConversionError, match=r"\bpw\b"):
        export_onnx_mixed(tiny, digits.x_train[:64], plan, out)
    assert not out.exists()


def test_run_onnx_quantizes_integer_io(tmp_path):
    """A graph with uint8 input and output: float data in, float scores out."""
    from onnx import TensorProto, helper

    from toolchain.export.onnx_backend import run_onnx

    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["xf"]),
         helper.make_node("Relu", ["xf"], ["r"]),
         helper.make_node("QuantizeLinear", ["r", "s_out", "z_out"], ["y"])],
        "io", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, 3])],
        [helper.make_tensor("s_in", TensorProto.FLOAT, [], [0.5]),
         helper.make_tensor("z_in", TensorProto.UINT8, [], [10]),
         helper.make_tensor("s_out", TensorProto.FLOAT, [], [0.25]),
         helper.make_tensor("z_out", TensorProto.UINT8, [], [0])])
    path = tmp_path / "io.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.array([[-2.0, 0.0, 3.0], [1.5, -5.0, 10.0]], np.float32)
    got = run_onnx(path, x)
    assert got.dtype == np.float32
    assert np.allclose(got, np.maximum(x, 0), atol=0.25 / 2 + 1e-6), got


@pytest.mark.shared
def test_kws_ds_cnn_fp32_int8_and_int4_pointwise(kws_model, kws01, tmp_path):
    """The MLPerf Tiny DS-CNN (about 8 s): calibrate on the kws01 train half, score the eval half."""
    from toolchain.export.onnx_backend import export_onnx_fp32, export_onnx_int8, export_onnx_mixed, run_onnx

    model, ds = kws_model, kws01
    x_eval, y_eval = ds.x_eval[:500], ds.y_eval[:500]
    ref = model.predict(x_eval, verbose=0)
    acc = lambda s: float(np.mean(s.argmax(1) == y_eval))  # noqa: E731
    fp32 = run_onnx(export_onnx_fp32(model, tmp_path / "f.onnx").path, x_eval)
    assert np.allclose(fp32, ref, atol=FP32_ATOL, rtol=0), _diff_report(fp32, ref, FP32_ATOL)
    int8 = run_onnx(export_onnx_int8(model, ds.x_train[:500], tmp_path / "q.onnx").path, x_eval)
    assert acc(int8) >= acc(ref) - KWS_INT8_MAX_DROP, (acc(int8), acc(ref))
    pointwise = [l.name for l in model.layers if type(l).__name__ == "Conv2D" and l.kernel.shape[:2] == (1, 1)]
    art = export_onnx_mixed(model, ds.x_train[:500], BitPlan({n: LayerBits(4) for n in pointwise}),
                            tmp_path / "m.onnx")
    assert {n: art.metadata["layers"][n]["weight_dtype"] for n in pointwise} == {n: "int4" for n in pointwise}
    mixed = run_onnx(art.path, x_eval)
    assert acc(mixed) >= acc(ref) - KWS_MIXED_MAX_DROP, (acc(mixed), acc(ref))
