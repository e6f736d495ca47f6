"""NF4: QLoRA's 4-bit NormalFloat, by hand (Dettmers et al. 2023, section 3 and appendix E).

A pretrained weight matrix is close to normally distributed around zero, so
QLoRA spends its 16 codes where a normal distribution puts its mass: the
levels are quantiles of N(0, 1), rescaled to [-1, 1]. Each block of 64
consecutive weights (W flattened row-major) is divided by its absolute
maximum, so it lies in [-1, 1], and each weight is stored as the index of its
nearest level:

    w ~= levels[code] * absmax_block              code in 0..15, 4 bits

Two codes share one uint8 (the first in the high nibble, as bitsandbytes).
The levels stored are nf4_table(), float32: bitsandbytes' table, which is
this derivation with its probabilities rounded to float32 (nf4_levels gives
the same levels in float64; they differ by at most 1.1e-7). The codes are the
nearest of those float32 levels, ties to the lower one, as bitsandbytes'.

The absmax constants (one float32 per 64 weights, 0.5 bits per weight) are
themselves quantized ("double quantization"): their mean is subtracted (they
are all positive, so centring them makes a symmetric 8-bit code usable) and
each block of 256 of them is stored as 8-bit codes with one float32 scale,
in one of two codes (absmax_code):

    linear:   absmax ~= mean + q / 127 * scale2      q in -127..127 (int8)
    dynamic:  absmax ~= mean + dyn[q] * scale2       q in 0..255 (uint8), dyn = dynamic_map()
              scale2 = max |absmax - mean| in its block of 256

The stored bits per weight are then 4 + 8/64 + 32/(64*256) = 4.127 (the
paper's number), plus one float32 mean per matrix.

Two choices of ours, said here so nothing hides:
- the inverse normal CDF is bisection on math.erfc (normal_quantile below),
  not scipy: slow, but 16 levels are computed once, and every step is plain;
- the second level is linear symmetric int8 (q / 127) by default, where
  bitsandbytes uses its 8-bit "dynamic" float map (create_dynamic_map;
  absmax_code="dynamic" gives it, and 99.8% of bitsandbytes' codes: the rest
  are where its CPU kernel rounds to a grid first). Linear int8 gives a plain
  error bound, |absmax - dequantized| <= scale2 / 254 (half a step); the
  dynamic map spends its codes near 0 (steps of 0.014 scale2 above 0.1 scale2,
  below 10^-5 near 0), where few centred absmax lie, so its error is slightly
  larger (the weights' relative error 0.09355 against 0.09352 on the default
  base: docs/methods.md, benchmarks/nf4_bnb.json). Both
  subtract the mean first, and the codes of the weights are computed with the
  exact float32 absmax: the double quantization only touches how that absmax
  is stored.

Quantization happens once, on the host (NumPy); dequantize_nf4 takes its
array module from its inputs, so the forward can dequantize one layer on a
GPU just for its product. Nothing here changes an array it was given.
"""

import functools
import math

import numpy as np

from ..backend import array_module

BLOCK_SIZE = 64  # weights per absmax block (the paper's block size)
ABSMAX_BLOCK_SIZE = 256  # absmax constants per block of the double quantization (the paper's)
# bitsandbytes' create_normal_map offset: the largest probability whose quantile becomes the level 1.0.
# It lies between the two sides' natural choices 1 - 1/(2*16) and 1 - 1/(2*15) (their mean, to its 7
# printed digits): the quantile of 1 itself is infinite, so the top level needs a probability below 1.
NF4_OFFSET = 0.9677083
# the 16 published levels (appendix E; bitsandbytes' table), float32 numbers printed in full
PAPER_NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2 = erfc(-x / sqrt 2) / 2, the standard normal's CDF (a Python float).

    Written with erfc, erf's complement, so the lower tail keeps its relative
    precision (1 + erf(x) cancels to nothing there)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_quantile(p):
    """Phi^-1(p), the standard normal's inverse CDF, by bisection on normal_cdf.

    Phi is increasing, so halving a bracket [lo, hi] with Phi(lo) <= p <= Phi(hi)
    converges; it stops when the midpoint is one of the ends (full float64
    precision, about 60 halvings; enough for 16 levels computed once). Inputs: p, a float in (0, 1). Returns a float.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        _fail("p", "a probability strictly between 0 and 1", p)
    if p > 0.5:
        # Phi^-1(p) = -Phi^-1(1 - p), and 1 - p is exact for p in [1/2, 1): bisecting in the lower
        # tail, where erfc keeps full relative precision, loses nothing near p = 1
        return -normal_quantile(1.0 - p)
    lo, hi = -40.0, 0.0  # Phi(-40) is below the smallest float, Phi(0) = 1/2: every p in (0, 1/2] lies between
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if normal_cdf(mid) < p:
            lo = mid
        else:
            hi = mid


def _linspace_open(start, stop, n):
    """n probabilities from start towards stop, evenly spaced, stop itself left out (torch.linspace(...)[:-1])."""
    return [start + (stop - start) * i / n for i in range(n)]


def nf4_levels():
    """The 16 NF4 levels, float64 (16,), sorted, from the normal distribution's quantiles.

    Asymmetric, as the paper's appendix and bitsandbytes' create_normal_map:
    8 positive levels (quantiles of 8 probabilities evenly spaced from
    NF4_OFFSET down towards 1/2, 1/2 itself left out), 7 negative ones (the
    same with 7 probabilities, mirrored), and an exact zero, so that a zero
    weight (padding, a pruned weight) is stored exactly. Divided by the
    largest, the levels span [-1, 1] with -1 and 1 both present.
    """
    positive = [normal_quantile(p) for p in _linspace_open(NF4_OFFSET, 0.5, 8)]  # 8 levels > 0
    negative = [-normal_quantile(p) for p in _linspace_open(NF4_OFFSET, 0.5, 7)]  # 7 levels < 0
    levels = np.array(sorted(negative + [0.0] + positive))
    return levels / levels.max()  # top level Phi^-1(offset) on both sides -> -1 and 1


def _linspace_float32(start, stop, n):
    """n float32 numbers from start to stop as torch.linspace(start, stop, n, dtype=float32) computes them
    one at a time (bitsandbytes' NF4 table came from it): step = (stop - start) / (n - 1) in float32, the
    first half start + i step, the second half stop - (n - 1 - i) step, each in float32."""
    a, b = np.float32(start), np.float32(stop)
    step = np.float32((b - a) / np.float32(max(n - 1, 1)))
    return np.array([a + step * np.float32(i) if i < n // 2 else b - step * np.float32(n - 1 - i)
                     for i in range(n)], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def nf4_table():
    """The 16 NF4 levels as stored and dequantized, float32 (16,), read-only: bitsandbytes' table.

    nf4_levels' derivation as bitsandbytes' create_normal_map runs it: the probabilities are a float32
    torch.linspace, their quantiles float64 rounded to float32, divided by the largest in float32. It
    equals the published table (PAPER_NF4_LEVELS) exactly; the float64 levels differ from it by at most
    1.1e-7 (at 0.7230), a probability's float32 rounding times the quantile's slope.
    """
    positive = [normal_quantile(float(p)) for p in _linspace_float32(NF4_OFFSET, 0.5, 9)[:-1]]  # 8 levels > 0
    negative = [-normal_quantile(float(p)) for p in _linspace_float32(NF4_OFFSET, 0.5, 8)[:-1]]  # 7 levels < 0
    values = np.array(sorted(negative + [0.0] + positive), dtype=np.float32)
    table = values / values.max()  # float32 / float32
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=None)
def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), float32 (256,), sorted, read-only.

    An 8-bit float without a fixed exponent field: for e = 0..6, the 2^e midpoints of 2^e + 1 numbers
    evenly spaced in [0.1, 1], times 10^(e - 6), with both signs (254 values), and 0 and 1. Its steps
    grow from 5.5e-7 near 0 to 0.014 in [0.1, 1]. The evenly spaced numbers are rounded to float32
    from float64; bitsandbytes takes them from torch.linspace in float32, whose last bit depends on the
    machine's vector width (AVX2, AVX-512), so its map can differ from this one in the last bits of a few
    entries (22 of 256 on an AVX-512 machine, at most 1.2e-7 relative: tests/test_bnb.py). A file stores
    its map (nested_quant_map), so nothing rides on that.
    """
    data = []
    for e in range(7):
        bounds = np.linspace(0.1, 1.0, 2 ** e + 1).astype(np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)  # float32, as bitsandbytes
        values = np.float32(10.0 ** (e - 6)) * means  # float32: the scalar rounded to float32, as torch does
        data += values.tolist() + (-values).tolist()
    table = np.array(sorted(data + [0.0, 1.0]), dtype=np.float32)
    table.setflags(write=False)
    return table


ABSMAX_CODES = ("linear", "dynamic")  # how the double quantization codes the centred absmax (see the docstring)


def check_absmax_code(absmax_code):
    """Raise ValueError (one line) unless absmax_code is one of ABSMAX_CODES."""
    if absmax_code not in ABSMAX_CODES:
        _fail("absmax_code", f"one of {', '.join(ABSMAX_CODES)}", repr(absmax_code))


def nearest_code(x, table):
    """The index of the nearest table value to each x, ties to the lower one (bitsandbytes' rule).

    Inputs: x float64 array; table sorted float32 (or float64) (L,). The midpoints between adjacent
    values are computed in float64, exactly for float32 values. Returns uint8 codes of x's shape.
    """
    t = np.asarray(table, dtype=np.float64)
    midpoints = (t[1:] + t[:-1]) / 2
    return np.searchsorted(midpoints, x, side="left").astype(np.uint8)


def int4_levels():
    """Uniform symmetric int4, for comparison: k / 7 for k in -7..7 (15 levels, float64, zero exact)."""
    return np.arange(-7, 8) / 7.0


def check_block_settings(block_size, absmax_block_size):
    """Raise ValueError (one line) unless both are positive integers and block_size is even."""
    for name, value in (("block_size", block_size), ("absmax_block_size", absmax_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(name, "a positive integer", repr(value))
    if block_size % 2:
        _fail("block_size", "an even number (two 4-bit codes share a byte)", block_size)


def check_block_sizes(n, block_size, absmax_block_size):
    """check_block_settings, and block_size must divide n, the number of weights."""
    check_block_settings(block_size, absmax_block_size)
    if n % block_size:
        _fail("block_size", f"a divisor of the number of weights {n}", block_size)


def quantize_blockwise(x, levels, block_size=BLOCK_SIZE):
    """Blockwise absmax quantization of x to the nearest of the given levels.

        absmax_j = max_{i in block j} |x_i|,   code_i = argmin_k |levels_k - x_i / absmax_j|

    Inputs:
    - x: float array of any shape on the host, its size a multiple of block_size
    - levels: (L,) sorted levels in [-1, 1], L <= 16 (nf4_table() for NF4)
    - block_size: consecutive elements of x.ravel() that share one absmax

    Returns (codes, absmax): codes uint8 (x.size,) in [0, L), absmax float32
    (x.size // block_size,). A block of zeros keeps absmax 0 and the code of
    the level nearest 0. Ties between two levels go to the lower one.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        _fail("x", "a floating-point array", x.dtype)
    check_block_sizes(x.size, block_size, ABSMAX_BLOCK_SIZE)
    blocks = x.astype(np.float64).reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)  # (n_blocks,), stored as float32
    safe = np.where(absmax > 0, absmax, 1.0).astype(np.float64)  # a zero block divides by 1
    normed = blocks / safe[:, None]  # in [-1, 1]
    # the nearest level: the number of midpoints between adjacent levels that lie below x
    codes = nearest_code(normed.ravel(), levels)
    return codes, absmax


def quantize_absmax(absmax, absmax_block_size=ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """Double quantization: the absmax constants as 8-bit codes in blocks of absmax_block_size.

        mean = mean(absmax);  c = absmax - mean;  scale2_j = max_{i in block j} |c_i|
        linear:  q_i = round(127 c_i / scale2_j)                     int8
        dynamic: q_i = argmin_k |dynamic_map()_k - c_i / scale2_j|   uint8, ties to the lower code

    The last block may be shorter (a matrix of n weights has n / 64 absmax
    constants, rarely a multiple of 256). With "dynamic", c is the float32
    difference, as bitsandbytes' _absmax - offset. Inputs: absmax float32 (n_blocks,).
    Returns (q (n_blocks,), scale2 float32 (ceil(n_blocks / 256),), mean float32 ()).
    """
    if isinstance(absmax_block_size, bool) or not isinstance(absmax_block_size, int) or absmax_block_size < 1:
        _fail("absmax_block_size", "a positive integer", repr(absmax_block_size))
    check_absmax_code(absmax_code)
    a = np.asarray(absmax, dtype=np.float64)
    mean = np.float32(a.mean())
    if absmax_code == "dynamic":
        c = (np.asarray(absmax, dtype=np.float32) - mean).astype(np.float64)  # rounded to float32, as bitsandbytes
    else:
        c = a - np.float64(mean)
    n2 = -(-c.size // absmax_block_size)  # ceil
    scale2 = np.array([np.abs(c[j * absmax_block_size:(j + 1) * absmax_block_size]).max() for j in range(n2)],
                      dtype=np.float32)
    per = np.repeat(np.where(scale2 > 0, scale2, 1.0).astype(np.float64), absmax_block_size)[:c.size]
    if absmax_code == "dynamic":
        q = nearest_code(c / per, dynamic_map())
    else:
        q = np.clip(np.rint(127.0 * c / per), -127, 127).astype(np.int8)
    return q, scale2, np.asarray(mean, dtype=np.float32)


_ABSMAX_DTYPES = {"linear": "int8", "dynamic": "uint8"}


def dequantize_absmax(q, scale2, mean, absmax_block_size=ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """absmax ~= mean + q / 127 * scale2 (linear) or mean + dynamic_map()[q] * scale2 (dynamic), float32
    (n_blocks,), on q's array module (float32 throughout, as bitsandbytes' dequantize_blockwise + offset)."""
    check_absmax_code(absmax_code)
    xp = array_module(q)
    if q.dtype != np.dtype(_ABSMAX_DTYPES[absmax_code]):
        _fail("absmax_q", f"{_ABSMAX_DTYPES[absmax_code]} codes (absmax_code {absmax_code!r})", f"{q.dtype} codes")
    per = xp.repeat(scale2, absmax_block_size)[:q.shape[0]]  # (n_blocks,)
    if absmax_code == "dynamic":
        return _table(xp, "dynamic")[q] * per + mean
    return q.astype(xp.float32) * (per / 127.0) + mean


def pack_codes(codes):
    """Two 4-bit codes per byte: byte = codes[2i] << 4 | codes[2i + 1]. codes uint8 (n,), n even -> (n / 2,)."""
    xp = array_module(codes)
    if codes.ndim != 1 or codes.shape[0] % 2 or codes.dtype != xp.uint8:
        _fail("codes", "a 1-D uint8 array of even length", f"{codes.dtype} of shape {tuple(codes.shape)}")
    if codes.size and int(codes.max()) > 15:
        _fail("codes", "4-bit codes in [0, 15]", f"a code {int(codes.max())}")
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed):
    """The inverse of pack_codes: uint8 (n / 2,) -> uint8 (n,), on packed's array module."""
    xp = array_module(packed)
    codes = xp.empty(2 * packed.shape[0], dtype=xp.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 15
    return codes


# the arrays one quantized matrix is stored as, and what each holds
NF4_FIELDS = ("codes", "absmax_q", "absmax_scale", "absmax_mean")


def quantize_nf4(W, block_size=BLOCK_SIZE, absmax_block_size=ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """A weight matrix as NF4 with double quantization.

    Inputs:
    - W: float array on the host, any shape (a linear's (out, in)); W.size a multiple of block_size
    - block_size: weights per absmax (64); absmax_block_size: absmax constants per scale (256)
    - absmax_code: "linear" (int8) or "dynamic" (bitsandbytes' 8-bit map, uint8), see quantize_absmax

    Returns a dict of host arrays (NF4_FIELDS):
    - codes: uint8 (W.size / 2,), two 4-bit level indices per byte (nf4_table()'s)
    - absmax_q: int8 or uint8 (W.size / block_size,), the double-quantized absmax
    - absmax_scale: float32 (ceil(W.size / block_size / absmax_block_size),)
    - absmax_mean: float32 (), subtracted from every absmax before its quantization
    """
    W = np.asarray(W)
    if W.dtype.kind != "f" or not np.isfinite(W).all():
        _fail("W", "a floating-point array of finite values", f"{W.dtype} array" if W.dtype.kind != "f"
              else f"{int((~np.isfinite(W)).sum())} non-finite values")
    check_block_sizes(W.size, block_size, absmax_block_size)
    check_absmax_code(absmax_code)
    codes, absmax = quantize_blockwise(W, nf4_table(), block_size)
    absmax_q, absmax_scale, absmax_mean = quantize_absmax(absmax, absmax_block_size, absmax_code)
    return {"codes": pack_codes(codes), "absmax_q": absmax_q, "absmax_scale": absmax_scale,
            "absmax_mean": absmax_mean}


def dequantize_nf4(q, shape, dtype=None, block_size=BLOCK_SIZE, absmax_block_size=ABSMAX_BLOCK_SIZE,
                   absmax_code="linear"):
    """W ~= levels[code] * absmax, of the given shape, on the array module of q's arrays.

    Inputs: q, a dict as quantize_nf4 returns (on the host or a device); shape,
    the matrix's shape; dtype, the result's (float32 unless given); the blocks and absmax_code it was
    quantized with.
    Returns a fresh array of that shape.
    """
    codes = q["codes"]
    xp = array_module(codes)
    n = math.prod(shape)
    if codes.shape != (n // 2,):
        _fail("shape", f"a shape of {2 * codes.shape[0]} weights (the codes' count)", tuple(shape))
    check_block_sizes(n, block_size, absmax_block_size)
    absmax = dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], absmax_block_size, absmax_code)
    levels = _table(xp, "nf4")
    W = levels[unpack_codes(codes)].reshape(-1, block_size)  # (n_blocks, block_size) in [-1, 1]
    W *= absmax[:, None]
    W = W.reshape(shape)
    return W if dtype is None else W.astype(dtype, copy=False)  # float32 already: no second copy of W


@functools.lru_cache(maxsize=None)
def _table(xp, name):
    """nf4_table() ("nf4") or dynamic_map() ("dynamic") on module xp: the tables the dequantization
    indexes, moved once per array module (not uploaded again at every layer of every step)."""
    table = xp.asarray(nf4_table() if name == "nf4" else dynamic_map())
    if xp is np:
        table.setflags(write=False)
    return table


def stored_bits_per_param(q, n):
    """Bits stored per weight: 8 * (bytes of every array in q) / n, for n weights."""
    return 8.0 * sum(int(q[f].nbytes) for f in NF4_FIELDS) / n


def dequantize_blockwise(codes, absmax, levels, block_size=BLOCK_SIZE):
    """levels[codes] * absmax, float64 (n,): the inverse of quantize_blockwise (no double quantization)."""
    return (levels[codes].reshape(-1, block_size) * absmax.astype(np.float64)[:, None]).ravel()
