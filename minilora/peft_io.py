"""minilora's LoRA adapters as PEFT adapter folders, and back, exactly.

A PEFT LoRA folder holds adapter_config.json and adapter_model.safetensors with
one (A, B) pair per adapted GPT-2 module, named like

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (out, r)

and adds scale * B A to that module's weight, with scale = lora_alpha / r
(or lora_alpha / sqrt(r), use_rslora). A and B have the (r, in), (out, r)
layout of minilora's lora_A, lora_B even on GPT-2's Conv1D modules;
fan_in_fan_out=True only tells PEFT to transpose B A when it merges into the
Conv1D's (in, out) weight.

The one mapping that is not a renaming is attention's. GPT-2 computes q, k
and v with one fused module, c_attn: W_c = [W_q; W_k; W_v] (3C, C). minilora's
adapters of rank r on q, k and v add [s B_q A_q; s B_k A_k; s B_v A_v]; with

    A_c = [A_q; A_k; A_v]                 (3r, C)   the A's stacked
    B_c = [[B_q, 0, 0],
           [0, B_k, 0],
           [0, 0, B_v]]                   (3C, 3r)  block-diagonal

B_c A_c = [B_q A_q; B_k A_k; B_v A_v], so one PEFT adapter on c_attn of rank
3r (n r when n of q, k, v are targeted; a missing one's rows of B_c are zero)
is the same update, if its scale is still s: alpha_c / (3r) = alpha / r, so
alpha_c = 3 alpha (rsLoRA: alpha_c / sqrt(3r) = alpha / sqrt(r), alpha_c =
sqrt(3) alpha). PEFT's rank_pattern and alpha_pattern carry both per module.

The other way, a PEFT c_attn adapter of rank r' is q, k and v adapters of rank
r' that all use its A, each taking its third of B's rows. minilora's adapters
each own their A, so the shared A is copied into the three: the same function,
and further fine-tuning then trains the three copies apart.

The other targets map one to one: o -> attn.c_proj, fc -> mlp.c_fc,
proj -> mlp.c_proj. minilora's LoraConfig has one rank and one scale for every
adapter: on the way in, adapters of a smaller rank are padded with zero rows of
A and zero columns of B (the padded directions add nothing, and stay zero in
training, since each one's gradient is a product with the other's zero), and a
module whose PEFT scale differs from the common one has the ratio folded into B.

DoRA (use_dora=True) adds one lora_magnitude_vector (out,) per adapted module: PEFT's
DoraLinearLayer.get_weight_norm transposes the Conv1D weight to (out, in) (fan_in_fan_out) and takes
||W + scale B A|| along dim 1, one norm per output feature, with the module's own scale inside: minilora's
row_norms of (out, in) W with its s. So c_attn's magnitude is [m_q; m_k; m_v] (3C,), and its norm, taken
on W_c + s B_c A_c, is [n_q; n_k; n_v], since B_c A_c's rows are each target's B A. A q, k or v that is
not targeted has zero rows of B_c, so its norm is ||W_i||: its magnitude is written as that norm (gain 1
up to rounding, the function unchanged), and comes back as a DoRA adapter with B = 0.

An IA3 model goes out as PEFT's IA3 (ia3_to_peft): one ia3_l per module, c_attn's (3C, 1)
scaling its output [q; k; v] by [1; l_k; l_v] ([l_q; l_k; l_v] with queries), mlp.c_proj's (1, F) its
input by l_ff; a PEFT IA3 folder comes in as Ia3Config(queries=True) (_read_ia3), unless minilora wrote it
without the query vector (its metadata says so, and q's factors are still exactly 1): then as it went out.
PROMPT_TUNING and PREFIX_TUNING folders are peft_prompt.py's (read_peft hands them over).
Needs safetensors (`pip install 'minilora[hf]'`).
"""

import json
import math
import os
import re
from dataclasses import replace

import numpy as np

from . import peft_config, peft_prompt
from .backend import array_module, to_numpy
from .hf import (FINGERPRINT_KEY, SHARDED_INDEX, WEIGHTS_FILE, _read_json, _safetensors, check_readable,
                 read_fingerprint, weights_fingerprint)
from .methods.dora import MAGNITUDE, DoraConfig
from .methods.ia3 import NAME as IA3_NAME
from .methods.ia3 import Ia3Config
from .methods.lora import TARGETS, LoraConfig, lora_scale
from .tensor_file import open_numpy

EXPORTED = ("lora", "dora", "ia3")  # the adapter configs' methods write_peft writes exactly (to_peft, ia3_to_peft)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.transformer."
# minilora target -> (GPT-2 module inside a block, the rows of its output this target owns: 0, 1, 2 = q, k, v)
MODULE_OF = {"q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2),
             "o": ("attn.c_proj", None), "fc": ("mlp.c_fc", None), "proj": ("mlp.c_proj", None)}
QKV = ("q", "k", "v")
# the safetensors metadata key an IA3 export records its Ia3Config.queries under ("true" / "false")
IA3_QUERIES_KEY = "minilora_ia3_queries"


def is_peft_folder(path):
    """True when path is a folder holding a PEFT adapter_config.json."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _peft_scale(alpha, r, rslora):
    return alpha / (math.sqrt(r) if rslora else r)


def _row_norms(W):
    """||W_i|| of each row of a frozen (out, in) W: the magnitude DoRA starts at (dora.add_dora's sum)."""
    return (W * W).sum(axis=1) ** 0.5


def to_peft(params, config, base_path):
    """A LoRA or DoRA model's adapters as PEFT's (adapter_config dict, tensors dict).

    Inputs:
    - params, config: a model with LoRA adapters (config.lora a LoraConfig) or DoRA adapters (a DoraConfig)
    - base_path: the folder of the exported base model (base_model_name_or_path)

    Returns the adapter_config.json dict and name -> numpy array for
    adapter_model.safetensors. The adapters' dropout is written as lora_dropout;
    DoRA's magnitudes as lora_magnitude_vector, with use_dora true.
    """
    lc = config.lora
    if lc is None or lc.method not in ("lora", "dora"):
        raise ValueError("config: expected a LoRA or DoRA model (a LoraConfig or DoraConfig in config.lora), got "
                         f"{'config.lora = None' if lc is None else lc.label + ' adapters'}")
    use_dora = lc.method == DoraConfig.method
    r, C = lc.rank, config.d_model
    qkv = [t for t in QKV if t in lc.targets]
    tensors, modules = {}, []
    for i in range(config.n_layers):
        p = f"h.{i}."
        if qkv:
            A_c = np.concatenate([to_numpy(params[p + f"attn.{t}.lora_A"]) for t in qkv])  # (n r, C)
            B_c = np.zeros((3 * C, len(qkv) * r), A_c.dtype)  # (3C, n r), block-diagonal
            for j, t in enumerate(qkv):
                row = QKV.index(t)
                B_c[row * C:(row + 1) * C, j * r:(j + 1) * r] = to_numpy(params[p + f"attn.{t}.lora_B"])
            tensors.update(_pair(i, "attn.c_attn", A_c, B_c))
            if use_dora:  # [m_q; m_k; m_v]; an untargeted one's rows have B = 0, so n = ||W_i||: m = ||W_i||
                m_c = np.concatenate([to_numpy(params[p + f"attn.{t}.{MAGNITUDE}"]) if t in qkv
                                      else _row_norms(to_numpy(params[p + f"attn.{t}.W"])) for t in QKV])  # (3C,)
                tensors[f"{PREFIX}h.{i}.attn.c_attn.{MAGNITUDE}"] = np.ascontiguousarray(m_c)
        for t in lc.targets:
            if t not in QKV:
                module = MODULE_OF[t][0]
                tensors.update(_pair(i, module, to_numpy(params[p + TARGETS[t] + ".lora_A"]),
                                     to_numpy(params[p + TARGETS[t] + ".lora_B"])))
                if use_dora:
                    tensors[f"{PREFIX}h.{i}.{module}.{MAGNITUDE}"] = np.ascontiguousarray(
                        to_numpy(params[p + TARGETS[t] + "." + MAGNITUDE]))
    modules = (["attn.c_attn"] if qkv else []) + [MODULE_OF[t][0] for t in lc.targets if t not in QKV]
    n = len(qkv)
    rank_pattern, alpha_pattern = {}, {}
    if n > 1:
        # alpha_c / (n r) = alpha / r, or alpha_c / sqrt(n r) = alpha / sqrt(r) with rsLoRA
        rank_pattern["attn.c_attn"] = n * r
        alpha_pattern["attn.c_attn"] = lc.alpha * (math.sqrt(n) if lc.rslora else n)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": r, "lora_alpha": lc.alpha, "use_rslora": lc.rslora, "lora_dropout": lc.dropout,
        "target_modules": modules, "fan_in_fan_out": True, "bias": "none",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_dora": use_dora, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    return adapter_config, tensors


def ia3_to_peft(params, config, base_path):
    """An IA3 model's vectors as PEFT's IA3 (adapter_config dict, tensors dict).

    PEFT scales the output of c_attn, the fused q, k, v (3C,): its ia3_l (3C, 1) is [1; l_k; l_v], ones
    on q's rows, so q is unchanged ([l_q; l_k; l_v] with Ia3Config(queries=True), PEFT's own default); and
    the input of mlp.c_proj, a feedforward module: ia3_l (1, F) = l_ff.
    Output scaling multiplies the bias too, as minilora's l * (W x + b) (GPT-2's key bias is written
    as zeros, and stays zero). Returns the adapter_config.json dict and name -> numpy array.
    """
    if config.lora is None or config.lora.method != "ia3":
        raise ValueError("config: expected an IA3 model (an Ia3Config in config.lora), got "
                         f"{'no adapters' if config.lora is None else config.lora.method + ' adapters'}")
    tensors = {}
    for i in range(config.n_layers):
        p = f"h.{i}."
        l_k, l_v = to_numpy(params[p + "attn.k.ia3_l"]), to_numpy(params[p + "attn.v.ia3_l"])
        l_q = to_numpy(params[p + "attn.q.ia3_l"]) if config.lora.queries else np.ones_like(l_k)
        l_c = np.concatenate([l_q, l_k, l_v])  # (3C,): q, k, v's rows of c_attn
        tensors[f"{PREFIX}h.{i}.attn.c_attn.ia3_l"] = np.ascontiguousarray(l_c[:, None])  # (3C, 1)
        tensors[f"{PREFIX}h.{i}.mlp.c_proj.ia3_l"] = np.ascontiguousarray(to_numpy(params[p + "mlp.proj.ia3_l"])[None])
    adapter_config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "target_modules": ["attn.c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"],
        "fan_in_fan_out": True, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    return adapter_config, tensors


def _pair(i, module, A, B):
    name = f"{PREFIX}h.{i}.{module}"
    return {name + ".lora_A.weight": np.ascontiguousarray(A), name + ".lora_B.weight": np.ascontiguousarray(B)}


def write_peft(folder, params, config, base_path, base_params):
    """Write adapter_config.json and adapter_model.safetensors into folder (existing, empty).

    The safetensors metadata records base_params' fingerprint, checked when the
    adapter is loaded again.
    """
    safetensors = _safetensors()
    # IA3 has its own PEFT type; LoRA and DoRA go out as LoRA pairs (DoRA's with its magnitudes)
    adapter_config, tensors = (ia3_to_peft if config.lora.method == "ia3" else to_peft)(params, config, base_path)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
    metadata = {"format": "pt", FINGERPRINT_KEY: weights_fingerprint(base_params)}
    if config.lora.method == "ia3":  # read back as it went out: without l_q, or with it (_read_ia3)
        metadata[IA3_QUERIES_KEY] = "true" if config.lora.queries else "false"
    safetensors.numpy.save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata=metadata)


# What a PEFT LoRA config may say for minilora to compute it exactly: field -> the values allowed.
_SUPPORTED = {"lora_bias": (False, None), "modules_to_save": (None, []),
              "layers_to_transform": (None,), "layer_replication": (None,), "bias": ("none", None),
              "trainable_token_indices": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
              "target_parameters": (None, [])}


def read_peft(folder, base_params, base_config):
    """Load a PEFT LoRA or DoRA folder trained on GPT-2 onto minilora base parameters, exactly as PEFT loads it.

    Inputs:
    - folder: holds adapter_config.json (peft_type LORA) and adapter_model.safetensors
    - base_params, base_config: the base model (no adapters), numpy or device arrays

    Returns (params, config, meta): base_params plus lora_A, lora_B (and, with
    use_dora, lora_magnitude_vector) for every adapted linear, the config with its
    LoraConfig (a DoraConfig, exact backward, with use_dora), and meta (the adapter's
    config). The modules adapted are those PEFT adapts (peft_config.targeted_modules),
    and the file must hold exactly their A and B under PEFT's names
    (base_model.model.transformer.h.{i}.{module}.lora_A.weight): a tensor PEFT would
    not load, or a targeted module it would leave at its initial values, is refused.
    Raises ValueError, too, for a field of the wrong type, another peft_type, an
    option minilora does not compute (lora_bias, modules_to_save, ...), a target not in every block,
    and a base whose shapes or fingerprint differ (the fingerprint is checked when
    the file records one, or base_model_name_or_path names a local folder, a
    relative one read from the adapter's folder).
    """
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: expected a PEFT folder with {ADAPTER_CONFIG}, got {folder!r} without one")
    ac = _read_json(path)
    if ac.get("peft_type") == "IA3":
        return _read_ia3(folder, path, ac, base_params, base_config)
    if ac.get("peft_type") in peft_prompt.PEFT_TYPES:  # prompt and prefix tuning, with PEFT's positions
        return peft_prompt.read_peft(folder, path, ac, base_params, base_config)
    if ac.get("peft_type") != "LORA":
        raise ValueError(f"adapter: {path}: peft_type: expected 'LORA', 'IA3', 'PROMPT_TUNING' or 'PREFIX_TUNING', "
                         f"got {ac.get('peft_type')!r} (minilora maps LoRA, DoRA, IA3, prompt and prefix tuning "
                         "adapters only)")
    for name, allowed in _SUPPORTED.items():
        if not any(type(ac.get(name)) is type(a) and ac.get(name) == a for a in allowed):
            raise ValueError(f"adapter: {path}: {name}: expected {allowed[0]!r} (minilora does not compute "
                             f"{name}), got {ac.get(name)!r}")
    ac = peft_config.check_fields(ac, f"adapter: {path}")
    if base_config.lora is not None:
        raise ValueError("adapter: expected a base model without adapters, got one with adapters already")
    modules = peft_config.targeted_modules(ac, base_config.n_layers, f"adapter: {path}")
    weights, metadata, tensors = _read_weights(folder)
    _check_base(folder, ac, metadata, base_params)
    use_dora = ac["use_dora"]
    pairs = _pairs(weights, tensors, modules, use_dora, peft_config.describe_targets(ac))
    rslora = ac["use_rslora"]
    # every adapted linear: minilora prefix -> (A, B, PEFT scale, DoRA's magnitude or None)
    adapters = {}
    for (i, module), (A, B, m) in pairs.items():
        full = f"transformer.h.{i}.{module}"
        r = A.shape[0]
        wanted = peft_config.pattern_value(ac["rank_pattern"], full, ac["r"])
        if r != wanted:
            raise ValueError(f"adapter: {weights}: {full} has rank {r}, but {ADAPTER_CONFIG} says {wanted}")
        own = peft_config.pattern_value(ac["alpha_pattern"], full, None)
        s = _module_scale(ac["lora_alpha"] if own is None else own, r, rslora, path,
                          "lora_alpha" if own is None else f"alpha_pattern: {full}")
        d_in, d_out = _module_shape(module, base_config)
        if A.shape[1] != d_in or B.shape[0] != d_out or (m is not None and m.shape != (d_out,)):
            raise ValueError(f"adapter: {weights}: {full} expects A (r, {d_in}) and B ({d_out}, r)"
                             + (f" and {MAGNITUDE} ({d_out},)" if m is not None else "") + " on this base, got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}" + (f" and {tuple(m.shape)}" if m is not None
                                                                          else "") + "; it was trained on another base")
        if module == "attn.c_attn":
            C = base_config.d_model
            for row, t in enumerate(QKV):
                # one shared A, each target its third of B's rows (and of DoRA's magnitude: the norm is per row)
                rows = slice(row * C, (row + 1) * C)
                adapters[f"h.{i}.{TARGETS[t]}"] = (A, B[rows], s, None if m is None else m[rows])
        else:
            target = next(t for t, (mod, _) in MODULE_OF.items() if mod == module)
            adapters[f"h.{i}.{TARGETS[target]}"] = (A, B, s, m)
    targets = _targets(adapters, base_config, weights)
    R = max(a[0].shape[0] for a in adapters.values())
    s = next(iter(adapters.values()))[2]  # the common scale; other modules fold theirs into B
    alpha = s * (math.sqrt(R) if rslora else R)
    # DoRA: PEFT trains with the norm detached; minilora's default is the exact gradient (--detach-norm: PEFT's)
    lora_config = (DoraConfig if use_dora else LoraConfig)(rank=R, alpha=alpha, targets=targets,
                                                          dropout=float(ac["lora_dropout"]), rslora=rslora)
    xp = array_module(base_params["wte"])
    dtype = base_params["wte"].dtype
    out = dict(base_params)
    for prefix, (A, B, s_m, m) in adapters.items():
        if m is not None:
            # s B A is unchanged below (the scale's ratio folded into B), so the norm m divides by is too
            out[f"{prefix}.{MAGNITUDE}"] = xp.asarray(m.astype(dtype))
        r = A.shape[0]
        A_pad = np.zeros((R, A.shape[1]), np.float64)
        B_pad = np.zeros((B.shape[0], R), np.float64)
        A_pad[:r] = A
        B_pad[:, :r] = B * (s_m / lora_config.scale)  # exactly 1 unless this module's PEFT scale differs
        if np.abs(B_pad).max(initial=0.0) > np.finfo(dtype).max:  # both scales bounded, B need not be
            raise ValueError(f"adapter: {weights}: {prefix}: B times its scale's ratio to the common scale "
                             f"({s_m / lora_config.scale:g}) overflows {np.dtype(dtype).name}")
        out[prefix + ".lora_A"] = xp.asarray(A_pad.astype(dtype))
        out[prefix + ".lora_B"] = xp.asarray(B_pad.astype(dtype))
    return out, replace(base_config, lora=lora_config), {"kind": "peft_adapter", "peft": ac, "path": folder}


def _read_weights(folder):
    """(path, metadata, name -> numpy array) of the folder's adapter_model.safetensors; ValueError if unreadable."""
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f"adapter: expected {ADAPTER_WEIGHTS} in {folder!r} (adapter_model.bin is a pickle and is "
                         "never unpickled), got none")
    check_readable(weights)
    _safetensors()
    try:
        with open_numpy(weights) as f:  # bf16 tensors widened to float32, exactly
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise ValueError(f"adapter: {weights}: expected a readable safetensors file, got one that is truncated, "
                         f"corrupt or of a dtype NumPy lacks ({' '.join(str(e).split()) or type(e).__name__})") from e
    return weights, metadata, tensors


# minilora's IA3 on a GPT-2 block: module -> whether PEFT scales its input (a feedforward module) or its output
_IA3_MODULES = {"attn.c_attn": False, "mlp.c_proj": True}


def _read_ia3(folder, path, ac, base_params, base_config):
    """read_peft for peft_type IA3: PEFT's IA3 on GPT-2 as minilora's Ia3Config(queries=True).

    PEFT's default (target_modules c_attn and mlp.c_proj, feedforward mlp.c_proj) scales c_attn's output,
    the fused [q; k; v], by one (3C, 1) ia3_l: l_q, l_k, l_v, its thirds; and mlp.c_proj's input by (1, F),
    l_ff. The queries' factors are trained by PEFT, so the model comes in with queries=True and trains them on;
    a minilora export without them (its metadata says queries false, and q's factors are all exactly 1) comes
    back as Ia3Config(), with no l_q to train: the same function either way. Other targets are refused, naming the
    module: minilora's IA3 scales exactly these two. GPT-2's key bias b_k, scaled to l_k * b_k, still adds one
    constant to each softmax row, so dropping it stays exact.
    """
    where = f"adapter: {path}"
    ac = peft_config.check_ia3_fields(ac, where)
    if base_config.lora is not None:
        raise ValueError("adapter: expected a base model without adapters, got one with adapters already")
    found = peft_config.targeted_modules(ac, base_config.n_layers, where)
    for i, module in found:
        full = f"transformer.h.{i}.{module}"
        feedforward = peft_config.is_feedforward(ac["feedforward_modules"], full)
        if module not in _IA3_MODULES or feedforward != _IA3_MODULES[module]:
            raise ValueError(f"{where}: target_modules: {full} scaled on its {'input' if feedforward else 'output'}; "
                             "minilora's IA3 scales c_attn's output (q, k, v) and mlp.c_proj's input only "
                             "(feedforward_modules: [\"mlp.c_proj\"])")
    for module in _IA3_MODULES:
        blocks = [i for i, m in found if m == module]
        if len(blocks) != base_config.n_layers:
            raise ValueError(f"{where}: target_modules: expected {module} in every block (minilora's IA3 scales it "
                             f"in all {base_config.n_layers}), got blocks {blocks}")
    weights, metadata, tensors = _read_weights(folder)
    _check_base(folder, ac, metadata, base_params)
    C, F = base_config.d_model, base_config.d_ff
    shapes = {"attn.c_attn": (3 * C, 1), "mlp.c_proj": (1, F)}
    names = {f"{PREFIX}h.{i}.{m}.{IA3_NAME}": (i, m) for i, m in found}
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise ValueError(f"adapter: {weights}: {extra[0]}: not an ia3_l of a module "
                         f"{peft_config.describe_targets(ac)} scales (PEFT would not load it)")
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"adapter: {weights}: expected {missing[0]} (target_modules scales its module), got none; "
                         "PEFT would leave it at its initial values")
    xp = array_module(base_params["wte"])
    dtype = base_params["wte"].dtype
    vectors = {}
    for name, (i, module) in names.items():
        t = tensors[name]
        if t.shape != shapes[module] or t.dtype.kind != "f" or not np.isfinite(t).all():
            raise ValueError(f"adapter: {weights}: {name}: expected finite floating-point values of shape "
                             f"{shapes[module]} on this base, got {t.dtype} {tuple(t.shape)}")
        l = t.reshape(-1)
        if module == "attn.c_attn":
            for row, target in enumerate(QKV):
                vectors[f"h.{i}.attn.{target}.{IA3_NAME}"] = l[row * C:(row + 1) * C]
        else:
            vectors[f"h.{i}.mlp.proj.{IA3_NAME}"] = l
    l_q = [n for n in vectors if ".attn.q." in n]
    queries = not (metadata.get(IA3_QUERIES_KEY) == "false" and all((vectors[n] == 1.0).all() for n in l_q))
    if not queries:
        for n in l_q:  # factors of exactly 1: dropping them leaves the function as it is
            del vectors[n]
    out = dict(base_params)
    out.update({n: xp.asarray(v.astype(dtype)) for n, v in vectors.items()})
    config = replace(base_config, lora=Ia3Config(queries=queries))
    return out, config, {"kind": "peft_adapter", "peft": ac, "path": folder}


def _module_scale(alpha, r, rslora, path, label):
    """PEFT's scale of one module, in the range LoRA's own scale has (methods.lora.lora_scale)."""
    try:
        lora_scale(r, alpha, rslora)
    except ValueError as e:
        raise ValueError(f"adapter: {path}: {label}: {str(e).removeprefix('alpha: ')}") from e
    return _peft_scale(alpha, r, rslora)


def _module_shape(module, config):
    """(in, out) of a GPT-2 module inside a block of this config."""
    C, F = config.d_model, config.d_ff
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}[module]


# what each tensor of an adapted module is called in PEFT's file: A, B, and DoRA's magnitude M
_PART_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight", "M": MAGNITUDE}


def _pairs(weights, tensors, modules, use_dora=False, targets="target_modules"):
    """(block, module) -> (A, B, m or None) for each module PEFT adapts, from the names PEFT loads (m: DoRA's
    lora_magnitude_vector); ValueError for any other tensor (PEFT would not load it) and for a targeted module
    without all of them (PEFT would keep its initial values). targets: the config's targets, in words."""
    parts = "ABM" if use_dora else "AB"
    names = {f"{PREFIX}h.{i}.{m}.{_PART_NAMES[ab]}": (i, m, ab) for i, m in modules for ab in parts}
    loose = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(h\.\d+\.[\w.]+?)\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
    found = {}
    for name, t in tensors.items():
        if name not in names:
            m = loose.match(name)
            proper = f"{PREFIX}{m.group(1)}.{m.group(2)}" if m else None
            if proper is not None and proper.endswith(MAGNITUDE) and not use_dora:
                raise ValueError(f"adapter: {weights}: {name}: a DoRA magnitude, but {ADAPTER_CONFIG} says "
                                 "use_dora false, so PEFT would not load it")
            if proper is not None and proper != name and proper in tensors:
                why = f"the same tensor as {proper!r} under a second name"
            elif proper is not None and proper != name:
                why = f"PEFT loads {proper!r} and would not load this name"
            elif proper is not None:
                why = f"its module is not one {targets} adapts, so PEFT would not apply it"
            else:
                why = ("not a LoRA A or B (or DoRA magnitude) of a GPT-2 block's c_attn, c_proj or c_fc (PEFT would "
                       "not load it)")
            raise ValueError(f"adapter: {weights}: {name}: {why}")
        if t.dtype.kind != "f" or not np.isfinite(t).all():
            raise ValueError(f"adapter: {weights}: {name}: expected finite floating-point values")
        i, module, ab = names[name]
        found.setdefault((i, module), {})[ab] = t.astype(np.float64)
    missing = [n for n, (i, m, ab) in names.items() if ab not in found.get((i, m), {})]
    if missing:
        raise ValueError(f"adapter: {weights}: expected {missing[0]} (target_modules adapts its module), got none; "
                         f"PEFT would leave it at its initial values" + (f" ({len(missing)} such)" if len(missing) > 1
                                                                        else ""))
    pairs = {}
    for key, ab in found.items():
        if (ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]
                or ("M" in ab and ab["M"].shape != ab["B"].shape[:1])):
            raise ValueError(f"adapter: {weights}: h.{key[0]}.{key[1]}: expected lora_A (r, in) and lora_B (out, r)"
                             + (f" and {MAGNITUDE} (out,)" if use_dora else "") + ", got "
                             f"{({_PART_NAMES[k]: tuple(v.shape) for k, v in ab.items()})}")
        pairs[key] = (ab["A"], ab["B"], ab.get("M"))
    return pairs


def _targets(adapters, config, weights):
    """minilora's targets, each of which must be adapted in every block (LoraConfig has one target list)."""
    targets = []
    for t, layer in TARGETS.items():
        blocks = [i for i in range(config.n_layers) if f"h.{i}.{layer}" in adapters]
        if blocks and len(blocks) != config.n_layers:
            raise ValueError(f"adapter: {weights}: {MODULE_OF[t][0]} is adapted in blocks {blocks} only; minilora "
                             f"adapts a target in every block")
        if blocks:
            targets.append(t)
    return tuple(targets)


def _check_base(folder, ac, metadata, base_params):
    """The adapter's base must be base_params: compare fingerprints when the adapter lets us know its base's.

    A relative base_model_name_or_path is read from the adapter's folder (where PEFT's save_pretrained, run
    from elsewhere, would not have put it, but where a moved pair of folders keeps it), then from the
    working folder."""
    expected = metadata.get(FINGERPRINT_KEY)
    base_path = ac.get("base_model_name_or_path")
    if expected is None and isinstance(base_path, str) and base_path:
        candidates = [base_path] if os.path.isabs(base_path) else [os.path.join(folder, base_path), base_path]
        for candidate in candidates:
            if any(os.path.isfile(os.path.join(candidate, name)) for name in (WEIGHTS_FILE, SHARDED_INDEX)):
                expected = read_fingerprint(candidate)  # the local base it names, read as minilora reads it
                base_path = candidate
                break
    if expected is None:
        return
    got = weights_fingerprint(base_params)
    if expected != got:
        raise ValueError(f"adapter: {folder} was trained on base weights with fingerprint {expected}, but the base "
                         f"given has fingerprint {got}; give the base it was trained on ({base_path})")
