"""Issue 19, class 6: an error names the option that is wrong, and every setting is checked before
the folder is claimed and before any work starts.

Each case is a command that must fail with exit 2, one line starting with the option to blame,
with no training started and no output folder created.
"""

import os
import pickle

import pytest

from minilora import cli, demo, finetune, lock, pretrain, sweep, tasks

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pretrained base, a LoRA run on it, a second base, a pickled file and records."""
    d = tmp_path_factory.mktemp("names")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        tasks.save_jsonl(tasks.make_instruction_records("subject", 30, seed=1), "my.jsonl")
        (d / "short.txt").write_text("the cat sleeps.\n" * 4)
        with open(d / "pickled.npz", "wb") as f:
            pickle.dump({"step": 3}, f)
        (d / "a-file").write_text("")
        os.mkdir(d / "no-adapter")
        base = ["pretrain", "--steps", "4", "--batch-size", "2", "--eval-every", "4", *TINY]
        assert cli.main([*base, "--out", "base"]) == 0
        assert cli.main([*base, "--out", "base2", "--seed", "1"]) == 0
        assert cli.main(["finetune", "--checkpoint", "base", "--data", "my.jsonl", "--steps", "2",
                         "--batch-size", "2", "--out", "lora"]) == 0
        assert cli.main(["finetune", "--checkpoint", "base2", "--data", "my.jsonl", "--steps", "2",
                         "--batch-size", "2", "--out", "lora2"]) == 0
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture
def no_work(monkeypatch):
    """Training, pretraining a base or running the demo fails the test: errors must come first."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    for module, name in ((pretrain, "train"), (finetune, "train"), (sweep, "load_base"),
                         (demo, "load_or_pretrain")):
        monkeypatch.setattr(module, name, work)


FT = ["finetune", "--checkpoint", "base", "--data", "my.jsonl", "--batch-size", "2"]
CASES = [
    (["pretrain", "--context-length", "100000", "--out", "new"], "--context-length: expected at most"),
    (["pretrain", "--text", "short.txt", "--context-length", "100", "--out", "new"], "--text: expected at least"),
    (["generate", "--checkpoint", "base", "--adapter", "no-adapter"], "--adapter: no-adapter: expected a LoRA run"),
    (["generate", "--checkpoint", "base", "--adapter", "lora2"], "--adapter: lora2/adapter.npz: was trained on"),
    (["generate", "--checkpoint", "base", "--adapter", "pickled.npz"], "--adapter: pickled.npz: is not a minilora"),
    (["generate", "--checkpoint", "lora/adapter.npz"], "--checkpoint: lora/adapter.npz: expected a model"),
    (["pretrain", "--resume", "pickled.npz", "--out", "new"], "--resume: pickled.npz: is not a minilora"),
    ([*FT, "--resume", "pickled.npz", "--out", "new"], "--resume: pickled.npz: is not a minilora"),
    ([*FT, "--resume", "base", "--steps", "5"], "not of a 'finetune' run"),
    (["pretrain", "--steps", "10", "--warmup-steps", "50", "--out", "new"], "--warmup-steps: expected at most"),
    ([*FT, "--steps", "10", "--warmup-steps", "50", "--out", "new"], "--warmup-steps: expected at most"),
    (["pretrain", "--lr", "1e30", "--out", "new"], "--lr: expected a learning rate in [1e-30, 10]"),
    ([*FT, "--alpha", "1e300", "--out", "new"], "--alpha: expected alpha / r in"),
    ([*FT, "--rank", "4", "--alpha", "1e-30", "--out", "new"], "--alpha: expected alpha / r in"),
    (["demo", "--fast", "--figures", "a-file/figures", "--out", "new"], "--figures: cannot write"),
    (["sweep", "forgetting", "--out", "new", "--workers", "0"], "--workers: expected an integer >= 1"),
    (["sweep", "forgetting", "--out", "new", "--seeds", "-1"], "--seeds: expected an integer >= 1"),
    (["sweep", "format", "--out", "new"], "study: this study uses the learning rates chosen by 'forgetting'"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a[:4]) for a, _ in CASES])
def test_an_error_names_the_right_option_before_any_work(runs, monkeypatch, capsys, no_work, argv, expected):
    monkeypatch.chdir(runs)
    before = set(os.listdir(runs))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, (expected, err)
    assert set(os.listdir(runs)) == before  # no folder claimed, nothing written
    assert "give --steps" not in err  # never advice that is then refused too


def test_a_folder_another_process_holds_is_refused_before_any_work(runs, monkeypatch, capsys, no_work):
    monkeypatch.chdir(runs)
    import multiprocessing
    import signal

    fork = multiprocessing.get_context("fork")
    ready = fork.Event()

    def hold():
        with lock.hold("held"):
            ready.set()
            signal.pause()

    holder = fork.Process(target=hold, daemon=True)
    holder.start()
    try:
        assert ready.wait(30)
        assert cli.main([*FT, "--steps", "2", "--out", "held"]) == 2
        err = capsys.readouterr().err
        assert f"--out: 'held' is in use by process {holder.pid}" in err and len(err.splitlines()) == 1
        assert os.listdir(runs / "held") == [lock.LOCK_NAME]  # nothing of ours written there
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
