"""The GPT's backward against finite differences, its init, and which names get gradients."""

import math

import numpy as np
import pytest

from minilora import gradcheck, methods, model, ops
from minilora.methods import lora, prompt
from minilora.model import ModelConfig

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)

MODEL_RESULTS = [(seed, r) for seed in (0, 1) for r in gradcheck.run_checks(["model"], seed=seed)]


@pytest.mark.parametrize("seed, result", MODEL_RESULTS,
                         ids=[f"seed{s}-{r.op}-d{r.argument}" for s, r in MODEL_RESULTS])
def test_model_gradients_match_finite_differences(seed, result):
    assert result.error <= 1e-6, f"{result.op} d/d{result.argument} (seed {seed}): rel error {result.error:.2e}"


def test_model_gradient_checks_cover_every_parameter_and_strategy():
    by_op = {}
    for _, r in MODEL_RESULTS:
        by_op.setdefault(r.op, set()).add(r.argument)
    config = ModelConfig(**gradcheck.TINY)
    base_names = set(model.param_shapes(config))
    head = {"cls.W", "cls.b"}
    variants = [f"{name} ({v})" for name, m in methods.METHODS.items() for v, _ in m.gradcheck_variants]
    assert {"prompt (PEFT positions)", "prefix (PEFT positions)", "ia3 (queries)"} <= set(variants)
    # every method and variant, both heads; the head alone (a linear probe) has the classifier's only
    assert set(by_op) == {f"model: {m}, {h}" for m in [*methods.METHODS, *variants] for h in ("LM", "classifier")
                          if h == "classifier" or not methods.method(m.split(" (")[0]).needs_head}
    assert by_op["model: head, classifier"] == head
    assert by_op["model: full, LM"] == base_names
    assert by_op["model: full, classifier"] == base_names | head
    every_target = lora.LoraConfig(rank=2, targets=tuple(lora.TARGETS))
    adapter_names = {f"{prefix}.lora_{m}" for prefix in lora.adapted_layers(config, every_target) for m in "AB"}
    assert len(adapter_names) == 2 * 6 * config.n_layers
    assert by_op["model: lora, LM"] == adapter_names
    assert by_op["model: lora, classifier"] == adapter_names | head
    assert by_op["model: prompt, LM"] == {"prompt"}
    assert by_op["model: prompt, classifier"] == {"prompt"} | head
    for name, m in methods.METHODS.items():  # every method: every name it trains is checked
        _, _, trainable = m.gradcheck_setup(gradcheck.tiny_model(np.random.default_rng(0))[1], config,
                                            np.random.default_rng(0))
        if m.needs_head:
            assert trainable == set() and f"model: {name}, LM" not in by_op, name
            continue
        assert by_op[f"model: {name}, LM"] == trainable - head, name
        for v, setup in m.gradcheck_variants:  # and every name each variant trains (PEFT positions: wpe too)
            _, _, trainable = setup(gradcheck.tiny_model(np.random.default_rng(0))[1], config,
                                    np.random.default_rng(0))
            assert by_op[f"model: {name} ({v}), LM"] == trainable - head, (name, v)
    assert by_op["model: prompt (PEFT positions), LM"] == {"prompt", "wpe"}
    assert {n for n in by_op["model: ia3 (queries), LM"] if ".attn.q." in n} == {"h.0.attn.q.ia3_l", "h.1.attn.q.ia3_l"}


def _batch(config, B=3, T=None, seed=0):
    rng = np.random.default_rng(seed)
    T = config.context_length if T is None else T
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


# initialisation


def test_init_shapes_match_param_shapes():
    params = model.init_params(TINY, seed=0)
    shapes = model.param_shapes(TINY)
    assert set(params) == set(shapes)
    for name, shape in shapes.items():
        assert params[name].shape == shape, name
        assert params[name].dtype == np.float32, name
    assert model.init_params(TINY, seed=0, dtype=np.float64)["wte"].dtype == np.float64


def test_init_uses_gpt2_standard_deviations():
    config = ModelConfig(vocab_size=96, context_length=128, d_model=256, n_heads=4, n_layers=4, d_ff=1024)
    params = model.init_params(config, seed=0)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in params.items():
        if name.endswith(".g"):
            assert (p == 1).all(), name
        elif name.endswith(".b"):
            assert (p == 0).all(), name
        else:
            expected = residual_std if name.endswith(("attn.o.W", "mlp.proj.W")) else 0.02
            assert abs(float(p.std()) / expected - 1.0) < 0.05, f"{name}: std {p.std():.5f}, expected {expected:.5f}"
            assert abs(float(p.mean())) < 0.1 * expected, name


def test_init_is_reproducible_from_the_seed():
    a, b, c = model.init_params(TINY, 3), model.init_params(TINY, 3), model.init_params(TINY, 4)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["wte"], c["wte"])


def test_loss_at_init_is_close_to_uniform():
    params = model.init_params(TINY, 0)
    x, y = _batch(TINY)
    loss, grads = model.loss_and_grads(params, TINY, {"x": x, "y": y})
    assert grads == {}
    assert abs(loss - math.log(TINY.vocab_size)) < 0.05


# which names get gradients


@pytest.mark.parametrize("trainable", [
    set(), {"wte"}, {"wpe"}, {"h.0.ln_1.g", "ln_f.b"}, {"h.1.mlp.fc.W", "h.0.attn.k.W", "h.0.attn.v.b"},
    set(model.param_shapes(TINY)),
])
def test_grads_hold_exactly_the_trainable_names(trainable):
    params = model.init_params(TINY, 0)
    x, y = _batch(TINY)
    _, grads = model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable=trainable)
    assert set(grads) == trainable
    for name, g in grads.items():
        assert g.shape == params[name].shape and g.dtype == params[name].dtype, name
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_unknown_trainable_name_is_rejected():
    params = model.init_params(TINY, 0)
    x, y = _batch(TINY)
    with pytest.raises(ValueError, match="h.0.attn.zz.W"):
        model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable={"wte", "h.0.attn.zz.W"})


def test_a_weight_with_an_adapter_cannot_be_trainable():
    cfg = lora.LoraConfig(rank=2)
    params, adapted = lora.add_lora(model.init_params(TINY, 0), TINY, cfg)
    x, y = _batch(TINY)
    with pytest.raises(ValueError, match="h.0.attn.q.W"):
        model.loss_and_grads(params, adapted, {"x": x, "y": y}, trainable={"h.0.attn.q.W"})


def test_tied_wte_gradient_is_head_part_plus_embedding_part():
    params = model.init_params(TINY, 0, dtype=np.float64)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, (3, TINY.context_length))  # tokens 6..10 never appear as inputs
    y = rng.integers(0, TINY.vocab_size, x.shape)
    loss, grads = model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable={"wte"})
    # the head's share alone: logits = h @ wte.T, so dwte_head = dlogits^T h
    h, _ = model.forward(params, TINY, x)
    logits = h @ params["wte"].T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogits = p.copy()
    np.put_along_axis(dlogits, y[..., None], np.take_along_axis(p, y[..., None], -1) - 1.0, -1)
    dlogits /= y.size
    head = dlogits.reshape(-1, TINY.vocab_size).T @ h.reshape(-1, TINY.d_model)
    unused = np.arange(6, TINY.vocab_size)
    np.testing.assert_allclose(grads["wte"][unused], head[unused], rtol=1e-10, atol=1e-14)
    # the rows the embedding read also carry the embedding's share
    used = np.unique(x)
    assert np.abs(grads["wte"][used] - head[used]).max() > 1e-3 * np.abs(head[used]).max()
    # and a step along -dwte (everything else frozen) lowers the loss
    stepped = dict(params, wte=params["wte"] - 0.5 * grads["wte"])
    assert model.loss_and_grads(stepped, TINY, {"x": x, "y": y})[0] < loss - 1e-6


# errors


def test_a_sequence_longer_than_the_context_is_rejected():
    params = model.init_params(TINY, 0)
    x, y = _batch(TINY, T=TINY.context_length + 1)
    with pytest.raises(ValueError, match="context_length"):
        model.loss_and_grads(params, TINY, {"x": x, "y": y})
    x, y = _batch(TINY, T=TINY.context_length)
    model.loss_and_grads(params, TINY, {"x": x, "y": y})  # exactly context_length is fine


@pytest.mark.parametrize("field, changes", [
    ("n_heads", {"n_heads": 3}),
    ("n_layers", {"n_layers": 0}),
    ("dropout", {"dropout": 1.0}),
    ("dropout", {"dropout": -0.1}),
    ("d_model", {"d_model": 0}),
    ("vocab_size", {"vocab_size": 2.5}),
])
def test_bad_model_config_names_the_field(field, changes):
    good = TINY.to_dict()
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**good, **changes})


def test_model_config_roundtrips_through_a_dict():
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY


# dropout


def test_dropout_is_random_in_training_and_off_in_evaluation():
    cfg = ModelConfig(**{**TINY.to_dict(), "dropout": 0.2})
    params = model.init_params(cfg, 0)
    x, y = _batch(cfg)
    l1, _ = model.loss_and_grads(params, cfg, {"x": x, "y": y}, rng=np.random.default_rng(1), train=True)
    l2, _ = model.loss_and_grads(params, cfg, {"x": x, "y": y}, rng=np.random.default_rng(2), train=True)
    l1_again, _ = model.loss_and_grads(params, cfg, {"x": x, "y": y}, rng=np.random.default_rng(1), train=True)
    assert l1 != l2
    assert l1 == l1_again
    e1, _ = model.loss_and_grads(params, cfg, {"x": x, "y": y})
    e2, _ = model.loss_and_grads(params, cfg, {"x": x, "y": y})
    no_dropout, _ = model.loss_and_grads(params, TINY, {"x": x, "y": y}, rng=np.random.default_rng(1), train=True)
    assert e1 == e2 == no_dropout


# a frozen parameter never gets a gradient computed


@pytest.fixture
def recorded_backwards(monkeypatch):
    """Wrap the parameter-carrying backwards to record whether each call computed parameter gradients."""
    calls = {"linear": [], "layer_norm": [], "embedding": 0, "lora_linear": 0}
    linear, layer_norm, embedding, lora_linear = (ops.linear_backward, ops.layer_norm_backward,
                                                  ops.embedding_backward, lora.lora_linear_backward)
    lora_shared = lora.lora_shared_input_backward
    head = ops.tied_head_cross_entropy_forward

    def linear_backward(dout, cache, param_grads=True, **kwargs):
        calls["linear"].append(param_grads)
        return linear(dout, cache, param_grads=param_grads, **kwargs)

    def tied_head(h, wte, targets, mask=None, param_grads=True, **kwargs):
        # the tied LM head is a linear whose gradients its fused loss forms (ops.tied_head_cross_entropy)
        calls["linear"].append(param_grads)
        return head(h, wte, targets, mask, param_grads=param_grads, **kwargs)

    def layer_norm_backward(dout, cache, param_grads=True):
        calls["layer_norm"].append(param_grads)
        return layer_norm(dout, cache, param_grads=param_grads)

    def embedding_backward(dout, cache, **kwargs):
        calls["embedding"] += 1
        return embedding(dout, cache, **kwargs)

    def lora_linear_backward(dout, cache, **kwargs):
        calls["lora_linear"] += 1
        return lora_linear(dout, cache, **kwargs)

    monkeypatch.setattr(ops, "linear_backward", linear_backward)
    monkeypatch.setattr(ops, "tied_head_cross_entropy_forward", tied_head)
    monkeypatch.setattr(ops, "layer_norm_backward", layer_norm_backward)
    monkeypatch.setattr(ops, "embedding_backward", embedding_backward)
    def lora_shared_input_backward(douts, cache, **kwargs):
        calls["lora_linear"] += len(douts)  # q, k, v's adapters in one call
        return lora_shared(douts, cache, **kwargs)

    monkeypatch.setattr(lora, "lora_linear_backward", lora_linear_backward)
    monkeypatch.setattr(lora, "lora_shared_input_backward", lora_shared_input_backward)
    return calls


def test_recorder_sees_parameter_gradients_under_full_fine_tuning(recorded_backwards):
    # the positive control: the wrappers do intercept the model's calls
    params = model.init_params(TINY, 0)
    x, y = _batch(TINY)
    model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable=set(params))
    assert recorded_backwards["embedding"] == 1
    assert any(recorded_backwards["linear"]) and all(recorded_backwards["layer_norm"])


def test_lora_computes_no_gradient_for_frozen_weights(recorded_backwards):
    cfg = lora.LoraConfig(rank=2)  # q, k, v, o adapted; mlp.fc and mlp.proj plain frozen linears
    params, adapted = lora.add_lora(model.init_params(TINY, 0), TINY, cfg)
    x, y = _batch(TINY)
    trainable = set(lora.lora_names(params))
    _, grads = model.loss_and_grads(params, adapted, {"x": x, "y": y}, trainable=trainable)
    assert set(grads) == trainable
    # head + 2 frozen MLP linears per block (+ the base path inside each LoRA linear)
    assert len(recorded_backwards["linear"]) >= 1 + 2 * TINY.n_layers
    assert not any(recorded_backwards["linear"]), "a frozen linear computed dW"
    # ln_f and every ln_2, ln_1 except block 0's: nothing below that one is trained (wte, wpe frozen)
    assert len(recorded_backwards["layer_norm"]) == 2 * TINY.n_layers
    assert not any(recorded_backwards["layer_norm"]), "a frozen LayerNorm computed dg, db"
    assert recorded_backwards["embedding"] == 0
    assert recorded_backwards["lora_linear"] == 4 * TINY.n_layers


def test_prompt_tuning_computes_no_gradient_for_frozen_weights(recorded_backwards):
    params = prompt.add_prompt(model.init_params(TINY, 0), 3)
    x, y = _batch(TINY)
    _, grads = model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable={"prompt"})
    assert set(grads) == {"prompt"} and np.abs(grads["prompt"]).max() > 0
    assert len(recorded_backwards["linear"]) == 1 + 6 * TINY.n_layers
    assert not any(recorded_backwards["linear"])
    assert not any(recorded_backwards["layer_norm"])
    assert recorded_backwards["embedding"] == 0
    assert recorded_backwards["lora_linear"] == 0


def test_lm_loss_in_chunks_equals_one_chunk(monkeypatch):
    # the LM head's loss over B * T = 24 tokens in chunks of 5 (the last partial), masked positions
    # included: the same loss and gradients (float64) as one chunk holding every token's logits
    params = model.params_to(model.init_params(TINY, 0), np, np.float64)
    rng = np.random.default_rng(3)
    x, y = _batch(TINY)
    mask = (rng.random(x.shape) < 0.6).astype(np.float64)
    mask[0, 0] = 1.0
    batch = {"x": x, "y": y, "mask": mask}
    one, g_one = model.loss_and_grads(params, TINY, batch, trainable=set(params))
    monkeypatch.setattr(ops, "LOSS_CHUNK_BYTES", 2 * 5 * TINY.vocab_size * 8)
    assert ops.loss_chunk_rows(TINY.vocab_size, 8) == 5 and x.size % 5
    chunked, g = model.loss_and_grads(params, TINY, batch, trainable=set(params))
    assert abs(chunked - one) < 1e-12
    for name in params:
        np.testing.assert_allclose(g[name], g_one[name], rtol=0, atol=1e-12, err_msg=name)
