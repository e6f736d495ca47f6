"""Issue 19, class 4: resume is exact, or refused.

- more (or fewer) --steps than the checkpoint's run is refused (tests/test_train.py, test_cli.py);
- what a run trained on is compared by content: the same bytes under another name resume, other bytes
  under the same name are refused;
- data from a pipe or a FIFO is read once, and the hash is of what was read;
- a log torn by a full disk is recovered (its last line dropped); another bad line is named;
- SIGINT or SIGTERM before or after the training loop is one line that says what --resume will do.
"""

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading

import pytest

from minilora import tasks
from minilora.checkpoint import load_checkpoint
from minilora.corpus import make_text
from minilora.validate import read_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
FT = ["finetune", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2"]


def _cli(argv, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "minilora.cli", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tasks.save_jsonl(tasks.make_instruction_records("subject", 40, seed=1), d / "a.jsonl")
    tasks.save_jsonl(tasks.make_instruction_records("subject", 40, seed=2), d / "other.jsonl")
    (d / "b.jsonl").write_bytes((d / "a.jsonl").read_bytes())  # the same bytes, another name
    (d / "my.txt").write_text(make_text(300, seed=1))
    (d / "copy.txt").write_text(make_text(300, seed=1))
    (d / "changed.txt").write_text(make_text(300, seed=2))
    done = _cli(["pretrain", "--steps", "4", "--batch-size", "2", "--eval-every", "4", *TINY], d)
    assert done.returncode == 0, done.stderr
    return d


def test_training_data_is_compared_by_content_not_by_name(work):
    assert _cli([*FT, "--data", "a.jsonl", "--out", "ft"], work).returncode == 0
    same = _cli([*FT, "--data", "b.jsonl", "--resume", "ft"], work)  # renamed: the same records
    assert same.returncode == 0, same.stderr
    other = _cli([*FT, "--data", "other.jsonl", "--resume", "ft"], work)
    assert other.returncode == 2 and "data_sha256" in other.stderr and len(other.stderr.splitlines()) == 1
    pre = ["pretrain", "--steps", "4", "--batch-size", "2", "--eval-every", "4", *TINY]
    assert _cli([*pre, "--text", "my.txt", "--out", "pre"], work).returncode == 0
    assert _cli([*pre, "--text", "copy.txt", "--resume", "pre"], work).returncode == 0
    changed = _cli([*pre, "--text", "changed.txt", "--resume", "pre"], work)
    assert changed.returncode == 2 and "text_sha256" in changed.stderr, changed.stderr


def _feed(path_or_fd, data):
    """Write data once into a FIFO path or a pipe's write end, then close it (a background thread)."""
    def write():
        with open(path_or_fd, "wb") as f:
            f.write(data)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_data_from_a_fifo_or_a_pipe_is_read_once_and_hashed_as_read(work, tmp_path):
    data = (work / "a.jsonl").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    fifo = str(tmp_path / "records.fifo")
    os.mkfifo(fifo)
    _feed(fifo, data)
    # in this process: read twice, the second time from what was read (re-opening would block forever)
    assert read_input(fifo, "--data") == (data, digest) and read_input(fifo, "--data")[1] == digest
    # a FIFO written once, given to the command: it finishes, and records the hash of the records it read
    os.remove(fifo)
    os.mkfifo(fifo)
    writer = _feed(fifo, data)
    done = _cli([*FT, "--data", fifo, "--out", str(tmp_path / "fifo-run")], work)
    writer.join(5)
    assert done.returncode == 0, done.stderr
    meta = load_checkpoint(tmp_path / "fifo-run" / "checkpoint.npz")[1]
    assert meta["finetune"]["data_sha256"] == digest
    # `--data <(cat a.jsonl)`: a /dev/fd/N pipe
    read_end, write_end = os.pipe()
    writer = _feed(write_end, data)
    done = _cli([*FT, "--data", f"/dev/fd/{read_end}", "--out", str(tmp_path / "pipe-run")], work,
                pass_fds=(read_end,))
    os.close(read_end)
    writer.join(5)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "pipe-run" / "checkpoint.npz")[1]["finetune"]["data_sha256"] == digest


def test_a_log_torn_by_a_full_disk_is_recovered_and_another_bad_line_is_named(work):
    argv = ["pretrain", "--steps", "4", "--batch-size", "2", "--eval-every", "4", "--out", "torn", *TINY]
    assert _cli(argv, work).returncode == 0
    log = work / "torn" / "log.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 5, "train_loss": 1.2, "lr": 0.0')  # the disk filled mid-line
    done = _cli([*argv, "--resume", "torn"], work)
    assert done.returncode == 0, done.stderr
    assert log.read_text() == whole
    lines = whole.splitlines()
    log.write_text("\n".join([lines[0], '{"step": 1, "train_l', *lines[1:]]) + "\n")  # not the last line
    done = _cli([*argv, "--resume", "torn"], work)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "log.jsonl: line 2" in done.stderr and "Traceback" not in done.stderr


# A command whose task scoring sends it a signal on the n-th call: call 1 is the score of the base model,
# before the training loop; call 2 the final score, after it.
_SIGNAL_AT_SCORE = """
import os, signal, sys
from minilora import cli, finetune
calls, real = [], finetune.score
def score(*a, **k):
    calls.append(1)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.{sig})
    return real(*a, **k)
finetune.score = score
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_or_after_the_training_loop_is_one_line_saying_what_resume_does(work, sig):
    name = signal.Signals(sig).name
    # before the loop: nothing saved, and no empty folder left behind
    out = f"before-{name}"
    argv = [*FT, "--data", "a.jsonl", "--out", out]
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AT_SCORE.format(n=1, sig=name), *argv], cwd=work,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + sig and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"interrupted ({name})" in done.stderr and "nothing was saved" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(work / out)
    # after the loop: the final checkpoint is kept; --resume only scores the run and writes its summary
    out = f"after-{name}"
    argv = [*FT, "--data", "a.jsonl", "--out", out]
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AT_SCORE.format(n=2, sig=name), *argv], cwd=work,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + sig and len(done.stderr.splitlines()) == 1, done.stderr
    assert "training had finished (step 4 of 4)" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(work / out / "summary.json")
    resume = shlex.split(done.stderr.split("to resume: ", 1)[1])
    assert resume[-2:] == ["--resume", out]
    again = _cli(resume[1:], work)
    assert again.returncode == 0, again.stderr
    summary = json.loads((work / out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_train_loss"] is not None
