# %% [markdown]
# # 03. LoRA, by hand: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/03_lora_by_hand.py` and
# asserts the answer. The pretrained model comes from the shared place the tutorials
# use, `$MINILORA_RUNS/pretrain`. Nothing here trains for more than two steps, so
# fast and full mode differ only in the model's size.

# %%
import os

import numpy as np

from minilora import gradcheck, model, optim, tasks
from minilora.methods import lora
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))
records, _ = tasks.task_splits("subject", 8, 0, seed=0)
x, y, mask = tasks.instruction_batch(records, tok, mc.context_length)
batch = {"x": x, "y": y, "mask": mask}

# %% [markdown]
# ## Exercise 3.1: counting by hand
#
# Every adapted (d, k) matrix gets A (r, k) and B (d, r): r (d + k) numbers.
#
# - q, k, v, o are (C, C): 4 L r (C + C) = 8 L r C.
#   The tutorial's model (C = 128, L = 2, r = 8): 8 x 2 x 8 x 128 = **16,384**.
# - Adding the MLP: fc is (F, C) and proj (C, F), each r (C + F), so
#   L r (8 C + 2 (C + F)). With F = 512: 2 x 8 x (1024 + 1280) = **36,864**, more
#   than double: the MLP matrices are 4 times wider.
# - AdamW keeps m and v, 2 float32 numbers per trainable parameter: 8 bytes each,
#   **131,072** and **294,912** bytes.

# %%
C, F, L, r = mc.d_model, mc.d_ff, mc.n_layers, 8
for targets, by_hand in ((("q", "k", "v", "o"), 8 * L * r * C),
                         (("q", "k", "v", "o", "fc", "proj"), L * r * (8 * C + 2 * (C + F)))):
    adapted, amc = lora.add_lora(base, mc, lora.LoraConfig(rank=r, alpha=2.0 * r, targets=targets))
    names = lora.lora_names(adapted)
    counted = model.count_params(adapted, names)
    per_matrix = sum(lora.lora_param_count(*adapted[n[: -len(".lora_A")] + ".W"].shape, r)
                     for n in names if n.endswith("lora_A"))
    state_bytes = optim.optimizer_state_bytes(optim.adamw_init(adapted, names))
    print(f"targets {','.join(targets):16s} by hand {by_hand:,}  counted {counted:,}  AdamW state {state_bytes:,} B")
    assert by_hand == counted == per_matrix
    assert state_bytes == 8 * by_hand
    if not FAST:  # the numbers above are for the full-mode model
        assert by_hand == {4: 16_384, 6: 36_864}[len(targets)]

# %% [markdown]
# ## Exercise 3.2: which factor moves first
#
# At init B = 0, so dA = s (dy B)^T x = 0 exactly, while dB = s dy^T (x A^T) is not.
# AdamW's first step on A: m = v = 0, so the update is 0 / (0 + eps) = 0 and, with no
# weight decay, **A does not change at all** (bitwise); B moves. After that step
# B != 0, so the second step's dA is non-zero and A moves too.

# %%
adapted, amc = lora.add_lora(base, mc, lora.LoraConfig(rank=4, alpha=8.0), seed=0)
names = lora.lora_names(adapted)
A_names = [n for n in names if n.endswith("lora_A")]
B_names = [n for n in names if n.endswith("lora_B")]
start = {n: adapted[n].copy() for n in names}
state = optim.adamw_init(adapted, names)
for step in (1, 2):
    _, grads = model.loss_and_grads(adapted, amc, batch, set(names))
    if step == 1:
        assert not any(grads[n].any() for n in A_names) and all(grads[n].any() for n in B_names)
    optim.adamw_step(adapted, grads, state, lr=1e-3, weight_decay=0.0)
    moved_A = sum(not np.array_equal(adapted[n], start[n]) for n in A_names)
    moved_B = sum(not np.array_equal(adapted[n], start[n]) for n in B_names)
    print(f"after step {step}: {moved_A} of {len(A_names)} A matrices and {moved_B} of {len(B_names)} B moved")
    if step == 1:
        assert moved_A == 0 and moved_B == len(B_names)
    else:
        assert moved_A == len(A_names)

# %% [markdown]
# ## Exercise 3.3: what alpha does
#
# With B = 0 the adapted model's forward is the base model's, whatever s = alpha / r,
# so everything upstream of B is identical and dB = s dy^T (x A^T) is **exactly**
# proportional to s: doubling alpha doubles dB, bit for bit (a factor of 2 is exact
# in floating point).
#
# Adam's first step divides the gradient by its own size: the step on each entry of
# B is lr m_hat / (sqrt(v_hat) + eps) = lr g / (|g| + eps), about lr sign(g), the same
# for both alphas. So B after one step is (nearly) the same, and the update of the
# weight, Delta W = s B A, is **twice** as large. Under Adam, alpha works like a
# multiplier on the learning rate of Delta W, not on its gradient.

# %%
lr = 1e-3
delta_w, dB = {}, {}
for alpha in (16.0, 32.0):
    ad, amc_a = lora.add_lora(base, mc, lora.LoraConfig(rank=8, alpha=alpha), seed=0)
    names = lora.lora_names(ad)
    _, grads = model.loss_and_grads(ad, amc_a, batch, set(names))
    dB[alpha] = grads["h.0.attn.q.lora_B"].copy()
    st = optim.adamw_init(ad, names)
    optim.adamw_step(ad, grads, st, lr=lr, weight_decay=0.0)
    s = amc_a.lora.scale
    delta_w[alpha] = s * ad["h.0.attn.q.lora_B"].astype(np.float64) @ ad["h.0.attn.q.lora_A"].astype(np.float64)
ratio = np.linalg.norm(delta_w[32.0]) / np.linalg.norm(delta_w[16.0])
print(f"dB(alpha=32) == 2 dB(alpha=16): {np.array_equal(dB[32.0], 2 * dB[16.0])};  "
      f"|Delta W| ratio after one Adam step: {ratio:.4f}")
assert np.array_equal(dB[32.0], 2 * dB[16.0])
assert abs(ratio - 2.0) < 0.02

# %% [markdown]
# The same reasoning answers the last question. With alpha = 2r the scale s = 2 for
# every r, but after one Adam step each of B's r columns has moved by about lr per
# entry, whatever r is: Delta W = s B A is a sum of r such rank-one terms, so its
# norm **grows with r**. "alpha = 2r keeps s fixed" does not keep the update's size
# fixed under Adam (rsLoRA's s = alpha / sqrt(r), `LoraConfig(rslora=True)`, is one
# answer to that).

# %%
update_norm = {}
for rank in (1, 4, 16):
    ad, amc_r = lora.add_lora(base, mc, lora.LoraConfig(rank=rank, alpha=2.0 * rank), seed=0)
    names = lora.lora_names(ad)
    _, grads = model.loss_and_grads(ad, amc_r, batch, set(names))
    optim.adamw_step(ad, grads, optim.adamw_init(ad, names), lr=lr, weight_decay=0.0)
    dw = amc_r.lora.scale * ad["h.0.attn.q.lora_B"].astype(np.float64) @ ad["h.0.attn.q.lora_A"].astype(np.float64)
    update_norm[rank] = float(np.linalg.norm(dw))
print("|Delta W| after one Adam step, alpha = 2r:", {k: f"{v:.4f}" for k, v in update_norm.items()})
assert update_norm[1] < update_norm[4] < update_norm[16]

# %% [markdown]
# ## Exercise 3.4: the LoRA backward with adapter dropout
#
# Forward, with keep = mask / (1 - p) (inverted dropout, on the adapter's input only):
#
#     xd = x * keep,   xa = xd A^T,   y = x W^T + b + s xa B^T
#
# Backward, in mirror order:
#
#     dB  = s dy^T xa                          (out, r)
#     dxa = s dy B                             (N, r)
#     dA  = dxa^T xd      <- xd, not x          (r, in)
#     dx  = dy W + (dxa A) * keep              the base path sees no dropout
#
# With p = 0 (keep = 1) this is the tutorial's backward. The check injects one fixed
# mask, so the forward is a deterministic function of x, A and B.

# %%
def my_lora_forward(x, W, b, A, B, s, keep):
    """y = x W^T + b + s ((x * keep) A^T) B^T; x (N, in), keep (N, in) = mask / (1 - p)."""
    xd = x * keep
    xa = xd @ A.T
    return x @ W.T + b + s * xa @ B.T, (x, W, A, B, s, keep, xd, xa)


def my_lora_backward(dy, cache):
    """Returns (dx, dA, dB)."""
    x, W, A, B, s, keep, xd, xa = cache
    dB = s * dy.T @ xa
    dxa = s * dy @ B
    dA = dxa.T @ xd
    dx = dy @ W + (dxa @ A) * keep
    return dx, dA, dB


N, d_in, d_out, r, p = 10, 8, 6, 3, 0.25
x = rng.standard_normal((N, d_in))
W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))  # B != 0, or dA would be 0
s = lora.lora_scale(r, 2.0 * r)
drop_mask = rng.random((N, d_in)) >= p
keep = drop_mask / (1.0 - p)
results = gradcheck.check_op("my lora + dropout", lambda x, A, B: my_lora_forward(x, W, b, A, B, s, keep),
                             my_lora_backward, {"x": x, "A": A, "B": B}, {"x": 0, "A": 1, "B": 2}, rng)
for res in results:
    print(f"d/d{res.argument}: rel error {res.error:.1e}")
    assert res.passed
# and it is what minilora computes, given the same mask
y_lib, c_lib = lora.lora_linear_forward(x, W, b, A, B, s, dropout_p=p, dropout_mask=drop_mask)
y_mine, c_mine = my_lora_forward(x, W, b, A, B, s, keep)
dy = rng.standard_normal(y_lib.shape)
assert np.allclose(y_lib, y_mine)
for mine, lib in zip(my_lora_backward(dy, c_mine), lora.lora_linear_backward(dy, c_lib)):
    assert np.allclose(mine, lib)
dx_no_drop = my_lora_backward(dy, my_lora_forward(x, W, b, A, B, s, np.ones_like(keep))[1])[0]
assert not np.allclose(dx_no_drop, my_lora_backward(dy, c_mine)[0])  # the mask matters: dropout is not a no-op
