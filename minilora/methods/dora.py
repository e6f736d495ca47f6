"""DoRA (Liu et al. 2024): LoRA's update, then every output row rescaled to a trained length.

    V  = W + s B A                     (out, in)   the LoRA-updated weight, never formed
    n  = ||V_i|| for each row i        (out,)      the length of each output feature's weights
    W' = (m / n)[:, None] * V          (out, in)   direction V_i / n_i, magnitude m_i

so y = x @ W'.T + b = g * (x @ W.T + s (x A^T) B^T) + b with g = m / n, a per-output gain.

An adapter is LoRA's two matrices and one vector beside a frozen linear's weight:

    h.0.attn.q.lora_A                 (r, in)    as LoRA (Kaiming-uniform)
    h.0.attn.q.lora_B                 (out, r)   zero
    h.0.attn.q.lora_magnitude_vector  (out,)     m, starts at the row norms of W (PEFT's name)

B = 0 gives V = W and n = m, so g = 1 and W' = W: the adapted model starts exactly at the base.

The paper's notation. The paper writes W0 in R^{d x k} with W' = m (W0 + BA) / ||W0 + BA||_c, the norm
"of each column", m in R^{1 x k}. Its k columns are the output features (the y = x W convention of its
code), so its column norm is the norm of each output feature's weights: per row of our (out, in) W,
as PEFT computes it (weight.norm(p=2, dim=1)); its m is our m (out,).

The row norms without V. Squared, row i of V is

    n_i^2 = ||W_i||^2 + 2 s (W_i . (B A)_i) + s^2 ||(B A)_i||^2
          = ||W_i||^2 + 2 s sum_j P_ij B_ij + s^2 sum_j (B G)_ij B_ij,    P = W A^T (out, r), G = A A^T (r, r)

since W_i . (B A)_i = sum_j B_ij (A W_i^T)_j and ||(B A)_i||^2 = B_i G B_i^T. Only products of shape
(out, r) and (r, r) are formed (row_norms below); ||W_i||^2 is an elementwise sum over the frozen W.

The backward, exact. With u = x W^T (N, out), xa = drop(x) A^T (N, r), z = u + s xa B^T, y = g z + b:

    dz = dy * g                       dg = sum over N of dy * z       (out,)
    dm = dg / n                       dn = -dg m / n^2               (g = m / n)
    dq = dn / (2 n)                   (n = sqrt(q), q = n^2 above)
    dP = 2 s dq B                     dG = s^2 B^T (dq B)             (q's two product terms)
    dB = 2 s dq P + 2 s^2 dq (B G) + s dz^T xa                        (q's terms, then z's)
    dA = dP^T W + 2 dG A + (s dz B)^T drop(x)                         (P = W A^T, G = A A^T symmetric; z)
    dx = dz W + drop_backward((s dz B) A)

(dq B means each row of B times dq_i.) The variant the paper proposes to save memory, and PEFT runs,
treats n as a constant in the backward (`detach_norm`): dm = dg / n still, but dn, and with it every
term through P and G, is dropped. It is then not the gradient of the loss: the float64 checks show
the exact backward matches finite differences and the detached one does not.
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from .. import ops
from ..backend import array_module
from . import LinearPair, Method, register
from .lora import (TARGETS, LoraConfig, adapted_layers, adapter_methods_extra_shapes, adapter_names, adapter_setup,
                   add_lora, check_adapter, check_lora_settings, gradcheck_point, lora_param_count, lora_scale,
                   variant_adapter_config)

MAGNITUDE = "lora_magnitude_vector"


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's settings, and whether the backward treats the row norm as a constant."""

    method: ClassVar[str] = "dora"
    label: ClassVar[str] = "DoRA"
    # the settings a variant adds to LoRA's, as CLI flags: field -> help (cli.py adds --detach-norm)
    FLAGS: ClassVar[dict] = {"detach_norm": "DoRA: treat the row norm as a constant in the backward "
                                            "(the paper's memory saving, PEFT's default); not the exact gradient"}
    detach_norm: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.detach_norm, bool):
            raise ValueError(f"detach_norm: expected True or False, got {self.detach_norm!r}")

    def layer_shapes(self, d_out, d_in):
        return {**super().layer_shapes(d_out, d_in), MAGNITUDE: (d_out,)}

    def count_formula(self, d, k):
        return (f"r (d + k) + d = {self.rank} x ({d} + {k}) + {d}", lora_param_count(d, k, self.rank) + d)


def row_norms(W, A, B, scale):
    """||W_i + s (B A)_i|| for every row i, from products of shape (out, r) and (r, r) only.

    Inputs: W (out, in), A (r, in), B (out, r), scale s. Returns (n (out,), P = W A^T (out, r),
    G = A A^T (r, r)); the backward reuses P and G.
    """
    P = W @ A.T  # (out, r)
    G = A @ A.T  # (r, r)
    q = (W * W).sum(axis=1)  # ||W_i||^2, elementwise over the frozen W: no product
    q += (2.0 * scale) * (P * B).sum(axis=1)  # 2 s W_i . (B A)_i
    q += (scale * scale) * ((B @ G) * B).sum(axis=1)  # s^2 ||(B A)_i||^2
    return q ** 0.5, P, G


def _combine(u, xa, W, b, A, B, m, scale):
    """y = (m / n) * (u + s xa B^T) + b, given u = x W^T (N, out), ours, and xa (N, r)."""
    n, P, G = row_norms(W, A, B, scale)
    z = u
    z += (xa * scale) @ B.T  # z = u + s xa B^T, in u's buffer
    g = m / n  # (out,)
    y = z * g.reshape((1,) * (z.ndim - 1) + (-1,))
    if b is not None:
        y += b
    return y, (z, xa, W, A, B, m, n, P, G, float(scale))


def _combine_backward(dy, core, detach_norm):
    """The backward of _combine: (dz (N, out), dxa (N, r), dA from the norm (r, in) or None, dB, dm)."""
    z, xa, W, A, B, m, n, P, G, s = core
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    z2 = z.reshape(-1, z.shape[-1])
    g = m / n
    # in the forward pass this was: y = g * z + b
    dz = dy2 * g  # (N, out)
    dg = (dy2 * z2).sum(axis=0)  # (out,)
    # g = m / n
    dm = dg / n
    # z = u + s xa B^T
    dB = (dz.T @ xa) * s  # (out, r)
    dxa = (dz @ B) * s  # (N, r)
    if detach_norm:
        return dz.reshape(dy.shape), dxa, None, dB, dm
    dn = -dg * m / (n * n)
    # n = sqrt(q)
    dq = (dn / (2.0 * n))[:, None]  # (out, 1), broadcast along each row
    # q = ||W_i||^2 + 2 s rowsum(P * B) + s^2 rowsum((B G) * B)
    dP = (2.0 * s) * dq * B  # (out, r)
    dB += (2.0 * s) * dq * P
    dB += (2.0 * s * s) * dq * (B @ G)  # G symmetric: d/dB of rowsum((B G) * B) is 2 B G
    dG = (s * s) * (B.T @ (dq * B))  # (r, r), symmetric
    # P = W A^T and G = A A^T
    dA = dP.T @ W  # (r, in)
    dA += 2.0 * (dG @ A)
    return dz.reshape(dy.shape), dxa, dA, dB, dm


def dora_linear_forward(x, W, b, A, B, m, scale, dropout_p=0.0, rng=None, dropout_mask=None, detach_norm=False):
    """A frozen linear with DoRA's update, never merged:

        y = (m / n) * (x @ W.T + s (drop(x) @ A.T) @ B.T) + b,   n = row_norms(W, A, B, s)

    Inputs:
    - x: (N..., in); W: (out, in) frozen; b: (out,) frozen, or None
    - A: (r, in), B: (out, r), m: (out,) the adapter
    - scale: s = alpha / r; dropout_p, rng, dropout_mask: dropout on the adapter's input only
    - detach_norm: the backward treats n as a constant (see the module docstring)

    Returns y (N..., out) and a cache. Neither B A nor W + s B A is formed.
    """
    check_adapter(x, A, B, *W.shape)
    ops._check_float("m", m, like=x)
    if m.shape != (W.shape[0],):
        ops._fail("m", f"shape ({W.shape[0]},) = (out,)", f"shape {tuple(m.shape)}")
    u, base_cache = ops.linear_forward(x, W, None, frozen=True)  # W frozen: its backward needs no x
    xd, drop_cache = ops.dropout_forward(x, dropout_p, rng, dropout_mask)
    xa = xd.reshape(-1, xd.shape[-1]) @ A.T  # (N, r)
    y, core = _combine(u.reshape(-1, u.shape[-1]), xa, W, b, A, B, m, scale)
    return y.reshape(u.shape), (base_cache, drop_cache, xd, core, bool(detach_norm))


def dora_linear_backward(dout, cache, input_grad=True):
    """Returns (dx, dA, dB, dm); no dW: W is frozen. input_grad=False skips dx (None)."""
    base_cache, drop_cache, xd, core, detach_norm = cache
    dz, dxa, dA_norm, dB, dm = _combine_backward(dout, core, detach_norm)
    # in the forward pass this was: xa = drop(x) @ A^T
    dA = dxa.T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    if dA_norm is not None:
        dA += dA_norm
    if not input_grad:
        return None, dA, dB, dm
    # and u = x @ W^T, frozen: dx only
    dx, _, _ = ops.linear_backward(dz, base_cache, param_grads=False)
    A = core[3]
    dx += ops.dropout_backward((dxa @ A).reshape(dx.shape), drop_cache)
    return dx, dA, dB, dm


def dora_shared_input_forward(x, layers, scale, detach_norm=False):
    """DoRA linears that read the same x (q, k, v): their x A_i^T as one product, as LoRA's.

    layers: a list of (W_i, b_i, A_i, B_i, m_i), all with the same r. Returns ys and a cache.
    """
    xp = array_module(x)
    A_all = xp.concatenate([layer[2] for layer in layers])  # (n r, in)
    r = layers[0][2].shape[0]
    xa = x.reshape(-1, x.shape[-1]) @ A_all.T  # (N, n r), one product for the n adapters
    ys, caches = [], []
    for i, (W, b, A, B, m) in enumerate(layers):
        if A.shape[0] != r:
            ops._fail("A", f"rank r = {r} for every layer (the first layer's)", f"shape {tuple(A.shape)}")
        u, c = ops.linear_forward(x, W, None, frozen=True)
        y, core = _combine(u.reshape(-1, u.shape[-1]), xa[:, i * r:(i + 1) * r], W, b, A, B, m, scale)
        ys.append(y.reshape(u.shape))
        caches.append((c, core))
    return ys, (x, A_all, caches, bool(detach_norm))


def dora_shared_input_backward(douts, cache, input_grad=True):
    """Returns (dx or None, dAs, dBs, dms): one product for the A's gradients and one for their dx share."""
    x, A_all, caches, detach_norm = cache
    xp = array_module(x)
    parts = [_combine_backward(dout, core, detach_norm) for dout, (_, core) in zip(douts, caches)]
    dxa = xp.concatenate([p[1] for p in parts], axis=1)  # (N, n r)
    # in the forward pass this was: xa = x @ A_all^T
    dA_all = dxa.T @ x.reshape(-1, x.shape[-1])  # (n r, in)
    r = A_all.shape[0] // len(caches)
    dAs = [dA_all[i * r:(i + 1) * r] for i in range(len(caches))]
    if not detach_norm:
        for dA, p in zip(dAs, parts):
            dA += p[2]  # the norm's share (a view of dA_all, ours)
    dBs, dms = [p[3] for p in parts], [p[4] for p in parts]
    if not input_grad:
        return None, dAs, dBs, dms
    dx = (dxa @ A_all).reshape(x.shape)
    for p, (c, _) in zip(parts, caches):
        dx += ops.linear_backward(p[0], c, param_grads=False)[0]  # u_i = x @ W_i^T, frozen
    return dx, dAs, dBs, dms


def add_dora(params, model_config, dora_config, seed=0):
    """LoRA's A and B (add_lora, the same draws), and m = the row norms of W, beside every target.

    Returns (params, config) as add_lora: a new dict sharing the base arrays, config.lora = dora_config.
    """
    if not isinstance(dora_config, DoraConfig):
        raise ValueError(f"dora_config: expected a DoraConfig, got {type(dora_config).__name__}")
    out, config = add_lora(params, model_config, dora_config, seed)
    for prefix in adapted_layers(config, dora_config):
        W = out[prefix + ".W"]
        out[f"{prefix}.{MAGNITUDE}"] = (W * W).sum(axis=1) ** 0.5  # the same sum row_norms makes: g = 1 at B = 0
    return out, config


def merged_weight(params, config, prefix):
    """W' = (m / n)[:, None] (W + s B A) of one adapted linear: the (out, in) matrix, for merge only."""
    W, A, B = params[prefix + ".W"], params[prefix + ".lora_A"], params[prefix + ".lora_B"]
    m, s = params[f"{prefix}.{MAGNITUDE}"], config.lora.scale
    n, _, _ = row_norms(W, A, B, s)
    return (m / n)[:, None] * (W + s * (B @ A))


def _check_dora(config):
    if not isinstance(config.lora, DoraConfig):
        got = "None" if config.lora is None else f"{config.lora.method} adapters"
        raise ValueError(f"config: expected the config of a DoRA model (a DoraConfig in config.lora), got {got}")


def merge(params, config):
    """W' = (m / n) (W + s B A) in place of each adapted W, and no adapters: the same function at the
    base model's cost. Returns (params, config) with config.lora = None.

    Unlike LoRA's, this merge cannot be undone from the merged W and the adapters alone: W'_i has
    length m_i whatever n_i was, so n is lost (PEFT keeps it in a cache); unmerge takes it back.
    """
    _check_dora(config)
    out = {n: p for n, p in params.items() if n not in set(adapter_names(config))}
    for prefix in adapted_layers(config, config.lora):
        out[prefix + ".W"] = merged_weight(params, config, prefix)
    return out, replace(config, lora=None)


def norms_for_unmerge(params, config):
    """prefix -> n (out,), the row norms merge divides by: what unmerge needs to undo it."""
    _check_dora(config)
    return {prefix: row_norms(params[prefix + ".W"], params[prefix + ".lora_A"], params[prefix + ".lora_B"],
                              config.lora.scale)[0]
            for prefix in adapted_layers(config, config.lora)}


def unmerge(merged, config, adapters, dora_config, norms):
    """The inverse of merge: W = (n / m) W' - s B A for each adapter, and the adapters put back.

    norms: norms_for_unmerge(params, config) of the model before merging. Returns (params, config).
    """
    s = dora_config.scale
    out = dict(merged)
    for prefix in adapted_layers(config, dora_config):
        m = adapters[f"{prefix}.{MAGNITUDE}"]
        V = (norms[prefix] / m)[:, None] * merged[prefix + ".W"]
        out[prefix + ".W"] = V - s * (adapters[prefix + ".lora_B"] @ adapters[prefix + ".lora_A"])
    out.update(adapters)
    return out, replace(config, lora=dora_config)


# the seam (methods/__init__.py): DoRA's pair for the model, and the method for finetune and the tools


def _layer(params, prefix):
    return (params[prefix + ".W"], params.get(prefix + ".b"), params[prefix + ".lora_A"], params[prefix + ".lora_B"],
            params[f"{prefix}.{MAGNITUDE}"])


def _pair_forward(params, prefix, x, settings, train, rng, trainable):
    p = settings.dropout if train else 0.0
    return dora_linear_forward(x, *_layer(params, prefix), settings.scale, p, rng, detach_norm=settings.detach_norm)


def _pair_backward(dout, cache, prefix, trainable, input_grad):
    dx, dA, dB, dm = dora_linear_backward(dout, cache, input_grad=input_grad)
    return dx, {"lora_A": dA, "lora_B": dB, MAGNITUDE: dm}


def _shared_forward(params, prefixes, x, settings, train):
    if train and settings.dropout != 0.0:
        return None
    return dora_shared_input_forward(x, [_layer(params, n) for n in prefixes], settings.scale, settings.detach_norm)


def _shared_backward(douts, cache, input_grad):
    dx, dAs, dBs, dms = dora_shared_input_backward(douts, cache, input_grad=input_grad)
    return dx, [{"lora_A": a, "lora_B": b, MAGNITUDE: m} for a, b, m in zip(dAs, dBs, dms)]


def _delta(params, config, base, prefix):
    """W' - W0 (the (out, in) matrix, for the sweep's delta norms, never in a training step)."""
    return merged_weight(params, config, prefix) - base[prefix + ".W"]


DORA_PAIR = LinearPair("dora", _pair_forward, _pair_backward, _shared_forward, _shared_backward, _delta)


_adapter_config = variant_adapter_config(DoraConfig)  # config.lora as given, or LoRA's settings as a DoraConfig
_setup = adapter_setup(add_dora)


def _magnitude_near_row_norms(name, array, noise):
    """m away from the row norms (g != 1), every other adapter array the noise itself (B != 0)."""
    return array * (1.0 + 0.5 * noise) if name.endswith(MAGNITUDE) else noise


def _gradcheck_setup(params, config, rng, dora_config=None):
    """DoRA on every linear, rank 2, at a random point: B != 0 (else dA = 0), m away from the row norms."""
    settings = dora_config or DoraConfig(rank=2, alpha=3.0, targets=tuple(TARGETS))
    return gradcheck_point(add_dora, params, config, settings, rng, _magnitude_near_row_norms)


def _op_checks(rng, xp=np):
    """dora_linear (exact backward) against finite differences: x, A, B, m, with adapter dropout."""
    from ..backend import to_device
    from ..gradcheck import check_op

    def n(shape):
        return to_device(rng.standard_normal(shape), xp)

    N, T, C, r, out_f = 2, 5, 8, 3, 6
    mask = to_device(rng.random((N, T, C)) >= 0.25, xp)
    s = lora_scale(r, 2.0 * r)
    m = to_device(1.0 + rng.random(out_f), xp)
    return check_op("dora_linear",
                    lambda x, W, b, A, Bm, m: dora_linear_forward(x, W, b, A, Bm, m, s, 0.25, dropout_mask=mask),
                    dora_linear_backward,
                    {"x": n((N, T, C)), "W": n((out_f, C)), "b": n(out_f), "A": n((r, C)), "B": n((out_f, r)),
                     "m": m},
                    {"x": 0, "A": 1, "B": 2, "m": 3}, rng)


DORA = register(
    Method("dora", "DoRA: LoRA's update with a trained length m per output row (--detach-norm: the paper's "
                   "cheaper backward)", 3e-3, _setup, check=check_lora_settings, adapter_config=_adapter_config,
           extra_shapes=adapter_methods_extra_shapes("dora"), owns=lambda name: name.endswith(f".{MAGNITUDE}"),
           merge=merge, saves_adapter=True, study_lrs=(1e-3, 3e-3, 1e-2, 3e-2), gradcheck_setup=_gradcheck_setup,
           op_checks=_op_checks, color="tab:red"),
    pair=DORA_PAIR, config_type=DoraConfig)

