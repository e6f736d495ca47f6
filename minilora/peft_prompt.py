"""Prompt- and prefix-tuning runs as PEFT adapter folders (PromptTuningConfig, PrefixTuningConfig), and back.

PEFT's prompt learning keeps one tensor in adapter_model.safetensors, named `prompt_embeddings`:

    PROMPT_TUNING   prompt_embeddings (P, C)       minilora's prompt, row for row
    PREFIX_TUNING   prompt_embeddings (P, 2 L C)   every layer's prefix keys and values (prefix_projection false):
                                                   columns 2iC .. (2i+1)C - 1 are layer i's prefix_k,
                                                   (2i+1)C .. (2i+2)C - 1 its prefix_v

The prefix layout, from PEFT's PeftModel.get_prompt: it views the (B, P, 2 L C) rows as (B, P, 2L, NH, hs),
permutes them to (2L, B, NH, P, hs) and splits that into L pairs, so pair i is blocks 2i (the keys) and 2i + 1
(the values), and within a block head h holds columns h hs .. (h+1) hs - 1: minilora's (P, C) layout of
prefix_k and prefix_v, block for block.

The two compute the same function only with PEFT's positions (ModelConfig.peft_positions, `finetune
--peft-positions`): PEFT's prompt tuning puts the P vectors first in inputs_embeds, so GPT-2 adds wpe[0..P-1]
to them and numbers the real tokens P..P+T-1; its prefix tuning hands the prefix over as past_key_values of
length P, so GPT-2 numbers the real tokens P..P+T-1 too, and PEFT's attention mask (ones over the P prefix
columns, the causal mask among the real tokens) is minilora's prefix attention. A run trained with
minilora's positions (the default) is refused (bridge.check_exportable).

GPT-2's key bias: c_attn adds b_k to the real tokens' keys but not to past_key_values. minilora has no key
bias (hf.py drops it, exact for plain attention) and exports it as zeros, so the exported base and prefix
are exactly minilora's. The other way it matters: PEFT's scores are q . (k_u + b_k) for a real token and
q . p_j for a prefix key; subtracting q . b_k from the whole row (a softmax ignores it) leaves q . k_u and
q . (p_j - b_k), so a PEFT prefix comes in as prefix_k = p_j - b_k, with b_k read from the base folder the
adapter names (read_peft). The values need nothing. The tensors keep the run's dtype (float32 for a trained
run). Needs safetensors.
"""

import json
import os
from dataclasses import replace

import numpy as np

from .backend import array_module, to_numpy
from .hf import FINGERPRINT_KEY, _safetensors, _strip, _weights_path, weights_fingerprint
from .methods.prefix import prefix_names
from .tensor_file import open_numpy

PROMPT_KEY = "prompt_embeddings"
PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")


def virtual_names(params, config):
    """The names of a run's virtual tokens: ["prompt"] (prompt tuning), every prefix_k, prefix_v (prefix
    tuning), or [] for neither."""
    return ["prompt"] if "prompt" in params else prefix_names(config)


def prefix_embedding(params, config):
    """PEFT's (P, 2 L C) prefix: row j is [k_0j, v_0j, k_1j, v_1j, ...], layer i's prefix_k, prefix_v rows j."""
    blocks = []
    for i in range(config.n_layers):
        blocks += [to_numpy(params[f"h.{i}.attn.prefix_k"]), to_numpy(params[f"h.{i}.attn.prefix_v"])]
    return np.concatenate(blocks, axis=1)  # (P, 2 L C)


def to_peft(params, config, base_path):
    """A prompt or prefix run (trained with PEFT's positions) as PEFT's (adapter_config dict, tensors dict).

    Inputs:
    - params, config: a model with a soft prompt (params["prompt"], (P, C)) or a prefix (config.n_prefix = P)
      and config.peft_positions
    - base_path: the folder of the exported base model (base_model_name_or_path)

    Returns the adapter_config.json dict (PROMPT_TUNING or PREFIX_TUNING, for CAUSAL_LM) and
    {"prompt_embeddings": (P, C) or (P, 2 L C)} for adapter_model.safetensors.
    """
    if not virtual_names(params, config):
        raise ValueError("params: expected a prompt- or prefix-tuning model (params['prompt'] or config.n_prefix "
                         "> 0), got neither")
    if not config.peft_positions:
        raise ValueError("config: expected peft_positions true (the positions PEFT gives), got false")
    if "prompt" in params:
        peft_type, embeddings, extra = "PROMPT_TUNING", to_numpy(params["prompt"]), {
            # RANDOM: PEFT initialises nothing from text (TEXT would load a tokenizer); the weights are loaded after
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    else:
        peft_type, embeddings, extra = "PREFIX_TUNING", prefix_embedding(params, config), {
            "prefix_projection": False, "encoder_hidden_size": config.d_model}
    adapter_config = {
        "peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "num_virtual_tokens": int(embeddings.shape[0]), "token_dim": config.d_model,
        "num_transformer_submodules": 1, "num_attention_heads": config.n_heads, "num_layers": config.n_layers,
        "inference_mode": True, "modules_to_save": None, **extra,
    }
    return adapter_config, {PROMPT_KEY: np.ascontiguousarray(embeddings)}


def write_peft(folder, params, config, base_path, base_params):
    """Write adapter_config.json and adapter_model.safetensors into folder (existing, empty).

    The safetensors metadata records base_params' fingerprint, as peft_io.write_peft does.
    """
    from .peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    safetensors = _safetensors()
    adapter_config, tensors = to_peft(params, config, base_path)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS),
                                metadata={"format": "pt", FINGERPRINT_KEY: weights_fingerprint(base_params)})


def _base_folder(folder, ac):
    """The local GPT-2 folder base_model_name_or_path names (absolute; or relative, from the adapter's folder, then
    the working folder, as peft_io._check_base reads it), or None."""
    base_path = ac.get("base_model_name_or_path")
    if not isinstance(base_path, str) or not base_path:
        return None
    candidates = [base_path] if os.path.isabs(base_path) else [os.path.join(folder, base_path), base_path]
    return next((c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))), None)


def key_biases(base_folder, n_layers, C):
    """[b_k of block i] (C,) each: the middle third of c_attn.bias, as the GPT-2 folder stores it."""
    out = {}
    with open_numpy(_weights_path(base_folder)) as f:
        for name in f.keys():
            key = _strip(name)
            if key.startswith("h.") and key.endswith(".attn.c_attn.bias"):
                out[int(key.split(".")[1])] = np.asarray(f.get_tensor(name), dtype=np.float64)[C:2 * C]
    if sorted(out) != list(range(n_layers)) or any(b.shape != (C,) for b in out.values()):
        raise ValueError(f"{base_folder}: expected c_attn.bias (3 x {C},) in each of {n_layers} blocks, got "
                         f"blocks {sorted(out)[:4]}")
    return [out[i] for i in range(n_layers)]


def _expect(ac, name, allowed, where, why):
    if not any(type(ac.get(name)) is type(a) and ac.get(name) == a for a in allowed):
        raise ValueError(f"{where}: {name}: expected {' or '.join(map(repr, allowed))} ({why}), got "
                         f"{ac.get(name)!r}")


def read_peft(folder, path, ac, base_params, base_config):
    """A PEFT PROMPT_TUNING or PREFIX_TUNING folder on GPT-2 as minilora's prompt or prefix, with PEFT's positions.

    Inputs:
    - folder, path: the adapter folder and its adapter_config.json; ac: that file's dict
    - base_params, base_config: the base model (no adapters, prompt or prefix), numpy or device arrays

    Returns (params, config, meta): base_params plus "prompt" (P, C), or every layer's prefix_k, prefix_v
    (P, C) (prefix_k less the base's key bias, see the module docstring), and the config with
    peft_positions (and n_prefix = P). Raises ValueError, naming the field, for what PEFT would compute
    otherwise: another task_type, sizes that are not the
    base's, a num_virtual_tokens that leaves no position for a real token, a file that does not hold exactly
    prompt_embeddings at PEFT's shape; for a prefix whose base folder is not found (its key bias is needed);
    and for a base whose fingerprint differs (as peft_io.read_peft).
    """
    from .peft_io import _check_base, _read_weights

    where = f"adapter: {path}"
    kind = ac.get("peft_type")
    C, L, NH = base_config.d_model, base_config.n_layers, base_config.n_heads
    _expect(ac, "task_type", ("CAUSAL_LM",), where, "minilora computes PEFT's causal-LM forward")
    _expect(ac, "num_transformer_submodules", (1, None), where, "a decoder-only model has one")
    for name, value in (("token_dim", C), ("num_layers", L), ("num_attention_heads", NH)):
        _expect(ac, name, (value, None), where, "the base model's")
    _expect(ac, "modules_to_save", (None, []), where, "minilora trains the virtual tokens only")
    if kind == "PREFIX_TUNING":
        # prefix_projection true is read too: PEFT saves its MLP's output, the (P, 2 L C) prefix itself, and
        # loads that for inference as the plain embedding, so the file means the same either way
        _expect(ac, "prefix_projection", (False, True, None), where, "true or false")
    P = ac.get("num_virtual_tokens")
    if isinstance(P, bool) or not isinstance(P, int) or not 1 <= P < base_config.context_length:
        raise ValueError(f"{where}: num_virtual_tokens: expected an integer from 1 to context_length - 1 = "
                         f"{base_config.context_length - 1} (the real tokens come after them), got {P!r}")
    if base_config.lora is not None or base_config.n_prefix or "prompt" in base_params:
        raise ValueError("adapter: expected a base model without adapters, got one with adapters already")
    weights, metadata, tensors = _read_weights(folder)
    shape = (P, C) if kind == "PROMPT_TUNING" else (P, 2 * L * C)
    if set(tensors) != {PROMPT_KEY} or tuple(tensors[PROMPT_KEY].shape) != shape:
        found = {n: tuple(t.shape) for n, t in list(tensors.items())[:3]}
        raise ValueError(f"adapter: {weights}: expected exactly {PROMPT_KEY} {shape} (PEFT's {kind} for this base), "
                         f"got {found}")
    embeddings = np.asarray(tensors[PROMPT_KEY], dtype=np.float64)
    if not np.isfinite(embeddings).all():
        raise ValueError(f"adapter: {weights}: {PROMPT_KEY}: expected finite values, got NaN or infinity")
    _check_base(folder, ac, metadata, base_params)
    xp = array_module(base_params["wte"])
    dtype = base_params["wte"].dtype
    out = dict(base_params)
    if kind == "PROMPT_TUNING":
        out["prompt"] = xp.asarray(embeddings.astype(dtype))
        config = replace(base_config, peft_positions=True)
    else:
        base_folder = _base_folder(folder, ac)
        if base_folder is None:
            raise ValueError(f"{where}: base_model_name_or_path: expected the local GPT-2 folder the prefix was "
                             f"trained on, to read its key bias (GPT-2 adds it to the real tokens' keys, not to "
                             f"the prefix's; minilora keeps none), got {ac.get('base_model_name_or_path')!r}")
        for i, b_k in enumerate(key_biases(base_folder, L, C)):
            keys, values = embeddings[:, 2 * i * C:(2 * i + 1) * C], embeddings[:, (2 * i + 1) * C:(2 * i + 2) * C]
            out[f"h.{i}.attn.prefix_k"] = xp.asarray((keys - b_k).astype(dtype))
            out[f"h.{i}.attn.prefix_v"] = xp.asarray(values.astype(dtype))
        config = replace(base_config, n_prefix=P, peft_positions=True)
    return out, config, {"kind": "peft_adapter", "peft": ac, "path": folder}
