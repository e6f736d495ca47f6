"""Causal attention computed block by block (ops._causal_blocks) equals the whole-square formula.

The forward computes, for each block of queries t0..t1-1, only the scores against
keys 0..t1-1; the backward mirrors it. With blocks of 2 and T = 7 (a ragged last
block) every code path runs at a size finite differences can check in float64.
"""

import math

import numpy as np
import pytest

import standin as sp
from minilora import gradcheck, ops

B, T, NH, hs = 2, 7, 2, 3


def reference_attention(q, k, v, n_heads):
    """The whole (T, T) square, masked with -inf above the diagonal: the textbook formula."""
    B, T, C = q.shape
    h = C // n_heads
    qh, kh, vh = (a.reshape(B, T, n_heads, h).transpose(0, 2, 1, 3) for a in (q, k, v))
    S = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(h)
    S = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, S)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    return (P @ vh).transpose(0, 2, 1, 3).reshape(B, T, C), P


@pytest.fixture(params=[1, 2, 3, 64])
def block(request, monkeypatch):
    monkeypatch.setattr(ops, "_CAUSAL_BLOCK", request.param)
    return request.param


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, T, NH * hs)) for _ in range(3)]


def test_blocks_cover_every_row_once(block):
    blocks = ops._causal_blocks(T)
    assert blocks[0][0] == 0 and blocks[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_blocked_forward_equals_the_whole_square(block):
    q, k, v = _qkv()
    out, cache = ops.attention_forward(q, k, v, NH)
    ref, P = reference_attention(q, k, v, NH)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache[3], P, rtol=1e-12, atol=1e-12)  # 0 above the diagonal, never garbage


def test_blocked_backward_matches_finite_differences(block):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(2)
    results = gradcheck.check_op("attention", lambda q, k, v: ops.attention_forward(q, k, v, NH),
                                 ops.attention_backward, {"q": q, "k": k, "v": v}, {"q": 0, "k": 1, "v": 2}, rng)
    assert len(results) == 3
    for r in results:
        assert r.error <= 1e-7, (block, r)


def test_blocked_attention_runs_on_device_arrays(block):
    q, k, v = _qkv(3)
    dout = np.random.default_rng(4).standard_normal(q.shape)
    out, cache = ops.attention_forward(q, k, v, NH)
    grads = ops.attention_backward(dout, cache)
    dq = [sp.asarray(a) for a in (q, k, v)]
    out_d, cache_d = ops.attention_forward(*dq, NH)
    grads_d = ops.attention_backward(sp.asarray(dout), cache_d)
    np.testing.assert_allclose(sp.asnumpy(out_d), out, rtol=1e-12, atol=1e-12)
    for g, g_d in zip(grads, grads_d):
        np.testing.assert_allclose(sp.asnumpy(g_d), g, rtol=1e-12, atol=1e-12)
