"""A PEFT LoRA adapter_config.json read as PEFT reads it: its fields' types, and which modules it adapts.

PEFT (peft/tuners/tuners_utils.py, check_target_module_exists) walks the base
model's modules by name (GPT2LMHeadModel's: `transformer.h.0.attn.c_attn`, ...)
and adapts each one that target_modules matches:

- a list matches a module whose name is one of its entries or ends with
  "." + an entry ("c_proj" is both attn.c_proj and mlp.c_proj of every block);
- a string is a regular expression the whole name must match (re.fullmatch),
  except "all-linear": every Linear and Conv1D but the output head;
- null is PEFT's default for GPT-2, ["c_attn"];
- exclude_modules (the same two forms) removes modules again.

A match on a module LoRA does not support (a LayerNorm, a block) makes PEFT
raise; no match at all makes it raise; a match on wte, wpe or lm_head adapts
an embedding or the head, which minilora does not. Each is refused here, so an
adapter minilora accepts is one PEFT loads, adapting exactly the same modules.
An init_lora_weights that makes PEFT rewrite the base weights on loading (PiSSA, OLoRA, ...) is refused too.
rank_pattern and alpha_pattern are looked up as PEFT's get_pattern_key does:
the first key with re.match(rf"(.*\\.)?({key})$", name).
"""

import math
import re

from .bounds import DROPOUT

# the modules of a GPT-2 block LoRA adapts in minilora (PEFT's Conv1D layers); in_features, out_features below
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# PEFT's default target_modules for GPT-2 (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
GPT2_DEFAULT_TARGETS = ["c_attn"]
# and IA3's (..._TO_IA3_TARGET_MODULES_MAPPING, ..._TO_IA3_FEEDFORWARD_MODULES_MAPPING): c_attn's output scaled,
# mlp.c_proj's input
GPT2_IA3_TARGETS, GPT2_IA3_FEEDFORWARD = ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]
ALL_LINEAR = "all-linear"
# init_lora_weights that PEFT applies to A and B only; PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA also rewrite the base W
# when PEFT loads the adapter, so the adapter's function is not W + B A on the base as it is
KEEPS_BASE_INITS = ("gaussian", "orthogonal")
# a block's other modules (containers, LayerNorms, dropouts, the activation): LoRA does not adapt them
_BLOCK_OTHERS = ("", "ln_1", "attn", "attn.attn_dropout", "attn.resid_dropout", "ln_2", "mlp", "mlp.act",
                 "mlp.dropout")
_MODEL_OTHERS = ("", "transformer", "transformer.drop", "transformer.h", "transformer.ln_f")
_EMBEDDINGS = ("transformer.wte", "transformer.wpe", "lm_head")  # PEFT adapts these; minilora does not


def gpt2_module_names(n_layers):
    """Every module name of GPT2LMHeadModel (named_modules), block modules in block order."""
    names = list(_MODEL_OTHERS) + list(_EMBEDDINGS)
    for i in range(n_layers):
        names += [f"transformer.h.{i}" + (f".{m}" if m else "") for m in _BLOCK_OTHERS + ADAPTED]
    return names


def _kind(value):
    return type(value).__name__ if value is not None else "null"


def _got(value):
    """'str '8'', 'null': a value's JSON kind and, where it says more, the value."""
    return "null" if value is None else f"{_kind(value)} {_short(value)}"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _str_or_list(where, name, value):
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {name}: expected null, a regular expression (a string) or a list of module "
                         f"names, got {_got(value)}")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _regex(where, name, pattern):
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where}: {name}: expected a valid regular expression, got {_short(pattern)} ({e})") \
            from None


def check_fields(ac, where):
    """ValueError, naming the field, for every adapter_config.json field of a type PEFT's LoraConfig would not take.

    Returns the config with PEFT's defaults filled in for r (8), lora_alpha (8), use_rslora (false),
    use_dora (false), lora_dropout (0), target_modules (null) and the patterns ({}).
    """
    ac = {"r": 8, "lora_alpha": 8, "use_rslora": False, "lora_dropout": 0.0, "target_modules": None,
          "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}, **ac}
    if not _is_int(ac["r"]) or ac["r"] < 1:
        raise ValueError(f"{where}: r: expected a positive integer, got {_got(ac['r'])}")
    if not _is_number(ac["lora_alpha"]):
        raise ValueError(f"{where}: lora_alpha: expected a finite number, got {_got(ac['lora_alpha'])}")
    if ac.get("use_dora") is None:
        ac["use_dora"] = False  # PEFT's default
    for name in ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora"):
        if name in ac and not isinstance(ac[name], bool):
            raise ValueError(f"{where}: {name}: expected true or false, got {_got(ac[name])}")
    d = ac["lora_dropout"]
    problem = DROPOUT.problem(d) if _is_number(d) else f"expected {DROPOUT.describe()}, got {_got(d)}"
    if problem:
        raise ValueError(f"{where}: lora_dropout: {problem}")
    for name in ("base_model_name_or_path", "task_type", "peft_type"):
        if ac.get(name) is not None and not isinstance(ac[name], str):
            raise ValueError(f"{where}: {name}: expected a string or null, got {_got(ac[name])}")
    init = ac.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in KEEPS_BASE_INITS):
        raise ValueError(f"{where}: init_lora_weights: expected true, false or one of {KEEPS_BASE_INITS} (an init "
                         f"that leaves the base weights as they are), got {_got(init)}: PEFT changes the base "
                         "weights when it loads such an adapter (PiSSA, OLoRA, ... subtract their B A from W), "
                         "minilora adds B A to the base as given")
    for name in ("target_modules", "exclude_modules"):
        _str_or_list(where, name, ac[name])
        if isinstance(ac[name], str) and not (name == "target_modules" and ac[name].lower() == ALL_LINEAR):
            _regex(where, name, ac[name])
    for name, ok, expected in (("rank_pattern", _is_int, "a positive integer"),
                               ("alpha_pattern", _is_number, "a finite number")):
        patterns = ac[name] if ac[name] is not None else {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {name}: expected an object of module patterns, got {_got(patterns)}")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")  # as PEFT's get_pattern_key matches it
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"{where}: {name}: key {key!r}: expected a valid regular expression ({e})") from None
            if not ok(value) or (name == "rank_pattern" and value < 1):
                raise ValueError(f"{where}: {name}[{key!r}]: expected {expected}, got {_got(value)}")
        ac[name] = patterns
    return ac


def _matches(spec, name):
    """PEFT's check: a string is a full regex match, a list an exact name or a '.'-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + key) for key in spec)


def targeted_modules(ac, n_layers, where):
    """The (block, module) pairs PEFT adapts on a GPT-2 of n_layers blocks; ValueError where PEFT would raise or
    adapt a module minilora does not (an embedding, the head), naming the module.

    ac: check_fields' result.
    """
    spec = ac["target_modules"]
    if spec is None:
        spec = GPT2_DEFAULT_TARGETS
    elif isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = list(ADAPTED)  # every Conv1D of the blocks; lm_head, the output head, is left out by PEFT
    exclude = ac["exclude_modules"]
    found = []
    for name in gpt2_module_names(n_layers):
        if not _matches(spec, name) or (exclude and _matches(exclude, name)):
            continue
        block, _, module = name.removeprefix("transformer.h.").partition(".")
        if name.startswith("transformer.h.") and module in ADAPTED:
            found.append((int(block), module))
        elif name in _EMBEDDINGS:
            raise ValueError(f"{where}: target_modules: {_short(ac['target_modules'])} adapts {name}, which PEFT "
                             "adapts and minilora does not (it adapts the blocks' c_attn, c_proj, c_fc)")
        else:
            raise ValueError(f"{where}: target_modules: {_short(ac['target_modules'])} matches {name or 'the model'}"
                             ", a module LoRA does not adapt (PEFT raises: not supported)")
    if not found:
        raise ValueError(f"{where}: target_modules: {_short(ac['target_modules'])} matches no module of GPT-2 "
                         f"(PEFT raises: not found in the base model)")
    return found


def describe_targets(ac):
    """'target_modules ['c_attn']' (and ', exclude_modules [...]' where set): what a refusal quotes of check_fields'
    or check_ia3_fields' result."""
    words = f"target_modules {_short(ac['target_modules'])}"
    return words + (f" (exclude_modules {_short(ac['exclude_modules'])})" if ac.get("exclude_modules") else "")


def pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_ia3_fields(ac, where):
    """ValueError, naming the field, for an IA3 adapter_config.json field of a type PEFT's IA3Config would not take,
    or where PEFT raises (feedforward_modules not a subset of target_modules). Returns the config with PEFT's GPT-2
    defaults for null target_modules and feedforward_modules, and exclude_modules null."""
    ac = {"target_modules": None, "feedforward_modules": None, "exclude_modules": None, **ac}
    for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
        if name in ac and not isinstance(ac[name], bool):
            raise ValueError(f"{where}: {name}: expected true or false, got {_got(ac[name])}")
    for name in ("base_model_name_or_path", "task_type"):
        if ac.get(name) is not None and not isinstance(ac[name], str):
            raise ValueError(f"{where}: {name}: expected a string or null, got {_got(ac[name])}")
    if ac.get("modules_to_save") not in (None, []):
        raise ValueError(f"{where}: modules_to_save: expected null (minilora does not compute modules_to_save), got "
                         f"{_got(ac['modules_to_save'])}")
    for name in ("target_modules", "feedforward_modules", "exclude_modules"):
        _str_or_list(where, name, ac[name])
        if isinstance(ac[name], str):
            _regex(where, name, ac[name])
    if ac["target_modules"] is None:
        ac["target_modules"] = GPT2_IA3_TARGETS
    if ac["feedforward_modules"] is None:
        ac["feedforward_modules"] = GPT2_IA3_FEEDFORWARD
    target, ff = ac["target_modules"], ac["feedforward_modules"]
    if isinstance(target, list) and isinstance(ff, list) and not set(ff) <= set(target):
        raise ValueError(f"{where}: feedforward_modules: expected a subset of target_modules {_short(target)}, got "
                         f"{_short(ff)} (PEFT raises)")
    return ac


def is_feedforward(spec, name):
    """PEFT's IA3 check (_check_target_module_feedforward): a string is a full regex match, a list a plain suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(key) for key in spec)
