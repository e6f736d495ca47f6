"""The bridge to transformers and PEFT, against the real libraries (no mocks, nothing downloaded).

Tiny random GPT-2s are built with transformers.GPT2Config, with every
parameter random and far from zero (the key bias included: dropping it must
change nothing), saved with save_pretrained and read back by minilora; minilora
models go out and are loaded by AutoModelForCausalLM, AutoTokenizer and
PeftModel. Logits must agree to 1e-10 relative in float64 (only the order of
summation differs) and 1e-5 in float32. They skip only where transformers,
peft or torch are not installed, and never in CI (tests/clients.py).
"""

import json
import os
import warnings

import numpy as np
import pytest
from clients import require

torch, transformers, peft = require("torch"), require("transformers"), require("peft")
require("safetensors"), require("tokenizers")

from minilora import bridge, cli, corpus, hf, model, optim, peft_io  # noqa: E402
from minilora.methods import dora, ia3, lora  # noqa: E402
from minilora.methods.lora import LoraConfig  # noqa: E402
from minilora.model import ModelConfig  # noqa: E402
from minilora.runs import load_model  # noqa: E402
from minilora.tokenizer import CharTokenizer  # noqa: E402
from refusals import refused as refused_cli  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
RTOL64, RTOL32 = 1e-10, 1e-5


def assert_trains_on(params, config, ids, trainable, lr, steps=10):
    """An adapter read in fine-tunes on: every trainable name gets a gradient and the loss falls by 0.05 nats."""
    batch = {"x": ids[:, :-1], "y": ids[:, 1:]}
    state = optim.adamw_init(params, trainable)
    first, _ = model.loss_and_grads(params, config, batch, trainable)
    for _ in range(steps):
        loss, grads = model.loss_and_grads(params, config, batch, trainable)
        optim.adamw_step(params, grads, state, lr)
    assert set(grads) == set(trainable) and loss < first - 0.05, (first, loss)


V, T, C, L, NH, F = 96, 12, 24, 2, 3, 40  # V: the character tokenizer's vocabulary


def peft_trains(pm, lr, steps=5):
    """PEFT trains its own adapter a few steps (Adam), so no adapter weight is left at its init; pm in eval mode."""
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    x = torch.tensor(np.random.default_rng(0).integers(0, V, (4, T)))
    for _ in range(steps):
        loss = pm(x, labels=x, attention_mask=torch.ones_like(x)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_logits_equal(what, ours, theirs, rtol=RTOL64):
    """rel(ours, theirs) < rtol (1e-10 in float64), and the largest |difference| printed (pytest -s) for the table
    of measured differences (docs/methods.md, "Every method across, measured"): `what` names the method and the direction."""
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"\ninterop: {what}: max |logit diff| {diff:.1e} (largest |logit| {float(np.max(np.abs(theirs))):.2f})")
    assert diff < rtol * float(np.max(np.abs(theirs))), (what, diff)


def hf_config(**changes):
    settings = dict(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=NH, n_inner=F,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**settings, **changes})


def random_gpt2(dtype=torch.float64, seed=0):
    """A GPT2LMHeadModel with every parameter random: weights std 0.3, LayerNorm gains 1 + 0.3 noise."""
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(hf_config()).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                                                  else 0.0))
    return m


def assert_holds_what_torch_holds(params, config, m):
    """Every array of params is, bit for bit, the tensor torch holds in m widened to float32 by torch itself (exact
    for bf16 and float16), in minilora's layout: Conv1D weights transposed, c_attn split in three (the key bias,
    dropped, is the one tensor not kept)."""
    held = {k.removeprefix("transformer."): v for k, v in m.state_dict().items()}
    compared = set()
    for key, names in hf.hf_to_minilora_names(config).items():
        t = held[key].detach().float().numpy()
        if key.endswith(hf.TRANSPOSED):
            t = t.T
        for name, piece in zip(names, np.split(t, 3) if len(names) == 3 else [t]):
            if name is None:
                continue
            ours, piece = params[name], np.ascontiguousarray(piece)
            assert ours.shape == piece.shape and np.array_equal(ours, piece), name
            assert np.array_equal(ours.astype(np.float32).view(np.uint32), piece.view(np.uint32)), name
            compared.add(name)
    assert compared == set(params)


def torch_logits(m, ids):
    # a 2-D attention mask: without it transformers 5 may read position ids as packed sequences
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


def our_logits(params, config, ids):
    h, _ = model.forward(params, config, ids)
    return h @ params["wte"].T


def ids_for(vocab=V, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (3, T))


@pytest.fixture(scope="module")
def saved64(tmp_path_factory):
    m = random_gpt2(torch.float64)
    path = tmp_path_factory.mktemp("gpt2-64") / "model"
    m.save_pretrained(path)
    return m, path


@pytest.fixture(scope="module")
def saved32(tmp_path_factory):
    m = random_gpt2(torch.float32, seed=2)
    path = tmp_path_factory.mktemp("gpt2-32") / "model"
    m.save_pretrained(path)
    return m, path


def test_the_key_bias_is_non_zero_and_does_not_change_the_logits(saved64):
    m, _ = saved64
    key_bias = m.transformer.h[0].attn.c_attn.bias[C:2 * C]
    assert key_bias.abs().min() > 0 and key_bias.abs().max() > 0.1
    ids = ids_for()
    before = torch_logits(m, ids)
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.bias[C:2 * C] += 3.0  # q . b_k shifts each softmax row by one constant
    after = torch_logits(m, ids)
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.bias[C:2 * C] -= 3.0
    assert rel(after, before) < 1e-12


def test_import_gives_transformers_logits_float64(saved64):
    m, path = saved64
    params, config, _ = hf.read_gpt2(path, dtype=np.float64)
    assert config == ModelConfig(vocab_size=V, context_length=T, d_model=C, n_heads=NH, n_layers=L, d_ff=F)
    ids = ids_for()
    assert_logits_equal("GPT-2 float64 folder, transformers -> minilora", our_logits(params, config, ids),
                        torch_logits(m, ids))


def test_import_gives_transformers_logits_float32_through_the_cli(saved32, tmp_path, capsys):
    m, path = saved32
    out = tmp_path / "run"
    assert cli.main(["import-hf", str(path), "--out", str(out)]) == 0
    assert "imported GPT-2" in capsys.readouterr().out
    params, config, meta, tokenizer = load_model(out)
    assert meta["kind"] == "imported" and params["wte"].dtype == np.float32 and tokenizer.kind == "char"
    ids = ids_for()
    assert rel(our_logits(params, config, ids), torch_logits(m, ids)) < RTOL32
    # the folder itself is accepted where a checkpoint is
    direct, _, _, _ = load_model(path)
    assert all(np.array_equal(direct[n], params[n]) for n in params)


def test_keys_without_the_transformer_prefix_and_a_tied_lm_head_read_the_same(saved64, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = saved64
    tensors = load_file(str(path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["lm_head.weight"] = bare["wte.weight"]
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "config.json").write_text((path / "config.json").read_text())
    save_file(bare, str(folder / "model.safetensors"))
    a, _, _ = hf.read_gpt2(path, dtype=np.float64)
    b, _, _ = hf.read_gpt2(folder, dtype=np.float64)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_the_conv1d_weights_are_transposed_once_by_name(saved64):
    m, path = saved64
    params, _, _ = hf.read_gpt2(path, dtype=np.float64)
    block = m.transformer.h[1]
    W = block.attn.c_attn.weight.detach().numpy()  # (C, 3C): Conv1D's (in, out)
    assert np.array_equal(params["h.1.attn.k.W"], W[:, C:2 * C].T)
    assert np.array_equal(params["h.1.mlp.fc.W"], block.mlp.c_fc.weight.detach().numpy().T)
    assert set(hf.TRANSPOSED) == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


# ---- export


def random_minilora(config, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {n: ((1.0 if n.endswith(".g") else 0.0) + 0.3 * rng.standard_normal(s)).astype(dtype)
            for n, s in model.param_shapes(config).items()}


CONFIG = ModelConfig(vocab_size=V, context_length=T, d_model=C, n_heads=NH, n_layers=L, d_ff=F)
LORA_CASES = {"qkvo": LoraConfig(rank=2, alpha=5.0, targets=("q", "k", "v", "o")),
              "qv": LoraConfig(rank=3, alpha=4.0, targets=("q", "v")),
              "all six": LoraConfig(rank=2, alpha=3.0, targets=tuple(lora.TARGETS)),
              "rslora": LoraConfig(rank=4, alpha=6.0, targets=("q", "k", "v", "o"), rslora=True)}


def trained_lora(base, lora_config, seed=3):
    """base plus adapters whose B is random (a trained adapter), not the zero it starts at."""
    params, config = lora.add_lora(base, CONFIG, lora_config, seed=seed)
    rng = np.random.default_rng(seed)
    return {n: 0.3 * rng.standard_normal(a.shape) if n.endswith(".lora_B") else a for n, a in params.items()}, config


def load_peft(folder):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    return peft.PeftModel.from_pretrained(base, os.path.join(folder, bridge.ADAPTER_DIR)).eval()


@pytest.mark.parametrize("case", LORA_CASES)
def test_a_lora_export_is_one_peft_adapter_with_equal_logits_and_merge(case, tmp_path):
    base = random_minilora(CONFIG)
    params, config = trained_lora(base, LORA_CASES[case])
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer())
    pm = load_peft(out)
    ids = ids_for()
    assert_logits_equal(f"LoRA ({case}), minilora -> PEFT", our_logits(params, config, ids), torch_logits(pm, ids))
    merged, merged_config = lora.merge(params, config)
    assert rel(torch_logits(pm.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL64
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    n = sum(t in LORA_CASES[case].targets for t in "qkv")
    r = LORA_CASES[case].rank
    assert ac["fan_in_fan_out"] is True and ac["base_model_name_or_path"] == str(out.resolve())
    assert ac["rank_pattern"] == ({"attn.c_attn": n * r} if n > 1 else {})


def test_the_c_attn_adapter_is_stacked_a_and_block_diagonal_b(tmp_path):
    base = random_minilora(CONFIG)
    params, config = trained_lora(base, LORA_CASES["qv"])
    ac, tensors = peft_io.to_peft(params, config, "base")
    A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    r = 3
    assert A.shape == (2 * r, C) and B.shape == (3 * C, 2 * r)
    assert np.array_equal(A, np.concatenate([params["h.0.attn.q.lora_A"], params["h.0.attn.v.lora_A"]]))
    assert np.array_equal(B[:C, :r], params["h.0.attn.q.lora_B"]) and not B[:C, r:].any()
    assert not B[C:2 * C].any()  # k is not targeted: its rows are zero
    assert np.array_equal(B[2 * C:, r:], params["h.0.attn.v.lora_B"]) and not B[2 * C:, :r].any()
    # PEFT's scale for c_attn, alpha_c / (2r), is minilora's alpha / r
    assert ac["alpha_pattern"]["attn.c_attn"] / (2 * r) == pytest.approx(config.lora.scale, rel=1e-15)


def test_the_exported_character_tokenizer_encodes_exactly_as_minilora(tmp_path):
    config = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=32)
    bridge.export_model(tmp_path / "m", model.init_params(config), config, CharTokenizer())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ours = CharTokenizer()
    text = corpus.make_text(200, seed=0)  # the corpus text
    for s in [text, corpus.VOCAB, "  two  spaces\n\nand?", "'\"\\~{}", " ", "\n"]:
        ids = theirs.encode(s)
        assert ids == ours.encode(s).tolist()
        assert theirs.decode(ids) == s
    with pytest.raises(Exception):
        theirs.encode("caf\u00e9")  # outside the vocabulary: an error, as minilora's


def test_cli_exports_pretrained_full_merged_and_lora_runs_with_equal_logits(tmp_path, capsys):
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--out", str(pre), "--steps", "3", "--eval-every", "3", "--batch-size", "4",
                     *tiny]) == 0
    runs = {"pretrained": (pre, None)}
    for method in ("full", "lora"):
        out = tmp_path / method
        assert cli.main(["finetune", "--method", method, "--checkpoint", str(pre), "--out", str(out),
                         "--steps", "3", "--batch-size", "4", "--lr", "0.05"]) == 0
        runs[method] = (out, None)
    assert cli.main(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged.npz")]) == 0
    runs["merged"] = (tmp_path / "merged.npz", None)
    runs["lora on base"] = (pre, tmp_path / "lora" / "adapter.npz")
    capsys.readouterr()
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    for name, (run, adapter) in runs.items():
        out = tmp_path / ("hf-" + name.replace(" ", "-"))
        assert cli.main(["export", str(run), "--out", str(out)] + (["--adapter", str(adapter)] if adapter else [])) == 0
        params, config, _, _ = load_model(run, adapter=adapter)
        ours = our_logits(params, config, ids)
        if config.lora is None:
            theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        else:
            theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out),
                                                    str(out / "adapter")).eval()
            merged, merged_config = lora.merge(params, config)
            assert rel(torch_logits(theirs.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL32
            assert np.abs(params["h.0.attn.q.lora_B"]).max() > 0  # trained: the check is not of a zero update
        assert rel(torch_logits(theirs, ids), ours) < RTOL32, name


# ---- PEFT adapters in


def test_an_adapter_trained_by_peft_imports_with_equal_logits_and_fine_tunes_on(saved32, tmp_path):
    m, path = saved32
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    pc = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "attn.c_proj", "mlp.c_fc"],
                         fan_in_fan_out=True, lora_dropout=0.0)
    pm = peft.get_peft_model(base, pc)
    peft_trains(pm, 1e-2)  # a few steps, so B is no longer zero
    adapter = tmp_path / "peft-adapter"
    pm.save_pretrained(adapter)
    params, config, meta, _ = load_model(path, adapter=adapter)
    assert config.lora.targets == ("q", "k", "v", "o", "fc") and config.lora.rank == 3
    assert np.array_equal(params["h.0.attn.q.lora_A"], params["h.0.attn.k.lora_A"])  # the shared A, copied
    ids = ids_for()
    assert rel(our_logits(params, config, ids), torch_logits(pm, ids)) < RTOL32
    # minilora fine-tunes on from it: the adapters get gradients and the loss falls
    trainable = lora.lora_names(params)
    assert_trains_on(params, config, ids, trainable, lr=1e-2)


def test_generate_evaluate_and_merge_take_a_peft_folder_as_adapter(saved32, tmp_path, capsys):
    _, path = saved32
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    assert cli.main(["merge", str(path), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m.npz")]) == 0
    merged, merged_config, _, _ = load_model(tmp_path / "m.npz")
    ids = ids_for()
    assert rel(our_logits(merged, merged_config, ids), torch_logits(pm.eval(), ids)) < RTOL32


# ---- refusals: one line, exit 2, no traceback, nothing written


def _refused(capsys, argv, out, words):
    return refused_cli(capsys, argv, words, out)


def _folder_like(src, dst, config=None, weights=True):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    if weights:
        (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("field, value, words", [
    ("model_type", "llama", ["model_type", "'llama'"]),
    ("scale_attn_by_inverse_layer_idx", True, ["scale_attn_by_inverse_layer_idx"]),
    ("reorder_and_upcast_attn", True, ["reorder_and_upcast_attn"]),
    ("activation_function", "relu", ["activation_function", "'relu'"]),
    ("layer_norm_epsilon", 1e-6, ["layer_norm_epsilon", "1e-06"]),
    ("tie_word_embeddings", False, ["tie_word_embeddings"]),
])
def test_import_refuses_what_minilora_does_not_compute(saved32, tmp_path, capsys, field, value, words):
    folder = _folder_like(saved32[1], tmp_path / "bad", {field: value})
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run", words)


def test_import_refuses_a_pickle_and_says_how_to_convert(saved32, tmp_path, capsys):
    folder = _folder_like(saved32[1], tmp_path / "pickled", weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened")
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["pytorch_model.bin", "pickle", "never unpickles", "save_pretrained"])


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_import_refuses_a_truncated_or_corrupt_safetensors_file(saved32, tmp_path, capsys, damage):
    folder = _folder_like(saved32[1], tmp_path / "broken")
    data = (folder / "model.safetensors").read_bytes()
    data = data[:len(data) // 2] if damage == "truncated" else data[:8] + b"{not json" + data[17:]
    (folder / "model.safetensors").write_bytes(data)
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["model.safetensors", "truncated, corrupt"])


def word_level_tokenizer_json(n):
    """A tokenizers-library tokenizer of n whole-word tokens, trained by nothing: enough to disagree with wte."""
    import tokenizers

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tk.to_str()


def test_import_refuses_a_tokenizer_of_another_vocabulary(saved32, tmp_path, capsys):
    folder = _folder_like(saved32[1], tmp_path / "tok")
    (folder / "tokenizer.json").write_text(word_level_tokenizer_json(50))  # 50 tokens, the weights have 96
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["tokenizer.json", f"{V} tokens", "got 50"])


def test_import_refuses_a_model_without_its_tokenizer(saved32, tmp_path, capsys):
    folder = _folder_like(saved32[1], tmp_path / "notok")
    # a GPT-2 of vocab 37 with no tokenizer.json: no tokenizer minilora could assume
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:37]
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 37}))
    assert hf.read_gpt2(folder)[1].vocab_size == 37  # the weights themselves read
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["tokenizer.json", "vocab_size 37"])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]
    assert cli.main(["pretrain", "--out", str(root / "pre"), "--steps", "2", "--eval-every", "2",
                     "--batch-size", "4", *tiny]) == 0
    for method, task in (("prompt", "subject"), ("lora", "kind")):
        assert cli.main(["finetune", "--method", method, "--task", task, "--checkpoint", str(root / "pre"),
                         "--out", str(root / f"{method}-{task}"), "--steps", "2", "--batch-size", "4"]) == 0
    return root


@pytest.mark.parametrize("run, words", [("prompt-subject", ["prompt", "positions 0..P-1", "--peft-positions"]),
                                        ("lora-kind", ["classification", "bias"])])
def test_export_refuses_a_prompt_run_and_a_head_saying_why(tiny_runs, tmp_path, capsys, run, words):
    _refused(capsys, ["export", str(tiny_runs / run), "--out", str(tmp_path / "out")], tmp_path / "out", words)


def test_qlora_and_dora_runs_export_as_peft_adapters_and_a_merged_qlora_run_as_a_plain_gpt2(tmp_path, capsys):
    """A QLoRA run goes out as LoRA on its dequantized base (qlora.as_lora), a DoRA run as a PEFT DoRA adapter;
    merged, a QLoRA run is a plain GPT-2. transformers computes each as minilora computed the run."""
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--out", str(pre), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     *tiny]) == 0
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    for method in ("dora", "qlora"):
        run = tmp_path / method
        assert cli.main(["finetune", "--method", method, "--checkpoint", str(pre), "--out", str(run),
                         "--steps", "3", "--batch-size", "4", "--lr", "0.05"]) == 0
        params, config, _, _ = load_model(run)
        assert np.abs(params["h.0.attn.q.lora_B"]).max() > 0  # trained: the check is not of a zero update
        out = tmp_path / f"hf-{method}"
        assert cli.main(["export", str(run), "--out", str(out)]) == 0
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out),
                                                str(out / "adapter")).eval()
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is (method == "dora")
        assert rel(torch_logits(theirs, ids), our_logits(params, config, ids)) < RTOL32, method
        if method == "qlora":
            assert cli.main(["merge", str(run), "--out", str(tmp_path / f"{method}.npz")]) == 0
            merged_out = tmp_path / f"hf-{method}-merged"
            assert cli.main(["export", str(tmp_path / f"{method}.npz"), "--out", str(merged_out)]) == 0
            merged = transformers.AutoModelForCausalLM.from_pretrained(merged_out).eval()
            assert rel(torch_logits(merged, ids), our_logits(params, config, ids)) < RTOL32


def test_a_peft_adapter_on_another_base_or_claiming_dora_without_magnitudes_is_refused(saved32, saved64, tmp_path,
                                                                                       capsys):
    base = random_minilora(CONFIG, dtype=np.float32)
    params, config = trained_lora(base, LORA_CASES["qkvo"])
    bridge.export_model(tmp_path / "e", {n: a.astype(np.float32) for n, a in params.items()}, config,
                        CharTokenizer())
    adapter = tmp_path / "e" / "adapter"
    # the base given is saved32's weights, not the base this adapter was exported with
    _refused(capsys, ["merge", str(saved32[1]), "--adapter", str(adapter), "--out", str(tmp_path / "m.npz")],
             tmp_path / "m.npz", ["fingerprint"])
    ac = json.loads((adapter / "adapter_config.json").read_text())
    # use_dora on a file of LoRA pairs only: PEFT would keep the magnitudes at their initial values
    for change, words in (({"use_dora": True}, ["lora_magnitude_vector", "initial values"]),
                          ({"peft_type": "LOHA"}, ["peft_type", "'LOHA'"])):
        bad = tmp_path / ("bad-" + next(iter(change)))
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**ac, **change}))
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        _refused(capsys, ["merge", str(tmp_path / "e"), "--adapter", str(bad), "--out", str(tmp_path / "m.npz")],
                 tmp_path / "m.npz", words)


def test_a_peft_adapter_of_other_shapes_is_refused(saved32, tmp_path, capsys):
    base = transformers.GPT2LMHeadModel(hf_config(n_embd=2 * C, n_head=NH)).eval()
    base.save_pretrained(tmp_path / "wide")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    pm.save_pretrained(tmp_path / "a")
    # written by PEFT itself, with base_model_name_or_path pointing at the wide model: the fingerprint differs too,
    # so point it nowhere to reach the shape check
    ac = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**ac, "base_model_name_or_path": "elsewhere"}))
    _refused(capsys, ["merge", str(saved32[1]), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m.npz")],
             tmp_path / "m.npz", ["another base"])


# ---- the package's dependencies, and a GPT-2 folder where a checkpoint goes


def test_the_package_never_imports_torch_transformers_or_peft_and_the_hf_libraries_only_when_used():
    import ast
    import pathlib

    package = pathlib.Path(bridge.__file__).parent
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                roots = {n.split(".")[0] for n in names}
                assert not roots & {"torch", "transformers", "peft"}, (path.name, node.lineno)
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top_level:  # the [hf] extra is optional: imported inside the functions that need it
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not {n.split(".")[0] for n in names} & {"safetensors", "tokenizers"}, (path.name, node.lineno)


def test_finetune_continues_from_a_gpt2_folder_given_as_the_checkpoint(tmp_path, capsys):
    torch.manual_seed(4)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(path)  # room for the task's records
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--method", "lora", "--checkpoint", str(path), "--out", str(out), "--steps", "2",
                     "--batch-size", "4"]) == 0
    params, config, _, tokenizer = load_model(out)
    assert config.lora is not None and tokenizer.kind == "char"
    # and the LoRA run goes back out, its adapter a PEFT folder on the exported base
    assert cli.main(["export", str(out), "--out", str(tmp_path / "back")]) == 0
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back"),
                                        str(tmp_path / "back" / "adapter")).eval()
    ids = ids_for()
    assert rel(torch_logits(pm, ids), our_logits(params, config, ids)) < RTOL32


def test_a_bpe_tokenizer_crosses_both_ways_and_encodes_as_the_runs(tmp_path, capsys):
    import tokenizers

    # a BPE trained here on the toy corpus, and a random GPT-2 with one embedding row per token
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    bpe.decoder = tokenizers.decoders.Fuse()
    bpe.train_from_iterator([corpus.make_text(400, seed=1)],
                            tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    n = bpe.get_vocab_size()
    torch.manual_seed(3)
    m = transformers.GPT2LMHeadModel(hf_config(vocab_size=n)).eval()
    folder = tmp_path / "bpe-gpt2"
    m.save_pretrained(folder)
    bpe.save(str(folder / "tokenizer.json"))
    run = tmp_path / "run"
    assert cli.main(["import-hf", str(folder), "--out", str(run)]) == 0
    assert "bpe tokenizer" in capsys.readouterr().out
    params, config, _, tokenizer = load_model(run)
    assert tokenizer.kind == "bpe" and config.vocab_size == n
    text = "the cat saw the dog.\n"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text) and tokenizer.decode(ids) == text  # merges, and a round trip
    assert rel(our_logits(params, config, ids[None]), torch_logits(m, ids[None])) < RTOL32
    assert cli.main(["export", str(run), "--out", str(tmp_path / "back")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for s in (text, corpus.make_text(20, seed=2)):
        assert theirs.encode(s) == tokenizer.encode(s).tolist()
    # GPT-2's bos and eos name the run's line end, the token every record ends with (id 0 here is [UNK])
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    end = tokenizer.encode("\n").tolist()
    assert len(end) == 1 and end[0] != 0 and written["eos_token_id"] == written["bos_token_id"] == end[0]


# ---- IA3 out to PEFT's IA3


def trained_ia3(base, seed=3):
    """base plus IA3 vectors away from the ones they start at (a trained IA3)."""
    params, config = ia3.add_ia3(base, CONFIG)
    rng = np.random.default_rng(seed)
    return {n: 1.0 + 0.5 * rng.standard_normal(a.shape) if n.endswith(".ia3_l") else a
            for n, a in params.items()}, config


def test_an_ia3_export_is_peft_ia3_with_the_vectors_written_equal_logits_and_merge(tmp_path):
    base = random_minilora(CONFIG)
    params, config = trained_ia3(base)
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer())
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ac["peft_type"] == "IA3" and ac["feedforward_modules"] == ["mlp.c_proj"]
    pm = load_peft(out)
    # PEFT holds what was written: c_attn's output scaled by [1; l_k; l_v] (q unchanged), c_proj's input by l_ff
    block = pm.base_model.model.transformer.h[1]
    c_attn = block.attn.c_attn.ia3_l["default"].detach().numpy().ravel()
    np.testing.assert_array_equal(c_attn, np.concatenate([np.ones(C), params["h.1.attn.k.ia3_l"],
                                                          params["h.1.attn.v.ia3_l"]]))
    np.testing.assert_array_equal(block.mlp.c_proj.ia3_l["default"].detach().numpy().ravel(),
                                  params["h.1.mlp.proj.ia3_l"])
    assert not hasattr(block.attn.c_proj, "ia3_l")  # attention's output projection is not scaled
    ids = ids_for()
    assert_logits_equal("IA3 (no query vector), minilora -> PEFT", our_logits(params, config, ids),
                        torch_logits(pm, ids))
    merged, merged_config = ia3.merge(params, config)
    assert rel(torch_logits(pm.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL64


@pytest.mark.parametrize("absmax_code", ["linear", "dynamic"])
def test_a_qlora_export_is_a_peft_lora_adapter_on_the_dequantized_base_with_equal_logits(tmp_path, absmax_code):
    """issue 28: the QLoRA function is deq(Q_W) + s B A, so the base goes out dequantized (float64 here: deq(Q_W)
    is float32, widened exactly) and the adapters as a LoRA run's; PeftModel's logits equal minilora's QLoRA ones."""
    from minilora.methods import qlora

    params, config = qlora.add_qlora(random_minilora(CONFIG), CONFIG,
                                     qlora.QLoraConfig(rank=2, alpha=3.0, targets=("q", "v", "fc"),
                                                       absmax_code=absmax_code))
    rng = np.random.default_rng(3)
    params = {n: 0.3 * rng.standard_normal(a.shape) if n.endswith(".lora_B") else a for n, a in params.items()}
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer())
    pm = load_peft(out)
    ids = ids_for()
    assert rel(torch_logits(pm, ids), our_logits(params, config, ids)) < RTOL64
    # the base transformers holds is deq(Q_W) exactly: c_attn's (in, out) weight is [W_q; W_k; W_v].T
    W_q = qlora.dequantized_weight(params, "h.0.attn.q", (C, C), np.float32, absmax_code=absmax_code)
    assert np.array_equal(pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight[:, :C].detach().numpy(),
                          W_q.T.astype(np.float64))
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ac["peft_type"] == "LORA" and ac["use_dora"] is False and ac["rank_pattern"] == {"attn.c_attn": 4}
    merged, merged_config = qlora.merge(params, config)
    assert rel(torch_logits(pm.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL64


def test_export_refuses_bnb_4bit_for_a_run_that_is_not_qlora_in_one_line(tmp_path):
    params, config = trained_lora(random_minilora(CONFIG), LORA_CASES["qv"])
    with pytest.raises(ValueError, match=r"--bnb-4bit: expected a QLoRA run .*, got a LoRA run$") as e:
        bridge.export_model(tmp_path / "out", params, config, CharTokenizer(), bnb_4bit=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# ---- issue 28: IA3 as PEFT trains it (c_attn's output scaled whole: the queries too, L (3C + F))


def test_an_ia3_export_with_query_factors_writes_them_into_c_attn_with_equal_logits_and_merge(tmp_path):
    params, config = ia3.add_ia3(random_minilora(CONFIG), CONFIG, ia3.Ia3Config(queries=True))
    rng = np.random.default_rng(4)
    params = {n: 1.0 + 0.5 * rng.standard_normal(a.shape) if n.endswith(".ia3_l") else a for n, a in params.items()}
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer())
    pm = load_peft(out)
    c_attn = pm.base_model.model.transformer.h[0].attn.c_attn.ia3_l["default"].detach().numpy().ravel()
    np.testing.assert_array_equal(c_attn, np.concatenate([params[f"h.0.attn.{t}.ia3_l"] for t in "qkv"]))
    ids = ids_for()
    ours = our_logits(params, config, ids)
    assert_logits_equal("IA3 (query vector), minilora -> PEFT", ours, torch_logits(pm, ids))
    without_q = {n: np.ones_like(a) if n.endswith("attn.q.ia3_l") else a for n, a in params.items()}
    assert rel(ours, our_logits(without_q, config, ids)) > 1e-3  # l_q changes the function: the check has teeth
    merged, merged_config = ia3.merge(params, config)
    assert rel(torch_logits(pm.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL64


def peft_trained_ia3(path, dtype, steps=5, **changes):
    """PEFT's default IA3 for GPT-2 (c_attn and mlp.c_proj, feedforward mlp.c_proj), trained a few steps by PEFT."""
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    pm = peft.get_peft_model(base, peft.IA3Config(task_type="CAUSAL_LM", **changes))
    return peft_trains(pm, 5e-2, steps)


def test_an_ia3_adapter_trained_by_peft_imports_with_its_query_factors_and_equal_logits_and_trains_on(saved64,
                                                                                                        tmp_path):
    m, path = saved64
    pm = peft_trained_ia3(path, torch.float64)
    pm.save_pretrained(tmp_path / "peft-ia3")
    ac = json.loads((tmp_path / "peft-ia3" / "adapter_config.json").read_text())
    assert set(ac["target_modules"]) == {"c_attn", "mlp.c_proj"} and ac["feedforward_modules"] == ["mlp.c_proj"]
    base_params, base_config, _ = hf.read_gpt2(path, dtype=np.float64)
    params, config, _ = peft_io.read_peft(tmp_path / "peft-ia3", base_params, base_config)
    assert config.lora == ia3.Ia3Config(queries=True) and config.lora.targets == ("q", "k", "v", "proj")
    l_c = pm.base_model.model.transformer.h[1].attn.c_attn.ia3_l["default"].detach().numpy().ravel()
    np.testing.assert_array_equal(params["h.1.attn.q.ia3_l"], l_c[:C])
    assert np.abs(params["h.1.attn.q.ia3_l"] - 1.0).max() > 1e-2  # PEFT trained the queries' factors
    ids = ids_for()
    ours = our_logits(params, config, ids)
    assert_logits_equal("IA3 (query vector), PEFT-trained -> minilora", ours, torch_logits(pm, ids))
    assert rel(ours, torch_logits(m, ids)) > 1e-3
    trainable = set(lora.adapter_names(config))
    assert len(trainable) == 4 * L and sum(params[n].size for n in trainable) == L * (3 * C + F)
    assert_trains_on(params, config, ids, trainable, lr=5e-2)


def test_finetune_adapter_continues_a_peft_ia3_adapter_and_exports_it_back(tmp_path, capsys):
    torch.manual_seed(6)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(path)
    pm = peft_trained_ia3(path, torch.float32)
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "more"
    assert cli.main(["finetune", "--checkpoint", str(path), "--adapter", str(tmp_path / "peft"), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--lr", "1e-12"]) == 0
    assert "IA3: L (3C + F)" in capsys.readouterr().out
    params, config, _, _ = load_model(path, adapter=out / "adapter.npz")
    assert config.lora == ia3.Ia3Config(queries=True)
    ids = ids_for()
    assert rel(our_logits(params, config, ids), torch_logits(pm, ids)) < RTOL32
    assert cli.main(["export", str(path), "--adapter", str(out / "adapter.npz"), "--out", str(tmp_path / "back")]) == 0
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back"),
                                          str(tmp_path / "back" / "adapter")).eval()
    assert rel(torch_logits(back, ids), torch_logits(pm, ids)) < RTOL32


@pytest.mark.parametrize("changes, words", [
    ({"target_modules": ["c_attn", "mlp.c_proj", "c_fc"], "feedforward_modules": ["mlp.c_proj"]},
     ["mlp.c_fc", "scaled on its output", "c_attn's output"]),
    ({"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["c_attn", "mlp.c_proj"]},
     ["attn.c_attn scaled on its input"]),
    ({"target_modules": ["c_attn"], "feedforward_modules": []}, ["mlp.c_proj in every block"]),
    ({"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["c_fc"]}, ["feedforward_modules",
                                                                                       "subset", "PEFT raises"]),
    ({"fan_in_fan_out": "yes"}, ["fan_in_fan_out"]),
    ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
])
def test_an_ia3_adapter_minilora_does_not_compute_is_one_line(saved64, tmp_path, capsys, changes, words):
    _, path = saved64
    pm = peft_trained_ia3(path, torch.float64, steps=0)
    pm.save_pretrained(tmp_path / "a")
    ac = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**ac, **changes}))
    _refused(capsys, ["merge", str(path), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m.npz")],
             tmp_path / "m.npz", ["--adapter:", *words])


# ---- issue 28: DoRA both ways (PEFT's LoraConfig(use_dora=True), lora_magnitude_vector per output feature)


DORA_CASES = {"qkvo": dora.DoraConfig(rank=2, alpha=5.0, targets=("q", "k", "v", "o")),
              "qv: k's rows of c_attn untargeted": dora.DoraConfig(rank=3, alpha=4.0, targets=("q", "v")),
              "all six": dora.DoraConfig(rank=2, alpha=3.0, targets=tuple(lora.TARGETS)),
              "rslora, fc only": dora.DoraConfig(rank=4, alpha=6.0, targets=("fc",), rslora=True)}


def trained_dora(base, dora_config, seed=3):
    """base plus DoRA adapters as training leaves them: B random, and m away from the row norms (g != 1)."""
    params, config = dora.add_dora(base, CONFIG, dora_config, seed=seed)
    rng = np.random.default_rng(seed)
    out = {}
    for n, a in params.items():
        if n.endswith(".lora_B"):
            a = 0.3 * rng.standard_normal(a.shape)
        elif n.endswith(dora.MAGNITUDE):
            a = a * (1.0 + 0.5 * rng.random(a.shape))
        out[n] = a
    return out, config


@pytest.mark.parametrize("case", DORA_CASES)
def test_a_dora_export_is_a_peft_dora_adapter_with_equal_logits_and_merge(case, tmp_path):
    base = random_minilora(CONFIG)
    params, config = trained_dora(base, DORA_CASES[case])
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer())
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ac["use_dora"] is True and ac["fan_in_fan_out"] is True
    pm = load_peft(out)
    ids = ids_for()
    ours = our_logits(params, config, ids)
    assert_logits_equal(f"DoRA ({case}), minilora -> PEFT", ours, torch_logits(pm, ids))
    assert rel(ours, our_logits(base, CONFIG, ids)) > 1e-2  # the adapters change the function: the check has teeth
    # PEFT holds m per output feature: c_attn's (3C,) is [m_q; m_k; m_v], an untargeted one's its rows' norms
    block = pm.base_model.model.transformer.h[1]
    targets = DORA_CASES[case].targets
    if "q" in targets:
        m_c = block.attn.c_attn.lora_magnitude_vector["default"].weight.detach().numpy()
        for row, t in enumerate("qkv"):
            want = (params[f"h.1.attn.{t}.{dora.MAGNITUDE}"] if t in targets
                    else np.linalg.norm(params[f"h.1.attn.{t}.W"], axis=1))
            np.testing.assert_allclose(m_c[row * C:(row + 1) * C], want, rtol=1e-15)
    merged, merged_config = dora.merge(params, config)
    assert rel(torch_logits(pm.merge_and_unload(), ids), our_logits(merged, merged_config, ids)) < RTOL64


def test_the_dora_norm_is_per_output_feature_as_peft_computes_it(tmp_path):
    """PEFT's get_weight_norm, called on c_attn's Conv1D (in, out) weight, is minilora's row_norms of each
    target's (out, in) W with the same scale inside: the norm's axis and the scale agree."""
    base = random_minilora(CONFIG)
    params, config = trained_dora(base, DORA_CASES["qkvo"])
    bridge.export_model(tmp_path / "e", params, config, CharTokenizer())
    c_attn = load_peft(tmp_path / "e").base_model.model.transformer.h[0].attn.c_attn
    s = c_attn.scaling["default"]
    assert s == pytest.approx(config.lora.scale, rel=1e-15)  # alpha_c / (3r) = alpha / r
    with torch.no_grad():
        delta = c_attn.lora_B["default"].weight @ c_attn.lora_A["default"].weight  # (3C, C)
        theirs = c_attn.lora_magnitude_vector["default"].get_weight_norm(c_attn.base_layer.weight, delta, s).numpy()
    ours = np.concatenate([dora.row_norms(params[f"h.0.attn.{t}.W"], params[f"h.0.attn.{t}.lora_A"],
                                          params[f"h.0.attn.{t}.lora_B"], config.lora.scale)[0] for t in "qkv"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert rel(ours, np.concatenate([np.linalg.norm(params[f"h.0.attn.{t}.W"], axis=1) for t in "qkv"])) > 1e-2


def peft_trained_dora(path, dtype, steps=5):
    """A PEFT DoRA adapter trained a few steps by PEFT itself (Adam, lr 1e-2): B and m no longer at their init."""
    torch.manual_seed(8)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "mlp.c_proj"],
                                                   fan_in_fan_out=True, use_dora=True, lora_dropout=0.0))
    return peft_trains(pm, 1e-2, steps)


def test_a_dora_adapter_trained_by_peft_imports_with_equal_logits_and_fine_tunes_on(saved64, tmp_path):
    m, path = saved64
    pm = peft_trained_dora(path, torch.float64)
    adapter = tmp_path / "peft-dora"
    pm.save_pretrained(adapter)
    base_params, base_config, _ = hf.read_gpt2(path, dtype=np.float64)
    params, config, _ = peft_io.read_peft(adapter, base_params, base_config)
    assert isinstance(config.lora, dora.DoraConfig) and not config.lora.detach_norm  # minilora's exact gradient
    assert config.lora.targets == ("q", "k", "v", "proj") and config.lora.rank == 3
    m_c = pm.base_model.model.transformer.h[0].attn.c_attn.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_array_equal(params[f"h.0.attn.k.{dora.MAGNITUDE}"], m_c[C:2 * C])  # k's third of m
    W_k = params["h.0.attn.k.W"]
    assert rel(params[f"h.0.attn.k.{dora.MAGNITUDE}"], np.linalg.norm(W_k, axis=1)) > 1e-3  # m was trained
    ids = ids_for()
    ours = our_logits(params, config, ids)
    assert_logits_equal("DoRA, PEFT-trained -> minilora", ours, torch_logits(pm, ids))
    assert rel(ours, torch_logits(m, ids)) > 1e-3  # the adapter changes the function: the check has teeth
    # minilora fine-tunes on from it: A, B and m get gradients and the loss falls
    trainable = set(lora.adapter_names(config))
    assert {n for n in trainable if n.endswith(dora.MAGNITUDE)}
    assert_trains_on(params, config, ids, trainable, lr=1e-2)


def test_finetune_adapter_continues_a_peft_dora_adapter_from_the_function_peft_computes(tmp_path, capsys):
    """`finetune --adapter` on a DoRA folder PEFT wrote: the run is a DoRA run that starts at PEFT's function
    (lr 1e-12: the run's adapter gives PEFT's logits), and goes back out as a PEFT DoRA adapter PEFT computes."""
    torch.manual_seed(6)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(path)  # room for the task's records
    pm = peft_trained_dora(path, torch.float32)
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "more"
    assert cli.main(["finetune", "--checkpoint", str(path), "--adapter", str(tmp_path / "peft"), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--lr", "1e-12", "--detach-norm"]) == 0
    params, config, meta, _ = load_model(path, adapter=out / "adapter.npz")
    assert config.lora.method == "dora" and config.lora.detach_norm  # PEFT's backward, asked for
    ids = ids_for()
    assert rel(our_logits(params, config, ids), torch_logits(pm, ids)) < RTOL32
    assert cli.main(["export", str(path), "--adapter", str(out / "adapter.npz"), "--out", str(tmp_path / "back")]) == 0
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back"),
                                          str(tmp_path / "back" / "adapter")).eval()
    assert rel(torch_logits(back, ids), torch_logits(pm, ids)) < RTOL32


# ---- issue 33: an adapter folder is read as PEFT reads it, or refused


def _peft_lora_state(pm):
    """PEFT's loaded LoRA tensors under the file's names (its adapter name 'default' taken out)."""
    return {k.replace(".default", ""): v.detach().numpy() for k, v in pm.state_dict().items() if ".lora_" in k}


@pytest.fixture(scope="module")
def peft_saved(saved64, tmp_path_factory):
    """A float64 PEFT adapter on saved64's base: r 2 on c_attn and c_fc, every B random (init_lora_weights false)."""
    _, path = saved64
    torch.manual_seed(5)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("peft") / "a"
    pm.save_pretrained(folder)
    from safetensors.numpy import load_file

    return folder, json.loads((folder / "adapter_config.json").read_text()), load_file(
        str(folder / "adapter_model.safetensors"))


def _only(tensors, *modules):
    return {k: v for k, v in tensors.items() if any(f".{m}." in k for m in modules)}


def _unprefixed(tensors, prefix):
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


# name -> (adapter_config changes, tensors(file tensors) -> tensors); True: both apply the file's tensors alike
PEFT_CASES = {
    "as saved": ({}, None, True),
    "a regex target, matched whole": ({"target_modules": r".*\.(c_attn|c_fc)"}, None, True),
    "null targets: PEFT's GPT-2 default c_attn": ({"target_modules": None}, lambda t: _only(t, "c_attn"), True),
    "an excluded module": ({"exclude_modules": ["c_fc"]}, lambda t: _only(t, "c_attn"), True),
    "an alpha pattern": ({"alpha_pattern": {"mlp.c_fc": 3}}, None, True),
    "tensors of a module not targeted": ({"target_modules": ["c_attn"]}, None, False),
    "targets matching nothing": ({"target_modules": ["nothing"]}, None, False),
    "a regex matching only part of a name": ({"target_modules": "c_attn"}, None, False),
    "a LayerNorm target": ({"target_modules": ["ln_1"]}, None, False),
    "an embedding target": ({"target_modules": ["wte", "c_attn", "c_fc"]}, None, False),
    "all-linear with two modules' tensors missing": ({"target_modules": "all-linear"}, None, False),
    "keys without base_model.model.": ({}, lambda t: _unprefixed(t, "base_model.model."), False),
    "keys without base_model.model.transformer.": ({}, lambda t: _unprefixed(t, "base_model.model.transformer."),
                                                   False),
    "the same tensor under two names": ({}, lambda t: {**t, "transformer.h.0.attn.c_attn.lora_B.weight":
                                                       t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
                                                       + 1.0}, False),
    "a targeted module's B missing": ({}, lambda t: {k: v for k, v in t.items() if "h.1.mlp.c_fc.lora_B" not in k},
                                      False),
    "a DoRA magnitude under use_dora false": ({}, lambda t: {**t, "base_model.model.transformer.h.0.mlp.c_fc."
                                                             "lora_magnitude_vector": np.ones(F)}, False),
    "a gaussian init": ({"init_lora_weights": "gaussian"}, None, True),
    "a PiSSA init, which rewrites W on loading": ({"init_lora_weights": "pissa"}, None, False),
    "an OLoRA init, which rewrites W on loading": ({"init_lora_weights": "olora"}, None, False),
}


REFUSAL_WORDS = {
    "tensors of a module not targeted": ["c_fc.lora_", "not one target_modules ['c_attn'] adapts"],
    "targets matching nothing": ["matches no module", "not found"],
    "a regex matching only part of a name": ["matches no module"],
    "a LayerNorm target": ["ln_1", "not supported"],
    "an embedding target": ["transformer.wte"],
    "all-linear with two modules' tensors missing": ["initial values"],
    "keys without base_model.model.": ["PEFT loads 'base_model.model.transformer.h."],
    "keys without base_model.model.transformer.": ["PEFT loads 'base_model.model.transformer.h."],
    "the same tensor under two names": ["second name"],
    "a targeted module's B missing": ["h.1.mlp.c_fc.lora_B", "initial values"],
    "a DoRA magnitude under use_dora false": ["lora_magnitude_vector", "use_dora false"],
    "a PiSSA init, which rewrites W on loading": ["init_lora_weights", "'pissa'", "changes the base weights"],
    "an OLoRA init, which rewrites W on loading": ["init_lora_weights", "'olora'"],
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_minilora_reads_an_adapter_folder_as_peft_does_or_refuses(saved64, peft_saved, tmp_path, case):
    """Either both load the folder and apply exactly the file's tensors (equal logits, float64, 1e-10), or
    minilora refuses it in one ValueError where PEFT raises, loads nothing, ignores a tensor or keeps a
    targeted module at its random init (PEFT's loaded LoRA tensors are not the file's)."""
    from safetensors.numpy import save_file

    _, path = saved64
    src, ac, tensors = peft_saved
    changes, edit, same = PEFT_CASES[case]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**ac, **changes}))
    tensors = edit(dict(tensors)) if edit else tensors
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        theirs = _peft_lora_state(pm)
        kept = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in pm.state_dict().items()
                if ".lora_" not in k}
        # PEFT applies the file's tensors as they are, on the base weights as they were
        peft_exact = (set(theirs) == set(tensors) and all(np.array_equal(theirs[k], tensors[k]) for k in tensors)
                      and all(torch.equal(kept[k], weights[k]) for k in weights if k in kept))
    except Exception:
        pm, peft_exact = None, False
    base_params, base_config, _ = hf.read_gpt2(path, dtype=np.float64)
    if same:
        params, config, _ = peft_io.read_peft(folder, base_params, base_config)
        assert peft_exact, "PEFT did not load the file's tensors as they are"
        ids = ids_for()
        assert_logits_equal(f"LoRA ({case}), PEFT -> minilora", our_logits(params, config, ids), torch_logits(pm, ids))
        assert rel(our_logits(params, config, ids), our_logits(base_params, base_config, ids)) > 1e-3  # it adapts
    else:
        with pytest.raises(ValueError) as e:
            peft_io.read_peft(folder, base_params, base_config)
        assert "\n" not in str(e.value) and "adapter:" in str(e.value)
        for word in REFUSAL_WORDS.get(case, ()):
            assert word in str(e.value), str(e.value)
        assert not peft_exact, "minilora refused a folder PEFT applies exactly"


def test_a_relative_base_path_is_read_from_the_adapter_folder_so_the_fingerprint_is_checked(
        saved32, saved64, peft_saved, tmp_path, monkeypatch, capsys):
    import shutil

    src, ac, _ = peft_saved
    shutil.copytree(saved64[1], tmp_path / "base")
    shutil.copytree(src, tmp_path / "base" / "adapter")  # PEFT wrote no fingerprint: the base path is the only clue
    (tmp_path / "base" / "adapter" / "adapter_config.json").write_text(
        json.dumps({**ac, "base_model_name_or_path": ".."}))
    monkeypatch.chdir("/")  # run from elsewhere: ".." from here is not the base, from the adapter's folder it is
    _refused(capsys, ["merge", str(saved32[1]), "--adapter", str(tmp_path / "base" / "adapter"), "--out",
                      str(tmp_path / "m.npz")], tmp_path / "m.npz", ["fingerprint"])
    assert cli.main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "base" / "adapter"), "--out",
                     str(tmp_path / "m.npz")]) == 0


# ---- issue 33: every field's wrong type, deep nesting, sizes the file does not hold: one line, exit 2


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", "8"), ("lora_alpha", None), ("lora_alpha", float("nan")), ("r", "2"), ("r", 0), ("r", True),
    ("use_rslora", "yes"), ("lora_dropout", "0.1"), ("lora_dropout", 1.5), ("target_modules", 5),
    ("target_modules", ["c_attn", 3]), ("target_modules", "("), ("exclude_modules", 7), ("exclude_modules", "["),
    ("alpha_pattern", {"c_attn": "8"}), ("alpha_pattern", "x"), ("rank_pattern", {"(": 2}), ("rank_pattern", [1, 2]),
    ("rank_pattern", {"c_attn": 0}), ("rank_pattern", {"c_attn": 2.0}), ("base_model_name_or_path", 5),
    ("fan_in_fan_out", "true"), ("inference_mode", 1), ("task_type", 3), ("use_dora", "false"), ("use_dora", 0),
    ("modules_to_save", {"a": 1}), ("bias", False), ("layers_to_transform", 0), ("target_parameters", ["x"]),
    ("peft_type", ["LORA"]), ("init_lora_weights", 1), ("init_lora_weights", "corda"),
])
def test_an_adapter_config_field_of_the_wrong_type_is_one_line_naming_it(saved64, peft_saved, tmp_path, capsys,
                                                                          field, value):
    src, ac, _ = peft_saved
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**ac, field: value}))
    (folder / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    err = _refused(capsys, ["merge", str(saved64[1]), "--adapter", str(folder), "--out", str(tmp_path / "m.npz")],
                   tmp_path / "m.npz", ["--adapter:"])
    assert f" {field}: " in err or f" {field}[" in err, err  # the field itself named, not only the file


def _deep(n=100_000):
    return '{"a": ' * n + "1" + "}" * n


def test_json_nested_100000_deep_is_one_line(saved64, peft_saved, tmp_path, capsys):
    folder = _folder_like(saved64[1], tmp_path / "deep")
    (folder / "config.json").write_text(_deep())
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["config.json", "nested too deeply"])
    adapter = tmp_path / "deep-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(_deep())
    (adapter / "adapter_model.safetensors").write_bytes((peft_saved[0] / "adapter_model.safetensors").read_bytes())
    _refused(capsys, ["merge", str(saved64[1]), "--adapter", str(adapter), "--out", str(tmp_path / "m.npz")],
             tmp_path / "m.npz", ["--adapter:", "adapter_config.json", "nested too deeply"])


def test_a_huge_layer_count_is_compared_with_the_file_before_any_table_is_built(saved32, tmp_path, capsys,
                                                                               monkeypatch):
    folder = _folder_like(saved32[1], tmp_path / "huge", {"n_layer": 1_000_000_000})
    real = hf.hf_to_minilora_names

    def names(config):
        assert config.n_layers <= L, "a name table was built for the layer count config.json claims"
        return real(config)

    monkeypatch.setattr(hf, "hf_to_minilora_names", names)
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
             ["n_layer", f"the {L} blocks", "got 1000000000"])


@pytest.mark.parametrize("field, value", [("n_inner", 0), ("n_inner", "40"), ("n_inner", True), ("n_embd", "24"),
                                          ("n_layer", 0), ("n_head", 2.5), ("vocab_size", None)])
def test_gpt2_sizes_of_the_wrong_type_are_one_line_and_n_inner_0_is_not_4_n_embd(saved32, tmp_path, capsys, field,
                                                                                 value):
    folder = _folder_like(saved32[1], tmp_path / "bad", {field: value})
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run", [field])


def test_n_inner_null_is_four_n_embd_as_transformers_builds_it():
    assert transformers.GPT2LMHeadModel(hf_config(n_inner=None)).transformer.h[0].mlp.c_fc.weight.shape == (C, 4 * C)
    d = {**hf_config(n_inner=None).to_dict(), "model_type": "gpt2"}
    assert hf.model_config_from_gpt2(d).d_ff == 4 * C
    # n_inner 0: transformers builds an MLP of width 0; minilora refuses it rather than read 4 x n_embd
    assert transformers.GPT2LMHeadModel(hf_config(n_inner=0)).transformer.h[0].mlp.c_fc.weight.shape == (C, 0)
    with pytest.raises(ValueError, match="n_inner"):
        hf.model_config_from_gpt2({**d, "n_inner": 0})


def test_a_float64_model_is_imported_saying_its_weights_were_rounded(saved64, saved32, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["import-hf", str(saved64[1]), "--out", str(tmp_path / "r64")]) == 0
    assert "float64 weights rounded to float32" in capsys.readouterr().out
    assert cli.main(["import-hf", str(saved32[1]), "--out", str(tmp_path / "r32")]) == 0
    assert "rounded" not in capsys.readouterr().out


def test_every_bf16_bit_pattern_widens_to_the_float32_torch_gives():
    from minilora.tensor_file import bf16_bits_to_float32

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every bf16: zeros, subnormals, inf, NaN
    ours = bf16_bits_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan) and nan.sum() == 2 * 127  # 2 signs x 127 non-zero mantissas
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))  # bit for bit


@pytest.mark.parametrize("half, stored, words", [(torch.bfloat16, "BF16", "bf16 weights widened to float32"),
                                                 (torch.float16, "F16", "float16 weights widened to float32")])
def test_a_bf16_or_float16_gpt2_imports_exactly_as_its_float32_widening(tmp_path, capsys, half, stored, words):
    m = random_gpt2(torch.float32, seed=9).to(half)  # Module.to works in place: m is now the half model
    m.save_pretrained(tmp_path / "half")
    assert hf.stored_dtype(tmp_path / "half") == stored
    for dtype in (np.float32, np.float64):  # m is still the half model: what torch holds, widened by torch
        half, half_config, _ = hf.read_gpt2(tmp_path / "half", dtype=dtype)
        assert_holds_what_torch_holds(half, half_config, m)
    m.to(torch.float32).save_pretrained(tmp_path / "wide")  # the same numbers, widened by torch, stored as float32
    assert hf.stored_dtype(tmp_path / "wide") == "F32"
    for dtype in (np.float32, np.float64):
        a, config, _ = hf.read_gpt2(tmp_path / "half", dtype=dtype)
        b, _, _ = hf.read_gpt2(tmp_path / "wide", dtype=dtype)
        assert a.keys() == b.keys() and all(a[n].dtype == dtype and np.array_equal(a[n], b[n]) for n in a)
    capsys.readouterr()
    assert cli.main(["import-hf", str(tmp_path / "half"), "--out", str(tmp_path / "run")]) == 0
    assert words in capsys.readouterr().out
    params, _, _, _ = load_model(tmp_path / "run")
    assert all(np.array_equal(params[n], hf.read_gpt2(tmp_path / "wide")[0][n]) for n in params)
    ids = ids_for()
    assert_logits_equal(f"GPT-2 {stored} folder, transformers -> minilora", our_logits(a, config, ids),
                        torch_logits(m.to(torch.float64), ids))


def test_a_bf16_peft_adapter_reads_exactly_as_its_float32_widening_and_as_peft_applies_it(saved64, peft_saved,
                                                                                          tmp_path):
    from safetensors.torch import save_file

    _, path = saved64
    src, ac, tensors = peft_saved
    half = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    for name, cast in (("bf16", lambda t: t), ("wide", lambda t: t.to(torch.float32))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(ac))
        save_file({k: cast(t) for k, t in half.items()}, str(tmp_path / name / "adapter_model.safetensors"))
    base_params, base_config, _ = hf.read_gpt2(path, dtype=np.float64)
    a, config, _ = peft_io.read_peft(tmp_path / "bf16", base_params, base_config)
    b, _, _ = peft_io.read_peft(tmp_path / "wide", base_params, base_config)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64),
                                        str(tmp_path / "bf16")).eval()
    ids = ids_for()
    assert rel(our_logits(a, config, ids), torch_logits(pm, ids)) < RTOL64


def test_an_unreadable_weights_file_is_reported_as_unreadable(saved32, tmp_path, capsys, monkeypatch):
    import builtins

    folder = _folder_like(saved32[1], tmp_path / "locked")

    def locked_open(path, *args, **kwargs):  # what chmod 000 gives a user who is not root
        if str(path).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(hf, "open", locked_open, raising=False)
    err = _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run",
                   ["model.safetensors", "cannot be read", "Permission denied"])
    assert "No such file" not in err


def test_finetune_adapter_continues_an_adapter_peft_saved_from_the_function_peft_computes(tmp_path, capsys):
    """issue 27: `finetune --adapter` on a folder PEFT itself wrote (every B random, rank patterns from PEFT's own
    c_attn and mlp.c_proj) starts at PEFT's function: with a learning rate of 1e-12 the run's adapter gives PEFT's
    logits (float32, 1e-5); a folder on another base is refused."""
    torch.manual_seed(6)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(path)  # room for the task's records
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "mlp.c_proj"],
                                                   fan_in_fan_out=True, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "more"
    assert cli.main(["finetune", "--checkpoint", str(path), "--adapter", str(tmp_path / "peft"), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--lr", "1e-12"]) == 0
    params, config, _, _ = load_model(path, adapter=out / "adapter.npz")
    assert config.lora.targets == ("q", "k", "v", "proj")
    ids = ids_for()
    assert rel(our_logits(params, config, ids), torch_logits(pm, ids)) < RTOL32
    base_logits = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), ids)
    assert rel(torch_logits(pm, ids), base_logits) > 1e-3  # the adapter changes the function: the check has teeth
    torch.manual_seed(7)
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(tmp_path / "other")
    _refused(capsys, ["finetune", "--checkpoint", str(tmp_path / "other"), "--adapter", str(tmp_path / "peft"),
                      "--out", str(tmp_path / "no"), "--steps", "2", "--batch-size", "4"], tmp_path / "no",
             ["--adapter:", "fingerprint"])


# ---- issue 28: sharded GPT-2 folders (model.safetensors.index.json), as transformers writes them


@pytest.mark.parametrize("dtype, stored", [(torch.float32, "F32"), (torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_a_sharded_gpt2_folder_imports_every_tensor_exactly_as_torch_holds_it(tmp_path, capsys, dtype, stored):
    m = random_gpt2(torch.float32, seed=9).to(dtype)
    folder = tmp_path / "sharded"
    m.save_pretrained(folder, max_shard_size="8KB")
    index = json.loads((folder / hf.SHARDED_INDEX).read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert not (folder / hf.WEIGHTS_FILE).exists() and hf.stored_dtype(folder) == stored
    for np_dtype in (np.float32, np.float64):
        params, config, _ = hf.read_gpt2(folder, dtype=np_dtype)
        assert all(a.dtype == np_dtype for a in params.values())
        assert_holds_what_torch_holds(params, config, m)
    capsys.readouterr()
    assert cli.main(["import-hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "imported GPT-2" in capsys.readouterr().out
    run_params, _, _, _ = load_model(tmp_path / "run")
    assert all(np.array_equal(run_params[n], params[n]) for n in params)
    ids = ids_for()
    assert_logits_equal(f"GPT-2 sharded {stored} folder, transformers -> minilora",
                        our_logits(params, config, ids), torch_logits(m.to(torch.float64), ids))


@pytest.fixture(scope="module")
def sharded32(saved32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "model"
    saved32[0].save_pretrained(folder, max_shard_size="8KB")
    return folder


def _index_edit(change):
    """An edit of the index's weight_map: change(weight_map, shards) changes it in place."""
    def edit(folder):
        index = json.loads((folder / hf.SHARDED_INDEX).read_text())
        change(index["weight_map"], sorted(set(index["weight_map"].values())))
        (folder / hf.SHARDED_INDEX).write_text(json.dumps(index))
    return edit


def _a_tensor_in_two_shards(folder):
    from safetensors.numpy import load_file, save_file

    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    extra = load_file(str(first))
    name = sorted(extra)[0]
    save_file({**load_file(str(second)), name: extra[name]}, str(second), metadata={"format": "pt"})


def _a_tensor_named_twice(folder):
    index = json.loads((folder / hf.SHARDED_INDEX).read_text())
    items = list(index["weight_map"].items())
    entries = ", ".join(json.dumps(k) + ": " + json.dumps(v) for k, v in items + [(items[0][0], items[-1][1])])
    (folder / hf.SHARDED_INDEX).write_text('{"metadata": {}, "weight_map": {' + entries + "}}")


SHARD_FAULTS = {
    "a shard missing": (lambda f: sorted(f.glob("model-*.safetensors"))[1].unlink(),
                        ["model.safetensors.index.json", "names the shard model-00002-of-", "no such file"]),
    "a tensor in two shards": (_a_tensor_in_two_shards, ["expected in one shard, got it in model-00001-of-",
                                                         " and model-00002-of-"]),
    "the index naming a tensor no shard holds": (
        _index_edit(lambda wm, shards: wm.update({"transformer.h.0.ln_3.weight": shards[0]})),
        ["transformer.h.0.ln_3.weight", "the index names it in model-00001-of-", "no shard the index names holds it"]),
    "the index naming the wrong shard": (
        _index_edit(lambda wm, shards: wm.update({"transformer.h.0.ln_1.weight": next(
            s for s in shards if s != wm["transformer.h.0.ln_1.weight"])})),
        ["transformer.h.0.ln_1.weight", "which does not hold it (model-0000", "holds it instead)"]),
    "a shard holding a tensor the index does not name": (
        _index_edit(lambda wm, shards: wm.pop("transformer.h.1.ln_2.bias")),
        ["transformer.h.1.ln_2.bias", "the index does not name it"]),
    "a tensor named twice in the index": (_a_tensor_named_twice, ["expected each name once", "named 2 times"]),
    "a truncated shard": (lambda f: sorted(f.glob("model-*.safetensors"))[1].write_bytes(b"\x10" + bytes(9)),
                          ["model-00002-of-", "readable safetensors shard", "truncated or corrupt"]),
    "a shard outside the folder": (
        _index_edit(lambda wm, shards: wm.update({"transformer.wte.weight": "../" + shards[0]})),
        ["expected a shard file name beside the index", "'../model-00001-of-"]),
    "no weight_map": (lambda f: (f / hf.SHARDED_INDEX).write_text('{"metadata": {}}'),
                      ["weight_map: expected an object of tensor name -> shard file name"]),
}


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_a_sharded_folder_whose_index_and_shards_disagree_is_one_line(sharded32, tmp_path, capsys, fault):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sharded32, folder)
    edit, words = SHARD_FAULTS[fault]
    edit(folder)
    _refused(capsys, ["import-hf", str(folder), "--out", str(tmp_path / "run")], tmp_path / "run", words)
    with pytest.raises(ValueError, match=r"model(-\d+-of-\d+\.safetensors|\.safetensors\.index\.json): "):
        hf.read_gpt2(folder)


# ---- issue 28: an adapter whose config and tensors disagree is refused by every command that reads one


@pytest.fixture(scope="module")
def disagreeing(saved32, tmp_path_factory):
    """PEFT folders on saved32's base whose adapter_config.json and tensors disagree: name -> (folder, words)."""
    from safetensors.numpy import load_file, save_file

    _, path = saved32
    root = tmp_path_factory.mktemp("disagreeing")
    made = {"lora": peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
            "dora": peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
            "ia3": peft.IA3Config(task_type="CAUSAL_LM")}
    for name, pc in made.items():
        torch.manual_seed(3)
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path), pc).save_pretrained(root / name)
    cases = {}

    def case(label, src, changes, words, tensors=None):
        import shutil

        folder = root / label.replace(" ", "-")
        shutil.copytree(root / src, folder)
        ac = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**ac, **changes}))
        if tensors is not None:
            weights = str(folder / "adapter_model.safetensors")
            save_file(tensors(load_file(weights)), weights, metadata={"format": "pt"})
        cases[label] = folder, words

    nothing = ["target_modules: ['nothing'] matches no module of GPT-2"]
    case("lora targeting nothing", "lora", {"target_modules": ["nothing"]}, nothing)
    case("lora tensors of c_attn, targets c_fc", "lora", {"target_modules": ["c_fc"]},
         ["attn.c_attn.lora_", "target_modules ['c_fc']", "PEFT would not apply it"])
    case("dora targeting nothing", "dora", {"target_modules": ["nothing"]}, nothing)
    case("dora tensors of c_attn, targets mlp.c_proj", "dora", {"target_modules": ["mlp.c_proj"]},
         ["attn.c_attn.", "target_modules ['mlp.c_proj']", "PEFT would not apply it"])
    case("ia3 targeting nothing", "ia3", {"target_modules": ["nothing"], "feedforward_modules": []}, nothing)
    case("ia3 with a vector of c_fc, not targeted", "ia3", {},
         ["h.0.mlp.c_fc.ia3_l", "target_modules ['", "'c_attn'", "'mlp.c_proj'", "PEFT would not load it"],  # a set
         tensors=lambda t: {**t, "base_model.model.transformer.h.0.mlp.c_fc.ia3_l": np.ones((1, C), np.float32)})
    return cases


ADAPTER_COMMANDS = {
    "finetune": lambda base, a, out: ["finetune", "--checkpoint", base, "--adapter", a, "--out", out, "--steps", "1"],
    "generate": lambda base, a, out: ["generate", "--checkpoint", base, "--adapter", a, "--max-new-tokens", "2"],
    "evaluate": lambda base, a, out: ["evaluate", base, "--adapter", a],
    "merge": lambda base, a, out: ["merge", base, "--adapter", a, "--out", out + ".npz"],
    "export": lambda base, a, out: ["export", base, "--adapter", a, "--out", out],
}


@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
@pytest.mark.parametrize("case", ["lora targeting nothing", "lora tensors of c_attn, targets c_fc",
                                  "dora targeting nothing", "dora tensors of c_attn, targets mlp.c_proj",
                                  "ia3 targeting nothing", "ia3 with a vector of c_fc, not targeted"])
def test_an_adapter_whose_config_and_tensors_disagree_is_one_line_exit_2(saved32, disagreeing, tmp_path, capsys,
                                                                         command, case):
    folder, words = disagreeing[case]
    out = str(tmp_path / "out")
    _refused(capsys, ADAPTER_COMMANDS[command](str(saved32[1]), str(folder), out), tmp_path / "out",
             ["--adapter:", *words])
    assert not os.path.exists(out + ".npz")


def test_import_hf_out_naming_a_file_or_a_run_is_one_line_in_the_clis_words(saved32, tmp_path, capsys):
    """issue 28: --out naming a file was `[Errno 17] File exists`, exit 1; now one line, exit 2, the file as it was."""
    path = str(saved32[1])
    taken = tmp_path / "taken.npz"
    taken.write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a run, never a file
        err = refused_cli(capsys, ["import-hf", path, "--out", str(taken), *extra],
                          ["--out: expected a folder for the run, got the file", "taken.npz", "--overwrite replaces",
                           "never a file", "give another --out"])
        assert "Errno" not in err and taken.read_bytes() == b"mine"
    run = tmp_path / "run"
    assert cli.main(["import-hf", path, "--out", str(run)]) == 0
    before = (run / "checkpoint.npz").read_bytes()
    err = refused_cli(capsys, ["import-hf", path, "--out", str(run)],
                      ["--out:", "already holds a run (checkpoint.npz)", "give --overwrite to replace it"])
    assert "--resume" not in err and (run / "checkpoint.npz").read_bytes() == before  # import-hf has no --resume
    assert cli.main(["import-hf", path, "--out", str(run), "--overwrite"]) == 0


# ---- issue 28: a minilora IA3 run, with and without the query vector, out to PEFT and back as it went out


@pytest.mark.parametrize("queries", [False, True], ids=["no query vector", "query vector"])
def test_a_minilora_ia3_run_exports_as_peft_computes_it_in_float64_and_comes_back_as_it_went(tmp_path, capsys,
                                                                                             queries):
    torch.manual_seed(6)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(hf_config(n_positions=128)).save_pretrained(path)  # room for the task's records
    run = tmp_path / "run"
    assert cli.main(["finetune", "--checkpoint", str(path), "--method", "ia3", *(["--ia3-queries"] if queries else []),
                     "--out", str(run), "--steps", "3", "--batch-size", "4", "--lr", "0.1"]) == 0
    assert cli.main(["export", str(path), "--adapter", str(run / "adapter.npz"), "--out", str(tmp_path / "back")]) == 0
    params, config, _, _ = load_model(path, adapter=run / "adapter.npz")
    assert config.lora == ia3.Ia3Config(queries=queries)
    params = {n: a.astype(np.float64) for n, a in params.items()}  # the run's float32 numbers, widened exactly
    pm = load_peft(tmp_path / "back")
    l_c = pm.base_model.model.transformer.h[0].attn.c_attn.ia3_l["default"].detach().numpy().ravel()
    assert l_c.dtype == np.float64
    np.testing.assert_array_equal(l_c[:C], params["h.0.attn.q.ia3_l"] if queries else np.ones(C))
    assert queries == bool(np.abs(l_c[:C] - 1.0).max() > 1e-3)  # the run trained l_q only when asked
    ids = ids_for()
    ours = our_logits(params, config, ids)
    assert_logits_equal(f"IA3 ({'query vector' if queries else 'no query vector'}), minilora run -> PEFT (CLI)",
                        ours, torch_logits(pm, ids))
    assert rel(ours, torch_logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), ids)) \
        > 1e-4  # the vectors change the function: the check has teeth
    # and back: the exported folder comes in with the setting it went out with, the same function
    base_params, base_config, _ = hf.read_gpt2(tmp_path / "back", dtype=np.float64)
    back, back_config, _ = peft_io.read_peft(tmp_path / "back" / "adapter", base_params, base_config)
    assert back_config.lora == ia3.Ia3Config(queries=queries) and back.keys() == params.keys()
    assert all(np.array_equal(back[n], params[n]) for n in params)
