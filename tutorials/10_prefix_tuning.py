# %% [markdown]
# # 10. Prefix tuning by hand: trainable keys and values in every layer
#
# Prompt tuning (tutorial 04) trains P vectors put before the input and nothing else. Study 4a
# (`benchmarks/studies/prompt/results.jsonl`) found that at this scale it does **not** learn the `subject` task:
# at every learning rate, prompt length and init tried, test exact match stayed near zero, while LoRA (r = 8 on
# q, k, v, o) tests 0.962 ± 0.050 after 600 steps in study 1 (3 seeds, `benchmarks/studies/forgetting/results.jsonl`).
# The seed says prompt tuning "tends to underperform on tasks that require deeper adaptation".
#
# The literature's answer is depth. **Prefix tuning** (Li & Liang 2021) and **P-tuning v2** (Liu et al.
# 2022) give every attention layer its own P trainable keys and values, put before that layer's real ones.
# A soft prompt can only steer layer 1 through its input, and its effect on every later layer passes through
# frozen weights; a prefix steers every layer's attention directly. Every weight of the model stays frozen.
#
# **Which variant.** Li and Liang do not train the prefix directly: they write it as an MLP of a smaller
# matrix, $P = \mathrm{MLP}(P')$, because updating $P$ directly "leads to unstable optimization and a slight
# drop in performance"; after training only $P$ is kept and the MLP is dropped. P-tuning v2 makes that
# reparametrisation optional, reporting that its usefulness depends on the task and the dataset.
# `minilora/methods/prefix.py` trains the keys and values **directly**, without the MLP (P-tuning v2's
# variant without reparametrisation), and so does everything below: what this tutorial and the studies find
# about prefix tuning is about the direct variant, not about Li and Liang's reparametrised one.
#
# This tutorial derives the attention with prefix columns and its backward, checks both, and runs prefix
# tuning against prompt tuning on `subject`. The code is `minilora/methods/prefix.py`; its tests are
# `tests/test_prefix.py`.
#
# **It fine-tunes tutorial 02's pretrained model**, saved in `runs/pretrain` (shared by tutorials 03 to 11).
# Run tutorial 02 first; if the model is missing, the first code cell pretrains it there and says so.

# %%
import os

import numpy as np

from minilora import gradcheck, model, ops, plot, studies, sweep
from minilora.backend import limit_blas_threads
from minilora.finetune import FinetuneConfig, finetune
from minilora.methods import prefix
from minilora.pretrain import PretrainConfig, load_or_pretrain

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)

base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                                 os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")

# %% [markdown]
# ## Why: what study 4a found
#
# The committed results of the prompt study, read as tutorial 06 reads them: the best test exact match any
# prompt setting reached on `subject`.

# %%
records = sweep.read_results(os.path.join(studies.committed_results_dir(), "prompt", "results.jsonl"))
best = max(records, key=lambda r: r["test_metric"])
print(f"{len(records)} prompt-tuning cells on 'subject'; the best test exact match: {best['test_metric']:.3f} "
      f"(P = {best['cell']['n_prompt']}, lr {best['cell']['lr']:g}, init {best['cell']['prompt_init']})")
assert best["test_metric"] < 0.1  # the failure this tutorial starts from

# %% [markdown]
# ## The attention with prefix columns
#
# In one layer and one head, with $q_t, k_u, v_u$ the real tokens' query, key and value ($t, u = 0..T-1$),
# and $p_j, w_j$ the prefix's key and value ($j = 1..P$), the scores have $P + T$ columns:
#
# $$s_{t,j} = \frac{q_t \cdot p_j}{\sqrt{hs}} \ \text{(every } j\text{)}, \qquad
#   s_{t,P+u} = \begin{cases} \dfrac{q_t \cdot k_u}{\sqrt{hs}} & u \le t \\ -\infty & u > t \end{cases}$$
#
# $$a_t = \operatorname{softmax}(s_t), \qquad
#   \text{out}_t = \sum_{j} a_{t,j}\, w_j + \sum_{u \le t} a_{t,P+u}\, v_u$$
#
# Three things follow, and each is checked below:
#
# - every real token attends to all P prefix positions: the prefix columns are never masked;
# - the causal mask applies among the real tokens only, so a later token still cannot reach an earlier one;
# - the real tokens keep their positions $0..T-1$: the prefix is not a token, it gets no position embedding,
#   and `model.forward` adds `wpe[:T]` exactly as in pretraining. (PEFT's prefix tuning differs here: it hands
#   the prefix to GPT-2 as `past_key_values`, and GPT-2 then numbers the real tokens $P..P+T-1$. That is a
#   different function, so `minilora export` refuses a prefix run.)
#
# The parameters are `h.{i}.attn.prefix_k` and `prefix_v`, each (P, C): the layout of `k` itself, head $h$ in
# columns $h \cdot hs .. (h+1) \cdot hs - 1$. Trainable count: $2 L P C$.
#
# The op computes the scores by blocks of queries, as plain causal attention does (`ops._causal_blocks`): a
# block $t_0..t_1-1$ computes its P prefix columns and the real columns up to $t_1$, and the mask goes on the
# real columns $t_0..t_1-1$ only. Below it is compared with a dense reference written the obvious way, one
# $(T, P + T)$ matrix per head, with blocks of 2 queries so the prefix joins several blocks.

# %%
B, T, C, NH, P = 2, 5, 8, 2, 3
hs = C // NH
q, k, v = (rng.standard_normal((B, T, C)) for _ in range(3))
pk, pv = rng.standard_normal((P, C)), rng.standard_normal((P, C))


def dense_reference(q, k, v, pk, pv):
    out = np.empty_like(q)
    mask = np.zeros((T, P + T))
    mask[:, P:][np.triu_indices(T, k=1)] = -np.inf  # the real columns' future; the prefix columns never
    for b in range(B):
        for h in range(NH):
            cols = slice(h * hs, (h + 1) * hs)
            keys, vals = np.concatenate([pk[:, cols], k[b, :, cols]]), np.concatenate([pv[:, cols], v[b, :, cols]])
            s = q[b, :, cols] @ keys.T / np.sqrt(hs) + mask
            a = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, :, cols] = a / a.sum(axis=1, keepdims=True) @ vals
    return out


saved_block = ops._CAUSAL_BLOCK
ops._CAUSAL_BLOCK = 2  # T = 5 in blocks of 2, 2 and 1 queries
out, cache = prefix.prefix_attention_forward(q, k, v, pk, pv, NH)
ops._CAUSAL_BLOCK = saved_block
err = np.abs(out - dense_reference(q, k, v, pk, pv)).max()
print(f"blocked op against the dense reference: max |difference| = {err:.1e}")
assert err < 1e-12
A = cache[3]  # the attention weights (B, NH, T, P + T)
assert (A[..., :P] > 0).all()  # every query attends to every prefix column
assert (A[..., P:][..., np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0).all()  # no real future

# %% [markdown]
# ## Its backward, derived
#
# Write $c$ for any of the $P + T$ columns, $\text{key}_c$ and $\text{val}_c$ for its key and value, and
# $d\text{out}_t$ for the gradient arriving at $\text{out}_t$. In the forward pass this was
# $\text{out}_t = \sum_c a_{t,c}\, \text{val}_c$, so
#
# $$da_{t,c} = d\text{out}_t \cdot \text{val}_c, \qquad d\text{val}_c \mathrel{+}= a_{t,c}\, d\text{out}_t .$$
#
# Then $a_t = \operatorname{softmax}(s_t)$ gives (tutorial 01)
#
# $$ds_{t,c} = a_{t,c}\,(da_{t,c} - D_t), \qquad D_t = \sum_c a_{t,c}\, da_{t,c} = d\text{out}_t \cdot \text{out}_t ,$$
#
# and $s_{t,c} = q_t \cdot \text{key}_c / \sqrt{hs}$ gives
# $dq_t = \sum_c ds_{t,c}\, \text{key}_c / \sqrt{hs}$ and $d\text{key}_c \mathrel{+}= ds_{t,c}\, q_t / \sqrt{hs}$.
# Split by the kind of column:
#
# $$dk_u = \sum_{t \ge u} \frac{ds_{t,P+u}\, q_t}{\sqrt{hs}}, \quad dv_u = \sum_{t \ge u} a_{t,P+u}\, d\text{out}_t,
#   \qquad dp_j = \sum_{b} \sum_{t} \frac{ds_{t,j}\, q_t}{\sqrt{hs}}, \quad dw_j = \sum_b \sum_t a_{t,j}\, d\text{out}_t .$$
#
# The real columns are masked ($a = 0$, so $ds = 0$, for $u > t$): only queries $t \ge u$ reach key $u$. The
# prefix columns are never masked, so every query of every sequence reaches every prefix vector, and the sum
# over $b$ is there because one prefix serves the whole batch. `prefix_attention_backward` writes these lines;
# with `input_grads=False` (the lowest layer, when only prefixes train) it forms only $dp$ and $dw$.
#
# The check: every coordinate of every input against centred finite differences, in float64.

# %%
results = prefix._op_checks(np.random.default_rng(1))
for r in results:
    print(f"d prefix_attention / d {r.argument:8s} {str(r.shape):10s} rel. error {r.error:.1e} ({r.method})")
assert all(r.passed and r.method == "full" for r in results)

# the whole model under prefix tuning, both heads, at a random non-degenerate float64 point
cfg, tiny = gradcheck.tiny_model(rng)
tiny = model.add_head(tiny, 3, seed=1)
tiny_params, tiny_cfg, tiny_trainable = prefix.PREFIX.gradcheck_setup(tiny, cfg, rng)
xt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
yt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
res = gradcheck.check_model("model: prefix, LM",
                            lambda p, tr: model.loss_and_grads(p, tiny_cfg, {"x": xt, "y": yt}, tr),
                            tiny_params, tiny_trainable, rng)
print(f"whole model: {len(res)} prefix tensors, worst rel. error {max(r.error for r in res):.1e}")
assert all(r.passed for r in res)

# %% [markdown]
# ## Positions and the mask, in the whole model
#
# Two claims of the maths, asserted on the pretrained model with a prefix: moving every position embedding
# from $T$ on changes nothing (a model that shifted the real tokens to $P..P+T-1$ would read them), and
# changing a later token changes no earlier output.

# %%
params, pc = prefix.add_prefix(base, mc, 8, seed=0)
ids = tok.encode("the red cat chases two mice.")[None, :]
Tn = ids.shape[1]
h, _ = model.forward(params, pc, ids)
moved = dict(params, wpe=params["wpe"].copy())
moved["wpe"][Tn:] += rng.standard_normal(moved["wpe"][Tn:].shape)  # random: LayerNorm would hide a constant
assert np.array_equal(model.forward(moved, pc, ids)[0], h)  # positions T.. are never read
changed = ids.copy()
changed[0, 10] = tok.encode("z")[0]
h2, _ = model.forward(params, pc, changed)
assert np.allclose(h2[:, :10], h[:, :10], rtol=0, atol=1e-6)  # no earlier output moves (float32)
assert not np.allclose(h2[:, 10], h[:, 10], rtol=0, atol=1e-3)  # the changed one does
print(f"prefix of 8: positions 0..{Tn - 1} kept, the causal mask holds; trainable 2 L P C = "
      f"2 x {mc.n_layers} x 8 x {mc.d_model} = {prefix.prefix_param_count(pc):,}")

# %% [markdown]
# ## A live run: prefix tuning against prompt tuning on `subject`
#
# The same task, the same steps, each method at its default learning rate. Prompt tuning gets P = 16 vectors
# (16 C numbers); prefix tuning P = 16 keys and values per layer ($2 L \cdot 16\, C$ numbers, 2L times more,
# since it has a key and a value in each of L layers).
#
# **What the full run gives.** In full mode (300 steps on 2,000 examples, the committed figure
# `figures/10_prefix_vs_prompt.png`) both losses fall from about 5.4 nats per response token; the prompt's
# levels off near 1.9 and the prefix's goes on to about 0.9, which the last assert checks (the prefix ends
# lower). Neither learns to answer exactly: in study 1, each at its own rate chosen on validation and after 600
# steps, prefix tuning tests 0.053 ± 0.025 and prompt tuning 0.012 ± 0.003 (3 seeds). **In fast mode** (the
# build the tests run) it is 4 steps on tiny data on a tiny model: both print `exact match 0.000 -> 0.000`
# and their curves lie on top of each other, which shows the run works and nothing about which method
# wins. The comparison at equal numbers of trained parameters is study 8 (`docs/studies/budget.md`,
# its records `benchmarks/studies/budget/results.jsonl`).

# %%
steps = 4 if FAST else 300
rows, logs = [], {}
for method in ("prompt", "prefix"):
    config = FinetuneConfig(method=method, task="subject", n_train=64 if FAST else 2000, n_test=16 if FAST else 200,
                            n_prompt=16, n_prefix=16)
    config.train.steps = steps
    config.train.warmup_steps = 1 if FAST else 20
    config.train.eval_every = steps
    run_dir = os.path.join(RUNS, f"10-finetune-subject-{method}")
    *_, summary = finetune(base, mc, tok, config, run_dir)
    rows.append(summary)
    logs[method] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
    print(f"[{method}] exact match {summary['metric_before']:.3f} -> {summary['metric']:.3f}; "
          f"{summary['trainable_params']:,} trainable; final train loss {summary['final_train_loss']:.3f}")
by = {r["method"]: r for r in rows}
assert by["prefix"]["trainable_params"] == 2 * mc.n_layers * by["prompt"]["trainable_params"]
if not FAST:
    # depth helps: a prefix in every layer fits the task better than a prompt before the input
    assert by["prefix"]["final_train_loss"] < by["prompt"]["final_train_loss"]

fig = plot.plot_loss_curves(logs, smooth=0.8, ylabel="training loss (nats per response token)",
                            title="'subject': a prefix in every layer against a prompt before the input" + NOTE)
path = os.path.join(FIGURES, "10_prefix_vs_prompt.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Exercises
#
# Each says what to do, what to predict **before** running, and how to check. The solutions, which run and
# assert their answers, are on [their page](solutions/10_prefix_tuning_solutions.py).
#
# ### Exercise 10.1 (compute by hand): equal parameters
#
# Prompt tuning with P vectors trains P C numbers; prefix tuning with P' positions trains 2 L P' C. For this
# tutorial's model, which P' gives exactly the trainable count of a 16-vector prompt? And which LoRA rank on
# q, k, v, o (8 L r C numbers, exercise 3.1) matches a prefix of P' = 16? Check both with
# `finetune.setup_strategy` and `model.count_params`.
#
# ### Exercise 10.2 (derive, then check): a zero prefix still changes the model
#
# With `prefix_k = 0` and `prefix_v = 0`, every prefix score is 0 and every prefix value is 0. Derive what
# the attention output becomes in terms of the plain causal attention's output $o_t$ and its scores: predict
# the factor that multiplies $o_t$. Check against `ops.attention_forward`. Why, then, does `add_prefix` not
# start from zeros, as LoRA starts from $B = 0$?
#
# ### Exercise 10.3 (implement): the prefix values' gradient from the cache
#
# From the cache of `prefix_attention_forward` (its fourth entry is the attention weights A, (B, NH, T,
# P + T)), write $dw_j = \sum_b \sum_t a_{t,j}\, d\text{out}_t$ yourself in one `einsum`, reshape it to (P, C),
# and compare with the op's `dprefix_v`. Then do the same for $dp_j$ (you will need $ds$: recompute it from A,
# the cached values and $d\text{out}$).
