"""The backward computes only what leads to a trainable parameter (model.backward).

When neither wte, wpe nor a prompt is trained, block 0 skips the dx of its q, k, v
products and its ln_1 backward, and blocks below the lowest trained one are not
visited. These tests assert that the pruned backward gives exactly the gradients
of the unpruned one: training wpe as well forces every dx to be computed, and
the other names' gradients must not change by a single bit.
"""

import numpy as np
import pytest

from minilora import model, ops
from minilora.methods import lora
from minilora.model import ModelConfig

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=3, d_ff=24)


def _batch(B=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, TINY.context_length)
    return {"x": rng.integers(0, 11, shape), "y": rng.integers(0, 11, shape)}


def _same_grads(params, config, trainable, dtype=np.float64):
    params = model.params_to(params, np, dtype)
    batch = _batch()
    loss, pruned = model.loss_and_grads(params, config, batch, trainable)
    loss_full, unpruned = model.loss_and_grads(params, config, batch, set(trainable) | {"wpe"})
    assert loss == loss_full
    assert set(pruned) == set(trainable)
    for name in trainable:
        assert np.array_equal(pruned[name], unpruned[name]), name
    return pruned


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), tuple(lora.TARGETS), ("o",), ("fc",)])
def test_pruned_lora_backward_gives_the_unpruned_gradients(targets):
    cfg = lora.LoraConfig(rank=2, targets=targets)
    params, config = lora.add_lora(model.init_params(TINY, 0), TINY, cfg)
    # B = 0 at init would make dA = 0 everywhere: give the adapters real values
    rng = np.random.default_rng(1)
    params = {n: (rng.standard_normal(p.shape).astype(p.dtype) * 0.1 if n.endswith("lora_B") else p)
              for n, p in params.items()}
    grads = _same_grads(params, config, lora.lora_names(params))
    assert all(np.abs(g).max() > 0 for g in grads.values())


@pytest.mark.parametrize("trainable", [
    ["h.1.attn.q.W", "h.2.mlp.fc.b"],  # block 0 never visited
    ["h.0.attn.k.W", "h.0.attn.v.b"],  # block 0 trained, but not its input
    ["h.0.ln_1.g", "h.1.ln_2.b"],  # ln_1 of block 0 trained: its backward runs
    ["ln_f.g", "ln_f.b"],  # no block visited at all
])
def test_pruned_backward_of_plain_weights_gives_the_unpruned_gradients(trainable):
    params = model.init_params(TINY, 0)
    _same_grads(params, TINY, trainable)


def test_lora_backward_skips_block_0_input_products(monkeypatch):
    """Counted: with wte and wpe frozen, the frozen base W of block 0's q, k, v get no dx product."""
    cfg = lora.LoraConfig(rank=2)
    params, config = lora.add_lora(model.init_params(TINY, 0), TINY, cfg)
    dx_products = []
    linear_backward = ops.linear_backward

    def counting(dout, cache, param_grads=True, input_grad=True):
        if input_grad:
            dx_products.append(cache[1].shape)
        return linear_backward(dout, cache, param_grads=param_grads, input_grad=input_grad)

    monkeypatch.setattr(ops, "linear_backward", counting)
    model.loss_and_grads(params, config, _batch(), lora.lora_names(params))
    pruned = len(dx_products)
    dx_products.clear()
    model.loss_and_grads(params, config, _batch(), lora.lora_names(params) + ["wpe"])
    # per block 6 linears (q, k, v, o, fc, proj) (the head's dx is formed in its fused loss,
    # ops.tied_head_cross_entropy_forward); block 0 drops q, k, v
    assert len(dx_products) == 6 * TINY.n_layers
    assert pruned == len(dx_products) - 3


def test_lora_linear_backward_without_input_grad():
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    A, B = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    dout = rng.standard_normal((2, 3, 4))
    _, cache = lora.lora_linear_forward(x, W, b, A, B, 2.0)
    dx, dA, dB = lora.lora_linear_backward(dout, cache)
    none, dA2, dB2 = lora.lora_linear_backward(dout, cache, input_grad=False)
    assert none is None and np.array_equal(dA, dA2) and np.array_equal(dB, dB2)
    _, cache = ops.linear_forward(x, W, b)
    dx, dW, db = ops.linear_backward(dout, cache)
    none, dW2, db2 = ops.linear_backward(dout, cache, input_grad=False)
    assert none is None and np.array_equal(dW, dW2) and np.array_equal(db, db2)


def test_frozen_linear_keeps_no_input_and_gives_the_same_dx():
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    dout = rng.standard_normal((2, 3, 4))
    y, cache = ops.linear_forward(x, W, b)
    y_frozen, frozen = ops.linear_forward(x, W, b, frozen=True)
    assert np.array_equal(y, y_frozen) and frozen[0] is None
    assert np.array_equal(ops.linear_backward(dout, cache, param_grads=False)[0],
                          ops.linear_backward(dout, frozen, param_grads=False)[0])
    with pytest.raises(ValueError, match="frozen"):
        ops.linear_backward(dout, frozen, param_grads=True)


def _cached_arrays(cache):
    if isinstance(cache, np.ndarray):
        return [cache]
    if isinstance(cache, (tuple, list)):
        return [a for c in cache for a in _cached_arrays(c)]
    return []


@pytest.mark.parametrize("strategy", ["lora", "prompt"])
def test_forward_given_trainable_keeps_less_and_backward_gives_the_same_gradients(strategy):
    from minilora.methods import prompt
    params = model.init_params(TINY, 0, dtype=np.float64)
    config = TINY
    if strategy == "lora":
        params, config = lora.add_lora(params, TINY, lora.LoraConfig(rank=2))
        trainable = set(lora.lora_names(params))
    else:
        params, trainable = prompt.add_prompt(params, 2), {"prompt"}
    x = _batch()["x"]
    dh = np.random.default_rng(5).standard_normal((3, TINY.context_length, TINY.d_model))
    grads = []
    for keep in (None, trainable):
        h, cache = model.forward(params, config, x, trainable=keep)
        g = {}
        model.backward(dh, cache, params, g, trainable)
        grads.append((h, g, sum(a.nbytes for a in {id(a): a for a in _cached_arrays(cache)}.values())))
    (h_all, g_all, bytes_all), (h_lean, g_lean, bytes_lean) = grads
    assert np.array_equal(h_all, h_lean)
    assert set(g_all) == set(g_lean) == trainable
    for name in trainable:
        assert np.array_equal(g_all[name], g_lean[name]), name
    # every block drops the inputs of mlp.fc (B, T, C) and mlp.proj (B, T, F)
    assert bytes_lean < bytes_all
