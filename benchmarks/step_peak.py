"""The tracemalloc peak of one training step, per method, beside the terms a memory plan adds up.

    python benchmarks/step_peak.py [--methods full,lora,...] [--checkpoint | --both] [--where] [--out FILE.json]
                                   [--d-model 256 --layers 4 --heads 4 --context 256 --vocab 2000 --batch 4]

One step is what train.py runs: model.loss_and_grads, clip_grad_norm and adamw_step. Traced from before
the parameters exist, so the peak includes everything the step holds. The terms, in bytes:
- weights: every array of params as stored (QLoRA: NF4 codes and scales);
- gradients, optimizer: the trainable names' gradients and AdamW's m and v;
- kept: the distinct buffers in model.forward's cache (views at their base, parameters excluded), as the
  step's forward keeps them; with --checkpoint, the blocks' inputs plus the largest block's own cache
  (one block is recomputed at a time);
- transient: the largest rise of memory inside one op call above what was held when it began (every
  function of minilora.ops and nf4.dequantize_nf4, and the methods' op pairs, wrapped while measuring);
- ratio: peak / (weights + gradients + optimizer + kept + transient).
--where also prints the call stack of the ops at the moment of the peak, and what was held then.
Memory numbers do not depend on load; the script takes no timings.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minilora import model, ops, optim  # noqa: E402
from minilora.methods import nf4  # noqa: E402

from memory import _root, cache_buffers  # noqa: E402
from speed import STRATEGIES, build  # noqa: E402


def buffers(item):
    """{id: array} of the distinct base buffers in a nested cache (memory.py's cache walk)."""
    return {id(a): a for a in cache_buffers(item)}


def kept_bytes(params, config, x, trainable, checkpoint):
    """Bytes the forward keeps for the backward (see the module docstring)."""
    exclude = {id(_root(p)) for p in params.values()}
    kwargs = {"checkpoint_activations": True} if checkpoint else {}
    _, cache = model.forward(params, config, x, trainable=trainable, **kwargs)
    total = sum(a.nbytes for i, a in buffers(cache).items() if i not in exclude)
    if checkpoint:
        blocks = [c.recompute(params, i) for i, c in enumerate(cache[2])]
        total += max(sum(a.nbytes for i, a in buffers(c).items() if i not in exclude) for c in blocks)
    return total


class Profile:
    """Wraps op functions so that the traced peak is attributed to the innermost op running when it happened."""

    def __init__(self, snapshot_at=None):
        self.calls = 0  # op calls so far; the peak's call is self.peak[3]
        self.snapshot_at, self.snapshot = snapshot_at, None
        self.stack = []  # [name, memory at entry, highest peak inside]
        self.largest = (0, None)  # (rise above entry, name) of one op call
        self.peak = (0, None, None, None)  # (bytes, op stack, memory at the innermost op's entry, its call)

    def _segment(self):
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        for frame in self.stack:
            frame[2] = max(frame[2], peak)
        if peak > self.peak[0]:
            self.peak = (peak, [f[0] for f in self.stack], self.stack[-1][1] if self.stack else None,
                         self.stack[-1][3] if self.stack else None)

    def wrap(self, module, name):
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self._segment()
            self.calls += 1
            if self.calls == self.snapshot_at:
                self.snapshot = tracemalloc.take_snapshot()
                tracemalloc.reset_peak()
            self.stack.append([name, tracemalloc.get_traced_memory()[0], 0, self.calls])
            try:
                return fn(*args, **kwargs)
            finally:
                self._segment()
                _, entry, high, _ = self.stack.pop()
                if high - entry > self.largest[0]:
                    self.largest = (high - entry, name)

        setattr(module, name, wrapped)
        return fn


def wrapped_functions():
    """(module, name) of every op the profile watches."""
    from minilora.methods import dora, ia3, lora, prefix, qlora

    out = [(ops, n) for n in dir(ops) if n.endswith(("_forward", "_backward"))]
    out.append((nf4, "dequantize_nf4"))
    for mod in (lora, qlora, dora, ia3, prefix):
        out += [(mod, n) for n in dir(mod) if n.endswith(("_forward", "_backward")) and callable(getattr(mod, n))]
    return out


def measure(method, config, batch_size, checkpoint=False, where=False, snapshot_at=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (batch_size, config.context_length))
    batch = {"x": x, "y": rng.integers(0, config.vocab_size, x.shape), "mask": np.ones(x.shape, np.float32)}
    kwargs = {"checkpoint_activations": True} if checkpoint else {}
    params, trainable, cfg = build(config, method)
    state = optim.adamw_init(params, trainable)

    def step():
        _, grads = model.loss_and_grads(params, cfg, batch, trainable, **kwargs)
        optim.clip_grad_norm(grads, 1.0)
        optim.adamw_step(params, grads, state, 1e-4, weight_decay=0.1)

    step()  # warm: anything created once (the NF4 table, BLAS buffers) is made before the traced step
    weights = sum(p.nbytes for p in params.values())
    n_train = sum(params[n].size for n in trainable)
    itemsize = params["wte"].itemsize
    kept = kept_bytes(params, cfg, x, trainable, checkpoint)
    prof = Profile(snapshot_at)
    originals = [(mod, name, prof.wrap(mod, name)) for mod, name in wrapped_functions()]
    tracemalloc.start(8 if snapshot_at else 1)
    try:
        held = tracemalloc.get_traced_memory()[0]  # nothing yet: params were made before tracing
        # tracing starts after the params exist: count them (and the state) as held
        tracemalloc.reset_peak()
        step()
        prof._segment()
        peak_step = prof.peak[0]
    finally:
        tracemalloc.stop()
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    opt = optim.optimizer_state_bytes(state)
    peak = weights + opt + peak_step - held  # the step's traced peak above what the params and state hold
    terms = {"weights": weights, "gradients": n_train * itemsize, "optimizer": opt, "kept": kept,
             "transient": prof.largest[0]}
    row = {**terms, "largest_transient_op": prof.largest[1], "peak": peak,
           "plan_like": sum(terms.values()), "ratio": peak / sum(terms.values())}
    if where:
        row["at_peak"] = {"ops": prof.peak[1], "held_at_op_entry_above_params": prof.peak[2], "call": prof.peak[3]}
    if prof.snapshot is not None:
        row["snapshot"] = prof.snapshot
    return row


def held_lines(method, config, batch_size, checkpoint, call, top=15):
    """What was held (by the line that allocated it, with its callers) when op call number `call` began."""
    snap = measure(method, config, batch_size, checkpoint, snapshot_at=call)["snapshot"]
    stats = snap.statistics("traceback")
    lines = []
    for st in stats[:top]:
        frames = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in st.traceback if "minilora" in f.filename
                  or "benchmarks" in f.filename]
        lines.append(f"{st.size / 2**20:8.2f} MiB  {st.count:4d} blocks  {' < '.join(reversed(frames[-4:]))}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(STRATEGIES))
    ap.add_argument("--checkpoint", action="store_true", help="with activation checkpointing")
    ap.add_argument("--both", action="store_true", help="without, then with activation checkpointing")
    ap.add_argument("--where", action="store_true", help="print the ops running at the peak")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    config = model.ModelConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                               n_heads=args.heads, n_layers=args.layers, d_ff=4 * args.d_model)
    mib = 2**20
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores; NumPy {np.__version__}",
              "command": "python benchmarks/step_peak.py " + " ".join(sys.argv[1:]), "units": "bytes",
              "model": config.to_dict(), "batch": args.batch}
    for checkpoint in ((False, True) if args.both else (args.checkpoint,)):
        rows = result["checkpointed" if checkpoint else "plain"] = {}
        print(f"{'checkpointed' if checkpoint else 'plain'} step, MiB")
        print(f"{'method':7s} {'weights':>8s} {'grads':>8s} {'adamw':>8s} {'kept':>8s} {'transient':>9s} "
              f"{'sum':>8s} {'peak':>8s} {'ratio':>6s}  largest transient op")
        for m in args.methods.split(","):
            r = rows[m] = measure(m, config, args.batch, checkpoint, args.where)
            print(f"{m:7s} {r['weights'] / mib:8.2f} {r['gradients'] / mib:8.2f} {r['optimizer'] / mib:8.2f} "
                  f"{r['kept'] / mib:8.2f} {r['transient'] / mib:9.2f} {r['plan_like'] / mib:8.2f} "
                  f"{r['peak'] / mib:8.2f} {r['ratio']:6.3f}  {r['largest_transient_op']}")
            if not args.where:
                continue
            at = r["at_peak"]
            if at["call"] is None:
                print("        at the peak: no op was running (model or optimizer code)")
                continue
            print(f"        at the peak: {' > '.join(at['ops'])}, {at['held_at_op_entry_above_params'] / mib:.2f} "
                  f"MiB held above params and state when it began; what was held then:")
            for line in held_lines(m, config, args.batch, checkpoint, at["call"]):
                print("        " + line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
