"""The sweep runner: cells evaluate as they train, a sweep resumes, workers split threads, Dask gives the same results."""

import json
import os
import re
from dataclasses import asdict

import numpy as np
import pytest

import clients

from minilora import report, studies, sweep
from minilora.tokenizer import CharTokenizer

pytestmark = pytest.mark.kernel  # a sweep's cells against a worker's and Dask's: .ci/run runs it under other BLAS kernels too

TINY = dict(study="t", base="tiny", steps=6, eval_every=3, n_train=40, n_val=6, n_test=6, corpus_sentences=40,
            batch_size=4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    path = tmp_path_factory.mktemp("bases")
    sweep.load_base("tiny", str(path))  # pretrain the tiny base once for the module
    return str(path)


def _without_timing(record):
    """A record less its wall time. blas_threads stays: float32 sums depend on the BLAS thread count, so two
    records are only expected to agree bit for bit when they were computed with the same number of threads."""
    return {k: v for k, v in record.items() if k != "wall_s"}


def test_a_cell_evaluates_on_validation_while_it_trains(bases):
    r = sweep.run_cell(sweep.Cell(**TINY, method="full", lr=1e-3), bases)
    assert [e["step"] for e in r["evals"]] == [0, 3, 6]
    assert r["evals"][0]["forgetting"] == 0.0  # step 0 is the base model itself
    for e in r["evals"]:
        assert 0.0 <= e["val_metric"] <= 1.0 and np.isfinite(e["corpus_loss"])
        assert set(e["delta"]) == {f"h.0.{layer}" for layer in sweep.TARGETS.values()}
    assert r["evals"][-1]["delta"]["h.0.attn.q"] > 0  # full fine-tuning moved W
    assert len(r["train_loss"]) == 6 and 0.0 <= r["test_metric"] <= 1.0
    assert len(r["singular_values"]["h.0.mlp.fc"]) == 32  # min(F, C) of the tiny base


def test_a_cell_runs_the_same_on_a_base_given_directly(bases):
    cell = sweep.Cell(**TINY, method="lora", lr=1e-2)
    base, model_config, tok = sweep.load_base(cell.base, bases)
    record, params, config = sweep.run_cell_on(cell, base, model_config, tok)
    assert _without_timing(record) == _without_timing(sweep.run_cell(cell, bases))
    assert config.lora is not None and any(params[n].any() for n in params if n.endswith("lora_B"))


def test_every_record_names_its_code_and_its_base(bases, tmp_path):
    from minilora import methods

    r = sweep.run_cell(sweep.Cell(**TINY, method="lora", lr=1e-2), bases)
    base, _, _ = sweep.load_base("tiny", bases)
    assert r["base_fingerprint"] == methods.base_fingerprint(base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))
    if os.path.exists(os.path.join(root, ".git")):
        last = os.popen(f"git -C {root} log -1 --format=%H -- minilora").read().strip()
        assert len(last) == 40 and r["code"] in (last, last + "+dirty")
    else:  # a non-editable install: no checkout to name
        assert r["code"] is None
    # a package outside any git checkout names no commit, rather than a wrong one
    assert sweep.code_version(str(tmp_path)) is None


def test_a_diverged_cell_is_recorded_as_such_and_the_sweep_goes_on(bases, tmp_path, monkeypatch):
    from minilora.train import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("step 3: the loss is nan; a lower learning rate usually helps")

    monkeypatch.setattr(sweep, "train", diverge)
    cells = [sweep.Cell(**TINY, method="lora", lr=lr) for lr in (1e-2, 3e-2)]
    sweep.run_sweep(cells, str(tmp_path), bases_dir=bases)
    records = sweep.read_results(str(tmp_path / "results.jsonl"))
    assert len(records) == 2 and all("loss is nan" in r["diverged"] for r in records)
    assert all(studies.diverged(r) and r["test_metric"] is None for r in records)
    assert [e["step"] for e in records[0]["evals"]] == [0] and records[0]["base_fingerprint"]
    assert studies.best_setting(records, lambda c: True, lambda c: c["lr"]) is None  # never chosen


def test_validation_test_and_training_splits_are_disjoint():
    cell = sweep.Cell(study="t", n_train=300, n_val=50, n_test=100, seed=7)
    train, val, test = sweep.splits(cell)
    inputs = [{r["input"] for r in split} for split in (train, val, test)]
    assert not inputs[0] & inputs[1] and not inputs[0] & inputs[2] and not inputs[1] & inputs[2]
    assert (len(val), len(test)) == (50, 100)


def test_replay_mixes_corpus_windows_into_every_batch():
    records = sweep.splits(sweep.Cell(study="t", n_train=40, n_val=1, n_test=1))[0]
    data = np.arange(1000) % 90
    batches = sweep.ReplayBatches(records, CharTokenizer(), 8, 128, data, 0.25, end="~")
    b = batches.sample(np.random.default_rng(0))
    assert b["x"].shape[0] == 8 and (b["mask"][-2:] == 1).all()  # 2 corpus rows, every target counted
    assert np.array_equal(b["y"][-2:, :-1], b["x"][-2:, 1:])
    with pytest.raises(ValueError, match="replay"):
        sweep.ReplayBatches(records, CharTokenizer(), 4, 128, data, 1.0)


def test_an_interrupted_sweep_resumes_without_rerunning_finished_cells(bases, tmp_path):
    cells = [sweep.Cell(**TINY, lr=lr) for lr in (1e-3, 3e-3, 1e-2)]
    first = sweep.run_sweep(cells[:2], str(tmp_path), bases_dir=bases)
    assert len(first) == 2
    path = tmp_path / "results.jsonl"
    # an interruption in the middle of writing the third cell's line
    with open(path, "a") as f:
        f.write('{"key": "cut sh')
    before = path.read_text().split("\n")[:2]
    seen = []
    again = sweep.run_sweep(cells, str(tmp_path), bases_dir=bases, on_result=lambda r, d, t: seen.append(r["key"]))
    assert seen == [cells[2].key()] and len(again) == 1  # only the missing cell ran
    lines = path.read_text().split("\n")
    assert lines[:2] == before and len(sweep.read_results(str(path))) == 3
    assert sweep.run_sweep(cells, str(tmp_path), bases_dir=bases) == []  # nothing left to do


@pytest.mark.parametrize("own_threads", [1, 2])
def test_workers_split_the_blas_threads_and_finish_a_grid(bases, tmp_path, own_threads):
    from threadpoolctl import threadpool_limits

    cells = [sweep.Cell(**TINY, lr=lr, seed=s) for lr in (1e-3, 1e-2) for s in (0, 1)]
    results = sweep.run_sweep(cells, str(tmp_path), workers=2, threads=1, bases_dir=bases)
    assert sorted(r["key"] for r in results) == sorted(c.key() for c in cells)
    assert all(r["blas_threads"] == 1 for r in results)
    # The same cell in this process, with the workers' thread count, gives the same numbers bit for bit: OpenBLAS
    # splits a product the same way for the same shapes and threads, so only the thread count may change a sum.
    # This process's own setting (own_threads, 2 being what a user's 2-core machine has) must not matter.
    with threadpool_limits(limits=own_threads, user_api="blas"):
        local = sweep.run_cell(cells[0], bases, threads=1)
    assert _without_timing(next(r for r in results if r["key"] == cells[0].key())) == _without_timing(local)


def test_records_from_different_thread_counts_are_never_compared_bit_for_bit(bases):
    """The guard the comparisons above rely on: a record says its thread count, and _without_timing keeps it."""
    cell = sweep.Cell(**TINY, method="lora", lr=1e-2)
    one, two = (sweep.run_cell(cell, bases, threads=n) for n in (1, 2))
    assert (one["blas_threads"], two["blas_threads"]) == (1, 2)
    assert _without_timing(one) != _without_timing(two)  # at least the thread count differs
    # the numbers themselves agree to float32 round-off, whatever the thread count
    np.testing.assert_allclose(one["train_loss"], two["train_loss"], rtol=1e-4)


def test_a_dask_cluster_gives_the_same_results_as_local_workers(bases, tmp_path):
    distributed = clients.require("distributed", reason="the 'dist' extra is not installed")
    cells = [sweep.Cell(**TINY, method=m) for m in ("lora", "prompt")]
    sweep.run_sweep(cells, str(tmp_path / "local"), bases_dir=bases)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        sweep.run_sweep(cells, str(tmp_path / "dask"), executor=sweep.dask_executor(client), bases_dir=bases)

    def table(name):
        return sorted(json.dumps(_without_timing(r), sort_keys=True)
                      for r in sweep.read_results(str(tmp_path / name / "results.jsonl")))

    assert table("local") == table("dask") and len(table("dask")) == 2


def test_every_study_is_a_grid_of_valid_cells(tmp_path):
    out = tmp_path / "studies"
    grid = studies.cells("forgetting", str(out / "forgetting"))
    # every method with learning rates to sweep (methods.Method.study_lrs), 4 of them, 3 seeds
    swept = ("full", "lora", "dora", "qlora", "prompt", "prefix", "ia3")
    assert len(grid) == len(swept) * 4 * 3 and {c.method for c in grid} == set(swept)
    assert all(len({c.lr for c in grid if c.method == m}) == 4 for m in swept)
    with pytest.raises(ValueError, match="minilora sweep forgetting"):
        studies.cells("format", str(out / "format"))  # it needs the forgetting study's learning rates
    # fake forgetting results: the learning rate with the best validation metric is chosen
    (out / "forgetting").mkdir(parents=True)
    with open(out / "forgetting" / "results.jsonl", "w") as f:
        for c in grid:
            val = 1.0 if c.lr in (3e-4, 1e-2, 1e-1) else 0.5
            f.write(json.dumps({"key": c.key(), "cell": json.loads(c.key()),
                                "evals": [{"val_metric": val, "forgetting": 1.0}]}) + "\n")
    fmt = studies.cells("format", str(out / "format"))
    assert {(c.method, c.lr) for c in fmt} == {("full", 3e-4), ("lora", 1e-2)}
    assert len(fmt) == 2 * 4 * 3
    assert len(studies.cells("rank", str(out / "rank"))) == 7 * 2 * 3
    assert {c.batch_size * c.steps for c in studies.cells("hyper", str(out / "hyper"))} >= {3200}
    # the budget study sizes four methods, each at the rate the forgetting study chose for it (of the
    # tied rates, 1e-2 and 1e-1 here, the first: best_setting keeps the earliest of equals)
    budget = studies.cells("budget", str(out / "budget"))
    assert {(c.method, c.lr) for c in budget} == {("prompt", 1e-2), ("prefix", 1e-2), ("lora", 1e-2), ("ia3", 1e-2)}
    sizes = {m: {report.budget_size(asdict(c)) for c in budget if c.method == m} for m in ("prompt", "prefix", "lora")}
    assert sizes == {"prompt": {f"P {p}" for p in studies.PROMPT_BUDGET},
                     "prefix": {f"P {p}" for p in studies.PREFIX_BUDGET},
                     "lora": {f"r {r}" for r in studies.RANK_BUDGET}}
    assert all(c.alpha == 2 * c.rank for c in budget if c.method == "lora")  # s = alpha / r = 2, as at r = 8
    assert len(budget) == 3 * (3 + 3 + 3 + 1)
    with pytest.raises(ValueError, match="study: expected one of"):
        studies.cells("nope", str(out))


def test_the_kind_study_tunes_each_rate_on_seed_0_then_repeats_the_best(tmp_path):
    out = tmp_path / "kind"
    first = studies.cells("kind", str(out))
    assert {c.seed for c in first} == {0} and {c.task for c in first} == {"kind"}
    assert all({c.lr for c in first if c.method == m} == set(studies.LRS[m]) for m in studies.LRS)
    # a method whose four seed-0 cells are done gets seeds 1 and 2 at the rate best on validation
    out.mkdir()
    with open(out / "results.jsonl", "w") as f:
        for c in first:
            if c.method == "lora":
                val = 0.9 if c.lr == 1e-2 else 0.5
                f.write(json.dumps({"key": c.key(), "cell": json.loads(c.key()),
                                    "evals": [{"val_metric": val, "forgetting": 1.0}]}) + "\n")
    grown = studies.cells("kind", str(out))
    added = grown[len(first):]
    assert grown[:len(first)] == first
    assert [(c.method, c.lr, c.seed) for c in added] == [("lora", 1e-2, 1), ("lora", 1e-2, 2)]
    # the report reads the rate as the grid chose it, on seed 0, though seeds 1 and 2 pull its mean below another's
    with open(out / "results.jsonl", "a") as f:
        for c in added:
            f.write(json.dumps({"key": c.key(), "cell": json.loads(c.key()), "test_metric": 0.1,
                                "trainable_params": 1, "evals": [{"val_metric": 0.1, "forgetting": 1.0,
                                                                  "delta": {}}]}) + "\n")
    records = sweep.read_results(str(out / "results.jsonl"))
    for r in records:
        r.setdefault("test_metric", 0.5)
        r.setdefault("trainable_params", 1)
        r["evals"][-1].setdefault("delta", {})
    _, chosen = report.method_rows(records)
    assert chosen == {"lora": 1e-2}  # the mean over seeds would have chosen another rate (0.37 < 0.5)


def test_report_draws_and_tabulates_a_finished_study(bases, tmp_path):
    out = tmp_path / "forgetting"
    cells = [sweep.Cell(**{**TINY, "study": "forgetting"}, method=m, lr=lr, seed=s)
             for m, lr in (("full", 1e-3), ("lora", 1e-2)) for s in (0, 1)]
    sweep.run_sweep(cells, str(out), bases_dir=bases)
    text, figs = report.report(str(out), str(tmp_path / "fig"), " [fast]")
    assert re.search(r"\| full \| [\d,]+ \| 0\.001 \|", text) and re.search(r"\| lora \| [\d,]+ \| 0\.01 \|", text)
    assert "(n=2)" in text
    assert (tmp_path / "fig" / "study_forgetting.png").read_bytes()[:4] == b"\x89PNG"
    assert "[fast]" in figs["study_forgetting.png"]._suptitle.get_text()


def test_mean_spread_and_energy_rank():
    assert report.mean_spread([1.0, 3.0]) == "2.000 ± 1.414 (n=2)"
    assert report.mean_spread([None]) == "-"
    assert report.energy_ranks([3.0, 0.9, 0.1]) == 1  # 9 / 9.82 of the energy in one direction
    assert report.energy_ranks([3.0, 1.0, 0.1]) == 2  # 9 / 10.01 is just under 90%
    assert report.energy_ranks([1.0] * 10) == 9


def test_the_tutorials_find_the_committed_study_results(tmp_path, monkeypatch):
    from minilora.studies import committed_results_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.delenv("MINILORA_STUDIES", raising=False)
    monkeypatch.chdir(root)  # a script run from the clone's root
    assert committed_results_dir() == os.path.join(root, "benchmarks", "studies")
    monkeypatch.chdir(os.path.join(root, "tutorials"))  # a notebook opened beside the tutorials
    assert committed_results_dir() == os.path.join(root, "benchmarks", "studies")
    (tmp_path / "forgetting").mkdir()
    (tmp_path / "forgetting" / "results.jsonl").write_text("")
    monkeypatch.setenv("MINILORA_STUDIES", str(tmp_path))  # the override wins
    assert committed_results_dir() == str(tmp_path)
    monkeypatch.setenv("MINILORA_STUDIES", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("minilora.studies.__file__", str(tmp_path / "site-packages" / "minilora" / "studies.py"))
    with pytest.raises(FileNotFoundError, match="MINILORA_STUDIES"):
        committed_results_dir()
