"""Time the site's full build from nothing, and a rebuild after a prose edit; write benchmarks/site_time.json.

    python benchmarks/site_time.py            # the full build (every tutorial and solution in full mode)
    python benchmarks/site_time.py --smoke    # the smoke build (fast mode), as CI runs it
    python benchmarks/site_time.py --keep build/site   # and keep the timed site (for the screenshots)

The build runs as README says (`sphinx-build -b html docs OUT`), with 1 BLAS thread as the tutorials use,
in a fresh work folder (MINILORA_SITE_WORK: no runs, no execution cache, MathJax installed from npm again),
so nothing an earlier build left helps it. The rebuild (`sphinx-build -E`: every page read again) then takes
every tutorial's outputs from the execution cache, as a rebuild after an edit to the prose does. Run it on an
otherwise idle machine: the times move with the load. The record says what the load was: the 1-minute load
average, sampled every 10 s through both builds (its mean and its highest), beside the machine's cores; a mean
above 1 (this build's own kernel) means other work shared the machine, and --note can say what.
"""

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_build(out, env, fresh_env=False):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", *(["-E"] if fresh_env else []),
                    os.path.join(ROOT, "docs"), out], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


class LoadSampler:
    """The 1-minute load average every `every` seconds, in a thread, while the with-block runs."""

    def __init__(self, every=10.0):
        self.every, self.samples, self._stop = every, [], threading.Event()

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        return {"mean_1min": round(sum(self.samples) / len(self.samples), 2), "max_1min": round(max(self.samples), 2),
                "samples": len(self.samples), "every_s": self.every, "cores": os.cpu_count()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="time the smoke build (MINILORA_FAST=1) instead")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "site_time.json"))
    parser.add_argument("--work", metavar="DIR", help="the build's work folder (runs, execution cache, MathJax), kept "
                        "afterwards; a missing or empty folder (default: a temporary one, removed)")
    parser.add_argument("--keep", metavar="DIR", help="copy the timed site to DIR (replacing it) before the work "
                        "folder is removed")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record (e.g. 'idle', "
                        "'other jobs running')")
    args = parser.parse_args()
    if args.work and os.path.exists(args.work) and os.listdir(args.work):
        parser.error(f"--work: expected a missing or empty folder (a build from nothing), got {args.work} with files")
    with (contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory()) as work:
        os.makedirs(work, exist_ok=True)
        env = {**os.environ, "MINILORA_SITE_WORK": work, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MINILORA_THREADS": "1"}
        env.pop("MINILORA_FAST", None)
        if args.smoke:
            env["MINILORA_FAST"] = "1"
        out = os.path.join(work, "site")
        with LoadSampler() as load_clean:
            clean = timed_build(out, env)
        with LoadSampler() as load_rebuild:
            rebuild = timed_build(out, env, fresh_env=True)
        n_pages = sum(f.endswith(".html") for _, _, files in os.walk(out) for f in files)
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(out, args.keep)
    mode = "smoke" if args.smoke else "full"
    record = {"date": time.strftime("%Y-%m-%d"), "mode": mode,
              "command": f"{'MINILORA_FAST=1 ' if args.smoke else ''}sphinx-build -b html docs build/site{'-smoke' if args.smoke else ''}",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "threads": 1, "clean_build_s": round(clean, 1), "rebuild_after_prose_edit_s": round(rebuild, 1),
              "tutorials": len(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py"))),
              "solutions": len(glob.glob(os.path.join(ROOT, "tutorials", "solutions", "[0-9][0-9]_*_solutions.py"))),
              "pages": n_pages, "load_clean_build": load_clean.summary(), "load_rebuild": load_rebuild.summary(),
              "note": args.note}
    previous = json.load(open(args.out)) if os.path.exists(args.out) else {}
    previous[mode] = record
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(previous, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"{mode} build from nothing: {clean:.0f} s (1-minute load {record['load_clean_build']['mean_1min']} on "
          f"average, {os.cpu_count()} cores); rebuild after a prose edit: {rebuild:.0f} s (wrote {args.out})")


if __name__ == "__main__":
    main()
