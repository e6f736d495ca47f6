"""Fault injection: work survives kills, interruptions and a full disk (issue 13).

1. SIGKILL at random points while a process writes checkpoints in a loop: the
   file on disk is always a whole checkpoint, the last one written or the one
   being written when the kill came (never a torn mix), and it loads.
2. SIGINT (and SIGTERM) to a real `python -m minilora.cli` run, then the
   `--resume` command it prints: the final checkpoint equals an uninterrupted
   run's bit for bit, for pretraining and for every fine-tuning method.
3. A disk that fills up during a save: the error propagates, one line from the
   CLI, and the previous checkpoint is untouched.
"""

import errno
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minilora import cli, tasks
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.corpus import make_text
from minilora.model import ModelConfig, init_params
from minilora.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
N_KILLS = 40
_REAL_SAVEZ = np.savez


# -- 1. SIGKILL during checkpoint writes ---------------------------------------------------------

def _save_forever(path, conn):
    """Write checkpoint versions 1, 2, 3, ... to path, each array filled with its version; report each."""
    version = 0
    while True:
        version += 1
        params = {"w": np.full((512, 512), version, np.float32), "b": np.full(7, version, np.float32)}
        save_checkpoint(path, params, {"version": version}, {"opt.m.w": np.full(3, version, np.float32)})
        conn.send(version)


def test_sigkill_during_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    rng = np.random.default_rng(0)
    fork = multiprocessing.get_context("fork")  # a real process, started in milliseconds
    torn_writes = 0
    for kill in range(N_KILLS):
        receive, send = fork.Pipe(duplex=False)
        writer = fork.Process(target=_save_forever, args=(path, send), daemon=True)
        writer.start()
        send.close()
        done = [receive.recv()]  # one whole save of this process is on disk
        time.sleep(rng.uniform(0.0, 0.03))  # then a kill at a random point of the following writes
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        try:
            while receive.poll():
                done.append(receive.recv())
        except EOFError:  # every report read
            pass
        params, meta, arrays = load_checkpoint(path)  # never a torn file
        version = meta["version"]
        # the last save reported, or the one after it if the kill came between its rename and its report
        assert done[-1] <= version <= done[-1] + 1, (kill, done[-1], version)
        for a in (params["w"], params["b"], arrays["opt.m.w"]):
            assert (a == version).all()  # one version throughout, never a mix
        leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        torn_writes += bool(leftovers)  # a temporary file left behind: the kill came mid-write
        for f in leftovers:
            os.remove(tmp_path / f)
    assert torn_writes >= N_KILLS // 4, f"only {torn_writes} of {N_KILLS} kills came during a write"


def test_the_next_save_removes_a_killed_writers_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, {"w": np.ones(3, np.float32)}, {"version": 1})
    orphan = tmp_path / ".checkpoint.npz.k3j2x9.tmp"  # what mkstemp left when SIGKILL came mid-write
    orphan.write_bytes(b"PK half a zip")
    other = tmp_path / ".log.jsonl.a1b2c3.tmp"  # another target's temporary file is not ours to remove
    other.write_bytes(b"")
    save_checkpoint(path, {"w": np.full(3, 2.0, np.float32)}, {"version": 2})
    assert not orphan.exists() and other.exists()
    params, meta, _ = load_checkpoint(path)
    assert meta["version"] == 2 and (params["w"] == 2.0).all()


# -- 2. SIGINT / SIGTERM, then --resume -----------------------------------------------------------

def _cli(argv, cwd):
    return subprocess.run([sys.executable, "-m", "minilora.cli", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _logged_steps(log):
    try:
        with open(log) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n") and '"step"' in line]
    except FileNotFoundError:
        return []


def _interrupt(argv, cwd, log, at_step, sig):
    """Start the command; send sig once the log shows at_step; return (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "minilora.cli", *argv], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        steps = _logged_steps(log)
        if steps and steps[-1] >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _assert_same_run(a, b):
    """Two run folders hold bit-identical final checkpoints, logs of the same losses, same adapters."""
    pa, ma, xa = load_checkpoint(os.path.join(a, "checkpoint.npz"))
    pb, mb, xb = load_checkpoint(os.path.join(b, "checkpoint.npz"))
    assert ma == mb  # step, RNG state, settings
    for one, other in ((pa, pb), (xa, xb)):
        assert set(one) == set(other)
        for name in one:
            assert one[name].dtype == other[name].dtype and np.array_equal(one[name], other[name]), name
    losses = [[(r["step"], r["train_loss"]) for r in map(json.loads, open(os.path.join(d, "log.jsonl")))
               if "step" in r] for d in (a, b)]
    assert losses[0] == losses[1]  # the log reads like one run: every step once, the same losses
    if os.path.exists(os.path.join(a, "adapter.npz")):
        aa, ab = load_checkpoint(os.path.join(a, "adapter.npz"))[0], load_checkpoint(os.path.join(b, "adapter.npz"))[0]
        assert all(np.array_equal(aa[n], ab[n]) for n in aa) and set(aa) == set(ab)
    if os.path.exists(os.path.join(a, "summary.json")):
        sa, sb = json.load(open(os.path.join(a, "summary.json"))), json.load(open(os.path.join(b, "summary.json")))
        assert sa["metric"] == sb["metric"] and sa["final_train_loss"] == sb["final_train_loss"]
    return len(pa) + len(xa)


def _interrupt_and_resume(argv, cwd, run, at_step, sig):
    """Interrupt `argv --out run`, check the one line it prints, run the resume command it gives."""
    code, err = _interrupt([*argv, "--out", run], cwd, os.path.join(cwd, run, "log.jsonl"), at_step, sig)
    name = signal.Signals(sig).name
    assert code == 128 + sig, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"interrupted ({name}) after step" in err and "checkpoint saved" in err
    stopped = load_checkpoint(os.path.join(cwd, run, "checkpoint.npz"))[1]["step"]
    assert at_step <= stopped < int(argv[argv.index("--steps") + 1])  # saved at a step boundary, mid-run
    resume = shlex.split(err.split("to resume: ", 1)[1])
    assert resume[0] == "minilora" and resume[-2:] == ["--resume", run]
    done = _cli(resume[1:], cwd)
    assert done.returncode == 0, done.stderr
    return stopped


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a tiny pretrained model (runs/pretrain), a small text (my.txt) and records (my.jsonl)."""
    d = tmp_path_factory.mktemp("faults")
    tasks.save_jsonl(tasks.make_instruction_records("subject", 60, seed=1), d / "my.jsonl")
    (d / "my.txt").write_text(make_text(400, seed=1))
    done = _cli(["pretrain", "--steps", "20", "--batch-size", "4", "--eval-every", "20", *TINY], d)
    assert done.returncode == 0, done.stderr
    return d


@pytest.mark.kernel  # two processes compared bit for bit: .ci/run runs it under other BLAS kernels too
def test_sigint_or_sigterm_then_resume_is_bit_identical_for_pretraining(work):
    argv = ["pretrain", "--text", "my.txt", "--steps", "120", "--batch-size", "4", "--eval-every", "50",
            "--dropout", "0.1", "--seed", "3", *TINY]
    done = _cli([*argv, "--out", "pre-straight"], work)
    assert done.returncode == 0, done.stderr
    for sig, run in ((signal.SIGINT, "pre-int"), (signal.SIGTERM, "pre-term")):
        _interrupt_and_resume(argv, str(work), run, 5, sig)
        _assert_same_run(os.path.join(work, "pre-straight"), os.path.join(work, run))


@pytest.mark.kernel
@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_sigint_then_resume_is_bit_identical_for_every_finetuning_method(work, method):
    argv = ["finetune", "--method", method, "--data", "my.jsonl", "--steps", "120", "--batch-size", "4",
            "--checkpoint-every", "1000", "--seed", "2"] + (["--lora-dropout", "0.1"] if method == "lora" else [])
    done = _cli([*argv, "--out", f"{method}-straight"], work)
    assert done.returncode == 0, done.stderr
    _interrupt_and_resume(argv, str(work), f"{method}-int", 5, signal.SIGINT)
    _assert_same_run(os.path.join(work, f"{method}-straight"), os.path.join(work, f"{method}-int"))


# -- 3. a full disk during a save -----------------------------------------------------------------

def _disk_fills_up_on_save(monkeypatch, failing_call):
    """numpy.savez writes half its bytes, then fails with ENOSPC, on the failing_call-th save."""
    real_savez, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(1)
        if len(calls) != failing_call:
            return real_savez(file, **arrays)
        file.write(b"PK\x03\x04" + b"\0" * 1000)  # a torn start of a zip
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez)


def test_disk_full_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    config = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16)
    data = np.arange(200) % config.vocab_size

    class Windows:
        def sample(self, rng):
            s = rng.integers(0, len(data) - 17, 4)[:, None] + np.arange(16)
            return {"x": data[s], "y": data[s + 1]}

    _disk_fills_up_on_save(monkeypatch, failing_call=2)  # the checkpoint of step 4 is written, step 8's fails
    params = init_params(config, 0)
    with pytest.raises(OSError) as e:
        train(params, list(params), config, Windows(), TrainConfig(steps=12, batch_size=4, warmup_steps=1,
                                                                           checkpoint_every=4),
              run_dir=tmp_path)
    assert e.value.errno == errno.ENOSPC
    saved, meta, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == 4 and set(saved) == set(params)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "log.jsonl"]  # no torn temporary file


def test_disk_full_through_the_cli_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "--steps", "6", "--batch-size", "2", "--eval-every", "6", "--checkpoint-every", "3", *TINY]
    _disk_fills_up_on_save(monkeypatch, failing_call=2)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    before = (tmp_path / "runs/pretrain/checkpoint.npz").read_bytes()
    assert load_checkpoint(tmp_path / "runs/pretrain/checkpoint.npz")[1]["step"] == 3
    monkeypatch.setattr(np, "savez", _REAL_SAVEZ)
    # the space is back: the run resumes from its last checkpoint
    assert cli.main([*argv, "--resume", "runs/pretrain"]) == 0
    assert load_checkpoint(tmp_path / "runs/pretrain/checkpoint.npz")[1]["step"] == 6
    assert before != (tmp_path / "runs/pretrain/checkpoint.npz").read_bytes()

