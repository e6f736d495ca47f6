"""The ops a GPT is made of, each a pair of pure functions.

    out, cache = op_forward(inputs..., params...)
    grads      = op_backward(dout, cache)   # in forward-argument order

Dimension legend (as in llm.c):
    B  batch size            T  time (sequence length)
    C  channels (d_model)    V  vocabulary size
    NH number of heads       hs head size, C // NH
    N  any number of leading axes flattened together

Weight layout: a linear layer stores W as (out, in) and computes
y = x @ W.T + b, as the LoRA paper, PyTorch and llm.c do. Then the seed's
W' = W + B A, with B (out, r) and A (r, in), is literally `W + B @ A`.
The LoRA linear, built from these ops, lives with everything else LoRA in methods/lora.py.

No function here imports numpy: each takes its array module from its inputs,
`xp = array_module(x)`, so the same lines run on NumPy or CuPy. Scalars are
Python floats, so float32 inputs give float32 outputs and gradients.

Speed, and how it stays readable. A training step is a few large matrix
products (BLAS does those at near peak) plus many elementwise passes over
arrays of B*T*C or B*NH*T*T numbers, and the latter are bound by memory
traffic. So the ops below:
- hand BLAS one 2-D product per linear, (N, in) @ (in, out), never a stack of
  small ones;
- compute an elementwise formula in one buffer the op owns (`out=` and `*=`),
  instead of one fresh full-size temporary per arithmetic operator; the
  formula is always written out in the comment above those lines;
- never mutate an array they were given, nor one they keep in a cache;
- never bring a value from the device to the host on the hot path: argument
  checks that need a reduction (token ids in range, a non-empty loss mask) run
  only on host (NumPy) arrays; the model checks token ids on the host before it
  moves them to a GPU.
"""

import math
from functools import partial

from .backend import array_module, is_device, scatter_add, to_device
from .bounds import DROPOUT
from .threads import parallel_for


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_float(name, a, like=None):
    """a must be a floating array, of the same dtype as `like` when given."""
    kind = getattr(getattr(a, "dtype", None), "kind", None)
    if kind != "f":
        _fail(name, "a floating-point array", getattr(a, "dtype", type(a).__name__))
    if like is not None and a.dtype != like.dtype:
        _fail(name, f"dtype {like.dtype} (the dtype of the input)", a.dtype)


def embedding_forward(ids, wte):
    """Look up one row of the table per token.

    Inputs:
    - ids: (B, T) integer token ids in [0, V)
    - wte: (V, C) embedding table

    Returns out (B, T, C) with out[b, t] = wte[ids[b, t]], and a cache.
    """
    _check_float("wte", wte)
    if wte.ndim != 2:
        _fail("wte", "a (V, C) table", f"shape {tuple(wte.shape)}")
    if getattr(getattr(ids, "dtype", None), "kind", None) not in ("i", "u"):
        _fail("ids", "an integer array of token ids", getattr(ids, "dtype", type(ids).__name__))
    V = wte.shape[0]
    # the range check reads ids.min() / ids.max(): free on the host, a
    # device -> host copy every step on a GPU, where the model has already
    # checked the ids on the host before moving them
    if ids.size and not is_device(array_module(ids)) and (int(ids.min()) < 0 or int(ids.max()) >= V):
        _fail("ids", f"token ids in [0, {V}) (the vocabulary size)",
              f"ids in [{int(ids.min())}, {int(ids.max())}]")
    out = wte[ids]  # (B, T, C)
    return out, (ids, wte.shape)


def embedding_backward(dout, cache, into=None):
    """Gradient of the lookup with respect to the table.

    Inputs:
    - dout: (B, T, C)
    - cache: from embedding_forward
    - into: None, or a (V, C) gradient the table already has (the tied LM head's, GPT-2's wte): this
      one is then added into it, in place, and only the rows of the tokens seen are touched (no second
      (V, C) array of zeros, and no pass over it: 154 MB each at GPT-2's shapes)

    Returns dwte (V, C): row v is the sum of dout over every position whose
    token is v (plus into's row v). A flattened scatter-add, never a one-hot matmul.
    """
    ids, shape = cache
    xp = array_module(dout)
    if into is not None and tuple(into.shape) != tuple(shape):
        _fail("into", f"shape {tuple(shape)} (the table's)", f"shape {tuple(into.shape)}")
    if into is not None and is_device(xp):
        into += embedding_backward(dout, cache)  # the GPU's scatter-add needs its own zeros
        return into
    dwte = xp.zeros(shape, dtype=dout.dtype) if into is None else into
    # in the forward pass this was: out[b, t] = wte[ids[b, t]]
    # so every position sends its gradient back to the row it read:
    #     dwte[v] = sum over {(b, t) : ids[b, t] = v} of dout[b, t]
    ids = ids.reshape(-1)  # (N,)
    dout = dout.reshape(-1, shape[1])  # (N, C)
    if is_device(xp):
        scatter_add(dwte, ids, dout)  # an atomic add on the GPU
        return dwte
    # On the CPU, NumPy's add.at walks the N rows one at a time. The same
    # scatter-add, 3x faster: sort the positions by token, so the rows of one
    # token sit next to each other, sum each run of equal tokens with one
    # add.reduceat, and write every token's sum to its row.
    order = xp.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = xp.flatnonzero(xp.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    sums = xp.add.reduceat(dout[order], starts, axis=0)  # (tokens seen, C)
    if into is None:
        dwte[sorted_ids[starts]] = sums
    else:
        dwte[sorted_ids[starts]] += sums  # each seen token's row once: its ids are distinct
    return dwte


def linear_forward(x, W, b=None, frozen=False):
    """y = x @ W.T + b.

    Inputs:
    - x: (N..., in)
    - W: (out, in)
    - b: (out,) or None
    - frozen: True when W and b will get no gradient: then the cache does not
      keep x (only dW needs it), so a frozen layer holds no activation for the
      backward, and its backward can give dx only

    Returns y (N..., out) and a cache.
    """
    _check_float("x", x)
    _check_float("W", W, like=x)
    if W.ndim != 2 or W.shape[1] != x.shape[-1]:
        _fail("W", f"shape (out, {x.shape[-1]}) to match x's last axis", f"shape {tuple(W.shape)}")
    if b is not None:
        _check_float("b", b, like=x)
        if b.shape != (W.shape[0],):
            _fail("b", f"shape ({W.shape[0]},)", f"shape {tuple(b.shape)}")
    # one (N, in) @ (in, out) product: BLAS gets a single large GEMM instead
    # of a stack of B small ones
    y = x.reshape(-1, x.shape[-1]) @ W.T  # (N, out)
    if b is not None:
        y += b  # y is ours: no second (N, out) array
    return y.reshape(x.shape[:-1] + (W.shape[0],)), (None if frozen else x, W, b is not None)


def linear_backward(dout, cache, param_grads=True, input_grad=True):
    """Backward of y = x @ W.T + b.

    Inputs:
    - dout: (N..., out)
    - cache: from linear_forward
    - param_grads: False for a frozen layer: then only dx is computed and no
      (out, in) product is ever formed
    - input_grad: False when nothing below the layer is trained: then dx is not
      computed (None)

    Returns (dx, dW, db): dx (N..., in) or None; dW (out, in) and db (out,) or None.
        dx = dout @ W          dW = dout^T x (summed over N)     db = sum_N dout
    """
    x, W, has_bias = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out), one 2-D GEMM per product
    dx = (dout2 @ W).reshape(dout.shape[:-1] + (W.shape[1],)) if input_grad else None  # (N..., in)
    if not param_grads:
        return dx, None, None
    if x is None:
        _fail("cache", "the cache of a linear_forward that kept x (frozen=False) to compute dW, db",
              "the cache of a frozen layer")
    dW = dout2.T @ x.reshape(-1, x.shape[-1])  # (out, in)
    db = dout2.sum(axis=0) if has_bias else None
    return dx, dW, db


def layer_norm_forward(x, g, b, eps=1e-5):
    """Normalise the last axis to zero mean, unit variance, then scale and shift.

    Inputs:
    - x: (N..., C)
    - g, b: (C,) gain and bias

    Returns out (N..., C) = (x - mean) / sqrt(var + eps) * g + b, and a cache.
    """
    xp = array_module(x)
    _check_float("x", x)
    for name, p in (("g", g), ("b", b)):
        _check_float(name, p, like=x)
        if p.shape != (x.shape[-1],):
            _fail(name, f"shape ({x.shape[-1]},)", f"shape {tuple(p.shape)}")
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    norm, out = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)
    # each row is normalised by itself: the rows are split over the CPU threads
    parallel_for(x2.shape[0], partial(_layer_norm_rows, x2, g, b, eps, norm, rstd, out), like=x)
    rows = x.shape[:-1]
    return out.reshape(x.shape), (norm.reshape(x.shape), rstd.reshape(rows + (1,)), g)


def _layer_norm_rows(x, g, b, eps, norm, rstd, out, start, stop):
    """Rows [start, stop) of layer_norm_forward, of (N, C) x, written into norm, rstd and out."""
    xp = array_module(x)
    x, norm, rstd, out = x[start:stop], norm[start:stop], rstd[start:stop], out[start:stop]
    # mean = mean(x), var = mean((x - mean)^2), rstd = 1 / sqrt(var + eps)
    mean = x.mean(axis=-1, keepdims=True)
    xp.subtract(x, mean, out=norm)  # centred now, normalised below
    sq = xp.multiply(norm, norm, out=out)  # the squares, in out's buffer
    var = sq.sum(axis=-1, keepdims=True)
    var *= 1.0 / x.shape[-1]
    xp.divide(1.0, xp.sqrt(var + eps), out=rstd)  # (rows, 1)
    norm *= rstd  # norm = (x - mean) * rstd
    # out = norm * g + b
    xp.multiply(norm, g, out=out)
    out += b


def layer_norm_backward(dout, cache, param_grads=True):
    """Backward of layer norm, as a vector-Jacobian product (no (C, C) matrix).

    Returns (dx, dg, db); dg, db are None when param_grads is False.
        dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)),  dnorm = dout * g
    """
    norm, rstd, g = cache
    xp = array_module(dout)
    C = dout.shape[-1]
    # in the forward pass this was: out = norm * g + b
    # so now we have: dnorm = dout * g
    # and norm = (x - mean) * rstd, where mean and rstd depend on every x:
    # the two means below are those two paths (llm.c doc/layernorm)
    #     dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    # Both means are products with g, so they are matrix-vector products:
    #     mean(dnorm) = dout @ g / C,   mean(dnorm * norm) = (dout * norm) @ g / C
    # mean(dnorm) needs no (N..., C) temporary; the second shares dout * norm with dg
    # (the elementwise lines run on the rows split over the CPU threads; the sums over rows do not split)
    dout2, norm2, rstd2 = dout.reshape(-1, C), norm.reshape(-1, C), rstd.reshape(-1, 1)  # (N, C), (N, 1)
    N = dout2.shape[0]
    dout_norm = xp.empty_like(dout2)  # (N, C), also the per-row terms of dg
    parallel_for(N, lambda s, e: xp.multiply(dout2[s:e], norm2[s:e], out=dout_norm[s:e]), like=dout)
    mean_dnorm = (dout2 @ g).reshape(-1, 1) * (1.0 / C)  # (N, 1)
    mean_dnorm_norm = (dout_norm @ g).reshape(-1, 1) * (1.0 / C)
    dg = dout_norm.sum(axis=0) if param_grads else None
    db = dout2.sum(axis=0) if param_grads else None
    dx = xp.empty_like(dout2)

    def rows(s, e):
        xp.multiply(dout2[s:e], g, out=dx[s:e])  # dnorm
        dx[s:e] -= mean_dnorm[s:e]
        # dout_norm is no longer needed: its buffer takes norm * mean(dnorm * norm)
        dx[s:e] -= xp.multiply(norm2[s:e], mean_dnorm_norm[s:e], out=dout_norm[s:e])
        dx[s:e] *= rstd2[s:e]

    parallel_for(N, rows, like=dout)
    return dx.reshape(dout.shape), dg, db


_GELU_K = math.sqrt(2.0 / math.pi)


_BLOCK = 1 << 16  # numbers per block: 256 KB of float32, a few such arrays fit in L2


def _blocks(*arrays, size=None):
    """Matching contiguous 1-D slices of equally shaped arrays, `size` numbers at a time.

    An elementwise formula evaluated block by block keeps its buffers in the
    CPU's cache across its passes; over a whole (N, F) array every pass would
    go to main memory. The arithmetic is the same either way.
    """
    size = size or _BLOCK
    flat = [a.reshape(-1) for a in arrays]
    for i in range(0, flat[0].size, size):
        yield tuple(a[i:i + size] for a in flat)


def _gelu_tanh(xb, tb):
    """tb = tanh(sqrt(2/pi) (x + 0.044715 x^3)) of one block xb, as tanh(sqrt(2/pi) x (1 + 0.044715 x^2)),
    built up in tb's buffer (no temporary per operator). The forward and the backward both call it, so the
    backward's t is the forward's, bit for bit."""
    xp = array_module(xb)
    xp.multiply(xb, xb, out=tb)
    tb *= 0.044715
    tb += 1.0
    tb *= xb
    tb *= _GELU_K
    xp.tanh(tb, out=tb)
    return tb


def gelu_forward(x):
    """GELU, tanh form (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Inputs: x (N...). Returns out (N...) and a cache that holds x only: the backward computes
    t = tanh(...) again, one block at a time (as PyTorch's tanh GELU saves only its input), so a
    block's MLP keeps one (B, T, F) array fewer.
    """
    xp = array_module(x)
    _check_float("x", x)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    # elementwise: the blocks are split over the CPU threads
    parallel_for(x.size, partial(_gelu_forward_part, x.reshape(-1), out.reshape(-1)), like=x, grain=_BLOCK,
                 scratch=lambda s, e: xp.empty(min(e - s, _BLOCK), dtype=x.dtype))  # one block of t per part
    return out, x


def _gelu_forward_part(x, out, start, stop, tmp):
    """out[start:stop] = GELU(x[start:stop]) of flat x, out, one block at a time (tmp: one block of t, reused)."""
    xp = array_module(x)
    for xb, ob in _blocks(x[start:stop], out[start:stop]):
        tb = _gelu_tanh(xb, tmp[:xb.size])
        # out = 0.5 x (1 + t)
        xp.add(tb, 1.0, out=ob)
        ob *= xb
        ob *= 0.5


def gelu_backward(dout, cache):
    """Returns dx = dout * [0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)]."""
    x = cache
    xp = array_module(x)
    dout = xp.ascontiguousarray(dout)
    dx = xp.empty_like(x)
    def blocks(s, e):  # one block of t and one of scratch per part, reused
        return xp.empty(min(e - s, _BLOCK), dtype=x.dtype), xp.empty(min(e - s, _BLOCK), dtype=x.dtype)

    parallel_for(x.size, partial(_gelu_backward_part, x.reshape(-1), dout.reshape(-1), dx.reshape(-1)),
                 like=x, grain=_BLOCK, scratch=blocks)
    return dx


def _gelu_backward_part(x, dout, dx, start, stop, blocks):
    """dx[start:stop] of gelu_backward, of flat x, dout, dx, one block at a time (blocks: t and scratch)."""
    xp = array_module(x)
    t, tmp = blocks
    for xb, db, gb in _blocks(x[start:stop], dout[start:stop], dx[start:stop]):
        scratch = tmp[:xb.size]
        tb = _gelu_tanh(xb, t[:xb.size])  # the forward's t, computed again for this block
        # in the forward pass this was: out = 0.5 * x * (1 + t),  t = tanh(u(x))
        # so now we have: product rule, with dt/dx = (1 - t^2) * du/dx,
        #     du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        #     dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)
        # evaluated right to left in dx's buffer:
        xp.multiply(xb, xb, out=gb)
        gb *= 3.0 * 0.044715
        gb += 1.0
        gb *= xb
        gb *= 0.5 * _GELU_K  # 0.5 x du/dx
        xp.multiply(tb, tb, out=scratch)
        xp.subtract(1.0, scratch, out=scratch)
        gb *= scratch  # 0.5 x (1 - t^2) du/dx
        xp.multiply(tb, 0.5, out=scratch)
        gb += scratch
        gb += 0.5  # + 0.5 (1 + t)
        gb *= db


def softmax_forward(x):
    """Softmax over the last axis; entries equal to -inf get probability 0.

    Inputs: x (N..., K). Returns p (N..., K) and a cache.
    """
    _check_float("x", x)
    # subtracting the row max changes nothing mathematically and keeps exp() finite
    p = _softmax_in_place(x - x.max(axis=-1, keepdims=True))
    return p, p


def _softmax_in_place(z):
    """p = exp(z) / sum(exp(z)) over the last axis, written over z (which the caller owns)."""
    xp = array_module(z)
    xp.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def softmax_backward(dout, cache):
    """Returns dx = p * (dout - sum(dout * p)) over the last axis."""
    p = cache
    return _softmax_backward_in_place(dout * p, p)


def _softmax_backward_in_place(dout_p, p):
    """dx = p * dout - p * sum(p * dout), given dout_p = dout * p (which the caller owns)."""
    xp = array_module(p)
    s = dout_p.sum(axis=-1, keepdims=True)
    dout_p -= xp.multiply(p, s)
    return dout_p


_CAUSAL_BLOCK = 64  # query rows per block of the causal attention (see _causal_blocks)


def _causal_blocks(T, size=None):
    """(t0, t1) row ranges that split 0..T-1 into blocks of `size` queries.

    Causal attention needs only the scores at or below the diagonal. Queries
    t0..t1-1 attend to keys 0..t1-1; every key from t1 on is in their future.
    Computing each block's (t1 - t0, t1) scores instead of (t1 - t0, T) skips
    the blocks above the diagonal: with n blocks, (n + 1) / (2 n) of the square
    is computed (5/8 at T = 256 with blocks of 64).
    """
    size = size or _CAUSAL_BLOCK
    return [(t0, min(t0 + size, T)) for t0 in range(0, T, size)]


def check_attention_inputs(q, k, v, n_heads):
    """q, k, v: float (B, T, C) arrays of one shape, and n_heads dividing C; returns (B, T, C)."""
    _check_float("q", q)
    for name, a in (("k", k), ("v", v)):
        _check_float(name, a, like=q)
        if a.shape != q.shape:
            _fail(name, f"shape {tuple(q.shape)} (the shape of q)", f"shape {tuple(a.shape)}")
    if q.ndim != 3:
        _fail("q", "a (B, T, C) array", f"shape {tuple(q.shape)}")
    B, T, C = q.shape
    if not isinstance(n_heads, int) or n_heads < 1 or C % n_heads:
        _fail("n_heads", f"a positive integer dividing C = {C}", n_heads)
    return B, T, C


def attention_forward(q, k, v, n_heads):
    """Causal multi-head self-attention on already-projected q, k, v.

    Inputs:
    - q, k, v: (B, T, C), with C = NH * hs
    - n_heads: NH

    Returns out (B, T, C) and a cache. Per head:
        S = q k^T / sqrt(hs)        (B, NH, T, T), S[t, u] = -inf for u > t
        P = softmax(S)              each position attends to itself and the past
        out = P v
    The cached P is the whole (B, NH, T, T) matrix, 0 above the diagonal; the
    blocks of S that lie wholly above it are never computed (_causal_blocks).
    """
    xp = array_module(q)
    B, T, C = check_attention_inputs(q, k, v, n_heads)
    hs = C // n_heads

    def split(a):  # (B, T, C) -> (B, NH, T, hs)
        return a.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)

    qh, kh, vh = split(q), split(k), split(v)
    scale = 1.0 / math.sqrt(hs)
    blocks = _causal_blocks(T)
    # S[t, u] = -inf for u > t. Inside a block only its last (t1 - t0) columns,
    # keys t0..t1-1, reach past the diagonal: adding a (size, size) matrix of
    # 0 (past) and -inf (future) there does it in place, broadcast over the heads
    size = blocks[0][1]
    future = xp.triu(xp.full((size, size), -xp.inf, dtype=q.dtype), k=1)
    P = xp.empty((B, n_heads, T, T), dtype=q.dtype)
    out = xp.empty((B, T, C), dtype=q.dtype)
    outh = split(out)  # a (B, NH, T, hs) view: the products write the heads straight into out
    def sequences(b0, b1):
        # One sequence and one block of queries at a time: its (NH, t1 - t0, t1)
        # scores stay in the CPU's cache through the five passes below.
        for b in range(b0, b1):
            for t0, t1 in blocks:
                P[b, :, t0:t1, t1:] = 0.0  # the block above the diagonal, never computed: P = 0 there
                S = P[b, :, t0:t1, :t1]  # (NH, t1 - t0, t1): S is computed, then turned into P, in P's memory
                # S = q k^T / sqrt(hs); the scale goes on q, T/hs times smaller than S
                xp.matmul(qh[b, :, t0:t1] * scale, kh[b, :, :t1].transpose(0, 2, 1), out=S)
                S[:, :, t0:] += future[:t1 - t0, :t1 - t0]
                # P = softmax(S), in place
                S -= S.max(axis=-1, keepdims=True)
                _softmax_in_place(S)
                xp.matmul(S, vh[b, :, :t1], out=outh[b, :, t0:t1])  # out = P v, (NH, t1 - t0, hs)

    # the sequences are independent: on the CPU they are split over the threads, each on its own core
    parallel_for(B, sequences, like=q, products=True)
    return out, (qh, kh, vh, P, outh)  # outh: out itself, seen per head (the backward's D below)


def attention_backward(dout, cache):
    """Returns (dq, dk, dv), each (B, T, C).

    Only the causal blocks are computed, as in the forward: P and dS are 0 above
    the diagonal (only the blocks at or below it are ever read), so a query
    block's dS has columns :t1 only, and a key block u0..u1-1 gets gradient only
    from the queries t >= u0 that can see it.
    """
    qh, kh, vh, P, outh = cache
    B, NH, T, hs = qh.shape
    xp = array_module(dout)
    scale = 1.0 / math.sqrt(hs)

    def split(a):  # (B, T, C) -> (B, NH, T, hs), a view
        return a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)

    douth = split(dout)
    dq, dk, dv = (xp.empty((B, T, NH * hs), dtype=dout.dtype) for _ in range(3))
    dqh, dkh, dvh = split(dq), split(dk), split(dv)  # the products write the heads straight into dq, dk, dv
    # The softmax backward needs D[t] = sum_u dP[t, u] P[t, u] for every query t.
    # With dP = dout v^T that sum is dout_t . sum_u P[t, u] v_u = dout_t . out_t:
    # a dot product of two hs-vectors, instead of a pass over the (T, T) scores
    D = (douth * outh).sum(axis=-1, keepdims=True)  # (B, NH, T, 1)
    blocks = _causal_blocks(T)

    def sequences(b0, b1, dS):  # dS: one sequence's, reused; only its causal blocks are used
        for b in range(b0, b1):  # one sequence at a time, as in the forward: dS stays in cache
            for t0, t1 in blocks:
                Pb = P[b, :, t0:t1, :t1]  # (NH, t1 - t0, t1)
                dSb = dS[:, t0:t1, :t1]
                # in the forward pass this was: out = P @ v, so dP = dout @ v^T
                xp.matmul(douth[b, :, t0:t1], vh[b, :, :t1].transpose(0, 2, 1), out=dSb)
                # P = softmax(S): dS = P * (dP - sum(dP * P)) = P * (dP - D), computed over
                # dP's buffer; masked entries have P = 0, so their dS is 0 too
                dSb -= D[b, :, t0:t1]
                dSb *= Pb
                # S = q @ k^T * scale; the scale goes on dS once
                dSb *= scale
                xp.matmul(dSb, kh[b, :, :t1], out=dqh[b, :, t0:t1])  # dq = dS k
            for u0, u1 in blocks:
                # keys u0..u1-1 are seen by queries t >= u0 only (P and dS are 0 above the diagonal):
                # out = P v gives dv = P^T dout, and S = q k^T gives dk = dS^T q, over those queries
                xp.matmul(P[b, :, u0:, u0:u1].transpose(0, 2, 1), douth[b, :, u0:], out=dvh[b, :, u0:u1])
                xp.matmul(dS[:, u0:, u0:u1].transpose(0, 2, 1), qh[b, :, u0:], out=dkh[b, :, u0:u1])

    # as in the forward, a part of the sequences per thread, each with its own dS
    parallel_for(B, sequences, like=dout, products=True, scratch=lambda s, e: xp.empty((NH, T, T), dtype=dout.dtype))
    return dq, dk, dv


def dropout_forward(x, p, rng=None, mask=None):
    """Inverted dropout: zero each entry with probability p, scale the rest by 1/(1-p).

    Inputs:
    - x: (N...)
    - p: drop probability in [0, 1)
    - rng: a numpy.random.Generator that draws the mask (when mask is None)
    - mask: an injected keep-mask (N...) of 0/1, for tests and exact replays

    Returns out (N...) and a cache. With p == 0 and no mask it is the identity.
    """
    xp = array_module(x)
    DROPOUT.check(p, "p")
    if mask is None:
        if p == 0.0:
            return x, None
        if rng is None:
            _fail("rng", "a numpy.random.Generator when p > 0 and no mask is given", None)
        mask = to_device(rng.random(x.shape) >= p, xp)
    elif tuple(mask.shape) != tuple(x.shape):
        _fail("mask", f"shape {tuple(x.shape)} (the shape of x)", f"shape {tuple(mask.shape)}")
    # out = x * mask / (1 - p). The cache keeps the 0/1 mask as booleans (one byte a number, not four)
    # and the scale apart: x * mask is x or 0 exactly, so one rounding, of x / (1 - p), as x * keep had
    mask = mask.astype(bool, copy=False)
    scale = 1.0 / (1.0 - p)
    out = x * mask
    out *= scale
    return out, (mask, scale)


def dropout_backward(dout, cache):
    """Returns dx = dout * mask / (1 - p) (the cache holds the mask and the scale 1 / (1 - p))."""
    if cache is None:
        return dout
    mask, scale = cache
    dx = dout * mask
    dx *= scale
    return dx


def cross_entropy_forward(logits, targets, mask=None):
    """Mean softmax cross-entropy over the positions the mask counts.

    Inputs:
    - logits: (N..., V) unnormalised scores
    - targets: (N...) integer class (token) ids in [0, V)
    - mask: (N...) of 0/1, or None to count every position

    Returns loss (0-d array, the logits' dtype), and a cache.
        loss = -sum_i m_i log softmax(logits_i)[targets_i] / sum_i m_i
    """
    xp = array_module(logits)
    _check_float("logits", logits)
    V = logits.shape[-1]
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        _fail("targets", f"shape {tuple(logits.shape[:-1])} (logits without its last axis)",
              f"shape {tuple(targets.shape)}")
    if getattr(targets.dtype, "kind", None) not in ("i", "u"):
        _fail("targets", "an integer array", targets.dtype)
    # the checks that reduce (ids in range, a non-empty mask) run on host arrays
    # only: on a GPU each would be a device -> host copy every step
    on_host = not is_device(xp)
    if on_host and targets.size and (int(targets.min()) < 0 or int(targets.max()) >= V):
        _fail("targets", f"ids in [0, {V})", f"ids in [{int(targets.min())}, {int(targets.max())}]")
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    if mask is None:
        m = xp.ones(t.shape, dtype=logits.dtype)
    else:
        if tuple(mask.shape) != tuple(targets.shape):
            _fail("mask", f"shape {tuple(targets.shape)} (the shape of targets)", f"shape {tuple(mask.shape)}")
        m = mask.reshape(-1).astype(logits.dtype)
    count = m.sum()  # 0-d, stays on the device
    if on_host and float(count) <= 0:
        _fail("mask", "at least one counted position", "a mask of all zeros")
    zs = z - z.max(axis=-1, keepdims=True)  # stable log-softmax
    lse = xp.log(xp.exp(zs).sum(axis=-1))  # (N,), log sum exp
    rows = xp.arange(t.shape[0])
    nll = lse - zs[rows, t]  # -log p(target), (N,)
    loss = (nll * m).sum() / count
    return loss, (zs, lse, t, m, count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """Returns dlogits (N..., V) = dloss * m_i (softmax(logits_i) - onehot(t_i)) / sum(m)."""
    zs, lse, t, m, count, shape = cache
    xp = array_module(zs)
    # softmax = exp(zs - lse), (N, V), in one buffer
    p = zs - lse[:, None]
    xp.exp(p, out=p)
    p[xp.arange(t.shape[0]), t] -= 1.0
    p *= (m / count * dloss)[:, None]
    return p.reshape(shape)


LOSS_CHUNK_BYTES = 128 * 2**20  # bytes one chunk of the LM head's loss works in: its two (rows, V) buffers


def loss_chunk_rows(V, itemsize, budget=None, tokens=None):
    """Rows (tokens) per chunk of tied_head_cross_entropy: as many as fit two (rows, V) buffers (the
    chunk's logits and their exponentials) in budget bytes (LOSS_CHUNK_BYTES unless given), at least one.
    With tokens (N), the same number of chunks made equal: ceil(N / chunks) rows each, so that no last
    chunk is a sliver whose products run far below the BLAS peak (1024 tokens at GPT-2's vocabulary:
    4 chunks of 256, not 333, 333, 333 and 25)."""
    budget = LOSS_CHUNK_BYTES if budget is None else budget
    rows = max(1, int(budget) // (2 * int(V) * int(itemsize)))
    if tokens is None or tokens <= 0:
        return rows
    chunks = -(-int(tokens) // rows)
    return -(-int(tokens) // chunks)


def tied_head_cross_entropy_forward(h, wte, targets, mask=None, input_grad=True, param_grads=True,
                                    chunk_rows=None):
    """The LM head and its loss, logits = h @ wte.T, in chunks of rows: the (N, V) logits never exist at once.

    The same loss as linear_forward(h, wte) then cross_entropy_forward:
        loss = -sum_i m_i log softmax(h_i @ wte.T)[targets_i] / sum_i m_i
    computed chunk_rows tokens at a time in two reused (chunk_rows, V) buffers. The gradients are formed
    in the same pass, while a chunk's logits exist (a fused loss, as CS231n's softmax_loss returns
    (loss, dx)); the backward only scales them by dloss. Per chunk c of rows:
        dz_c = m_c (softmax(z_c) - onehot(t_c)) / sum(m)      (rows, V), in the logits' buffer
    Each line computes what cross_entropy_forward / _backward compute, in the same order, so with one
    chunk (every token's logits fit LOSS_CHUNK_BYTES) the numbers are theirs bit for bit; more chunks
    change only the order of the sums over tokens (float rounding).
        dh_c = dz_c @ wte                                     (rows, C)
        dwte += dz_c^T h_c                                    (V, C), accumulated chunk by chunk

    Inputs:
    - h: (N..., C) hidden states; wte: (V, C) the tied embedding
    - targets: (N...) integer ids in [0, V); mask: (N...) of 0/1, or None to count every position
    - input_grad, param_grads: form dh, dwte (False: that gradient is never computed; both False: the loss only)
    - chunk_rows: tokens per chunk (loss_chunk_rows(V, itemsize) unless given)

    Returns loss (0-d array, h's dtype) and a cache for tied_head_cross_entropy_backward.
    """
    xp = array_module(h)
    _check_float("h", h)
    _check_float("wte", wte, like=h)
    C = h.shape[-1]
    if wte.ndim != 2 or wte.shape[1] != C:
        _fail("wte", f"shape (V, {C}) to match h's last axis", f"shape {tuple(wte.shape)}")
    V = wte.shape[0]
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        _fail("targets", f"shape {tuple(h.shape[:-1])} (h without its last axis)", f"shape {tuple(targets.shape)}")
    if getattr(targets.dtype, "kind", None) not in ("i", "u"):
        _fail("targets", "an integer array", targets.dtype)
    on_host = not is_device(xp)  # checks that reduce run on host arrays only (no device -> host copy)
    if on_host and targets.size and (int(targets.min()) < 0 or int(targets.max()) >= V):
        _fail("targets", f"ids in [0, {V})", f"ids in [{int(targets.min())}, {int(targets.max())}]")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        _fail("mask", f"shape {tuple(targets.shape)} (the shape of targets)", f"shape {tuple(mask.shape)}")
    rows = loss_chunk_rows(V, h.itemsize, tokens=targets.size) if chunk_rows is None else chunk_rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        _fail("chunk_rows", "a positive integer", chunk_rows)
    hf = h.reshape(-1, C)  # (N, C)
    t = targets.reshape(-1)  # (N,)
    N = t.shape[0]
    m = xp.ones(N, dtype=h.dtype) if mask is None else mask.reshape(-1).astype(h.dtype)
    count = m.sum()  # 0-d, stays on the device
    if on_host and float(count) <= 0:
        _fail("mask", "at least one counted position", "a mask of all zeros")
    weight = m / count  # (N,), each row's share of the mean: m_i / sum(m)
    loss = xp.zeros((), dtype=h.dtype)
    dh = xp.empty_like(hf) if input_grad else None
    dwte = None
    z = xp.empty((min(rows, N), V), dtype=h.dtype)  # one chunk's logits, reused by every chunk
    e = xp.empty_like(z)  # and their exponentials
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        zc, ec, hc, tc = z[:r1 - r0], e[:r1 - r0], hf[r0:r1], t[r0:r1]
        xp.matmul(hc, wte.T, out=zc)  # logits, (rows, V)
        picked, lse = xp.empty(r1 - r0, dtype=h.dtype), xp.empty(r1 - r0, dtype=h.dtype)
        # each row's softmax is its own: the chunk's rows are split over the CPU threads
        parallel_for(r1 - r0, partial(_head_rows, zc, ec, tc, weight[r0:r1], picked, lse,
                                      input_grad or param_grads), like=zc)
        nll = lse - picked  # -log p(target)
        loss += (nll * m[r0:r1]).sum()
        if not (input_grad or param_grads):
            continue
        if input_grad:
            # in the forward pass this was: z = h @ wte.T, so dh = dz @ wte
            xp.matmul(zc, wte, out=dh[r0:r1])
        if param_grads:
            # and dwte = dz^T h, summed over the chunks: the first chunk writes it, each later one adds
            # its share a block of vocabulary rows at a time, through small (rows, C) scratch buffers
            # (never a second (V, C) array); the vocabulary is split over the CPU threads, each block's
            # product and sum on one thread
            if dwte is None:
                dwte = zc.T @ hc  # (V, C)
                continue
            vocab_rows = max(1, min(V, LOSS_CHUNK_BYTES // 8 // (C * h.itemsize)))
            parallel_for(V, partial(_add_dwte_rows, dwte, zc, hc, vocab_rows), like=zc, grain=vocab_rows,
                         products=True, scratch=lambda s, e: xp.empty((min(vocab_rows, e - s), C), dtype=h.dtype))
    loss /= count
    return loss, (dh, dwte, h.shape)


def _add_dwte_rows(dwte, dz, h, block, start, stop, scratch):
    """dwte[start:stop] += dz[:, start:stop]^T h, `block` vocabulary rows at a time through one scratch."""
    xp = array_module(dz)
    for v0 in range(start, stop, block):
        v1 = min(v0 + block, stop)
        dwte[v0:v1] += xp.matmul(dz[:, v0:v1].T, h, out=scratch[:v1 - v0])


def _head_rows(z, e, t, weight, picked, lse, gradient, start, stop):
    """Rows [start, stop) of one chunk of tied_head_cross_entropy_forward, in place: picked = zs[t], lse = log sum
    exp(zs) and, when gradient, dz over the logits z (e: scratch for exp(zs))."""
    xp = array_module(z)
    z, e, t = z[start:stop], e[start:stop], t[start:stop]
    # log softmax(z)[t] = zs[t] - log sum exp(zs), with zs = z - max(z) (stable)
    z -= z.max(axis=-1, keepdims=True)
    rows = xp.arange(stop - start)
    picked[start:stop] = z[rows, t]  # zs at the targets
    lse[start:stop] = xp.log(xp.exp(z, out=e).sum(axis=-1))  # log sum exp
    if gradient:
        # dz = m_i (softmax - onehot(t_i)) / sum(m), softmax = exp(zs - lse), written over the logits
        z -= lse[start:stop, None]
        xp.exp(z, out=z)
        z[rows, t] -= 1.0
        z *= weight[start:stop, None]


def tied_head_cross_entropy_backward(dloss, cache):
    """Returns (dh (N..., C), dwte (V, C)): the gradients the forward formed, times dloss (None where the
    forward formed none). dloss = 1.0, the training step's, returns them as they are (no copy)."""
    dh, dwte, shape = cache
    if dh is not None:
        dh = dh.reshape(shape)
    if isinstance(dloss, float) and dloss == 1.0:
        return dh, dwte
    return (None if dh is None else dh * dloss), (None if dwte is None else dwte * dloss)
