"""Benchmark: each tutorial's wall time in full mode, run the way a learner runs them, in order.

    python benchmarks/tutorial_times.py [--threads N] [--runs DIR] [--figures figures]
                                        [--out benchmarks/tutorial_times.json]

Run by hand, not by the tests (about 15 minutes on 2 cores). Every tutorial runs as a
plain script (`python tutorials/NN_*.py`) in full mode, one after the other, sharing one
fresh runs folder, exactly as a learner working through them shares `runs/`: tutorial 02
pretrains the model into RUNS/pretrain, and the later tutorials load it from there. So
02's time includes pretraining, and the others' times are with its model already saved
(a later tutorial run first pays that pretraining on top). Each tutorial pins its own BLAS
threads as the `minilora` command does (backend.limit_blas_threads: 1, or $MINILORA_THREADS,
which --threads sets), so these are the times of `python tutorials/NN_*.py` as written; the
count is written to the JSON with the machine and the date. Time on an otherwise idle machine. A tutorial that fails stops the
benchmark with its output. The figures go to --figures (default: figures/, the
committed ones).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from minilora.backend import DEFAULT_THREADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"BLAS threads for every tutorial, through MINILORA_THREADS (default {DEFAULT_THREADS}, "
                        "what a tutorial uses when run as written)")
    p.add_argument("--runs", default=None, help="the shared runs folder (default: a fresh temporary folder)")
    p.add_argument("--figures", default=os.path.join(ROOT, "figures"), help="where the tutorials' figures go")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "tutorial_times.json"))
    p.add_argument("--only", default=None, help="comma-separated tutorial numbers, e.g. 06,07 (default: all)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    runs = args.runs or tempfile.mkdtemp(prefix="minilora-tutorial-runs-")
    tutorials = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))
    if args.only:
        wanted = set(args.only.split(","))
        tutorials = [t for t in tutorials if os.path.basename(t)[:2] in wanted]
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_FAST"}
    env.update({"MINILORA_THREADS": str(args.threads), "MPLBACKEND": "Agg", "MINILORA_BACKEND": "numpy",
                "MINILORA_RUNS": runs, "MINILORA_FIGURES": args.figures,
                "MINILORA_STUDIES": os.path.join(ROOT, "benchmarks", "studies")})
    times = {}
    for path in tutorials:
        name = os.path.basename(path)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, path], env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{name} failed after {wall:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        times[name] = round(wall, 1)
        print(f"{name:45s} {wall:6.1f} s", flush=True)
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "threads": args.threads, "mode": "full (MINILORA_FAST unset), in order, one shared runs folder",
              "seconds": times}
    if not args.only:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
