"""Every op's backward against finite differences, plus the properties the ops promise."""

import ast
import inspect

import numpy as np
import pytest

from minilora import gradcheck, ops
from minilora.methods import lora

OP_RESULTS = [r for seed in (0, 1, 2) for r in gradcheck.run_checks(["ops"], seed=seed)]


@pytest.mark.parametrize("result", OP_RESULTS, ids=lambda r: f"{r.op}-d{r.argument}")
def test_op_gradients_match_finite_differences(result):
    assert result.error <= 1e-6, f"{result.op} d/d{result.argument}: rel error {result.error:.2e}"


def test_every_op_and_argument_is_checked():
    checked = {(r.op, r.argument) for r in OP_RESULTS}
    expected = {
        ("embedding", "wte"),
        ("linear", "x"), ("linear", "W"), ("linear", "b"), ("linear (frozen)", "x"),
        ("layer_norm", "x"), ("layer_norm", "g"), ("layer_norm", "b"),
        ("gelu", "x"), ("softmax", "x"),
        ("attention", "q"), ("attention", "k"), ("attention", "v"),
        ("dropout", "x"), ("cross_entropy", "logits"),
        ("lora_linear", "x"), ("lora_linear", "A"), ("lora_linear", "B"),
        ("tied_head_cross_entropy (chunked)", "h"), ("tied_head_cross_entropy (chunked)", "wte"),
        ("tied_head_cross_entropy (one chunk)", "h"), ("tied_head_cross_entropy (one chunk)", "wte"),
    }
    assert expected <= checked


def test_gradient_check_catches_a_wrong_backward():
    rng = np.random.default_rng(0)

    def bad_gelu_backward(dout, cache):
        return 1.01 * ops.gelu_backward(dout, cache)  # 1% off

    res = gradcheck.check_op("gelu", ops.gelu_forward, bad_gelu_backward,
                             {"x": rng.uniform(0.1, 2.0, (3, 4))}, {"x": 0}, rng)
    assert res[0].error > 1e-3 and not res[0].passed


def test_projected_check_catches_a_wrong_backward(monkeypatch):
    monkeypatch.setattr(gradcheck, "FULL_CHECK_MAX_SIZE", 0)  # force the projected path
    rng = np.random.default_rng(0)
    args = {"x": rng.standard_normal((4, 6)), "W": rng.standard_normal((5, 6)), "b": rng.standard_normal(5)}

    def bad_linear_backward(dout, cache):
        dx, dW, db = ops.linear_backward(dout, cache)
        return dx, dW * 1.01, db

    good = gradcheck.check_op("linear", ops.linear_forward, ops.linear_backward, dict(args), {"W": 1}, rng)
    bad = gradcheck.check_op("linear", ops.linear_forward, bad_linear_backward, dict(args), {"W": 1}, rng)
    assert good[0].method == "projected" and good[0].passed
    assert bad[0].error > 1e-3


class Recording(np.ndarray):
    """An ndarray that logs the output shape of every matrix product it takes part in."""

    log = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(i) if isinstance(i, Recording) else i for i in inputs)
        if "out" in kwargs:  # an in-place update (y += b) writes through the plain view
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, Recording) else o for o in kwargs["out"])
        out = getattr(ufunc, method)(*inputs, **kwargs)
        if ufunc is np.matmul:
            Recording.log.append(np.shape(out))
        return out.view(Recording) if isinstance(out, np.ndarray) else out

    def __array_function__(self, func, types, args, kwargs):
        if func in (np.dot, np.einsum, np.tensordot, np.inner, np.outer, np.kron):
            Recording.log.append(("products through", func.__name__))
        return super().__array_function__(func, types, args, kwargs)


def _rec(a):
    return np.asarray(a).view(Recording)


def test_recording_array_sees_a_dW_product():
    # the instrument works: a trainable linear does form the (out, in) product
    rng = np.random.default_rng(0)
    x, W = _rec(rng.standard_normal((11, 5))), _rec(rng.standard_normal((7, 5)))
    y, cache = ops.linear_forward(x, W)
    Recording.log = []
    ops.linear_backward(_rec(rng.standard_normal((11, 7))), cache, param_grads=True)
    assert (7, 5) in Recording.log


def test_frozen_linear_and_lora_backward_form_no_dW_product():
    rng = np.random.default_rng(0)
    n_tok, d_in, d_out, r = 11, 5, 7, 3  # all distinct, so (d_out, d_in) names W's shape only
    x = _rec(rng.standard_normal((n_tok, d_in)))
    W, b = _rec(rng.standard_normal((d_out, d_in))), _rec(rng.standard_normal(d_out))
    A, B = _rec(rng.standard_normal((r, d_in))), _rec(rng.standard_normal((d_out, r)))
    dout = _rec(rng.standard_normal((n_tok, d_out)))

    _, cache = ops.linear_forward(x, W, b)
    Recording.log = []
    dx, dW, db = ops.linear_backward(dout, cache, param_grads=False)
    assert dW is None and db is None
    assert (d_out, d_in) not in Recording.log and Recording.log == [(n_tok, d_in)]

    _, cache = lora.lora_linear_forward(x, W, b, A, B, lora.lora_scale(r, 2 * r))
    Recording.log = []
    grads = lora.lora_linear_backward(dout, cache)
    assert len(grads) == 3  # dx, dA, dB: there is no slot for dW
    assert (d_out, d_in) not in Recording.log, Recording.log  # neither dW nor B @ A
    assert not any(isinstance(e, tuple) and e and e[0] == "products through" for e in Recording.log)


def test_lora_forward_never_forms_BA():
    rng = np.random.default_rng(1)
    x = _rec(rng.standard_normal((11, 5)))
    W, A, B = _rec(rng.standard_normal((7, 5))), _rec(rng.standard_normal((3, 5))), _rec(rng.standard_normal((7, 3)))
    Recording.log = []
    y, _ = lora.lora_linear_forward(x, W, None, A, B, 2.0)
    assert (7, 5) not in Recording.log
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ (np.asarray(W) + 2.0 * np.asarray(B) @ np.asarray(A)).T,
                               rtol=1e-12, atol=1e-12)


def _float32_cases():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    ids = rng.integers(0, 9, (2, 4))
    keep = rng.random((2, 4, 6)) >= 0.5
    return {
        "embedding": (lambda: ops.embedding_forward(ids, f(9, 6)), ops.embedding_backward, (2, 4, 6)),
        "linear": (lambda: ops.linear_forward(f(2, 4, 6), f(5, 6), f(5)), ops.linear_backward, (2, 4, 5)),
        "layer_norm": (lambda: ops.layer_norm_forward(f(2, 4, 6), f(6), f(6)), ops.layer_norm_backward, (2, 4, 6)),
        "gelu": (lambda: ops.gelu_forward(f(2, 4, 6)), ops.gelu_backward, (2, 4, 6)),
        "softmax": (lambda: ops.softmax_forward(f(2, 4, 6)), ops.softmax_backward, (2, 4, 6)),
        "attention": (lambda: ops.attention_forward(f(2, 4, 6), f(2, 4, 6), f(2, 4, 6), 2), ops.attention_backward, (2, 4, 6)),
        "dropout": (lambda: ops.dropout_forward(f(2, 4, 6), 0.5, mask=keep), ops.dropout_backward, (2, 4, 6)),
        "cross_entropy": (lambda: ops.cross_entropy_forward(f(2, 4, 9), ids, np.ones((2, 4), np.float32)),
                          ops.cross_entropy_backward, ()),
        "tied_head_cross_entropy": (lambda: ops.tied_head_cross_entropy_forward(f(2, 4, 6), f(9, 6), ids,
                                                                                np.ones((2, 4), np.float32),
                                                                                chunk_rows=3),
                                    ops.tied_head_cross_entropy_backward, ()),
        "lora_linear": (lambda: lora.lora_linear_forward(f(2, 4, 6), f(5, 6), f(5), f(3, 6), f(5, 3), 2.0),
                        lora.lora_linear_backward, (2, 4, 5)),
    }


@pytest.mark.parametrize("name", list(_float32_cases()))
def test_ops_keep_float32(name):
    forward, backward, out_shape = _float32_cases()[name]
    out, cache = forward()
    assert out.dtype == np.float32 and out.shape == out_shape
    dout = np.ones(out_shape, np.float32) if out_shape else np.float32(1.0)
    grads = backward(dout, cache)
    for g in grads if isinstance(grads, tuple) else (grads,):
        assert g is not None and g.dtype == np.float32


def test_ops_module_does_not_use_numpy_directly():
    # every array call in ops goes through xp = array_module(...), so CuPy arrays stay on the GPU
    tree = ast.parse(inspect.getsource(ops))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"numpy", "cupy", "scipy"}, imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"np", "numpy", "cp", "cupy"}


def test_attention_is_causal_and_masks_with_minus_inf():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 4)) for _ in range(3))
    out, cache = ops.attention_forward(q, k, v, 2)
    P = cache[3]
    assert np.all(P[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0.0)
    np.testing.assert_allclose(P.sum(-1), 1.0)
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:], v2[:, 4:] = 100.0, -100.0  # change the future only
    out2, _ = ops.attention_forward(q, k2, v2, 2)
    np.testing.assert_array_equal(out[:, :4], out2[:, :4])


def test_softmax_is_stable_for_large_inputs():
    p, _ = ops.softmax_forward(np.array([[1000.0, 1001.0, -np.inf]]))
    np.testing.assert_allclose(p, [[1 / (1 + np.e), np.e / (1 + np.e), 0.0]])


def test_cross_entropy_value_and_mask():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    targets = np.array([[0, 2]])
    loss, _ = ops.cross_entropy_forward(logits, targets)
    assert np.isclose(loss, -(np.log(0.5) + np.log(0.8)) / 2)
    loss, _ = ops.cross_entropy_forward(logits, targets, np.array([[0.0, 1.0]]))
    assert np.isclose(loss, -np.log(0.8))


def test_dropout_keeps_expectation_and_uses_the_generator():
    x = np.ones((200, 200), np.float32)
    out, _ = ops.dropout_forward(x, 0.25, np.random.default_rng(0))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert abs(out.mean() - 1.0) < 0.02
    out2, _ = ops.dropout_forward(x, 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(out, out2)


def test_layer_norm_output_is_normalised():
    x = np.random.default_rng(0).standard_normal((3, 16)) * 5 + 2
    out, _ = ops.layer_norm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("call, argument", [
    (lambda: ops.linear_forward(np.ones((2, 3)), np.ones((4, 5))), "W"),
    (lambda: ops.linear_forward(np.ones((2, 3)), np.ones((4, 3), np.float32)), "W"),
    (lambda: ops.linear_forward(np.ones((2, 3)), np.ones((4, 3)), np.ones(3)), "b"),
    (lambda: ops.linear_forward(np.ones((2, 3), int), np.ones((4, 3))), "x"),
    (lambda: ops.embedding_forward(np.array([[0, 9]]), np.ones((9, 4))), "ids"),
    (lambda: ops.embedding_forward(np.array([[-1, 2]]), np.ones((9, 4))), "ids"),
    (lambda: ops.embedding_forward(np.array([[0.0, 2.0]]), np.ones((9, 4))), "ids"),
    (lambda: ops.layer_norm_forward(np.ones((2, 3)), np.ones(4), np.ones(3)), "g"),
    (lambda: ops.attention_forward(np.ones((1, 2, 6)), np.ones((1, 2, 6)), np.ones((1, 3, 6)), 2), "v"),
    (lambda: ops.attention_forward(np.ones((1, 2, 6)), np.ones((1, 2, 6)), np.ones((1, 2, 6)), 4), "n_heads"),
    (lambda: ops.cross_entropy_forward(np.ones((2, 5)), np.array([0, 5])), "targets"),
    (lambda: ops.cross_entropy_forward(np.ones((2, 5)), np.array([0, 1, 2])), "targets"),
    (lambda: ops.cross_entropy_forward(np.ones((2, 5)), np.array([0, 1]), np.zeros(2)), "mask"),
    (lambda: ops.tied_head_cross_entropy_forward(np.ones((2, 3)), np.ones((5, 4)), np.array([0, 1])), "wte"),
    (lambda: ops.tied_head_cross_entropy_forward(np.ones((2, 3)), np.ones((5, 3)), np.array([0, 5])), "targets"),
    (lambda: ops.tied_head_cross_entropy_forward(np.ones((2, 3)), np.ones((5, 3)), np.array([0, 1]),
                                                 np.zeros(2)), "mask"),
    (lambda: ops.tied_head_cross_entropy_forward(np.ones((2, 3)), np.ones((5, 3)), np.array([0, 1]),
                                                 chunk_rows=0), "chunk_rows"),
    (lambda: ops.dropout_forward(np.ones(3), 1.0), "p"),
    (lambda: lora.lora_scale(0, 16), "rank"),
    (lambda: lora.lora_scale(-2, 16), "rank"),
    (lambda: lora.lora_scale(8, 0.0), "alpha"),
    (lambda: lora.lora_scale(8, -1.0), "alpha"),
    (lambda: lora.lora_linear_forward(np.ones((2, 3)), np.ones((4, 3)), None, np.ones((2, 5)), np.ones((4, 2)), 1.0), "A"),
    (lambda: lora.lora_linear_forward(np.ones((2, 3)), np.ones((4, 3)), None, np.ones((2, 3)), np.ones((4, 3)), 1.0), "B"),
])
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, got .+"):
        call()


def test_lora_scale_values():
    assert lora.lora_scale(8, 16) == 2.0
    assert lora.lora_scale(16, 16, rslora=True) == 4.0


def _head_case(N=37, C=6, V=13, seed=0):
    rng = np.random.default_rng(seed)
    h, wte = rng.standard_normal((N, C)), rng.standard_normal((V, C))
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) < 0.6).astype(np.float64)
    mask[0] = 1.0
    return h, wte, targets, mask


@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 100])
def test_chunked_head_loss_equals_linear_then_cross_entropy(chunk_rows):
    # the same loss and gradients as the unchunked head (logits = h @ wte.T, then the masked mean
    # cross-entropy), whether the chunks divide N = 37 or leave a partial last one
    h, wte, targets, mask = _head_case()
    logits, c_lin = ops.linear_forward(h, wte)
    ref, c_ce = ops.cross_entropy_forward(logits, targets, mask)
    dh_ref, dwte_ref, _ = ops.linear_backward(ops.cross_entropy_backward(1.0, c_ce), c_lin)
    loss, cache = ops.tied_head_cross_entropy_forward(h, wte, targets, mask, chunk_rows=chunk_rows)
    dh, dwte = ops.tied_head_cross_entropy_backward(1.0, cache)
    assert abs(float(loss) - float(ref)) < 1e-12
    np.testing.assert_allclose(dh, dh_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(dwte, dwte_ref, rtol=0, atol=1e-13)
    assert not dh[mask == 0].any()  # a position the mask leaves out sends no gradient


def test_chunked_head_loss_forms_only_the_gradients_asked_for():
    h, wte, targets, mask = _head_case()
    full, _ = ops.tied_head_cross_entropy_forward(h, wte, targets, mask, chunk_rows=4)
    for input_grad, param_grads in ((True, False), (False, True), (False, False)):
        loss, cache = ops.tied_head_cross_entropy_forward(h, wte, targets, mask, input_grad=input_grad,
                                                          param_grads=param_grads, chunk_rows=4)
        assert float(loss) == float(full)
        dh, dwte = ops.tied_head_cross_entropy_backward(2.0, cache)
        assert (dh is not None) == input_grad and (dwte is not None) == param_grads


def test_chunked_head_loss_never_holds_the_whole_logits():
    import tracemalloc

    rng = np.random.default_rng(0)
    N, C, V = 512, 8, 4096  # the logits would be N * V * 8 = 16 MiB
    h, wte, targets = rng.standard_normal((N, C)), rng.standard_normal((V, C)), rng.integers(0, V, N)
    rows = ops.loss_chunk_rows(V, 8, budget=2**20)
    assert rows == 16
    tracemalloc.start()
    ops.tied_head_cross_entropy_forward(h, wte, targets, param_grads=False, chunk_rows=rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20 + 2 * h.nbytes, f"peak {peak} bytes: more than one chunk of logits"


def test_chunked_head_adds_dwte_a_block_of_vocabulary_at_a_time(monkeypatch):
    # later chunks add their dz^T h into dwte through a (vocab_rows, C) scratch: with a budget giving
    # blocks of 3 rows of V = 13 (the last one partial), dwte is still linear then cross-entropy's
    h, wte, targets, mask = _head_case()
    logits, c_lin = ops.linear_forward(h, wte)
    _, c_ce = ops.cross_entropy_forward(logits, targets, mask)
    _, dwte_ref, _ = ops.linear_backward(ops.cross_entropy_backward(1.0, c_ce), c_lin)
    monkeypatch.setattr(ops, "LOSS_CHUNK_BYTES", 8 * 3 * wte.shape[1] * 8)  # vocab_rows = 3
    _, cache = ops.tied_head_cross_entropy_forward(h, wte, targets, mask, input_grad=False, chunk_rows=5)
    np.testing.assert_allclose(ops.tied_head_cross_entropy_backward(1.0, cache)[1], dwte_ref, rtol=0, atol=1e-13)


def test_one_chunk_gives_linear_then_cross_entropys_numbers_bit_for_bit():
    # float32, in this process: every token's logits in one chunk computes the same lines in the same
    # order as linear_forward + cross_entropy_forward / _backward + linear_backward
    h, wte, targets, mask = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in _head_case())
    logits, c_lin = ops.linear_forward(h, wte)
    ref, c_ce = ops.cross_entropy_forward(logits, targets, mask)
    dh_ref, dwte_ref, _ = ops.linear_backward(ops.cross_entropy_backward(1.0, c_ce), c_lin)
    loss, cache = ops.tied_head_cross_entropy_forward(h, wte, targets, mask)
    dh, dwte = ops.tied_head_cross_entropy_backward(1.0, cache)
    assert loss.dtype == np.float32 and loss == ref
    assert np.array_equal(dh, dh_ref) and np.array_equal(dwte, dwte_ref)


def test_embedding_backward_into_adds_the_rows_of_the_tokens_seen_into_the_given_gradient(xp):
    # the tied embedding: the head's dwte gets the lookup's rows added in place, the same numbers as a
    # fresh dwte added to it (float32, bit for bit on the CPU), and only the seen tokens' rows change
    from minilora.backend import to_device, to_numpy

    rng = np.random.default_rng(4)
    ids = rng.integers(0, 11, (3, 5))
    ids[0, :2] = 7  # a repeated token
    dout = rng.standard_normal((3, 5, 4)).astype(np.float32)
    head = rng.standard_normal((11, 4)).astype(np.float32)
    _, cache = ops.embedding_forward(to_device(ids, xp), to_device(rng.standard_normal((11, 4)).astype(np.float32), xp))
    fresh = to_numpy(ops.embedding_backward(to_device(dout, xp), cache))
    into = to_device(head.copy(), xp)
    out = ops.embedding_backward(to_device(dout, xp), cache, into=into)
    assert out is into
    got = to_numpy(out)
    np.testing.assert_array_equal(got, head + fresh) if xp is np else np.testing.assert_allclose(got, head + fresh, rtol=1e-6)
    unseen = sorted(set(range(11)) - set(ids.ravel().tolist()))
    assert unseen and np.array_equal(got[unseen], head[unseen])
    with pytest.raises(ValueError, match="into"):
        ops.embedding_backward(to_device(dout, xp), cache, into=to_device(head[:5], xp))
