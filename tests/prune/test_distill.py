"""Knowledge distillation after pruning and channel counts rounded to a multiple: the student moves
towards the teacher, pruned weights stay zero, settings are validated, and ``align_kept`` keeps
the best-scored units in multiples."""
import numpy as np
import pytest

from toolchain.errors import ConfigError
from toolchain.prune import prune
from toolchain.prune.criteria import align_kept
from toolchain.prune.distill import DistillConfig, distill

from tests.prune.test_prune import _tiny_model, cache_dir, digits, trained  # noqa: F401 (fixtures)


def test_align_kept_rounds_to_the_nearest_multiple_keeping_the_best():
    scores = np.arange(64, dtype=float)  # unit i has score i
    alive = np.ones(64, bool)
    keep = np.zeros(64, bool)
    keep[64 - 37:] = True  # 37 best kept -> nearest multiple of 16 is 32
    out = align_kept(keep, scores, alive, 16)
    assert out.sum() == 32 and out[32:].all() and not out[:32].any()
    keep = np.zeros(64, bool)
    keep[64 - 41:] = True  # 41 -> 48: the 7 best of the dropped units come back
    out = align_kept(keep, scores, alive, 16)
    assert out.sum() == 48 and out[16:].all()
    keep = np.zeros(64, bool)
    keep[-3:] = True  # never below one multiple
    assert align_kept(keep, scores, alive, 16).sum() == 16
    # units removed earlier stay removed even when they score best
    alive[60:] = False
    keep = alive.copy()
    keep[:10] = False
    out = align_kept(keep, scores, alive, 16)
    assert out.sum() == 48 and not out[60:].any()
    # groups no larger than one multiple are left alone
    small = np.array([True, False, True])
    assert (align_kept(small, np.arange(3.0), np.ones(3, bool), 16) == small).all()


def test_distill_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="steps"):
        DistillConfig(steps=-1)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="mixup"):
        DistillConfig(mixup=1.5)
    with pytest.raises(ConfigError, match="time_mask"):
        DistillConfig(time_mask=-0.1)
    with pytest.raises(ConfigError, match="mask_prob"):
        DistillConfig(mask_prob=2)


def test_masks_set_one_band_per_axis_to_the_calibration_mean():
    import tensorflow as tf

    from toolchain.prune.distill import make_augment

    x = np.random.default_rng(0).normal(size=(64, 20, 10, 1)).astype(np.float32)
    config = DistillConfig(mixup=0.0, shift=0.0, noise=0.0, time_mask=0.25, feature_mask=0.3, mask_prob=1.0)
    out = make_augment(x, config, tf.random.Generator.from_seed(0))(tf.constant(x)).numpy()
    mean = x.mean(axis=0)
    changed = out != x
    assert changed.any(axis=(1, 2, 3)).mean() > 0.7  # widths are drawn from 0..max, so a few stay whole
    for before, after, hit in zip(x, out, changed):
        assert np.array_equal(after[hit], mean[hit])  # masked values are the mean there
        rows = np.flatnonzero(hit.all(axis=(1, 2)))  # fully masked time steps: one band, <= 5 long
        cols = np.flatnonzero(hit.all(axis=(0, 2)))  # fully masked coefficients: one band, <= 3 wide
        assert len(rows) <= 5 and (len(rows) == 0 or rows[-1] - rows[0] == len(rows) - 1)
        assert len(cols) <= 3 and (len(cols) == 0 or cols[-1] - cols[0] == len(cols) - 1)
        # every changed value lies in the masked rows or the masked columns
        assert not (hit & ~np.isin(np.arange(20), rows)[:, None, None] & ~np.isin(np.arange(10), cols)[None, :, None]).any()
    off = make_augment(x, DistillConfig(mixup=0.0, shift=0.0, noise=0.0, mask_prob=0.0),
                       tf.random.Generator.from_seed(0))(tf.constant(x)).numpy()
    np.testing.assert_array_equal(off, x)


def test_distillation_moves_a_pruned_model_towards_its_teacher(trained, digits, cache_dir):
    """50% of the filters removed without fine-tuning disagrees with the original on many
    calibration samples; 300 distillation steps (no labels used) must raise the agreement by at
    least 10 points and the held-out accuracy must not fall."""
    x = digits.x_train[:300]
    pruned = prune(trained, digits, "magnitude", "filter", sparsity=0.5, quiet=True).model
    from toolchain.prune import accuracy

    acc_before = accuracy(pruned, digits.x_eval, digits.y_eval)
    history = distill(pruned, trained, x, DistillConfig(steps=300, seed=1))
    assert history["agreement_after"] >= history["agreement_before"] + 0.10, history
    assert accuracy(pruned, digits.x_eval, digits.y_eval) >= acc_before
    assert history["loss"] and all(np.isfinite(v) for _, v in history["loss"])


def test_prune_with_distillation_and_channel_multiple(trained, digits, cache_dir):
    """Through ``prune``: widths are multiples of 4, the distillation record lands in the summary,
    and weight-level masks survive distillation as exact zeros."""
    r = prune(trained, digits, "magnitude", "filter", sparsity=0.4, channel_multiple=4,
              distill=DistillConfig(steps=50), quiet=True)
    widths = {l.name: getattr(l, "filters", None) or l.units for l in r.model.layers
              if getattr(l, "filters", None) or (hasattr(l, "units") and l.name != "predictions")}
    assert widths and all(w % 4 == 0 for w in widths.values()), widths
    assert widths["conv1"] < 8 and widths["pw"] < 12, widths
    d = r.summary()["settings"]["distill"]
    assert d["config"]["steps"] == 50 and "agreement_after" in d
    w = prune(trained, digits, "magnitude", "weight", sparsity=0.5, distill=DistillConfig(steps=50), quiet=True)
    for name, mask in w.masks.items():
        kernel = w.model.get_layer(name).get_weights()[0]
        assert np.all(kernel[~mask] == 0), name
    with pytest.raises(ConfigError, match="channel_multiple"):
        prune(trained, digits, "magnitude", "weight", sparsity=0.5, channel_multiple=4, quiet=True)


def test_cli_prune_with_distillation(trained, tmp_path, cache_dir):
    import json

    from toolchain.cli import main
    from toolchain.model_io import save_model

    model_path = tmp_path / "tiny.keras"
    save_model(trained, model_path)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--criterion", "magnitude",
               "--granularity", "filter", "--sparsity", "0.4", "--channel-multiple", "4",
               "--distill-steps", "30", "--out", str(out), "--quiet"])
    assert rc == 0
    settings = json.loads((out / "prune.json").read_text())["settings"]
    assert settings["channel_multiple"] == 4 and settings["distill"]["config"]["steps"] == 30
    rc = main(["prune", "--model", str(model_path), "--data", "digits", "--sparsity", "0.4",
               "--distill-steps", "-1", "--out", str(tmp_path / "bad")])
    assert rc != 0 and not (tmp_path / "bad").exists()


def _autoencoder(seed=0, width=12):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input((width,))
    h = tf.keras.layers.Dense(6, activation="relu", name="enc")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(width, name="dec")(h))
    w, b = model.get_layer("dec").get_weights()
    model.get_layer("dec").set_weights([w * 10.0, b + 20.0])  # outputs in tens, as real features can be
    return model


def _clone(model):
    import tensorflow as tf

    c = tf.keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    return c


def test_autoencoder_is_distilled_by_mse_not_softmax():
    """A student whose outputs are all shifted by +5 is perfect under a softmax (shift-invariant),
    so a KL loss would not move it; the MSE loss chosen for an autoencoder removes the shift."""
    teacher = _autoencoder()
    student = _clone(teacher)
    w, b = student.get_layer("dec").get_weights()
    student.get_layer("dec").set_weights([w, b + 5.0])
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    history = distill(student, teacher, x, DistillConfig(steps=300, learning_rate=0.05, time_budget_s=None))
    assert history["task"] == "autoencoder" and history["agreement_after"] is None
    assert history["teacher_mse_before"] == pytest.approx(25.0, rel=1e-3)
    assert history["teacher_mse_after"] < 0.05 * history["teacher_mse_before"], history["teacher_mse_after"]
    assert history["steps_run"] == 300 and history["stop_reason"] == "cap"


def test_choose_steps_cuts_the_cap_to_the_time_budget():
    from toolchain.prune.distill import MIN_STEPS, choose_steps

    assert choose_steps(48000, 0.012, 3600.0) == (48000, "cap")  # DS-CNN-like: 10 minutes
    assert choose_steps(48000, 0.375, 3600.0) == (9000, "time_budget")  # ~5 h: cut to 9,600 -> 9,000
    assert choose_steps(48000, 0.375, None) == (48000, "cap")
    assert choose_steps(48000, 100.0, 60.0) == (MIN_STEPS, "time_budget")


def test_time_budget_cuts_a_run_and_says_so(capsys):
    teacher = _autoencoder()
    student = _autoencoder(seed=1)
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    # 10 ms is far less than 5,000 steps take: the run is cut to MIN_STEPS
    history = distill(student, teacher, x, DistillConfig(steps=5000, time_budget_s=0.01, patience=0), quiet=False)
    assert history["stop_reason"] == "time_budget" and history["steps_chosen"] == history["steps_run"] < 5000
    assert history["estimated_seconds"] == pytest.approx(history["seconds_per_step"] * history["steps_chosen"])
    err = capsys.readouterr().err
    assert f"distill: {history['steps_chosen']} steps (cut from the cap 5000 to fit the time budget" in err


def test_a_run_the_machine_slows_down_stops_at_the_deadline(monkeypatch, capsys):
    """The time budget is also a deadline: from step 500 on this run's clock jumps by a day (as if
    other jobs took the cores after the timing steps); the run stops at the next deadline check
    instead of running its 3,000 chosen steps, and says why."""
    import sys
    import time

    from toolchain.prune.distill import DEADLINE_CHECK_EVERY

    real = time.perf_counter

    def clock():  # only distill's own readings jump, and only from its step 500 on
        caller = sys._getframe(1)
        late = caller.f_code.co_name == "distill" and caller.f_locals.get("i", 0) >= 500
        return real() + (86400.0 if late else 0.0)

    monkeypatch.setattr(time, "perf_counter", clock)
    teacher, student = _autoencoder(), _autoencoder(seed=1)
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    history = distill(student, teacher, x, DistillConfig(steps=3000, time_budget_s=600.0, patience=0), quiet=False)
    assert history["steps_chosen"] == 3000, history  # the timing steps saw a fast machine
    assert history["stop_reason"] == "deadline"
    assert 500 <= history["steps_run"] <= 500 + DEADLINE_CHECK_EVERY, history["steps_run"]
    assert "passed 1.15x its time budget" in capsys.readouterr().err


def test_early_stopping_restores_the_best_held_out_weights():
    """A learning rate far too high makes the held-out loss climb after its first evaluations: the
    run stops after ``patience`` evaluations without improvement and ends with the weights of the
    best evaluation (recomputed here on the same held-out samples)."""
    teacher = _autoencoder()
    student = _autoencoder(seed=1)
    x = np.random.default_rng(0).normal(size=(80, 12)).astype(np.float32)
    config = DistillConfig(steps=3000, learning_rate=0.5, eval_every=10, patience=3, time_budget_s=None, seed=2,
                           holdout=0.1)
    history = distill(student, teacher, x, config)
    assert history["stop_reason"] == "early_stop" and history["steps_run"] < 3000, history["heldout_loss"]
    steps, losses = zip(*history["heldout_loss"])
    best = int(np.argmin(losses))
    assert history["best_heldout_step"] == steps[best] and len(steps) - 1 - best == config.patience
    hold = x[np.random.default_rng(config.seed).permutation(len(x))[:history["holdout_samples"]]]
    now = float(np.mean((student.predict(hold, verbose=0) - teacher.predict(hold, verbose=0)) ** 2))
    assert now == pytest.approx(losses[best], rel=1e-4)


def test_early_stopping_by_default_watches_the_clean_calibration_samples():
    """holdout=0 (the default) takes no sample out of training; the clean samples decide instead."""
    teacher, student = _autoencoder(), _autoencoder(seed=1)
    x = np.random.default_rng(0).normal(size=(80, 12)).astype(np.float32)
    config = DistillConfig(steps=3000, learning_rate=0.5, eval_every=10, patience=3, time_budget_s=None, seed=2)
    history = distill(student, teacher, x, config)
    assert history["holdout_samples"] == 0 and history["stop_reason"] == "early_stop"
    steps, losses = zip(*history["heldout_loss"])
    now = float(np.mean((student.predict(x, verbose=0) - teacher.predict(x, verbose=0)) ** 2))
    assert now == pytest.approx(min(losses), rel=1e-4)


def test_distillation_trains_on_the_whole_training_split_and_watches_calibration(trained, digits, cache_dir):
    """The digits training split holds more samples than the 200 calibration samples: the student
    is distilled on all of them (``data="train"``, the default), agreement and early stopping watch
    the calibration samples; ``data="calibration"`` keeps to the first 200."""
    config = DistillConfig(steps=60, eval_every=30)
    r = prune(trained, digits, "magnitude", "filter", sparsity=0.3, samples=200, distill=config, quiet=True)
    d = r.settings["distill"]
    assert len(digits.x_train) > 200
    assert d["train_samples"] == len(digits.x_train) and d["monitor_samples"] == 200, d
    assert d["heldout_loss"], d
    r = prune(trained, digits, "magnitude", "filter", sparsity=0.3, samples=200, quiet=True,
              distill=DistillConfig(steps=60, data="calibration"))
    assert r.settings["distill"]["train_samples"] == 200 == r.settings["distill"]["monitor_samples"]
    with pytest.raises(ConfigError, match="data 'all' is not one of train, calibration"):
        DistillConfig(data="all")
