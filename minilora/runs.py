"""Run folders and the one way to load a model from them.

A run folder holds what one command wrote:

    runs/pretrain/                 checkpoint.npz, log.jsonl (and tokenizer.json for a BPE run)
    runs/finetune-subject-lora/    checkpoint.npz, log.jsonl, summary.json, adapter.npz

`load_model` takes a folder or a file, everywhere alike: a full checkpoint
(pretraining, any fine-tuning run, a merged model), or a base checkpoint plus
an adapter file. The config stored with the arrays describes them whole
(LoRA settings included), and every array's name and shape is checked
against it before anything is returned. The model comes with its tokenizer
(tokenizer.tokenizer_from_meta: the checkpoint's own, the character one for a
checkpoint that records none), whose vocabulary must be the rows of wte.

No run overwrites another: `free_run_dir` picks a folder name that holds no
run yet (a counter after the name), and `prepare_run_dir` refuses a folder
that already holds one unless the caller resumes or overwrites it, and checks
that the folder can be written before any work starts. `claim_run_dir` does
both under the folder's lock (lock.py), which the caller holds for the run's
whole life: two commands given one --out cannot both pass the check.

Everything loaded is checked (validate.py) before use: meta.json's fields, the
config against every array's name and shape, every array finite float32 or
float64, and the checkpoint's seal; errors name the file and the field.
"""

import contextlib
import os
import tempfile

from . import lock
from .backend import get_backend
from .checkpoint import check_params_match, load_checkpoint
from . import methods
from .hf import is_hf_folder
from .methods.lora import ADAPTER_KIND, load_adapter
from .model import ModelConfig, params_to
from .peft_io import is_peft_folder
from .tokenizer import TOKENIZER_FILE, check_vocab_size, tokenizer_from_meta
from .validate import FileError, check_arrays, field

CHECKPOINT = "checkpoint.npz"
ADAPTER = "adapter.npz"
LOG = "log.jsonl"
SUMMARY = "summary.json"
# What a run writes; a folder holding a checkpoint or a log is a run.
RUN_FILES = (CHECKPOINT, LOG, SUMMARY, ADAPTER, TOKENIZER_FILE)


def is_run_dir(path):
    """True when path is a folder that holds a run (a checkpoint or a log)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (CHECKPOINT, LOG))


def free_run_dir(base):
    """base, or base-2, base-3, ... : the first of them that holds no run."""
    path, n = base, 1
    while is_run_dir(path) or os.path.isfile(path):
        n += 1
        path = f"{base}-{n}"
    return path


def check_writable(path, option="--out"):
    """Create the folder path (and its parents) and a temporary file in it; ValueError naming option if it fails."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{option}: expected a folder name, got {path!r}")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        from .outputs import os_error_reason

        raise ValueError(f"{option}: cannot write to the folder {str(path)!r}: {os_error_reason(e, path)}") from e


def prepare_run_dir(path, resume=False, overwrite=False, option="--out", resumable=True):
    """Make path ready to hold a run, before any work starts.

    Refuses (ValueError naming option) a folder that already holds a run,
    unless resume (the run continues there) or overwrite (its run files,
    RUN_FILES, are deleted now) is set, and a folder that cannot be written.
    resumable: the command has --resume (import-hf has not), so the refusal offers it.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{option}: expected a folder name, got {path!r}")
    if is_run_dir(path) and not (resume or overwrite):
        held = [f for f in (CHECKPOINT, LOG) if os.path.exists(os.path.join(path, f))]
        raise ValueError(f"{option}: {str(path)!r} already holds a run ({', '.join(held)}); give "
                         + ("--resume to continue it, " if resumable else "")
                         + f"--overwrite to replace it, or another {option}")
    check_writable(path, option)
    if overwrite and not resume:
        for f in RUN_FILES:
            if os.path.exists(os.path.join(path, f)):
                os.remove(os.path.join(path, f))


@contextlib.contextmanager
def claim_run_dir(path, resume=False, overwrite=False, option="--out"):
    """Hold path's lock for the block, after prepare_run_dir's checks (made under the lock).

    Raises lock.FolderInUse (a ValueError naming option) when another process
    holds the folder; nothing is then written or deleted. A folder this call
    created and left without any run file (the block was interrupted before
    the first write) is removed again, so an interruption leaves no empty
    folder behind.
    """
    check_writable(os.path.dirname(os.path.abspath(path)), option)
    existed = os.path.isdir(path)
    try:
        with lock.hold(path, option):
            prepare_run_dir(path, resume, overwrite, option)
            yield
    finally:
        if not existed and os.path.isdir(path) and not os.listdir(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def checkpoint_path(path, name=CHECKPOINT):
    """path itself when it is a file; path/name when it is a run folder."""
    return os.path.join(path, name) if os.path.isdir(path) else path


def expected_shapes(config, params):
    """name -> shape every array of a model with this config must have (methods.expected_shapes).

    The base model's names come from config; adapters from config.lora; a soft
    prompt (P, C) and a classification head (K, C), (K,) may be present with
    any P and K.
    """
    return methods.expected_shapes(config, params)


def load_model(path, xp=None, adapter=None):
    """Load a model with its tokenizer: returns (params on xp, ModelConfig, meta, tokenizer).

    Inputs:
    - path: a run folder or a .npz checkpoint (pretraining, fine-tuning or merged),
      or a Hugging Face GPT-2 folder (config.json + model.safetensors, read by hf.py)
    - xp: the array module (None: numpy)
    - adapter: an adapter.npz (or a LoRA run folder holding one), or a PEFT LoRA
      folder (adapter_config.json, read by peft_io.py), to put on top of the
      model at path; its base fingerprint must match

    meta is the checkpoint's (or, with an adapter, the adapter's) metadata.
    tokenizer is the one the model at path was trained with (an adapter keeps
    its base's); a tokenizer whose vocabulary size is not the weights' is
    refused, as is a BPE run whose tokenizer.json is missing or changed.
    Raises validate.FileError naming the file and field; its .source is
    "model" or "adapter", which of the two inputs failed.
    """
    xp = xp if xp is not None else get_backend("numpy")
    found = {}
    if is_hf_folder(path):
        from .bridge import read_hf_model

        try:
            saved, config, tokenizer = read_hf_model(path)  # the tokenizer checked against the weights
            check_model_arrays(saved, config, path)
        except FileError as e:
            e.source = "model"
            raise
        except ValueError as e:
            raise FileError(path, str(e).removeprefix("checkpoint: "), source="model") from e
        meta = {"kind": "imported", "model": config.to_dict(), "imported_from": os.path.abspath(path),
                "tokenizer": tokenizer.describe()}
    else:
        path = checkpoint_path(path)

        def check(saved, meta, _):
            kind = field(meta, "kind", path, "str", optional=True)
            if kind == ADAPTER_KIND:
                raise FileError(path, f"expected a model, got a LoRA adapter file; give the base model's "
                                      f"checkpoint and the adapter with --adapter {path}")
            found["config"] = config = model_config_of(meta, path)
            check_model_arrays(saved, config, path)

        try:
            saved, meta, _ = load_checkpoint(path, check)
            config = found["config"]
            try:
                tokenizer = tokenizer_from_meta(meta, os.path.dirname(path) or ".")
                check_vocab_size(tokenizer, config.vocab_size, what="checkpoint")
            except FileError:
                raise
            except ValueError as e:
                raise FileError(path, str(e).removeprefix("checkpoint: "), "meta.json: tokenizer") from e
        except FileError as e:
            e.source = "model"
            raise
    params = params_to(saved, xp)
    if adapter is not None:
        base = params
        adapter_file = adapter if is_peft_folder(adapter) else checkpoint_path(adapter, ADAPTER)
        try:
            if is_peft_folder(adapter):
                from .peft_io import read_peft

                params, config, meta = read_peft(adapter, params, config)
                # a PEFT adapter, too, only adds names: no base array is replaced
                replaced = sorted(n for n in base if params[n] is not base[n])
                if replaced:
                    raise FileError(adapter, f"expected only adapter names, got base weights {replaced[:5]}")
                check_model_arrays(params, config, adapter)
            else:
                if os.path.isdir(adapter) and not os.path.isfile(adapter_file):
                    raise FileError(adapter, f"expected a LoRA run folder holding {ADAPTER} or an adapter file, "
                                             f"got a folder without {ADAPTER}")
                params, config, meta = load_adapter(adapter_file, params, config)
        except FileError as e:
            e.source = "adapter"
            raise
        except ValueError as e:
            raise FileError(adapter_file, str(e).removeprefix("adapter: "), source="adapter") from e
    return params, config, meta, tokenizer


def model_config_of(meta, path):
    """meta.json's "model", checked field by field: a ModelConfig, or FileError naming the file and field."""
    d = field(meta, "model", path, "dict")
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise FileError(path, str(e), "meta.json: model") from e


def check_model_arrays(saved, config, path):
    """Every array of a model file: the names and shapes config says, finite float32 / float64 (FileError)."""
    try:
        check_params_match(saved, expected_shapes(config, saved), what="the arrays")
    except ValueError as e:
        raise FileError(path, str(e)) from e
    check_arrays(saved, path)
