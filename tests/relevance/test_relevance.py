"""The relevance engine against an independent float64 LRP, plus conservation, determinism,
caching and error cases. The engine runs iNNvestigate in a child process (a few seconds each)."""
import numpy as np
import pytest
import tensorflow as tf

from toolchain.errors import ConfigError, DataError
from toolchain.relevance import RULES, compute_relevance, load_relevance, save_relevance
from tests.relevance.reference_lrp import reference_relevance

#: float32 engine vs float64 reference, relative to the largest |relevance| in the layer
REFERENCE_RTOL = 2e-3
#: sum of per-weight relevance vs relevance at the layer output (zero bias, eps=1e-7)
CONSERVATION_RTOL = 1e-4

REFERENCE_RULES = {
    "lrp.epsilon": {"kind": "epsilon", "epsilon": 1e-7},
    "lrp.alpha_1_beta_0": {"kind": "alpha_beta", "alpha": 1.0, "beta": 0.0},
    "lrp.alpha_2_beta_1": {"kind": "alpha_beta", "alpha": 2.0, "beta": 1.0},
}


def _dense_net(zero_bias=False):
    rng = np.random.RandomState(1)
    inp = tf.keras.Input((8,))
    h = tf.keras.layers.Dense(6, activation="relu", name="fc1")(inp)
    h = tf.keras.layers.Dense(5, activation="relu", name="fc2")(h)
    out = tf.keras.layers.Dense(3, activation="softmax", name="logits")(h)
    model = tf.keras.Model(inp, out)
    for layer in model.layers[1:]:
        w, b = layer.get_weights()
        layer.set_weights([rng.randn(*w.shape).astype("float32"),
                           np.zeros_like(b) if zero_bias else 0.1 * rng.randn(*b.shape).astype("float32")])
    x = rng.randn(20, 8).astype("float32")
    return model, x


def _conv_net(zero_bias=False):
    rng = np.random.RandomState(2)
    inp = tf.keras.Input((6, 6, 2))
    h = tf.keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = tf.keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="dw")(h)
    h = tf.keras.layers.ReLU(name="relu")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    out = tf.keras.layers.Dense(4, name="logits")(h)
    model = tf.keras.Model(inp, out)
    for layer in model.layers:
        if layer.weights:
            w, b = layer.get_weights()
            layer.set_weights([rng.randn(*w.shape).astype("float32"),
                               np.zeros_like(b) if zero_bias else 0.1 * rng.randn(*b.shape).astype("float32")])
    x = rng.randn(12, 6, 6, 2).astype("float32")
    return model, x


def _reference_layers(model):
    """(class, kernel, bias, activation) per layer, with standalone ReLU folded into the producer;
    and the Keras layer name of each entry."""
    layers, names = [], []
    for layer in model.layers[1:]:
        cls = type(layer).__name__
        if cls == "Flatten":
            layers.append(("Flatten",))
            names.append(layer.name)
        elif cls == "ReLU":
            layers[-1] = layers[-1][:3] + ("relu",)
        else:
            act = layer.get_config()["activation"]
            layers.append((cls, *layer.get_weights(), "relu" if act == "relu" else "linear"))
            names.append(layer.name)
    return layers, names


def _assert_close(name, got, want, rtol):
    scale = max(np.abs(want).max(), 1e-12)
    err = np.abs(got - want) / scale
    bad = err > rtol
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} elements off by more than {rtol} (relative to max "
        f"{scale:.3g}); worst at {np.unravel_index(err.argmax(), err.shape)}: got "
        f"{got.flat[err.argmax()]:.6g}, want {want.flat[err.argmax()]:.6g}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("net", [_dense_net, _conv_net], ids=["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(REFERENCE_RULES))
def test_per_weight_relevance_matches_float64_reference(net, rule):
    model, x = net()
    neurons = np.arange(len(x)) % model.output_shape[-1]
    rmap = compute_relevance(model, x, neurons, rule=rule, use_cache=False, quiet=True)
    layers, names = _reference_layers(model)
    per_weight, _ = reference_relevance(layers, x, neurons, REFERENCE_RULES[rule])
    assert sorted(rmap.layers) == sorted(names[i] for i in per_weight)
    for idx, want in per_weight.items():
        name = names[idx]
        got = rmap[name].weight
        assert got.shape == model.get_layer(name).get_weights()[0].shape
        _assert_close(f"{rule} {name}", got.astype(np.float64), want, REFERENCE_RTOL)


@pytest.mark.parametrize("net", [_dense_net, _conv_net], ids=["dense", "conv"])
def test_conservation_with_zero_bias(net):
    model, x = net(zero_bias=True)
    neurons = np.zeros(len(x), dtype=int)
    rmap = compute_relevance(model, x, neurons, rule="lrp.epsilon", use_cache=False, quiet=True)
    logits = tf.keras.Model(model.input, model.layers[-1].output)  # softmax stripped below
    z = x
    for name, lr in rmap.layers.items():
        total = float(lr.weight.sum(dtype=np.float64))
        assert abs(total - lr.relevance_out) <= CONSERVATION_RTOL * abs(lr.relevance_out) + 1e-6, name
        assert abs(total - lr.relevance_in) <= CONSERVATION_RTOL * abs(lr.relevance_in) + 1e-6, name
    # the output layer receives the explained logit itself
    head = rmap[model.layers[-1].name]
    pre_softmax = model.layers[-1].get_config()["activation"] == "softmax"
    if not pre_softmax:
        want = float(logits(z).numpy()[:, 0].sum())
        assert abs(head.relevance_out - want) <= 1e-4 * abs(want) + 1e-5


def test_determinism_and_cache(tmp_path):
    model, x = _conv_net()
    y = np.arange(len(x)) % 4
    first = compute_relevance(model, x, y, rule="lrp.epsilon", quiet=True)
    second = compute_relevance(model, x, y, rule="lrp.epsilon", quiet=True)
    fresh = compute_relevance(model, x, y, rule="lrp.epsilon", quiet=True, use_cache=False)
    assert not first.cached and second.cached and not fresh.cached
    for name in first.layers:
        np.testing.assert_array_equal(first[name].weight, second[name].weight)
        np.testing.assert_array_equal(first[name].weight, fresh[name].weight)
    # a different rule or sample set is a different cache entry
    other = compute_relevance(model, x[:6], y[:6], rule="lrp.epsilon", quiet=True)
    assert not other.cached and other.samples == 6


def test_save_and_load_round_trip(tmp_path):
    model, x = _dense_net()
    rmap = compute_relevance(model, x, np.zeros(len(x), int), use_cache=False, quiet=True)
    save_relevance(rmap, tmp_path / "r")
    back = load_relevance(tmp_path / "r")
    assert back.rule == rmap.rule and back.samples == rmap.samples and back.model_hash == rmap.model_hash
    for name in rmap.layers:
        np.testing.assert_array_equal(back[name].weight, rmap[name].weight)
    np.testing.assert_array_equal(back.heatmaps, rmap.heatmaps)


def test_bad_inputs_raise_one_clear_error():
    model, x = _dense_net()
    y = np.zeros(len(x), int)
    with pytest.raises(ConfigError, match="unknown LRP rule 'lrp.nope'; known: .*lrp.epsilon"):
        compute_relevance(model, x, y, rule="lrp.nope")
    with pytest.raises(ConfigError, match="class selection"):
        compute_relevance(model, x, y, class_selection="best")
    with pytest.raises(DataError, match="expects"):
        compute_relevance(model, x[:, :4], y)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        compute_relevance(model, bad, y)
    with pytest.raises(DataError, match="no calibration samples"):
        compute_relevance(model, x[:0], y[:0])
    with pytest.raises(DataError, match="labels go up to 7"):
        compute_relevance(model, x, np.full(len(x), 7))


def test_every_registered_rule_runs():
    model, x = _conv_net()
    y = np.arange(len(x)) % 4
    for rule in RULES:
        rmap = compute_relevance(model, x, y, rule=rule, use_cache=False, quiet=True)
        assert all(np.isfinite(lr.weight).all() for lr in rmap.layers.values()), rule


def _dense_autoencoder():
    rng = np.random.RandomState(3)
    inp = tf.keras.Input((10,))
    h = tf.keras.layers.Dense(4, activation="relu", name="enc")(inp)
    out = tf.keras.layers.Dense(10, name="dec")(h)
    model = tf.keras.Model(inp, out)
    x = rng.randn(24, 10).astype("float32")
    return model, x


def test_autoencoder_relevance_reaches_every_output_unit(tmp_path):
    """One output unit explained (the classifier default) leaves the other 9 columns of the last
    kernel at zero; ``all_outputs`` (chosen for the autoencoder task) gives every column relevance."""
    model, x = _dense_autoencoder()
    one_unit = compute_relevance(model, x, np.zeros(len(x), int), use_cache=False, quiet=True)
    cols_one = np.abs(one_unit["dec"].weight).sum(axis=0)
    assert np.count_nonzero(cols_one) == 1  # what a regressor got before

    rmap = compute_relevance(model, x, x, task="autoencoder", use_cache=True, quiet=True)
    assert rmap.class_selection == "all_outputs" and rmap.task == "autoencoder"
    cols = np.abs(rmap["dec"].weight).sum(axis=0)
    assert np.all(cols > 0), f"{int(np.sum(cols == 0))} of {cols.size} output units without relevance"
    meta = rmap.metadata()
    assert meta["task"] == "autoencoder" and "whole output vector" in meta["explains"]
    # the cache keys the task: the same arrays explained as a classifier are a different entry
    again = compute_relevance(model, x, x, task="autoencoder", use_cache=True, quiet=True)
    assert again.cached and again.task == "autoencoder"
    save_relevance(rmap, tmp_path / "r")
    assert load_relevance(tmp_path / "r").task == "autoencoder"
    from toolchain.relevance.plots import plot_heatmaps  # 1-D samples plot as one row each

    assert plot_heatmaps(rmap, x[: len(rmap.heatmaps)], tmp_path / "h.png").stat().st_size > 0


def test_non_classification_selection_errors():
    model, x = _dense_autoencoder()
    with pytest.raises(ConfigError, match="'predicted' needs classes"):
        compute_relevance(model, x, x, class_selection="predicted", task="regression")
    with pytest.raises(DataError, match="float targets, not class labels"):
        compute_relevance(model, x, x, use_cache=False, task="classification")
    # without a task, float targets shaped like the inputs are an autoencoder's (as prune passes them)
    inferred = compute_relevance(model, x, x, use_cache=False, quiet=True)
    assert inferred.task == "autoencoder" and inferred.class_selection == "all_outputs"
