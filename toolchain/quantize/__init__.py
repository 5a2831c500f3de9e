"""Relevance-driven mixed-precision quantisation: ``plan_bits`` -> ``BitPlan`` -> ``quantize``.

* ``plan_bits(model, dataset, allocator="relevance", candidates=(2, 4, 8), budget="avg-bits=4",
  granularity="layer" | "group", ...)`` chooses a width per kernel or per group of output channels
  (``toolchain.quantize.allocators``) and returns a ``BitPlan`` (plain data, ``bitplan.json``).
* ``quantize(model, plan, dataset, qat_epochs=0)`` simulates the plan with tfmot
  (``toolchain.quantize.simulate``), evaluates the simulated model on the evaluation split,
  optionally fine-tunes it (quantisation-aware training on the train split) and returns a
  ``QuantizeResult`` with the quantize-applied Keras model the export stage converts, and the
  plan's sizes (``toolchain.quantize.size``).

Plans name the user's layers. BatchNormalization is folded into its kernel before anything is
measured or simulated, so widths, errors and sizes refer to the folded kernels TFLite stores.
The user's model is never modified.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from toolchain.errors import ConfigError, DataError
from toolchain.quantize.allocators import (ALLOCATORS, DEFAULT_GROUP_SIZE, DEFAULT_WEIGHTING, GRANULARITIES,
                                           WEIGHTINGS, AllocationProblem, allocator_key)
from toolchain.quantize.bitplan import ALLOWED_ACTIVATION_BITS, ALLOWED_WEIGHT_BITS, BitPlan, LayerBits, keep_float
from toolchain.quantize.budget import Budget, parse_bits, parse_budget
from toolchain.quantize.size import SizeReport, artifact_sizes, plan_size

__all__ = ["plan_bits", "quantize", "QuantizeResult", "BitPlan", "LayerBits", "ALLOCATORS", "Budget",
           "SizeReport", "artifact_sizes", "plan_size", "parse_budget", "parse_bits", "build_qat_model",
           "load_qat_model", "DEFAULT_CANDIDATES", "DEFAULT_GROUP_SIZE", "WEIGHTINGS", "ALLOWED_WEIGHT_BITS",
           "ALLOWED_ACTIVATION_BITS", "keep_float"]

DEFAULT_CANDIDATES = (2, 4, 8)
DEFAULT_LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class QuantizeResult:
    """A simulated bit plan: its accuracy on the evaluation split, sizes, and the tfmot model."""

    plan: BitPlan
    model: object = field(repr=False)        # quantize-applied Keras model (export converts it)
    float_accuracy: float = float("nan")     # the (BN-folded) float model, evaluation split
    accuracy: float = float("nan")           # simulated, after fine-tuning if any
    accuracy_before_qat: float = float("nan")
    size: Optional[SizeReport] = None
    qat_epochs: int = 0
    history: Mapping[str, list] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    eval_samples: int = 0

    def to_dict(self) -> dict:
        """The content of ``quantize.json``."""
        size = self.size.to_dict() if self.size else {}
        return {
            "avg_weight_bits": size.get("avg_weight_bits"),
            "packed_weight_bytes": size.get("packed_weight_bytes"),
            "accuracy": self.accuracy,
            "float_accuracy": self.float_accuracy,
            "accuracy_before_qat": self.accuracy_before_qat,
            "eval_samples": self.eval_samples,
            "qat_epochs": self.qat_epochs,
            "allocator": self.plan.allocator, "budget": self.plan.budget, "granularity": self.plan.granularity,
            "layers": {name: {"weight_bits": lb.weight_bits,
                              "group_bits": list(lb.group_bits) if lb.group_bits else None,
                              "group_size": lb.group_size, "activation_bits": lb.activation_bits,
                              **({k: v for k, v in size.get("layers", {}).get(name, {}).items()
                                  if k in ("nonzero_weights", "packed_bits", "avg_bits")})}
                       for name, lb in self.plan.layers.items()},
            "size": {k: v for k, v in size.items() if k != "layers"},
            "history": dict(self.history), "timings_s": dict(self.timings),
        }


def _calibration(dataset, samples: Optional[int]):
    if dataset is None:
        raise ConfigError("this allocator needs calibration data; pass a dataset")
    return dataset.calibration(samples)


def plan_bits(model, dataset=None, allocator: str = "relevance", candidates: Sequence[int] = DEFAULT_CANDIDATES,
              budget: "str | Budget | None" = None, granularity: str = "layer",
              group_size: int = DEFAULT_GROUP_SIZE, relevance=None, rule: Optional[str] = None,
              calibration_samples: Optional[int] = None, weighting: str = DEFAULT_WEIGHTING,
              int16_layers: int = 0, use_cache: bool = True, quiet: bool = False) -> BitPlan:
    """A ``BitPlan`` for ``model`` from allocator ``allocator`` (``relevance``, ``sensitivity``,
    ``uniform`` or a registry key ``quant.*``) under ``budget`` (``avg-bits=4``, ``size-kb=12``,
    ``bits=N``; required except for a single uniform width).

    ``relevance`` is a ``RelevanceMap`` of ``model``; without it (allocator relevance) relevance is
    computed with ``rule`` on the calibration split (the first ``calibration_samples`` train
    samples) and cached on disk. ``int16_layers=N`` gives the N layers with the largest remaining
    loss 16-bit activations.
    """
    from toolchain.quantize.kernels import check_widths, kernels_of
    from toolchain.quantize.simulate import fold_batchnorm

    key = allocator_key(allocator)
    allocate = ALLOCATORS.get(key)
    widths = check_widths(parse_bits(candidates))
    budget = parse_budget(budget)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}; "
                          "pass --granularity layer or group")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"relevance weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if key in ("quant.relevance", "quant.sensitivity") and budget is None:
        raise ConfigError(f"allocator {key} needs a budget; pass --budget avg-bits=4 (or size-kb=..., bits=...)")

    if relevance is not None and getattr(relevance, "model_hash", None):
        from toolchain.model_io import model_hash

        if relevance.model_hash != model_hash(model):
            raise ConfigError(f"the relevance map was computed for another model (hash {relevance.model_hash[:12]}, "
                              f"this model {model_hash(model)[:12]}); compute relevance for this model "
                              "(omit --relevance to compute it here)")
    folded = fold_batchnorm(model)
    kernels = kernels_of(folded)
    x_cal = None
    if key == "quant.relevance" and relevance is None:
        from toolchain.relevance import DEFAULT_RULE, compute_relevance

        x_cal, y_cal = _calibration(dataset, calibration_samples)
        relevance = compute_relevance(model, x_cal, y_cal, rule=rule or DEFAULT_RULE, use_cache=use_cache,
                                      quiet=quiet)
    if key == "quant.sensitivity":
        x_cal, _ = _calibration(dataset, calibration_samples)
    problem = AllocationProblem(kernels, widths, budget, granularity, group_size, relevance, folded, x_cal,
                                weighting, int16_layers, quiet)
    return allocate(problem)


def quantize(model, plan: BitPlan, dataset, qat_epochs: int = 0, batch_size: int = 64,
             learning_rate: float = DEFAULT_LEARNING_RATE, calibration_samples: Optional[int] = None,
             seed: int = 0, quiet: bool = False) -> QuantizeResult:
    """Simulate ``plan`` on ``model`` with tfmot, evaluate it on ``dataset``'s evaluation split,
    optionally fine-tune ``qat_epochs`` epochs on the train split, and size it."""
    from toolchain.quantize.simulate import accuracy, apply_bitplan, calibrate, fine_tune, fold_batchnorm

    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise ConfigError(f"qat_epochs {qat_epochs!r} must be a non-negative integer")
    if dataset.x_eval is None:
        raise DataError(f"dataset {dataset.name!r} has no evaluation split, so the simulated accuracy cannot be "
                        "measured; pass a dataset with an eval split")
    t0 = time.perf_counter()
    folded = fold_batchnorm(model)
    plan.check_against(folded)
    qmodel = apply_bitplan(folded, plan)
    x_cal, _ = dataset.calibration(calibration_samples)
    calibrate(qmodel, folded, x_cal)
    t_apply = time.perf_counter() - t0
    float_acc = accuracy(folded, dataset.x_eval, dataset.y_eval)
    before = accuracy(qmodel, dataset.x_eval, dataset.y_eval)
    history = {}
    after = before
    t1 = time.perf_counter()
    if qat_epochs:
        history = fine_tune(qmodel, dataset.x_train, dataset.y_train, qat_epochs, batch_size, learning_rate,
                            seed, quiet)
        after = accuracy(qmodel, dataset.x_eval, dataset.y_eval)
    t_qat = time.perf_counter() - t1
    return QuantizeResult(plan, qmodel, float_acc, after, before, plan_size(folded, plan), qat_epochs, history,
                          {"apply_and_calibrate": t_apply, "qat": t_qat}, len(dataset.x_eval))


def build_qat_model(model, plan: BitPlan, x_calibration: np.ndarray):
    """The quantize-applied, calibrated tfmot Keras model of ``plan`` (see ``simulate``)."""
    from toolchain.quantize.simulate import build_qat_model as _build

    return _build(model, plan, x_calibration)


def load_qat_model(path):
    from toolchain.quantize.simulate import load_qat_model as _load

    return _load(path)
