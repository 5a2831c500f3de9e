"""benchmarks/paper.py: the paper's experiment runs on whatever Fashion-MNIST/CIFAR-10 is cached and
says why it skips the rest. Neither dataset is on this machine, so a small learnable stand-in in
Fashion-MNIST's own cache format (``tests/fake_data.py``) goes through the real
loader, training, compress and every flow."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import paper  # noqa: E402

from tests.fake_data import write_fashion_mnist_cache  # noqa: E402


def test_no_cached_dataset_skips_each_with_the_missing_file(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TOOLCHAIN_DATA_DIR", str(empty))  # restored after the test
    assert paper.main(["--data-dir", str(empty), "--results", str(tmp_path / "res")]) == 0
    md = (tmp_path / "res" / "paper.md").read_text()
    assert "fashion_mnist: skipped" in md and "train-images-idx3-ubyte.gz" in md
    assert "cifar10: skipped" in md and "cifar-10-batches-py" in md
    assert "Nothing ran" in md and not (tmp_path / "res" / "paper.png").exists()
    assert json.loads((tmp_path / "res" / "paper.json").read_text())["cases"] == {}


def test_runs_every_flow_on_a_cached_dataset(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_fashion_mnist_cache(data, n_train=6000, n_test=300)
    recipe = tmp_path / "small.yaml"
    recipe.write_text((REPO / "benchmarks" / "recipes" / "paper.yaml").read_text()
                      .replace("samples: 500", "samples: 64").replace("fine_tune_epochs: 2", "fine_tune_epochs: 1"))
    monkeypatch.setenv("TOOLCHAIN_DATA_DIR", str(data))
    res = tmp_path / "res"
    assert paper.main(["--data", "fashion_mnist", "cifar10", "--arch", "alexnet", "--epochs", "5",
                       "--data-dir", str(data), "--recipe", str(recipe), "--runs", "20", "--paired-runs", "20",
                       "--results", str(res)]) == 0
    out = json.loads((res / "paper.json").read_text())
    assert list(out["cases"]) == ["alexnet on fashion_mnist"]
    assert len(out["skipped"]) == 1 and out["skipped"][0].startswith("cifar10: skipped")
    case = out["cases"]["alexnet on fashion_mnist"]
    assert case["train"]["train_samples"] == 6000 and case["train"]["accuracy"] > 0.9
    rows = {(r["flow"], r["format"]): r for r in case["reductions"]}
    fp32 = rows[("float32", "tflite-fp32")]
    assert fp32["reduction"] == 0.0 and fp32["accuracy"] == pytest.approx(case["train"]["accuracy"], abs=0.01)
    for key in [("uniform int8", "tflite-int8"), ("ours (compress)", "tflite-int8"),
                ("ours (compress)", "tflite-mixed"), ("magnitude filters 50% + fine-tune + int8", "tflite-int8")]:
        r = rows[key]
        assert r["reduction"] == pytest.approx(1 - r["bytes"] / fp32["bytes"])
        assert r["accuracy"] > 0.85, key
    # int8 alone is 1/4 of float; half the filters and 4/8-bit mixed precision must go well below
    assert rows[("uniform int8", "tflite-int8")]["reduction"] == pytest.approx(0.74, abs=0.02)
    assert rows[("ours (compress)", "tflite-mixed")]["bytes"] < rows[("ours (compress)", "tflite-int8")]["bytes"] \
        < rows[("uniform int8", "tflite-int8")]["bytes"]
    md = (res / "paper.md").read_text()
    assert "### alexnet on fashion_mnist" in md and "| ours (compress) | tflite-mixed |" in md
    assert (res / "paper.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, match", [(["--epochs", "0"], "--epochs: '0' must be a positive integer"),
                                         (["--recipe", "missing.yaml"], "missing.yaml does not exist"),
                                         (["--recipe", "BAD"], r"prune.sparsity: 2 is not a finite number in \[0, 1\)")])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {sparsity: 2}\n")
    args = [str(bad) if a == "BAD" else str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    with pytest.raises(SystemExit) as e:
        paper.main(args + ["--results", str(tmp_path / "res")])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "res").exists()
