"""Recipes: one YAML file naming every stage's settings for ``toolchain compress``.

A recipe is validated before any work starts; unknown keys, wrong types and out-of-range values
are all reported at once, each with its key path (``prune.sparsity: 1.5 is not in [0, 1)``).
Missing keys take the defaults of ``DEFAULT_RECIPE``; ``toolchain recipe --example`` prints it
with comments.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from toolchain.errors import ConfigError

# The default recipe is the one tuned on the MLPerf Tiny DS-CNN (see README "Results"); every
# value is explained in EXAMPLE below.
DEFAULT_RECIPE: Dict[str, Any] = {
    "task": "auto",
    "relevance": {"rule": "lrp.epsilon", "samples": 500, "classes": "true"},
    "prune": {"enabled": True, "criterion": "relevance", "granularity": "filter", "mode": "sparsity",
              "sparsity": 0.5, "auto_sparsities": [0.5, 0.4, 0.3, 0.2, 0.1], "auto_max_drop": 0.01,
              "channel_multiple": 1, "fine_tune_epochs": 0, "distill_steps": 48000, "distill_temperature": 1.0,
              "distill_time_budget_s": 900, "distill_data": "train",
              "backoff_sparsities": [0.3, 0.15, 0.0], "backoff_max_drop": 0.2},
    "quantize": {"enabled": True, "allocator": "uniform", "bits": [8], "budget": "avg-bits=8",
                 "granularity": "layer", "group_size": 8, "qat_epochs": 0, "float_layers": ["first"]},
    "export": {"formats": ["tflite-fp32", "tflite-int8", "tflite-mixed", "onnx-fp32", "onnx-int8", "mcu"],
               "mcu_source": "tflite-int8"},
    "verify": {"min_agreement": 0.9, "max_accuracy_drop": 0.05, "max_mse_increase": 0.25, "max_auc_drop": 0.02},
    "bench": {"enabled": True, "target": "local", "runs": 200, "threads": [1], "samples": None,
              "kernels": "cmsis-nn", "reference": None},
}

#: Per-target overrides of ``DEFAULT_RECIPE``, applied before the user's recipe keys (which always
#: win). Keyed by target kind (``target_kind``). CPUs and Pi-class boards keep the speed-oriented
#: default above: int8 everywhere, the first conv in float (XNNPACK runs INT4 3.5-4.4x slower than
#: int8, and its int8 conv over one channel is slower than float). On a microcontroller flash is
#: the hard limit and TFLM runs packed INT4 weights: the relevance allocator chooses 4 or 8 bits per
#: layer under an average-width budget, the MCU bundle is made from that mixed-precision model
#: (tflite-mixed, QAT route: INT4 where the plan says <= 4 bits), and no layer stays in float
#: (TFLM's integer kernels take no float layer). ONNX artifacts are dropped: no MCU runs them.
TARGET_DEFAULTS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "cpu": {},
    # int8 everywhere with 3 QAT epochs, firmware from the QAT graph: DS-CNN on QEMU M4 CMSIS-NN
    # (benchmarks/results/firmware_candidates.md) 0.45x the official model's bytes, 0.42x its
    # instructions, within 1 point of it; INT4 (relevance 4/8 at avg-bits=6) saved 1.7 KB more model
    # but took 1.55x the instructions and 16 KB more firmware (generic kernels). INT4 is for a flash
    # budget: quantize: {allocator: relevance, bits: [4, 8], budget: size-kb=K} (docs/recipes.md)
    "mcu": {
        "quantize": {"allocator": "uniform", "bits": [8], "budget": "avg-bits=8", "qat_epochs": 3,
                     "float_layers": []},
        "export": {"formats": ["tflite-fp32", "tflite-int8", "tflite-mixed", "mcu"], "mcu_source": "tflite-mixed"},
        "bench": {"samples": 200},
    },
}
#: bench targets that are microcontrollers (firmware on emulated Cortex-M)
MCU_TARGETS = ("qemu-cortex-m4", "qemu-cortex-m7")
CPU_TARGETS = ("local", "emulated-pi4", "emulated-pi5")


def target_kind(target: Optional[str]) -> str:
    """``mcu`` for the Cortex-M firmware targets, ``cpu`` for everything else (host, SSH, Pi)."""
    return "mcu" if isinstance(target, str) and target.strip() in MCU_TARGETS else "cpu"


def defaults_for(target: Optional[str] = None) -> Dict[str, Any]:
    """``DEFAULT_RECIPE`` with the target kind's overrides (``TARGET_DEFAULTS``) applied."""
    merged = copy.deepcopy(DEFAULT_RECIPE)
    for stage, settings in TARGET_DEFAULTS[target_kind(target)].items():
        merged[stage].update(copy.deepcopy(settings))
    if target is not None:
        merged["bench"]["target"] = target
    return merged


def example(target: Optional[str] = None) -> str:
    """The commented default recipe; for a target with overrides, followed by them as YAML."""
    if target is not None:
        validate({}, "default recipe", target)  # an unknown target is refused, not shown the CPU default
    overrides = TARGET_DEFAULTS[target_kind(target)]
    if not overrides:
        return EXAMPLE
    import yaml

    text = yaml.safe_dump({**copy.deepcopy(overrides),
                           "bench": {**overrides.get("bench", {}), "target": target}}, sort_keys=False,
                           default_flow_style=None)
    return (EXAMPLE + f"\n# --- {target}: these defaults replace the ones above: int8 everywhere (TFLM's integer\n"
            "# kernels take no float layer; CMSIS-NN's int8 kernels are its fastest and smallest), 3 epochs of\n"
            "# quantization-aware training on the labelled training split (classifiers only), the firmware\n"
            "# made from that graph. For a flash budget the int8 model misses, let the relevance allocator\n"
            "# store the least relevant layers as packed INT4 (less flash, more instructions on an M4):\n"
            "#   quantize: {allocator: relevance, bits: [4, 8], budget: size-kb=K}\n"
            "# Keys you set in your recipe still win.\n" + text)

EXAMPLE = """\
# toolchain compress recipe. Every key is optional; omitted keys take these defaults.
# what the model does: auto (from the model and data: integer labels -> classification, float
# targets -> regression, targets = inputs -> autoencoder) | classification | regression | autoencoder
task: auto
relevance:
  rule: lrp.epsilon        # LRP rule set: `toolchain list rules`
  samples: 500             # first N calibration samples to explain
  classes: "true"          # explain the true class ("true", quoted: YAML reads a bare true as a boolean) | predicted | all
prune:
  enabled: true
  criterion: relevance     # relevance | magnitude | random
  granularity: filter      # filter (rebuilds a narrower model) | weight (exact zeros)
  mode: sparsity           # sparsity (remove the least relevant fraction) | nonpositive (paper's rule) | auto
  sparsity: 0.5            # in [0, 1); used when mode is sparsity
  # auto: the largest of these sparsities whose accuracy on the CALIBRATION split (never the
  # evaluation split) drops by at most auto_max_drop before fine-tuning; none qualifies -> no pruning
  auto_sparsities: [0.5, 0.4, 0.3, 0.2, 0.1]
  auto_max_drop: 0.01
  channel_multiple: 1      # filter pruning keeps a multiple of this many channels per layer, for
                           # kernels that want one; XNNPACK here does not (benchmarks/kernel_speed.py)
  fine_tune_epochs: 0      # epochs on the labelled training split (kws01 has only its 500 calibration samples)
  # knowledge distillation from the original model on augmented calibration samples (mixup, time
  # shift, SpecAugment-style time/feature masks, noise): needs no labels; 0 = off. ~10 min for
  # DS-CNN on 2 cores (8000 steps: 0.5 points less on DS-CNN, 3 seeds; 24000: about 0.2 less).
  distill_steps: 48000     # a cap: the first 50 steps are timed and the run cut to distill_time_budget_s;
                           # it also stops when its loss on the clean calibration samples stops improving
  distill_temperature: 1.0
  distill_time_budget_s: 900   # wall-clock budget of the distillation (null: none); DS-CNN's 48,000 steps
                               # take about 9 minutes on 2 cores, a MobileNetV1 at 96x96 would take hours
  distill_data: train      # train: every training sample when the split has more than the calibration
                           # samples (image folders), else the calibration samples | calibration
  # mode sparsity with recovery (distillation or fine-tuning): after it the pruned model is checked
  # against the original on training samples held out of recovery (the train split's tail: half of
  # what the calibration samples leave, 200-1000) and on the calibration samples (kws01 has nothing
  # beyond its 500 calibration samples: only those), never on the evaluation split, as its int8
  # TFLite when quantize.qat_epochs is 0 (what ships; with QAT: the float model); when its loss on
  # the two pooled, plus one standard error, is more than backoff_max_drop x the verify limit of
  # the task's metric (0.2 x max_accuracy_drop =
  # 1 point; 0.2 x max_mse_increase = 5% more MSE), pruning is redone at the next lower of these
  # sparsities ([] = never; the last one is kept whatever it loses, and the guard judges it; a try
  # whose distillation the time budget cut below 1/8 of its cap goes straight to the last one)
  backoff_sparsities: [0.3, 0.15, 0.0]   # 0.0: no pruning (quantization only)
  backoff_max_drop: 0.2
quantize:
  enabled: true
  # int8: on XNNPACK (TFLite's default CPU path) INT4 kernels run 3.5-4.4x slower than int8.
  # For the smallest flash image instead: allocator: relevance, bits: [2, 3, 4, 5, 6, 8],
  # budget: avg-bits=4 and add tflite-mixed to export.formats.
  allocator: uniform       # relevance | uniform | sensitivity
  bits: [8]                # candidate weight widths (TFLite stores <= 4 as INT4, 5-8 as INT8)
  budget: avg-bits=8       # avg-bits=B | size-kb=K | total-bits=N
  granularity: layer       # layer | group (of output channels)
  group_size: 8
  qat_epochs: 0
  # layers kept in float in tflite-mixed (TFLite selective quantization); "first" = the first
  # kernel layer: XNNPACK's int8 conv over a 1-channel input is slower than float (DS-CNN 4.9 vs
  # 3.1 us at 32 channels). tflite-int8 (and the MCU bundle) stay full-integer. [] = none.
  float_layers: [first]
export:
  # tflite-mixed is the headline artifact (the plan above: int8 with the float layers);
  # also: tflite-fp16, tflite-int16x8, tflite-sparse, onnx-mixed, ...
  formats: [tflite-fp32, tflite-int8, tflite-mixed, onnx-fp32, onnx-int8, mcu]
  mcu_source: tflite-int8  # the integer TFLite the MCU bundle (and its firmware) is made from: tflite-int8 | tflite-mixed
verify:
  # every compressed artifact against the ORIGINAL model: more loss fails the run (nothing written)
  min_agreement: 0.9       # classifiers: top-1 agreement of each int8/mixed artifact with its Keras model
  max_accuracy_drop: 0.05  # classifiers: accuracy of each artifact vs the original (0.05 = 5 points)
  max_mse_increase: 0.25   # regressors/autoencoders: relative MSE increase vs the original (0.25 = 25% worse)
  max_auc_drop: 0.02       # autoencoders with anomaly labels: ROC AUC loss vs the original
bench:
  enabled: true
  target: local            # local | ssh://[user@]host[:port] | emulated-pi4 | emulated-pi5 |
                           # qemu-cortex-m4 | qemu-cortex-m7 (firmware; their defaults differ: `--target`)
  runs: 200
  threads: [1]
  # firmware targets (qemu-cortex-m*) only:
  samples: null            # evaluation samples run in the firmware (null: the whole split; 200 by --target default)
  kernels: cmsis-nn        # cmsis-nn | reference (TFLM's reference kernels)
  reference: null          # an integer .tflite (e.g. the official int8 model) built and run the same way
"""


#: bounds that keep a typo from running for days (or a hostile recipe from exhausting the machine)
MAX_DISTILL_STEPS = 10_000_000
MAX_EPOCHS = 10_000
MAX_RUNS = 100_000
MAX_THREADS = 1024
MAX_SAMPLES = 10_000_000
MAX_GROUP_SIZE = 65_536
#: a recipe is a few kilobytes; anything far larger is not one
MAX_RECIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class Check:
    kind: type | tuple
    valid: Optional[Callable[[Any], bool]] = None
    allowed: str = ""


def _choice(*values):
    return Check(str, lambda v: v in values, "one of " + ", ".join(values))


def _int_range(lo, hi=None):
    return Check(int, lambda v: v >= lo and (hi is None or v <= hi),
                 f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


def _number(lo, hi, lo_open=False, hi_open=False):
    """A finite number in [lo, hi] (``(`` / ``)`` where open): NaN and inf are refused."""
    def ok(v):
        return (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    return Check((int, float), ok, f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def _list_of(kind, valid, allowed):
    return Check(list, lambda v: len(v) > 0 and all(isinstance(i, kind) and not isinstance(i, bool) and valid(i)
                                                      for i in v), allowed)


def _budget_ok(v: str) -> bool:
    key, _, value = v.partition("=")
    try:
        return key in ("avg-bits", "size-kb", "total-bits") and math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


SCHEMA: Dict[str, Dict[str, Check]] = {
    "relevance": {"rule": Check(str), "samples": _int_range(1, MAX_SAMPLES),
                  "classes": _choice("true", "predicted", "all")},
    "prune": {"enabled": Check(bool), "criterion": _choice("relevance", "magnitude", "random"),
              "granularity": _choice("weight", "filter"), "mode": _choice("auto", "sparsity", "nonpositive"),
              "auto_sparsities": _list_of((int, float), lambda v: math.isfinite(v) and 0 < v < 1,
                                          "a non-empty list of numbers in (0, 1)"),
              "auto_max_drop": _number(0, 1),
              "sparsity": _number(0, 1, hi_open=True),
              "channel_multiple": _int_range(1, 256), "fine_tune_epochs": _int_range(0, MAX_EPOCHS),
              "distill_steps": _int_range(0, MAX_DISTILL_STEPS),
              "distill_temperature": _number(0, 100, lo_open=True),
              "distill_time_budget_s": Check((int, float, type(None)), lambda v: v is None or (v == v and 0 < v <= 7 * 86400),
                                             "a number of seconds in (0, 604800], or null for no budget"),
              "distill_data": _choice("train", "calibration"),
              "backoff_sparsities": Check(list, lambda v: all(isinstance(i, (int, float)) and not isinstance(i, bool)
                                                              and math.isfinite(i) and 0 <= i < 1 for i in v),
                                          "a list of numbers in [0, 1) ([] for none)"),
              "backoff_max_drop": _number(0, 1)},
    "quantize": {"enabled": Check(bool), "allocator": _choice("relevance", "uniform", "sensitivity"),
                 "bits": _list_of(int, lambda b: b in (2, 3, 4, 5, 6, 7, 8, 16), "a non-empty list of widths from 2..8, 16"),
                 "budget": Check(str, _budget_ok, "avg-bits=B, size-kb=K or total-bits=N with a positive finite number"),
                 "granularity": _choice("layer", "group"), "group_size": _int_range(1, MAX_GROUP_SIZE),
                 "qat_epochs": _int_range(0, MAX_EPOCHS),
                 "float_layers": Check(list, lambda v: all(isinstance(i, str) and i for i in v),
                                       'a list of kernel layer names or "first" ([] for none)')},
    "export": {"formats": _list_of(str, lambda f: True, "a non-empty list of format names"),
               "mcu_source": _choice("tflite-int8", "tflite-mixed")},
    "verify": {"min_agreement": _number(0, 1),
               "max_accuracy_drop": _number(0, 1),
               "max_mse_increase": _number(0, 1000),
               "max_auc_drop": _number(0, 1)},
    "bench": {"enabled": Check(bool), "target": Check(str), "runs": _int_range(1, MAX_RUNS),
              "threads": _list_of(int, lambda t: 1 <= t <= MAX_THREADS,
                                  f"a non-empty list of thread counts in [1, {MAX_THREADS}]"),
              "samples": Check((int, type(None)), lambda v: v is None or 1 <= v <= MAX_SAMPLES,
                               f"an integer in [1, {MAX_SAMPLES}] or null"),
              "kernels": _choice("cmsis-nn", "reference"),
              "reference": Check((str, type(None)), lambda v: v is None or bool(v.strip()),
                                 "a path to an integer .tflite, or null")},
}


def validate(recipe: Any, source: str = "recipe", target: Optional[str] = None) -> Dict[str, Any]:
    """The recipe merged over the defaults of its target (``target``, else the recipe's own
    ``bench.target``; ``defaults_for``); ``ConfigError`` listing every problem with its key path."""
    problems: List[str] = []
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{source} must be a mapping of stage names to settings, got {type(recipe).__name__}; "
                          "see `toolchain recipe --example`")
    given_target = target
    if target is None and isinstance(recipe.get("bench"), dict) and isinstance(recipe["bench"].get("target"), str):
        target = recipe["bench"]["target"]
    merged = defaults_for(target)
    for stage, settings in recipe.items():
        if stage == "task":  # the one top-level scalar
            if settings not in TASK_CHOICES:
                problems.append(f"task: {_short(settings)} is not one of {', '.join(TASK_CHOICES)}")
            else:
                merged["task"] = settings
            continue
        if stage not in SCHEMA:
            problems.append(f"{stage if isinstance(stage, str) and len(stage) <= 40 else _short(stage, 40)}: unknown stage (known: task, {', '.join(SCHEMA)})")
            continue
        if settings is None:
            continue
        if not isinstance(settings, dict):
            problems.append(f"{stage}: must be a mapping, got {type(settings).__name__}")
            continue
        for key, value in settings.items():
            check = SCHEMA[stage].get(key)
            path = f"{stage}.{_short(key, 40) if not isinstance(key, str) or len(key) > 40 else key}"
            if stage == "verify" and check is None and isinstance(value, dict):
                # verify.<kind or format>: any threshold of that kind (verify.fp32.max_rel_diff: 1e-3)
                from toolchain.verify import thresholds_from_dict

                try:
                    thresholds_from_dict({key: value})
                except ConfigError as e:
                    problems.append(f"{path}: {e}")
                else:
                    merged["verify"][key] = dict(value)
                continue
            if check is None:
                problems.append(f"{path}: unknown key (known: {', '.join(SCHEMA[stage])})")
                continue
            kinds = check.kind if isinstance(check.kind, tuple) else (check.kind,)
            if isinstance(value, bool) and bool not in kinds:
                ok_type = False
            else:
                ok_type = isinstance(value, kinds)
            if not ok_type:
                want = "/".join(k.__name__ for k in kinds)
                problems.append(f"{path}: {_short(value)} is a {type(value).__name__}, expected {want}"
                                + (f" ({check.allowed})" if check.allowed else ""))
            elif check.valid is not None and not check.valid(value):
                problems.append(f"{path}: {_short(value)} is not {check.allowed}")
            else:
                merged[stage][key] = value
    if given_target is not None:  # --target overrides the recipe's bench.target
        merged["bench"]["target"] = given_target
    problems.extend(_cross_checks(merged))
    given = (recipe.get("quantize") or {}) if isinstance(recipe.get("quantize"), dict) else {}
    if given.get("float_layers") and merged["quantize"]["enabled"] and not any(
            "mixed" in str(f) for f in merged["export"]["formats"]):
        problems.append("quantize.float_layers: only the tflite-mixed / onnx-mixed artifacts keep layers in float, "
                        "and export.formats has neither; add tflite-mixed or drop float_layers")
    if problems:
        raise ConfigError(f"invalid {source}: " + "; ".join(problems) + "; see `toolchain recipe --example`")
    return merged


#: values of the top-level ``task`` key (``auto``: inferred from the model and data)
TASK_CHOICES = ("auto", "classification", "regression", "autoencoder")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cross_checks(recipe: Dict[str, Any]) -> List[str]:
    out = []
    try:
        from toolchain.relevance import RULES

        if recipe["relevance"]["rule"] not in RULES:
            out.append(f"relevance.rule: {_short(recipe['relevance']['rule'])} is not one of {', '.join(RULES)}")
    except ImportError:  # pragma: no cover - the relevance package is part of the toolchain
        pass
    formats = recipe["export"]["formats"]
    if "mcu" in formats and recipe["export"]["mcu_source"] == "tflite-mixed":
        if not recipe["quantize"]["enabled"]:
            out.append("export.mcu_source: tflite-mixed needs the bit plan, and quantize.enabled is false; "
                       "set export.mcu_source: tflite-int8 or enable quantize")
        elif recipe["quantize"]["float_layers"]:
            out.append(f"export.mcu_source: tflite-mixed cannot feed the microcontroller with float layers "
                       f"(quantize.float_layers: {_short(recipe['quantize']['float_layers'])}); set "
                       "quantize.float_layers: [] or export.mcu_source: tflite-int8")
    target = recipe["bench"]["target"]
    if not (target in CPU_TARGETS + MCU_TARGETS or target.startswith("ssh://")):
        out.append(f"bench.target: {_short(target)} is not {', '.join(CPU_TARGETS)}, ssh://[user@]host[:port], "
                   f"{' or '.join(MCU_TARGETS)}")
    return out


def load_recipe(path: Optional[str], target: Optional[str] = None) -> Dict[str, Any]:
    """Read and validate a YAML recipe; ``None`` gives the default recipe (of ``target``'s kind)."""
    if path is None:
        return validate({}, "default recipe", target)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist; pass a YAML file (`toolchain recipe --example > recipe.yaml`)")
    import yaml

    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {p} is {p.stat().st_size} bytes, more than a recipe's "
                          f"{MAX_RECIPE_BYTES} limit; pass the YAML recipe file itself")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {p} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_make_loader())  # noqa: S506 - a SafeLoader without aliases
    except _AliasRefused as e:
        raise ConfigError(f"recipe {p} uses a YAML anchor or alias ({e}); recipes must spell values "
                          "out, write the value where it is used") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"recipe {p} is nested too deeply to be a recipe; see `toolchain recipe --example`") from None
    return validate(data, f"recipe {p}", target)


class _AliasRefused(Exception):
    pass


def _make_loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses anchors and aliases: a 700-byte "billion laughs" recipe
        expands to gigabytes, and no recipe needs them."""

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                mark = event.start_mark
                raise _AliasRefused(f"line {mark.line + 1}, column {mark.column + 1}")
            return super().compose_node(parent, index)

    return RecipeLoader
