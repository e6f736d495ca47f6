"""Does a plan fit? The memory a run has, and the one-line refusal that names what would fit.

    available_memory(xp)         bytes free to this process: Linux MemAvailable, or the GPU's free memory
                                 (and the CuPy pool's free blocks) under CuPy; MINILORA_MEMORY_LIMIT overrides
    parse_size("50MB")           bytes of a size written with a unit (B, KB, MB, GB, KiB, MiB, GiB)
    fitting_options(...)         the changes, each checked by the plan, that bring a step under a limit
    refusal_line(plan, limit)    why it does not fit: the total, the largest term, the options that fit
    check_fits(plan, total_of)   raise MemoryPlanError (a ValueError: exit 2 in the CLI) with that line

finetune calls check_fits before it sets up the method (full fine-tuning's copy of the weights, QLoRA's
quantization) or writes anything, so a run that cannot fit ends at once, in one line.
"""

import inspect
import os
import re

from . import model

LIMIT_ENV = "MINILORA_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MemoryPlanError(ValueError):
    """A step's plan does not fit the memory available."""


def checkpointing_available():
    """True when model.loss_and_grads takes checkpoint_activations (activation checkpointing is in the model)."""
    return "checkpoint_activations" in inspect.signature(model.loss_and_grads).parameters


def parse_size(text, name="--memory-limit"):
    """Bytes of '50MB', '1.5GiB', '123' (bytes); ValueError naming `name` otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{name}: expected a positive size such as 50MB, 2GiB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def format_bytes(n):
    """n bytes as MiB under 1 GiB, else GiB, two decimals."""
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def available_memory(xp=None, limit=None, already_held=0):
    """(bytes, where) this process may use: the limit given, else MINILORA_MEMORY_LIMIT, else what the
    machine has free (the GPU's free memory plus the CuPy pool's free blocks under CuPy, Linux's
    MemAvailable on the host) plus already_held, the bytes of arrays the plan counts that are already
    loaded (finetune's base weights). (None, where) when it cannot be read."""
    if limit is not None:
        return parse_size(limit), "set by --memory-limit"
    if os.environ.get(LIMIT_ENV):
        return parse_size(os.environ.get(LIMIT_ENV), LIMIT_ENV), f"set by {LIMIT_ENV}"
    if xp is not None and getattr(xp, "__name__", "") == "cupy":
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(free + xp.get_default_memory_pool().free_bytes() + already_held), "free on the GPU"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + already_held, "available (MemAvailable)"
    except OSError:
        pass
    return None, "unknown"


def fitting_options(total_of, batch, method, checkpoint_activations, limit):
    """The options (CLI flags) that would bring one step under limit bytes, each checked by the plan:
    the largest smaller batch, activation checkpointing, LoRA, QLoRA (each with checkpointing where only
    that makes it fit).

    total_of(batch, method, checkpoint_activations) -> the plan's total bytes for that change.
    """
    def fits(b, m, ckpt):
        return total_of(b, m, ckpt) <= limit

    can_checkpoint = checkpointing_available()
    options = []
    smaller = next((b for b in range(batch - 1, 0, -1) if fits(b, method, checkpoint_activations)), None)
    if smaller is not None:
        options.append(f"--batch-size {smaller}")
    if can_checkpoint and not checkpoint_activations and fits(batch, method, True):
        options.append("--checkpoint-activations")
    for m in ("lora", "qlora"):
        if m == method:
            continue
        if fits(batch, m, checkpoint_activations):
            options.append(f"--method {m}")
        elif can_checkpoint and not checkpoint_activations and fits(batch, m, True):
            options.append(f"--method {m} --checkpoint-activations")
    return options


def refusal_line(plan, limit, where, options=None):
    """One line: the plan's total against the limit, its largest term, and the options that would fit."""
    largest = plan.largest()
    line = (f"one {plan.method} step (batch {plan.batch}, context {plan.context}"
            f"{', checkpointed' if plan.checkpoint_activations else ''}) needs {format_bytes(plan.total)} by the "
            f"memory plan, more than the {format_bytes(limit)} {where}; its largest term is {largest} "
            f"({format_bytes(plan.terms[largest])})")
    if options is not None:
        line += "; would fit: " + (", ".join(options) if options else "none of a smaller batch, "
                                   "--checkpoint-activations, --method lora, --method qlora")
    return line


def check_fits(plan, total_of, xp=None, limit=None, already_held=0):
    """MemoryPlanError (one line, refusal_line) when plan's total exceeds the memory available.

    total_of(batch, method, checkpoint_activations): the plan's total under a change (fitting_options).
    Returns the bytes available (None when unknown: then nothing is refused).
    """
    available, where = available_memory(xp, limit, already_held)
    if available is not None and plan.total > available:
        options = fitting_options(total_of, plan.batch, plan.method, plan.checkpoint_activations, available)
        raise MemoryPlanError(refusal_line(plan, available, where, options))
    return available
