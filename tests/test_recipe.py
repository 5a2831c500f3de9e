"""Recipes are validated up front, every problem reported at once with its key path."""
import pytest
import yaml

from toolchain.errors import ConfigError
from toolchain.recipe import MAX_DISTILL_STEPS, MAX_EPOCHS, MAX_RUNS, MAX_THREADS, DEFAULT_RECIPE, EXAMPLE, load_recipe, validate


def test_example_is_the_default_recipe():
    assert validate(yaml.safe_load(EXAMPLE)) == DEFAULT_RECIPE
    assert load_recipe(None) == DEFAULT_RECIPE


def test_partial_recipe_merges_over_defaults():
    r = validate({"prune": {"sparsity": 0.5}, "quantize": {"bits": [2, 4, 8]}})
    assert r["prune"]["sparsity"] == 0.5 and r["prune"]["criterion"] == "relevance"
    assert r["quantize"]["bits"] == [2, 4, 8]


def test_all_problems_reported_at_once_with_key_paths():
    bad = {"prune": {"sparsity": 1.5, "granularity": "neuron", "colour": "red", "distill_steps": -5,
                     "channel_multiple": 0, "distill_temperature": 0},
           "quantize": {"bits": [], "budget": "avg-bits=-1", "qat_epochs": "3", "float_layers": "first"},
           "bench": {"target": "ftp://pi", "threads": [0]},
           "relevance": {"rule": "lrp.nope", "samples": True},
           "deploy": {}}
    with pytest.raises(ConfigError) as e:
        validate(bad)
    msg = str(e.value)
    for fragment in ["prune.sparsity: 1.5 is not a finite number in [0, 1)", "prune.granularity: 'neuron'",
                     "prune.colour: unknown key", "prune.distill_steps: -5", "prune.channel_multiple: 0",
                     "prune.distill_temperature: 0", "quantize.bits: []", "quantize.budget: 'avg-bits=-1'",
                     "quantize.qat_epochs: '3' is a str", "quantize.float_layers: 'first' is a str", "bench.target: 'ftp://pi'", "bench.threads: [0]",
                     "relevance.rule: 'lrp.nope'", "relevance.samples: True is a bool", "deploy: unknown stage"]:
        assert fragment in msg, fragment


def test_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("prune: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(broken))
    ok = tmp_path / "ok.yaml"
    ok.write_text("prune:\n  mode: nonpositive\n")
    assert load_recipe(str(ok))["prune"]["mode"] == "nonpositive"
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(str(listy))


def test_float_layers_need_a_mixed_artifact():
    # the default keeps the first layer in float in tflite-mixed; a recipe that exports no mixed
    # artifact simply gets none, but asking for float layers without one is an error
    assert validate({"export": {"formats": ["tflite-int8"]}})["quantize"]["float_layers"] == ["first"]
    with pytest.raises(ConfigError, match="quantize.float_layers: only the tflite-mixed"):
        validate({"quantize": {"float_layers": ["conv2d"]}, "export": {"formats": ["tflite-int8"]}})
    assert validate({"quantize": {"float_layers": []}})["quantize"]["float_layers"] == []


@pytest.mark.parametrize("text, fragment", [
    ("prune: {sparsity: .nan}\n", "prune.sparsity: nan"),
    ("verify: {min_agreement: .nan, max_accuracy_drop: .inf}\n", "verify.min_agreement: nan"),
    ("quantize: {budget: avg-bits=inf}\n", "quantize.budget: 'avg-bits=inf'"),
    ("quantize: {budget: avg-bits=nan}\n", "quantize.budget: 'avg-bits=nan'"),
    ("prune: {distill_steps: 1000000000000}\n", f"<= {MAX_DISTILL_STEPS}"),
    ("bench: {runs: 1000000000000}\n", f"<= {MAX_RUNS}"),
    ("bench: {threads: [100000]}\n", f"[1, {MAX_THREADS}]"),
    ("prune: {fine_tune_epochs: 99999999}\n", f"<= {MAX_EPOCHS}"),
    ("task: psychic\n", "task: 'psychic'"),
    ("a: &x [1, 2]\nb: *x\n", "anchor or alias"),
    ("[1, 2]\n", "must be a mapping"),
])
def test_hostile_or_unbounded_values_are_refused_at_load(tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(str(path))
    assert fragment in str(e.value), str(e.value)


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    with pytest.raises(ConfigError, match="anchor or alias"):
        load_recipe(str(path))


def test_non_utf8_and_deep_recipes_are_config_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfeprune: {}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(str(path))
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_recipe(str(path))


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        validate({"bench": {"target": "x" * 100_000}})
    assert len(str(e.value)) < 1000


def test_task_key():
    assert validate({})["task"] == "auto"
    assert validate({"task": "regression"})["task"] == "regression"
