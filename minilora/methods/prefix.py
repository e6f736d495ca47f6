"""Prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022): P trainable keys and values in every layer.

Prompt tuning puts P vectors before the input only; every layer above has to carry their effect up through
frozen weights. Prefix tuning gives every attention layer its own P keys and P values, put before that
layer's real keys and values, so every layer can be steered directly. Every weight of the model stays frozen.

Parameters, per layer i (P = n_prefix, C = d_model = NH * hs):

    h.{i}.attn.prefix_k   (P, C)   P keys; columns h*hs .. (h+1)*hs - 1 are head h's, as in k (B, T, C)
    h.{i}.attn.prefix_v   (P, C)   P values, the same layout

    trainable count: 2 L P C   (the keys and the values, P vectors of C per layer; hs * NH = C)

(P, C) is the layout of k itself: the prefix is P more rows of the layer's key and value outputs, shared by
every sequence of a batch. PEFT keeps the same numbers as one (P, 2 L C) embedding, reshaped to
(B, NH, P, hs) per layer and per key / value.

The attention with prefix columns, per sequence and head (q_t, k_u, v_u the real tokens' query, key and
value, p_j, w_j the prefix's key and value, j = 1..P; a scale 1/sqrt(hs)):

    s[t, j]     = q_t . p_j / sqrt(hs)                       every query sees every prefix column
    s[t, P + u] = q_t . k_u / sqrt(hs) for u <= t, -inf for u > t   the causal mask among real tokens only
    a[t]        = softmax(s[t])                               over P + T columns
    out_t       = sum_j a[t, j] w_j + sum_{u <= t} a[t, P + u] v_u

The real tokens keep positions 0..T-1 (model.forward adds wpe[:T] exactly as in pretraining; the prefix has
no position, it is not a token). So context_length bounds the real tokens only, and a prefix of any length
fits beside any record. With PEFT's positions (`finetune --peft-positions`, ModelConfig.peft_positions) the
real tokens are P..P+T-1 instead (model.forward adds wpe[P:P+T]), as GPT-2 numbers them after PEFT's
past_key_values of length P; the attention above is the same, so only the embedding changes, and P + T must
fit the context.

Backward. With dout_t the gradient of out_t, and c running over all P + T columns (key_c, val_c the column's
key and value):

    in the forward pass this was out_t = sum_c a[t, c] val_c, so
        da[t, c] = dout_t . val_c                 and    dval_c += a[t, c] dout_t
    a[t] = softmax(s[t]), so
        ds[t, c] = a[t, c] (da[t, c] - D_t),     D_t = sum_c a[t, c] da[t, c] = dout_t . out_t
    s[t, c] = q_t . key_c / sqrt(hs), so
        dq_t = sum_c ds[t, c] key_c / sqrt(hs),  dkey_c += ds[t, c] q_t / sqrt(hs)

Split by column kind:

    dk_u = sum_{t >= u} ds[t, P + u] q_t / sqrt(hs)     dv_u = sum_{t >= u} a[t, P + u] dout_t
    dp_j = sum_b sum_t  ds[t, j] q_t / sqrt(hs)          dw_j = sum_b sum_t  a[t, j] dout_t

The real columns are masked (a = 0, hence ds = 0, for u > t), so only queries t >= u reach key u; the
prefix columns are never masked, so every query of every sequence (the sum over b: one prefix serves the
whole batch) reaches every prefix vector. As in ops.attention_forward the scores are computed by blocks of
queries (ops._causal_blocks): block t0..t1-1 computes its P prefix columns and its real columns :t1, and
only the real columns t0..t1-1 get the mask.

Pruning. When nothing below a layer's attention trains (the lowest layer, when only prefixes train), its
backward forms only dp and dw, from dS over the P prefix columns: dq, dk, dv, the real columns' dS and their
products are skipped (input_grads=False).

Reparametrisation. Li & Liang train the prefix through an MLP (P, C) -> (P, 2 L C) and drop it after, because
optimising the prefix directly was unstable for their large models. It is left out here: P-tuning v2 trains
the prefix directly and reports the reparametrisation's benefit to depend on the task, and here the prefix
starts from the keys and values the layer computes for real tokens (add_prefix), Li & Liang's own remedy for
a poor start. Whether an MLP would help at this scale is not measured here.

Export. PEFT's prefix tuning hands the prefix to GPT-2 as past_key_values, and GPT-2 then numbers the real
tokens P..P+T-1 (PEFT even shifts given position_ids by P), while minilora keeps them at 0..T-1: not the same
function, so bridge.check_exportable refuses a prefix run, unless it was trained with PEFT's positions. Then
PEFT's mask (ones over the P prefix columns, causal among the real tokens) is the one above, and the run
exports exactly as a PrefixTuningConfig (peft_prompt.py).
"""

import math
from dataclasses import replace

import numpy as np

from .. import ops
from ..backend import array_module, to_numpy
from ..ops import _causal_blocks, _check_float, _fail, _softmax_in_place
from . import AttentionPair, Method, register

SUFFIXES = ("prefix_k", "prefix_v")


def prefix_names(config):
    """The prefix names of every layer (none when config.n_prefix is 0)."""
    if not config.n_prefix:
        return []
    return [f"h.{i}.attn.{s}" for i in range(config.n_layers) for s in SUFFIXES]


def prefix_shapes(config):
    """name -> (P, C) for every prefix key and value config describes."""
    return {name: (config.n_prefix, config.d_model) for name in prefix_names(config)}


def prefix_param_count(config):
    """2 L P C: a key and a value of C numbers for each of P positions in each of L layers."""
    return 2 * config.n_layers * config.n_prefix * config.d_model


def add_prefix(params, config, n_prefix, seed=0):
    """A new dict: params (shared) plus every layer's prefix_k, prefix_v (P, C), and the config describing them.

    Init (Li & Liang: a prefix started from real words trains better than a random one): P random tokens'
    embeddings e = wte[ids], and in layer i the key and value that layer computes for them,
    prefix_k = ln_1(e) @ k.W^T, prefix_v = ln_1(e) @ v.W^T + v.b. Exact for layer 0 (up to position), an
    approximation above it, where the residual stream still carries the embedding: the prefix starts among
    keys and values the layer has seen.

    Returns (params, config) with config.n_prefix = P.
    """
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, int) or n_prefix < 1:
        raise ValueError(f"n_prefix: expected a positive integer, got {n_prefix!r}")
    if config.n_prefix:
        raise ValueError(f"config: expected a model without a prefix, got one with n_prefix={config.n_prefix}")
    rng = np.random.default_rng(seed)
    wte = to_numpy(params["wte"])
    xp = array_module(params["wte"])
    e = wte[rng.integers(0, wte.shape[0], n_prefix)]  # (P, C)
    out = dict(params)
    for i in range(config.n_layers):
        p = f"h.{i}."
        a, _ = ops.layer_norm_forward(e, to_numpy(params[p + "ln_1.g"]), to_numpy(params[p + "ln_1.b"]))
        k, _ = ops.linear_forward(a, to_numpy(params[p + "attn.k.W"]))
        v, _ = ops.linear_forward(a, to_numpy(params[p + "attn.v.W"]), to_numpy(params[p + "attn.v.b"]))
        out[p + "attn.prefix_k"] = xp.asarray(k.astype(wte.dtype))
        out[p + "attn.prefix_v"] = xp.asarray(v.astype(wte.dtype))
    return out, replace(config, n_prefix=n_prefix)


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, n_heads):
    """Causal multi-head attention with P prefix keys and values before the real ones.

    Inputs:
    - q, k, v: (B, T, C), C = NH * hs
    - prefix_k, prefix_v: (P, C), the same for every sequence of the batch
    - n_heads: NH

    Returns out (B, T, C) and a cache. Per head (the module docstring has the derivation):
        S = [q p^T, q k^T] / sqrt(hs)     (B, NH, T, P + T); S[t, P + u] = -inf for u > t only
        A = softmax(S)                    every query attends to all P prefix columns and its past
        out = A [w; v]
    The cached A is the whole (B, NH, T, P + T) matrix, 0 where masked.
    """
    xp = array_module(q)
    B, T, C = ops.check_attention_inputs(q, k, v, n_heads)
    for name, a in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check_float(name, a, like=q)
        if a.ndim != 2 or a.shape[1] != C or a.shape != prefix_k.shape:
            _fail(name, f"a (P, {C}) array, the shape of prefix_k {tuple(prefix_k.shape)}", f"shape {tuple(a.shape)}")
    P = prefix_k.shape[0]
    hs = C // n_heads

    def split(a):  # (B, T, C) -> (B, NH, T, hs)
        return a.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)

    def heads(a):  # (P, C) -> (B, NH, P, hs), the same prefix for every sequence
        return xp.broadcast_to(a.reshape(P, n_heads, hs).transpose(1, 0, 2), (B, n_heads, P, hs))

    qh = split(q)
    # keys and values with the prefix first: column c < P is prefix vector c, column P + u is token u
    kk = xp.concatenate([heads(prefix_k), split(k)], axis=2)  # (B, NH, P + T, hs)
    vv = xp.concatenate([heads(prefix_v), split(v)], axis=2)
    scale = 1.0 / math.sqrt(hs)
    blocks = _causal_blocks(T)
    size = blocks[0][1]
    future = xp.triu(xp.full((size, size), -xp.inf, dtype=q.dtype), k=1)
    A = xp.empty((B, n_heads, T, P + T), dtype=q.dtype)
    out = xp.empty((B, T, C), dtype=q.dtype)
    outh = split(out)  # a (B, NH, T, hs) view: the products write the heads straight into out
    for b in range(B):
        for t0, t1 in blocks:
            A[b, :, t0:t1, P + t1:] = 0.0  # real keys t1.. are in these queries' future: never computed
            S = A[b, :, t0:t1, :P + t1]  # (NH, t1 - t0, P + t1): the P prefix columns and real keys :t1
            # S = [q p^T, q k^T] / sqrt(hs); the scale goes on q
            xp.matmul(qh[b, :, t0:t1] * scale, kk[b, :, :P + t1].transpose(0, 2, 1), out=S)
            # the mask only on the real columns t0..t1-1 (the prefix columns are never masked)
            S[:, :, P + t0:] += future[:t1 - t0, :t1 - t0]
            # A = softmax(S) over all P + t1 columns, in place
            S -= S.max(axis=-1, keepdims=True)
            _softmax_in_place(S)
            xp.matmul(S, vv[b, :, :P + t1], out=outh[b, :, t0:t1])  # out = A [w; v], (NH, t1 - t0, hs)
    return out, (qh, kk, vv, A, outh)


def prefix_attention_backward(dout, cache, input_grads=True):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v): (B, T, C) three times, then (P, C) twice.

    input_grads=False: dq, dk, dv are None and never computed (nothing below needs them), nor is dS over the
    real columns: only the prefix columns' dS reaches a trained name. The derivation is in the module docstring.
    """
    qh, kk, vv, A, outh = cache
    B, NH, T, hs = qh.shape
    P = kk.shape[2] - T
    xp = array_module(dout)
    scale = 1.0 / math.sqrt(hs)

    def split(a):  # (B, T, C) -> (B, NH, T, hs), a view
        return a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)

    douth = split(dout)
    dq = dk = dv = None
    if input_grads:
        dq, dk, dv = (xp.empty((B, T, NH * hs), dtype=dout.dtype) for _ in range(3))
        dqh, dkh, dvh = split(dq), split(dk), split(dv)  # the products write the heads straight into dq, dk, dv
        dS = xp.empty((NH, T, P + T), dtype=dout.dtype)  # one sequence's dS, reused
    dpkh = xp.zeros((NH, P, hs), dtype=dout.dtype)
    dpvh = xp.zeros((NH, P, hs), dtype=dout.dtype)
    # D[t] = sum_c dA[t, c] A[t, c] = dout_t . out_t (the prefix columns included: out holds their share)
    D = (douth * outh).sum(axis=-1, keepdims=True)  # (B, NH, T, 1)
    blocks = _causal_blocks(T)
    for b in range(B):
        if input_grads:
            for t0, t1 in blocks:
                Ab = A[b, :, t0:t1, :P + t1]
                dSb = dS[:, t0:t1, :P + t1]
                # in the forward pass this was: out = A [w; v], so dA = dout [w; v]^T
                xp.matmul(douth[b, :, t0:t1], vv[b, :, :P + t1].transpose(0, 2, 1), out=dSb)
                # A = softmax(S): dS = A * (dA - D); masked entries have A = 0, so their dS is 0
                dSb -= D[b, :, t0:t1]
                dSb *= Ab
                dSb *= scale  # S = [q p^T, q k^T] * scale: the scale goes on dS once
                xp.matmul(dSb, kk[b, :, :P + t1], out=dqh[b, :, t0:t1])  # dq = dS [p; k]
            dSp = dS[:, :, :P]  # (NH, T, P), the prefix columns
        else:
            # the same lines over the P prefix columns only: dA = dout w^T, dS = A * (dA - D) * scale
            dSp = douth[b] @ vv[b, :, :P].transpose(0, 2, 1)  # (NH, T, P)
            dSp -= D[b]
            dSp *= A[b, :, :, :P]
            dSp *= scale
        # the prefix columns are seen by every query: dp = dS[:, :P]^T q, dw = A[:, :P]^T dout,
        # summed over the sequences of the batch (one prefix serves them all)
        dpkh += dSp.transpose(0, 2, 1) @ qh[b]
        dpvh += A[b, :, :, :P].transpose(0, 2, 1) @ douth[b]
        if input_grads:
            for u0, u1 in blocks:
                # real keys u0..u1-1 are seen by queries t >= u0 only: dv = A^T dout, dk = dS^T q over them
                xp.matmul(A[b, :, u0:, P + u0:P + u1].transpose(0, 2, 1), douth[b, :, u0:], out=dvh[b, :, u0:u1])
                xp.matmul(dS[:, u0:, P + u0:P + u1].transpose(0, 2, 1), qh[b, :, u0:], out=dkh[b, :, u0:u1])
    # (NH, P, hs) -> (P, C), head h in columns h*hs .. (h+1)*hs - 1
    dpk = dpkh.transpose(1, 0, 2).reshape(P, NH * hs)
    dpv = dpvh.transpose(1, 0, 2).reshape(P, NH * hs)
    return dq, dk, dv, dpk, dpv


# the seam (methods/__init__.py): the attention pair the model runs when config.n_prefix > 0


def _attention_forward(params, prefix, q, k, v, config):
    return prefix_attention_forward(q, k, v, params[prefix + ".prefix_k"], params[prefix + ".prefix_v"],
                                    config.n_heads)


def _attention_backward(dout, cache, prefix, trainable, input_grad):
    dq, dk, dv, dpk, dpv = prefix_attention_backward(dout, cache, input_grads=input_grad)
    return ((dq, dk, dv) if input_grad else None), {"prefix_k": dpk, "prefix_v": dpv}


PREFIX_ATTENTION = AttentionPair("prefix", _attention_forward, _attention_backward)


def _setup(base_params, model_config, config, tokenizer=None):
    params, model_config = add_prefix(base_params, model_config, config.n_prefix, seed=config.seed)
    if config.peft_positions:
        model_config = replace(model_config, peft_positions=True)
    return params, model_config, set(prefix_names(model_config))


def _model_settings(config):
    """The ModelConfig fields a prefix run sets: n_prefix, and peft_positions when asked for (not at the default)."""
    return {"n_prefix": config.n_prefix, **({"peft_positions": True} if config.peft_positions else {})}


def _check(model_config, config, longest):
    n = config.n_prefix
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_prefix: expected a positive integer, got {n!r}")
    room = model_config.context_length - longest
    if config.peft_positions and n > room:
        raise ValueError(f"n_prefix: expected at most context_length - longest record = "
                         f"{model_config.context_length} - {longest} = {room} prefix vectors with peft_positions "
                         f"(the real tokens start at position P), got {n}")


def _extra_shapes(config, params):
    return prefix_shapes(config)


def _gradcheck_setup(params, config, rng):
    """A prefix of 3 in every layer at a random O(1) point (the init is fine too, but random is harder)."""
    prefixed, prefixed_config = add_prefix(params, config, 3, seed=3)
    for name in prefix_names(prefixed_config):
        prefixed[name] = 0.5 * rng.standard_normal(prefixed[name].shape)
    return prefixed, prefixed_config, set(prefix_names(prefixed_config))


def _gradcheck_peft_positions(params, config, rng):
    """PEFT's positions: the real tokens at P..P+T-1, in a context 3 longer (gradcheck.longer_context), and wpe
    trained too, so that its shifted rows are checked."""
    from ..gradcheck import longer_context

    params, config = longer_context(params, replace(config, peft_positions=True), 3, rng)
    prefixed, config, trainable = _gradcheck_setup(params, config, rng)
    return prefixed, config, trainable | {"wpe"}


def _op_checks(rng, xp=np):
    """The attention with prefix columns against finite differences: q, k, v and both prefixes, every coordinate.

    T = 5 is cut into blocks of 2 queries (ops._CAUSAL_BLOCK patched for the check), so the prefix columns
    are checked joining several blocks, as they do at T > 64 in training.
    """
    from ..backend import to_device
    from ..gradcheck import check_op

    def n(shape):
        return to_device(rng.standard_normal(shape), xp)

    B, T, C, NH, P = 2, 5, 8, 2, 3
    saved = ops._CAUSAL_BLOCK
    ops._CAUSAL_BLOCK = 2
    try:
        return check_op("prefix_attention",
                        lambda q, k, v, pk, pv: prefix_attention_forward(q, k, v, pk, pv, NH),
                        prefix_attention_backward,
                        {"q": n((B, T, C)), "k": n((B, T, C)), "v": n((B, T, C)), "prefix_k": n((P, C)),
                         "prefix_v": n((P, C))},
                        {"q": 0, "k": 1, "v": 2, "prefix_k": 3, "prefix_v": 4}, rng)
    finally:
        ops._CAUSAL_BLOCK = saved


def count_report(params, trainable, config):
    """The prefix's count with its formula, checked: raises AssertionError if the arrays hold another number."""
    counted = int(sum(params[n].size for n in prefix_names(config) if n in trainable))
    L, P, C = config.n_layers, config.n_prefix, config.d_model
    total = prefix_param_count(config)
    if counted != total:
        raise AssertionError(f"prefix parameter count {counted} does not match the formula 2 L P C: {total}")
    return f"prefix: 2 L P C = 2 x {L} x {P} x {C} = {total:,} (a key and a value per position, head and layer)"


PREFIX = register(Method("prefix", "P trainable keys and values in every attention layer, every weight frozen",
                         1e-2, _setup, check=_check, extra_shapes=_extra_shapes,
                         owns=lambda name: name.endswith(SUFFIXES), saves_adapter=True,
                         study_lrs=(3e-3, 1e-2, 3e-2, 1e-1), gradcheck_setup=_gradcheck_setup,
                         op_checks=_op_checks, count_line=count_report,
                         model_settings=_model_settings, color="tab:olive", peft_positions=True,
                         gradcheck_variants=(("PEFT positions", _gradcheck_peft_positions),)),
                  attention=PREFIX_ATTENTION)
