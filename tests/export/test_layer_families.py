"""Conv1D and flat-input (MLP, Dense autoencoder) models through every stage: canonicalize, prune
(weights and filters: the pruned model equals the masked one), quantize (plan + simulate) and
export to every format, each artifact run in its own runtime against Keras.

The models are tiny and trained for a few epochs in the test: digits flattened to (64,) for the MLP
and the autoencoder, three sine frequencies with noise on (32, 3) for the Conv1D classifier.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from toolchain.verify import DEFAULT_THRESHOLDS

#: pruned model vs masked reference (float32 arithmetic, same weights)
PRUNED_EQ_MASKED_ATOL = 1e-4
#: the Dense autoencoder's reconstruction (linear output, inputs in [0, 1]): mean |artifact - Keras|
#: per element, by format kind; float formats use the verify stage's fp32 bound
AE_MEAN_ABS_DIFF = {"fp32": DEFAULT_THRESHOLDS["fp32"].max_abs_diff,
                    "int8": DEFAULT_THRESHOLDS["int8"].max_mean_abs_diff,
                    "mixed": DEFAULT_THRESHOLDS["mixed"].max_mean_abs_diff}
ALL_FORMATS = "tflite-fp32,tflite-int8,tflite-mixed,onnx-fp32,onnx-int8,onnx-mixed,mcu"


def _flat_digits(task: str):
    from tests.export.helpers import digits
    from toolchain.data import Dataset

    d = digits()
    xt = np.ascontiguousarray(d.x_train[:600].reshape(600, -1))
    xe = np.ascontiguousarray(d.x_eval[:200].reshape(200, -1))
    if task == "autoencoder":
        return Dataset("digits_flat_ae", xt, xt.copy(), xe, xe.copy(), (), (64,), "digits flattened", task=task)
    return Dataset("digits_flat", xt, d.y_train[:600].copy(), xe, d.y_eval[:200].copy(), d.class_names, (64,),
                   "digits flattened")


def _sines(n: int, seed: int):
    """(n, 32, 3) signals whose class is the frequency of the sine on channel 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    t = np.arange(32) / 32.0
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = rng.normal(0, 0.3, (n, 32, 3))
    x[:, :, 0] += np.sin(2 * np.pi * (y[:, None] + 1) * 2 * t + phase)
    return x.astype(np.float32), y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def built(kind: str):
    """(model, dataset) for ``mlp``, ``conv1d`` or ``autoencoder``, trained a few epochs."""
    import tensorflow as tf
    from toolchain.data import Dataset

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    if kind == "mlp":
        ds = _flat_digits("classification")
        inp = L.Input((64,), name="features")
        x = L.Dense(32, activation="relu", name="fc1")(inp)
        x = L.Dropout(0.1, name="drop")(x)
        x = L.Dense(16, activation="relu", name="fc2")(x)
        out = L.Dense(10, activation="softmax", name="head")(x)
        loss = "sparse_categorical_crossentropy"
    elif kind == "conv1d":
        xt, yt = _sines(400, 0)
        xe, ye = _sines(200, 1)
        ds = Dataset("sines", xt, yt, xe, ye, ("f1", "f2", "f3"), (32, 3), "synthetic sines")
        inp = L.Input((32, 3), name="signal")
        x = L.Conv1D(8, 5, padding="same", name="conv1")(inp)
        x = L.BatchNormalization(name="bn1")(x)
        x = L.ReLU(name="relu1")(x)
        x = L.MaxPooling1D(2, name="pool1")(x)
        x = L.Conv1D(16, 3, padding="same", activation="relu", name="conv2")(x)
        x = L.GlobalAveragePooling1D(name="gap")(x)
        out = L.Dense(3, activation="softmax", name="head")(x)
        loss = "sparse_categorical_crossentropy"
    else:
        ds = _flat_digits("autoencoder")
        inp = L.Input((64,), name="features")
        x = L.Dense(32, activation="relu", name="enc1")(inp)
        x = L.Dense(8, activation="relu", name="code")(x)
        x = L.Dense(32, activation="relu", name="dec1")(x)
        out = L.Dense(64, name="recon")(x)
        loss = "mse"
    model = tf.keras.Model(inp, out, name=kind)
    model.compile(tf.keras.optimizers.Adam(0.01), loss)
    model.fit(ds.x_train, ds.y_train, epochs=15, batch_size=64, verbose=0, shuffle=False)
    return model, ds


def _predict(model, x):
    return np.asarray(model.predict(x, batch_size=256, verbose=0), np.float64)


def _report(name, got, want, tol):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    bad = diff > tol
    return (f"{name}: {int(bad.sum())} of {diff.size} elements off by more than {tol}, "
            f"max {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}")


KINDS = ("mlp", "conv1d", "autoencoder")


@pytest.mark.parametrize("kind", KINDS)
def test_canonicalize_keeps_outputs(kind):
    from toolchain.canonicalize import canonicalize

    model, ds = built(kind)
    cm = canonicalize(model)
    x = ds.x_eval[:64]
    got, want = _predict(cm.model, x), _predict(model, x)
    assert np.allclose(got, want, atol=PRUNED_EQ_MASKED_ATOL), _report(kind, got, want, PRUNED_EQ_MASKED_ATOL)
    if kind == "conv1d":
        assert cm.folded_batchnorm == {"bn1": "conv1"}
    kernels = {cm.layer_map[n] for n in cm.kernel_layers()}
    assert kernels == {l.name for l in model.layers if hasattr(l, "kernel")}


@pytest.mark.parametrize("kind", KINDS)
def test_weight_pruning_equals_masked_model(kind):
    from toolchain.prune import apply_weight_masks, clone, prune

    model, ds = built(kind)
    criterion = "relevance" if kind != "autoencoder" else "magnitude"
    res = prune(model, ds, criterion=criterion, granularity="weight", sparsity=0.5, samples=100, quiet=True)
    masked = clone(model)
    apply_weight_masks(masked, res.masks)
    x = ds.x_eval[:64]
    got, want = _predict(res.model, x), _predict(masked, x)
    assert np.allclose(got, want, atol=PRUNED_EQ_MASKED_ATOL), _report(kind, got, want, PRUNED_EQ_MASKED_ATOL)
    assert 0.45 <= res.sparsity <= 0.55
    for name, mask in res.masks.items():
        k = res.model.get_layer(name).kernel.numpy()
        assert np.all(k[~mask] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_filter_pruning_removes_channels_like_zeroing_them(kind):
    from toolchain.prune import prune
    from toolchain.prune.surgery import channel_groups, count_params, zero_channels

    model, ds = built(kind)
    groups = {g.name: g for g in channel_groups(model)}
    # the head never is a producer; every hidden kernel layer is
    hidden = {"mlp": {"fc1", "fc2"}, "conv1d": {"conv1", "conv2"}, "autoencoder": {"enc1", "code", "dec1"}}[kind]
    assert set(groups) == hidden
    if kind == "conv1d":
        assert groups["conv1"].tied == ("bn1",) and groups["conv1"].consumers == ("conv2",)
    criterion = "relevance" if kind != "autoencoder" else "magnitude"
    res = prune(model, ds, criterion=criterion, granularity="filter", sparsity=0.5, samples=100, quiet=True)
    assert set(res.removed_channels) == hidden
    zeroed = zero_channels(model, res.removed_channels)
    x = ds.x_eval[:64]
    got, want = _predict(res.model, x), _predict(zeroed, x)
    assert np.allclose(got, want, atol=PRUNED_EQ_MASKED_ATOL), _report(kind, got, want, PRUNED_EQ_MASKED_ATOL)
    assert count_params(res.model) < count_params(model)
    for name in hidden:
        width = res.model.get_layer(name).kernel.shape[-1]
        assert width == groups[name].num_channels - len(res.removed_channels[name])


@pytest.mark.parametrize("kind", KINDS)
def test_plan_and_simulate(kind):
    from toolchain.quantize import plan_bits, quantize
    from toolchain.quantize.kernels import kernels_of

    model, ds = built(kind)
    allocator = "relevance" if kind != "autoencoder" else "sensitivity"
    plan = plan_bits(model, ds, allocator=allocator, budget="avg-bits=6", calibration_samples=100, quiet=True)
    assert set(plan.layers) == set(kernels_of(model))
    assert {lb.weight_bits for lb in plan.layers.values()} <= {2, 4, 8}
    res = quantize(model, plan, ds, quiet=True)
    if kind == "autoencoder":
        assert np.isnan(res.accuracy)  # no top-1 for reconstruction targets
        sim = _predict(res.model, ds.x_eval)
        err = np.abs(sim - _predict(model, ds.x_eval)).mean()
        assert err <= AE_MEAN_ABS_DIFF["mixed"], f"simulated plan moves the reconstruction by {err:.3g} on average"
    else:
        assert res.accuracy >= res.float_accuracy - DEFAULT_THRESHOLDS["mixed"].max_accuracy_drop


@pytest.mark.parametrize("kind", ("mlp", "conv1d"))
def test_export_every_format(kind, tmp_path):
    """Every format through ``export``, which runs each artifact in its runtime against Keras
    (the verify stage's default thresholds) and the MCU bundle in tflite-micro."""
    from toolchain.export import export
    from toolchain.export.flatbuffer import read_flatbuffer
    from toolchain.quantize import plan_bits

    model, ds = built(kind)
    plan = plan_bits(model, ds, allocator="uniform", candidates=(4,), quiet=True)
    bundle = export(model, ds, ALL_FORMATS, tmp_path / "out", bitplan=plan, calibration_samples=100, quiet=True)
    report = bundle.verify
    assert report.passed, report
    mixed = bundle.artifacts["tflite-mixed"]
    ops = [op.op for op in read_flatbuffer(mixed.path.read_bytes()).ops]
    if kind == "conv1d":
        assert ops.count("CONV_2D") == 2  # each Conv1D ran as a height-1 CONV_2D
    # every planned kernel was found in the file and stored as INT4
    layers = mixed.metadata["layers"]
    assert {l for l in layers} >= set(plan.layers), layers
    assert all(layers[n]["weight_type"] == "INT4" for n in plan.layers), layers
    assert bundle.mcu.micro is not None and bundle.mcu.micro.top1_agreement == 1.0, bundle.mcu.micro
    if kind == "conv1d":
        # the op resolver registers the reshapes the converter put around each CONV_2D
        assert {"EXPAND_DIMS", "CONV_2D", "RESHAPE", "MAX_POOL_2D"} <= set(bundle.mcu.ops), bundle.mcu.ops
        resolver = (bundle.mcu.out_dir / "op_resolver.h").read_text()
        assert "AddExpandDims" in resolver and "AddReshape" in resolver


def test_export_autoencoder_every_format(tmp_path):
    """The autoencoder has no classes, so the verify stage's top-1 checks do not apply: each
    artifact is run in its runtime and its reconstruction compared with Keras' element by element,
    and the MCU bundle's model is run in tflite-micro against TFLite."""
    from toolchain.export.mcu import write_mcu_bundle
    from toolchain.export.onnx_backend import export_onnx_fp32, export_onnx_int8, export_onnx_mixed, run_onnx
    from toolchain.export.tflite_backend import export_tflite, run_tflite
    from toolchain.quantize import plan_bits

    model, ds = built("autoencoder")
    plan = plan_bits(model, ds, allocator="uniform", candidates=(8,), quiet=True)
    calib, _ = ds.calibration(100)
    x = ds.x_eval
    want = _predict(model, x)
    runs = {
        ("tflite-fp32", "fp32"): lambda p: run_tflite(export_tflite(model, "fp32", p).path, x),
        ("tflite-int8", "int8"): lambda p: run_tflite(export_tflite(model, "int8", p, calib, io="float").path, x),
        ("tflite-mixed", "mixed"): lambda p: run_tflite(
            export_tflite(model, "mixed", p, calib, io="float", plan=plan).path, x),
        ("onnx-fp32", "fp32"): lambda p: run_onnx(export_onnx_fp32(model, p).path, x),
        ("onnx-int8", "int8"): lambda p: run_onnx(export_onnx_int8(model, calib, p).path, x),
        ("onnx-mixed", "mixed"): lambda p: run_onnx(export_onnx_mixed(model, calib, plan, p).path, x),
    }
    problems = []
    for (fmt, kind), run in runs.items():
        got = np.asarray(run(tmp_path / (fmt + (".onnx" if fmt.startswith("onnx") else ".tflite"))), np.float64)
        assert got.shape == want.shape, (fmt, got.shape)
        err = np.abs(got - want).mean() if kind != "fp32" else np.abs(got - want).max()
        if err > AE_MEAN_ABS_DIFF[kind]:
            problems.append(_report(fmt, got, want, AE_MEAN_ABS_DIFF[kind]))
    assert not problems, "; ".join(problems)
    int8 = export_tflite(model, "int8", tmp_path / "ae_int8.tflite", calib)
    mcu = write_mcu_bundle(int8.path, tmp_path / "mcu", "ae", check_x=x[:50])
    assert mcu.micro is not None and mcu.micro.max_abs_diff_steps <= 1, mcu.micro
