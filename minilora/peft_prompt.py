"""Prompt- and prefix-tuning runs as PEFT adapter folders (PromptTuningConfig, PrefixTuningConfig), exactly.

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
are exactly minilora's. The tensors keep the run's dtype (float32 for a trained run). Needs safetensors.
"""

import json
import os

import numpy as np

from .backend import to_numpy
from .hf import FINGERPRINT_KEY, _safetensors, weights_fingerprint
from .methods.prefix import prefix_names

PROMPT_KEY = "prompt_embeddings"


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
