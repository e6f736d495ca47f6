"""LoRA: its config, the zero-start adapter, parameter counts, merge/unmerge and adapter files."""

import math

import numpy as np
import pytest

from minilora import model, runs
from minilora.methods import lora
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
ALL = tuple(lora.TARGETS)


def _batch(config=TINY, B=3, seed=0):
    rng = np.random.default_rng(seed)
    T = config.context_length
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def _random_adapter(params, scale=0.3, seed=5):
    """Adapters with B != 0, so the update B A actually changes the model."""
    rng = np.random.default_rng(seed)
    out = dict(params)
    for name in lora.lora_names(params):
        out[name] = (scale * rng.standard_normal(params[name].shape)).astype(params[name].dtype)
    return out


# config


def test_config_defaults():
    cfg = LoraConfig()
    assert (cfg.rank, cfg.alpha, cfg.targets) == (8, 16.0, ("q", "k", "v", "o"))
    assert cfg.init == "kaiming" and cfg.rslora is False and cfg.dropout == 0.0
    assert cfg.scale == 2.0


def test_unknown_target_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        LoraConfig(targets=("q", "attn"))
    for name in lora.TARGETS:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=())


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.0}, "rank"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"init": "xavier"}, "init"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_is_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_rslora_scale_is_alpha_over_sqrt_rank():
    assert LoraConfig(rank=4, alpha=8.0).scale == 2.0
    assert LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0
    assert math.isclose(LoraConfig(rank=16, alpha=4.0, rslora=True).scale, 1.0)


def test_rslora_scale_is_the_one_merge_applies():
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=True, targets=("q",))
    params, adapted = lora.add_lora(model.init_params(TINY, 0, np.float64), TINY, cfg)
    params = _random_adapter(params)
    merged, merged_config = lora.merge(params, adapted)
    assert merged_config == TINY and adapted.lora == cfg
    delta = merged["h.0.attn.q.W"] - params["h.0.attn.q.W"]
    np.testing.assert_allclose(delta, 4.0 * params["h.0.attn.q.lora_B"] @ params["h.0.attn.q.lora_A"], atol=1e-14)


# add_lora


def test_add_lora_starts_at_zero_update_with_kaiming_a():
    cfg = LoraConfig(rank=4, targets=ALL)
    base = model.init_params(TINY, 0)
    params, adapted = lora.add_lora(base, TINY, cfg, seed=1)
    assert adapted.lora == cfg and TINY.lora is None  # the config that comes with the new params
    assert set(base) == set(model.param_shapes(TINY))  # the input dict is not changed
    assert params["wte"] is base["wte"]  # base arrays shared, not copied
    assert len(lora.lora_names(params)) == 2 * len(ALL) * TINY.n_layers
    for prefix in lora.adapted_layers(TINY, cfg):
        W, A, B = params[prefix + ".W"], params[prefix + ".lora_A"], params[prefix + ".lora_B"]
        d_out, d_in = W.shape
        assert A.shape == (4, d_in) and B.shape == (d_out, 4)
        assert A.dtype == B.dtype == W.dtype
        assert (B == 0).all()
        bound = 1.0 / math.sqrt(d_in)
        assert (A != 0).all()
        assert np.abs(A).max() <= bound
        assert np.abs(A).max() > 0.7 * bound  # uniform on the whole interval, not a narrower one


def test_gaussian_init_has_std_one_over_rank():
    config = ModelConfig(vocab_size=11, context_length=8, d_model=128, n_heads=2, n_layers=2, d_ff=256)
    cfg = LoraConfig(rank=4, init="gaussian", targets=ALL)
    params, _ = lora.add_lora(model.init_params(config, 0), config, cfg)
    A = np.concatenate([params[n].ravel() for n in lora.lora_names(params) if n.endswith("lora_A")])
    assert abs(A.std() / (1.0 / 4) - 1.0) < 0.05
    assert all((params[n] == 0).all() for n in lora.lora_names(params) if n.endswith("lora_B"))


def test_add_lora_is_reproducible_from_the_seed():
    cfg = LoraConfig(rank=2)
    base = model.init_params(TINY, 0)
    a, b, c = (lora.add_lora(base, TINY, cfg, seed=s)[0] for s in (1, 1, 2))
    assert np.array_equal(a["h.1.attn.v.lora_A"], b["h.1.attn.v.lora_A"])
    assert not np.array_equal(a["h.1.attn.v.lora_A"], c["h.1.attn.v.lora_A"])


def test_adapted_model_at_init_equals_the_base_model_exactly():
    cfg = LoraConfig(rank=4, targets=ALL)
    base = model.init_params(TINY, 0)
    params, adapted = lora.add_lora(base, TINY, cfg, seed=1)
    x, y = _batch()
    h_base, _ = model.forward(base, TINY, x)
    h_lora, _ = model.forward(params, adapted, x)
    assert np.array_equal(h_base, h_lora)
    assert np.array_equal(model.next_token_logits(base, TINY, x), model.next_token_logits(params, adapted, x))
    assert (model.loss_and_grads(base, TINY, {"x": x, "y": y})[0]
            == model.loss_and_grads(params, adapted, {"x": x, "y": y})[0])


def test_adapted_model_needs_its_lora_config(tmp_path):
    # the config, not the names present, says which pair computes a linear: the names are checked
    # against it where a model is loaded, and training adapters it does not describe is refused
    params, _ = lora.add_lora(model.init_params(TINY, 0), TINY, LoraConfig(rank=2))
    x, y = _batch()
    with pytest.raises(ValueError, match="config: expected the config that came with these parameters"):
        model.loss_and_grads(params, TINY, {"x": x, "y": y}, trainable=lora.lora_names(params))
    save_checkpoint(str(tmp_path / "m.npz"), params, {"model": TINY.to_dict()})
    with pytest.raises(ValueError, match="unexpected: h.0.attn.k.lora_A"):
        runs.load_model(str(tmp_path / "m.npz"))


def test_a_rank_above_min_out_in_is_rejected():
    with pytest.raises(ValueError, match="rank: expected at most min"):
        lora.add_lora(model.init_params(TINY, 0), TINY, LoraConfig(rank=TINY.d_model + 1))


def test_adding_adapters_twice_is_rejected():
    params, adapted = lora.add_lora(model.init_params(TINY, 0), TINY, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already have adapters"):
        lora.add_lora(params, adapted, LoraConfig(rank=2))


# counts


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o"), ALL])
def test_trainable_count_is_r_times_in_plus_out(targets):
    r = 3
    cfg = LoraConfig(rank=r, targets=targets)
    base = model.init_params(TINY, 0)
    params, _ = lora.add_lora(base, TINY, cfg)
    expected = 0
    for prefix in lora.adapted_layers(TINY, cfg):
        d_out, d_in = base[prefix + ".W"].shape
        assert lora.lora_param_count(d_out, d_in, r) == r * (d_out + d_in)
        expected += r * (d_out + d_in)
    assert model.count_params(params, lora.lora_names(params)) == expected
    assert model.count_params(params) == model.count_params(base) + expected


def test_the_seeds_example_count():
    # d = k = 4096, r = 16: 131,072 trainable numbers instead of 16,777,216
    assert lora.lora_param_count(4096, 4096, 16) == 131072 and 4096 * 4096 == 16777216


# merge / unmerge


def test_merge_computes_the_same_function_and_unmerge_restores_w():
    cfg = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    base = model.init_params(TINY, 0)
    params, adapted = lora.add_lora(base, TINY, cfg, seed=1)
    params = _random_adapter(params)
    before = {n: a.copy() for n, a in params.items()}
    x, y = _batch()

    merged, merged_config = lora.merge(params, adapted)
    assert merged_config.lora is None
    assert set(merged) == set(base)
    assert not lora.lora_names(merged)
    # merge changed nothing it was given
    assert set(params) == set(before)
    assert all(np.array_equal(params[n], before[n]) for n in before)

    adapted_logits = model.next_token_logits(params, adapted, x)
    merged_logits = model.next_token_logits(merged, TINY, x)
    base_logits = model.next_token_logits(base, TINY, x)
    assert np.abs(adapted_logits - base_logits).max() > 1e-3  # the adapter does matter
    np.testing.assert_allclose(merged_logits, adapted_logits, atol=1e-5, rtol=0)
    h_adapted, _ = model.forward(params, adapted, x)
    h_merged, _ = model.forward(merged, TINY, x)
    np.testing.assert_allclose(h_merged, h_adapted, atol=1e-5, rtol=0)
    l_adapted = model.loss_and_grads(params, adapted, {"x": x, "y": y})[0]
    assert abs(model.loss_and_grads(merged, TINY, {"x": x, "y": y})[0] - l_adapted) < 1e-5

    adapters = {n: params[n] for n in lora.lora_names(params)}
    merged_before = {n: a.copy() for n, a in merged.items()}
    restored, restored_config = lora.unmerge(merged, merged_config, adapters, cfg)
    assert restored_config == adapted
    assert set(restored) == set(params)
    for name in params:
        np.testing.assert_allclose(restored[name], before[name], atol=1e-6, rtol=0, err_msg=name)
    for prefix in lora.adapted_layers(TINY, cfg):
        assert np.abs(merged[prefix + ".W"] - base[prefix + ".W"]).max() > 1e-3
    # unmerge changed nothing it was given either
    assert set(merged) == set(merged_before)
    assert all(np.array_equal(merged[n], merged_before[n]) for n in merged)


# adapter files


def _trained_adapter(cfg):
    base = model.init_params(TINY, 0)
    params, adapted = lora.add_lora(base, TINY, cfg, seed=1)
    params = _random_adapter(model.add_head(params, 3))
    trainable = set(lora.lora_names(params)) | {"cls.W", "cls.b"}
    return base, params, adapted, trainable


def test_adapter_file_roundtrip_holds_only_the_trained_arrays(tmp_path):
    cfg = LoraConfig(rank=2, alpha=3.0, targets=("q", "v", "fc"), rslora=True)
    base, params, adapted, trainable = _trained_adapter(cfg)
    path = tmp_path / "adapter.npz"
    lora.save_adapter(path, params, trainable, adapted, base)
    saved, meta, arrays = load_checkpoint(path)
    assert set(saved) == trainable
    assert arrays == {}
    assert meta["kind"] == "lora_adapter" and meta["base_fingerprint"] == lora.base_fingerprint(base)

    loaded, loaded_cfg, _ = lora.load_adapter(path, base, TINY)
    assert loaded_cfg == adapted and loaded_cfg.lora == cfg
    assert set(loaded) == set(params)
    for name in params:
        assert np.array_equal(loaded[name], params[name]), name
    x, _ = _batch()
    assert np.array_equal(model.next_token_logits(loaded, loaded_cfg, x),
                          model.next_token_logits(params, adapted, x))


def test_loading_an_adapter_onto_another_base_fails(tmp_path):
    cfg = LoraConfig(rank=2)
    base, params, adapted, trainable = _trained_adapter(cfg)
    path = tmp_path / "adapter.npz"
    lora.save_adapter(path, params, trainable, adapted, base)
    other = dict(base)
    other["h.1.mlp.fc.W"] = base["h.1.mlp.fc.W"].copy()
    other["h.1.mlp.fc.W"][0, 0] += 1e-3
    with pytest.raises(ValueError, match=f"fingerprint {lora.base_fingerprint(base)}"):
        lora.load_adapter(path, other, TINY)
    # the fingerprint ignores adapters, heads and prompts, but nothing else
    assert lora.base_fingerprint(params) == lora.base_fingerprint(base)
    assert lora.base_fingerprint(other) != lora.base_fingerprint(base)


def test_loading_a_file_that_is_not_an_adapter_fails(tmp_path):
    path = tmp_path / "pretrain.npz"
    save_checkpoint(path, model.init_params(TINY, 0), {"kind": "pretrain"})
    with pytest.raises(ValueError, match="adapter"):
        lora.load_adapter(path, model.init_params(TINY, 0), TINY)
