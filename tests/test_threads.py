"""The elementwise loops split over CPU threads (minilora/threads.py) give the numbers of one thread, bit for bit.

BLAS is kept at one thread throughout (its sums do depend on the count); only threads.cpu_threads, the
count the elementwise loops split by, is raised, so any difference would come from the split itself.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from minilora import ops, optim, threads


def run(monkeypatch, count, fn):
    """fn() with the elementwise loops split over `count` threads (BLAS at 1)."""
    with monkeypatch.context() as m, threadpool_limits(1, user_api="blas"):
        m.setattr(threads, "cpu_threads", lambda: count)
        return fn()


def test_split_range_covers_the_loop_in_whole_grains():
    assert threads.split_range(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert threads.split_range(10, 2, grain=4) == [(0, 8), (8, 10)]
    assert threads.split_range(3, 4, grain=4) == [(0, 3)]
    assert threads.split_range(0, 2) == []
    for n, k, g in [(1, 1, 1), (7, 2, 3), (100, 3, 16), (2**20 + 5, 2, 2**16)]:
        parts = threads.split_range(n, k, g)
        assert len(parts) <= k and parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert all((e - s) % g == 0 for s, e in parts[:-1])


def test_parallel_for_runs_every_part_once_and_raises_a_parts_error(monkeypatch):
    seen = []
    run(monkeypatch, 3, lambda: threads.parallel_for(10, lambda s, e: seen.append((s, e))))
    assert sorted(seen) == [(0, 4), (4, 8), (8, 10)]

    def fail(s, e):
        if s > 0:
            raise ValueError(f"part {s}")

    with pytest.raises(ValueError, match="part 4"):
        run(monkeypatch, 3, lambda: threads.parallel_for(10, fail))


def test_cpu_threads_follows_the_blas_pool():
    with threadpool_limits(1, user_api="blas"):
        assert threads.cpu_threads() == 1
    with threadpool_limits(2, user_api="blas"):
        assert threads.cpu_threads() == 2


@pytest.mark.parametrize("count", [2, 3])
def test_adamw_split_over_threads_is_bit_identical(monkeypatch, count):
    rng = np.random.default_rng(0)
    # sizes that are not whole blocks, one strided parameter (updated in a copy, written back)
    shapes = {"W": (3 * optim.BLOCK + 5,), "M": (400, 700), "b": (7,)}

    def steps():
        params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        params["T"] = rng.standard_normal((300, 200)).astype(np.float32).T  # not C-contiguous
        state = optim.adamw_init(params, list(params))
        for _ in range(3):
            grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
            optim.adamw_step(params, grads, state, 1e-2, weight_decay=0.1)
        return params, state

    rng = np.random.default_rng(0)
    one_p, one_s = run(monkeypatch, 1, steps)
    rng = np.random.default_rng(0)
    many_p, many_s = run(monkeypatch, count, steps)
    for name in one_p:
        assert np.array_equal(one_p[name], many_p[name]), name
        assert np.array_equal(one_s["m"][name], many_s["m"][name]) and np.array_equal(one_s["v"][name],
                                                                                     many_s["v"][name])
    assert not np.array_equal(one_p["T"], np.zeros_like(one_p["T"]))


@pytest.mark.parametrize("count", [2, 3])
def test_gelu_layer_norm_attention_and_the_chunked_head_split_over_threads_are_bit_identical(monkeypatch, count):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2 * ops._BLOCK // 3 + 11)).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    h = rng.standard_normal((2, 37, 16)).astype(np.float32)
    wte = rng.standard_normal((301, 16)).astype(np.float32)
    t = rng.integers(0, 301, (2, 37))
    mask = (rng.random((2, 37)) < 0.8).astype(np.float32)
    q, k, v, da = (rng.standard_normal((5, 70, 24)).astype(np.float32) for _ in range(4))  # 5 sequences, 4 heads
    g, b = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)

    def compute():
        out, cache = ops.gelu_forward(x)
        loss, c = ops.tied_head_cross_entropy_forward(h, wte, t, mask, chunk_rows=23)
        att, c_att = ops.attention_forward(q, k, v, 4)
        ln, c_ln = ops.layer_norm_forward(q, g, b)
        return [out, ops.gelu_backward(dout, cache), loss, *ops.tied_head_cross_entropy_backward(1.0, c),
                att, *ops.attention_backward(da, c_att), ln, *ops.layer_norm_backward(da, c_ln)]

    one, many = run(monkeypatch, 1, compute), run(monkeypatch, count, compute)
    for a, b in zip(one, many):
        assert np.array_equal(a, b)


def test_a_forked_child_makes_its_own_pool(monkeypatch):
    # a pool made before a fork has no threads in the child: the child must not wait on it
    import os

    seen = []
    run(monkeypatch, 2, lambda: threads.parallel_for(4, lambda s, e: seen.append(s)))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same loop, which would hang on the parent's pool
        try:
            out = []
            threads.cpu_threads = lambda: 2
            threads.parallel_for(4, lambda s, e: out.append(s))
            os.write(w, b"ok" if sorted(out) == [0, 2] else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    import select

    ready, _, _ = select.select([r], [], [], 20)
    got = os.read(r, 8) if ready else b"timeout"
    if not ready:
        os.kill(pid, 9)  # the child hung on the parent's pool
    os.waitpid(pid, 0)
    assert sorted(seen) == [0, 2] and got == b"ok"
