"""Where a GPT-2-small step's time goes, op by op: minilora beside PyTorch eager's profile of the same step.

    python benchmarks/gpt2_profile.py [--threads 2] [--batch 4] [--tokens 256] [--out benchmarks/gpt2_profile.json]
    python benchmarks/gpt2_profile.py --table      (docs/hardware.md's tables, from the committed json)

Run by hand on a quiet machine. The step is benchmarks/gpt2_small.py's (loss, backward, clipping, AdamW; LoRA
r = 8 on q, k, v, o), random weights, after two warm-up steps. minilora's side wraps every op pair of
minilora.ops and the optimizer's two calls in a wall-clock timer (the time of a call, including the BLAS
products it makes; nested calls are not double counted because no wrapped op calls another wrapped op).
PyTorch's side is torch.profiler's self CPU time per aten op. The rest of the step (the model's glue:
residual adds, reshapes, LoRA's small products, the dict of gradients) is the step's time less the sum.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as minilora/__init__.py does, before NumPy loads OpenBLAS

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2_small import make_batch  # noqa: E402
from speed import build, loss_and_grads, torch_stepper, update  # noqa: E402

from minilora import ops, optim  # noqa: E402
from minilora.model import SIZES  # noqa: E402

OUT = "benchmarks/gpt2_profile.json"


def minilora_profile(config, strategy, batch, threads):
    """{op: seconds} of one minilora step (and "step", its wall time), ops timed by wrapping them."""
    params, trainable, cfg = build(config, strategy)
    state = optim.adamw_init(params, trainable)
    spent = collections.defaultdict(float)
    originals = []

    def wrap(module, name):
        f = getattr(module, name)
        originals.append((module, name, f))

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        setattr(module, name, timed)

    def step():
        loss, grads = loss_and_grads(params, cfg, batch, trainable)
        update(params, grads, state)

    with threadpool_limits(threads):
        step()
        step()
        for name in dir(ops):
            if name.endswith(("_forward", "_backward")) and not name.startswith("_"):
                wrap(ops, name)
        wrap(optim, "adamw_step")
        wrap(optim, "clip_grad_norm")
        try:
            t = time.perf_counter()
            step()
            total = time.perf_counter() - t
        finally:
            for module, name, f in originals:
                setattr(module, name, f)
    out = {k: v for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 1e-3}
    out["rest of the step (model glue, LoRA's small products)"] = total - sum(spent.values())
    return {"step": total, "ops": out}


def torch_profile(config, strategy, batch, threads, rows=14):
    """{aten op: self CPU seconds} of one PyTorch step (and "step", its wall time without the profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = torch_stepper(config, strategy, threads, batch)
    step()
    step()
    t = time.perf_counter()
    step()
    total = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops_ = {e.key: e.self_cpu_time_total / 1e6 for e in events[:rows]}
    ops_["all other ops"] = sum(e.self_cpu_time_total for e in events[rows:]) / 1e6
    return {"step": total, "ops": ops_, "torch": torch.__version__}


def tables(result):
    """Markdown: per strategy, minilora's ops and PyTorch's, side by side, in ms."""
    lines = []
    for strategy, r in result["strategies"].items():
        mine, theirs = list(r["minilora"]["ops"].items()), list(r["torch"]["ops"].items())
        lines.append(f"**{strategy}**: step {1e3 * r['minilora']['step']:,.0f} ms (minilora) and "
                     f"{1e3 * r['torch']['step']:,.0f} ms (PyTorch eager)")
        lines.append("")
        lines.append("| minilora op | ms | PyTorch op (self CPU) | ms |")
        lines.append("|---|---:|---|---:|")
        for i in range(max(len(mine), len(theirs))):
            a = mine[i] if i < len(mine) else ("", None)
            b = theirs[i] if i < len(theirs) else ("", None)
            fa = f"{1e3 * a[1]:,.0f}" if a[1] is not None else ""
            fb = f"{1e3 * b[1]:,.0f}" if b[1] is not None else ""
            lines.append(f"| {a[0]} | {fa} | {b[0]} | {fb} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--strategies", default="full,lora")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--table", action="store_true", help="print the tables of the committed json and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.out, encoding="utf-8") as f:
            print(tables(json.load(f)), end="")
        return None
    config = SIZES["gpt2-small"]
    batch = make_batch(config, args.batch, args.tokens)
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average "
                         f"{os.getloadavg()[0]:.1f} at the start; NumPy {np.__version__}",
              "command": "python benchmarks/gpt2_profile.py", "threads": args.threads, "batch": args.batch,
              "tokens": args.tokens, "strategies": {}}
    for strategy in args.strategies.split(","):
        result["strategies"][strategy] = {"minilora": minilora_profile(config, strategy, batch, args.threads),
                                          "torch": torch_profile(config, strategy, batch, args.threads)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(tables(result), end="")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
