"""Issue 19, class 5: a sweep stops cleanly and keeps every finished cell.

Fault injection on a real `minilora sweep` (tests/sweep_runner.py: 6 tiny cells, 2 workers),
stopped at random moments by Ctrl-C (SIGINT to the whole process group, as a terminal sends it),
SIGINT to the parent alone, SIGTERM (the parent alone) and SIGKILL (the parent alone). After each:

- Ctrl-C / SIGTERM: exit 130 / 143 within seconds, one line, no traceback, naming the cells kept;
- every cell the sweep reported as finished is in results.jsonl, every line is whole, no cell twice;
- no worker outlives its parent (SIGKILL included);
- running the same command again finishes the grid, each cell exactly once.
"""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sweep_runner

from minilora import sweep
from minilora.train import Interrupted
from minilora.validate import FileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "sweep_runner.py")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
N_CELLS = 6
# (signal, to the whole process group?, trials): each trial stops the sweep at a random moment of its run
TRIALS = [(signal.SIGINT, True, 2), (signal.SIGINT, False, 1), (signal.SIGTERM, False, 2),
          (signal.SIGKILL, False, 2)]


def test_interrupted_and_the_sweep_errors_survive_pickling():
    # the root cause of the 36-line BrokenProcessPool traceback: a worker's Interrupted did not unpickle
    for e in (Interrupted(signal.SIGINT, 5, None), Interrupted(signal.SIGTERM, 3, "runs/x/checkpoint.npz"),
              Interrupted(signal.SIGINT)):
        back = pickle.loads(pickle.dumps(e))
        assert (back.signum, back.step, back.checkpoint, str(back), back.exit_code) == \
            (e.signum, e.step, e.checkpoint, str(e), e.exit_code)
    s = pickle.loads(pickle.dumps(sweep.SweepInterrupted(signal.SIGTERM, 2, 6, "d/results.jsonl")))
    assert (s.kept, s.total, s.exit_code) == (2, 6, 143)
    f = pickle.loads(pickle.dumps(FileError("a.npz", "bad", "meta.json: step", "adapter")))
    assert str(f) == "a.npz: meta.json: step: bad" and f.source == "adapter"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepfaults")
    sweep.load_base("tiny", str(d / "bases"))  # the runner's studies find it in DIR/../bases
    return d


def _children(pid):
    """The pids of pid's child processes (Linux /proc)."""
    out = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out |= {int(p) for p in f.read().split()}
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _running(pid):
    """True while pid is a live process (a zombie, waiting to be reaped, has stopped running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _lines(path):
    try:
        with open(path) as f:
            return f.read().split("\n")
    except FileNotFoundError:
        return [""]


def _run(out, **kw):
    return subprocess.run([sys.executable, RUNNER, out, str(N_CELLS)], env=ENV, capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
@pytest.mark.parametrize("sig, group, trials", TRIALS,
                         ids=[signal.Signals(s).name + ("-group" if g else "-parent") for s, g, _ in TRIALS])
def test_a_sweep_stopped_at_a_random_moment_keeps_every_finished_cell_and_resumes(work, sig, group, trials):
    rng = np.random.default_rng(int(sig) + 100 * group)
    grid_keys = {c.key() for c in sweep_runner.grid(N_CELLS)}
    stopped_mid_grid = 0
    for trial in range(trials):
        out = str(work / f"{signal.Signals(sig).name}-{group}-{trial}")
        results = os.path.join(out, "results.jsonl")
        proc = subprocess.Popen([sys.executable, RUNNER, out, str(N_CELLS)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        # a random moment while the grid runs, whatever the machine's speed: once `target` cells (0 to N-2) are
        # in results.jsonl and the workers are up, after a random jitter
        target, jitter = int(rng.integers(0, N_CELLS - 1)), rng.uniform(0.0, 0.3)
        workers, deadline, fire_at = set(), time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            workers |= _children(proc.pid)
            if fire_at is None and workers and max(len(_lines(results)) - 1, 0) >= target:
                fire_at = time.monotonic() + jitter
            if fire_at is not None and time.monotonic() >= fire_at:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole process group
            else:
                proc.send_signal(sig)  # the parent alone
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - t0
        if proc.returncode == 0:  # the sweep finished before the signal: nothing to check but the grid
            continue
        if proc.returncode == -sig and sig != signal.SIGKILL and " cells run, " in stdout:
            # the sweep finished and said so, and the signal came while Python was exiting (its handlers are
            # the defaults again once cli.main has returned): every cell is kept, as when it came later
            assert {r["key"] for r in sweep.read_results(results)} == grid_keys
            continue
        stopped_mid_grid += 1
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 128 + sig, stderr
            assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
            assert f"interrupted ({signal.Signals(sig).name})" in stderr and "kept in" in stderr, stderr
            assert stopped_in < 10, stopped_in  # not minutes: the workers stop within seconds
        # no orphan: every worker has exited within a few seconds of its parent
        deadline = time.monotonic() + 5
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in workers), [p for p in workers if _running(p)]
        # every line whole, no cell twice, and every cell the sweep reported finished is kept
        lines = _lines(results)
        assert lines[-1] == "" and all(line for line in lines[:-1])
        records = sweep.read_results(results)
        assert len(records) == len(lines) - 1 and {r["key"] for r in records} <= grid_keys
        kept_lrs = {f"{r['cell']['lr']:g}" for r in records}
        reported = {line.split(" lr ")[1].split()[0] for line in stdout.splitlines() if line.startswith("[")}
        assert reported <= kept_lrs, (reported, kept_lrs)
        kept = len(records)
        if sig != signal.SIGKILL:
            assert f" {len(records)} of the " in stderr  # the count it names is the count kept
        # the same command again finishes the grid: each cell once
        again = _run(out)
        assert again.returncode == 0, again.stderr
        lines = _lines(results)
        records = sweep.read_results(results)
        assert {r["key"] for r in records} == grid_keys and len(lines) - 1 == N_CELLS
        print(f"{signal.Signals(sig).name} trial {trial}: stopped with {kept} of {N_CELLS} cells kept")
    assert stopped_mid_grid >= 1  # the faults came while the grid ran, not after it
