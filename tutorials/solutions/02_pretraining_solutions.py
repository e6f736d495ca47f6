# %% [markdown]
# # 02. Pretraining: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/02_pretraining.py` and
# asserts the answer. The pretrained model comes from the shared place the tutorials
# use, `$MINILORA_RUNS/pretrain` (pretrained there now if tutorial 02 has not run).
# With MINILORA_FAST=1 everything is tiny: the claims that need a real model are
# asserted only in full mode (`if not FAST`), and fast mode asserts what holds at
# any size.

# %%
import os

import numpy as np
from matplotlib.figure import Figure

from minilora import corpus, plot
from minilora.evaluation import strided_val_loss
from minilora.model import init_params, next_token_logits
from minilora.pretrain import PretrainConfig, WindowBatches, load_or_pretrain, pretrain_data
from minilora.sampling import decode
from minilora.train import TrainConfig, train
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""
RUNS = os.environ.get("MINILORA_RUNS", "runs")
config = PretrainConfig.fast() if FAST else PretrainConfig()
params, mc, _, tok = load_or_pretrain(config, os.path.join(RUNS, "pretrain"))
train_text, val_text = corpus.train_val_text(config.n_train_sentences, config.n_val_sentences, config.data_seed)
H = corpus.entropy_per_char()

# %% [markdown]
# ## Exercise 2.1: the unigram baseline
#
# A unigram model ignores all context: P(c) from the character counts. It knows that
# spaces and vowels are common and nothing else, so it must land between the uniform
# guess and the bigram:
#
#     ln 96 > unigram > bigram > H.
#
# Same add-k smoothing as `corpus.bigram_loss`, so the comparison is fair.

# %%
V = tok.vocab_size
train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
counts = np.bincount(train_ids, minlength=V).astype(np.float64)
p_unigram = (counts + 0.1) / (counts.sum() + 0.1 * V)
unigram = float(-np.log(p_unigram[val_ids[1:]]).mean())  # the same val_text[1:] predictions bigram_loss scores
bigram = corpus.bigram_loss(train_text, val_text)
print(f"ln 96 {np.log(96):.4f} > unigram {unigram:.4f} > bigram {bigram:.4f} > floor H {H:.4f}")
assert np.log(96) > unigram > bigram > H

# %% [markdown]
# ## Exercise 2.2: temperature
#
# Sampling at temperature tau draws from softmax(logits / tau). tau < 1 sharpens the
# distribution (lower entropy), tau > 1 flattens it (higher entropy), for any logits
# that are not all equal: so the entropy rises with tau **whatever the model**, and
# that is asserted in both modes. With a real model, a flatter distribution picks
# more characters the grammar forbids, so fewer samples parse at tau = 2 than at
# tau = 0.5 (asserted in full mode).

# %%
def entropy_at(logits, tau):
    z = logits / tau
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return float(-(p * np.log(np.maximum(p, 1e-300))).sum(-1).mean())


logits = next_token_logits(params, mc, tok.encode("\nthe red ")[None, :]).astype(np.float64)
taus = (0.5, 1.0, 2.0)
entropies = [entropy_at(logits, t) for t in taus]
print("entropy of the next character after 'the red ' at tau = 0.5, 1, 2:", np.round(entropies, 3))
assert entropies[0] < entropies[1] < entropies[2]


def grammatical_fraction(tau, n):
    rng = np.random.default_rng(2)
    outs = decode(params, mc, [tok.encode("\n")] * n, 60, temperature=tau, rng=rng, stop_id=corpus.NEWLINE_ID)
    ok = 0
    for ids in outs:
        try:
            corpus.sentence_log_prob(tok.decode(ids))
            ok += 1
        except ValueError:
            pass
    return ok / n


n = 4 if FAST else 40
fractions = {tau: grammatical_fraction(tau, n) for tau in (0.5, 2.0)}
print("fraction of samples that parse:", fractions)
if not FAST:
    assert fractions[0.5] > fractions[2.0]

# %% [markdown]
# ## Exercise 2.3: where the loss pauses
#
# The loss starts at ln 96 = 4.56 (the uniform guess, tutorial 02 checked it at
# init) and falls fast. It passes the unigram level (about 2.9) in a few steps, then
# **pauses near the bigram loss** (about 1.7 nats) for some tens of steps before
# falling again toward H. The usual reading: the model has learned which character
# follows which (a bigram's knowledge, which needs no attention at all: the residual
# path from a token's embedding to the head suffices), and it takes a while before
# attention learns to look further back (the word so far, the subject's number for
# agreement). The check below measures the pause; it does not prove the reading (a
# probe of attention at checkpoints around step 50 would).
#
# The check: the smoothed training loss spends many more steps within +-0.15 nats
# of the bigram loss than within +-0.15 of the unigram loss, a level it only passes
# through. Fast mode trains 10 steps: it only shows the start at ln 96.

# %%
log = plot.read_log(os.path.join(RUNS, "pretrain", "log.jsonl"))
losses = np.array([r["train_loss"] for r in log if "train_loss" in r])
print(f"first step {losses[0]:.3f} (ln 96 = {np.log(96):.3f}), last {losses[-1]:.3f}, bigram {bigram:.3f}")
assert abs(losses[0] - np.log(96)) < 0.1 and losses[-1] < losses[0]
if not FAST:
    smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
    near_bigram = int(np.sum(np.abs(smooth - bigram) < 0.15))
    near_unigram = int(np.sum(np.abs(smooth - unigram) < 0.15))
    print(f"steps within 0.15 of the bigram loss: {near_bigram}; of the unigram loss: {near_unigram}")
    assert near_bigram >= 3 * max(near_unigram, 1)

# %% [markdown]
# ## Exercise 2.4: the learning rate of pretraining
#
# A small model (the fast config's: 1 block, C = 32), the same batches, four peak
# learning rates. The expected picture is a U: 3e-4 is too timid to get anywhere in a
# short run, 3e-1 overshoots (Adam's steps are about lr in every coordinate, far too
# big for weights of size ~0.1) and stalls high, and the best is in between. Fast mode
# asserts only that 3e-3 beats 3e-4 after a few steps; full mode asserts the U. The
# figure draws the unigram and bigram losses of exercise 2.1 for reference: a run
# stuck near the unigram line predicts characters by frequency alone.

# %%
small = PretrainConfig.fast()
small.n_train_sentences = 500 if FAST else 5000
train_data, val_data, *_ = pretrain_data(small)
steps = 20 if FAST else 150
lrs = [3e-4, 3e-3] if FAST else [3e-4, 3e-3, 3e-2, 3e-1]
curves, finals = {}, {}
for lr in lrs:
    p = init_params(small.model, 0)
    history, _ = train(p, list(p), small.model, WindowBatches(train_data, 8, small.model.context_length),
                       TrainConfig(steps=steps, batch_size=8, lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 2),
                                   eval_every=steps, checkpoint_seconds=0))
    curves[lr] = [r["train_loss"] for r in history]
    finals[lr] = strided_val_loss(p, small.model, val_data)
    print(f"lr {lr:g}: validation loss after {steps} steps {finals[lr]:.3f}")
assert finals[3e-3] < finals[3e-4]
if not FAST:
    assert finals[3e-3] < finals[3e-1]  # too large is worse, too: a U
    assert min(finals, key=finals.get) in (3e-3, 3e-2)

fig = Figure(figsize=(7, 4.5), layout="constrained")
ax = fig.add_subplot()
for lr, c in curves.items():
    ax.plot(c, label=f"lr {lr:g} (val {finals[lr]:.2f})")
ax.axhline(np.log(96), color="0.6", linestyle=":", label="ln 96")
ax.axhline(unigram, color="0.3", linestyle="--", linewidth=0.8, label=f"unigram loss {unigram:.2f} (exercise 2.1)")
ax.axhline(bigram, color="0.3", linestyle="-.", linewidth=0.8, label=f"bigram loss {bigram:.2f}")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats per character)")
ax.set_title(f"Pretraining a 1-block model: too small and too large a learning rate both lose{NOTE}", fontsize=9)
ax.legend(fontsize=8)
ax.grid(True, alpha=0.3)
path = os.path.join(FIGURES, "02_solutions_learning_rate.png")
plot.save_figure(fig, path)
print("wrote", path)
