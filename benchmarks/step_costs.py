"""Benchmark: every method's training step at the default config, timed in turn in one process.

    python benchmarks/step_costs.py [--threads 1] [--repeats 25] [--config default] [--out benchmarks/step_costs.json]

speed.py times one method at a time beside PyTorch, so two methods' times come from different
minutes; on a shared machine whose speed drifts from minute to minute that is a comparison of
minutes as much as of methods. Here the steps of all seven methods (full, LoRA, QLoRA, DoRA,
prompt, prefix, IA3; speed.py builds them) run round-robin, a b c ... a b c, so each round
sees the same machine, and the median of each is reported with its ratio to full fine-tuning's
step in the same run. That ratio is the cost of a step per method the README's method table
shows. --config tiny only checks that it runs.
"""

import argparse
import datetime
import json
import os
import platform

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as minilora/__init__.py does, before NumPy loads OpenBLAS

import numpy as np

from speed import STRATEGIES, minilora_stepper, model_config, time_interleaved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--config", default="default", choices=["default", "bench", "tiny"])
    ap.add_argument("--out", default="benchmarks/step_costs.json")
    args = ap.parse_args()
    config = model_config(args.config)
    steppers = {s: minilora_stepper(config, s) for s in STRATEGIES}
    med, raw = time_interleaved(steppers, args.threads, args.repeats)
    rows = {s: {"ms": 1e3 * med[s], "over_full": med[s] / med["full"],
                "spread_ms": [round(1e3 * float(np.percentile(raw[s], q)), 2) for q in (25, 75)]} for s in STRATEGIES}
    for s, r in rows.items():
        print(f"{s:7s} {r['ms']:7.1f} ms (interquartile {r['spread_ms'][0]}-{r['spread_ms'][1]}), "
              f"{r['over_full']:.2f} x full's step")
    result = {"date": datetime.date.today().isoformat(), "config": args.config, "model": config.to_dict(),
              "threads": args.threads, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average "
                         f"{os.getloadavg()[0]:.1f} at the end; NumPy {np.__version__}",
              "strategies": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
