"""Export and verification do not import each other's internals: both run artifacts through
``toolchain.run`` (the device runner's backends). Checked two ways: statically, every import
statement in the packages (function-level ones included), and in fresh interpreters, what
importing a package and running an artifact actually loads. No TensorFlow is imported (~2 s)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: seconds a fresh interpreter may take to import numpy, onnxruntime and the toolchain modules
CHILD_TIMEOUT_S = 120


def _imports_of(path: Path):
    """(file, imported module, imported names) for every absolute import statement in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield path.relative_to(ROOT), alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield path.relative_to(ROOT), node.module, tuple(a.name for a in node.names)


def _imports(package: str):
    """Every import statement of every module under ``package``, function-level ones included."""
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        yield from _imports_of(path)


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_verify_imports_nothing_from_export():
    bad = [f"{f}: {m}" for f, m, names in _imports("toolchain.verify")
           if _is_under(m, "toolchain.export")
           or (m == "toolchain" and "export" in names)]
    assert not bad, "toolchain.verify imports export: " + ", ".join(bad)


def test_export_imports_only_verifys_public_names():
    import toolchain.verify as verify

    public = set(verify.__all__)
    bad = []
    for f, m, names in _imports("toolchain.export"):
        if _is_under(m, "toolchain.verify"):
            if m != "toolchain.verify":
                bad.append(f"{f}: {m}")
            bad += [f"{f}: {m}.{n}" for n in names if n not in public]
        elif m == "toolchain" and "verify" in names:
            bad.append(f"{f}: toolchain.verify as a module")
    assert not bad, "toolchain.export reaches into verify's internals: " + ", ".join(bad)


def test_the_runner_imports_nothing_from_the_toolchain():
    """deploy/runner.py is copied to a device on its own."""
    bad = [m for _, m, _ in _imports_of(ROOT / "deploy" / "runner.py")
           if _is_under(m, "toolchain") or _is_under(m, "deploy")]
    assert not bad, bad


def _loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; which packages of interest it loaded."""
    probe = (code + "\nimport json, sys\nprint(json.dumps({p: any(m == p or m.startswith(p + '.') "
             "for m in sys.modules) for p in ('toolchain.export', 'toolchain.verify', "
             "'tensorflow')}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package, absent", [
    ("toolchain.verify", "toolchain.export"),
    ("toolchain.export", "toolchain.verify"),
    ("toolchain.run", "toolchain.export"),
    ("toolchain.run", "toolchain.verify"),
])
def test_importing_a_package_does_not_load_the_other(package, absent):
    loaded = _loaded_after(f"import {package}")
    assert not loaded[absent], f"import {package} loaded {absent}"


def test_verification_runs_an_artifact_without_export_or_tensorflow(tmp_path):
    """verify's runtime on a real ONNX file (uint8 I/O, quantized and dequantized with the graph's
    own Q/DQ grid) loads neither the export package nor TensorFlow."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["xf"]),
         helper.make_node("Relu", ["xf"], ["r"]),
         helper.make_node("QuantizeLinear", ["r", "s_out", "z_out"], ["y"])],
        "io", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, 3])],
        [helper.make_tensor("s_in", TensorProto.FLOAT, [], [0.5]),
         helper.make_tensor("z_in", TensorProto.UINT8, [], [10]),
         helper.make_tensor("s_out", TensorProto.FLOAT, [], [0.25]),
         helper.make_tensor("z_out", TensorProto.UINT8, [], [0])])
    path = tmp_path / "io.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code = f"""
import types, numpy as np
from toolchain.verify import runtime_for
art = types.SimpleNamespace(format="onnx-int8", path={str(path)!r})
got = runtime_for(art)(np.array([[-2.0, 0.0, 3.0], [1.5, -5.0, 10.0]], np.float32))
assert got.dtype == np.float32 and got.tolist() == [[0.0, 0.0, 3.0], [1.5, 0.0, 10.0]], got
"""
    loaded = _loaded_after(code)
    assert loaded == {"toolchain.export": False, "toolchain.verify": True, "tensorflow": False}
