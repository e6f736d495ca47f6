# %% [markdown]
# # 08. From minilora to Hugging Face: solutions to the exercises
#
# Each section answers one exercise at the end of
# `tutorials/08_from_minilora_to_hugging_face.py` and asserts the answer. Nothing
# here needs the pretrained model: every model is small and random (weights far from
# zero, so no term is negligible), so fast and full mode run the same cells.

# %%
import os
import tempfile
import warnings

import numpy as np
import torch
import transformers

import peft
from minilora import hf, model, peft_io
from minilora.methods import lora
from minilora.backend import limit_blas_threads
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)
torch.set_num_threads(1)  # and torch likewise
FAST = os.environ.get("MINILORA_FAST") == "1"
OUT = tempfile.mkdtemp(prefix="minilora-08-solutions-")
warnings.filterwarnings("ignore", module="peft")
transformers.logging.set_verbosity_error()
rng = np.random.default_rng(0)


def hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


def minilora_logits(p, c, ids):
    h, _ = model.forward(p, c, ids)
    return h @ p["wte"].T


# %% [markdown]
# ## Exercise 8.1: the c_attn adapter's rank and alpha
#
# With q and v adapted (n = 2 of the three) and r = 4: A_c = [A_q; A_v] is (2r, C) =
# (8, C); B_c is (3C, 2r) = (3C, 8), with B_q in rows 0..C-1, columns 0..3, B_v in rows
# 2C..3C-1, columns 4..7, and **rows C..2C-1 (k's) all zero**. The scale must stay
# alpha / r = 2: alpha_c / (2r) = alpha / r gives alpha_c = 2 alpha = 16. With rsLoRA
# the scale is alpha / sqrt(r) = 4, and alpha_c / sqrt(2r) = alpha / sqrt(r) gives
# alpha_c = sqrt(2) alpha = 11.31.

# %%
mc = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16)
base = model.init_params(mc)
for rslora, alpha_c in ((False, 16.0), (True, 8.0 * np.sqrt(2))):
    p, c = lora.add_lora(base, mc, LoraConfig(rank=4, alpha=8.0, targets=("q", "v"), rslora=rslora))
    p = {n: rng.standard_normal(a.shape).astype(np.float32) if n.endswith("lora_B") else a for n, a in p.items()}
    ac, tensors = peft_io.to_peft(p, c, "base")
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    print(f"rslora={rslora}: rank_pattern {ac['rank_pattern']}, alpha_pattern {ac['alpha_pattern']}, B_c {B.shape}")
    assert ac["rank_pattern"] == {"attn.c_attn": 8} and B.shape == (48, 8) and not B[16:32].any()
    assert np.isclose(ac["alpha_pattern"]["attn.c_attn"], alpha_c, rtol=1e-15)
    peft_scale = ac["alpha_pattern"]["attn.c_attn"] / (np.sqrt(8) if rslora else 8)
    assert np.isclose(peft_scale, c.lora.scale, rtol=1e-15)

# %% [markdown]
# ## Exercise 8.2: which biases matter
#
# The score of query t against key u is q_t . (k_u + b_k) / sqrt(hs) = q_t . k_u /
# sqrt(hs) + q_t . b_k / sqrt(hs): the second term is the same for every key u, one
# constant per row, and softmax(S + c) = softmax(S). So the key bias changes **nothing**
# (up to round-off). The query bias moves q_t itself, so q_t . k_u changes differently
# for each u: the attention pattern, and the logits, change.

# %%
torch.manual_seed(0)
gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4, activation_function="gelu_new",
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(torch.float64).eval()
with torch.no_grad():
    for name, p in gpt2.named_parameters():
        p.copy_(0.3 * torch.randn_like(p) + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                                             else 0.0))
ids = rng.integers(0, 96, (2, 20))
before = hf_logits(gpt2, ids)
changes = {}
for which, rows in (("key", slice(48, 96)), ("query", slice(0, 48))):
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.attn.c_attn.bias[rows] += 5.0
    changes[which] = np.abs(hf_logits(gpt2, ids) - before).max() / np.abs(before).max()
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.attn.c_attn.bias[rows] -= 5.0
print(f"relative change of the logits: key bias + 5: {changes['key']:.1e}, query bias + 5: {changes['query']:.1e}")
assert changes["key"] < 1e-12 and changes["query"] > 1e-3

# %% [markdown]
# ## Exercise 8.3: a PEFT c_attn adapter back into q, k, v
#
# PEFT adds s B A (3C, C) to c_attn's weight (in minilora's layout). Split B's rows in
# thirds, B = [B_q; B_k; B_v], each (C, r'): then s B A = [s B_q A; s B_k A; s B_v A],
# so q, k and v get adapters of rank r' that **share A**, each with its third of B,
# and the same scale. minilora's adapters each own their A, so A is copied three
# times; the function is identical (further training would move the copies apart).

# %%
def split_c_attn(A, B, C):
    """q, k, v adapters (A_i, B_i) of the c_attn adapter (A (r', C), B (3C, r')): the same A, B's thirds."""
    return [(A.copy(), B[i * C:(i + 1) * C].copy()) for i in range(3)]


C = 48
A, B = rng.standard_normal((5, C)), rng.standard_normal((3 * C, 5))
for i, (A_i, B_i) in enumerate(split_c_attn(A, B, C)):
    assert np.allclose(B_i @ A_i, (B @ A)[i * C:(i + 1) * C], rtol=0, atol=1e-12)

# the same on an adapter PEFT trains itself, for a few steps
folder = os.path.join(OUT, "gpt2")
gpt2.save_pretrained(folder)
pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64),
                         peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
x = torch.tensor(ids)
for _ in range(3):
    loss = pm(x, labels=x, attention_mask=torch.ones_like(x)).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
pm.eval()
pm.save_pretrained(os.path.join(OUT, "adapter"))
imported, ic, _ = hf.read_gpt2(folder, dtype=np.float64)
adapted, ac, _ = peft_io.read_peft(os.path.join(OUT, "adapter"), imported, ic)
peft_A = pm.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.detach().numpy()
peft_B = pm.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.detach().numpy()
for t, (A_i, B_i) in zip("qkv", split_c_attn(peft_A, peft_B, C)):
    assert np.array_equal(adapted[f"h.0.attn.{t}.lora_A"], A_i) and np.array_equal(adapted[f"h.0.attn.{t}.lora_B"], B_i)
rel = np.abs(minilora_logits(adapted, ac, ids) - hf_logits(pm, ids)).max() / np.abs(hf_logits(pm, ids)).max()
print(f"PEFT-trained adapter, imported as q, k, v adapters of rank {ac.lora.rank}: logits differ by {rel:.1e}")
assert ac.lora.rank == 3 and ac.lora.targets == ("q", "k", "v") and rel < 1e-10
