"""Step times of one training step on NumPy, CuPy and PyTorch eager, at four model sizes.

One step is what the training loop does: the loss and the gradients of every
parameter (forward and backward), global-norm clipping and AdamW, in float32,
on a fresh random batch. The median over the timed steps is reported, after one
untimed warm-up step (CuPy compiles its kernels and PyTorch picks its cuBLAS
algorithms there). Rows that cannot run say why: CuPy absent or no GPU, torch
absent or without CUDA.

    python benchmarks/gpu_steps.py                        # all four configs
    python benchmarks/gpu_steps.py --configs default --steps 2 --max-seconds 5   # a CPU smoke run

Expected output (the numbers depend on the machine; "-" and a note where a
backend could not run; on a CPU-only machine the cupy and torch-cuda columns
are "-"):

    minilora step times: forward + backward + clip + AdamW, float32, median ms per step (steps timed)
    2026-01-01  GPU: NVIDIA H200 (CuPy 13.x, torch 2.x)  CPU threads: 16

    config   d_model  layers  heads  context  batch  params  numpy ms     cupy ms    torch-cuda ms
    -------  -------  ------  -----  -------  -----  ------  -----------  ---------  -------------
    default  128      2       4      128      16     0.43M   ... (10)     ... (10)   ... (10)
    bench    256      4       4      256      16     3.2M    ... (10)     ... (10)   ... (10)
    big      1024     8       16     512      16     101M    ... (2)      ... (10)   ... (10)
    gpt2-small 768    12      12     1024     4      124M    ... (1)      ... (10)   ... (10)

The same GPT is written in plain torch below (pre-LayerNorm blocks, tanh GELU,
explicit masked-softmax attention, tied head, torch.optim.AdamW and
clip_grad_norm_) so that the comparison is between the same maths, not between
minilora and fused kernels.
"""

import argparse
import datetime
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minilora import model, optim  # noqa: E402
from minilora.model import SIZES, ModelConfig  # noqa: E402

CONFIGS = {
    "default": (ModelConfig(), 16),  # the package default model, batch 16
    "bench": (ModelConfig(d_model=256, n_layers=4, n_heads=4, context_length=256, d_ff=1024), 16),
    "big": (ModelConfig(d_model=1024, n_layers=8, n_heads=16, context_length=512, d_ff=4096), 16),
    "gpt2-small": (SIZES["gpt2-small"], 4),  # GPT-2 small's shapes, 124M, T = 1024, batch 4
}
LR, CLIP, WD = 1e-3, 1.0, 0.1


def _cupy():
    """(cupy, None) or (None, why it cannot run)."""
    try:
        import cupy
    except ImportError:
        return None, "CuPy not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no GPU visible to CuPy"
    except Exception as e:
        return None, f"CUDA not usable ({type(e).__name__})"
    return cupy, None


def _torch():
    """(torch, None) or (None, why it cannot run)."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA here"
    return torch, None


def _time_steps(step, sync, steps, max_seconds):
    """Median ms of `step` over up to `steps` timed calls (at least one), after one warm-up."""
    step(-1)
    sync()
    times, start = [], time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(1000.0 * (time.perf_counter() - t0))
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), len(times)


def _batch(config, batch_size, i):
    rng = np.random.default_rng(1000 + i)
    x = rng.integers(0, config.vocab_size, (batch_size, config.context_length))
    return x, rng.integers(0, config.vocab_size, x.shape)


def minilora_step_time(xp, config, batch_size, steps, max_seconds, sync=lambda: None):
    """Median ms of one minilora training step on array module xp."""
    params = model.params_to(model.init_params(config, 0), xp)
    trainable = list(params)
    state = optim.adamw_init(params, trainable)

    def step(i):
        x, y = _batch(config, batch_size, i)
        _, grads = model.loss_and_grads(params, config, {"x": x, "y": y}, trainable)
        optim.clip_grad_norm(grads, CLIP)
        optim.adamw_step(params, grads, state, LR, weight_decay=WD)

    return _time_steps(step, sync, steps, max_seconds)


def torch_gpt(torch, config, device):
    """The same GPT in PyTorch eager: (params dict of leaf tensors, loss_fn(x, y) -> scalar tensor)."""
    F = torch.nn.functional
    params = {n: torch.tensor(p, device=device, requires_grad=True)
              for n, p in model.init_params(config, 0).items()}
    C, NH = config.d_model, config.n_heads

    def linear(x, prefix):
        return F.linear(x, params[prefix + ".W"], params.get(prefix + ".b"))

    def loss_fn(x, y):
        B, T = x.shape
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)
        h = params["wte"][x] + params["wpe"][:T]
        for i in range(config.n_layers):
            p = f"h.{i}."
            a = F.layer_norm(h, (C,), params[p + "ln_1.g"], params[p + "ln_1.b"], 1e-5)
            q, k, v = (linear(a, p + f"attn.{n}").view(B, T, NH, C // NH).transpose(1, 2) for n in "qkv")
            s = (q @ k.transpose(-1, -2)) / math.sqrt(C // NH)
            o = (torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
            h = h + linear(o, p + "attn.o")
            m = F.layer_norm(h, (C,), params[p + "ln_2.g"], params[p + "ln_2.b"], 1e-5)
            h = h + linear(F.gelu(linear(m, p + "mlp.fc"), approximate="tanh"), p + "mlp.proj")
        h = F.layer_norm(h, (C,), params["ln_f.g"], params["ln_f.b"], 1e-5)
        logits = h @ params["wte"].T  # the head tied to wte
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1))

    return params, loss_fn


def torch_step_time(torch, config, batch_size, steps, max_seconds, device="cuda"):
    """Median ms of the same step written in PyTorch eager (on CUDA; "cpu" for the tests)."""
    params, loss_fn = torch_gpt(torch, config, device)
    opt = torch.optim.AdamW(params.values(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)

    def step(i):
        x, y = (torch.as_tensor(a, device=device) for a in _batch(config, batch_size, i))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), CLIP)
        opt.step()
        loss.item()  # minilora's step returns the loss as a float too

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return _time_steps(step, sync, steps, max_seconds)


def _cell(result):
    return "-" if result is None else f"{result[0]:.1f} ({result[1]})"


def format_table(rows):
    header = ("config", "d_model", "layers", "heads", "context", "batch", "params", "numpy ms", "cupy ms",
              "torch-cuda ms")
    lines = [header] + rows
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per cell (after one warm-up)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="stop timing a cell after this long")
    args = ap.parse_args(argv)

    cupy, cupy_why = _cupy()
    torch, torch_why = _torch()
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode() if cupy else None
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (cupy, torch) if m is not None)
    print("minilora step times: forward + backward + clip + AdamW, float32, median ms per step (steps timed)")
    print(f"{datetime.date.today()}  GPU: {gpu or 'none'}" + (f" ({versions})" if versions else "")
          + f"  CPU threads: {os.cpu_count()}\n")
    rows = []
    for name in args.configs:
        config, batch = CONFIGS[name]
        timed = {"numpy": minilora_step_time(np, config, batch, args.steps, args.max_seconds)}
        timed["cupy"] = None if cupy is None else minilora_step_time(
            cupy, config, batch, args.steps, args.max_seconds, cupy.cuda.Device().synchronize)
        timed["torch"] = None if torch is None else torch_step_time(torch, config, batch, args.steps,
                                                                    args.max_seconds)
        n = sum(math.prod(s) for s in model.param_shapes(config).values())
        rows.append((name, str(config.d_model), str(config.n_layers), str(config.n_heads),
                     str(config.context_length), str(batch), f"{n / 1e6:.2g}M",
                     _cell(timed["numpy"]), _cell(timed["cupy"]), _cell(timed["torch"])))
        if cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()
    print(format_table(rows))
    for label, why in (("cupy", cupy_why), ("torch-cuda", torch_why)):
        if why:
            print(f"{label}: skipped ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
