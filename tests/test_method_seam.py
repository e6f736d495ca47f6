"""The method seam changed no number: short full, LoRA and prompt runs against values from the code before it.

REFERENCE was made by running `measurements()` below on main at f218600 (before minilora/methods/ existed:
model.py chose a linear's pair from the suffixes present), in one process, inside threadpool_limits(1), on
NumPy's OpenBLAS. Both sides pin BLAS to one thread, so the float32 sums run in the same order and the
comparison is exact; each fingerprint is the SHA-256 of the run's numbers as JSON (losses, metrics, delta
norms, singular values), beside a few of them in the clear.
"""

import hashlib
import json
import os
from dataclasses import dataclass

import pytest
from threadpoolctl import threadpool_limits

from minilora import evaluation, finetune, methods, model, studies, sweep
from minilora.tokenizer import CharTokenizer
from minilora.model import ModelConfig
from minilora.train import TrainConfig

BASE_CONFIG = ModelConfig(vocab_size=96, context_length=128, d_model=16, n_heads=2, n_layers=2, d_ff=32)
CELLS = {f"{m}-{t}": sweep.Cell("seam", method=m, task=t, lr=lr, seed=1, steps=6, batch_size=4, n_train=40,
                                n_val=6, n_test=6, eval_every=3, corpus_sentences=8)
         for m, t, lr in (("full", "subject", 1e-3), ("lora", "subject", 1e-2), ("prompt", "subject", 3e-2),
                          ("lora", "kind", 1e-2))}
CELL_NUMBERS = ("train_loss", "evals", "test_metric", "trainable_params", "singular_values", "corpus_before")
SUMMARY_NUMBERS = ("metric_before", "metric", "val_loss_before", "val_loss_after", "final_train_loss",
                   "trainable_params", "total_params", "report")


def _finetune_config(method):
    from minilora.methods.lora import LoraConfig

    # adapter dropout 0.1 and targets q, v, fc: the per-linear LoRA path (no shared q, k, v product)
    return finetune.FinetuneConfig(method=method, n_train=40, n_test=6, n_prompt=4, seed=2,
                                   lora=LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "fc"), dropout=0.1),
                                   train=TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2))


def _digest(d):
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def measurements():
    """name -> (fingerprint, train losses or final loss, the cell's key or the summary's metric)."""
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        base = model.init_params(BASE_CONFIG, seed=5)
        for name, cell in CELLS.items():
            record, _, _ = sweep.run_cell_on(cell, base, BASE_CONFIG, CharTokenizer())
            out["cell " + name] = (_digest({k: record.get(k) for k in CELL_NUMBERS}), record["train_loss"],
                                   record["key"])
        for method in ("full", "lora", "prompt"):
            _, _, _, s = finetune.finetune(base, BASE_CONFIG, CharTokenizer(), _finetune_config(method),
                                           val_data=evaluation.corpus_val_data(CharTokenizer(), 8))
            out["finetune " + method] = (_digest({k: s[k] for k in SUMMARY_NUMBERS}), s["final_train_loss"],
                                         s["val_loss_after"])
    return out


REFERENCE = {
    'cell full-subject': ('46597c69c7912dd8dac7ce9df052c26588f539554ab2349fd0e6312789ec2719', [4.55145788192749, 4.547842025756836, 4.485315799713135, 4.51694393157959, 4.488142967224121, 4.4921650886535645], '{"alpha": 16.0, "base": "default", "batch_size": 4, "corpus_sentences": 8, "end_marker": "\\n", "eval_every": 3, "lr": 0.001, "method": "full", "n_prompt": 16, "n_test": 6, "n_train": 40, "n_val": 6, "prompt_init": "vocab", "rank": 8, "replay": 0.0, "rslora": false, "seed": 1, "steps": 6, "study": "seam", "targets": ["q", "k", "v", "o"], "task": "subject"}'),
    'cell lora-subject': ('cbe53c1764ab9b9ca44ea7a0af3a9f92b3dc58509d208ce0c0e73de6ac2b5a54', [4.55145788192749, 4.555088996887207, 4.507181167602539, 4.5204010009765625, 4.510138034820557, 4.497758865356445], '{"alpha": 16.0, "base": "default", "batch_size": 4, "corpus_sentences": 8, "end_marker": "\\n", "eval_every": 3, "lr": 0.01, "method": "lora", "n_prompt": 16, "n_test": 6, "n_train": 40, "n_val": 6, "prompt_init": "vocab", "rank": 8, "replay": 0.0, "rslora": false, "seed": 1, "steps": 6, "study": "seam", "targets": ["q", "k", "v", "o"], "task": "subject"}'),
    'cell prompt-subject': ('e3f5cb6c20eff88660078802988ac92c3f4d9ad6d97a581d3ebfd42e6353d885', [4.551482200622559, 4.55654764175415, 4.524369239807129, 4.566347122192383, 4.576435089111328, 4.572922229766846], '{"alpha": 16.0, "base": "default", "batch_size": 4, "corpus_sentences": 8, "end_marker": "\\n", "eval_every": 3, "lr": 0.03, "method": "prompt", "n_prompt": 16, "n_test": 6, "n_train": 40, "n_val": 6, "prompt_init": "vocab", "rank": 8, "replay": 0.0, "rslora": false, "seed": 1, "steps": 6, "study": "seam", "targets": ["q", "k", "v", "o"], "task": "subject"}'),
    'cell lora-kind': ('69cb554938975e6bfdea3bfe48e0542ee356efcdc24b7fca3d7a9ff28cc4312e', [1.1262259483337402, 1.1332265138626099, 1.0756158828735352, 1.1449427604675293, 1.0547420978546143, 1.1638435125350952], '{"alpha": 16.0, "base": "default", "batch_size": 4, "corpus_sentences": 8, "end_marker": "\\n", "eval_every": 3, "lr": 0.01, "method": "lora", "n_prompt": 16, "n_test": 6, "n_train": 40, "n_val": 6, "prompt_init": "vocab", "rank": 8, "replay": 0.0, "rslora": false, "seed": 1, "steps": 6, "study": "seam", "targets": ["q", "k", "v", "o"], "task": "kind"}'),
    'finetune full': ('72961adc9d3c79c8ed7652d9721ea535a648d1a6a40f4fc278d41ed29fed9076', 4.110836982727051, 4.2792067527771),
    'finetune lora': ('fdd84622094fa0d86d28c828ed2dc6770a642eea395f0ab8327e99a727e74241', 4.537235736846924, 4.574398994445801),
    'finetune prompt': ('5daa200dcb8fb9dc77494fabd94125e077d5498e2d68f45e8f4cf36e1bcbda5d', 4.548558712005615, 4.575662136077881),
}


@pytest.fixture(scope="module")
def measured():
    return measurements()  # one pass for every case (a few seconds)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_runs_give_the_numbers_of_the_code_before_the_seam(name, measured):
    assert measured[name] == REFERENCE[name]


# Cell.key: a setting added to Cell leaves every finished cell's key, so the runner's memory of it, unchanged

STUDIES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "studies")


def test_every_study_has_committed_results_or_is_declared_not_yet_run():
    for study in studies.STUDIES:
        committed = os.path.isfile(os.path.join(STUDIES_DIR, study, "results.jsonl"))
        assert committed != (study in studies.NOT_YET_RUN), study


@pytest.mark.parametrize("study", sorted(set(studies.STUDIES) - set(studies.NOT_YET_RUN)))
def test_committed_study_results_are_recognised_as_finished(study):
    records = sweep.read_results(os.path.join(STUDIES_DIR, study, "results.jsonl"))
    assert records
    done = {r["key"] for r in records}
    for r in records:  # the key a cell made then is the key the same settings make now
        assert sweep.Cell(**r["cell"]).key() == r["key"]
    # and the runner would run none of them again: every cell of the grid whose method has results is done
    present = {r["cell"]["method"] for r in records}
    grid = [c for c in studies.cells(study, os.path.join(STUDIES_DIR, study)) if c.method in present]
    assert grid and all(c.key() in done for c in grid)


def test_a_setting_at_its_default_leaves_the_key_unchanged():
    @dataclass(frozen=True)
    class Later(sweep.Cell):
        new_setting: float = 0.5  # a field Cell did not have when the results were recorded

    cell = sweep.Cell("s", method="lora", lr=1e-2, seed=2)
    same = Later("s", method="lora", lr=1e-2, seed=2)
    assert same.key() == cell.key()
    assert Later("s", method="lora", lr=1e-2, seed=2, new_setting=0.25).key() != cell.key()
    assert sweep.Cell("s", method="lora", lr=3e-2, seed=2).key() != cell.key()  # a first-grid field still counts


def test_every_method_has_its_own_colour_in_the_figures():
    colors = [m.color for m in methods.METHODS.values()]
    assert len(set(colors)) == len(colors), colors
