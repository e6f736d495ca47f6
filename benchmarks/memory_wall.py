"""The memory wall: one training step's peak memory, planned and measured, GPT-2 small to XL.

    python benchmarks/memory_wall.py [--sizes gpt2-small,gpt2-medium,gpt2-large,gpt2-xl]
                                     [--methods full,lora,qlora] [--batch 1] [--context 256]
                                     [--limit-gib 24] [--headroom-gib 2]
                                     [--out benchmarks/memory_wall.json] [--figure figures/memory_wall.png]
    python benchmarks/memory_wall.py --table     (docs/hardware.md's tables, from the committed json)
    python benchmarks/memory_wall.py --plot [JSON [PNG]]   (the figure again, from a json)
    python benchmarks/memory_wall.py --cell SIZE METHOD BATCH CONTEXT CKPT [BACKEND]   (one cell, in a child)
    python benchmarks/memory_wall.py --backend cupy --out OUT.json   (on a GPU: benchmarks/gpu_check.sh runs it)

With --backend cupy the model, its moments and the batch live on the GPU, the limit is the GPU's free memory
when the run starts (less the headroom), and each cell's peak is the CuPy memory pool's high-water mark
(DevicePeak), checked against the plan: the run exits 1 if a measured peak exceeds --max-ratio times its plan.

For each size, method and activation checkpointing (off, on) it makes the plan (minilora.memplan). A cell
whose plan fits the machine (limit minus headroom), and the memory available when it starts, runs ONE real
training step (loss, backward, clipping, AdamW) in a fresh subprocess, one cell at a time: random weights
(no download), built one array at a time (QLoRA's block linears quantized to NF4 one by one, so the float
base never exists whole). The child reports its resident-set peak (getrusage ru_maxrss, which also holds
the interpreter and the build), its tracemalloc peak of the step plus the bytes held before it (weights,
moments, batch), and the step's time. A cell whose plan does not fit records the refusal finetune prints.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as minilora/__init__.py does, before NumPy loads OpenBLAS

import numpy as np

from minilora import memplan, methods, model, ops, optim, threads
from minilora.finetune import FinetuneConfig
from minilora.methods import lora, nf4, qlora

SIZES = tuple(memplan.SIZES)
METHODS = ("full", "lora", "qlora", "dora")
GIB = 2 ** 30


def random_model(config, method, seed=0):
    """(params, model config, trainable) of `method` on random GPT-2-like weights, built lean.

    Every base array is drawn in float32 directly (N(0, 0.02); LayerNorm gains 1, biases 0). For QLoRA
    one random W of each shape is quantized to its NF4 record (nf4.quantize_nf4) and every block linear
    of that shape gets its own copy of the record: the same bytes, the same step, without quantizing
    1.5 B weights by hand (about 0.27 s per million weights here: 7 minutes at XL); the float base
    never exists whole.
    """
    rng = np.random.default_rng(seed)
    settings = FinetuneConfig(method=method, seed=seed)
    quantized = set(qlora.quantized_layers(config)) if method == "qlora" else set()
    base = {}
    for name, shape in model.param_shapes(config).items():
        if name.endswith(".g"):
            base[name] = np.ones(shape, np.float32)
        elif name.endswith(".b"):
            base[name] = np.zeros(shape, np.float32)
        elif name[:-2] in quantized:
            base[name] = np.broadcast_to(np.float32(0.0), shape)  # a stand-in: only its shape is read
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= 0.02
            base[name] = a
    m = methods.method(method)
    if method == "qlora":
        params, cfg = lora.add_lora(base, config, settings.lora, seed=seed)
        records = {}
        for prefix in qlora.quantized_layers(cfg):
            shape = params[prefix + ".W"].shape
            if shape not in records:
                W = rng.standard_normal(shape, dtype=np.float32)
                W *= 0.02
                records[shape] = nf4.quantize_nf4(W, settings.lora.block_size, settings.lora.absmax_block_size)
                del W
            del params[prefix + ".W"]
            for f in qlora.FIELDS:
                params[f"{prefix}.nf4.{f}"] = records[shape][f].copy()  # this layer's own bytes
        del records
        trainable = set(lora.adapter_names(cfg))
    else:
        params, cfg, trainable = m.setup(base, config, settings, None)
        if method == "full":
            del base  # setup trained copies: the originals are not held by the run
    return params, cfg, set(trainable)


def make_batch(config, batch, context, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (batch, context))
    y = rng.integers(0, config.vocab_size, (batch, context))
    return {"x": x, "y": y, "mask": np.ones(x.shape, np.float32)}


def _loss_and_grads(params, cfg, batch, trainable, checkpoint_activations):
    if checkpoint_activations:
        return model.loss_and_grads(params, cfg, batch, trainable, None, True,
                                    checkpoint_activations=True)
    return model.loss_and_grads(params, cfg, batch, trainable, None, True)


class DevicePeak:
    """The high-water mark of CuPy's memory pool during a block: the bytes its arrays held at most.

    CuPy keeps freed blocks in its pool, so the pool's size is not what the arrays hold; its used_bytes() is.
    A memory hook reads used_bytes() after every allocation, so the largest value seen is the step's peak.
    """

    def __init__(self, cupy):
        self.cupy, self.peak = cupy, 0
        pool = cupy.get_default_memory_pool()

        class Hook(cupy.cuda.MemoryHook):
            name = "minilora_peak"

            def malloc_postprocess(hook, **kwargs):  # noqa: N805 (the hook's own self)
                self.peak = max(self.peak, pool.used_bytes())

        self.pool, self.hook = pool, Hook()

    def __enter__(self):
        self.cupy.cuda.Device().synchronize()
        self.peak = self.pool.used_bytes()
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.cupy.cuda.Device().synchronize()
        self.hook.__exit__(*exc)


def measure_step(config, method, batch, context, checkpoint_activations=False, seed=0, xp=np):
    """One training step on random weights: {"tracemalloc_peak", "held_before", "step_s"} (bytes, seconds).

    tracemalloc_peak is the step's traced peak plus the bytes of every array held when it starts
    (parameters as stored, AdamW's moments, the batch): the whole memory of the step, comparable to a plan.
    With xp a device module the model, the moments and the batch live there: under CuPy the step's peak is
    also read from the memory pool (device_peak, DevicePeak), the GPU's own high-water mark; the CPU stand-in
    (tests/standin.py) keeps its arrays in host memory, so tracemalloc measures it as it does NumPy.
    """
    params, cfg, trainable = random_model(config, method, seed)
    if xp is not np:
        params = model.params_to(params, xp)
    state = optim.adamw_init(params, trainable)
    data = make_batch(config, batch, context, seed)
    if xp is not np:
        data["mask"] = xp.asarray(data["mask"])  # the ids stay on the host: the model checks, then moves them
    if xp.__name__ == "cupy":
        with DevicePeak(xp) as device:
            t0 = time.perf_counter()
            loss, grads = _loss_and_grads(params, cfg, data, trainable, checkpoint_activations)
            optim.clip_grad_norm(grads, 1.0)
            optim.adamw_step(params, grads, state, 3e-4, weight_decay=0.1)
        return {"device_peak": int(device.peak), "step_s": time.perf_counter() - t0, "loss": float(loss)}
    held = (sum(p.nbytes for p in params.values() if p.strides != (0,) * p.ndim)
            + optim.optimizer_state_bytes(state) + sum(a.nbytes for a in data.values()))
    rss_reset = _reset_rss_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    loss, grads = _loss_and_grads(params, cfg, data, trainable, checkpoint_activations)
    optim.clip_grad_norm(grads, 1.0)
    optim.adamw_step(params, grads, state, 3e-4, weight_decay=0.1)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out = {"tracemalloc_peak": int(peak + held), "held_before": int(held), "step_s": seconds, "loss": loss}
    if rss_reset:
        out["rss_step_peak"] = _status_bytes("VmHWM")
    return out


def _reset_rss_peak():
    """Reset this process's resident-set high-water mark (Linux: 5 into /proc/self/clear_refs); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def run_cell(size, method, batch, context, ckpt, backend="numpy"):
    """The child's work: one measured step; prints one JSON line (ru_maxrss in bytes).

    rss_at_start is the process before the build (the interpreter, NumPy, the package: nothing the plan
    counts); rss_above_start = rss_peak - rss_at_start is what the build and the step added; rss_step_peak
    is the resident-set peak of the step alone (the high-water mark reset after the build), so a build's
    temporaries (QLoRA's quantization) are not in it.
    """
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    xp = np
    if backend == "cupy":
        from minilora.backend import get_backend

        xp = get_backend("cupy")
    out = measure_step(memplan.SIZES[size], method, batch, context, ckpt, xp=xp)
    out["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["rss_at_start"] = start
    out["rss_above_start"] = out["rss_peak"] - start
    print(json.dumps(out))


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def blas_threads():
    from threadpoolctl import threadpool_info

    return [{"api": i.get("internal_api"), "threads": i.get("num_threads")} for i in threadpool_info()]


def main():
    from minilora.memfit import fitting_options, refusal_line

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--limit-gib", type=float, default=24.0, help="the machine's memory the plan is held to")
    ap.add_argument("--headroom-gib", type=float, default=2.0)
    ap.add_argument("--context-for-batches", type=int, default=1024,
                    help="the context of the plan-only table of the largest batch that fits at XL")
    ap.add_argument("--out", default="benchmarks/memory_wall.json")
    ap.add_argument("--figure", default="figures/memory_wall.png", help="the figure's PNG ('' for none)")
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    ap.add_argument("--max-ratio", type=float, default=1.10, help="a measured peak above this times its plan fails")
    args = ap.parse_args()
    limit = int((args.limit_gib - args.headroom_gib) * GIB)
    gpu_free = None
    if args.backend == "cupy":
        from minilora.backend import get_backend

        gpu_free, _ = get_backend("cupy").cuda.runtime.memGetInfo()
        limit = int(gpu_free - args.headroom_gib * GIB)
    # the threads the CPU's elementwise loops split over, each part with its own scratch (minilora/threads.py);
    # on the GPU nothing splits. The plan counts them; the cell's child runs with the same BLAS pool
    threads_ = 1 if args.backend == "cupy" else threads.cpu_threads()
    cells = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
                p = memplan.plan(memplan.SIZES[size], method, args.batch, args.context, ckpt, cpu_threads=threads_)
                cell = {"size": size, "method": method, "checkpoint_activations": ckpt, "batch": args.batch,
                        "context": args.context, "plan": p.terms, "plan_total": p.total, "phase": p.phase,
                        "forward_cache": p.forward_cache, "trainable_params": p.trainable_params}
                avail = available_bytes() if gpu_free is None else gpu_free
                cell["available_at_start"] = avail
                if p.total > limit:
                    def total_of(b, m, ck, size=size):
                        return memplan.plan(memplan.SIZES[size], m, b, args.context, ck, cpu_threads=threads_).total

                    options = fitting_options(total_of, args.batch, method, ckpt, limit)
                    where = (f"of {args.limit_gib:g} GiB less " if gpu_free is None else
                             f"of the GPU's {gpu_free / GIB:.1f} GiB free less ") + f"{args.headroom_gib:g} GiB headroom"
                    cell["refused"] = refusal_line(p, limit, where, options)
                elif avail is not None and p.total > avail - int(args.headroom_gib * GIB):
                    cell["not_run"] = (f"plan {p.total / GIB:.2f} GiB fits {args.limit_gib:g} GiB but only "
                                       f"{avail / GIB:.2f} GiB were available (the machine is shared)")
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--cell", size, method, str(args.batch),
                           str(args.context), str(int(ckpt)), args.backend]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        cell["failed"] = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                    else:
                        cell["measured"] = json.loads(done.stdout.strip().splitlines()[-1])
                        m = cell["measured"]
                        if "device_peak" in m:  # the GPU's own high-water mark
                            m["device_over_plan"] = m["device_peak"] / p.total
                            cells.append(cell)
                            print(json.dumps({k: v for k, v in cell.items() if k != "plan"}), flush=True)
                            continue
                        m["tracemalloc_over_plan"] = m["tracemalloc_peak"] / p.total
                        m["rss_over_plan"] = m["rss_peak"] / p.total
                        m["rss_above_start_over_plan"] = m["rss_above_start"] / p.total
                        if "rss_step_peak" in m:
                            m["rss_step_over_plan"] = (m["rss_step_peak"] - m["rss_at_start"]) / p.total
                cells.append(cell)
                print(json.dumps({k: v for k, v in cell.items() if k != "plan"}), flush=True)
    largest = largest_batches(limit, args.context_for_batches)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                         f"{_total_bytes() / GIB:.1f} GiB" + ("" if gpu_free is None else f", {_gpu_name()}"),
              "backend": args.backend,
              "command": "python benchmarks/memory_wall.py " + " ".join(sys.argv[1:]),
              "blas_threads": blas_threads(), "limit_bytes": limit,
              "note": "step times taken under load (the machine's 2 cores are shared by other sessions); "
                      "weights are random (no download)",
              "loss_chunk_bytes": ops.LOSS_CHUNK_BYTES, "cells": cells, "largest_batches": largest}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.backend == "cupy":
        print(gpu_table(result))
        over = [c for c in cells if c.get("measured", {}).get("device_over_plan", 0) > args.max_ratio]
        failed = [c for c in cells if "failed" in c]
        print(f"wrote {args.out}")
        if over or failed:
            print(f"memory_wall: {len(over)} cells above {args.max_ratio} x their plan, {len(failed)} failed",
                  file=sys.stderr)
            sys.exit(1)
        return
    if args.figure:
        figure(result).savefig(args.figure, dpi=120)
    print(tables(result))
    print(f"wrote {args.out}" + (f" and {args.figure}" if args.figure else ""))


def _gpu_name():
    from minilora.backend import get_backend

    cupy = get_backend("cupy")
    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def gpu_table(result):
    """The memory wall under CuPy: the plan against the memory pool's high-water mark (GiB)."""
    lines = ["| size | method | checkpointing | plan | GPU pool peak | peak / plan | step (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for c in result["cells"]:
        m = c.get("measured", {})
        got = ([f"{m['device_peak'] / GIB:.2f}", f"{m['device_over_plan']:.3f}", f"{m['step_s']:.2f}"]
               if "device_peak" in m else ["refused by the plan" if "refused" in c else "not run", "", ""])
        lines.append("| " + " | ".join([c["size"], c["method"], "on" if c["checkpoint_activations"] else "off",
                                       f"{c['plan_total'] / GIB:.2f}"] + got) + " |")
    return "\n".join(lines)


def largest_batches(limit, context, size="gpt2-xl", methods_=("lora", "qlora", "dora"), most=256):
    """By the plan only: the largest batch of `context` tokens whose step fits limit bytes, per method,
    without and with activation checkpointing (0: not even one sequence)."""
    rows = []
    for method in methods_:
        row = {"size": size, "method": method, "context": context}
        for ckpt in (False, True):
            fits = [b for b in range(1, most + 1)
                    if memplan.plan(memplan.SIZES[size], method, b, context, ckpt).total <= limit]
            row["checkpointed" if ckpt else "plain"] = max(fits, default=0)
        rows.append(row)
    return rows


def _total_bytes():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def figure(result):
    """Peak memory against parameters, one curve per method and checkpointing, the limit drawn; log y."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    colors = {name: m.color for name, m in methods.METHODS.items()}
    sizes = list(dict.fromkeys(c["size"] for c in result["cells"]))
    params = {s: sum(np.prod(v) for v in model.param_shapes(memplan.SIZES[s]).values()) / 1e9 for s in sizes}
    for method in dict.fromkeys(c["method"] for c in result["cells"]):
        for ckpt in (False, True):
            rows = [c for c in result["cells"] if c["method"] == method and c["checkpoint_activations"] == ckpt]
            if not rows:
                continue
            style = "--" if ckpt else "-"
            label = f"{method}{', checkpointed' if ckpt else ''}"
            ax.plot([params[c["size"]] for c in rows], [c["plan_total"] / GIB for c in rows], style,
                    color=colors.get(method), label=label + " (plan)")
            ran = [c for c in rows if "measured" in c]
            ax.plot([params[c["size"]] for c in ran], [c["measured"]["rss_peak"] / GIB for c in ran],
                    "o" if not ckpt else "s", color=colors.get(method), mfc="none" if ckpt else None)
            refused = [c for c in rows if "refused" in c]
            ax.plot([params[c["size"]] for c in refused], [c["plan_total"] / GIB for c in refused], "x",
                    color=colors.get(method), ms=9, mew=2)
    ax.axhline(24, color="k", lw=1)
    ax.text(params[sizes[0]], 24 * 1.06, "24 GiB: this machine (and a consumer GPU)", fontsize=8)
    usable = result["limit_bytes"] / GIB
    ax.axhline(usable, color="k", lw=0.8, ls=":")
    ax.text(params[sizes[0]], usable * 0.86, f"{usable:g} GiB: the limit the plan is held to (2 GiB headroom)",
            fontsize=7)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xticks(list(params.values()), [f"{s}\n{params[s]:.2f} B" for s in sizes], fontsize=8)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("model (parameters)")
    ax.set_ylabel("peak memory of one step (GiB)")
    ax.set_title(f"The memory wall: full fine-tuning passes 24 GiB first (batch {result['cells'][0]['batch']}, "
                 f"context {result['cells'][0]['context']})\nlines: the plan (dashed: checkpointed); markers: "
                 f"measured RSS peak; x: refused by the plan", fontsize=9)
    ax.set_ylim(top=40)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def markdown_table(result):
    """docs/hardware.md's memory-wall table (GiB) from a memory_wall.json."""
    lines = ["| size | method | checkpointing | plan | weights | grads + AdamW | activations | logits | "
             "RSS peak | RSS above start / plan | tracemalloc | tracemalloc / plan | step (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        t = c["plan"]
        cells = [c["size"], c["method"], "on" if c["checkpoint_activations"] else "off",
                 f"{c['plan_total'] / GIB:.2f}", f"{t['weights'] / GIB:.2f}",
                 f"{(t['gradients'] + t['optimizer']) / GIB:.2f}", f"{t['activations'] / GIB:.3f}",
                 f"{t['logits'] / GIB:.3f}"]
        if "measured" in c:
            m = c["measured"]
            cells += [f"{m['rss_peak'] / GIB:.2f}", f"{m['rss_above_start_over_plan']:.3f}",
                      f"{m['tracemalloc_peak'] / GIB:.2f}", f"{m['tracemalloc_over_plan']:.3f}", f"{m['step_s']:.1f}"]
        else:
            cells += ["refused by the plan" if "refused" in c else "not run", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def terms_table(result, size="gpt2-xl"):
    """The plan's terms at one size (GiB): what each method's step holds, and the whole forward cache."""
    rows = [c for c in result["cells"] if c["size"] == size]
    lines = ["| method | checkpointing | peak falls in | weights | gradients | AdamW m, v | activations | "
             "transient | logits chunk | plan | all activations kept |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in rows:
        t = c["plan"]
        lines.append("| " + " | ".join([c["method"], "on" if c["checkpoint_activations"] else "off", c["phase"]]
                                      + [f"{t[k] / GIB:.2f}" for k in ("weights", "gradients", "optimizer",
                                                                       "activations", "transient", "logits")]
                                      + [f"{c['plan_total'] / GIB:.2f}", f"{c['forward_cache'] / GIB:.2f}"]) + " |")
    return "\n".join(lines)


def batches_table(result):
    """The largest batch that fits the limit at XL, by the plan, without and with checkpointing."""
    lines = [f"| method (GPT-2 XL, context {result['largest_batches'][0]['context']}) | largest batch, plain | "
             "largest batch, checkpointed |", "|---|---:|---:|"]
    for r in result["largest_batches"]:
        lines.append(f"| {r['method']} | {r['plain']} | {r['checkpointed']} |")
    return "\n".join(lines)


def tables(result):
    """docs/hardware.md's three memory-wall tables, from a memory_wall.json."""
    return markdown_table(result) + "\n\n" + terms_table(result) + "\n\n" + batches_table(result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cell"]:
        size, method, batch, context, ckpt = sys.argv[2:7]
        run_cell(size, method, int(batch), int(context), bool(int(ckpt)), *sys.argv[7:8])
    elif sys.argv[1:2] == ["--plot"]:  # redraw the figure from a json: --plot [JSON [PNG]]
        paths = sys.argv[2:] + ["benchmarks/memory_wall.json", "figures/memory_wall.png"][len(sys.argv[2:]):]
        with open(paths[0]) as f:
            figure(json.load(f)).savefig(paths[1], dpi=120)
    elif sys.argv[1:] == ["--table"]:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_wall.json")) as f:
            print(tables(json.load(f)))
    else:
        main()
