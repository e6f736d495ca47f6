"""Phase 1: pretrain the tiny GPT on the toy corpus with next-token cross-entropy.

    L = -(1/T) sum_t log p(x_t | x_<t)

The result is the set of weights W that fine-tuning loads and (mostly) freezes,
and the tokenizer that made the ids x_t: the character tokenizer by default, or
a BPE tokenizer.json (tokenizer.make_tokenizer). The model's vocab_size is the
tokenizer's, set where the model is made (with_tokenizer), and the run folder
keeps the tokenizer's file. The loss is in nats per token; for the character
tokenizer a token is a character, and a BPE run converts to nats per character
(total nats / total characters of the same text) where it meets the entropy
floor, which is per character.
"""

import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np

from . import corpus
from .backend import get_backend
from .checkpoint import load_checkpoint
from .evaluation import VAL_SEED, VAL_SENTENCES, strided_val_loss
from .model import ModelConfig, init_params, params_to
from .runs import CHECKPOINT, load_model
from .tokenizer import make_tokenizer
from .train import TrainConfig, resume_problem, train


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=800, batch_size=16, lr=3e-3, min_lr=3e-4,
                                                                    warmup_steps=40, eval_every=100,
                                                                    checkpoint_every=200))
    n_train_sentences: int = 50_000  # toy corpus size (about 1.3 M characters)
    n_val_sentences: int = VAL_SENTENCES  # the validation text forgetting is measured on, too
    data_seed: int = VAL_SEED
    init_seed: int = 0

    @classmethod
    def fast(cls):
        """A few steps of a small model: for smoke tests and the tutorials' fast mode, not for results."""
        return cls(model=ModelConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64),
                   train=TrainConfig(steps=10, batch_size=8, warmup_steps=2, eval_every=5),
                   n_train_sentences=500, n_val_sentences=50)


def random_windows(data, batch_size, T, rng):
    """A batch of random windows of the token stream.

    Returns {"x": (B, T), "y": (B, T)}: y is x shifted one step left, the next tokens.
    """
    starts = rng.integers(0, len(data) - T - 1, batch_size)
    idx = starts[:, None] + np.arange(T)[None, :]  # (B, T)
    return {"x": data[idx], "y": data[idx + 1]}


class WindowBatches:
    """The pretraining batch source: random windows of one token stream (see random_windows)."""

    def __init__(self, data, batch_size, context_length):
        self.data, self.batch_size, self.context_length = data, batch_size, context_length

    def sample(self, rng):
        return random_windows(self.data, self.batch_size, self.context_length, rng)


def with_tokenizer(config, tokenizer):
    """config whose model has the tokenizer's vocab_size: a new model's wte has one row per token."""
    return replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size))


def pretrain_meta(config, tokenizer, text_file=None, floor=None):
    """What every checkpoint of a pretraining run stores about it; a resume must match it exactly."""
    return {"kind": "pretrain", "model": config.model.to_dict(), "tokenizer": tokenizer.describe(), "floor": floor,
            "corpus": "toy grammar" if text_file is None else os.path.basename(str(text_file)),
            "pretrain": {k: v for k, v in asdict(config).items() if k not in ("model", "train")}}


def load_or_pretrain(config=None, run_dir="runs/pretrain", backend=None, overwrite=False, tokenizer=None):
    """Reuse run_dir's pretraining run when it was made with this config, finish it if it was interrupted,
    else pretrain now (on the toy corpus, with tokenizer: None for the character one).

    A run_dir holding a different run's checkpoint is refused (ValueError)
    unless overwrite; a log without a checkpoint (a run stopped before its
    first save) holds nothing to keep and is started over.
    Returns (params, model_config, summary, tokenizer): summary is None when a
    finished run was reused; its "resumed_from" is the step an interrupted run
    resumed from (None when it started afresh).
    """
    tokenizer = tokenizer or make_tokenizer()
    config = with_tokenizer(config or PretrainConfig(), tokenizer)
    ckpt = os.path.join(run_dir, CHECKPOINT)
    resume = None
    if os.path.exists(ckpt):
        _, meta, _ = load_checkpoint(ckpt)
        wanted = pretrain_meta(config, tokenizer, floor=corpus.entropy_per_char())
        if resume_problem(meta, config.train, wanted) is None:
            if meta["step"] == config.train.steps:
                params, model_config, _, tokenizer = load_model(ckpt, get_backend(backend))
                return params, model_config, None, tokenizer
            resume = ckpt
        elif not overwrite:
            raise ValueError(f"run_dir: {run_dir} holds another pretraining run than this one (step "
                             f"{meta.get('step')}, model {meta.get('model')}); give another folder (--out), or "
                             f"overwrite it (--overwrite)")
    params, summary = pretrain(config, run_dir=run_dir, backend=backend, resume=resume, tokenizer=tokenizer)
    summary["resumed_from"] = meta["step"] if resume else None
    return params, config.model, summary, tokenizer


def pretrain_data(config, text_file=None, tokenizer=None):
    """The token streams pretraining reads, checked: (train_data, val_data, train_text, val_text, floor).

    The toy corpus (floor: its exact entropy, in nats per character), or
    text_file split 90% / 10% (floor None), encoded by tokenizer (None: the
    character one). Raises ValueError, before any work, when a text is
    unusable: a character the tokenizer cannot encode, or too few tokens.
    """
    tokenizer = tokenizer or make_tokenizer()
    if text_file is None:
        train_text, val_text = corpus.train_val_text(config.n_train_sentences, config.n_val_sentences,
                                                     config.data_seed)
        floor = corpus.entropy_per_char()
    else:
        text = corpus.load_text_file(text_file, tokenizer.problem)
        cut = int(0.9 * len(text))
        train_text, val_text = text[:cut], text[cut:]
        floor = None
    T = config.model.context_length
    train_data, val_data = tokenizer.encode(train_text), tokenizer.encode(val_text)
    for name, data in (("training", train_data), ("validation", val_data)):
        if len(data) < T + 2:
            raise ValueError(f"text_file: expected at least {T + 2} tokens of {name} text "
                             f"(context_length={T}), got {len(data)}")
    return train_data, val_data, train_text, val_text, floor


def pretrain(config=None, run_dir="runs/pretrain", text_file=None, backend=None, resume=None, data=None,
             tokenizer=None):
    """Pretrain from scratch (or resume) and write run_dir/checkpoint.npz and log.jsonl.

    Inputs:
    - config: PretrainConfig (defaults: the toy corpus, sized for a laptop CPU);
      its model's vocab_size is replaced by the tokenizer's
    - text_file: pretrain on this text instead of the toy corpus (90% train, 10% val)
    - backend: "numpy" or "cupy" (None: MINILORA_BACKEND or numpy)
    - resume: a checkpoint of this same run to continue (see train.check_resume)
    - data: what pretrain_data(config, text_file, tokenizer) returned, if already called
    - tokenizer: the run's tokenizer (tokenizer.make_tokenizer; None: the
      character one); its files are written into run_dir

    Returns (params, summary): summary has val_loss (nats per token, what the
    log holds), val_loss_per_char (nats per character: the same for the
    character tokenizer), the floor (per character, None for a text file),
    the character bigram's loss (None when the text is not all VOCAB) and the
    wall time.
    """
    tokenizer = tokenizer or make_tokenizer()
    config = with_tokenizer(config or PretrainConfig(), tokenizer)
    xp = get_backend(backend)
    train_data, val_data, train_text, val_text, floor = data or pretrain_data(config, text_file, tokenizer)
    T = config.model.context_length
    params = params_to(init_params(config.model, config.init_seed), xp)
    mc = config.model
    batches = WindowBatches(train_data, config.train.batch_size, T)
    evaluate = partial(_val_loss_metrics, config=mc, data=val_data)
    meta = pretrain_meta(config, tokenizer, text_file, floor)
    if run_dir is not None:
        tokenizer.save(run_dir)  # the run folder holds what its checkpoint's ids mean
    t0 = time.perf_counter()
    history, _ = train(params, list(params), mc, batches, config.train, evaluate, run_dir, meta,
                       resume=resume, desc="pretrain")
    wall = time.perf_counter() - t0
    # a resume at the final step trains nothing: measure the checkpoint's loss instead
    val_loss = history[-1]["val_loss"] if history else evaluate(params)["val_loss"]
    if tokenizer.kind == "char":
        val_loss_per_char = val_loss  # one token is one character
    else:
        val_loss_per_char = strided_val_loss(params, mc, val_data, token_lengths=tokenizer.token_lengths())
    in_vocab = corpus.out_of_vocab_report(train_text + val_text) is None
    summary = {"steps": config.train.steps, "wall_s": wall, "val_loss": val_loss,
               "val_loss_per_char": val_loss_per_char, "floor": floor,
               "bigram_loss": corpus.bigram_loss(train_text, val_text) if in_vocab else None}
    return params, summary


def _val_loss_metrics(params, config, data):
    """What pretraining logs at each evaluation."""
    return {"val_loss": strided_val_loss(params, config, data)}
