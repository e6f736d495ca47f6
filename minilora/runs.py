"""Run folders and the one way to load a model from them.

A run folder holds what one command wrote:

    runs/pretrain/                 checkpoint.npz, log.jsonl
    runs/finetune-subject-lora/    checkpoint.npz, log.jsonl, summary.json, adapter.npz

`load_model` takes a folder or a file, everywhere alike: a full checkpoint
(pretraining, any fine-tuning run, a merged model), or a base checkpoint plus
an adapter file. The config stored with the arrays describes them whole
(LoRA settings included), and every array's name and shape is checked
against it before anything is returned.
"""

import os

from .backend import get_backend
from .checkpoint import check_params_match, load_checkpoint
from .lora import ADAPTER_KIND, TARGETS, load_adapter
from .model import ModelConfig, param_shapes, params_to

CHECKPOINT = "checkpoint.npz"
ADAPTER = "adapter.npz"


def checkpoint_path(path, name=CHECKPOINT):
    """path itself when it is a file; path/name when it is a run folder."""
    return os.path.join(path, name) if os.path.isdir(path) else path


def expected_shapes(config, params):
    """name -> shape every array of a model with this config must have.

    The base model's names come from config; adapters from config.lora; a soft
    prompt (P, C) and a classification head (K, C), (K,) may be present with
    any P and K.
    """
    shapes = dict(param_shapes(config))
    if config.lora is not None:
        r = config.lora.rank
        for i in range(config.n_layers):
            for t in config.lora.targets:
                prefix = f"h.{i}.{TARGETS[t]}"
                d_out, d_in = shapes[prefix + ".W"]
                shapes[prefix + ".lora_A"], shapes[prefix + ".lora_B"] = (r, d_in), (d_out, r)
    C = config.d_model
    if "prompt" in params:
        shapes["prompt"] = (params["prompt"].shape[0], C)
    if "cls.W" in params:
        K = params["cls.W"].shape[0]
        shapes["cls.W"], shapes["cls.b"] = (K, C), (K,)
    return shapes


def load_model(path, xp=None, adapter=None):
    """Load a model: returns (params on xp, ModelConfig, meta).

    Inputs:
    - path: a run folder or a .npz checkpoint (pretraining, fine-tuning or merged)
    - xp: the array module (None: numpy)
    - adapter: an adapter.npz (or a LoRA run folder holding one) to put on top
      of the model at path; its base fingerprint must match

    meta is the checkpoint's (or, with an adapter, the adapter's) metadata.
    """
    xp = xp if xp is not None else get_backend("numpy")
    path = checkpoint_path(path)
    saved, meta, _ = load_checkpoint(path)
    if meta.get("kind") == ADAPTER_KIND:
        raise ValueError(f"checkpoint: {path} is a LoRA adapter file, not a model; give the base model's "
                         f"checkpoint and the adapter with --adapter {path}")
    if "model" not in meta:
        raise ValueError(f"checkpoint: {path} has no model config; expected a minilora checkpoint")
    config = ModelConfig.from_dict(meta["model"])
    check_params_match(saved, expected_shapes(config, saved), what=path)
    params = params_to(saved, xp)
    if adapter is not None:
        adapter = checkpoint_path(adapter, ADAPTER)
        params, config, meta = load_adapter(adapter, params, config)
        check_params_match(params, expected_shapes(config, params), what=adapter)
    return params, config, meta
