"""Activation checkpointing (model.loss_and_grads(..., checkpoint_activations=True)): the forward keeps each
block's input only, the backward recomputes each block right before its backward. The gradients equal the
plain path's bit for bit in this process, for every method and both heads, with dropout drawn from the
generator (the recompute draws the same masks again); the checkpointed forward keeps less."""

import numpy as np
import pytest

from minilora import finetune, gradcheck, methods, model
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer

CONFIG = ModelConfig(vocab_size=11, context_length=7, d_model=16, n_heads=2, n_layers=3, d_ff=40, dropout=0.2)
B = 3


def _setup(name, dtype=np.float32):
    base = model.init_params(CONFIG, seed=0, dtype=dtype)
    ft = finetune.FinetuneConfig(method=name, task="kind" if methods.method(name).needs_head else "subject",
                                 n_prompt=3, n_prefix=3, seed=1)
    if isinstance(ft.lora, LoraConfig):  # adapter dropout too (IA3 has its own config, without one)
        ft.lora.rank, ft.lora.dropout, ft.lora.targets = 2, 0.25, ("q", "k", "v", "o", "fc")
    params, config, trainable = finetune.setup_strategy(base, CONFIG, CharTokenizer(), ft, n_classes=3)
    rng = np.random.default_rng(2)
    for n in trainable:  # a non-zero point (LoRA's B = 0 at the start would hide dA)
        params[n] = (params[n] + 0.1 * rng.standard_normal(params[n].shape)).astype(dtype)
    return params, config, trainable


def _batches():
    rng = np.random.default_rng(0)
    x = rng.integers(0, CONFIG.vocab_size, (B, CONFIG.context_length))
    mask = (rng.random(x.shape) < 0.7).astype(np.float32)
    mask[:, -1] = 1.0
    return {"LM": {"x": x, "y": np.roll(x, -1, axis=1), "mask": mask},
            "classifier": {"x": x, "last": np.array([6, 3, 5]), "labels": np.array([0, 2, 1])}}


@pytest.mark.parametrize("head", ["LM", "classifier"])
@pytest.mark.parametrize("name", list(methods.METHODS))
def test_checkpointed_gradients_are_bit_identical(name, head):
    params, config, trainable = _setup(name)
    if head == "LM":
        if methods.method(name).needs_head:
            pytest.skip("the head alone trains nothing under the LM loss")
        trainable = trainable - set(model.HEAD_NAMES)
    batch = _batches()[head]
    results = []
    for checkpoint in (False, True):
        rng = np.random.default_rng(7)
        loss, grads = model.loss_and_grads(params, config, batch, trainable, rng=rng, train=True,
                                           checkpoint_activations=checkpoint)
        results.append((loss, grads, rng.random()))  # the generator ends where the plain step leaves it
    (loss, grads, after), (loss_c, grads_c, after_c) = results
    assert loss == loss_c and after == after_c
    assert set(grads) == set(grads_c) == trainable
    for n in trainable:
        assert np.array_equal(grads[n], grads_c[n]), n
    # and dropout did act: another generator gives other gradients
    _, other = model.loss_and_grads(params, config, batch, trainable, rng=np.random.default_rng(8), train=True)
    assert any(not np.array_equal(other[n], grads[n]) for n in trainable)


def _cached_bytes(cache):
    seen, stack = {}, [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, model.BlockCheckpoint):
            stack.append(item.x)
        elif isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            seen[id(item)] = item
    return sum(a.nbytes for a in seen.values())


@pytest.mark.parametrize("name", ["full", "lora"])
def test_checkpointed_forward_keeps_each_blocks_input_only(name):
    params, config, trainable = _setup(name)
    x = _batches()["LM"]["x"]
    plain = model.forward(params, config, x, np.random.default_rng(0), True, trainable)[1]
    kept = model.forward(params, config, x, np.random.default_rng(0), True, trainable, checkpoint_activations=True)[1]
    blocks = kept[2]
    assert all(isinstance(c, model.BlockCheckpoint) for c in blocks)
    assert all(c.x.shape == (B, CONFIG.context_length, CONFIG.d_model) for c in blocks)
    assert _cached_bytes(kept) < _cached_bytes(plain) / 2


def test_checkpointed_backward_passes_its_gradient_check():
    results = gradcheck.run_checks(["checkpoint"])
    assert {r.op for r in results} >= {f"checkpointed model: {n}, {h}" for n, m in methods.METHODS.items()
                                       for h in ("LM", "classifier") if not (m.needs_head and h == "LM")}
    bad = [r for r in results if not r.passed]
    assert not bad, gradcheck.format_results(bad)
