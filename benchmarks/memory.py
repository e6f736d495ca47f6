"""Memory of one training step per strategy (full, LoRA, QLoRA, DoRA, prompt, prefix, IA3) at the default config.

    python benchmarks/memory.py [--out benchmarks/memory.json] [--strategies full,lora,qlora,dora,prompt,prefix,ia3]
                                 [--config default]   (--config tiny: only to check that it runs)
    python benchmarks/memory.py --table    (docs/hardware.md's table, from the committed memory.json)

For each strategy it reports, in bytes:
- weights: every parameter the model holds (adapters, prompt and prefix included); for QLoRA the bytes
  stored: the blocks' linears as NF4 codes and scales, wte, wpe, LayerNorms and biases in float32;
- gradients: the arrays the backward returns (trainable names only);
- optimizer: AdamW's two moments (trainable names only);
- activations: the arrays the forward keeps for the backward, i.e. the sum of
  the distinct buffers in the forward's cache (the blocks, ln_f; the chunked LM
  loss keeps no logits), parameters excluded; views are counted once, at their base buffer;
- formula: the seed's estimate, weights + gradients + optimizer states +
  activations, with gradients and states = trainable parameters x 4 bytes x (1, 2);
- peak: the highest memory NumPy held during one step (loss, backward,
  clipping, AdamW), measured with tracemalloc, above what was held before it.
"""

import argparse
import datetime
import json
import os
import sys
import tracemalloc

import numpy as np

from minilora import model, optim

from speed import BATCH, build, loss_and_grads, make_batch, model_config, update

STRATEGIES = ("full", "lora", "qlora", "dora", "prompt", "prefix", "ia3")


def forward_cache(params, config, batch, trainable):
    """Everything the forward keeps for the backward, as the training step keeps it: model.forward's
    cache, where a frozen linear keeps no input (model.forward's `trainable`). The LM head's loss
    (ops.tied_head_cross_entropy_forward) keeps no logits: it forms its gradients chunk by chunk."""
    _, cache = model.forward(params, config, batch["x"], trainable=trainable)
    return cache


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def cache_buffers(cache):
    """The distinct array buffers in a nested cache (tuples, lists, dicts of arrays, checkpointed blocks):
    each view's base array once, so q, k, v split into heads count as the (B, T, C) arrays they are views of;
    a checkpointed block (model.BlockCheckpoint) holds its input."""
    seen, stack = {}, [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, np.ndarray):
            root = _root(item)
            seen.setdefault(id(root), root)
        elif isinstance(item, model.BlockCheckpoint):
            stack.append(item.x)
    return list(seen.values())


def cache_bytes(cache, exclude):
    """Bytes of the distinct array buffers in a nested cache, leaving out those in `exclude` (ids)."""
    return sum(a.nbytes for a in cache_buffers(cache) if id(a) not in exclude)


def report(strategy, config):
    params, trainable, config = build(config, strategy)
    batch = make_batch(config)
    state = optim.adamw_init(params, trainable)
    weights = sum(p.nbytes for p in params.values())
    activations = cache_bytes(forward_cache(params, config, batch, trainable),
                              {id(_root(p)) for p in params.values()})
    loss, grads = loss_and_grads(params, config, batch, trainable)
    gradients = sum(g.nbytes for g in grads.values())
    update(params, grads, state)
    del grads
    opt_bytes = optim.optimizer_state_bytes(state)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    loss, grads = loss_and_grads(params, config, batch, trainable)
    update(params, grads, state)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    n_train = sum(params[n].size for n in trainable)
    itemsize = params["wte"].itemsize
    formula = weights + n_train * itemsize * (1 + 2) + activations
    return {"trainable_params": int(n_train), "weights": weights, "gradients": gradients,
            "optimizer": opt_bytes, "activations": activations, "formula_total": formula,
            "peak_step_tracemalloc": peak,
            "weights_grads_states_activations": weights + gradients + opt_bytes + activations}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/memory.json")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--config", default="default", choices=["default", "bench", "tiny"])
    args = ap.parse_args()
    config = model_config(args.config)
    rows = {s: report(s, config) for s in args.strategies.split(",")}
    print(f"{'strategy':8s} " + " ".join(f"{k:>14s}" for k in next(iter(rows.values())) if k != "trainable_params"))
    for s, r in rows.items():
        print(f"{s:8s} " + " ".join(f"{v / 2**20:11.2f} MiB" for k, v in r.items() if k != "trainable_params"))
    result = {"date": datetime.date.today().isoformat(), "model": config.to_dict(), "batch": BATCH,
              "dtype": "float32", "units": "bytes", "strategies": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown_table(result))
    print(f"wrote {args.out}")


LABELS = {"full": "full", "lora": "LoRA r=8", "qlora": "QLoRA r=8 (NF4 base)", "dora": "DoRA r=8",
          "prompt": "prompt, 16 vectors", "prefix": "prefix, 16 per layer", "ia3": "IA3"}


def markdown_table(result):
    """The table of docs/hardware.md, in MiB, from a memory.json (tests/test_docs_pages.py checks the page holds it)."""
    lines = ["| strategy | trainable | weights | gradients | AdamW m, v | activations kept | formula | peak (tracemalloc) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("weights", "gradients", "optimizer", "activations", "formula_total", "peak_step_tracemalloc")
    for strategy, row in result["strategies"].items():
        lines.append(f"| {LABELS.get(strategy, strategy)} | {row['trainable_params']:,} | "
                     + " | ".join(f"{row[k] / 2**20:.2f}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:  # the markdown table of the committed benchmarks/memory.json
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.json")) as f:
            print(markdown_table(json.load(f)))
    else:
        main()
