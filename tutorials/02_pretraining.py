# %% [markdown]
# # 02. Phase 1: pretraining
#
# ## What fine-tuning is
#
# **Pretraining** trains a model on a very large, general corpus with a
# self-supervised objective; it learns the structure of the language. **Fine-tuning**
# takes those pretrained weights and continues training for a short while on a
# small, curated, task-specific dataset. The result keeps the general abilities of
# the backbone and adds the task. In real systems pretraining sees trillions of
# tokens and fine-tuning thousands to millions of examples; that gap in scale is
# what makes fine-tuning cheap.
#
# ## The two-phase architecture
#
# - **Phase 1 (this tutorial).** A transformer is trained on next-token prediction
#   over a corpus. The output is a set of pretrained weights W.
# - **Phase 2 (tutorials 03-11).** W is loaded, a dataset of input-output pairs is
#   prepared, and training resumes, but now the critical decision is: *which weights
#   get updated?*
#
# Everything here is small enough for a laptop CPU: a toy language, a 2-layer GPT,
# a few minutes of training.

# %%
import os

import numpy as np

from minilora import corpus, plot, tokenizer
from minilora.finetune import FinetuneConfig
from minilora.model import count_params, init_params, loss_and_grads, param_shapes
from minilora.evaluation import strided_val_loss
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.sampling import decode
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
tok = tokenizer.CharTokenizer()

# %% [markdown]
# ## The corpus: a toy grammar
#
# `minilora/corpus.py` defines a small probabilistic grammar: a subject noun phrase,
# a verb that agrees with it in number, and an object or a place. Each sentence is
# followed by a newline. The cell below prints a few sentences from it.

# %%
rng = np.random.default_rng(0)
for d in corpus.sample_sentences(6, rng):
    print(d["text"])

# %% [markdown]
# ## The entropy floor: the best loss any model can reach
#
# Every word belongs to exactly one category, so each sentence has exactly one
# derivation, and P(sentence) is the product of the probabilities of the choices
# that made it. The entropy of a sentence is then the expected sum of the entropies
# of those choices, and spread over its characters (plus the newline):
#
# $$H = \frac{H(\text{sentence})}{\mathbb{E}[\text{len}(\text{sentence}) + 1]} \quad \text{nats per character.}$$
#
# Why nothing beats it: a model q's expected cross-entropy on text from p is
#
# $$\mathbb{E}_p[-\log q] = H(p) + \mathrm{KL}(p \,\|\, q) \quad \text{and} \quad \mathrm{KL} \ge 0,$$
#
# with equality only when q = p. So the loss curve below can approach H but never go
# under it (on average over fresh text). The cell below prints H, and checks it
# against a Monte Carlo estimate from sampled sentences (`corpus.sentence_log_prob`
# parses a sentence and returns its exact log probability).

# %%
H = corpus.entropy_per_char()
sample = [d["text"] for d in corpus.sample_sentences(2000 if FAST else 20000, rng)]
log_probs = np.array([corpus.sentence_log_prob(s) for s in sample])
H_mc = -log_probs.mean() / np.mean([len(s) + 1 for s in sample])
print(f"exact entropy floor  H = {H:.4f} nats/char")
print(f"Monte Carlo estimate   = {H_mc:.4f} nats/char  ({len(sample)} sentences)")
print(f"uniform guess ln(96)   = {np.log(96):.4f} nats/char")
assert abs(H_mc - H) < 0.03

# %% [markdown]
# ## A baseline: the character bigram
#
# The simplest language model predicts each character from the previous one only,
# P(b | a) from counts. It knows spelling fragments but nothing about agreement or
# sentence structure. The cell below fits it on the training text and scores it on
# the validation text; a transformer is worth something only if it gets well below
# this number, toward H. It also prints the size of the pretraining text next to the
# size of a fine-tuning dataset: the scale gap between the two phases, in miniature.

# %%
config = PretrainConfig.fast() if FAST else PretrainConfig()  # fast: a smoke test, a tiny model
train_text, val_text = corpus.train_val_text(config.n_train_sentences, config.n_val_sentences, config.data_seed)
bigram = corpus.bigram_loss(train_text, val_text)
print(f"training text: {len(train_text):,} characters, validation text: {len(val_text):,}")
print(f"bigram validation loss = {bigram:.4f} nats/char   (floor {H:.4f})")
print(f"for scale: phase 2 fine-tunes on {FinetuneConfig().n_train:,} short records by default")
assert bigram > H

# %% [markdown]
# ## The model
#
# A GPT-2 shaped transformer (`minilora/model.py`): token and position embeddings,
# `n_layers` pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final
# layer norm, and an LM head tied to the token embedding `wte`. Parameters are one
# flat dict with GPT-2's names. The cell below lists them and checks the total
# against the formula
#
# $$V C + T_{\max} C + L \big(4 C^2 + \underbrace{3 C}_{q,\,v,\,o \text{ biases}} + 2 C F + F + C + \underbrace{4 C}_{\text{two LNs}}\big) + 2 C$$

# %%
mc = config.model
shapes = param_shapes(mc)
for name, shape in list(shapes.items())[: 2 + 16]:
    print(f"{name:20s} {shape}")
print("...")
n_params = count_params(init_params(mc))
C, F, V, T, L = mc.d_model, mc.d_ff, mc.vocab_size, mc.context_length, mc.n_layers
formula = V * C + T * C + L * (4 * C * C + 3 * C + 2 * C * F + F + C + 4 * C) + 2 * C
print(f"{len(shapes)} tensors, {n_params:,} parameters (formula: {formula:,})")
assert n_params == formula

# %% [markdown]
# At initialisation every logit is close to 0, so the model predicts nearly the
# uniform distribution and its loss should be close to ln(96). The cell below
# checks it: a quick test that the forward pass and the loss are wired correctly.

# %%
x = tok.encode(train_text[: 8 * 65])[: 8 * 64 + 1]
xb, yb = x[:-1].reshape(8, 64), x[1:].reshape(8, 64)
loss0, _ = loss_and_grads(init_params(mc), mc, {"x": xb, "y": yb})
print(f"loss at init {loss0:.4f}, ln(96) = {np.log(96):.4f}")
assert abs(loss0 - np.log(96)) < 0.05

# %% [markdown]
# ## Pretraining
#
# The objective is next-token cross-entropy,
#
# $$L = -\frac{1}{T} \sum_t \log p_\theta(x_t \mid x_{<t}),$$
#
# minimised with AdamW (warmup, then cosine decay) on random 128-character windows of
# the corpus. Every parameter is trainable. `pretrain.pretrain` writes a JSON-lines
# log and `checkpoint.npz` into the run folder; if a finished run with the same model
# is already there (e.g. from `minilora pretrain` or an earlier run of this file) we
# load it instead of training again. The validation loss is measured by
# `strided_val_loss`, in which every counted character sees at least 64 characters
# of context: longer than any sentence, so a perfect model would score exactly H.

# %%
run_dir = os.path.join(RUNS, "pretrain")
params, mc, summary, tok = load_or_pretrain(config, run_dir)  # the model comes with its tokenizer
if summary is not None:
    print(f"pretrained {summary['steps']} steps in {summary['wall_s']:.0f} s")

# %% [markdown]
# The cell below measures the pretrained model on the validation text and compares
# it with the floor and the bigram.
#
# **What the full run gives.** In full mode (800 steps of this config; the demo's run
# of it, `benchmarks/results.json`, shown in `docs/demo.md`) the validation loss is
# 0.5353 nats/char against the floor's 0.5320 and the bigram's 1.6757. **In fast mode**
# (10 steps of a tiny model) it is still near 3.8, above the bigram: the model has
# barely started, and that is all the fast run can show.

# %%
val_data = tok.encode(val_text)
assert corpus.longest_sentence_length() <= mc.context_length // 2  # every counted char sees its whole sentence
val_loss = strided_val_loss(params, mc, val_data)
print(f"validation loss {val_loss:.4f} nats/char")
print(f"  entropy floor {H:.4f}  -> the model is {val_loss - H:.4f} nats/char above it")
print(f"  bigram        {bigram:.4f}")
assert val_loss > H - 0.02  # no model beats the floor (up to the sampling noise of a finite text)
if not FAST:
    assert val_loss < bigram  # the transformer has learned more than character pairs

# %% [markdown]
# ## Figure: the loss curve against the floor
#
# The gap between the curve and the dashed line is what the model has not learned.
# The log axis spreads out the region near the floor. The dotted line is the
# character bigram of the cell above.
#
# Look for a shoulder: after its first fast fall, the loss lingers near the bigram's
# level before falling again. The model first learns what a table of character pairs
# knows (spelling: which letter follows which), the easy statistics any position can
# use on its own. Only then does it learn to *use the context*, which takes attention
# heads that look back at earlier words (agreement, sentence structure), and the
# loss leaves the bigram behind. The cell prints the mean training loss over the
# shoulder (steps 50 to 100) beside the bigram's loss.

# %%
log = plot.read_log(os.path.join(run_dir, "log.jsonl"))
fig = plot.plot_loss_curves({"pretrain": log}, floor=H, logy=True,
                            title="Pretraining: loss falls from ln(96), pauses at the bigram, then nears the floor"
                            + NOTE)
ax = fig.axes[0]
ax.axhline(bigram, color="C3", linestyle=":", linewidth=1.4, label=f"character bigram ({bigram:.3f} nats/char)")
ax.legend(fontsize=8)
shoulder = [r["train_loss"] for r in log if "train_loss" in r and 50 < r["step"] <= 100]
if shoulder:
    print(f"mean training loss over steps 50-100: {np.mean(shoulder):.3f}   bigram: {bigram:.3f}")
if not FAST:
    assert abs(np.mean(shoulder) - bigram) < 0.15  # the shoulder sits at the bigram's level
path = os.path.join(FIGURES, "02_pretrain_loss.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Samples
#
# Text from the pretrained model (`sampling.decode`, temperature 1: sampling from
# the model's own distribution). A model at the floor would produce sentences of
# the grammar with the grammar's probabilities. The cell below samples sentences
# and counts how many parse under the grammar (`sentence_log_prob` raises on any
# sentence the grammar cannot produce). In full mode most do (the demo's pretrained
# model, the same config: 84% of 200 samples, `docs/demo.md`); in fast mode the
# samples are strings of random characters, and none parse.

# %%
rng = np.random.default_rng(1)
n_samples = 3 if FAST else 20
ok = 0
for i in range(n_samples):
    ids = decode(params, mc, [tok.encode("\n")], 60, temperature=1.0, rng=rng, stop_id=corpus.NEWLINE_ID)[0]
    text = tok.decode(ids)
    try:
        corpus.sentence_log_prob(text)
        ok += 1
        verdict = "grammatical"
    except ValueError:
        verdict = "NOT in the language"
    if i < 8:
        print(f"{text!r:50s} {verdict}")
print(f"{ok} of {n_samples} samples are sentences of the grammar")
if not FAST:
    assert ok >= n_samples // 2

# %% [markdown]
# This checkpoint is the W of phase 2. Tutorial 03 loads it and fine-tunes it on a
# task the model has never seen, first with every weight trainable, then with LoRA.

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to
# predict **before** running, and how to check. The solutions, which run and assert
# their answers, are on [their page](solutions/02_pretraining_solutions.py).
#
# ### Exercise 2.1 (compute): the unigram baseline
#
# A unigram model predicts every character from its overall frequency, ignoring all
# context. **Predict** where its validation loss falls on the line ln 96 ... bigram ...
# H before computing it. Then write it in three lines of NumPy: `np.bincount` of the
# training tokens, add-0.1 smoothing over the 96 characters (as `corpus.bigram_loss`
# does), and the mean -log p over `val_text[1:]`. Check ln 96 > unigram > bigram > H.
#
# ### Exercise 2.2 (predict, then check): temperature
#
# `sampling.decode(..., temperature=tau)` samples from softmax(logits / tau). Predict
# how the entropy of the next-character distribution after the prompt "\nthe red "
# changes from tau = 0.5 to 1 to 2, and whether that can depend on the model. Then
# compute it from `model.next_token_logits`. Second prediction: the fraction of 40
# samples that parse (`corpus.sentence_log_prob` raises on a non-sentence, as in the
# samples cell above) at tau = 0.5 and tau = 2. Check both.
#
# ### Exercise 2.3 (read the curve): where the loss pauses
#
# Before opening `figures/02_pretrain_loss.png`, predict: does the training loss fall
# smoothly from ln 96 to near H, or does it pause on the way, and at which of the
# levels you know (the unigram loss of exercise 2.1, the bigram loss, H)? Then read the
# log (`plot.read_log(os.path.join(RUNS, "pretrain", "log.jsonl"))`), smooth the
# train_loss over 5 steps, and count the steps it spends within 0.15 nats of the
# bigram loss and within 0.15 of the unigram loss. Explain the difference: what does a
# model know when its loss equals the bigram's, and which part of the network must
# learn before the loss can fall further?
#
# ### Exercise 2.4 (change a hyperparameter): the learning rate
#
# Pretrain a small model (`PretrainConfig.fast().model`: 1 block, C = 32) with
# `train.train` for 150 steps at peak learning rates 3e-4, 3e-3, 3e-2 and 3e-1 (same
# seed, same `WindowBatches`, `min_lr = lr / 10`, `warmup_steps=10`), and measure each
# with `strided_val_loss`. Predict the shape of final loss against learning rate
# before running. Check that it is a U: the middle beats both ends. Why does Adam
# overshoot at 3e-1, whatever the size of the gradient? (Hint: the first Adam step
# moves every weight by about lr.)
