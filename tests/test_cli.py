"""The `minilora` command end to end, on tiny settings."""

import json
import os
import signal

import numpy as np
import pytest

from minilora import cli, finetune, ops, tasks, tokenizer
from minilora.checkpoint import load_checkpoint

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]


def test_gradcheck_passes_and_covers_every_op(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    for op in ("embedding", "linear", "layer_norm", "gelu", "softmax", "attention", "dropout", "cross_entropy",
               "lora_linear", "qlora_linear", "nf4_linear (frozen)", "model: full, LM", "model: lora, LM",
               "model: qlora, LM", "model: prompt, classifier", "prefix_attention", "model: prefix, LM",
               "model: prefix, classifier", "model: ia3, LM", "model: ia3 (queries), LM",
               "model: ia3 (queries), classifier"):
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


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt"])
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
    if method in ("lora", "qlora"):
        # a QLoRA run saves no adapter file: its checkpoint is the NF4 base and the adapters together
        assert os.path.exists(run / "adapter.npz") == (method == "lora")
        assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged.npz")]) == 0
        merged, meta, _ = load_checkpoint(tmp_path / "merged.npz")
        assert not any("lora" in n or ".nf4." in n for n in merged) and meta["kind"] == "merged"
        assert merged["h.0.attn.q.W"].dtype == np.float32 and merged["h.0.mlp.fc.W"].shape == (64, 16)
        assert cli.main(["generate", "--checkpoint", str(tmp_path / "merged.npz"), "--max-new-tokens", "3"]) == 0
    else:
        assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged.npz")]) == 2
        assert "expected a model with adapters" in capsys.readouterr().err


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


def test_demo_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    # issue 13: a Ctrl-C in the demo's pretraining lost everything; now each stage resumes
    from minilora import pretrain as pretrain_module, tasks

    argv = ["demo", "--fast", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig")]
    real_metrics, real_sample, calls = pretrain_module._val_loss_metrics, tasks.RecordBatches.sample, []

    def metrics_then_ctrl_c(*args, **kwargs):  # pretraining's first evaluation, at step 5 of 10
        os.kill(os.getpid(), signal.SIGINT)
        return real_metrics(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_val_loss_metrics", metrics_then_ctrl_c)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "run the same command again to resume" in err
    assert load_checkpoint(tmp_path / "runs/pretrain/checkpoint.npz")[1]["step"] == 5
    monkeypatch.setattr(pretrain_module, "_val_loss_metrics", real_metrics)

    def sample_with_ctrl_c(self, rng):  # "full" draws 6 batches; the 9th is step 3 of "lora"
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return real_sample(self, rng)

    monkeypatch.setattr(tasks.RecordBatches, "sample", sample_with_ctrl_c)
    assert cli.main(argv) == 130
    assert "pretrained (resumed from step 5)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "runs/finetune-subject-lora/checkpoint.npz")[1]["step"] == 3
    monkeypatch.setattr(tasks.RecordBatches, "sample", real_sample)

    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "reusing the pretrained model" in out and "[full] subject: reusing the finished run" in out
    assert "[lora] subject: resuming" in out and "from step 3" in out
    assert "trainable" in out and "corpus loss after" in out
    for name in ("pretrain_loss.png", "finetune_loss.png", "finetune_comparison.png",
                 "classification_comparison.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:4] == b"\x89PNG"
    rows = json.load(open(tmp_path / "runs" / "demo_summary.json"))["rows"]
    assert [(r["task"], r["method"]) for r in rows] == [
        ("subject", "full"), ("subject", "lora"), ("subject", "prompt"),
        ("kind", "full"), ("kind", "lora"), ("kind", "prompt")]
    assert all(r["steps"] == 6 for r in rows)


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


# -- issue 13: no lost work, no wrong result ------------------------------------------------------

def _one_line_error(capsys, *expected):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_following_the_commands_a_second_finetune_never_overwrites_the_first(pretrained, tmp_path, capsys,
                                                                              monkeypatch):
    # issue 13: `finetune --data my.jsonl` overwrote runs/finetune-subject-lora, whose evaluate then gave 0.000
    tasks.save_jsonl(tasks.make_instruction_records("plural", 30, seed=1), tmp_path / "my.jsonl")
    monkeypatch.chdir(tmp_path)
    common = ["--checkpoint", str(pretrained), "--steps", "2", "--batch-size", "4"]
    assert cli.main(["finetune", "--method", "lora", "--task", "subject", *common]) == 0
    assert "run: runs/finetune-subject-lora " in capsys.readouterr().out
    first = (tmp_path / "runs/finetune-subject-lora/summary.json").read_bytes()
    assert cli.main(["finetune", "--method", "lora", "--data", "my.jsonl", *common]) == 0
    assert "lora on my:" in capsys.readouterr().out
    assert cli.main(["finetune", "--method", "lora", "--task", "subject", *common, "--seed", "1"]) == 0
    assert "run: runs/finetune-subject-lora-2 " in capsys.readouterr().out  # a counter, never the same folder
    assert (tmp_path / "runs/finetune-subject-lora/summary.json").read_bytes() == first
    assert cli.main(["evaluate", "runs/finetune-subject-lora"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith(f"{json.loads(first)['metric']:.3f}")
    # an --out that holds a run is refused, left as it was, unless --overwrite
    assert cli.main(["finetune", *common, "--out", "runs/finetune-subject-lora"]) == 2
    _one_line_error(capsys, "--out: 'runs/finetune-subject-lora' already holds a run", "--overwrite", "--resume")
    assert (tmp_path / "runs/finetune-subject-lora/summary.json").read_bytes() == first


def test_pretraining_never_clobbers_a_run_and_resume_is_exact_or_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.txt").write_text("the cat sleeps near a big box.\n" * 60)
    argv = ["pretrain", "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--text", "my.txt", *TINY]
    assert cli.main(argv) == 0
    ckpt = tmp_path / "runs/pretrain/checkpoint.npz"
    before = ckpt.read_bytes()
    assert cli.main(argv) == 2
    _one_line_error(capsys, "--out: 'runs/pretrain' already holds a run")
    # issue 13: --resume with fewer --steps crashed, and rewrote the step-4 weights as step 2
    assert cli.main([*argv[:1], "--steps", "2", *argv[3:], "--resume", "runs/pretrain"]) == 2
    _one_line_error(capsys, "--resume: runs/pretrain/checkpoint.npz: it was made with other settings",
                    "steps 4 in the checkpoint, 2 now")
    assert cli.main([*argv, "--lr", "0.01", "--resume", "runs/pretrain"]) == 2
    _one_line_error(capsys, "other settings", "lr 0.003 in the checkpoint, 0.01 now")
    # issue 19: more --steps is refused too: the learning-rate schedule spans the steps, so the run would not end
    # where an uninterrupted run of that length would
    assert cli.main([*argv[:1], "--steps", "6", *argv[3:], "--resume", "runs/pretrain"]) == 2
    _one_line_error(capsys, "other settings", "steps 4 in the checkpoint, 6 now")
    assert ckpt.read_bytes() == before
    assert cli.main([*argv, "--resume", "runs/pretrain"]) == 0  # at its final step: nothing to train
    assert load_checkpoint(ckpt)[1]["step"] == 4
    assert cli.main([*argv, "--overwrite"]) == 0
    assert load_checkpoint(ckpt)[1]["step"] == 4


@pytest.fixture
def no_work(monkeypatch):
    """Any training or sampling fails the test: errors must come before the work starts."""
    from minilora import finetune as finetune_module, pretrain as pretrain_module, sampling

    def work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    for module, name in ((finetune_module, "finetune"), (pretrain_module, "pretrain"), (sampling, "decode")):
        monkeypatch.setattr(module, name, work)


def _bad_inputs(tmp):
    tasks.save_jsonl(tasks.make_instruction_records("subject", 30, seed=1)
                     + [{"instruction": "Name it.", "input": "x" * 130, "output": "x"}], tmp / "long.jsonl")
    tasks.save_jsonl(tasks.make_instruction_records("subject", 30, seed=1), tmp / "ok.jsonl")
    (tmp / "afile").write_text("")
    (tmp / "my.txt").write_text("not a checkpoint\n")


BAD = [  # (argv, what the one-line error names); {p}: the pretrained run, {t}: a temporary folder
    (["finetune", "--rank", "1000"], "--rank: expected at most min(out, in) = 16"),
    (["finetune", "--method", "prompt", "--n-prompt", "200"], "--n-prompt: expected at most context_length"),
    (["finetune", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["finetune", "--batch-size", "-3"], "argument --batch-size"),
    (["finetune", "--data", "{t}/ok.jsonl", "--batch-size", "64"], "--batch-size: expected at most the 27"),
    (["finetune", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["finetune", "--data", "{t}/long.jsonl"], "long.jsonl' line 31: the record takes"),
    (["finetune", "--out", "{t}/afile/run"], "--out: cannot write to the folder"),
    (["finetune", "--out", "/proc/minilora-run"], "--out: cannot write to the folder"),
    (["pretrain", "--out", "{t}/afile/run", *TINY], "--out: cannot write to the folder"),
    (["pretrain", "--steps", "0"], "argument --steps"),
    (["generate", "--num-samples", "0"], "argument --num-samples: expected an integer >= 1, got 0"),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got 0"),
    (["generate", "--seed", "-1"], "argument --seed"),
    (["generate", "--prompt", "café "], "--prompt: 'café ' has 1 distinct character(s) outside the vocabulary"),
    (["generate", "--checkpoint", "{t}/my.txt"], "--checkpoint: {t}/my.txt: is not a minilora checkpoint"),
    (["evaluate", "{p}", "--data", "{t}/long.jsonl"], "long.jsonl' line 31"),
    (["evaluate", "{p}", "--n-test", "0"], "unrecognized arguments: --n-test 0"),
    (["--steps", "0", "finetune"], "argument --steps"),
    (["plot", "{p}", "{p}/log.jsonl", "--out", "{t}/x.png"], "are the same log"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_option_or_the_line_before_any_work(pretrained, tmp_path, capsys,
                                                                              no_work, argv, expected):
    _bad_inputs(tmp_path)
    fill = lambda text: text.replace("{p}", str(pretrained)).replace("{t}", str(tmp_path))
    argv = [fill(a) for a in argv]
    if argv[0] in ("finetune", "generate") and "--checkpoint" not in argv:
        argv += ["--checkpoint", str(pretrained)]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, fill(expected))
    assert "allow_pickle" not in err and "Ã" not in err


def test_a_non_ascii_or_backslashed_prompt(pretrained, capsys):
    # issue 13: "café " reported mojibake ('©', 'Ã'); 'C:\Users\x' failed on a unicode-escape error
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--prompt", "café ", "--max-new-tokens", "2"]) == 2
    assert "'é'" in _one_line_error(capsys, "--prompt")
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--prompt", "C:\\Users\\x",
                     "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("C:\\Users\\x")


def test_options_work_before_or_after_the_subcommand(pretrained, capsys):
    for argv in (["--seed", "1", "--max-new-tokens", "3", "--temperature", "0", "generate", "--checkpoint",
                  str(pretrained)],
                 ["generate", "--checkpoint", str(pretrained), "--seed", "1", "--max-new-tokens", "3",
                  "--temperature", "0"]):
        assert cli.main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second


def test_ctrl_c_outside_training_is_one_line_and_exit_130(pretrained, capsys, monkeypatch):
    from minilora import sampling

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "decode", interrupted)
    assert cli.main(["generate", "--checkpoint", str(pretrained)]) == 130
    _one_line_error(capsys, "minilora generate: interrupted (SIGINT)")


def test_evaluate_scores_a_data_run_on_its_own_held_out_records(pretrained, tmp_path, capsys):
    # issue 13: evaluate on a --data run without --data scored the built-in task instead
    data = tmp_path / "mine.jsonl"
    tasks.save_jsonl(tasks.make_instruction_records("plural", 40, seed=1), data)
    run = tmp_path / "run"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--data", str(data), "--steps", "2",
                     "--batch-size", "4", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    # issue 17: the run says what it held out, and its summary names its file and its counts
    assert f"data: {data}, 40 records: 36 to train on, 4 held out for the score" in out
    assert "exact match on 4 held-out records, metric" in out
    summary = json.load(open(run / "summary.json"))
    assert (summary["data_file"], summary["task"], summary["n_train"], summary["n_test"]) == (str(data), None, 36, 4)
    assert "n_train" not in summary["config"]["finetune"] and summary["config"]["finetune"]["task"] is None
    assert cli.main(["evaluate", str(run)]) == 0
    assert f"exact match on 4 held-out records: {summary['metric']:.3f}" in capsys.readouterr().out
    assert cli.main(["evaluate", str(run), "--data", str(data)]) == 0
    assert f"exact match on 40 records of {data}: " in capsys.readouterr().out
    with open(data, "a") as f:  # the file changed since: its held-out split is no longer the run's
        f.write(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    assert cli.main(["evaluate", str(run)]) == 2
    _one_line_error(capsys, "changed since the run was trained", "--data")


def test_exact_match_decodes_as_long_as_the_longest_reference(monkeypatch):
    # issue 13: exact match decoded at most 12 characters, so a longer output could never match
    from minilora import evaluation, model

    def decode_the_reference(params, config, prompts, max_new_tokens, **kwargs):
        return [tokenizer.CharTokenizer().encode(reference)[:max_new_tokens] for reference in references]

    references = ["a twenty-char answer", "short"]
    monkeypatch.setattr(evaluation, "decode", decode_the_reference)
    records = [{"instruction": "Say it.", "input": "", "output": r} for r in references]
    config = model.ModelConfig(d_model=16, n_heads=2, n_layers=1)
    acc, preds = evaluation.exact_match(model.init_params(config, 0), config, tokenizer.CharTokenizer(), records)
    assert acc == 1.0 and preds == references


def test_exact_match_decodes_the_prompts_a_render_writes(monkeypatch):
    from minilora import evaluation, model

    tok, seen = tokenizer.CharTokenizer(), []

    def record_prompts(params, config, prompts, max_new_tokens, **kwargs):
        seen.extend(tok.decode(p) for p in prompts)
        return [tok.encode("cat")]

    monkeypatch.setattr(evaluation, "decode", record_prompts)
    config = model.ModelConfig(d_model=16, n_heads=2, n_layers=1)
    records = [{"instruction": "Name the subject.", "input": "the cat runs.", "output": "cat"}]
    acc, _ = evaluation.exact_match(model.init_params(config, 0), config, tok, records,
                                    render=lambda ins, inp: f"{ins} | {inp} -> ")
    assert acc == 1.0 and seen == ["Name the subject. | the cat runs. -> "]


def test_merge_never_overwrites_a_file_unless_asked(pretrained, tmp_path, capsys):
    run = tmp_path / "lora"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--data", str(_records(tmp_path)),
                     "--steps", "2", "--batch-size", "4", "--out", str(run)]) == 0
    target = pretrained / "checkpoint.npz"  # a merge must not replace the pretraining checkpoint by accident
    before = target.read_bytes()
    for overwrite in ([], ["--overwrite"]):  # a run's own checkpoint: never replaced, even when asked (issue 33)
        assert cli.main(["merge", str(run), "--out", str(target), *overwrite]) == 2
        _one_line_error(capsys, "--out:", "a file of the run", "give another --out")
        assert target.read_bytes() == before
    other = tmp_path / "other.npz"
    other.write_bytes(b"mine")
    assert cli.main(["merge", str(run), "--out", str(other)]) == 2
    _one_line_error(capsys, "--out:", "exists", "--overwrite")
    assert other.read_bytes() == b"mine"
    assert cli.main(["merge", str(run), "--out", str(tmp_path / "m.npz")]) == 0


def _records(tmp_path):
    path = tmp_path / "records.jsonl"
    tasks.save_jsonl(tasks.make_instruction_records("subject", 30, seed=2), path)
    return path


def test_plot_errors_name_the_file_and_line(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = open(pretrained / "log.jsonl").read().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, f"{run / 'log.jsonl'}, line 3: expected a JSON object")
    (run / "log.jsonl").write_text(lines[0] + '\n{"step": "one", "train_loss": 1.0}\n')
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, "line 2: expected a number for 'step'")
    assert cli.main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, "empty")


def test_the_demo_refuses_a_folder_holding_another_pretraining_run(tmp_path, capsys):
    other = tmp_path / "runs" / "pretrain"
    assert cli.main(["pretrain", "--out", str(other), "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                     *TINY]) == 0
    before = (other / "checkpoint.npz").read_bytes()
    assert cli.main(["demo", "--fast", "--out", str(tmp_path / "runs"), "--figures", ""]) == 2
    _one_line_error(capsys, "--out:", "holds another pretraining run", "--overwrite")
    assert (other / "checkpoint.npz").read_bytes() == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_fails_before_any_work(pretrained, tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli.main(["finetune", "--checkpoint", str(pretrained), "--out", str(locked / "run")]) == 2
        _one_line_error(capsys, "--out: cannot write to the folder", "Permission denied")
    finally:
        locked.chmod(0o700)


def test_every_subcommands_help_shows_every_options_default(capsys):
    """Each option that takes a value and is not required says its default in --help (issue 17)."""
    import re

    parser = cli.build_parser()
    for name, sub in cli._subparsers(parser).items():
        assert cli.main([name, "--help"]) == 0
        text = capsys.readouterr().out
        blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])  # one block per option
        for action in sub._actions:
            if not cli._shows_default(action):
                continue
            block = next(b for b in blocks if b.lstrip().startswith(action.option_strings[0]))
            assert "default" in block, (name, action.option_strings)
        for action in sub._actions:
            if not action.option_strings:  # positional arguments say what they are
                assert action.help, (name, action.dest)


def test_generate_asks_a_fine_tuned_run_in_its_own_format(pretrained, tmp_path, capsys, monkeypatch):
    """--instruction/--input write the run's prompt and stop at its end marker; samples are separated (issue 17)."""
    from minilora import sampling, tasks
    from minilora.finetune import FinetuneConfig, finetune
    from minilora.runs import load_model

    params, config, _, tok = load_model(pretrained)
    run = tmp_path / "tilde"
    # a run taught to end its answers with "~" (study 2's end marker), not a newline
    ft = FinetuneConfig(method="lora", n_train=40, n_test=4, end_marker="~")
    ft.train.steps, ft.train.batch_size, ft.train.warmup_steps = 2, 4, 0
    finetune(params, config, tok, ft, str(run))
    seen = []

    def fake_decode(params, config, prompts, max_new_tokens, temperature, top_k, rng, stop_id, batch_size):
        seen.append((prompts, stop_id))
        return [tok.encode("dog"), tok.encode("cat")][:len(prompts)]

    monkeypatch.setattr(sampling, "decode", fake_decode)
    assert cli.main(["generate", "--checkpoint", str(run), "--instruction", "Name the subject of the sentence.",
                     "--input", "the dog sleeps.", "--num-samples", "2"]) == 0
    (prompts, stop_id), = seen
    expected = tasks.format_prompt("Name the subject of the sentence.", "the dog sleeps.")
    assert all(tok.decode(p) == expected for p in prompts) and stop_id == int(tok.encode("~")[0])
    assert capsys.readouterr().out == f"dog\n{cli.SAMPLE_SEPARATOR}\ncat\n"  # the answers, one per sample
    # plain sampling keeps its prompt in the output, and --input needs an instruction
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == f"the dog\n{cli.SAMPLE_SEPARATOR}\nthe cat\n"
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--input", "x"]) == 2
    _one_line_error(capsys, "expected --instruction too", "--input")
    assert cli.main(["generate", "--checkpoint", str(pretrained), "--prompt", "a", "--instruction", "b"]) == 2
    _one_line_error(capsys, "either --prompt or --instruction", "--prompt")
