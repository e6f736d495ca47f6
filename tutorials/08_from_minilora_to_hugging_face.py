# %% [markdown]
# # 08. From minilora to Hugging Face
#
# Seven tutorials built a GPT and three ways to fine-tune it by hand. This one asks
# the learner's next questions: **is this the same LoRA that PEFT runs? Can my adapter
# go to transformers? Can this code read a real GPT-2?** Yes to all three, exactly, and
# the cells below show it with the real libraries (`transformers`, `peft`), nothing
# mocked, nothing downloaded.
#
# minilora's model *is* GPT-2's function: the same pre-LayerNorm block, the tanh GELU
# (`gelu_new`), LayerNorm eps 1e-5, the head tied to `wte`. So the two layouts differ
# only in names and in how a linear weight is stored:
#
#     transformers (GPT2LMHeadModel)             minilora
#     transformer.h.{i}.attn.c_attn.weight (C, 3C)   h.{i}.attn.{q,k,v}.W (C, C) each, transposed
#     transformer.h.{i}.attn.c_proj.weight (C, C)    h.{i}.attn.o.W       transposed
#     transformer.h.{i}.mlp.c_fc.weight    (C, F)    h.{i}.mlp.fc.W (F, C) transposed
#     transformer.h.{i}.mlp.c_proj.weight  (F, C)    h.{i}.mlp.proj.W (C, F) transposed
#
# GPT-2's linears are `Conv1D` modules that store $W$ as (in, out) and compute $x W + b$;
# minilora stores (out, in) and computes $x W^\top + b$. `minilora/hf.py` transposes the
# names in `hf.TRANSPOSED` once, on the way in and out, as nanoGPT's `from_pretrained`
# does. The commands are
#
#     minilora import-hf DIR --out RUN        # a GPT-2 folder (config.json, model.safetensors) as a run
#     minilora export RUN --out DIR           # a run as DIR/ (+ DIR/adapter/, a PEFT folder, for LoRA)
#
# and `--adapter` takes a PEFT folder wherever it takes `adapter.npz`.
#
# **This tutorial fine-tunes tutorial 02's pretrained model** (`runs/pretrain`; the
# cell that loads it pretrains it there if it is missing).
#
# **Before you run it**: it needs the real Hugging Face clients (torch, transformers,
# peft, safetensors, tokenizers), which minilora itself never needs. From the
# repository's root, in your virtual environment, one line installs them:
#
#     pip install torch==2.13.0 && pip install '.[huggingface]'
#
# torch comes first, and it must be **PyTorch's CPU-only build** on a machine without a
# GPU: on Linux, pip's default torch is the CUDA build, several GB. This project's
# machines keep torch 2.13.0's CPU-only build (`2.13.0+cpu`) on disk, which the line
# above takes; elsewhere add PyTorch's CPU wheel index to the first pip
# (`--index-url https://download.pytorch.org/whl/cpu`, pytorch.org's selector under
# "CPU"). CI makes a fresh environment with this line and runs this tutorial there.

# %%
import os
import tempfile
import warnings

import numpy as np
import torch
import transformers
from matplotlib.figure import Figure

import peft
from minilora import bridge, hf, model, peft_io, plot
from minilora.methods import lora
from minilora.backend import limit_blas_threads
from minilora.finetune import FinetuneConfig, finetune
from minilora.methods.lora import LoraConfig
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.train import TrainConfig

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)
torch.set_num_threads(1)  # and torch likewise
FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
OUT = tempfile.mkdtemp(prefix="minilora-08-")  # the exported folders; nothing here is kept
warnings.filterwarnings("ignore", module="peft")
transformers.logging.set_verbosity_error()
rng = np.random.default_rng(0)

# %% [markdown]
# ## A LoRA run to take across
#
# The pretrained model, then LoRA on q, k, v, o (r = 4) for a few steps of the subject
# task, as tutorial 03 did: a real adapter, B no longer zero.

# %%
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))
assert tok.kind == "char"  # the run's own tokenizer: the character one
steps = 5 if FAST else 100
ft = FinetuneConfig(method="lora", lora=LoraConfig(rank=4, alpha=8.0), n_train=200, n_test=20,
                    train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                                      weight_decay=0.0, eval_every=steps, checkpoint_every=0))
params, config, trainable, summary = finetune(base, mc, tok, ft)
print(f"LoRA r={config.lora.rank} on {config.lora.targets}: {summary['trainable_params']:,} trainable, "
      f"exact match {summary['metric_before']:.2f} -> {summary['metric']:.2f}")
assert np.abs(params["h.0.attn.q.lora_B"]).max() > 0

# %% [markdown]
# ## Worked example: q, k, v adapters are one PEFT adapter on c_attn, of rank 3r
#
# GPT-2 computes q, k and v with one fused module: its weight, in minilora's (out, in)
# layout, is the three stacked, $W_c = [W_q; W_k; W_v]$, $(3C, C)$. Our three adapters add
#
# $$\begin{bmatrix} s B_q A_q \\ s B_k A_k \\ s B_v A_v \end{bmatrix} \quad (3C, C).$$
#
# Stack the $A$'s and put the $B$'s on a block diagonal:
#
# $$A_c = \begin{bmatrix} A_q \\ A_k \\ A_v \end{bmatrix} \quad (3r, C), \qquad
#   B_c = \begin{bmatrix} B_q & 0 & 0 \\ 0 & B_k & 0 \\ 0 & 0 & B_v \end{bmatrix} \quad (3C, 3r).$$
#
# Row block $i$ of $B_c A_c$ is $B_i A_i$ (the zeros kill the other $A$'s), so $B_c A_c$ is
# exactly the stacked update. One catch: PEFT scales by $\alpha / r$ (`lora_alpha / r`) with
# *this* adapter's rank, $3r$. To keep the scale $s = \alpha / r$, c_attn needs
#
# $$\frac{\alpha_c}{3r} = \frac{\alpha}{r} \quad\Rightarrow\quad \alpha_c = 3\alpha
#   \qquad \text{(with rsLoRA, } \frac{\alpha_c}{\sqrt{3r}} = \frac{\alpha}{\sqrt r}
#   \ \Rightarrow\ \alpha_c = \sqrt 3\, \alpha\text{)}.$$
#
# PEFT's `rank_pattern` and `alpha_pattern` say this per module. We build $A_c$ and $B_c$ by
# hand for block 0, check the update, and compare with what `peft_io.to_peft` writes.

# %%
C, r, s = mc.d_model, config.lora.rank, config.lora.scale
A_c = np.concatenate([params[f"h.0.attn.{t}.lora_A"] for t in "qkv"])  # (3r, C)
B_c = np.zeros((3 * C, 3 * r), np.float32)
for i, t in enumerate("qkv"):
    B_c[i * C:(i + 1) * C, i * r:(i + 1) * r] = params[f"h.0.attn.{t}.lora_B"]
stacked = np.concatenate([s * params[f"h.0.attn.{t}.lora_B"] @ params[f"h.0.attn.{t}.lora_A"] for t in "qkv"])
alpha_c = 3 * config.lora.alpha
gap = np.abs((alpha_c / (3 * r)) * B_c @ A_c - stacked).max()
print(f"A_c {A_c.shape}, B_c {B_c.shape}; max |s_c B_c A_c - stacked updates| = {gap:.1e}")
assert gap < 1e-6
adapter_config, tensors = peft_io.to_peft(params, config, "base")
name = "base_model.model.transformer.h.0.attn.c_attn"
assert np.array_equal(tensors[name + ".lora_A.weight"], A_c) and np.array_equal(tensors[name + ".lora_B.weight"], B_c)
print("rank_pattern", adapter_config["rank_pattern"], "alpha_pattern", adapter_config["alpha_pattern"],
      "target_modules", adapter_config["target_modules"])
assert adapter_config["alpha_pattern"]["attn.c_attn"] == alpha_c

# %% [markdown]
# The picture of $B_c$: three blocks of trained numbers, zeros elsewhere.

# %%
fig = Figure(figsize=(4.5, 5))
ax = fig.add_subplot()
im = ax.imshow(np.abs(B_c), aspect="auto", cmap="viridis", interpolation="nearest")
ax.set_xlabel("rank index (q | k | v)")
ax.set_ylabel("output row of c_attn (q | k | v)")
ax.set_title(f"|B_c| of block 0: q, k, v adapters as one rank-{3 * r} adapter{NOTE}", fontsize=9)
fig.colorbar(im, ax=ax, label="|B_c| entry")
path = os.path.join(FIGURES, "08_c_attn_block_diagonal.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Export, and load in transformers and PEFT
#
# `bridge.export_model` (what `minilora export` runs) writes the base model as
# config.json + model.safetensors + the tokenizer, and the adapters as a PEFT folder
# in `adapter/`. We load both with the libraries' own loaders, in float64, and compare
# logits with minilora's float64 forward of the same numbers.

# %%
export = os.path.join(OUT, "subject-lora")
bridge.export_model(export, params, config, tok)
print(sorted(os.listdir(export)), sorted(os.listdir(os.path.join(export, "adapter"))))
theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float64).eval()
theirs = peft.PeftModel.from_pretrained(theirs, os.path.join(export, "adapter")).eval()

ids = tok.encode("the dog saw a cat.\nthe cat").reshape(1, -1)
p64 = model.params_to(params, np, np.float64)


def minilora_logits(p, c, ids):
    h, _ = model.forward(p, c, ids)
    return h @ p["wte"].T


def hf_logits(m, ids):
    with torch.no_grad():  # a 2-D attention mask: transformers 5 would otherwise guess packed sequences
        return m(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


ours, peft_out = minilora_logits(p64, config, ids), hf_logits(theirs, ids)
rel = np.abs(ours - peft_out).max() / np.abs(peft_out).max()
print(f"PEFT vs minilora, float64: max relative difference {rel:.1e}")
assert rel < 1e-10

# %% [markdown]
# **Merging.** PEFT's `merge_and_unload()` folds $s B A$ into each weight, as
# `lora.merge` does; the merged models agree too.

# %%
merged, merged_config = lora.merge(p64, config)
rel_merged = np.abs(minilora_logits(merged, merged_config, ids) - hf_logits(theirs.merge_and_unload(), ids)).max()
rel_merged /= np.abs(ours).max()
print(f"merge_and_unload vs lora.merge: max relative difference {rel_merged:.1e}")
assert rel_merged < 1e-10

# %% [markdown]
# **The tokenizer goes too.** The character tokenizer leaves as a `tokenizers` model:
# a vocabulary of the 96 characters behind a pre-tokenizer that splits text into single
# characters. `AutoTokenizer` then gives exactly minilora's ids.

# %%
hf_tok = transformers.AutoTokenizer.from_pretrained(export)
for text in ("the dog saw a cat.\n", "  two spaces, 'quotes' and ~tildes~\n"):
    assert hf_tok.encode(text) == tok.encode(text).tolist() and hf_tok.decode(hf_tok.encode(text)) == text
print("AutoTokenizer ids == CharTokenizer ids:", hf_tok.encode("the cat")[:7])

# %% [markdown]
# ## Import a GPT-2-shaped model
#
# The other way: a model that transformers made. GPT-2 small itself (124M parameters,
# `model.SIZES["gpt2-small"]`) imports the same way, tensor by tensor; to stay offline
# and fast we make a small one with GPT-2's exact layout, every weight random, and the
# **key bias non-zero**. minilora has no key bias: $q \cdot b_k$ adds one constant to every
# score in a query's row, and $\operatorname{softmax}(S + c) = \operatorname{softmax}(S)$, so
# dropping it changes nothing. The logits below prove it.

# %%
torch.manual_seed(0)
small = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
gpt2 = transformers.GPT2LMHeadModel(small).to(torch.float64).eval()
with torch.no_grad():
    for pname, p in gpt2.named_parameters():
        p.copy_(0.3 * torch.randn_like(p) + (1.0 if pname.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                                             else 0.0))
folder = os.path.join(OUT, "gpt2-shaped")
gpt2.save_pretrained(folder)
imported, ic, _ = hf.read_gpt2(folder, dtype=np.float64)
key_bias = gpt2.transformer.h[0].attn.c_attn.bias[48:96]
reference = hf_logits(gpt2, ids)
rel_import = np.abs(minilora_logits(imported, ic, ids) - reference).max() / np.abs(reference).max()
print(f"key bias |b_k| up to {key_bias.abs().max():.2f}; imported vs transformers: {rel_import:.1e}")
assert key_bias.abs().max() > 0.1 and rel_import < 1e-10
n_small = sum(int(np.prod(s)) for s in model.param_shapes(model.SIZES["gpt2-small"]).values())
print(f"model.SIZES['gpt2-small']: {n_small:,} parameters (GPT-2 small's 124,439,808 less 12 x 768 key biases)")
assert n_small == 124_439_808 - 12 * 768

# %% [markdown]
# ## What does not cross
#
# - **Prompt tuning, by default.** PEFT's prompt tuning gives the virtual tokens positions
#   $0, \dots, P-1$ and shifts the real tokens after them; minilora keeps the real tokens at
#   $0, \dots, T-1$ as in pretraining (tutorial 04). They are different functions, so
#   `minilora export` refuses such a run, in one line, rather than approximate it. A run
#   trained with `finetune --peft-positions` numbers its tokens as PEFT does and exports
#   exactly (prefix tuning too; docs/methods.md says which to choose when).
# - **A classification head.** transformers' `GPT2ForSequenceClassification` has no
#   bias and reads the last non-padding token; minilora's `cls` has a bias. Refused.
# - **A pickle.** `pytorch_model.bin` is never unpickled (loading one can run any
#   code); the error says how to convert it to safetensors once.
#
# ## Exercises
#
# The solutions, which run and assert their answers, are on
# [their page](solutions/08_from_minilora_to_hugging_face_solutions.py).
#
# ### Exercise 8.1 (compute by hand): the c_attn adapter's rank and alpha
#
# For adapters on q and v only (not k) with $r = 4$ and $\alpha = 8$, write down on paper
# the shapes of $A_c$ and $B_c$, which rows of $B_c$ are zero, and $\alpha_c$; then the same
# with rsLoRA. Check against `peft_io.to_peft` (`rank_pattern`, `alpha_pattern`).
#
# ### Exercise 8.2 (predict, then check): which biases matter
#
# Predict, before running: adding 5.0 to every entry of the key bias $b_k$ of the
# GPT-2-shaped model changes its logits by how much? And adding 5.0 to the query
# bias? Check both with `hf_logits` on `gpt2`, and explain the second with the
# softmax.
#
# ### Exercise 8.3 (derive and implement): a PEFT c_attn adapter back into q, k, v
#
# A PEFT adapter on c_attn of rank $r'$ has one $A$ $(r', C)$ and one $B$ $(3C, r')$. Derive
# q, k and v adapters of rank $r'$ that compute the same function (hint: they share $A$).
# Write `split_c_attn(A, B, C)` returning three $(A_i, B_i)$ pairs, check that each
# $s B_i A_i$ is the matching third of $s B A$, and that `peft_io.read_peft` does the same on an
# adapter PEFT itself trains on `gpt2` for a few steps (logits equal).
