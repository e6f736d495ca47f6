"""Benchmark: one full and one LoRA step at GPT-2 small's shapes, minilora (NumPy) beside PyTorch eager on the CPU.

    python benchmarks/gpt2_small.py [--threads 2] [--repeats 3] [--batch 4] [--tokens 256]
                                    [--strategies full,lora] [--no-torch] [--out benchmarks/gpt2_small.json]
    python benchmarks/gpt2_small.py --size default --batch 2 --tokens 16 --repeats 1 --out /tmp/g.json  # a check

Run by hand on a quiet machine, not by the tests. The model is model.SIZES["gpt2-small"]
(vocab 50257, 1024 positions, 12 layers x 768, 124M parameters) with random weights;
a batch is `--batch` rows of `--tokens` tokens (default 4 x 256: the whole step fits in
a few GiB, far below 24 GiB). One step = loss + backward + clipping + AdamW, as
benchmarks/speed.py times it (LoRA: r = 8 on q, k, v, o), and the PyTorch model is
speed.py's (the same maths in eager mode); the two are interleaved step by step on
the same BLAS threads, so both see the same load. The median of `--repeats` steps
after one warm-up step is reported.

Memory per strategy, in bytes, as benchmarks/memory.py counts it: weights, the
gradients the backward returns, AdamW's moments, the activations the forward keeps
(distinct buffers of its cache), the seed's formula (weights + trainable x 4 bytes
x (1 gradient + 2 moments) + activations) beside the measured peak: the weights and
moments held, plus the most NumPy allocated during one step (tracemalloc).

The attention probabilities are the one cached activation that grows as T^2:
(B, NH, T, T) per layer. The script measures them in the real cache and states,
by arithmetic from the measured per-token rest, what share of the activations
they would be at T = 1024, batch 8 (`attention_share`), which says whether a
FlashAttention-style recompute (keep per row only what the backward needs) would
be worth its code.
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tracemalloc

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as minilora/__init__.py does, before NumPy loads OpenBLAS

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory import _root, cache_buffers, cache_bytes, forward_cache  # noqa: E402
from speed import build, loss_and_grads, time_interleaved, torch_stepper, update  # noqa: E402

from minilora import optim  # noqa: E402
from minilora.model import SIZES, param_shapes  # noqa: E402


def make_batch(config, batch, tokens, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (batch, tokens))
    return {"x": x, "y": rng.integers(0, config.vocab_size, x.shape), "mask": np.ones(x.shape, np.float32)}


def probability_bytes(cache, batch, n_heads, tokens):
    """Bytes of the (B, NH, T, T) attention probabilities in a forward cache (distinct buffers)."""
    return sum(a.nbytes for a in cache_buffers(cache) if a.shape == (batch, n_heads, tokens, tokens))


def memory_report(config, strategy, batch):
    """Bytes of weights, gradients, moments, activations, the seed's formula, and tracemalloc's step peak."""
    params, trainable, config = build(config, strategy)
    state = optim.adamw_init(params, trainable)
    B, T = batch["x"].shape
    cache = forward_cache(params, config, batch, trainable)
    activations = cache_bytes(cache, {id(_root(p)) for p in params.values()})
    probs = probability_bytes(cache, B, config.n_heads, T)
    del cache
    weights = sum(p.nbytes for p in params.values())
    _, grads = loss_and_grads(params, config, batch, trainable)
    gradients = sum(g.nbytes for g in grads.values())
    update(params, grads, state)
    del grads
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _, grads = loss_and_grads(params, config, batch, trainable)
    update(params, grads, state)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    del grads
    n_train = int(sum(params[n].size for n in trainable))
    itemsize = params["wte"].itemsize
    rest_per_token = (activations - probs) / (B * T)
    # the same cache at T = 1024, batch 8: probabilities grow as B T^2, the rest as B T
    probs_1024 = config.n_layers * 8 * config.n_heads * 1024 * 1024 * itemsize
    rest_1024 = rest_per_token * 8 * 1024
    return {"trainable_params": n_train, "weights": weights, "gradients": gradients,
            "optimizer": optim.optimizer_state_bytes(state), "activations": activations,
            "attention_probabilities": probs,
            "formula_total": weights + n_train * itemsize * 3 + activations,
            "peak_step_tracemalloc": peak,  # allocated during the step, above the weights and moments held
            "peak_total": weights + optim.optimizer_state_bytes(state) + peak,
            "at_T1024_batch8": {"attention_probabilities": probs_1024, "other_activations": int(rest_1024),
                                "attention_share": probs_1024 / (probs_1024 + rest_1024)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt2-small", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="T, tokens per row (at most the context, 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default="full,lora")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="benchmarks/gpt2_small.json")
    args = ap.parse_args(argv)
    config = SIZES[args.size]
    if not 1 <= args.tokens <= config.context_length:
        ap.error(f"--tokens: expected 1..{config.context_length}, got {args.tokens}")
    batch = make_batch(config, args.batch, args.tokens)
    torch_version = None
    if not args.no_torch:
        import torch

        torch_version = torch.__version__
    n_params = sum(math.prod(s) for s in param_shapes(config).values())
    print(f"{args.size}: {n_params:,} parameters, batch {args.batch} x {args.tokens} tokens, "
          f"{args.threads} BLAS threads, torch {torch_version}")
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average "
                         f"{os.getloadavg()[0]:.1f} at the start; NumPy {np.__version__}, torch {torch_version}",
              "size": args.size, "model": config.to_dict(), "params": int(n_params), "batch": args.batch,
              "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats, "dtype": "float32",
              "strategies": {}}
    for strategy in args.strategies.split(","):
        with threadpool_limits(args.threads):
            memory = memory_report(config, strategy, batch)
        params, trainable, cfg = build(config, strategy)
        state = optim.adamw_init(params, trainable)

        def minilora_step(params=params, trainable=trainable, cfg=cfg, state=state):
            loss, grads = loss_and_grads(params, cfg, batch, trainable)
            update(params, grads, state)
            return loss

        steppers = {"minilora": minilora_step}
        if torch_version is not None:
            steppers["torch"] = torch_stepper(config, strategy, args.threads, batch)
        medians, _ = time_interleaved(steppers, args.threads, args.repeats, warmup=1)
        del params, state, steppers
        result["strategies"][strategy] = {"step_s": medians, "memory": memory}
        mib = 2 ** 20
        print(f"{strategy:5s} step: " + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items())
              + f" | memory: formula {memory['formula_total'] / mib:,.0f} MiB, "
              f"measured peak {memory['peak_total'] / mib:,.0f} MiB "
              f"(weights {memory['weights'] / mib:,.0f}, grads {memory['gradients'] / mib:,.0f}, "
              f"AdamW {memory['optimizer'] / mib:,.0f}, activations {memory['activations'] / mib:,.0f}, of which "
              f"attention probabilities {memory['attention_probabilities'] / mib:,.0f}) MiB; at T 1024 batch 8 the "
              f"probabilities would be {100 * memory['at_T1024_batch8']['attention_share']:.0f}% of the activations")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
