"""Issue 33: no command's --out (with or without --overwrite) loses what it reads or any run.

Each refusal is one line, exit 2, before any work, and every file that was there is still there,
byte for byte (`snapshot` before, the same after).
"""

import os

import pytest

from minilora import cli
from refusals import refused

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]


def snapshot(root):
    """path -> bytes of every file under root (a folder or a file)."""
    root = str(root)
    if os.path.isfile(root):
        return {root: open(root, "rb").read()}
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[path] = f.read()
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """p/ holding a pretraining run p/pre, a LoRA run p/lora, and a file of the user's p/notes.txt."""
    root = tmp_path_factory.mktemp("p")
    assert cli.main(["pretrain", "--out", str(root / "pre"), "--steps", "2", "--eval-every", "2",
                     "--batch-size", "4", *TINY]) == 0
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--out", str(root / "lora"), "--steps", "2",
                     "--batch-size", "4"]) == 0
    (root / "notes.txt").write_text("the user's own notes\n")
    return root


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model fails the test: refusals come before any work."""
    from minilora import runs

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(runs, "load_model", load)


@pytest.mark.parametrize("out", ["RUN", "ROOT", "PARENT_OF_ROOT"])
def test_export_never_replaces_the_run_it_reads_nor_a_folder_above_it(runs_root, capsys, no_work, out):
    run = runs_root / "lora"
    target = {"RUN": run, "ROOT": runs_root, "PARENT_OF_ROOT": runs_root.parent}[out]
    before = snapshot(runs_root)
    refused(capsys, ["export", str(run), "--out", str(target), "--overwrite"], ["--out:", "reads"])
    assert snapshot(runs_root) == before


def test_export_never_replaces_another_run_or_a_folder_holding_one(runs_root, capsys, no_work):
    before = snapshot(runs_root)
    refused(capsys, ["export", str(runs_root / "lora"), "--out", str(runs_root / "pre"), "--overwrite"],
            ["--out:", "is a run folder", "never removes a run"])
    refused(capsys, ["export", str(runs_root / "pre") + "/checkpoint.npz", "--out", str(runs_root / "lora"),
                     "--overwrite"], ["--out:", "run folder"])
    assert snapshot(runs_root) == before


def test_export_over_a_file_is_refused_and_the_file_kept(runs_root, tmp_path, capsys, no_work):
    f = tmp_path / "f"
    f.write_bytes(b"a file of the user's\x00\x01")
    for extra in ([], ["--overwrite"]):
        refused(capsys, ["export", str(runs_root / "lora"), "--out", str(f), *extra], ["--out:", "is a file"])
        assert f.read_bytes() == b"a file of the user's\x00\x01"
        assert sorted(os.listdir(tmp_path)) == ["f"]  # nothing hidden beside it (.f.*.old)


def test_export_overwrite_replaces_only_an_earlier_export(runs_root, tmp_path, capsys):
    pytest.importorskip("safetensors"), pytest.importorskip("tokenizers")
    out = tmp_path / "hf"
    assert cli.main(["export", str(runs_root / "lora"), "--out", str(out)]) == 0
    assert cli.main(["export", str(runs_root / "pre"), "--out", str(out), "--overwrite"]) == 0  # an export: replaced
    assert not (out / "adapter").exists()
    assert cli.main(["export", str(runs_root / "lora"), "--out", str(out), "--overwrite"]) == 0  # adapter/ too
    assert (out / "adapter" / "adapter_config.json").exists()
    for mine in (out / "mine.txt", out / "adapter" / "notes.txt", out / "sub" / "x"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("kept")
        before = snapshot(tmp_path)
        refused(capsys, ["export", str(runs_root / "lora"), "--out", str(out), "--overwrite"],
                ["--out:", str(mine.relative_to(out)).split("/")[0], "does not write"])
        assert snapshot(tmp_path) == before
        mine.unlink()


def test_merge_and_plot_never_write_over_a_file_they_read_or_a_runs_file(runs_root, capsys, no_work):
    before = snapshot(runs_root)
    lora_run = runs_root / "lora"
    for out in (lora_run / "checkpoint.npz", lora_run / "adapter.npz", runs_root / "pre" / "checkpoint.npz"):
        refused(capsys, ["merge", str(lora_run), "--out", str(out), "--overwrite"], ["--out:"])
    refused(capsys, ["merge", str(runs_root / "pre"), "--adapter", str(lora_run / "adapter.npz"), "--out",
                     str(lora_run / "adapter.npz"), "--overwrite"], ["--out:", "reads"])
    refused(capsys, ["plot", str(lora_run), "--out", str(lora_run / "log.jsonl")], ["--out:"])
    refused(capsys, ["plot", str(lora_run / "log.jsonl"), "--out", str(runs_root / "pre" / "summary.json")],
            ["--out:", "run"])
    assert snapshot(runs_root) == before


def test_finetune_pretrain_and_import_never_make_their_input_folder_the_new_run(runs_root, tmp_path, capsys):
    before = snapshot(runs_root)
    pre = runs_root / "pre"
    for checkpoint in (pre, pre / "checkpoint.npz"):
        refused(capsys, ["finetune", "--checkpoint", str(checkpoint), "--out", str(pre), "--overwrite",
                         "--steps", "1"], ["--out:", "reads"])
    log_as_text = pre / "log.jsonl"
    refused(capsys, ["pretrain", "--text", str(log_as_text), "--out", str(pre), "--overwrite", "--steps", "1",
                     *TINY], ["--out:", "reads"])
    refused(capsys, ["import-hf", str(pre), "--out", str(pre), "--overwrite"], ["--out:", "reads"])
    assert snapshot(runs_root) == before
    f = tmp_path / "f"
    f.write_text("mine")
    refused(capsys, ["finetune", "--checkpoint", str(pre), "--out", str(f), "--overwrite", "--steps", "1"],
            ["--out:", "file"])
    assert f.read_text() == "mine"


def test_finetune_overwrite_of_an_unrelated_run_still_works(runs_root, tmp_path):
    out = tmp_path / "again"
    for _ in range(2):
        assert cli.main(["finetune", "--checkpoint", str(runs_root / "pre"), "--out", str(out), "--steps", "1",
                         "--batch-size", "4", "--overwrite"]) == 0
    assert (out / "adapter.npz").exists()


# ---- a full disk, names too long, a file where a folder goes: one line naming --out, exit 2, nothing half-written


@pytest.mark.parametrize("error", ["ENOSPC", "SafetensorError"])
def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing_half_written(runs_root, tmp_path, capsys,
                                                                             monkeypatch, error):
    pytest.importorskip("safetensors"), pytest.importorskip("tokenizers")
    import errno

    import safetensors
    import safetensors.numpy

    earlier = tmp_path / "out" / "hf"
    assert cli.main(["export", str(runs_root / "pre"), "--out", str(earlier)]) == 0
    real_save = safetensors.numpy.save_file

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # half of it reached the disk
            f.truncate(os.path.getsize(path) // 2)
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    before = snapshot(tmp_path / "out")
    refused(capsys, ["export", str(runs_root / "lora"), "--out", str(tmp_path / "out" / "new")],
            ["--out:", "could not write", "nothing was written"] + (["no space left"] if error == "ENOSPC" else []))
    err = refused(capsys, ["export", str(runs_root / "lora"), "--out", str(earlier), "--overwrite"],
                  ["--out:", "as it was"])
    assert "Errno" not in err
    assert snapshot(tmp_path / "out") == before  # the earlier export byte-identical, no temporary folder left
    assert sorted(os.listdir(tmp_path / "out")) == ["hf"]


def test_raw_os_errors_are_said_in_words_naming_the_option(runs_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    long = "a" * 300
    cases = [
        (["pretrain", "--out", "afile/x", "--steps", "1", *TINY], ["--out:", "afile", "is a file, not a folder"]),
        (["export", str(runs_root / "pre"), "--out", "afile/x"], ["--out:", "is a file, not a folder"]),
        (["export", str(runs_root / "pre"), "--out", long], ["--out:", "too long"]),
        (["finetune", "--checkpoint", str(runs_root / "pre"), "--out", long, "--steps", "1"], ["--out:", "too long"]),
        (["plot", str(runs_root / "pre"), "--out", long + ".png"], ["--out:", "too long"]),
        (["merge", str(runs_root / "lora"), "--out", "afile/m.npz"], ["--out:", "is a file, not a folder"]),
    ]
    for argv, words in cases:
        err = refused(capsys, argv, words)
        assert "Errno" not in err, err
    assert (tmp_path / "afile").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("command", ["merge", "import-hf"])
def test_merge_and_import_onto_a_full_disk_are_one_line_and_keep_what_was_there(runs_root, tmp_path, capsys,
                                                                                monkeypatch, command):
    import errno

    import numpy as np

    if command == "import-hf":
        pytest.importorskip("safetensors"), pytest.importorskip("tokenizers")
        assert cli.main(["export", str(runs_root / "pre"), "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / ("m.npz" if command == "merge" else "run")
    argv = ["merge", str(runs_root / "lora"), "--out", str(out)] if command == "merge" else \
        ["import-hf", str(tmp_path / "hf"), "--out", str(out)]
    assert cli.main(argv) == 0  # an earlier output, which a failed --overwrite must keep
    before = snapshot(out)

    def full_disk(f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")  # what reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write to an open file: no file name

    monkeypatch.setattr(np, "savez", full_disk)
    err = refused(capsys, argv + ["--overwrite"], ["--out:", "no space left on the device"])
    assert "Errno" not in err
    assert snapshot(out) == before
    leftovers = [n for n in os.listdir(out if out.is_dir() else tmp_path) if n.endswith(".tmp")]
    assert not leftovers, leftovers
