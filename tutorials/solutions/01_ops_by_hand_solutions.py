# %% [markdown]
# # 01. The ops, by hand: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/01_ops_by_hand.py` and
# **asserts** the answer, so the tests (`tests/test_solutions.py`) know every exercise
# is solvable with the code as it stands. Try the exercise before reading its
# solution. Everything here is float64 and takes a second; MINILORA_FAST=1 changes
# nothing but is honoured like everywhere else.

# %%
import os

import numpy as np

from minilora import gradcheck, ops
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Exercise 1.1: a gradient check must fail on a wrong backward
#
# The bug: `db = mean_N dout` instead of `sum_N dout`. Every entry of the analytic
# `db` is then `n / N`, where `n` is the correct (numerical) value, so every entry has
#
#     |a - n| / (|a| + |n|) = (n - n/N) / (n + n/N) = (N - 1) / (N + 1)
#
# whatever the data: with N = B T = 2 x 5 = 10 rows, 9/11 = 0.818. dx and dW do not
# read the bias, so they still pass.

# %%
def buggy_linear_backward(dout, cache):
    dx, dW, db = ops.linear_backward(dout, cache)
    N = dout.size // dout.shape[-1]
    return dx, dW, db / N  # the bug: a mean over the N rows instead of a sum


x = rng.standard_normal((2, 5, 8))
W = rng.standard_normal((6, 8))
b = rng.standard_normal(6)
results = gradcheck.check_op("buggy linear", ops.linear_forward, buggy_linear_backward, {"x": x, "W": W, "b": b},
                             {"x": 0, "W": 1, "b": 2}, rng)
errors = {r.argument: r.error for r in results}
print({k: f"{v:.2e}" for k, v in errors.items()}, " predicted for db:", 9 / 11)
assert errors["x"] <= gradcheck.TOLERANCE and errors["W"] <= gradcheck.TOLERANCE
assert abs(errors["b"] - 9 / 11) < 1e-6  # the prediction, to the sixth digit
assert not results[2].passed

# %% [markdown]
# ## Exercise 1.2: what softmax's backward must do, before computing it
#
# (a) softmax(x + c 1) = softmax(x) for any constant c, so the loss does not change
# along the direction 1 = (1, ..., 1): the gradient is orthogonal to it, **every row
# of dx sums to 0**, whatever dout is.
# (b) With dout = c 1 on a row, dx_j = p_j (c - c sum_i p_i) = 0: a loss that rewards
# every class equally has nothing to push on.
# (c) The Jacobian J = diag(p) - p p^T is **symmetric**, its rows sum to 0, and it is
# positive semi-definite (a covariance matrix: the one of the one-hot vector of a
# class drawn from p).
#
# The cell builds J column by column from `softmax_backward` (one unit dout at a time:
# the only time we ever form a Jacobian, to look at it) and checks all three.

# %%
C = 6
xs = 2.0 * rng.standard_normal((4, 5, C))
p, cache = ops.softmax_forward(xs)
dx = ops.softmax_backward(rng.standard_normal(xs.shape), cache)
print("max |row sum of dx| for a random dout:", np.abs(dx.sum(-1)).max())
assert np.abs(dx.sum(-1)).max() < 1e-12  # (a)
dx_const = ops.softmax_backward(np.broadcast_to(rng.standard_normal((4, 5, 1)), xs.shape).copy(), cache)
assert np.abs(dx_const).max() < 1e-12  # (b)

row = xs[:1, :1]  # (1, 1, C): one row
p_row, c_row = ops.softmax_forward(row)
J = np.stack([ops.softmax_backward(np.eye(C)[i][None, None], c_row)[0, 0] for i in range(C)])  # row i: dout = e_i
pr = p_row[0, 0]
assert np.allclose(J, np.diag(pr) - np.outer(pr, pr), atol=1e-15)
assert np.allclose(J, J.T) and np.abs(J.sum(1)).max() < 1e-15  # (c) symmetric, rows sum to 0
eig = np.linalg.eigvalsh(J)
print("eigenvalues of J:", eig.round(4))
assert eig.min() > -1e-12 and abs(eig.min()) < 1e-12  # PSD, with the zero eigenvalue along (1, ..., 1)

# %% [markdown]
# ## Exercise 1.3: the masked cross-entropy backward, derived
#
# With p_i = softmax(z_i) and L = -sum_i m_i log p_i[t_i] / M, M = sum_i m_i:
#
#     dL/dz_i = (m_i / M) (p_i - onehot(t_i))
#
# (d(-log p[t]) / dz = p - onehot(t), from the softmax Jacobian of exercise 1.2.)
# A row with m_i = 0 gets exactly zero gradient, and every counted row weighs 1/M,
# not 1/N: the divisor is the number of counted positions in the whole batch.

# %%
def my_cross_entropy_backward(logits, targets, mask):
    """dL/dlogits of the masked mean cross-entropy. logits (N..., V), targets and mask (N...)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    onehot = np.eye(logits.shape[-1])[targets]
    return (mask / mask.sum())[..., None] * (p - onehot)


V = 11
logits = 2.0 * rng.standard_normal((2, 5, V))
targets = rng.integers(0, V, (2, 5))
mask = (rng.random((2, 5)) < 0.6).astype(np.float64)
mask[0, 0], mask[1, 4] = 1.0, 0.0
mine = my_cross_entropy_backward(logits, targets, mask)
numerical = gradcheck.numerical_gradient_array(lambda: ops.cross_entropy_forward(logits, targets, mask)[0],
                                               logits, np.array(1.0))
err = gradcheck.rel_error(mine, numerical)
print(f"hand-written dlogits vs finite differences: rel error {err:.1e}")
assert err <= gradcheck.TOLERANCE
assert not mine[mask == 0].any()  # masked positions: exactly zero
_, ce_cache = ops.cross_entropy_forward(logits, targets, mask)
assert np.allclose(mine, ops.cross_entropy_backward(1.0, ce_cache), atol=1e-15)

# %% [markdown]
# ## Exercise 1.4: RMSNorm, derived and implemented
#
# Forward, over the last axis (LLaMA's norm: no mean, no bias):
#
#     rrms = 1 / sqrt(mean_i x_i^2 + eps),   norm_i = x_i rrms,   out_i = g_i norm_i
#
# Backward. dg = sum_N dout * norm. For dx, write dnorm = dout * g. Using
# d(rrms)/dx_j = -rrms^3 x_j / C = -rrms^2 norm_j / C:
#
#     d norm_i / d x_j = rrms (delta_ij - norm_i norm_j / C)
#     dx_j = rrms (dnorm_j - norm_j mean_i(dnorm_i norm_i))
#
# the layer-norm formula with its mean term gone (there is no mean to subtract).

# %%
def rmsnorm_forward(x, g, eps=1e-5):
    """out = x / sqrt(mean(x^2) + eps) * g over the last axis. x (N..., C), g (C,)."""
    rrms = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # (N..., 1)
    norm = x * rrms
    return norm * g, (norm, rrms, g)


def rmsnorm_backward(dout, cache):
    """Returns (dx, dg)."""
    norm, rrms, g = cache
    dg = (dout * norm).reshape(-1, norm.shape[-1]).sum(0)
    dnorm = dout * g
    dx = rrms * (dnorm - norm * (dnorm * norm).mean(-1, keepdims=True))
    return dx, dg


x = 2.0 * rng.standard_normal((2, 5, 8)) + 0.5
g = 1.0 + 0.3 * rng.standard_normal(8)
out, (norm, _, _) = rmsnorm_forward(x, g)
assert np.allclose((norm ** 2).mean(-1), 1.0, atol=1e-4)  # unit root-mean-square rows (eps shifts it slightly)
results = gradcheck.check_op("rmsnorm", rmsnorm_forward, rmsnorm_backward, {"x": x, "g": g}, {"x": 0, "g": 1}, rng)
for r in results:
    print(f"rmsnorm d/d{r.argument}: rel error {r.error:.1e}")
    assert r.passed
