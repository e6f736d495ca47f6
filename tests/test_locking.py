"""Issue 19, class 3: a run folder (or a study folder) has one writer.

- N `minilora pretrain` started together on one --out: exactly one runs, the others refuse in one
  line, and the log and checkpoint are that one run's alone.
- two sweeps started together on one study folder: exactly one runs, the other refuses in one line,
  and results.jsonl holds each cell once.
- the lock is the kernel's (flock): a holder killed by SIGKILL leaves no stale lock.
- a study's records are counted by distinct cell, never by line; `--out ''` is refused everywhere.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import sweep_runner

from minilora import cli, lock, report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
N_WRITERS = 4


def _start(argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "minilora.cli", *argv], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_n_pretraining_runs_on_one_folder_one_runs_the_others_refuse(tmp_path):
    argv = ["pretrain", "--out", "shared", "--steps", "30", "--batch-size", "2", "--eval-every", "10",
            "--checkpoint-every", "5", *TINY]
    procs = [_start(argv, tmp_path) for _ in range(N_WRITERS)]
    done = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    winners = [d for d in done if d[0] == 0]
    losers = [d for d in done if d[0] != 0]
    assert len(winners) == 1, [d[2] for d in done]
    for code, _, err in losers:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "--out: 'shared'" in err and ("is in use by process" in err or "already holds a run" in err), err
    # nothing mixed: one header, every step once, in order; no temporary file, no lock left
    records = [json.loads(line) for line in open(tmp_path / "shared" / "log.jsonl")]
    assert sum("meta" in r for r in records) == 1
    assert [r["step"] for r in records if "step" in r] == list(range(1, 31))
    assert sorted(os.listdir(tmp_path / "shared")) == ["checkpoint.npz", "log.jsonl"]


def test_two_sweeps_on_one_study_folder_one_runs_the_other_refuses(tmp_path):
    sweep.load_base("tiny", str(tmp_path / "bases"))
    out = str(tmp_path / "study")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "sweep_runner.py"), out, "4"], env=ENV,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    done = sorted((p.wait(timeout=300), *p.communicate()) for p in procs)
    (ok, _, _), (refused, _, err) = done
    assert (ok, refused) == (0, 2), done
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "is in use by process" in err, err
    lines = open(os.path.join(out, "results.jsonl")).read().splitlines()
    assert len(lines) == 4 and {json.loads(line)["key"] for line in lines} == {c.key() for c in sweep_runner.grid(4)}


def _hold_forever(folder, ready):
    with lock.hold(folder):
        ready.set()
        signal.pause()


def test_the_lock_excludes_other_processes_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = str(tmp_path / "run")
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()
    holder = fork.Process(target=_hold_forever, args=(folder, ready), daemon=True)
    holder.start()
    assert ready.wait(30)
    with pytest.raises(lock.FolderInUse, match=f"--out: {folder!r} is in use by process {holder.pid}"):
        with lock.hold(folder):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the lock file stays, the kernel drops the lock
    holder.join()
    assert os.path.exists(os.path.join(folder, lock.LOCK_NAME))
    with lock.hold(folder):
        with lock.hold(folder):  # re-entrant within a process (a command, then the train() it calls)
            assert lock.held(folder)
    assert not lock.held(folder) and not os.path.exists(os.path.join(folder, lock.LOCK_NAME))


def test_concurrent_appends_never_tear_a_line_and_repair_a_torn_tail(tmp_path):
    path = str(tmp_path / "results.jsonl")
    with open(path, "w") as f:
        f.write('{"key": "a"}\n{"key": "cut sh')  # a writer killed mid-line
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=lambda i=i: [lock.append_line(path, json.dumps({"key": f"{i}-{j}", "pad": "x" * 5000}))
                                                for j in range(20)]) for i in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    lines = open(path).read().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 1 + 80
    assert {json.loads(line)["key"] for line in lines[:-1]} == {"a"} | {f"{i}-{j}" for i in range(4) for j in range(20)}


def test_a_studys_records_are_counted_by_distinct_cell(tmp_path):
    sweep.load_base("tiny", str(tmp_path / "bases"))
    record = sweep.run_cell(sweep_runner.grid(1)[0], str(tmp_path / "bases"))
    d = tmp_path / "forgetting"
    d.mkdir()
    (d / "results.jsonl").write_text((json.dumps(record) + "\n") * 3)  # one cell appended three times
    assert len(sweep.read_results(str(d / "results.jsonl"))) == 1
    text, _ = report.report(str(d))
    assert "1 cells" in text and "(n=1)" in text and "(n=3)" not in text


@pytest.mark.parametrize("argv", [
    ["pretrain", "--out", ""], ["finetune", "--out", ""], ["sweep", "forgetting", "--out", ""],
    ["demo", "--out", ""], ["merge", "runs/x", "--out", ""], ["plot", "log.jsonl", "--out", ""],
    ["pretrain", "--resume", ""], ["finetune", "--checkpoint", ""], ["pretrain", "--text", ""],
    ["finetune", "--data", ""], ["generate", "--adapter", ""],
])
def test_an_empty_path_is_refused_not_read_as_a_default(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "expected a path, got ''" in err, err
    assert os.listdir(tmp_path) == []  # nothing written, no runs/ folder
