"""The one training loop: frozen names stay frozen, resume is exact, divergence stops cleanly, the log."""

import json
import math

import numpy as np
import pytest

from minilora import evaluation, lora, model, pretrain, prompt
from minilora import train as train_module
from minilora.checkpoint import load_checkpoint
from minilora.model import ModelConfig
from minilora.train import TrainConfig, TrainingDiverged, train

TINY = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
DATA = np.random.default_rng(0).integers(0, TINY.vocab_size, 400)


BATCHES = pretrain.WindowBatches(DATA, 4, TINY.context_length)


def small_train_config(**kw):
    return TrainConfig(**{"steps": 20, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                          "eval_every": 100, **kw})


def _check_only_trainable_changed(params, before, trainable, run_dir, state):
    for name in params:
        if name in trainable:
            assert not np.array_equal(params[name], before[name]), f"{name} was trained but did not change"
        else:
            assert np.array_equal(params[name], before[name]), f"{name} is frozen but changed"
    assert set(state["m"]) == set(state["v"]) == set(trainable)
    saved, meta, arrays = load_checkpoint(run_dir / "checkpoint.npz")
    assert meta["step"] == 20 and int(arrays["opt.step"]) == 20
    assert {k[len("opt.m."):] for k in arrays if k.startswith("opt.m.")} == set(trainable)
    assert {k[len("opt.v."):] for k in arrays if k.startswith("opt.v.")} == set(trainable)
    assert all(np.array_equal(saved[n], params[n]) for n in params)


def test_lora_training_changes_only_the_adapters(tmp_path):
    cfg = lora.LoraConfig(rank=2, targets=("q", "v", "fc"))
    params, adapted = lora.add_lora(model.init_params(TINY, 0), TINY, cfg, seed=1)
    before = {n: a.copy() for n, a in params.items()}
    trainable = lora.lora_names(params)
    history, state = train(params, trainable, adapted, BATCHES, small_train_config(), run_dir=tmp_path)
    assert len(history) == 20
    _check_only_trainable_changed(params, before, trainable, tmp_path, state)


def test_prompt_training_changes_only_the_prompt(tmp_path):
    params = prompt.add_prompt(model.init_params(TINY, 0), 3, seed=1)
    before = {n: a.copy() for n, a in params.items()}
    history, state = train(params, ["prompt"], TINY, BATCHES, small_train_config(), run_dir=tmp_path)
    assert len(history) == 20
    _check_only_trainable_changed(params, before, ["prompt"], tmp_path, state)


class Crash(Exception):
    """Stands for the process being killed mid-run."""


def test_resume_ends_exactly_where_an_uninterrupted_run_does(tmp_path):
    config = ModelConfig(**{**TINY.to_dict(), "dropout": 0.1})  # the RNG state must be restored too
    tc = small_train_config(steps=30, checkpoint_every=15, seed=3)

    straight = model.init_params(config, 0)
    history_a, _ = train(straight, list(straight), config, BATCHES, tc, run_dir=tmp_path / "a")

    crashed = model.init_params(config, 0)

    class CrashingBatches:
        calls = 0

        def sample(self, rng):
            self.calls += 1
            if self.calls == 21:  # step 20: the checkpoint of step 15 is on disk
                raise Crash
            return BATCHES.sample(rng)

    with pytest.raises(Crash):
        train(crashed, list(crashed), config, CrashingBatches(), tc, run_dir=tmp_path / "b")
    ckpt = tmp_path / "b" / "checkpoint.npz"
    assert load_checkpoint(ckpt)[1]["step"] == 15

    resumed = model.init_params(config, 1)  # a fresh dict; the checkpoint overwrites it
    history_b, _ = train(resumed, list(resumed), config, BATCHES, tc, run_dir=tmp_path / "b", resume=ckpt)
    assert [r["step"] for r in history_b] == list(range(16, 31))
    assert [r["train_loss"] for r in history_b] == [r["train_loss"] for r in history_a[15:]]
    for name in straight:
        assert np.array_equal(resumed[name], straight[name]), name
    # the log reads like one run: the crashed run's steps 16-20 were dropped, then logged again
    logged = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert "meta" in logged[0] and [r["step"] for r in logged[1:]] == list(range(1, 31))
    # dropout really was on: a different seed gives a different run
    other = model.init_params(config, 0)
    train(other, list(other), config, BATCHES, small_train_config(steps=30, seed=4))
    assert not np.array_equal(other["wte"], straight["wte"])


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def loss_and_grads(*args, **kwargs):
        calls.append(1)
        loss, grads = model.loss_and_grads(*args, **kwargs)
        return (math.nan if len(calls) == 8 else loss), grads  # the 8th call is step 7

    monkeypatch.setattr(train_module, "loss_and_grads", loss_and_grads)
    params = model.init_params(TINY, 0)
    tc = small_train_config(steps=20, checkpoint_every=5, lr=1e-2)
    with pytest.raises(TrainingDiverged) as e:
        train(params, list(params), TINY, BATCHES, tc, run_dir=tmp_path)
    message = str(e.value)
    assert "step 7" in message
    assert "lower learning rate" in message.lower()
    assert "checkpoint" in message
    saved, meta, arrays = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == 5 and int(arrays["opt.step"]) == 5
    assert set(saved) == set(params)
    assert all(np.isfinite(a).all() for a in saved.values())


def test_log_has_a_header_and_one_record_per_step(tmp_path):
    def evaluate(params):
        return {"val_loss": evaluation.strided_val_loss(params, TINY, DATA[:60])}

    params = model.init_params(TINY, 0)
    tc = small_train_config(steps=12, eval_every=5)
    history, _ = train(params, ["wte", "ln_f.g"], TINY, BATCHES, tc, evaluate=evaluate,
                       run_dir=tmp_path, meta={"kind": "test", "model": TINY.to_dict()})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    header, steps = records[0], records[1:]
    assert header["meta"]["kind"] == "test" and header["meta"]["model"] == TINY.to_dict()
    assert header["meta"]["train"]["steps"] == 12 and header["meta"]["trainable"] == ["ln_f.g", "wte"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps == history
    for r in steps:
        assert {"step", "train_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
        assert math.isfinite(r["train_loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0
        assert ("val_loss" in r) == (r["step"] in (5, 10, 12)), r["step"]
    assert steps[-1]["val_loss"] == evaluate(params)["val_loss"]


def test_random_windows_targets_are_the_next_tokens():
    data = np.random.default_rng(1).integers(0, 50, 100)
    batch = pretrain.random_windows(data, 6, 8, np.random.default_rng(2))
    x, y = batch["x"], batch["y"]
    assert x.shape == y.shape == (6, 8)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    ramp = np.arange(100)
    b = pretrain.random_windows(ramp, 50, 8, np.random.default_rng(3))
    assert np.array_equal(b["y"], b["x"] + 1)
    assert b["x"].min() >= 0 and b["y"].max() <= 99


@pytest.mark.parametrize("batch_size", [64, 3])
def test_strided_val_loss_matches_a_direct_computation(batch_size):
    params = model.init_params(TINY, 0, dtype=np.float64)
    data = DATA[:63]
    T, half = TINY.context_length, TINY.context_length // 2
    got = evaluation.strided_val_loss(params, TINY, data, batch_size=batch_size)
    total, counted = 0.0, []
    for s in range(0, len(data) - T - 1, half):
        window = data[s:s + T][None]
        h, _ = model.forward(params, TINY, window)
        logits = h[0] @ params["wte"].T  # (T, V)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(half, T):  # the second half of each window
            total -= logp[t, data[s + t + 1]]
            counted.append(s + t + 1)
    assert len(counted) == len(set(counted)), "a target was counted twice"
    assert got == pytest.approx(total / len(counted), rel=1e-12)
    # and the mask matters: counting whole windows gives another number
    assert abs(got - model.loss_and_grads(params, TINY, {"x": data[None, :T], "y": data[None, 1:T + 1]})[0]) > 1e-6


def test_strided_val_loss_rejects_a_too_short_stream():
    with pytest.raises(ValueError, match="context_length"):
        evaluation.strided_val_loss(model.init_params(TINY, 0), TINY, DATA[:TINY.context_length + 1])
