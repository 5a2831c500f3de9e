"""Explanation fidelity and the HTML/Markdown report."""
import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from toolchain.fidelity import dequantized_copy, pearson_rows
from toolchain.quantize.bitplan import BitPlan, LayerBits
from toolchain.report import CAPTIONS, write_report


def test_pearson_rows_against_numpy():
    rng = np.random.RandomState(0)
    a, b = rng.randn(5, 4, 3), rng.randn(5, 4, 3)
    got = pearson_rows(a, b)
    want = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(pearson_rows(np.ones((1, 4)), b[:1].reshape(1, -1)[:, :4]))[0]
    np.testing.assert_allclose(pearson_rows(a, 2 * a + 1), 1.0)


def test_dequantized_copy_puts_weights_on_the_planned_grid():
    import tensorflow as tf

    inp = tf.keras.Input((6, 6, 1))
    h = tf.keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    h = tf.keras.layers.Flatten()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3, name="head")(h))
    plan = BitPlan({"conv": LayerBits(4, num_channels=4), "head": LayerBits(8, num_channels=3)})
    deq = dequantized_copy(model, plan)
    kernel = deq.get_layer("c_conv").get_weights()[0].reshape(-1, 4)
    for c in range(4):  # at most 2**4 - 1 distinct symmetric levels per output channel
        assert len(np.unique(np.round(kernel[:, c], 6))) <= 15
    x = np.random.RandomState(0).rand(4, 6, 6, 1).astype("float32")
    assert np.abs(deq.predict(x, verbose=0) - model.predict(x, verbose=0)).max() < 0.1


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


SUMMARY = {
    "model_name": "digits_cnn", "data": "digits", "headline": "tflite-mixed: 12,345 B at 97.1%",
    "artifacts": [{"name": "model_int8.tflite", "format": "tflite-int8", "accuracy": 0.971, "agreement": 0.99,
                   "size_bytes": 12345, "gzip_bytes": 10000, "p50_ms": 0.12, "p99_ms": 0.3, "peak_rss_mb": 80.0}],
    "relevance": {"rule": "lrp.epsilon", "samples": 500, "class_selection": "true",
                  "layers": {"conv1": {"class": "Conv2D", "sum": 1.0, "positive_share": 0.6, "zero_share": 0.0,
                                       "negative_share": 0.4}}},
    "fidelity": {"rule": "lrp.epsilon", "samples": 450, "mean_correlation": 0.91, "median_correlation": 0.93},
    "recipe": {"prune": {"sparsity": 0.25}}, "versions": {"tensorflow": "2.14.1"},
}


def test_report_embeds_plots_and_tables(tmp_path):
    _png(tmp_path / "relevance_layers.png")
    _png(tmp_path / "fidelity_heatmaps.png")
    paths = write_report(SUMMARY, tmp_path)
    page = paths["html"].read_text()
    md = paths["md"].read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='http" not in page and "<script" not in page  # self-contained
    for text in ("model_int8.tflite", "12,345", "97.10%", "0.910", "lrp.epsilon", "2.14.1"):
        assert text in page and text in md, text
    # figures carry captions that say what they show, not their file names
    assert f"![{CAPTIONS['relevance_layers.png']}](relevance_layers.png)" in md


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    _png(tmp_path / "relevance_layers.png")
    _png(tmp_path / "fidelity_heatmaps.png")
    page = write_report(SUMMARY, tmp_path)["html"]
    shot = tmp_path / "shot.png"
    # the page must render its embedded images: dump the DOM after layout and check every <img>
    # finished loading with a real size, then take a screenshot
    check = tmp_path / "check.html"
    check.write_text(page.read_text().replace(
        "</body>", "<script>window.onload=()=>{const bad=[...document.images].filter(i=>!i.complete||"
        "i.naturalWidth==0).length;document.title='IMAGES_OK_'+document.images.length+'_BAD_'+bad;}"
        "</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", check.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "<title>IMAGES_OK_2_BAD_0</title>" in dom.stdout, dom.stdout[:300] + dom.stderr[-500:]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a blank page is a few KB


def test_fidelity_of_an_autoencoder_explains_all_outputs(tmp_path, monkeypatch):
    """A dense autoencoder on 1-D samples: both models are explained over all outputs (no class),
    the same model correlates 1 with itself, and the plot draws 1-D samples as rows."""
    import tensorflow as tf

    from toolchain.fidelity import explanation_fidelity, plot_fidelity

    monkeypatch.setenv("TOOLCHAIN_CACHE_DIR", str(tmp_path / "cache"))
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((10,))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10)(tf.keras.layers.Dense(4, activation="relu")(inp)))
    x = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
    result = explanation_fidelity(model, model, x, x, quiet=True, task="autoencoder")
    assert result.summary()["class_selection"] == "all_outputs" and result.summary()["task"] == "autoencoder"
    np.testing.assert_allclose(result.correlations, 1.0, atol=1e-6)
    assert plot_fidelity(result, x, tmp_path / "f.png", class_names=[], y=x).stat().st_size > 0
