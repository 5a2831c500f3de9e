"""The numpy fake-quantisation reference every other part is checked against."""
import numpy as np
import pytest

from toolchain.quantize.kernels import channel_matrix, channel_scales, fake_quant_channels, levels, quantized_codes


def test_depthwise_channel_order_is_keras_output_order():
    k = np.arange(3 * 3 * 4 * 2).reshape(3, 3, 4, 2)
    m = channel_matrix("DepthwiseConv2D", k)
    assert m.shape == (9, 8)
    for c in range(8):
        np.testing.assert_array_equal(m[:, c], k[:, :, c // 2, c % 2].reshape(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_and_range(bits):
    rng = np.random.RandomState(bits)
    m = rng.randn(50, 6)
    q = fake_quant_channels(m, bits)
    for c in range(6):
        distinct = np.unique(np.round(q[:, c] / (np.abs(m[:, c]).max() / levels(bits)), 6))
        assert len(distinct) <= 2 ** bits - 1
        assert np.abs(q[:, c]).max() == pytest.approx(np.abs(m[:, c]).max())  # max|w| is a level


def test_error_shrinks_with_bits_and_zeros_stay_zero():
    rng = np.random.RandomState(0)
    m = rng.randn(40, 5)
    m[rng.rand(40, 5) < 0.3] = 0.0
    m[:, 2] = 0.0
    errs = [((fake_quant_channels(m, b) - m) ** 2).sum() for b in (2, 3, 4, 6, 8, 16)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    for b in (2, 4, 8):
        q = fake_quant_channels(m, b)
        assert np.all(q[m == 0] == 0)
    assert np.all(fake_quant_channels(m, 32) == m)


def test_per_tensor_mixed_widths_share_one_grid():
    rng = np.random.RandomState(1)
    m = rng.randn(30, 4)
    bits = np.array([8, 4, 2, 8])
    scale = channel_scales(m, bits, per_tensor=True)
    outer = scale[0]  # the 8-bit channels use the finest step, which every other step is a multiple of
    for s in scale:
        assert s / outer == pytest.approx(round(s / outer))
    codes, _ = quantized_codes(m, bits, per_tensor=True)
    assert np.abs(codes).max(axis=0).tolist() <= levels(bits).tolist()
    # the widest level of the grid covers max|W|
    assert levels(8) * outer >= np.abs(m).max() - 1e-12
