"""`toolchain compress` end to end on digits with a small model: artifacts verified in their
runtimes, report written, stage outputs reused on a second run, the input model untouched, and a
failed run leaving the previous complete build in place."""
import json

import pytest

from toolchain.cli import main
from toolchain.model_io import file_sha256

FAST_RECIPE = """
relevance: {samples: 200}
prune: {mode: sparsity, sparsity: 0.2, channel_multiple: 1, distill_steps: 100}
quantize: {allocator: relevance, bits: [4, 8], budget: avg-bits=6}
export: {formats: [tflite-fp32, tflite-int8, tflite-mixed, onnx-int8, mcu]}
bench: {runs: 20}
"""


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from models import train_model
    from toolchain.data import load_dataset

    path = tmp_path_factory.mktemp("model") / "digits.keras"
    train_model("digits_cnn", load_dataset("digits"), 4, path, verbose=0)
    return path


@pytest.fixture(scope="module")
def build(digits_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    recipe = d / "recipe.yaml"
    recipe.write_text(FAST_RECIPE)
    before = file_sha256(digits_model)
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--out", str(d / "build"), "--quiet"])
    assert code == 0
    return d, recipe, before


def test_build_contents(build, digits_model):
    d, _, before = build
    out = d / "build"
    for name in ("report.html", "report.md", "summary.json", "bitplan.json", "model_pruned.keras",
                 "relevance/relevance.npz", "artifacts/verify.json", "artifacts/mcu/model_data.cc",
                 "relevance_layers.png", "fidelity_heatmaps.png", "bit_widths.png", "prune_sparsity.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    formats = {r["format"] for r in summary["artifacts"] if r["origin"] == "compressed"}
    assert {"tflite-int8", "tflite-mixed", "onnx-int8", "mcu"} <= formats
    assert summary["verify"]["passed"]
    for row in summary["artifacts"]:
        if row["format"] != "mcu":
            assert 0.5 < row["accuracy"] <= 1 and row["p50_ms"] > 0 and row["gzip_bytes"] > 0
    mixed = next(r for r in summary["artifacts"] if r["format"] == "tflite-mixed")
    # the default float_layers: [first] keeps the first kernel layer in float in tflite-mixed only
    plan = summary["quantize"]["plan"]
    (first,) = plan["notes"]["float_layers"]
    assert plan["layers"][first]["weight_bits"] == plan["layers"][first]["activation_bits"] == 32
    exported = json.loads((out / "artifacts" / "export.json").read_text())["artifacts"]
    assert exported["tflite-mixed"]["metadata"]["float_layers"] == [first]
    assert exported["tflite-mixed"]["metadata"]["layers"][first]["weight_type"] == "FLOAT32"
    assert exported["tflite-int8"]["metadata"].get("float_layers") in (None, [])
    base = next(r for r in summary["artifacts"] if r["origin"] == "baseline")
    assert mixed["size_bytes"] < base["size_bytes"] / 3
    assert summary["prune"]["params_after"] < summary["prune"]["params_before"]
    distilled = summary["prune"]["settings"]["distill"]
    assert distilled["config"]["steps"] == 100 and 0 <= distilled["agreement_after"] <= 1
    report = (out / "report.md").read_text()
    assert "Knowledge distillation from the original model: 100 steps" in report
    micro = summary["mcu"]["tflite_micro"]
    assert micro["top1_agreement"] >= 0.95 and micro["arena_min_bytes"] > 0
    mcu_row = next(r for r in summary["artifacts"] if r["format"] == "mcu")
    assert mcu_row["arena_bytes"] >= micro["arena_min_bytes"]
    assert f"run in tflite-micro {micro['version']}" in report
    assert -1 <= summary["fidelity"]["mean_correlation"] <= 1
    assert summary["versions"]["tensorflow"] == "2.14.1"
    assert file_sha256(digits_model) == before  # the input model is never modified
    assert not list(d.glob(".build.partial-*"))


def test_second_run_reuses_stage_outputs_and_failure_keeps_previous_build(build, digits_model, capsys):
    d, recipe, _ = build
    out = d / "build"
    summary_before = (out / "summary.json").read_text()
    # an impossible verification threshold makes the run fail after the expensive stages
    strict = d / "strict.yaml"
    strict.write_text(FAST_RECIPE.replace("bench: {runs: 20}", "bench: {enabled: false}")
                      + "verify: {min_agreement: 1.0, max_accuracy_drop: 0.0}\n")
    capsys.readouterr()
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(strict),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert (out / "summary.json").read_text() == summary_before  # previous complete build intact
    assert not list(d.glob(".build.partial-*"))
    # the same recipe again: relevance, pruning and the bit plan come from the caches
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--out", str(out), "--quiet", "--json"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"relevance", "prune", "quantize"} <= set(summary["cached_stages"])


def test_changed_distillation_defaults_are_not_served_from_the_cache(build, digits_model, monkeypatch, tmp_path):
    # the recipe names only distill_steps and distill_temperature; the augmentation defaults live in
    # DistillConfig, and a model distilled with other defaults must not come back from the cache
    from toolchain.prune.distill import DistillConfig

    _, recipe, _ = build
    original = DistillConfig.from_recipe.__func__
    monkeypatch.setattr(DistillConfig, "from_recipe",
                        classmethod(lambda cls, p, **o: original(cls, p, **{"noise": 0.05, **o})))
    assert main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--out", str(tmp_path / "build"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "build" / "summary.json").read_text())
    assert "relevance" in summary["cached_stages"] and "prune" not in summary["cached_stages"]
    assert summary["prune"]["settings"]["distill"]["config"]["noise"] == 0.05


def test_a_changed_simulation_is_not_served_from_the_cache(build, digits_model, monkeypatch, tmp_path):
    # a quantize stage cached by an older simulated graph (what the artifacts are converted from)
    # must be recomputed, not shipped: the simulation's version is part of the stage's key
    from toolchain.quantize import simulate

    _, recipe, _ = build
    monkeypatch.setattr(simulate, "SIMULATION_VERSION", simulate.SIMULATION_VERSION + 1000)
    assert main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--out", str(tmp_path / "build"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "build" / "summary.json").read_text())
    assert {"relevance", "prune"} <= set(summary["cached_stages"]) and "quantize" not in summary["cached_stages"]


def test_auto_pruning_chooses_on_the_calibration_split(digits_model, tmp_path):
    """Auto mode tries sparsities from the largest down and records the calibration accuracy of
    each; with a zero tolerance and only large sparsities it must decline and prune nothing."""
    recipe = tmp_path / "auto.yaml"
    recipe.write_text("relevance: {samples: 200}\n"
                      "prune: {mode: auto, auto_sparsities: [0.9, 0.8], auto_max_drop: 0.0}\n"
                      "quantize: {enabled: false}\nexport: {formats: [tflite-fp32]}\nbench: {enabled: false}\n")
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(recipe),
                 "--out", str(tmp_path / "build"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "build" / "summary.json").read_text())
    auto = summary["prune"]["auto"]
    assert [t["sparsity"] for t in auto["tried"]] == [0.9, 0.8]
    assert all(t["calibration_accuracy"] < auto["reference_calibration_accuracy"] for t in auto["tried"])
    assert auto["chosen"] is None and summary["prune"]["params_after"] == summary["prune"]["params_before"]


DESTRUCTIVE_RECIPE = """
relevance: {samples: 200}
prune: {granularity: filter, mode: sparsity, sparsity: 0.9, distill_steps: 0}
quantize: {enabled: false}
export: {formats: [tflite-fp32]}
bench: {enabled: false}
"""


def test_guard_compares_artifacts_with_the_original_model(digits_model, tmp_path, capsys):
    """90% of the filters pruned without recovery: the artifact matches its (pruned) Keras model, so
    export's own verification passes, but it lost far more than verify.max_accuracy_drop against the
    user's original. The run fails with one line naming the artifact and the key, and writes nothing;
    relaxing the key in the recipe lets it through and the summary/report show the drop."""
    strict = tmp_path / "strict.yaml"
    strict.write_text(DESTRUCTIVE_RECIPE)
    before = file_sha256(digits_model)
    out = tmp_path / "build"
    capsys.readouterr()
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(strict),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "verify.max_accuracy_drop" in err[0] and "compressed/" in err[0] and "original" in err[0], err[0]
    assert not out.exists() and not list(tmp_path.glob(".build.*"))
    assert file_sha256(digits_model) == before

    relaxed = tmp_path / "relaxed.yaml"
    relaxed.write_text(DESTRUCTIVE_RECIPE + "verify: {max_accuracy_drop: 1.0}\n")
    assert main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(relaxed),
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in summary["artifacts"] if r["origin"] == "compressed")
    assert row["original_accuracy"] == pytest.approx(summary["original"]["accuracy"])
    assert row["accuracy_change"] == pytest.approx(row["accuracy"] - row["original_accuracy"])
    assert row["accuracy_change"] < -0.05
    report = (out / "report.md").read_text()
    assert "vs original (points)" in report and f"{row['accuracy_change'] * 100:+.1f}" in report


def test_stage_lines_label_each_stage_duration_and_the_total(capsys):
    from toolchain.compress import _Progress

    progress = _Progress(quiet=False)
    progress.stage("relevance", "lrp.epsilon on 10 samples")
    progress.stage("prune", "relevance / filter")
    progress.done()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("[1/7] relevance: lrp.epsilon on 10 samples (") and "elapsed)" in lines[0]
    assert lines[1].startswith("[2/7] prune: relevance / filter (relevance took ") and "s elapsed)" in lines[1]
    assert lines[2].startswith("done (prune took ")


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_first_screen_shows_gains_and_losses_in_chromium(build, tmp_path):
    """The real report, rendered by headless Chromium: its first section names the headline artifact
    with its size, how much smaller and faster it is, and its change against the original; the
    screenshot is a real rendering, not a blank page."""
    import subprocess

    d, _, _ = build
    page = d / "build" / "report.html"
    summary = json.loads((d / "build" / "summary.json").read_text())
    head = next(r for r in summary["artifacts"] if r["origin"] == "compressed" and r["format"] == "tflite-mixed")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    first = dom[dom.index("What you gain and what you lose"):dom.index("<h2>Artifacts</h2>")]
    for text in (head["label"], f"{head['size_bytes']:,} B", f"{head['x_smaller']:.1f}x",
                 f"{head['accuracy']:.2%}", f"{-head['change_vs_original'] * 100:+.1f} points", "this host"):
        assert text in first, text
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
