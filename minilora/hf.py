"""GPT-2 in Hugging Face's layout: a folder of config.json + model.safetensors, read and written exactly.

minilora's model is GPT-2's function (the same pre-LayerNorm block, tanh GELU,
LayerNorm eps 1e-5, tied head), so the two layouts differ only in names and in
how the linear weights are stored:

    transformers (GPT2LMHeadModel)           minilora
    transformer.wte.weight      (V, C)       wte
    transformer.wpe.weight      (Tmax, C)    wpe
    h.{i}.ln_1.weight / .bias   (C,)         h.{i}.ln_1.g / .b       (ln_2, ln_f alike)
    h.{i}.attn.c_attn.weight    (C, 3C)      h.{i}.attn.{q,k,v}.W    (C, C) each: the transpose, split in three
    h.{i}.attn.c_attn.bias      (3C,)        h.{i}.attn.{q,v}.b      the key's third is dropped (below)
    h.{i}.attn.c_proj.weight    (C, C)       h.{i}.attn.o.W          transposed
    h.{i}.mlp.c_fc.weight       (C, F)       h.{i}.mlp.fc.W  (F, C)  transposed
    h.{i}.mlp.c_proj.weight     (F, C)       h.{i}.mlp.proj.W (C, F) transposed

GPT-2's linears are `Conv1D` modules that store W as (in, out) and compute
x @ W + b; minilora stores (out, in) and computes x @ W.T + b. The weights in
TRANSPOSED are transposed once, here, as nanoGPT's from_pretrained does.

The key bias is dropped exactly: it adds q . b_k to every score of a query's
row, and a softmax row is unchanged by adding one constant to all its entries.
Exported, it is written as zeros.

Reading goes tensor by tensor (safetensors' safe_open), so importing a 124M
model needs its size in memory once, not twice. A sharded model (save_pretrained's
max_shard_size: model.safetensors.index.json, whose weight_map names the shard file
of every tensor) is read the same way, once the index and the shards are checked to
agree exactly: every tensor the index names is in its shard and in no other, and no
shard holds a tensor the index does not name. float16 and bf16 weights are read
exactly (bf16 by tensor_file.py, as NumPy has no bfloat16). A pickle file
(pytorch_model.bin) is never opened: unpickling can run any code.
This module needs the `safetensors` package (`pip install 'minilora[hf]'`).
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from .backend import to_numpy
from .methods import base_fingerprint
from .model import ModelConfig, param_shapes
from .tensor_file import open_numpy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SHARDED_INDEX = "model.safetensors.index.json"
# Conv1D weights, stored (in, out) by GPT-2: transposed to minilora's (out, in) on import, back on export
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the causal-mask buffers that older GPT-2 checkpoints store beside the weights: not parameters
BUFFERS = ("attn.bias", "attn.masked_bias")
# the safetensors metadata key that records the base fingerprint of an exported model
FINGERPRINT_KEY = "minilora_base_fingerprint"
# activation names transformers gives the tanh form of GELU that minilora computes
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:
        raise ValueError("safetensors: expected the safetensors package for Hugging Face files, got none "
                         "installed; pip install 'minilora[hf]'") from e
    return safetensors


def is_hf_folder(path):
    """True when path is a folder with a config.json and no minilora checkpoint (a Hugging Face model folder)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
            and not os.path.exists(os.path.join(path, "checkpoint.npz")))


def gpt2_config(config, eos_token_id=0):
    """The transformers GPT2Config (as a dict for config.json) that computes exactly this ModelConfig's model.

    minilora's dropout sits on the embeddings and the residual branches, as GPT-2's
    embd_pdrop and resid_pdrop; it has none on the attention probabilities.
    """
    if config.lora is not None:
        raise ValueError("config: expected a model without adapters (merge them, or export the base), "
                         f"got config.lora = {config.lora}")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_embd": config.d_model,
        "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": config.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "add_cross_attention": False, "initializer_range": 0.02,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "use_cache": True,
    }


def model_config_from_gpt2(hf, where="config.json"):
    """The ModelConfig of a GPT-2 config.json (a dict); ValueError naming the field minilora cannot compute.

    Absent fields take transformers' GPT2Config defaults. Dropout is a training
    setting, not part of the function: the imported model has dropout 0.
    """
    def field(name, default):
        return hf.get(name, default)

    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: expected model_type 'gpt2' (minilora computes GPT-2), "
                         f"got {hf.get('model_type')!r}")
    checks = [
        ("activation_function", field("activation_function", "gelu_new") in TANH_GELU,
         f"one of {TANH_GELU} (minilora's GELU is the tanh form)"),
        ("layer_norm_epsilon", field("layer_norm_epsilon", 1e-5) == 1e-5, "1e-05 (minilora's LayerNorm eps)"),
        ("scale_attn_weights", field("scale_attn_weights", True) is True, "true (scores scaled by 1/sqrt(hs))"),
        ("scale_attn_by_inverse_layer_idx", field("scale_attn_by_inverse_layer_idx", False) is False,
         "false (minilora does not scale scores by 1/layer)"),
        ("reorder_and_upcast_attn", field("reorder_and_upcast_attn", False) is False,
         "false (minilora has no upcast attention path)"),
        ("tie_word_embeddings", field("tie_word_embeddings", True) is True, "true (minilora's head is wte)"),
        ("add_cross_attention", field("add_cross_attention", False) is False, "false (no cross-attention)"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{where}: {name}: expected {expected}, got {hf.get(name)!r}")
    sizes = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    for name, default in sizes.items():
        value = sizes[name] = hf.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name}: expected a positive integer, got {value!r}")
    n_inner = hf.get("n_inner")
    # transformers' GPT2MLP: inner_dim = n_inner if n_inner is not None else 4 * n_embd, so 0 is a width of 0
    if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int) or n_inner < 1):
        raise ValueError(f"{where}: n_inner: expected a positive integer or null (4 x n_embd), got {n_inner!r}"
                         + (" (transformers builds an MLP of width 0 from it, which minilora does not compute)"
                            if n_inner == 0 and not isinstance(n_inner, bool) else ""))
    d_ff = n_inner if n_inner is not None else 4 * sizes["n_embd"]
    try:
        return ModelConfig(vocab_size=sizes["vocab_size"], context_length=sizes["n_positions"],
                           d_model=sizes["n_embd"], n_heads=sizes["n_head"], n_layers=sizes["n_layer"], d_ff=d_ff)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _read_json(path, pairs_hook=None):
    """The JSON object in path, or a ValueError naming it; pairs_hook as json.load's object_pairs_hook (its
    own ValueErrors, which name the path, pass through)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f, object_pairs_hook=pairs_hook)
    except RecursionError as e:
        raise ValueError(f"{path}: expected a JSON file, got one nested too deeply to read") from e
    except OSError as e:
        raise ValueError(f"{path}: expected a readable JSON file, got one that cannot be read "
                         f"({e.strerror or type(e).__name__})") from e
    except ValueError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: expected a JSON file, got one that does not read ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _weights_path(folder):
    """folder's model.safetensors, or its model.safetensors.index.json (a sharded model); ValueError for a pickle
    or no weights. model.safetensors comes first where both are there, as transformers reads them."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(path):
        check_readable(path)
        return path
    for name in PICKLE_FILES:
        if os.path.exists(os.path.join(folder, name)):
            raise ValueError(
                f"{folder}: holds {name}, a pickle, and minilora never unpickles (loading one can run any code); "
                "convert it once where you trust it: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\" writes {WEIGHTS_FILE}")
    index = os.path.join(folder, SHARDED_INDEX)
    if os.path.isfile(index):
        return index
    raise ValueError(f"{folder}: expected a {WEIGHTS_FILE} (or a sharded model's {SHARDED_INDEX}) beside "
                     f"{CONFIG_FILE}, got neither")


def _shard_map(index):
    """tensor name -> shard path of a model.safetensors.index.json, checked: an object whose weight_map names
    each tensor once, each shard a readable file beside the index (a plain file name: nothing outside the
    folder is opened)."""
    def pairs(items):  # json.load keeps the last of a repeated key: a tensor named twice is seen here
        names = [k for k, _ in items]
        twice = sorted({k for k in names if names.count(k) > 1})
        if twice:
            raise ValueError(f"{index}: expected each name once (each tensor in one shard), got {twice[0]!r} "
                             f"named {names.count(twice[0])} times")
        return dict(items)

    d = _read_json(index, pairs)
    weight_map = d.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index}: weight_map: expected an object of tensor name -> shard file name, got "
                         f"{type(weight_map).__name__ if weight_map is not None else 'none'}"
                         + (" (empty)" if weight_map == {} else ""))
    folder = os.path.dirname(index)
    shards = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index}: weight_map: {name}: expected a shard file name beside the index, "
                                 f"got {shard!r}")
            path = shards[shard] = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise ValueError(f"{index}: names the shard {shard} (for {name}), got no such file in {folder}")
            check_readable(path)
    return {name: shards[shard] for name, shard in weight_map.items()}


class _Shards:
    """The shards of a sharded model as one file: keys() in the index's order, get_tensor(name) from the shard
    holding it, dtype(name), and metadata() (the entries every shard records alike)."""

    def __init__(self, files, where):
        self._files, self._where = files, where  # shard path -> TensorFile; tensor name -> shard path
        metas = [f.metadata() or {} for f in files.values()]
        self._metadata = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas)}

    def keys(self):
        return list(self._where)

    def metadata(self):
        return self._metadata

    def dtype(self, name):
        return self._files[self._where[name]].dtype(name)

    def get_tensor(self, name):
        return self._files[self._where[name]].get_tensor(name)


@contextlib.contextmanager
def open_weights(path):
    """with open_weights(path) as f: a model.safetensors (a TensorFile), or the shards an index names (_Shards).

    The index and its shards must agree exactly, or ValueError naming the tensor: a tensor held by two
    shards, a tensor the index names in a shard that does not hold it, a tensor a shard holds that the index
    does not name (transformers would load it anyway, from every file the index names).
    """
    if os.path.basename(path) != SHARDED_INDEX:
        with open_numpy(path) as f:
            yield f
        return
    where = _shard_map(path)
    with contextlib.ExitStack() as stack:
        files = {}
        for p in dict.fromkeys(where.values()):
            try:
                files[p] = stack.enter_context(open_numpy(p))
            except Exception as e:  # safetensors' own error: a truncated shard, a bad header
                raise ValueError(f"{p}: expected a readable safetensors shard, got one that is truncated or "
                                 f"corrupt ({' '.join(str(e).split()) or type(e).__name__})") from e
        holders = {}
        for p, f in files.items():
            for name in f.keys():
                holders.setdefault(name, []).append(p)
        for name, held in holders.items():
            if len(held) > 1:
                raise ValueError(f"{path}: {name}: expected in one shard, got it in "
                                 + " and ".join(sorted(os.path.basename(h) for h in held)))
            if name not in where:
                raise ValueError(f"{path}: {name}: held by {os.path.basename(held[0])}, but the index does not "
                                 "name it")
        for name, p in where.items():
            if holders.get(name) != [p]:
                got = (f"{os.path.basename(holders[name][0])} holds it instead" if name in holders
                       else "no shard the index names holds it")
                raise ValueError(f"{path}: {name}: the index names it in {os.path.basename(p)}, which does not "
                                 f"hold it ({got})")
        yield _Shards(files, where)


_BLOCK = re.compile(r"^(?:transformer\.)?h\.(\d{1,9})\.")


def check_readable(path):
    """ValueError naming path when it cannot be opened for reading (safetensors would say "No such file")."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{path}: expected a readable file, got one that cannot be read "
                         f"({e.strerror or type(e).__name__})") from e


def stored_dtype(folder):
    """The dtype a GPT-2 folder's wte is stored in (safetensors' name: 'F32', 'F64', 'BF16', ...), or None."""
    _safetensors()
    try:
        with open_weights(_weights_path(folder)) as f:
            for name in f.keys():
                if _strip(name) == "wte.weight":
                    return f.dtype(name)
    except Exception:
        return None
    return None


def _strip(name):
    """A GPT-2 tensor name without the `transformer.` prefix that GPT2LMHeadModel adds."""
    return name[len("transformer."):] if name.startswith("transformer.") else name


def hf_to_minilora_names(config):
    """GPT-2 name (no prefix) -> the minilora names its tensor becomes (c_attn's weight and bias give three)."""
    out = {"wte.weight": ["wte"], "wpe.weight": ["wpe"], "ln_f.weight": ["ln_f.g"], "ln_f.bias": ["ln_f.b"]}
    for i in range(config.n_layers):
        h, p = f"h.{i}.", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[h + ln + ".weight"], out[h + ln + ".bias"] = [p + ln + ".g"], [p + ln + ".b"]
        out[h + "attn.c_attn.weight"] = [p + f"attn.{n}.W" for n in "qkv"]
        out[h + "attn.c_attn.bias"] = [p + "attn.q.b", None, p + "attn.v.b"]  # None: the key bias, dropped
        for hf_name, ours in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[h + hf_name + ".weight"], out[h + hf_name + ".bias"] = [p + ours + ".W"], [p + ours + ".b"]
    return out


def _is_buffer(name, config):
    return any(name == f"h.{i}.{b}" for i in range(config.n_layers) for b in BUFFERS)


def read_gpt2(folder, dtype=np.float32):
    """Read a GPT-2 model folder into minilora's layout.

    Inputs:
    - folder: a folder holding config.json (model_type gpt2) and model.safetensors,
      or the shards model.safetensors.index.json names (keys with or without the
      `transformer.` prefix; an optional lm_head.weight must equal wte, the tied head)
    - dtype: the dtype of the returned arrays (float32 to train, float64 to check)

    Returns (params, config, fingerprint): numpy arrays with minilora's names and
    layout, the ModelConfig, and the fingerprint an export recorded in the file's
    metadata (None if it has none). Raises ValueError, naming the file, for a
    pickle, an index and shards that disagree (open_weights), another model type,
    a setting minilora does not compute, a truncated or corrupt file, missing,
    unexpected or misshapen tensors, non-finite values.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: expected a Hugging Face model folder (config.json, model.safetensors), "
                         "got no such folder")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: expected a {CONFIG_FILE}, got none")
    config = model_config_from_gpt2(_read_json(config_path), where=config_path)
    path = _weights_path(folder)
    _safetensors()
    C = config.d_model
    params = {}
    try:
        with open_weights(path) as f:  # bf16 tensors widened to float32, exactly (tensor_file.py)
            metadata = f.metadata() or {}
            names = list(f.keys())
            # the sizes config.json claims, against the file, before any table of names is built from them
            blocks = {int(m.group(1)) for m in map(_BLOCK.match, names) if m}
            if config.n_layers != len(blocks):
                raise ValueError(f"{config_path}: n_layer: expected the {len(blocks)} blocks {path} holds, got "
                                 f"{config.n_layers}")
            mapping = hf_to_minilora_names(config)
            shapes = param_shapes(config)
            seen = {}
            for name in names:
                key = _strip(name)
                if key in seen:
                    raise ValueError(f"{path}: holds {seen[key]!r} and {name!r}, the same tensor twice")
                seen[key] = name
            unexpected = sorted(k for k in seen if k not in mapping and k != "lm_head.weight"
                                and not _is_buffer(k, config))
            missing = sorted(k for k in mapping if k not in seen)
            if missing or unexpected:
                raise ValueError(f"{path}: tensors do not match GPT-2 with {config_path}; "
                                 f"missing: {missing[:4]}; unexpected: {unexpected[:4]}")
            for key, ours in mapping.items():
                tensor = f.get_tensor(seen[key])  # one tensor in memory at a time
                _check_finite(path, key, tensor)
                stored = tuple(tensor.shape)
                if key.endswith(TRANSPOSED):
                    tensor = tensor.T  # Conv1D (in, out) -> (out, in)
                if len(ours) == 3:  # c_attn: rows (or entries) [0:C] q, [C:2C] k, [2C:3C] v
                    expected = (3 * C, C) if tensor.ndim == 2 else (3 * C,)
                    pieces = [tensor[j * C:(j + 1) * C] for j in range(3)]
                else:
                    expected, pieces = shapes[ours[0]], [tensor]
                if tuple(tensor.shape) != tuple(expected):
                    raise ValueError(f"{path}: {seen[key]}: expected shape {_hf_shape(key, expected)} "
                                     f"from {config_path}, got {stored}")
                for mine, piece in zip(ours, pieces):
                    if mine is not None:
                        params[mine] = np.ascontiguousarray(piece, dtype=dtype)
            if "lm_head.weight" in seen:
                head = f.get_tensor(seen["lm_head.weight"])
                if head.shape != params["wte"].shape or not np.array_equal(head.astype(dtype), params["wte"]):
                    raise ValueError(f"{path}: lm_head.weight differs from wte; minilora's head is tied to wte")
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors: a truncated file, a bad header, an unknown dtype
        raise ValueError(f"{path}: expected a readable safetensors file, got one that is truncated, corrupt or "
                         f"of a dtype NumPy lacks ({' '.join(str(e).split()) or type(e).__name__})") from e
    return params, config, metadata.get(FINGERPRINT_KEY)


def _hf_shape(key, shape):
    return tuple(reversed(shape)) if key.endswith(TRANSPOSED) else tuple(shape)


def _check_finite(path, name, tensor):
    if tensor.dtype.kind != "f":
        raise ValueError(f"{path}: {name}: expected floating-point weights, got dtype {tensor.dtype}")
    if not np.isfinite(tensor).all():
        raise ValueError(f"{path}: {name}: expected finite weights, got NaN or inf")


def weights_fingerprint(params):
    """lora.base_fingerprint of the float32 values: the same base read in float32 or float64 has one fingerprint."""
    return base_fingerprint({n: to_numpy(p).astype(np.float32) for n, p in params.items()})


def read_fingerprint(folder):
    """The base fingerprint of the GPT-2 folder's weights: the one an export recorded, else computed from them."""
    path = _weights_path(folder)
    _safetensors()
    try:
        with open_weights(path) as f:
            recorded = (f.metadata() or {}).get(FINGERPRINT_KEY)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: expected a readable safetensors file, got one that is truncated, corrupt or "
                         f"of a dtype NumPy lacks ({' '.join(str(e).split()) or type(e).__name__})") from e
    if recorded is not None:
        return recorded
    return weights_fingerprint(read_gpt2(folder)[0])


def to_gpt2_tensors(params, config):
    """minilora parameters -> GPT-2 tensors (numpy, `transformer.` names), the inverse of read_gpt2's mapping.

    params must be a plain model (no adapters, prompt or head). The key bias is
    written as zeros (it would change no output). lm_head is tied to wte and is
    not written, as transformers' save_pretrained does.
    """
    extra = sorted(n for n in params if n not in param_shapes(config))
    if extra:
        raise ValueError(f"params: expected the base model's parameters only, got also {extra[:4]}")
    out = {}
    for key, ours in hf_to_minilora_names(config).items():
        arrays = [to_numpy(params[n]) if n is not None else None for n in ours]
        if len(arrays) == 3:
            like = arrays[0]
            arrays = [a if a is not None else np.zeros_like(like) for a in arrays]
            tensor = np.concatenate(arrays)  # (3C, C) or (3C,)
        else:
            tensor = arrays[0]
        if key.endswith(TRANSPOSED):
            tensor = tensor.T  # (out, in) -> Conv1D's (in, out)
        out["transformer." + key] = np.ascontiguousarray(tensor)
    return out


def write_folder_atomically(out, write, overwrite=False, option="--out", inputs=(), writes=()):
    """Write a new folder: `write(tmp)` fills a temporary folder beside out, which is then renamed to out.

    out must not exist (or, with overwrite, it is replaced only after write succeeded),
    so a failure leaves nothing behind and never a half-written folder. What
    overwrite may replace is outputs.check_folder_output's: never a file, a run,
    a folder holding one of inputs, or one holding more than the names in writes.
    """
    from .outputs import check_folder_output

    check_folder_output(out, inputs, overwrite, writes, option)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out)) + ".")
    except OSError as e:
        from .outputs import os_error_reason

        raise ValueError(f"{option}: cannot write {str(out)!r}: {os_error_reason(e, out)}") from e
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the earlier folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk, a quota, a folder gone: safetensors raises its own error for a failed write
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            from .outputs import os_error_reason

            reason = os_error_reason(e, out) if isinstance(e, OSError) else " ".join(str(e).split())
            raise ValueError(f"{option}: could not write {str(out)!r} ({reason or type(e).__name__}); nothing "
                             f"was written" + (" and the folder there is as it was" if os.path.exists(out)
                                               else "")) from e
        raise


def write_gpt2(folder, params, config, eos_token_id=0):
    """Write config.json and model.safetensors into folder (an existing, empty folder: see write_folder_atomically).

    The safetensors metadata records the base fingerprint, so a PEFT adapter
    exported beside it can be checked against a base on the way back in.
    Returns the fingerprint.
    """
    safetensors = _safetensors()
    fingerprint = weights_fingerprint(params)
    tensors = to_gpt2_tensors(params, config)
    hf = gpt2_config(config, eos_token_id)
    hf["dtype"] = str(tensors["transformer.wte.weight"].dtype)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(folder, WEIGHTS_FILE),
                                metadata={"format": "pt", FINGERPRINT_KEY: fingerprint})
    return fingerprint

