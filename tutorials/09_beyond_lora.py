# %% [markdown]
# # 09. Beyond LoRA: QLoRA's 4-bit base and DoRA, by hand
#
# LoRA (tutorial 03) freezes W and trains $s B A$ beside it. Two later methods change what sits
# around that update, and both are in PEFT:
#
# - **QLoRA** (Dettmers et al. 2023) keeps LoRA exactly, but stores the frozen W in 4 bits, as
#   NF4 codes with blockwise scales. The frozen base is most of the memory (tutorial 05), so this is
#   how a 7B model is fine-tuned on one small GPU. The adapter is trained on the *dequantized*
#   weights; nothing ever computes a gradient for W.
# - **DoRA** (Liu et al. 2024) keeps LoRA's $B A$ but splits the adapted weight into a length and
#   a direction per output row, and trains the length $m$ too.
#
# This tutorial derives both from their definitions, checks each line against
# `minilora/methods/nf4.py`, `qlora.py` and `dora.py`, and checks every gradient against finite
# differences in float64. Like tutorials 03 to 11 it loads tutorial 02's model from `runs/pretrain`
# (or pretrains it there now, and says so).

# %%
import math
import os

import numpy as np
from matplotlib.figure import Figure

from minilora import corpus, gradcheck, model, plot
from minilora.backend import limit_blas_threads
from minilora.finetune import FinetuneConfig, finetune
from minilora.methods import dora, lora, nf4, qlora
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
# ## Part 1. NF4: sixteen levels from the normal distribution
#
# A 4-bit code has 16 values. Uniform int4 spaces them evenly in $[-1, 1]$. But a pretrained
# weight matrix is close to normal around zero, so most weights sit near 0, where evenly spaced
# levels are as sparse as in the tails. NF4 puts the levels at **quantiles** of $N(0, 1)$, so each
# level covers about the same share of weights.
#
# The paper's construction (appendix E, and bitsandbytes' `create_normal_map`) is asymmetric so
# that 0 is a level exactly: 8 positive levels, 7 negative ones and a zero. With the offset
# $\delta = 0.9677083$ (the quantile of 1 itself is infinite, so the top level needs a probability
# below 1) and $\Phi^{-1}$ the inverse normal CDF:
#
# $$q^+_i = \Phi^{-1}\!\left(\delta - (\delta - \tfrac12)\,\tfrac{i}{8}\right),\ i = 0..7, \qquad
#   q^-_j = -\Phi^{-1}\!\left(\delta - (\delta - \tfrac12)\,\tfrac{j}{7}\right),\ j = 0..6,$$
#
# $$\text{levels} = \operatorname{sort}(q^- \cup \{0\} \cup q^+) \,/\, \Phi^{-1}(\delta)
#   \quad\in [-1, 1].$$
#
# The cell below computes them with `nf4.normal_quantile` (bisection on `math.erfc`), and compares
# them with `nf4.nf4_levels()` and with the paper's table (`nf4.PAPER_NF4_LEVELS`, float32 numbers).

# %%
delta = nf4.NF4_OFFSET
q_pos = [nf4.normal_quantile(delta - (delta - 0.5) * i / 8) for i in range(8)]  # q+_i
q_neg = [-nf4.normal_quantile(delta - (delta - 0.5) * j / 7) for j in range(7)]  # q-_j
levels = np.array(sorted(q_neg + [0.0] + q_pos)) / nf4.normal_quantile(delta)  # sort(...) / Phi^-1(delta)
paper = np.array(nf4.PAPER_NF4_LEVELS)
print("NF4 levels:", np.array2string(levels, precision=4, max_line_width=100))
print(f"max |ours - paper's table| = {np.abs(levels - paper).max():.1e} (the table is float32)")
assert np.array_equal(levels, nf4.nf4_levels())
assert np.abs(levels - paper).max() < 2e-7  # float32 rounding of the published numbers
assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7 and (levels == 0).sum() == 1

# %% [markdown]
# ## Part 2. Quantize and dequantize one matrix of the pretrained model
#
# **Blockwise absmax.** W is flattened row by row and cut into blocks of 64 weights. Each block
# $j$ is divided by its absolute maximum, so it lies in $[-1, 1]$, and each weight is stored as the
# index of its nearest level:
#
# $$a_j = \max_{i \in j} |w_i|, \qquad c_i = \arg\min_k \left|\text{levels}_k - w_i / a_j\right|,
#   \qquad \hat w_i = \text{levels}_{c_i}\, a_j .$$
#
# One outlier only costs its own block's resolution. Since the nearest level is at most half a gap
# away, every weight's error is bounded by its block's scale:
#
# $$|w_i - \hat w_i| \le \tfrac12 \max_k (\text{levels}_{k+1} - \text{levels}_k)\; a_j .$$
#
# The cell below does this by hand on block 0's MLP matrix `h.0.mlp.fc.W` (the nearest level by
# `argmin` over all 16), checks it against `nf4.quantize_blockwise`, and checks the bound.

# %%
W = base["h.0.mlp.fc.W"].astype(np.float64)  # (F, C), the pretrained weights
blocks = W.reshape(-1, 64)  # (n_blocks, 64): W.ravel() in blocks of 64
absmax = np.abs(blocks).max(axis=1)  # a_j
codes = np.abs(levels[None, None, :] - (blocks / absmax[:, None])[..., None]).argmin(axis=-1)  # c_i
W_hat = (levels[codes] * absmax[:, None]).reshape(W.shape)  # levels[c_i] a_j
codes_lib, absmax_lib = nf4.quantize_blockwise(W, levels, 64)
assert np.array_equal(codes.ravel(), codes_lib) and np.allclose(absmax, absmax_lib, rtol=1e-7)
half_gap = np.diff(levels).max() / 2
err = np.abs(W - W_hat).reshape(-1, 64)
print(f"{W.shape} = {W.size:,} weights in {blocks.shape[0]} blocks; worst |w - w_hat| / a_j = "
      f"{(err / absmax[:, None]).max():.3f} <= half the largest gap {half_gap:.3f}")
assert np.all(err <= half_gap * absmax[:, None] + 1e-12)

# %% [markdown]
# **NF4 against uniform int4.** QLoRA's argument for NF4 is information-theoretic, not an error
# on real weights: NF4 is a *quantile* quantizer, built so that each of its 16 bins receives the same
# expected number of values from a normal distribution, which the paper calls information-theoretically
# optimal for normally distributed weights (pretrained weights being close to normal). Equal counts
# mean every code is used equally often, so the 4 bits carry close to 4 bits of information (the
# entropy of the codes). The paper then compares the data types (NF4, FP4, Int4) by what the
# quantized models do: their perplexity and zero-shot accuracy, on models of 125M parameters and up.
#
# Neither of those can be computed here, so the cell below measures both things a small model
# allows, on the same matrix, for NF4 and for the 15 evenly spaced levels $k / 7$, $k = -7..7$
# (`nf4.int4_levels()`) at the same block size: the paper's quantity, the entropy of the codes
# $H = -\sum_k p_k \log_2 p_k$ with $p_k$ the share of weights given level $k$ (4 bits at most,
# $\log_2 15 = 3.91$ for int4), and a proxy that is not the paper's, the relative reconstruction
# error $\|W - \hat W\|_F / \|W\|_F$. (Equal expected counts are not the least squared error: the
# levels with the least squared error for a normal distribution, Lloyd and Max's, give the tails' bins
# fewer values. Exercise 9.2 asks when int4's error is the lower one.)

# %%
rel, entropy = {}, {}
for name, lv in (("NF4", levels), ("int4", nf4.int4_levels())):
    c, a = nf4.quantize_blockwise(W, lv, 64)
    share = np.bincount(c, minlength=lv.size) / c.size  # p_k: how often each level is used
    entropy[name] = float(-(share[share > 0] * np.log2(share[share > 0])).sum())
    rel[name] = np.linalg.norm(nf4.dequantize_blockwise(c, a, lv, 64) - W.ravel()) / np.linalg.norm(W)
    print(f"{name:5s} entropy of the codes {entropy[name]:.3f} bits (of {np.log2(lv.size):.3f}); "
          f"relative error {rel[name]:.4f}")
assert entropy["NF4"] > entropy["int4"]  # the codes carry more information: the paper's aim
assert rel["NF4"] < rel["int4"]

# %% [markdown]
# **Double quantization.** One float32 absmax per 64 weights is $32 / 64 = 0.5$ bits per weight,
# an eighth of the 4 bits themselves. QLoRA quantizes the absmax constants too: they are all
# positive, so their mean $\mu$ is subtracted first, then each block of 256 of them is stored as
# int8 with one float32 scale of its own:
#
# $$c_j = a_j - \mu, \qquad s_J = \max_{j \in J} |c_j|, \qquad
#   q_j = \operatorname{round}(127\, c_j / s_J), \qquad \hat a_j = \mu + q_j s_J / 127 .$$
#
# (The paper stores the absmax as 8-bit floats; we use linear int8, whose error is at most half a
# step, $s_J / 254$. `nf4.py`'s docstring says why.) The stored bits per weight are then
#
# $$4 + \frac{8}{64} + \frac{32}{64 \cdot 256} \approx 4.127,$$
#
# plus one float32 $\mu$ per matrix. The cell below writes the double quantization by hand,
# checks it against `nf4.quantize_absmax`, packs two codes per byte, and counts the bytes that
# `nf4.quantize_nf4` stores.

# %%
a32 = absmax_lib.astype(np.float64)  # the float32 absmax, as stored before double quantization
mu = np.float32(a32.mean())
centred = a32 - np.float64(mu)  # c_j
n_J = -(-centred.size // 256)  # ceil: the last block of 256 may be shorter
s_J = np.array([np.abs(centred[J * 256:(J + 1) * 256]).max() for J in range(n_J)], dtype=np.float32)
q_hand = np.rint(127 * centred / np.repeat(s_J.astype(np.float64), 256)[:centred.size]).astype(np.int8)
q_lib, s_lib, mu_lib = nf4.quantize_absmax(absmax_lib)
assert np.array_equal(q_hand, q_lib) and np.array_equal(s_J, s_lib) and mu == mu_lib
a_hat = nf4.dequantize_absmax(q_lib, s_lib, mu_lib)  # mu + q s_J / 127
print(f"{a32.size} absmax constants in {n_J} block(s) of 256: worst |a - a_hat| = {np.abs(a_hat - a32).max():.2e} "
      f"<= s_J / 254 = {s_J.max() / 254:.2e}")
assert np.all(np.abs(a_hat - a32) <= np.repeat(s_J, 256)[:a32.size] / 254 + 1e-6 * a32)  # + float32 rounding

packed = nf4.pack_codes(codes_lib)  # byte = c_{2i} << 4 | c_{2i+1}
assert packed.size == W.size // 2 and np.array_equal(nf4.unpack_codes(packed), codes_lib)
record = nf4.quantize_nf4(W.astype(np.float32))
bits = nf4.stored_bits_per_param(record, W.size)
formula = 4 + 8 / 64 + 32 * n_J / W.size + 32 / W.size  # codes + absmax_q + scales s_J + mu
for field in nf4.NF4_FIELDS:
    print(f"  {field:13s} {record[field].dtype} {record[field].shape}")
print(f"stored: {bits:.4f} bits per weight (formula {formula:.4f}; the paper's 4.127 for large matrices); "
      f"float32: 32")
assert math.isclose(bits, formula) and 4.127 <= bits <= 4.2
W_deq = nf4.dequantize_nf4(record, W.shape)
print(f"with double quantization: relative error {np.linalg.norm(W_deq - W) / np.linalg.norm(W):.4f}")

# %% [markdown]
# **Figure.** The pretrained weights, each divided by its block's absmax, with the 16 NF4 levels
# and the 15 int4 levels. The NF4 levels are dense where the weights are.

# %%
fig = Figure(figsize=(8, 3.6), layout="constrained")
ax = fig.subplots()
ax.hist((blocks / absmax[:, None]).ravel(), bins=120, color="0.7", label="h.0.mlp.fc.W / block absmax")
for k, lv in enumerate(levels):
    ax.axvline(lv, color="C3", linewidth=1.0, label="NF4 levels (16)" if k == 0 else None)
for k, lv in enumerate(nf4.int4_levels()):
    ax.axvline(lv, color="C0", linewidth=0.8, linestyle=":", label="int4 levels (15)" if k == 0 else None)
ax.set_xlabel("weight / absmax of its block of 64 (dimensionless)")
ax.set_ylabel("number of weights")
ax.set_title(f"NF4 spends its levels where the weights are: NF4 error {rel['NF4']:.3f}, int4 {rel['int4']:.3f}"
             + NOTE, fontsize=9)
ax.legend(fontsize=8)
path = os.path.join(FIGURES, "09_nf4_levels.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Part 3. LoRA on the NF4 base: the backward
#
# QLoRA's linear is LoRA's with $W$ replaced by $\hat W = \operatorname{deq}(Q_W)$:
#
# $$y = x \hat W^\top + b + s\,(x A^\top) B^\top .$$
#
# $\hat W$ is a constant of the training problem: the codes never change. So the backward is LoRA's,
# with $dx$ through the dequantized weight and **no** $dW$:
#
# $$dB = s\, dy^\top (x A^\top), \qquad dA = s\,(dy\, B)^\top x, \qquad dx = dy\, \hat W + s\,(dy\, B) A .$$
#
# `qlora.qlora_linear_forward` dequantizes W just for its product and keeps only the codes in its
# cache; the backward dequantizes again for $dx$. The cell below checks the forward against LoRA on
# $\hat W$, writes the three gradients by hand, compares them with `qlora.qlora_linear_backward`,
# and checks them against finite differences (float64, $B \ne 0$: at $B = 0$, $dA$ is exactly 0).

# %%
N, d_in, d_out, r = 6, 64, 32, 3
Wq = rng.standard_normal((d_out, d_in))
rec = nf4.quantize_nf4(Wq)  # the frozen base, as codes and scales
W_dq = nf4.dequantize_nf4(rec, Wq.shape, np.float64)  # W_hat
x = rng.standard_normal((N, d_in))
b, A, B = rng.standard_normal(d_out), rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
s = 2.0
y, cache = qlora.qlora_linear_forward(x, rec, Wq.shape, b, A, B, s)
assert np.allclose(y, x @ W_dq.T + b + s * (x @ A.T) @ B.T)  # y = x W_hat^T + b + s (x A^T) B^T
assert cache[0][0] is rec  # the cache keeps the codes, not W_hat
dy = rng.standard_normal(y.shape)
dB_hand = s * dy.T @ (x @ A.T)  # dB = s dy^T (x A^T)
dA_hand = s * (dy @ B).T @ x  # dA = s (dy B)^T x
dx_hand = dy @ W_dq + s * (dy @ B) @ A  # dx = dy W_hat + s (dy B) A
dx, dA, dB = qlora.qlora_linear_backward(dy, cache)
for name, hand, lib in (("dx", dx_hand, dx), ("dA", dA_hand, dA), ("dB", dB_hand, dB)):
    print(f"{name} {str(hand.shape):8s} by hand vs qlora.py: max |diff| = {np.abs(hand - lib).max():.1e}")
    assert np.allclose(hand, lib)
results = gradcheck.check_op("qlora_linear", lambda x, A, B: qlora.qlora_linear_forward(x, rec, Wq.shape, b, A, B, s),
                             qlora.qlora_linear_backward, {"x": x, "A": A, "B": B}, {"x": 0, "A": 1, "B": 2}, rng)
for res in results:
    print(f"d/d{res.argument}  rel error {res.error:.2e}")
    assert res.passed

# %% [markdown]
# **The whole model on an NF4 base.** `qlora.add_qlora` adds LoRA's adapters (the same A and B
# that `lora.add_lora` draws) and replaces every block linear's W by its NF4 record. At the start
# ($B = 0$) the QLoRA model is therefore *not* the pretrained model: it is the dequantized one. The
# cell below prints PEFT's trainable-parameter line with the NF4 base's bits, measures how far the
# logits moved, and checks that `qlora.merge` gives a plain float model computing exactly what the
# QLoRA model computes: $W' = \hat W + s B A$, the quantization error kept, in float32.
#
# PEFT goes one step further: its 4-bit LoRA layer (`peft/tuners/lora/bnb.py`, `Linear4bit.merge`)
# dequantizes the base, adds $s B A$ and quantizes the sum back into 4 bits, warning that the merged
# model "may get different generations due to rounding errors". Re-quantizing snaps every weight of
# $W'$ to a level of its block again, and that costs the update: exercise 9.4 measures it. An update
# of 1% of $\|\hat W\|$ moves almost no weight past a midpoint between levels, so less than a fifth of it
# survives and the re-quantized merge is as far from $W'$ as the update is large; at 30% most of the update
# survives, but the merge gains a rounding error close to that of a fresh quantization (Part 2's relative
# error). `qlora.merge` keeps $W'$ in float32 so that the merged model computes what was trained.

# %%
qcfg = qlora.QLoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
qparams, qmc = qlora.add_qlora(base, mc, qcfg, seed=0)
print(lora.count_report(qparams, set(lora.adapter_names(qmc)), qmc))
assert not any(n.endswith(".W") and n.startswith("h.") for n in qparams)  # no float block weight held
ids = tok.encode("the red cat chases two mice.\nmy dog ")[None, :]
logits_base = model.next_token_logits(base, mc, ids)
logits_q = model.next_token_logits(qparams, qmc, ids)
moved = np.abs(logits_q - logits_base).max() / np.abs(logits_base).max()
merged, merged_mc = qlora.merge(qparams, qmc)
assert merged_mc.lora is None and not any("nf4" in n or "lora_" in n for n in merged)
gap = np.abs(model.next_token_logits(merged, merged_mc, ids) - logits_q).max()
print(f"NF4 base vs float base: logits differ by {100 * moved:.1f}% of their largest; merged vs QLoRA: {gap:.1e}")
assert 0 < moved and gap < 1e-4

# %% [markdown]
# ## Part 4. DoRA: a length and a direction per output row
#
# DoRA writes the adapted weight as a magnitude times a unit direction. With $V = W + s B A$, the
# LoRA-updated weight, and $n_i = \|V_{i,:}\|$ the norm of output row $i$ of our $(\text{out}, \text{in})$
# layout:
#
# $$W' = \operatorname{diag}(m / n)\, V, \qquad \text{i.e.}\quad W'_{i,:} = m_i \frac{V_{i,:}}{\|V_{i,:}\|} .$$
#
# The paper writes $W' = m \frac{W_0 + BA}{\|W_0 + BA\|_c}$ for $W_0 \in \mathbb{R}^{d \times k}$,
# with $\|\cdot\|_c$ the norm "of each column" and $m \in \mathbb{R}^{1 \times k}$. It does not say which
# of a layer's two features its columns are (read with LoRA's $h = W_0 x$, they would be the *input*
# features). The implementations settle it: PEFT's DoRA (`peft/tuners/lora/dora.py`, `get_weight_norm`)
# computes `torch.linalg.norm(weight, dim=1)` on the $(\text{out}, \text{in})$ weight (after
# transposing GPT-2's `Conv1D` to that layout), one norm **per output feature**, and stores the
# magnitude as a vector of length out (`lora_magnitude_vector`). minilora does the same, so its $m$
# has one entry per row of our $(\text{out}, \text{in})$ W.
# $m$ starts at the row norms of W and B at zero, so $n = m$ and $W' = W$ at the start.
#
# The layer never forms $W'$. With $g = m / n$ (out,), a gain per output feature:
#
# $$y = x W'^\top + b = g \odot \left(x W^\top + s\,(x A^\top) B^\top\right) + b .$$
#
# The cell below checks `dora.dora_linear_forward` against $x W'^\top + b$ built densely, and that
# `dora.add_dora` starts at $W' = W$.

# %%
N, d_in, d_out, r = 5, 7, 6, 3
W = rng.standard_normal((d_out, d_in))
b, A, B = rng.standard_normal(d_out), rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
m = 1.0 + rng.random(d_out)
s = 0.7
x = rng.standard_normal((N, d_in))
V = W + s * B @ A  # (out, in), formed here only to check
n = np.linalg.norm(V, axis=1)  # n_i = ||V_i||
W_prime = (m / n)[:, None] * V  # W' = diag(m / n) V
y, cache = dora.dora_linear_forward(x, W, b, A, B, m, s)
assert np.allclose(y, x @ W_prime.T + b)
g = m / n
assert np.allclose(y, g * (x @ W.T + s * (x @ A.T) @ B.T) + b)  # y = g (x W^T + s (x A^T) B^T) + b
dparams, dmc = dora.add_dora(base, mc, dora.DoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o")))
assert np.array_equal(model.next_token_logits(dparams, dmc, ids), model.next_token_logits(base, mc, ids))
print("dora_linear == x W'^T + b; at B = 0, m = ||W_i||: the DoRA model's logits equal the base's exactly")

# %% [markdown]
# ## The DoRA backward: exact, and detached
#
# Name $z = x W^\top + s\,\mathit{xa} B^\top$ with $\mathit{xa} = x A^\top$, so $y = g \odot z + b$.
# Walking back from $dy$:
#
# $$
# \begin{aligned}
# dz &= dy \odot g, \qquad dg = \textstyle\sum_N dy \odot z && \text{from } y = g \odot z + b \\
# dm &= dg / n, \qquad dn = -dg\, m / n^2 && \text{from } g = m / n \\
# dB &\mathrel{+}= s\, dz^\top \mathit{xa}, \qquad dA \mathrel{+}= s\,(dz\, B)^\top x,
#   \qquad dx = dz\, W + s\,(dz\, B) A && \text{from } z \\
# dV &= \operatorname{diag}(dn / n)\, V && \text{from } n_i = \|V_{i,:}\|,\ \partial n_i / \partial V_{i,:} = V_{i,:} / n_i \\
# dB &\mathrel{+}= s\, dV A^\top, \qquad dA \mathrel{+}= s\, B^\top dV && \text{from } V = W + s B A
# \end{aligned}
# $$
#
# The last two lines are the gradient **through the norm**. The DoRA paper proposes to save memory
# by treating $n$ as a constant in the backward (PEFT does this: it detaches the norm); then $dn$,
# and those two lines, are dropped, and $dm = dg / n$ is unchanged. That is no longer the gradient
# of the loss. The cell below writes both by hand (forming $V$, as the derivation does), compares
# them with `dora.dora_linear_backward`, which computes the same without any $(\text{out}, \text{in})$
# matrix (Part 5), and then runs the finite-difference check on both.

# %%
dy = rng.standard_normal(y.shape)
xa = x @ A.T
z = x @ W.T + s * xa @ B.T
dz, dg = dy * g, (dy * z).sum(axis=0)  # from y = g z + b
dm_hand = dg / n  # from g = m / n
dn = -dg * m / n**2
dB_hand = s * dz.T @ xa  # from z = x W^T + s xa B^T
dA_hand = s * (dz @ B).T @ x
dx_hand = dz @ W + s * (dz @ B) @ A
dB_detached, dA_detached = dB_hand.copy(), dA_hand.copy()  # the detached backward stops here
dV = (dn / n)[:, None] * V  # from n_i = ||V_i||
dB_hand += s * dV @ A.T  # from V = W + s B A
dA_hand += s * B.T @ dV
for detach, hand in ((False, (dx_hand, dA_hand, dB_hand, dm_hand)), (True, (dx_hand, dA_detached, dB_detached, dm_hand))):
    _, c = dora.dora_linear_forward(x, W, b, A, B, m, s, detach_norm=detach)
    for name, h, lib in zip(("dx", "dA", "dB", "dm"), hand, dora.dora_linear_backward(dy, c)):
        assert np.allclose(h, lib), (detach, name)
print("exact and detached backwards by hand == dora.dora_linear_backward (which forms no (out, in) matrix)")

checks = {}
for detach in (False, True):
    res = gradcheck.check_op("dora_linear",
                             lambda x, A, B, m: dora.dora_linear_forward(x, W, b, A, B, m, s, detach_norm=detach),
                             dora.dora_linear_backward, {"x": x, "A": A, "B": B, "m": m},
                             {"x": 0, "A": 1, "B": 2, "m": 3}, rng)
    checks[detach] = {r_.argument: r_.error for r_ in res}
    print(f"{'detached' if detach else 'exact   '} backward, rel error vs finite differences: "
          + "  ".join(f"d{k} {v:.1e}" for k, v in checks[detach].items()))
assert all(e <= gradcheck.TOLERANCE for e in checks[False].values())  # the exact one passes
assert checks[True]["A"] > 1e-3 and checks[True]["B"] > 1e-3  # the detached one does not, on dA and dB
assert checks[True]["m"] <= gradcheck.TOLERANCE and checks[True]["x"] <= gradcheck.TOLERANCE  # n needs neither

# %% [markdown]
# Only $dA$ and $dB$ fail for the detached backward: $n$ depends on $A$ and $B$, not on $m$ or $x$.
# How much does it matter in training? The cell below fine-tunes the pretrained model with DoRA
# (r = 8 on q, k, v, o) on the "subject" task twice, with the exact and with the detached backward,
# from the same start and the same batches, and compares the loss curves and the scores.
#
# **What the full run gives.** In full mode (200 steps on 2,000 examples, the committed figure
# `figures/09_dora_exact_vs_detached.png`) both training losses fall from about 5.2 to about 0.5 nats
# per token, and the two curves lie on top of each other: at this scale dropping the norm's gradient
# changes nothing visible, although it is not the loss's gradient. The last assert checks that both raise
# the test exact match. Study 1 trained DoRA (exact backward, r = 8 on q, k, v, o) for 600 steps at its
# own rate: test exact match 0.975 ± 0.035 (3 seeds, `benchmarks/studies/forgetting/results.jsonl`).
# **In fast mode** (4 steps, tiny data and model) both print `exact match 0.000 -> 0.000` and identical
# losses: the run works, and that is all it shows.

# %%
_, val_text = corpus.train_val_text(0, 50 if FAST else 200, seed=PretrainConfig().data_seed)
val_data = tok.encode(val_text)
steps = 4 if FAST else 200
summaries, logs = {}, {}
for detach in (False, True):
    name = "DoRA, detached norm" if detach else "DoRA, exact"
    config = FinetuneConfig(method="dora", task="subject", n_train=64 if FAST else 2000, n_test=8 if FAST else 100,
                            lora=dora.DoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"), detach_norm=detach))
    config.train.steps, config.train.warmup_steps, config.train.eval_every = steps, 1 if FAST else 20, steps
    run_dir = os.path.join(RUNS, f"09-dora-{'detached' if detach else 'exact'}")
    *_, summaries[name] = finetune(base, mc, tok, config, run_dir, val_data)
    logs[name] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
    print(f"[{name}] exact match {summaries[name]['metric_before']:.3f} -> {summaries[name]['metric']:.3f}; "
          f"corpus loss {summaries[name]['val_loss_before']:.4f} -> {summaries[name]['val_loss_after']:.4f}")
final = {k: [e["train_loss"] for e in v if e.get("train_loss") is not None][-1] for k, v in logs.items()}
print("last training loss:", {k: round(v, 4) for k, v in final.items()})
fig = plot.plot_loss_curves(logs, smooth=0.8, title="DoRA on 'subject', exact vs detached-norm backward" + NOTE)
path = os.path.join(FIGURES, "09_dora_exact_vs_detached.png")
plot.save_figure(fig, path)
print("wrote", path)
if not FAST:
    assert all(sm["metric"] > sm["metric_before"] for sm in summaries.values())

# %% [markdown]
# ## Part 5. The row norms without the (out, in) matrix
#
# The forward needs $n_i = \|W_i + s (BA)_i\|$ at every step. Forming $V = W + s B A$ would cost
# an $(\text{out}, \text{in})$ buffer per adapted layer, which is what LoRA exists to avoid. Squaring and
# expanding row $i$:
#
# $$n_i^2 = \|W_i\|^2 + 2s\, W_i \cdot (BA)_i + s^2 \|(BA)_i\|^2
#        = \|W_i\|^2 + 2s \sum_j P_{ij} B_{ij} + s^2 \sum_j (B G)_{ij} B_{ij},
#   \qquad P = W A^\top\ (\text{out}, r),\ G = A A^\top\ (r, r),$$
#
# since $W_i \cdot (BA)_i = \sum_j B_{ij} (A W_i^\top)_j$ and $\|(BA)_i\|^2 = B_i G B_i^\top$. Only
# products of shape (out, r) and (r, r) are formed; $\|W_i\|^2$ is an elementwise sum over the frozen
# W (constant, and could be cached). The backward follows the same three terms: with
# $dq = dn / (2n)$, $dP = 2s\, dq \odot B$, $dG = s^2 B^\top (dq \odot B)$, then
# $dA \mathrel{+}= dP^\top W + 2\, dG A$ and $dB \mathrel{+}= 2s\, dq \odot (P + s\, B G)$: all $(r, \text{in})$,
# $(\text{out}, r)$ or $(r, r)$.
#
# The cell below computes $n^2$ by the expansion, compares it with the dense norm, and records the
# shape of every matrix product `dora.row_norms` forms (an ndarray subclass that notes each `@`).
# An honest note: $P = W A^\top$ costs as many multiply-adds as $BA$ would (out x in x r); the saving
# is the $(\text{out}, \text{in})$ buffer and its second pass, and both are once per step, not per token.

# %%
P, G = W @ A.T, A @ A.T  # (out, r), (r, r)
n_sq = (W * W).sum(axis=1) + 2 * s * (P * B).sum(axis=1) + s**2 * ((B @ G) * B).sum(axis=1)
assert np.allclose(np.sqrt(n_sq), np.linalg.norm(W + s * B @ A, axis=1))


class Noted(np.ndarray):
    """An array that notes the shape of every matrix product it takes part in."""

    shapes = []

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:  # an in-place op (q += ...): write into the plain views of the same buffers
            kwargs["out"] = tuple(np.asarray(o) for o in out)
        result = getattr(ufunc, method)(*(np.asarray(a) for a in inputs), **kwargs)
        if ufunc is np.matmul:
            Noted.shapes.append(np.shape(result))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(Noted) if isinstance(result, np.ndarray) and result.ndim else result


n_lib, _, _ = dora.row_norms(W.view(Noted), A.view(Noted), B.view(Noted), s)
print(f"products formed by row_norms: {Noted.shapes}  (W is {W.shape})")
assert np.allclose(np.asarray(n_lib), np.sqrt(n_sq)) and W.shape not in Noted.shapes
assert sorted(Noted.shapes) == sorted([(d_out, r), (r, r), (d_out, r)])  # W A^T, A A^T, B G

# %% [markdown]
# QLoRA changes where W lives (4 bits, dequantized per product) and nothing about the adapter;
# DoRA changes what the adapter computes and nothing about where W lives. Both keep LoRA's
# contract: a frozen W never gets a gradient, nor any product of its shape
# (`tests/test_frozen_products.py` counts them for every method). `docs/methods.md` lists PEFT's
# other methods against minilora's.

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to predict
# **before** running, and how to check. The solutions, which run and assert their answers, are on
# [their page](solutions/09_beyond_lora_solutions.py).
#
# ### Exercise 9.1 (compute by hand): bits per weight, and a 7B base
#
# Write the stored bits per weight of NF4 for block sizes 32, 64 and 128, with double quantization
# (absmax blocks of 256) and without it (one float32 absmax per block). Ignore the one float32
# mean per matrix. Check your numbers against `nf4.stored_bits_per_param(nf4.quantize_nf4(W,
# block_size), W.size)` on a (1024, 1024) random matrix (where the mean adds 32 / 2^20), and for
# "without" against `4 + 32 / block_size`. How many GB does a 7B base take at block size 64 with
# and without double quantization, and in 16 bits?
#
# ### Exercise 9.2 (predict, then check): when is int4 better than NF4?
#
# NF4 beats int4 on normal weights (Part 2). Predict which one has the lower reconstruction error
# on weights drawn **uniformly** from [-1, 1], and why. Check with `nf4.quantize_blockwise` and
# `nf4.dequantize_blockwise` at block size 64, for 65,536 normal and 65,536 uniform weights.
#
# ### Exercise 9.3 (predict, then check): exact and detached at the start
#
# At DoRA's start B = 0 and m = ‖W_i‖. Predict, from the derivation: is dA zero? Do the exact and
# detached backwards agree on dA, on dB, on dm there? Check with `dora.dora_linear_forward(...,
# detach_norm=...)` and `dora.dora_linear_backward` on a random layer with B = 0, m the row norms.
#
# ### Exercise 9.4 (derive and implement): merging back into 4 bits
#
# After QLoRA training the merged weight is $W' = \hat W + s B A$ in float32. PEFT's 4-bit LoRA
# layer stores it in NF4 again (Part 3). What does that cost? Predict, for a rank-8 update $\Delta$ at
# 1%, 10%, 30% and 70% of $\|\hat W\|$ (study 1's trained QLoRA adapters have $\|s B A\|_F$ at
# 0.697 ± 0.017 of $\|W\|_F$, mean over the adapted matrices, 3 seeds), what share of $\Delta$ survives
# re-quantization and how far the re-quantized merge lies from the float merge. Implement
# `requantized_update(W_hat, delta)`, returning $u = \operatorname{deq}(Q(\hat W + \Delta)) - \hat W$, and
# measure on `h.0.mlp.fc` of the pretrained model's dequantized weight: the share of $\Delta$ that
# survives along its own direction, $\langle u, \Delta \rangle / \|\Delta\|^2$; the re-quantized merge's
# relative error against the float merge, $\|u - \Delta\|_F / \|\hat W + \Delta\|_F$; and that error over
# $\|\Delta\|$. Compare with the relative error of quantizing the pretrained W in the first place.
