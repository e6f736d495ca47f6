"""IA3: the two scaling op pairs against finite differences, the whole model, merge, files, the CLI, the sweep."""

import json

import numpy as np
import pytest

from minilora import cli, finetune, gradcheck, methods, model, runs, studies, sweep
from minilora.checkpoint import save_checkpoint
from minilora.methods import ia3, lora
from minilora.methods.ia3 import Ia3Config
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer
from minilora.train import TrainConfig

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
C, F, L = TINY.d_model, TINY.d_ff, TINY.n_layers


def _scaled(seed=0, dtype=np.float64):
    """A tiny IA3 model away from the ones it starts at (a trained IA3), float64."""
    params, config = ia3.add_ia3(model.init_params(TINY, 0, dtype=dtype), TINY)
    rng = np.random.default_rng(seed)
    for n in lora.adapter_names(config):
        params[n] = (1.0 + 0.5 * rng.standard_normal(params[n].shape)).astype(dtype)
    for n in params:  # biases away from zero, so that l * (W x + b) is tested with its b
        if n.endswith(".b") and n.startswith("h."):
            params[n] = (0.3 * rng.standard_normal(params[n].shape)).astype(dtype)
    return params, config


# ---- the op pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_scalings_match_finite_differences_at_every_coordinate(xp, seed):
    results = ia3._op_checks(np.random.default_rng(seed), xp)
    assert {(r.op, r.argument) for r in results} == {
        (op, a) for op in ("ia3_output (k, v)", "ia3_output, no bias (k)", "ia3_input (proj)") for a in ("x", "l")}
    for r in results:
        assert r.method == "full" and r.error <= gradcheck.TOLERANCE, f"{r.op} d{r.argument}: {r.error:.2e}"


def test_the_check_catches_a_backward_that_drops_the_bias():
    # the negative control: dl = sum dy * (x W^T), without b, is what l * (W x) + b would give
    rng = np.random.default_rng(0)
    x, W, b, l = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4), \
        rng.standard_normal(4)

    def wrong(dout, cache):
        dx, _ = ia3.ia3_output_backward(dout, cache)
        return dx, (dout * (x @ W.T)).sum(axis=(0, 1))

    bad = gradcheck.check_op("wrong", ia3.ia3_output_forward, wrong, {"x": x, "W": W, "b": b, "l": l},
                             {"l": 1}, rng)
    assert bad[0].error > 1e-2


def test_the_forwards_are_the_scaled_linears():
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    l_out, l_in = rng.standard_normal(4), rng.standard_normal(5)
    np.testing.assert_allclose(ia3.ia3_output_forward(x, W, b, l_out)[0], l_out * (x @ W.T + b), rtol=1e-13)
    np.testing.assert_allclose(ia3.ia3_input_forward(x, W, b, l_in)[0], (l_in * x) @ W.T + b, rtol=1e-13)


def test_backward_skips_dx_when_asked_and_keeps_dl():
    rng = np.random.default_rng(2)
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    for forward, backward, l in ((ia3.ia3_output_forward, ia3.ia3_output_backward, rng.standard_normal(4)),
                                 (ia3.ia3_input_forward, ia3.ia3_input_backward, rng.standard_normal(5))):
        y, cache = forward(x, W, b, l)
        dout = rng.standard_normal(y.shape)
        dx, dl = backward(dout, cache)
        none, dl_only = backward(dout, cache, input_grad=False)
        assert none is None and dx.shape == x.shape and np.array_equal(dl, dl_only)


@pytest.mark.parametrize("bad, message", [
    (dict(l=np.ones(3)), "l: expected shape (4,) = (out,), one factor per output, got shape (3,)"),
    (dict(l=np.ones(4, np.float32)), "l: expected dtype float64 (the dtype of the input), got float32"),
])
def test_a_wrong_vector_is_one_clear_line(bad, message):
    x, W = np.ones((2, 5)), np.ones((4, 5))
    with pytest.raises(ValueError) as e:
        ia3.ia3_output_forward(x, W, None, bad["l"])
    assert str(e.value) == message


# ---- the whole model


def test_at_init_the_model_is_the_base_exactly():
    base = model.init_params(TINY, 0)
    params, config = ia3.add_ia3(base, TINY)
    shapes = {n: params[n].shape for n in lora.adapter_names(config)}
    assert shapes == {**{f"h.{i}.attn.{t}.ia3_l": (C,) for i in range(L) for t in "kv"},
                      **{f"h.{i}.mlp.proj.ia3_l": (F,) for i in range(L)}}
    assert all((params[n] == 1.0).all() and params[n].dtype == np.float32 for n in shapes)
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.context_length))
    assert np.array_equal(model.next_token_logits(params, config, x), model.next_token_logits(base, TINY, x))


def test_whole_model_gradients_match_finite_differences(xp):
    """gradcheck's own IA3 setup (random vectors on a random model), LM and classifier, on xp."""
    rng = np.random.default_rng(0)
    config, base = gradcheck.tiny_model(rng)
    base = model.add_head(base, 3, seed=1)
    params, cfg, trainable = methods.method("ia3").gradcheck_setup(base, config, rng)
    assert trainable == set(lora.adapter_names(cfg)) and len(trainable) == 3 * config.n_layers
    params = model.params_to(params, xp)
    B, T = 3, config.context_length
    x, y = rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))
    batches = {"LM": ({"x": x, "y": y}, trainable),
               "classifier": ({"x": x, "last": rng.integers(1, T, B), "labels": rng.integers(0, 3, B)},
                              trainable | {"cls.W", "cls.b"})}
    for head, (batch, names) in batches.items():
        results = gradcheck.check_model(f"ia3 {head}", lambda p, tr: model.loss_and_grads(p, cfg, batch, tr),
                                        params, names, rng)
        assert {r.argument for r in results} == names
        for r in results:
            assert r.error <= gradcheck.TOLERANCE, f"{head} d{r.argument}: {r.error:.2e}"


@pytest.mark.parametrize("seed", [0, 1])
def test_with_query_factors_the_whole_model_gradients_match_finite_differences(seed):
    """Ia3Config(queries=True), PEFT's IA3 on GPT-2: l_q beside attn.q too, checked in float64 at a random point
    (every vector away from ones, biases away from zero), LM loss, every coordinate of every vector."""
    rng = np.random.default_rng(seed)
    config, base = gradcheck.tiny_model(rng)
    for n in base:
        if n.endswith(".b") and n.startswith("h."):
            base[n] = 0.3 * rng.standard_normal(base[n].shape)
    params, cfg, trainable = ia3._gradcheck_setup(base, config, rng, Ia3Config(queries=True))
    assert {n for n in trainable if ".attn.q." in n} == {f"h.{i}.attn.q.ia3_l" for i in range(config.n_layers)}
    assert len(trainable) == 4 * config.n_layers and params["h.0.attn.q.ia3_l"].dtype == np.float64
    B, T = 3, config.context_length
    batch = {"x": rng.integers(0, config.vocab_size, (B, T)), "y": rng.integers(0, config.vocab_size, (B, T))}
    results = gradcheck.check_model("ia3 queries", lambda p, tr: model.loss_and_grads(p, cfg, batch, tr), params,
                                    trainable, rng)
    assert {r.argument for r in results} == trainable
    for r in results:
        assert r.error <= gradcheck.TOLERANCE, f"d{r.argument}: {r.error:.2e}"


def test_query_factors_scale_q_with_its_bias_count_l_3c_plus_f_and_round_trip():
    params, config = ia3.add_ia3(model.init_params(TINY, 0, dtype=np.float64), TINY, Ia3Config(queries=True))
    assert config.lora.targets == ("q", "k", "v", "proj")
    rng = np.random.default_rng(2)
    params = {n: (1.0 + 0.5 * rng.standard_normal(a.shape) if n.endswith(".ia3_l") else
                  0.3 * rng.standard_normal(a.shape) if n.endswith(".b") and n.startswith("h.") else a)
              for n, a in params.items()}
    x = rng.standard_normal((2, 3, C))
    q, _ = methods.linear_pair(config, "h.0.attn.q").forward(params, "h.0.attn.q", x, config.lora, False, None,
                                                             set())
    np.testing.assert_allclose(q, params["h.0.attn.q.ia3_l"] * (x @ params["h.0.attn.q.W"].T + params["h.0.attn.q.b"]),
                               rtol=1e-14)
    merged, merged_config = ia3.merge(params, config)
    ids = rng.integers(0, TINY.vocab_size, (2, TINY.context_length))
    np.testing.assert_allclose(model.next_token_logits(merged, merged_config, ids),
                               model.next_token_logits(params, config, ids), rtol=1e-12, atol=1e-12)
    trainable = set(lora.adapter_names(config))
    assert sum(params[n].size for n in trainable) == L * (3 * C + F)
    assert "IA3: L (3C + F) = 2 x (3 x 16 + 24)" in lora.count_report(params, trainable, config)
    d = json.loads(json.dumps(ModelConfig(**{**TINY.to_dict(), "lora": Ia3Config(queries=True)}).to_dict()))
    assert d["lora"] == {"method": "ia3", "queries": True} and ModelConfig.from_dict(d).lora == config.lora
    with pytest.raises(ValueError, match="queries: expected true or false, got 1"):
        Ia3Config(queries=1)


def test_q_k_v_read_one_input_as_three_linears_and_the_pruned_backward_gives_the_same_gradients():
    params, config = _scaled()
    trainable = set(lora.adapter_names(config))
    _, c = model.forward(params, config, np.zeros((1, 3), int))
    assert c[2][0][1][0] == "each"  # q is plain, k and v are IA3's: three linears on the shared input
    rng = np.random.default_rng(1)
    x = rng.integers(0, TINY.vocab_size, (3, TINY.context_length))
    batch = {"x": x, "y": np.roll(x, -1, axis=1)}
    loss, pruned = model.loss_and_grads(params, config, batch, trainable)
    # training wpe too forces every dx (block 0's q, k, v included) to be computed
    loss_all, unpruned = model.loss_and_grads(params, config, batch, trainable | {"wpe"})
    assert loss == loss_all and set(pruned) == trainable
    for n in trainable:
        assert np.array_equal(pruned[n], unpruned[n]), n


def test_merge_scales_rows_and_columns_and_computes_the_same_function():
    params, config = _scaled()
    merged, merged_config = ia3.merge(params, config)
    assert merged_config.lora is None and not any(n.endswith(".ia3_l") for n in merged)
    p = "h.1."
    np.testing.assert_array_equal(merged[p + "attn.k.W"], params[p + "attn.k.ia3_l"][:, None] * params[p + "attn.k.W"])
    np.testing.assert_array_equal(merged[p + "attn.v.b"], params[p + "attn.v.ia3_l"] * params[p + "attn.v.b"])
    np.testing.assert_array_equal(merged[p + "mlp.proj.W"], params[p + "mlp.proj.W"] * params[p + "mlp.proj.ia3_l"])
    assert merged[p + "mlp.proj.b"] is params[p + "mlp.proj.b"]  # added after the input scaling: unchanged
    assert merged[p + "attn.q.W"] is params[p + "attn.q.W"]
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.context_length))
    np.testing.assert_allclose(model.next_token_logits(merged, merged_config, x),
                               model.next_token_logits(params, config, x), rtol=1e-12, atol=1e-12)


def test_merge_refuses_another_methods_model():
    params, config = lora.add_lora(model.init_params(TINY, 0), TINY, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="expected the config of an IA3 model"):
        ia3.merge(params, config)


def test_count_report_gives_the_formula_and_the_count():
    config = ModelConfig()  # C 128, F 512, 2 layers
    params, adapted, trainable = finetune.setup_strategy(model.init_params(config, 0), config, CharTokenizer(),
                                                         finetune.FinetuneConfig(method="ia3"))
    report = lora.count_report(params, trainable, adapted)
    n = 2 * (2 * 128 + 512)
    assert f"trainable params: {n:,} ||" in report
    assert f"IA3: L (2C + F) = 2 x (2 x 128 + 512) = {n:,}" in report and "= the count above" in report
    assert n * 10 < 2 * 4 * 8 * (128 + 128)  # a tenth of LoRA's r = 8 on q, k, v, o


def test_config_round_trips_and_refuses_unknown_fields():
    config = ModelConfig(**{**TINY.to_dict(), "lora": Ia3Config()})
    d = json.loads(json.dumps(config.to_dict()))
    assert d["lora"] == {"method": "ia3"} and ModelConfig.from_dict(d) == config
    with pytest.raises(ValueError, match=r"lora: expected only the fields \['queries'\], got unknown \['rank'\]"):
        ModelConfig.from_dict({**d, "lora": {"method": "ia3", "rank": 4}})
    with pytest.raises(AttributeError):
        Ia3Config().targets = ("q",)  # the scaled linears are IA3's, not a setting


@pytest.mark.parametrize("lora_config, message", [
    (LoraConfig(rank=4), "rank: expected no LoRA setting with method 'ia3' (it learns only the vectors l_k, "
                         "l_v, l_ff and has no rank), got 4"),
    (LoraConfig(targets=("q",)), "targets: expected no LoRA setting with method 'ia3'"),
])
def test_a_lora_setting_under_ia3_is_refused_by_name(lora_config, message):
    with pytest.raises(ValueError) as e:
        finetune.FinetuneConfig(method="ia3", lora=lora_config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ---- runs, files, the CLI, the sweep


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    mc = ModelConfig(vocab_size=96, context_length=128, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    path = tmp_path_factory.mktemp("base") / "base.npz"
    save_checkpoint(str(path), model.init_params(mc, 0), {"model": mc.to_dict()})
    return path


def test_a_finetune_run_writes_an_adapter_of_the_vectors_that_loads_onto_its_base(base_file, tmp_path):
    base, mc, _, tok = runs.load_model(str(base_file))
    cfg = finetune.FinetuneConfig(method="ia3", n_train=16, n_test=4,
                                  train=TrainConfig(steps=3, batch_size=4, lr=3e-2, warmup_steps=0, eval_every=3))
    params, ft_config, trainable, s = finetune.finetune(base, mc, tok, cfg, run_dir=str(tmp_path))
    assert isinstance(ft_config.lora, Ia3Config) and trainable == set(lora.adapter_names(ft_config))
    assert s["trainable_params"] == mc.n_layers * (2 * mc.d_model + mc.d_ff) and "IA3: L (2C + F)" in s["report"]
    assert any(not (params[n] == 1.0).all() for n in trainable)  # training moved the vectors
    loaded, config, _, _ = runs.load_model(str(base_file), adapter=str(tmp_path))
    assert config == ft_config
    x = np.zeros((1, 5), int)
    np.testing.assert_array_equal(model.next_token_logits(loaded, config, x),
                                  model.next_token_logits(params, ft_config, x))


def test_cli_finetunes_evaluates_and_merges_ia3(base_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["finetune", "--checkpoint", str(base_file), "--method", "ia3", "--steps", "3",
                     "--batch-size", "4", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[ia3] IA3: L (2C + F) = 1 x (2 x 16 + 32) = 64" in out and (run / "adapter.npz").exists()
    assert cli.main(["evaluate", str(run)]) == 0
    assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged.npz")]) == 0
    assert "merged 3 adapters into W (IA3)" in capsys.readouterr().out
    merged, config, _, _ = runs.load_model(str(tmp_path / "merged.npz"))
    assert config.lora is None and not any(n.endswith(".ia3_l") for n in merged)


def test_cli_ia3_queries_trains_l_q_too_and_continues_with_it(base_file, tmp_path, capsys):
    """--ia3-queries: Ia3Config(queries=True), L (3C + F) vectors; the run's adapter says so, and a further run
    from it (--adapter) keeps the query vector without being asked again."""
    run = tmp_path / "run"
    assert cli.main(["finetune", "--checkpoint", str(base_file), "--method", "ia3", "--ia3-queries", "--steps", "3",
                     "--batch-size", "4", "--out", str(run)]) == 0
    assert "[ia3] IA3: L (3C + F) = 1 x (3 x 16 + 32) = 80" in capsys.readouterr().out
    params, config, _, _ = runs.load_model(str(base_file), adapter=str(run))
    assert config.lora == Ia3Config(queries=True) and not (params["h.0.attn.q.ia3_l"] == 1.0).all()  # l_q trained
    assert cli.main(["finetune", "--checkpoint", str(base_file), "--adapter", str(run), "--steps", "2",
                     "--batch-size", "4", "--out", str(tmp_path / "more")]) == 0
    assert "IA3: L (3C + F)" in capsys.readouterr().out
    assert runs.load_model(str(base_file), adapter=str(tmp_path / "more"))[1].lora == Ia3Config(queries=True)


def test_cli_ia3_queries_is_refused_for_another_method_and_for_an_adapter_without_them(base_file, tmp_path, capsys):
    assert cli.main(["finetune", "--method", "lora", "--ia3-queries", "--checkpoint", str(base_file)]) == 2
    err = capsys.readouterr().err
    assert "--ia3-queries: expected --method ia3 (an IA3 setting), got --method lora" in err and err.count("\n") == 1
    run = tmp_path / "plain"
    assert cli.main(["finetune", "--checkpoint", str(base_file), "--method", "ia3", "--steps", "2",
                     "--batch-size", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["finetune", "--checkpoint", str(base_file), "--adapter", str(run), "--ia3-queries",
                     "--steps", "2", "--out", str(tmp_path / "more")]) == 2
    err = capsys.readouterr().err
    assert "--ia3-queries: expected the adapter's own setting (no query vector" in err and err.count("\n") == 1
    assert not (tmp_path / "more").exists()


@pytest.mark.parametrize("flags, message", [
    (["--rank", "4"], "--rank: expected no LoRA setting with method 'ia3'"),
    (["--targets", "q,v"], "--targets: expected no LoRA setting with method 'ia3'"),
    (["--detach-norm"], "--detach-norm: expected --method dora"),
])
def test_cli_refuses_a_setting_ia3_has_not_in_one_line(flags, message, capsys, tmp_path):
    assert cli.main(["finetune", "--method", "ia3", *flags, "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_sweep_runs_an_ia3_cell_and_the_forgetting_study_includes_it():
    cell = sweep.Cell("t", method="ia3", lr=3e-2, seed=1, steps=2, batch_size=4, n_train=16, n_val=4, n_test=4,
                      eval_every=2, corpus_sentences=8)
    assert isinstance(cell.finetune_config().lora, Ia3Config)
    mc = ModelConfig(vocab_size=96, context_length=128, d_model=16, n_heads=2, n_layers=2, d_ff=32)
    record, _, _ = sweep.run_cell_on(cell, model.init_params(mc, 5), mc, CharTokenizer())
    assert record["trainable_params"] == 2 * (2 * 16 + 32) and record["key"] == cell.key()
    delta = record["evals"][-1]["delta"]
    # only k, v and proj change (rows, rows, columns of W); q, o, fc stay the base's
    assert {p.split(".", 2)[-1] for p, v in delta.items() if v > 0} == {"attn.k", "attn.v", "mlp.proj"}
    grid = studies.forgetting("unused", 3)
    assert sorted({c.lr for c in grid if c.method == "ia3"}) == sorted(methods.method("ia3").study_lrs)
    assert sum(c.method == "ia3" for c in grid) == 4 * 3


def test_gradcheck_lists_ia3(capsys):
    assert cli.main(["gradcheck", "--groups", "ops"]) == 0
    out = capsys.readouterr().out
    for op in ("ia3_output (k, v)", "ia3_output, no bias (k)", "ia3_input (proj)"):
        assert f"\n{op} " in out, op


def test_the_vectors_move_with_the_params_device(device_xp):
    params, config = ia3.add_ia3(model.params_to(model.init_params(TINY, 0), device_xp), TINY)
    assert all(type(params[n]) is type(params["wte"]) for n in lora.adapter_names(config))
    merged, _ = ia3.merge(params, config)
    assert type(merged["h.0.attn.k.W"]) is type(params["wte"])
