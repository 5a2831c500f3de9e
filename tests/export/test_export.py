"""export(): all-or-nothing output, verification failures, format errors, and the CLI."""
import json

import pytest

tf = pytest.importorskip("tensorflow")

from tests.export.helpers import digits, small_cnn  # noqa: E402
from toolchain.errors import ConfigError, VerificationError  # noqa: E402
from toolchain.export import FORMATS, export, format_names, parse_formats  # noqa: E402
from toolchain.quantize.bitplan import BitPlan, LayerBits  # noqa: E402
from toolchain.verify import Thresholds  # noqa: E402


def test_format_registry_keys_are_dotted_and_names_dashed():
    assert "tflite.int8" in FORMATS and "mcu" in FORMATS
    assert "tflite-mixed" in format_names() and "onnx-mixed" in format_names()


def test_unknown_formats_are_all_named_with_the_known_ones():
    with pytest.raises(ConfigError) as e:
        parse_formats("tflite-int8,tflite-int3,coreml")
    msg = str(e.value)
    assert "'tflite-int3'" in msg and "'coreml'" in msg and "tflite-fp32" in msg and "onnx-mixed" in msg
    with pytest.raises(ConfigError, match="no export format"):
        parse_formats(" , ")
    assert parse_formats("mcu, tflite-int8,mcu") == ["mcu", "tflite-int8"]


def test_mixed_without_plan_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="tflite-mixed.*bit plan"):
        export(small_cnn(), digits(), "tflite-mixed", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_verification_failure_raises_and_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("complete earlier build")
    strict = {"int8": Thresholds(min_agreement=1.01)}  # unreachable on purpose
    with pytest.raises(VerificationError) as e:
        export(small_cnn(), digits(), "tflite-fp32,tflite-int8", out, thresholds=strict,
               calibration_samples=100, quiet=True)
    msg = str(e.value)
    assert "tflite-int8" in msg and "agreement" in msg and "< 1.01" in msg
    assert "tflite-fp32" not in msg.split("failed verification")[1]  # only the failing artifact is named
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind
    assert e.value.report.failed()[0].format == "tflite-int8"


def test_bundle_writes_artifacts_reports_and_mcu(tmp_path):
    out = tmp_path / "bundle"
    b = export(small_cnn(), digits(), ["tflite-int8", "mcu"], out, calibration_samples=100, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "mcu", "small_cnn_int8.tflite", "verify.json"]
    assert b.artifacts["tflite-int8"].path == out / "small_cnn_int8.tflite"
    assert b.mcu.out_dir == out / "mcu" and (out / "mcu" / "model_data.cc").is_file()
    v = json.loads((out / "verify.json").read_text())
    assert v["passed"] and v["checks"][0]["format"] == "tflite-int8"
    e = json.loads((out / "export.json").read_text())
    assert e["artifacts"]["tflite-int8"]["path"] == "small_cnn_int8.tflite"
    assert e["artifacts"]["tflite-int8"]["sha256"] == b.artifacts["tflite-int8"].sha256
    assert e["mcu"]["source"]["sha256"] == b.artifacts["tflite-int8"].sha256


# ---- CLI -----------------------------------------------------------------------------------


def _cli(argv, capsys):
    from toolchain.cli import main

    code = main(argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from toolchain.model_io import save_model

    return str(save_model(small_cnn(), tmp_path_factory.mktemp("cli") / "small_cnn.keras"))


def test_cli_unknown_format_is_one_clear_error(tmp_path, capsys):
    code, io = _cli(["export", "--model", "missing.keras", "--data", "digits", "--formats",
                     "tflite-int8,tflite-int2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    err = io.err.strip().splitlines()
    assert len(err) == 1 and "tflite-int2" in err[0] and "known formats" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_missing_bitplan_and_missing_plan(tmp_path, capsys, saved_model):
    code, io = _cli(["export", "--model", saved_model, "--data", "digits", "--formats", "tflite-mixed",
                     "--bitplan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.json" in io.err
    code, io = _cli(["export", "--model", saved_model, "--data", "digits", "--formats", "tflite-mixed",
                     "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--bitplan" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_bad_thresholds_file(tmp_path, capsys, saved_model):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"int8": {"min_agreemnt": 0.5}}))
    code, io = _cli(["export", "--model", saved_model, "--data", "digits", "--formats", "tflite-int8",
                     "--thresholds", str(t), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "min_agreemnt" in io.err


def test_cli_writes_artifacts_verify_and_mcu(tmp_path, capsys, saved_model):
    plan = BitPlan({"pw": LayerBits(4), "fc1": LayerBits(4)})
    plan_path = plan.save(tmp_path / "bitplan.json")
    out = tmp_path / "o"
    code, io = _cli(["export", "--model", saved_model, "--data", "digits", "--bitplan", str(plan_path),
                     "--formats", "tflite-int8,tflite-mixed,mcu", "--calibration-samples", "100",
                     "--out", str(out), "--quiet"], capsys)
    assert code == 0, io.err
    assert {"small_cnn_int8.tflite", "small_cnn_mixed.tflite", "verify.json", "export.json", "mcu"} <= \
        {p.name for p in out.iterdir()}
    assert "tflite-mixed" in io.out and "arena" in io.out
    e = json.loads((out / "export.json").read_text())
    layers = e["artifacts"]["tflite-mixed"]["metadata"]["layers"]
    assert layers["pw"]["weight_type"] == "INT4" and layers["fc1"]["weight_type"] == "INT4"
    assert e["bitplan"]["layers"]["pw"]["weight_bits"] == 4
