"""``bench`` and ``toolchain bench``: configurations, inputs, outputs, and the target registry."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deploy import TARGETS, BenchResult, bench, configurations, resolve_target
from deploy.targets import RunConfig
from deploy.targets.ssh import parse_ssh_url
from toolchain.cli import main as cli
from toolchain.errors import ConfigError

#: Keras, float TFLite and ONNX Runtime agree on every prediction of the tiny model
RUNS = 10


def test_target_registry_and_cli_strings():
    assert TARGETS.keys() == ["target.emulated_pi4", "target.emulated_pi5", "target.local",
                              "target.qemu_cortex_m4", "target.qemu_cortex_m7",
                              "target.ssh"]
    assert resolve_target("local").key == "target.local"
    assert resolve_target("emulated-pi5").board.qemu_cpu == "cortex-a76"
    assert resolve_target("emulated-pi4").board.qemu_cpu == "cortex-a72"
    t = resolve_target("ssh://pi@board.lan:2222", remote_python="/opt/py/bin/python")
    assert (t.key, t.user, t.host, t.port, t.spec) == ("target.ssh", "pi", "board.lan", 2222,
                                                        "ssh://pi@board.lan:2222")
    assert parse_ssh_url("ssh://MyPi") == (None, "MyPi", None)  # aliases keep their case
    for bad in ("pi4", "ssh", "emulated_pi4x", "ftp://x"):
        with pytest.raises(ConfigError, match="local; ssh://"):
            resolve_target(bad)
    for bad in ("ssh://-oProxyCommand=evil", "ssh://a b", "ssh://h:99999", "ssh://u:pw@h",
                "ssh://h/path"):
        with pytest.raises(ConfigError, match=r"ssh://\[user@\]host\[:port\]"):
            resolve_target(bad)


def test_configurations():
    assert configurations("tflite", (1, 2), (True, False)) == (
        RunConfig(1, True), RunConfig(2, True), RunConfig(1, False), RunConfig(2, False))
    assert configurations("tflite", (1,)) == (RunConfig(1, True),)
    assert configurations("onnx", (2, 1, 2)) == (RunConfig(2), RunConfig(1))
    with pytest.raises(ConfigError, match="applies to .tflite"):
        configurations("onnx", (1,), (False,))
    with pytest.raises(ConfigError, match="positive integers"):
        configurations("keras", (0,))
    assert RunConfig(2, False).label() == "2 threads, xnnpack off"


def test_same_harness_for_keras_tflite_and_onnx(artifacts):
    """All runtimes on the same inputs.npz: the same predictions, the same accuracy."""
    data = f"npz:{artifacts.data_npz}"
    results = {
        "keras": bench(artifacts.keras, data=data, runs=RUNS, include_outputs=True, quiet=True),
        "tflite": bench(artifacts.tflite_float, data=data, runs=RUNS, threads=(1, 2),
                        xnnpack=(True, False), include_outputs=True, quiet=True),
        "onnx": bench(artifacts.onnx, data=data, runs=RUNS, threads=(1, 2),
                      include_outputs=True, quiet=True),
    }
    assert [len(r.measurements) for r in results.values()] == [1, 4, 2]
    hashes = {r.data["inputs_sha256"] for r in results.values()}
    assert len(hashes) == 1, "every runtime must see the same inputs"
    expected = artifacts.keras_out.argmax(1)
    for kind, r in results.items():
        assert r.format == kind and r.data["samples"] == len(artifacts.y_eval)
        for m in r.measurements:
            pred = np.array(m.raw["outputs"]).argmax(1)
            assert (pred == expected).all(), f"{kind} {m.config.label()}"
            assert m.accuracy == pytest.approx(np.mean(expected == artifacts.y_eval))
            assert 0 < m.p50_ms <= m.p99_ms
    assert results["keras"].measurements[0].runtime == "keras"
    assert {m.config for m in results["tflite"].measurements} == {
        RunConfig(t, x) for t in (1, 2) for x in (True, False)}


def test_cli_writes_json_markdown_plot_and_int8_inputs(artifacts, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli(["bench", "--artifact", str(artifacts.tflite_int8), "--data",
              f"npz:{artifacts.data_npz}", "--target", "local", "--runs", str(RUNS),
              "--threads", "1", "--xnnpack", "on,off", "--out", str(out), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png",
                                                     "inputs.npz"]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == "toolchain.bench.v1" and doc["emulated"] is False
    assert doc["artifact"]["bytes"] == artifacts.tflite_int8.stat().st_size
    assert [c["xnnpack"] for c in doc["configurations"]] == [True, False]
    for c in doc["configurations"]:
        assert {"p50", "p99"} <= set(c["latency_ms"]) and c["target"] == "local"
    with np.load(out / "inputs.npz") as npz:
        assert npz["x"].dtype == np.int8, "int8 artifacts get int8 inputs"
        scale, zp = npz["x_quantization"]
        assert scale == pytest.approx(doc["configurations"][0]["input"]["quantization"][0])
        assert np.array_equal(npz["y"], artifacts.y_eval)
    md = (out / "bench.md").read_text()
    assert "| 1 thread, xnnpack on |" in md and "| 1 thread, xnnpack off |" in md
    assert BenchResult.from_json(doc).to_markdown() == md  # bench.json alone re-renders it
    assert "| 1 thread, xnnpack on |" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_leave_no_output(artifacts, tmp_path, capsys):
    out = tmp_path / "never"
    rc = cli(["bench", "--artifact", str(artifacts.onnx), "--xnnpack", "off", "--out", str(out)])
    assert rc == 2 and "--xnnpack applies to .tflite" in capsys.readouterr().err
    rc = cli(["bench", "--artifact", str(artifacts.keras), "--target", "emulated-pi4",
              "--out", str(out)])
    assert rc == 2 and "runs on the local target only" in capsys.readouterr().err
    rc = cli(["bench", "--artifact", str(tmp_path / "nope.tflite"), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli(["bench", "--artifact", str(artifacts.onnx), "--data", "digits", "--out", str(out),
              "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "model outputs 3" in err  # digits has 10 classes, the model 3
    assert not out.exists()


def test_local_peak_rss_is_the_runners_own(artifacts):
    """A runner forked from this (TensorFlow-sized) process reports its own peak, not ours."""
    from deploy.runner import peak_rss
    from deploy.targets import RunRequest

    ours, source = peak_rss()
    if source != "VmHWM" or ours < 300:
        pytest.skip(f"needs Linux /proc and a large parent process (ours: {ours} MiB, {source})")
    (r,) = resolve_target("local").run(RunRequest(artifacts.onnx, runs=2, warmup=0),
                                       [RunConfig(1)])
    assert r["peak_rss_source"] == "VmHWM"
    assert 0 < r["peak_rss_mib"] < ours / 2, (r["peak_rss_mib"], ours)


def test_image_folder_data_is_resized_to_the_artifact_input(tmp_path):
    """``images:DIR`` loads at the artifact's own input size (compress's bench stage passes the
    spec it gave compress: a 96x96 model was fed the folder's 32x32 images and refused)."""
    import tensorflow as tf

    from tests.data.test_data import _image_folder

    _image_folder(tmp_path / "pets")  # 6x5 RGB images in class folders
    inputs = tf.keras.Input((12, 10, 3))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, activation="softmax")(
        tf.keras.layers.Flatten()(inputs)))
    model.save(tmp_path / "m.keras")
    result = bench(tmp_path / "m.keras", target="local", data=f"images:{tmp_path / 'pets'}", runs=2,
                   quiet=True)
    assert result.data["samples"] == 4 and result.data["split"] == "eval"
