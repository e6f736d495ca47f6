"""Phase 2: fine-tune the pretrained weights, any method of minilora/methods/, with one loop and one model.

A strategy is only (a) which extra parameters exist and (b) which names are trainable:

    method   extra parameters                     trainable
    full     -                                    every parameter
    lora     <linear>.lora_A, <linear>.lora_B     the adapters
    dora     the same, and <linear>.lora_magnitude_vector (out,)   the adapters and magnitudes
    prompt   prompt (P, C)                        the soft prompt
    prefix   h.{i}.attn.prefix_k, prefix_v (P, C)   every layer's prefix keys and values
    ia3      <linear>.ia3_l beside k, v (C,), proj (F,)   the vectors
    head     -                                    the classification head alone (a linear probe; kind only)
    (a classification task adds cls.W, cls.b, trainable under every method)

Each method says this itself (methods.METHODS): this module asks it, and names none.

Everything else, the forward, the backward, the optimizer and the loop, is shared.

The model is three things that travel together: its parameters, its
ModelConfig and its tokenizer (runs.load_model returns all three). Every
setting is checked against the data before any work (load_data): each record
fits the context (in the tokenizer's tokens), the end marker is one token, the
LoRA rank fits every adapted matrix, the soft prompt and the longest record
fit the context together.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import methods, tasks
from .backend import array_module
from .evaluation import classification_accuracy, exact_match, strided_val_loss
from .methods import base_fingerprint
from .methods.lora import LoraConfig, count_report, save_adapter
from .model import add_head, count_params, real_context
from .optim import optimizer_state_bytes
from .runs import ADAPTER, LOG, SUMMARY
from .tokenizer import single_token_id
from .train import TrainConfig, train
from .validate import read_input, read_jsonl

METHODS = tuple(methods.METHODS)
# Each method's default peak learning rate: the one the forgetting study chose on the
# validation split (best validation exact match after 600 steps, 3 seeds, 4 rates each;
# benchmarks/studies/forgetting, README "What holds up").
DEFAULT_LR = {name: m.default_lr for name, m in methods.METHODS.items()}


@dataclass
class FinetuneConfig:
    method: str = "lora"  # a name of methods.METHODS: full | lora | dora | prompt
    task: str = "subject"  # a generative task of tasks.GENERATIVE_TASKS, or "kind" (classification)
    n_train: int = 2000  # training records (ignored with data_file)
    n_test: int = 300  # held-out records scored after training
    data_file: str = None  # a JSON-lines file of the user's own records instead of a built-in task
    train_on_prompt: bool = False  # count the loss on the prompt tokens too
    end_marker: str = "\n"  # the text that ends a response, one token of the run's tokenizer ("~" is not in the corpus)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters' settings (a DoraConfig for dora)
    n_prompt: int = 16  # soft-prompt vectors (prompt tuning)
    prompt_init: str = "vocab"  # vocab | random | text
    prompt_init_text: str = "Name the subject of the sentence."
    n_prefix: int = 16  # prefix keys and values per attention layer (prefix tuning)
    # prompt and prefix tuning: number the real tokens after the P virtual tokens, as PEFT does, so the run
    # exports exactly (ModelConfig.peft_positions; the methods put it in the run's ModelConfig)
    peft_positions: bool = False
    train: TrainConfig = None  # None: TrainConfig(steps=600, lr=DEFAULT_LR[method], ...)
    seed: int = 0
    # keep each block's input only and recompute the block in the backward (model.loss_and_grads): the
    # same gradients bit for bit, so it is no part of the run's description (run_description leaves it out)
    checkpoint_activations: bool = False

    def __post_init__(self):
        m = methods.method(self.method)  # ValueError naming the choices
        if m.adapter_config is not None:
            self.lora = m.adapter_config(self)  # a variant's own settings class, from the LoRA ones given
        if not isinstance(self.end_marker, str) or not self.end_marker:
            raise ValueError(f"end_marker: expected a non-empty str (one token of the run's tokenizer), "
                             f"got {self.end_marker!r}")
        if self.data_file is None and self.task not in tasks.TASKS:
            raise ValueError(f"task: expected one of {list(tasks.TASKS)}, got {self.task!r}")
        if m.needs_head and not self.is_classification:
            raise ValueError(f"method: expected a classification task for method {self.method!r}, which trains "
                             f"the classification head alone (task 'kind'), got task {self.task!r}, which has no head")
        if self.train is None:
            self.train = TrainConfig(steps=600, batch_size=16, lr=DEFAULT_LR[self.method],
                                     min_lr=DEFAULT_LR[self.method] / 10, warmup_steps=20,
                                     weight_decay=0.0, eval_every=100, checkpoint_every=100)
        if not isinstance(self.peft_positions, bool):
            raise ValueError(f"peft_positions: expected True or False, got {self.peft_positions!r}")
        if self.peft_positions and not m.peft_positions:
            takes = ", ".join(name for name, other in methods.METHODS.items() if other.peft_positions)
            raise ValueError(f"peft_positions: expected a method with virtual tokens before the real ones ({takes}), "
                             f"got method {self.method!r}")
        if not isinstance(self.checkpoint_activations, bool):
            raise ValueError(f"checkpoint_activations: expected True or False, got {self.checkpoint_activations!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")

    @property
    def is_classification(self):
        return self.task == "kind"


def method_defaults(method):
    """FinetuneConfig(method=method)'s defaults, on a task the method runs on (`kind` for the head alone)."""
    return FinetuneConfig(method=method, task="kind" if methods.method(method).needs_head else FinetuneConfig.task)


def setup_strategy(base_params, model_config, tokenizer, config, n_classes=None, start=None):
    """The parameters, config and trainable names of a strategy, from the pretrained weights.

    tokenizer (the base's) encodes prompt_init_text for a prompt initialised from text.
    start: name -> array, trained values to begin from instead of the method's
    init (an adapter file's or PEFT folder's adapters, and head, to fine-tune
    on); each must be a trainable name of the strategy at its shape.

    Returns (params, model_config, trainable). base_params is never modified:
    full fine-tuning trains copies, LoRA and prompt tuning share the frozen arrays.
    """
    params, model_config, trainable = methods.method(config.method).setup(base_params, model_config, config,
                                                                           tokenizer)
    if n_classes is not None:
        params = add_head(params, n_classes, seed=config.seed)
        trainable |= {"cls.W", "cls.b"}
    if start:
        check_start(start, params, trainable, config.method)
        xp = array_module(params["wte"])
        params = {**params, **{n: xp.array(a, dtype=params[n].dtype) for n, a in start.items()}}  # copies
    return params, model_config, trainable


def check_start(start, params, trainable, method):
    """ValueError (naming the adapter) unless every array of start is a trainable name of params at its shape."""
    extra = sorted(n for n in start if n not in trainable)
    if extra:
        head = any(n.startswith("cls.") for n in extra)
        raise ValueError(f"adapter: expected the trainable names of a {method} run, got also {extra[:4]}"
                         + ("; the adapter has a classification head: give --task kind (or records with labels)"
                            if head else ""))
    shapes = [f"{n} {tuple(start[n].shape)} (this run's {tuple(params[n].shape)})" for n in sorted(start)
              if tuple(start[n].shape) != tuple(params[n].shape)]
    if shapes:
        raise ValueError(f"adapter: expected its arrays at this run's shapes, got {'; '.join(shapes[:3])}")


def load_records(config, tokenizer, context_length=None):
    """(train_records, test_records, class_names or None) for a config.

    A file's values must be text the run's tokenizer encodes. With
    context_length, every record must fit it, counted in the tokenizer's
    tokens: a file's records are checked as they are read (an error names the
    line), a task's after.
    """
    kind = "classification" if config.is_classification else "instruction"
    if config.data_file is not None:
        records = tasks.load_jsonl(config.data_file, kind, tokenizer, context_length)
        if len(records) < 2:
            raise ValueError(f"data_file: expected at least 2 records (some to train on, some to test), "
                             f"got {len(records)}")
        # a seeded 90/10 split: the last tenth is held out for the score
        order = np.random.default_rng(config.seed).permutation(len(records))
        n_test = max(1, len(records) // 10)
        train_records = [records[i] for i in order[n_test:]]
        test_records = [records[i] for i in order[:n_test]]
        names = sorted({r["label"] for r in records}) if config.is_classification else None
        return train_records, test_records, names
    train_records, test_records = tasks.task_splits(config.task, config.n_train, config.n_test, config.seed)
    if context_length is not None:
        tasks.check_records_fit(train_records + test_records, kind, tokenizer, context_length,
                                where=f"task {config.task}")
    return train_records, test_records, list(tasks.CLASS_NAMES) if config.is_classification else None


def check_settings(model_config, tokenizer, config, train_records, test_records):
    """Raise ValueError, naming the setting, unless config makes sense for this model and data.

    - end_marker: one token of the model's tokenizer (decoding stops at that token)
    - the method's own (methods.Method.check): e.g. a LoRA rank at most min(out, in) of
      every adapted W, a soft prompt that fits the context beside the longest record
    - batch_size: at most the number of training records
    """
    if not config.is_classification:
        single_token_id(tokenizer, config.end_marker, "end_marker")
    m = methods.method(config.method)
    if m.check is not None:
        kind = "classification" if config.is_classification else "instruction"
        longest = max(tasks.record_positions(r, kind, tokenizer) for r in train_records + test_records)
        m.check(model_config, config, longest)
    B = config.train.batch_size
    if len(train_records) < B:
        raise ValueError(f"batch_size: expected at most the {len(train_records)} training records, got {B}")


def load_data(model_config, tokenizer, config):
    """load_records with every record checked against the context, then check_settings: all before any work.

    Returns (train_records, test_records, class_names or None).
    """
    train_records, test_records, class_names = load_records(config, tokenizer, model_config.context_length)
    check_settings(model_config, tokenizer, config, train_records, test_records)
    return train_records, test_records, class_names


def memory_plan(model_config, tokenizer, config, data):
    """memplan.plan of one training step of this run: its method and settings, batch_size records of the
    longest record's length (capped at the context), the base weights held beside (base_kept)."""
    from .memplan import plan

    train_records, test_records, _ = data
    kind = "classification" if config.is_classification else "instruction"
    longest = max(tasks.record_positions(r, kind, tokenizer) for r in train_records + test_records)
    return plan(model_config, config.method, config.train.batch_size, min(longest, model_config.context_length),
                config.checkpoint_activations, settings=config, base_kept=True,
                classification=config.is_classification)


def check_memory(model_config, tokenizer, config, data, xp=None, limit=None, already_held=0):
    """memory_plan against the memory available (memfit.available_memory; limit: a size such as "50MB"):
    MemoryPlanError (a ValueError, one line naming the largest term and the options that would fit, each
    checked by the plan) when it does not fit. already_held: bytes of the base weights already loaded (the
    plan counts them; the machine's free memory no longer does). Returns the plan."""
    from .memfit import check_fits

    def total_of(batch, method, checkpoint_activations):
        c = replace(config, method=method, checkpoint_activations=checkpoint_activations,
                    train=replace(config.train, batch_size=batch))
        return memory_plan(model_config, tokenizer, c, data).total

    p = memory_plan(model_config, tokenizer, config, data)
    check_fits(p, total_of, xp, limit, already_held)
    return p


def task_name(config):
    """The built-in task a run trains on; None for a file of instruction records ("kind" for a file of labels)."""
    return config.task if config.data_file is None or config.is_classification else None


def run_meta(base_params, model_config, tokenizer, config, class_names, continued_from=None):
    """What every checkpoint of a fine-tuning run stores about it; a resume must match it exactly.

    continued_from: the adapter a run began from (finetune's start), recorded by path."""
    m = methods.method(config.method)
    ft_config = replace(model_config, lora=m.adapter_config(config)) if m.adapter_config else model_config
    if m.model_settings is not None:  # a setting of ModelConfig beside .lora (prefix tuning's n_prefix)
        ft_config = replace(ft_config, **m.model_settings(config))
    return {"kind": "finetune", "model": ft_config.to_dict(), "tokenizer": tokenizer.describe(),
            "method": config.method, "task": task_name(config),
            "finetune": run_description(config), "class_names": class_names,
            "base_fingerprint": base_fingerprint(base_params),
            **({"continued_from": os.path.abspath(continued_from)} if continued_from is not None else {})}


def score(params, model_config, tokenizer, records, class_names, end="\n"):
    """The task metric: accuracy with a head (class_names given), else exact match."""
    if class_names:
        return classification_accuracy(params, model_config, tokenizer, records, class_names)
    return exact_match(params, model_config, tokenizer, records, end=end)[0]


def finetune(base_params, model_config, tokenizer, config, run_dir=None, val_data=None, resume=None, data=None,
             start=None, continued_from=None):
    """Fine-tune with one strategy and score it.

    Inputs:
    - base_params: the pretrained weights (left unchanged)
    - model_config: their ModelConfig
    - tokenizer: their tokenizer (runs.load_model's); a run folder gets a copy
      of its files, and the run's metadata its description
    - config: FinetuneConfig
    - run_dir: where to write log.jsonl and checkpoint.npz, and at the end
      summary.json (and adapter.npz for LoRA)
    - val_data: pretraining-corpus validation tokens (corpus_val_data(tokenizer)),
      to measure forgetting, in nats per token (per character for the
      character tokenizer)
    - resume: a checkpoint of this same run to continue (see train.check_resume)
    - data: what load_data(model_config, tokenizer, config) returned, if already called
    - start, continued_from: trained adapters to begin from (setup_strategy's start), and the path they came
      from (recorded in the run's metadata); the score "before" is then the adapter's own

    Returns (params, model_config, trainable, summary): the fine-tuned model,
    the config it now comes with (LoRA settings included), the names that
    were trained, and a summary dict (the parameter report under "report").
    """
    train_records, test_records, class_names = data or load_data(model_config, tokenizer, config)
    n_classes = len(class_names) if class_names else None
    params, ft_config, trainable = setup_strategy(base_params, model_config, tokenizer, config, n_classes, start)
    report = count_report(params, trainable, ft_config)
    count_line = methods.method(config.method).count_line
    if count_line is not None:  # a method outside ModelConfig.lora states its own count and formula
        report += "\n" + count_line(params, trainable, ft_config)
    batches = tasks.RecordBatches(train_records, tokenizer, config.train.batch_size, model_config.context_length,
                                  class_names, config.train_on_prompt, config.end_marker)

    # the pretrained model's task score and corpus loss, before any fine-tuning
    before_params, before_config, _ = setup_strategy(base_params, model_config, tokenizer, config, n_classes, start)
    metric_before = score(before_params, before_config, tokenizer, test_records, class_names, config.end_marker)
    del before_params  # a second copy of the weights under full fine-tuning: not held through training
    # the same windows before and after: the fine-tuned model's (fewer real tokens with PEFT's positions)
    window = real_context(params, ft_config)
    val_before = None if val_data is None else strided_val_loss(base_params, model_config, val_data, context=window)

    meta = run_meta(base_params, model_config, tokenizer, config, class_names, continued_from)
    if run_dir is not None:
        tokenizer.save(run_dir)  # the run folder holds what its checkpoint's ids mean
    t0 = time.perf_counter()
    history, state = train(params, trainable, ft_config, batches, config.train, run_dir=run_dir, meta=meta,
                           resume=resume, desc=f"finetune {config.method}",
                           checkpoint_activations=config.checkpoint_activations)
    wall = time.perf_counter() - t0
    metric = score(params, ft_config, tokenizer, test_records, class_names, config.end_marker)
    val_after = strided_val_loss(params, ft_config, val_data, context=window) if val_data is not None else None
    n_trainable = count_params(params, trainable)
    summary = {
        "method": config.method, "report": report,
        # what was trained on: a built-in task, or the user's file and its own 90/10 split
        "task": task_name(config),
        "data_file": os.path.abspath(config.data_file) if config.data_file is not None else None,
        "n_train": len(train_records), "n_test": len(test_records),
        "trainable_params": n_trainable, "total_params": count_params(params),
        "optimizer_state_bytes": optimizer_state_bytes(state),
        "metric_before": metric_before, "metric": metric,
        "val_loss_before": val_before, "val_loss_after": val_after,
        "forgetting": (val_after - val_before) if val_data is not None else None,
        "final_train_loss": history[-1]["train_loss"] if history else _last_logged_loss(run_dir),
        "wall_s": wall, "steps": config.train.steps,
        "config": describe(config), "base_fingerprint": meta["base_fingerprint"],
    }
    if run_dir is not None:
        if methods.method(config.method).saves_adapter:
            save_adapter(os.path.join(run_dir, ADAPTER), params, trainable, ft_config, base_params,
                         {"finetune": meta["finetune"]})
        with open(os.path.join(run_dir, SUMMARY), "w") as f:  # last: a run with a summary is finished
            json.dump(summary, f, indent=1)
    return params, ft_config, trainable, summary


def _last_logged_loss(run_dir):
    """The last train_loss in run_dir's log (a run resumed at its final step trains no step itself)."""
    if run_dir is None or not os.path.exists(os.path.join(run_dir, LOG)):
        return None
    losses = [r["train_loss"] for r in read_jsonl(os.path.join(run_dir, LOG), "a run log") if "train_loss" in r]
    return losses[-1] if losses else None


def describe(config):
    """Everything that defines a fine-tuning run (its split, its strategy, its training), as JSON."""
    return json.loads(json.dumps({"finetune": run_description(config), "train": asdict(config.train),
                                  "lora": config.lora.to_dict() if methods.method(config.method).adapter_config
                                  else None}))


def finished_summary(run_dir, base_params, config):
    """run_dir's summary.json when that run finished with exactly this config on these base weights; else None."""
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if summary.get("config") != describe(config) or summary.get("base_fingerprint") != base_fingerprint(base_params):
        return None
    return summary


def run_description(config):
    """What a run's metadata keeps so its split can be rebuilt exactly: task or
    data file (with its SHA-256), seed, split sizes, and the prompt settings."""
    d = {k: v for k, v in asdict(config).items() if k not in ("lora", "train", "checkpoint_activations")}
    if d["n_prefix"] == FinetuneConfig.n_prefix:
        del d["n_prefix"]  # added later: at its default a run is described as before, so finished runs stay found
    if not d["peft_positions"]:
        del d["peft_positions"]  # likewise
    if config.data_file is not None:
        d["data_file"] = os.path.abspath(config.data_file)
        # the bytes load_records read (once: a pipe or FIFO cannot be read again)
        d["data_sha256"] = read_input(config.data_file, "data_file")[1]
        # a file is split 90/10 by the seed: a built-in task's sizes do not apply, nor its name
        # (only "kind" stays: it says the records are classification records)
        del d["n_train"], d["n_test"]
        d["task"] = task_name(config)
    return d


def config_from_description(d):
    """The FinetuneConfig (split-defining fields) a run was made with, from run_description's dict."""
    fields = {k: d[k] for k in ("method", "task", "n_train", "n_test", "data_file", "train_on_prompt", "end_marker",
                                "n_prompt", "prompt_init", "prompt_init_text", "n_prefix", "peft_positions", "seed")
              if k in d}
    return FinetuneConfig(**fields)
