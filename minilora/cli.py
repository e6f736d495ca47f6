"""The `minilora` command: one subcommand per step of the story.

    minilora demo          pretrain, fine-tune three ways, print the table, write figures
    minilora gradcheck     every hand-written derivative against finite differences
    minilora pretrain      phase 1: next-token training on the toy corpus (or your text)
    minilora generate      sample text from a checkpoint (plus --adapter)
    minilora finetune      phase 2: --method full | lora | prompt
    minilora evaluate      a fine-tuned run's task score on its own held-out split, and forgetting
    minilora merge         fold a LoRA run's adapters into W, save a plain model
    minilora plot          loss curves from run logs
    minilora sweep         a study's grid of fine-tuning runs, resumable, in parallel workers
    minilora report        a finished study's tables and figures

This is the only module that prints. Every default below is read from the
dataclasses (ModelConfig, TrainConfig, PretrainConfig, FinetuneConfig, LoraConfig),
never copied by hand.
"""

import argparse
import json
import os
import sys
from dataclasses import fields, replace

import numpy as np

from .lora import LoraConfig
from .model import ModelConfig
from .train import TrainConfig

MODEL, TRAIN, LORA = ModelConfig(), TrainConfig(), LoraConfig()
# One BLAS thread by default: two runs side by side then share 2 cores fairly (2.02x one run alone),
# where two 2-thread runs fight for the cores and ran 30x slower (benchmarks/speed.json, "concurrency").
DEFAULT_THREADS = 1


def _pretrain_defaults():
    from .pretrain import PretrainConfig

    return PretrainConfig()


def _finetune_defaults(method="lora"):
    from .finetune import FinetuneConfig

    return FinetuneConfig(method=method)


def _xp(args):
    from .backend import get_backend

    return get_backend(args.backend)


def _cmd_gradcheck(args):
    from .gradcheck import format_results, run_checks

    results = run_checks(args.groups, seed=args.seed, xp=_xp(args))
    print(format_results(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _warmup(args, default):
    """--warmup-steps, or the default capped at a tenth of a short run."""
    return args.warmup_steps if args.warmup_steps is not None else min(default, args.steps // 10)


def _cmd_pretrain(args):
    from .pretrain import PretrainConfig, pretrain

    d = _pretrain_defaults()
    model = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        d_ff=args.d_ff or 4 * args.d_model, context_length=args.context_length,
                        dropout=args.dropout)
    tc = replace(d.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                 warmup_steps=_warmup(args, d.train.warmup_steps), eval_every=args.eval_every,
                 checkpoint_every=args.checkpoint_every, seed=args.seed)
    config = replace(d, model=model, train=tc, init_seed=args.seed)
    _, s = pretrain(config, run_dir=args.out, text_file=args.text, backend=args.backend, resume=args.resume)
    print(f"pretrained {s['steps']} steps in {s['wall_s']:.1f} s: val loss {s['val_loss']:.4f} nats/char"
          + (f", entropy floor {s['floor']:.4f} ({100 * (s['val_loss'] / s['floor'] - 1):.1f}% above)"
             if s["floor"] else "")
          + f", character bigram {s['bigram_loss']:.4f}")
    print(f"checkpoint: {os.path.join(args.out, 'checkpoint.npz')}  log: {os.path.join(args.out, 'log.jsonl')}")
    return 0


def _cmd_generate(args):
    from .corpus import NEWLINE_ID, CharTokenizer
    from .runs import load_model
    from .sampling import decode

    params, config, _ = load_model(args.checkpoint, _xp(args), args.adapter)
    tok = CharTokenizer()
    prompt = args.prompt.replace("\\n", "\n")  # lets a newline be typed on a shell as \n
    rng = np.random.default_rng(args.seed)
    samples = decode(params, config, [tok.encode(prompt)] * args.num_samples, args.max_new_tokens,
                     args.temperature, args.top_k, rng, NEWLINE_ID if args.stop_at_newline else None,
                     batch_size=args.num_samples)
    for ids in samples:
        print(prompt + tok.decode(ids))
    return 0


def _finetune_config(args):
    from .finetune import DEFAULT_LR, FinetuneConfig

    d = _finetune_defaults(args.method)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    return FinetuneConfig(
        method=args.method, task=args.task, data_file=args.data, train_on_prompt=args.train_on_prompt,
        lora=LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                        targets=tuple(args.targets.split(",")), dropout=args.lora_dropout, rslora=args.rslora,
                        init=args.lora_init),
        n_prompt=args.n_prompt, prompt_init=args.prompt_init,
        train=replace(d.train, steps=args.steps, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                      warmup_steps=_warmup(args, d.train.warmup_steps), eval_every=args.steps, seed=args.seed),
        seed=args.seed)


def _cmd_finetune(args):
    from .evaluation import corpus_val_data
    from .finetune import finetune
    from .lora import save_adapter
    from .runs import load_model

    params, model_config, _ = load_model(args.checkpoint, _xp(args))
    config = _finetune_config(args)
    name = os.path.splitext(os.path.basename(config.data_file))[0] if config.data_file else config.task
    out = args.out or os.path.join("runs", f"finetune-{name}-{config.method}")
    ft_params, ft_config, trainable, s = finetune(params, model_config, config, out, corpus_val_data())
    print(f"[{config.method}] " + s["report"].replace("\n", f"\n[{config.method}] "))
    if config.method == "lora":
        save_adapter(os.path.join(out, "adapter.npz"), ft_params, trainable, ft_config, params,
                     {"finetune": _run_meta(out)})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(f"{config.method} on {name}: metric {s['metric_before']:.3f} -> {s['metric']:.3f}; "
          f"pretraining-corpus loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}; "
          f"optimizer state {s['optimizer_state_bytes']:,} bytes; {s['wall_s']:.1f} s")
    print(f"run: {out}" + (f"  adapter: {os.path.join(out, 'adapter.npz')}" if config.method == "lora" else ""))
    return 0


def _run_meta(run_dir):
    """The split description stored in a run's checkpoint, for the adapter file beside it."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(os.path.join(run_dir, "checkpoint.npz"))[1].get("finetune")


def _cmd_evaluate(args):
    from .evaluation import classification_accuracy, corpus_val_data, exact_match, strided_val_loss
    from .finetune import config_from_description, load_records
    from .runs import load_model

    params, config, meta = load_model(args.run, _xp(args), args.adapter)
    val = strided_val_loss(params, config, corpus_val_data())
    print(f"pretraining-corpus validation loss: {val:.4f} nats/char")
    if args.data is None and "finetune" not in meta:
        return 0
    if args.data is not None:
        # score every record of a file the user gives
        from .tasks import load_jsonl

        kind = "classification" if "cls.W" in params else "instruction"
        test, what = load_jsonl(args.data, kind), f"the {args.data} records"
        names = meta.get("class_names") if kind == "classification" else None
    else:
        # rebuild exactly the run's own held-out split from its metadata
        _, test, names = load_records(config_from_description(meta["finetune"]))
        what = "held-out records"
    if names:
        print(f"accuracy on {len(test)} {what}: {classification_accuracy(params, config, test, names):.3f}")
    else:
        acc, preds = exact_match(params, config, test)
        print(f"exact match on {len(test)} {what}: {acc:.3f}")
        for r, p in list(zip(test, preds))[:args.show]:
            print(f"  {r.get('input', '')!r:48} -> {p!r:12} (expected {r['output']!r})")
    return 0


def _cmd_merge(args):
    from .checkpoint import save_checkpoint
    from .lora import lora_names, merge
    from .runs import load_model

    params, config, meta = load_model(args.run, _xp(args), args.adapter)
    if config.lora is None or not lora_names(params):
        raise ValueError(f"run: expected a LoRA model (a LoRA run, or a base checkpoint with --adapter), "
                         f"got {args.run} without adapters")
    n_adapters, scale = len(lora_names(params)) // 2, config.lora.scale
    merged, merged_config = merge(params, config)
    extra = sorted(n for n in merged if n.startswith("cls."))
    save_checkpoint(args.out, merged, {**{k: v for k, v in meta.items() if k not in ("rng", "base_fingerprint")},
                                       "model": merged_config.to_dict(), "kind": "merged",
                                       "merged_from": str(args.run)})
    print(f"merged {n_adapters} adapters into W (scale {scale:g}); wrote {args.out}"
          + (f" (with head {extra})" if extra else ""))
    return 0


def _cmd_plot(args):
    from .corpus import entropy_per_char
    from .plot import plot_loss_curves, read_log, save_figure

    runs = {}
    for path in args.logs:
        if os.path.isdir(path):
            path = os.path.join(path, "log.jsonl")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        runs[label] = read_log(path)
    floor = None if args.no_floor else entropy_per_char()
    save_figure(plot_loss_curves(runs, floor=floor, title=args.title, logy=args.logy), args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args):
    from .demo import format_table, run_demo

    figures = args.figures if args.figures is not None else os.path.join("figures", "fast") if args.fast \
        else "figures"
    result = run_demo(out_dir=args.out, figures_dir=figures, backend=args.backend, fast=args.fast,
                      task=args.task, log=print)
    print()
    print(format_table(result["rows"]))
    print(f"\ndemo finished in {result['wall_s']:.0f} s")
    return 0


def _cmd_sweep(args):
    from .studies import cells
    from .sweep import dask_executor, run_sweep

    grid = cells(args.study, args.out, args.seeds)
    executor = dask_executor(args.scheduler) if args.scheduler else None

    def progress(record, done, total):
        c = record["cell"]
        print(f"[{done}/{total}] {c['method']} lr {c['lr']:g} seed {c['seed']}: val {record['evals'][-1]['val_metric']:.3f}, "
              f"test {record['test_metric']:.3f}, forgetting {record['evals'][-1]['forgetting']:+.3f} "
              f"({record['wall_s']:.0f} s)", flush=True)

    results = run_sweep(grid, args.out, workers=args.workers, executor=executor, on_result=progress)
    print(f"{args.study}: {len(results)} cells run, {len(grid) - len(results)} already in "
          f"{os.path.join(args.out, 'results.jsonl')}")
    return 0


def _cmd_report(args):
    from .report import report

    text, figs = report(args.dir, args.figures, " [fast: a smoke test, not a result]" if args.fast_note else "")
    print(text)
    if args.figures:
        print("wrote " + ", ".join(os.path.join(args.figures, name) for name in figs))
    return 0


def _common_options():
    """--backend and --threads, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=["numpy", "cupy"], default=argparse.SUPPRESS,
                        help="array backend (default: $MINILORA_BACKEND or numpy)")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help=f"BLAS threads (default: {DEFAULT_THREADS}; raise it on an otherwise idle machine)")
    return common


def _model_options(s):
    for f in fields(ModelConfig):
        if f.name in ("vocab_size", "lora"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "d_ff":
            s.add_argument(flag, type=int, default=None, help="default: 4 x d_model")
        else:
            s.add_argument(flag, type=f.type if f.type in (int, float) else type(f.default), default=f.default)


def build_parser():
    common = _common_options()
    p = argparse.ArgumentParser(prog="minilora", parents=[common],
                                description="Fine-tuning by hand: a tiny GPT in NumPy, "
                                "pretrained, then fine-tuned (full, LoRA, prompt tuning).")
    sub = p.add_subparsers(dest="command", required=True)
    pre, ft = _pretrain_defaults(), _finetune_defaults()

    s = sub.add_parser("demo", parents=[common],
                       help="pretrain, fine-tune three ways, print a comparison, write figures")
    s.add_argument("--out", default="runs", help="folder for runs (a finished pretraining run there is reused)")
    s.add_argument("--figures", default=None,
                   help="folder for the PNG figures ('' for none; default figures/, or figures/fast/ with --fast)")
    s.add_argument("--task", default="subject", choices=["subject", "plural"], help="the generative task")
    s.add_argument("--fast", action="store_true", help="a few steps of everything (a smoke test, not results)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("gradcheck", parents=[common],
                       help="check every backward against finite differences (float64)")
    s.add_argument("--groups", nargs="+", choices=["ops", "model"], default=None, help="default: all")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_gradcheck)

    s = sub.add_parser("pretrain", parents=[common], help="phase 1: next-token training on the toy corpus")
    s.add_argument("--out", default="runs/pretrain")
    s.add_argument("--text", default=None, help="pretrain on this UTF-8 text file instead of the toy corpus")
    s.add_argument("--steps", type=int, default=pre.train.steps)
    s.add_argument("--batch-size", type=int, default=pre.train.batch_size)
    s.add_argument("--lr", type=float, default=pre.train.lr)
    s.add_argument("--warmup-steps", type=int, default=None,
                   help=f"default: {pre.train.warmup_steps} (at most steps / 10)")
    s.add_argument("--eval-every", type=int, default=pre.train.eval_every)
    s.add_argument("--checkpoint-every", type=int, default=pre.train.checkpoint_every)
    s.add_argument("--resume", default=None, help="continue from this checkpoint")
    _model_options(s)
    s.add_argument("--seed", type=int, default=pre.init_seed)
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint (or a run folder)")
    s.add_argument("--checkpoint", default="runs/pretrain", help="a run folder or checkpoint file")
    s.add_argument("--adapter", default=None, help="a LoRA adapter.npz to apply on top of --checkpoint")
    s.add_argument("--prompt", default="the ", help='start text; "\\n" is a newline')
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--stop-at-newline", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("finetune", parents=[common], help="phase 2: fine-tune a pretrained checkpoint")
    s.add_argument("--method", choices=["full", "lora", "prompt"], default=ft.method)
    s.add_argument("--task", default=ft.task, choices=["subject", "plural", "kind"])
    s.add_argument("--data", default=None, help="your own JSON-lines records (instruction/input/output, "
                   "or text/label with --task kind)")
    s.add_argument("--checkpoint", default="runs/pretrain", help="a pretraining run folder or checkpoint file")
    s.add_argument("--out", default=None, help="default: runs/finetune-TASK-METHOD (TASK: the data file's name)")
    s.add_argument("--steps", type=int, default=ft.train.steps)
    s.add_argument("--batch-size", type=int, default=ft.train.batch_size)
    s.add_argument("--lr", type=float, default=None, help="default: full 3e-4, lora 5e-3, prompt 1e-1")
    s.add_argument("--warmup-steps", type=int, default=None,
                   help=f"default: {ft.train.warmup_steps} (at most steps / 10)")
    s.add_argument("--train-on-prompt", action="store_true", help="count the loss on prompt tokens too")
    s.add_argument("--rank", type=int, default=LORA.rank)
    s.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    s.add_argument("--targets", default=",".join(LORA.targets), help="comma list from q,k,v,o,fc,proj")
    s.add_argument("--lora-dropout", type=float, default=LORA.dropout)
    s.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) instead of alpha / r")
    s.add_argument("--lora-init", choices=["kaiming", "gaussian"], default=LORA.init)
    s.add_argument("--n-prompt", type=int, default=ft.n_prompt)
    s.add_argument("--prompt-init", choices=["vocab", "random", "text"], default=ft.prompt_init)
    s.add_argument("--seed", type=int, default=ft.seed)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("evaluate", parents=[common],
                       help="score a run on its own held-out split, and its pretraining-corpus loss")
    s.add_argument("run", help="a run folder or checkpoint (with --adapter: the base model)")
    s.add_argument("--adapter", default=None, help="a LoRA adapter.npz to apply on top of the model")
    s.add_argument("--data", default=None, help="score every record of this JSON-lines file instead")
    s.add_argument("--show", type=int, default=5, help="print this many predictions")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("merge", parents=[common], help="fold a LoRA run's W + (alpha/r) B A into a plain checkpoint")
    s.add_argument("run", help="a LoRA run folder or checkpoint (with --adapter: the base model)")
    s.add_argument("--adapter", default=None, help="a LoRA adapter.npz to merge into the model")
    s.add_argument("--out", required=True, help="the merged checkpoint to write (.npz)")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("plot", parents=[common], help="loss curves from run logs (log.jsonl files or run folders)")
    s.add_argument("logs", nargs="+")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--title", default=None)
    s.add_argument("--no-floor", action="store_true", help="omit the toy corpus's entropy floor")
    s.add_argument("--logy", action="store_true")
    s.set_defaults(func=_cmd_plot)

    s = sub.add_parser("sweep", parents=[common], help="run a study's grid of fine-tuning cells (resumable)")
    s.add_argument("study", help="forgetting | format | rank | prompt | scale | hyper")
    s.add_argument("--out", required=True, help="the study's folder; results.jsonl gets one line per cell")
    s.add_argument("--workers", type=int, default=1, help="worker processes; BLAS threads are split between them")
    s.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the study's own)")
    s.add_argument("--scheduler", default=None, help="run on a Dask cluster at this address (tcp://HOST:PORT)")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("report", parents=[common], help="tables and figures of a finished study folder")
    s.add_argument("dir", help="a study folder holding results.jsonl")
    s.add_argument("--figures", default=None, help="folder to write the study's PNG into")
    s.add_argument("--fast-note", action="store_true", help="mark the figures' titles as a smoke test")
    s.set_defaults(func=_cmd_report)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.backend = getattr(args, "backend", None)
    args.threads = getattr(args, "threads", DEFAULT_THREADS)
    from .backend import BackendError
    from .train import TrainingDiverged

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: expected a positive number of BLAS threads, got {args.threads}")
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.threads, user_api="blas"):
                return args.func(args)
        return args.func(args)
    except (ValueError, BackendError, TrainingDiverged) as e:
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
