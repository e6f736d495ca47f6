"""`minilora sweep tiny --out DIR --workers 2` on a grid of tiny cells: the real CLI path, in seconds.

Used by tests/test_sweep_faults.py and tests/test_locking.py as a subprocess:

    python tests/sweep_runner.py DIR [N_CELLS]

The study "tiny" is registered for this process only; everything else (the lock, the
workers, the signals, the one-line messages, the exit codes) is minilora's own.
"""

import sys

from minilora import cli, studies, sweep

TINY = dict(study="tiny", base="tiny", steps=8, eval_every=4, n_train=40, n_val=6, n_test=6, corpus_sentences=40,
            batch_size=4)


def grid(n):
    return [sweep.Cell(**TINY, lr=1e-3 * (i + 1)) for i in range(n)]


if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6
    studies.STUDIES["tiny"] = lambda out_dir, seeds: grid(n)
    studies.DEFAULT_SEEDS["tiny"] = 1
    sys.exit(cli.main(["sweep", "tiny", "--out", out, "--workers", "2"]))
