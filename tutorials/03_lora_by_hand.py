# %% [markdown]
# # 03. LoRA, by hand
#
# ## Three strategies
#
# Phase 2 loads the pretrained weights W and trains on a task. The one structural
# decision is **which weights get updated**:
#
# - **Full fine-tuning**: every parameter. Maximum flexibility, but gradients and
#   optimizer state for every parameter.
# - **Parameter-efficient fine-tuning (PEFT)**: W is frozen; a small set of added
#   parameters Delta W (adapters) is trained. W is never modified.
# - **Prompt tuning**: no weight at all is updated; trainable vectors are put before
#   the input (tutorial 04).
#
# In minilora a strategy is only (a) which extra parameters exist and (b) which names
# are trainable. One model, one backward, one optimizer, one loop serve all three.
#
# ## LoRA: low-rank adaptation
#
# Weight updates during fine-tuning tend to have low intrinsic rank, so LoRA learns
# the update of a d x k matrix as a product of two thin matrices:
#
# $$W' = W + \Delta W = W + \frac{\alpha}{r} B A, \qquad B \in \mathbb{R}^{d \times r},\ A \in \mathbb{R}^{r \times k},\ r \ll \min(d, k)$$
#
# With our layout W (out, in) = (d, k), so `B (out, r)`, `A (r, in)` and the update is
# literally `W + s * B @ A`, with $s = \alpha / r$. A starts random, **B starts at zero**,
# so at initialisation $W' = W$ exactly: fine-tuning starts from the pretrained model.
# Only A and B are trained: $r (d + k)$ numbers instead of $d k$.
#
# **This tutorial fine-tunes tutorial 02's pretrained model**, which tutorial 02 saves
# in `runs/pretrain` (the folder `minilora pretrain` also writes, and tutorials 04 to 11
# share). Run tutorial 02 first; if the model is missing, the cell that loads it
# pretrains it there and says so (67 s with 2 threads in
# `benchmarks/results.json`, the demo's pretraining on this config).

# %%
import os

import numpy as np

from minilora import corpus, gradcheck, model, ops, plot, tasks
from minilora.methods import lora
from minilora.evaluation import exact_match
from minilora.finetune import FinetuneConfig, finetune
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.sampling import decode
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)

# %% [markdown]
# ## Counting: r (d + k) instead of d k
#
# The cell below evaluates the post's example, an attention matrix with d = k = 4096
# and r = 16, with `lora.lora_param_count(d, k, r)`.

# %%
n_lora, n_full = lora.lora_param_count(4096, 4096, 16), 4096 * 4096
print(f"full update d k = {n_full:,}   LoRA r (d + k) = {n_lora:,}   reduction {100 * (1 - n_lora / n_full):.2f}%")
assert (n_lora, n_full) == (131_072, 16_777_216) and n_lora / n_full < 0.01

# %% [markdown]
# ## The LoRA linear: forward
#
# $$y = x W^\top + b + s\, (x A^\top) B^\top$$
#
# `lora.lora_linear_forward` computes it **unmerged**: x A^T is (N, r), then times
# B^T gives (N, out). The (out, in) matrix B A is never formed; the update costs
# r (in + out) multiply-adds per token. The cell below checks the forward against
# the merged formula x (W + s B A)^T + b, and checks that with B = 0 the layer is
# exactly the base layer.

# %%
N, d_in, d_out, r = 10, 8, 6, 3
x = rng.standard_normal((N, d_in))
W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
s = lora.lora_scale(r, 2.0 * r)  # alpha = 2 r, the post's suggestion: s = 2
y, cache = lora.lora_linear_forward(x, W, b, A, B, s)
assert np.allclose(y, x @ (W + s * B @ A).T + b)
y0, _ = lora.lora_linear_forward(x, W, b, A, np.zeros_like(B), s)
assert np.array_equal(y0, ops.linear_forward(x, W, b)[0])
print("unmerged forward == merged formula; with B = 0 it equals the base layer exactly")

# %% [markdown]
# ## The LoRA linear: backward, derived
#
# Name the intermediate $\mathit{xa} = x A^\top$ (N, r). The forward is $y = x W^\top + b + s\, \mathit{xa} B^\top$.
# Walking back, with $dy = \partial L / \partial y$ (N, out):
#
# $$
# \begin{aligned}
# dB &= s\, dy^\top \mathit{xa} && (\text{out}, r) && \text{from } y \mathrel{+}= s\, \mathit{xa} B^\top \\
# d\mathit{xa} &= s\, dy\, B && (N, r) \\
# dA &= d\mathit{xa}^\top x && (r, \text{in}) && \text{from } \mathit{xa} = x A^\top \\
# dx &= dy\, W + d\mathit{xa} A && (N, \text{in}) && \text{base path plus adapter path}
# \end{aligned}
# $$
#
# and **no dW**: W is frozen, so the (out, in) product dy^T x is never computed. The
# cell below writes these four lines in NumPy and compares them with
# `lora.lora_linear_backward`.

# %%
dy = rng.standard_normal(y.shape)
xa = x @ A.T
dB_hand = s * dy.T @ xa
dxa = s * dy @ B
dA_hand = dxa.T @ x
dx_hand = dy @ W + dxa @ A
dx, dA, dB = lora.lora_linear_backward(dy, cache)
for name, hand, lib in (("dx", dx_hand, dx), ("dA", dA_hand, dA), ("dB", dB_hand, dB)):
    print(f"{name} {str(hand.shape):8s} by hand vs ops: max |diff| = {np.abs(hand - lib).max():.1e}")
    assert np.allclose(hand, lib)

# %% [markdown]
# Why the gradient check must use B != 0: at B = 0, dxa = s dy B = 0, so **dA is
# exactly zero** and a wrong dA formula would still pass. (It is also why training
# starts by moving B: only dB is non-zero at step 0.) The cell below shows it, then
# checks all three gradients against finite differences in float64 at B != 0.

# %%
_, cache0 = lora.lora_linear_forward(x, W, b, A, np.zeros_like(B), s)
_, dA0, dB0 = lora.lora_linear_backward(dy, cache0)
print(f"at B = 0: |dA| max = {np.abs(dA0).max()}, |dB| max = {np.abs(dB0).max():.3f}")
assert not dA0.any() and dB0.any()

results = gradcheck.check_op("lora_linear", lambda x, W, b, A, B: lora.lora_linear_forward(x, W, b, A, B, s),
                             lora.lora_linear_backward, {"x": x, "W": W, "b": b, "A": A, "B": B},
                             {"x": 0, "A": 1, "B": 2}, rng)
for res in results:
    print(f"d/d{res.argument}  rel error {res.error:.2e}")
    assert res.passed

# %% [markdown]
# ## The loss function and gradient flow
#
# Fine-tuning uses the same loss as pretraining, next-token cross-entropy, counted
# only on the response tokens (tutorial 04 shows the mask m, 1 on a response token):
#
# $$L = -\frac{1}{\sum_{b,t} m_{bt}} \sum_{b,t} m_{bt} \log p_\theta(x_{bt} \mid x_{b,<t})$$
#
# The divisor is the number of counted tokens in the whole batch, not T: every
# response token weighs the same, however long its example.
#
# Gradients flow back from the loss through every layer (dx must pass through the
# frozen W to reach earlier adapters) but **parameter** gradients are formed only for
# Delta W. The cell below checks the whole LoRA model's gradients against finite
# differences (float64, a tiny model, B != 0), the same check `minilora gradcheck`
# runs.

# %%
cfg, base64 = gradcheck.tiny_model(rng)
lcfg64 = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "k", "v", "o"))
adapted64, cfg64 = lora.add_lora(base64, cfg, lcfg64, seed=1)  # the params and the config that describes them
for name in lora.lora_names(adapted64):
    adapted64[name] = 0.5 * rng.standard_normal(adapted64[name].shape)
xt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
yt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
results = gradcheck.check_model("LoRA model", lambda p, tr: model.loss_and_grads(p, cfg64, {"x": xt, "y": yt}, tr),
                                adapted64, set(lora.lora_names(adapted64)), rng)
print(f"{len(results)} adapter tensors checked, worst rel error {max(res.error for res in results):.1e}")
assert all(res.passed for res in results)

# %% [markdown]
# ## The pretrained model
#
# Load the checkpoint of tutorial 02 from `runs/pretrain` (or pretrain it there now,
# if there is none; the cell prints which).

# %%
base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                            os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")
base_copy = {n: p.copy() for n, p in base.items()}  # to prove later that fine-tuning left W untouched
_, val_text = corpus.train_val_text(0, 50 if FAST else 200, seed=PretrainConfig().data_seed)
val_data = tok.encode(val_text)  # pretraining-corpus text, to measure forgetting

# %% [markdown]
# Add adapters to q, k, v, o of every block (the post: LoRA is typically applied to
# the attention projections) with r = 8, alpha = 16. The cell below asserts that
# every B is zero and that the adapted model's logits equal the base model's,
# exactly.

# %%
lcfg = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
adapted, amc = lora.add_lora(base, mc, lcfg, seed=0)  # amc: mc with .lora = lcfg
for name in lora.lora_names(adapted):
    print(f"{name:22s} {adapted[name].shape}")
assert all(not adapted[n].any() for n in lora.lora_names(adapted) if n.endswith("lora_B"))
ids = tok.encode("the red cat chases two mice.\nmy dog ")[None, :]
assert np.array_equal(model.next_token_logits(adapted, amc, ids), model.next_token_logits(base, mc, ids))
print("B = 0 at init: the adapted model's logits equal the pretrained model's exactly")

# %% [markdown]
# ## No dW, ever
#
# `loss_and_grads(..., trainable=names)` returns gradients for exactly the
# trainable names. To show that no dense weight gradient is even *computed* (not
# just discarded), the cell below counts the calls to `ops.linear_backward` that
# form a dW product, during one LoRA backward and one full backward.

# %%
train_records = [{"instruction": "Name the subject.", "input": "the red cat chases two mice.", "output": "cat"}]
xb, yb, mb = tasks.instruction_batch(train_records, tok, mc.context_length)
lora_trainable = set(lora.lora_names(adapted))
original_linear_backward = ops.linear_backward
dW_products = []


def counting_linear_backward(dout, cache, param_grads=True, **options):
    if param_grads:
        dW_products.append(cache[1].shape)
    return original_linear_backward(dout, cache, param_grads, **options)


ops.linear_backward = counting_linear_backward
try:
    _, grads = model.loss_and_grads(adapted, amc, {"x": xb, "y": yb, "mask": mb}, lora_trainable)
    n_lora_dW = len(dW_products)
    dW_products.clear()
    _, grads_full = model.loss_and_grads(base, mc, {"x": xb, "y": yb, "mask": mb}, set(base))
    n_full_dW = len(dW_products)
finally:
    ops.linear_backward = original_linear_backward
print(f"LoRA backward: {len(grads)} gradients, all adapters: {sorted(grads)[:2]} ...; dW products formed: {n_lora_dW}")
print(f"full backward: {len(grads_full)} gradients; dW products formed: {n_full_dW}")
assert set(grads) == lora_trainable and not any(n.endswith(".W") for n in grads)
assert n_lora_dW == 0 and n_full_dW > 0
try:
    model.loss_and_grads(adapted, amc, {"x": xb, "y": yb, "mask": mb}, {"h.0.attn.q.W"})
    raise AssertionError("training an adapted W should be refused")
except ValueError as e:
    print("asking for an adapted W's gradient is refused:", e)

# %% [markdown]
# ## Fine-tuning: LoRA vs full on the "subject" task
#
# The task (tutorial 04 shows the format): given a sentence, answer its subject noun.
# The pretrained model has never seen the instruction format, so it scores 0 before
# fine-tuning. `finetune.finetune` trains with one strategy and returns a summary:
# exact-match accuracy on held-out sentences before and after, and the
# pretraining-corpus loss before and after. Both runs take the same number of steps;
# each uses its default learning rate (full 3e-4, LoRA 3e-3: freshly initialised
# adapters take larger steps than pretrained weights should). Each run prints
# PEFT's `trainable params || all params` line.
#
# **What the full run gives.** In full mode (300 steps on 2,000 examples, the
# committed figure `figures/03_lora_vs_full_loss.png`) both training losses fall from
# about 5.2 nats per token to about 0.4, below the 0.67 of a model that knows the
# answers but not which one, full fine-tuning a little faster; the asserts check that
# both raise the exact match. Trained for 600 steps at rates chosen on validation,
# study 1 measured a test exact match of 1.000 ± 0.000 for full fine-tuning and
# 0.962 ± 0.050 for LoRA (3 seeds, `benchmarks/studies/forgetting/results.jsonl`).
# **In fast mode** (4 steps on a tiny model and data) both print
# `exact match 0.000 -> 0.000`: the run works, and that is all it shows.

# %%
steps = 4 if FAST else 300
summaries, logs, finetuned = {}, {}, {}
for method in ("full", "lora"):
    config = FinetuneConfig(method=method, task="subject", n_train=64 if FAST else 2000, n_test=8 if FAST else 150,
                            lora=lcfg)
    config.train.steps = steps
    config.train.warmup_steps = 1 if FAST else 20
    config.train.eval_every = steps
    run_dir = os.path.join(RUNS, f"03-finetune-subject-{method}")
    params, ft_config, trainable, summary = finetune(base, mc, tok, config, run_dir, val_data)
    summaries[method], finetuned[method] = summary, (params, ft_config)
    if not FAST:
        assert summary["metric"] > summary["metric_before"]
    logs[method] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
    print(f"[{method}] exact match {summary['metric_before']:.3f} -> {summary['metric']:.3f}; "
          f"corpus loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}; "
          f"{summary['wall_s']:.0f} s")
for name in base:
    assert np.array_equal(base[name], base_copy[name])  # neither strategy modified the pretrained W

# %% [markdown]
# ## The memory argument
#
# AdamW keeps two moments (m and v) for every **trainable** parameter, and nothing
# for a frozen one. The cell below prints the optimizer state of each run, and
# asserts it equals 2 x 4 bytes (float32) x trainable parameters.

# %%
for method, sm in summaries.items():
    print(f"{method:5s} trainable {sm['trainable_params']:>9,} of {sm['total_params']:,}   "
          f"AdamW state {sm['optimizer_state_bytes'] / 1024:9,.1f} KiB")
    assert sm["optimizer_state_bytes"] == 2 * 4 * sm["trainable_params"]
ratio = summaries["full"]["optimizer_state_bytes"] / summaries["lora"]["optimizer_state_bytes"]
print(f"LoRA's optimizer state is {ratio:.0f}x smaller: the ratio of the trainable counts")
assert ratio == summaries["full"]["trainable_params"] / summaries["lora"]["trainable_params"] > 1

# %% [markdown]
# A few held-out predictions of the LoRA model (greedy decoding, stops at newline):

# %%
_, test_records = tasks.task_splits("subject", 0, 6, seed=123)
acc, preds = exact_match(*finetuned["lora"], tok, test_records)
for rec, pred in zip(test_records, preds):
    print(f"{rec['input']:45s} expected {rec['output']!r:12s} got {pred!r}")

# %% [markdown]
# ## Merge and unmerge
#
# For inference, Delta W = s B A can be folded into W: `lora.merge` returns a plain
# model (no adapters) whose W is W + s B A, so inference costs exactly what the base
# model costs. `lora.unmerge` subtracts it again. The cell below checks that the
# merged model computes the same logits as the adapted one, and that unmerging
# recovers the pretrained W (up to float32 rounding).

# %%
adapted_ft, adapted_mc = finetuned["lora"]
merged, merged_mc = lora.merge(adapted_ft, adapted_mc)
assert not lora.lora_names(merged) and merged_mc.lora is None
logits_adapted = model.next_token_logits(adapted_ft, adapted_mc, ids)
logits_merged = model.next_token_logits(merged, merged_mc, ids)
print(f"max |logits merged - logits adapted| = {np.abs(logits_merged - logits_adapted).max():.1e}")
assert np.allclose(logits_merged, logits_adapted, atol=1e-4)
adapters = {n: adapted_ft[n] for n in lora.lora_names(adapted_ft)}
restored, _ = lora.unmerge(merged, merged_mc, adapters, lcfg)
w_err = max(np.abs(restored[n] - base[n]).max() for n in base)
print(f"after unmerge, max |W - W_pretrained| = {w_err:.1e}")
assert w_err < 1e-5

# %% [markdown]
# ## Reading the curve: the start above ln 96, and the plateau
#
# The figure below has two features worth explaining, and both can be computed.
#
# **The start.** A model that knew nothing would spread its probability evenly over
# the 96 characters and score ln 96 = 4.56 nats per token. The pretrained model
# starts *higher*. It is not ignorant but confidently wrong: it has only ever seen
# corpus sentences, so after the response header it predicts the characters of a
# corpus sentence, and it is sure of them. Cross-entropy punishes a confident wrong
# guess more than an even spread. The cell below scores the response tokens of 64
# training records with the pretrained model (step 0 of both runs) and prints both
# numbers: the cross-entropy (how surprised the model is by the answer) and the
# entropy of its own prediction (how sure it is), with its greedy guess.

# %%
records, _ = tasks.task_splits("subject", 64, 0, seed=0)
x, y, mask = tasks.instruction_batch(records, tok, mc.context_length)
h, _ = model.forward(base, mc, x)
logits = h @ base["wte"].T  # (B, T, V): the tied LM head
logp = logits - logits.max(-1, keepdims=True)
logp -= np.log(np.exp(logp).sum(-1, keepdims=True))  # log softmax
counted = mask.astype(bool)  # the response tokens
start_loss = -np.take_along_axis(logp, np.where(counted, y, 0)[..., None], -1)[..., 0][counted].mean()
own_entropy = -(np.exp(logp) * logp).sum(-1)[counted].mean()
print(f"cross-entropy of the answers under the pretrained model {start_loss:.2f} nats/token (ln 96 = {np.log(96):.2f})")
print(f"entropy of the model's own predictions there          {own_entropy:.2f} nats/token")
prompt_ids = tok.encode(tasks.format_prompt(records[0]["instruction"], records[0]["input"]))
guess = decode(base, mc, [prompt_ids], 24)[0]
print(f"expected {records[0]['output']!r}; the pretrained model continues with {tok.decode(guess)!r}")
if not FAST:
    assert start_loss > np.log(96) > own_entropy  # confidently wrong, not ignorant

# %% [markdown]
# **The plateau.** After their first fast fall both curves flatten for a while before
# falling again (in the committed `figures/03_lora_vs_full_loss.png`, near 0.7 for
# about a hundred steps). A model that has learned the *format* and the *set of
# answers* (one of the grammar's nouns, with their frequencies, then a newline),
# but not yet to copy the subject out of the input, pays the entropy of the answer,
# -sum_a p(a) log p(a), spread over the answer's tokens. The cell below computes that
# level from the training records. Learning to read the input, the second phase, is
# the slow part.

# %%
counts = {}
for rec in tasks.task_splits("subject", 2000, 0, seed=0)[0]:
    counts[rec["output"]] = counts.get(rec["output"], 0) + 1
p_answer = np.array(list(counts.values())) / sum(counts.values())
tokens_per_answer = sum(n * (len(a) + 1) for a, n in counts.items()) / sum(counts.values())  # + the newline
guess_level = -(p_answer * np.log(p_answer)).sum() / tokens_per_answer
print(f"{len(counts)} distinct answers, entropy {-(p_answer * np.log(p_answer)).sum():.3f} nats, "
      f"{tokens_per_answer:.2f} tokens each: {guess_level:.3f} nats/token without reading the input")
if not FAST:
    assert 0.55 < guess_level < 0.8

# %% [markdown]
# ## Figure: the two loss curves
#
# Loss on the response tokens only, per step, for both strategies, with the two
# levels computed above: ln 96 and the "knows the answers, not which one" level.

# %%
fig = plot.plot_loss_curves(
    logs, smooth=0.8, title="Fine-tuning loss on 'subject' (response tokens only): full vs LoRA (r=8 on q,k,v,o)" + NOTE)
ax = fig.axes[0]
ax.axhline(np.log(96), color="0.5", linestyle=":", linewidth=1.2, label="uniform over 96 characters (ln 96)")
ax.axhline(guess_level, color="C3", linestyle="--", linewidth=1.2,
           label=f"knows the answers, not which one ({guess_level:.2f})")
ax.legend(fontsize=8)
path = os.path.join(FIGURES, "03_lora_vs_full_loss.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# LoRA trains a few percent of the parameters, keeps a proportionally smaller
# optimizer state, never forms a dense dW, and can be merged away for inference.
# Tutorial 04 adds the third strategy, prompt tuning, and a classification head.

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to
# predict **before** running, and how to check. The solutions, which run and assert
# their answers, are on [their page](solutions/03_lora_by_hand_solutions.py).
#
# ### Exercise 3.1 (compute by hand): how many numbers LoRA trains
#
# For the tutorial's model (`mc`: C = 128, L = 2 blocks, F = 512) and r = 8, compute
# on paper (a) the trainable parameters with adapters on q, k, v, o; (b) the same with
# the MLP's fc (F, C) and proj (C, F) added; (c) AdamW's state in bytes for each
# (float32). Check (a) and (b) against `model.count_params(adapted,
# lora.lora_names(adapted))` after `lora.add_lora(base, mc, LoraConfig(rank=8,
# alpha=16, targets=...))`, against the sum of `lora.lora_param_count` over the adapted
# matrices, and (c) against `optim.optimizer_state_bytes(optim.adamw_init(adapted,
# names))`. Why do the two MLP matrices cost more than the four attention ones?
#
# ### Exercise 3.2 (predict, then check): which factor moves first
#
# B starts at zero. Predict which of A and B change after **one** AdamW step with
# weight decay 0, and after two. Then check: add adapters (r = 4), take one batch
# from `tasks.instruction_batch`, and alternate `model.loss_and_grads(adapted, amc,
# batch, names)` and `optim.adamw_step(adapted, grads, state, lr=1e-3)` twice,
# comparing every A and B with a copy taken before. (Hint: what is Adam's update when
# m = v = 0?)
#
# ### Exercise 3.3 (change a hyperparameter): alpha under Adam
#
# Keep r = 8 and double alpha from 16 to 32. Predict, before running: (a) the ratio of
# the gradient dB at init for the two alphas, and whether it is exact; (b) the ratio
# of the norms of the weight update Delta W = s B A after one AdamW step. Check both on
# `h.0.attn.q` of the pretrained model. What does (b) say about alpha and the learning
# rate, and about "alpha = 2r keeps the scale fixed" when r changes under Adam?
#
# ### Exercise 3.4 (derive and implement): the LoRA backward with adapter dropout
#
# `LoraConfig(dropout=p)` drops the adapter's input only: xd = x * keep with
# keep = mask / (1 - p), then y = x W^T + b + s (xd A^T) B^T. Derive dx, dA and dB on
# paper. Which gradient reads xd instead of x, and does the base path's dx see the
# mask? Write `my_lora_forward(x, W, b, A, B, s, keep)` returning `(y, cache)` and
# `my_lora_backward(dy, cache)` returning `(dx, dA, dB)`, pass `gradcheck.check_op` on
# x, A and B at a random float64 point with B != 0 and one fixed mask, and check that
# `lora.lora_linear_backward` agrees when given `dropout_mask=mask`.
