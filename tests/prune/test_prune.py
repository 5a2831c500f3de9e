"""Pruning: criteria and selection, weight masks, filter surgery through ``prune``, the schedule,
fine-tuning with masks held, the CLI, and error cases. One tiny model trained for a few seconds on
digits is shared; relevance (a child process, a few seconds) is computed once per module."""
import json

import numpy as np
import pytest
import tensorflow as tf

from toolchain.errors import ConfigError
from toolchain.prune import PruneResult, prune
from toolchain.prune.criteria import (Target, get_criterion, kept_count, select)
from toolchain.prune.schedule import HoldMasks, RelevancePolynomialSchedule, pruning_steps

#: pruned model vs the same weights masked by hand (identical arithmetic)
MASKED_ATOL = 1e-6
#: narrow (surgery) model vs the zeroed reference
SURGERY_ATOL = 1e-4
#: schedule values vs the closed-form polynomial
SCHEDULE_ATOL = 1e-6


def _tiny_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    inp = L.Input((8, 8, 1), name="input")
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = L.Activation("relu", name="relu1")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="relu2")(x)
    x = L.Conv2D(12, 1, name="pw")(x)
    x = L.Activation("relu", name="relu3")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(16, activation="relu", name="fc1")(x)
    out = L.Dense(10, activation="softmax", name="predictions")(x)
    return tf.keras.Model(inp, out, name="tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    import os

    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TOOLCHAIN_CACHE_DIR")
    os.environ["TOOLCHAIN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TOOLCHAIN_CACHE_DIR", None)
    else:
        os.environ["TOOLCHAIN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def digits():
    from toolchain.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    from models import compile_classifier

    model = compile_classifier(_tiny_model())
    model.fit(digits.x_train, digits.y_train, epochs=4, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def rmap(trained, digits, cache_dir):
    from toolchain.relevance import compute_relevance

    return compute_relevance(trained, digits.x_train[:200], digits.y_train[:200], quiet=True)


def _prune(trained, digits, rmap, **kw):
    kw.setdefault("samples", 200)
    if kw.get("criterion", "relevance") == "relevance":
        kw.setdefault("relevance", rmap)
    return prune(trained, digits, quiet=True, **kw)


def _report_mismatch(a, b, atol):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    bad = diff > atol
    return f"{int(bad.sum())} of {diff.size} elements off by up to {diff.max():.3g} (first at {np.argwhere(bad)[:3].tolist()})"


# ----------------------------------------------------------------------------------------------
# Selection (pure numpy)


def test_select_per_layer_has_exactly_the_requested_sparsity():
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=(3, 3, 4, 5)), "b": rng.normal(size=(17,)), "c": rng.normal(size=(64, 10))}
    for s in (0.0, 0.1, 0.3, 0.5, 0.77, 0.95):
        keep = select(scores, Target.at(s), "layer")
        for k, v in scores.items():
            assert keep[k].shape == v.shape
            assert int(keep[k].sum()) == kept_count(v.size, s), (k, s)
            # the removed ones are exactly the lowest scores
            if (~keep[k]).any() and keep[k].any():
                assert v[~keep[k]].max() <= v[keep[k]].min()


def test_select_global_counts_over_all_layers():
    rng = np.random.default_rng(1)
    scores = {"a": rng.normal(size=(40,)), "b": 10 * rng.normal(size=(60,))}
    keep = select(scores, Target.at(0.5), "global")
    assert sum(int(k.sum()) for k in keep.values()) == kept_count(100, 0.5)
    # raw global ranking: the larger-scaled layer keeps the extremes, the smaller one is in between
    allv = np.concatenate([scores["a"], scores["b"]])
    allk = np.concatenate([keep["a"], keep["b"]])
    assert allv[~allk].max() <= allv[allk].min()


def test_nonpositive_removes_exactly_the_nonpositive_scores():
    scores = {"a": np.array([-1.0, 0.0, 1e-9, 2.0, -0.0]), "b": np.array([[3.0, -2.0], [0.0, 5.0]])}
    keep = select(scores, Target.nonpositive())
    np.testing.assert_array_equal(keep["a"], [False, False, True, True, False])
    np.testing.assert_array_equal(keep["b"], [[True, False], [False, True]])


def test_select_keeps_earlier_removals_and_min_keep():
    scores = {"a": np.array([5.0, 4.0, 3.0, 2.0, 1.0])}
    earlier = {"a": np.array([False, True, True, True, True])}  # the best unit was removed earlier
    keep = select(scores, Target.at(0.4), pruned=earlier)
    assert not keep["a"][0] and int(keep["a"].sum()) == 3
    all_bad = {"a": np.array([-1.0, -3.0, -2.0])}
    keep = select(all_bad, Target.nonpositive(), min_keep=1)
    np.testing.assert_array_equal(keep["a"], [True, False, False])


def test_target_and_criterion_errors():
    for bad in (-0.1, 1.0, 1.5, float("nan"), "x", True):
        with pytest.raises(ConfigError, match="sparsity"):
            Target.at(bad)
    with pytest.raises(ConfigError, match="nonpositive"):
        Target.parse("zero")
    with pytest.raises(ConfigError, match="known: magnitude, random, relevance"):
        get_criterion("taylor")
    assert get_criterion("prune.magnitude") is get_criterion("magnitude")


# ----------------------------------------------------------------------------------------------
# Weight granularity


@pytest.mark.parametrize("criterion", ["relevance", "magnitude", "random"])
def test_weight_masks_exact_and_monotone(trained, digits, rmap, criterion):
    results = [_prune(trained, digits, rmap, criterion=criterion, sparsity=s) for s in (0.3, 0.6, 0.85)]
    for s, r in zip((0.3, 0.6, 0.85), results):
        for name, mask in r.masks.items():
            assert int((~mask).sum()) == mask.size - kept_count(mask.size, s), (criterion, name, s)
            assert r.layer_sparsity[name] == pytest.approx(1 - kept_count(mask.size, s) / mask.size)
    for lower, higher in zip(results, results[1:]):
        for name in lower.masks:
            # everything the lower sparsity removed is removed at the higher one
            assert not np.any(~lower.masks[name] & higher.masks[name]), (criterion, name)


def test_relevance_nonpositive_weight_mask_is_the_sign_of_relevance(trained, digits, rmap):
    r = _prune(trained, digits, rmap, rule="nonpositive")
    assert r.rule == "nonpositive" and r.steps[0].target_sparsity is None
    for name, mask in r.masks.items():
        np.testing.assert_array_equal(mask, rmap.layers[name].weight > 0, err_msg=name)


def test_stripped_model_equals_masked_model_and_user_model_is_untouched(trained, digits, rmap):
    before = [w.copy() for w in trained.get_weights()]
    r = _prune(trained, digits, rmap, criterion="relevance", sparsity=0.5, score="abs")
    assert isinstance(r, PruneResult)
    for w0, w1 in zip(before, trained.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    # a plain Keras model with the same layer classes (no wrappers)
    assert [type(l) for l in r.model.layers] == [type(l) for l in trained.layers]
    reference = tf.keras.models.clone_model(trained)
    reference.set_weights(trained.get_weights())
    for name, mask in r.masks.items():
        layer = reference.get_layer(name)
        var = layer.depthwise_kernel if isinstance(layer, tf.keras.layers.DepthwiseConv2D) else layer.kernel
        var.assign(var.numpy() * mask)
        kernel = r.model.get_layer(name).get_weights()[0]
        assert np.all(kernel[~mask] == 0.0), name
    x = digits.x_eval[:64]
    a, b = r.model.predict(x, verbose=0), reference.predict(x, verbose=0)
    assert np.allclose(a, b, atol=MASKED_ATOL), _report_mismatch(a, b, MASKED_ATOL)
    assert r.params_after == r.params_before
    assert r.nonzero_params_after < r.nonzero_params_before
    assert r.sparsity == pytest.approx(0.5, abs=0.01)


def test_fine_tuning_keeps_pruned_weights_exactly_zero(trained, digits, rmap):
    r = _prune(trained, digits, rmap, criterion="magnitude", sparsity=0.7, fine_tune_epochs=1)
    changed = False
    for name, mask in r.masks.items():
        kernel = r.model.get_layer(name).get_weights()[0]
        assert np.all(kernel[~mask] == 0.0), f"{name}: {int((kernel[~mask] != 0).sum())} pruned weights revived"
        original = trained.get_layer(name).get_weights()[0]
        changed |= not np.array_equal(kernel[mask], original[mask])
    assert changed, "fine-tuning did not change any kept weight"
    assert r.settings["fine_tune_steps"] == int(np.ceil(len(digits.x_train) / 32))


def test_hold_masks_callback_zeroes_after_every_batch():
    model = _tiny_model(1)
    mask = np.random.default_rng(0).random(model.get_layer("fc1").kernel.shape) > 0.5
    seen = []

    class Check(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(int(np.count_nonzero(self.model.get_layer("fc1").kernel.numpy()[~mask])))

    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(1).random((64, 8, 8, 1)).astype("float32")
    y = np.arange(64) % 10
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[HoldMasks({"fc1": mask}), Check()])
    assert seen == [0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------
# Filter granularity


@pytest.mark.parametrize("criterion", ["relevance", "magnitude", "random"])
def test_filter_pruning_shrinks_the_model_and_matches_the_zeroed_reference(trained, digits, rmap, criterion):
    from toolchain.prune.surgery import zero_channels

    r = _prune(trained, digits, rmap, criterion=criterion, granularity="filter", sparsity=0.5)
    assert set(r.removed_channels) == {"conv1", "pw", "fc1"}
    for group, removed in r.removed_channels.items():
        n = r.masks[group].size
        assert len(removed) == n - kept_count(n, 0.5), group
    assert r.params_after < r.params_before
    assert r.kernel_sparsity > r.sparsity == pytest.approx(0.5, abs=0.05)
    reference = zero_channels(trained, {g: list(c) for g, c in r.removed_channels.items()})
    x = digits.x_eval[:64]
    a, b = r.model.predict(x, verbose=0), reference.predict(x, verbose=0)
    assert np.allclose(a, b, atol=SURGERY_ATOL), _report_mismatch(a, b, SURGERY_ATOL)
    assert r.model.get_layer("pw").filters == 12 - len(r.removed_channels["pw"])


def test_filter_monotone_and_nonpositive(trained, digits, rmap):
    low = _prune(trained, digits, rmap, granularity="filter", sparsity=0.25)
    high = _prune(trained, digits, rmap, granularity="filter", sparsity=0.6)
    for g in low.removed_channels:
        assert set(low.removed_channels[g]) <= set(high.removed_channels[g]), g
    def expected(scores):
        removed = set(np.flatnonzero(scores <= 0).tolist())
        if len(removed) == scores.size:  # a group keeps its best channel
            removed.discard(int(np.argmax(scores)))
        return removed

    w = {n: rmap.layers[n].weight for n in ("conv1", "dw", "pw", "fc1", "predictions")}
    tied = _prune(trained, digits, rmap, granularity="filter", rule="nonpositive", source="tied")
    # source "tied": the producer's per-filter relevance plus the tied depthwise layer's
    assert set(tied.removed_channels["conv1"]) == expected(rmap.layers["conv1"].per_filter + rmap.layers["dw"].per_filter)
    assert set(tied.removed_channels["fc1"]) == expected(rmap.layers["fc1"].per_filter)
    consumer = _prune(trained, digits, rmap, granularity="filter", rule="nonpositive", source="consumer")
    # source "consumer": relevance leaving each feature map through its consumers' input channels
    assert set(consumer.removed_channels["conv1"]) == expected(w["pw"].sum(axis=(0, 1, 3)))
    # pw -> pool -> flatten -> fc1: flat row i carries channel i % 12
    assert set(consumer.removed_channels["pw"]) == expected(w["fc1"].sum(axis=1).reshape(-1, 12).sum(axis=0))
    assert set(consumer.removed_channels["fc1"]) == expected(w["predictions"].sum(axis=1))
    assert consumer.settings["score"] == "sum" and consumer.settings["source"] == "consumer"


# ----------------------------------------------------------------------------------------------
# Schedule


def test_polynomial_schedule_values_and_steps():
    sched = RelevancePolynomialSchedule(0.8, begin_step=10, end_step=30, frequency=7, initial_sparsity=0.2)
    for step in (0, 10, 17, 24, 30, 45):
        should, s = sched(step)
        p = min(1.0, max(0.0, (step - 10) / 20))
        assert float(s) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - p) ** 3, abs=SCHEDULE_ATOL)
        assert bool(should) == (step in (10, 17, 24, 30)), step  # 30 = end_step although off the grid
    steps = pruning_steps(sched, 50)
    assert [st for st, _ in steps] == [10, 17, 24, 30]
    assert steps[-1][1] == pytest.approx(0.8)
    assert all(a[1] <= b[1] for a, b in zip(steps, steps[1:]))
    one_shot = RelevancePolynomialSchedule(0.5)
    assert pruning_steps(one_shot, 0) == [(0, pytest.approx(0.5))]
    it = RelevancePolynomialSchedule.iterative(0.6, iterations=3, ramp_steps=3)
    assert [st for st, _ in pruning_steps(it, 10)] == [1, 2, 3]
    assert RelevancePolynomialSchedule.from_config(sched.get_config()["config"]).get_config() == sched.get_config()
    for kwargs in ({"final_sparsity": 1.0}, {"final_sparsity": 0.5, "begin_step": 5, "end_step": 2},
                   {"final_sparsity": 0.5, "frequency": 0}, {"final_sparsity": 0.3, "initial_sparsity": 0.5}):
        with pytest.raises(ConfigError):
            RelevancePolynomialSchedule(**kwargs)


def test_schedule_drives_tfmot_prune_low_magnitude():
    import tensorflow_model_optimization as tfmot

    tf.keras.utils.set_random_seed(2)
    inp = tf.keras.Input((6,))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(20, name="fc")(inp))
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=RelevancePolynomialSchedule(0.5, 0, 2, 1))
    wrapped.compile("sgd", "mse")
    x = np.random.default_rng(0).random((12, 6)).astype("float32")
    wrapped.fit(x, np.zeros((12, 20), "float32"), batch_size=4, epochs=1, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    assert [type(l).__name__ for l in stripped.layers] == ["InputLayer", "Dense"]
    assert np.mean(stripped.get_layer("fc").kernel.numpy() == 0) == pytest.approx(0.5, abs=0.01)


def test_iterative_pruning_reestimates_relevance_on_the_pruned_model(trained, digits, rmap, monkeypatch):
    import toolchain.relevance as relevance

    calls = []
    original = relevance.compute_relevance

    def spy(model, *args, **kwargs):
        calls.append(float(np.mean(model.get_layer("fc1").kernel.numpy() == 0)))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(relevance, "compute_relevance", spy)
    r = _prune(trained, digits, rmap, granularity="weight", sparsity=0.6, schedule="iterative", iterations=2,
               layers=["fc1", "pw"])
    targets = [s.target_sparsity for s in r.steps]
    assert len(r.steps) == 2 and targets[0] < targets[1] == pytest.approx(0.6)
    assert [s.sparsity for s in r.steps] == pytest.approx(targets, abs=0.01)
    # the first step uses the given map; the second re-estimates on the already pruned model
    assert len(calls) == 1 and calls[0] == pytest.approx(targets[0], abs=0.01)
    assert set(r.masks) == {"fc1", "pw"} and r.layer_sparsity["conv1"] == 0.0


# ----------------------------------------------------------------------------------------------
# Errors


def test_prune_errors(trained, digits, rmap):
    cases = [
        (dict(criterion="taylor", sparsity=0.5), "unknown pruning criterion"),
        (dict(granularity="block", sparsity=0.5), "granularity"),
        (dict(), "exactly one"),
        (dict(rule="nonpositive", sparsity=0.5), "exactly one"),
        (dict(sparsity=1.0), r"outside \[0, 1\)"),
        (dict(criterion="magnitude", rule="nonpositive"), "signed scores"),
        (dict(rule="nonpositive", schedule="iterative"), "one_shot"),
        (dict(sparsity=0.5, scope="model"), "scope"),
        (dict(criterion="random", sparsity=0.5, lrp_rule="lrp.nope"), "unknown LRP rule"),
        (dict(sparsity=0.5, lrp_rule="lrp.z"), "disagrees with lrp_rule 'lrp.z'"),
        (dict(sparsity=0.5, class_selection="all"), "disagrees with class_selection 'all'"),
        (dict(sparsity=0.5, granularity="filter", source="input"), "source"),
        (dict(rule="nonpositive", score="abs"), "signed relevance"),
        (dict(sparsity=0.5, score="square"), "score"),
        (dict(sparsity=0.5, schedule="cubic"), "schedule"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            _prune(trained, digits, rmap, **kwargs)
    with pytest.raises(ConfigError) as e:
        _prune(trained, digits, rmap, sparsity=0.5, layers=["flatten", "bn", "missing"])
    assert "flatten (Flatten)" in str(e.value) and "bn (BatchNormalization)" in str(e.value)
    assert "missing (no such layer)" in str(e.value)
    with pytest.raises(ConfigError, match="predictions"):
        _prune(trained, digits, rmap, sparsity=0.5, granularity="filter", layers=["predictions"])
    other = _tiny_model(7)
    with pytest.raises(ConfigError, match="another model"):
        prune(other, digits, sparsity=0.5, relevance=rmap, quiet=True)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end(trained, rmap, tmp_path, cache_dir, capsys):
    from toolchain.cli import main
    from toolchain.model_io import load_model, save_model

    model_path = tmp_path / "tiny.keras"
    save_model(trained, model_path)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--criterion", "relevance",
               "--granularity", "filter", "--sparsity", "0.5", "--samples", "200", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "prune.json").read_text())
    assert summary["params_after"] < summary["params_before"]
    assert 0 <= summary["accuracy_after"] <= 1 and summary["accuracy_before"] > 0.5
    assert set(summary["layer_sparsity"]) == {"conv1", "dw", "pw", "fc1", "predictions"}
    assert summary["settings"]["calibration_samples"] == 200 and summary["rule"] == "sparsity=0.5"
    pruned = load_model(out / "model.keras")
    assert pruned.count_params() == summary["params_after"]
    assert "accuracy" in capsys.readouterr().out

    # a relevance directory from `toolchain relevance` is used as is (no recomputation)
    from toolchain.relevance import save_relevance

    save_relevance(rmap, tmp_path / "rel")
    out2 = tmp_path / "pruned_weight"
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--relevance", str(tmp_path / "rel"),
               "--granularity", "weight", "--rule", "nonpositive", "--out", str(out2), "--quiet", "--json"])
    assert rc == 0
    summary2 = json.loads(capsys.readouterr().out)
    assert summary2["rule"] == "nonpositive" and summary2["settings"]["score"] == "sum"
    expected = np.mean(np.concatenate([(lr.weight <= 0).ravel() for lr in rmap.layers.values()]))
    assert summary2["sparsity"] == pytest.approx(expected)

    # errors: one line, exit code 2, the output directory left alone
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--criterion", "magnitude",
               "--rule", "nonpositive", "--out", str(out)])
    assert rc == 2 and "signed scores" in capsys.readouterr().err
    assert json.loads((out / "prune.json").read_text()) == summary
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--sparsity", "1.5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'1.5' is outside [0, 1)" in err[0]
