"""The memory plan: the peak bytes of one training step, predicted term by term before anything is built.

One step (train.py) is loss_and_grads, then clipping and AdamW. The plan follows it through the moments
its peak can fall on (peak_phases: the end of the forward and the head, the recompute of the top block
under checkpointing, the top and the bottom block's backward, the embedding's backward, the update) and
reports the terms held at the largest:

    weights      every parameter as stored: float32, or for QLoRA's block linears their NF4 codes (one
                 byte per two weights), int8 absmax codes (one per 64 weights) and float32 scales
    gradients    the float32 gradients formed by then (trainable names only; all of them at the update)
    optimizer    AdamW's two moments m, v: two float32 per trainable weight
    activations  the caches the forward keeps for the backward and that are still held then
                 (model.backward drops each block's cache once used)
    transient    the buffers of the op running then beyond what it keeps: a block's backward (the
                 gradients it holds at once), QLoRA's one dequantized W, clipping's g * g
    logits       the LM head's two reused (rows, V) buffers, a chunk's logits and their exponentials
                 (ops.loss_chunk_rows: both within LOSS_CHUNK_BYTES)

What a block keeps (dimension legend: N = B T tokens, C channels, F = d_ff, NH heads, r LoRA's rank):

    both LayerNorms            norm (N, C) and rstd (N,)
    attention                  q, k, v (split into heads, views), P (B, NH, T, T), its output (N, C)
                               (prefix tuning: q, the keys and values with the prefix before them,
                               (B, T + P, C) each, P (B, NH, T, T + P), the output)
    a linear's input x         only if its W trains (full) or an adapter reads it (LoRA's dA needs x);
                               a frozen linear keeps none (model.forward's `trainable`)
    LoRA                       x A^T (N, r) per adapter; q, k, v read one input: one (N, 3r) and A's (3r, C)
    DoRA                       also the base output (N, out) and W A^T (out, r), A A^T (r, r), ||.|| (out,)
    IA3                        k and v (and q, queries=True) before their scaling (N, C) each, proj's input (N, F)
    GELU                       its input (N, F) (tanh is computed again, block by block, in the backward)
    dropout (when > 0)         a boolean mask (N, C) per residual branch

With activation checkpointing (model.loss_and_grads(checkpoint_activations=True)) the forward keeps
only each block's input (N, C), and the backward recomputes one block at a time: the activations term
is then L (N, C) plus one block's keeps.

The counts are read off the ops' caches; tests/test_memplan.py walks the real caches (benchmarks/memory.py's
cache_bytes) and measures steps with tracemalloc to hold the plan to them.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import methods, model, ops, optim, threads
from .model import ModelConfig

# GPT-2's four shapes (Radford et al. 2019, table 2): n_layer / n_embd / n_head, vocabulary 50257, 1024 positions.
_SMALL = model.SIZES["gpt2-small"]
SIZES = {
    "gpt2-small": _SMALL,
    "gpt2-medium": replace(_SMALL, n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "gpt2-large": replace(_SMALL, n_layers=36, d_model=1280, n_heads=20, d_ff=5120),
    "gpt2-xl": replace(_SMALL, n_layers=48, d_model=1600, n_heads=25, d_ff=6400),
}

TERMS = ("weights", "gradients", "optimizer", "activations", "transient", "logits")
DEQUANT_BYTES_PER_WEIGHT = 5  # nf4.dequantize_nf4: the uint8 codes unpacked (1), the levels looked up (4)


@dataclass(frozen=True)
class Plan:
    """The predicted peak of one training step: terms name -> bytes (TERMS order) and what it was made for."""

    terms: dict
    method: str
    batch: int
    context: int
    checkpoint_activations: bool
    config: ModelConfig = field(repr=False)
    trainable_params: int = 0
    total_params: int = 0
    phase: str = ""  # when the peak falls (peak_phases' names)
    phases: dict = field(default_factory=dict, repr=False)  # phase -> total bytes then
    forward_cache: int = 0  # bytes of the cache model.forward returns (forward_cache_floats)

    @property
    def total(self):
        return int(sum(self.terms.values()))

    def largest(self):
        """The name of the largest term."""
        return max(self.terms, key=self.terms.get)


def _shapes_and_trainable(config, method, settings):
    """(config with the method's settings, name -> (shape, bytes per element), trainable names)."""
    m = methods.method(method)
    cfg = config
    if m.adapter_config is not None:
        cfg = replace(cfg, lora=m.adapter_config(settings))
    if m.model_settings is not None:
        cfg = replace(cfg, **m.model_settings(settings))
    stand_in = {}
    if method == "prompt":  # expected_shapes reads a prompt's (P, C) from params
        stand_in["prompt"] = np.empty((settings.n_prompt, config.d_model), np.float32)
    shapes = methods.expected_shapes(cfg, stand_in)
    sizes = {n: (s, 1 if methods.is_stored_code(n) else 4) for n, s in shapes.items()}
    if method == "full":
        trainable = set(shapes)
    else:
        trainable = {n for n in shapes if not methods.is_base_name(n)}
    return cfg, sizes, trainable


def _linear_kind(cfg, method, name):
    """How the linear `name` (q, k, v, o, fc, proj) of a block computes: trained | adapter | ia3 | frozen."""
    if method == "full":
        return "trained"
    settings = cfg.lora
    if settings is None or name not in settings.targets:
        return "frozen"
    return "ia3" if settings.method == "ia3" else "adapter"


def block_activations(cfg, method, B, T):
    """Floats one block keeps for its backward (the module docstring's table), T positions per row."""
    C, F, NH = cfg.d_model, cfg.d_ff, cfg.n_heads
    N = B * T
    kind = {n: _linear_kind(cfg, method, n) for n in ("q", "k", "v", "o", "fc", "proj")}
    keeps_input = {n: k in ("trained", "adapter") for n, k in kind.items()}
    out = {"q": C, "k": C, "v": C, "o": C, "fc": F, "proj": C}
    n = 2 * (N * C + N)  # ln_1, ln_2: norm, rstd
    if cfg.n_prefix:
        P = cfg.n_prefix
        n += 2 * N * C + 2 * B * (T + P) * C + B * NH * T * (T + P)
    else:
        n += 4 * N * C + B * NH * T * T  # q, k, v, the output, P
    if any(keeps_input[x] for x in "qkv"):
        n += N * C  # ln_1's output, the input of q, k, v
    if keeps_input["fc"]:
        n += N * C  # ln_2's output
    n += N * F  # GELU's input (its tanh is computed again in the backward)
    if cfg.dropout > 0.0:
        n += 2 * N * C / 4  # the two residual dropouts' boolean masks (one byte a number)
    if keeps_input["proj"] or kind["proj"] == "ia3":
        n += N * F  # GELU's output, proj's input
    r = getattr(cfg.lora, "rank", 0)
    adapted = [x for x in out if kind[x] == "adapter"]
    shared = all(kind[x] == "adapter" for x in "qkv") and getattr(cfg.lora, "dropout", 0.0) == 0.0
    for x in adapted:
        n += N * r  # x A^T
    if shared:
        n += 3 * r * C  # [A_q; A_k; A_v]
    if method == "dora":
        for x in adapted:
            n += N * out[x] + out[x] * r + out[x] + r * r
    for x in ("q", "k", "v"):  # q is IA3's only with Ia3Config(queries=True)
        if kind[x] == "ia3":
            n += N * C  # before the scaling
    return n


def block_forward_extra(cfg, method, B, T):
    """Floats alive at the end of a block's forward (its last product, proj's) beyond its cache: the locals
    of model.block_forward that the cache does not hold (o, the new residual x, r; and a, m, g, or prefix
    tuning's k and v, where no cache keeps them), alive until the call returns."""
    C, F = cfg.d_model, cfg.d_ff
    N = B * T
    kind = {n: _linear_kind(cfg, method, n) for n in ("q", "k", "v", "fc", "proj")}
    keeps = {n: k in ("trained", "adapter") for n, k in kind.items()}
    n = 3 * N * C
    if not any(keeps[x] for x in "qkv"):
        n += N * C
    if cfg.n_prefix:
        n += 2 * N * C
    if not keeps["fc"]:
        n += N * C
    if not (keeps["proj"] or kind["proj"] == "ia3"):
        n += N * F
    if kind["proj"] == "ia3":
        n += N * F  # IA3's scaled input l * g, alive while proj's product runs
    return n


def block_transient(cfg, method, B, T, cpu_threads=1):
    """Floats of the gradients alive in a block's backward beyond what the caches keep.

    model.block_backward drops each gradient once the next is made from it, so at most these are alive:
    the MLP's dg and df (N, F) in GELU's backward (and two reused blocks of ops._BLOCK numbers per CPU thread); in the attention's backward dx, dy, dq, dk, dv (N, C)
    and one sequence's dS (NH, T, T + P) per CPU thread (ops.attention_backward gives each thread its part of
    the sequences; prefix tuning's attention runs them in turn) and D (B, NH, T); in q, k, v's backward dx, dq,
    dk, dv, da and one product's dx (N, C).
    """
    C, F, NH = cfg.d_model, cfg.d_ff, cfg.n_heads
    N = B * T
    Tk = T + cfg.n_prefix
    parts = 1 if cfg.n_prefix else min(B, cpu_threads)  # sequences' dS alive at once
    # GELU's backward: per CPU thread's part, one block of t and one of scratch, reused
    gelu_blocks = 2 * sum(min(e - s, ops._BLOCK) for s, e in threads.split_range(N * F, cpu_threads,
                                                                                  ops._BLOCK))
    return max(2 * N * F + gelu_blocks, 6 * N * C, 5 * N * C + parts * NH * T * Tk + B * NH * T)


def plan(config, method, batch, context, checkpoint_activations=False, dtype_bytes=4, settings=None,
         base_kept=False, classification=False, cpu_threads=None):
    """The predicted peak bytes of one training step (language modelling).

    Inputs:
    - config: the base ModelConfig (no adapters: the method's are added from settings)
    - method: a name of methods.METHODS
    - batch, context: B sequences of T tokens
    - checkpoint_activations: keep only each block's input; recompute the block in the backward
    - dtype_bytes: bytes of a float (4: float32)
    - settings: a FinetuneConfig for the method's settings (rank, targets, n_prompt, n_prefix);
      None: finetune.method_defaults(method), FinetuneConfig's defaults
    - base_kept: the float32 base weights stay held beside the method's own (finetune keeps them for the
      score before training and the fingerprint): adds a term "base" for the base arrays the method does
      not share (every one under full fine-tuning, which trains copies; QLoRA's quantized Ws)
    - classification: a head on the last token, (B, K) logits, instead of the LM head (no logits term)
    - cpu_threads: the threads the CPU's elementwise loops split over (threads.py), each part with its own
      scratch; None: the BLAS pool's count now (threads.cpu_threads()). On a GPU the loops do not split: 1

    Returns a Plan whose terms are what is held at the step's peak (their sum is the peak), and whose
    phases give the total at each candidate moment (see peak_phases).
    """
    from .finetune import method_defaults

    for name, value in (("batch", batch), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if context > config.context_length:
        raise ValueError(f"context: expected at most the model's context_length={config.context_length}, "
                         f"got {context}")
    settings = settings if settings is not None else method_defaults(method)
    cfg, sizes, trainable = _shapes_and_trainable(config, method, settings)
    f = dtype_bytes
    held = {"weights": sum(math.prod(s) * (b if b == 1 else f) for s, b in sizes.values()),
            "optimizer": 2 * f * sum(math.prod(sizes[n][0]) for n in trainable)}
    if base_kept:
        m = methods.method(method)
        base = model.param_shapes(config)
        unshared = base if method == "full" else (m.replaces(cfg) if m.replaces is not None else [])
        held["base"] = sum(math.prod(base[n]) for n in unshared) * f
    cpu_threads = threads.cpu_threads() if cpu_threads is None else cpu_threads
    phases = peak_phases(cfg, method, sizes, trainable, batch, context, checkpoint_activations, f, settings,
                         classification, cpu_threads)
    forward_cache = forward_cache_floats(cfg, method, batch, context, checkpoint_activations, settings) * f
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    at_peak = phases[phase]
    terms = {"weights": held["weights"], "gradients": at_peak["gradients"], "optimizer": held["optimizer"],
             "activations": at_peak["activations"], "transient": at_peak["transient"],
             "logits": at_peak["logits"]}
    if "base" in held:
        terms["base"] = held["base"]
    totals = {k: int(sum(v.values()) + sum(held.values())) for k, v in phases.items()}
    n_train = sum(math.prod(sizes[n][0]) for n in trainable)
    # every weight once: an NF4 record counts as the out * in weights its codes hold (two a byte)
    n_all = sum(2 * math.prod(s) if n.endswith(".nf4.codes") else math.prod(s) for n, (s, _) in sizes.items()
                if ".nf4." not in n or n.endswith(".nf4.codes"))
    return Plan({k: int(v) for k, v in terms.items()}, method, batch, context, bool(checkpoint_activations), cfg,
                int(n_train), int(n_all), phase, totals, int(forward_cache))


def forward_cache_floats(cfg, method, B, T, checkpoint_activations, settings):
    """Floats the cache model.forward returns holds (ids as int64, two floats each): every block's cache,
    or with checkpointing each block's input; ln_f's norm and rstd; the embedding's ids."""
    Tb = T + (settings.n_prompt if method == "prompt" else 0)
    per_block = B * Tb * cfg.d_model if checkpoint_activations else block_activations(cfg, method, B, Tb)
    return cfg.n_layers * per_block + B * Tb * (cfg.d_model + 1) + 2 * B * T


def peak_phases(cfg, method, sizes, trainable, B, T, checkpoint_activations, f, settings, classification=False,
                cpu_threads=1):
    """Bytes held beside the weights and moments at each moment a step's peak can fall on:

    - "head": the end of the forward: every block's cache, the loss's chunk of logits (rows, V) in
      ops.tied_head_cross_entropy_forward, dh (N, C) and, when wte trains, dwte (V, C)
    - "recompute" (checkpointed): block L-1's forward again, at the start of the backward
    - "top block" / "bottom block": the backward of block L-1 (every cache still held, few gradients)
      and of block 0 (its cache only, every block's gradients formed): model.backward frees each
      block's cache once used, so in between the sum moves linearly from one to the other
    - "embedding": wte's share from the embedding (when wte trains), counted as a (V, C) array added into
      the head's: what a GPU's scatter-add makes; on the CPU ops.embedding_backward(into=) adds the seen rows
      in place and needs only the (N, C) sums, so there this phase is an upper bound (it ties with "update",
      whose clipping squares wte, and neither decides a total beyond the other by more than 3 N C floats)
    - "update": every gradient and clipping's square of the largest (AdamW's scratch is a few blocks)

    Returns {phase: {"gradients", "activations", "transient", "logits": bytes}}.
    """
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    Tb = T + (settings.n_prompt if method == "prompt" else 0)  # positions the blocks see
    N, Nb = B * T, B * Tb
    block = block_activations(cfg, method, B, Tb)
    kept = (lambda i: i * Nb * C + block) if checkpoint_activations else (lambda i: (i + 1) * block)
    fixed = Nb * (C + 1) + 2 * N * 2  # ln_f's norm and rstd; the ids and targets (int64) the caches hold
    grad = {n: math.prod(sizes[n][0]) for n in trainable}
    in_block = [sum(g for n, g in grad.items() if n.startswith(f"h.{i}.")) for i in range(L)]
    head_grads = sum(g for n, g in grad.items() if not n.startswith("h.") and n not in ("wte", "wpe", "prompt"))
    wte = "wte" in trainable
    rows = ops.loss_chunk_rows(V, f, tokens=N)
    chunk = 0 if classification else 2 * min(rows, N) * V  # the chunk's logits and their exponentials
    outer = 2 * Nb * C + (Nb * C if method == "prompt" else 0)  # dh, the incoming dx (and dh with the prompt)
    transient = block_transient(cfg, method, B, Tb, cpu_threads)
    dequant = 0
    if cfg.lora is not None and cfg.lora.base_pair == "nf4":  # one layer's W dequantized (forward and backward)
        dequant = DEQUANT_BYTES_PER_WEIGHT / f * max(
            2 * math.prod(s) for n, (s, _) in sizes.items() if n.endswith(".nf4.codes"))
    transient += dequant
    phases = {}
    phases["head"] = {"gradients": 0, "activations": kept(L - 1) + fixed + Nb * C,
                      "transient": N * C + (V * C if wte else 0),
                      "logits": chunk}
    # the forward, at the end of block L-1: the caches before it (checkpointed: every block's input), its
    # own, and its locals (block_forward_extra)
    extra = block_forward_extra(cfg, method, B, Tb) + dequant
    before = L * Nb * C if checkpoint_activations else (L - 1) * block
    phases["forward"] = {"gradients": 0, "activations": before + block, "transient": extra, "logits": 0}
    if checkpoint_activations:
        phases["head"]["activations"] = L * Nb * C + fixed + Nb * C
        # the backward's recompute of block L-1: every block's input still held (its own is dropped once
        # the recompute returns), the block's cache growing, its locals, and the backward's dh and dx
        phases["recompute"] = {"gradients": (V * C if wte else 0) + head_grads,
                               "activations": L * Nb * C + fixed + block, "transient": extra + outer, "logits": 0}
    for name, i in (("top block", L - 1), ("bottom block", 0)):
        phases[name] = {"gradients": (V * C if wte else 0) + head_grads + sum(in_block[i:]),
                        "activations": kept(i) + fixed, "transient": outer + transient, "logits": 0}
    all_grads = sum(grad.values())
    if wte:
        phases["embedding"] = {"gradients": all_grads, "activations": fixed, "transient": V * C + 3 * Nb * C,
                               "logits": 0}
    # clipping squares one gradient at a time (g * g, of the largest at most); AdamW then updates each in two
    # scratch rows of at most optim.BLOCK per CPU thread's part
    largest = max(grad.values(), default=0)
    scratch = 2 * sum(min(e - s, optim.BLOCK) for s, e in threads.split_range(largest, cpu_threads,
                                                                               optim.BLOCK))
    phases["update"] = {"gradients": all_grads, "activations": 0, "logits": 0, "transient": max(largest, scratch)}
    return {k: {t: int(b * f) for t, b in v.items()} for k, v in phases.items()}
