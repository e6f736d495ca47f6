"""Fine-tuning methods, one module each, and the one seam through which the model and the tools ask them.

    full.py     full fine-tuning: every name trains; also the plain linear pair, the base path of every method
    lora.py     LoRA: W' = W + s B A, with A (r, in) and B (out, r) beside a frozen W
    dora.py     DoRA: W' = m * (W + s B A) / ||W + s B A|| per output row, a LoRA variant (lora_A, lora_B, m)
    qlora.py    QLoRA: LoRA on a frozen base whose block linears are stored in 4 bits (NF4, nf4.py)
    nf4.py      the NF4 data type by hand: levels, blockwise absmax, double quantization, packing
    prompt.py   prompt tuning: P trainable vectors put before the input
    prefix.py   prefix tuning: P trainable keys and values before every attention layer's own
    ia3.py      IA3: learned vectors l_k, l_v, l_ff rescale the keys, the values and the MLP's activation
    head.py     the classification head alone on the frozen model: a linear probe, the baseline on `kind`

Why a folder of small modules: every method is the same kind of thing (names, shapes, an op pair, add,
merge), so each gets one file of the same shape, read on its own, as PEFT keeps tuners/lora/,
tuners/ia3/. This file is the only one that lists them; nothing outside this folder names a method.

How a method plugs in
---------------------
1. Write methods/NAME.py: its settings dataclass, its parameter names and shapes, its forward/backward
   pairs with the derivation in their docstrings, its add_* and its merge where one exists.
2. If it changes how a linear computes (LoRA, DoRA, a quantized base), give it an adapter config: a
   LoraConfig subclass with a class attribute `method = "NAME"` and `layer_shapes(d_out, d_in)`, the
   names it adds beside each target's W (and `count_formula`, `label`; variant settings as fields,
   listed in FLAGS for the CLI and the sweep). A method with none of LoRA's settings (IA3) gives its own
   class instead, with the same `method`, `label`, `base_pair`, `targets`, `target_layers`, and
   `adapter_shapes(model_config)`, `n_weights(params, config)`, `count_lines(params, trainable, config)`
   for its names and the report (ia3.Ia3Config). That config rides in ModelConfig.lora, so the config that
   came with the parameters says which pair computes each linear. Register the pair and the config:

       register(Method(...), pair=LinearPair("NAME", forward, backward, shared_forward, shared_backward, delta),
                config_type=NameConfig)

   forward(params, prefix, x, settings, train, rng, trainable) -> (y, cache)
   backward(dout, cache, prefix, trainable, input_grad) -> (dx or None, {suffix: gradient})
   shared_forward(params, prefixes, x, settings, train) -> (ys, cache), or None when it does not apply
   shared_backward(douts, cache, input_grad) -> (dx or None, [{suffix: gradient} per prefix])

   model.py asks `linear_pair(config, prefix)` once per linear, in one place, and runs what it returns;
   the backward of a frozen W must form no dW (tests/test_frozen_products.py counts them for every method).
   A method that changes how a block's attention computes (prefix tuning) registers an AttentionPair the
   same way, `register(Method(...), attention=AttentionPair("NAME", forward, backward))`, and model.py asks
   `attention_pair(config)` once per block, from a setting of ModelConfig (config.n_prefix):

   forward(params, prefix, q, k, v, config) -> (y, cache)             prefix: "h.{i}.attn"
   backward(dy, cache, prefix, trainable, input_grad) -> ((dq, dk, dv) or None, {suffix: gradient})
3. Register a `Method` in METHODS (below): its name, default learning rate, setup, checks, shapes and
   merge. finetune, the CLI's --method choices, runs.load_model's name check, the sweep's delta norms,
   the report and gradcheck all read it from there. Add the module to the import at the bottom of this file.

The API other modules use: METHODS, method(name), linear_pair(config, prefix), attention_pair(config),
adapter_config_from_dict(d), expected_shapes(config, params), base_fingerprint(params),
check_trainable(params, trainable, config).
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy


@dataclass(frozen=True)
class LinearPair:
    """How one kind of linear computes (signatures in the module docstring)."""

    name: str
    forward: object
    backward: object
    shared_forward: object = None  # q, k, v read one input: one product for all their adapters
    shared_backward: object = None
    delta: object = None  # (params, config, base, prefix) -> Delta W, what the method changed (sweep.delta_norms)


@dataclass(frozen=True)
class AttentionPair:
    """How a block's attention computes (signatures in the module docstring)."""

    name: str
    forward: object
    backward: object


@dataclass(frozen=True)
class Method:
    """A fine-tuning method, as finetune, the CLI, runs, the sweep and the report see it.

    - name, summary: the --method choice and its one-line help
    - default_lr: the peak learning rate finetune uses when none is given (full, LoRA, prompt: the forgetting
      study's choice of 2026-11-29; the rerun's choice for every method is in docs/studies/forgetting.md)
    - setup(base_params, model_config, ft_config, tokenizer) -> (params, model_config, trainable): the method's
      parameters added beside the base (never modifying it), the config that now describes them, and
      the names it trains (a classification head is added by finetune, under every method)
    - check(model_config, ft_config, longest): raise ValueError naming a bad setting, before any work
      (longest: the most positions any record takes)
    - adapter_config(ft_config): the settings it puts in ModelConfig.lora, or None
    - extra_shapes(config, params): name -> shape of every name it adds (the names checked at load)
    - owns(name): True for a name it adds (not part of the base weights)
    - merge(params, config) -> (params, config): a plain model computing the same function, or None
    - saves_adapter: a finished run also writes adapter.npz (the trained names only)
    - fit(model_config, ft_config, longest): shrink a setting of ft_config so that it fits the context
      beside the longest record; returns a note saying what changed, or None (the demo uses it)
    - replaces(config): base names its parameters do not hold, because it stores them otherwise (QLoRA:
      every block linear's W, replaced by its NF4 codes and scales, which extra_shapes names)
    - study_lrs: the learning rates the forgetting study sweeps for it (studies.forgetting)
    - color: its matplotlib colour in the report's figures
    - gradcheck_setup(params, config, rng) -> (params, config, trainable): the method at a random,
      non-degenerate float64 point, for the whole-model gradient checks
    - op_checks(rng, xp): gradcheck.CheckResults of its own op pairs against finite differences
    - gradcheck_variants: (label, setup) pairs, setup like gradcheck_setup: more points of the method the
      whole-model checks cover, each a variant it computes, checked as "NAME (label)" (prompt and prefix with
      PEFT's positions, IA3's query vector)
    - peft_positions: it puts P virtual tokens before the real ones, so FinetuneConfig.peft_positions
      (number the real tokens after them, as PEFT does) applies to it
    - needs_head: it trains nothing but the classification head, so it runs on a classification task only
      (FinetuneConfig refuses it on a generative one), and the gradient checks' LM case, with nothing to
      train, skips it
    """

    name: str
    summary: str
    default_lr: float
    setup: object
    check: object = None
    adapter_config: object = None
    extra_shapes: object = None
    owns: object = None
    merge: object = None
    saves_adapter: bool = False
    gradcheck_setup: object = None
    op_checks: object = None
    fit: object = None
    study_lrs: tuple = ()
    replaces: object = None  # (config) -> the base names it holds in another form (QLoRA: each block W as NF4)
    stores_codes: object = None  # (name) -> True for an integer array it stores by design (QLoRA's NF4 codes)
    color: str = "tab:gray"  # its colour in every figure of the report
    count_line: object = None  # (params, trainable, config) -> its trainable count with the formula, checked
    model_settings: object = None  # (ft_config) -> {ModelConfig field: value} it sets beside .lora (n_prefix)
    gradcheck_variants: tuple = ()  # ((label, setup), ...): variants the whole-model gradient checks cover too
    peft_positions: bool = False  # P virtual tokens before the real ones: FinetuneConfig.peft_positions applies
    needs_head: bool = False  # it trains the classification head alone: a classification task only (head.py)


# filled in by the method modules imported at the bottom of this file
METHODS = {}  # name -> Method
LINEARS = {}  # LinearPair.name -> pair: "plain", and each adapter config's method
ADAPTER_CONFIGS = {}  # adapter config's method -> its class (LoraConfig, DoraConfig, ...)
ATTENTIONS = {}  # AttentionPair.name -> pair: "causal" (ops.attention), and "prefix"


def register(m=None, pair=None, config_type=None, attention=None):
    """Add a method, a linear pair, the adapter config class whose `method` names that pair, an attention pair."""
    if m is not None:
        METHODS[m.name] = m
    if pair is not None:
        LINEARS[pair.name] = pair
    if config_type is not None:
        ADAPTER_CONFIGS[config_type.method] = config_type
    if attention is not None:
        ATTENTIONS[attention.name] = attention
    return m


def method(name):
    """The Method called name; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def linear_pair(config, prefix):
    """The one question the model asks of a linear: which forward/backward pair computes it.

    The answer comes from config.lora, the adapter settings that came with the parameters: a linear its
    targets name runs that config's method's pair; every other block linear runs the config's base pair
    (plain for LoRA and DoRA, the frozen NF4 linear for QLoRA), and every linear of a model without
    adapters (and the LM head) the plain pair, frozen or trained.
    """
    settings = config.lora
    if settings is None:
        return LINEARS["plain"]
    if prefix.split(".", 2)[-1] in settings.target_layers:
        return LINEARS[settings.method]
    # a linear its targets do not name: plain, or the settings' own frozen base (QLoRA's NF4 linear)
    return LINEARS[settings.base_pair] if prefix.startswith("h.") else LINEARS["plain"]


def attention_pair(config):
    """The one question the model asks of a block's attention: which forward/backward pair computes it.

    The answer comes from the config that came with the parameters: config.n_prefix > 0 (prefix tuning)
    puts that many trainable keys and values before every layer's own; otherwise plain causal attention.
    """
    return ATTENTIONS["prefix"] if config.n_prefix else ATTENTIONS["causal"]


def adapter_config_from_dict(d):
    """The adapter config a dict describes (LoraConfig's own dict has no "method"; a variant's names it)."""
    d = dict(d)
    name = d.pop("method", "lora")
    if name not in ADAPTER_CONFIGS:
        raise ValueError(f"lora: expected adapter settings of a method in {sorted(ADAPTER_CONFIGS)}, "
                         f"got method {name!r}")
    return ADAPTER_CONFIGS[name].from_dict(d)


def expected_shapes(config, params):
    """name -> shape of every array a model with this config may hold: its base, and what each method adds.

    Adapters come from config (config.lora); a soft prompt (P, C) and a classification head (K, C), (K,)
    may be present with any P and K, so their shapes are read from params.
    """
    from ..model import head_shapes, param_shapes

    shapes = dict(param_shapes(config))
    for m in METHODS.values():
        if m.replaces is not None:
            for name in m.replaces(config):
                del shapes[name]
        if m.extra_shapes is not None:
            shapes.update(m.extra_shapes(config, params))
    shapes.update(head_shapes(config, params))
    return shapes


def is_stored_code(name):
    """True when a method stores this name as integer codes (QLoRA's 4-bit W): not a float parameter."""
    return any(m.stores_codes is not None and m.stores_codes(name) for m in METHODS.values())


def is_base_name(name):
    """True unless a method or the classification head added this name."""
    from ..model import HEAD_NAMES

    return name not in HEAD_NAMES and not any(m.owns is not None and m.owns(name) for m in METHODS.values())


def base_fingerprint(params):
    """A short hash of the base weights (every name no method and no head added).

    An adapter only makes sense on the weights it was trained on; this is how
    loading one onto a different base fails clearly.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        if not is_base_name(name):
            continue
        a = np.ascontiguousarray(to_numpy(params[name]))
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(json.dumps(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def check_trainable(params, trainable, config):
    """trainable must name parameters that config describes, and no W or b of a linear an adapter computes."""
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        raise ValueError(f"trainable: expected names of parameters, got unknown names {unknown[:5]}")
    undescribed = sorted(set(trainable) - set(expected_shapes(config, params)))
    if undescribed:
        raise ValueError(f"config: expected the config that came with these parameters (its .lora describes "
                         f"every adapter), but it does not describe {undescribed[:3]}")
    for name in trainable:
        if name.endswith((".W", ".b")) and name.startswith("h."):
            pair = linear_pair(config, name.rsplit(".", 1)[0])
            if pair.name != "plain":
                raise ValueError(f"trainable: {name} is under a {pair.name} adapter and stays frozen; "
                                 f"train the adapter's names")


# each registers itself (the order is the CLI's order of --method choices)
from . import full, lora, dora, qlora, prompt, prefix, ia3, head  # noqa: E402,F401  (they use the names above)
