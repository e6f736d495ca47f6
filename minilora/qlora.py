"""QLoRA: LoRA on a frozen NF4 base (Dettmers et al. 2023).

    y = x @ deq(Q_W).T + b + s * (drop(x) @ A.T) @ B.T

Every linear of the blocks (attention's q, k, v, o and the MLP's fc, proj)
stores its W as NF4 codes with double-quantized absmax scales (nf4.py) in
place of the float array; wte (the embedding and tied LM head), wpe, the
LayerNorms and the biases stay float32, as QLoRA keeps embeddings and norms in
higher precision. The names beside a quantized linear:

    h.0.attn.q.nf4.codes          (out * in / 2,)     uint8, two 4-bit codes a byte
    h.0.attn.q.nf4.absmax_q       (out * in / 64,)    int8, the double-quantized absmax
    h.0.attn.q.nf4.absmax_scale   (ceil(out * in / 64 / 256),) float32
    h.0.attn.q.nf4.absmax_mean    ()                  float32
    h.0.attn.q.lora_A, .lora_B                        the adapter, float32, as in LoRA

The forward dequantizes one layer's W just for its product, and keeps only the
codes in its cache; the backward dequantizes it again for dx = dout @ deq(Q_W).
deq(Q_W) is a constant of the training problem, so there is no dW (nor any
(out, in) product but the two with the dequantized W). The whole base is never
dequantized at once: at any time at most one layer's float W exists.

Merging a quantized base gives a plain float32 model, W' = deq(Q_W) + s B A:
the adapter was trained on top of the dequantized weights, so the merged
model keeps the quantization error (deq(Q_W) - W) together with the update,
and computes exactly the function the QLoRA model computed (no re-quantization:
that would round s B A away).
"""

import math

from . import nf4, ops
from .backend import array_module, to_numpy

FIELDS = nf4.NF4_FIELDS  # codes, absmax_q, absmax_scale, absmax_mean
SUFFIXES = tuple("nf4." + f for f in FIELDS)


def quantized_names(prefix):
    """The names that hold a quantized linear's W: prefix.nf4.codes, ... (FIELDS)."""
    return [f"{prefix}.{s}" for s in SUFFIXES]


def quantized_record(params, prefix):
    """{field: array} of one quantized linear, as nf4.dequantize_nf4 takes it."""
    return {f: params[f"{prefix}.nf4.{f}"] for f in FIELDS}


def quantize_linears(params, prefixes, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """A new dict: each prefix's W replaced by its NF4 record, everything else shared (not copied).

    Quantization runs on the host; the record is put back on W's array module.
    Raises ValueError (one line, naming the layer) when block_size does not divide a W's size.
    """
    out = dict(params)
    for prefix in prefixes:
        W = params[prefix + ".W"]
        xp = array_module(W)
        try:
            q = nf4.quantize_nf4(to_numpy(W), block_size, absmax_block_size)
        except ValueError as e:
            raise ValueError(f"{e} ({prefix}.W, shape {tuple(W.shape)})") from None
        del out[prefix + ".W"]
        for f in FIELDS:
            out[f"{prefix}.nf4.{f}"] = xp.asarray(q[f])
    return out


def dequantized_weight(params, prefix, shape, dtype, block_size=nf4.BLOCK_SIZE,
                       absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """deq(Q_W) of one linear, (out, in) in the given dtype, on its codes' array module."""
    return nf4.dequantize_nf4(quantized_record(params, prefix), shape, dtype, block_size, absmax_block_size)


def stored_bytes(params, prefix):
    """Bytes one quantized linear's W takes: its codes and scales."""
    return int(sum(params[n].nbytes for n in quantized_names(prefix)))


def nf4_linear_forward(x, q, shape, b, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """A frozen linear whose W is stored as NF4: y = x @ deq(Q_W).T + b.

    Inputs:
    - x: (N..., in)
    - q: the layer's NF4 record (nf4.quantize_nf4's dict); shape: (out, in)
    - b: (out,) frozen, or None
    - block_size, absmax_block_size: the record's blocks

    Returns y (N..., out) and a cache that holds the codes, not deq(Q_W) nor x:
    the layer is frozen (no dW needs x) and the backward dequantizes again.
    """
    W = nf4.dequantize_nf4(q, shape, x.dtype, block_size, absmax_block_size)  # (out, in), this layer only
    y, _ = ops.linear_forward(x, W, b, frozen=True)  # the frozen pair's cache (W) is dropped with W
    return y, (q, tuple(shape), block_size, absmax_block_size)


def nf4_linear_backward(dout, cache, input_grad=True):
    """dx of y = x @ deq(Q_W).T + b: dx = dout @ deq(Q_W), and nothing else (W and b are frozen).

    Returns dx (N..., in), or None when input_grad is False (no product at all then).
    """
    if not input_grad:
        return None
    q, shape, block_size, absmax_block_size = cache
    W = nf4.dequantize_nf4(q, shape, dout.dtype, block_size, absmax_block_size)  # again, for this product
    # in the forward pass this was: y = x @ W.T + b, so dx = dout @ W (one 2-D GEMM)
    dx = dout.reshape(-1, dout.shape[-1]) @ W  # (N, in)
    return dx.reshape(dout.shape[:-1] + (W.shape[1],))


def qlora_linear_forward(x, q, shape, b, A, B, scale, dropout_p=0.0, rng=None, dropout_mask=None,
                         block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """LoRA on a frozen NF4 linear: y = x @ deq(Q_W).T + b + s * (drop(x) @ A.T) @ B.T.

    Inputs as lora.lora_linear_forward, with W given as its NF4 record q and its shape (out, in).
    Returns y (N..., out) and a cache (codes, not deq(Q_W)). B @ A is never formed.
    """
    d_out, d_in = shape
    ops._check_float("A", A, like=x)
    ops._check_float("B", B, like=x)
    if A.ndim != 2 or A.shape[1] != d_in:
        ops._fail("A", f"shape (r, {d_in})", f"shape {tuple(A.shape)}")
    if B.shape != (d_out, A.shape[0]):
        ops._fail("B", f"shape ({d_out}, {A.shape[0]}) = (out, r)", f"shape {tuple(B.shape)}")
    y, base_cache = nf4_linear_forward(x, q, shape, b, block_size, absmax_block_size)
    # the adapter, as in lora.lora_linear_forward: xa = drop(x) @ A.T, y += s * xa @ B.T
    xd, drop_cache = ops.dropout_forward(x, dropout_p, rng, dropout_mask)
    xa = xd.reshape(-1, xd.shape[-1]) @ A.T  # (N, r)
    y += ((xa * scale) @ B.T).reshape(y.shape)
    return y, (base_cache, drop_cache, xd, xa, A, B, float(scale))


def qlora_linear_backward(dout, cache, input_grad=True):
    """Returns (dx, dA, dB); no dW: deq(Q_W) is a constant.

        dB = s * dout^T (drop(x) A^T)                  (out, r)
        dA = s * (dout B)^T drop(x)                    (r, in)
        dx = dout @ deq(Q_W) + drop_backward(s * (dout B) A)
    """
    base_cache, drop_cache, xd, xa, A, B, s = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out)
    # in the forward pass this was: y += s * xa @ B.T, with xa (N, r)
    dB = (dout2.T @ xa) * s  # (out, r)
    dxa = (dout2 @ B) * s  # (N, r)
    # and xa = xd @ A.T
    dA = dxa.T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    if not input_grad:
        return None, dA, dB
    dx = nf4_linear_backward(dout, base_cache)  # through deq(Q_W), dequantized again
    dx += ops.dropout_backward((dxa @ A).reshape(dx.shape), drop_cache)
    return dx, dA, dB


def bits_per_param(params, prefixes, shapes):
    """Stored bits per weight of the quantized linears: 8 * their bytes / their weights."""
    n = sum(math.prod(shapes[p]) for p in prefixes)
    return 8.0 * sum(stored_bytes(params, p) for p in prefixes) / n


def merge_weights(params, prefixes, shapes, scale, block_size=nf4.BLOCK_SIZE,
                  absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """A plain float model: W' = deq(Q_W) + s B A where an adapter exists, deq(Q_W) elsewhere.

    Returns a new dict with no NF4 record and no adapter left (float32, on the
    codes' array module, in the dtype of the adapters or of wte).
    """
    dtype = params["wte"].dtype
    drop = {n for p in prefixes for n in quantized_names(p)}
    drop |= {n for n in params if n.endswith((".lora_A", ".lora_B"))}
    out = {n: a for n, a in params.items() if n not in drop}
    for p in prefixes:
        W = dequantized_weight(params, p, shapes[p], dtype, block_size, absmax_block_size)
        if p + ".lora_A" in params:
            W += scale * (params[p + ".lora_B"] @ params[p + ".lora_A"])
        out[p + ".W"] = W
    return out



def qlora_shared_input_forward(x, layers, scale, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE):
    """QLoRA linears that read the same input x (attention's q, k, v), their A products as one.

    lora.lora_shared_input_forward with NF4 bases:

        xa  = x @ [A_1; ...; A_n].T             (N, n r)
        y_i = x @ deq(Q_i).T + b_i + s * xa_i @ B_i.T

    Inputs: x (N..., in); layers, a list of (q_i, shape_i, b_i, A_i, B_i), all with the same r.
    Returns ys, a list of n outputs (N..., out_i), and a cache (codes, not deq(Q_i)).
    """
    xp = array_module(x)
    A_all = xp.concatenate([A for *_, A, _ in layers])  # (n r, in)
    r = layers[0][3].shape[0]
    xa = x.reshape(-1, x.shape[-1]) @ A_all.T  # (N, n r), one product for the n adapters
    ys, caches = [], []
    for i, (q, shape, b, A, B) in enumerate(layers):
        if A.shape[0] != r:
            ops._fail("A", f"rank r = {r} for every layer (the first layer's)", f"shape {tuple(A.shape)}")
        y, c = nf4_linear_forward(x, q, shape, b, block_size, absmax_block_size)  # one layer dequantized
        y += ((xa[:, i * r:(i + 1) * r] * scale) @ B.T).reshape(y.shape)
        ys.append(y)
        caches.append((c, B))
    return ys, (x, xa, A_all, caches, float(scale))


def qlora_shared_input_backward(douts, cache, input_grad=True):
    """Returns (dx, dAs, dBs), as lora.lora_shared_input_backward, each base's dx through deq(Q_i).

        dB_i = s * dout_i^T xa_i,   dxa = [s dout_1 B_1, ..., s dout_n B_n]   (N, n r)
        [dA_1; ...; dA_n] = dxa^T x
        dx = sum_i dout_i @ deq(Q_i) + dxa @ [A_1; ...; A_n]
    """
    x, xa, A_all, caches, s = cache
    xp = array_module(xa)
    r = A_all.shape[0] // len(caches)
    dBs, dxas = [], []
    for i, (dout, (_, B)) in enumerate(zip(douts, caches)):
        dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out_i)
        # in the forward pass this was: y_i += s * xa_i @ B_i.T
        dBs.append((dout2.T @ xa[:, i * r:(i + 1) * r]) * s)  # (out_i, r)
        dxas.append(dout2 @ B)  # (N, r)
    dxa = xp.concatenate(dxas, axis=1)  # (N, n r)
    dxa *= s
    # and xa = x @ A_all.T
    dA_all = dxa.T @ x.reshape(-1, x.shape[-1])  # (n r, in)
    dAs = [dA_all[i * r:(i + 1) * r] for i in range(len(caches))]
    if not input_grad:
        return None, dAs, dBs
    # x fans out to the n bases and the n adapters: dx sums them all
    dx = (dxa @ A_all).reshape(x.shape)  # (N..., in), ours
    for dout, (c, _) in zip(douts, caches):
        dx += nf4_linear_backward(dout, c)  # y_i = x @ deq(Q_i).T + b_i gives dx only
    return dx, dAs, dBs
