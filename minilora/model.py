"""A tiny GPT: the forward pass composed from the ops, and its backward in mirror order.

Parameters are one flat dict, name -> array, with GPT-2's names:

    wte                  (V, C)        token embedding, also the LM head (tied)
    wpe                  (Tmax, C)     learned position embedding
    h.{i}.ln_1.g / .b    (C,)          pre-attention LayerNorm
    h.{i}.attn.{q,k,v,o}.W (C, C)      attention projections, W is (out, in)
    h.{i}.attn.{q,v,o}.b (C,)          their biases; the key has none (see param_shapes)
    h.{i}.ln_2.g / .b    (C,)          pre-MLP LayerNorm
    h.{i}.mlp.fc.W       (F, C), .b (F,)     MLP up-projection (F = d_ff)
    h.{i}.mlp.proj.W     (C, F), .b (C,)     MLP down-projection
    ln_f.g / .b          (C,)          final LayerNorm

Fine-tuning methods (minilora/methods/) only add names beside these, e.g.

    <linear>.lora_A (r, in), <linear>.lora_B (out, r)   LoRA adapter of a linear
    <linear>.ia3_l (out,) or (in,)     IA3 vector scaling the output of k, v or the input of proj
    prompt               (P, C)        soft prompt vectors
    h.{i}.attn.prefix_k, .prefix_v (P, C)   prefix keys and values of layer i (config.n_prefix = P)
    cls.W (K, C), cls.b (K,)           classification head on the last token (add_head)

and say which names are trainable. The backward computes a gradient for a
name only if it is in `trainable`: a frozen weight never gets one.

Which op pair computes a linear is asked in one place, `_linear_forward`, of
methods.linear_pair(config, prefix): the adapter settings in config.lora (the
config that came with the parameters) name the pair of every adapted linear;
every other linear is the plain pair. The backward runs the pair the forward chose.
Likewise a block's attention is asked once, in `_attention_forward`, of
methods.attention_pair(config): causal attention, or with config.n_prefix > 0
the attention with prefix columns.

Memory. The LM head's loss runs over the tokens in chunks (ops.tied_head_cross_entropy_forward):
the (B, T, V) logits never exist at once. With checkpoint_activations the forward keeps only each
block's input (BlockCheckpoint) and the backward recomputes the block just before its backward; the
training step's backward drops each block's cache as soon as that block's backward is done.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import methods, ops
from .backend import array_module, to_device
from .bounds import DROPOUT
from .methods.lora import LoraConfig
from .validate import from_dict


@dataclass
class ModelConfig:
    vocab_size: int = 96  # V, the tokenizer's size (96: the character one); pretraining sets it from the run's
    context_length: int = 128  # Tmax, the longest sequence of real tokens
    d_model: int = 128  # C, the width of the residual stream
    n_heads: int = 4  # NH; head size hs = C / NH
    n_layers: int = 2  # transformer blocks
    d_ff: int = 512  # F, the MLP's hidden width (4 C as in GPT-2)
    dropout: float = 0.0  # on embeddings and residual branches, training only
    # the adapters' settings when params hold adapters: a LoraConfig, a variant's subclass (DoraConfig), or
    # another method's adapter config (ia3.Ia3Config); its `method` names the pair that computes every linear
    # it targets (lora.add_lora, ia3.add_ia3 set it)
    lora: LoraConfig = None
    # prefix tuning (methods/prefix.py): P trainable keys and values before every attention layer's own;
    # 0: none. methods.attention_pair reads it: the one place a block's attention is chosen
    n_prefix: int = 0
    # with a soft prompt or a prefix of P virtual tokens: number the real tokens P..P+T-1 (and a soft prompt's
    # vectors 0..P-1), as PEFT's prompt and prefix tuning do, so that the run exports exactly; False: the real
    # tokens keep positions 0..T-1, as in pretraining, and the virtual ones take none (position_offset)
    peft_positions: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.n_prefix, bool) or not isinstance(self.n_prefix, int) or self.n_prefix < 0:
            raise ValueError(f"n_prefix: expected a non-negative integer, got {self.n_prefix!r}")
        if not isinstance(self.peft_positions, bool):
            raise ValueError(f"peft_positions: expected true or false, got {self.peft_positions!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}")
        DROPOUT.check(self.dropout)
        if isinstance(self.lora, dict):
            self.lora = methods.adapter_config_from_dict(self.lora)
        kinds = tuple(methods.ADAPTER_CONFIGS.values())  # LoraConfig, its variants', Ia3Config
        if self.lora is not None and not isinstance(self.lora, kinds):
            raise ValueError(f"lora: expected an adapter config ({', '.join(k.__name__ for k in kinds)}) or None, "
                             f"got {type(self.lora).__name__}")

    def to_dict(self):
        """A JSON-able dict that from_dict turns back into this config, adapters' settings included."""
        d = asdict(self)
        d["lora"] = None if self.lora is None else self.lora.to_dict()  # a variant's dict names its method
        if not self.n_prefix:
            del d["n_prefix"]  # a setting added later: a model without a prefix writes the dict it always did
        if not self.peft_positions:
            del d["peft_positions"]  # likewise: at its default, the dict every earlier run wrote
        return d

    @classmethod
    def from_dict(cls, d):
        """The config to_dict wrote; ValueError naming the field for an unknown key or a bad value."""
        return from_dict(cls, d, "model")


# Named sizes. "gpt2-small" has GPT-2 small's shapes (124M parameters; hf.py imports its weights
# exactly), large enough that a GPU step pays for itself (benchmarks/gpt2_small.py, gpu_steps.py).
SIZES = {
    "default": ModelConfig(),
    "gpt2-small": ModelConfig(vocab_size=50257, context_length=1024, d_model=768, n_heads=12, n_layers=12,
                              d_ff=3072),
}


def param_shapes(config):
    """name -> shape of every base parameter of the model."""
    C, F = config.d_model, config.d_ff
    shapes = {"wte": (config.vocab_size, C), "wpe": (config.context_length, C)}
    for i in range(config.n_layers):
        p = f"h.{i}."
        shapes[p + "ln_1.g"] = shapes[p + "ln_1.b"] = (C,)
        for name in ("q", "k", "v", "o"):
            shapes[p + f"attn.{name}.W"] = (C, C)
        # no key bias: it adds q . b_k to every score of a query's row, which the
        # softmax ignores, so its gradient is identically zero (GPT-2 has one anyway)
        for name in ("q", "v", "o"):
            shapes[p + f"attn.{name}.b"] = (C,)
        shapes[p + "ln_2.g"] = shapes[p + "ln_2.b"] = (C,)
        shapes[p + "mlp.fc.W"], shapes[p + "mlp.fc.b"] = (F, C), (F,)
        shapes[p + "mlp.proj.W"], shapes[p + "mlp.proj.b"] = (C, F), (C,)
    shapes["ln_f.g"] = shapes["ln_f.b"] = (C,)
    return shapes


def init_params(config, seed=0, dtype=np.float32):
    """GPT-2 initialisation on the host, from a seeded generator.

    Weights ~ N(0, 0.02); the output projections of each residual branch
    (attn.o, mlp.proj) ~ N(0, 0.02 / sqrt(2 n_layers)) so the residual stream's
    variance does not grow with depth; biases 0; LayerNorm gains 1.

    Returns a dict name -> numpy array (move it with `params_to`).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".g"):
            params[name] = np.ones(shape, dtype)
        elif name.endswith(".b"):
            params[name] = np.zeros(shape, dtype)
        else:
            std = 0.02
            if name.endswith(("attn.o.W", "mlp.proj.W")):
                std = 0.02 / math.sqrt(2 * config.n_layers)
            params[name] = rng.normal(0.0, std, shape).astype(dtype)
    return params


HEAD_NAMES = ("cls.W", "cls.b")


def head_shapes(config, params):
    """name -> shape of a classification head in params (any K classes), or {} without one."""
    if "cls.W" not in params:
        return {}
    K = params["cls.W"].shape[0]
    return {"cls.W": (K, config.d_model), "cls.b": (K,)}


def add_head(params, n_classes, seed=0):
    """A new dict: params (shared) plus the classification head cls.W (K, C) ~ N(0, 0.02), cls.b (K,) = 0."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes: expected an integer >= 2, got {n_classes!r}")
    rng = np.random.default_rng(seed)
    xp = array_module(params["wte"])
    dtype = params["wte"].dtype
    C = params["wte"].shape[1]
    W = rng.normal(0.0, 0.02, (n_classes, C)).astype(dtype)
    return {**params, "cls.W": xp.asarray(W), "cls.b": xp.zeros(n_classes, dtype=dtype)}


def params_to(params, xp, dtype=None):
    """A new dict with every array moved to module xp, and every floating one cast to dtype if given
    (integer arrays, QLoRA's 4-bit codes, keep their type)."""
    out = {}
    for name, p in params.items():
        p = to_device(p, xp)
        out[name] = p.astype(dtype) if dtype is not None and p.dtype.kind == "f" else p
    return out


def count_params(params, names=None):
    """Number of scalars in params (or in the given names only)."""
    return int(sum(params[n].size for n in (params if names is None else names)))


def _linear_forward(params, config, prefix, x, rng, train, trainable=None):
    """The linear at prefix, computed by the pair methods.linear_pair chooses from config (the one place).

    trainable: when given, a frozen linear keeps no input in its cache (only its dW would read it).
    Returns y and a cache that carries the pair, so the backward runs its mirror.
    """
    pair = methods.linear_pair(config, prefix)
    y, cache = pair.forward(params, prefix, x, config.lora, train, rng, trainable)
    return y, (pair, cache)


def _linear_backward(dout, cache, prefix, params, grads, trainable, input_grad=True):
    """dx of a linear; adds its parameter gradients to grads only for trainable names.

    input_grad=False: nothing below this layer is trained, so dx is not computed (returns None).
    """
    pair, cache = cache
    dx, named = pair.backward(dout, cache, prefix, trainable, input_grad)
    _keep(grads, trainable, prefix, **named)
    return dx


def _attention_forward(params, config, prefix, q, k, v):
    """The attention of block prefix ("h.{i}.attn"), by the pair methods.attention_pair chooses (the one place)."""
    pair = methods.attention_pair(config)
    y, cache = pair.forward(params, prefix, q, k, v, config)
    return y, (pair, cache)


def _attention_backward(dy, cache, prefix, grads, trainable, input_grad):
    """(dq, dk, dv), or None when not input_grad; adds the pair's own trainable gradients to grads."""
    pair, cache = cache
    dqkv, named = pair.backward(dy, cache, prefix, trainable, input_grad)
    _keep(grads, trainable, prefix, **named)
    return dqkv


def _ln_backward(dout, cache, prefix, grads, trainable):
    wanted = prefix + ".g" in trainable or prefix + ".b" in trainable
    dx, dg, db = ops.layer_norm_backward(dout, cache, param_grads=wanted)
    _keep(grads, trainable, prefix, g=dg, b=db)
    return dx


def _trains(trainable, prefix):
    """True if any trainable name starts with prefix (e.g. "h.0." or "h.0.ln_1.")."""
    return any(name.startswith(prefix) for name in trainable)


def _keep(grads, trainable, prefix, **named):
    """grads["prefix.name"] = gradient, for each named gradient whose parameter is trainable."""
    for name, g in named.items():
        if f"{prefix}.{name}" in trainable:
            grads[f"{prefix}.{name}"] = g


def _qkv_forward(params, config, p, a, rng, train, trainable):
    """q, k, v = the three projections of a (B, T, C), and their caches.

    When one pair computes all three and it has a shared form (LoRA without
    adapter dropout), they read exactly the same input, so one product forms
    all their x A^T (and the backward their dA and dx likewise). Otherwise
    each is its own linear.
    """
    names = [p + "attn." + n for n in ("q", "k", "v")]
    pairs = [methods.linear_pair(config, n) for n in names]
    pair = pairs[0]
    if pair.shared_forward is not None and all(other is pair for other in pairs):
        shared = pair.shared_forward(params, names, a, config.lora, train)
        if shared is not None:
            qkv, cache = shared
            return qkv, ("shared", (pair, cache))
    outs, caches = zip(*(_linear_forward(params, config, n, a, rng, train, trainable) for n in names))
    return outs, ("each", caches)


def _qkv_backward(dqkv, c_qkv, p, params, grads, trainable, input_grad=True):
    """Mirror of _qkv_forward: da, the gradient of their shared input (None if not input_grad)."""
    names = [p + "attn." + n for n in ("q", "k", "v")]
    kind, cache = c_qkv
    if kind == "shared":
        pair, cache = cache
        da, named = pair.shared_backward(dqkv, cache, input_grad)
        for name, g in zip(names, named):
            _keep(grads, trainable, name, **g)
        return da
    if not input_grad:
        for d, c, name in zip(dqkv, cache, names):
            _linear_backward(d, c, name, params, grads, trainable, input_grad=False)
        return None
    # a fans out to q, k and v: its gradient is the sum of the three
    da = _linear_backward(dqkv[0], cache[0], names[0], params, grads, trainable)
    for d, c, name in zip(dqkv[1:], cache[1:], names[1:]):
        da += _linear_backward(d, c, name, params, grads, trainable)  # da is ours: add in place
    return da


def block_forward(params, i, x, config, rng=None, train=False, trainable=None):
    """One pre-LayerNorm transformer block. x (B, T, C) -> (B, T, C).

    trainable: when given, frozen plain linears keep no input for the backward (see forward).
    """
    p = f"h.{i}."
    drop = config.dropout if train else 0.0
    a, c_ln1 = ops.layer_norm_forward(x, params[p + "ln_1.g"], params[p + "ln_1.b"])
    (q, k, v), c_qkv = _qkv_forward(params, config, p, a, rng, train, trainable)  # each (B, T, C)
    y, c_att = _attention_forward(params, config, p + "attn", q, k, v)
    o, c_o = _linear_forward(params, config, p + "attn.o", y, rng, train, trainable)
    o, c_do = ops.dropout_forward(o, drop, rng)
    x = x + o  # residual
    m, c_ln2 = ops.layer_norm_forward(x, params[p + "ln_2.g"], params[p + "ln_2.b"])
    f, c_fc = _linear_forward(params, config, p + "mlp.fc", m, rng, train, trainable)  # (B, T, F)
    g, c_gelu = ops.gelu_forward(f)
    r, c_proj = _linear_forward(params, config, p + "mlp.proj", g, rng, train, trainable)  # (B, T, C)
    r, c_dr = ops.dropout_forward(r, drop, rng)
    x += r  # residual; x is ours since x = x + o (the input itself is never written)
    return x, (c_ln1, c_qkv, c_att, c_o, c_do, c_ln2, c_fc, c_gelu, c_proj, c_dr)


def block_backward(dx, cache, params, i, grads, trainable, input_grad=True):
    """Mirror of block_forward: dx (B, T, C) -> dx (B, T, C).

    input_grad=False: no parameter below this block is trained (see backward), so
    the gradient of the block's input is not computed and None is returned.
    """
    c_ln1, c_qkv, c_att, c_o, c_do, c_ln2, c_fc, c_gelu, c_proj, c_dr = cache
    p = f"h.{i}."
    # in the forward pass this was: x = x + r, so dx reaches both x and r
    # each gradient buffer is dropped (del) as soon as the next one is made from it, so the backward
    # of a block holds at most two of them at once, (B, T, F) ones included
    dr = ops.dropout_backward(dx, c_dr)
    dg = _linear_backward(dr, c_proj, p + "mlp.proj", params, grads, trainable)
    del dr
    df = ops.gelu_backward(dg, c_gelu)
    del dg
    dm = _linear_backward(df, c_fc, p + "mlp.fc", params, grads, trainable)
    del df
    dx_ln2 = _ln_backward(dm, c_ln2, p + "ln_2", grads, trainable)
    del dm
    dx_ln2 += dx  # dx = dx + dx_ln2, summed in ln_2's fresh buffer (dx is the caller's)
    dx = dx_ln2
    del dx_ln2
    # x = x + o
    do = ops.dropout_backward(dx, c_do)
    dy = _linear_backward(do, c_o, p + "attn.o", params, grads, trainable)
    del do
    # q, k, v need their gradients when their own weights, or anything below them, train
    qkv_grad = input_grad or any(_trains(trainable, p + n) for n in ("ln_1.", "attn.q.", "attn.k.", "attn.v."))
    dqkv = _attention_backward(dy, c_att, p + "attn", grads, trainable, qkv_grad)
    del dy
    if not qkv_grad:
        return None  # only the attention's own parameters (a prefix) train here: no dq, dk, dv at all
    if not input_grad and not _trains(trainable, p + "ln_1."):
        # a = ln_1(x) leads only to frozen weights and the untrained input: its
        # gradient, the three dx products of q, k, v and the ln_1 backward are all
        # skipped; only the q, k, v parameters' own gradients are computed
        _qkv_backward(dqkv, c_qkv, p, params, grads, trainable, input_grad=False)
        return None
    da = _qkv_backward(dqkv, c_qkv, p, params, grads, trainable)
    del dqkv
    dx_ln1 = _ln_backward(da, c_ln1, p + "ln_1", grads, trainable)
    del da
    if not input_grad:
        return None
    dx_ln1 += dx  # dx = dx + dx_ln1, in ln_1's fresh buffer
    return dx_ln1


def forward(params, config, ids, rng=None, train=False, trainable=None, checkpoint_activations=False):
    """Token ids to final hidden states.

    Inputs:
    - params: the parameter dict (arrays of one module and dtype)
    - config: the ModelConfig these params came with (its .lora describes any adapters)
    - ids: (B, T) token ids, T <= context_length (numpy or the params' module)
    - rng: numpy Generator that draws dropout masks (needed only when train and a dropout > 0)
    - train: True applies dropout; False (evaluation, decoding) never does
    - trainable: the names the backward will compute gradients for, or None
      (keep every activation). Given, a frozen linear's input is not kept in its
      cache (only its dW would read it): under LoRA or prompt tuning the MLP's
      inputs, the largest activations, are freed as soon as they are used.
    - checkpoint_activations: keep only each block's input (B, T', C) and the
      generator's state before it (BlockCheckpoint); the backward recomputes
      the block's forward, the same masks drawn again, just before its backward

    Returns h (B, T, C), the hidden states of the real tokens after ln_f, and
    a cache. With a soft prompt (params["prompt"], (P, C)) the P prompt vectors
    are put before the token embeddings; they get no position embedding, the
    real tokens keep positions 0..T-1 exactly as in pretraining, and the
    prompt's own hidden states are dropped before the head. With
    config.peft_positions the sequence is numbered as PEFT numbers it
    (position_offset): prompt_j + wpe[j] for j < P, then the real tokens at
    P..P+T-1 (after a prefix, too: they start at P), so T <= context_length - P.
    """
    wte = params["wte"]
    xp = array_module(wte)
    if getattr(ids, "ndim", None) != 2:
        raise ValueError(f"ids: expected a (B, T) array of token ids, got {getattr(ids, 'shape', type(ids).__name__)}")
    B, T = ids.shape
    start = position_offset(params, config)  # the real tokens' first position: 0, or P with peft_positions
    if T > config.context_length - start:
        room = (f"context_length - P = {config.context_length} - {start} = {config.context_length - start} tokens "
                f"per row (peft_positions: the P virtual tokens take the positions before them)" if start
                else f"context_length={config.context_length} tokens per row")
        raise ValueError(f"ids: expected at most {room}, got {T}")
    _check_ids_on_host("ids", ids, config.vocab_size)
    ids = to_device(ids, xp)
    tok, c_emb = ops.embedding_forward(ids, wte)  # (B, T, C)
    x = tok + params["wpe"][start:start + T]  # (B, T, C), positions broadcast over the batch
    P = 0
    if "prompt" in params:
        prompt = params["prompt"]  # (P, C)
        P = prompt.shape[0]
        if config.peft_positions:
            prompt = prompt + params["wpe"][:P]  # PEFT's: the virtual tokens take positions 0..P-1
        x = xp.concatenate([xp.broadcast_to(prompt, (B,) + prompt.shape), x], axis=1)  # (B, P + T, C)
    x, c_drop = ops.dropout_forward(x, config.dropout if train else 0.0, rng)
    c_blocks = []
    for i in range(config.n_layers):
        if checkpoint_activations:
            kept = BlockCheckpoint(x, _generator_state(rng), config, train, trainable)
            x = block_forward(params, i, x, config, rng, train, trainable)[0]  # its cache is dropped here
            c_blocks.append(kept)
        else:
            x, c = block_forward(params, i, x, config, rng, train, trainable)
            c_blocks.append(c)
    h, c_lnf = ops.layer_norm_forward(x, params["ln_f.g"], params["ln_f.b"])
    return h[:, P:], (c_emb, c_drop, c_blocks, c_lnf, P, T, start)


def position_offset(params, config):
    """The position of the first real token: 0 (minilora's default, the positions of pretraining), or, with
    config.peft_positions, P, the virtual tokens before it (a soft prompt's rows, or config.n_prefix), as
    PEFT numbers them: its prompt tuning puts the P vectors first in inputs_embeds, so GPT-2 gives them
    positions 0..P-1; its prefix tuning hands the prefix over as past_key_values of length P, so GPT-2 starts
    the real tokens at P."""
    if not config.peft_positions:
        return 0
    return params["prompt"].shape[0] if "prompt" in params else config.n_prefix


def real_context(params, config):
    """The most real tokens a row may hold: context_length, less the positions the virtual tokens take."""
    return config.context_length - position_offset(params, config)


@dataclass
class BlockCheckpoint:
    """What a checkpointed forward keeps of block i: its input x (B, T', C), the generator's state
    before the block drew its dropout masks, and the settings of that call (config, train, trainable).
    `recompute` runs the block's forward again and returns the cache block_forward returned then:
    the same ops on the same input, the same masks drawn from the same state, so the same numbers."""

    x: object  # (B, T', C), the block's input (T' = P + T with a soft prompt)
    rng_state: object  # _generator_state(rng) before the block ran, or None
    config: ModelConfig
    train: bool
    trainable: object

    def recompute(self, params, i):
        rng = _generator_at(self.rng_state)
        return block_forward(params, i, self.x, self.config, rng, self.train, self.trainable)[1]


def _generator_state(rng):
    """rng's state (a dict), from which _generator_at draws exactly what rng draws next; None for no rng."""
    return None if rng is None else (type(rng.bit_generator), rng.bit_generator.state)


def _generator_at(state):
    """A new numpy Generator at a state _generator_state saved (None for None)."""
    if state is None:
        return None
    kind, bit_state = state
    bits = kind()
    bits.state = bit_state
    return np.random.Generator(bits)


def backward(dh, cache, params, grads, trainable, free_cache=False):
    """Mirror of forward. dh (B, T, C) -> gradients added into grads (trainable names only).

    A block checkpointed by the forward (BlockCheckpoint) is recomputed right before its backward.
    free_cache: drop each block's cache from `cache` as soon as its backward is done (the cache
    cannot be used again then), so the step holds only the caches of the blocks still ahead.
    """
    c_emb, c_drop, c_blocks, c_lnf, P, T, start = cache
    xp = array_module(dh)
    if P:
        # h[:, P:] dropped the prompt's hidden states: they receive no gradient from the head
        dh = xp.concatenate([xp.zeros((dh.shape[0], P, dh.shape[2]), dh.dtype), dh], axis=1)
    # Only what leads to a trainable parameter is computed, as in PyTorch's autograd.
    # The input x (embeddings, prompt) needs its gradient only if one of them is
    # trained; block i needs its input's gradient only if something below it is
    # trained. LoRA and a head leave wte, wpe frozen: block 0 then skips the dx of
    # its q, k, v products and its ln_1 backward, and no block below the lowest
    # trained one is visited at all.
    input_trained = any(name in trainable for name in ("wte", "wpe", "prompt"))
    trained_blocks = [i for i in range(len(c_blocks)) if _trains(trainable, f"h.{i}.")]
    if input_trained:
        lowest = 0
    elif trained_blocks:
        lowest = trained_blocks[0]
    else:
        lowest = len(c_blocks)  # only ln_f or a head is trained: no block is visited
    if free_cache:
        c_blocks[:lowest] = [None] * lowest  # blocks below the lowest trained one are never visited
    dx = _ln_backward(dh, c_lnf, "ln_f", grads, trainable)
    for i in reversed(range(lowest, len(c_blocks))):
        input_grad = input_trained or i > lowest
        c = c_blocks[i]
        if isinstance(c, BlockCheckpoint):
            c = c.recompute(params, i)  # block i's forward again, just for this backward
        if free_cache:
            c_blocks[i] = None
        dx = block_backward(dx, c, params, i, grads, trainable, input_grad)
        del c  # block i's activations (recomputed or kept) go here
    if not input_trained:
        return
    dx = ops.dropout_backward(dx, c_drop)
    if P and "prompt" in trainable:
        grads["prompt"] = dx[:, :P].sum(axis=0)  # the same P vectors serve every row
    dx_prompt = dx[:, :P]
    dx = dx[:, P:]
    if "wpe" in trainable:
        # in the forward pass this was: x = tok + wpe[start:start + T], broadcast over B
        dwpe = xp.zeros_like(params["wpe"])
        dwpe[start:start + T] = dx.sum(axis=0)
        if P and start:
            # and, with PEFT's positions, the prompt's rows were prompt + wpe[:P] (start = P): rows 0..P-1
            dwpe[:P] += dx_prompt.sum(axis=0)
        grads["wpe"] = dwpe
    if "wte" in trainable:
        # the head's share, ours (fresh from the loss), gets the embedding's added in place
        grads["wte"] = ops.embedding_backward(dx, c_emb, into=grads.get("wte"))


def _check_ids_on_host(name, ids, n):
    """Token ids or labels must lie in [0, n). Checked here, on the host, before they move:
    on a GPU the ops skip the check, which would cost a device -> host copy every step."""
    if hasattr(ids, "get") or not getattr(ids, "size", 0):
        return
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected an integer array of ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"{name}: expected ids in [0, {n}), got ids in [{int(ids.min())}, {int(ids.max())}]")


def loss_and_grads(params, config, batch, trainable=(), rng=None, train=False, checkpoint_activations=False):
    """The loss of a batch and the gradients of the trainable names: the one model call.

    The batch's keys pick the head:
    - language modelling, {"x", "y", "mask"}: next-token cross-entropy over the
      targets the mask counts (x, y, mask (B, T); y is x shifted left by one;
      mask may be absent or None to count every target)
    - classification, {"x", "last", "labels"}: cross-entropy of the head cls.W,
      cls.b on the hidden state of each row's last real token (last, labels (B,))

    Inputs:
    - params, config: the parameters and the ModelConfig they came with
    - trainable: names to compute gradients for; empty gives the loss only
    - rng, train: dropout (see forward)
    - checkpoint_activations: keep each block's input only and recompute the block in the backward
      (see forward): less memory, one more forward of the blocks, the same gradients bit for bit

    Returns (loss, grads): loss a Python float (mean nats per counted token, or
    per example), grads a dict holding exactly the trainable names.
    """
    methods.check_trainable(params, trainable, config)
    trainable = set(trainable)
    if "labels" in batch:
        loss, grads = _classifier(params, config, batch, trainable, rng, train, checkpoint_activations)
    elif "y" in batch:
        loss, grads = _language_model(params, config, batch, trainable, rng, train, checkpoint_activations)
    else:
        raise ValueError(f"batch: expected keys x, y[, mask] (language modelling) or x, last, labels "
                         f"(classification), got {sorted(batch)}")
    return float(loss), grads


def _language_model(params, config, batch, trainable, rng, train, checkpoint_activations=False):
    """Next-token cross-entropy: logits = h @ wte.T (the head tied to the embedding).

    The head and its loss run in chunks of tokens (ops.tied_head_cross_entropy_forward): the (B, T, V)
    logits never exist at once, and the tied embedding's gradient is accumulated chunk by chunk.
    """
    wte = params["wte"]
    xp = array_module(wte)
    h, cache = forward(params, config, batch["x"], rng, train, trainable, checkpoint_activations)
    _check_ids_on_host("y", batch["y"], config.vocab_size)
    mask = batch.get("mask")
    if mask is not None and not hasattr(mask, "get") and not mask.sum() > 0:
        raise ValueError("mask: expected at least one counted position, got a mask of all zeros")
    y = to_device(batch["y"], xp)
    mask = None if mask is None else to_device(mask, xp)
    loss, c_loss = ops.tied_head_cross_entropy_forward(h, wte, y, mask, input_grad=bool(trainable),
                                                       param_grads="wte" in trainable)
    del h  # ln_f's output: only the head read it
    grads = {}
    if trainable:
        dh, dwte_head = ops.tied_head_cross_entropy_backward(1.0, c_loss)
        del c_loss
        if "wte" in trainable:
            grads["wte"] = dwte_head  # the embedding's share is added in backward
        backward(dh, cache, params, grads, trainable, free_cache=True)
    return loss, grads


def _classifier(params, config, batch, trainable, rng, train, checkpoint_activations=False):
    """logits = h[b, last[b]] @ cls.W.T + cls.b, cross-entropy against labels."""
    xp = array_module(params["wte"])
    logits, (h, cache, rows, last, c_head) = _class_head(params, config, batch["x"], batch["last"], rng, train,
                                                         trainable, checkpoint_activations)
    _check_ids_on_host("labels", batch["labels"], params["cls.W"].shape[0])
    loss, c_ce = ops.cross_entropy_forward(logits, to_device(batch["labels"], xp))
    grads = {}
    if trainable:
        dlogits = ops.cross_entropy_backward(1.0, c_ce)
        dh_last = _linear_backward(dlogits, c_head, "cls", params, grads, trainable)
        dh = xp.zeros_like(h)
        del h  # ln_f's output: only its shape is needed now
        dh[rows, last] = dh_last  # only the last token fed the head
        backward(dh, cache, params, grads, trainable, free_cache=True)
    return loss, grads


def _class_head(params, config, x, last, rng, train, trainable=None, checkpoint_activations=False):
    """The head on each row's last real token: logits (B, K) and what its backward needs."""
    xp = array_module(params["wte"])
    h, cache = forward(params, config, x, rng, train, trainable, checkpoint_activations)  # (B, T, C)
    last = to_device(last, xp)
    rows = xp.arange(h.shape[0])
    logits, c_head = _linear_forward(params, config, "cls", h[rows, last], rng, train)  # (B, K), plain
    return logits, (h, cache, rows, last, c_head)


def class_logits(params, config, x, last):
    """Classification logits (B, K) for token ids x (B, T) read at positions last (B,), no dropout."""
    return _class_head(params, config, x, last, None, False)[0]


def next_token_logits(params, config, ids):
    """Logits (B, V) for the token after the last one of each row (no dropout)."""
    h, _ = forward(params, config, ids)
    logits, _ = ops.linear_forward(h[:, -1], params["wte"])
    return logits
