"""`minilora finetune --adapter`: training continues from an adapter.npz or a PEFT LoRA folder (issue 27).

The continued run starts exactly at the adapter: its score before training is the adapter run's score
after it, and with a vanishing learning rate its adapters end where they began. An adapter of another
method, of another base, with other shapes than the options ask, or with a head the task has no use for
is refused in one line (exit 2) before any work, and no run folder is made.
"""

import json
import os

import numpy as np
import pytest

from minilora import cli
from minilora.checkpoint import load_checkpoint
from refusals import refused as refused_cli

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]
STEPS = ["--steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """pre (a base), other (another base), lora (rank 2 on q, v), dora, lora-kind, ia3 and prefix runs on pre."""
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("pre", "0"), ("other", "1")):
        assert cli.main(["pretrain", "--out", str(root / name), "--steps", "3", "--eval-every", "3",
                         "--batch-size", "4", "--seed", seed, *TINY]) == 0
    for name, extra in (("lora", ["--rank", "2", "--targets", "q,v", "--lr", "0.05"]), ("dora", ["--method", "dora"]),
                        ("lora-kind", ["--task", "kind"]), ("ia3", ["--method", "ia3", "--lr", "0.1"]),
                        ("prefix", ["--method", "prefix", "--n-prefix", "3"])):
        assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--out", str(root / name), *STEPS,
                         *extra]) == 0
    return root


def summary(run):
    return json.loads((run / "summary.json").read_text())


def adapters(path):
    arrays, meta, _ = load_checkpoint(str(path))
    return arrays, meta


@pytest.mark.parametrize("given", ["folder", "file"])
def test_an_adapter_npz_continues_from_where_it_ended(root, tmp_path, given):
    adapter = root / "lora" if given == "folder" else root / "lora" / "adapter.npz"
    out = tmp_path / "more"
    # a learning rate of 1e-12: the adapters move by ~1e-12, so where they end is where they started
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--adapter", str(adapter), "--out", str(out),
                     *STEPS, "--lr", "1e-12"]) == 0
    s = summary(out)
    assert s["metric_before"] == summary(root / "lora")["metric"]  # scored as the adapter run ended
    assert s["config"]["lora"]["rank"] == 2 and s["config"]["lora"]["targets"] == ["q", "v"]  # the adapter's own
    before, _ = adapters(root / "lora" / "adapter.npz")
    after, _ = adapters(out / "adapter.npz")
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-6)
    assert np.abs(before["h.0.attn.q.lora_B"]).max() > 1e-3  # trained: not a zero B that any start would give
    ckpt_meta = load_checkpoint(str(out / "checkpoint.npz"))[1]
    assert ckpt_meta["continued_from"] == os.path.abspath(adapter)


@pytest.mark.parametrize("method", ["ia3", "prefix"])
def test_ia3_and_prefix_adapters_continue_from_where_they_ended(root, tmp_path, method):
    out = tmp_path / f"{method}-more"
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--adapter", str(root / method), "--out",
                     str(out), *STEPS, "--lr", "1e-12"]) == 0
    s = summary(out)
    assert s["method"] == method and s["metric_before"] == summary(root / method)["metric"]
    before, after = adapters(root / method / "adapter.npz")[0], adapters(out / "adapter.npz")[0]
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-6)
    # the same run without --adapter starts at the method's init, far from where the adapter ended
    fresh = tmp_path / f"{method}-fresh"
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--method", method, "--out", str(fresh),
                     *STEPS, "--lr", "1e-12"] + (["--n-prefix", "3"] if method == "prefix" else [])) == 0
    init = adapters(fresh / "adapter.npz")[0]
    assert max(float(np.abs(init[n] - before[n]).max()) for n in before) > 1e-3


def test_a_dora_adapter_continues_as_dora_and_trains_on(root, tmp_path):
    out = tmp_path / "dora-more"
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--adapter", str(root / "dora"), "--out",
                     str(out), *STEPS, "--lr", "0.05"]) == 0
    s = summary(out)
    assert s["method"] == "dora" and s["metric_before"] == summary(root / "dora")["metric"]
    before, after = adapters(root / "dora" / "adapter.npz")[0], adapters(out / "adapter.npz")[0]
    assert set(after) == set(before)
    assert any(not np.allclose(after[n], before[n]) for n in before)  # it trained on from there


def refused(capsys, argv, out, words):
    return refused_cli(capsys, argv, words, out)


@pytest.mark.parametrize("adapter, checkpoint, extra, words", [
    ("dora", "pre", ["--method", "lora"], ["--adapter:", "dora adapters", "--method is 'lora'"]),
    ("lora", "pre", ["--method", "ia3"], ["--adapter:", "lora adapters", "--method is 'ia3'"]),
    ("lora", "other", [], ["--adapter:", "fingerprint"]),
    ("lora", "pre", ["--rank", "4"], ["--rank:", "adapter's own rank", "got 4"]),
    ("lora", "pre", ["--targets", "q,k,v,o"], ["--targets:", "('q', 'v')"]),
    ("prefix", "pre", ["--n-prefix", "5"], ["--n-prefix:", "adapter's own 3", "got 5"]),
    ("ia3", "pre", ["--rank", "2"], ["--rank:", "adapter's own rank"]),
    ("lora-kind", "pre", [], ["--adapter:", "classification head", "--task kind"]),
    ("pre", "pre", [], ["--adapter:"]),
])
def test_an_adapter_that_does_not_match_is_refused_in_one_line(root, tmp_path, capsys, adapter, checkpoint, extra,
                                                              words):
    out = tmp_path / "run"
    refused(capsys, ["finetune", "--checkpoint", str(root / checkpoint), "--adapter", str(root / adapter),
                     "--out", str(out), *STEPS, *extra], out, words)


def test_a_classification_adapter_continues_with_its_head(root, tmp_path):
    out = tmp_path / "kind-more"
    assert cli.main(["finetune", "--checkpoint", str(root / "pre"), "--adapter", str(root / "lora-kind"),
                     "--task", "kind", "--out", str(out), *STEPS, "--lr", "1e-12"]) == 0
    assert summary(out)["metric_before"] == summary(root / "lora-kind")["metric"]


@pytest.fixture(scope="module")
def exported(root):
    """The LoRA run exported: hf/ (the base, GPT-2 layout) and hf/adapter (a PEFT LoRA folder)."""
    pytest.importorskip("safetensors"), pytest.importorskip("tokenizers")
    assert cli.main(["export", str(root / "lora"), "--out", str(root / "hf")]) == 0
    assert cli.main(["export", str(root / "other"), "--out", str(root / "hf-other")]) == 0
    return root / "hf"


def test_a_peft_folder_continues_from_where_it_ended(root, exported, tmp_path):
    out = tmp_path / "peft-more"
    assert cli.main(["finetune", "--checkpoint", str(exported), "--adapter", str(exported / "adapter"), "--out",
                     str(out), *STEPS, "--lr", "1e-12"]) == 0
    s = summary(out)
    # PEFT's c_attn adapter comes in as q, k, v (k's rows of B are zero): the same function as the run's q, v
    assert s["config"]["lora"]["targets"] == ["q", "k", "v"]
    assert s["metric_before"] == summary(root / "lora")["metric"]
    before, after = adapters(root / "lora" / "adapter.npz")[0], adapters(out / "adapter.npz")[0]
    for t in "qv":  # each target's update B A, where the run ended (PEFT's shared A and rank 4 in between)
        p = f"h.0.attn.{t}."
        np.testing.assert_allclose(after[p + "lora_B"] @ after[p + "lora_A"],
                                   before[p + "lora_B"] @ before[p + "lora_A"], atol=1e-6)
    np.testing.assert_allclose(after["h.0.attn.k.lora_B"], 0, atol=1e-6)  # k was not adapted: its B stays ~0


def test_a_peft_folder_on_another_base_or_method_is_refused(root, exported, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, ["finetune", "--checkpoint", str(root / "hf-other"), "--adapter", str(exported / "adapter"),
                     "--out", str(out), *STEPS], out, ["--adapter:", "fingerprint"])
    refused(capsys, ["finetune", "--checkpoint", str(exported), "--adapter", str(exported / "adapter"),
                     "--method", "dora", "--out", str(out), *STEPS], out, ["--adapter:", "lora adapters"])
