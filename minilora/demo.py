"""`minilora demo`: the whole story on the built-in defaults, in minutes on a laptop CPU.

1. pretrain the tiny GPT on the toy corpus (or reuse runs/pretrain/checkpoint.npz)
2. fine-tune it three ways (full, LoRA, prompt tuning) on a generative task,
   and three ways on the classification task
3. print the comparison table and write the figures
"""

import json
import os
import time

import numpy as np

from . import corpus, plot
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, load_or_pretrain
from .sampling import generate_many

GENERATIVE_STEPS = 600
CLASSIFICATION_STEPS = 600


def _pretrained(run_dir, backend, fast):
    """Reuse a finished pretraining run of the same config, or pretrain now."""
    params, model_config, summary = load_or_pretrain(PretrainConfig.fast() if fast else PretrainConfig(),
                                                     run_dir, backend)
    if summary is not None:
        print(f"pretrained in {summary['wall_s']:.0f} s: val loss {summary['val_loss']:.4f} nats/char, "
              f"entropy floor {summary['floor']:.4f}, bigram {summary['bigram_loss']:.4f}")
    return params, model_config, summary


def sample_report(params, model_config, n=100, seed=0):
    """Sample n sentences at temperature 1 from a fresh line; how many are in the toy language?

    Returns (fraction that parse, the sampled sentences). A sentence parses when
    corpus.sentence_log_prob accepts it: every word in its place, agreement right.
    """
    tok = corpus.CharTokenizer()
    rng = np.random.default_rng(seed)
    outs = generate_many(params, model_config, tok.encode("\n"), 60, 1.0, None, rng, None, corpus.NEWLINE_ID, n)
    sentences = [tok.decode(o).rstrip("\n") for o in outs]
    ok = 0
    for s in sentences:
        try:
            corpus.sentence_log_prob(s)
            ok += 1
        except ValueError:
            pass
    return ok / n, sentences


def format_table(rows):
    """The comparison table printed at the end of the demo."""
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


def run_demo(out_dir="runs", figures_dir="figures", backend=None, fast=False, task="subject"):
    """Pretrain, fine-tune six ways, print the table, write figures; returns the table rows."""
    t0 = time.perf_counter()
    params, model_config, pre_summary = _pretrained(os.path.join(out_dir, "pretrain"), backend, fast)
    _, val_text = corpus.train_val_text(0, 100 if fast else PretrainConfig().n_val_sentences,
                                        PretrainConfig().data_seed)
    val_data = corpus.CharTokenizer().encode(val_text)
    grammatical, samples = sample_report(params, model_config, n=20 if fast else 200)
    print(f"samples from the pretrained model ({100 * grammatical:.0f}% of {len(samples)} are sentences "
          "of the toy language):")
    for s in samples[:5]:
        print(f"  {s}")
    rows, logs = [], {}
    for t, steps in ((task, GENERATIVE_STEPS), ("kind", CLASSIFICATION_STEPS)):
        for method in ("full", "lora", "prompt"):
            config = FinetuneConfig(method=method, task=t, n_train=200 if fast else 2000, n_test=40 if fast else 300)
            config.train.steps = 6 if fast else steps
            if fast:
                config.train.warmup_steps = 1
            run_dir = os.path.join(out_dir, f"finetune-{t}-{method}")
            _, _, summary = finetune(params, model_config, config, run_dir, val_data)
            rows.append(summary)
            logs[(t, method)] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
            print(f"[{method}] {t}: metric {summary['metric_before']:.3f} -> {summary['metric']:.3f}, "
                  f"corpus loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}")
    print()
    print(format_table(rows))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "demo_summary.json"), "w") as f:
        json.dump({"rows": rows, "pretrain": pre_summary, "grammatical_fraction": grammatical,
                   "samples": samples[:10]}, f, indent=1)
    if figures_dir:
        pre_log = plot.read_log(os.path.join(out_dir, "pretrain", "log.jsonl"))
        plot.save_figure(plot.plot_loss_curves({"pretrain": pre_log}, floor=corpus.entropy_per_char(), logy=True),
                         os.path.join(figures_dir, "pretrain_loss.png"))
        gen = {m: logs[(task, m)] for m in ("full", "lora", "prompt")}
        plot.save_figure(plot.plot_loss_curves(
            gen, title=f"Fine-tuning loss on the '{task}' task (response tokens only)"),
            os.path.join(figures_dir, "finetune_loss.png"))
        gen_rows = [{**r, "method": r["method"]} for r in rows if r["task"] == task]
        plot.save_figure(plot.plot_comparison(gen_rows, metric_label="exact match (held-out)",
                                              title=f"Which weights get updated? '{task}' task, equal steps"),
                         os.path.join(figures_dir, "finetune_comparison.png"))
        cls_rows = [r for r in rows if r["task"] == "kind"]
        plot.save_figure(plot.plot_comparison(cls_rows, metric_label="accuracy (held-out)",
                                              title="Classification head on the last token: 'kind' task"),
                         os.path.join(figures_dir, "classification_comparison.png"))
        print(f"figures written to {figures_dir}/")
    return rows
