"""The head alone (methods/head.py, a linear probe): only cls.W and cls.b train, the frozen model stays bit for bit
what it was, a generative task is refused in one line, and the CLI, the sweep and the gradient checks take it."""

import json

import numpy as np
import pytest

from minilora import cli, finetune, gradcheck, methods, model, sweep, tasks, tokenizer
from minilora.model import ModelConfig
from minilora.train import TrainConfig

TINY = ModelConfig(context_length=128, d_model=16, n_heads=2, n_layers=2, d_ff=32)
CHAR = tokenizer.CharTokenizer()
HEAD = {"cls.W", "cls.b"}


def _config(**kw):
    return finetune.FinetuneConfig(method="head", task="kind", n_train=40, n_test=8,
                                   train=TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1), **kw)


def test_only_the_head_trains_and_the_frozen_model_is_bit_identical_after_training():
    base = model.init_params(TINY, 0)
    before = {n: p.copy() for n, p in base.items()}
    params, config, trainable, summary = finetune.finetune(base, TINY, CHAR, _config())
    assert trainable == HEAD and config.lora is None and config.n_prefix == 0
    assert set(params) == set(base) | HEAD
    for name in base:  # neither the base nor the run's own frozen arrays moved, not by one bit
        assert np.array_equal(base[name], before[name]) and np.array_equal(params[name], before[name]), name
    assert summary["trainable_params"] == params["cls.W"].size + params["cls.b"].size == 3 * TINY.d_model + 3
    # the gradient of a step holds the head's names and nothing else
    records = tasks.make_classification_records(4, seed=0)
    x, last, labels = tasks.classification_batch(records, CHAR, TINY.context_length, list(tasks.CLASS_NAMES))
    batch = {"x": x, "last": last, "labels": labels}
    _, grads = model.loss_and_grads(params, config, batch, trainable)
    assert set(grads) == HEAD and all(np.any(g != 0) for g in grads.values())


def test_a_generative_task_is_refused_naming_method_and_task(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^method: expected a classification task .*got task 'subject'"):
        finetune.FinetuneConfig(method="head")
    with pytest.raises(ValueError, match="method: expected a classification task"):
        sweep.check_cells([sweep.Cell("t", method="head", base="tiny")])  # the sweep refuses it before any work
    sweep.check_cells([sweep.Cell("t", method="head", task="kind", base="tiny")])
    code = cli.main(["finetune", "--checkpoint", str(tmp_path / "none.npz"), "--method", "head", "--task", "subject",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--method head" in err and "--task kind" in err and "--task subject" in err, err


def test_the_gradient_checks_cover_the_head_alone():
    results = [r for r in gradcheck.run_checks(["model"], seed=0) if r.op.startswith("model: head,")]
    assert {r.op for r in results} == {"model: head, classifier"}  # no LM case: it would train nothing
    assert {r.argument for r in results} == HEAD and all(r.passed for r in results)
    assert methods.method("head").needs_head and not methods.method("lora").needs_head


def test_the_cli_finetunes_the_head_alone_on_kind(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert cli.main(["pretrain", "--out", str(pre), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]) == 0
    run = tmp_path / "head"
    assert cli.main(["finetune", "--checkpoint", str(pre / "checkpoint.npz"), "--method", "head", "--task", "kind",
                     "--steps", "3", "--batch-size", "4", "--out", str(run)]) == 0
    summary = json.load(open(run / "summary.json"))
    assert summary["method"] == "head" and summary["trainable_params"] == 3 * 16 + 3
    assert 0.0 <= summary["metric"] <= 1.0
    capsys.readouterr()
