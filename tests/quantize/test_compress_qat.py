"""`toolchain compress` with quantize.qat_epochs: the mixed artifacts are converted from the graph the
quantize stage fine-tuned, so they score what quantize.json simulated (after QAT), and the report
shows both side by side; a second run takes the fine-tuned graph from the stage cache."""
import json

import pytest

from toolchain.cli import main

#: the issue's bar: an artifact within half a point of the simulated accuracy
MAX_ACCURACY_GAP = 0.005

QAT_RECIPE = """
relevance: {samples: 200}
prune: {enabled: false}
quantize: {allocator: uniform, bits: [4], qat_epochs: 2, float_layers: []}
export: {formats: [tflite-mixed, onnx-mixed]}
bench: {enabled: false}
verify: {min_agreement: 0.5, max_accuracy_drop: 0.5}
"""


@pytest.mark.slow
def test_compress_ships_the_qat_graph(tmp_path, monkeypatch):
    from models import train_model
    from toolchain.data import load_dataset

    monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "digits.keras"
    train_model("digits_cnn", load_dataset("digits"), 2, model, verbose=0)  # under-trained: QAT has work
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(QAT_RECIPE)
    args = ["compress", "--model", str(model), "--data", "digits", "--recipe", str(recipe), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    q = summary["quantize"]
    assert q["qat_epochs"] == 2 and q["accuracy"] != q["accuracy_before_qat"]
    arts = q["artifact_accuracy"]
    assert set(arts) == {"tflite-mixed", "onnx-mixed"}
    for fmt, acc in arts.items():
        assert abs(acc - q["accuracy"]) <= MAX_ACCURACY_GAP, (fmt, acc, q["accuracy"], q["accuracy_before_qat"])
    report = (tmp_path / "a" / "report.md").read_text()
    assert "after 2 epochs of quantization-aware training" in report and "tflite-mixed" in report
    # cached: the fine-tuned graph comes back from the stage cache, the artifacts are the same
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "quantize" in again["cached_stages"]
    assert again["quantize"]["artifact_accuracy"] == arts
