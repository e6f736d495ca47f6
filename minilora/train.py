"""The one training loop, shared by pretraining and every fine-tuning strategy.

    for each step:
        batch        = batches.sample(rng)
        loss, grads  = model.loss_and_grads(params, config, batch, trainable, rng, train=True)
        clip the global gradient norm
        AdamW on the trainable names (the frozen ones have no state and no gradient)
        every eval_every steps: evaluate(params), log; every checkpoint_every: save
        SIGINT / SIGTERM received: save, raise Interrupted

What a strategy changes is only `params` (which extra names exist) and
`trainable` (which names get gradients); this loop does not know which one runs.

No lost work: a checkpoint holds the parameters, the optimizer moments, the
step and the RNG state, so `resume` continues exactly where an uninterrupted
run would be (or is refused, see check_resume). A first SIGINT or SIGTERM
asks the loop to stop at the next step boundary, after a checkpoint; a second
one stops at once.
"""

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from . import lock
from .backend import array_module, to_device, to_numpy
from .model import loss_and_grads
from .checkpoint import atomic_open, load_checkpoint, save_checkpoint
from .optim import adamw_init, adamw_step, clip_grad_norm, lr_at, state_from_arrays, state_to_arrays
from .bounds import FLOAT32_TINY, GRAD_CLIP, LR, Bound
from .validate import FLOAT_DTYPES, FileError, check_arrays, field, from_dict, read_jsonl, rng_state
from .tokenizer import CHAR_DESCRIPTION

# The range of a peak learning rate (bounds.LR says why): 1e30 turns float32 weights into inf within steps
MIN_LR, MAX_LR = LR.low, LR.high


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training.

    A KeyboardInterrupt, so that no `except Exception` swallows it. Attributes:
    - signum: the signal (signal.SIGINT or signal.SIGTERM)
    - step: the step the checkpoint holds (None: stopped at once, by a second signal)
    - checkpoint: the checkpoint written at that step (None: nothing was written)
    - exit_code: 128 + signum, what a shell reports for that signal (130, 143)
    """

    def __init__(self, signum, step=None, checkpoint=None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        if step is None:
            what = "a second signal: stopped at once, without saving"
        elif checkpoint is None:
            what = f"stopped after step {step}, nothing saved (no run folder)"
        else:
            what = f"stopped after step {step}, checkpoint saved to {checkpoint}"
        super().__init__(f"{name}: {what}")

    def __reduce__(self):
        # KeyboardInterrupt pickles as cls(*self.args), one message string: rebuild from the fields instead,
        # so an Interrupted raised in a sweep worker reaches the parent process whole
        return (Interrupted, (self.signum, self.step, self.checkpoint))


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
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end, and every checkpoint_seconds)
    checkpoint_seconds: float = 120.0  # also save when this much time has passed since the last save (0: never)
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
        LR.check(self.lr)  # first: the bounds of min_lr and weight_decay below are in terms of lr
        for name in ("min_lr", "weight_decay", "checkpoint_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        GRAD_CLIP.check(self.grad_clip)
        # min_lr is where the cosine ends: 0, or (as lr, see bounds.LR) a normal float32 rate, up to lr
        Bound("min_lr", "a rate", FLOAT32_TINY, self.lr, zero_ok=True,
              why="where the cosine ends, at most lr; a smaller positive rate is subnormal or 0 in float32"
              ).check(self.min_lr)
        # decoupled decay multiplies each matrix by 1 - lr * weight_decay every step (warmup's rates are lower):
        # past 1 / lr the factor is negative and the weights grow without bound, to inf in float32. A decay too
        # small to show rounds the factor to 1, as p * (1 - lr * weight_decay) rounds to p: exact.
        Bound("weight_decay", "a decay rate", 0.0, 1.0 / self.lr,
              why=f"at most 1 / lr = {1.0 / self.lr:g}: each step multiplies a matrix by 1 - lr * weight_decay, "
                  f"negative past it, and the weights grow to inf").check(self.weight_decay)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: expected at most steps={self.steps}, got {self.warmup_steps}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2: expected a number in [0, 1), got {self.beta2!r}")


def _write_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path, step):
    """Drop the records after `step` (a crashed run logged them; the resumed run logs them again).

    A last line torn by a full disk or a kill is dropped (validate.read_jsonl); any other bad line is an
    error naming the log and the line.
    """
    kept = []
    for i, r in enumerate(read_jsonl(path, "a run log")):
        if "step" in r:
            field(r, "step", path, "int", where=f"record {i + 1}", low=0)
            if r["step"] > step:
                continue
        kept.append(json.dumps(r) + "\n")
    with atomic_open(path, "w") as f:
        f.writelines(kept)


# What a resumed run may change: how often it evaluates or saves. Everything else
# shapes the trajectory, so it must be what the checkpoint had; the number of steps
# too, because the learning-rate schedule is laid out over it.
RESUMABLE_CHANGES = ("eval_every", "checkpoint_every", "checkpoint_seconds")
# Names of inputs, not inputs: what a run trained on is compared by its SHA-256.
NAME_ONLY = ("data_file", "corpus")


def _jsonable(x):
    """x as it reads back from a checkpoint's JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(x, default=lambda v: v.item()))


def _differences(saved, wanted, prefix=""):
    """'key: saved here vs wanted' for every key whose value differs (nested dicts expanded)."""
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        if key in NAME_ONLY:
            continue
        a, b = saved.get(key, "(absent)"), wanted.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} in the checkpoint, {b!r} now")
    return out


def resume_problem(saved_meta, config, meta=None):
    """Why a checkpoint's metadata cannot continue a run of config and meta exactly; None if it can.

    Inputs:
    - saved_meta: the meta dict of the checkpoint (load_resume's second value, fields checked)
    - config: the TrainConfig of the run that would continue it
    - meta: the run's description that train() stores in every checkpoint

    Every difference is listed at once, so the advice never leads to a second refusal.
    """
    if not {"step", "rng", "train"} <= set(saved_meta):
        return "it is not a training checkpoint (it has no step, RNG state or training settings)"
    if meta and "kind" in meta and saved_meta.get("kind") != meta["kind"]:
        return (f"it is a checkpoint of kind {saved_meta.get('kind')!r}, not of a {meta['kind']!r} run; "
                f"--resume continues a run of the same command")
    # a checkpoint written before tokenizers were recorded was made by the character tokenizer
    saved_meta = {"tokenizer": CHAR_DESCRIPTION, **saved_meta}
    wanted = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    had = {k: v for k, v in saved_meta["train"].items() if k not in RESUMABLE_CHANGES}
    diff = _differences(had, _jsonable(wanted))
    diff += _differences({k: saved_meta.get(k, "(absent)") for k in (meta or {})}, _jsonable(meta or {}))
    if diff:
        return ("it was made with other settings, so a resumed run would not be the run it continues "
                "(give the settings it was made with; steps too, as the learning-rate schedule spans them): "
                + "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else ""))
    return None


def check_training_state(path):
    """The check load_checkpoint runs on a checkpoint a run resumes from (see load_resume)."""
    def check(saved, meta, arrays):
        train_settings = field(meta, "train", path, "dict")
        try:
            saved_config = from_dict(TrainConfig, train_settings, "train")
        except ValueError as e:
            raise FileError(path, str(e), "meta.json") from e
        field(meta, "step", path, "int", low=0, high=saved_config.steps)
        rng_state(meta.get("rng"), path)
        if "opt.step" not in arrays or arrays["opt.step"].shape != () or arrays["opt.step"].dtype.kind not in "iu":
            raise FileError(path, "expected the optimizer's step count, an integer array", "opt.step")
        check_arrays(saved, path)
        check_arrays({k: a for k, a in arrays.items() if k.startswith(("opt.m.", "opt.v."))}, path,
                     "optimizer moment")
    return check


def load_resume(path):
    """load_checkpoint for a resume: step, RNG state, training settings and moments checked (FileError)."""
    return load_checkpoint(path, check_training_state(path))


def check_resume(path, config, meta=None):
    """Raise ValueError unless the checkpoint at path can continue this run exactly (see resume_problem).

    Reads only; the checkpoint is left as it was. Returns its metadata.
    """
    _, saved_meta, _ = load_resume(path)
    problem = resume_problem(saved_meta, config, meta)
    if problem is not None:
        raise ValueError(f"resume: {path}: {problem}")
    return saved_meta


@contextlib.contextmanager
def _stop_requests():
    """While active, SIGINT and SIGTERM ask training to stop at the next step boundary.

    Yields a list that collects the signal numbers received. A second signal
    raises Interrupted at once, wherever the loop is (a checkpoint being written
    is then abandoned whole: atomic_open removes its temporary file). The
    previous handlers come back on exit. Outside the main thread, where Python
    cannot set handlers, nothing is installed and the list stays empty.
    """
    received = []

    def handler(signum, frame):
        received.append(signum)
        if len(received) > 1:
            raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    # a signal the process ignores stays ignored (a sweep's workers leave Ctrl-C to their parent)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def train(params, trainable, model_config, batches, config, evaluate=None, run_dir=None, meta=None,
          resume=None, desc="train", checkpoint_activations=False):
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
    - checkpoint_activations: model.loss_and_grads keeps each block's input only and recomputes the
      block in the backward (the same gradients, less memory, one more forward of the blocks); not part
      of the run's settings, so a run may resume with it on or off
    - resume: a checkpoint path to continue from (its step, parameters,
      optimizer moments and RNG state); the run then ends exactly where an
      uninterrupted run would have. Refused (ValueError, nothing written) when
      the checkpoint holds more steps than config.steps or was made with other
      settings (see resume_problem); its frozen weights must equal params'.

    Returns (history, state): the log records (one per step of this call) and
    the optimizer state, which holds moments for the trainable names only.
    Raises TrainingDiverged if the loss stops being finite; the last checkpoint
    on disk is then the last good one. Raises Interrupted after SIGINT or
    SIGTERM, with the checkpoint it wrote at the next step boundary; the
    signal handlers in place before the call are restored. Raises ValueError
    before any step when a parameter is not a finite float32 / float64 array,
    and lock.FolderInUse when another process holds run_dir (lock.py): the
    lock is held for the whole call.
    """
    if run_dir is None:
        return _train(params, trainable, model_config, batches, config, evaluate, run_dir, meta, resume, desc,
                      checkpoint_activations)
    with lock.hold(run_dir, "run_dir"):
        return _train(params, trainable, model_config, batches, config, evaluate, run_dir, meta, resume, desc,
                      checkpoint_activations)


def _train(params, trainable, model_config, batches, config, evaluate, run_dir, meta, resume, desc,
           checkpoint_activations=False):
    """train() with run_dir's lock held."""
    bad = _bad_params(params)
    if bad:
        raise ValueError(f"params: expected finite float32 or float64 arrays, got {bad}; the model given is "
                         f"broken before any training step")
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
        saved, saved_meta, arrays = load_resume(resume)
        problem = resume_problem(saved_meta, config, meta)
        if problem is None:
            problem = _params_problem(saved, params, trainable)
        if problem is not None:
            raise ValueError(f"resume: {resume}: {problem}")
        for name in trainable:
            params[name][...] = to_device(saved[name], array_module(params[name]))  # in place: same arrays
        state = state_from_arrays(arrays, params)
        rng.bit_generator.state = saved_meta["rng"]
        start = int(saved_meta["step"])
    if log_path is not None:
        if resume is not None and os.path.exists(log_path):
            _truncate_log(log_path, start)
        else:
            open(log_path, "w").close()
            _write_log(log_path, {"meta": {**(meta or {}), "train": asdict(config), "trainable": trainable}})
    last_save = time.perf_counter()

    def save(step):
        nonlocal last_save
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, params, {**(meta or {}), "step": step, "train": asdict(config),
                                                "rng": rng.bit_generator.state}, state_to_arrays(state))
        last_save = time.perf_counter()

    history = []
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=config.steps, initial=start, desc=desc, disable=None, dynamic_ncols=True, leave=False)
    with _stop_requests() as received:
        for step in range(start, config.steps):
            lr = lr_at(step, config.lr, config.warmup_steps, config.steps, config.min_lr)
            batch = batches.sample(rng)
            loss, grads = loss_and_grads(params, model_config, batch, trainable, rng, train=True,
                                         **({"checkpoint_activations": True} if checkpoint_activations else {}))
            if not math.isfinite(loss):
                bar.close()
                kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) \
                    else "no checkpoint was written"
                raise TrainingDiverged(f"step {step}: the loss is {loss}; "
                                       f"{divergence_cause(params, trainable, model_config, config, step - start)}; "
                                       f"{kept}")
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
            bar.set_postfix(loss=f"{loss:.3f}",
                            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            if step + 1 == config.steps:
                break  # the final save is below; a signal during the last step lets the run finish
            if received:  # a step boundary: save, then stop
                save(step + 1)
                bar.close()
                raise Interrupted(received[0], step + 1, ckpt_path)
            if ((config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)
                    or (config.checkpoint_seconds and time.perf_counter() - last_save >= config.checkpoint_seconds)):
                save(step + 1)
        bar.close()
        if start < config.steps:
            save(config.steps)  # a resume at the final step changes nothing, so writes nothing
    return history, state


def _bad_params(params):
    """'name (why)' of the first parameters that are not finite float32 / float64 arrays ('' if none)."""
    from .methods import is_stored_code

    bad = []
    for name in sorted(params):
        a = params[name]
        if is_stored_code(name) and a.dtype.kind in "iu":
            continue  # integer codes by design (QLoRA's 4-bit W), never trained
        if a.dtype not in FLOAT_DTYPES:
            bad.append(f"{name} ({a.dtype})")
        elif not bool(array_module(a).isfinite(a).all()):
            bad.append(f"{name} (NaN or inf)")
    return ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")


def divergence_cause(params, trainable, model_config, config, steps_done):
    """What is known about a non-finite loss, most specific first; the learning rate is blamed last.

    - frozen weights that are no longer finite: the base, not training (never happens after train's checks)
    - the first step of the call, on weights train() checked finite: the batch or a setting overflowed
    - a LoRA scale s = alpha / r far above 1 multiplies every update
    - else the trained weights grew: the learning rate
    """
    frozen = {n: p for n, p in params.items() if n not in set(trainable)}
    if _bad_params(frozen):
        return f"the frozen weights are not finite ({_bad_params(frozen)}): the base model is broken"
    if steps_done == 0:
        return ("it is not finite at the first step, on finite weights, before any update: the input or a "
                "setting overflows (not the learning rate)")
    lora = getattr(model_config, "lora", None)
    # B trained: LoRA-family settings, which have a scale (IA3's have none)
    if lora is not None and any(n.endswith(".lora_B") for n in trainable) and lora.scale > 100:
        return (f"the LoRA scale alpha / r = {lora.scale:g} multiplies every update of B A; a smaller alpha "
                f"(or a lower learning rate than {config.lr:g}) usually helps")
    return (f"after {steps_done} updates at learning rate {config.lr:g} the trained weights diverged; a lower "
            f"learning rate (e.g. {config.lr / 3:.2g}) usually helps")


def _params_problem(saved, params, trainable):
    """Why saved arrays cannot stand for params (other names or shapes, other frozen values); None if they can."""
    for name in sorted(set(saved) | set(params)):
        if name not in params or name not in saved or params[name].shape != saved[name].shape:
            have = f"{name} {saved[name].shape}" if name in saved else f"no {name}"
            want = f"{name} {params[name].shape}" if name in params else f"no {name}"
            return f"it holds {have}, but this model has {want}"
    trainable = set(trainable)
    for name in sorted(set(params) - trainable):
        if not np.array_equal(saved[name], to_numpy(params[name])):
            return f"its frozen {name} differs from the one given (was it trained from another base model?)"
    return None

