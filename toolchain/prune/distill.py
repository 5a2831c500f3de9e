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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np

from toolchain.errors import ConfigError
from toolchain.recipe import DEFAULT_RECIPE


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

    def __post_init__(self):
        problems = []
        for name, lo in (("steps", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                problems.append(f"{name} {v!r} is not an integer >= {lo}")
        for name in ("temperature", "learning_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                problems.append(f"{name} {v!r} is not a number > 0")
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
        """The distillation a recipe's ``prune`` section asks for (``distill_steps``,
        ``distill_temperature``); ``overrides`` replace single fields (e.g. ``seed``)."""
        fields = {"steps": prune_settings["distill_steps"],
                  "temperature": float(prune_settings["distill_temperature"])}
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


def distill(student, teacher, x: np.ndarray, config: DistillConfig = DistillConfig(),
            masks: Optional[Mapping[str, np.ndarray]] = None, quiet: bool = True) -> dict:
    """Train ``student`` in place for ``config.steps`` batches to match ``teacher`` on augmented
    batches of ``x``; returns the loss curve and the student's top-1 agreement with the teacher on
    ``x`` before and after."""
    import tensorflow as tf

    from toolchain.prune.schedule import HoldMasks

    x = np.asarray(x, np.float32)
    if x.ndim < 2 or len(x) < 2:
        raise ConfigError(f"distillation needs at least 2 calibration samples, got {len(x)}")
    if tuple(student.input_shape[1:]) != tuple(teacher.input_shape[1:]) or \
            student.output_shape[-1] != teacher.output_shape[-1]:
        raise ConfigError(f"student {student.input_shape}->{student.output_shape} and teacher "
                          f"{teacher.input_shape}->{teacher.output_shape} differ in input or class count")

    teacher_top1 = np.argmax(teacher.predict(x, batch_size=256, verbose=0), -1)

    def agreement():
        return float((np.argmax(student.predict(x, batch_size=256, verbose=0), -1) == teacher_top1).mean())

    history = {"config": config.to_dict(), "agreement_before": agreement(), "loss": []}
    if config.steps == 0:
        history["agreement_after"] = history["agreement_before"]
        return history
    tf.keras.utils.set_random_seed(config.seed)
    rng = tf.random.Generator.from_seed(config.seed)
    augment = make_augment(x, config, rng)
    t = float(config.temperature)
    teacher_lp, student_lp = _log_probs(teacher), _log_probs(student)
    opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, config.steps))
    hold = HoldMasks(masks) if masks else None
    if hold is not None:
        hold.apply(student)
    variables = student.trainable_variables

    @tf.function
    def step(xb):
        xa = augment(xb)
        target = tf.nn.softmax(teacher_lp(teacher(xa, training=False)) / t)
        with tf.GradientTape() as tape:
            log_q = tf.nn.log_softmax(student_lp(student(xa, training=False)) / t)
            loss = tf.reduce_mean(tf.reduce_sum(target * (tf.math.log(tf.maximum(target, 1e-12)) - log_q), -1)) * t * t
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    batches = iter(tf.data.Dataset.from_tensor_slices(x).shuffle(len(x), seed=config.seed)
                   .batch(min(config.batch_size, len(x)), drop_remainder=True).repeat())
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, desc="distill", unit="step", disable=quiet, leave=False)
    every = max(1, config.steps // 50)
    for i in range(config.steps):
        loss = step(next(batches))
        if hold is not None:
            hold.apply(student)
        if i % every == 0 or i == config.steps - 1:
            value = float(loss)
            if not np.isfinite(value):
                raise ConfigError(f"distillation diverged (loss {value} at step {i}); lower the learning rate")
            history["loss"].append((i, value))
            bar.set_postfix(loss=f"{value:.3f}")
        bar.update(1)
    bar.close()
    history["agreement_after"] = agreement()
    return history
