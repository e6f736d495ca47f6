"""Benchmark: one training step of minilora beside the same GPT in PyTorch eager, on the same CPU.

    python benchmarks/speed.py [--threads 2] [--repeats 7] [--configs default,bench]
                               [--no-concurrency] [--out benchmarks/speed.json] [--figure figures/speed.png]
    python benchmarks/speed.py --table    (docs/hardware.md's table, from the committed speed.json)

Run by hand, not by the tests. For each config (default: d 128, 2 layers, 4 heads,
T 128, batch 16; bench: d 256, 4 layers, 4 heads, T 256, batch 16, d_ff 1024; tiny:
d 32, 1 layer, T 32, only to check that a strategy runs) and each strategy (full;
LoRA r=8 on q,k,v,o; QLoRA, the same adapters on a base whose block linears are NF4;
DoRA r=8 on q,k,v,o, exact backward; prompt tuning with 16 vectors; prefix tuning
with 16 keys and values per layer; IA3's l_k, l_v, l_ff) it times one step = loss +
backward + gradient clipping (norm 1.0) + AdamW, the median of `--repeats` steps
after two warm-up steps. When PyTorch is importable the same
architecture (pre-LN blocks, tied LM head, no key bias, tanh GELU, AdamW, clipping)
is timed in eager mode, its steps interleaved one by one with minilora's so both
see the same machine load (for full, LoRA, DoRA and prompt tuning: PyTorch has no
NF4 of its own, so QLoRA is timed for minilora only; the PyTorch DoRA forms the
row norms from the dense W + s B A, as PEFT does, and autograd differentiates
through them, the exact backward). BLAS threads are fixed with threadpoolctl (and
torch.set_num_threads) and printed.

FLOP counting (multiply-add = 2 FLOPs; elementwise work is not counted):
- forward: 2 * (weights in matmuls) * tokens for the linears and the tied head,
  plus 2 * 2 * B * NH * T^2 * hs for attention (q k^T and P v, the full T x T
  square, as PyTorch's and llm.c's counts do; the causal half is not discounted,
  though minilora, like PyTorch's CPU attention, computes only the blocks at or
  below the diagonal: 5/8 of the square at T = 256, 3/4 at T = 128);
  tokens and T include the 16 prompt positions for prompt tuning, except at the head;
  for prefix tuning each query is scored against T + 16 keys (the prefix columns);
- backward, full fine-tuning: 2x the forward (dx and dW for every product);
- backward, LoRA, IA3, prompt and prefix tuning: 1x the forward of the linears and the head (dx
  only: a frozen W gets no dW; IA3's scalings are elementwise, not counted), 2x the
  forward of attention (dq, dk, dv all needed), plus LoRA's own products (forward
  2 r (in + out) per token and adapter, backward twice that). Under LoRA and IA3, block 0's dx products of q,
  k and v are also skipped (nothing below them is trained); the count keeps them.
  QLoRA counts as LoRA (dequantizing is elementwise). DoRA adds, once per step
  and adapter, the row norms' products (methods/dora.py): W A^T, A A^T and B G
  forward, 2 r (out in + r in + out r); backward dP^T W, dG A, B^T (dq B) and B G,
  2 r (out in + r in + out r + out r).
The achieved GFLOP/s is that count over the measured step time, against the
float32 GEMM peak measured here with a 2048^3 `a @ b` on the same threads.

It also times a short pretraining-like loop (default config, full step) run
alone and as two concurrent subprocesses, with 1 and with 2 BLAS threads each, to
choose a default thread count (target: two concurrent runs finish within 2.2x the
time of one run alone).

Writes benchmarks/speed.json and figures/speed.png. Numbers depend on the
machine and on whatever else runs on it: the JSON records both.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as minilora/__init__.py does, before NumPy loads OpenBLAS

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from minilora import model, optim
from minilora.methods import dora, ia3, lora, prefix, prompt, qlora

# ---- every call into the package sits in these three functions (easy to port) ----


def build(config, strategy, seed=0):
    """Parameters, the trainable names and the model config they come with, for one strategy."""
    params = model.init_params(config, seed=seed)
    if strategy == "full":
        trainable = sorted(params)
    elif strategy == "lora":
        lora_config = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
        params, config = lora.add_lora(params, config, lora_config, seed=seed)
        trainable = sorted(n for n in params if ".lora_" in n)
    elif strategy == "qlora":
        # the same adapters on a base whose 12 block linears are NF4 (dequantized per product)
        qlora_config = qlora.QLoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
        params, config = qlora.add_qlora(params, config, qlora_config, seed=seed)
        trainable = sorted(n for n in params if ".lora_" in n)
    elif strategy == "dora":
        # LoRA's A and B and the magnitude m beside q, k, v, o; the exact backward (through the norm)
        dora_config = dora.DoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
        params, config = dora.add_dora(params, config, dora_config, seed=seed)
        trainable = lora.adapter_names(config)
    elif strategy == "prompt":
        params = prompt.add_prompt(params, N_PROMPT, seed=seed)
        trainable = ["prompt"]
    elif strategy == "prefix":
        params, config = prefix.add_prefix(params, config, N_PREFIX, seed=seed)
        trainable = prefix.prefix_names(config)
    elif strategy == "ia3":
        # the vectors l_k, l_v (C,) and l_ff (F,) of every block, at ones
        params, config = ia3.add_ia3(params, config)
        trainable = sorted(n for n in params if n.endswith(".ia3_l"))
    else:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return params, trainable, config


def loss_and_grads(params, config, batch, trainable):
    """The package's loss and gradients: the one model call."""
    return model.loss_and_grads(params, config, batch, trainable)


def update(params, grads, state, lr=3e-4):
    """Clip and take one AdamW step, in place."""
    optim.clip_grad_norm(grads, 1.0)
    optim.adamw_step(params, grads, state, lr, weight_decay=0.1)


def model_config(name):
    if name == "default":
        return model.ModelConfig()
    if name == "tiny":  # for checking that a strategy runs, never for timing
        return model.ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=32, d_ff=64)
    return model.ModelConfig(d_model=256, n_layers=4, n_heads=4, context_length=256, d_ff=1024)


def adamw_init(params, trainable):
    return optim.adamw_init(params, trainable)

# ---- end of the package calls ----


BATCH = 16
N_PROMPT = 16
N_PREFIX = 16  # prefix keys and values per layer (prefix tuning)
STRATEGIES = ("full", "lora", "qlora", "dora", "prompt", "prefix", "ia3")
TORCH_STRATEGIES = ("full", "lora", "dora", "prompt", "prefix", "ia3")  # the ones torch_stepper builds (PyTorch has no NF4)


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (BATCH, config.context_length))
    y = rng.integers(0, config.vocab_size, (BATCH, config.context_length))
    return {"x": x, "y": y, "mask": np.ones(x.shape, np.float32)}


def minilora_stepper(config, strategy):
    params, trainable, config = build(config, strategy)
    state = adamw_init(params, trainable)
    batch = make_batch(config)

    def step():
        loss, grads = loss_and_grads(params, config, batch, trainable)
        update(params, grads, state)
        return loss

    return step


def flops_per_step(c, strategy, lora_rank=8, n_targets=4):
    """The model's FLOPs in one step, counted as in the module docstring."""
    B, C, F, V, L, NH = BATCH, c.d_model, c.d_ff, c.vocab_size, c.n_layers, c.n_heads
    T = c.context_length
    Tb = T + (N_PROMPT if strategy == "prompt" else 0)  # positions the blocks see
    linear_w = L * (4 * C * C + 2 * C * F)
    fwd_lin = 2 * linear_w * B * Tb + 2 * V * C * B * T  # blocks + tied head
    Tk = Tb + (N_PREFIX if strategy == "prefix" else 0)  # keys each query is scored against
    fwd_att = L * 2 * 2 * B * NH * Tb * Tk * (C // NH)
    if strategy == "full":
        return 3 * (fwd_lin + fwd_att)
    adapters = 0
    if strategy in ("lora", "qlora", "dora"):
        adapters = L * n_targets * 2 * lora_rank * (C + C) * B * Tb  # forward of the adapters
    norms_fwd = norms_bwd = 0
    if strategy == "dora":
        r = lora_rank  # per step, not per token: each target is (C, C)
        norms_fwd = L * n_targets * 2 * r * (C * C + r * C + C * r)  # W A^T, A A^T, B G
        norms_bwd = L * n_targets * 2 * r * (C * C + r * C + C * r + C * r)  # dP^T W, dG A, B^T (dq B), B G
    return (fwd_lin + fwd_att + adapters + norms_fwd) + (fwd_lin + 2 * fwd_att + 2 * adapters + norms_bwd)


def gemm_peak(threads, n=2048, repeats=5):
    """Measured float32 GEMM GFLOP/s of `a @ b`, (n, n) @ (n, n), on `threads` BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(threads):
        a @ b
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts) / 1e9


# ---- the same GPT in PyTorch eager (imported only here, never by minilora) ----


def torch_stepper(config, strategy, threads, batch=None):
    import torch
    import torch.nn.functional as Fn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    C, NH, L, V, F, T = (config.d_model, config.n_heads, config.n_layers, config.vocab_size,
                         config.d_ff, config.context_length)

    class Linear(torch.nn.Module):
        """y = x W^T + b, optionally plus a LoRA update s (x A^T) B^T with W frozen; under DoRA,
        y = (m / n) (x W^T + s (x A^T) B^T) + b with n the row norms of W + s B A (formed densely, as PEFT);
        under IA3, with the vector l scaling its output ("out": l * y) or its input ("in": (l * x) W^T + b)."""

        def __init__(self, d_in, d_out, bias=True, rank=0, ia3=None):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out, bias=bias)
            self.rank, self.ia3 = rank, ia3
            if rank:
                self.A = torch.nn.Parameter(torch.empty(rank, d_in).uniform_(-d_in**-0.5, d_in**-0.5))
                self.B = torch.nn.Parameter(torch.zeros(d_out, rank))
            if ia3:
                self.l = torch.nn.Parameter(torch.ones(d_out if ia3 == "out" else d_in))
            if rank and strategy == "dora":
                self.m = torch.nn.Parameter(self.lin.weight.detach().norm(dim=1))

        def forward(self, x):
            if self.ia3 == "in":
                x = x * self.l
            if self.rank and strategy == "dora":
                z = x @ self.lin.weight.T + (x @ self.A.T) @ self.B.T * 2.0
                n = (self.lin.weight + 2.0 * self.B @ self.A).norm(dim=1)  # autograd: the exact backward
                z = z * (self.m / n)
                return z if self.lin.bias is None else z + self.lin.bias
            y = self.lin(x)
            if self.rank:
                y = y + (x @ self.A.T) @ self.B.T * 2.0
            if self.ia3 == "out":
                y = y * self.l
            return y

    rank = 8 if strategy in ("lora", "dora") else 0
    out, inp = ("out", "in") if strategy == "ia3" else (None, None)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(C), torch.nn.LayerNorm(C)
            self.q, self.k = Linear(C, C, rank=rank), Linear(C, C, bias=False, rank=rank, ia3=out)
            self.v, self.o = Linear(C, C, rank=rank, ia3=out), Linear(C, C, rank=rank)
            self.fc, self.proj = Linear(C, F), Linear(F, C, ia3=inp)
            # prefix tuning: P keys and values of this layer, (P, C) as minilora's prefix_k, prefix_v
            self.pk = self.pv = None
            if strategy == "prefix":
                self.pk = torch.nn.Parameter(torch.randn(N_PREFIX, C) * 0.02)
                self.pv = torch.nn.Parameter(torch.randn(N_PREFIX, C) * 0.02)

        def forward(self, x):
            B_, T_, _ = x.shape
            a = self.ln_1(x)
            q, k, v = (f(a).view(B_, T_, NH, C // NH).transpose(1, 2) for f in (self.q, self.k, self.v))
            if self.pk is None:
                y = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # the prefix columns first, seen by every query; the causal mask among the real tokens
                P = self.pk.shape[0]
                k, v = (torch.cat([p.view(1, P, NH, C // NH).transpose(1, 2).expand(B_, -1, -1, -1), a], dim=2)
                        for p, a in ((self.pk, k), (self.pv, v)))
                see = torch.ones(T_, P + T_, dtype=torch.bool)
                see[:, P:] = torch.tril(see[:, P:])
                y = Fn.scaled_dot_product_attention(q, k, v, attn_mask=see)
            x = x + self.o(y.transpose(1, 2).reshape(B_, T_, C))
            return x + self.proj(Fn.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Parameter(torch.randn(V, C) * 0.02)
            self.wpe = torch.nn.Parameter(torch.randn(T, C) * 0.02)
            self.h = torch.nn.ModuleList(Block() for _ in range(L))
            self.ln_f = torch.nn.LayerNorm(C)
            self.prompt = torch.nn.Parameter(torch.randn(N_PROMPT, C) * 0.02) if strategy == "prompt" else None

        def forward(self, ids):
            x = self.wte[ids] + self.wpe[: ids.shape[1]]
            P = 0
            if self.prompt is not None:
                P = self.prompt.shape[0]
                x = torch.cat([self.prompt.expand(ids.shape[0], -1, -1), x], dim=1)
            for block in self.h:
                x = block(x)
            return self.ln_f(x)[:, P:] @ self.wte.T  # tied head

    net = GPT()
    for name, p in net.named_parameters():
        if strategy == "lora":
            p.requires_grad_(name.endswith((".A", ".B")))
        elif strategy == "dora":
            p.requires_grad_(name.endswith((".A", ".B", ".m")))
        elif strategy == "prompt":
            p.requires_grad_(name == "prompt")
        elif strategy == "ia3":
            p.requires_grad_(name.endswith(".l"))
        elif strategy == "prefix":
            p.requires_grad_(name.endswith((".pk", ".pv")))
    trainable = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    batch = make_batch(config) if batch is None else batch  # {"x", "y", "mask"} as make_batch gives
    x, y = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])
    m = torch.from_numpy(batch["mask"])

    def step():
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        nll = Fn.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none")
        loss = (nll * m.reshape(-1)).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return loss.item()

    return step


def time_interleaved(steppers, threads, repeats, warmup=2):
    """Median seconds per step of each stepper, their steps run in turn (a b a b ...)."""
    times = {name: [] for name in steppers}
    with threadpool_limits(threads):
        for _ in range(warmup):
            for step in steppers.values():
                step()
        for _ in range(repeats):
            for name, step in steppers.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}, times


# ---- concurrency: two runs at once against one alone ----


def worker_loop(steps, threads):
    """A pretraining-like loop (default config, full step), run in a subprocess; prints its seconds."""
    step = minilora_stepper(model_config("default"), "full")
    with threadpool_limits(threads):
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def run_workers(n, steps, threads):
    """Wall seconds until all n concurrent worker loops finish."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(steps), "--threads", str(threads)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {outs}")
    return wall, [json.loads(o.strip().splitlines()[-1])["seconds"] for o in outs]


def concurrency(steps):
    rows = {}
    for threads in (1, 2):
        alone, _ = run_workers(1, steps, threads)
        pair, each = run_workers(2, steps, threads)
        rows[f"{threads}_thread"] = {"alone_s": alone, "two_concurrent_s": pair, "each_loop_s": each,
                                     "slowdown": pair / alone}
    best_alone = min(r["alone_s"] for r in rows.values())
    for r in rows.values():
        r["two_concurrent_over_best_alone"] = r["two_concurrent_s"] / best_alone
    ok = [t for t in (1, 2) if rows[f"{t}_thread"]["two_concurrent_over_best_alone"] <= 2.2]
    rows["recommended_threads"] = max(ok) if ok else 1
    return rows


# ---- the figure ----


def speed_figure(result):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, cfg in zip(axes, result["configs"]):
        rows = result["configs"][cfg]["strategies"]
        xs = np.arange(len(rows))
        ml = [rows[s]["minilora_ms"] for s in rows]
        ax.bar(xs - 0.2, ml, 0.4, label="minilora (NumPy)")
        with_torch = [i for i, s in enumerate(rows) if rows[s].get("torch_ms")]  # QLoRA: minilora only
        if with_torch:
            ax.bar(xs[with_torch] + 0.2, [rows[s]["torch_ms"] for s in rows if rows[s].get("torch_ms")], 0.4,
                   label="PyTorch eager")
        ax.set_xticks(xs, [f"{s}\n{rows[s]['minilora_pct_peak']:.0f}% of GEMM peak" for s in rows])
        ax.set_ylabel("time per training step (ms)")
        ax.set_title(f"{cfg} config")
        ax.legend()
    fig.suptitle(f"One training step, minilora vs PyTorch eager, {result['threads']} BLAS thread(s), "
                 f"shared machine, {result['date']}: lower is faster")
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--configs", default="default,bench")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-concurrency", action="store_true")
    ap.add_argument("--concurrency-steps", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/speed.json")
    ap.add_argument("--figure", default="figures/speed.png")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_loop(args.worker, args.threads)
        return

    try:
        if args.no_torch:
            raise ImportError
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    with threadpool_limits(args.threads):
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    peak = gemm_peak(args.threads)
    print(f"BLAS threads {args.threads}: {blas}; torch {torch_version}; float32 GEMM peak {peak:.0f} GFLOP/s")
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} "
                   f"at the start; Python "
                   f"{platform.python_version()}, NumPy {np.__version__}, torch {torch_version}",
        "blas": blas, "threads": args.threads, "repeats": args.repeats, "batch": BATCH,
        "gemm_peak_gflops": peak, "configs": {},
    }
    for cfg_name in args.configs.split(","):
        config = model_config(cfg_name)
        tokens = BATCH * config.context_length
        rows = {}
        for strategy in args.strategies.split(","):
            steppers = {"minilora": minilora_stepper(config, strategy)}
            if torch_version and strategy in TORCH_STRATEGIES:
                steppers["torch"] = torch_stepper(config, strategy, args.threads)
            med, raw = time_interleaved(steppers, args.threads, args.repeats)
            flops = flops_per_step(config, strategy)
            row = {"flops": flops, "minilora_ms": 1e3 * med["minilora"],
                   "minilora_tokens_per_s": tokens / med["minilora"],
                   "minilora_gflops": flops / med["minilora"] / 1e9,
                   "minilora_pct_peak": 100 * flops / med["minilora"] / 1e9 / peak,
                   "raw_ms": {k: [round(1e3 * t, 2) for t in v] for k, v in raw.items()}}
            if "torch" in med:
                row.update(torch_ms=1e3 * med["torch"], torch_gflops=flops / med["torch"] / 1e9,
                           minilora_over_torch=med["minilora"] / med["torch"])
            rows[strategy] = row
            vs = f", torch {row['torch_ms']:.1f} ms, ratio {row['minilora_over_torch']:.2f}" if "torch" in med else ""
            print(f"{cfg_name:8s} {strategy:7s} minilora {row['minilora_ms']:.1f} ms, "
                  f"{row['minilora_tokens_per_s']:.0f} tok/s, {row['minilora_gflops']:.0f} GFLOP/s "
                  f"({row['minilora_pct_peak']:.0f}% of peak){vs}", flush=True)
        entry = {"model": config.to_dict(), "tokens_per_step": tokens, "strategies": rows}
        if "full" in rows and "lora" in rows:
            entry["lora_over_full"] = rows["lora"]["minilora_ms"] / rows["full"]["minilora_ms"]
            print(f"{cfg_name}: LoRA / full step time (minilora) = {entry['lora_over_full']:.2f}")
        result["configs"][cfg_name] = entry
    if not args.no_concurrency:
        result["concurrency"] = concurrency(args.concurrency_steps)
        print("concurrency:", json.dumps(result["concurrency"], indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.figure:
        os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
        speed_figure(result).savefig(args.figure, dpi=120)
    print(markdown_table(result))
    print(f"wrote {args.out}" + (f" and {args.figure}" if args.figure else ""))


LABELS = {"full": "full", "lora": "LoRA r=8 on q,k,v,o", "qlora": "QLoRA r=8 (NF4 base)", "dora": "DoRA r=8 on q,k,v,o",
          "prompt": "prompt, 16 vectors", "prefix": "prefix, 16 per layer", "ia3": "IA3 (l_k, l_v, l_ff)"}


def markdown_table(result):
    """The table of docs/hardware.md, from a speed.json (tests/test_docs_pages.py checks the page holds it)."""
    lines = ["| config | method | minilora ms | PyTorch ms | minilora / PyTorch | GFLOP/s | % of peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, entry in result["configs"].items():
        m = entry["model"]
        where = f"{name} (d {m['d_model']}, {m['n_layers']} layers, T {m['context_length']}, batch {result['batch']})"
        for strategy, row in entry["strategies"].items():
            torch_ms = f"{row['torch_ms']:,.0f}" if "torch_ms" in row else "-"
            ratio = f"{row['minilora_over_torch']:.2f}" if "torch_ms" in row else "-"
            lines.append(f"| {where} | {LABELS.get(strategy, strategy)} | {row['minilora_ms']:,.0f} | {torch_ms} | "
                         f"{ratio} | {row['minilora_gflops']:.0f} | {row['minilora_pct_peak']:.0f}% |")
            where = ""
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:  # the markdown table of the committed benchmarks/speed.json
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed.json")) as f:
            print(markdown_table(json.load(f)))
    else:
        main()
