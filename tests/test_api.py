"""The Python API: docs/api.md's example runs as written, on an in-memory model and numpy arrays."""
import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_docs_example_runs_and_leaves_the_callers_objects_alone(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    result = scope["result"]
    assert result.out_dir == Path("build/notebook") and (tmp_path / "build/notebook/report.html").is_file()
    int8 = result.artifacts["tflite-int8"]
    assert int8.is_file() and int8.suffix == ".tflite"
    assert result.summary["original"]["accuracy"] > 0.8
    assert "x smaller" in result.headline
    # the caller's model is still the original (not pruned in place): same size, and it scores exactly
    # the accuracy the pipeline measured for the original; the caller's arrays keep their values
    model, x_test, y_test = scope["model"], scope["x_test"], scope["y_test"]
    assert model.count_params() == 16 * 9 + 16 + 6 * 6 * 16 * 10 + 10
    accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert accuracy == result.summary["original"]["accuracy"]
    assert np.array_equal(scope["x"].max(), 1.0) and scope["x_train"].flags.writeable


def test_library_callers_cannot_write_over_their_inputs(tmp_path):
    """The output checks hold for Python callers too, not only for the CLI."""
    import pytest

    from toolchain.compress import run_compress
    from toolchain.errors import ConfigError

    model = tmp_path / "models" / "m.keras"
    model.parent.mkdir()
    model.write_bytes(b"not read: the output check comes first")
    with pytest.raises(ConfigError):
        run_compress(str(model), "digits", str(tmp_path / "models"))
    assert model.read_bytes() == b"not read: the output check comes first"
