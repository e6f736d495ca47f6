"""Do two versions of the code compute the same study cells? Short cells (100 steps) of full, LoRA and DoRA.

    python benchmarks/same_numbers.py OUT.json [--bases-dir DIR]

Run it once per version (PYTHONPATH=a checkout of the other commit), then compare the two files:

    python benchmarks/same_numbers.py --compare A.json B.json

The forgetting study's rerun ran its first cells (full, LoRA, part of DoRA) under one commit and the rest under
a later one (every record names its `code`); this is the check that the later code reproduces the earlier one's
records bit for bit, with the same base (benchmarks/studies/forgetting/same_numbers.json keeps the comparison).

Bit-identity is a claim about one machine: float32 sums depend on the CPU's BLAS kernel, the library build and
the thread count, so two code versions agree bit for bit only when both ran where these files were made. Each
file records that machine (`machine`), and --compare refuses to call two files from different machines identical.
"""

import argparse
import json
import sys


def machine():
    """What float32 bit-identity depends on: the CPU, NumPy, its BLAS and the kernel it chose."""
    import platform

    import numpy
    from threadpoolctl import threadpool_info

    blas = [{k: b.get(k) for k in ("internal_api", "version", "architecture")} for b in threadpool_info()
            if b.get("user_api") == "blas"]
    return {"machine": platform.machine(), "processor": platform.processor() or None, "numpy": numpy.__version__,
            "blas": blas, "python": platform.python_version()}


def run(out, bases_dir):
    from minilora import sweep

    result = {"machine": machine()}
    for method in ("full", "lora", "dora"):
        cell = sweep.Cell("forgetting", method=method, lr=3e-4 if method == "full" else 3e-3, seed=1, steps=100,
                          eval_every=50)
        r = sweep.run_cell(cell, bases_dir, threads=1)
        result[method] = {"code": r["code"], "base_fingerprint": r["base_fingerprint"], "evals": r["evals"],
                          "train_loss": r["train_loss"], "test_metric": r["test_metric"]}
    with open(out, "w") as f:
        json.dump(result, f)


def compare(a_path, b_path):
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    if a.get("machine") != b.get("machine"):
        sys.exit(f"--compare: {a_path} and {b_path} were made on different machines ({a.get('machine')} vs "
                 f"{b.get('machine')}); float32 bit-identity is only expected on one")
    same = {"machine": a.pop("machine", None)}
    b.pop("machine", None)
    for method in a:
        strip = lambda r: {k: v for k, v in r.items() if k != "code"}  # noqa: E731
        same[method] = {"codes": [a[method]["code"], b[method]["code"]],
                        "bit_identical": strip(a[method]) == strip(b[method]),
                        "corpus_loss_at_step_100": [a[method]["evals"][-1]["corpus_loss"],
                                                    b[method]["evals"][-1]["corpus_loss"]]}
    print(json.dumps(same, indent=1))
    return 0 if all(s["bit_identical"] for m, s in same.items() if m != "machine") else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--bases-dir", default="benchmarks/studies/bases")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.paths))
    run(args.paths[0], args.bases_dir)
