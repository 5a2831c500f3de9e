"""Per-weight LRP relevance of a Conv1D net against the float64 reference, as for Conv2D in
test_relevance.py (the engine runs iNNvestigate in a child process, a few seconds per rule)."""
import numpy as np
import pytest
import tensorflow as tf

from toolchain.relevance import compute_relevance
from tests.relevance.reference_lrp import reference_relevance
from tests.relevance.test_relevance import (REFERENCE_RTOL, REFERENCE_RULES, _assert_close,  # noqa: F401
                                            _private_cache, _reference_layers)


def _conv1d_net():
    rng = np.random.RandomState(3)
    inp = tf.keras.Input((10, 2))
    h = tf.keras.layers.Conv1D(4, 3, activation="relu", name="conv_a")(inp)
    h = tf.keras.layers.Conv1D(3, 2, name="conv_b")(h)
    h = tf.keras.layers.ReLU(name="relu")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    out = tf.keras.layers.Dense(3, name="logits")(h)
    model = tf.keras.Model(inp, out)
    for layer in model.layers:
        if layer.weights:
            w, b = layer.get_weights()
            layer.set_weights([rng.randn(*w.shape).astype("float32"), 0.1 * rng.randn(*b.shape).astype("float32")])
    return model, rng.randn(12, 10, 2).astype("float32")


@pytest.mark.parametrize("rule", sorted(REFERENCE_RULES))
def test_conv1d_per_weight_relevance_matches_float64_reference(rule):
    model, x = _conv1d_net()
    neurons = np.arange(len(x)) % model.output_shape[-1]
    rmap = compute_relevance(model, x, neurons, rule=rule, use_cache=False, quiet=True)
    layers, names = _reference_layers(model)
    per_weight, _ = reference_relevance(layers, x, neurons, REFERENCE_RULES[rule])
    assert sorted(rmap.layers) == sorted(names[i] for i in per_weight) == ["conv_a", "conv_b", "logits"]
    for idx, want in per_weight.items():
        name = names[idx]
        got = rmap[name].weight
        assert got.shape == model.get_layer(name).get_weights()[0].shape
        _assert_close(f"{rule} {name}", got.astype(np.float64), want, REFERENCE_RTOL)
