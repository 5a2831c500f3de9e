"""Knowledge distillation: fine-tune a pruned model towards the original model's outputs.

Fine-tuning with labels needs a training set, and the MLPerf Tiny keyword-spotting material here
has none beyond its 500 calibration samples; plain fine-tuning on those over-fits (30% filters + 10
epochs reached 80%). Distillation needs no labels at all: the original model (the teacher) labels
every input, so the calibration samples can be augmented freely and each augmented input still
gets a correct target — the teacher's output distribution, which also carries how similar the
classes look to it. Augmentations that keep inputs near the data: mixup of two samples (the
teacher labels the mixture), a cyclic shift along the first spatial axis (time, for spectrograms),
SpecAugment-style masks (Park et al. 2019: one band of the first spatial axis, time, and one of the
second, the MFCC coefficients, each set to the calibration mean there) and a little Gaussian noise.
The masks were the one augmentation among a dozen tried that moved DS-CNN at 32 channels: int8
accuracy on kws01 88.3% -> 89.6% (mean of 3 seeds at 8000 steps; ``benchmarks/distillation.py``).
With them, longer training pays: 24000 steps add about half a point (3 seeds,
``benchmarks/tradeoff.py``), the default 48000 about 0.2 more. The loss is
KL(teacher || student) at ``temperature``, scaled by ``temperature**2`` (Hinton et al. 2015).

Written here because neither tfmot nor Keras 2.14 has a distillation API (Keras' ``Distiller`` is
an example in its docs, not part of the library). The student runs with ``training=False`` so
BatchNormalization keeps the statistics of the real data and Dropout is off; weight masks (weight
granularity) are re-applied after every step, so pruned weights stay exactly zero.

Data. When the training split holds more than the calibration samples (image folders: thousands
of images), the student is distilled on all of them (``data="train"``, the recipe's
``prune.distill_data``) and early stopping watches the clean calibration samples (``x_monitor``):
a MobileNetV1 at 96x96 distilled on 500 images for 3,000 steps agreed with its teacher on only 59%
of them. kws01 has only its 500 calibration samples, so DS-CNN distils as before.

Regressors and autoencoders have no class distribution: their outputs are matched by mean squared
error (no softmax, no temperature); the augmentations apply alike (the teacher labels every input).

Scaling. The 48,000 steps are tuned on DS-CNN (prune + distil + export take about 11 minutes a
seed on the reference machine, README); a MobileNetV1 at 96x96 would need about 5 hours for them. ``steps`` is therefore a cap: the first
``TIMING_STEPS`` steps after a ``TIMING_WARMUP`` are timed and the run is cut to ``time_budget_s`` (default
``DEFAULT_TIME_BUDGET_S``, 15 minutes: about 1.6x DS-CNN's distillation time on the reference
machine, so DS-CNN keeps its 48,000 steps unless the machine is that much slower or busier, while a
MobileNetV1 at 96x96 is cut to what fits in a 30-minute compress). Training also stops early when the
loss on the clean (un-augmented) calibration samples has not improved for ``patience`` evaluations
(``holdout`` > 0 holds a slice out of training for it instead; with DS-CNN's 500 unlabelled samples
every one counts, so the default keeps them all). Patience is generous on purpose (12 evaluations
of 1/48 of the run = a quarter of it): under the cosine schedule the loss keeps falling to the end,
and a run that reaches its last step keeps its final weights, so the tuned default trains exactly
as before unless the time budget cuts it. The budget is also a deadline: a run that the machine
slows down after it was timed stops at ``DEADLINE_FACTOR`` times the budget (stop reason
``deadline``, best held-out weights kept), so a busy machine cannot stretch a 15-minute budget
into 40 minutes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np

from toolchain.errors import ConfigError
from toolchain.recipe import DEFAULT_RECIPE

#: steps timed to estimate the run's duration, after TIMING_WARMUP steps: the first traces the
#: graph, and on DS-CNN the next ~40 ran 3x slower than the steady state (steps 1-50 averaged
#: 79.6 ms, the steady state 26 ms, 2 cores shared by 5 jobs)
TIMING_WARMUP = 50
TIMING_STEPS = 100
#: default wall-clock budget of one distillation run, seconds (the step cap still applies); the
#: recipe's ``prune.distill_time_budget_s``
DEFAULT_TIME_BUDGET_S = float(DEFAULT_RECIPE["prune"]["distill_time_budget_s"])
#: the budget is also a wall-clock deadline: when the machine slows down after the timing steps
#: (other jobs start), training stops at this multiple of ``time_budget_s`` since its first step,
#: keeping the best held-out weights (stop reason ``deadline``; never before MIN_STEPS). The slack leaves room for the
#: estimate's own error so an undisturbed run reaches its chosen step count
DEADLINE_FACTOR = 1.15
#: a time-budgeted step count is rounded down to a multiple of this (when larger)
STEP_ROUNDING = 1000
#: never fewer steps than this, whatever the budget
MIN_STEPS = 200
#: how often (steps) the deadline is looked at
DEADLINE_CHECK_EVERY = 10
#: held-out evaluations per run (every steps // EVALS_PER_RUN steps, at least MIN_EVAL_EVERY)
EVALS_PER_RUN = 48
MIN_EVAL_EVERY = 100
#: an evaluation counts as better when its loss is this fraction below the best so far
MIN_RELATIVE_IMPROVEMENT = 1e-3
#: the held-out slice never exceeds this many samples (evaluation cost)
MAX_HOLDOUT = 512
#: values of ``DistillConfig.data`` (the recipe's ``prune.distill_data``)
DISTILL_DATA = ("train", "calibration")


@dataclass(frozen=True)
class DistillConfig:
    #: the default recipe's values, so ``DistillConfig()`` and a recipe-less run distil alike
    steps: int = DEFAULT_RECIPE["prune"]["distill_steps"]
    temperature: float = float(DEFAULT_RECIPE["prune"]["distill_temperature"])
    #: share of the samples in a batch mixed with another sample (mixup weight ~ U(0, 1))
    mixup: float = 1.0
    #: largest cyclic shift along the first spatial axis, as a fraction of its length
    shift: float = 0.12
    #: SpecAugment-style masks: with probability ``mask_prob`` each, one band of up to this fraction
    #: of the first spatial axis (time) / of the second (features) is set to the calibration mean
    time_mask: float = 0.2
    feature_mask: float = 0.2
    mask_prob: float = 0.5
    #: Gaussian noise, as a fraction of the calibration data's standard deviation
    noise: float = 0.1
    learning_rate: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    #: "classification" (KL of class distributions) | "regression" | "autoencoder" (MSE of the
    #: outputs); None: inferred from the teacher (``toolchain.task.infer_task_from_model``)
    task: Optional[str] = None
    #: wall-clock budget in seconds; the step count is cut to fit it (None: always run ``steps``)
    time_budget_s: Optional[float] = DEFAULT_TIME_BUDGET_S
    #: share of the samples held out (not trained on) to decide early stopping; 0 (the default):
    #: early stopping watches the clean calibration samples themselves (training only ever sees
    #: augmented versions of them), so none of the few calibration samples is taken from training
    holdout: float = 0.0
    #: evaluations without improvement before stopping early (0: no early stopping, no holdout)
    patience: int = 12
    #: steps between held-out evaluations (0: steps // EVALS_PER_RUN, at least MIN_EVAL_EVERY)
    eval_every: int = 0
    #: what the student is trained on: "train" (every sample of the training split; the same as
    #: "calibration" when the split is only the calibration samples, as kws01's is) | "calibration"
    #: (the first ``relevance.samples`` only)
    data: str = DEFAULT_RECIPE["prune"]["distill_data"]

    def __post_init__(self):
        problems = []
        for name, lo in (("steps", 0), ("batch_size", 1), ("patience", 0), ("eval_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                problems.append(f"{name} {v!r} is not an integer >= {lo}")
        for name in ("temperature", "learning_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                problems.append(f"{name} {v!r} is not a number > 0")
        if self.time_budget_s is not None and (isinstance(self.time_budget_s, bool) or not isinstance(
                self.time_budget_s, (int, float)) or not self.time_budget_s > 0):
            problems.append(f"time_budget_s {self.time_budget_s!r} is not a number > 0 or None")
        if self.data not in DISTILL_DATA:
            problems.append(f"data {self.data!r} is not one of {', '.join(DISTILL_DATA)}")
        if self.task is not None:
            from toolchain.task import TASKS

            if self.task not in TASKS:
                problems.append(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0.0 <= self.holdout < 1.0:
            problems.append(f"holdout {self.holdout!r} is not a number in [0, 1)")
        for name in ("mixup", "shift", "time_mask", "feature_mask", "mask_prob", "noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                problems.append(f"{name} {v!r} is not a number in [0, 1]")
        if problems:
            raise ConfigError("invalid distillation settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_recipe(cls, prune_settings: Mapping, **overrides) -> "DistillConfig":
        """The distillation a recipe's ``prune`` section asks for (``distill_steps`` (the cap),
        ``distill_temperature``, and when present ``distill_time_budget_s`` (null: no budget),
        ``distill_patience``, ``distill_holdout``); ``overrides`` replace single fields (e.g.
        ``seed``, ``task``)."""
        fields = {"steps": prune_settings["distill_steps"],
                  "temperature": float(prune_settings["distill_temperature"])}
        for key, name in (("distill_time_budget_s", "time_budget_s"), ("distill_patience", "patience"),
                          ("distill_holdout", "holdout"), ("distill_data", "data")):
            if key in prune_settings:
                fields[name] = prune_settings[key]
        return cls(**{**fields, **overrides})


def _log_probs(model):
    """A function from the model's output to log-probabilities (its last layer may be a softmax)."""
    import tensorflow as tf

    from toolchain.prune.schedule import _ends_in_softmax

    if _ends_in_softmax(model):
        return lambda out: tf.math.log(tf.maximum(out, 1e-12))
    return tf.nn.log_softmax


def make_augment(x: np.ndarray, config: DistillConfig, rng):
    """The augmentation of a batch (a tf function of a float batch shaped like ``x``): mixup, a
    cyclic shift along axis 1, one masked band along axis 1 and one along axis 2 (set to the mean
    of ``x`` there), Gaussian noise; random numbers from the ``tf.random.Generator`` ``rng``."""
    import tensorflow as tf

    std = float(x.std()) or 1.0
    length = x.shape[1] if x.ndim >= 3 else 0
    max_shift = int(round(config.shift * length))
    mean = tf.constant(x.mean(axis=0, keepdims=True))

    def augment(xb):
        n = tf.shape(xb)[0]
        bshape = tf.concat([[n], tf.ones([tf.rank(xb) - 1], tf.int32)], 0)
        lam = rng.uniform(bshape, 0.0, 1.0)
        lam = tf.where(rng.uniform(bshape) < config.mixup, lam, tf.ones_like(lam))
        xb = lam * xb + (1.0 - lam) * tf.gather(xb, tf.random.shuffle(tf.range(n)))
        if max_shift:
            xb = tf.roll(xb, rng.uniform((), -max_shift, max_shift + 1, dtype=tf.int32), axis=1)
        for axis, fraction in ((1, config.time_mask), (2, config.feature_mask)):
            xb = mask_band(xb, axis, fraction, bshape)
        if config.noise:
            xb = xb + rng.normal(tf.shape(xb)) * (std * config.noise)
        return xb

    def mask_band(xb, axis, fraction, bshape):
        """Set one band of up to ``fraction`` of ``axis`` to the calibration mean, in a random
        ``mask_prob`` share of the samples."""
        size = x.shape[axis] if x.ndim > axis + 1 else 0  # a spatial axis, not the channels
        width = int(round(fraction * size))
        if not width or not config.mask_prob:
            return xb
        start = rng.uniform(bshape, 0, size, dtype=tf.int32)
        span = rng.uniform(bshape, 0, width + 1, dtype=tf.int32)
        pos = tf.reshape(tf.range(size), [size if d == axis else 1 for d in range(x.ndim)])
        on = (pos >= start) & (pos < start + span) & (rng.uniform(bshape) < config.mask_prob)
        return tf.where(on, mean, xb)

    return augment


class _CosineToTotal:
    """Keras' ``CosineDecay`` (alpha 0) whose decay length is a variable, so the step count can be
    chosen after the first steps were timed; with the cap as length it equals ``CosineDecay``."""

    def __new__(cls, learning_rate: float, total):
        import math

        import tensorflow as tf

        class Schedule(tf.keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                frac = tf.minimum(tf.cast(step, tf.float32), tf.cast(total, tf.float32)) / tf.cast(total, tf.float32)
                return learning_rate * 0.5 * (1.0 + tf.cos(math.pi * frac))

            def get_config(self):
                return {"learning_rate": learning_rate}

        return Schedule()


def choose_steps(cap: int, seconds_per_step: float, time_budget_s: Optional[float]) -> tuple[int, str]:
    """Steps to train: the cap, or fewer when the cap would take longer than the time budget (then
    rounded down to a multiple of ``STEP_ROUNDING`` so small timing jitter does not change the run).
    Returns ``(steps, reason)`` with reason ``cap`` or ``time_budget``."""
    if time_budget_s is None or seconds_per_step <= 0 or cap * seconds_per_step <= time_budget_s:
        return cap, "cap"
    steps = int(time_budget_s / seconds_per_step)
    if steps > STEP_ROUNDING:
        steps -= steps % STEP_ROUNDING
    return max(MIN_STEPS, min(cap, steps)), "time_budget"


def _format_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def distill(student, teacher, x: np.ndarray, config: DistillConfig = DistillConfig(),
            masks: Optional[Mapping[str, np.ndarray]] = None, quiet: bool = True,
            x_monitor: Optional[np.ndarray] = None) -> dict:
    """Train ``student`` in place to match ``teacher`` on augmented batches of ``x``.

    Classifiers match the teacher's class distribution (KL at ``temperature``); regressors and
    autoencoders (``config.task``, inferred from the teacher when ``None``) match its outputs by mean
    squared error, with no softmax or temperature. ``config.steps`` is a cap: after
    ``TIMING_WARMUP + TIMING_STEPS`` steps the run is timed and cut to ``config.time_budget_s``
    (``choose_steps``), and every ``eval_every`` steps the loss on a held-out ``holdout`` share of
    ``x`` (not trained on) is measured; after ``patience`` evaluations without an improvement of
    ``MIN_RELATIVE_IMPROVEMENT`` training stops and the best weights are restored (as Keras 2.14's
    ``EarlyStopping(restore_best_weights=True)``: a run that reaches its last step keeps its final,
    fully annealed weights). Returns the loss curve, held-out curve, chosen/run steps, stop reason,
    and the student's agreement with the teacher on ``x`` before and after (top-1 agreement for
    classifiers; ``teacher_mse_before/after`` otherwise).

    ``x_monitor``: the samples early stopping watches (clean, un-augmented) and agreement is
    measured on, when ``x`` is larger than them, e.g. the calibration samples when ``x`` is the
    whole training split (``None``: ``x`` itself, as the calibration-only default does)."""
    import sys
    import time

    import tensorflow as tf

    from toolchain.prune.schedule import HoldMasks

    x = np.asarray(x, np.float32)
    if x.ndim < 2 or len(x) < 2:
        raise ConfigError(f"distillation needs at least 2 calibration samples, got {len(x)}")
    if tuple(student.input_shape[1:]) != tuple(teacher.input_shape[1:]) or \
            tuple(student.output_shape[1:]) != tuple(teacher.output_shape[1:]):
        raise ConfigError(f"student {student.input_shape}->{student.output_shape} and teacher "
                          f"{teacher.input_shape}->{teacher.output_shape} differ in input or output shape")
    from toolchain.task import infer_task_from_model

    task = config.task or infer_task_from_model(teacher)
    classify = task == "classification"
    x_seen = x if x_monitor is None else np.asarray(x_monitor, np.float32)
    teacher_out = teacher.predict(x_seen, batch_size=256, verbose=0)

    def closeness() -> float:
        out = student.predict(x_seen, batch_size=256, verbose=0)
        if classify:
            return float((np.argmax(out, -1) == np.argmax(teacher_out, -1)).mean())
        return float(np.mean((out.astype(np.float64) - teacher_out) ** 2))

    key = "agreement" if classify else "teacher_mse"
    history = {"config": config.to_dict(), "task": task, "loss": [], "heldout_loss": [],
               "train_samples": int(len(x)), "monitor_samples": int(len(x_seen)),
               "steps_cap": int(config.steps), f"{key}_before": closeness()}
    if not classify:
        history["agreement_before"] = history["agreement_after"] = None
    if config.steps == 0:
        history.update({f"{key}_after": history[f"{key}_before"], "steps_chosen": 0, "steps_run": 0,
                        "stop_reason": "steps=0"})
        return history

    # a held-out slice for early stopping, never trained on (at least 2 samples stay for training)
    rng_np = np.random.default_rng(config.seed)
    n_hold = min(MAX_HOLDOUT, int(round(config.holdout * len(x))), len(x) - 2) if config.patience else 0
    order = rng_np.permutation(len(x))
    x_hold, x_train = x[order[:n_hold]], (x[np.sort(order[n_hold:])] if n_hold else x)  # no 1 GB copy
    history["holdout_samples"] = int(n_hold)
    monitor = bool(config.patience)  # early stopping on: the held-out slice, else the clean samples
    if monitor and not n_hold:
        x_hold = x_train if x_monitor is None else x_seen

    tf.keras.utils.set_random_seed(config.seed)
    rng = tf.random.Generator.from_seed(config.seed)
    augment = make_augment(x_train, config, rng)
    t = float(config.temperature)
    total = tf.Variable(float(config.steps), trainable=False, dtype=tf.float32)
    opt = tf.keras.optimizers.Adam(_CosineToTotal(config.learning_rate, total))
    hold = HoldMasks(masks) if masks else None
    if hold is not None:
        hold.apply(student)
    variables = student.trainable_variables

    if classify:
        teacher_lp, student_lp = _log_probs(teacher), _log_probs(student)

        def loss_fn(t_out, s_out):  # KL(teacher || student) at temperature t, scaled by t**2
            target = tf.nn.softmax(teacher_lp(t_out) / t)
            log_q = tf.nn.log_softmax(student_lp(s_out) / t)
            return tf.reduce_mean(tf.reduce_sum(target * (tf.math.log(tf.maximum(target, 1e-12)) - log_q), -1)) * t * t
    else:
        def loss_fn(t_out, s_out):
            return tf.reduce_mean(tf.square(s_out - t_out))

    @tf.function
    def step(xb):
        xa = augment(xb)
        t_out = teacher(xa, training=False)
        with tf.GradientTape() as tape:
            loss = loss_fn(t_out, student(xa, training=False))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    if monitor:
        xh = tf.constant(x_hold)
        th = tf.constant(teacher.predict(x_hold, batch_size=256, verbose=0))

        @tf.function
        def heldout_loss():
            return loss_fn(th, student(xh, training=False))

    batches = iter(tf.data.Dataset.from_tensor_slices(x_train).shuffle(len(x_train), seed=config.seed)
                   .batch(min(config.batch_size, len(x_train)), drop_remainder=True).repeat())
    from tqdm.auto import tqdm

    steps = int(config.steps)
    reason = "cap"
    eval_every = config.eval_every or max(MIN_EVAL_EVERY, steps // EVALS_PER_RUN)
    best, best_step, best_weights, since_best = np.inf, -1, None, 0
    bar = tqdm(total=steps, desc="distill", unit="step", disable=quiet, leave=False)
    every = max(1, steps // 50)
    t_start = time.perf_counter()
    deadline = None if config.time_budget_s is None else DEADLINE_FACTOR * float(config.time_budget_s)
    t_timing = None
    i = 0
    while i < steps:
        loss = step(next(batches))
        if hold is not None:
            hold.apply(student)
        if i == TIMING_WARMUP - 1:
            t_timing = time.perf_counter()  # tracing and warm-up steps are not timed
        if i == TIMING_WARMUP + TIMING_STEPS - 1 and steps > i + 1:
            per_step = (time.perf_counter() - t_timing) / TIMING_STEPS
            steps, reason = choose_steps(steps, per_step, config.time_budget_s)
            steps = max(steps, i + 1)
            if steps != config.steps:
                total.assign(float(steps))
                eval_every = config.eval_every or max(MIN_EVAL_EVERY, steps // EVALS_PER_RUN)
                bar.reset(total=steps)
                bar.update(i)
            history["seconds_per_step"] = per_step
            history["estimated_seconds"] = per_step * steps
            if not quiet:
                why = (f"cut from the cap {config.steps} to fit the time budget of "
                       f"{_format_seconds(config.time_budget_s)}" if reason == "time_budget" else "the cap")
                print(f"distill: {steps} steps ({why}) at {per_step * 1000:.1f} ms/step, about "
                      f"{_format_seconds(per_step * steps)}", file=sys.stderr)
        if i % every == 0 or i == steps - 1:
            value = float(loss)
            if not np.isfinite(value):
                raise ConfigError(f"distillation diverged (loss {value} at step {i}); lower the learning rate")
            history["loss"].append((i, value))
            bar.set_postfix(loss=f"{value:.3f}")
        bar.update(1)
        i += 1
        if deadline is not None and MIN_STEPS <= i < steps and i % DEADLINE_CHECK_EVERY == 0 and \
                time.perf_counter() - t_start > deadline:
            if best_weights is not None:
                for v, w in zip(variables, best_weights):
                    v.assign(w)
            reason = "deadline"
            if not quiet:
                print(f"distill: stopped at step {i} of {steps}: the run passed {DEADLINE_FACTOR:g}x its time "
                      f"budget of {_format_seconds(config.time_budget_s)} (the machine slowed down after the "
                      "timing steps)", file=sys.stderr)
            break
        if monitor and (i % eval_every == 0 or i == steps):
            value = float(heldout_loss())
            history["heldout_loss"].append((i, value))
            if value < best * (1.0 - MIN_RELATIVE_IMPROVEMENT) or best_weights is None:
                best, best_step, since_best = value, i, 0
                best_weights = [v.numpy() for v in variables]
            else:
                since_best += 1
                if since_best >= config.patience and i < steps:
                    for v, w in zip(variables, best_weights):
                        v.assign(w)
                    reason = "early_stop"
                    break
    bar.close()
    history.update({"steps_chosen": steps, "steps_run": i, "stop_reason": reason,
                    "best_heldout_step": best_step if monitor else None,
                    "seconds": time.perf_counter() - t_start, f"{key}_after": closeness()})
    return history
