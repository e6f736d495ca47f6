"""The one training loop, shared by pretraining and every fine-tuning strategy.

    for each step:
        batch        = batches.sample(rng)
        loss, grads  = model.loss_and_grads(params, config, batch, trainable, rng, train=True)
        clip the global gradient norm
        AdamW on the trainable names (the frozen ones have no state and no gradient)
        every eval_every steps: evaluate(params), log; every checkpoint_every: save

What a strategy changes is only `params` (which extra names exist) and
`trainable` (which names get gradients); this loop does not know which one runs.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from .backend import array_module, to_device
from .model import loss_and_grads
from .checkpoint import atomic_open, load_checkpoint, save_checkpoint
from .optim import adamw_init, adamw_step, clip_grad_norm, lr_at, state_from_arrays, state_to_arrays


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in all
    batch_size: int = 16  # sequences per step
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr: float = 3e-4  # where the cosine ends
    warmup_steps: int = 50  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled, on matrices only
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 100  # steps between evaluations (and at the last step)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    seed: int = 0  # batches and dropout

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("warmup_steps", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr: expected a positive learning rate, got 0")


def _write_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path, step):
    """Drop the records after `step` (a crashed run logged them; the resumed run logs them again)."""
    with open(path) as f:
        lines = [line for line in f if "step" not in (r := json.loads(line)) or r["step"] <= step]
    with atomic_open(path, "w") as f:
        f.writelines(lines)


def train(params, trainable, model_config, batches, config, evaluate=None, run_dir=None, meta=None,
          resume=None, desc="train"):
    """Train the trainable names of params in place.

    Inputs:
    - params: dict name -> array; only the trainable entries change
    - trainable: the names to train
    - model_config: the ModelConfig params came with
    - batches: a batch source; batches.sample(rng) returns a batch for
      model.loss_and_grads ({"x", "y", "mask"} or {"x", "last", "labels"})
    - config: TrainConfig
    - evaluate(params) -> dict of metrics such as {"val_loss": ...}, or None
    - run_dir: folder for log.jsonl and checkpoint.npz (None: neither is written)
    - meta: JSON-able description of the run (model config, ...), stored in
      the log header and in every checkpoint
    - resume: a checkpoint path to continue from (its step, parameters,
      optimizer moments and RNG state); the run then ends exactly where an
      uninterrupted run would have

    Returns (history, state): the log records (one per step) and the optimizer
    state, which holds moments for the trainable names only.
    Raises TrainingDiverged if the loss stops being finite; the last checkpoint
    on disk is then the last good one.
    """
    trainable = sorted(trainable)
    rng = np.random.default_rng(config.seed)
    state = adamw_init(params, trainable)
    start = 0
    ckpt_path = log_path = None
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        ckpt_path = os.path.join(run_dir, "checkpoint.npz")
        log_path = os.path.join(run_dir, "log.jsonl")
    if resume is not None:
        saved, saved_meta, arrays = load_checkpoint(resume)
        for name, a in saved.items():
            if name not in params or params[name].shape != a.shape:
                raise ValueError(f"resume: {resume} holds {name} {a.shape}, which this model does not have")
            params[name][...] = to_device(a, array_module(params[name]))  # in place: same arrays, same device
        state = state_from_arrays(arrays, params)
        rng.bit_generator.state = saved_meta["rng"]
        start = int(saved_meta["step"])
        if log_path is not None and os.path.exists(log_path):
            _truncate_log(log_path, start)
    elif log_path is not None:
        open(log_path, "w").close()
        _write_log(log_path, {"meta": {**(meta or {}), "train": asdict(config), "trainable": trainable}})

    def save(step):
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, params, {**(meta or {}), "step": step, "train": asdict(config),
                                                "rng": rng.bit_generator.state}, state_to_arrays(state))

    history = []
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=config.steps, initial=start, desc=desc, disable=None, dynamic_ncols=True, leave=False)
    for step in range(start, config.steps):
        lr = lr_at(step, config.lr, config.warmup_steps, config.steps, config.min_lr)
        batch = batches.sample(rng)
        loss, grads = loss_and_grads(params, model_config, batch, trainable, rng, train=True)
        if not math.isfinite(loss):
            bar.close()
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) \
                else "no checkpoint was written"
            raise TrainingDiverged(f"step {step}: the loss is {loss} at learning rate {config.lr:g}; {kept}. "
                                   f"A lower learning rate (e.g. {config.lr / 3:.2g}) usually helps")
        if config.grad_clip > 0:
            clip_grad_norm(grads, config.grad_clip)
        adamw_step(params, grads, state, lr, beta2=config.beta2, weight_decay=config.weight_decay)
        tokens += int(batch["x"].size)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "train_loss": loss, "lr": lr,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": elapsed}
        if evaluate is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            record.update(evaluate(params))
        history.append(record)
        if log_path is not None:
            _write_log(log_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save(step + 1)
    bar.close()
    save(config.steps)
    return history, state
