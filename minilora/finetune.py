"""Phase 2: fine-tune the pretrained weights three ways, with one loop and one model.

A strategy is only (a) which extra parameters exist and (b) which names are trainable:

    method   extra parameters                     trainable
    full     -                                    every parameter
    lora     <linear>.lora_A, <linear>.lora_B     the adapters
    prompt   prompt (P, C)                        the soft prompt
    (a classification task adds cls.W, cls.b, trainable under every method)

Everything else, the forward, the backward, the optimizer and the loop, is shared.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from . import corpus, tasks
from .backend import to_numpy
from .lora import LoraConfig, add_lora, lora_names, lora_param_count
from .model import add_head, cls_loss_and_grads, count_params, lm_loss_and_grads
from .optim import optimizer_state_bytes
from .pretrain import strided_val_loss
from .prompt import add_prompt
from .sampling import greedy_decode
from .train import TrainConfig, train

METHODS = ("full", "lora", "prompt")
# Each method's default peak learning rate. Fewer, freshly initialised parameters
# (adapters, a soft prompt) take larger steps than the pretrained weights, which
# a large step would overwrite (the seed: "too high causes catastrophic forgetting").
DEFAULT_LR = {"full": 3e-4, "lora": 5e-3, "prompt": 1e-1}


@dataclass
class FinetuneConfig:
    method: str = "lora"  # full | lora | prompt
    task: str = "subject"  # a generative task of tasks.GENERATIVE_TASKS, or "kind" (classification)
    n_train: int = 2000  # training records (ignored with data_file)
    n_test: int = 300  # held-out records scored after training
    data_file: str = None  # a JSON-lines file of the user's own records instead of a built-in task
    train_on_prompt: bool = False  # count the loss on the prompt tokens too
    lora: LoraConfig = field(default_factory=LoraConfig)
    n_prompt: int = 16  # soft-prompt vectors (prompt tuning)
    prompt_init: str = "vocab"  # vocab | random | text
    prompt_init_text: str = "Name the subject of the sentence."
    train: TrainConfig = None  # None: TrainConfig(steps=600, lr=DEFAULT_LR[method], ...)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.data_file is None and self.task not in tasks.TASKS:
            raise ValueError(f"task: expected one of {list(tasks.TASKS)}, got {self.task!r}")
        if self.train is None:
            self.train = TrainConfig(steps=600, batch_size=16, lr=DEFAULT_LR[self.method],
                                     min_lr=DEFAULT_LR[self.method] / 10, warmup_steps=20,
                                     weight_decay=0.0, eval_every=100)

    @property
    def is_classification(self):
        return self.task == "kind"


def setup_strategy(base_params, model_config, config, n_classes=None):
    """The parameters and trainable names of a strategy, from the pretrained weights.

    Returns (params, trainable). base_params is never modified: full
    fine-tuning trains copies, LoRA and prompt tuning share the frozen arrays.
    """
    if config.method == "full":
        params = {n: p.copy() for n, p in base_params.items()}
        trainable = set(params)
    elif config.method == "lora":
        params = add_lora(base_params, model_config, config.lora, seed=config.seed)
        trainable = set(lora_names(params))
    else:
        init_ids = corpus.CharTokenizer().encode(config.prompt_init_text) if config.prompt_init == "text" else None
        params = add_prompt(base_params, config.n_prompt, config.prompt_init, config.seed, init_ids)
        trainable = {"prompt"}
    if n_classes is not None:
        params = add_head(params, n_classes, seed=config.seed)
        trainable |= {"cls.W", "cls.b"}
    return params, trainable


def trainable_report(params, trainable, model_config=None, lora_config=None):
    """PEFT's print_trainable_parameters, plus LoRA's r (d + k) per adapted matrix, checked."""
    n_train, n_all = count_params(params, trainable), count_params(params)
    lines = [f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100 * n_train / n_all:.4f}"]
    adapted = sorted(n[: -len(".lora_A")] for n in params if n.endswith(".lora_A"))
    if adapted and lora_config is not None:
        total = 0
        for prefix in adapted:
            d, k = to_numpy(params[prefix + ".W"]).shape
            total += lora_param_count(d, k, lora_config.rank)
        counted = count_params(params, [n for n in trainable if n.endswith((".lora_A", ".lora_B"))])
        d, k = to_numpy(params[adapted[0] + ".W"]).shape
        lines.append(f"LoRA: r (d + k) = {lora_config.rank} x ({d} + {k}) = {lora_param_count(d, k, lora_config.rank):,}"
                     f" per adapted matrix ({d * k:,} for W itself), {len(adapted)} matrices: {total:,} "
                     + ("= the count above (adapters only)" if total == counted else f"!= counted {counted:,}"))
        if total != counted:
            raise AssertionError(f"LoRA parameter count {counted} does not match the formula r(d+k): {total}")
    return "\n".join(lines)


def exact_match(params, model_config, records, lora=None, max_new_tokens=12):
    """Greedy-decode every record's prompt; the fraction whose response equals the output exactly.

    Returns (accuracy, predictions as strings).
    """
    tok = corpus.CharTokenizer()
    prompts = [tok.encode(tasks.format_prompt(r["instruction"], r.get("input", ""))) for r in records]
    outs = greedy_decode(params, model_config, prompts, max_new_tokens, corpus.NEWLINE_ID, lora)
    preds = [tok.decode(o) for o in outs]
    acc = float(np.mean([p == r["output"] for p, r in zip(preds, records)]))
    return acc, preds


def classification_accuracy(params, model_config, records, lora=None, class_names=tasks.CLASS_NAMES,
                            batch_size=256):
    """Fraction of records whose argmax class is the label."""
    tok = corpus.CharTokenizer()
    correct = 0
    for i in range(0, len(records), batch_size):
        x, last, labels = tasks.classification_batch(records[i:i + batch_size], tok, model_config.context_length,
                                                     class_names)
        _, _, logits = cls_loss_and_grads(params, model_config, x, last, labels, lora=lora)
        correct += int((to_numpy(logits).argmax(axis=-1) == labels).sum())
    return correct / len(records)


def load_records(config):
    """(train_records, test_records, class_names or None) for a config."""
    if config.data_file is not None:
        kind = "classification" if config.is_classification else "instruction"
        records = tasks.load_jsonl(config.data_file, kind)
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
    return train_records, test_records, list(tasks.CLASS_NAMES) if config.is_classification else None


def finetune(base_params, model_config, config, run_dir=None, val_data=None, verbose=True):
    """Fine-tune with one strategy and score it.

    Inputs:
    - base_params: the pretrained weights (left unchanged)
    - model_config: their ModelConfig
    - config: FinetuneConfig
    - run_dir: where to write log.jsonl and checkpoint.npz
    - val_data: pretraining-corpus validation tokens, to measure forgetting

    Returns (params, trainable, summary dict).
    """
    train_records, test_records, class_names = load_records(config)
    params, trainable = setup_strategy(base_params, model_config, config,
                                       len(class_names) if class_names else None)
    lora = config.lora if config.method == "lora" else None
    if verbose:
        print(f"[{config.method}] " + trainable_report(params, trainable, model_config, lora).replace("\n", f"\n[{config.method}] "))
    tok = corpus.CharTokenizer()
    T = model_config.context_length
    B = config.train.batch_size
    if len(train_records) < B:
        raise ValueError(f"batch_size: expected at most the {len(train_records)} training records, got {B}")

    def next_batch(rng):
        chosen = [train_records[i] for i in rng.choice(len(train_records), B, replace=False)]
        if class_names:
            x, last, labels = tasks.classification_batch(chosen, tok, T, class_names)
            return {"x": x, "last": last, "labels": labels}
        x, y, mask = tasks.instruction_batch(chosen, tok, T, config.train_on_prompt)
        return {"x": x, "y": y, "mask": mask}

    def loss_fn(p, batch, tr, rng):
        drop_rng = rng if (model_config.dropout > 0 or (lora is not None and lora.dropout > 0)) else None
        if class_names:
            loss, grads, _ = cls_loss_and_grads(p, model_config, batch["x"], batch["last"], batch["labels"], tr,
                                                lora, drop_rng)
            return loss, grads
        return lm_loss_and_grads(p, model_config, batch["x"], batch["y"], batch["mask"], tr, lora, drop_rng)

    def score(p):
        if class_names:
            return classification_accuracy(p, model_config, test_records, lora, class_names)
        return exact_match(p, model_config, test_records, lora)[0]

    # the pretrained model's task score and corpus loss, before any fine-tuning
    before_params, _ = setup_strategy(base_params, model_config, config, len(class_names) if class_names else None)
    metric_before = score(before_params)
    val_before = strided_val_loss(base_params, model_config, val_data) if val_data is not None else None

    meta = {"kind": "finetune", "model": model_config.to_dict(), "method": config.method, "task": config.task,
            "lora": config.lora.to_dict() if lora else None}
    t0 = time.perf_counter()
    history, state = train(params, trainable, loss_fn, next_batch, config.train, run_dir=run_dir, meta=meta,
                    desc=f"finetune {config.method}")
    wall = time.perf_counter() - t0
    metric = score(params)
    val_after = strided_val_loss(params, model_config, val_data, lora=lora) if val_data is not None else None
    n_trainable = count_params(params, trainable)
    summary = {
        "method": config.method, "task": config.task,
        "trainable_params": n_trainable, "total_params": count_params(params),
        "optimizer_state_bytes": optimizer_state_bytes(state),
        "metric_before": metric_before, "metric": metric,
        "val_loss_before": val_before, "val_loss_after": val_after,
        "forgetting": (val_after - val_before) if val_data is not None else None,
        "final_train_loss": history[-1]["train_loss"], "wall_s": wall, "steps": config.train.steps,
    }
    return params, trainable, summary

