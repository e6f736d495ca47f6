"""`minilora evaluate` scores exactly the run's own held-out split: never a record the run trained on."""

import pytest

from minilora import cli, evaluation, finetune, tasks
from minilora.checkpoint import load_checkpoint
from minilora.tokenizer import CharTokenizer

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pretrain"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     *TINY]) == 0
    return out


def _scored_records(monkeypatch, argv):
    """Run `minilora evaluate` and return the records it scored."""
    seen = []
    real_exact, real_acc = evaluation.exact_match, evaluation.classification_accuracy

    def exact(params, config, tokenizer, records, *a, **k):
        seen.extend(records)
        return real_exact(params, config, tokenizer, records, *a, **k)

    def accuracy(params, config, tokenizer, records, *a, **k):
        seen.extend(records)
        return real_acc(params, config, tokenizer, records, *a, **k)

    monkeypatch.setattr(evaluation, "exact_match", exact)
    monkeypatch.setattr(evaluation, "classification_accuracy", accuracy)
    assert cli.main(argv) == 0
    return seen


@pytest.mark.parametrize("task, data", [("subject", None), ("kind", None), ("subject", "file"), ("kind", "file")])
def test_evaluate_never_scores_a_training_record(pretrained, tmp_path, monkeypatch, task, data):
    argv = ["finetune", "--checkpoint", str(pretrained), "--task", task, "--steps", "2", "--batch-size", "4",
            "--seed", "5", "--out", str(tmp_path / "run")]
    if data:
        path = tmp_path / "mine.jsonl"
        records = (tasks.make_classification_records(60, seed=3) if task == "kind"
                   else tasks.make_instruction_records("plural", 60, seed=3))
        tasks.save_jsonl(records, path)
        argv += ["--data", str(path)]
    assert cli.main(argv) == 0
    _, meta, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["finetune"]["seed"] == 5
    train, test, _ = finetune.load_records(finetune.config_from_description(meta["finetune"]), CharTokenizer())
    scored = _scored_records(monkeypatch, ["evaluate", str(tmp_path / "run")])
    key = "text" if task == "kind" else "input"
    trained_on = {r[key] for r in train}
    assert scored == test and len(scored) > 0
    assert not any(r[key] in trained_on for r in scored)
    # the defaults' split (seed 0) would have scored records this run trained on
    default_test = finetune.load_records(finetune.config_from_description({**meta["finetune"], "seed": 0}),
                                  CharTokenizer())[1]
    assert any(r[key] in trained_on for r in default_test)
