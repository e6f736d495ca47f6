"""NF4: QLoRA's 4-bit NormalFloat, by hand (Dettmers et al. 2023, section 3 and appendix E).

A pretrained weight matrix is close to normally distributed around zero, so
QLoRA spends its 16 codes where a normal distribution puts its mass: the
levels are quantiles of N(0, 1), rescaled to [-1, 1]. Each block of 64
consecutive weights (W flattened row-major) is divided by its absolute
maximum, so it lies in [-1, 1], and each weight is stored as the index of its
nearest level:

    w ~= levels[code] * absmax_block              code in 0..15, 4 bits

Two codes share one uint8 (the first in the high nibble, as bitsandbytes).
The absmax constants (one float32 per 64 weights, 0.5 bits per weight) are
themselves quantized ("double quantization"): their mean is subtracted (they
are all positive, so centring them makes a symmetric 8-bit code usable) and
each block of 256 of them is stored as int8 codes with one float32 scale:

    absmax ~= mean + q / 127 * scale2    q in -127..127, scale2 = max |absmax - mean| in its block of 256

The stored bits per weight are then 4 + 8/64 + 32/(64*256) = 4.127 (the
paper's number), plus one float32 mean per matrix.

Two choices of ours, said here so nothing hides:
- the inverse normal CDF is bisection on math.erfc (normal_quantile below),
  not scipy: slow, but 16 levels are computed once, and every step is plain;
- the second level is linear symmetric int8 (q / 127), where bitsandbytes
  uses its 8-bit "dynamic" float map (create_dynamic_map). Linear int8 gives
  a plain error bound, |absmax - dequantized| <= scale2 / 254 (half a step);
  like bitsandbytes we subtract the mean first, and the codes of the weights
  are computed with the exact float32 absmax, the double quantization only
  touches how that absmax is stored.

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
    - levels: (L,) sorted float64 levels in [-1, 1], L <= 16
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
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = np.searchsorted(midpoints, normed.ravel(), side="left").astype(np.uint8)
    return codes, absmax


def quantize_absmax(absmax, absmax_block_size=ABSMAX_BLOCK_SIZE):
    """Double quantization: the absmax constants as int8 codes in blocks of absmax_block_size.

        mean = mean(absmax);  c = absmax - mean
        scale2_j = max_{i in block j} |c_i|,   q_i = round(127 c_i / scale2_j)

    The last block may be shorter (a matrix of n weights has n / 64 absmax
    constants, rarely a multiple of 256). Inputs: absmax float32 (n_blocks,).
    Returns (q int8 (n_blocks,), scale2 float32 (ceil(n_blocks / 256),), mean float32 ()).
    """
    if isinstance(absmax_block_size, bool) or not isinstance(absmax_block_size, int) or absmax_block_size < 1:
        _fail("absmax_block_size", "a positive integer", repr(absmax_block_size))
    a = np.asarray(absmax, dtype=np.float64)
    mean = np.float32(a.mean())
    c = a - np.float64(mean)
    n2 = -(-c.size // absmax_block_size)  # ceil
    scale2 = np.array([np.abs(c[j * absmax_block_size:(j + 1) * absmax_block_size]).max() for j in range(n2)],
                      dtype=np.float32)
    per = np.repeat(np.where(scale2 > 0, scale2, 1.0).astype(np.float64), absmax_block_size)[:c.size]
    q = np.clip(np.rint(127.0 * c / per), -127, 127).astype(np.int8)
    return q, scale2, np.asarray(mean, dtype=np.float32)


def dequantize_absmax(q, scale2, mean, absmax_block_size=ABSMAX_BLOCK_SIZE):
    """absmax ~= mean + q / 127 * scale2 (float32 (n_blocks,)), on q's array module."""
    xp = array_module(q)
    per = xp.repeat(scale2, absmax_block_size)[:q.shape[0]]  # (n_blocks,)
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


def quantize_nf4(W, block_size=BLOCK_SIZE, absmax_block_size=ABSMAX_BLOCK_SIZE):
    """A weight matrix as NF4 with double quantization.

    Inputs:
    - W: float array on the host, any shape (a linear's (out, in)); W.size a multiple of block_size
    - block_size: weights per absmax (64); absmax_block_size: absmax constants per scale (256)

    Returns a dict of host arrays (NF4_FIELDS):
    - codes: uint8 (W.size / 2,), two 4-bit level indices per byte
    - absmax_q: int8 (W.size / block_size,), the double-quantized absmax
    - absmax_scale: float32 (ceil(W.size / block_size / absmax_block_size),)
    - absmax_mean: float32 (), subtracted from every absmax before its quantization
    """
    W = np.asarray(W)
    if W.dtype.kind != "f" or not np.isfinite(W).all():
        _fail("W", "a floating-point array of finite values", f"{W.dtype} array" if W.dtype.kind != "f"
              else f"{int((~np.isfinite(W)).sum())} non-finite values")
    check_block_sizes(W.size, block_size, absmax_block_size)
    codes, absmax = quantize_blockwise(W, nf4_levels(), block_size)
    absmax_q, absmax_scale, absmax_mean = quantize_absmax(absmax, absmax_block_size)
    return {"codes": pack_codes(codes), "absmax_q": absmax_q, "absmax_scale": absmax_scale,
            "absmax_mean": absmax_mean}


def dequantize_nf4(q, shape, dtype=None, block_size=BLOCK_SIZE, absmax_block_size=ABSMAX_BLOCK_SIZE):
    """W ~= levels[code] * absmax, of the given shape, on the array module of q's arrays.

    Inputs: q, a dict as quantize_nf4 returns (on the host or a device); shape,
    the matrix's shape; dtype, the result's (float32 unless given).
    Returns a fresh array of that shape.
    """
    codes = q["codes"]
    xp = array_module(codes)
    n = math.prod(shape)
    if codes.shape != (n // 2,):
        _fail("shape", f"a shape of {2 * codes.shape[0]} weights (the codes' count)", tuple(shape))
    check_block_sizes(n, block_size, absmax_block_size)
    absmax = dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], absmax_block_size)
    levels = _nf4_table(xp)
    W = levels[unpack_codes(codes)].reshape(-1, block_size)  # (n_blocks, block_size) in [-1, 1]
    W *= absmax[:, None]
    W = W.reshape(shape)
    return W if dtype is None else W.astype(dtype, copy=False)  # float32 already: no second copy of W


@functools.lru_cache(maxsize=None)
def _nf4_table(xp):
    """nf4_levels() as float32 on module xp: the table dequantize_nf4 indexes, computed and moved
    once per array module (not uploaded again at every layer of every step)."""
    table = xp.asarray(nf4_levels().astype(np.float32))
    if xp is np:
        table.setflags(write=False)
    return table


def stored_bits_per_param(q, n):
    """Bits stored per weight: 8 * (bytes of every array in q) / n, for n weights."""
    return 8.0 * sum(int(q[f].nbytes) for f in NF4_FIELDS) / n


def dequantize_blockwise(codes, absmax, levels, block_size=BLOCK_SIZE):
    """levels[codes] * absmax, float64 (n,): the inverse of quantize_blockwise (no double quantization)."""
    return (levels[codes].reshape(-1, block_size) * absmax.astype(np.float64)[:, None]).ravel()
