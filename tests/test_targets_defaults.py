"""Per-target default recipes: a microcontroller target merges its overrides over the default
recipe before the user's keys, the user's keys win, CPU targets keep the speed-oriented default,
and `toolchain recipe --example --target` shows them (milliseconds, no TensorFlow), and compress on a
firmware target names a missing tool before any work (one tiny Keras model)."""
import copy

import pytest
import yaml

from toolchain.errors import ConfigError
from toolchain.recipe import (DEFAULT_RECIPE, MCU_TARGETS, TARGET_DEFAULTS, defaults_for, example, load_recipe,
                              target_kind, validate)


@pytest.mark.parametrize("target", MCU_TARGETS)
def test_mcu_target_defaults_apply(target):
    recipe = load_recipe(None, target)
    for stage, settings in TARGET_DEFAULTS["mcu"].items():
        for key, value in settings.items():
            assert recipe[stage][key] == value, f"{stage}.{key}"
    assert recipe["bench"]["target"] == target
    # int8 everywhere, fine-tuned with QAT, the firmware from that graph (benchmarks/results/firmware_candidates.md)
    assert recipe["quantize"]["bits"] == [8] and recipe["quantize"]["qat_epochs"] > 0
    assert recipe["quantize"]["float_layers"] == [] and recipe["export"]["mcu_source"] == "tflite-mixed"
    assert "mcu" in recipe["export"]["formats"]
    # everything the table does not name stays the default recipe's
    assert recipe["prune"] == DEFAULT_RECIPE["prune"] and recipe["verify"] == DEFAULT_RECIPE["verify"]


@pytest.mark.parametrize("target", ["local", "emulated-pi4", "emulated-pi5", "ssh://pi@board"])
def test_cpu_targets_keep_the_speed_default(target):
    recipe = load_recipe(None, target)
    assert target_kind(target) == "cpu"
    assert {k: v for k, v in recipe.items() if k != "bench"} == {k: v for k, v in DEFAULT_RECIPE.items() if k != "bench"}
    assert recipe["quantize"]["float_layers"] == ["first"] and recipe["quantize"]["bits"] == [8]


def test_user_keys_win_over_target_defaults():
    given = {"quantize": {"bits": [2, 3, 4, 8], "budget": "size-kb=12"}, "export": {"mcu_source": "tflite-int8"},
             "bench": {"samples": 50, "kernels": "reference"}}
    recipe = validate(copy.deepcopy(given), "recipe", "qemu-cortex-m4")
    assert recipe["quantize"]["bits"] == [2, 3, 4, 8] and recipe["quantize"]["budget"] == "size-kb=12"
    assert recipe["quantize"]["qat_epochs"] == TARGET_DEFAULTS["mcu"]["quantize"]["qat_epochs"]  # not given
    assert recipe["export"]["mcu_source"] == "tflite-int8"
    assert recipe["bench"]["samples"] == 50 and recipe["bench"]["kernels"] == "reference"


def test_recipe_bench_target_chooses_defaults_and_target_argument_overrides_it():
    from_file = validate({"bench": {"target": "qemu-cortex-m7"}})
    assert from_file["export"]["mcu_source"] == "tflite-mixed" and from_file["bench"]["target"] == "qemu-cortex-m7"
    # --target wins over the recipe's bench.target, and its kind picks the defaults
    moved = validate({"bench": {"target": "qemu-cortex-m7"}}, "recipe", "local")
    assert moved["bench"]["target"] == "local" and moved["export"]["mcu_source"] == DEFAULT_RECIPE["export"]["mcu_source"]
    assert moved["quantize"]["qat_epochs"] == DEFAULT_RECIPE["quantize"]["qat_epochs"]


def test_defaults_table_never_mutates_the_default_recipe():
    before = copy.deepcopy(DEFAULT_RECIPE)
    defaults_for("qemu-cortex-m4")["quantize"]["bits"].append(2)
    assert DEFAULT_RECIPE == before and TARGET_DEFAULTS["mcu"]["quantize"]["bits"] == [8]


def test_float_layers_with_the_mixed_mcu_source_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"quantize.float_layers: \[\] or export.mcu_source: tflite-int8"):
        validate({"quantize": {"float_layers": ["first"]}}, "recipe", "qemu-cortex-m4")
    with pytest.raises(ConfigError, match="export.mcu_source: tflite-int8 or enable quantize"):
        validate({"quantize": {"enabled": False}}, "recipe", "qemu-cortex-m4")


def test_the_int4_recipe_the_mcu_example_names_is_valid_on_a_firmware_target():
    """INT4 left the MCU default; the flash-budget recipe its example text gives must still validate."""
    text = example("qemu-cortex-m4")
    line = next(l for l in text.splitlines() if "allocator: relevance" in l and "size-kb" in l)
    given = yaml.safe_load(line.lstrip("# ").replace("size-kb=K", "size-kb=20"))
    recipe = validate(given, "recipe", "qemu-cortex-m4")
    assert recipe["quantize"]["allocator"] == "relevance" and 4 in recipe["quantize"]["bits"]
    assert recipe["export"]["mcu_source"] == "tflite-mixed"   # packed INT4 reaches the firmware


def test_qat_epochs_on_a_task_without_classes_is_refused_or_dropped():
    """QAT fine-tunes with the classification loss: the MCU default's epochs are dropped for another
    task (and the summary says so); epochs the recipe sets for one are refused with the fix."""
    from types import SimpleNamespace

    from toolchain.compress import _qat_for_task

    autoencoder = SimpleNamespace(is_classification=False, task="autoencoder")
    mcu = validate({}, "recipe", "qemu-cortex-m4")
    note = _qat_for_task(mcu, autoencoder)
    assert mcu["quantize"]["qat_epochs"] == 0 and "qat_epochs: 0 for this autoencoder task" in note
    assert _qat_for_task(validate({}, "recipe", "qemu-cortex-m4"), SimpleNamespace(is_classification=True)) is None
    with pytest.raises(ConfigError, match=r"quantize.qat_epochs: 2 .* autoencoder task; set quantize.qat_epochs: 0"):
        _qat_for_task(validate({"quantize": {"qat_epochs": 2}}), autoencoder)


def test_example_shows_the_target_overrides():
    text = example("qemu-cortex-m4")
    assert text.startswith(example())
    tail = yaml.safe_load(text[len(example()):])
    assert tail["quantize"] == TARGET_DEFAULTS["mcu"]["quantize"] and tail["bench"]["target"] == "qemu-cortex-m4"
    # the commented default recipe itself is a valid recipe equal to the default
    assert validate(yaml.safe_load(example())) == DEFAULT_RECIPE
    with pytest.raises(ConfigError, match="bench.target"):
        example("qemu-cortex-m99")


def test_cli_recipe_example_target(capsys):
    from toolchain.cli import main

    assert main(["recipe", "--example", "--target", "qemu-cortex-m7"]) == 0
    assert "mcu_source: tflite-mixed" in capsys.readouterr().out


def test_compress_on_a_firmware_target_names_the_missing_tool_before_any_work(monkeypatch, tmp_path):
    import tensorflow as tf

    from toolchain.compress import run_compress
    from toolchain.errors import TargetUnavailableError

    model = tf.keras.Sequential([tf.keras.layers.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(10, activation="softmax")])
    path = tmp_path / "m.keras"
    model.save(path)
    kit = tmp_path / "kit"  # a kit that passes the kit check, so the test needs no ../shared
    (kit / "tflm").mkdir(parents=True)
    (kit / "Makefile").write_text("all:\n")
    monkeypatch.setenv("TOOLCHAIN_TFLM_KIT", str(kit))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(TargetUnavailableError, match=r"apt-get install (gcc-arm-none-eabi|qemu-system-arm|make)"):
        run_compress(str(path), "digits", str(tmp_path / "out"), target="qemu-cortex-m4", quiet=True)
    assert not (tmp_path / "out").exists()   # nothing written, no stage run
