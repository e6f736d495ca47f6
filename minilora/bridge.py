"""Whole models across the bridge: a Hugging Face GPT-2 folder into a minilora run, a run out to one.

    minilora import-hf DIR --out RUN     config.json + model.safetensors (+ tokenizer.json) -> RUN/checkpoint.npz
    minilora export RUN --out DIR        -> DIR/config.json, model.safetensors, tokenizer files
                                            (+ DIR/adapter/ for a LoRA, DoRA, IA3 or QLoRA run, and for a
                                            prompt or prefix run trained with --peft-positions: a PEFT folder)
    minilora export RUN --out DIR --bnb-4bit   a QLoRA run's base in bitsandbytes' 4-bit NF4 (bnb_io.py)

A QLoRA run goes out as what it computes: its dequantized NF4 base (float32)
and its adapters as a PEFT LoRA adapter (qlora.as_lora), exactly as a LoRA run;
with --bnb-4bit the base keeps its 4-bit codes, in the layout transformers
loads with bitsandbytes, and the adapter folder is the same.

The weights' mapping is hf.py's, the adapters' peft_io.py's; this module adds
the tokenizer and the checks that span them: the tokenizer's vocabulary must
be the weights' (a mismatch would give garbage without an error), and what
has no exact counterpart in transformers is refused, never approximated.

minilora's character tokenizer goes out as a `tokenizers` model that encodes
exactly as it does: a WordLevel vocabulary of its 96 characters behind a
pre-tokenizer that splits text into single characters. A character outside
the vocabulary is an error there too (the vocabulary has no unknown token).
Needs safetensors and tokenizers (`pip install 'minilora[hf]'`).
"""

import json
import os

from . import hf, peft_io, peft_prompt
from .corpus import NEWLINE_ID, VOCAB
from .methods import qlora
from .methods.lora import adapter_names, lora_names
from .tokenizer import CHAR_DESCRIPTION, TOKENIZER_FILE, check_vocab_size, make_tokenizer, single_token_id

TOKENIZER_CONFIG = "tokenizer_config.json"
ADAPTER_DIR = "adapter"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ValueError("tokenizers: expected the tokenizers package for Hugging Face tokenizers, got none "
                         "installed; pip install 'minilora[hf]'") from e
    return tokenizers


def char_tokenizer_json():
    """The character tokenizer (corpus.VOCAB, token i = VOCAB[i]) as a tokenizers-library tokenizer.json string."""
    tk = _tokenizers()
    model = tk.models.WordLevel({ch: i for i, ch in enumerate(VOCAB)}, unk_token="<unk>")  # <unk> not in vocab
    tokenizer = tk.Tokenizer(model)
    # every character its own piece ([\s\S] matches any character, the newline included)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = tk.decoders.Fuse()  # ids back to text with nothing between the characters
    return tokenizer.to_str()


def hf_tokenizer(folder, vocab_size):
    """The tokenizer of a GPT-2 folder, checked against the weights' vocab_size.

    Its tokenizer.json, read with the `tokenizers` library (the character
    tokenizer when it is exactly the one char_tokenizer_json writes); with no
    tokenizer.json, the character tokenizer if vocab_size is its 96, as a
    minilora checkpoint that records no tokenizer. Raises ValueError otherwise,
    and when the vocabulary differs from the weights'.
    """
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        if vocab_size != len(VOCAB):
            raise ValueError(f"{folder}: expected a {TOKENIZER_FILE} (vocab_size {vocab_size} is not the character "
                             f"tokenizer's {len(VOCAB)}), got none; save the model's tokenizer beside it")
        return make_tokenizer()  # the character tokenizer
    tokenizer = make_tokenizer(path, option=path)  # a BPETokenizer over the file
    if json.loads(tokenizer.data) == json.loads(char_tokenizer_json()):
        tokenizer = make_tokenizer()  # the character one, exported by minilora: the same ids, and the floor applies
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{path}: expected a vocabulary of {vocab_size} tokens (the weights' wte rows), "
                         f"got {tokenizer.vocab_size}; the tokenizer and the weights are from different models")
    return tokenizer


def read_hf_model(folder, dtype=None):
    """A GPT-2 folder as (params, config, tokenizer): hf.read_gpt2 and hf_tokenizer.

    dtype: None gives float32 (minilora trains in float32).
    """
    import numpy as np

    params, config, _ = hf.read_gpt2(folder, dtype=np.float32 if dtype is None else dtype)
    return params, config, hf_tokenizer(folder, config.vocab_size)


def tokenizer_json(tokenizer):
    """A run's tokenizer as tokenizer.json text: the character one converted, a BPE one as it was read."""
    if tokenizer.describe() == CHAR_DESCRIPTION:
        return char_tokenizer_json()
    return tokenizer.data.decode("utf-8")


def check_exportable(params, config, bnb_4bit=False):
    """Raise ValueError, saying why, for what has no exact transformers/PEFT counterpart (or, with bnb_4bit,
    for a run that is not QLoRA: only a QLoRA base has 4-bit codes to write)."""
    if "prompt" in params and not config.peft_positions:
        raise ValueError("run: a prompt-tuning run has no exact export: PEFT's prompt tuning gives the virtual "
                         "tokens positions 0..P-1 and shifts the real tokens after them, while this run kept the "
                         "real tokens at positions 0..T-1; train it with --peft-positions to export it")
    if config.n_prefix and not config.peft_positions:
        raise ValueError("run: a prefix-tuning run has no exact export: PEFT's prefix tuning hands the prefix to GPT-2 "
                         "as past_key_values, so GPT-2 numbers the real tokens P..P+T-1, while this run kept them "
                         "at positions 0..T-1; train it with --peft-positions to export it")
    if "cls.W" in params:
        raise ValueError("run: a classification run has no exact export: transformers' GPT2ForSequenceClassification "
                         "head has no bias and reads the last non-padding token, minilora's cls.W, cls.b has a bias")
    if bnb_4bit:
        from . import bnb_io

        bnb_io.check_exportable(config)
    # peft_io writes LoRA, DoRA (use_dora) and IA3 adapters; a QLoRA run goes out as LoRA on its dequantized base
    if config.lora is not None and config.lora.method not in peft_io.EXPORTED + (qlora.QLoraConfig.method,):
        raise ValueError(f"run: a {config.lora.label} run has no PEFT export here (minilora writes LoRA, DoRA, "
                         "IA3 and QLoRA adapters only); merge it (minilora merge) and export the merged model")


def _end_token(tokenizer):
    """The id GPT-2's config names as bos and eos: the line end every record and corpus sentence ends with
    (the character tokenizer's NEWLINE_ID), or None (JSON null) for a tokenizer in which "\\n" is not one token."""
    if tokenizer.describe() == CHAR_DESCRIPTION:
        return NEWLINE_ID
    try:
        return single_token_id(tokenizer, "\n", "eos")
    except ValueError:
        return None


# what an export writes: an existing --out holding only these is an earlier export, which --overwrite may replace
EXPORT_FILES = (hf.CONFIG_FILE, hf.WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG,
                f"{ADAPTER_DIR}/{peft_io.ADAPTER_CONFIG}", f"{ADAPTER_DIR}/{peft_io.ADAPTER_WEIGHTS}")


def export_model(out, params, config, tokenizer, overwrite=False, inputs=(), bnb_4bit=False):
    """Write a model (and its LoRA adapters, if any) as a Hugging Face folder, atomically.

    Inputs:
    - out: the folder to create (see hf.write_folder_atomically)
    - params, config: a plain model, or one with LoRA adapters (config.lora)
    - tokenizer: the model's (the character one or a BPETokenizer, as runs.load_model returns it)
    - overwrite: replace out if it exists and holds an earlier export only (outputs.check_folder_output)
    - inputs: the paths the model was read from, which out must not be nor hold
    - bnb_4bit: a QLoRA model's base as bitsandbytes' 4-bit NF4 (bnb_io.write_gpt2_nf4), not dequantized

    Writes out/config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    and for a LoRA model the base (adapters left out) there and the adapters as
    a PEFT folder in out/adapter, whose base_model_name_or_path is out; likewise
    a prompt or prefix model trained with PEFT's positions (peft_prompt.py). A QLoRA model
    is written as the LoRA model of the same function (qlora.as_lora: the base dequantized).
    Returns the list of folders written (out, and out/adapter for an adapter).
    """
    check_exportable(params, config, bnb_4bit)
    quantized = (params, config)  # a QLoRA model's records, for the 4-bit base
    if config.lora is not None and config.lora.method == qlora.QLoraConfig.method:
        params, config = qlora.as_lora(params, config)
    check_vocab_size(tokenizer, config.vocab_size, what="tokenizer")
    text = tokenizer_json(tokenizer)
    eos = _end_token(tokenizer)
    virtual = peft_prompt.virtual_names(params, config)  # a soft prompt or a prefix: PEFT prompt learning
    adapters = set(lora_names(params)) | (set(adapter_names(config)) if config.lora is not None else set())
    base = {k: v for k, v in params.items() if k not in adapters | set(virtual)}
    base_config = config if config.lora is None else type(config).from_dict({**config.to_dict(), "lora": None})
    if virtual:
        base_config = type(config).from_dict({**config.to_dict(), "n_prefix": 0, "peft_positions": False})
    adapted = config.lora is not None or bool(virtual)
    final = os.path.abspath(out)

    def write(tmp):
        if bnb_4bit:
            from . import bnb_io

            bnb_io.write_gpt2_nf4(tmp, *quantized, base, eos_token_id=eos)
        else:
            hf.write_gpt2(tmp, base, base_config, eos_token_id=eos)
        with open(os.path.join(tmp, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(tmp, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                       "model_max_length": config.context_length}, f, indent=2)
        if adapted:
            os.mkdir(os.path.join(tmp, ADAPTER_DIR))
            write_peft = peft_prompt.write_peft if virtual else peft_io.write_peft
            write_peft(os.path.join(tmp, ADAPTER_DIR), params, config, final, base)

    hf.write_folder_atomically(out, write, overwrite=overwrite, inputs=inputs, writes=EXPORT_FILES)
    return [out] + ([os.path.join(out, ADAPTER_DIR)] if adapted else [])

