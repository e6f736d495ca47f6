# %% [markdown]
# # 10. Prefix tuning by hand: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/10_prefix_tuning.py` and asserts the answer.
# The pretrained model comes from the shared place the tutorials use, `$MINILORA_RUNS/pretrain`. Nothing
# here trains, so fast and full mode differ only in the model's size.

# %%
import os

import numpy as np

from minilora import model, ops
from minilora.backend import limit_blas_threads
from minilora.finetune import FinetuneConfig, setup_strategy
from minilora.methods import lora, prefix
from minilora.pretrain import PretrainConfig, load_or_pretrain

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))

# %% [markdown]
# ## Exercise 10.1: equal parameters
#
# A prompt of P = 16 trains 16 C numbers; a prefix of P' trains 2 L P' C. Equal when P' = 16 / (2 L): for
# L = 2 layers, P' = 4. LoRA on q, k, v, o trains 8 L r C; equal to a prefix of P' = 16 (2 L 16 C) when
# 8 r = 32, r = 4, whatever L and C: both grow with the depth and the width in the same way.

# %%
L, C = mc.n_layers, mc.d_model
assert 16 % (2 * L) == 0
p_equal = 16 // (2 * L)


def trained(method, **settings):
    params, _, trainable = setup_strategy(base, mc, tok, FinetuneConfig(method=method, **settings))
    return model.count_params(params, trainable)


prompt_count = trained("prompt", n_prompt=16)
prefix_count = trained("prefix", n_prefix=p_equal)
print(f"prompt P = 16: {prompt_count:,}; prefix P' = {p_equal}: {prefix_count:,}")
assert prompt_count == prefix_count == 16 * C
lora_count = trained("lora", lora=lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o")))
assert lora_count == trained("prefix", n_prefix=16) == 2 * L * 16 * C
print(f"LoRA r = 4 on q, k, v, o: {lora_count:,} = prefix P' = 16")

# %% [markdown]
# ## Exercise 10.2: a zero prefix still changes the model
#
# With $p_j = 0$ and $w_j = 0$, every prefix score is $0$, so $e^{s_{t,j}} = 1$ for each of the P columns,
# and their values add nothing. With $S_t = \sum_{u \le t} e^{s_{t,u}}$ over the real columns,
#
# $$\text{out}_t = \frac{\sum_{u \le t} e^{s_{t,u}} v_u}{P + S_t} = \frac{S_t}{P + S_t}\, o_t ,$$
#
# where $o_t$ is the plain causal attention's output. Every output shrinks by $S_t / (P + S_t) < 1$: the
# prefix takes a share of the attention even when it says nothing. So there is no "zero" prefix that leaves
# the pretrained function unchanged, as $B = 0$ does for LoRA. `add_prefix` starts instead from the keys and
# values the layer computes for real tokens: the prefix then starts among keys and values the layer has seen
# (Li & Liang report that a prefix started from real words trains better than a random one).

# %%
B, T, C2, NH, P = 2, 6, 8, 2, 3
hs = C2 // NH
q, k, v = (rng.standard_normal((B, T, C2)) for _ in range(3))
zero = np.zeros((P, C2))
out, _ = prefix.prefix_attention_forward(q, k, v, zero, zero, NH)
plain, _ = ops.attention_forward(q, k, v, NH)
qh, kh = (a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for a in (q, k))
s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hs)  # (B, NH, T, T)
S = np.where(np.tril(np.ones((T, T), bool)), np.exp(s), 0.0).sum(axis=-1)  # (B, NH, T): sum over u <= t
factor = (S / (P + S)).transpose(0, 2, 1)[..., None]  # (B, T, NH, 1), one factor per head
predicted = (plain.reshape(B, T, NH, hs) * factor).reshape(B, T, C2)
print(f"zero prefix: output = S / (P + S) x plain output, max |difference| {np.abs(out - predicted).max():.1e}; "
      f"factors in [{factor.min():.3f}, {factor.max():.3f}]")
assert np.allclose(out, predicted, rtol=1e-12, atol=1e-12) and factor.max() < 1.0

# %% [markdown]
# ## Exercise 10.3: the prefix gradients from the cache
#
# $dw_j = \sum_b \sum_t a_{t,j}\, d\text{out}_t$ is one contraction over $b$ and $t$ per head. For $dp_j$,
# recompute $ds = a \odot (da - D)$ with $da = d\text{out}\, [w; v]^\top$ and $D_t = d\text{out}_t \cdot
# \text{out}_t$, then $dp_j = \sum_b \sum_t ds_{t,j}\, q_t / \sqrt{hs}$.

# %%
pk, pv = rng.standard_normal((P, C2)), rng.standard_normal((P, C2))
out, cache = prefix.prefix_attention_forward(q, k, v, pk, pv, NH)
qh, kk, vv, A, outh = cache
dout = rng.standard_normal(out.shape)
_, _, _, dpk, dpv = prefix.prefix_attention_backward(dout, cache)
douth = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
dw = np.einsum("bhtj,bhtd->jhd", A[..., :P], douth).reshape(P, C2)
da = douth @ vv.transpose(0, 1, 3, 2)  # (B, NH, T, P + T)
ds = A * (da - (douth * outh).sum(axis=-1, keepdims=True))
dp = np.einsum("bhtj,bhtd->jhd", ds[..., :P], qh).reshape(P, C2) / np.sqrt(hs)
print(f"by hand against the op: dprefix_v {np.abs(dw - dpv).max():.1e}, dprefix_k {np.abs(dp - dpk).max():.1e}")
assert np.allclose(dw, dpv, rtol=1e-12, atol=1e-12) and np.allclose(dp, dpk, rtol=1e-12, atol=1e-12)
