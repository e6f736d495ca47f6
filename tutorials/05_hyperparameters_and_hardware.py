# %% [markdown]
# # 05. Hyperparameters and hardware
#
# ## Key hyperparameters
#
# | hyperparameter | typical start | effect |
# |---|---|---|
# | learning rate | 1e-4 | most impactful; too high causes catastrophic forgetting |
# | epochs | 1-5 | more epochs risk overfitting small datasets |
# | batch size | 4-32 | gradient noise and memory |
# | LoRA rank r | 8-64 | higher rank: more expressive, more parameters |
# | LoRA alpha | 2r | scales the adapter's contribution (s = alpha / r) |
#
# The seed says fine-tuning uses a much smaller learning rate than pretraining (ours
# pretrained at 3e-3), because the model already has useful representations and
# large steps overwrite them. That holds for full fine-tuning (its default here is
# 3e-4), not for the fresh parameters of LoRA (3e-3) and prompt tuning (1e-2):
# the studies (`minilora sweep forgetting`, README) choose each method's rate on a
# validation split, and the best rates differ by method. We measure that directly: **forgetting** is the loss on held-out
# *pretraining* text after fine-tuning minus before.
#
# **This tutorial fine-tunes tutorial 02's pretrained model**, saved in `runs/pretrain`
# (shared by tutorials 03 to 11). Run tutorial 02 first; if the model is missing, the
# first code cell pretrains it there and says so (67 s with 2 threads in
# `benchmarks/results.json`, the demo's pretraining on this config).

# %%
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from minilora import backend, corpus, model, plot
from minilora.methods import lora, nf4
from minilora.finetune import FinetuneConfig, finetune
from minilora.model import count_params
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.methods.prompt import add_prompt
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")


base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                            os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")
_, val_text = corpus.train_val_text(0, 50 if FAST else 200, seed=PretrainConfig().data_seed)
val_data = tok.encode(val_text)
STEPS = 3 if FAST else 200


def run(method, lr=None, rank=None, tag=""):
    """One short fine-tuning run on the 'subject' task; returns finetune's summary, the params and their config."""
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank) if rank else lora.LoraConfig()
    config = FinetuneConfig(method=method, task="subject", n_train=64 if FAST else 2000,
                            n_test=8 if FAST else 100, lora=lcfg)
    config.train.steps = STEPS
    config.train.warmup_steps = 1 if FAST else 10
    config.train.eval_every = STEPS
    if lr is not None:
        config.train.lr, config.train.min_lr = lr, lr / 10
    params, ft_config, _, summary = finetune(base, mc, tok, config, os.path.join(RUNS, f"05-{tag}"), val_data)
    return summary, params, ft_config


# %% [markdown]
# ## A learning-rate sweep: forgetting grows with the learning rate
#
# Full fine-tuning on the "subject" task, the same steps and data for each learning
# rate. The cell below prints, for each, the task score (exact match on held-out
# sentences) and the forgetting.
#
# **What the full run gives.** In full mode (200 steps, 5 rates, the committed figure
# `figures/05_lr_and_rank_sweeps.png`) the forgetting climbs from about 0.3 nats/char
# at 3e-5 to about 5.9 at 3e-3, and the exact match, still early in training, from
# about 0.06 to about 0.37. **In fast mode** (3 steps, 2 rates, a tiny model) the
# exact match prints 0.000 and the forgetting is near zero, even below it: too few
# steps to change anything.

# %%
lrs = [3e-5, 3e-4] if FAST else [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
sweep = []
for lr in lrs:
    sm, *_ = run("full", lr=lr, tag=f"full-lr{lr:g}")
    sweep.append(sm)
    print(f"lr {lr:7.0e}: exact match {sm['metric']:.3f}   corpus loss {sm['val_loss_before']:.4f} -> "
          f"{sm['val_loss_after']:.4f}   forgetting {sm['forgetting']:+.4f}")
forgetting = [sm["forgetting"] for sm in sweep]
if not FAST:
    assert forgetting[-1] > forgetting[0]  # the largest learning rate forgets more than the smallest
    assert np.corrcoef(np.log(lrs), forgetting)[0, 1] > 0.5  # and the trend is up across the sweep

# %% [markdown]
# ## A LoRA rank sweep
#
# The post's rule alpha = 2r keeps the scale s = alpha / r = 2 fixed. Trainable
# parameters grow linearly in r: r (d + k) per adapted matrix. A fixed s does **not**
# make the update's size independent of r, though. Adam moves every parameter by
# about the learning rate per step, whatever its gradient's scale, so with more
# columns in B and rows in A, s B A grows with r. The cell below trains r = 1, 4, 16
# on the same task, asserts the linear count, and prints the size of the learned
# update, ||Delta W|| = ||W_merged - W|| over all adapted matrices (Frobenius).
#
# Rank-stabilised LoRA (rsLoRA, Kalajdzievski 2023) scales by alpha / sqrt(r)
# instead, chosen so that the update's size stays put as r grows:
# `LoraConfig(rank=r, alpha=a, rslora=True)`. Tutorial 06 shows the rank study
# (`minilora sweep rank`), where standard LoRA with a fixed alpha falls apart at
# large r and rsLoRA does not.
#
# In full mode (200 steps, the right panel of `figures/05_lr_and_rank_sweeps.png`)
# the exact match rises a little with the rank, from about 0.10 at r = 1 to about
# 0.16 at r = 16; in fast mode it prints 0.000 for every rank.

# %%
ranks = [1, 4] if FAST else [1, 4, 16]
rank_sweep, update_norms = [], []
for r in ranks:
    sm, params, ft_config = run("lora", rank=r, tag=f"lora-r{r}")
    merged, _ = lora.merge(params, ft_config)  # W + s B A in place of each adapted W
    update_norms.append(float(np.sqrt(sum(np.sum((merged[n] - base[n]) ** 2) for n in base))))
    rank_sweep.append(sm)
    print(f"r = {r:2d}: trainable {sm['trainable_params']:7,}   exact match {sm['metric']:.3f}   "
          f"forgetting {sm['forgetting']:+.4f}   ||Delta W|| {update_norms[-1]:.3f}")
n_matrices = 4 * mc.n_layers  # q, k, v, o in every block
for r, sm in zip(ranks, rank_sweep):
    assert sm["trainable_params"] == n_matrices * lora.lora_param_count(mc.d_model, mc.d_model, r)
if not FAST:
    assert update_norms[-1] > update_norms[0]  # same s = 2, a larger update at a larger rank

# %%
fig = Figure(figsize=(12, 4.5), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.semilogx(lrs, forgetting, "o-", color="C3", label="forgetting (left axis)")
ax1.axhline(0.0, color="0.6", linewidth=0.8)
ax1.set_xlabel("peak learning rate (full fine-tuning)")
ax1.set_ylabel("forgetting: corpus loss after - before (nats/char)", color="C3")
ax1b = ax1.twinx()
ax1b.semilogx(lrs, [sm["metric"] for sm in sweep], "s--", color="C0", label="exact match (right axis)")
ax1b.set_ylabel("exact match, held-out", color="C0")
ax1b.set_ylim(-0.05, 1.05)
for a in (ax1, ax1b):
    a.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    a.xaxis.set_minor_locator(NullLocator())
ax1.set_title(f"Full fine-tuning, {STEPS} steps: a larger learning rate forgets more{NOTE}", fontsize=10)
ax1.grid(True, alpha=0.3)
handles = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
ax1.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
counts = [sm["trainable_params"] for sm in rank_sweep]
ax2.semilogx(counts, [sm["metric"] for sm in rank_sweep], "o-", color="C1")
ax2.set_xticks(counts, [f"{c:,}\n(r = {r})" for c, r in zip(counts, ranks)])
ax2.xaxis.set_minor_locator(NullLocator())
ax2.set_xlim(counts[0] / 2, counts[-1] * 2)
ax2.set_ylim(-0.05, 1.05)
ax2.set_xlabel("trainable parameters (LoRA on q, k, v, o; alpha = 2r)")
ax2.set_ylabel("exact match, held-out")
ax2.set_title(f"LoRA rank sweep, {STEPS} steps: parameters grow linearly in r{NOTE}", fontsize=10)
ax2.grid(True, alpha=0.3)
path = os.path.join(FIGURES, "05_lr_and_rank_sweeps.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Hardware: what must fit in memory
#
# During training, device memory holds at once:
#
# - **parameters**: every weight, frozen or not (4 bytes each in float32);
# - **gradients**: one per *trainable* parameter;
# - **optimizer state**: AdamW's m and v, two per trainable parameter;
# - **activations**: everything the forward caches for the backward, proportional to
#   batch x sequence length x width x layers.
#
# PEFT shrinks the middle two, and a little of the last: a linear layer keeps its
# input x only to form dW = dout^T x, so a frozen linear need not keep it
# (`model.forward(..., trainable=...)` drops it; dx = dout W needs only W). What
# every strategy still keeps is what the backward must pass *through*: attention's
# probabilities, the layer norms' statistics, GELU's input. The cell below measures
# all four for our model at a batch of 16 x 128 tokens: the activation bytes are
# counted by walking the forward cache the training step keeps.

# %%
def cache_bytes(obj, seen=None):
    """Bytes of the distinct arrays inside a nested cache of tuples and lists."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        root = obj if obj.base is None else obj.base  # views share their base's memory
        if id(root) in seen:
            return 0
        seen.add(id(root))
        return root.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(cache_bytes(o, seen) for o in obj)
    return 0


B, T = (4, 32) if FAST else (16, mc.context_length)
ids = np.random.default_rng(0).integers(0, mc.vocab_size, (B, T))
lcfg = lora.LoraConfig(rank=8, alpha=16.0)
lora_params, lora_mc = lora.add_lora(base, mc, lcfg)
strategies = {  # name: (params, trainable names, the config the params come with)
    "full": (base, set(base), mc),
    "lora r=8": (lora_params, set(lora.lora_names(lora_params)), lora_mc),
    "prompt P=16": (add_prompt(base, 16), {"prompt"}, mc),
}
memory = {}
for name, (params, trainable, lc) in strategies.items():
    n_all, n_train = count_params(params), count_params(params, trainable)
    _, cache = model.forward(params, lc, ids, trainable=trainable)  # what the training step keeps
    # the caches also hold the weights themselves (linear_forward keeps W for dx = dout W):
    # those are parameters, already counted, so they start in `seen`
    weights = {id(a if a.base is None else a.base) for a in params.values()}
    memory[name] = {"parameters": 4 * n_all, "gradients": 4 * n_train, "AdamW m, v": 8 * n_train,
                    "activations": cache_bytes(cache, weights)}
    total = sum(memory[name].values())
    print(f"{name:12s} " + "  ".join(f"{k} {v / 2**20:6.2f} MiB" for k, v in memory[name].items())
          + f"  total {total / 2**20:6.2f} MiB")
assert memory["lora r=8"]["AdamW m, v"] < memory["full"]["AdamW m, v"]
# full fine-tuning keeps every linear's input for its dW; LoRA and prompt tuning keep none of the MLP's
assert memory["lora r=8"]["activations"] < memory["full"]["activations"]
if not FAST:  # (fast mode's 32-token rows: 16 prompt positions add half again, more than the MLP inputs saved)
    assert memory["prompt P=16"]["activations"] < memory["full"]["activations"]
    assert all(m["activations"] > m["parameters"] + m["gradients"] + m["AdamW m, v"] for m in memory.values())

# %% [markdown]
# At this size the activations dominate: the model is tiny and 16 x 128 tokens is a
# real batch. The cell below does the same arithmetic for a 7-billion-parameter model
# whose 32 blocks each have four 4096 x 4096 attention matrices, in the common
# mixed-precision recipe: 2-byte weights and gradients, 4-byte AdamW moments plus a
# 4-byte master copy of each trainable weight. The next cell adds the activations.

# %%
n_base = 7_000_000_000
n_lora = 32 * 4 * lora.lora_param_count(4096, 4096, 16)  # r = 16 on q, k, v, o
gigabytes = {}
for name, n_train in (("full", n_base), ("LoRA r=16", n_lora)):
    gigabytes[name] = (2 * n_base + (2 + 4 + 8) * n_train) / 1e9  # weights + (grads, master, m and v)
    print(f"{name:10s} trainable {n_train:>13,}   weights + grads + master + AdamW = {gigabytes[name]:6.1f} GB")
assert gigabytes["full"] > 80 > gigabytes["LoRA r=16"]  # only LoRA fits one 80 GB GPU (before activations)

# %% [markdown]
# QLoRA stores the frozen linears in 4 bits instead of 16 (NF4, `minilora/methods/nf4.py`): 4 bits a
# weight, one 8-bit absmax per block of 64, one float32 scale per 256 absmax constants, about 4.127 bits
# in all (Dettmers et al. 2023; the default model's base measures 4.128, README). The embeddings, the
# LM head and the norms stay 16-bit; the adapters' state is LoRA's.

# %%
n_linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and a LLaMA-style gated MLP per block
nf4_bits = 4 + 8 / nf4.BLOCK_SIZE + 32 / (nf4.BLOCK_SIZE * nf4.ABSMAX_BLOCK_SIZE)
weights_nf4 = n_linear * nf4_bits / 8 + 2 * (n_base - n_linear)  # bytes
gigabytes["QLoRA r=16"] = (weights_nf4 + (2 + 4 + 8) * n_lora) / 1e9
print(f"{n_linear:,} weights in linears at {nf4_bits:.3f} bits: {weights_nf4 / 1e9:.1f} GB of weights "
      f"instead of {2 * n_base / 1e9:.1f}; QLoRA r=16 in all: {gigabytes['QLoRA r=16']:.1f} GB")
assert gigabytes["QLoRA r=16"] < 8 < gigabytes["LoRA r=16"]  # QLoRA fits an 8 GB GPU (before activations)

# %% [markdown]
# The activations do not vanish at scale. For a GPT-style block, Korthikanti et al.
# (2022, "Reducing activation recomputation in large transformer models", eq. 1) count
# s b h (34 + 5 a s / h) bytes of 16-bit activations per block, for s tokens, batch b,
# width h and a heads. The 5 a s^2 b part is the attention matrix (its softmax input,
# output and dropout mask), which FlashAttention recomputes instead of storing. The
# cell below evaluates it for one 2,048-token sequence of the same 7B model.

# %%
s_tok, width, heads, blocks = 2048, 4096, 32, 32
act_flash = 34 * s_tok * width * blocks / 1e9  # GB, attention matrix not stored
act_plain = (34 * s_tok * width + 5 * heads * s_tok**2) * blocks / 1e9  # GB, attention matrix stored
print(f"activations of one {s_tok}-token sequence: {act_flash:.1f} GB with FlashAttention, {act_plain:.1f} GB without")
print(f"against {2 * n_base / 1e9:.1f} GB of 2-byte weights; LoRA's other state is {gigabytes['LoRA r=16']:.1f} GB")
assert act_plain > 2 * n_base / 1e9 > act_flash  # without FlashAttention, one sequence outweighs the weights

# %% [markdown]
# So at 7B full fine-tuning is dominated by gradients and optimizer state, which
# LoRA removes; what LoRA leaves is the frozen weights and, for long sequences, the
# activations, which grow with s^2 unless attention is computed without storing its
# matrix. That is why LoRA is usually paired with FlashAttention, activation
# checkpointing, and (QLoRA) 4-bit frozen weights.

# %%
fig = Figure(figsize=(8, 4.5), layout="constrained")
ax = fig.add_subplot()
names = list(memory)
left = np.zeros(len(names))
for i, part in enumerate(["parameters", "gradients", "AdamW m, v", "activations"]):
    vals = np.array([memory[n][part] / 2**20 for n in names])
    ax.barh(names, vals, left=left, color=f"C{i}", label=part)
    left += vals
for yi, total in enumerate(left):
    ax.annotate(f" {total:.3g} MiB", (total, yi), va="center", fontsize=9)
ax.set_xlim(0, left.max() * 1.15)
ax.invert_yaxis()
ax.set_xlabel(f"training memory (MiB), float32, batch {B} x {T} tokens")
ax.set_title("What fits in memory: PEFT removes gradients and optimizer state; activations stay" + NOTE, fontsize=10)
fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8)
ax.grid(True, axis="x", alpha=0.3)
path = os.path.join(FIGURES, "05_memory_per_strategy.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## The wall itself: GPT-2 small to XL on one 24 GiB machine
#
# The arithmetic above is the post's. `minilora/memplan.py` does it for the code as it runs: one training step's
# peak, term by term, at the moment the peak falls (the end of the forward, a block's backward, the update). The
# plan needs no weights, so the cell below plans GPT-2 XL (1.56 B parameters, 48 blocks of width 1600) on the
# spot, for one sequence of 256 tokens. The same plan is what `minilora finetune` checks before it starts, and
# `minilora memory --size gpt2-xl --method lora` prints.

# %%
from minilora import memplan

GIB = 2**30
xl = memplan.SIZES["gpt2-xl"]
plans = {(m, ck): memplan.plan(xl, m, batch=1, context=256, checkpoint_activations=ck)
         for m in ("full", "lora", "qlora") for ck in (False, True)}
for (m, ck), p in plans.items():
    print(f"{m:5s} {'checkpointed' if ck else 'plain':12s} " + "  ".join(f"{k} {v / GIB:5.2f}" for k, v in
          p.terms.items()) + f"   total {p.total / GIB:5.2f} GiB (peak in: {p.phase})")
full = plans[("full", False)]
assert full.total > 22 * GIB > plans[("lora", False)].total > plans[("qlora", False)].total
assert full.terms["optimizer"] == 2 * full.terms["gradients"]  # AdamW's m and v: two floats per trained weight
assert plans[("full", True)].total == full.total  # its peak is the update, after every activation is freed

# %% [markdown]
# Full fine-tuning's step needs about 23.5 GiB, and almost none of it is activations: its peak falls at the update,
# when the 5.8 GiB of weights, 5.8 GiB of gradients and 11.6 GiB of AdamW moments are all held at once (plus the
# update's scratch). No batch size and no checkpointing helps it; it cannot fit 24 GiB (the benchmark below
# holds each plan to 22 GiB, leaving 2 GiB of headroom). LoRA trains 0.3% as many weights, so the wall it meets is the frozen weights themselves, 5.8 GiB in
# float32, plus the activations; QLoRA stores the frozen linears in NF4 at about 4.13 bits a weight and meets it at
# about 1 GiB. Activation checkpointing keeps only each block's input and recomputes the block in the backward:
# at one sequence of 256 tokens it saves LoRA about 1 GiB, for about a third more time per step (one more forward;
# the committed times were taken on a shared machine, so read only their ratio).
#
# Are the plans right? `python benchmarks/memory_wall.py` ran one real step of each cell that fits (random weights,
# one child process per cell) and measured its peak with tracemalloc and the process's resident set. The cell
# below reads that committed table: every measured peak is the plan to within a few tenths of a percent, and at XL
# full fine-tuning was refused by the plan, never run.

# %%
import json

from minilora.studies import committed_results_dir

with open(os.path.join(os.path.dirname(committed_results_dir()), "memory_wall.json")) as f:
    wall = json.load(f)
print(f"benchmarks/memory_wall.json ({wall['date'][:10]}, {wall['machine']}):")
for c in wall["cells"]:
    if c["size"] == "gpt2-xl":
        ck = "checkpointed" if c["checkpoint_activations"] else "plain"
        if "measured" in c:
            m = c["measured"]
            print(f"  {c['method']:5s} {ck:12s} plan {c['plan_total'] / GIB:5.2f} GiB, measured "
                  f"{m['tracemalloc_peak'] / GIB:5.2f} GiB ({m['tracemalloc_over_plan']:.3f} x), step {m['step_s']:.0f} s")
        else:
            print(f"  {c['method']:5s} {ck:12s} plan {c['plan_total'] / GIB:5.2f} GiB: {c['refused'][:60]}...")
        key = (c["method"], c["checkpoint_activations"])
        if key in plans:
            assert c["plan_total"] == plans[key].total  # the committed table's plan is the one computed above
measured = [c["measured"]["tracemalloc_over_plan"] for c in wall["cells"] if "measured" in c]
assert all(0.99 <= r <= 1.01 for r in measured), measured
assert all("refused" in c for c in wall["cells"] if c["size"] == "gpt2-xl" and c["method"] == "full")

# %% [markdown]
# ## Running on a GPU: the CuPy backend
#
# Every op takes its array module from its inputs (`xp = array_module(x)`), so the
# same code runs on NumPy or on CuPy. Nothing switches silently: the GPU is used only
# when asked for.
#
#     pip install 'minilora[cuda12]'            # CuPy for CUDA 12 (or minilora[cuda13])
#     MINILORA_BACKEND=cupy minilora demo       # environment variable, or
#     minilora pretrain --backend cupy          # the flag, on any subcommand
#
# `backend.get_backend()` returns the module to use, and raises `BackendError` with
# instructions when CuPy is requested but not installed or no GPU is visible. The
# cell below asks for CuPy; where there is a GPU it runs the forward pass there and
# checks it against NumPy, and elsewhere it says why and moves on.

# %%
try:
    cp = backend.get_backend("cupy")
except backend.BackendError as e:
    print("no GPU here, staying on NumPy:", e)
else:
    gpu_params = model.params_to(base, cp)
    logits_gpu = backend.to_numpy(model.next_token_logits(gpu_params, mc, ids[:2]))
    logits_cpu = model.next_token_logits(base, mc, ids[:2])
    print(f"GPU vs CPU logits: max |diff| = {np.abs(logits_gpu - logits_cpu).max():.1e}")
    assert np.allclose(logits_gpu, logits_cpu, atol=1e-3)
print("the backend in use by default:", backend.get_backend().__name__)

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to
# predict **before** running, and how to check. The solutions, which run and assert
# their answers, are on [their page](solutions/05_hyperparameters_and_hardware_solutions.py).
#
# ### Exercise 5.1 (compute by hand): optimizer state
#
# Compute on paper AdamW's state in bytes for the three strategies of the memory cell
# (full, LoRA r = 8 on q, k, v, o, prompt P = 16), then check each against
# `optim.optimizer_state_bytes(optim.adamw_init(params, trainable))`. Then redo the
# 7B arithmetic for LoRA r = 64 (four times the tutorial's rank): trainable numbers,
# and gigabytes before activations. Predict first: does quadrupling r change whether
# LoRA fits an 80 GB GPU? What dominates the total?
#
# ### Exercise 5.2 (predict, then check): activations against batch and length
#
# Predict the factor by which the activation bytes grow when the batch doubles, and
# when the sequence length doubles (hint: which cached array is (T, T) per head?).
# Measure both with the memory cell's `cache_bytes` on `model.forward(base, mc, ids)`.
# First call it as `cache_bytes(cache)`, with an empty `seen`: the batch factor is not
# exactly 2. Find out why (which arrays in the caches do not grow with B?), and why the
# memory cell seeds `seen` with the parameters' ids; with them, check that the batch
# factor is exactly 2. Then fit act / B = a T + b T^2 on two lengths, predict a third
# to the byte, and explain b.
#
# ### Exercise 5.3 (change a hyperparameter): epochs and overfitting
#
# Fine-tune LoRA on "subject" for 200 steps (batch 16) with `n_train=16` (200 epochs)
# and with `n_train=2000` (1.6 epochs). Predict the training loss and the held-out
# loss of each (both on response tokens: `model.loss_and_grads` on
# `tasks.instruction_batch` of the training records, then of the test records of
# `tasks.task_splits("subject", n_train, 50, seed=0)`). Check the gap, held-out minus
# training: which run has memorised its data?
#
# ### Exercise 5.4 (derive, then instrument): the FLOPs of a training step
#
# A linear (N, in) -> (N, out) costs 2 N in out FLOPs. On paper: the forward FLOPs F
# of all the model's linears for N tokens (q, k, v, o, fc, proj in each block, and the
# tied head); the backward's FLOPs for full fine-tuning (dx and dW) and for LoRA (dx
# only: no dW) as multiples of F; and the fraction of a full step's cost a LoRA step
# costs once the adapters' own products are added. Check by counting: wrap
# `ops.linear_forward` and `ops.linear_backward` (as tutorial 03's "No dW, ever" cell
# does) so they add up 2 N in out per call (twice that for a backward with
# `param_grads=True`, none for the dx of a call with `input_grad=False`), wrap the tied
# head too (`ops.tied_head_cross_entropy_forward`, the head's linear fused with its loss and
# run in chunks of tokens; it forms its dh and dwte in the same pass), and run one
# `model.loss_and_grads` per strategy. LoRA's count will differ from your paper
# answer by one term: find which products the model skips, and why it may.
