"""Soft prompts and the classification head: shapes, inits, and what the model does with a prompt (with
minilora's positions and with PEFT's)."""

from dataclasses import replace

import numpy as np
import pytest

from minilora import finetune, gradcheck, model
from minilora.methods import prompt
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer

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


# PEFT's positions (ModelConfig.peft_positions): the prompt takes wpe[0..P-1], the real tokens P..P+T-1

PEFT = replace(TINY, peft_positions=True)


def test_with_peft_positions_the_sequence_is_numbered_from_the_prompt_on():
    """The reference is the default path on moved weights: prompt + wpe[:P] as the prompt, wpe[P:] as wpe."""
    base = model.init_params(TINY, 0, dtype=np.float64)
    params = prompt.add_prompt(base, 3, init="random", seed=1)
    rng = np.random.default_rng(2)
    params["wpe"] = rng.standard_normal(params["wpe"].shape)  # every row different, so a shift shows
    x, _ = _batch(T=TINY.context_length - 3)
    h, _ = model.forward(params, PEFT, x)
    moved = dict(params, prompt=params["prompt"] + params["wpe"][:3], wpe=np.roll(params["wpe"], -3, axis=0))
    np.testing.assert_array_equal(h, model.forward(moved, TINY, x)[0])
    assert not np.allclose(h, model.forward(params, TINY, x)[0])  # and minilora's positions differ
    assert model.position_offset(params, PEFT) == 3 and model.position_offset(params, TINY) == 0
    assert model.real_context(params, PEFT) == TINY.context_length - 3


def test_with_peft_positions_the_prompt_takes_its_positions_from_the_context():
    params = prompt.add_prompt(model.init_params(TINY, 0), 3)
    x, y = _batch(T=TINY.context_length - 3)
    assert np.isfinite(model.loss_and_grads(params, PEFT, {"x": x, "y": y}, trainable={"prompt"})[0])
    x, y = _batch(T=TINY.context_length - 2)
    with pytest.raises(ValueError, match="ids: expected at most context_length - P = 8 - 3 = 5 tokens") as e:
        model.loss_and_grads(params, PEFT, {"x": x, "y": y})
    assert "\n" not in str(e.value)


def test_with_peft_positions_dwpe_and_dprompt_match_finite_differences_at_every_coordinate():
    """float64, a random model: wpe's rows 0..P-1 (the prompt's positions), P..P+T-1 (the real tokens') and the
    rows past them (zero), every coordinate; and the prompt's."""
    rng = np.random.default_rng(5)
    config, base = gradcheck.tiny_model(rng)
    base, config = gradcheck.longer_context(base, replace(config, peft_positions=True), 3, rng)
    params = prompt.add_prompt(base, 2, init="random", seed=3)
    params["prompt"] = 0.5 * rng.standard_normal(params["prompt"].shape)
    T = config.context_length - 3  # one position left unused: its gradient must be zero
    batch = {"x": rng.integers(0, config.vocab_size, (2, T)), "y": rng.integers(0, config.vocab_size, (2, T))}
    trainable = {"prompt", "wpe"}
    _, grads = model.loss_and_grads(params, config, batch, trainable)
    for name in sorted(trainable):
        num = gradcheck.numerical_gradient_sampled(lambda: model.loss_and_grads(params, config, batch)[0],
                                                   params[name], np.arange(params[name].size))
        assert gradcheck.rel_error(grads[name].reshape(-1), num) <= gradcheck.TOLERANCE, name
    assert (grads["wpe"][2 + T:] == 0).all() and np.abs(grads["wpe"][:2 + T]).min(axis=1).all()


def test_peft_positions_are_part_of_the_run_and_off_by_default():
    assert "peft_positions" not in ModelConfig().to_dict()  # every earlier run's config, written as before
    assert ModelConfig.from_dict(PEFT.to_dict()) == PEFT and PEFT.to_dict()["peft_positions"] is True
    with pytest.raises(ValueError, match="peft_positions: expected true or false"):
        ModelConfig(peft_positions=1)
    assert "peft_positions" not in finetune.run_description(finetune.FinetuneConfig(method="prompt"))
    ft = finetune.FinetuneConfig(method="prompt", n_prompt=3, peft_positions=True)
    assert finetune.run_description(ft)["peft_positions"] is True
    assert finetune.config_from_description(finetune.run_description(ft)).peft_positions is True
    base = model.init_params(TINY, 0)
    _, config, trainable = finetune.setup_strategy(base, TINY, CharTokenizer(), ft)
    assert config.peft_positions and trainable == {"prompt"}
    assert finetune.run_meta(base, TINY, CharTokenizer(), ft, None)["model"]["peft_positions"] is True
    default = finetune.setup_strategy(base, TINY, CharTokenizer(), replace(ft, peft_positions=False))[1]
    assert default == TINY
    with pytest.raises(ValueError, match="peft_positions: expected a method with virtual tokens .*prompt, prefix"):
        finetune.FinetuneConfig(method="lora", peft_positions=True)
