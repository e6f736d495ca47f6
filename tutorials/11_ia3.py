# %% [markdown]
# # 11. IA3, by hand: three vectors per block
#
# LoRA adds a low-rank matrix beside a frozen W. IA3 (Liu et al. 2022, "(IA)$^3$":
# *Infused Adapter by Inhibiting and Amplifying Inner Activations*) goes further down
# in size: it trains **one vector per scaled activation** and multiplies. In every
# block of our GPT, three vectors, all ones at the start:
#
# $$k = l_k \odot (a W_k^\top), \qquad v = l_v \odot (a W_v^\top + b_v), \qquad
# r = (l_{ff} \odot g)\, W_{proj}^\top + b_{proj}$$
#
# with $l_k, l_v \in \mathbb{R}^C$ scaling the keys and the values, and
# $l_{ff} \in \mathbb{R}^F$ scaling the MLP's hidden activation $g = \mathrm{gelu}(\ldots)$,
# which is the input of `mlp.proj`. These are the paper's three vectors ($l_k$, $l_v$, $l_{ff}$),
# and minilora's. Every weight of the model stays frozen.
#
# **PEFT's IA3 is the same scaling on other modules.** PEFT scales a module's output, bias
# included ($l \odot (W x + b)$), or, for a "feedforward module", its input. Its default targets
# for GPT-2 (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` in `peft/utils/constants.py`) are
# `c_attn` and `mlp.c_proj`, the latter as the feedforward module. `c_attn` is GPT-2's fused q, k, v
# projection, so PEFT's default also scales the **queries**: $3C + F$ numbers per block,
# $L (3C + F)$ in all, where the paper and minilora train $L (2C + F)$. `minilora export` writes a
# minilora IA3 run in PEFT's layout with the queries' factors fixed at 1 (`peft_io.ia3_to_peft`:
# `c_attn` scaled by $[1; l_k; l_v]$), which computes the same function. An adapter PEFT trained
# with its default has query factors of its own: `Ia3Config(queries=True)` gives minilora's IA3 the
# vector $l_q$ too (the same output scaling, so the same backward), and a PEFT IA3 folder is read
# that way (`--adapter DIR`), and trains on.
#
# The code is `minilora/methods/ia3.py` (the derivation below is its docstring); the
# tests are `tests/test_ia3.py`. **This tutorial fine-tunes tutorial 02's pretrained
# model**, saved in `runs/pretrain`; if it is missing, the cell that loads it pretrains
# it there and says so.

# %%
import os

import numpy as np

from minilora import gradcheck, model, ops, plot
from minilora.backend import limit_blas_threads
from minilora.finetune import FinetuneConfig, finetune
from minilora.methods import ia3, lora
from minilora.pretrain import PretrainConfig, load_or_pretrain

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)

# %% [markdown]
# ## Counting: L (2C + F)
#
# Per block IA3 trains $2C + F$ numbers, so $L (2C + F)$ in all (PEFT's default for GPT-2,
# with the queries, $L (3C + F)$). LoRA with rank r on q, k, v, o trains
# $4 L r (C + C) = 8 L r C$. The cell below evaluates them for the tutorial's default model
# (C = 128, F = 512, L = 2) and for GPT-2 small's shapes (C = 768, F = 3072, L = 12).

# %%
for name, (C_, F_, L_) in {"default": (128, 512, 2), "GPT-2 small": (768, 3072, 12)}.items():
    n_ia3, n_lora = L_ * (2 * C_ + F_), 8 * L_ * 8 * C_
    n_peft = L_ * (3 * C_ + F_)  # PEFT's default for GPT-2: c_attn (q, k and v) and mlp.c_proj
    print(f"{name:12s} IA3 L (2C + F) = {n_ia3:>7,} (PEFT's GPT-2 default L (3C + F) = {n_peft:>7,})   "
          f"LoRA r = 8 on q, k, v, o: {n_lora:>8,}   ratio {n_lora / n_ia3:.1f}")
    assert n_ia3 < n_lora / 10 and n_peft - n_ia3 == L_ * C_  # the queries' vectors: C per block
assert (2 * (2 * 128 + 512), 12 * (2 * 768 + 3072)) == (1_536, 55_296)

# %% [markdown]
# ## The two scaled linears: forward
#
# Both sit around a frozen linear $y = x W^\top + b$ and differ in where the vector
# multiplies:
#
# - **output scaling** (k, v): $y = l \odot z$ with $z = x W^\top + b$, $l \in \mathbb{R}^{out}$;
# - **input scaling** (proj): $y = u W^\top + b$ with $u = l \odot x$, $l \in \mathbb{R}^{in}$.
#
# The cell below checks `ia3.ia3_output_forward` and `ia3.ia3_input_forward` against
# these formulas, checks that with $l = 1$ each is exactly the plain linear, and shows
# that the bias matters: $l \odot (x W^\top + b)$ is not $l \odot (x W^\top) + b$.

# %%
N, d_in, d_out = 10, 8, 6
x = rng.standard_normal((N, d_in))
W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
l_out, l_in = 1.0 + 0.5 * rng.standard_normal(d_out), 1.0 + 0.5 * rng.standard_normal(d_in)
y_out, cache_out = ia3.ia3_output_forward(x, W, b, l_out)
y_in, cache_in = ia3.ia3_input_forward(x, W, b, l_in)
assert np.allclose(y_out, l_out * (x @ W.T + b)) and np.allclose(y_in, (l_in * x) @ W.T + b)
plain = ops.linear_forward(x, W, b)[0]
assert np.array_equal(ia3.ia3_output_forward(x, W, b, np.ones(d_out))[0], plain)
assert np.array_equal(ia3.ia3_input_forward(x, W, b, np.ones(d_in))[0], plain)
bias_gap = np.abs(y_out - (l_out * (x @ W.T) + b)).max()
print(f"l = 1 gives the plain linear exactly; scaling the bias or not differs by up to {bias_gap:.2f}")
assert bias_gap > 0.1

# %% [markdown]
# ## The backward, derived
#
# **Output scaling.** $y_{nj} = l_j z_{nj}$. With $dy = \partial L / \partial y$ (N, out),
# each $l_j$ touches column j of every row, so its gradient sums over the tokens:
#
# $$
# \begin{aligned}
# dl_j &= \sum_n dy_{nj}\, z_{nj} && dl = \textstyle\sum_n dy \odot z \quad (out,) \\
# dz &= dy \odot l && (N, out),\ l \text{ broadcast along each row} \\
# dx &= dz\, W && (N, in),\ \text{the frozen linear's } dx
# \end{aligned}
# $$
#
# **Input scaling.** $y = u W^\top + b$ with $u_{ni} = l_i x_{ni}$:
#
# $$
# \begin{aligned}
# du &= dy\, W && (N, in),\ \text{the frozen linear's } dx \\
# dl_i &= \sum_n du_{ni}\, x_{ni} && dl = \textstyle\sum_n du \odot x \quad (in,) \\
# dx &= du \odot l && (N, in)
# \end{aligned}
# $$
#
# There is no $dW$ and no product of W's shape: $dl$ is an elementwise product summed
# over N. The forward of the output scaling keeps $z$ (dl reads it), the input
# scaling keeps $x$. The cell below writes the six lines in NumPy and compares them
# with the library's backwards.

# %%
dy = rng.standard_normal((N, d_out))
z = x @ W.T + b
dl_out_hand, dx_out_hand = (dy * z).sum(axis=0), (dy * l_out) @ W
du = dy @ W
dl_in_hand, dx_in_hand = (du * x).sum(axis=0), du * l_in
dx_out, dl_out = ia3.ia3_output_backward(dy, cache_out)
dx_in, dl_in = ia3.ia3_input_backward(dy, cache_in)
for name, hand, lib in (("output dl", dl_out_hand, dl_out), ("output dx", dx_out_hand, dx_out),
                        ("input dl", dl_in_hand, dl_in), ("input dx", dx_in_hand, dx_in)):
    print(f"{name:10s} {str(hand.shape):8s} by hand vs library: max |diff| = {np.abs(hand - lib).max():.1e}")
    assert np.allclose(hand, lib)

# %% [markdown]
# ## The gradient checks
#
# Every coordinate of x and l against finite differences in float64, for both pairs
# (`gradcheck.check_op`, the check `minilora gradcheck` runs), and then the whole IA3
# model: a tiny GPT at a random point, its vectors away from ones, both heads.

# %%
for op, forward, backward, l in (("ia3_output", ia3.ia3_output_forward, ia3.ia3_output_backward, l_out),
                                 ("ia3_input", ia3.ia3_input_forward, ia3.ia3_input_backward, l_in)):
    for res in gradcheck.check_op(op, forward, backward, {"x": x, "W": W, "b": b, "l": l.copy()},
                                  {"x": 0, "l": 1}, rng):
        print(f"{op:10s} d/d{res.argument}  rel error {res.error:.2e} ({res.method})")
        assert res.passed
cfg, base64 = gradcheck.tiny_model(rng)
scaled64, cfg64, names64 = ia3.IA3.gradcheck_setup(base64, cfg, rng)
xt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
yt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
results = gradcheck.check_model("IA3 model", lambda p, tr: model.loss_and_grads(p, cfg64, {"x": xt, "y": yt}, tr),
                                scaled64, names64, rng)
print(f"{len(results)} vectors checked in the whole model, worst rel error {max(r.error for r in results):.1e}")
assert all(r.passed for r in results) and len(results) == 3 * cfg.n_layers

# %% [markdown]
# ## The pretrained model, scaled by ones
#
# Load tutorial 02's model, add the vectors, and check that the model is exactly the
# base (ones change nothing, bit for bit) and that a step forms no dW: the cell counts
# the calls of `ops.linear_backward` that form a weight gradient during one IA3 step.

# %%
base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                                 os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")
scaled, smc = ia3.add_ia3(base, mc)  # smc: mc with .lora = Ia3Config()
names = lora.adapter_names(smc)
for n in names[:3]:
    print(f"{n:22s} {scaled[n].shape}")
ids = tok.encode("the red cat chases two mice.\nmy dog ")[None, :]
assert np.array_equal(model.next_token_logits(scaled, smc, ids), model.next_token_logits(base, mc, ids))
original_linear_backward, dW_products = ops.linear_backward, []


def counting_linear_backward(dout, cache, param_grads=True, **options):
    if param_grads:
        dW_products.append(cache[1].shape)
    return original_linear_backward(dout, cache, param_grads, **options)


ops.linear_backward = counting_linear_backward
try:
    _, grads = model.loss_and_grads(scaled, smc, {"x": ids[:, :-1], "y": ids[:, 1:]}, set(names))
finally:
    ops.linear_backward = original_linear_backward
print(f"at ones the model is the base exactly; one step: {len(grads)} gradients, {len(dW_products)} dW products")
assert set(grads) == set(names) and not dW_products

# %% [markdown]
# ## A live run: IA3 against LoRA on "subject"
#
# The same task, steps and data for both, each at its default learning rate: LoRA at
# 3e-3 (study 1's choice for it), IA3 at 3e-2. IA3 wants larger rates than LoRA: its
# vectors start at 1 and an Adam step moves each factor by about lr, a relative change
# of lr. Study 1 (`benchmarks/studies/forgetting/results.jsonl`) chose 1e-1 for IA3 on
# validation, the largest rate of its grid (`Method.study_lrs`, 3e-3 to 1e-1), so its best
# rate may lie higher still; there, after 600 steps, IA3 tests 0.742 ± 0.175 and LoRA
# 0.962 ± 0.050 (3 seeds). Each run prints its parameter report, with IA3's formula.
#
# **What the full run gives.** In full mode (300 steps on 2,000 examples, the committed
# figure `figures/11_ia3_vs_lora_loss.png`) both training losses fall from about 5.2 nats
# per token to below 1 within 60 steps, LoRA's a little faster and lower (about 0.45
# against 0.55 at step 300), IA3 with a tenth of the trained numbers. **In fast mode**
# (4 steps, tiny data and model) both print `exact match 0.000 -> 0.000` and their curves
# barely move: the run works, and says nothing about what either method learns.

# %%
steps = 4 if FAST else 300
summaries, logs, finetuned = {}, {}, {}
for method in ("lora", "ia3"):
    config = FinetuneConfig(method=method, task="subject", n_train=64 if FAST else 2000, n_test=8 if FAST else 150)
    config.train.steps, config.train.warmup_steps, config.train.eval_every = steps, 1 if FAST else 20, steps
    run_dir = os.path.join(RUNS, f"11-finetune-subject-{method}")
    params, ft_config, trainable, summary = finetune(base, mc, tok, config, run_dir)
    summaries[method], finetuned[method] = summary, (params, ft_config)
    logs[f"{method} ({summary['trainable_params']:,} trained)"] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
    print(summary["report"])
    print(f"[{method}] lr {config.train.lr:g}: exact match {summary['metric_before']:.3f} -> {summary['metric']:.3f}, "
          f"final train loss {summary['final_train_loss']:.3f}, {summary['wall_s']:.0f} s")
assert summaries["ia3"]["trainable_params"] == mc.n_layers * (2 * mc.d_model + mc.d_ff)
if not FAST:
    ia3_log = logs[next(k for k in logs if k.startswith("ia3"))]
    first = next(r["train_loss"] for r in ia3_log if "train_loss" in r)
    assert summaries["ia3"]["final_train_loss"] < first  # the vectors alone lower the task loss

# %% [markdown]
# ## Merge: rows and columns of W
#
# The scaling folds into the frozen weights, since
#
# $$l \odot (x W^\top + b) = x\, (\mathrm{diag}(l)\, W)^\top + l \odot b, \qquad
# (l \odot x)\, W^\top + b = x\, (W\, \mathrm{diag}(l))^\top + b.$$
#
# So `ia3.merge` scales **the rows** of k.W and v.W (and v's bias) by $l_k$, $l_v$, and
# **the columns** of proj.W by $l_{ff}$, and the merged model is a plain model that
# costs exactly what the base costs. The cell below checks both scalings and that the
# merged model gives the same logits.

# %%
trained, tmc = finetuned["ia3"]
merged, merged_mc = ia3.merge(trained, tmc)
p = "h.0."
assert np.array_equal(merged[p + "attn.v.W"], trained[p + "attn.v.ia3_l"][:, None] * trained[p + "attn.v.W"])
assert np.array_equal(merged[p + "attn.v.b"], trained[p + "attn.v.ia3_l"] * trained[p + "attn.v.b"])
assert np.array_equal(merged[p + "mlp.proj.W"], trained[p + "mlp.proj.W"] * trained[p + "mlp.proj.ia3_l"])
gap = np.abs(model.next_token_logits(merged, merged_mc, ids) - model.next_token_logits(trained, tmc, ids)).max()
print(f"merged: no vectors left ({merged_mc.lora}), max |logits merged - scaled| = {gap:.1e} (float32)")
assert merged_mc.lora is None and gap < 1e-4

# %% [markdown]
# ## Figure: the loss curves
#
# The training loss on the response tokens for both methods, with the number of
# numbers each trains in the legend.

# %%
fig = plot.plot_loss_curves(logs, smooth=0.8, title="Fine-tuning loss on 'subject': IA3 (3 vectors per block) "
                                                      "vs LoRA (r=8 on q,k,v,o)" + NOTE)
path = os.path.join(FIGURES, "11_ia3_vs_lora_loss.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". The solutions, which run and assert
# their answers, are on [their page](solutions/11_ia3_solutions.py).
#
# ### Exercise 11.1 (compute by hand): IA3 at 7B
#
# A LLaMA-7B-shaped model has C = 4096, F = 11008 and L = 32 blocks. Compute on paper
# IA3's trainable count L (2C + F), LoRA's with r = 8 on q and v only (the original
# LoRA paper's choice), and AdamW's state for each (two float32 moments per trained
# number). How many times smaller is IA3? Check the tutorial model's count against
# `model.count_params(scaled, lora.adapter_names(smc))`.
#
# ### Exercise 11.2 (predict, then check): the bias in the merge
#
# The value projection has a bias. Predict what the merged model gets wrong if you
# scale only the rows of v.W and leave v.b as it was, and whether the key needs the
# same care. Then check: write that wrong merge, and compare its logits with the
# scaled model's, next to `ia3.merge`'s.
#
# ### Exercise 11.3 (derive and implement): unmerge
#
# Derive W from the merged W' and the vectors (rows for k, v, columns for proj), write
# `my_unmerge(merged, merged_config, vectors, scaled_config)` that returns the scaled
# model again, and check that it gives back the base weights to float32 rounding.
# Then set one entry of l_v to 0 before merging: what is lost, and why does PEFT's
# IA3 unmerge warn that it "can be inaccurate"?
