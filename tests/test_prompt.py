"""Soft prompts and the classification head: shapes, inits, and what the model does with a prompt."""

import numpy as np
import pytest

from minilora import model
from minilora.methods import prompt
from minilora.model import ModelConfig

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)


def _batch(T=TINY.context_length, B=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TINY.vocab_size, (B, T)), rng.integers(0, TINY.vocab_size, (B, T))


def test_vocab_init_copies_rows_of_wte():
    base = model.init_params(TINY, 0)
    params = prompt.add_prompt(base, 5, init="vocab", seed=1)
    P = params["prompt"]
    assert P.shape == (5, TINY.d_model) and P.dtype == base["wte"].dtype
    for row in P:
        assert (base["wte"] == row).all(axis=1).any()
    assert set(params) == set(base) | {"prompt"}
    assert "prompt" not in base and params["wte"] is base["wte"]


def test_text_init_repeats_the_given_ids():
    base = model.init_params(TINY, 0)
    P = prompt.add_prompt(base, 5, init="text", init_ids=[3, 5, 7])["prompt"]
    assert np.array_equal(P, base["wte"][[3, 5, 7, 3, 5]])
    P = prompt.add_prompt(base, 2, init="text", init_ids=[3, 5, 7])["prompt"]
    assert np.array_equal(P, base["wte"][[3, 5]])


def test_random_init_is_new_vectors_at_the_embedding_scale():
    base = model.init_params(TINY, 0)
    P = prompt.add_prompt(base, 40, init="random", seed=2)["prompt"]
    assert P.shape == (40, TINY.d_model)
    assert not any((base["wte"] == row).all(axis=1).any() for row in P)
    assert abs(P.std() / base["wte"].std() - 1.0) < 0.15
    again = prompt.add_prompt(base, 40, init="random", seed=2)["prompt"]
    assert np.array_equal(P, again)


@pytest.mark.parametrize("kwargs, field", [
    ({"n_prompt": 0}, "n_prompt"), ({"n_prompt": -1}, "n_prompt"), ({"n_prompt": 2.0}, "n_prompt"),
    ({"n_prompt": True}, "n_prompt"), ({"n_prompt": 3, "init": "zeros"}, "init"),
    ({"n_prompt": 3, "init": "text"}, "init_ids"), ({"n_prompt": 3, "init": "text", "init_ids": []}, "init_ids"),
])
def test_bad_prompt_arguments_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        prompt.add_prompt(model.init_params(TINY, 0), **kwargs)


def test_prompt_positions_are_dropped_from_the_output_and_change_the_loss():
    base = model.init_params(TINY, 0)
    params = prompt.add_prompt(base, 4, init="random", seed=1)
    params["prompt"] = params["prompt"] * 50.0  # large enough to move every real token's state
    x, y = _batch()
    h, _ = model.forward(params, TINY, x)
    h_base, _ = model.forward(base, TINY, x)
    assert h.shape == h_base.shape == (3, TINY.context_length, TINY.d_model)
    assert np.abs(h - h_base).max() > 1e-3
    # h[:, 0] is the first real token's state, not a prompt vector's: it depends on x[:, 0]
    x2 = x.copy()
    x2[:, 0] = (x[:, 0] + 1) % TINY.vocab_size
    h2, _ = model.forward(params, TINY, x2)
    assert (np.abs(h2[:, 0] - h[:, 0]).max(axis=-1) > 1e-4).all()
    loss, grads = model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable={"prompt"})
    assert loss != model.loss_and_grads(base, TINY, {"x": x, "y": y})[0]
    assert grads["prompt"].shape == params["prompt"].shape


def test_prompt_does_not_use_up_the_context():
    params = prompt.add_prompt(model.init_params(TINY, 0), 5)
    x, y = _batch(T=TINY.context_length)  # P + T > context_length: fine, the prompt has no positions
    loss, _ = model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable={"prompt"})
    assert np.isfinite(loss)
    x, y = _batch(T=TINY.context_length + 1)
    with pytest.raises(ValueError, match="context_length"):
        model.loss_and_grads(params, TINY, {"x": x, "y": y})


def test_add_head_shapes_and_init():
    base = model.init_params(TINY, 0)
    params = model.add_head(base, 4, seed=1)
    assert params["cls.W"].shape == (4, TINY.d_model) and params["cls.b"].shape == (4,)
    assert params["cls.W"].dtype == base["wte"].dtype
    assert (params["cls.b"] == 0).all()
    assert 0.01 < params["cls.W"].std() < 0.03
    assert "cls.W" not in base
    x, _ = _batch()
    last, labels = np.array([7, 3, 0]), np.array([0, 3, 1])
    loss, grads = model.loss_and_grads(params, TINY, {"x": x, "last": last, "labels": labels},
                                       trainable={"cls.W", "cls.b"})
    assert set(grads) == {"cls.W", "cls.b"} and np.isfinite(loss)
    assert model.class_logits(params, TINY, x, last).shape == (3, 4)


@pytest.mark.parametrize("n_classes", [1, 0, -3, 2.0, True])
def test_bad_number_of_classes_is_rejected(n_classes):
    with pytest.raises(ValueError, match="n_classes"):
        model.add_head(model.init_params(TINY, 0), n_classes)
