"""minilora's NF4 against the real bitsandbytes (its CPU backend), and the 4-bit export that transformers loads with it.

Skipped where torch, transformers, peft or bitsandbytes is missing, never in CI (tests/clients.py; .ci/run step 4
installs bitsandbytes beside tutorial 08's line). benchmarks/nf4_bnb.py measures the same things on GPT-2 small's
shapes and a pretrained base (docs/methods.md quotes it).
"""

import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
from clients import require

torch, transformers, peft = require("torch"), require("transformers"), require("peft")
require("safetensors"), require("tokenizers")
# on a CPU with AVX-512 BF16, importing bitsandbytes asks the Hub for an optional kernel: offline, it asks nothing
require("huggingface_hub.constants").HF_HUB_OFFLINE = True
bnb = require("bitsandbytes")
F = require("bitsandbytes.functional")

from minilora import bridge, cli, model  # noqa: E402
from minilora.methods import nf4, qlora  # noqa: E402
from minilora.model import ModelConfig  # noqa: E402
from minilora.runs import load_model  # noqa: E402
from minilora.tokenizer import CharTokenizer  # noqa: E402
from refusals import refused  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("nf4_bnb", os.path.join(ROOT, "benchmarks", "nf4_bnb.py"))
nf4_bnb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nf4_bnb)


def test_the_nf4_table_is_bitsandbytes_and_the_dynamic_map_is_within_two_float32_ulps_of_its():
    assert np.array_equal(nf4.nf4_table(), F.get_4bit_type("nf4", device="cpu").numpy())
    theirs = F.create_dynamic_map().numpy()  # torch.linspace in float32: its last bit depends on the vector width
    ours = nf4.dynamic_map()
    # a bound off by 1 ulp moves a midpoint of two by up to 2 ulps of the result (22 entries on this machine)
    assert np.all(np.abs(ours - theirs) <= 2 * 2.0 ** -23 * np.abs(theirs))
    assert np.array_equal(nf4.nearest_code(nf4.dynamic_map().astype(np.float64), theirs), np.arange(256))


@pytest.fixture(scope="module")
def compared():
    """benchmarks/nf4_bnb.compare on a GPT-2-sized c_fc (3072, 768), Gaussian with GPT-2's init std 0.02."""
    torch.set_num_threads(1)
    W = 0.02 * np.random.default_rng(0).standard_normal((3072, 768))
    return nf4_bnb.compare(W, torch, F)


def test_the_4bit_codes_are_bitsandbytes_but_where_its_float32_rounding_picks_the_farther_level(compared):
    r = compared
    # bitsandbytes scales by the float32 reciprocal of the absmax and compares with float32 midpoints; minilora
    # takes the nearest level exactly. They differ only within float32 rounding of a midpoint (3 codes in 21M
    # on GPT-2 small's shapes: benchmarks/nf4_bnb.json), and there minilora's level is the nearer one
    assert r["codes_equal"] >= 1 - 1e-5 and r["absmax_equal"]
    assert r["at_differing_codes_bnb_nearer"] == 0 and r["at_differing_codes_tie"] == 0
    # equal codes and absmax dequantize to equal weights: the largest difference is one level step at a differing code
    step = np.diff(nf4.nf4_table()).max() * r["max_abs_W"]
    assert r["max_abs_deq_diff_no_dq"] <= step * (r["codes_differ"] > 0)


def test_the_dynamic_double_quantization_gives_bitsandbytes_absmax_codes_at_no_measurable_cost(compared):
    r = compared
    # the rest differ where bitsandbytes' CPU kernel rounds c / scale2 to a grid of 65536 before its table
    # look-up (csrc/cpu_ops.cpp, build_quantize_lut): minilora's absmax is then the nearer one
    assert r["dq_absmax_codes_equal_dynamic_vs_bnb"] >= 0.995
    assert r["at_differing_absmax_codes_bnb_nearer"] <= 0.02 * r["dq_absmax_codes_differ"]
    # the weights' error: bitsandbytes' own double quantization and minilora's dynamic one agree to 1e-5 relative
    assert abs(r["dq_dynamic_W_rel_error"] - r["dq_bnb_W_rel_error"]) <= 1e-5 * r["dq_bnb_W_rel_error"]
    # and the linear int8 code is no worse (a plain error bound: scale2 / 254 per absmax)
    assert r["dq_linear_absmax_max_rel_error"] < r["dq_dynamic_absmax_max_rel_error"]
    assert r["dq_linear_W_rel_error"] <= r["dq_dynamic_W_rel_error"] * (1 + 1e-3)


V, T, C, NH, L, FF = 96, 12, 64, 4, 2, 128  # every linear's input a multiple of 64 (bitsandbytes' CPU bf16 kernel)
CONFIG = ModelConfig(vocab_size=V, context_length=T, d_model=C, n_heads=NH, n_layers=L, d_ff=FF)


def trained_qlora(absmax_code, seed=0):
    rng = np.random.default_rng(seed)
    base = {n: ((1.0 if n.endswith(".g") else 0.0) + 0.3 * rng.standard_normal(s)).astype(np.float32)
            for n, s in model.param_shapes(CONFIG).items()}
    params, config = qlora.add_qlora(base, CONFIG, qlora.QLoraConfig(rank=2, alpha=3.0, targets=("q", "v", "fc"),
                                                                     absmax_code=absmax_code))
    return {n: (0.3 * rng.standard_normal(a.shape)).astype(np.float32) if n.endswith(".lora_B") else a
            for n, a in params.items()}, config


def logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.double().numpy()


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("absmax_code", ["linear", "dynamic"])
def test_the_4bit_export_loads_in_transformers_with_bitsandbytes_and_computes_the_qlora_function(tmp_path,
                                                                                              absmax_code):
    torch.set_num_threads(1)
    params, config = trained_qlora(absmax_code)
    out = tmp_path / "export"
    bridge.export_model(out, params, config, CharTokenizer(), bnb_4bit=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    base = transformers.AutoModelForCausalLM.from_pretrained(out)
    deq, _ = qlora.as_lora(params, config)
    for i in range(L):
        for module, ours in bridge_modules(deq, i).items():
            layer = base.transformer.h[i].get_submodule(module)
            assert isinstance(layer, bnb.nn.Linear4bit), module
            # bitsandbytes dequantizes the very W minilora's forward multiplies by, bit for bit
            assert np.array_equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy(), ours)
    pm = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    ids = np.random.default_rng(1).integers(0, V, (3, T))
    h, _ = model.forward(params, config, ids)
    ours = (h @ params["wte"].T).astype(np.float64)
    # train mode (dropout 0): bitsandbytes dequantizes to float32 and multiplies in float32, so only float32
    # summation order differs (the float32 tolerance of tests/test_hf.py)
    assert rel(logits(pm.train(), ids), ours) < 1e-5
    # eval mode: on a CPU with AVX-512 BF16, Linear4bit repacks the weight and multiplies in bf16 (8 significant
    # bits, 2^-9 rounding of every activation, weight and absmax, through 2 blocks): 0.020 and 0.021 measured
    # here (linear, dynamic); elsewhere float32, as in train mode
    assert rel(logits(pm.eval(), ids), ours) < 5e-2


def bridge_modules(deq, i):
    """GPT-2 module -> its (out, in) float32 W from a dequantized QLoRA model (c_attn's is [W_q; W_k; W_v])."""
    p = f"h.{i}."
    return {"attn.c_attn": np.concatenate([deq[p + f"attn.{t}.W"] for t in "qkv"]), "attn.c_proj": deq[p + "attn.o.W"],
            "mlp.c_fc": deq[p + "mlp.fc.W"], "mlp.c_proj": deq[p + "mlp.proj.W"]}


def test_cli_exports_a_qlora_run_in_4bit_and_refuses_another_run_in_one_line(tmp_path, capsys):
    tiny = ["--d-model", "64", "--n-layers", "1", "--n-heads", "4", "--context-length", "128"]
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--out", str(pre), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     *tiny]) == 0
    run = tmp_path / "qlora"
    assert cli.main(["finetune", "--method", "qlora", "--checkpoint", str(pre), "--out", str(run), "--steps", "3",
                     "--batch-size", "4", "--lr", "0.05"]) == 0
    capsys.readouterr()
    out = tmp_path / "hf-4bit"
    assert cli.main(["export", str(run), "--out", str(out), "--bnb-4bit"]) == 0
    assert "with bitsandbytes installed" in capsys.readouterr().out
    params, config, _, _ = load_model(run)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out), str(out / "adapter"))
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    h, _ = model.forward(params, config, ids)
    assert rel(logits(pm.train(), ids), (h @ params["wte"].T).astype(np.float64)) < 1e-5
    refused(capsys, ["export", str(pre), "--out", str(tmp_path / "no"), "--bnb-4bit"],
            ["--bnb-4bit", "expected a QLoRA run", "got a model without adapters"], tmp_path / "no")
