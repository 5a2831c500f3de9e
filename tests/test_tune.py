"""`toolchain tune`: constraints, the search space, the front, and real searches on digits.

The searches (Ray started by the command, and a two-worker local Ray cluster started by the test)
run real `compress` trials and take minutes on a shared 2-core machine: they are marked slow."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolchain.cli import main
from toolchain.errors import ConfigError
from toolchain.tune.constraints import parse_constraints

REPO = Path(__file__).resolve().parents[1]
#: a trial's recipe that runs in tens of seconds on an idle machine: few relevance samples, two
#: fine-tuning epochs on the labelled digits instead of distillation, TFLite only, a short benchmark
FAST_RECIPE = {"relevance": {"samples": 100}, "prune": {"distill_steps": 0, "fine_tune_epochs": 2, "criterion": "relevance"},
               "quantize": {"allocator": "relevance"},
               "export": {"formats": ["tflite-fp32", "tflite-int8", "tflite-mixed"]}, "bench": {"runs": 20}}
#: the digits CNN's headline TFLite is ~22 kB at the default sparsity 0.5 and int8 (the first trial),
#: ~66 kB barely pruned: a limit some recipes meet and others break
FLASH_LIMIT = "flash<=24KB"


def test_constraints_parse_with_units():
    got = {c.name: c.limit for c in parse_constraints(["flash<=32KB", "latency<=500us", "drop<=1"])}
    assert got == {"flash": 32_000, "latency": 0.5, "drop": 1.0}
    assert parse_constraints(["flash <= 32KiB"])[0].limit == 32 * 1024
    assert parse_constraints(["instructions<=8M"], target="qemu-cortex-m4")[0].limit == 8e6
    assert parse_constraints(["ram<=20KB"], formats=["mcu"])[0].limit == 20_000


def test_bad_constraints_are_one_error_naming_each_offender(tmp_path, capsys):
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    code = main(["tune", "--model", str(model), "--data", "digits", "--constraint", "flash<=32XB",
                 "--constraint", "speed<=3", "--constraint", "latency<=5", "--constraint", "flash>=1",
                 "--constraint", "instructions<=8M", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: bad --constraint")
    for part in ("'flash<=32XB' has unit 'xb'", "'speed<=3' limits 'speed'", "latency takes us, ms, s",
                 "'flash>=1' is not NAME<=VALUE", "instruction counts come from qemu-cortex-m4"):
        assert part in err, (part, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("texts,target,message", [
    (["latency<=5ms"], "qemu-cortex-m4", "EMULATED INSTRUCTION COUNTS"),
    (["ram<=20KB"], "local", "add mcu to the recipe's export.formats"),
    (["flash<=1KB", "flash<=2KB"], "local", "a second time"),
    (["flash<=0"], "local", "not a positive limit"),
])
def test_constraints_refused_with_the_fix(texts, target, message):
    with pytest.raises(ConfigError, match=message):
        parse_constraints(texts, target=target)


def test_tune_help_and_errors_do_not_import_ray_or_tensorflow(tmp_path):
    code = ("import sys; from toolchain.cli import main; main(['tune', '--help']) if False else None;"
            f"rc = main(['tune', '--model', {str(tmp_path / 'm.keras')!r}, '--data', 'digits', "
            "'--constraint', 'nope<=1']); "
            "print(rc, 'ray' in sys.modules, 'tensorflow' in sys.modules)")
    (tmp_path / "m.keras").write_bytes(b"x")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr


def test_an_existing_tune_needs_resume_and_resume_needs_one(tmp_path):
    from toolchain.tune.search import tune

    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match="has no experiment/ folder"):
        tune(str(model), "digits", out=str(tmp_path / "new"), resume=True)
    (tmp_path / "old" / "experiment").mkdir(parents=True)
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        tune(str(model), "digits", out=str(tmp_path / "old"))


def test_search_space_holds_the_recipes_keys_fixed_and_decodes_to_valid_recipes():
    from ray.tune.search.sample import Domain

    from toolchain.recipe import validate
    from toolchain.tune.space import recipe_for, search_space

    raw = {"prune": {"sparsity": 0.3}, "quantize": {"bits": [4, 8]}}
    base = validate(raw)
    space, start = search_space(base, raw, "local")
    assert "prune.sparsity" not in space and "quantize.bits" not in space
    assert {"prune.granularity", "quantize.allocator", "quantize.budget", "quantize.float_layers"} <= set(space)
    assert all(isinstance(d, Domain) for d in space.values())
    assert start["quantize.budget"] == 8.0 and start["quantize.float_layers"] == "first"
    for config in (start, {**start, "quantize.budget": 4.5, "quantize.float_layers": "none",
                           "prune.channel_multiple": 8}):
        recipe = recipe_for(raw, config, "emulated-pi4")
        merged = validate(yaml.safe_load(yaml.safe_dump(recipe)))  # what best.yaml holds, read back
        assert merged["prune"]["sparsity"] == 0.3 and merged["quantize"]["bits"] == [4, 8]
        assert merged["bench"]["target"] == "emulated-pi4"
    assert merged["quantize"]["budget"] == "avg-bits=4.5" and merged["quantize"]["float_layers"] == []
    assert merged["prune"]["channel_multiple"] == 8
    # a drop constraint is the guard of every trial and of best.yaml alike (it also sets the
    # pruning backoff's limit, so a trial under another guard would prune differently)
    guarded = validate(recipe_for(raw, start, "local", drop_points=1.5))
    assert guarded["verify"]["max_accuracy_drop"] == 0.015 and guarded["verify"]["max_auc_drop"] == 0.015
    assert validate(recipe_for(raw, start, "local"))["verify"] == validate({})["verify"]


def test_trial_recipes_are_feasible_and_prune_at_the_sampled_sparsity():
    """A budget sampled below the trial's narrowest width (avg-bits=3 with bits [8]: three of 12
    trials of a digits search failed in the allocator so) is clamped to what the widths can spend,
    and a searched sparsity is not swapped by compress's backoff for a lower one."""
    from toolchain.recipe import validate
    from toolchain.tune.space import recipe_for

    def run(raw, config):
        return validate(yaml.safe_load(yaml.safe_dump(recipe_for(raw, config, "local"))))

    eight = run({}, {"quantize.bits": "8", "quantize.budget": 3.0, "prune.sparsity": 0.5})
    assert eight["quantize"]["budget"] == "avg-bits=8" and eight["prune"]["backoff_sparsities"] == []
    assert run({}, {"quantize.bits": "2,4,8", "quantize.budget": 3.0})["quantize"]["budget"] == "avg-bits=3"
    assert run({}, {"quantize.bits": "4,6,8", "quantize.budget": 3.0})["quantize"]["budget"] == "avg-bits=4"
    # bits not searched: the default's widths ([8]) bound the budget
    assert run({}, {"quantize.budget": 5.5})["quantize"]["budget"] == "avg-bits=8"
    # the sparsity not searched, or the user's own backoff: compress's backoff stays as given
    assert run({}, {"quantize.budget": 8.0})["prune"]["backoff_sparsities"] == [0.3, 0.15, 0.0]
    assert run({"prune": {"backoff_sparsities": [0.2]}}, {"prune.sparsity": 0.6})["prune"]["backoff_sparsities"] == [0.2]


def test_a_flash_limit_adds_the_small_model_plan_as_a_starting_point():
    from toolchain.recipe import validate
    from toolchain.tune.space import recipe_for, search_space, starting_points

    raw = {}
    space, start = search_space(validate(raw), raw, "local")
    assert starting_points(space, start, limits_flash=False) == [start]
    first, small = starting_points(space, start, limits_flash=True)
    assert first == start
    recipe = validate(yaml.safe_load(yaml.safe_dump(recipe_for(raw, small, "local"))))
    assert recipe["quantize"]["bits"] == [4, 8] and recipe["quantize"]["budget"] == "avg-bits=4"
    assert recipe["quantize"]["float_layers"] == [] and recipe["quantize"]["allocator"] == "relevance"
    assert recipe["prune"] == validate(yaml.safe_load(yaml.safe_dump(recipe_for(raw, start, "local"))))["prune"]
    # keys the user fixed stay fixed
    fixed = {"quantize": {"bits": [8]}}
    space, start = search_space(validate(fixed), fixed, "local")
    assert all(p.get("quantize.bits") is None for p in starting_points(space, start, limits_flash=True))


def test_pareto_front_and_scores():
    from toolchain.tune.front import pareto_front
    from toolchain.tune.trial import FAILED_SCORE, INFEASIBLE_SCORE, score

    def t(i, size, drop, lat):
        return {"trial_id": str(i), "numbers": {"flash_bytes": size, "drop_points": drop, "latency_ms": lat,
                                                "original_fp32_bytes": 100_000}}
    trials = [t(1, 10_000, 2.0, 1.0), t(2, 20_000, 0.5, 1.0), t(3, 20_000, 2.5, 1.2), t(4, 9_000, 2.0, 2.0)]
    assert [x["trial_id"] for x in pareto_front(trials, ["flash_bytes", "drop_points", "latency_ms"])] == ["4", "1", "2"]
    assert [x["trial_id"] for x in pareto_front(trials, ["flash_bytes", "drop_points"])] == ["4", "2"]
    cons = [c.to_dict() for c in parse_constraints(["flash<=15KB", "drop<=1"])]
    s1, v1 = score(trials[0]["numbers"], cons, "metric")
    s2, v2 = score(trials[1]["numbers"], cons, "metric")
    assert v1 == ["drop<=1"] and v2 == ["flash<=15KB"] and s1 > INFEASIBLE_SCORE and s2 > INFEASIBLE_SCORE
    ok, none = score({**trials[1]["numbers"], "flash_bytes": 12_000}, cons, "size")
    assert none == [] and ok == pytest.approx(0.12) and ok < INFEASIBLE_SCORE < FAILED_SCORE


# -- real searches -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from models import train_model
    from toolchain.data import load_dataset

    path = tmp_path_factory.mktemp("model") / "digits.keras"
    train_model("digits_cnn", load_dataset("digits"), 4, path, verbose=0)
    return path


def _fast_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST_RECIPE))
    return path


@pytest.mark.slow
def test_tune_finds_a_recipe_meeting_flash_and_compress_reproduces_it(digits_model, tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--model", str(digits_model), "--data", "digits", "--recipe", str(_fast_recipe(tmp_path)),
                 "--constraint", FLASH_LIMIT, "--trials", "2", "--workers", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("[tune] trial ") == 2 and "min left" in err
    doc = json.loads((out / "tune.json").read_text())
    trials = {t["trial_id"]: t for t in json.loads((out / "trials.json").read_text())}
    assert len(trials) == 2 and doc["best"] in trials and "re-measured serially" in doc["latency"]
    best = trials[doc["best"]]
    assert best["feasible"] and best["numbers"]["flash_bytes"] <= 24_000
    assert best["numbers"]["latency_serial_ms"] > 0
    assert (out / "front.png").stat().st_size > 0 and "## Pareto front" in (out / "front.md").read_text()

    # best.yaml, as is, through compress: the same artifact size and accuracy as the trial
    code = main(["compress", "--model", str(digits_model), "--data", "digits", "--recipe", str(out / "best.yaml"),
                 "--out", str(tmp_path / "again"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    head = next(r for r in summary["artifacts"] if r["format"] == summary["headline_format"] and r["origin"] == "compressed")
    assert head["size_bytes"] == best["numbers"]["flash_bytes"]
    assert head["accuracy"] == pytest.approx(best["numbers"]["value"], abs=1e-9)

    # a finished search resumes to the same result without new trials
    code = main(["tune", "--model", str(digits_model), "--data", "digits", "--recipe", str(_fast_recipe(tmp_path)),
                 "--constraint", FLASH_LIMIT, "--trials", "2", "--out", str(out), "--resume", "--quiet"])
    assert code == 0
    assert json.loads((out / "tune.json").read_text())["best"] == doc["best"]


@pytest.mark.slow
def test_tune_on_a_local_ray_cluster_of_two_worker_processes(digits_model, tmp_path, capsys):
    from toolchain.tune.cluster import local_ray_cluster, ray_cli

    if ray_cli() is None:
        pytest.skip("the ray CLI is not installed beside this Python (pip install -r requirements.txt)")
    with local_ray_cluster(num_cpus=2) as address:
        out = tmp_path / "tune"
        code = main(["tune", "--model", str(digits_model), "--data", "digits", "--recipe",
                     str(_fast_recipe(tmp_path)), "--constraint", FLASH_LIMIT, "--trials", "2",
                     "--address", address, "--out", str(out)])
        assert code in (0, 3), capsys.readouterr().err
    doc = json.loads((out / "tune.json").read_text())
    assert doc["ray"] == address and doc["concurrent_trials"] == 2
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 2 and all(t["numbers"]["flash_bytes"] > 0 for t in trials)


def test_local_ray_cluster_without_the_ray_cli_names_the_fix(monkeypatch):
    from toolchain.errors import TargetUnavailableError
    from toolchain.tune import cluster

    monkeypatch.setattr(cluster, "ray_cli", lambda: None)
    with pytest.raises(TargetUnavailableError, match="pip install -r requirements.txt"):
        with cluster.local_ray_cluster():
            pytest.fail("the cluster block ran without a ray command")


def _tune_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import tune as bench

    return bench


def test_ds_cnn_limits_are_one_point_below_the_official_int8_and_its_recipes_are_valid():
    """benchmarks/tune.py --parts ds_cnn: the tuner's drop (against the original float model) is 1
    point plus the official int8's own gap to the original; its constraints parse on the firmware
    target and both starting points are recipes compress takes."""
    from toolchain.recipe import validate
    from toolchain.tune.space import recipe_for, search_space, starting_points

    bench = _tune_benchmark()
    texts = bench.ds_cnn_constraints({"original": 0.914, "official_int8": 0.906})
    assert texts == ["flash<=27000B", "drop<=1.8"]
    assert bench.ds_cnn_constraints({"original": 0.90, "official_int8": 0.90})[1] == "drop<=1"
    cons = {c.name: c.limit for c in parse_constraints(texts, bench.DS_CNN_TARGET,
                                                          bench.DS_CNN_RECIPE["export"]["formats"])}
    assert cons == {"flash": 27_000, "drop": 1.8}
    raw = {**bench.DS_CNN_RECIPE, "bench": {**bench.DS_CNN_RECIPE["bench"], "target": bench.DS_CNN_TARGET}}
    base = validate(raw, "ds_cnn base recipe")
    space, start = search_space(base, raw, bench.DS_CNN_TARGET)
    # the MCU default's fixed keys stay fixed: no float layer (TFLM), CMSIS-NN kernels, 3,000 steps
    assert not {"quantize.float_layers", "bench.kernels", "prune.distill_steps"} & set(space)
    points = starting_points(space, start, limits_flash=True)
    assert len(points) == 2
    for point in points:
        recipe = validate(recipe_for(raw, point, bench.DS_CNN_TARGET, cons["drop"]), "trial recipe")
        assert recipe["verify"]["max_accuracy_drop"] == pytest.approx(0.018)
        assert recipe["quantize"]["qat_epochs"] == 3 and recipe["export"]["mcu_source"] == "tflite-mixed"


def test_best_vs_default_names_better_worse_or_equal_per_target_and_metric():
    bench = _tune_benchmark()
    if not bench.DEFAULT_FIRMWARE.is_file():
        pytest.skip(f"{bench.DEFAULT_FIRMWARE} (the default's recorded numbers) is missing")
    default = bench.default_numbers()
    m4 = default["qemu-cortex-m4"]["ours"]
    assert default["local"]["model_bytes"] == m4["model_flash_bytes"] and 0.5 < default["local"]["host_accuracy"] <= 1
    fw = {**m4, "model_flash_bytes": m4["model_flash_bytes"] - 1,
          "emulated_instructions_per_inference": m4["emulated_instructions_per_inference"] + 1}
    part = {"default": default, "references": {"official_int8": 0.906, "official_int8_bytes": 53_936},
            "compare": {"qemu-cortex-m4": {"firmware": fw, "official_firmware": default["qemu-cortex-m4"]["official"],
                                           "samples": 500},
                        "qemu-cortex-m7": {"target": "qemu-cortex-m7", "error": "ConversionError: x"},
                        "local": {"model_bytes": default["local"]["model_bytes"],
                                  "host_accuracy": default["local"]["host_accuracy"] - 0.002}}}
    got = {(r[0], r[1].split(" (")[0]): r[5] for r in bench.comparison_rows(part)}
    assert got == {("qemu-cortex-m4", "model bytes in flash"): "better",
                   ("qemu-cortex-m4", "EMULATED instructions / inference"): "worse",
                   ("qemu-cortex-m4", "RAM"): "equal", ("qemu-cortex-m4", "firmware accuracy"): "equal",
                   ("qemu-cortex-m7", "compress --recipe best.yaml"): "not measured",
                   ("local", "model bytes"): "equal", ("local", "host TFLite accuracy"): "worse"}
