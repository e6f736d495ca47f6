# %% [markdown]
# # 09. Beyond LoRA: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/09_beyond_lora.py` and asserts the
# answer. The pretrained model comes from the shared place the tutorials use,
# `$MINILORA_RUNS/pretrain`. Nothing here trains, so fast and full mode differ only in the model's size.

# %%
import os

import numpy as np

from minilora.backend import limit_blas_threads
from minilora.methods import dora, nf4
from minilora.pretrain import PretrainConfig, load_or_pretrain

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))

# %% [markdown]
# ## Exercise 9.1: bits per weight, and a 7B base
#
# Per block of b weights NF4 stores b 4-bit codes and one absmax. Without double quantization the
# absmax is a float32: **4 + 32 / b** bits per weight, 5.0, 4.5 and 4.25 for b = 32, 64, 128. With
# it, the absmax is one int8 and every 256 of them share one float32 scale: **4 + 8 / b + 32 / (256 b)**,
#
# - b = 32: 4 + 0.25 + 0.0039 = 4.2539
# - b = 64: 4 + 0.125 + 0.00195 = 4.1270 (the paper's 4.127)
# - b = 128: 4 + 0.0625 + 0.00098 = 4.0635
#
# On a (1024, 1024) matrix the number of absmax constants, 2^20 / b, is a multiple of 256 for
# each b, so the count is exact, plus 32 / 2^20 for the one float32 mean. A 7B base at b = 64:
# 7e9 x 4.127 / 8 = **3.61 GB** with double quantization, 7e9 x 4.5 / 8 = **3.94 GB** without
# (0.33 GB saved), against **14 GB** in 16 bits.

# %%
W = rng.standard_normal((1024, 1024)).astype(np.float32)
for b in (32, 64, 128):
    with_dq = 4 + 8 / b + 32 / (256 * b)
    measured = nf4.stored_bits_per_param(nf4.quantize_nf4(W, block_size=b), W.size)
    print(f"block {b:3d}: by hand {with_dq:.4f} (+ mean {32 / W.size:.1e}), measured {measured:.6f}; "
          f"without double quantization {4 + 32 / b:.4f}")
    assert np.isclose(measured, with_dq + 32 / W.size, rtol=0, atol=1e-12)
    assert with_dq < 4 + 32 / b
gb = {"NF4 + double quantization": 7e9 * (4 + 8 / 64 + 32 / (64 * 256)) / 8 / 1e9,
      "NF4, float32 absmax": 7e9 * (4 + 32 / 64) / 8 / 1e9, "16-bit": 7e9 * 2 / 1e9}
print({k: f"{v:.2f} GB" for k, v in gb.items()})
assert round(gb["NF4 + double quantization"], 2) == 3.61 and round(gb["NF4, float32 absmax"], 2) == 3.94

# %% [markdown]
# ## Exercise 9.2: when is int4 better than NF4?
#
# NF4's levels are the quantiles of a normal distribution: dense near 0, sparse near ±1 (its outer
# gaps are about 0.28 and 0.3, int4's all 1/7 = 0.14). For normal weights most values sit where
# NF4 is dense. For **uniform** weights every part of [-1, 1] is equally full, and the quantizer with
# the least squared error for a uniform distribution is the uniform one: int4 wins there, even
# with one level fewer. NF4 is the better code *because* pretrained weights are close to normal.

# %%
errors = {}
for dist, data in (("normal", rng.standard_normal(65536)), ("uniform", rng.uniform(-1.0, 1.0, 65536))):
    for name, levels in (("NF4", nf4.nf4_levels()), ("int4", nf4.int4_levels())):
        codes, absmax = nf4.quantize_blockwise(data, levels, 64)
        errors[dist, name] = float(np.mean((nf4.dequantize_blockwise(codes, absmax, levels, 64) - data) ** 2))
    print(f"{dist:8s} mean squared error: NF4 {errors[dist, 'NF4']:.2e}, int4 {errors[dist, 'int4']:.2e}")
assert errors["normal", "NF4"] < errors["normal", "int4"]
assert errors["uniform", "int4"] < errors["uniform", "NF4"]

# %% [markdown]
# ## Exercise 9.3: exact and detached at the start
#
# At B = 0: V = W, so n = ‖W_i‖ = m and g = 1.
#
# - **dA = 0 in both.** Its direct term s (dz B)^T x has B = 0; its norm terms dP^T W and 2 dG A have
#   dP = 2 s dq B = 0 and dG = s² B^T (dq B) = 0. (As in LoRA: A does not move first.)
# - **dm agrees**: dm = dg / n in both; so does dx (dz W + s (dz B) A, no norm term).
# - **dB differs.** Both have s dz^T xa; the exact one adds the norm's term 2 s dq ⊙ P with
#   dq = dn / (2n) and dn = -dg m / n² = -dg / n, that is -s (dg / n²) ⊙ (W A^T), not zero. It takes
#   out of dB the part that would only change the rows' length, which m already controls.

# %%
d_out, d_in, r, s = 6, 7, 3, 0.7
W = rng.standard_normal((d_out, d_in))
b, A, B0 = rng.standard_normal(d_out), rng.standard_normal((r, d_in)), np.zeros((d_out, r))
m = np.linalg.norm(W, axis=1)  # the start: m = ||W_i||
x, grads = rng.standard_normal((4, d_in)), {}
dy = rng.standard_normal((4, d_out))
for detach in (False, True):
    _, cache = dora.dora_linear_forward(x, W, b, A, B0, m, s, detach_norm=detach)
    grads[detach] = dict(zip(("dx", "dA", "dB", "dm"), dora.dora_linear_backward(dy, cache)))
exact, detached = grads[False], grads[True]
print(f"|dA| exact {np.abs(exact['dA']).max():.1e}, detached {np.abs(detached['dA']).max():.1e}; "
      f"max |dB exact - dB detached| = {np.abs(exact['dB'] - detached['dB']).max():.3f}")
assert not exact["dA"].any() and not detached["dA"].any()
assert np.allclose(exact["dm"], detached["dm"]) and np.allclose(exact["dx"], detached["dx"])
assert np.abs(exact["dB"] - detached["dB"]).max() > 1e-3
dg = (dy * (x @ W.T)).sum(axis=0)  # at B = 0, z = x W^T
assert np.allclose(exact["dB"] - detached["dB"], -s * (dg / m**2)[:, None] * (W @ A.T))

# %% [markdown]
# ## Exercise 9.4: merging back into 4 bits
#
# Re-quantizing $W' = \hat W + \Delta$ snaps every weight to a level of its block again. $\hat W$ is
# already on those levels, so a weight moves to another level only if $\Delta$ carries it past a
# midpoint, half a gap away: 0.04 to 0.15 of its block's absmax. At 1% of $\|\hat W\|$, $\Delta$ moves a
# typical weight by about 1% of its own size, far less than half a gap, so almost no code changes; what
# changes is each block's absmax (its largest weight moved), which rescales the whole block. So the
# prediction: **almost none of the update survives** (the share along $\Delta$ near 0), and the
# re-quantized merge is about $\|\Delta\|$ away from the float merge (the error over $\|\Delta\|$ near 1):
# merging back into 4 bits gives, nearly, the model before training. As $\Delta$ grows, more weights
# cross a midpoint and more of $\Delta$ survives (at 30% and 70%, most of it); but the merge now carries a
# fresh rounding error, close to the error of quantizing W in the first place. Either way the 4-bit merged
# model no longer computes what the QLoRA model computed (PEFT's warning: "different generations due to
# rounding errors"): that is why `qlora.merge` returns float32. The cell measures, for each size, the share
# of $\Delta$ kept along its direction, $\langle u, \Delta \rangle / \|\Delta\|^2$, its cosine with $\Delta$,
# the merge's relative error $\|u - \Delta\| / \|\hat W + \Delta\|$ and that error over $\|\Delta\|$, and
# asserts these predictions (fast and full mode).

# %%
def requantized_update(W_hat, delta):
    """deq(Q(W_hat + delta)) - W_hat: what survives of the update delta when W_hat + delta goes back to NF4."""
    merged = (W_hat + delta).astype(np.float32)
    return nf4.dequantize_nf4(nf4.quantize_nf4(merged), W_hat.shape, np.float64) - W_hat


W_fc = base["h.0.mlp.fc.W"]
W_hat = nf4.dequantize_nf4(nf4.quantize_nf4(W_fc), W_fc.shape, np.float64)  # the QLoRA model's base
fresh = np.linalg.norm(W_hat - W_fc) / np.linalg.norm(W_fc)  # the error of quantizing W in the first place
print(f"h.0.mlp.fc {W_fc.shape}: quantizing W to NF4 costs a relative error of {fresh:.3f}")
direction = rng.standard_normal((W_hat.shape[0], 8)) @ rng.standard_normal((8, W_hat.shape[1]))  # rank 8
cost = {}
for share in (0.01, 0.10, 0.30, 0.70):
    delta = direction * (share * np.linalg.norm(W_hat) / np.linalg.norm(direction))
    u = requantized_update(W_hat, delta)
    err = np.linalg.norm(u - delta)  # || deq(Q(W')) - W' ||: the re-quantized merge against the float merge
    cost[share] = {"kept": float((u * delta).sum() / (delta * delta).sum()),  # <u, delta> / ||delta||^2
                   "cosine": float((u * delta).sum() / (np.linalg.norm(u) * np.linalg.norm(delta) + 1e-300)),
                   "merge_error": float(err / np.linalg.norm(W_hat + delta)),
                   "error_over_delta": float(err / np.linalg.norm(delta))}
    print(f"update at {share:4.0%} of |W_hat|: kept along delta {cost[share]['kept']:.3f}, "
          f"cosine {cost[share]['cosine']:.2f}; re-quantized merge vs float merge: relative error "
          f"{cost[share]['merge_error']:.4f} = {cost[share]['error_over_delta']:.2f} x |delta|")
small, large = cost[0.01], cost[0.70]
assert small["kept"] < 0.2 and small["error_over_delta"] > 0.8  # at 1% the update is rounded away
assert small["kept"] < cost[0.10]["kept"] < cost[0.30]["kept"]  # a larger update survives better
assert all(abs(cost[sh]["kept"] - 1) < 0.2 for sh in (0.30, 0.70))  # most of a large one survives...
assert 0.5 * fresh < large["merge_error"] < 1.5 * fresh  # ...with a fresh quantization's error on top
