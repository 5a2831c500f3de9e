"""`toolchain compress` end to end on the real MLPerf Tiny models, not only on the digits CNN:
the DS-CNN on kws01 (depthwise convolutions, the default recipe's shape of work) and ResNet-8
(residual Adds tie filters across branches; BatchNorm folded) on synthetic CIFAR-shaped inputs
labelled by the model itself (no CIFAR-10 ships here). Short distillation keeps them quick; the
benchmarks measure the full recipe."""
import json

import numpy as np

from tests.conftest import KWS01_DIR, KWS_SAVEDMODEL, RESNET8_H5, require
from toolchain.cli import main
from toolchain.model_io import file_sha256

# 300 distillation steps check the mechanics on real graphs, not the accuracy (benchmarks measure
# the full recipe: DS-CNN at 48,000 steps is within a point of the official int8); the guard against
# the original is relaxed here so a short recovery does not stop the run (it is tested on its own),
# and the sparsity backoff is off so the run prunes as asked (it is tested on its own too)
QUICK = """
relevance: {samples: 128}
prune: {sparsity: %s, distill_steps: 300, backoff_sparsities: []}
verify: {max_accuracy_drop: 0.5}
bench: {enabled: false}
"""


def _compress(model, data, tmp_path, sparsity):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK % sparsity)
    before = file_sha256(model)
    out = tmp_path / "build"
    assert main(["compress", "--model", str(model), "--data", data, "--recipe", str(recipe),
                 "--out", str(out), "--quiet"]) == 0
    assert file_sha256(model) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verify"]["passed"]
    formats = {r["format"] for r in summary["artifacts"] if r["origin"] == "compressed"}
    assert {"tflite-fp32", "tflite-int8", "tflite-mixed", "onnx-fp32", "onnx-int8", "mcu"} <= formats
    micro = summary["mcu"]["tflite_micro"]
    assert micro["top1_agreement"] >= 0.95
    manifest = json.loads((out / "artifacts" / "mcu" / "manifest.json").read_text())
    assert manifest["model"]["bytes"] == next(r for r in summary["artifacts"] if r["format"] == "mcu")["size_bytes"]
    assert (out / "report.html").stat().st_size > 10_000
    return out, summary


def manifest_stripped(out) -> bool:
    return json.loads((out / "artifacts" / "mcu" / "manifest.json").read_text())["model"]["strings_stripped"]


def _row(summary, fmt, origin="compressed"):
    return next(r for r in summary["artifacts"] if r["format"] == fmt and r["origin"] == origin)


def test_ds_cnn_on_kws01(tmp_path):
    require(KWS_SAVEDMODEL)
    require(KWS01_DIR)
    out, summary = _compress(KWS_SAVEDMODEL, "kws01", tmp_path, 0.5)
    assert summary["prune"]["params_after"] < 0.5 * summary["prune"]["params_before"]
    exported = json.loads((out / "artifacts" / "export.json").read_text())["artifacts"]
    mixed = exported["tflite-mixed"]["metadata"]
    (first,) = mixed["float_layers"]
    assert mixed["layers"][first]["weight_type"] == "FLOAT32"
    # half the filters: well under the official int8 file, and still a working classifier
    assert _row(summary, "tflite-mixed")["size_bytes"] < 30_000
    assert _row(summary, "tflite-int8")["accuracy"] > 0.6
    assert manifest_stripped(out)


def test_resnet8_residual_model(tmp_path):
    from toolchain.model_io import load_model

    model = load_model(require(RESNET8_H5))
    rng = np.random.default_rng(0)

    def images(n):  # smooth random images: 8x8 noise upsampled to 32x32x3
        return np.repeat(np.repeat(rng.uniform(size=(n, 8, 8, 3)).astype(np.float32), 4, 1), 4, 2)

    x, x_eval = images(512), images(256)
    data = tmp_path / "synthetic.npz"
    np.savez(data, x=x, y=model.predict(x, verbose=0).argmax(-1), x_eval=x_eval,
             y_eval=model.predict(x_eval, verbose=0).argmax(-1), class_names=np.array([str(i) for i in range(10)]))
    out, summary = _compress(RESNET8_H5, f"npz:{data}", tmp_path, 0.25)
    pruned = load_model(out / "model_pruned.keras")
    assert summary["prune"]["params_after"] < 0.75 * summary["prune"]["params_before"]
    # filters tied by a residual Add are removed together: both inputs of every Add still match
    for layer in pruned.layers:
        if type(layer).__name__ == "Add":
            shapes = {tuple(t.shape[1:]) for t in layer.input}
            assert len(shapes) == 1, (layer.name, shapes)
    assert _row(summary, "tflite-int8")["agreement"] >= 0.8
    assert manifest_stripped(out)
