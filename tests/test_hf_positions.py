"""Prompt and prefix tuning with PEFT's positions, against the real PeftModel both ways: equal logits.

minilora models at random float64 points (every weight O(1), the soft prompt and the prefix too) go out with
bridge.export_model as a GPT-2 folder and a PEFT PromptTuningConfig / PrefixTuningConfig folder, are loaded
by AutoModelForCausalLM and PeftModel.from_pretrained, and must give the real tokens' logits within 1e-10
relative in float64 (only the order of summation differs); CLI runs in float32 within 1e-5. The other way,
adapters PEFT trained on a random GPT-2 (its key bias far from zero) are read by minilora with the same
logits, fine-tune on, and go back out. They skip only where torch, transformers or peft are not installed,
and never in CI (tests/clients.py).

One thing the float64 comparison has to know: PEFT builds its prompt encoder (an nn.Embedding) in torch's
default dtype, float32, whatever the base model's dtype, so a float64 prompt would be rounded to float32 as
it is loaded. A minilora run trains in float32, so its prompt loads exactly; the float64 tests build
PEFT's encoder under a float64 default dtype (peft_float64) and say so.
"""

import contextlib
import json
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
from clients import require

torch, transformers, peft = require("torch"), require("transformers"), require("peft")
require("safetensors"), require("tokenizers")

from minilora import bridge, cli, hf, model, peft_io, runs  # noqa: E402
from minilora.methods import prefix, prompt  # noqa: E402
from minilora.model import ModelConfig  # noqa: E402
from minilora.tokenizer import CharTokenizer  # noqa: E402
from refusals import refused as refused_cli  # noqa: E402
from conftest import tiny_pretrained_run  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
RTOL64, RTOL32 = 1e-10, 1e-5
V, T, C, L, NH, F = 96, 12, 24, 2, 3, 40  # V: the character tokenizer's vocabulary
P = 4
# room for P virtual tokens' positions before T real ones
CONFIG = ModelConfig(vocab_size=V, context_length=T + P, d_model=C, n_heads=NH, n_layers=L, d_ff=F,
                     peft_positions=True)
MEASURED = {}  # case -> (largest |logit difference|, relative to the largest |logit|): docs/methods.md quotes them


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_base(seed=0):
    rng = np.random.default_rng(seed)
    return {n: ((1.0 if n.endswith(".g") else 0.0) + 0.3 * rng.standard_normal(s))
            for n, s in model.param_shapes(CONFIG).items()}


def prompted(seed=3):
    params = prompt.add_prompt(random_base(), P, init="random", seed=seed)
    params["prompt"] = 0.5 * np.random.default_rng(seed).standard_normal((P, C))
    return params, CONFIG


def prefixed(seed=3):
    params, config = prefix.add_prefix(random_base(), CONFIG, P, seed=seed)
    rng = np.random.default_rng(seed)
    for name in prefix.prefix_names(config):
        params[name] = 0.5 * rng.standard_normal(params[name].shape)
    return params, config


@contextlib.contextmanager
def peft_float64():
    """PEFT's prompt encoder made in float64 (it takes torch's default dtype, float32, whatever the base's)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_peft(folder, dtype=torch.float64):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with peft_float64() if dtype == torch.float64 else contextlib.nullcontext():
        return peft.PeftModel.from_pretrained(base, os.path.join(folder, bridge.ADAPTER_DIR)).eval()


def peft_logits(pm, ids):
    """The real tokens' logits (B, T, V): PEFT's prompt tuning returns the P virtual tokens' first, dropped."""
    with torch.no_grad():
        logits = pm(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()
    return logits[:, -ids.shape[1]:]


def our_logits(params, config, ids):
    h, _ = model.forward(params, config, ids)
    return h @ params["wte"].T


def ids_for(n=T, seed=1):
    return np.random.default_rng(seed).integers(0, V, (3, n))


CASES = {"prompt": prompted, "prefix": prefixed}


@pytest.mark.parametrize("case", CASES)
def test_a_run_with_peft_positions_exports_as_peft_prompt_learning_with_equal_logits(case, tmp_path):
    params, config = CASES[case]()
    out = tmp_path / "export"
    assert bridge.export_model(out, params, config, CharTokenizer()) == [out, os.path.join(out, "adapter")]
    pm = load_peft(out)
    for n in (T, 1):  # the whole context the real tokens have, and one token
        ids = ids_for(n)
        ours, theirs = our_logits(params, config, ids), peft_logits(pm, ids)
        assert theirs.shape == ours.shape == (3, n, V)
        assert rel(theirs, ours) < RTOL64, case
        MEASURED[f"{case}, float64, T={n}"] = (float(np.abs(theirs - ours).max()), rel(theirs, ours))
    # and minilora's own positions are another function: the reason a default run is refused
    ids = ids_for()
    assert rel(peft_logits(pm, ids), our_logits(params, replace(config, peft_positions=False), ids)) > 1e-3
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ac["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[case]
    assert (ac["num_virtual_tokens"], ac["token_dim"], ac["num_layers"], ac["num_attention_heads"]) == (P, C, L, NH)
    assert ac["task_type"] == "CAUSAL_LM" and ac["base_model_name_or_path"] == str(out.resolve())
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["n_positions"] == T + P  # the base keeps every position: PEFT's use them all


def test_the_prompt_is_peft_prompt_embeddings_row_for_row(tmp_path):
    params, config = prompted()
    bridge.export_model(tmp_path / "e", params, config, CharTokenizer())
    pm = load_peft(tmp_path / "e")
    np.testing.assert_array_equal(pm.prompt_encoder["default"].embedding.weight.detach().numpy(), params["prompt"])
    from safetensors.numpy import load_file

    assert set(load_file(tmp_path / "e" / "adapter" / "adapter_model.safetensors")) == {"prompt_embeddings"}


def test_the_prefix_is_peft_past_key_values_layer_by_layer_and_head_by_head(tmp_path):
    """PEFT's own get_prompt turns the (P, 2 L C) embedding into each layer's keys and values (B, NH, P, hs):
    they must be minilora's prefix_k, prefix_v with head h in columns h hs .. (h+1) hs - 1."""
    params, config = prefixed()
    bridge.export_model(tmp_path / "e", params, config, CharTokenizer())
    pm = load_peft(tmp_path / "e")
    assert tuple(pm.prompt_encoder["default"].embedding.weight.shape) == (P, 2 * L * C)
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=1)
    hs = C // NH
    for i in range(L):
        for got, name in ((cache.layers[i].keys, "prefix_k"), (cache.layers[i].values, "prefix_v")):
            ours = params[f"h.{i}.attn.{name}"].reshape(P, NH, hs).transpose(1, 0, 2)  # (NH, P, hs)
            np.testing.assert_array_equal(got[0].numpy(), ours)


def test_peft_rounds_a_float64_prompt_to_float32_unless_its_encoder_is_made_in_float64(tmp_path):
    """Why the float64 tests use peft_float64: loaded as PEFT does by default, the prompt is float32."""
    params, config = prompted()
    bridge.export_model(tmp_path / "e", params, config, CharTokenizer())
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float64).eval()
    pm = peft.PeftModel.from_pretrained(base, os.path.join(tmp_path / "e", "adapter")).eval()
    assert pm.prompt_encoder["default"].embedding.weight.dtype == torch.float32
    ids = ids_for()
    assert rel(peft_logits(pm, ids), our_logits(params, config, ids)) > RTOL64  # rounded
    rounded = dict(params, prompt=params["prompt"].astype(np.float32).astype(np.float64))
    assert rel(peft_logits(pm, ids), our_logits(rounded, config, ids)) < RTOL64  # exactly the float32 prompt


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return tiny_pretrained_run(tmp_path_factory, n_layers=2)


@pytest.mark.parametrize("method, size", [("prompt", "--n-prompt"), ("prefix", "--n-prefix")])
def test_cli_runs_with_peft_positions_export_and_peft_computes_them_and_default_runs_are_one_line(
        pretrained, tmp_path, capsys, method, size):
    common = ["finetune", "--checkpoint", str(pretrained), "--method", method, size, "5", "--steps", "3",
              "--batch-size", "4"]
    run = tmp_path / "run"
    assert cli.main([*common, "--peft-positions", "--out", str(run)]) == 0
    out = tmp_path / "hf"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    params, config, _, tokenizer = runs.load_model(str(run))
    assert config.peft_positions and params["wte"].dtype == np.float32
    pm = load_peft(out, dtype=torch.float32)  # as a user loads it: float32, PEFT's own defaults
    ids = np.array([tokenizer.encode("The cat sees the dog.\n")])
    theirs, ours = peft_logits(pm, ids), our_logits(params, config, ids)
    assert rel(theirs, ours) < RTOL32
    MEASURED[f"{method}, float32 CLI run"] = (float(np.abs(theirs - ours).max()), rel(theirs, ours))
    plain = tmp_path / "plain"
    assert cli.main([*common, "--out", str(plain)]) == 0
    capsys.readouterr()
    refused_cli(capsys, ["export", str(plain), "--out", str(tmp_path / "no")],
                [f"{method}-tuning run has no exact export", "train it with --peft-positions"], tmp_path / "no")


# the other way: adapters PEFT trained itself, on a GPT-2 whose key bias is not zero


def random_gpt2_folder(path, seed=0, n_positions=T + P):
    """A GPT2LMHeadModel (float64) with every parameter random (the key bias too), saved and loaded back from path,
    so that PEFT records a local base_model_name_or_path."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(vocab_size=V, n_positions=n_positions, n_embd=C, n_layer=L, n_head=NH, n_inner=F,
                                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(hf_config).to(torch.float64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                                                  else 0.0))
    assert m.transformer.h[0].attn.c_attn.bias[C:2 * C].abs().min() > 0  # the key bias is there
    m.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


PEFT_CONFIGS = {"prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                          prompt_tuning_init="RANDOM"),
                "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                # trained through PEFT's MLP: saved (and loaded for inference) as the (P, 2 L C) prefix it makes
                "prefix, projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                                      prefix_projection=True, encoder_hidden_size=16)}


def peft_trained(base_folder, adapter_folder, case, n_positions=T + P):
    """PEFT's own adapter on the random GPT-2, trained 5 Adam steps (its encoder in float32, PEFT's default), saved."""
    pm = peft.get_peft_model(random_gpt2_folder(base_folder, n_positions=n_positions), PEFT_CONFIGS[case]())
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.tensor(np.random.default_rng(0).integers(0, V, (4, T)))
    for _ in range(5):
        loss = pm(x, labels=x, attention_mask=torch.ones_like(x)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(adapter_folder)
    return pm.eval()


@pytest.mark.parametrize("case", PEFT_CONFIGS)
def test_an_adapter_peft_trained_imports_with_equal_logits(case, tmp_path):
    """minilora reads PEFT's folder onto its import of the GPT-2 (key bias dropped): a prefix's keys come in less
    the key bias, so the function is PEFT's exactly. PEFT's model is the one PeftModel.from_pretrained loads."""
    peft_trained(tmp_path / "gpt2", tmp_path / "adapter", case)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float64).eval()
    pm = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    base, base_config, _ = hf.read_gpt2(tmp_path / "gpt2", dtype=np.float64)
    params, config, _ = peft_io.read_peft(tmp_path / "adapter", base, base_config)
    assert config.peft_positions and (config.n_prefix == (0 if case == "prompt" else P))
    ids = ids_for()
    theirs, ours = peft_logits(pm, ids), our_logits(params, config, ids)
    assert rel(theirs, ours) < RTOL64
    MEASURED[f"{case}, PEFT-trained, imported, float64"] = (float(np.abs(theirs - ours).max()), rel(theirs, ours))
    if case != "prompt":  # without the key bias taken off the prefix keys it would not be PEFT's function
        from minilora import peft_prompt

        b_k = peft_prompt.key_biases(tmp_path / "gpt2", L, C)
        kept = dict(params, **{f"h.{i}.attn.prefix_k": params[f"h.{i}.attn.prefix_k"] + b_k[i] for i in range(L)})
        assert rel(peft_logits(pm, ids), our_logits(kept, config, ids)) > 1e-6


@pytest.mark.parametrize("case", CASES)
def test_finetune_continues_a_peft_adapter_and_exports_it_back_as_peft_computes_it(case, tmp_path, capsys):
    """finetune --adapter on PEFT's folder trains it on with PEFT's positions, and the run exports to a folder PEFT
    loads with the same logits (float32)."""
    peft_trained(tmp_path / "gpt2", tmp_path / "adapter", case, n_positions=128)
    run = tmp_path / "run"
    assert cli.main(["finetune", "--checkpoint", str(tmp_path / "gpt2"), "--adapter", str(tmp_path / "adapter"),
                     "--steps", "2", "--batch-size", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    params, config, _, _ = runs.load_model(str(run))
    assert config.peft_positions and ("prompt" in params) == (case == "prompt")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    pm = load_peft(tmp_path / "back", dtype=torch.float32)
    ids = ids_for(20)
    assert rel(peft_logits(pm, ids), our_logits(params, config, ids)) < RTOL32


def _adapter_with(tmp_path, case, **changes):
    peft_trained(tmp_path / "gpt2", tmp_path / "adapter", case)
    path = tmp_path / "adapter" / "adapter_config.json"
    ac = json.loads(path.read_text())
    ac.update(changes)
    path.write_text(json.dumps(ac))
    return tmp_path / "adapter"


@pytest.mark.parametrize("case, changes, words", [
    ("prefix", {"prefix_projection": "yes"}, ["prefix_projection: expected False or True"]),
    ("prefix", {"base_model_name_or_path": "gpt2"}, ["base_model_name_or_path", "key bias"]),
    ("prompt", {"task_type": "SEQ_CLS"}, ["task_type: expected 'CAUSAL_LM'"]),
    ("prompt", {"num_virtual_tokens": T + P}, ["num_virtual_tokens: expected an integer from 1 to"]),
    ("prompt", {"token_dim": C + 1}, ["token_dim: expected 24"]),
])
def test_a_peft_prompt_or_prefix_minilora_does_not_compute_is_one_line(tmp_path, capsys, case, changes, words):
    adapter = _adapter_with(tmp_path, case, **changes)
    refused_cli(capsys, ["evaluate", str(tmp_path / "gpt2"), "--adapter", str(adapter)], words)


def test_zz_report_the_measured_differences():
    """Prints the largest logit differences measured above (pytest -s shows them; docs/methods.md quotes
    them). It asserts they were all measured, so the table cannot go stale silently."""
    expected = {f"{c}, float64, T={n}" for c in CASES for n in (T, 1)} | {f"{c}, PEFT-trained, imported, float64" for c in PEFT_CONFIGS}
    if not expected <= set(MEASURED):
        pytest.skip("run with the tests above (the whole file) to measure them")
    for case, (value, relative) in sorted(MEASURED.items()):
        print(f"{case}: max |logit difference| {value:.2e}, relative {relative:.2e}")
        assert relative < RTOL32


