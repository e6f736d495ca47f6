"""Prefix tuning: the attention with prefix columns against a dense reference and finite differences, the
whole model's gradients, positions, the causal mask, the pruned backward, counts, files and the CLI."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from minilora import bridge, cli, finetune, gradcheck, methods, model, ops, runs, sweep
from minilora.backend import to_device, to_numpy
from minilora.gradcheck import TOLERANCE, check_model
from minilora.methods import prefix
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)


def _dense_reference(q, k, v, pk, pv, NH):
    """The attention with prefix columns written the slow, obvious way: one dense (T, P + T) matrix per head."""
    B, T, C = q.shape
    P, hs = pk.shape[0], C // NH
    out = np.empty_like(q)
    mask = np.zeros((T, P + T))
    mask[:, P:][np.triu_indices(T, k=1)] = -np.inf  # real keys in the future only; prefix columns never
    for b in range(B):
        for h in range(NH):
            cols = slice(h * hs, (h + 1) * hs)
            keys = np.concatenate([pk[:, cols], k[b, :, cols]])  # (P + T, hs)
            vals = np.concatenate([pv[:, cols], v[b, :, cols]])
            s = q[b, :, cols] @ keys.T / math.sqrt(hs) + mask
            a = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, :, cols] = (a / a.sum(axis=1, keepdims=True)) @ vals
    return out


@pytest.mark.parametrize("block", [64, 2])  # one block, and T = 5 cut into blocks of 2 (the prefix joins each)
def test_forward_matches_a_dense_reference(xp, monkeypatch, block):
    monkeypatch.setattr(ops, "_CAUSAL_BLOCK", block)
    rng = np.random.default_rng(0)
    B, T, C, NH, P = 2, 5, 8, 2, 3
    q, k, v = (rng.standard_normal((B, T, C)) for _ in range(3))
    pk, pv = rng.standard_normal((P, C)), rng.standard_normal((P, C))
    out, _ = prefix.prefix_attention_forward(*(to_device(a, xp) for a in (q, k, v, pk, pv)), NH)
    np.testing.assert_allclose(to_numpy(out), _dense_reference(q, k, v, pk, pv, NH), rtol=1e-12, atol=1e-12)


def test_backward_matches_finite_differences_at_every_coordinate(xp):
    results = prefix._op_checks(np.random.default_rng(1), xp)
    assert {r.argument for r in results} == {"q", "k", "v", "prefix_k", "prefix_v"}
    assert all(r.method == "full" for r in results)  # every coordinate, not a projection
    bad = [(r.argument, r.error) for r in results if not r.error <= TOLERANCE]
    assert not bad, bad


def test_without_input_grads_only_the_prefix_gradients_are_formed():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
    out, cache = prefix.prefix_attention_forward(q, k, v, rng.standard_normal((3, 8)), rng.standard_normal((3, 8)), 2)
    dout = rng.standard_normal(out.shape)
    full = prefix.prefix_attention_backward(dout, cache)
    pruned = prefix.prefix_attention_backward(dout, cache, input_grads=False)
    assert pruned[:3] == (None, None, None)
    np.testing.assert_allclose(pruned[3], full[3], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pruned[4], full[4], rtol=1e-12, atol=1e-14)


def test_bad_prefix_shapes_are_one_clear_line():
    q = np.zeros((1, 4, 8))
    with pytest.raises(ValueError, match=r"prefix_v: expected a \(P, 8\) array") as e:
        prefix.prefix_attention_forward(q, q, q, np.zeros((3, 8)), np.zeros((2, 8)), 2)
    assert "\n" not in str(e.value)


def test_whole_model_gradients_match_finite_differences(xp):
    """gradcheck's method setup for prefix, both heads, every trainable tensor, on numpy and the stand-in."""
    rng = np.random.default_rng(3)
    config, base = gradcheck.tiny_model(rng)
    with_head = model.add_head(base, 3, seed=1)
    with_head["cls.b"] = 0.4 * rng.standard_normal(3)
    params, cfg, trainable = prefix.PREFIX.gradcheck_setup(dict(with_head), config, rng)
    assert cfg.n_prefix == 3 and len(trainable) == 2 * config.n_layers
    params = model.params_to(params, xp)
    B, T = 3, config.context_length
    x = rng.integers(0, config.vocab_size, (B, T))
    lm = {"x": x, "y": rng.integers(0, config.vocab_size, (B, T))}
    cls = {"x": x, "last": rng.integers(1, T, B), "labels": rng.integers(0, 3, B)}
    res = check_model("prefix LM", lambda p, tr: model.loss_and_grads(p, cfg, lm, tr), params, trainable, rng)
    res += check_model("prefix classifier", lambda p, tr: model.loss_and_grads(p, cfg, cls, tr), params,
                       trainable | set(model.HEAD_NAMES), rng)
    bad = [(r.op, r.argument, r.error) for r in res if not r.passed]
    assert len(res) == 2 * len(trainable) + 2 and not bad, bad


def _prefixed(P=4, seed=0):
    base = model.init_params(TINY, seed, dtype=np.float64)
    params, config = prefix.add_prefix(base, TINY, P, seed=1)
    return base, params, config


def test_the_real_tokens_keep_positions_0_to_T_minus_1():
    # T = 3 real tokens after P = 4 prefix vectors: shifted positions would read wpe[4:7], which must not matter
    _, params, config = _prefixed(P=4)
    ids = np.array([[1, 5, 2], [7, 0, 3]])
    h, _ = model.forward(params, config, ids)
    moved = dict(params, wpe=params["wpe"].copy())
    # a random change (a constant added to every channel would be invisible: LayerNorm removes it)
    rng = np.random.default_rng(7)
    moved["wpe"][3:] += rng.standard_normal(moved["wpe"][3:].shape)  # every position from T on, as a shift by P reads
    np.testing.assert_array_equal(model.forward(moved, config, ids)[0], h)
    moved["wpe"][0] += rng.standard_normal(TINY.d_model)  # and position 0 does matter (the check above can fail)
    assert not np.allclose(model.forward(moved, config, ids)[0][:, 0], h[:, 0])


def test_the_causal_mask_still_holds_among_the_real_tokens(monkeypatch):
    monkeypatch.setattr(ops, "_CAUSAL_BLOCK", 3)  # T = 8 in blocks of 3: the prefix joins every block
    _, params, config = _prefixed(P=4)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, TINY.vocab_size, (2, TINY.context_length))
    h, _ = model.forward(params, config, ids)
    later = ids.copy()
    later[:, 5] = (later[:, 5] + 1) % TINY.vocab_size  # change token 5 only
    h2, _ = model.forward(params, config, later)
    np.testing.assert_allclose(h2[:, :5], h[:, :5], rtol=0, atol=1e-13)  # no earlier output moves
    assert not np.allclose(h2[:, 5], h[:, 5])  # the changed one does


def test_the_prefix_reaches_every_position_from_the_first():
    base, params, config = _prefixed(P=2)
    ids = np.array([[1, 5, 2, 4]])
    h_base, _ = model.forward(base, TINY, ids)
    h, _ = model.forward(params, config, ids)
    assert not np.allclose(h[:, 0], h_base[:, 0])  # even token 0, which sees no other real token
    assert h.shape == h_base.shape  # the prefix adds no positions to the output


def test_only_the_prefix_trains_and_the_lowest_block_forms_no_dq_dk_dv(monkeypatch):
    base = model.init_params(TINY, 0, dtype=np.float64)
    ft = finetune.FinetuneConfig(method="prefix", n_prefix=3)
    params, config, trainable = finetune.setup_strategy(base, TINY, CharTokenizer(), ft)
    assert trainable == set(prefix.prefix_names(config)) and config.n_prefix == 3
    assert all(params[n] is base[n] for n in base)  # the base is shared, never copied or written
    calls = []
    real = prefix.prefix_attention_backward
    monkeypatch.setattr(prefix, "prefix_attention_backward",
                        lambda dout, cache, input_grads=True: calls.append(input_grads) or real(dout, cache, input_grads))
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    _, grads = model.loss_and_grads(params, config, {"x": x, "y": np.roll(x, -1, axis=1)}, trainable)
    assert set(grads) == trainable
    assert calls == [True, False]  # block 1 passes its gradient down to block 0's prefix; block 0 forms none


def test_the_trainable_count_is_2_L_P_C_and_the_report_says_so():
    base = model.init_params(TINY, 0)
    ft = finetune.FinetuneConfig(method="prefix", n_prefix=5)
    params, config, trainable = finetune.setup_strategy(base, TINY, CharTokenizer(), ft)
    L, P, C = TINY.n_layers, 5, TINY.d_model
    assert model.count_params(params, trainable) == prefix.prefix_param_count(config) == 2 * L * P * C == 320
    line = prefix.count_report(params, trainable, config)
    assert line == f"prefix: 2 L P C = 2 x {L} x {P} x {C} = 320 (a key and a value per position, head and layer)"
    with pytest.raises(AssertionError, match="2 L P C"):
        prefix.count_report(params, trainable - {"h.0.attn.prefix_k"}, config)


def test_init_is_the_keys_and_values_of_real_tokens_in_layer_0():
    base, params, config = _prefixed(P=3)
    pk, pv = params["h.0.attn.prefix_k"], params["h.0.attn.prefix_v"]
    # each prefix key of layer 0 is ln_1(wte[id]) @ k.W^T for some id of the vocabulary
    a, _ = ops.layer_norm_forward(base["wte"], base["h.0.ln_1.g"], base["h.0.ln_1.b"])
    keys, values = a @ base["h.0.attn.k.W"].T, a @ base["h.0.attn.v.W"].T + base["h.0.attn.v.b"]
    for j in range(3):
        row = np.flatnonzero(np.isclose(keys, pk[j]).all(axis=1))
        assert row.size and np.allclose(values[row[0]], pv[j])


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_a_bad_n_prefix_is_refused(n):
    with pytest.raises(ValueError, match="n_prefix: expected a positive integer") as e:
        prefix.add_prefix(model.init_params(TINY, 0), TINY, n)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="n_prefix"):
        ModelConfig(n_prefix=-1)


def test_a_model_without_a_prefix_writes_the_config_it_always_did():
    assert "n_prefix" not in ModelConfig().to_dict()
    cfg = ModelConfig(n_prefix=4)
    assert cfg.to_dict()["n_prefix"] == 4 and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert methods.attention_pair(ModelConfig()).name == "causal" and methods.attention_pair(cfg).name == "prefix"
    # and a run at the default n_prefix is described as before (finished runs stay found)
    assert "n_prefix" not in finetune.run_description(finetune.FinetuneConfig())
    assert finetune.run_description(finetune.FinetuneConfig(method="prefix", n_prefix=3))["n_prefix"] == 3


def test_a_cell_sets_n_prefix_and_the_default_keeps_every_existing_key():
    cell = sweep.Cell("t", method="prefix")
    assert "n_prefix" not in json.loads(sweep.Cell("t").key()) and "n_prefix" not in json.loads(cell.key())
    short = sweep.Cell("t", method="prefix", n_prefix=4)
    assert short.key() != cell.key() and json.loads(short.key())["n_prefix"] == 4
    assert short.finetune_config().n_prefix == 4 and cell.finetune_config().method == "prefix"


def test_the_forgetting_study_sweeps_prefix_at_its_own_rates():
    from minilora import studies

    assert studies.LRS["prefix"] == prefix.PREFIX.study_lrs and len(prefix.PREFIX.study_lrs) == 4


def test_a_prefix_run_has_no_exact_peft_export_unless_trained_with_peft_positions():
    _, params, config = _prefixed(P=2)
    with pytest.raises(ValueError, match="prefix-tuning run has no exact export.*P..P\\+T-1.*--peft-positions") as e:
        bridge.check_exportable(params, config)
    assert "\n" not in str(e.value)
    bridge.check_exportable(params, replace(config, peft_positions=True))  # no error


def test_with_peft_positions_the_real_tokens_start_at_position_P():
    """The reference is the default path with wpe moved up by P: the prefix itself takes no wpe row."""
    _, params, config = _prefixed(P=3)
    params["wpe"] = np.random.default_rng(2).standard_normal(params["wpe"].shape)  # every row different
    ids = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, TINY.context_length - 3))
    peft = replace(config, peft_positions=True)
    h, _ = model.forward(params, peft, ids)
    np.testing.assert_array_equal(h, model.forward(dict(params, wpe=np.roll(params["wpe"], -3, axis=0)), config,
                                                   ids)[0])
    assert not np.allclose(h, model.forward(params, config, ids)[0])
    with pytest.raises(ValueError, match="context_length - P = 8 - 3 = 5 tokens per row"):
        model.forward(params, peft, np.zeros((1, TINY.context_length - 2), np.int64))


def test_with_peft_positions_the_prefix_and_the_longest_record_must_fit_the_context():
    ft = finetune.FinetuneConfig(method="prefix", n_prefix=5, peft_positions=True)
    prefix.PREFIX.check(TINY, ft, 3)  # 5 + 3 = 8 fits
    with pytest.raises(ValueError, match="n_prefix: expected at most context_length - longest record = 8 - 4 = 4 "
                                         "prefix vectors with peft_positions") as e:
        prefix.PREFIX.check(TINY, ft, 4)
    assert "\n" not in str(e.value)
    prefix.PREFIX.check(TINY, replace(ft, peft_positions=False), 8)  # minilora's positions: any P fits
    params, config, _ = finetune.setup_strategy(model.init_params(TINY, 0), TINY, CharTokenizer(), ft)
    assert config.n_prefix == 5 and config.peft_positions
    assert ModelConfig.from_dict(config.to_dict()) == config


CLI_TINY = ["--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--context-length", "128"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pretrain"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     *CLI_TINY]) == 0
    return out


def test_cli_finetunes_with_prefix_saves_and_loads_the_adapter(pretrained, tmp_path, capsys):
    run = tmp_path / "prefix"
    assert cli.main(["finetune", "--checkpoint", str(pretrained / "checkpoint.npz"), "--method", "prefix",
                     "--n-prefix", "3", "--steps", "2", "--batch-size", "4", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "prefix: 2 L P C = 2 x 2 x 3 x 16 = 192" in out and "adapter.npz" in out
    summary = json.load(open(run / "summary.json"))
    assert summary["method"] == "prefix" and summary["trainable_params"] == 192
    # the run folder loads whole, and the adapter file loads onto the base: the same function
    params, config, _, _ = runs.load_model(str(run))
    loaded, loaded_config, _, _ = runs.load_model(str(pretrained), adapter=str(run))
    assert config.n_prefix == loaded_config.n_prefix == 3
    x = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(model.next_token_logits(loaded, loaded_config, x),
                                  model.next_token_logits(params, config, x))
    assert cli.main(["evaluate", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "prefix-tuning run has no exact export" in err and "--peft-positions" in err and err.count("\n") == 1


def test_cli_trains_a_prefix_with_peft_positions_and_its_adapter_keeps_them(pretrained, tmp_path, capsys):
    run = tmp_path / "prefix"
    common = ["--checkpoint", str(pretrained / "checkpoint.npz"), "--steps", "2", "--batch-size", "4"]
    assert cli.main(["finetune", *common, "--method", "prefix", "--n-prefix", "3", "--peft-positions",
                     "--out", str(run)]) == 0
    capsys.readouterr()
    params, config, _, _ = runs.load_model(str(run))
    loaded, loaded_config, _, _ = runs.load_model(str(pretrained), adapter=str(run))
    assert config.peft_positions and loaded_config == config
    x = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(model.next_token_logits(loaded, loaded_config, x),
                                  model.next_token_logits(params, config, x))
    assert not np.allclose(model.next_token_logits(params, replace(config, peft_positions=False), x),
                           model.next_token_logits(params, config, x))
    # fine-tuning the adapter on keeps its positions; asking for the other ones is one line
    more = tmp_path / "more"
    assert cli.main(["finetune", *common, "--adapter", str(run), "--out", str(more)]) == 0
    capsys.readouterr()
    assert runs.load_model(str(more))[1].peft_positions
    plain = tmp_path / "plain"
    assert cli.main(["finetune", *common, "--method", "prefix", "--n-prefix", "3", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert cli.main(["finetune", *common, "--adapter", str(plain), "--peft-positions", "--out",
                     str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--peft-positions: expected the adapter's own positions" in err and err.count("\n") == 1


def test_cli_refuses_peft_positions_for_a_method_without_virtual_tokens(capsys):
    assert cli.main(["finetune", "--method", "lora", "--peft-positions"]) == 2
    err = capsys.readouterr().err
    assert "--peft-positions: expected a method with virtual tokens" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_cli_bad_n_prefix_is_one_line(value, capsys):
    assert cli.main(["finetune", "--method", "prefix", "--n-prefix", value]) == 2
    err = capsys.readouterr().err
    assert "argument --n-prefix: expected an integer >= 1" in err and err.count("\n") == 1
