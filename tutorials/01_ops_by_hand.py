# %% [markdown]
# # 01. The ops, by hand
#
# A GPT is a composition of a few small functions: an embedding lookup, linear
# layers, layer norm, GELU, softmax, causal attention and a cross-entropy. Training
# needs the gradient of the loss with respect to every input of every one of them.
# Here we write each op as a **pair of pure functions** and check every backward
# against finite differences, as llm.c and CS231n do.
#
# The contract (see `minilora/ops.py`):
#
#     out, cache = op_forward(inputs...)      # cache: whatever the backward needs
#     grads      = op_backward(dout, cache)   # one gradient per input, in forward order
#
# `dout` is dL/d(out), the gradient arriving from everything after the op. The
# backward returns $\partial L / \partial \text{input}$ = the **vector-Jacobian product**
# $\text{dout}^\top J$. It never builds the Jacobian $J$ itself.

# %%
import os

import numpy as np
from matplotlib.figure import Figure

from minilora import gradcheck, ops, plot
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
rng = np.random.default_rng(0)

# %% [markdown]
# ## The fake loss
#
# How do we test a backward without a real loss? Pick a random `dout` and define the
# scalar
#
# $$L(x) = \sum \mathrm{op}(x) \odot \text{dout}.$$
#
# Its gradient with respect to `out` is exactly `dout`, so dL/dx is exactly what
# `op_backward(dout, cache)` must return. A finite difference of this one scalar
# checks the whole vector-Jacobian product at once. The cell below shows that
# dL/d(out) = dout for the identity op, by differencing one coordinate.

# %%
out = rng.standard_normal((3, 4))
dout = rng.standard_normal((3, 4))
h = 1e-6
bumped = out.copy()
bumped[1, 2] += h
dL_dout_12 = (np.sum(bumped * dout) - np.sum(out * dout)) / h
print(f"finite difference {dL_dout_12:.8f}   dout[1, 2] = {dout[1, 2]:.8f}")
assert abs(dL_dout_12 - dout[1, 2]) < 1e-6

# %% [markdown]
# ## Linear: y = x W^T + b
#
# Weight layout: `W` is `(out, in)`, as in PyTorch, llm.c and the LoRA paper, and the
# layer computes `y = x @ W.T + b` over any leading axes `N`. With this layout the
# LoRA update of tutorial 03, `W' = W + B A` with `B (out, r)` and `A (r, in)`, is
# literally `W + B @ A`.
#
# Backward. Each $y_{no} = \sum_i x_{ni} W_{oi} + b_o$, so
#
# $$
# \begin{aligned}
# dx &= \text{dout}\, W && (N, \text{in}) \\
# dW &= \text{dout}^\top x && (\text{out}, \text{in}), \text{ summed over } N \\
# db &= \textstyle\sum_N \text{dout} && (\text{out},)
# \end{aligned}
# $$
#
# Shapes are the quickest check of a derivation: every gradient has its input's shape.

# %%
x = rng.standard_normal((2, 5, 8))  # (B, T, in)
W = rng.standard_normal((6, 8))  # (out, in)
b = rng.standard_normal(6)
y, cache = ops.linear_forward(x, W, b)
assert np.allclose(y, np.einsum("bti,oi->bto", x, W) + b)  # the same sum, written another way
dy = rng.standard_normal(y.shape)
dx, dW, db = ops.linear_backward(dy, cache)
print("y", y.shape, " dx", dx.shape, " dW", dW.shape, " db", db.shape)
assert dx.shape == x.shape and dW.shape == W.shape and db.shape == b.shape

# %% [markdown]
# Now the gradient check. `gradcheck.check_op` perturbs every coordinate of each
# input by +-h and +-2h, evaluates the fake loss, and applies the five-point stencil
#
# $$f'(x) \approx \frac{-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)}{12h}, \qquad \text{error } O(h^4).$$
#
# It reports `rel_error` $= \max |a - n| / \max(|a| + |n|, 10^{-8})$ between the analytic
# gradient `a` and the numerical one `n`. In float64 a correct backward lands orders of
# magnitude below 1e-6; a wrong one typically gives 1e-2 or more. We assert <= 1e-6
# (`gradcheck.TOLERANCE`).

# %%
def check(name, forward, backward, args, wrt, **kw):
    """Run check_op, print one line per argument and assert each passes."""
    results = gradcheck.check_op(name, forward, backward, args, wrt, rng, **kw)
    for r in results:
        print(f"{r.op:12s} d/d{r.argument:3s} {str(r.shape):12s} rel error {r.error:.2e}")
        assert r.error <= gradcheck.TOLERANCE, r
    return results


check("linear", ops.linear_forward, ops.linear_backward, {"x": x, "W": W, "b": b}, {"x": 0, "W": 1, "b": 2})

# %% [markdown]
# ## Layer norm
#
# Over the last axis (C channels) of each row:
#
# $$
# \begin{aligned}
# \text{mean} &= \tfrac{1}{C} \textstyle\sum_i x_i, \quad \text{var} = \tfrac{1}{C} \sum_i (x_i - \text{mean})^2, \quad \text{rstd} = 1 / \sqrt{\text{var} + \epsilon} \\
# \text{norm}_i &= (x_i - \text{mean})\, \text{rstd}, \qquad \text{out}_i = \text{norm}_i\, g_i + b_i
# \end{aligned}
# $$
#
# The gain and bias gradients are immediate: dg = sum_N dout * norm, db = sum_N dout.
#
# For dx, write dnorm = dout * g. Each norm_i depends on x_j three ways: directly,
# through the mean, and through rstd. Using d(mean)/dx_j = 1/C and
# d(rstd)/dx_j = -rstd^3 (x_j - mean) / C = -rstd^2 norm_j / C:
#
# $$\frac{\partial\, \text{norm}_i}{\partial x_j} = \text{rstd} \left(\delta_{ij} - \frac{1}{C} - \frac{\text{norm}_i\, \text{norm}_j}{C}\right)$$
#
# Contract with dnorm_i (sum over i) and the (C, C) Jacobian disappears:
#
# $$dx_j = \text{rstd} \left(\text{dnorm}_j - \text{mean}_i(\text{dnorm}_i) - \text{norm}_j\, \text{mean}_i(\text{dnorm}_i\, \text{norm}_i)\right)$$
#
# Two row means and an elementwise product: O(C) per row instead of O(C^2).
# The cell below checks the forward (each row of `norm` has mean 0 and variance 1)
# and then the derived backward.

# %%
x = 2.0 * rng.standard_normal((2, 5, 8)) + 0.5
g = 1.0 + 0.3 * rng.standard_normal(8)
b = rng.standard_normal(8)
out, (norm, rstd, _) = ops.layer_norm_forward(x, g, b)
print("row means of norm, max |.|:", np.abs(norm.mean(-1)).max(), "  row variances in",
      norm.var(-1).min().round(4), "..", norm.var(-1).max().round(4))
assert np.allclose(norm.mean(-1), 0.0) and np.allclose(norm.var(-1), 1.0, atol=1e-4)  # eps shifts it slightly
check("layer_norm", ops.layer_norm_forward, ops.layer_norm_backward, {"x": x, "g": g, "b": b},
      {"x": 0, "g": 1, "b": 2})

# %% [markdown]
# ## Softmax, and masking with -inf
#
# $$p_i = \frac{\exp(x_i - \max_j x_j)}{\sum_k \exp(x_k - \max_j x_j)}$$
#
# Subtracting the row max changes nothing mathematically (it cancels) and keeps
# `exp` from overflowing. A score of `-inf` gets `exp(-inf) = 0`: probability exactly
# zero, with no magic constant such as `-1e10`.
#
# Backward: $\partial p_i / \partial x_j = p_i (\delta_{ij} - p_j)$, so $dx_j = p_j \left(\text{dout}_j - \sum_i \text{dout}_i\, p_i\right)$.

# %%
scores = np.array([[1000.0, 1001.0, -np.inf, 999.0]])  # naive exp(1000) would overflow
p, _ = ops.softmax_forward(scores)
print("p =", p.round(4), " sum =", p.sum())
assert np.isfinite(p).all() and p[0, 2] == 0.0 and np.isclose(p.sum(), 1.0)
check("softmax", ops.softmax_forward, ops.softmax_backward, {"x": 2.0 * rng.standard_normal((2, 5, 8))}, {"x": 0})

# %% [markdown]
# ## Causal self-attention
#
# Per head, with q, k, v of shape (T, hs):
#
# $$
# \begin{aligned}
# S &= q k^\top / \sqrt{hs}, \qquad S_{tu} = -\infty \text{ for } u > t \quad \text{(no peeking at the future)} \\
# P &= \mathrm{softmax}(S), \qquad \text{out} = P v
# \end{aligned}
# $$
#
# Backward, in mirror order:
#
# $$
# \begin{aligned}
# dP &= \text{dout}\, v^\top, \qquad dv = P^\top \text{dout}, \qquad dS = \mathtt{softmax\_backward}(dP), \\
# dq &= dS\, k / \sqrt{hs}, \qquad dk = dS^\top q / \sqrt{hs}
# \end{aligned}
# $$
#
# Masked entries have P = 0, so their dS is 0: no gradient leaks into the future.
# The cell below checks causality directly: changing the *last* token's q, k, v
# changes no earlier output.

# %%
B_, T_, C_, NH = 2, 5, 8, 2
q, k, v = (rng.standard_normal((B_, T_, C_)) for _ in range(3))
att, (_, _, _, P, _) = ops.attention_forward(q, k, v, NH)
assert np.all(np.triu(P[0, 0], k=1) == 0.0)  # the future gets probability exactly 0
q2, k2, v2 = q.copy(), k.copy(), v.copy()
for a in (q2, k2, v2):
    a[:, -1] += 10.0
att2, _ = ops.attention_forward(q2, k2, v2, NH)
print("max change at positions 0..T-2:", np.abs(att2[:, :-1] - att[:, :-1]).max(),
      "  at T-1:", np.abs(att2[:, -1] - att[:, -1]).max().round(3))
assert np.array_equal(att2[:, :-1], att[:, :-1])
print("attention weights of head 0 (rows: query t, columns: key u):\n", P[0, 0].round(3))
check("attention", lambda q, k, v: ops.attention_forward(q, k, v, NH), ops.attention_backward,
      {"q": q, "k": k, "v": v}, {"q": 0, "k": 1, "v": 2})

# %% [markdown]
# ## GELU
#
# $$
# \begin{aligned}
# \mathrm{gelu}(x) &= 0.5\, x\, (1 + \tanh u), \qquad u = \sqrt{2/\pi}\, (x + 0.044715\, x^3) \\
# \mathrm{gelu}'(x) &= 0.5\, (1 + \tanh u) + 0.5\, x\, (1 - \tanh^2 u) \sqrt{2/\pi}\, (1 + 3 \cdot 0.044715\, x^2)
# \end{aligned}
# $$
#
# (product rule, and $d \tanh u = (1 - \tanh^2 u)\, du$). `gradcheck` avoids x near
# -0.75246, where gelu' = 0 for this tanh form (the erf form's zero is at -0.7518),
# and any relative error is pure noise.

# %%
x = rng.uniform(-3.0, 3.0, (2, 5, 8))
x[np.abs(x + 0.75246) < 0.1] += 0.3
check("gelu", ops.gelu_forward, ops.gelu_backward, {"x": x}, {"x": 0})

# %% [markdown]
# ## Every op at once
#
# `minilora gradcheck` runs the same checks over every op and every argument,
# including the embedding (a scatter-add backward), dropout, the masked
# cross-entropy and the LoRA linear of tutorial 03. The cell below runs that table
# and asserts that every row passes.

# %%
results = gradcheck.run_checks(["ops"])
print(gradcheck.format_results(results))
assert all(r.passed for r in results)
print(f"\n{len(results)} derivatives checked, worst rel error {max(r.error for r in results):.1e}")

# %% [markdown]
# ## Figure: why h = 1e-3 and a five-point stencil
#
# A finite difference has two errors. **Truncation**: the Taylor terms the stencil
# does not cancel, O(h^2) for the two-point (f(x+h) - f(x-h)) / 2h, O(h^4) for the
# five-point one. **Round-off**: f is computed to about 1e-16 relative precision,
# and dividing by h amplifies that to about 1e-16 / h. Their sum is a V on a log-log
# plot; the bottom of the V is the best h. The five-point stencil's V is deeper
# and its bottom sits at a larger h, which is why `gradcheck` can use h = 1e-3.
#
# The left panel shows GELU and its analytic derivative against the five-point
# estimate; the right panel shows the error of both stencils for the fake loss of
# GELU along a random direction u, against step size h.

# %%
xs = np.linspace(-4.0, 4.0, 81 if FAST else 401)
y_gelu, c_gelu = ops.gelu_forward(xs)
analytic = ops.gelu_backward(np.ones_like(xs), c_gelu)
h_plot = 1e-3
f = lambda z: ops.gelu_forward(z)[0]  # noqa: E731
numeric = (-f(xs + 2 * h_plot) + 8 * f(xs + h_plot) - 8 * f(xs - h_plot) + f(xs - 2 * h_plot)) / (12 * h_plot)
assert np.max(np.abs(analytic - numeric)) < 1e-9

x0 = rng.uniform(-2.0, 2.0, 64)
dout = rng.standard_normal(64)
u = rng.standard_normal(64)
exact = np.sum(ops.gelu_backward(dout, ops.gelu_forward(x0)[1]) * u)  # <grad, u>
L = lambda t: np.sum(ops.gelu_forward(x0 + t * u)[0] * dout)  # noqa: E731
hs = np.logspace(-9, -0.5, 18 if FAST else 60)
err2 = np.array([abs((L(h) - L(-h)) / (2 * h) - exact) / abs(exact) for h in hs])
err5 = np.array([abs((-L(2 * h) + 8 * L(h) - 8 * L(-h) + L(-2 * h)) / (12 * h) - exact) / abs(exact) for h in hs])
best2, best5 = hs[np.argmin(err2)], hs[np.argmin(err5)]
print(f"two-point: best h {best2:.1e}, error {err2.min():.1e}")
print(f"five-point: best h {best5:.1e}, error {err5.min():.1e}")
assert err5.min() < err2.min() and best5 > best2  # deeper V, bottom at a larger h

fig = Figure(figsize=(12, 4.5), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.plot(xs, y_gelu, color="C0", label="gelu(x)")
ax1.plot(xs, analytic, color="C1", linewidth=2.5, alpha=0.6, label="gelu'(x), analytic (gelu_backward)")
ax1.plot(xs[::8], numeric[::8], "k.", markersize=6, label="gelu'(x), five-point difference, h = 1e-3")
ax1.axhline(0.0, color="0.6", linewidth=0.6)
ax1.set_xlabel("x")
ax1.set_ylabel("value")
ax1.set_title(f"GELU and its derivative: backward and finite difference agree{NOTE}\n"
              f"(max |difference| = {np.max(np.abs(analytic - numeric)):.1e})", fontsize=10)
ax1.legend(fontsize=8)
ax1.grid(True, alpha=0.3)
ax2.loglog(hs, np.maximum(err2, 1e-17), "o-", markersize=3, label="two-point, truncation O(h^2)")
ax2.loglog(hs, np.maximum(err5, 1e-17), "s-", markersize=3, label="five-point, truncation O(h^4)")
ax2.loglog(hs, 1e-16 / hs, "k:", linewidth=1, label="round-off ~ 1e-16 / h")
ax2.axvline(1e-3, color="C2", linestyle="--", linewidth=1, label="h = 1e-3 (gradcheck)")
ax2.axhline(gradcheck.TOLERANCE, color="C3", linestyle="--", linewidth=1, label="tolerance 1e-6")
ax2.set_ylim(1e-16, 1.0)
ax2.set_xlabel("step size h")
ax2.set_ylabel("relative error of the directional derivative")
ax2.set_title("Finite-difference error vs h: round-off on the left, truncation on the right" + NOTE, fontsize=10)
ax2.legend(fontsize=8, loc="upper center")
ax2.grid(True, which="both", alpha=0.3)
path = os.path.join(FIGURES, "01_gelu_gradient.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## What we have
#
# Every op of the model has a forward, a derived backward, and a gradient check
# that would fail loudly if the derivation were wrong. Tutorial 02 composes them
# into a GPT (`minilora/model.py`, whose backward is the same ops in mirror order)
# and pretrains it.

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to
# predict **before** running, and how to check. The solutions, which run and assert
# their answers, are on [their page](solutions/01_ops_by_hand_solutions.py).
#
# ### Exercise 1.1 (run and read): a gradient check must fail on a wrong backward
#
# Write `buggy_linear_backward(dout, cache)`: call `ops.linear_backward`, then return
# `db / N` (a mean over the N = B T rows instead of a sum, a classic slip). Run it
# through `gradcheck.check_op` exactly as the linear cell above does. **Predict first**
# which of dx, dW, db fail, and the exact relative error of db (hint: every entry of
# the wrong db is the right one divided by N; `rel_error` is |a - n| / (|a| + |n|)).
# Check: dx and dW pass at 1e-6; db's error matches your number to six digits.
#
# ### Exercise 1.2 (predict, then check): what softmax's backward must do
#
# Without computing anything, predict: (a) the sum over the last axis of the `dx`
# that `ops.softmax_backward` returns, for any dout (hint: what does adding a constant
# to every score of a row do to softmax?); (b) dx when dout is the same number at
# every position of a row; (c) whether the (C, C) Jacobian is symmetric, and the sign
# of its eigenvalues. Then check all three numerically: build the Jacobian of one row
# by feeding `softmax_backward` the unit vectors e_1 .. e_C as dout, compare it with
# diag(p) - p p^T, and look at `np.linalg.eigvalsh`.
#
# ### Exercise 1.3 (derive and implement): the masked cross-entropy backward
#
# On paper, derive dL/dz for L = -sum_i m_i log softmax(z_i)[t_i] / sum_i m_i (use the
# Jacobian of exercise 1.2). Then write `my_cross_entropy_backward(logits, targets,
# mask)` in plain NumPy, without calling `ops.cross_entropy_backward`. Check it against
# finite differences with `gradcheck.numerical_gradient_array(f, logits, np.array(1.0))`,
# where `f` returns `ops.cross_entropy_forward(logits, targets, mask)[0]`; it must agree
# to `gradcheck.TOLERANCE` (1e-6, float64). Predict, then check: what is the gradient at
# a masked position, and does a counted position weigh 1/N or 1/(number counted)?
#
# ### Exercise 1.4 (derive and implement): RMSNorm
#
# LLaMA replaces layer norm with RMSNorm: no mean, no bias,
# `out = g * x / sqrt(mean(x^2) + eps)` over the last axis. Derive its backward the way
# the layer-norm section does (dg first; then dx through the 1/rms factor). Write
# `rmsnorm_forward(x, g)` returning `(out, cache)` and `rmsnorm_backward(dout, cache)`
# returning `(dx, dg)`, in the contract of `minilora/ops.py`, and pass
# `gradcheck.check_op` for both x and g at a random float64 point. Before checking,
# predict how your dx formula differs from layer norm's.
