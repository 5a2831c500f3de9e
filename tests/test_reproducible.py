"""Identical runs write identical files: `toolchain compress` twice with the same inputs (each with
its own empty stage cache, so every stage really runs twice) gives byte-identical files throughout
the output directory, except where a file carries a measurement of this run on this machine
(latency, memory, wall-clock time of a stage): those files are named in MEASURED and
docs/reliability.md, and every JSON file must still be identical once its measured fields
(MEASURED_KEYS) are taken out. The stage commands (relevance, prune, quantize) are held to the same
rule. The compress and stage tests take minutes (slow: `make test-all`); the fast suite keeps
`test_simulated_graph_twice_saves_identical_h5` below and
`tests/test_bad_inputs.py::test_identical_runs_write_identical_files` (export twice)."""
import json
from pathlib import Path

import pytest

from toolchain.cli import main

RECIPE = """
relevance: {samples: 64}
prune: {mode: sparsity, sparsity: 0.25, channel_multiple: 1, distill_steps: 30, distill_time_budget_s: null}
quantize: {allocator: relevance, bits: [4, 8], budget: avg-bits=6}
export: {formats: [tflite-int8, tflite-mixed, onnx-int8, mcu]}
bench: {runs: 5}
verify: {max_accuracy_drop: 0.5, min_agreement: 0.5}
"""
#: files that carry measurements of this run on this machine: latency and memory from the bench
#: stage (bench/*: bench.json also records when it was measured), every file that shows them, and
#: the stage records with wall-clock timings (summary.json, relevance.json, prune.json, quantize.json)
MEASURED = ("bench/", "summary.json", "report.md", "report.html", "tradeoff.png", "relevance.json",
            "relevance/relevance.json", "prune.json", "quantize.json")
#: the measured fields of JSON files (everything else in them must be identical): latency and
#: memory (and what is derived from them: x_faster, slower_than_float, the headline that quotes
#: them), and wall-clock seconds of a stage (timings_s; distillation's seconds, seconds_per_step,
#: estimated_seconds; each sparsity backoff try's distill_seconds). Measured on two fresh compress
#: runs: summary.json differed in exactly these fields (docs/reliability.md)
MEASURED_KEYS = frozenset({"p50_ms", "p99_ms", "peak_rss_mb", "x_faster", "slower_than_float", "headline",
                           "timings_s", "seconds", "seconds_per_step", "estimated_seconds", "distill_seconds"})


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """A small CNN trained for a few seconds on the digits (deterministic: seeded)."""
    import tensorflow as tf

    from toolchain.data import load_dataset

    tf.keras.utils.set_random_seed(0)
    ds = load_dataset("digits")
    inp = tf.keras.Input(ds.x_train.shape[1:])
    h = tf.keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inp)
    h = tf.keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(h)
    h = tf.keras.layers.Flatten()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax", name="head")(h), name="tiny")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(ds.x_train, ds.y_train, epochs=8, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without(obj, keys):
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_without(v, keys) for v in obj]
    return obj


def _twice(argv, tmp_path, monkeypatch, capsys) -> tuple:
    outs = []
    for run in ("first", "second"):
        monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / f"cache-{run}"))  # nothing reused
        out = tmp_path / run
        code = main(argv + ["--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        outs.append(_files(out))
    capsys.readouterr()
    return tuple(outs)


def _assert_identical(first: dict, second: dict) -> None:
    assert sorted(first) == sorted(second)
    differ = [n for n in first if first[n] != second[n] and not n.startswith(MEASURED)]
    assert not differ, f"identical runs wrote different {differ}"
    for name in first:
        if name.endswith(".json") and not name.startswith("bench/") and first[name] != second[name]:
            a, b = (_without(json.loads(r[name]), MEASURED_KEYS) for r in (first, second))
            assert a == b, f"{name} differs beyond its measured fields {sorted(MEASURED_KEYS)}"


@pytest.mark.slow  # two full compress runs
def test_compress_twice_writes_identical_files(tiny_digits, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    first, second = _twice(["compress", "--model", str(tiny_digits), "--data", "digits",
                            "--recipe", str(recipe)], tmp_path, monkeypatch, capsys)
    for must in ("model_pruned.keras", "bitplan.json", "relevance/relevance.npz", "artifacts/export.json",
                 "artifacts/verify.json", "baseline/export.json", "artifacts/mcu/model_data.cc"):
        assert must in first, must
    _assert_identical(first, second)
    for name, data in first.items():  # the output's own location is recorded nowhere
        if name.endswith((".json", ".md")):
            assert str(tmp_path / "first").encode() not in data and b".partial-" not in data, name


@pytest.mark.slow  # relevance and prune (with distillation) twice each
def test_stage_commands_twice_write_identical_files(tiny_digits, tmp_path, monkeypatch, capsys):
    model, data = str(tiny_digits), ["--data", "digits"]
    rel = _twice(["relevance", "--model", model, *data, "--samples", "32"], tmp_path / "r", monkeypatch, capsys)
    _assert_identical(*rel)
    pruned = _twice(["prune", "--model", model, *data, "--sparsity", "0.25", "--samples", "32",
                     "--distill-steps", "20"], tmp_path / "p", monkeypatch, capsys)
    _assert_identical(*pruned)
    assert "model.keras" in pruned[0] and "relevance.npz" in rel[0], (sorted(pruned[0]), sorted(rel[0]))


@pytest.mark.slow  # relevance (in its worker) and the plan, twice
def test_quantize_twice_writes_identical_files(tiny_digits, tmp_path, monkeypatch, capsys):
    plan = _twice(["quantize", "--model", str(tiny_digits), "--data", "digits", "--bits", "4,8",
                   "--budget", "avg-bits=6", "--samples", "32"], tmp_path / "q", monkeypatch, capsys)
    assert "bitplan.json" in plan[0], sorted(plan[0])
    _assert_identical(*plan)


def test_simulated_graph_twice_saves_identical_h5(tmp_path):
    """tfmot names the input QuantizeLayer from Keras' process-wide layer counter; the simulated
    graph names it ``quantize_layer`` however many were built before, so ``model_qat.h5`` is the
    same file every time (it was ``quantize_layer_1`` the second time, in its config and weights)."""
    import tensorflow as tf

    from toolchain.data import load_dataset
    from toolchain.quantize import build_qat_model, plan_bits
    from toolchain.quantize.simulate import save_qat_model

    ds = load_dataset("digits")
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(ds.x_train.shape[1:])
    h = tf.keras.layers.Flatten()(tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax", name="head")(h))
    plan = plan_bits(model, None, "uniform", (4,))
    written = []
    for run in range(2):
        qat = build_qat_model(model, plan, ds.x_train[:32])
        assert [l.name for l in qat.layers if type(l).__name__ == "QuantizeLayer"] == ["quantize_layer"]
        save_qat_model(qat, tmp_path / f"qat{run}.h5")
        written.append((tmp_path / f"qat{run}.h5").read_bytes())
    assert written[0] == written[1], "two identical simulated graphs were saved as different model_qat.h5 files"
