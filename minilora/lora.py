"""LoRA: W' = W + (alpha / r) B A, with W frozen and only A (r, in) and B (out, r) trained.

An adapter is two extra entries beside a linear layer's weight,

    h.0.attn.q.W        (out, in)   frozen, never gets a gradient
    h.0.attn.q.lora_A   (r, in)     random (Kaiming-uniform as PEFT, or Gaussian)
    h.0.attn.q.lora_B   (out, r)    zero, so the adapted model starts exactly at the pretrained one

The forward and backward of the adapted layer are lora_linear_forward /
lora_linear_backward below: they never form B @ A nor a dW. Adapted layers
that read the same input (attention's q, k, v) can run as one op,
lora_shared_input_forward / _backward: the same numbers, one product for all
their A's. `merge` folds the
update into W for inference at the base model's cost; `unmerge` takes it out.
Both return new dicts: nothing here changes an array it was given.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import ops
from .backend import array_module, to_numpy
from .checkpoint import load_checkpoint, save_checkpoint
from .validate import FileError, check_arrays, field as meta_field, from_dict

# target name -> the linear layer it adapts inside every block
TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "fc": "mlp.fc", "proj": "mlp.proj"}
INITS = ("kaiming", "gaussian")


MIN_SCALE, MAX_SCALE = 1e-6, 1e4  # the scales s = alpha / r a float32 update can carry


def lora_scale(rank, alpha, rslora=False):
    """The factor s in W' = W + s B A: alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        ops._fail("rank", "a positive integer", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        ops._fail("alpha", "a positive number", alpha)
    s = float(alpha) / (math.sqrt(rank) if rslora else rank)
    if not MIN_SCALE <= s <= MAX_SCALE:
        # s B A in float32: a scale of 1e300 overflows to inf at the first update, one of 1e-300 is 0
        ops._fail("alpha", f"alpha / {'sqrt(r)' if rslora else 'r'} in [{MIN_SCALE:g}, {MAX_SCALE:g}] "
                           f"(r = {rank}: the scale s of s B A; outside it float32 overflows or the update "
                           f"vanishes)", alpha)
    return s


def lora_linear_forward(x, W, b, A, B, scale, dropout_p=0.0, rng=None, dropout_mask=None):
    """A frozen linear layer plus a trainable low-rank update, never merged.

        y = x @ W.T + b + s * (drop(x) @ A.T) @ B.T

    Inputs:
    - x: (N..., in)
    - W: (out, in) frozen; b: (out,) frozen, or None
    - A: (r, in), B: (out, r) the adapter
    - scale: s = alpha / r (see lora_scale)
    - dropout_p, rng, dropout_mask: dropout on the adapter's input only

    Returns y (N..., out) and a cache. B @ A (an (out, in) matrix) is never
    formed: the update costs r * (in + out) per token instead of in * out.
    """
    base, base_cache = ops.linear_forward(x, W, b, frozen=True)  # W frozen: its backward needs no x
    ops._check_float("A", A, like=x)
    ops._check_float("B", B, like=x)
    if A.ndim != 2 or A.shape[1] != W.shape[1]:
        ops._fail("A", f"shape (r, {W.shape[1]})", f"shape {tuple(A.shape)}")
    if B.shape != (W.shape[0], A.shape[0]):
        ops._fail("B", f"shape ({W.shape[0]}, {A.shape[0]}) = (out, r)", f"shape {tuple(B.shape)}")
    xd, drop_cache = ops.dropout_forward(x, dropout_p, rng, dropout_mask)
    # 2-D products, (N, in) @ (in, r) then (N, r) @ (r, out): one GEMM each
    xa = xd.reshape(-1, xd.shape[-1]) @ A.T  # (N, r)
    # y = base + s * xa @ B.T; s goes on the small (N, r) factor, and the sum
    # goes into base's buffer (ours, fresh from linear_forward)
    y = base
    y += ((xa * scale) @ B.T).reshape(base.shape)
    return y, (base_cache, drop_cache, xd, xa, A, B, float(scale))


def lora_linear_backward(dout, cache, input_grad=True):
    """Returns (dx, dA, dB); there is no dW: W is frozen and its gradient is never computed.

        dB = s * dout^T (drop(x) A^T)  (out, r)
        dA = s * (dout B)^T drop(x)    (r, in)
        dx = dout @ W + drop_backward(s * (dout B) A)

    drop(x) is x itself when the adapter dropout is 0 (the default).
    input_grad=False (nothing below the layer is trained) skips dx and returns None for it.
    """
    base_cache, drop_cache, xd, xa, A, B, s = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out): every product below is one 2-D GEMM
    # in the forward pass this was: y += s * xa @ B.T, with xa (N, r)
    dB = (dout2.T @ xa) * s  # (out, r)
    dxa = (dout2 @ B) * s  # (N, r)
    # and xa = xd @ A.T
    dA = dxa.T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    if not input_grad:
        return None, dA, dB
    # base path, frozen: y = x @ W.T + b gives dx only
    dx, _, _ = ops.linear_backward(dout, base_cache, param_grads=False)
    dxd = (dxa @ A).reshape(dx.shape)  # (N..., in)
    dx += ops.dropout_backward(dxd, drop_cache)  # dx is ours (fresh from linear_backward)
    return dx, dA, dB


def lora_shared_input_forward(x, layers, scale):
    """LoRA linears that read the same input x (attention's q, k and v), their A products as one.

        xa  = x @ [A_1; ...; A_n].T        (N, n r): every adapter's x A_i^T, side by side
        y_i = x @ W_i.T + b_i + s * xa_i @ B_i.T

    The same numbers as n calls of lora_linear_forward without adapter dropout,
    but x is read once for all the A's, and the backward below forms the A's
    gradients and their share of dx with one product each instead of n.

    Inputs:
    - x: (N..., in)
    - layers: a list of (W_i, b_i, A_i, B_i), as lora_linear_forward takes them, all with the same r
    - scale: s = alpha / r

    Returns ys, a list of n outputs (N..., out_i), and a cache.
    """
    xp = array_module(x)
    A_all = xp.concatenate([A for _, _, A, _ in layers])  # (n r, in)
    r = layers[0][2].shape[0]
    xa = x.reshape(-1, x.shape[-1]) @ A_all.T  # (N, n r), one product for the n adapters
    ys, caches = [], []
    for i, (W, b, A, B) in enumerate(layers):
        if A.shape[0] != r:
            ops._fail("A", f"rank r = {r} for every layer (the first layer's)", f"shape {tuple(A.shape)}")
        y, c = ops.linear_forward(x, W, b, frozen=True)  # the frozen base: no dW, so x is not kept twice
        # y_i = base + s * xa_i @ B_i.T, summed in y's buffer (ours)
        y += ((xa[:, i * r:(i + 1) * r] * scale) @ B.T).reshape(y.shape)
        ys.append(y)
        caches.append((c, B))
    return ys, (x, xa, A_all, caches, float(scale))


def lora_shared_input_backward(douts, cache, input_grad=True):
    """Returns (dx, dAs, dBs): dx (N..., in) or None (input_grad=False), lists dA_i (r, in), dB_i (out_i, r).

        dB_i = s * dout_i^T xa_i                         (out_i, r)
        dxa_i = s * dout_i B_i, side by side as dxa      (N, n r)
        [dA_1; ...; dA_n] = dxa^T x                      one product for the n adapters
        dx = sum_i dout_i @ W_i + dxa @ [A_1; ...; A_n]  (the n adapters' share in one product)
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
        # base path, frozen: y_i = x @ W_i.T + b_i gives dx only
        dx += ops.linear_backward(dout, c, param_grads=False)[0]
    return dx, dAs, dBs


@dataclass
class LoraConfig:
    rank: int = 8  # r: the rank of the update B A (the seed's table: 8-64)
    alpha: float = 16.0  # the update is scaled by alpha / r (the seed: alpha = 2r)
    targets: tuple = field(default_factory=lambda: ("q", "k", "v", "o"))  # which linears get adapters
    dropout: float = 0.0  # dropout on the adapter's input, training only
    rslora: bool = False  # scale by alpha / sqrt(r) instead (rank-stabilised LoRA)
    init: str = "kaiming"  # how A starts: "kaiming" (uniform, PEFT's default) or "gaussian"

    def __post_init__(self):
        if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets: expected a list of names from {sorted(TARGETS)}, got {self.targets!r}")
        self.targets = tuple(self.targets)
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora: expected true or false, got {self.rslora!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        lora_scale(self.rank, self.alpha, self.rslora)  # validates rank and alpha
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets: expected a non-empty list from {sorted(TARGETS)}, got {list(self.targets)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")

    @property
    def scale(self):
        """s in W' = W + s B A."""
        return lora_scale(self.rank, self.alpha, self.rslora)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The config to_dict wrote; ValueError naming the field for an unknown key or a bad value."""
        return from_dict(cls, d, "lora")


def adapted_layers(model_config, lora_config):
    """Prefixes of every linear that gets an adapter, e.g. ['h.0.attn.q', ...]."""
    return [f"h.{i}.{TARGETS[t]}" for i in range(model_config.n_layers) for t in lora_config.targets]


def check_rank(shapes, model_config, lora_config):
    """Raise ValueError unless r <= min(out, in) for every W the adapters target (shapes: name -> shape)."""
    for prefix in adapted_layers(model_config, lora_config):
        d_out, d_in = shapes[prefix + ".W"]
        if lora_config.rank > min(d_out, d_in):
            raise ValueError(f"rank: expected at most min(out, in) = {min(d_out, d_in)} for {prefix}.W "
                             f"{(d_out, d_in)} (a larger rank is no longer low-rank), got {lora_config.rank}")


def add_lora(params, model_config, lora_config, seed=0):
    """Adapters beside every target linear.

    A: Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_ with
    a = sqrt(5)), or for "gaussian" normal with standard deviation 1/r. B: zeros,
    so B A = 0 at the start and the adapted model is exactly the pretrained one.

    Returns (params, config): a new dict (the base arrays shared, not copied)
    with A, B for every target, and model_config with .lora = lora_config, the
    description every later call needs (scale, dropout).
    """
    if model_config.lora is not None:
        raise ValueError(f"model_config: these params already have adapters ({model_config.lora}); "
                         "merge them first or start from the base model")
    rng = np.random.default_rng(seed)
    xp = array_module(params["wte"])
    dtype = params["wte"].dtype
    out = dict(params)
    r = lora_config.rank
    check_rank({n: p.shape for n, p in params.items()}, model_config, lora_config)
    for prefix in adapted_layers(model_config, lora_config):
        d_out, d_in = params[prefix + ".W"].shape
        if lora_config.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            A = rng.uniform(-bound, bound, (r, d_in))
        else:
            A = rng.normal(0.0, 1.0 / r, (r, d_in))
        out[prefix + ".lora_A"] = xp.asarray(A.astype(dtype))
        out[prefix + ".lora_B"] = xp.zeros((d_out, r), dtype=dtype)
    return out, replace(model_config, lora=lora_config)


def lora_names(params):
    """Names of every adapter matrix in params."""
    return [n for n in params if n.endswith((".lora_A", ".lora_B"))]


def _adapted_prefixes(params):
    """'h.0.attn.q' for every 'h.0.attn.q.lora_A' in params: the one place the suffix is parsed."""
    return [name[: -len(".lora_A")] for name in params if name.endswith(".lora_A")]


def merge(params, config):
    """W + s B A in place of each adapted W, and no adapters.

    The merged model computes x @ (W + s B A).T: the same function as the
    adapted one, at the base model's cost.

    Returns (params, config): a new dict and config with .lora = None.
    """
    if config.lora is None:
        raise ValueError("config: expected the config of a LoRA model (config.lora set), got config.lora = None")
    s = config.lora.scale
    adapters = set(lora_names(params))
    out = {n: p for n, p in params.items() if n not in adapters}
    for prefix in _adapted_prefixes(params):
        out[prefix + ".W"] = params[prefix + ".W"] + s * (params[prefix + ".lora_B"] @ params[prefix + ".lora_A"])
    return out, replace(config, lora=None)


def unmerge(merged, config, adapters, lora_config):
    """The inverse of merge: W - s B A for each adapter, and the adapters put back.

    Returns (params, config) with config.lora = lora_config.
    """
    s = lora_config.scale
    out = dict(merged)
    for prefix in _adapted_prefixes(adapters):
        out[prefix + ".W"] = merged[prefix + ".W"] - s * (adapters[prefix + ".lora_B"] @ adapters[prefix + ".lora_A"])
    out.update(adapters)
    return out, replace(config, lora=lora_config)


def lora_param_count(d, k, r):
    """Trainable scalars of one adapted d x k matrix: r (d + k) instead of d k."""
    return r * (d + k)


def count_report(params, trainable, config):
    """PEFT's print_trainable_parameters line, plus LoRA's r (d + k) per adapted matrix, checked.

    Returns the report as text. Raises AssertionError if the adapters' size is
    not what the formula says.
    """
    n_train = int(sum(params[n].size for n in trainable))
    n_all = int(sum(p.size for p in params.values()))
    lines = [f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100 * n_train / n_all:.4f}"]
    adapted = sorted(_adapted_prefixes(params))
    if adapted and config.lora is not None:
        r = config.lora.rank
        total = sum(lora_param_count(*params[prefix + ".W"].shape, r) for prefix in adapted)
        counted = int(sum(params[n].size for n in lora_names(params) if n in trainable))
        d, k = params[adapted[0] + ".W"].shape
        lines.append(f"LoRA: r (d + k) = {r} x ({d} + {k}) = {lora_param_count(d, k, r):,} per adapted matrix "
                     f"({d * k:,} for W itself), {len(adapted)} matrices: {total:,} "
                     + ("= the count above (adapters only)" if total == counted else f"!= counted {counted:,}"))
        if total != counted:
            raise AssertionError(f"LoRA parameter count {counted} does not match the formula r(d+k): {total}")
    return "\n".join(lines)


def base_fingerprint(params):
    """A short hash of the base (non-adapter, non-head, non-prompt) weights.

    An adapter only makes sense on the weights it was trained on; this is how
    loading one onto a different base fails clearly.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        if name.endswith((".lora_A", ".lora_B")) or name.startswith(("cls.", "prompt")):
            continue
        a = np.ascontiguousarray(to_numpy(params[name]))
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(json.dumps(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


ADAPTER_KIND = "lora_adapter"


def save_adapter(path, params, trainable, config, base_params, extra_meta=None):
    """Save only what fine-tuning trained (A, B and any head), the model config
    (LoRA settings included) and the base weights' fingerprint, atomically."""
    small = {n: params[n] for n in sorted(trainable)}
    meta = {**(extra_meta or {}), "kind": ADAPTER_KIND, "model": config.to_dict(),
            "base_fingerprint": base_fingerprint(base_params)}
    save_checkpoint(path, small, meta)


def load_adapter(path, base_params, base_config):
    """Load an adapter file onto base_params.

    Returns (params, config, meta): a new dict with the adapter (and any head)
    added, and the config with its LoRA settings. An adapter only adds names:
    the lora_A / lora_B of exactly the layers its config targets (shapes (r, in),
    (out, r)) and optionally a head cls.W (K, C), cls.b (K,); any other name
    (param.wte, a base W) is refused, never put over the base. Raises
    validate.FileError naming the file and field if the file is not an
    adapter, holds another name or shape, a non-finite value, or was trained
    on other base weights (the message names both fingerprints).
    """
    found = {}

    def check(small, meta, _):
        kind = meta_field(meta, "kind", path, "str", optional=True)
        if kind != ADAPTER_KIND:
            raise FileError(path, f"expected a LoRA adapter file (kind {ADAPTER_KIND!r}), got kind {kind!r}")
        expected = meta_field(meta, "base_fingerprint", path, "str")
        try:
            saved_config = type(base_config).from_dict(meta_field(meta, "model", path, "dict"))
        except ValueError as e:
            raise FileError(path, str(e), "meta.json: model") from e
        if saved_config.lora is None:
            raise FileError(path, "expected the LoRA settings of the adapter, got none", "meta.json: model.lora")
        if replace(saved_config, lora=None) != replace(base_config, lora=None):
            raise FileError(path, f"expected the base model's config {base_config.to_dict()}, got "
                                  f"{meta['model']}", "meta.json: model")
        allowed = adapter_shapes(base_params, saved_config)
        C = base_params["wte"].shape[1]
        if "cls.W" in small:
            K = small["cls.W"].shape[0]
            allowed.update({"cls.W": (K, C), "cls.b": (K,)})
        wrong = sorted(n for n in small if n not in allowed)
        if wrong:
            raise FileError(path, f"expected only adapter names (the lora_A / lora_B of the layers its config "
                                  f"targets, and a head cls.W, cls.b), got {', '.join(wrong[:5])}: an adapter "
                                  f"never replaces the base weights")
        missing = sorted(n for n in allowed if n not in small)
        shapes = [f"{n} {small[n].shape} (expected {allowed[n]})" for n in sorted(small)
                  if tuple(small[n].shape) != tuple(allowed[n])]
        if missing or shapes:
            raise FileError(path, "expected every adapter of its config at its shape, got "
                                  + "; ".join((["missing " + ", ".join(missing[:5])] if missing else []) + shapes[:5]))
        check_arrays(small, path)
        got = base_fingerprint(base_params)
        if expected != got:
            raise FileError(path, f"was trained on base weights with fingerprint {expected}, but the base given "
                                  f"has fingerprint {got}; load the checkpoint it was trained from")
        found["config"] = saved_config

    small, meta, _ = load_checkpoint(path, check)
    xp = array_module(base_params["wte"])
    out = dict(base_params)
    for name, a in small.items():
        out[name] = xp.asarray(a)
    return out, found["config"], meta


def adapter_shapes(base_params, config):
    """name -> shape of every adapter array config.lora asks for on these base weights."""
    r, shapes = config.lora.rank, {}
    for prefix in adapted_layers(config, config.lora):
        if prefix + ".W" not in base_params:
            continue
        d_out, d_in = base_params[prefix + ".W"].shape
        shapes[prefix + ".lora_A"], shapes[prefix + ".lora_B"] = (r, d_in), (d_out, r)
    return shapes
