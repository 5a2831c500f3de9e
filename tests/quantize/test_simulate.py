"""The tfmot simulation: quantizers against the numpy reference, BN folding, a uniform 8-bit model
close to float, planned quantizers really applied, calibrated, saved and loaded back."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from toolchain.quantize import plan_bits, quantize
from toolchain.quantize.bitplan import BitPlan, LayerBits
from toolchain.quantize.kernels import channel_matrix, fake_quant_channels, kernels_of
from toolchain.quantize.simulate import (ChannelBitsQuantizer, PlanOutputQuantizeConfig, PlanQuantizeConfig,
                                         accuracy, build_qat_model, fold_batchnorm, load_qat_model, predict,
                                         save_qat_model)

#: float32 TensorFlow vs float64 numpy, relative to the channel's step: exact except where w / step
#: lies within float32 rounding of a half level, which may round either way (one step)
STEP_RTOL = 1e-4
#: at most this many elements may sit on such a tie
MAX_TIES = 2
#: uniform 8-bit simulation vs float: top-1 on the eval split, and mean |probability| difference
ACC_TOL_8BIT = 0.01
PROB_TOL_8BIT = 0.01
FOLD_ATOL = 1e-5


def _assert_matches_reference(name, got, want, step):
    off = np.abs(got - want) / np.maximum(step, 1e-30)
    bad = off > STEP_RTOL
    ties = bad & (np.abs(off - 1) < STEP_RTOL * 10)
    assert not (bad & ~ties).any() and ties.sum() <= MAX_TIES, (
        f"{name}: {int(bad.sum())} of {bad.size} elements off the reference by more than {STEP_RTOL} steps "
        f"(worst {off.max():.3g} steps at {np.unravel_index(off.argmax(), off.shape)})")


def _run_quantizer(quantizer, w, training=True):
    holder = tf.keras.layers.Layer()
    qvars = quantizer.build(w.shape, "kernel", holder)
    out = quantizer(tf.constant(w), True, qvars)
    if not training:
        out = quantizer(tf.constant(w), False, qvars)
    return out.numpy()


@pytest.mark.parametrize("cls,shape,per_tensor", [
    ("Conv2D", (3, 3, 4, 16), False), ("DepthwiseConv2D", (3, 3, 8, 2), False), ("Dense", (24, 12), True)])
@pytest.mark.parametrize("training", [True, False])
def test_channel_bits_quantizer_matches_numpy_reference(cls, shape, per_tensor, training):
    rng = np.random.RandomState(0)
    w = (rng.randn(*shape) * rng.uniform(0.1, 3, size=shape[-1])).astype(np.float32)
    w[..., 0] = 0.0  # a pruned channel (Conv2D / Dense) or a pruned slice (depthwise)
    channels = channel_matrix(cls, w).shape[1]
    bits = rng.choice([2, 3, 4, 8], size=channels)
    q = ChannelBitsQuantizer(bits, per_tensor=per_tensor, depthwise=cls == "DepthwiseConv2D")
    got = channel_matrix(cls, _run_quantizer(q, w, training))
    want = fake_quant_channels(channel_matrix(cls, w), bits, per_tensor)
    from toolchain.quantize.kernels import channel_scales
    step = channel_scales(channel_matrix(cls, w), bits, per_tensor)
    _assert_matches_reference(f"{cls} per {'tensor' if per_tensor else 'channel'}", got, want, step[None, :])
    assert np.all(got[channel_matrix(cls, w) == 0] == 0)


def test_channel_bits_quantizer_passes_gradients_straight_through():
    w = tf.Variable(np.random.RandomState(1).randn(3, 3, 2, 4).astype(np.float32))
    q = ChannelBitsQuantizer([2, 4, 8, 3])
    qvars = q.build(w.shape, "kernel", tf.keras.layers.Layer())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(w, True, qvars) * 3.0)
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), 3.0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_axis", [True, False])
def test_last_value_quantizer_is_the_same_quantisation(bits, per_axis):
    w = np.random.RandomState(bits).randn(3, 3, 4, 6).astype(np.float32)
    q = tfmot.quantization.keras.quantizers.LastValueQuantizer(num_bits=bits, per_axis=per_axis, symmetric=True,
                                                               narrow_range=True)
    got = channel_matrix("Conv2D", _run_quantizer(q, w))
    m = channel_matrix("Conv2D", w)
    want = fake_quant_channels(m, bits, per_tensor=not per_axis)
    from toolchain.quantize.kernels import channel_scales
    _assert_matches_reference(f"LastValueQuantizer {bits} bits", got, want,
                              channel_scales(m, bits, not per_axis)[None, :])


def test_fold_keeps_names_and_outputs():
    inp = tf.keras.Input((8, 8, 2), name="inp")
    h = tf.keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    h = tf.keras.layers.ReLU(name="relu")(h)
    h = tf.keras.layers.Dropout(0.3, name="drop")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    out = tf.keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = tf.keras.Model(inp, out)
    rng = np.random.RandomState(0)
    bn = model.get_layer("bn")
    bn.set_weights([rng.rand(4) + 0.5, rng.randn(4), rng.randn(4), rng.rand(4) + 0.5])
    before = [w.copy() for w in model.get_weights()]
    folded = fold_batchnorm(model)
    assert [l.name for l in folded.layers] == ["inp", "conv", "relu", "flat", "head"]
    x = rng.randn(5, 8, 8, 2).astype(np.float32)
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=FOLD_ATOL)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "the user's model changed"


def _uniform_plan(model, bits):
    folded = fold_batchnorm(model)
    return BitPlan({n: LayerBits(bits, 8, None, None, k.num_channels, k.num_weights)
                    for n, k in kernels_of(folded).items()}, "quant.uniform")


def test_uniform_8_bit_is_close_to_float(digits_model, digits_data):
    qmodel = build_qat_model(digits_model, _uniform_plan(digits_model, 8), digits_data.x_train)
    x, y = digits_data.x_eval, digits_data.y_eval
    float_acc, q_acc = accuracy(digits_model, x, y), accuracy(qmodel, x, y)
    assert abs(q_acc - float_acc) <= ACC_TOL_8BIT, f"8-bit {q_acc:.4f} vs float {float_acc:.4f}"
    diff = np.abs(predict(qmodel, x) - predict(digits_model, x)).mean()
    assert diff <= PROB_TOL_8BIT, f"mean |probability difference| {diff:.4f} > {PROB_TOL_8BIT}"


def test_every_planned_kernel_is_quantised_as_planned(digits_model, digits_data):
    """Regression: tfmot's ReLU layout transforms replace a Conv's QuantizeConfig with a no-op."""
    folded = fold_batchnorm(digits_model)
    kernels = kernels_of(folded)
    rng = np.random.RandomState(0)
    layers = {}
    for i, (n, k) in enumerate(kernels.items()):
        if i % 2:
            gb = tuple(int(b) for b in rng.choice([2, 3, 4, 8], size=-(-k.num_channels // 8)))
            layers[n] = LayerBits(max(gb), 8, gb, 8, k.num_channels, k.num_weights)
        else:
            layers[n] = LayerBits(3, 8, None, None, k.num_channels, k.num_weights)
    plan = BitPlan(layers, granularity="group")
    qmodel = build_qat_model(digits_model, plan, digits_data.x_train)
    seen = set()
    for layer in qmodel.layers:
        if not hasattr(layer, "_weight_vars"):
            continue
        name = layer.layer.name
        if name in plan.layers:
            assert isinstance(layer.quantize_config, PlanQuantizeConfig), f"{name}: {type(layer.quantize_config)}"
            (weight, quantizer, qvars), = layer._weight_vars
            got = channel_matrix(kernels[name].layer_class, quantizer(weight, False, qvars).numpy())
            bits = plan.layers[name].channel_bits()
            want = kernels[name].fake_quant(bits)
            from toolchain.quantize.kernels import channel_scales
            _assert_matches_reference(name, got, want,
                                      channel_scales(kernels[name].matrix, bits, kernels[name].per_tensor)[None, :])
            seen.add(name)
    assert seen == set(plan.layers)


def test_int16_activations_reach_the_following_relu(digits_model, digits_data):
    plan = _uniform_plan(digits_model, 8)
    first = next(iter(plan.layers))
    layers = dict(plan.layers)
    lb = layers[first]
    layers[first] = LayerBits(lb.weight_bits, 16, None, None, lb.num_channels, lb.num_weights)
    qmodel = build_qat_model(digits_model, BitPlan(layers), digits_data.x_train[:64])
    relu = [l for l in qmodel.layers if isinstance(getattr(l, "quantize_config", None), PlanOutputQuantizeConfig)]
    assert len(relu) == 1 and relu[0].quantize_config.bits == 16
    assert relu[0]._output_quantizers[0].num_bits == 16


def test_saved_model_round_trip(digits_model, digits_data, tmp_path):
    from toolchain.quantize.simulate import QAT_MODEL_FILE

    plan = plan_bits(digits_model, digits_data, "uniform", (4,))
    qmodel = build_qat_model(digits_model, plan, digits_data.x_train)
    path = tmp_path / QAT_MODEL_FILE
    save_qat_model(qmodel, path)
    loaded = load_qat_model(path)
    np.testing.assert_array_equal(predict(loaded, digits_data.x_eval), predict(qmodel, digits_data.x_eval))
    # what export reads from a loaded graph (compress's stage cache, `toolchain export --bitplan`):
    # the same rounded kernels and stripped float model as from the graph in memory
    from toolchain.quantize.simulate import kernel_grids, strip_quantization

    for name, grid in kernel_grids(qmodel).items():
        again = kernel_grids(loaded)[name]
        np.testing.assert_array_equal(again.kernel, grid.kernel, err_msg=name)
        np.testing.assert_array_equal(again.step, grid.step, err_msg=name)
    for a, b in zip(strip_quantization(qmodel, digits_model).get_weights(),
                    strip_quantization(loaded, digits_model).get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sensitivity_allocator_and_quantize(digits_model, digits_data):
    plan = plan_bits(digits_model, digits_data, "sensitivity", (2, 4, 8), "avg-bits=4", quiet=True)
    sens = plan.notes["layer_sensitivity"]
    assert all(s["2"] > s["8"] for s in sens.values()), sens
    assert plan.notes["planned_bits"] <= plan.notes["budget_bits"]
    result = quantize(digits_model, plan, digits_data, qat_epochs=1, quiet=True)
    assert result.size.avg_weight_bits <= 4.0
    assert 0.0 <= result.accuracy <= 1.0 and result.history["loss"]


def test_relevance_of_another_model_is_refused(digits_model, digits_data):
    from dataclasses import dataclass

    from toolchain.errors import ConfigError

    @dataclass
    class Stale:
        model_hash: str = "0" * 64
        layers: dict = None

    with pytest.raises(ConfigError, match="computed for another model"):
        plan_bits(digits_model, digits_data, "relevance", (2, 4, 8), "avg-bits=4", relevance=Stale())


#: bias / (input step x weight step) must be an integer to this many bias steps (float32 biases)
BIAS_CODE_ATOL = 1e-3


def test_biases_lie_on_the_grid_the_artifacts_store_them_on(digits_model, digits_data):
    """After calibration and after QAT, every quantized kernel's bias is a whole number of
    (input step x weight step) per channel: the int32 bias TFLite and ONNX store, so the simulation
    adds what the runtimes add."""
    from toolchain.quantize import quantize
    from toolchain.quantize.simulate import _input_grid, kernel_grids, quantized_layers

    plan = _uniform_plan(digits_model, 4)
    result = quantize(digits_model, plan, digits_data, qat_epochs=1, calibration_samples=128, quiet=True)
    for qmodel in (build_qat_model(digits_model, plan, digits_data.x_train[:128]), result.model):
        grids = kernel_grids(qmodel)
        checked = []
        for name, inner, wrapper in quantized_layers(qmodel):
            if name not in grids or not getattr(inner, "use_bias", False):
                continue
            unit = _input_grid(wrapper).scale * grids[name].step
            codes = inner.bias.numpy().astype(np.float64) / unit
            off = np.abs(codes - np.round(codes))
            assert off.max() <= BIAS_CODE_ATOL, (
                f"{name}: {int(np.sum(off > BIAS_CODE_ATOL))} of {off.size} biases off their grid, "
                f"worst channel {int(off.argmax())} by {off.max():.3g} steps")
            checked.append(name)
        assert set(checked) == set(plan.layers), checked
