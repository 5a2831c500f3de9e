"""When to prune and how much: a tfmot ``PruningSchedule``, and fine-tuning with masks held fixed.

``RelevancePolynomialSchedule`` is a ``tfmot.sparsity.keras.PruningSchedule``: called with a step
it returns ``(should_prune, sparsity)`` tensors, so it also drives tfmot's own
``prune_low_magnitude``. tfmot's wrapper can only choose masks by magnitude, so the toolchain does
not use the wrapper: ``prune`` asks the schedule which steps prune (``pruning_steps``) and, at each
of them, re-scores the *current* (already pruned, possibly fine-tuned) model with the criterion —
for relevance, LRP re-estimated on the calibration set — and removes more units, never bringing
back removed ones. Between pruning steps and after the last one the model may be fine-tuned on the
training split; ``HoldMasks`` re-applies the masks after every batch (and at the end), so pruned
weights are exactly zero at every forward pass and in the result. The model under training stays
a plain Keras model, so "strip" is just handing it back.

One-shot pruning is the schedule with ``begin_step == end_step``: one pruning step at the target.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from toolchain.errors import ConfigError
from toolchain.layers import KERNEL_ATTRS

#: share of the fine-tuning steps over which the default iterative schedule ramps up (the rest
#: fine-tunes at the final sparsity, as tfmot's examples do)
RAMP_SHARE = 0.5
from toolchain.prune import DEFAULT_ITERATIONS, SCHEDULES  # noqa: E402  (defined where the CLI can read them cheaply)

FINE_TUNE_LEARNING_RATE = 1e-3
FINE_TUNE_BATCH_SIZE = 32


class RelevancePolynomialSchedule(tfmot.sparsity.keras.PruningSchedule):
    """Sparsity ramps from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and
    ``end_step`` like tfmot's ``PolynomialDecay``::

        s(step) = final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power

    Pruning happens every ``frequency`` steps from ``begin_step`` on *and at ``end_step``* (tfmot's
    ``PolynomialDecay`` skips ``end_step`` when it is not on the frequency grid, and then never
    reaches ``final_sparsity``). ``begin_step == end_step`` is one-shot pruning at ``final_sparsity``.
    The name says what drives the masks in this toolchain (relevance re-estimated at each pruning
    step); the schedule itself only decides *when* and *how much*.
    """

    def __init__(self, final_sparsity: float, begin_step: int = 0, end_step: int = 0,
                 frequency: int = 1, initial_sparsity: float = 0.0, power: float = 3.0):
        for name, v in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"{name} {v!r} is not an integer; pass a training step number")
        if begin_step < 0 or end_step < begin_step or frequency <= 0:
            raise ConfigError(f"schedule steps begin={begin_step}, end={end_step}, frequency={frequency} are "
                              "not allowed; need 0 <= begin <= end and frequency >= 1")
        for name, v in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} {v!r} is outside [0, 1); pass a fraction such as 0.5")
        if initial_sparsity > final_sparsity:
            raise ConfigError(f"initial_sparsity {initial_sparsity} exceeds final_sparsity {final_sparsity}; "
                              "pruning only removes, so the ramp must go up")
        if not power > 0:
            raise ConfigError(f"power {power!r} must be > 0 (3 is tfmot's default)")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.begin_step = int(begin_step)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.power = float(power)

    @classmethod
    def iterative(cls, final_sparsity: float, iterations: int, ramp_steps: int,
                  power: float = 3.0) -> "RelevancePolynomialSchedule":
        """``iterations`` pruning steps with growing sparsity, ``frequency = ramp_steps //
        iterations`` (at least 1) apart, the last at ``iterations * frequency`` with
        ``final_sparsity``. Step 0 has sparsity 0 and so prunes nothing (tfmot's convention)."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"iterations {iterations!r} is not a positive integer; pass e.g. 4")
        frequency = max(1, int(ramp_steps) // iterations)
        return cls(final_sparsity, 0, frequency * iterations, frequency, 0.0, power)

    def _fraction(self, step):
        span = self.end_step - self.begin_step
        if span == 0:
            return tf.constant(1.0)
        p = (tf.cast(step, tf.float32) - self.begin_step) / float(span)
        return tf.clip_by_value(p, 0.0, 1.0)

    def __call__(self, step):
        step = tf.convert_to_tensor(step, dtype=tf.int64)
        p = self._fraction(step)
        sparsity = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * tf.pow(1.0 - p, self.power)
        on_grid = tf.equal(tf.math.floormod(step - self.begin_step, self.frequency), 0)
        in_range = tf.logical_and(step >= self.begin_step, step <= self.end_step)
        should = tf.logical_and(in_range, tf.logical_or(on_grid, tf.equal(step, self.end_step)))
        return should, tf.cast(sparsity, tf.float32)

    def get_config(self):
        return {"class_name": type(self).__name__,
                "config": {"final_sparsity": self.final_sparsity, "begin_step": self.begin_step,
                           "end_step": self.end_step, "frequency": self.frequency,
                           "initial_sparsity": self.initial_sparsity, "power": self.power}}


def pruning_steps(schedule, last_step: int) -> List[Tuple[int, float]]:
    """``(step, sparsity)`` of every step in ``0..last_step`` at which ``schedule`` (any tfmot
    ``PruningSchedule``) prunes with a sparsity above 0; sparsities never decrease."""
    out: List[Tuple[int, float]] = []
    for step in range(int(last_step) + 1):
        should, sparsity = schedule(tf.constant(step, tf.int64))
        s = float(sparsity)
        if bool(should) and s > 0:
            if not 0.0 < s < 1.0:
                raise ConfigError(f"the pruning schedule asks for sparsity {s} at step {step}; it must be in [0, 1)")
            s = max(s, out[-1][1]) if out else s
            out.append((step, s))
    return out


def schedule_end(schedule) -> Optional[int]:
    end = getattr(schedule, "end_step", None)
    return None if end is None or end < 0 else int(end)


def make_schedule(schedule, sparsity: Optional[float], iterations: int, total_steps: int):
    """The schedule ``prune`` follows: a tfmot ``PruningSchedule`` is used as given; ``"one_shot"``
    prunes once at step 0; ``"iterative"`` ramps to ``sparsity`` in ``iterations`` steps over the
    first ``RAMP_SHARE`` of the fine-tuning steps (one virtual step apart without fine-tuning)."""
    if isinstance(schedule, tfmot.sparsity.keras.PruningSchedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} is not allowed; use one of {', '.join(SCHEDULES)} "
                          "or a tfmot PruningSchedule instance")
    if schedule == "one_shot":
        return RelevancePolynomialSchedule(sparsity or 0.0, 0, 0)
    ramp = max(iterations, int(total_steps * RAMP_SHARE))
    return RelevancePolynomialSchedule.iterative(sparsity or 0.0, iterations, ramp)


class HoldMasks(tf.keras.callbacks.Callback):
    """Multiplies kernels by their masks before training and after every batch, so pruned weights
    stay exactly zero while the rest are fine-tuned (``masks``: layer name -> kept/removed array
    shaped like the kernel)."""

    def __init__(self, masks: Mapping[str, np.ndarray]):
        super().__init__()
        self.masks = dict(masks)

    def apply(self, model) -> None:
        for name, mask in self.masks.items():
            layer = model.get_layer(name)
            var = getattr(layer, KERNEL_ATTRS[type(layer).__name__])
            var.assign(var * tf.constant(mask, dtype=var.dtype))

    def on_train_begin(self, logs=None):
        self.apply(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.apply(self.model)

    def on_train_end(self, logs=None):
        self.apply(self.model)


def _ends_in_softmax(model) -> bool:
    last = model.layers[-1]
    cls = type(last).__name__
    act = getattr(getattr(last, "activation", None), "__name__", "")
    return cls == "Softmax" or act == "softmax"


def fine_tune(model, x: np.ndarray, y: np.ndarray, steps: int, masks: Optional[Mapping[str, np.ndarray]] = None,
              batch_size: int = FINE_TUNE_BATCH_SIZE, learning_rate: float = FINE_TUNE_LEARNING_RATE,
              seed: int = 0, quiet: bool = True) -> None:
    """Train ``model`` in place for ``steps`` batches of the training split with Adam; kernels in
    ``masks`` are held at their masks. BatchNormalization statistics are updated as in training."""
    if steps <= 0:
        return
    tf.keras.utils.set_random_seed(seed)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=not _ends_in_softmax(model)))
    n = len(x)
    data = (tf.data.Dataset.from_tensor_slices((np.asarray(x, np.float32), np.asarray(y, np.int64)))
            .shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size).repeat())
    callbacks = [HoldMasks(masks)] if masks else []
    # one pass of exactly ``steps`` batches over the reshuffled, repeated training split
    model.fit(data, steps_per_epoch=int(steps), epochs=1, verbose=0 if quiet else 2, callbacks=callbacks)
