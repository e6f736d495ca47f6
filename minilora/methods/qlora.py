"""QLoRA: LoRA on a frozen NF4 base (Dettmers et al. 2023).

    y = x @ deq(Q_W).T + b + s * (drop(x) @ A.T) @ B.T

Every linear of the blocks (attention's q, k, v, o and the MLP's fc, proj)
stores its W as NF4 codes with double-quantized absmax scales (nf4.py) in
place of the float array; wte (the embedding and tied LM head), wpe, the
LayerNorms and the biases stay float32, as QLoRA keeps embeddings and norms in
higher precision. The names beside a quantized linear:

    h.0.attn.q.nf4.codes          (out * in / 2,)     uint8, two 4-bit codes a byte
    h.0.attn.q.nf4.absmax_q       (out * in / 64,)    int8 (uint8 with absmax_code "dynamic"), the double-quantized absmax
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
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np

from .. import ops
from ..backend import array_module, to_numpy
from . import LinearPair, Method, nf4, register
from .lora import (TARGETS, LoraConfig, adapter_backward, adapter_forward, adapter_methods_extra_shapes,
                   adapter_names, add_lora, check_adapter, check_rank, gradcheck_point, owns_lora_name,
                   shared_input_backward, shared_input_forward, variant_adapter_config, adapter_setup)

FIELDS = nf4.NF4_FIELDS  # codes, absmax_q, absmax_scale, absmax_mean
SUFFIXES = tuple("nf4." + f for f in FIELDS)


def quantized_names(prefix):
    """The names that hold a quantized linear's W: prefix.nf4.codes, ... (FIELDS)."""
    return [f"{prefix}.{s}" for s in SUFFIXES]


def quantized_record(params, prefix):
    """{field: array} of one quantized linear, as nf4.dequantize_nf4 takes it."""
    return {f: params[f"{prefix}.nf4.{f}"] for f in FIELDS}


def quantize_linears(params, prefixes, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE,
                     absmax_code="linear"):
    """A new dict: each prefix's W replaced by its NF4 record, everything else shared (not copied).

    Quantization runs on the host; the record is put back on W's array module.
    Raises ValueError (one line, naming the layer) when block_size does not divide a W's size.
    """
    out = dict(params)
    for prefix in prefixes:
        W = params[prefix + ".W"]
        xp = array_module(W)
        try:
            q = nf4.quantize_nf4(to_numpy(W), block_size, absmax_block_size, absmax_code)
        except ValueError as e:
            raise ValueError(f"{e} ({prefix}.W, shape {tuple(W.shape)})") from None
        del out[prefix + ".W"]
        for f in FIELDS:
            out[f"{prefix}.nf4.{f}"] = xp.asarray(q[f])
    return out


def dequantized_weight(params, prefix, shape, dtype, block_size=nf4.BLOCK_SIZE,
                       absmax_block_size=nf4.ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """deq(Q_W) of one linear, (out, in) in the given dtype, on its codes' array module."""
    return nf4.dequantize_nf4(quantized_record(params, prefix), shape, dtype, block_size, absmax_block_size,
                              absmax_code)


def stored_bytes(params, prefix):
    """Bytes one quantized linear's W takes: its codes and scales."""
    return int(sum(params[n].nbytes for n in quantized_names(prefix)))


def nf4_linear_forward(x, q, shape, b, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE,
                       absmax_code="linear"):
    """A frozen linear whose W is stored as NF4: y = x @ deq(Q_W).T + b.

    Inputs:
    - x: (N..., in)
    - q: the layer's NF4 record (nf4.quantize_nf4's dict); shape: (out, in)
    - b: (out,) frozen, or None
    - block_size, absmax_block_size, absmax_code: the record's blocks and the absmax's code

    Returns y (N..., out) and a cache that holds the codes, not deq(Q_W) nor x:
    the layer is frozen (no dW needs x) and the backward dequantizes again.
    """
    W = nf4.dequantize_nf4(q, shape, x.dtype, block_size, absmax_block_size, absmax_code)  # (out, in), this layer
    y, _ = ops.linear_forward(x, W, b, frozen=True)  # the frozen pair's cache (W) is dropped with W
    return y, (q, tuple(shape), block_size, absmax_block_size, absmax_code)


def nf4_linear_backward(dout, cache, input_grad=True):
    """dx of y = x @ deq(Q_W).T + b: dx = dout @ deq(Q_W), and nothing else (W and b are frozen).

    Returns dx (N..., in), or None when input_grad is False (no product at all then).
    """
    if not input_grad:
        return None
    q, shape, block_size, absmax_block_size, absmax_code = cache
    W = nf4.dequantize_nf4(q, shape, dout.dtype, block_size, absmax_block_size, absmax_code)  # again, for this product
    # in the forward pass this was: y = x @ W.T + b, so dx = dout @ W (one 2-D GEMM)
    dx = dout.reshape(-1, dout.shape[-1]) @ W  # (N, in)
    return dx.reshape(dout.shape[:-1] + (W.shape[1],))


def qlora_linear_forward(x, q, shape, b, A, B, scale, dropout_p=0.0, rng=None, dropout_mask=None,
                         block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """LoRA on a frozen NF4 linear: y = x @ deq(Q_W).T + b + s * (drop(x) @ A.T) @ B.T.

    Inputs as lora.lora_linear_forward, with W given as its NF4 record q and its shape (out, in).
    Returns y (N..., out) and a cache (codes, not deq(Q_W)). B @ A is never formed.
    """
    check_adapter(x, A, B, *shape)
    y, base_cache = nf4_linear_forward(x, q, shape, b, block_size, absmax_block_size, absmax_code)
    # the adapter, exactly LoRA's (lora.adapter_forward): y += s * (drop(x) @ A.T) @ B.T
    return y, (base_cache, adapter_forward(y, x, A, B, scale, dropout_p, rng, dropout_mask))


def qlora_linear_backward(dout, cache, input_grad=True):
    """Returns (dx, dA, dB); no dW: deq(Q_W) is a constant.

        dB = s * dout^T (drop(x) A^T)                  (out, r)
        dA = s * (dout B)^T drop(x)                    (r, in)
        dx = dout @ deq(Q_W) + drop_backward(s * (dout B) A)
    """
    base_cache, adapter_cache = cache
    dx_adapter, dA, dB = adapter_backward(dout, adapter_cache, input_grad)  # LoRA's, line for line
    if not input_grad:
        return None, dA, dB
    dx = nf4_linear_backward(dout, base_cache)  # through deq(Q_W), dequantized again
    dx += dx_adapter
    return dx, dA, dB


def bits_per_param(params, prefixes, shapes):
    """Stored bits per weight of the quantized linears: 8 * their bytes / their weights."""
    n = sum(math.prod(shapes[p]) for p in prefixes)
    return 8.0 * sum(stored_bytes(params, p) for p in prefixes) / n


def merge_weights(params, prefixes, shapes, scale, block_size=nf4.BLOCK_SIZE,
                  absmax_block_size=nf4.ABSMAX_BLOCK_SIZE, absmax_code="linear"):
    """A plain float model: W' = deq(Q_W) + s B A where an adapter exists, deq(Q_W) elsewhere.

    Returns a new dict with no NF4 record and no adapter left (float32, on the
    codes' array module, in the dtype of the adapters or of wte).
    """
    dtype = params["wte"].dtype
    drop = {n for p in prefixes for n in quantized_names(p)}
    drop |= {n for n in params if n.endswith((".lora_A", ".lora_B"))}
    out = {n: a for n, a in params.items() if n not in drop}
    for p in prefixes:
        W = dequantized_weight(params, p, shapes[p], dtype, block_size, absmax_block_size, absmax_code)
        if p + ".lora_A" in params:
            W += scale * (params[p + ".lora_B"] @ params[p + ".lora_A"])
        out[p + ".W"] = W
    return out


def qlora_shared_input_forward(x, layers, scale, block_size=nf4.BLOCK_SIZE, absmax_block_size=nf4.ABSMAX_BLOCK_SIZE,
                               absmax_code="linear"):
    """QLoRA linears that read the same input x (attention's q, k, v), their A products as one.

    lora.shared_input_forward with NF4 bases:

        xa  = x @ [A_1; ...; A_n].T             (N, n r)
        y_i = x @ deq(Q_i).T + b_i + s * xa_i @ B_i.T

    Inputs: x (N..., in); layers, a list of (q_i, shape_i, b_i, A_i, B_i), all with the same r.
    Returns ys, a list of n outputs (N..., out_i), and a cache (codes, not deq(Q_i)).
    """
    def nf4_base(q, shape, b):  # one layer dequantized, just for its product
        return lambda x: nf4_linear_forward(x, q, shape, b, block_size, absmax_block_size, absmax_code)

    return shared_input_forward(x, [nf4_base(q, shape, b) for q, shape, b, _, _ in layers],
                                [A for *_, A, _ in layers], [B for *_, B in layers], scale)


def qlora_shared_input_backward(douts, cache, input_grad=True):
    """Returns (dx, dAs, dBs), as lora.lora_shared_input_backward, each base's dx through deq(Q_i).

        dB_i = s * dout_i^T xa_i,   dxa = [s dout_1 B_1, ..., s dout_n B_n]   (N, n r)
        [dA_1; ...; dA_n] = dxa^T x
        dx = sum_i dout_i @ deq(Q_i) + dxa @ [A_1; ...; A_n]
    """
    return shared_input_backward(douts, cache, nf4_linear_backward, input_grad)


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA's settings, on a base whose blocks' linears are all stored as NF4."""

    method: ClassVar[str] = "qlora"
    label: ClassVar[str] = "QLoRA"
    base_pair: ClassVar[str] = "nf4"  # the pair of every block linear without an adapter: frozen NF4
    block_size: int = nf4.BLOCK_SIZE  # weights per absmax (the paper's 64)
    absmax_block_size: int = nf4.ABSMAX_BLOCK_SIZE  # absmax constants per float32 scale (the paper's 256)
    # the double quantization's 8-bit code: "linear" int8 (a plain error bound), or "dynamic",
    # bitsandbytes' 8-bit map, whose codes are bitsandbytes' own (nf4.py says which costs what)
    absmax_code: str = "linear"

    def __post_init__(self):
        super().__post_init__()
        nf4.check_block_settings(self.block_size, self.absmax_block_size)
        nf4.check_absmax_code(self.absmax_code)

    def blocks(self):
        return {"block_size": self.block_size, "absmax_block_size": self.absmax_block_size,
                "absmax_code": self.absmax_code}

    def to_dict(self):
        """LoraConfig's dict; absmax_code only when it is not "linear" (a setting added later: a run with the
        linear code writes the dict it always did)."""
        d = super().to_dict()
        if d["absmax_code"] == "linear":
            del d["absmax_code"]
        return d

    def n_weights(self, params, config):
        """Every weight once: the float arrays' sizes, and out * in for each NF4-stored linear."""
        from ..model import param_shapes

        shapes = param_shapes(config)
        stored = {n for p in quantized_layers(config) for n in quantized_names(p)}
        return (int(sum(a.size for n, a in params.items() if n not in stored))
                + sum(math.prod(shapes[p + ".W"]) for p in quantized_layers(config)))

    def report_lines(self, params, config):
        """The NF4 base: how many weights, in how many bytes, bits per weight (paper: about 4.127)."""
        from ..model import param_shapes

        layers = quantized_layers(config)
        shapes = {p: param_shapes(config)[p + ".W"] for p in layers}
        n = sum(math.prod(s) for s in shapes.values())
        stored = sum(stored_bytes(params, p) for p in layers)
        return [f"NF4 base: {len(layers)} block linears, {n:,} weights in {stored:,} bytes = "
                f"{8 * stored / n:.3f} bits each (4 + 8/{self.block_size} + 32/({self.block_size} x "
                f"{self.absmax_block_size}) + one float32 mean per matrix), {4 * n:,} bytes in float32"]


def quantized_layers(model_config):
    """Every linear of the blocks, e.g. ['h.0.attn.q', ..., 'h.1.mlp.proj']: the ones QLoRA stores in NF4."""
    return [f"h.{i}.{layer}" for i in range(model_config.n_layers) for layer in TARGETS.values()]


def record_shapes(shape, settings):
    """suffix -> shape of the NF4 record of one (out, in) W (what replaces prefix.W)."""
    n = math.prod(shape)
    n_blocks = n // settings.block_size
    return {"nf4.codes": (n // 2,), "nf4.absmax_q": (n_blocks,),
            "nf4.absmax_scale": (-(-n_blocks // settings.absmax_block_size),), "nf4.absmax_mean": ()}


def _qlora_config(config):
    return config.lora if config.lora is not None and config.lora.method == QLoraConfig.method else None


def replaced_names(config):
    """The base names a QLoRA model does not hold: every block linear's W (stored as its NF4 record)."""
    return [p + ".W" for p in quantized_layers(config)] if _qlora_config(config) else []


def extra_shapes(config, params):
    """The adapters' names and every quantized linear's NF4 record (none unless config.lora is a QLoraConfig)."""
    settings = _qlora_config(config)
    if settings is None:
        return {}
    from ..model import param_shapes

    shapes = adapter_methods_extra_shapes(QLoraConfig.method)(config, params)
    base = param_shapes(config)
    for prefix in quantized_layers(config):
        for suffix, shape in record_shapes(base[prefix + ".W"], settings).items():
            shapes[f"{prefix}.{suffix}"] = shape
    return shapes


def add_qlora(params, model_config, qlora_config, seed=0):
    """LoRA adapters on the targets (lora.add_lora, the same A and B), then every block linear's W as NF4.

    Returns (params, config): a new dict holding no block W (their NF4 records instead; wte, wpe,
    LayerNorms and biases shared, not copied) and model_config with .lora = qlora_config.
    """
    if not isinstance(qlora_config, QLoraConfig):
        raise ValueError(f"qlora_config: expected a QLoraConfig, got a {type(qlora_config).__name__}")
    params, config = add_lora(params, model_config, qlora_config, seed=seed)
    return quantize_linears(params, quantized_layers(config), **qlora_config.blocks()), config


def _shape(params, prefix, x):
    """(out, in) of a quantized linear: in is x's last axis, out follows from the codes' count."""
    return (2 * params[prefix + ".nf4.codes"].shape[0] // x.shape[-1], x.shape[-1])


def merge(params, config):
    """A plain float model: W' = deq(Q_W) + s B A on each target, deq(Q_W) on every other block linear.

    The same function as the QLoRA model (the quantization error is kept: the adapter was trained
    on deq(Q_W), not on the float W the base was quantized from). There is no unmerge back to NF4
    that returns these weights: quantizing W' again would round s B A away.
    Returns (params, config) with config.lora = None.
    """
    settings = _qlora_config(config)
    if settings is None:
        got = "None" if config.lora is None else f"{config.lora.method} adapters"
        raise ValueError(f"config: expected the config of a QLoRA model (a QLoraConfig in config.lora), got {got}")
    from ..model import param_shapes

    shapes = {p: param_shapes(config)[p + ".W"] for p in quantized_layers(config)}
    out = merge_weights(params, quantized_layers(config), shapes, settings.scale, **settings.blocks())
    return out, replace(config, lora=None)


def as_lora(params, config):
    """The same function as a LoRA model: every block linear's W = deq(Q_W), the adapters as they are.

        y = x @ deq(Q_W).T + b + s * (x @ A.T) @ B.T       the QLoRA forward, term for term

    deq(Q_W) is computed in float32, as the forward computes it, and stored in the dtype of wte
    (float32, or float64 exactly widened), so the LoRA model's forward multiplies by the very W
    the QLoRA forward does. This is how a QLoRA run is exported: a float base and a PEFT LoRA
    adapter (bridge.export_model). Returns (params, config) with config.lora a LoraConfig with
    the QLoRA settings' LoRA fields (rank, alpha, targets, ...); nothing is copied but the Ws.
    """
    settings = _qlora_config(config)
    if settings is None:
        got = "None" if config.lora is None else f"{config.lora.method} adapters"
        raise ValueError(f"config: expected the config of a QLoRA model (a QLoraConfig in config.lora), got {got}")
    from ..model import param_shapes

    shapes = param_shapes(config)
    dtype = params["wte"].dtype
    out = {n: a for n, a in params.items() if not n.endswith(SUFFIXES)}
    for prefix in quantized_layers(config):
        out[prefix + ".W"] = dequantized_weight(params, prefix, shapes[prefix + ".W"], dtype, **settings.blocks())
    lora_config = LoraConfig(**{f.name: getattr(settings, f.name) for f in fields(LoraConfig)})  # LoRA's own fields
    return out, replace(config, lora=lora_config)


# the seam (methods/__init__.py): the two pairs for the model, and the method for finetune and the tools


def _qlora_forward(params, prefix, x, settings, train, rng, trainable):
    p = settings.dropout if train else 0.0
    return qlora_linear_forward(x, quantized_record(params, prefix), _shape(params, prefix, x),
                                params.get(prefix + ".b"), params[prefix + ".lora_A"], params[prefix + ".lora_B"],
                                settings.scale, p, rng, **settings.blocks())


def _qlora_backward(dout, cache, prefix, trainable, input_grad):
    dx, dA, dB = qlora_linear_backward(dout, cache, input_grad=input_grad)  # no dW: deq(Q_W) is a constant
    return dx, {"lora_A": dA, "lora_B": dB}


def _shared_forward(params, prefixes, x, settings, train):
    """q, k, v as one op, or None when adapter dropout gives each its own input."""
    if train and settings.dropout != 0.0:
        return None
    layers = [(quantized_record(params, n), _shape(params, n, x), params.get(n + ".b"), params[n + ".lora_A"],
               params[n + ".lora_B"]) for n in prefixes]
    return qlora_shared_input_forward(x, layers, settings.scale, **settings.blocks())


def _shared_backward(douts, cache, input_grad):
    dx, dAs, dBs = qlora_shared_input_backward(douts, cache, input_grad=input_grad)
    return dx, [{"lora_A": dA, "lora_B": dB} for dA, dB in zip(dAs, dBs)]


def _delta(params, config, base, prefix):
    """s B A, the update the adapter adds (relative to the float base: deq(Q_W) - W is not counted)."""
    return config.lora.scale * (params[prefix + ".lora_B"] @ params[prefix + ".lora_A"])


def _nf4_forward(params, prefix, x, settings, train, rng, trainable):
    return nf4_linear_forward(x, quantized_record(params, prefix), _shape(params, prefix, x),
                              params.get(prefix + ".b"), **settings.blocks())


def _nf4_backward(dout, cache, prefix, trainable, input_grad):
    return nf4_linear_backward(dout, cache, input_grad=input_grad), {}  # frozen: dx only, never a dW


QLORA_PAIR = LinearPair("qlora", _qlora_forward, _qlora_backward, _shared_forward, _shared_backward, _delta)


def _nf4_delta(params, config, base, prefix):
    """Zero: fine-tuning never changes a frozen NF4 linear (the quantization error deq(Q_W) - W, about
    9% of ||W|| on the default base (benchmarks/nf4.json), is the base's, not a training change)."""
    return 0.0 * base[prefix + ".W"]


NF4_PAIR = LinearPair("nf4", _nf4_forward, _nf4_backward, delta=_nf4_delta)


_adapter_config = variant_adapter_config(QLoraConfig)  # config.lora as given, or LoRA's settings as a QLoraConfig
_setup = adapter_setup(add_qlora)


def _check(model_config, config, longest):
    """A rank at most min(out, in), and blocks that divide every block linear's W (one line, naming it)."""
    from ..model import param_shapes

    shapes = param_shapes(model_config)
    check_rank(shapes, model_config, config.lora)
    for prefix in quantized_layers(model_config):
        try:
            nf4.check_block_sizes(math.prod(shapes[prefix + ".W"]), config.lora.block_size,
                                  config.lora.absmax_block_size)
        except ValueError as e:
            raise ValueError(f"{e} ({prefix}.W, shape {shapes[prefix + '.W']})") from None


def _gradcheck_setup(params, config, rng, qlora_config=None):
    """QLoRA, rank 2, blocks of 32 (they divide the tiny model's 8 x 8 and 12 x 8), at B != 0.

    Adapters on q, k, v (their shared form) and fc; o and proj are frozen NF4 linears (the nf4 pair).
    """
    settings = qlora_config or QLoraConfig(rank=2, alpha=3.0, targets=("q", "k", "v", "fc"), block_size=32)
    return gradcheck_point(add_qlora, params, config, settings, rng)


def _op_checks(rng, xp=np):
    """qlora_linear (x, A, B, with adapter dropout) and the frozen nf4_linear (x) against finite differences."""
    from ..backend import to_device
    from ..gradcheck import check_op

    def n(shape):
        return to_device(rng.standard_normal(shape), xp)

    N, T, C, r, out_f = 2, 5, 8, 3, 6
    q = {f: to_device(a, xp) for f, a in nf4.quantize_nf4(rng.standard_normal((out_f, C)), block_size=16).items()}
    mask = to_device(rng.random((N, T, C)) >= 0.25, xp)
    s = 2.0
    results = check_op("qlora_linear",
                       lambda x, b, A, Bm: qlora_linear_forward(x, q, (out_f, C), b, A, Bm, s, 0.25, dropout_mask=mask,
                                                                block_size=16),
                       qlora_linear_backward, {"x": n((N, T, C)), "b": n(out_f), "A": n((r, C)), "B": n((out_f, r))},
                       {"x": 0, "A": 1, "B": 2}, rng)
    results += check_op("nf4_linear (frozen)", lambda x, b: nf4_linear_forward(x, q, (out_f, C), b, block_size=16),
                        nf4_linear_backward, {"x": n((N, T, C)), "b": n(out_f)}, {"x": 0}, rng)
    return results


QLORA = register(
    Method("qlora", "QLoRA: LoRA on a frozen NF4 base (every block linear in 4 bits, dequantized per product)",
           3e-3, _setup, check=_check, adapter_config=_adapter_config, extra_shapes=extra_shapes,
           owns=owns_lora_name, merge=merge, saves_adapter=False, replaces=replaced_names,
           stores_codes=lambda name: name.endswith((".nf4.codes", ".nf4.absmax_q")), study_lrs=(1e-3, 3e-3, 1e-2, 3e-2),
           gradcheck_setup=_gradcheck_setup, op_checks=_op_checks, color="tab:purple"),
    pair=QLORA_PAIR, config_type=QLoraConfig)
register(pair=NF4_PAIR)
