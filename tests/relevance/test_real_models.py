"""iNNvestigate 2.1.2 quirks the engine works around, each pinned, and the engine on the real
MLPerf Tiny models (DS-CNN on kws01, ResNet-8)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain.relevance import compute_relevance

#: per-layer sum of per-weight relevance vs the relevance iNNvestigate passes to the layer input
LAYER_SUM_RTOL = 1e-3


@pytest.fixture(scope="module")
def probe():
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("innvestigate_probe.py"))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quirk_model_checks_refuse_depthwise_and_relu(probe):
    """Why the engine passes disable_model_checks=True and checks SUPPORTED_LAYERS itself.
    If this fails, iNNvestigate fixed its checks: the workaround can go."""
    assert probe["checks_refuse_depthwise"] and probe["checks_refuse_relu_layer"]


def test_quirk_reversed_tensors_crash_in_index_mode(probe):
    """Why the engine records per-layer relevance with wrapped rules instead of
    reverse_keep_tensors/_reversed_tensors."""
    assert probe["keep_tensors_index_mode_crashes"], probe


def _assert_layer_sums(rmap):
    for name, lr in rmap.layers.items():
        total = float(lr.weight.sum(dtype=np.float64))
        assert np.isfinite(lr.weight).all(), name
        assert abs(total - lr.relevance_in) <= LAYER_SUM_RTOL * max(abs(lr.relevance_in), 1.0), \
            f"{name}: per-weight sum {total:.6g} != relevance passed on {lr.relevance_in:.6g}"


def test_real_ds_cnn_relevance_is_conserved_and_logit_initialised(kws_model, kws01):
    """Folded BN keeps relevance bounded: the head receives exactly the explained logits
    (unfolded, iNNvestigate's BN rule blows up to 1e8+ on such nets)."""
    from toolchain.canonicalize import canonicalize

    x, y = kws01.calibration(100)
    rmap = compute_relevance(kws_model, x, y, rule="lrp.epsilon", quiet=True)
    _assert_layer_sums(rmap)
    logits = canonicalize(kws_model, strip_softmax=True).model.predict(x, verbose=0)
    want = float(logits[np.arange(len(y)), y].sum())
    assert abs(rmap["dense"].relevance_out - want) <= 1e-3 * abs(want)
    # epsilon LRP approximately conserves relevance from the logits down to the first layer
    assert 0.2 * want < rmap["conv2d"].relevance_in < 2 * want
    assert rmap["conv2d"].weight.shape == kws_model.get_layer("conv2d").get_weights()[0].shape


def test_real_resnet8_relevance_despite_name_clashes(resnet8_model):
    """ResNet-8's layers are named add, add_1...; iNNvestigate's own helper layers would clash
    with them unless the canonical copy renames every layer."""
    x = np.random.RandomState(0).rand(16, 32, 32, 3).astype("float32")
    y = np.arange(16) % 10
    rmap = compute_relevance(resnet8_model, x, y, rule="lrp.epsilon", quiet=True)
    kernels = [l.name for l in resnet8_model.layers if type(l).__name__ in ("Conv2D", "Dense")]
    assert sorted(rmap.layers) == sorted(kernels)
    _assert_layer_sums(rmap)
