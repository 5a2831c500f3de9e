"""The SSH target against a real sshd started on 127.0.0.1 with throw-away keys and its own
configs; the "device" runs the runner on this machine's Python."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.targets import RunConfig, RunRequest, resolve_target
from tests.deploy import sshd
from toolchain.errors import TargetUnavailableError

pytestmark = pytest.mark.skipif(sshd.missing_tools() is not None,
                                reason=sshd.missing_tools() or "")
#: same runtime, same machine, same inputs: outputs must be bit-identical
RUNS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        srv = sshd.start(tmp_path_factory.mktemp("sshd"))
    except (RuntimeError, OSError) as e:
        pytest.skip(f"cannot start a test sshd here: {e}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def good_config(server):
    return server.client_config("good", server.known_hosts_line())


def _leftovers(server):
    # only the runner's directories: runtimes may keep their own files in TMPDIR
    # (onnxruntime writes a ".ses" session id there)
    return sorted(p.name for p in server.remote_tmp.glob("toolchain-bench.*"))


def _target(config, **kw):
    return resolve_target("ssh://benchbox", config_file=str(config),
                          remote_python=kw.pop("remote_python", sys.executable),
                          connect_timeout=5, **kw)


def _request(artifact, inputs=None, **kw):
    return RunRequest(Path(artifact), None if inputs is None else Path(inputs), runs=RUNS,
                      warmup=1, **kw)


def test_runs_over_ssh_with_alias_and_matches_local(server, good_config, artifacts):
    target = _target(good_config)
    configs = [RunConfig(1), RunConfig(2)]
    remote = target.run(_request(artifacts.onnx, artifacts.inputs_float, include_outputs=True),
                        configs)
    local = resolve_target("local").run(_request(artifacts.onnx, artifacts.inputs_float),
                                        configs[:1])
    assert [r["threads"] for r in remote] == [1, 2]
    for r in remote:
        assert r["target"] == "ssh://benchbox" and r["emulated"] is False
        assert r["artifact"] == artifacts.onnx.name
        assert r["outputs_sha256"] == local[0]["outputs_sha256"]
        assert r["accuracy"] == local[0]["accuracy"] and r["accuracy"] is not None
        assert "p50" in r["latency_ms"] and "p99" in r["latency_ms"]
    assert np.array(remote[0]["outputs"]).shape == artifacts.keras_out.shape
    assert _leftovers(server) == [], "the remote temp dir was not cleaned up"


def test_hostile_file_names_and_paths_are_quoted(server, good_config, artifacts, tmp_path):
    """Spaces, ';', quotes and $() in the artifact, input and interpreter paths reach no shell."""
    # if any name reached a shell, PWNED would appear in the remote TMPDIR
    payload = "cd $TMPDIR && touch PWNED"
    weird = tmp_path / f"my model; {payload}; $({payload}) 'x\".onnx"
    weird.write_bytes(artifacts.onnx.read_bytes())
    inputs = tmp_path / f"in puts;`{payload}`.npz"
    inputs.write_bytes(artifacts.inputs_float.read_bytes())
    py_dir = tmp_path / f"py dir; {payload}"
    py_dir.mkdir()
    (py_dir / "python 3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    os.chmod(py_dir / "python 3", 0o755)
    target = _target(good_config, remote_python=str(py_dir / "python 3"))
    (result,) = target.run(_request(weird, inputs), [RunConfig(1)])
    assert result["artifact"] == weird.name and result["accuracy"] is not None
    assert not (server.remote_tmp / "PWNED").exists()
    assert _leftovers(server) == []


def test_tflite_over_ssh(server, good_config, artifacts):
    (result,) = _target(good_config).run(_request(artifacts.tflite_int8, artifacts.inputs_float),
                                         [RunConfig(1, False)])
    assert result["format"] == "tflite" and result["xnnpack"] is False
    assert result["input"]["dtype"] == "int8"


def test_changed_host_key_is_refused(server, artifacts, tmp_path):
    other = sshd.keygen(tmp_path / "impostor")
    cfg = server.client_config("changed", server.known_hosts_line(other))
    with pytest.raises(TargetUnavailableError, match="does not match the one in known_hosts"):
        _target(cfg).run(_request(artifacts.onnx), [RunConfig(1)])


@pytest.mark.parametrize("strict", ["yes", "no", "accept-new"])
def test_unknown_host_key_is_refused_even_if_config_says_no(server, artifacts, strict):
    cfg = server.client_config(f"unknown-{strict}", "", strict=strict)
    with pytest.raises(TargetUnavailableError, match="not in known_hosts"):
        _target(cfg).run(_request(artifacts.onnx), [RunConfig(1)])
    # "no" / "accept-new" would have let ssh add the key silently: it must not be written
    assert (server.dir / f"unknown-{strict}.known_hosts").read_text() == ""


def test_unreachable_port_is_a_clear_error(server, artifacts):
    cfg = server.client_config("closed", server.known_hosts_line(), port=sshd.free_port())
    with pytest.raises(TargetUnavailableError, match="cannot connect.*Connection refused"):
        _target(cfg).run(_request(artifacts.onnx), [RunConfig(1)])


def test_missing_runtime_on_device_names_pip_install(server, good_config, artifacts, tmp_path):
    # -S: no site-packages, so this "device" Python has neither numpy nor a runtime
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    os.chmod(bare, 0o755)
    with pytest.raises(TargetUnavailableError, match=r"pip install 'numpy<2'") as e:
        _target(good_config, remote_python=str(bare)).run(_request(artifacts.onnx),
                                                           [RunConfig(1)])
    assert "ssh://benchbox" in str(e.value) and "the device" in str(e.value)
    with pytest.raises(TargetUnavailableError, match="was not found on the device"):
        _target(good_config, remote_python="/nonexistent/python3").run(
            _request(artifacts.onnx), [RunConfig(1)])
    assert _leftovers(server) == []


def test_run_timeout_stops_the_remote_runner(server, good_config, artifacts):
    request = RunRequest(artifacts.onnx, None, runs=10_000_000, warmup=0, timeout_s=3)
    with pytest.raises(TargetUnavailableError, match="no result within 3 s"):
        _target(good_config).run(request, [RunConfig(1)])
    assert _leftovers(server) == []
