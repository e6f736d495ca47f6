"""DoRA: the row norms without (out, in) products, the exact and detached backwards, merge, files, the CLI."""

import json

import numpy as np
import pytest

import standin as sp
from minilora import cli, finetune, gradcheck, model, runs, sweep
from minilora.methods import dora, lora
from minilora.methods.dora import MAGNITUDE, DoraConfig
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer
from test_frozen_products import Recorded

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
OUT, IN, R, S = 7, 5, 3, 0.7


def _adapter(rng, xp=np):
    dev = np.asarray if xp is np else sp.asarray
    W, A, B = rng.standard_normal((OUT, IN)), rng.standard_normal((R, IN)), rng.standard_normal((OUT, R))
    m, b = 1.0 + rng.random(OUT), rng.standard_normal(OUT)
    return [dev(a) for a in (W, b, A, B, m)]


def test_row_norms_equal_the_norms_of_w_plus_sba():
    W, _, A, B, _ = _adapter(np.random.default_rng(0))
    n, P, G = dora.row_norms(W, A, B, S)
    np.testing.assert_allclose(n, np.linalg.norm(W + S * B @ A, axis=1), rtol=1e-13)
    assert P.shape == (OUT, R) and G.shape == (R, R)


def test_row_norms_form_no_out_by_in_product():
    W, _, A, B, _ = _adapter(np.random.default_rng(0))
    Recorded.shapes = []
    dora.row_norms(W.view(Recorded), A.view(Recorded), B.view(Recorded), S)
    assert sorted(Recorded.shapes) == [(R, R), (OUT, R), (OUT, R)]  # W A^T, A A^T, B G: never (out, in)


def test_forward_is_the_linear_of_the_decomposed_weight():
    rng = np.random.default_rng(1)
    W, b, A, B, m = _adapter(rng)
    x = rng.standard_normal((2, 4, IN))
    y, _ = dora.dora_linear_forward(x, W, b, A, B, m, S)
    V = W + S * B @ A
    W_prime = (m / np.linalg.norm(V, axis=1))[:, None] * V
    np.testing.assert_allclose(y, x @ W_prime.T + b, rtol=1e-12, atol=1e-12)


def test_adapted_model_starts_exactly_at_the_base():
    base = model.init_params(TINY, 0)
    params, config = dora.add_dora(base, TINY, DoraConfig(rank=2, targets=tuple(lora.TARGETS)))
    for prefix in lora.adapted_layers(config, config.lora):
        assert (params[prefix + ".lora_B"] == 0).all()
        np.testing.assert_allclose(params[f"{prefix}.{MAGNITUDE}"], np.linalg.norm(base[prefix + ".W"], axis=1),
                                   rtol=1e-6)
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.context_length))
    assert np.array_equal(model.next_token_logits(base, TINY, x), model.next_token_logits(params, config, x))


def _check(detach_norm, xp=np, seed=0):
    rng = np.random.default_rng(seed)
    W, b, A, B, m = _adapter(rng, xp)
    x = (np.asarray if xp is np else sp.asarray)(rng.standard_normal((2, 3, IN)))
    results = gradcheck.check_op(
        "dora", lambda x, A, B, m: dora.dora_linear_forward(x, W, b, A, B, m, S, detach_norm=detach_norm),
        dora.dora_linear_backward, {"x": x, "A": A, "B": B, "m": m}, {"x": 0, "A": 1, "B": 2, "m": 3}, rng)
    return {r.argument: r for r in results}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_backward_matches_finite_differences_at_every_coordinate(xp, seed):
    results = _check(False, xp if xp is np else sp, seed)
    assert all(r.method == "full" for r in results.values())
    for name, r in results.items():
        assert r.error <= gradcheck.TOLERANCE, f"d{name}: {r.error:.2e}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detached_backward_measurably_does_not(seed):
    results = _check(True, seed=seed)
    # the norm depends on A and B, not on m or x: dm and dx are exact either way
    assert results["m"].error <= gradcheck.TOLERANCE and results["x"].error <= gradcheck.TOLERANCE
    # dropping the gradient through the norm leaves dA and dB off by far more than any round-off
    assert results["A"].error > 1e-3 and results["B"].error > 1e-3, (results["A"].error, results["B"].error)


def test_shared_qkv_equals_three_dora_linears_and_the_model_uses_it():
    rng = np.random.default_rng(3)
    layers = [_adapter(rng) for _ in range(3)]
    x = rng.standard_normal((2, 4, IN))
    douts = [rng.standard_normal((2, 4, OUT)) for _ in range(3)]
    ys, cache = dora.dora_shared_input_forward(x, [(W, b, A, B, m) for W, b, A, B, m in layers], S)
    dx, dAs, dBs, dms = dora.dora_shared_input_backward(douts, cache)
    dx_each = 0
    for (W, b, A, B, m), y, dout, dA, dB, dm in zip(layers, ys, douts, dAs, dBs, dms):
        y1, c = dora.dora_linear_forward(x, W, b, A, B, m, S)
        d = dora.dora_linear_backward(dout, c)
        np.testing.assert_allclose(y, y1, rtol=1e-12)
        for got, want in zip((dA, dB, dm), d[1:]):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        dx_each = dx_each + d[0]
    np.testing.assert_allclose(dx, dx_each, rtol=1e-10, atol=1e-12)
    params, config = dora.add_dora(model.init_params(TINY, 0), TINY, DoraConfig(rank=2))
    _, c = model.forward(params, config, np.zeros((1, 3), int))
    assert c[2][0][1][0] == "shared"  # block 0's q, k, v cache


@pytest.mark.parametrize("detach_norm", [False, True])
def test_pruned_backward_gives_the_unpruned_gradients(detach_norm):
    params, config = dora.add_dora(model.init_params(TINY, 0, dtype=np.float64), TINY,
                                   DoraConfig(rank=2, targets=("q", "v", "fc"), detach_norm=detach_norm))
    rng = np.random.default_rng(1)
    trainable = lora.adapter_names(config)
    for n in trainable:
        params[n] = params[n] + 0.1 * rng.standard_normal(params[n].shape)
    x = rng.integers(0, TINY.vocab_size, (3, TINY.context_length))
    batch = {"x": x, "y": np.roll(x, -1, axis=1)}
    loss, pruned = model.loss_and_grads(params, config, batch, trainable)
    loss_all, unpruned = model.loss_and_grads(params, config, batch, set(trainable) | {"wpe"})
    assert loss == loss_all and set(pruned) == set(trainable)
    for n in trainable:
        assert np.array_equal(pruned[n], unpruned[n]), n


def _trained_dora(seed=0):
    params, config = dora.add_dora(model.init_params(TINY, 0, dtype=np.float64), TINY,
                                   DoraConfig(rank=2, targets=("q", "o", "fc")))
    rng = np.random.default_rng(seed)
    for n in lora.adapter_names(config):
        params[n] = params[n] * (1 + 0.3 * rng.standard_normal(params[n].shape)) if n.endswith(MAGNITUDE) \
            else 0.3 * rng.standard_normal(params[n].shape)
    return params, config


def test_merge_computes_the_same_function_and_unmerge_gives_back_w():
    params, config = _trained_dora()
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.context_length))
    norms = dora.norms_for_unmerge(params, config)
    merged, merged_config = dora.merge(params, config)
    assert merged_config.lora is None and not any(n.endswith(MAGNITUDE) or "lora_" in n for n in merged)
    np.testing.assert_allclose(model.next_token_logits(merged, merged_config, x),
                               model.next_token_logits(params, config, x), rtol=1e-10, atol=1e-12)
    adapters = {n: params[n] for n in lora.adapter_names(config)}
    back, back_config = dora.unmerge(merged, merged_config, adapters, config.lora, norms)
    assert back_config == config and set(back) == set(params)
    for n in params:
        np.testing.assert_allclose(back[n], params[n], rtol=1e-12, atol=1e-12, err_msg=n)


def test_plain_lora_merge_refuses_dora_adapters():
    params, config = _trained_dora()
    with pytest.raises(ValueError, match="lora.merge takes plain LoRA adapters, got dora adapters"):
        lora.merge(params, config)


def test_config_round_trips_through_its_dict_and_plain_lora_dicts_are_unchanged():
    config = ModelConfig(**{**TINY.to_dict(), "lora": DoraConfig(rank=2, detach_norm=True)})
    d = json.loads(json.dumps(config.to_dict()))
    assert d["lora"]["method"] == "dora" and ModelConfig.from_dict(d) == config
    plain = ModelConfig(**{**TINY.to_dict(), "lora": lora.LoraConfig(rank=2)}).to_dict()
    assert "method" not in plain["lora"]  # what every LoRA checkpoint already holds


def test_count_report_gives_the_formula():
    params, config = dora.add_dora(model.init_params(TINY, 0), TINY, DoraConfig(rank=2, targets=("q", "fc")))
    report = lora.count_report(params, set(lora.adapter_names(config)), config)
    C, F, r = TINY.d_model, TINY.d_ff, 2
    per_q, per_fc = r * (C + C) + C, r * (F + C) + F
    assert f"DoRA: r (d + k) + d = 2 x ({C} + {C}) + {C} = {per_q:,} per adapted matrix" in report
    assert f"{TINY.n_layers * (per_q + per_fc):,} = the count above (adapters only)" in report


@pytest.mark.parametrize("bad, message", [
    (dict(rank=TINY.d_model + 1), "rank: expected at most min(out, in) = 16"),
    (dict(detach_norm="yes"), "detach_norm: expected True or False, got 'yes'"),
])
def test_bad_settings_are_one_clear_line(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        dora.add_dora(model.init_params(TINY, 0), TINY, DoraConfig(**bad))
    assert "\n" not in str(e.value)


def test_a_finetune_run_writes_a_dora_adapter_that_loads_onto_its_base(tmp_path):
    from minilora.checkpoint import save_checkpoint
    from minilora.train import TrainConfig

    mc = ModelConfig(vocab_size=96, context_length=128, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    base = model.init_params(mc, 0)
    save_checkpoint(str(tmp_path / "base.npz"), base, {"model": mc.to_dict()})
    cfg = finetune.FinetuneConfig(method="dora", n_train=16, n_test=4, lora=DoraConfig(rank=2, detach_norm=True),
                                  train=TrainConfig(steps=2, batch_size=4, warmup_steps=0, eval_every=2))
    params, ft_config, trainable, s = finetune.finetune(base, mc, CharTokenizer(), cfg, run_dir=str(tmp_path))
    assert trainable == set(lora.adapter_names(ft_config)) and isinstance(ft_config.lora, DoraConfig)
    assert "DoRA: r (d + k) + d" in s["report"]
    loaded, config, _, _ = runs.load_model(str(tmp_path / "base.npz"), adapter=str(tmp_path))
    assert config == ft_config and config.lora.detach_norm
    x = np.zeros((1, 5), int)
    np.testing.assert_array_equal(model.next_token_logits(loaded, config, x),
                                  model.next_token_logits(params, ft_config, x))


def test_a_cell_runs_dora_and_its_detached_variant_and_keys_them_apart():
    cell = sweep.Cell("t", method="dora", rank=2)
    assert isinstance(cell.finetune_config().lora, DoraConfig)
    detached = sweep.Cell("t", method="dora", rank=2, detach_norm=True)
    assert detached.finetune_config().lora.detach_norm and detached.key() != cell.key()
    with pytest.raises(ValueError, match="detach_norm: expected method 'dora'"):
        sweep.Cell("t", method="lora", detach_norm=True).finetune_config()


def test_cli_lists_dora_and_refuses_its_flag_on_another_method(capsys):
    assert cli.main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "dora" in out and "--detach-norm" in out
    assert cli.main(["finetune", "--method", "lora", "--detach-norm", "--checkpoint", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--detach-norm: expected --method dora" in err and err.count("\n") == 1
