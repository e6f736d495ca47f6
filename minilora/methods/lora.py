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

import math
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np

from .. import ops
from ..backend import array_module
from ..bounds import DROPOUT
from ..checkpoint import load_checkpoint, save_checkpoint
from ..validate import FileError, check_arrays, field as meta_field, from_dict
from . import LinearPair, Method, base_fingerprint, register

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


def check_adapter(x, A, B, d_out, d_in):
    """Raise ValueError (one line) unless A is (r, d_in) and B (d_out, r), float arrays like x."""
    ops._check_float("A", A, like=x)
    ops._check_float("B", B, like=x)
    if A.ndim != 2 or A.shape[1] != d_in:
        ops._fail("A", f"shape (r, {d_in})", f"shape {tuple(A.shape)}")
    if B.shape != (d_out, A.shape[0]):
        ops._fail("B", f"shape ({d_out}, {A.shape[0]}) = (out, r)", f"shape {tuple(B.shape)}")


def adapter_forward(y, x, A, B, scale, dropout_p=0.0, rng=None, dropout_mask=None):
    """The adapter's half of a LoRA linear, added into y: y += s * (drop(x) @ A.T) @ B.T.

    Inputs: y (N..., out), the base's output (the caller's own buffer, written in place); x (N..., in);
    A (r, in), B (out, r); scale s; dropout on the adapter's input only. LoRA and QLoRA share it:
    they differ only in their frozen base.
    Returns the adapter's cache (drop_cache, xd, xa, A, B, s) for adapter_backward.
    """
    xd, drop_cache = ops.dropout_forward(x, dropout_p, rng, dropout_mask)
    # 2-D products, (N, in) @ (in, r) then (N, r) @ (r, out): one GEMM each
    xa = xd.reshape(-1, xd.shape[-1]) @ A.T  # (N, r)
    # s goes on the small (N, r) factor, and the sum goes into y's buffer
    y += ((xa * scale) @ B.T).reshape(y.shape)
    return drop_cache, xd, xa, A, B, float(scale)


def adapter_backward(dout, cache, input_grad=True):
    """The backward of adapter_forward: (dx_adapter (N..., in) or None, dA, dB).

        dB = s * dout^T (drop(x) A^T)  (out, r)
        dA = s * (dout B)^T drop(x)    (r, in)
        dx_adapter = drop_backward(s * (dout B) A), the adapter's share of dx (the base adds its own)
    """
    drop_cache, xd, xa, A, B, s = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out): every product below is one 2-D GEMM
    # in the forward pass this was: y += s * xa @ B.T, with xa (N, r)
    dB = (dout2.T @ xa) * s  # (out, r)
    dxa = (dout2 @ B) * s  # (N, r)
    # and xa = xd @ A.T
    dA = dxa.T @ xd.reshape(-1, xd.shape[-1])  # (r, in)
    if not input_grad:
        return None, dA, dB
    return ops.dropout_backward((dxa @ A).reshape(xd.shape), drop_cache), dA, dB


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
    y, base_cache = ops.linear_forward(x, W, b, frozen=True)  # W frozen: its backward needs no x
    check_adapter(x, A, B, *W.shape)
    # y = base + s * (drop(x) @ A.T) @ B.T, in y's buffer (ours, fresh from linear_forward)
    return y, (base_cache, adapter_forward(y, x, A, B, scale, dropout_p, rng, dropout_mask))


def lora_linear_backward(dout, cache, input_grad=True):
    """Returns (dx, dA, dB); there is no dW: W is frozen and its gradient is never computed.

        dB = s * dout^T (drop(x) A^T)  (out, r)
        dA = s * (dout B)^T drop(x)    (r, in)
        dx = dout @ W + drop_backward(s * (dout B) A)

    drop(x) is x itself when the adapter dropout is 0 (the default).
    input_grad=False (nothing below the layer is trained) skips dx and returns None for it.
    """
    base_cache, adapter_cache = cache
    dx_adapter, dA, dB = adapter_backward(dout, adapter_cache, input_grad)
    if not input_grad:
        return None, dA, dB
    # base path, frozen: y = x @ W.T + b gives dx only
    dx, _, _ = ops.linear_backward(dout, base_cache, param_grads=False)
    dx += dx_adapter  # dx is ours (fresh from linear_backward)
    return dx, dA, dB


def shared_input_forward(x, bases, As, Bs, scale):
    """Adapted linears that read the same input x (attention's q, k and v), their A products as one.

        xa  = x @ [A_1; ...; A_n].T        (N, n r): every adapter's x A_i^T, side by side
        y_i = base_i(x) + s * xa_i @ B_i.T

    Inputs:
    - x: (N..., in)
    - bases: n functions base_i(x) -> (y_i (N..., out_i), cache_i), each frozen base's forward
      (a float W for LoRA, an NF4 one for QLoRA); y_i must be a fresh buffer (it is added into)
    - As: n arrays A_i (r, in), all with the same r; Bs: n arrays B_i (out_i, r)
    - scale: s = alpha / r

    Returns ys, a list of n outputs (N..., out_i), and a cache for shared_input_backward.
    """
    xp = array_module(x)
    r = As[0].shape[0]
    for A in As:
        if A.shape[0] != r:
            ops._fail("A", f"rank r = {r} for every layer (the first layer's)", f"shape {tuple(A.shape)}")
    A_all = xp.concatenate(As)  # (n r, in)
    xa = x.reshape(-1, x.shape[-1]) @ A_all.T  # (N, n r), one product for the n adapters
    ys, caches = [], []
    for i, (base, B) in enumerate(zip(bases, Bs)):
        y, c = base(x)
        # y_i = base + s * xa_i @ B_i.T, summed in y's buffer (ours)
        y += ((xa[:, i * r:(i + 1) * r] * scale) @ B.T).reshape(y.shape)
        ys.append(y)
        caches.append((c, B))
    return ys, (x, xa, A_all, caches, float(scale))


def shared_input_backward(douts, cache, base_backward, input_grad=True):
    """Returns (dx, dAs, dBs): dx (N..., in) or None (input_grad=False), lists dA_i (r, in), dB_i (out_i, r).

        dB_i = s * dout_i^T xa_i                                (out_i, r)
        dxa_i = s * dout_i B_i, side by side as dxa             (N, n r)
        [dA_1; ...; dA_n] = dxa^T x                             one product for the n adapters
        dx = sum_i base_backward(dout_i) + dxa @ [A_1; ...; A_n]  (the adapters' share in one product)

    base_backward(dout_i, cache_i) -> the frozen base's dx (N..., in): dout_i @ W_i, never a dW.
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
        dx += base_backward(dout, c)
    return dx, dAs, dBs


def _frozen_linear(W, b):
    """The frozen base y = x @ W.T + b as shared_input_forward takes it (no dW, so x is not kept twice)."""
    return lambda x: ops.linear_forward(x, W, b, frozen=True)


def _frozen_linear_dx(dout, cache):
    """The frozen base's backward: y = x @ W.T + b gives dx only."""
    return ops.linear_backward(dout, cache, param_grads=False)[0]


def lora_shared_input_forward(x, layers, scale):
    """LoRA linears that read the same input x (attention's q, k and v), their A products as one.

        xa  = x @ [A_1; ...; A_n].T        (N, n r): every adapter's x A_i^T, side by side
        y_i = x @ W_i.T + b_i + s * xa_i @ B_i.T

    The same numbers as n calls of lora_linear_forward without adapter dropout,
    but x is read once for all the A's, and the backward below forms the A's
    gradients and their share of dx with one product each instead of n
    (shared_input_forward / _backward, with the frozen float linear as every base).

    Inputs:
    - x: (N..., in)
    - layers: a list of (W_i, b_i, A_i, B_i), as lora_linear_forward takes them, all with the same r
    - scale: s = alpha / r

    Returns ys, a list of n outputs (N..., out_i), and a cache.
    """
    return shared_input_forward(x, [_frozen_linear(W, b) for W, b, _, _ in layers], [A for *_, A, _ in layers],
                                [B for *_, B in layers], scale)


def lora_shared_input_backward(douts, cache, input_grad=True):
    """Returns (dx, dAs, dBs): dx (N..., in) or None (input_grad=False), lists dA_i (r, in), dB_i (out_i, r).

        dB_i = s * dout_i^T xa_i                         (out_i, r)
        dxa_i = s * dout_i B_i, side by side as dxa      (N, n r)
        [dA_1; ...; dA_n] = dxa^T x                      one product for the n adapters
        dx = sum_i dout_i @ W_i + dxa @ [A_1; ...; A_n]  (the n adapters' share in one product)
    """
    return shared_input_backward(douts, cache, _frozen_linear_dx, input_grad)


@dataclass
class LoraConfig:
    method: ClassVar[str] = "lora"  # the LinearPair that computes its target linears (methods.LINEARS)
    label: ClassVar[str] = "LoRA"  # how reports name the method
    base_pair: ClassVar[str] = "plain"  # the LinearPair of every block linear its targets do not name
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
        DROPOUT.check(self.dropout)
        lora_scale(self.rank, self.alpha, self.rslora)  # validates rank and alpha
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"targets: expected a non-empty list from {sorted(TARGETS)}, got {list(self.targets)}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")

    @property
    def scale(self):
        """s in W' = W + s B A."""
        return lora_scale(self.rank, self.alpha, self.rslora)

    @property
    def target_layers(self):
        """The adapted linears inside a block, e.g. ("attn.q", "attn.k")."""
        return tuple(TARGETS[t] for t in self.targets)

    def count_formula(self, d, k):
        """(the formula as text, its value): trainable scalars of one adapted d x k matrix."""
        return f"r (d + k) = {self.rank} x ({d} + {k})", lora_param_count(d, k, self.rank)

    def n_weights(self, params, config):
        """The model's parameter count (the report's "all params"): every array's size."""
        return int(sum(p.size for p in params.values()))

    def report_lines(self, params, config):
        """More lines for count_report (a variant's own; none for LoRA)."""
        return []

    def layer_shapes(self, d_out, d_in):
        """suffix -> shape of what one adapted (d_out, d_in) linear gets beside its W."""
        return {"lora_A": (self.rank, d_in), "lora_B": (d_out, self.rank)}

    def to_dict(self):
        """A JSON-able dict; a variant (a subclass) adds its "method", plain LoRA's dict has none."""
        d = asdict(self)
        if self.method != LoraConfig.method:
            d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d):
        """The config to_dict wrote; ValueError naming the field for an unknown key or a bad value."""
        return from_dict(cls, d, "lora")


def settings_class(method_name):
    """The class whose fields --rank, --alpha, ... (and a variant's FLAGS) fill for a method.

    A LoRA variant's own settings class (DoraConfig, QLoraConfig); LoraConfig for any other method
    (full and prompt ignore it; IA3's adapter_config refuses a LoRA setting away from its default).
    """
    from . import ADAPTER_CONFIGS

    cls = ADAPTER_CONFIGS.get(method_name, LoraConfig)
    return cls if issubclass(cls, LoraConfig) else LoraConfig


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


def adapter_shapes(model_config):
    """name -> shape of every name the adapters described by model_config.lora add (none without them)."""
    from ..model import param_shapes

    settings = model_config.lora
    if settings is None:
        return {}
    if not isinstance(settings, LoraConfig):
        return settings.adapter_shapes(model_config)  # a method with its own names per layer (IA3: a vector)
    base = param_shapes(model_config)
    shapes = {}
    for prefix in adapted_layers(model_config, settings):
        for suffix, shape in settings.layer_shapes(*base[prefix + ".W"]).items():
            shapes[f"{prefix}.{suffix}"] = shape
    return shapes


def adapter_names(model_config):
    """The adapters' names, from the config (sorted): what a LoRA-family method trains."""
    return sorted(adapter_shapes(model_config))


def _check_plain_lora(config, what):
    if config.lora is None:
        raise ValueError("config: expected the config of a LoRA model (config.lora set), got config.lora = None")
    if config.lora.method != LoraConfig.method:
        raise ValueError(f"config: lora.{what} takes plain LoRA adapters, got {config.lora.method} adapters "
                         f"(use methods.{config.lora.method}.{what})")


def merge(params, config):
    """W + s B A in place of each adapted W, and no adapters.

    The merged model computes x @ (W + s B A).T: the same function as the
    adapted one, at the base model's cost.

    Returns (params, config): a new dict and config with .lora = None.
    """
    _check_plain_lora(config, "merge")
    s = config.lora.scale
    adapters = set(adapter_names(config))
    out = {n: p for n, p in params.items() if n not in adapters}
    for prefix in adapted_layers(config, config.lora):
        out[prefix + ".W"] = params[prefix + ".W"] + s * (params[prefix + ".lora_B"] @ params[prefix + ".lora_A"])
    return out, replace(config, lora=None)


def unmerge(merged, config, adapters, lora_config):
    """The inverse of merge: W - s B A for each adapter, and the adapters put back.

    Returns (params, config) with config.lora = lora_config.
    """
    s = lora_config.scale
    out = dict(merged)
    for prefix in adapted_layers(config, lora_config):
        out[prefix + ".W"] = merged[prefix + ".W"] - s * (adapters[prefix + ".lora_B"] @ adapters[prefix + ".lora_A"])
    out.update(adapters)
    return out, replace(config, lora=lora_config)


def lora_param_count(d, k, r):
    """Trainable scalars of one adapted d x k matrix: r (d + k) instead of d k."""
    return r * (d + k)


def count_report(params, trainable, config):
    """PEFT's print_trainable_parameters line, plus the adapters' formula per adapted matrix, checked.

    For LoRA the formula is r (d + k) per adapted d x k matrix; a variant's adapter config gives its own
    (count_formula). Returns the report as text. Raises AssertionError if the adapters' size is not
    what the formula says.
    """
    from ..model import param_shapes

    settings = config.lora
    n_train = int(sum(params[n].size for n in trainable))
    # a quantized base (QLoRA) holds its weights packed: count weights, not stored array elements
    n_all = settings.n_weights(params, config) if settings is not None else int(sum(p.size for p in params.values()))
    lines = [f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100 * n_train / n_all:.4f}"]
    if settings is not None and not isinstance(settings, LoraConfig):
        return "\n".join(lines + settings.count_lines(params, trainable, config))  # its own formula (IA3)
    if settings is not None:
        shapes = param_shapes(config)  # W's shape from the config: a quantized base holds no float W
        adapted = sorted(adapted_layers(config, settings))
        total = sum(settings.count_formula(*shapes[prefix + ".W"])[1] for prefix in adapted)
        counted = int(sum(params[n].size for n in adapter_names(config) if n in trainable))
        d, k = shapes[adapted[0] + ".W"]
        formula, per_matrix = settings.count_formula(d, k)
        lines.append(f"{settings.label}: {formula} = {per_matrix:,} per adapted matrix "
                     f"({d * k:,} for W itself), {len(adapted)} matrices: {total:,} "
                     + ("= the count above (adapters only)" if total == counted else f"!= counted {counted:,}"))
        if total != counted:
            raise AssertionError(f"{settings.label} parameter count {counted} does not match the formula "
                                 f"{formula.split(' = ')[0]}: {total}")
        lines += settings.report_lines(params, config)
    return "\n".join(lines)


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
    on other base weights (the message names both fingerprints). A prefix-tuning run's adapter file holds
    its prefix keys and values instead (methods/prefix.py; its config has n_prefix > 0).
    """
    from .prefix import prefix_shapes

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
        if saved_config.lora is None and not saved_config.n_prefix:
            raise FileError(path, "expected the LoRA settings of the adapter, got none", "meta.json: model.lora")
        if (replace(saved_config, lora=None, n_prefix=0, peft_positions=False)
                != replace(base_config, lora=None, n_prefix=0, peft_positions=False)):
            raise FileError(path, f"expected the base model's config {base_config.to_dict()}, got "
                                  f"{meta['model']}", "meta.json: model")
        allowed = {**adapter_shapes(saved_config), **prefix_shapes(saved_config)}  # a prefix run's keys and values
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


# the seam (methods/__init__.py): LoRA's pair for the model, and the method for finetune and the tools


def _pair_forward(params, prefix, x, settings, train, rng, trainable):
    p = settings.dropout if train else 0.0
    return lora_linear_forward(x, params[prefix + ".W"], params.get(prefix + ".b"), params[prefix + ".lora_A"],
                               params[prefix + ".lora_B"], settings.scale, p, rng)


def _pair_backward(dout, cache, prefix, trainable, input_grad):
    # W and b are frozen: the backward has no dW at all
    dx, dA, dB = lora_linear_backward(dout, cache, input_grad=input_grad)
    return dx, {"lora_A": dA, "lora_B": dB}


def _shared_forward(params, prefixes, x, settings, train):
    """q, k, v as one op, or None when adapter dropout gives each its own input."""
    if train and settings.dropout != 0.0:
        return None
    layers = [(params[n + ".W"], params.get(n + ".b"), params[n + ".lora_A"], params[n + ".lora_B"])
              for n in prefixes]
    return lora_shared_input_forward(x, layers, settings.scale)


def _shared_backward(douts, cache, input_grad):
    dx, dAs, dBs = lora_shared_input_backward(douts, cache, input_grad=input_grad)
    return dx, [{"lora_A": dA, "lora_B": dB} for dA, dB in zip(dAs, dBs)]


def _delta(params, config, base, prefix):
    """s B A, the update the adapter adds to W (W itself never changes)."""
    return config.lora.scale * (params[prefix + ".lora_B"] @ params[prefix + ".lora_A"])


LORA_PAIR = LinearPair("lora", _pair_forward, _pair_backward, _shared_forward, _shared_backward, _delta)


def adapter_methods_extra_shapes(method):
    """extra_shapes for a method whose adapter config rides in ModelConfig.lora: its names, from the config."""
    def extra_shapes(config, params):
        return adapter_shapes(config) if config.lora is not None and config.lora.method == method else {}
    return extra_shapes


def _adapter_config(config):
    """The settings a `--method lora` run puts in ModelConfig.lora: config.lora, a plain LoraConfig."""
    if type(config.lora) is not LoraConfig:
        raise ValueError(f"lora: expected a LoraConfig for method 'lora', got a {type(config.lora).__name__} "
                         f"(whose method is {config.lora.method!r})")
    return config.lora


def variant_adapter_config(config_type):
    """Method.adapter_config of a LoRA variant (DoRA, QLoRA): the config_type a `--method` run puts in
    ModelConfig.lora, config.lora as given, or LoRA's settings carried over into a config_type."""
    def adapter_config(config):
        if isinstance(config.lora, config_type):
            return config.lora
        if type(config.lora) is not LoraConfig:
            raise ValueError(f"lora: expected a LoraConfig or {config_type.__name__} for method "
                             f"{config_type.method!r}, got a {type(config.lora).__name__}")
        return config_type(**asdict(config.lora))
    return adapter_config


def adapter_setup(add):
    """Method.setup of a LoRA-family method: add(base_params, model_config, config.lora, seed) adds its
    adapters (add_lora, add_dora, add_qlora), and it trains exactly their names."""
    def setup(base_params, model_config, config, tokenizer=None):
        params, model_config = add(base_params, model_config, config.lora, seed=config.seed)
        return params, model_config, set(adapter_names(model_config))
    return setup


_setup = adapter_setup(add_lora)


def check_lora_settings(model_config, config, longest):
    """Method.check of LoRA and DoRA: a rank at most min(out, in) for every target (one line, naming it)."""
    from ..model import param_shapes

    check_rank(param_shapes(model_config), model_config, config.lora)


def gradcheck_point(add, params, config, settings, rng, draw=None):
    """A LoRA-family model at a random, non-degenerate float64 point, for the whole-model gradient checks.

    add(params, config, settings, seed=2) adds the adapters; then every adapter array is replaced by
    draw(name, array, noise), noise = 0.5 N(0, 1) of its shape (by default the noise itself: B != 0,
    since B = 0, the init, makes dA exactly zero). Returns (params, config, trainable names).
    """
    adapted, adapted_config = add(params, config, settings, seed=2)
    for name in adapter_names(adapted_config):
        noise = 0.5 * rng.standard_normal(adapted[name].shape)
        adapted[name] = noise if draw is None else draw(name, adapted[name], noise)
    return adapted, adapted_config, set(adapter_names(adapted_config))


def _gradcheck_setup(params, config, rng, lora_config=None):
    """Adapters on every linear with rank 2, at B != 0 (B = 0, the init, makes dA exactly zero)."""
    settings = lora_config or LoraConfig(rank=2, alpha=3.0, targets=tuple(TARGETS))
    return gradcheck_point(add_lora, params, config, settings, rng)


def _op_checks(rng, xp=np):
    """lora_linear against finite differences: x, A, B, with adapter dropout, at B != 0."""
    from ..backend import to_device
    from ..gradcheck import check_op

    def n(shape):
        return to_device(rng.standard_normal(shape), xp)

    N, T, C, r, out_f = 2, 5, 8, 3, 6
    lmask = to_device(rng.random((N, T, C)) >= 0.25, xp)
    s = lora_scale(r, 2.0 * r)
    # B is random, not zero: at B = 0 dA is exactly zero and its check would pass trivially
    return check_op("lora_linear",
                    lambda x, W, b, A, Bm: lora_linear_forward(x, W, b, A, Bm, s, 0.25, dropout_mask=lmask),
                    lora_linear_backward,
                    {"x": n((N, T, C)), "W": n((out_f, C)), "b": n(out_f), "A": n((r, C)), "B": n((out_f, r))},
                    {"x": 0, "A": 1, "B": 2}, rng)


def owns_lora_name(name):
    return name.endswith((".lora_A", ".lora_B"))


LORA = register(
    Method("lora", "low-rank adapters B A beside frozen target linears", 3e-3, _setup, check=check_lora_settings,
           adapter_config=_adapter_config, extra_shapes=adapter_methods_extra_shapes("lora"),
           owns=owns_lora_name, merge=merge, saves_adapter=True, study_lrs=(1e-3, 3e-3, 1e-2, 3e-2),
           gradcheck_setup=_gradcheck_setup, op_checks=_op_checks, color="tab:orange"),
    pair=LORA_PAIR, config_type=LoraConfig)
