"""Prompt tuning: P trainable vectors put before the input; every weight of the model frozen.

The soft prompt is one (P, C) parameter named "prompt". model.forward puts it
before the token embeddings of every row:

    x = [prompt_1 .. prompt_P, wte[ids_1] + wpe[0], .., wte[ids_T] + wpe[T-1]]

Positions: the prompt vectors get no position embedding (they are free
vectors, and can learn any position signal they need), and the real tokens
keep positions 0..T-1, exactly what the pretrained model saw, so
context_length still bounds the real tokens only. The prompt's own outputs are
dropped before the head, so the loss never counts the virtual positions.

PEFT's positions (FinetuneConfig.peft_positions, `finetune --peft-positions`,
ModelConfig.peft_positions): PEFT's prompt tuning concatenates the P vectors
before inputs_embeds, and GPT-2 then adds wpe to the whole sequence, so

    x = [prompt_1 + wpe[0], .., prompt_P + wpe[P-1], wte[ids_1] + wpe[P], .., wte[ids_T] + wpe[P+T-1]]

The backward is unchanged for the prompt (x_j = prompt_j + wpe[j]: dprompt_j =
sum_b dx[b, j], as before); a trained wpe gets dwpe[j] = sum_b dx[b, j] over
all P + T rows. Now P + T <= context_length, and such a run exports to PEFT's
PromptTuningConfig exactly (peft_prompt.py); with minilora's positions it
does not, since the real tokens then see other position embeddings.
"""

from dataclasses import replace

import numpy as np

from ..backend import array_module, to_numpy
from . import Method, register

PROMPT_INITS = ("vocab", "random", "text")


def add_prompt(params, n_prompt, init="vocab", seed=0, init_ids=None):
    """A new dict: params (shared) plus "prompt" (P, C).

    Inputs:
    - n_prompt: P, the number of virtual tokens
    - init: "vocab" (copies of random rows of wte, so the prompt starts among
      real token embeddings), "random" (normal with wte's standard deviation),
      or "text" (the embeddings of init_ids, repeated to fill P)
    - init_ids: token ids for init="text"
    """
    if isinstance(n_prompt, bool) or not isinstance(n_prompt, int) or n_prompt < 1:
        raise ValueError(f"n_prompt: expected a positive integer, got {n_prompt!r}")
    if init not in PROMPT_INITS:
        raise ValueError(f"init: expected one of {PROMPT_INITS}, got {init!r}")
    rng = np.random.default_rng(seed)
    wte = to_numpy(params["wte"])
    if init == "vocab":
        prompt = wte[rng.integers(0, wte.shape[0], n_prompt)]
    elif init == "random":
        prompt = rng.normal(0.0, float(wte.std()), (n_prompt, wte.shape[1]))
    else:
        if init_ids is None or len(init_ids) == 0:
            raise ValueError("init_ids: expected the token ids of a non-empty text for init='text', got none")
        prompt = wte[np.resize(np.asarray(init_ids), n_prompt)]
    xp = array_module(params["wte"])
    return {**params, "prompt": xp.asarray(prompt.astype(wte.dtype))}


# the seam (methods/__init__.py): prompt tuning as finetune and the tools see it


def _setup(base_params, model_config, config, tokenizer):
    """tokenizer: the base model's, which encodes prompt_init_text for init="text"."""
    init_ids = tokenizer.encode(config.prompt_init_text) if config.prompt_init == "text" else None
    params = add_prompt(base_params, config.n_prompt, config.prompt_init, config.seed, init_ids)
    return params, replace(model_config, **_model_settings(config)), {"prompt"}


def _model_settings(config):
    """ModelConfig.peft_positions when the run asks for PEFT's positions; nothing at the default."""
    return {"peft_positions": True} if config.peft_positions else {}


def _check(model_config, config, longest):
    room = model_config.context_length - longest
    if config.n_prompt > room:
        raise ValueError(f"n_prompt: expected at most context_length - longest record = "
                         f"{model_config.context_length} - {longest} = {room} soft-prompt vectors, "
                         f"got {config.n_prompt}")


def _fit(model_config, config, longest):
    """Shorten the soft prompt when it and the longest record would not fit the context together."""
    room = model_config.context_length - longest
    if room >= config.n_prompt:
        return None
    note = (f"{room} soft-prompt vectors instead of {config.n_prompt}, so that they and the longest record "
            f"fit the {model_config.context_length}-character context")
    config.n_prompt = room
    return note


def _extra_shapes(config, params):
    """A soft prompt may have any length P: its shape is read from params."""
    return {"prompt": (params["prompt"].shape[0], config.d_model)} if "prompt" in params else {}


def _gradcheck_setup(params, config, rng):
    prompted = add_prompt(params, 3, init="random", seed=3)
    prompted["prompt"] = 0.5 * rng.standard_normal(prompted["prompt"].shape)
    return prompted, config, {"prompt"}


def _gradcheck_peft_positions(params, config, rng):
    """PEFT's positions: a context 3 longer (gradcheck.longer_context) for the 3 prompt vectors' positions, and
    wpe trained too, so that its rows 0..P-1 (the prompt's) and P..P+T-1 (the real tokens') are checked."""
    from ..gradcheck import longer_context

    params, config = longer_context(params, replace(config, peft_positions=True), 3, rng)
    prompted, config, trainable = _gradcheck_setup(params, config, rng)
    return prompted, config, trainable | {"wpe"}


PROMPT = register(Method("prompt", "P trainable vectors before the input, every weight frozen", 1e-2, _setup,
                         check=_check, extra_shapes=_extra_shapes, owns=lambda name: name == "prompt",
                         fit=_fit, study_lrs=(1e-2, 3e-2, 1e-1, 3e-1), gradcheck_setup=_gradcheck_setup,
                         color="tab:green", model_settings=_model_settings, peft_positions=True,
                         gradcheck_variants=(("PEFT positions", _gradcheck_peft_positions),)))
