"""Benchmark: the demo from scratch on the built-in defaults, timed, with the issues' targets asserted.

    python benchmarks/demo_benchmark.py [--out benchmarks/runs]

Measures (and asserts):
- `minilora pretrain` with its defaults reaches a validation loss within 5% of
  the toy language's entropy floor, in at most 3 minutes of wall time;
- on the default generative task, at equal steps, LoRA r=8 on q,k,v,o reaches
  at least 95% of full fine-tuning's exact match with at most 5% of its
  trainable parameters; prompt tuning is reported beside them;
- the whole demo (pretraining included) takes under 10 minutes.
Writes benchmarks/results.json; README quotes it. It times the command as a user
runs it: `minilora demo` on its defaults, whose BLAS threads the CLI pins to
cli.DEFAULT_THREADS (1), pinned here the same way. Time it on an otherwise idle machine.
With --slow-tests it then runs every tutorial in full mode (pytest -m slow), whose
`if not FAST` claims are asserted there and nowhere else.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import time

import numpy as np
from threadpoolctl import threadpool_limits

from minilora.cli import DEFAULT_THREADS
from minilora.demo import run_demo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/runs")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--slow-tests", action="store_true",
                    help="then run the slow tests: every tutorial in full mode, its claims asserted (15-25 min)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # pretrain from scratch, never reuse
    t0 = time.perf_counter()
    with threadpool_limits(limits=DEFAULT_THREADS, user_api="blas"):  # as `minilora demo` does
        demo = run_demo(out_dir=args.out, figures_dir=args.figures, log=print)
    total = time.perf_counter() - t0
    rows = demo["rows"]
    pre = demo["pretrain"]
    by = {(r["task"], r["method"]): r for r in rows}
    full, lora = by[("subject", "full")], by[("subject", "lora")]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"NumPy {np.__version__}, BLAS threads {DEFAULT_THREADS}",
        "threads": DEFAULT_THREADS,
        "command": "minilora demo",
        "pretrain": pre,
        "pretrain_gap_percent": 100 * (pre["val_loss"] / pre["floor"] - 1),
        "lora_over_full_metric": lora["metric"] / full["metric"] if full["metric"] else None,
        "lora_trainable_fraction": lora["trainable_params"] / full["trainable_params"],
        "demo_wall_s": total,
        "grammatical_fraction": demo["grammatical_fraction"],
        "samples": demo["samples"],
        "rows": rows,
    }
    with open("benchmarks/results.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    assert pre["val_loss"] <= 1.05 * pre["floor"], "pretraining did not reach 5% of the floor"
    assert pre["wall_s"] <= 180, "pretraining took more than 3 minutes"
    assert lora["metric"] >= 0.95 * full["metric"], "LoRA below 95% of full fine-tuning"
    assert result["lora_trainable_fraction"] <= 0.05, "LoRA trains more than 5% of full's parameters"
    assert total <= 600, "the demo took more than 10 minutes"
    print("all benchmark targets met")
    if args.slow_tests:
        import subprocess
        import sys

        rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "slow", "tests/test_tutorials.py"])
        assert rc == 0, "a tutorial's full-mode claim failed"


if __name__ == "__main__":
    main()
