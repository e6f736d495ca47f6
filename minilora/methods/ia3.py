"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale the keys, the values and the MLP's activation.

Every weight of the model stays frozen. In each block three vectors, all ones at the start, multiply

    k = l_k * (a @ W_k.T)              l_k  (C,)   the keys (this model's key has no bias)
    v = l_v * (a @ W_v.T + b_v)        l_v  (C,)   the values, bias included: l * (W x + b)
    r = (l_ff * g) @ W_proj.T + b_proj l_ff (F,)   the MLP's hidden activation g = gelu(fc(m)), the input of proj

as PEFT computes it: k's and v's outputs are scaled, mlp.proj's input (its "feedforward" module). The names,
beside the linear each one scales (PEFT's name, ia3_l):

    h.{i}.attn.k.ia3_l     (C,)
    h.{i}.attn.v.ia3_l     (C,)
    h.{i}.mlp.proj.ia3_l   (F,)

so the trainable count is L (2C + F): 1,536 for the default model (C = 128, F = 512, L = 2), against LoRA's
L x 4 x r (C + C) = 16,384 at r = 8 on q, k, v, o. All ones give exactly the base model.

Ia3Config(queries=True) scales the queries too, q = l_q * (a @ W_q.T + b_q), l_q (C,) beside attn.q: what
PEFT trains on GPT-2 by default, since its IA3 targets c_attn, the fused [q; k; v], and so scales all 3C of
its outputs; L (3C + F) vectors. It is the same output-scaling pair as k's and v's, so the same backward
and the same float64 check cover it.

Two op pairs, both around a frozen linear y = x @ W.T + b (ops.linear, no dW):

    output scaling   y = l * z,  z = x @ W.T + b               (k, v)
    input scaling    y = u @ W.T + b,  u = l * x               (proj)

The backward of the output scaling. y_nj = l_j z_nj, so with upstream gradient dy (N, out):

    dl_j = sum_n dy_nj z_nj              dl = sum over N of dy * z     (out,)
    dz   = dy * l                        (N, out), l broadcast along each row
    dx   = dz @ W                        the frozen linear's dx; W gets no gradient

The backward of the input scaling. y = u @ W.T + b with u_ni = l_i x_ni:

    du   = dy @ W                        (N, in), the frozen linear's dx
    dl_i = sum_n du_ni x_ni              dl = sum over N of du * x     (in,)
    dx   = du * l

Neither forms a product of W's shape: dl is an elementwise product summed over the tokens.

Merge folds the vectors into W, since l * (x @ W.T + b) = x @ (diag(l) W).T + l * b and
(l * x) @ W.T = x @ (W diag(l)).T: l_k and l_v scale the rows of k.W and v.W (and v.b), l_ff scales the
columns of proj.W (proj.b is added after the scaling and stays).
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from .. import ops
from ..backend import array_module
from . import LinearPair, Method, register
from .lora import TARGETS, LoraConfig, adapted_layers, adapter_methods_extra_shapes, adapter_names

NAME = "ia3_l"  # PEFT's name for the vector beside each scaled linear


def ia3_output_forward(x, W, b, l):
    """A frozen linear whose output is scaled: y = l * (x @ W.T + b).

    Inputs:
    - x: (N..., in); W: (out, in) frozen; b: (out,) frozen, or None
    - l: (out,) the scaling vector

    Returns y (N..., out) and a cache (it keeps z = x @ W.T + b, which dl reads; not x).
    """
    ops._check_float("l", l, like=x)
    if l.shape != (W.shape[0],):
        ops._fail("l", f"shape ({W.shape[0]},) = (out,), one factor per output", f"shape {tuple(l.shape)}")
    z, base_cache = ops.linear_forward(x, W, b, frozen=True)  # W frozen: its backward needs no x
    return z * l, (base_cache, z, l)


def ia3_output_backward(dout, cache, input_grad=True):
    """Returns (dx, dl): dl = sum over N of dout * z, dx = (dout * l) @ W; no dW (W is frozen).

    input_grad=False (nothing below the layer is trained) skips dx and returns None for it.
    """
    base_cache, z, l = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, out)
    # in the forward pass this was: y = l * z
    dl = (dout2 * z.reshape(dout2.shape)).sum(axis=0)  # (out,)
    if not input_grad:
        return None, dl
    dz = dout * l  # (N..., out)
    # and z = x @ W.T + b, frozen: dx only
    dx, _, _ = ops.linear_backward(dz, base_cache, param_grads=False)
    return dx, dl


def ia3_input_forward(x, W, b, l):
    """A frozen linear whose input is scaled: y = (l * x) @ W.T + b.

    Inputs:
    - x: (N..., in); W: (out, in) frozen; b: (out,) frozen, or None
    - l: (in,) the scaling vector

    Returns y (N..., out) and a cache (it keeps x, which dl reads).
    """
    ops._check_float("l", l, like=x)
    if l.shape != (W.shape[1],):
        ops._fail("l", f"shape ({W.shape[1]},) = (in,), one factor per input", f"shape {tuple(l.shape)}")
    u = x * l  # (N..., in)
    y, base_cache = ops.linear_forward(u, W, b, frozen=True)
    return y, (base_cache, x, l)


def ia3_input_backward(dout, cache, input_grad=True):
    """Returns (dx, dl): du = dout @ W, dl = sum over N of du * x, dx = du * l; no dW (W is frozen).

    du is needed for dl whatever input_grad says; input_grad=False only skips dx = du * l (returns None).
    """
    base_cache, x, l = cache
    # in the forward pass this was: y = u @ W.T + b, frozen: du only
    du, _, _ = ops.linear_backward(dout, base_cache, param_grads=False)  # (N..., in)
    # and u = l * x
    dl = (du.reshape(-1, du.shape[-1]) * x.reshape(-1, x.shape[-1])).sum(axis=0)  # (in,)
    if not input_grad:
        return None, dl
    du *= l  # du is ours (fresh from linear_backward): dx = du * l in its buffer
    return du, dl


IA3_TARGETS = ("k", "v", "proj")  # what PEFT scales in GPT-2: c_attn (k, v; q at ones) and mlp.c_proj
FEEDFORWARD = ("proj",)  # scaled on its input, as PEFT's feedforward_modules


@dataclass
class Ia3Config:
    """IA3's settings: whether the queries are scaled too. The others are fixed (l_k, l_v, l_ff, as the paper).

    It rides in ModelConfig.lora as LoRA's settings do, so the config that came with the parameters says
    which pair computes each linear (methods.linear_pair): attn.k, attn.v and mlp.proj run IA3's pair.
    """

    method: ClassVar[str] = "ia3"  # the LinearPair that computes its target linears (methods.LINEARS)
    label: ClassVar[str] = "IA3"
    base_pair: ClassVar[str] = "plain"  # every other block linear
    queries: bool = False  # l_q (C,) on the queries too: PEFT's IA3 on GPT-2 (c_attn is q, k, v), L (3C + F)

    def __post_init__(self):
        if not isinstance(self.queries, bool):
            raise ValueError(f"queries: expected true or false, got {self.queries!r}")

    @property
    def targets(self):
        """The scaled linears, as LoRA names its targets (read-only: set by queries, not chosen one by one)."""
        return (("q",) if self.queries else ()) + IA3_TARGETS

    @property
    def target_layers(self):
        return tuple(TARGETS[t] for t in self.targets)

    def adapter_shapes(self, model_config):
        """name -> shape of every vector: (out,) beside k and v, (in,) beside proj (its input is scaled)."""
        from ..model import param_shapes

        base = param_shapes(model_config)
        shapes = {}
        for prefix in adapted_layers(model_config, self):
            d_out, d_in = base[prefix + ".W"]
            shapes[f"{prefix}.{NAME}"] = (d_in,) if _is_feedforward(prefix) else (d_out,)
        return shapes

    def n_weights(self, params, config):
        """The model's parameter count (the report's "all params"): every array's size."""
        return int(sum(p.size for p in params.values()))

    def count_lines(self, params, trainable, config):
        """count_report's lines for IA3: the formula L (2C + F) (L (3C + F) with queries), checked against the
        vectors counted."""
        L, C, F = config.n_layers, config.d_model, config.d_ff
        n = 3 if self.queries else 2
        formula = L * (n * C + F)
        counted = int(sum(params[name].size for name in adapter_names(config) if name in trainable))
        if formula != counted:
            raise AssertionError(f"IA3 parameter count {counted} does not match the formula L ({n}C + F): {formula}")
        vectors = "l_q, l_k, l_v" if self.queries else "l_k, l_v"
        return [f"IA3: L ({n}C + F) = {L} x ({n} x {C} + {F}) = {formula:,} ({vectors} of C and l_ff of F per "
                f"block) = the count above (vectors only)"]

    def to_dict(self):
        # the plain IA3's dict is {"method": "ia3"}, as before queries existed
        return {"method": self.method, **({"queries": True} if self.queries else {})}

    @classmethod
    def from_dict(cls, d):
        """The config to_dict wrote ("queries" where set; "method" is read by adapter_config_from_dict)."""
        from ..validate import from_dict

        return from_dict(cls, d, "lora")


def _layer_of(prefix):
    """"h.0.mlp.proj" -> "proj"."""
    layer = prefix.split(".", 2)[-1]
    return next(t for t, name in TARGETS.items() if name == layer)


def _is_feedforward(prefix):
    return _layer_of(prefix) in FEEDFORWARD


def add_ia3(params, model_config, ia3_config=None):
    """Vectors of ones beside attn.k, attn.v (C,) and mlp.proj (F,) of every block: exactly the base model.

    Returns (params, config): a new dict (the base arrays shared, not copied) and model_config with
    .lora = the Ia3Config, the description every later call needs.
    """
    if model_config.lora is not None:
        raise ValueError(f"model_config: these params already have adapters ({model_config.lora}); "
                         "merge them first or start from the base model")
    settings = Ia3Config() if ia3_config is None else ia3_config
    if not isinstance(settings, Ia3Config):
        raise ValueError(f"ia3_config: expected an Ia3Config, got a {type(settings).__name__}")
    xp = array_module(params["wte"])
    dtype = params["wte"].dtype
    out = dict(params)
    for name, shape in settings.adapter_shapes(model_config).items():
        out[name] = xp.ones(shape, dtype=dtype)
    return out, replace(model_config, lora=settings)


def _check_ia3(config):
    if not isinstance(config.lora, Ia3Config):
        got = "None" if config.lora is None else f"{config.lora.method} adapters"
        raise ValueError(f"config: expected the config of an IA3 model (an Ia3Config in config.lora), got {got}")


def merged_linear(params, prefix):
    """(W', b') of one scaled linear: rows of W and b scaled by l (k, v), or the columns of W (proj)."""
    W, b, l = params[prefix + ".W"], params.get(prefix + ".b"), params[f"{prefix}.{NAME}"]
    if _is_feedforward(prefix):
        return W * l[None, :], b  # (l * x) @ W.T = x @ (W diag(l)).T; b is added after
    return l[:, None] * W, (None if b is None else l * b)  # l * (x @ W.T + b) = x @ (diag(l) W).T + l * b


def merge(params, config):
    """Every vector folded into its linear, and no vectors: the same function at the base model's cost.

    Returns (params, config): a new dict and config with .lora = None.
    """
    _check_ia3(config)
    vectors = set(adapter_names(config))
    out = {n: p for n, p in params.items() if n not in vectors}
    for prefix in adapted_layers(config, config.lora):
        W, b = merged_linear(params, prefix)
        out[prefix + ".W"] = W
        if b is not None:
            out[prefix + ".b"] = b
    return out, replace(config, lora=None)


# the seam (methods/__init__.py): IA3's pair for the model, and the method for finetune and the tools


def _pair_forward(params, prefix, x, settings, train, rng, trainable):
    W, b, l = params[prefix + ".W"], params.get(prefix + ".b"), params[f"{prefix}.{NAME}"]
    if _is_feedforward(prefix):
        y, cache = ia3_input_forward(x, W, b, l)
        return y, (ia3_input_backward, cache)
    y, cache = ia3_output_forward(x, W, b, l)
    return y, (ia3_output_backward, cache)


def _pair_backward(dout, cache, prefix, trainable, input_grad):
    # W and b are frozen: the backward has no dW at all
    backward, cache = cache
    dx, dl = backward(dout, cache, input_grad=input_grad)
    return dx, {NAME: dl}


def _delta(params, config, base, prefix):
    """W' - W0 (the (out, in) matrix, for the sweep's delta norms, never in a training step)."""
    return merged_linear(params, prefix)[0] - base[prefix + ".W"]


# no shared form: q stays a plain frozen linear, so q, k, v are three linears on one input (model._qkv_forward)
IA3_PAIR = LinearPair("ia3", _pair_forward, _pair_backward, delta=_delta)


LORA_FIELDS = ("rank", "alpha", "targets", "dropout", "rslora", "init")  # the settings IA3 has none of


def _adapter_config(config):
    """The Ia3Config of a `--method ia3` run; a LoRA setting other than its default is refused, by name."""
    if isinstance(config.lora, Ia3Config):
        return config.lora
    if type(config.lora) is not LoraConfig:
        raise ValueError(f"lora: expected a LoraConfig at its defaults or an Ia3Config for method 'ia3', "
                         f"got a {type(config.lora).__name__}")
    default = LoraConfig()
    for name in LORA_FIELDS:
        if getattr(config.lora, name) != getattr(default, name):
            raise ValueError(f"{name}: expected no LoRA setting with method 'ia3' (it learns only the vectors "
                             f"l_k, l_v, l_ff and has no {name}), got {getattr(config.lora, name)!r}")
    return Ia3Config()


def _setup(base_params, model_config, config, tokenizer=None):
    params, model_config = add_ia3(base_params, model_config, config.lora)
    return params, model_config, set(adapter_names(model_config))


def _gradcheck_setup(params, config, rng, ia3_config=None):
    """IA3 at a random point away from ones (at l = 1 the checks would still pass, but l is then special)."""
    adapted, adapted_config = add_ia3(params, config, ia3_config)
    for name in adapter_names(adapted_config):
        adapted[name] = 1.0 + 0.5 * rng.standard_normal(adapted[name].shape)
    return adapted, adapted_config, set(adapter_names(adapted_config))


def _gradcheck_queries(params, config, rng):
    """_gradcheck_setup with Ia3Config(queries=True): l_q too, PEFT's IA3 on GPT-2."""
    return _gradcheck_setup(params, config, rng, Ia3Config(queries=True))


def _op_checks(rng, xp=np):
    """Both scalings against finite differences, every coordinate of x and l (with a bias, and without)."""
    from ..backend import to_device
    from ..gradcheck import check_op

    def n(shape):
        return to_device(rng.standard_normal(shape), xp)

    N, T, C, out_f = 2, 5, 8, 6
    res = check_op("ia3_output (k, v)", ia3_output_forward, ia3_output_backward,
                   {"x": n((N, T, C)), "W": n((out_f, C)), "b": n(out_f), "l": n(out_f)}, {"x": 0, "l": 1}, rng)
    res += check_op("ia3_output, no bias (k)", lambda x, W, l: ia3_output_forward(x, W, None, l),
                    ia3_output_backward, {"x": n((N, T, C)), "W": n((out_f, C)), "l": n(out_f)},
                    {"x": 0, "l": 1}, rng)
    res += check_op("ia3_input (proj)", ia3_input_forward, ia3_input_backward,
                    {"x": n((N, T, C)), "W": n((out_f, C)), "b": n(out_f), "l": n(C)}, {"x": 0, "l": 1}, rng)
    return res


IA3 = register(
    # default_lr: set before the forgetting study ran (it chose 1e-1, the top of study_lrs). IA3 is trained at larger
    # rates than LoRA: its factors start at 1 and an Adam step moves each by about lr, a relative change of lr
    Method("ia3", "IA3: learned vectors l_k, l_v, l_ff rescale the keys, the values and the MLP's activation",
           3e-2, _setup, adapter_config=_adapter_config, extra_shapes=adapter_methods_extra_shapes("ia3"),
           owns=lambda name: name.endswith(f".{NAME}"), merge=merge, saves_adapter=True,
           study_lrs=(3e-3, 1e-2, 3e-2, 1e-1), gradcheck_setup=_gradcheck_setup, op_checks=_op_checks,
           gradcheck_variants=(("queries", _gradcheck_queries),),
           color="tab:brown"),
    pair=IA3_PAIR, config_type=Ia3Config)
