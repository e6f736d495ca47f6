"""The one training loop: frozen names stay frozen, resume is exact, divergence stops cleanly, the log."""

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest

from minilora import evaluation, model, pretrain
from minilora.methods import lora, prompt
from minilora import train as train_module
from minilora.checkpoint import load_checkpoint
from minilora.model import ModelConfig
from minilora.train import Interrupted, TrainConfig, TrainingDiverged, train

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


@pytest.mark.kernel  # resumed against uninterrupted, bit for bit: .ci/run runs it under other BLAS kernels too
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


@pytest.mark.parametrize("odd", [False, True], ids=["even T", "odd T"])
@pytest.mark.parametrize("batch_size", [64, 3])
def test_strided_val_loss_matches_a_direct_computation(batch_size, odd):
    config = dataclasses.replace(TINY, context_length=TINY.context_length + 1) if odd else TINY
    params = model.init_params(config, 0, dtype=np.float64)
    data = DATA[:63]
    T, half = config.context_length, config.context_length // 2
    assert T % 2 == odd
    got = evaluation.strided_val_loss(params, config, data, batch_size=batch_size)
    total, counted = 0.0, []
    for s in range(0, len(data) - T - 1, half):
        window = data[s:s + T][None]
        h, _ = model.forward(params, config, window)
        logits = h[0] @ params["wte"].T  # (T, V)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(T - half, T):  # the last half of each window: T/2 positions, at least T/2 of context
            total -= logp[t, data[s + t + 1]]
            counted.append(s + t + 1)
    assert len(counted) == len(set(counted)), "a target was counted twice"
    assert got == pytest.approx(total / len(counted), rel=1e-12)
    # and the mask matters: counting whole windows gives another number
    assert abs(got - model.loss_and_grads(params, config, {"x": data[None, :T], "y": data[None, 1:T + 1]})[0]) > 1e-6


def test_strided_val_loss_rejects_a_too_short_stream():
    with pytest.raises(ValueError, match="context_length"):
        evaluation.strided_val_loss(model.init_params(TINY, 0), TINY, DATA[:TINY.context_length + 1])


class SignalAt:
    """A batch source that sends this process the given signals while drawing the batch of step `at`."""

    def __init__(self, at, signals):
        self.calls, self.at, self.signals = 0, at, signals

    def sample(self, rng):
        if self.calls == self.at:
            for s in self.signals:
                os.kill(os.getpid(), s)
        self.calls += 1
        return BATCHES.sample(rng)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_step_boundary_and_raises_interrupted(tmp_path, sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    params = model.init_params(TINY, 0)
    with pytest.raises(Interrupted) as e:
        train(params, list(params), TINY, SignalAt(6, [sig]), small_train_config(), run_dir=tmp_path)
    assert e.value.signum == sig and e.value.exit_code == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    assert e.value.step == 7 and e.value.checkpoint == str(tmp_path / "checkpoint.npz")  # step 6 was finished
    saved, meta, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == 7 and all(np.array_equal(saved[n], params[n]) for n in params)
    assert isinstance(e.value, KeyboardInterrupt)  # no `except Exception` swallows it
    assert {s: signal.getsignal(s) for s in before} == before  # the caller's handlers are back


def test_a_second_sigint_stops_at_once_without_saving(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    params = model.init_params(TINY, 0)
    with pytest.raises(Interrupted) as e:
        train(params, list(params), TINY, SignalAt(6, [signal.SIGINT, signal.SIGINT]),
              small_train_config(checkpoint_every=5), run_dir=tmp_path)
    assert e.value.step is None and e.value.checkpoint is None and e.value.exit_code == 130
    assert load_checkpoint(tmp_path / "checkpoint.npz")[1]["step"] == 5  # only the periodic checkpoint
    assert signal.getsignal(signal.SIGINT) == before


def test_handlers_are_restored_after_a_normal_run_too(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    params = model.init_params(TINY, 0)
    train(params, list(params), TINY, BATCHES, small_train_config(steps=3))
    assert {s: signal.getsignal(s) for s in before} == before


def test_resume_with_fewer_steps_is_refused_and_leaves_the_checkpoint_as_it_was(tmp_path):
    # issue 13: it crashed on a None val loss and rewrote the step-30 weights as "step 20"
    params = model.init_params(TINY, 0)
    train(params, list(params), TINY, BATCHES, small_train_config(steps=30), run_dir=tmp_path)
    ckpt, log = tmp_path / "checkpoint.npz", tmp_path / "log.jsonl"
    before, log_before = ckpt.read_bytes(), log.read_bytes()
    with pytest.raises(ValueError, match=r"other settings.*steps 30 in the checkpoint, 20 now"):
        train(params, list(params), TINY, BATCHES, small_train_config(steps=20), run_dir=tmp_path, resume=ckpt)
    assert ckpt.read_bytes() == before and log.read_bytes() == log_before


def test_resume_with_other_settings_or_another_base_is_refused(tmp_path):
    params = model.init_params(TINY, 0)
    train(params, list(params), TINY, BATCHES, small_train_config(steps=10), run_dir=tmp_path)
    ckpt = tmp_path / "checkpoint.npz"
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"other settings.*lr 0.01 in the checkpoint, 0.02 now"):
        train(params, list(params), TINY, BATCHES, small_train_config(steps=20, lr=2e-2), run_dir=tmp_path,
              resume=ckpt)
    # a LoRA run resumed on another base model: its frozen weights differ from the checkpoint's
    base = model.init_params(TINY, 0)
    adapted, config = lora.add_lora(base, TINY, lora.LoraConfig(rank=2))
    names = lora.lora_names(adapted)
    train(adapted, names, config, BATCHES, small_train_config(steps=10), run_dir=tmp_path / "lora")
    other, _ = lora.add_lora(model.init_params(TINY, 1), TINY, lora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="frozen"):
        train(other, names, config, BATCHES, small_train_config(steps=10), run_dir=tmp_path / "lora",
              resume=tmp_path / "lora" / "checkpoint.npz")
    # issue 19: more steps is refused as well (the schedule spans them); a resume at the final step writes nothing
    with pytest.raises(ValueError, match=r"other settings.*steps 10 in the checkpoint, 20 now"):
        train(params, list(params), TINY, BATCHES, small_train_config(steps=20), run_dir=tmp_path, resume=ckpt)
    train(params, list(params), TINY, BATCHES, small_train_config(steps=10), run_dir=tmp_path, resume=ckpt)
    assert ckpt.read_bytes() == before


def test_every_long_run_has_a_default_checkpoint_interval():
    from minilora.finetune import FinetuneConfig

    for config in (pretrain.PretrainConfig().train, FinetuneConfig().train, TrainConfig()):
        assert config.checkpoint_seconds and config.checkpoint_seconds <= 300  # a few minutes of work at most
    assert pretrain.PretrainConfig().train.checkpoint_every and FinetuneConfig().train.checkpoint_every


def test_a_time_based_checkpoint_is_written_without_a_step_interval(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # every reading of the clock is 50 s later
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    params = model.init_params(TINY, 0)
    saves = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda path, p, meta, a: saves.append(meta["step"])
                        or real_save(path, p, meta, a))
    train(params, list(params), TINY, BATCHES, small_train_config(steps=10, checkpoint_seconds=120.0),
          run_dir=tmp_path)
    assert len(saves) > 1 and saves[-1] == 10  # saved along the way, not only at the end
