"""`toolchain compress --target qemu-cortex-m4` end to end on a small digits CNN with a fast recipe:
the microcontroller defaults apply, the integer artifacts and the given reference are built into
TFLM firmware and run on QEMU, and summary.json, report.md and the headline show the firmware
numbers (EMULATED INSTRUCTION COUNTS, flash, RAM, accuracy, agreement with TFLite)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.firmware.conftest import needs_firmware_tools

#: a fast recipe: the microcontroller defaults supply quantize/export; these only shorten the run
FAST_RECIPE = """
relevance: {samples: 200}
prune: {mode: sparsity, sparsity: 0.2, distill_steps: 100}
bench: {samples: 24}
"""
#: TFLM's kernels implement TFLite's integer arithmetic; the firmware must agree with TFLite's
#: reference kernels on every sample's top-1
MIN_FIRMWARE_AGREEMENT = 1.0


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from models import train_model
    from toolchain.data import load_dataset

    path = tmp_path_factory.mktemp("model") / "digits.keras"
    train_model("digits_cnn", load_dataset("digits"), 4, path, verbose=0)
    return path


@pytest.fixture(scope="module")
def reference_int8(digits_model, tmp_path_factory):
    """The digits model as a plain full-integer int8 TFLite: the "official" model to compare with."""
    from toolchain.data import load_dataset
    from toolchain.export.tflite_backend import convert
    from toolchain.model_io import load_model

    model = load_model(str(digits_model))
    x = load_dataset("digits").x_train[:100].astype(np.float32)
    path = tmp_path_factory.mktemp("ref") / "reference_int8.tflite"
    path.write_bytes(convert(model, "int8", x, io="int8"))
    return path


@needs_firmware_tools
def test_compress_target_qemu_cortex_m4_reports_firmware(tflm_m4_cmsis, digits_model, reference_int8, tmp_path):
    from toolchain.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FAST_RECIPE)
    out = tmp_path / "build"
    assert main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--target", "qemu-cortex-m4", "--reference", str(reference_int8), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the microcontroller defaults were applied under the user's keys, and the summary says so
    assert summary["target_defaults"]["kind"] == "mcu"
    assert summary["recipe"]["quantize"]["bits"] == [8] and summary["recipe"]["quantize"]["qat_epochs"] > 0
    assert summary["quantize"]["qat_epochs"] == summary["recipe"]["quantize"]["qat_epochs"]
    assert summary["recipe"]["export"]["mcu_source"] == "tflite-mixed"
    assert summary["recipe"]["prune"]["sparsity"] == 0.2   # the user's key
    assert summary["mcu"]["source"]["format"] == "tflite-mixed"

    fw = summary["firmware"]
    assert fw["target"] == "qemu-cortex-m4" and fw["samples"] == 24 and "EMULATED INSTRUCTION COUNT" in fw["count_kind"]
    by_format = {e["format"]: e for e in fw["entries"]}
    assert {"tflite-mixed", "tflite-int8", "reference"} <= set(by_format)
    ours = by_format["tflite-mixed"]
    assert ours["mcu_bundle"] and ours["samples"] == 24
    model_file = out / next(r["path"] for r in summary["artifacts"]
                            if r["origin"] == "compressed" and r["format"] == "tflite-mixed")
    # the model array is the artifact (string tables may be stripped for the microcontroller)
    assert 0 < ours["model_flash_bytes"] <= model_file.stat().st_size
    for e in fw["entries"]:
        assert e["emulated_instructions_per_inference"] > 0
        assert e["model_flash_bytes"] < e["firmware_flash_bytes"] < e["flash_bytes"]  # harness inputs excluded
        ram = e["ram"]
        assert e["ram_bytes"] >= ram["arena_used"] + ram["stack_used"] > 0
        assert e["tflite_reference"]["top1_agreement"] >= MIN_FIRMWARE_AGREEMENT, e["name"]
        assert 0.0 <= e["accuracy"] <= 1.0
    # the float model is there as a host-side comparison, and the float artifact is not built
    assert fw["float_model"]["accuracy_same_samples"] is not None
    assert any(s["format"] == "tflite-fp32" and "not a firmware candidate" in s["reason"] for s in fw["not_firmware"])
    assert 0 < by_format["reference"]["model_flash_bytes"] <= reference_int8.stat().st_size

    report = (out / "report.md").read_text()
    assert "Microcontroller firmware (emulated)" in report and "EMULATED INSTRUCTIONS / inference" in report
    assert f"{ours['emulated_instructions_per_inference']:,}" in report
    assert "reference_int8.tflite" in report and "not a firmware candidate" in report
    assert f"{ours['emulated_instructions_per_inference']:,} EMULATED instructions/inference" in summary["headline"]
    assert "EMULATED INSTRUCTION COUNTS" in summary["measured_on"]["text"]


@needs_firmware_tools
def test_bench_markdown_on_a_firmware_target_shows_instructions_not_ms(tflm_m4_cmsis, tmp_path):
    from deploy.bench import bench
    from tests.firmware.test_firmware import DSCNN

    result = bench(DSCNN, target="qemu-cortex-m4", data="kws01", samples=2, out=tmp_path / "b", quiet=True)
    md = (tmp_path / "b" / "bench.md").read_text()
    fw = result.measurements[0].raw["firmware"]
    assert "Emulated microcontroller, not device timings" in md and "EMULATED instructions / inference" in md
    assert f"{fw['emulated_instructions_per_inference']:,}" in md and "p50 ms" not in md
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0
