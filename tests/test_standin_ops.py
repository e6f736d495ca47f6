"""Every op, forward and backward, on device arrays: the same numbers as NumPy.

Each op runs on NumPy (the reference) and on each backend of the `xp`
fixture (NumPy, the CPU stand-in for CuPy, CuPy where a GPU is), from the same
host inputs. Tolerances, |device - numpy| <= atol + rtol |numpy|:

    float64: rtol 1e-10, atol 1e-12   (only the summation order may differ)
    float32: rtol 1e-4,  atol 1e-5    (GPU kernels reorder float32 sums)

The stand-in computes with NumPy underneath, so on it the two agree exactly;
what it checks is that every line accepts device arrays, returns device
arrays and keeps no host array in its cache. The float64 gradient checks then
run on the device arrays themselves, and a planted host-only call proves that
the stand-in fails where CuPy would.
"""

import numpy as np
import pytest

import standin as sp
from minilora import backend, gradcheck, ops
from minilora.methods import lora

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}
B, T, C, V, NH, R, OUT = 2, 5, 8, 11, 2, 3, 6


def _cases(dtype, seed=0):
    """op name -> (forward(*args), backward, host args, argument names whose gradients come back)."""
    rng = np.random.default_rng(seed)

    def n(*shape):
        return rng.standard_normal(shape).astype(dtype)

    ids = rng.integers(0, V, (B, T))
    keep = rng.random((B, T, C)) >= 0.3
    targets = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(dtype)
    mask[0, 0] = 1.0
    s = lora.lora_scale(R, 2.0 * R)
    return {
        "embedding": (ops.embedding_forward, ops.embedding_backward, [ids, n(V, C)], ["wte"]),
        "linear": (ops.linear_forward, ops.linear_backward, [n(B, T, C), n(OUT, C), n(OUT)], ["x", "W", "b"]),
        "linear (frozen)": (ops.linear_forward, lambda d, c: ops.linear_backward(d, c, param_grads=False)[:1],
                            [n(B, T, C), n(OUT, C), n(OUT)], ["x"]),
        "layer_norm": (ops.layer_norm_forward, ops.layer_norm_backward,
                       [2.0 * n(B, T, C) + 0.5, 1.0 + 0.3 * n(C), n(C)], ["x", "g", "b"]),
        "gelu": (ops.gelu_forward, ops.gelu_backward, [n(B, T, C)], ["x"]),
        "softmax": (ops.softmax_forward, ops.softmax_backward, [2.0 * n(B, T, C)], ["x"]),
        "attention": (lambda q, k, v: ops.attention_forward(q, k, v, NH), ops.attention_backward,
                      [n(B, T, C), n(B, T, C), n(B, T, C)], ["q", "k", "v"]),
        "dropout (mask)": (lambda x, m: ops.dropout_forward(x, 0.3, mask=m), ops.dropout_backward,
                           [n(B, T, C), keep], ["x"]),
        "cross_entropy": (lambda z, t, m: ops.cross_entropy_forward(z, t, m), ops.cross_entropy_backward,
                          [2.0 * n(B, T, V), targets, mask], ["logits"]),
        "cross_entropy (no mask)": (lambda z, t: ops.cross_entropy_forward(z, t), ops.cross_entropy_backward,
                                    [2.0 * n(B, T, V), targets], ["logits"]),
        "lora_linear": (lambda x, W, b, A, Bm, m: lora.lora_linear_forward(x, W, b, A, Bm, s, 0.25, dropout_mask=m),
                        lora.lora_linear_backward,
                        [n(B, T, C), n(OUT, C), n(OUT), n(R, C), n(OUT, R), keep[..., :C]], ["x", "A", "B"]),
    }


OPS = list(_cases(np.float64))


def _run(xp, forward, backward, host_args, seed=1):
    """Forward and backward on module xp from host inputs; returns (out, grads, cache)."""
    args = [backend.to_device(a, xp) for a in host_args]
    out, cache = forward(*args)
    dout_host = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    dout = 0.7 if out.ndim == 0 else backend.to_device(dout_host, xp)  # a loss takes a Python float
    grads = backward(dout, cache)
    return out, grads if isinstance(grads, tuple) else (grads,), cache


def _host_arrays_in(obj):
    """Every NumPy ndarray inside a (nested) cache."""
    if isinstance(obj, np.ndarray):
        return [obj.shape]
    if isinstance(obj, (tuple, list)):
        return [s for o in obj for s in _host_arrays_in(o)]
    return []


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("op", OPS)
def test_op_forward_and_backward_match_numpy(xp, op, dtype):
    forward, backward, host_args, _ = _cases(dtype)[op]
    ref_out, ref_grads, _ = _run(np, forward, backward, host_args)
    out, grads, cache = _run(xp, forward, backward, host_args)
    assert backend.array_module(out) is xp and out.dtype == dtype
    np.testing.assert_allclose(backend.to_numpy(out), ref_out, **TOL[dtype], err_msg=f"{op} forward")
    assert len(grads) == len(ref_grads)
    for g, ref in zip(grads, ref_grads):
        assert backend.array_module(g) is xp and g.dtype == dtype, op
        np.testing.assert_allclose(backend.to_numpy(g), ref, **TOL[dtype], err_msg=f"{op} backward")
    if xp is not np:
        assert _host_arrays_in(cache) == [], f"{op} keeps host arrays in its cache"


def test_dropout_drawn_from_the_same_generator_matches_numpy(xp):
    x = np.random.default_rng(0).standard_normal((B, T, C)).astype(np.float32)
    ref, _ = ops.dropout_forward(x, 0.4, np.random.default_rng(5))
    out, _ = ops.dropout_forward(backend.to_device(x, xp), 0.4, np.random.default_rng(5))
    np.testing.assert_array_equal(backend.to_numpy(out), ref)  # the mask is drawn on the host, then moved


def _device_numerical_gradient(f, x, h=1e-3):
    """d f() / d x at every coordinate, perturbing the device array x in place (f returns a float)."""
    grad = np.zeros(x.shape)
    for i in np.ndindex(*x.shape):
        old = x[i].copy()

        def value_at(d):
            x[i] = old + d
            return f()

        grad[i] = gradcheck._stencil(value_at, h)
        x[i] = old
    return grad


@pytest.mark.parametrize("op", OPS)
def test_op_gradients_on_device_arrays_match_finite_differences(device_xp, op):
    """float64, every coordinate of every differentiated argument, all on device arrays."""
    xp = device_xp
    forward, backward, host_args, names = _cases(np.float64, seed=2)[op]
    args = [backend.to_device(a, xp) for a in host_args]
    out, cache = forward(*args)
    dout = 0.7 if out.ndim == 0 else backend.to_device(np.random.default_rng(3).standard_normal(out.shape), xp)
    grads = backward(dout, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    positions = {"embedding": [1], "linear (frozen)": [0], "dropout (mask)": [0], "cross_entropy": [0],
                 "cross_entropy (no mask)": [0], "lora_linear": [0, 3, 4]}.get(op, list(range(len(names))))
    for name, pos, g in zip(names, positions, grads):
        x = args[pos]

        def f():
            return float((forward(*args)[0] * dout).sum())

        num = _device_numerical_gradient(f, x)
        err = gradcheck.rel_error(backend.to_numpy(g), num)
        assert err <= gradcheck.TOLERANCE, f"{op} d/d{name} on {xp.__name__}: rel error {err:.2e}"


def test_gradcheck_module_runs_on_device_arrays():
    rng = np.random.default_rng(0)
    args = {"x": sp.asarray(rng.standard_normal((3, 4))), "W": sp.asarray(rng.standard_normal((2, 4)))}
    results = gradcheck.check_op("linear", ops.linear_forward, ops.linear_backward, args, {"x": 0, "W": 1}, rng)
    assert all(r.passed for r in results)


# --- the stand-in can fail: host-only calls planted in an op -------------------------------------------


def _planted_asarray(x):
    """gelu, but it first pulls its input to the host, as a NumPy habit would."""
    np.asarray(x)
    return GELU(x)


def _planted_host_table(ids, wte):
    """embedding that indexes a NumPy copy of a table with the device ids."""
    table = np.zeros((V, C))
    table[ids]
    return EMBED(ids, wte)


def _planted_host_mixing(x, g, b):
    """layer norm with a host bias mixed into device arithmetic."""
    return LAYER_NORM(x + np.zeros(x.shape[-1]), g, b)


GELU, EMBED, LAYER_NORM = ops.gelu_forward, ops.embedding_forward, ops.layer_norm_forward
PLANTED = {"gelu_forward": _planted_asarray, "embedding_forward": _planted_host_table,
           "layer_norm_forward": _planted_host_mixing}


@pytest.mark.parametrize("op_name", list(PLANTED))
def test_a_planted_host_only_call_fails_on_the_device_and_not_on_numpy(monkeypatch, device_xp, op_name):
    from minilora import model
    from minilora.model import ModelConfig

    config = ModelConfig(vocab_size=V, context_length=T, d_model=C, n_heads=NH, n_layers=1, d_ff=12)
    host = model.init_params(config, 0, dtype=np.float64)
    x = np.random.default_rng(0).integers(0, V, (B, T))
    monkeypatch.setattr(ops, op_name, PLANTED[op_name])
    batch = {"x": x, "y": x}
    model.loss_and_grads(host, config, batch, trainable=set(host))  # NumPy cannot see the bug
    with pytest.raises(TypeError):
        model.loss_and_grads(model.params_to(host, device_xp), config, batch, trainable=set(host))
