"""``toolchain quantize`` end to end on the digits CNN (relevance computed in a child process)."""
import json

import pytest

from toolchain.cli import main
from toolchain.quantize import BitPlan, load_qat_model
from toolchain.quantize.simulate import accuracy


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / "cache"))


def test_quantize_relevance_end_to_end(digits_model_path, digits_data, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(digits_model_path), "--data", "digits", "--allocator", "relevance",
                 "--bits", "2,3,4,8", "--budget", "avg-bits=4", "--granularity", "group", "--group-size", "8",
                 "--qat-epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "quantize.json").read_text())
    for key in ("avg_weight_bits", "packed_weight_bytes", "accuracy", "layers", "float_accuracy"):
        assert key in report
    assert report["avg_weight_bits"] <= 4.0
    plan = BitPlan.load(out / "bitplan.json")
    assert plan.allocator == "quant.relevance" and plan.granularity == "group"
    assert set(report["layers"]) == set(plan.layers)
    model = load_qat_model(out / "model_qat.h5")
    acc = accuracy(model, digits_data.x_eval, digits_data.y_eval)
    assert acc == pytest.approx(report["accuracy"]), "the saved simulated model is not the one evaluated"
    assert report["accuracy"] >= report["float_accuracy"] - 0.05
    cached = [p for p in (tmp_path / "cache" / "relevance").iterdir() if (p / "relevance.json").is_file()]
    assert len(cached) == 1, "relevance was not cached"
    assert (out / "bitplan.png").stat().st_size > 0

    # the cached relevance directory is what `toolchain relevance` writes: reuse it with --relevance
    out2 = tmp_path / "q2"
    assert main(["quantize", "--model", str(digits_model_path), "--data", "digits", "--bits", "2,3,4,8",
                 "--budget", "size-kb=20", "--relevance", str(cached[0]), "--out", str(out2), "--quiet"]) == 0
    report2 = json.loads((out2 / "quantize.json").read_text())
    assert report2["packed_weight_bytes"] <= 20 * 1024
    assert report2["plan_notes"]["relevance_samples"] == len(digits_data.x_train)


def test_quantize_uniform_4_bit(digits_model_path, tmp_path, capsys):
    out = tmp_path / "u4"
    assert main(["quantize", "--model", str(digits_model_path), "--data", "digits", "--allocator", "uniform",
                 "--bits", "4", "--out", str(out), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["avg_weight_bits"] == 4.0
    assert {v["weight_bits"] for v in report["layers"].values()} == {4}


@pytest.mark.parametrize("args,message", [
    (["--allocator", "relevance", "--budget", "avg-bits=1"], "below the smallest possible plan"),
    (["--allocator", "magic"], "unknown bit allocator 'magic'; known: relevance, sensitivity, uniform"),
    (["--allocator", "uniform", "--bits", ""], "empty"),
])
def test_errors_leave_no_output(digits_model_path, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code = main(["quantize", "--model", str(digits_model_path), "--data", "digits", *args, "--out", str(out),
                 "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
