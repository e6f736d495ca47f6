"""The `minilora` command end to end, on tiny settings."""

import json
import os

import numpy as np
import pytest

from minilora import cli, finetune, ops
from minilora.checkpoint import load_checkpoint

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]


def test_gradcheck_passes_and_covers_every_op(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    for op in ("embedding", "linear", "layer_norm", "gelu", "softmax", "attention", "dropout", "cross_entropy",
               "lora_linear", "model: full, LM", "model: LoRA, LM", "model: prompt, classifier"):
        assert f"\n{op} " in out, op
    assert " 0 failed" in out and "FAIL" not in out


def test_gradcheck_fails_loudly_on_a_wrong_backward(monkeypatch, capsys):
    monkeypatch.setattr(ops, "gelu_backward", lambda dout, cache: 0.5 * dout)
    assert cli.main(["gradcheck", "--groups", "ops"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pretrain"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "4", "--eval-every", "2", "--batch-size", "4",
                     *TINY]) == 0
    return out


def test_pretrain_writes_checkpoint_and_log(pretrained):
    params, meta, arrays = load_checkpoint(pretrained / "checkpoint.npz")
    assert meta["step"] == 4 and meta["model"]["d_model"] == 16
    lines = [json.loads(line) for line in open(pretrained / "log.jsonl")]
    assert "meta" in lines[0] and [r["step"] for r in lines[1:]] == [1, 2, 3, 4]
    assert "val_loss" in lines[2] and "val_loss" in lines[4]


def test_generate_prints_text(pretrained, capsys):
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--prompt", "the ", "--max-new-tokens", "10",
                     "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and len(out.rstrip("\n")) >= 4


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_finetune_evaluate_and_merge(pretrained, tmp_path, method, capsys):
    run = tmp_path / method
    assert cli.main(["finetune", "--checkpoint", str(pretrained / "checkpoint.npz"), "--method", method,
                     "--steps", "3", "--batch-size", "4", "--out", str(run)]) == 0
    summary = json.load(open(run / "summary.json"))
    assert summary["method"] == method and 0.0 <= summary["metric"] <= 1.0
    out = capsys.readouterr().out
    assert "trainable params:" in out
    assert cli.main(["evaluate", str(run)]) == 0
    assert f"exact match on {finetune.FinetuneConfig().n_test} held-out records" in capsys.readouterr().out
    if method == "lora":
        assert os.path.exists(run / "adapter.npz")
        assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged.npz")]) == 0
        merged, meta, _ = load_checkpoint(tmp_path / "merged.npz")
        assert not any("lora" in n for n in merged) and meta["kind"] == "merged"
        assert cli.main(["generate", "--checkpoint", str(tmp_path / "merged.npz"), "--max-new-tokens", "3"]) == 0
    else:
        assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged.npz")]) == 2
        assert "expected a LoRA model" in capsys.readouterr().err


def test_plot_writes_png(pretrained, tmp_path):
    out = tmp_path / "loss.png"
    assert cli.main(["plot", str(pretrained), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_file_with_unknown_characters_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("hello wörld\n" * 50, encoding="utf-8")
    assert cli.main(["pretrain", "--text", str(bad), "--out", str(tmp_path / "r"), "--steps", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "ö" in err and "bad.txt" in err
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_pretrain_on_a_users_text_file(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("a quick brown fox jumps over the lazy dog.\n" * 60)
    assert cli.main(["pretrain", "--text", str(text), "--out", str(tmp_path / "r"), "--steps", "2",
                     "--batch-size", "2", *TINY]) == 0
    _, meta, _ = load_checkpoint(tmp_path / "r" / "checkpoint.npz")
    assert meta["corpus"] == "mine.txt" and meta["floor"] is None


def test_mismatched_checkpoint_is_a_clear_error(pretrained, tmp_path, capsys):
    params, meta, _ = load_checkpoint(pretrained / "checkpoint.npz")
    from minilora.checkpoint import save_checkpoint

    params["wte"] = np.zeros((5, 16), np.float32)
    save_checkpoint(tmp_path / "broken.npz", params, meta)
    assert cli.main(["finetune", "--checkpoint", str(tmp_path / "broken.npz"), "--steps", "1"]) == 2
    assert "wte" in capsys.readouterr().err


def test_unknown_lora_target_lists_valid_names(pretrained, capsys):
    assert cli.main(["finetune", "--checkpoint", str(pretrained / "checkpoint.npz"), "--targets", "q,up",
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "targets" in err and "'fc'" in err and "up" in err


def test_demo_fast_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--fast", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "corpus loss after" in out
    for name in ("pretrain_loss.png", "finetune_loss.png", "finetune_comparison.png",
                 "classification_comparison.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:4] == b"\x89PNG"
    rows = json.load(open(tmp_path / "runs" / "demo_summary.json"))["rows"]
    assert [(r["task"], r["method"]) for r in rows] == [
        ("subject", "full"), ("subject", "lora"), ("subject", "prompt"),
        ("kind", "full"), ("kind", "lora"), ("kind", "prompt")]


def test_an_adapter_file_on_its_base_reproduces_the_runs_metric(pretrained, tmp_path, capsys):
    run = tmp_path / "lora"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--method", "lora", "--steps", "3",
                     "--batch-size", "4", "--seed", "5", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(run)]) == 0
    from_run = capsys.readouterr().out
    assert cli.main(["evaluate", str(pretrained), "--adapter", str(run / "adapter.npz")]) == 0
    from_adapter = capsys.readouterr().out
    summary = json.load(open(run / "summary.json"))
    metric_line = next(line for line in from_run.splitlines() if "exact match" in line)
    assert metric_line == next(line for line in from_adapter.splitlines() if "exact match" in line)
    assert metric_line.endswith(f"{summary['metric']:.3f}")  # the score the fine-tune itself reported
    # merge and generate take the adapter too
    assert cli.main(["merge", str(pretrained), "--adapter", str(run / "adapter.npz"),
                     "--out", str(tmp_path / "merged.npz")]) == 0
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--adapter", str(run),
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0


def test_an_adapter_on_another_base_names_the_fingerprints(pretrained, tmp_path, capsys):
    run = tmp_path / "lora"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--method", "lora", "--steps", "2",
                     "--batch-size", "4", "--out", str(run)]) == 0
    other = tmp_path / "other"
    assert cli.main(["pretrain", "--out", str(other), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     "--seed", "1", *TINY]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(other), "--adapter", str(run / "adapter.npz")]) == 2
    err = capsys.readouterr().err
    _, meta, _ = load_checkpoint(run / "adapter.npz")
    assert f"fingerprint {meta['base_fingerprint']}" in err and len(err.strip().splitlines()) == 1


def test_an_adapter_file_given_as_the_model_says_to_use_the_adapter_option(pretrained, tmp_path, capsys):
    run = tmp_path / "lora"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--method", "lora", "--steps", "2",
                     "--batch-size", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    for argv in (["evaluate", str(run / "adapter.npz")], ["merge", str(run / "adapter.npz"), "--out", "x.npz"],
                 ["generate", "--checkpoint", str(run / "adapter.npz")]):
        assert cli.main(argv) == 2, argv
        assert "--adapter" in capsys.readouterr().err


def test_backend_and_threads_are_accepted_before_or_after_the_subcommand(pretrained, capsys):
    ours = {k: v for k, v in os.environ.items() if k.startswith("MINILORA")}
    for argv in (["--backend", "numpy", "--threads", "1", "generate", "--checkpoint", str(pretrained)],
                 ["generate", "--checkpoint", str(pretrained), "--backend", "numpy", "--threads", "1"]):
        assert cli.main([*argv, "--max-new-tokens", "2"]) == 0
    # the choice is passed along, never written to the environment
    assert {k: v for k, v in os.environ.items() if k.startswith("MINILORA")} == ours
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_finetune_on_a_file_names_the_run_after_the_file(pretrained, tmp_path, capsys, monkeypatch):
    from minilora import tasks

    tasks.save_jsonl(tasks.make_instruction_records("plural", 30, seed=1), tmp_path / "mine.jsonl")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--data", "mine.jsonl", "--steps", "2",
                     "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "lora on mine:" in out and os.path.isdir(tmp_path / "runs" / "finetune-mine-lora")
