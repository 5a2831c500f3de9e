"""Bad input through the CLI: for each case exit code != 0, one clear error line naming the problem,
no traceback (unless --debug), nothing partial in the output directory, input files unchanged."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from toolchain.cli import main
from toolchain.model_io import file_sha256


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = tf.keras.layers.Flatten()(h)
    good = tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax", name="head")(h))
    good.save(d / "good.keras")
    good.save(d / "good.h5")

    (d / "corrupt.h5").write_bytes(os.urandom(2048))
    (d / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(good).convert())

    lam = tf.keras.layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    lam = tf.keras.layers.Flatten()(lam)
    tf.keras.Model(inp, tf.keras.layers.Dense(10)(lam)).save(d / "lambda.h5")

    h2 = tf.keras.layers.Conv2D(4, 3, name="conv")(inp)
    h2 = tf.keras.layers.LayerNormalization(name="layer_norm")(h2)
    h2 = tf.keras.layers.Flatten()(h2)
    tf.keras.Model(inp, tf.keras.layers.Dense(10)(h2)).save(d / "unsupported.keras")

    class Sub(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.d = tf.keras.layers.Dense(10)

        def call(self, x):
            return self.d(tf.reshape(x, (-1, 64)))

    sub = Sub()
    sub(np.zeros((1, 8, 8, 1), "float32"))
    sub.save(d / "subclassed_savedmodel")

    inp3 = tf.keras.Input((8, 8, 1))
    few = tf.keras.Model(inp3, tf.keras.layers.Dense(3)(tf.keras.layers.Flatten()(inp3)))
    few.save(d / "three_classes.keras")

    rng = np.random.RandomState(0)
    x = rng.rand(20, 8, 8, 1).astype("float32")
    np.savez(d / "labels_out_of_range.npz", x=x, y=np.full(20, 42))
    xn = x.copy()
    xn[3, 2, 2, 0] = np.nan
    np.savez(d / "nan.npz", x=xn, y=np.zeros(20, int))
    np.savez(d / "empty.npz", x=x[:0], y=np.zeros(0, int))
    np.savez(d / "wrong_shape.npz", x=rng.rand(20, 9, 9, 1).astype("float32"), y=np.zeros(20, int))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "a_file").write_text("I am a file")
    (d / "bad_recipe.yaml").write_text("prune: {sparsity: 1.5, colour: red}\nquantize: {bits: []}\n")
    (d / "broken_recipe.yaml").write_text("prune: [unclosed\n")
    (d / "float_recipe.yaml").write_text("quantize: {float_layers: [no_such_conv]}\n")
    (d / "bitplan.json").write_text('{"version": 1, "layers": {"no_such_layer": {"weight_bits": 4}}}')
    ro = d / "read_only"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    immutable = False
    if os.geteuid() == 0:  # root ignores permissions; the immutable attribute binds root too
        immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(ro)])


def _snapshot(d: Path):
    return {p.name: (file_sha256(p) if p.exists() else None) for p in d.iterdir()
            if p.name not in ("read_only",)}


PROGRESS_LINE = re.compile(r"\d+%\|")

CASES = {
    # name: (argv with {d} for the fixture dir and {out} for a fresh output dir, expected fragment)
    "missing model": ("relevance --model {d}/nope.keras --data digits --out {out}", "does not exist"),
    "corrupt h5": ("relevance --model {d}/corrupt.h5 --data digits --out {out}", "corrupt.h5"),
    "tflite as model": ("relevance --model {d}/model.tflite --data digits --out {out}", ".tflite"),
    "subclassed model": ("relevance --model {d}/subclassed_savedmodel --data digits --out {out}", "Functional"),
    "lambda without trust": ("relevance --model {d}/lambda.h5 --data digits --out {out}", "--trust-model"),
    "unsupported layer": ("relevance --model {d}/unsupported.keras --data digits --out {out}",
                          "layer_norm (LayerNormalization)"),
    "data shape mismatch": ("relevance --model {d}/good.keras --data npz:{d}/wrong_shape.npz --out {out}", "(9, 9, 1)"),
    "class count mismatch": ("relevance --model {d}/three_classes.keras --data digits --out {out}", "3"),
    "labels out of range": ("relevance --model {d}/good.keras --data npz:{d}/labels_out_of_range.npz --out {out}", "42"),
    "nan inputs": ("relevance --model {d}/good.keras --data npz:{d}/nan.npz --out {out}", "NaN"),
    "empty dataset": ("relevance --model {d}/good.keras --data npz:{d}/empty.npz --out {out}", "empty"),
    "corrupt npz": ("relevance --model {d}/good.keras --data npz:{d}/corrupt.npz --out {out}", "corrupt.npz"),
    "unknown data spec": ("relevance --model {d}/good.keras --data imagenet --out {out}", "imagenet"),
    "uncached keras dataset": ("relevance --model {d}/good.keras --data mnist --data-dir {d} --out {out}", "mnist.npz"),
    "missing kws01 folder": ("relevance --model {d}/good.keras --data kws01:{d}/no_such_dir --out {out}", "no_such_dir"),
    "unknown rule": ("relevance --model {d}/good.keras --data digits --rule lrp.magic --out {out}", "lrp.magic"),
    "output is a file": ("relevance --model {d}/good.keras --data digits --out {d}/a_file", "is a file"),
    "read-only output": ("relevance --model {d}/good.keras --data digits --out {d}/read_only/sub", "not writable"),
    "output parent is a file": ("relevance --model {d}/good.keras --data digits --out {d}/a_file/sub", "not writable"),
    "too many samples": ("relevance --model {d}/good.keras --data digits --samples 999999 --out {out}", "999999"),
    "invalid recipe values": ("compress --model {d}/good.keras --data digits --recipe {d}/bad_recipe.yaml --out {out}",
                              "prune.sparsity: 1.5"),
    "recipe not yaml": ("compress --model {d}/good.keras --data digits --recipe {d}/broken_recipe.yaml --out {out}",
                        "not valid YAML"),
    "unknown float layer": ("compress --model {d}/good.keras --data digits --recipe {d}/float_recipe.yaml "
                            "--out {out}", "no_such_conv"),
    "missing recipe": ("compress --model {d}/good.keras --data digits --recipe {d}/nope.yaml --out {out}",
                       "does not exist"),
    "bad compress target": ("compress --model {d}/good.keras --data digits --target ftp://pi --out {out}", "ftp://pi"),
    "compress output is a file": ("compress --model {d}/good.keras --data digits --out {d}/a_file", "is a file"),
    "budget too small": ("quantize --model {d}/good.keras --data digits --allocator uniform --bits 4 "
                         "--budget size-kb=0.01 --out {out}", "budget"),
    "unknown allocator": ("quantize --model {d}/good.keras --data digits --allocator psychic --bits 4 --out {out}",
                          "psychic"),
    "unknown export format": ("export --model {d}/good.keras --data digits --formats tflite-int3 --out {out}",
                              "tflite-int3"),
    "bit plan for another model": ("export --model {d}/good.keras --data digits --bitplan {d}/bitplan.json "
                                   "--formats tflite-mixed --out {out}", "no_such_layer"),
    "sparsity out of range": ("prune --model {d}/good.keras --data digits --criterion magnitude --sparsity 1.2 "
                              "--out {out}", "1.2"),
    "unknown prune criterion": ("prune --model {d}/good.keras --data digits --criterion vibes --sparsity 0.5 "
                                "--out {out}", "vibes"),
    "unreachable ssh host": ("bench --artifact {d}/model.tflite --target ssh://nobody@127.0.0.1:1 --runs 5 "
                             "--out {out}", "127.0.0.1"),
    "bench missing artifact": ("bench --artifact {d}/nope.tflite --out {out}", "nope.tflite"),
    "unknown architecture": ("train --arch resnet1000 --data digits --epochs 1 --out {out}.keras", "resnet1000"),
    "bad train output suffix": ("train --arch digits_cnn --data digits --epochs 1 --out {out}.txt", ".txt"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_clear_error(name, files, tmp_path, capsys):
    if name == "read-only output" and os.access(files / "read_only", os.W_OK):
        pytest.skip("cannot make a read-only directory here (root without chattr +i)")
    argv, fragment = CASES[name]
    out = tmp_path / "out"
    before = _snapshot(files)
    code = main(argv.format(d=files, out=out).split())
    lines = capsys.readouterr().err.strip().splitlines()
    err = [l for l in lines if not PROGRESS_LINE.search(l)]  # progress bars may precede the error
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0], err[0]
    assert not any("Traceback" in l for l in lines)
    assert not out.exists() or not any(out.iterdir()), f"partial output left: {list(out.iterdir())}"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert _snapshot(files) == before, "input files changed"


def test_debug_shows_the_traceback(files, tmp_path):
    with pytest.raises(Exception) as e:
        main(f"relevance --model {files}/nope.keras --data digits --out {tmp_path}/o --debug".split())
    assert "does not exist" in str(e.value)


def test_real_process_prints_one_line_and_exit_code_2(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "relevance", "--model", str(files / "corrupt.h5"),
                           "--data", "digits", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
