"""The `minilora` command: one subcommand per step of the story.

    minilora demo          pretrain, fine-tune three ways, print the table, write figures
    minilora gradcheck     every hand-written derivative against finite differences
    minilora pretrain      phase 1: next-token training on the toy corpus (or your text)
    minilora generate      sample text from a checkpoint
    minilora finetune      phase 2: --method full | lora | prompt
    minilora evaluate      a fine-tuned run's task score and pretraining-corpus loss
    minilora merge         fold a LoRA run's adapters into W, save a plain model
    minilora plot          loss curves from run logs
"""

import argparse
import json
import os
import sys

import numpy as np


def _cmd_gradcheck(args):
    from .gradcheck import format_results, run_checks

    results = run_checks(args.groups, seed=args.seed)
    print(format_results(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _cmd_pretrain(args):
    from .model import ModelConfig
    from .pretrain import PretrainConfig, pretrain
    from .train import TrainConfig

    d = PretrainConfig()
    model = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        d_ff=args.d_ff or 4 * args.d_model, context_length=args.context_length,
                        dropout=args.dropout)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                     warmup_steps=_warmup(args, d.train.warmup_steps), weight_decay=d.train.weight_decay,
                     eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
    config = PretrainConfig(model=model, train=tc, init_seed=args.seed)
    _, s = pretrain(config, run_dir=args.out, text_file=args.text, backend=args.backend, resume=args.resume)
    print(f"pretrained {s['steps']} steps in {s['wall_s']:.1f} s: val loss {s['val_loss']:.4f} nats/char"
          + (f", entropy floor {s['floor']:.4f} ({100 * (s['val_loss'] / s['floor'] - 1):.1f}% above)"
             if s["floor"] else "")
          + f", character bigram {s['bigram_loss']:.4f}")
    print(f"checkpoint: {os.path.join(args.out, 'checkpoint.npz')}  log: {os.path.join(args.out, 'log.jsonl')}")
    return 0


def _warmup(args, default):
    """--warmup-steps, or the default capped at a tenth of a short run."""
    return args.warmup_steps if args.warmup_steps is not None else min(default, args.steps // 10)


def _load_run(path, backend):
    """params, model_config, lora_config (or None), meta from a pretrain or finetune checkpoint."""
    from .backend import get_backend
    from .checkpoint import load_checkpoint
    from .lora import LoraConfig
    from .model import ModelConfig, params_to

    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    saved, meta, _ = load_checkpoint(path)
    if "model" not in meta:
        raise ValueError(f"checkpoint: {path} has no model config; expected a minilora pretrain or finetune checkpoint")
    lora = LoraConfig.from_dict(meta["lora"]) if meta.get("lora") else None
    return params_to(saved, get_backend(backend)), ModelConfig.from_dict(meta["model"]), lora, meta


def _cmd_generate(args):
    from .corpus import NEWLINE_ID, CharTokenizer
    from .sampling import generate_many

    params, config, lora, _ = _load_run(args.checkpoint, args.backend)
    tok = CharTokenizer()
    prompt = args.prompt.encode().decode("unicode_escape")  # lets "\n" be typed on a shell
    rng = np.random.default_rng(args.seed)
    samples = generate_many(params, config, tok.encode(prompt), args.max_new_tokens, args.temperature, args.top_k, rng,
                       lora, NEWLINE_ID if args.stop_at_newline else None, args.num_samples)
    for ids in samples:
        print(prompt + tok.decode(ids), end="" if args.stop_at_newline else "\n")
    return 0


def _cmd_finetune(args):
    from .corpus import CharTokenizer, train_val_text
    from .finetune import DEFAULT_LR, FinetuneConfig, finetune
    from .lora import LoraConfig, save_adapter
    from .pretrain import PretrainConfig, load_pretrained
    from .train import TrainConfig

    params, model_config, _ = load_pretrained(args.checkpoint, _backend(args.backend))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    config = FinetuneConfig(
        method=args.method, task=args.task, data_file=args.data, train_on_prompt=args.train_on_prompt,
        lora=LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                        targets=tuple(args.targets.split(",")), dropout=args.lora_dropout, rslora=args.rslora,
                        init=args.lora_init),
        n_prompt=args.n_prompt, prompt_init=args.prompt_init,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                          warmup_steps=_warmup(args, 20),
                          weight_decay=0.0, eval_every=args.steps, seed=args.seed),
        seed=args.seed)
    _, val_text = train_val_text(0, PretrainConfig().n_val_sentences, PretrainConfig().data_seed)
    out = args.out or os.path.join("runs", f"finetune-{config.task}-{config.method}")
    ft_params, trainable, s = finetune(params, model_config, config, out, CharTokenizer().encode(val_text))
    if config.method == "lora":
        save_adapter(os.path.join(out, "adapter.npz"), ft_params, trainable, config.lora, model_config, params)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(f"{config.method} on {config.task}: metric {s['metric_before']:.3f} -> {s['metric']:.3f}; "
          f"pretraining-corpus loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}; "
          f"optimizer state {s['optimizer_state_bytes']:,} bytes; {s['wall_s']:.1f} s")
    print(f"run: {out}" + (f"  adapter: {os.path.join(out, 'adapter.npz')}" if config.method == "lora" else ""))
    return 0


def _backend(name):
    from .backend import get_backend

    return get_backend(name)


def _cmd_evaluate(args):
    from .corpus import CharTokenizer, train_val_text
    from .finetune import FinetuneConfig, classification_accuracy, exact_match, load_records
    from .pretrain import PretrainConfig, strided_val_loss

    params, config, lora, meta = _load_run(args.run, args.backend)
    _, val_text = train_val_text(0, PretrainConfig().n_val_sentences, PretrainConfig().data_seed)
    val = strided_val_loss(params, config, CharTokenizer().encode(val_text), lora=lora)
    print(f"pretraining-corpus validation loss: {val:.4f} nats/char")
    if meta.get("kind") == "finetune":
        fc = FinetuneConfig(method=meta["method"], task=meta["task"], n_test=args.n_test, data_file=args.data)
        _, test, names = load_records(fc)
        if names:
            print(f"{meta['task']} accuracy on {len(test)} held-out records: "
                  f"{classification_accuracy(params, config, test, lora, names):.3f}")
        else:
            acc, preds = exact_match(params, config, test, lora)
            print(f"{meta['task']} exact match on {len(test)} held-out records: {acc:.3f}")
            for r, p in list(zip(test, preds))[:args.show]:
                print(f"  {r['input']!r:48} -> {p!r:12} (expected {r['output']!r})")
    return 0


def _cmd_merge(args):
    from .checkpoint import save_checkpoint
    from .lora import lora_names, merge

    params, config, lora, meta = _load_run(args.run, args.backend)
    if lora is None or not lora_names(params):
        raise ValueError(f"run: expected a LoRA fine-tuning run, got {args.run} (method {meta.get('method')!r})")
    merged = merge(params, lora)
    extra = sorted(n for n in merged if n.startswith("cls."))
    save_checkpoint(args.out, merged, {**{k: v for k, v in meta.items() if k not in ("lora", "rng")},
                                       "kind": "merged", "merged_from": str(args.run)})
    print(f"merged {len(lora_names(params)) // 2} adapters into W (scale {lora.scale:g}); wrote {args.out}"
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
    from .demo import run_demo

    run_demo(out_dir=args.out, figures_dir=args.figures, backend=args.backend, fast=args.fast, task=args.task)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="minilora", description="Fine-tuning by hand: a tiny GPT in NumPy, "
                                "pretrained, then fine-tuned (full, LoRA, prompt tuning).")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: $MINILORA_BACKEND or numpy)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="pretrain, fine-tune three ways, print a comparison, write figures")
    s.add_argument("--out", default="runs", help="folder for runs (a finished pretraining run there is reused)")
    s.add_argument("--figures", default="figures", help="folder for the PNG figures ('' for none)")
    s.add_argument("--task", default="subject", choices=["subject", "plural"], help="the generative task")
    s.add_argument("--fast", action="store_true", help="a few steps of everything (a smoke test, not results)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("gradcheck", help="check every backward against finite differences (float64)")
    s.add_argument("--groups", nargs="+", choices=["ops", "model"], default=None, help="default: all")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_gradcheck)

    s = sub.add_parser("pretrain", help="phase 1: next-token training on the toy corpus")
    s.add_argument("--out", default="runs/pretrain")
    s.add_argument("--text", default=None, help="pretrain on this UTF-8 text file instead of the toy corpus")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--warmup-steps", type=int, default=None, help="default: 40 (at most steps / 10)")
    s.add_argument("--eval-every", type=int, default=100)
    s.add_argument("--checkpoint-every", type=int, default=200)
    s.add_argument("--resume", default=None, help="continue from this checkpoint")
    s.add_argument("--d-model", type=int, default=128)
    s.add_argument("--n-layers", type=int, default=2)
    s.add_argument("--n-heads", type=int, default=4)
    s.add_argument("--d-ff", type=int, default=None, help="default: 4 x d_model")
    s.add_argument("--context-length", type=int, default=128)
    s.add_argument("--dropout", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("generate", help="sample text from a checkpoint (or a run folder)")
    s.add_argument("--checkpoint", default="runs/pretrain/checkpoint.npz")
    s.add_argument("--prompt", default="the ", help='start text; "\\n" is a newline')
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--stop-at-newline", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("finetune", help="phase 2: fine-tune a pretrained checkpoint")
    s.add_argument("--method", choices=["full", "lora", "prompt"], default="lora")
    s.add_argument("--task", default="subject", choices=["subject", "plural", "kind"])
    s.add_argument("--data", default=None, help="your own JSON-lines records (instruction/input/output, "
                   "or text/label with --task kind)")
    s.add_argument("--checkpoint", default="runs/pretrain/checkpoint.npz")
    s.add_argument("--out", default=None, help="default: runs/finetune-TASK-METHOD")
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=None, help="default: full 3e-4, lora 5e-3, prompt 1e-1")
    s.add_argument("--warmup-steps", type=int, default=None, help="default: 20 (at most steps / 10)")
    s.add_argument("--train-on-prompt", action="store_true", help="count the loss on prompt tokens too")
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    s.add_argument("--targets", default="q,k,v,o", help="comma list from q,k,v,o,fc,proj")
    s.add_argument("--lora-dropout", type=float, default=0.0)
    s.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) instead of alpha / r")
    s.add_argument("--lora-init", choices=["kaiming", "gaussian"], default="kaiming")
    s.add_argument("--n-prompt", type=int, default=16)
    s.add_argument("--prompt-init", choices=["vocab", "random", "text"], default="vocab")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("evaluate", help="score a run: task metric and pretraining-corpus loss")
    s.add_argument("run", help="a run folder or checkpoint")
    s.add_argument("--data", default=None, help="the JSON-lines file the run was trained on, if any")
    s.add_argument("--n-test", type=int, default=300)
    s.add_argument("--show", type=int, default=5, help="print this many predictions")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("merge", help="fold a LoRA run's W + (alpha/r) B A into a plain checkpoint")
    s.add_argument("run", help="a LoRA run folder or checkpoint")
    s.add_argument("--out", required=True, help="the merged checkpoint to write (.npz)")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("plot", help="loss curves from run logs (log.jsonl files or run folders)")
    s.add_argument("logs", nargs="+")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--title", default=None)
    s.add_argument("--no-floor", action="store_true", help="omit the toy corpus's entropy floor")
    s.add_argument("--logy", action="store_true")
    s.set_defaults(func=_cmd_plot)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .backend import BackendError
    from .train import TrainingDiverged

    if args.backend:
        os.environ["MINILORA_BACKEND"] = args.backend
    try:
        return args.func(args)
    except (ValueError, BackendError, TrainingDiverged) as e:
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
