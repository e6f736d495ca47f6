"""lora_shared_input_forward/backward: q, k and v's adapters, which read the same input, as one op.

It must give the numbers of separate lora_linear calls (no adapter dropout), pass
float64 finite differences for x and every A and B, run on device arrays, and
never form an (out, in) product (no dW, no B @ A).
"""

import numpy as np
import pytest

import standin as sp
from minilora import gradcheck
from minilora.methods import lora

N_B, T, IN, R = 2, 3, 5, 2
OUTS = (4, 7, 4)  # the outputs may differ (none equal to N = 6 tokens); the rank is shared
S = 1.5


def _layers(rng, bias=(True, False, True)):
    return [(rng.standard_normal((o, IN)), rng.standard_normal(o) if has_b else None,
             rng.standard_normal((R, IN)), rng.standard_normal((o, R))) for o, has_b in zip(OUTS, bias)]


def test_shared_input_equals_separate_lora_linears():
    rng = np.random.default_rng(0)
    x, layers = rng.standard_normal((N_B, T, IN)), _layers(rng)
    douts = [rng.standard_normal((N_B, T, o)) for o in OUTS]
    ys, cache = lora.lora_shared_input_forward(x, layers, S)
    dx, dAs, dBs = lora.lora_shared_input_backward(douts, cache)
    dx_sum = np.zeros_like(x)
    for (W, b, A, B), y, dout, dA, dB in zip(layers, ys, douts, dAs, dBs):
        y1, c1 = lora.lora_linear_forward(x, W, b, A, B, S)
        dx1, dA1, dB1 = lora.lora_linear_backward(dout, c1)
        np.testing.assert_allclose(y, y1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dA, dA1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dB, dB1, rtol=1e-12, atol=1e-12)
        dx_sum += dx1
    np.testing.assert_allclose(dx, dx_sum, rtol=1e-12, atol=1e-12)
    none, dAs2, dBs2 = lora.lora_shared_input_backward(douts, cache, input_grad=False)
    assert none is None
    assert all(np.array_equal(a, b) for a, b in zip(dAs + dBs, dAs2 + dBs2))


@pytest.mark.parametrize("wrt", ["x", "A0", "B0", "A1", "B1", "A2", "B2"])
def test_shared_input_gradients_match_finite_differences(wrt):
    """The n outputs, concatenated, are one function of (x, A_i, B_i): check each argument."""
    rng = np.random.default_rng(1)
    x, layers = rng.standard_normal((N_B, T, IN)), _layers(rng)
    args = {"x": x}
    for i, (_, _, A, B) in enumerate(layers):
        args[f"A{i}"], args[f"B{i}"] = A, B

    def forward(x, A0, B0, A1, B1, A2, B2):
        adapters = ((A0, B0), (A1, B1), (A2, B2))
        ys, cache = lora.lora_shared_input_forward(
            x, [(W, b, A, B) for (W, b, _, _), (A, B) in zip(layers, adapters)], S)
        return np.concatenate(ys, axis=-1), cache

    def backward(dout, cache):
        douts = np.split(dout, np.cumsum(OUTS)[:-1], axis=-1)
        dx, dAs, dBs = lora.lora_shared_input_backward(douts, cache)
        return (dx,) + tuple(g for pair in zip(dAs, dBs) for g in pair)

    index = {"x": 0, "A0": 1, "B0": 2, "A1": 3, "B1": 4, "A2": 5, "B2": 6}
    (result,) = gradcheck.check_op("lora_shared_input", forward, backward, args, {wrt: index[wrt]}, rng)
    assert result.error <= 1e-7, result


def test_shared_input_runs_on_device_arrays():
    rng = np.random.default_rng(2)
    x, layers = rng.standard_normal((N_B, T, IN)), _layers(rng)
    douts = [rng.standard_normal((N_B, T, o)) for o in OUTS]
    ys, cache = lora.lora_shared_input_forward(x, layers, S)
    grads = lora.lora_shared_input_backward(douts, cache)
    dev = [tuple(None if a is None else sp.asarray(a) for a in layer) for layer in layers]
    ys_d, cache_d = lora.lora_shared_input_forward(sp.asarray(x), dev, S)
    with sp.count_transfers() as t:
        grads_d = lora.lora_shared_input_backward([sp.asarray(d) for d in douts], cache_d)
    assert t.to_host == 0, t.events
    for y, y_d in zip(ys, ys_d):
        np.testing.assert_allclose(sp.asnumpy(y_d), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sp.asnumpy(grads_d[0]), grads[0], rtol=1e-12, atol=1e-12)
    for g, g_d in zip(grads[1] + grads[2], grads_d[1] + grads_d[2]):
        np.testing.assert_allclose(sp.asnumpy(g_d), g, rtol=1e-12, atol=1e-12)


def test_shared_input_forms_no_out_by_in_product():
    rng = np.random.default_rng(3)
    x, layers = rng.standard_normal((N_B, T, IN)), _layers(rng)
    douts = [rng.standard_normal((N_B, T, o)) for o in OUTS]
    _, cache = lora.lora_shared_input_forward(x, layers, S)
    shapes = []
    real_matmul = np.ndarray.__matmul__

    class Logged(np.ndarray):
        def __matmul__(self, other):
            out = real_matmul(np.asarray(self), np.asarray(other))
            shapes.append(out.shape)
            return out.view(Logged)

    logged = [d.view(Logged) for d in douts]
    x_, xa, A_all, caches, s = cache
    lora.lora_shared_input_backward(logged, (x_.view(Logged), xa.view(Logged), A_all.view(Logged), caches, s))
    assert shapes, "the instrument saw no product"
    assert not any(shape in {(o, IN) for o in OUTS} for shape in shapes), shapes
