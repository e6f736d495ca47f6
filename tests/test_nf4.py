"""NF4 by hand (minilora/nf4.py): the levels against the paper's table, the quantile against the
standard library's, the error bound of blockwise absmax + double quantization, packing, stored bits,
and one clear line for every bad setting."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from minilora.methods import nf4


def test_normal_quantile_matches_the_standard_library():
    # statistics.NormalDist.inv_cdf (Wichura's AS241) is an independent reference for our bisection
    ref = NormalDist().inv_cdf
    for p in (1e-12, 1e-6, 0.01, 0.0322917, 0.3, 0.5, 0.5 + 1e-9, 0.77, 0.9677083, 0.999999):
        assert nf4.normal_quantile(p) == pytest.approx(ref(p), rel=1e-12, abs=1e-13)
        assert nf4.normal_cdf(nf4.normal_quantile(p)) == pytest.approx(p, rel=1e-12)


def test_nf4_levels_equal_the_papers_table():
    levels = nf4.nf4_levels()
    paper = np.array(nf4.PAPER_NF4_LEVELS)
    # the published values are float32 numbers (bitsandbytes computes the probabilities with a float32
    # torch.linspace); our float64 derivation agrees with every one to float32 rounding: 2 ulps at 0.7
    np.testing.assert_allclose(levels, paper, rtol=0, atol=2e-7)
    # and to the 6 decimals a reader compares by eye
    np.testing.assert_array_equal(np.round(levels, 6), np.round(paper, 6))


def test_nf4_levels_shape_the_paper_describes():
    levels = nf4.nf4_levels()
    assert levels.shape == (16,)
    assert np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert (levels == 0.0).sum() == 1  # an exact zero
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7  # asymmetric


def test_offset_lies_between_the_two_sides_natural_choices():
    assert 1 - 1 / 30 < nf4.NF4_OFFSET < 1 - 1 / 32
    assert nf4.NF4_OFFSET == pytest.approx((1 - 1 / 30 + 1 - 1 / 32) / 2, abs=5e-8)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, 1000).astype(np.uint8)
    packed = nf4.pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (500,)
    assert packed[0] == codes[0] * 16 + codes[1]  # first code in the high nibble
    np.testing.assert_array_equal(nf4.unpack_codes(packed), codes)


def test_pack_unpack_round_trip_on_a_device(device_xp):
    codes = np.arange(32, dtype=np.uint8) % 16
    packed = nf4.pack_codes(codes)
    back = nf4.unpack_codes(device_xp.asarray(packed))
    np.testing.assert_array_equal(device_xp.asnumpy(back), codes)


def _max_half_gap(levels):
    return float(np.diff(levels).max()) / 2


# half the largest step of each double quantization's code, as a fraction of scale2
HALF_STEP = {"linear": 1 / 254, "dynamic": float(np.diff(nf4.dynamic_map()).max()) / 2}


@pytest.mark.parametrize("absmax_code", nf4.ABSMAX_CODES)
@pytest.mark.parametrize("shape", [(128, 128), (512, 128), (16, 16), (96, 64)])
def test_quantize_dequantize_error_bound(shape, absmax_code):
    """|w - w_deq| <= half the largest gap * absmax + |absmax - absmax_deq| for every weight of every block.

    The first term is the 4-bit rounding (x / absmax lies within half a gap of its level, scaled back by
    absmax); the second the double quantization of absmax (|levels| <= 1 multiplies it), itself at most
    half a step of its code times scale2 (linear int8: scale2 / 254; the dynamic map: its largest step,
    0.014, halved), plus float32 rounding.
    """
    rng = np.random.default_rng(1)
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    W[0, :3] = [0.2, -0.15, 0.0]  # outliers, the case absmax exists for
    q = nf4.quantize_nf4(W, absmax_code=absmax_code)
    W_deq = nf4.dequantize_nf4(q, shape, absmax_code=absmax_code)
    assert W_deq.shape == shape and W_deq.dtype == np.float32
    assert q["absmax_q"].dtype == (np.int8 if absmax_code == "linear" else np.uint8)
    levels = nf4.nf4_table().astype(np.float64)  # the levels stored
    blocks = W.astype(np.float64).reshape(-1, nf4.BLOCK_SIZE)
    absmax = np.abs(blocks).max(axis=1)
    absmax_deq = nf4.dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], absmax_code=absmax_code)
    scale2 = np.repeat(q["absmax_scale"].astype(np.float64), nf4.ABSMAX_BLOCK_SIZE)[:absmax.size]
    dq_err = np.abs(absmax - absmax_deq)
    assert np.all(dq_err <= scale2 * HALF_STEP[absmax_code] + 1e-7 * absmax.max())  # half a step of the code
    err = np.abs(W_deq.astype(np.float64) - W).reshape(-1, nf4.BLOCK_SIZE)
    bound = _max_half_gap(levels) * absmax + dq_err + 1e-7 * absmax.max()
    assert np.all(err <= bound[:, None])
    # the tighter per-weight form: half the gap of the interval w / absmax falls in
    normed = blocks / absmax[:, None]
    i = np.clip(np.searchsorted(levels, normed), 1, 15)
    half_gap = (levels[i] - levels[i - 1]) / 2
    assert np.all(err <= half_gap * absmax[:, None] + dq_err[:, None] + 1e-7 * absmax.max())
    # the bound is not vacuous: the error uses a good part of it somewhere
    assert err.max() > 0.2 * bound.min()


def test_the_stored_table_is_the_published_one_and_the_derivation_with_float32_probabilities():
    table = nf4.nf4_table()
    assert table.dtype == np.float32 and not table.flags.writeable
    assert np.array_equal(table, np.array(nf4.PAPER_NF4_LEVELS, np.float32))  # exactly, every bit
    # the float64 levels are not the table: a probability's float32 rounding times the quantile's slope
    assert 5e-8 < np.abs(nf4.nf4_levels() - table).max() < 1.1e-7


def test_the_codes_are_the_nearest_of_the_stored_float32_levels():
    rng = np.random.default_rng(5)
    W = (0.02 * rng.standard_normal((64, 256))).astype(np.float32)
    codes = nf4.unpack_codes(nf4.quantize_nf4(W)["codes"])
    blocks = W.astype(np.float64).reshape(-1, 64)
    x = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()
    nearest = np.abs(x[:, None] - nf4.nf4_table().astype(np.float64)[None, :]).argmin(axis=1)  # ties: the lower
    np.testing.assert_array_equal(codes, nearest)


def test_the_dynamic_map_is_an_8bit_float_from_1e_minus_7_to_1():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and m.dtype == np.float32 and np.all(np.diff(m) > 0)
    assert (m == 0).sum() == 1 and m[-1] == 1.0 and m[0] > -1.0
    pos = m[(m > 0) & (m < 1)]
    np.testing.assert_array_equal(-pos[::-1], m[m < 0])  # symmetric but for 1.0
    assert pos.size == 127 and pos.min() == pytest.approx(0.55e-6, rel=1e-6)  # 10^-6 x the midpoint of [0.1, 1]
    # 64 values in [0.1, 1) (steps of 0.9 / 64), 32 in [0.01, 0.1), ...: the relative step is what stays even
    assert (pos >= 0.1).sum() == 64 and ((pos >= 0.01) & (pos < 0.1)).sum() == 32
    assert np.diff(m).max() == pytest.approx(0.9 / 64, rel=1e-5)


def test_every_level_is_reproduced_exactly_without_double_quantization():
    levels = nf4.nf4_levels()
    x = np.tile(levels, 4) * 0.5  # 64 weights, absmax 0.5
    codes, absmax = nf4.quantize_blockwise(x, levels, 64)
    np.testing.assert_array_equal(codes, np.tile(np.arange(16), 4))
    np.testing.assert_array_equal(nf4.dequantize_blockwise(codes, absmax, levels, 64), x)


def test_zero_block_and_zeros_stay_zero():
    W = np.zeros((4, 32), np.float32)
    W[2:, :] = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    W[3, 5] = 0.0
    W_deq = nf4.dequantize_nf4(nf4.quantize_nf4(W), W.shape)
    assert np.all(W_deq[:2] == 0.0)  # the all-zero block
    assert W_deq[3, 5] == 0.0  # an exact zero level


def test_stored_bits_per_param_with_double_quantization():
    # paper: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight; one more float32 mean per matrix
    for shape, expected in [((512, 128), 4 + 8 / 64 + 4 * 32 / 65536 + 32 / 65536),
                            ((128, 128), 4 + 8 / 64 + 32 / 16384 + 32 / 16384)]:
        q = nf4.quantize_nf4(np.ones(shape, np.float32))
        bits = nf4.stored_bits_per_param(q, math.prod(shape))
        assert bits == pytest.approx(expected)
        assert 4.127 <= bits <= 4.2
    assert 4 + 8 / 64 + 32 / (64 * 256) == pytest.approx(4.127, abs=5e-4)


def test_nf4_beats_uniform_int4_on_normal_weights():
    """The paper's argument, on Gaussian data: NF4's levels put their resolution where the weights are."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal(64 * 1024)
    errs = {}
    for name, levels in (("nf4", nf4.nf4_levels()), ("int4", nf4.int4_levels())):
        codes, absmax = nf4.quantize_blockwise(W, levels, 64)
        errs[name] = float(np.mean((nf4.dequantize_blockwise(codes, absmax, levels, 64) - W) ** 2))
    assert errs["nf4"] < 0.85 * errs["int4"]


def test_dequantize_on_a_device_equals_the_host(device_xp):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    q = nf4.quantize_nf4(W)
    host = nf4.dequantize_nf4(q, W.shape)
    dev = nf4.dequantize_nf4({k: device_xp.asarray(v) for k, v in q.items()}, W.shape)
    assert device_xp.get_array_module(dev) is device_xp
    np.testing.assert_allclose(device_xp.asnumpy(dev), host, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("call, message", [
    (lambda: nf4.quantize_nf4(np.ones((10, 10), np.float32)), "block_size: expected a divisor of the number of weights 100, got 64"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.float32), block_size=0), "block_size: expected a positive integer, got 0"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.float32), block_size=2.0), "block_size: expected a positive integer, got 2.0"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.float32), block_size=1), "block_size: expected an even number"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.float32), absmax_block_size=-3), "absmax_block_size: expected a positive integer, got -3"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.int64)), "W: expected a floating-point array of finite values, got int64 array"),
    (lambda: nf4.quantize_nf4(np.full((8, 8), np.nan, np.float32)), "W: expected a floating-point array of finite values, got 64 non-finite values"),
    (lambda: nf4.dequantize_nf4(nf4.quantize_nf4(np.ones((8, 8), np.float32)), (8, 16)), "shape: expected a shape of 64 weights"),
    (lambda: nf4.normal_quantile(1.0), "p: expected a probability strictly between 0 and 1, got 1.0"),
    (lambda: nf4.pack_codes(np.array([1, 2, 3], np.uint8)), "codes: expected a 1-D uint8 array of even length"),
    (lambda: nf4.pack_codes(np.array([1, 16], np.uint8)), "codes: expected 4-bit codes in [0, 15], got a code 16"),
    (lambda: nf4.quantize_nf4(np.ones((8, 8), np.float32), absmax_code="log"),
     "absmax_code: expected one of linear, dynamic, got 'log'"),
    (lambda: nf4.dequantize_nf4(nf4.quantize_nf4(np.ones((8, 8), np.float32), block_size=16), (8, 8), block_size=16,
                                absmax_code="dynamic"), "absmax_q: expected uint8 codes (absmax_code 'dynamic'), got int8"),
])
def test_bad_settings_are_one_clear_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
