"""`minilora demo`: the whole story on the built-in defaults, in minutes on a laptop CPU.

1. pretrain the tiny GPT on the toy corpus (or reuse runs/pretrain/checkpoint.npz)
2. fine-tune it three ways (full, LoRA, prompt tuning) on a generative task,
   and three ways on the classification task
3. return the comparison rows and write the figures

Run again after an interruption, the demo resumes where it stopped: a
finished fine-tuning run (its summary.json made with the same settings on the
same pretrained weights) is reused, an interrupted one or an interrupted
pretraining continues from its checkpoint. A folder that holds some other run
is refused unless overwrite is set.

The library returns, the CLI speaks: run_demo reports its progress through the
`log` callback it is given (the CLI passes print) and returns what it measured.
"""

import json
import os
import time

import numpy as np

from . import corpus, methods, plot
from .checkpoint import load_checkpoint
from .evaluation import corpus_val_data
from .finetune import FinetuneConfig, check_settings, finetune, finished_summary, load_records, run_meta
from .pretrain import PretrainConfig, load_or_pretrain
from .runs import CHECKPOINT, RUN_FILES, check_writable
from .sampling import decode
from .tasks import record_positions
from .tokenizer import make_tokenizer, single_token_id
from .train import resume_problem

# the seed's three answers to "which weights get updated?": all of them, low-rank adapters, or none
DEMO_METHODS = ("full", "lora", "prompt")
GENERATIVE_STEPS = 600
CLASSIFICATION_STEPS = 600


def sample_report(params, model_config, tokenizer, n=100, seed=0):
    """Sample n sentences at temperature 1 from a fresh line; how many are in the toy language?

    The model is params, model_config and its tokenizer; a sentence ends at the
    newline's token. Returns (fraction that parse, the sampled sentences). A
    sentence parses when corpus.sentence_log_prob accepts it: every word in its
    place, agreement right.
    """
    newline = single_token_id(tokenizer, "\n", "newline")
    rng = np.random.default_rng(seed)
    outs = decode(params, model_config, [np.array([newline])] * n, 60, temperature=1.0, rng=rng,
                  stop_id=newline, batch_size=n)
    sentences = [tokenizer.decode(o) for o in outs]
    return sum(map(_parses, sentences)) / n, sentences


def _parses(sentence):
    try:
        corpus.sentence_log_prob(sentence)
    except corpus.NotASentence:
        return False
    return True


def format_table(rows):
    """The comparison table the demo prints."""
    head = ("task", "method", "trainable", "% of model", "optimizer state", "metric before", "metric after",
            "corpus loss before", "corpus loss after", "wall s")
    lines = [head]
    for r in rows:
        lines.append((r["task"], r["method"], f"{r['trainable_params']:,}",
                      f"{100 * r['trainable_params'] / r['total_params']:.2f}%",
                      f"{r['optimizer_state_bytes'] / 1024:,.0f} KiB", f"{r['metric_before']:.3f}",
                      f"{r['metric']:.3f}", f"{r['val_loss_before']:.4f}", f"{r['val_loss_after']:.4f}",
                      f"{r['wall_s']:.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _finetune_configs(model_config, tokenizer, task, fast, log):
    """The six fine-tuning runs as (FinetuneConfig, its checked data); a soft prompt is shortened, with a
    note, when the default one and the task's longest record would not fit the context together."""
    runs = []
    for t, steps in ((task, GENERATIVE_STEPS), ("kind", CLASSIFICATION_STEPS)):
        for method in DEMO_METHODS:
            config = FinetuneConfig(method=method, task=t, n_train=200 if fast else 2000, n_test=40 if fast else 300)
            config.train.steps = 6 if fast else steps
            if fast:
                config.train.warmup_steps = 1
            data = load_records(config, tokenizer, model_config.context_length)
            fit = methods.method(method).fit
            if fit is not None:
                kind = "classification" if config.is_classification else "instruction"
                longest = max(record_positions(r, kind, tokenizer) for r in data[0] + data[1])
                note = fit(model_config, config, longest)
                if note:
                    log(f"[{method}] {t}: {note}")
            check_settings(model_config, tokenizer, config, data[0], data[1])
            runs.append((config, data))
    return runs


def _finetune_run(params, model_config, tokenizer, config, data, run_dir, val_data, overwrite, log):
    """One fine-tuning run of the demo: reused when finished, resumed when interrupted, else trained."""
    summary = finished_summary(run_dir, params, config)
    label = f"[{config.method}] {config.task}"
    if summary is not None:
        log(f"{label}: reusing the finished run in {run_dir}")
        return summary
    ckpt, resume = os.path.join(run_dir, CHECKPOINT), None
    if os.path.exists(ckpt):
        meta = load_checkpoint(ckpt)[1]
        if resume_problem(meta, config.train, run_meta(params, model_config, tokenizer, config, data[2])) is None:
            resume = ckpt
            log(f"{label}: resuming {run_dir} from step {meta['step']}")
        elif not overwrite:
            raise ValueError(f"run_dir: {run_dir} holds another fine-tuning run than the demo's; give another "
                             f"folder (--out), or overwrite it (--overwrite)")
    if resume is None:
        for name in RUN_FILES:  # a run stopped before its first checkpoint, or one being overwritten
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    return finetune(params, model_config, tokenizer, config, run_dir, val_data, resume=resume, data=data)[3]


def run_demo(out_dir="runs", figures_dir=None, backend=None, fast=False, task="subject", log=None,
             overwrite=False):
    """Pretrain, fine-tune six ways, write figures; returns the summary dict (rows, pretraining, samples).

    figures_dir: where the PNGs go; None puts them beside the runs (out_dir/figures),
    '' writes none. The repository's committed figures/ are written only when asked
    (benchmarks/demo_benchmark.py does), never by default.

    log(text), when given, receives a line of progress at each stage. Finished
    runs in out_dir are reused and interrupted ones resumed; one made with
    other settings is refused (ValueError) unless overwrite.
    """
    log = log or (lambda text: None)
    t0 = time.perf_counter()
    if figures_dir is None:
        figures_dir = os.path.join(out_dir, "figures")
    check_writable(out_dir)
    if figures_dir:
        check_writable(figures_dir, "--figures")  # before the work, not after it
    pre_config = PretrainConfig.fast() if fast else PretrainConfig()
    tokenizer = make_tokenizer()  # the demo's model reads characters
    runs = _finetune_configs(pre_config.model, tokenizer, task, fast, log)  # every run's data checked before any work
    pre_dir = os.path.join(out_dir, "pretrain")
    params, model_config, pre_summary, tokenizer = load_or_pretrain(pre_config, pre_dir, backend, overwrite,
                                                                    tokenizer)
    if pre_summary is None:
        log(f"reusing the pretrained model in {pre_dir}")
    else:
        resumed = f" (resumed from step {pre_summary['resumed_from']})" if pre_summary["resumed_from"] else ""
        log(f"pretrained{resumed} in {pre_summary['wall_s']:.0f} s: val loss {pre_summary['val_loss']:.4f} "
            f"nats/char, entropy floor {pre_summary['floor']:.4f}, bigram {pre_summary['bigram_loss']:.4f}")
    val_data = corpus_val_data(tokenizer, 100 if fast else pre_config.n_val_sentences, pre_config.data_seed)
    grammatical, samples = sample_report(params, model_config, tokenizer, n=20 if fast else 200)
    log(f"samples from the pretrained model ({100 * grammatical:.0f}% of {len(samples)} are sentences "
        "of the toy language):\n" + "\n".join(f"  {s}" for s in samples[:5]))
    rows, logs = [], {}
    for config, data in runs:
        t, method = config.task, config.method
        run_dir = os.path.join(out_dir, f"finetune-{t}-{method}")
        summary = _finetune_run(params, model_config, tokenizer, config, data, run_dir, val_data, overwrite, log)
        rows.append(summary)
        logs[(t, method)] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
        log(f"[{method}] {t}: metric {summary['metric_before']:.3f} -> {summary['metric']:.3f}, "
            f"corpus loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}")
    result = {"rows": rows, "pretrain": pre_summary, "grammatical_fraction": grammatical, "samples": samples[:10],
              "wall_s": time.perf_counter() - t0}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "demo_summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    if figures_dir:
        _write_figures(out_dir, figures_dir, task, rows, logs, fast)
        log(f"figures written to {figures_dir}/")
    return result


def _write_figures(out_dir, figures_dir, task, rows, logs, fast):
    note = " [fast mode: a smoke test, not a result]" if fast else ""
    pre_log = plot.read_log(os.path.join(out_dir, "pretrain", "log.jsonl"))
    plot.save_figure(plot.plot_loss_curves({"pretrain": pre_log}, floor=corpus.entropy_per_char(), logy=True,
                                           title=("Pretraining loss against the entropy floor" + note)),
                     os.path.join(figures_dir, "pretrain_loss.png"))
    gen = {m: logs[(task, m)] for m in DEMO_METHODS}
    plot.save_figure(plot.plot_loss_curves(gen, title=f"Fine-tuning loss on the '{task}' task "
                                                      f"(response tokens only){note}"),
                     os.path.join(figures_dir, "finetune_loss.png"))
    gen_rows = [r for r in rows if r["task"] == task]
    plot.save_figure(plot.plot_comparison(gen_rows, metric_label="exact match (held-out)",
                                          title=f"Which weights get updated? '{task}' task, equal steps{note}"),
                     os.path.join(figures_dir, "finetune_comparison.png"))
    cls_rows = [r for r in rows if r["task"] == "kind"]
    plot.save_figure(plot.plot_comparison(cls_rows, metric_label="accuracy (held-out)",
                                          title=f"Classification head on the last token: 'kind' task{note}"),
                     os.path.join(figures_dir, "classification_comparison.png"))
