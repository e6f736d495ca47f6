"""The `minilora` command: one subcommand per step of the story.

    minilora demo          pretrain, fine-tune three ways, print the table, write figures
    minilora gradcheck     every hand-written derivative against finite differences
    minilora pretrain      phase 1: next-token training on the toy corpus (or your text)
    minilora generate      sample text from a checkpoint (plus --adapter)
    minilora finetune      phase 2: --method full | lora | prompt | ... (refused in one line if its memory plan cannot fit)
    minilora memory        the memory plan of one training step (GPT-2 small..XL or a run), term by term
    minilora evaluate      a fine-tuned run's task score on its own held-out split, and forgetting
    minilora merge         fold a LoRA run's adapters into W, save a plain model
    minilora import-hf     a Hugging Face GPT-2 folder as a run
    minilora export        a run as a transformers model folder (and a PEFT adapter folder)
    minilora plot          loss curves from run logs
    minilora sweep         a study's grid of fine-tuning runs, resumable, in parallel workers
    minilora report        a finished study's tables and figures

This is the only module that prints. Every default below is read from the
dataclasses (ModelConfig, TrainConfig, PretrainConfig, FinetuneConfig, LoraConfig),
never copied by hand.

No lost work, no wrong result: every setting and input file is checked before
any work starts, a run never writes into a folder that holds another run
(unless --resume or --overwrite), every error is one line naming the option or
the file and line, and Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the
next step and prints, on one line, the command that resumes it.
"""

import argparse
import contextlib
import errno
import math
import os
import shlex
import signal
import sys
from dataclasses import fields, replace

import numpy as np

from . import bounds, methods
from .backend import DEFAULT_THREADS
from .methods.lora import LoraConfig, settings_class
from .model import ModelConfig
from .train import TrainConfig

MODEL, TRAIN, LORA = ModelConfig(), TrainConfig(), LoraConfig()
GENERATE_PROMPT = "the "  # generate's start text: the toy corpus's sentences start so
SAMPLE_SEPARATOR = "---"  # printed between generate's samples


# Every character str.splitlines() breaks a line at, written as its escape: an error stays one line
# whatever the user typed.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _shows_default(action):
    """An option that takes a value, is not required and has a default to show."""
    return (bool(action.option_strings) and action.nargs != 0 and not action.required
            and action.default is not argparse.SUPPRESS)


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends every option's line with its default, unless the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if _shows_default(action) and "default" not in text:
            shown = "none" if action.default is None else "%(default)s"
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minilora CMD: error: MESSAGE (see minilora CMD --help)`,
    and every option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and _shows_default(action):  # argparse prints no line for an option with no help
            action.help = "default: none" if action.default is None else "default: %(default)s"
        return action

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message.translate(_LINE_BREAKS)} (see {self.prog} --help)\n")


def _int_at_least(low):
    """An argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = "positive integer" if low == 1 else f"integer >= {low}"
    return parse


def _number(low=None, high=None, low_open=False):
    """An argparse type: a finite float in [low, high) (or (low, high) with low_open)."""
    what = "a number" + (f" > {low}" if low_open else f" >= {low}" if low is not None else "") \
        + (f" and < {high}" if high is not None else "")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and value >= high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what
    return parse


def _bounded(bound):
    """An argparse type: a number in a library bound (bounds.Bound), refused in the library's own words."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bound.describe()}, got {text!r}") from None
        problem = bound.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = bound.describe()
    parse.bound = bound
    return parse


def _path(text):
    """An argparse type: a non-empty path ('' would silently mean the working folder or a default)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


_path.__name__ = "path"
POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
POSITIVE_NUMBER = _number(0.0, low_open=True)  # --alpha: its bound is on alpha / r (LoraConfig checks it)
LR, PROBABILITY, TEMPERATURE = _bounded(bounds.LR), _bounded(bounds.DROPOUT), _bounded(bounds.TEMPERATURE)


def _pretrain_defaults():
    from .pretrain import PretrainConfig

    return PretrainConfig()


def _finetune_defaults(method="lora"):
    from .finetune import method_defaults

    return method_defaults(method)


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


def _saved_train(resume):
    """The training settings stored in the checkpoint a run resumes from (None when not resuming).

    The checkpoint is read and checked whole here (train.load_resume), so any problem with it is
    reported as --resume's.
    """
    if resume is None:
        return None
    from .train import load_resume

    with _named("--resume"):
        return load_resume(resume)[1]["train"]


@contextlib.contextmanager
def _named(option):
    """Errors about a file read in the block are reported as option's: '--resume: FILE: field: problem'."""
    from .validate import FileError

    try:
        yield
    except FileError as e:
        raise ValueError(f"{option}: {e}") from e


def _warmup(args, default, saved_train=None):
    """--warmup-steps; else the resumed run's own; else the default capped at a tenth of a short run."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    if saved_train is not None and "warmup_steps" in saved_train:
        return saved_train["warmup_steps"]
    return min(default, args.steps // 10)


def _resume_and_out(args, default_out):
    """(checkpoint to resume or None, run folder, whether the folder is the resumed run's own)."""
    from .runs import checkpoint_path

    resume = checkpoint_path(args.resume) if args.resume else None
    if resume is not None and not os.path.isfile(resume):
        raise ValueError(f"--resume: expected a run folder or checkpoint file, got {args.resume!r} (no checkpoint "
                         f"there)")
    out = args.out or (os.path.dirname(resume) or "." if resume else default_out)
    same = resume is not None and os.path.abspath(os.path.dirname(resume) or ".") == os.path.abspath(out)
    args.run_dir = out  # for the interruption message
    return resume, out, same


def _pretrain_tokenizer(args, resume):
    """--tokenizer's BPE file; else the resumed run's own tokenizer; else the character one."""
    from .tokenizer import make_tokenizer, tokenizer_from_meta

    if args.tokenizer is not None or resume is None:
        return make_tokenizer(args.tokenizer)
    from .train import load_resume

    with _named("--resume"):
        meta = load_resume(resume)[1]
    try:
        return tokenizer_from_meta(meta, os.path.dirname(resume) or ".")
    except ValueError as e:
        raise ValueError(f"--resume: {resume}: {str(e).removeprefix('checkpoint: ')}") from e


def _cmd_pretrain(args):
    from .pretrain import pretrain, pretrain_data, pretrain_meta, with_tokenizer
    from .runs import claim_run_dir
    from .train import check_resume

    resume, out, same = _resume_and_out(args, "runs/pretrain")
    if not same:
        from .outputs import check_run_output

        check_run_output(out, (args.text, args.tokenizer))
    d = _pretrain_defaults()
    model = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        d_ff=args.d_ff or 4 * args.d_model, context_length=args.context_length,
                        dropout=args.dropout)
    tc = replace(d.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                 warmup_steps=_warmup(args, d.train.warmup_steps, _saved_train(resume)),
                 eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
    # everything is checked before any work: the tokenizer, the text, the resumed checkpoint, the output folder
    tokenizer = _pretrain_tokenizer(args, resume)
    config = with_tokenizer(replace(d, model=model, train=tc, init_seed=args.seed), tokenizer)
    data = pretrain_data(config, args.text, tokenizer)
    if resume is not None:
        with _named("--resume"):
            check_resume(resume, config.train, pretrain_meta(config, tokenizer, args.text, data[4]))
    with claim_run_dir(out, resume=same, overwrite=args.overwrite):  # held until the run ends
        _, s = pretrain(config, run_dir=out, text_file=args.text, backend=args.backend, resume=resume, data=data,
                        tokenizer=tokenizer)
    # a character is a token of the character tokenizer; a BPE run's loss is per token, and per character
    # (total nats / total characters of the validation text) where it meets the floor and the bigram
    loss = f"{s['val_loss']:.4f} nats/char" if tokenizer.kind == "char" else \
        f"{s['val_loss']:.4f} nats/token ({s['val_loss_per_char']:.4f} nats/char, {tokenizer.vocab_size} tokens)"
    per_char = s["val_loss_per_char"]
    print(f"pretrained {s['steps']} steps in {s['wall_s']:.1f} s: val loss {loss}"
          + (f", entropy floor {s['floor']:.4f} ({100 * (per_char / s['floor'] - 1):.1f}% above)"
             if s["floor"] else "")
          + (f", character bigram {s['bigram_loss']:.4f}" if s["bigram_loss"] is not None else ""))
    print(f"checkpoint: {os.path.join(out, 'checkpoint.npz')}  log: {os.path.join(out, 'log.jsonl')}"
          + (f"  tokenizer: {os.path.join(out, 'tokenizer.json')}" if tokenizer.kind != "char" else ""))
    return 0


def _load_model(path, option, xp=None, adapter=None):
    """runs.load_model, its errors naming the option the failing file came from (option, or --adapter)."""
    from .runs import load_model
    from .validate import FileError

    try:
        return load_model(path, xp, adapter)
    except FileError as e:
        raise ValueError(f"{'--adapter' if e.source == 'adapter' else option}: {e}") from e


def _cmd_generate(args):
    from .sampling import decode
    from .tasks import format_prompt
    from .tokenizer import single_token_id

    if args.input is not None and args.instruction is None:
        raise ValueError("--input: expected --instruction too (the input is the instruction's data), got --input alone")
    if args.instruction is not None and args.prompt is not None:
        raise ValueError("--prompt: expected either --prompt or --instruction, got both")
    params, config, meta, tok = _load_model(args.checkpoint, "--checkpoint", _xp(args), args.adapter)
    if args.instruction is not None:
        # ask a fine-tuned run in its own format: the prompt it was trained on, up to "### Response\n",
        # and the answer ends at the run's end marker, which is not printed
        if "cls.W" in params:
            raise ValueError(f"--instruction: {args.checkpoint} is a classification run (a head, no generated "
                             f"answer); score it with minilora evaluate")
        option = "--instruction" if args.input is None else "--input"
        prompt = format_prompt(args.instruction.replace("\\n", "\n"), (args.input or "").replace("\\n", "\n"))
        end = meta.get("finetune", {}).get("end_marker", "\n")
        stop, shown = single_token_id(tok, end, "end_marker"), ""
    else:
        option = "--prompt"
        prompt = (args.prompt if args.prompt is not None else GENERATE_PROMPT).replace("\\n", "\n")
        # \n typed on a shell is a newline; nothing else is unescaped
        stop = single_token_id(tok, "\n", "--stop-at-newline") if args.stop_at_newline else None
        shown = prompt
    if not prompt:
        raise ValueError("--prompt: expected at least one character to start from, got ''")
    problem = tok.problem(prompt)
    if problem is not None:
        raise ValueError(f"{option}: {prompt!r} has {problem}")
    ids = tok.encode(prompt)
    if len(ids) == 0:
        raise ValueError(f"{option}: {prompt!r} encodes to no token of the model's tokenizer; give other text")
    rng = np.random.default_rng(args.seed)
    samples = decode(params, config, [ids] * args.num_samples, args.max_new_tokens,
                     args.temperature, args.top_k, rng, stop, batch_size=args.num_samples)
    for i, out in enumerate(samples):
        if i:
            print(SAMPLE_SEPARATOR)
        print(shown + tok.decode(out))
    return 0


def _finetune_config(args, saved_train=None):
    from .finetune import DEFAULT_LR, FinetuneConfig

    if methods.method(args.method).needs_head and args.task != "kind":
        raise ValueError(f"--method {args.method}: expected --task kind (it trains the classification head alone, "
                         f"and a generative task has none), got --task {args.task}")
    d = _finetune_defaults(args.method)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    # the adapter settings' class is the method's own (DoraConfig for dora); a variant's flags are its fields
    settings = settings_class(args.method)
    for cls in methods.ADAPTER_CONFIGS.values():
        for flag in getattr(cls, "FLAGS", {}):
            if getattr(args, flag) and cls is not settings:
                raise ValueError(f"--{flag.replace('_', '-')}: expected --method {cls.method} (a {cls.label} "
                                 f"setting), got --method {args.method}")
    variant = {flag: getattr(args, flag) for flag in getattr(settings, "FLAGS", {})}
    if args.ia3_queries and args.method != "ia3":
        raise ValueError(f"--ia3-queries: expected --method ia3 (an IA3 setting), got --method {args.method}")
    config = FinetuneConfig(
        method=args.method, task=args.task, data_file=args.data, train_on_prompt=args.train_on_prompt,
        lora=settings(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      targets=tuple(args.targets.split(",")), dropout=args.lora_dropout, rslora=args.rslora,
                      init=args.lora_init, **variant),
        n_prompt=args.n_prompt, prompt_init=args.prompt_init, n_prefix=args.n_prefix,
        peft_positions=args.peft_positions, checkpoint_activations=args.checkpoint_activations,
        train=replace(d.train, steps=args.steps, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                      warmup_steps=_warmup(args, d.train.warmup_steps, saved_train), eval_every=args.steps,
                      checkpoint_every=args.checkpoint_every, seed=args.seed),
        seed=args.seed)
    if args.ia3_queries:  # l_q beside the queries too: PEFT's IA3 on GPT-2, L (3C + F) (FinetuneConfig made it IA3's)
        config = replace(config, lora=replace(config.lora, queries=True))
    return config


def _given(args, option):
    """True when the command line names option (as argparse reads it: whole, with =VALUE, or a prefix of it)."""
    for token in args.argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and option.startswith(name):
            return True
    return False


# the options that set what an adapter is (its method and shapes): an --adapter brings its own
_ADAPTER_OPTIONS = {"--rank": "rank", "--alpha": "alpha", "--targets": "targets", "--rslora": "rslora"}


def _continued_adapter(args):
    """finetune --adapter: (base params, base config, tokenizer, start, adapter's settings) before any work.

    The adapter (an adapter.npz, a run folder holding one, or a PEFT LoRA, DoRA, IA3, prompt- or prefix-tuning
    folder) must be on --checkpoint's base (runs.load_model checks its fingerprint) and of --method's method (by
    default the adapter's own); an option that sets its shapes (--rank, --alpha, --targets, --rslora,
    --n-prefix, --n-prompt, --ia3-queries) or its positions (--peft-positions) must agree with it.
    """
    from .model import param_shapes

    params, config, _, tokenizer = _load_model(args.checkpoint, "--checkpoint", _xp(args), args.adapter)
    base_config = replace(config, lora=None, n_prefix=0, peft_positions=False)
    base_names = set(param_shapes(base_config))
    base = {n: a for n, a in params.items() if n in base_names}
    start = {n: a for n, a in params.items() if n not in base_names}
    method = (config.lora.method if config.lora is not None else "prefix" if config.n_prefix
              else "prompt" if "prompt" in start else None)  # a prompt: from a PEFT prompt-tuning folder
    if method is None or not start:
        raise ValueError(f"--adapter: expected adapters to continue training, got {args.adapter!r} without any")
    if _given(args, "--method") and args.method != method:
        raise ValueError(f"--adapter: {args.adapter!r} holds {method} adapters, but --method is {args.method!r}; "
                         f"give --method {method} (or leave --method out) to continue them")
    args.method = method
    settings = config.lora
    if not _given(args, "--lora-dropout"):
        args.lora_dropout = getattr(settings, "dropout", args.lora_dropout)  # the adapter's own, unless changed
    for flag in getattr(settings, "FLAGS", {}):  # a variant's training setting (DoRA's --detach-norm), if given
        if _given(args, f"--{flag.replace('_', '-')}"):
            settings = replace(settings, **{flag: getattr(args, flag)})
    if _given(args, "--ia3-queries") and getattr(settings, "queries", True) is False:
        raise ValueError(f"--ia3-queries: expected the adapter's own setting (no query vector: --adapter "
                         f"{args.adapter!r} sets it), got --ia3-queries; leave --ia3-queries out to continue the "
                         "adapter")
    asked = {"rank": args.rank, "alpha": args.alpha, "targets": tuple(args.targets.split(",")),
             "rslora": args.rslora}
    for option, name in _ADAPTER_OPTIONS.items():
        value = asked[name]
        if _given(args, option) and getattr(settings, name, None) != value:
            held = getattr(settings, name, None)
            raise ValueError(f"{option}: expected the adapter's own {name} ({held!r}: --adapter {args.adapter!r} "
                             f"sets it), got {value!r}; leave {option} out to continue the adapter")
    if _given(args, "--n-prefix") and args.n_prefix != config.n_prefix:
        raise ValueError(f"--n-prefix: expected the adapter's own {config.n_prefix} (--adapter {args.adapter!r} "
                         f"sets it), got {args.n_prefix}; leave --n-prefix out to continue the adapter")
    if config.n_prefix:
        args.n_prefix = config.n_prefix
    if "prompt" in start:
        if _given(args, "--n-prompt") and args.n_prompt != start["prompt"].shape[0]:
            raise ValueError(f"--n-prompt: expected the adapter's own {start['prompt'].shape[0]} (--adapter "
                             f"{args.adapter!r} sets it), got {args.n_prompt}; leave --n-prompt out to continue it")
        args.n_prompt = start["prompt"].shape[0]
    if _given(args, "--peft-positions") and not config.peft_positions:
        raise ValueError(f"--peft-positions: expected the adapter's own positions (--adapter {args.adapter!r} was "
                         f"trained with minilora's), got --peft-positions; leave it out to continue the adapter")
    args.peft_positions = config.peft_positions  # the adapter's positions: the function it was trained to compute
    return base, base_config, tokenizer, start, settings


def _with_dropout(settings, dropout):
    """An adapter's settings with --lora-dropout's rate (a training setting; IA3 has none)."""
    return replace(settings, dropout=dropout) if hasattr(settings, "dropout") else settings


def _cmd_finetune(args):
    from .evaluation import corpus_val_data
    from .finetune import check_memory, finetune, load_data, run_meta, setup_strategy
    from .runs import claim_run_dir, free_run_dir
    from .train import check_resume

    start = settings = None
    if args.adapter is not None:
        params, model_config, tokenizer, start, settings = _continued_adapter(args)
    config = _finetune_config(args)
    if settings is not None:
        config = replace(config, lora=_with_dropout(settings, args.lora_dropout))
    name = os.path.splitext(os.path.basename(config.data_file))[0] if config.data_file else config.task
    default = os.path.join("runs", f"finetune-{name}-{config.method}")
    # the default folder is never another run's: a counter follows the name when it holds one
    resume, out, same = _resume_and_out(args, default if args.overwrite else free_run_dir(default))
    if not same:
        from .outputs import check_run_output

        check_run_output(out, (args.checkpoint, args.data, args.adapter))
    if resume is not None:
        config = _finetune_config(args, _saved_train(resume))
        if settings is not None:
            config = replace(config, lora=_with_dropout(settings, args.lora_dropout))
    # everything is checked before any work: the model, the data against it, the resumed checkpoint, the folder
    if args.adapter is None:
        params, model_config, _, tokenizer = _load_model(args.checkpoint, "--checkpoint", _xp(args))
    data = load_data(model_config, tokenizer, config)
    _check_checkpointing(config.checkpoint_activations)
    # the memory plan of one step, before the method is set up (full fine-tuning's copy, QLoRA's
    # quantization) or anything is written: a run that cannot fit is refused here, in one line
    held = list(params.values()) + (list(start.values()) if start is not None else [])
    check_memory(model_config, tokenizer, config, data, _xp(args), args.memory_limit,
                 already_held=sum(int(a.nbytes) for a in held))
    if start is not None:  # the adapter's arrays are this run's trainable names at their shapes
        try:
            setup_strategy(params, model_config, tokenizer, config, len(data[2]) if data[2] else None, start)
        except ValueError as e:
            raise ValueError(f"--adapter: {args.adapter}: {str(e).removeprefix('adapter: ')}") from e
    if resume is not None:
        with _named("--resume"):
            check_resume(resume, config.train, run_meta(params, model_config, tokenizer, config, data[2],
                                                        args.adapter))
    with claim_run_dir(out, resume=same, overwrite=args.overwrite):  # held until the run ends
        if config.data_file is not None:
            n_train, n_test = len(data[0]), len(data[1])
            print(f"data: {config.data_file}, {n_train + n_test} records: {n_train} to train on, {n_test} held "
                  f"out for the score (a tenth, chosen by --seed {config.seed})")
        ft_params, ft_config, trainable, s = finetune(params, model_config, tokenizer, config, out,
                                                      corpus_val_data(tokenizer), resume=resume, data=data,
                                                      start=start, continued_from=args.adapter)
    print(f"[{config.method}] " + s["report"].replace("\n", f"\n[{config.method}] "))
    metric = "accuracy" if config.is_classification else "exact match"
    print(f"{config.method} on {name}: {metric} on {s['n_test']} held-out records, metric {s['metric_before']:.3f} "
          f"-> {s['metric']:.3f}; "
          f"pretraining-corpus loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}; "
          f"optimizer state {s['optimizer_state_bytes']:,} bytes; {s['wall_s']:.1f} s")
    saves_adapter = methods.method(config.method).saves_adapter
    print(f"run: {out}" + (f"  adapter: {os.path.join(out, 'adapter.npz')}" if saves_adapter else ""))
    return 0


def _check_checkpointing(wanted):
    from .memfit import checkpointing_available

    if wanted and not checkpointing_available():
        raise ValueError("--checkpoint-activations: expected a model with activation checkpointing "
                         "(model.loss_and_grads(checkpoint_activations=...)), got one without")


def _cmd_memory(args):
    from .finetune import method_defaults
    from .memfit import available_memory, fitting_options, format_bytes, refusal_line
    from .memplan import SIZES, plan

    if (args.size is None) == (args.run is None):
        raise ValueError(f"--size, --run: expected exactly one, got "
                         f"{'both' if args.size is not None else 'neither'}")
    if args.size is not None:
        config, what = SIZES[args.size], args.size
    else:
        _, config, _, _ = _load_model(args.run, "--run")
        config, what = replace(config, lora=None, n_prefix=0, peft_positions=False), args.run
    context = args.context if args.context is not None else min(256, config.context_length)
    if context > config.context_length:
        raise ValueError(f"--context: expected at most the model's context_length={config.context_length}, "
                         f"got {context}")
    _check_checkpointing(args.checkpoint_activations)

    def plan_of(batch, method, ckpt):
        return plan(config, method, batch, context, ckpt, settings=method_defaults(method))

    p = plan_of(args.batch, args.method, args.checkpoint_activations)
    print(f"memory plan: one {args.method} step of {what} ({config.n_layers} layers, d_model {config.d_model}, "
          f"vocab {config.vocab_size}), batch {args.batch}, context {context}"
          f"{', activation checkpointing' if args.checkpoint_activations else ''}; float32")
    print(f"  trainable {p.trainable_params:,} of {p.total_params:,} parameters; the peak falls in: {p.phase}")
    for name, value in p.terms.items():
        print(f"  {name:12s} {format_bytes(value):>12s}")
    print(f"  {'total':12s} {format_bytes(p.total):>12s}")
    available, where = available_memory(_xp(args), args.memory_limit)
    if available is None:
        print("available memory: unknown")
    elif p.total <= available:
        print(f"fits: {format_bytes(p.total)} of the {format_bytes(available)} {where}")
    else:
        total_of = lambda b, m, ck: plan_of(b, m, ck).total  # noqa: E731
        options = fitting_options(total_of, args.batch, args.method, args.checkpoint_activations, available)
        print("does not fit: " + refusal_line(p, available, where, options))
    return 0


def _cmd_evaluate(args):
    from .evaluation import classification_accuracy, corpus_val_data, exact_match, strided_val_loss
    from .finetune import config_from_description, load_records

    params, config, meta, tokenizer = _load_model(args.run, "run", _xp(args), args.adapter)
    n_prompt = params["prompt"].shape[0] if "prompt" in params else 0
    # the records first: a bad file fails before any scoring
    if args.data is not None:
        # score every record of a file the user gives; each must fit the context (an error names its line)
        from .tasks import load_jsonl

        kind = "classification" if "cls.W" in params else "instruction"
        test = load_jsonl(args.data, kind, tokenizer, config.context_length, n_prompt)
        what = f"records of {args.data}"
        names = meta.get("class_names") if kind == "classification" else None
    elif "finetune" in meta:
        # rebuild exactly the run's own held-out split from its metadata (its fields checked first)
        with _named("run"):
            description = _run_description(meta, args.run)
        _check_data_unchanged(description)
        _, test, names = load_records(config_from_description(description), tokenizer, config.context_length)
        what = "held-out records"
    val_data = corpus_val_data(tokenizer)
    val = strided_val_loss(params, config, val_data)
    if tokenizer.kind == "char":
        print(f"pretraining-corpus validation loss: {val:.4f} nats/char")
    else:  # nats per token, and per character: total nats / total characters of the same text
        per_char = strided_val_loss(params, config, val_data, token_lengths=tokenizer.token_lengths())
        print(f"pretraining-corpus validation loss: {val:.4f} nats/token ({per_char:.4f} nats/char)")
    if args.data is None and "finetune" not in meta:
        return 0
    if names:
        print(f"accuracy on {len(test)} {what}: {classification_accuracy(params, config, tokenizer, test, names):.3f}")
    else:
        acc, preds = exact_match(params, config, tokenizer, test)
        print(f"exact match on {len(test)} {what}: {acc:.3f}")
        for r, p in list(zip(test, preds))[:args.show]:
            print(f"  {r.get('input', '')!r:48} -> {p!r:12} (expected {r['output']!r})")
    return 0


def _run_description(meta, run):
    """meta["finetune"] of a run, checked: the split-defining fields evaluate rebuilds the split from."""
    from .finetune import config_from_description
    from .validate import FileError, field

    d = field(meta, "finetune", run, "dict")
    for name, kind in (("data_file", "str"), ("data_sha256", "str")):
        field(d, name, run, kind, "meta.json: finetune", optional=True)
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise FileError(run, f"expected a list of class names, got {names!r}", "meta.json: class_names")
    try:
        config_from_description(d)
    except (ValueError, TypeError) as e:
        raise FileError(run, str(e), "meta.json: finetune") from e
    return d


def _check_data_unchanged(description):
    """A run's data file must be the one it was trained on, or its held-out split is not its own."""
    from .validate import read_input

    path = description.get("data_file")
    if path is None:
        return
    try:
        digest = read_input(path, "run")[1]
    except ValueError as e:
        raise ValueError(f"run: its data file {path!r} cannot be read ({str(e).split(': ')[-1]}); give the "
                         f"records to score with --data") from e
    if digest != description.get("data_sha256"):
        raise ValueError(f"run: its data file {path!r} changed since the run was trained (sha256 {digest[:12]}, "
                         f"was {description.get('data_sha256', '?')[:12]}), so its held-out split cannot be "
                         f"rebuilt; give the records to score with --data")


def _check_new_file(path, overwrite, option="--out", inputs=()):
    """A file output: never an input nor a run's file (outputs.check_file_output), its folder writable, and an
    existing file kept unless overwrite."""
    from .outputs import check_file_output
    from .runs import check_writable

    check_file_output(path, inputs, option)
    if os.path.isdir(path):
        raise ValueError(f"{option}: expected a file name, got the folder {path!r}")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{option}: {path!r} exists; give --overwrite to replace it, or another {option}")
    check_writable(os.path.dirname(path) or ".", option)


def _cmd_merge(args):
    from .checkpoint import save_checkpoint
    from .methods.lora import adapted_layers

    _check_new_file(args.out, args.overwrite, inputs=(args.run, args.adapter))  # before any work
    params, config, meta, tokenizer = _load_model(args.run, "run", _xp(args), args.adapter)
    if config.lora is None:
        raise ValueError(f"run: expected a model with adapters (a LoRA, DoRA or IA3 run, or a base checkpoint "
                         f"with --adapter), got {args.run} without adapters")
    n_adapters = len(adapted_layers(config, config.lora))
    # LoRA and its variants scale B A by s; IA3 has no scale
    how = f"scale {config.lora.scale:g}" if isinstance(config.lora, LoraConfig) else config.lora.label
    merged, merged_config = methods.method(config.lora.method).merge(params, config)
    extra = sorted(n for n in merged if n.startswith("cls."))
    tokenizer.save(os.path.dirname(args.out) or ".")  # a BPE model's tokenizer.json goes beside it
    save_checkpoint(args.out, merged, {**{k: v for k, v in meta.items() if k not in ("rng", "base_fingerprint")},
                                       "model": merged_config.to_dict(), "tokenizer": tokenizer.describe(),
                                       "kind": "merged", "merged_from": str(args.run)})
    print(f"merged {n_adapters} adapters into W ({how}); wrote {args.out}"
          + (f" (with head {extra})" if extra else ""))
    return 0


def _cmd_import_hf(args):
    from .bridge import read_hf_model
    from .checkpoint import atomic_open, save_checkpoint
    from .hf import stored_dtype
    from .runs import CHECKPOINT, RUN_FILES, claim_run_dir, is_run_dir, prepare_run_dir
    from .tokenizer import TOKENIZER_FILE

    # every tensor and the tokenizer are read and checked before the run folder is touched:
    # a refusal writes nothing
    from .outputs import check_run_output

    check_run_output(args.out, (args.dir,))
    params, config, tokenizer = read_hf_model(args.dir)
    if is_run_dir(args.out) and not args.overwrite:
        prepare_run_dir(args.out, resumable=False)  # refuses: the folder holds a run (import-hf has no --resume)
    # one writer at a time; an earlier run there is replaced only once this one is written (resume=True deletes
    # nothing up front), so a failed write (a full disk) leaves it as it was
    with claim_run_dir(args.out, resume=True):
        save_checkpoint(os.path.join(args.out, CHECKPOINT), params,
                        {"kind": "imported", "model": config.to_dict(), "tokenizer": tokenizer.describe(),
                         "imported_from": os.path.abspath(args.dir)})
        tokenizer_path = os.path.join(args.out, TOKENIZER_FILE)
        if tokenizer.kind != "char":
            with atomic_open(tokenizer_path) as f:
                f.write(tokenizer.data)
        for name in RUN_FILES:  # what the earlier run had beside them
            if name != CHECKPOINT and (name != TOKENIZER_FILE or tokenizer.kind == "char"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.out, name))
    n = sum(p.size for p in params.values())
    stored = stored_dtype(args.dir)
    # minilora trains in float32: wider weights are rounded to it, narrower ones widened exactly; the line says so
    rounded = {"F64": "; its float64 weights rounded to float32", "BF16": "; its bf16 weights widened to float32 "
               "(exactly)", "F16": "; its float16 weights widened to float32 (exactly)"}.get(stored, "")
    print(f"imported GPT-2 {config.n_layers} x {config.d_model} (vocab {config.vocab_size}, context "
          f"{config.context_length}, {tokenizer.kind} tokenizer), {n:,} parameters{rounded}; "
          f"wrote {os.path.join(args.out, CHECKPOINT)}")
    return 0


def _cmd_export(args):
    from .bridge import export_model

    from .bridge import EXPORT_FILES
    from .outputs import check_folder_output

    inputs = (args.run, args.adapter)
    check_folder_output(args.out, inputs, args.overwrite, EXPORT_FILES)  # before any work
    params, config, _, tokenizer = _load_model(args.run, "run", None, args.adapter)
    written = export_model(args.out, params, config, tokenizer, overwrite=args.overwrite, inputs=inputs,
                           bnb_4bit=args.bnb_4bit)
    print(f"wrote {written[0]} (transformers: AutoModelForCausalLM.from_pretrained"
          + (", with bitsandbytes installed" if args.bnb_4bit else "") + ", AutoTokenizer.from_pretrained)"
          + (f" and {written[1]} (PEFT: PeftModel.from_pretrained(model, {written[1]!r}))" if len(written) > 1
             else ""))
    return 0


def _cmd_plot(args):
    from .plot import plot_run_logs, read_log, save_figure

    _check_new_file(args.out, overwrite=True, inputs=args.logs)
    paths = [os.path.join(p, "log.jsonl") if os.path.isdir(p) else p for p in args.logs]
    seen = {}
    for given, path in zip(args.logs, paths):
        if os.path.realpath(path) in seen:
            raise ValueError(f"logs: {seen[os.path.realpath(path)]!r} and {given!r} are the same log; "
                             f"give each run once")
        seen[os.path.realpath(path)] = given
    # a run is labelled by its folder; two folders of one name keep their whole paths
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    labels = [lab if labels.count(lab) == 1 else os.path.dirname(p) or p for lab, p in zip(labels, paths)]
    runs = {label: read_log(path) for label, path in zip(labels, paths)}
    save_figure(plot_run_logs(runs, show_floor=not args.no_floor, title=args.title, logy=args.logy), args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args):
    from .demo import format_table, run_demo

    out = args.out if args.out is not None else os.path.join("runs", "fast") if args.fast else "runs"
    args.run_dir = out
    result = run_demo(out_dir=out, figures_dir=args.figures, backend=args.backend, fast=args.fast,
                      task=args.task, log=print, overwrite=args.overwrite)
    print()
    print(format_table(result["rows"]))
    print(f"\ndemo finished in {result['wall_s']:.0f} s")
    return 0


def _cmd_sweep(args):
    from .studies import cells
    from .sweep import dask_executor, run_sweep

    with _named("--out"):  # a sibling study's results.jsonl this study builds on
        grid = cells(args.study, args.out, args.seeds)
    executor = dask_executor(args.scheduler) if args.scheduler else None

    def progress(record, done, total):
        c = record["cell"]
        print(f"[{done}/{total}] {c['method']} lr {c['lr']:g} seed {c['seed']}: val {record['evals'][-1]['val_metric']:.3f}, "
              f"test {record['test_metric']:.3f}, forgetting {record['evals'][-1]['forgetting']:+.3f} "
              f"({record['wall_s']:.0f} s)", flush=True)

    ran = 0
    while True:  # a grid that grows as its results come in (kind's second stage) runs until it stops growing
        with _named("--out"):
            results = run_sweep(grid, args.out, workers=args.workers, executor=executor, on_result=progress)
        ran += len(results)
        with _named("--out"):
            grown = cells(args.study, args.out, args.seeds)
        if len(grown) == len(grid):
            break
        grid = grown
        print(f"{args.study}: the finished cells chose its next {len(grid)} cells' settings", flush=True)
    print(f"{args.study}: {ran} cells run, {len(grid) - ran} already in {os.path.join(args.out, 'results.jsonl')}")
    return 0


def _cmd_report(args):
    from .report import report, summary

    with _named("dir"):
        if os.path.isfile(os.path.join(args.dir, "forgetting", "results.jsonl")):  # the studies folder: every method
            text, figs = summary(args.dir, args.figures)
        else:
            text, figs = report(args.dir, args.figures, " [fast: a smoke test, not a result]" if args.fast_note else "")
    print(text)
    if args.figures:
        print("wrote " + ", ".join(os.path.join(args.figures, name) for name in figs))
    return 0


def _common_options():
    """--backend and --threads, accepted before or after the subcommand."""
    common = _Parser(add_help=False)
    common.add_argument("--backend", choices=["numpy", "cupy"], default=argparse.SUPPRESS,
                        help="array backend (default: $MINILORA_BACKEND or numpy)")
    common.add_argument("--threads", type=POSITIVE, default=argparse.SUPPRESS,
                        help=f"BLAS threads (default: {DEFAULT_THREADS}; raise it on an otherwise idle machine)")
    return common


def _model_options(s):
    for f in fields(ModelConfig):
        if f.name in ("vocab_size", "lora"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "d_ff":
            s.add_argument(flag, type=POSITIVE, default=None, help="default: 4 x d_model")
        elif f.name == "dropout":
            s.add_argument(flag, type=PROBABILITY, default=f.default)
        else:
            s.add_argument(flag, type=POSITIVE, default=f.default)


def _run_options(s, what):
    """--resume and --overwrite: the two ways to write into a folder that already holds a run."""
    s.add_argument("--resume", type=_path, default=None, metavar="RUN",
                   help=f"continue {what} from this run folder or checkpoint (with the same settings); "
                        "it ends exactly where an uninterrupted run would")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")


def build_parser():
    common = _common_options()
    p = _Parser(prog="minilora", parents=[common],
                description="Fine-tuning by hand: a tiny GPT in NumPy, "
                "pretrained, then fine-tuned (full, LoRA, prompt tuning).")
    sub = p.add_subparsers(dest="command", required=True)
    pre, ft = _pretrain_defaults(), _finetune_defaults()

    s = sub.add_parser("demo", parents=[common],
                       help="pretrain, fine-tune three ways, print a comparison, write figures")
    s.add_argument("--out", type=_path, default=None, help="folder for runs (default runs/, or runs/fast/ with --fast); "
                   "run again, the demo reuses finished runs there and resumes interrupted ones")
    s.add_argument("--figures", default=None,
                   help="folder for the PNG figures ('' for none; default: OUT/figures, beside the runs)")
    s.add_argument("--task", default="subject", choices=["subject", "plural"], help="the generative task")
    s.add_argument("--fast", action="store_true", help="a few steps of everything (a smoke test, not results)")
    s.add_argument("--overwrite", action="store_true", help="replace runs in --out made with other settings")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("gradcheck", parents=[common],
                       help="check every backward against finite differences (float64)")
    s.add_argument("--groups", nargs="+", choices=["ops", "model", "checkpoint"], default=None,
                   help="default: all (checkpoint: the model's backward under activation checkpointing)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0)
    s.set_defaults(func=_cmd_gradcheck)

    s = sub.add_parser("pretrain", parents=[common], help="phase 1: next-token training on the toy corpus")
    s.add_argument("--out", type=_path, default=None, help="the run folder (default: runs/pretrain, or the --resume run's)")
    s.add_argument("--text", type=_path, default=None, help="pretrain on this UTF-8 text file instead of the toy corpus")
    s.add_argument("--tokenizer", type=_path, default=None, metavar="TOKENIZER_JSON",
                   help="a BPE tokenizer.json (Hugging Face tokenizers) to read the text with, copied into the run "
                        "folder (default: one token per character; or the --resume run's)")
    s.add_argument("--steps", type=POSITIVE, default=pre.train.steps, help="optimizer steps")
    s.add_argument("--batch-size", type=POSITIVE, default=pre.train.batch_size, help="windows per step")
    s.add_argument("--lr", type=LR, default=pre.train.lr, help="peak learning rate (cosine decay to lr / 10)")
    s.add_argument("--warmup-steps", type=NON_NEGATIVE, default=None,
                   help=f"default: {pre.train.warmup_steps} (at most steps / 10), or the resumed run's")
    s.add_argument("--eval-every", type=POSITIVE, default=pre.train.eval_every, help="steps between validation losses")
    s.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=pre.train.checkpoint_every,
                   help=f"steps between checkpoints (also every {pre.train.checkpoint_seconds:g} s)")
    _run_options(s, "pretraining")
    _model_options(s)
    s.add_argument("--seed", type=NON_NEGATIVE, default=pre.init_seed)
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint (or a run folder)")
    s.add_argument("--checkpoint", type=_path, default="runs/pretrain", help="a run folder or checkpoint file")
    s.add_argument("--adapter", type=_path, default=None,
                   help="a LoRA adapter.npz (or PEFT folder) to apply on top of --checkpoint")
    s.add_argument("--prompt", default=None, help=f'start text; "\\n" is a newline (default: {GENERATE_PROMPT!r})')
    s.add_argument("--instruction", default=None,
                   help="ask a fine-tuned run: the text after '### Instruction'; the prompt is written in the "
                        "run's own format (### Instruction / ### Input / ### Response) and the answer stops at "
                        "the run's end marker")
    s.add_argument("--input", default=None, help="with --instruction: the text after '### Input'")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=200, help="tokens to sample after the prompt")
    s.add_argument("--temperature", type=TEMPERATURE, default=1.0,
                   help="0 is greedy; any finite temperature is exact (the logits are shifted by their max first)")
    s.add_argument("--top-k", type=POSITIVE, default=None, help="sample among the k likeliest tokens only")
    s.add_argument("--num-samples", type=POSITIVE, default=1, help="independent samples of the same prompt")
    s.add_argument("--stop-at-newline", action="store_true",
                   help="end each sample at its first newline (with --instruction the run's own end marker is used)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("finetune", parents=[common], help="phase 2: fine-tune a pretrained checkpoint")
    s.add_argument("--method", choices=list(methods.METHODS), default=ft.method,
                   help="which weights are trained: " + "; ".join(f"{m.name}: {m.summary}"
                                                                 for m in methods.METHODS.values()))
    s.add_argument("--task", default=ft.task, choices=["subject", "plural", "kind"],
                   help="a built-in task (kind: classification with a head); ignored with --data")
    s.add_argument("--data", type=_path, default=None, help="your own JSON-lines records (instruction/input/output, "
                   "or text/label with --task kind)")
    s.add_argument("--checkpoint", type=_path, default="runs/pretrain",
                   help="a pretraining run folder or checkpoint file")
    s.add_argument("--adapter", type=_path, default=None,
                   help="continue training this adapter (an adapter.npz, a run folder holding one, or a PEFT LoRA "
                        "folder) on --checkpoint, its base; it sets the method (default) and the adapter's shapes")
    s.add_argument("--out", type=_path, default=None, help="default: runs/finetune-TASK-METHOD (TASK: the data file's name), "
                   "with -2, -3, ... when that folder holds a run; or the --resume run's folder")
    s.add_argument("--steps", type=POSITIVE, default=ft.train.steps, help="optimizer steps")
    s.add_argument("--batch-size", type=POSITIVE, default=ft.train.batch_size, help="records per step")
    s.add_argument("--lr", type=LR, default=None, help="default: the forgetting study's choice, "
                   + ", ".join(f"{m.name} {m.default_lr:g}" for m in methods.METHODS.values()))
    s.add_argument("--warmup-steps", type=NON_NEGATIVE, default=None,
                   help=f"default: {ft.train.warmup_steps} (at most steps / 10), or the resumed run's")
    s.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=ft.train.checkpoint_every,
                   help=f"steps between checkpoints (also every {ft.train.checkpoint_seconds:g} s)")
    _run_options(s, "fine-tuning")
    s.add_argument("--train-on-prompt", action="store_true", help="count the loss on prompt tokens too")
    s.add_argument("--rank", type=POSITIVE, default=LORA.rank, help="LoRA's r")
    s.add_argument("--alpha", type=POSITIVE_NUMBER, default=None, help="default: 2 x rank")
    s.add_argument("--targets", default=",".join(LORA.targets), help="comma list from q,k,v,o,fc,proj")
    s.add_argument("--lora-dropout", type=PROBABILITY, default=LORA.dropout)
    s.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) instead of alpha / r")
    s.add_argument("--lora-init", choices=["kaiming", "gaussian"], default=LORA.init)
    for cls in methods.ADAPTER_CONFIGS.values():  # a LoRA variant's own settings (DoRA's --detach-norm)
        for flag, help_text in getattr(cls, "FLAGS", {}).items():
            s.add_argument(f"--{flag.replace('_', '-')}", action="store_true", help=help_text)
    s.add_argument("--ia3-queries", action="store_true",
                   help="IA3: a vector l_q on the queries too, L (3C + F) (PEFT's IA3 on GPT-2 scales q, k and v)")
    s.add_argument("--n-prompt", type=POSITIVE, default=ft.n_prompt, help="soft-prompt vectors (--method prompt)")
    s.add_argument("--prompt-init", choices=["vocab", "random", "text"], default=ft.prompt_init)
    s.add_argument("--n-prefix", type=POSITIVE, default=ft.n_prefix,
                   help="prefix keys and values per attention layer (--method prefix)")
    s.add_argument("--peft-positions", action="store_true", default=ft.peft_positions,
                   help="number the real tokens after the P virtual tokens, as PEFT does (--method prompt or "
                        "prefix), so that the run exports exactly to PEFT; default: they keep 0..T-1")
    s.add_argument("--checkpoint-activations", action="store_true",
                   help="keep each block's input only and recompute the block in the backward: the same "
                        "gradients, less memory, one more forward of the blocks")
    s.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="refuse, before any work, a run whose memory plan exceeds SIZE (e.g. 8GiB; default: "
                        "the memory available, or $MINILORA_MEMORY_LIMIT)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=ft.seed)
    s.set_defaults(func=_cmd_finetune)

    from .memplan import SIZES as PLAN_SIZES

    s = sub.add_parser("memory", parents=[common],
                       help="the memory plan of one training step, term by term, and whether it fits")
    s.add_argument("--size", choices=list(PLAN_SIZES), default=None, help="one of GPT-2's shapes")
    s.add_argument("--run", type=_path, default=None, help="or the model of a run folder or checkpoint")
    s.add_argument("--method", choices=list(methods.METHODS), default=ft.method)
    s.add_argument("--batch", type=POSITIVE, default=1, help="sequences per step")
    s.add_argument("--context", type=POSITIVE, default=None, help="tokens per sequence (default: 256, or less "
                   "when the model's context is shorter)")
    s.add_argument("--checkpoint-activations", action="store_true", help="plan with activation checkpointing")
    s.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="the memory to fit (default: available memory, or $MINILORA_MEMORY_LIMIT)")
    s.set_defaults(func=_cmd_memory)

    s = sub.add_parser("evaluate", parents=[common],
                       help="score a run on its own held-out split, and its pretraining-corpus loss")
    s.add_argument("run", help="a run folder or checkpoint (with --adapter: the base model)")
    s.add_argument("--adapter", type=_path, default=None, help="a LoRA adapter.npz (or PEFT folder) to apply on top of the model")
    s.add_argument("--data", type=_path, default=None, help="score every record of this JSON-lines file instead")
    s.add_argument("--show", type=NON_NEGATIVE, default=5, help="print this many predictions")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("merge", parents=[common], help="fold a LoRA run's W + (alpha/r) B A into a plain checkpoint")
    s.add_argument("run", help="a LoRA run folder or checkpoint (with --adapter: the base model)")
    s.add_argument("--adapter", type=_path, default=None, help="a LoRA adapter.npz (or PEFT folder) to merge into the model")
    s.add_argument("--out", type=_path, required=True, help="the merged checkpoint to write (.npz)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("import-hf", parents=[common],
                       help="a Hugging Face GPT-2 folder (config.json, model.safetensors) as a minilora run")
    s.add_argument("dir", help="the folder (config.json, model.safetensors, optionally tokenizer.json)")
    s.add_argument("--out", type=_path, required=True, help="the run folder to write")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    s.set_defaults(func=_cmd_import_hf)

    s = sub.add_parser("export", parents=[common],
                       help="a run as a transformers model folder (and a PEFT adapter folder for LoRA)")
    s.add_argument("run", help="a pretraining, full, merged, LoRA, DoRA, IA3 or QLoRA run folder or checkpoint")
    s.add_argument("--adapter", type=_path, default=None, help="a LoRA adapter.npz (or PEFT folder) on top of the model")
    s.add_argument("--out", type=_path, required=True, help="the folder to create (a LoRA run's adapter goes to OUT/adapter)")
    s.add_argument("--bnb-4bit", action="store_true",
                   help="a QLoRA run's base in bitsandbytes' 4-bit NF4 (transformers loads it with bitsandbytes), "
                        "not dequantized to float32")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("plot", parents=[common], help="loss curves from run logs (log.jsonl files or run folders)")
    s.add_argument("logs", nargs="+", metavar="LOG",
                   help="run folders or log.jsonl files, one curve each (pretraining and fine-tuning alike)")
    s.add_argument("--out", type=_path, required=True, help="PNG to write")
    s.add_argument("--title", default=None, help="the figure's title (default: one that fits the runs plotted)")
    s.add_argument("--no-floor", action="store_true",
                   help="omit the toy corpus's entropy floor (drawn only when every run is a pretraining run on the "
                        "toy grammar)")
    s.add_argument("--logy", action="store_true", help="a logarithmic loss axis")
    s.set_defaults(func=_cmd_plot)

    s = sub.add_parser("sweep", parents=[common], help="run a study's grid of fine-tuning cells (resumable)")
    from .studies import STUDIES  # the help lists every study defined, not a copy of the list

    s.add_argument("study", help=" | ".join(STUDIES))
    s.add_argument("--out", type=_path, required=True,
                   help="the study's folder; results.jsonl gets one line per cell")
    s.add_argument("--workers", type=POSITIVE, default=1, help="worker processes; BLAS threads are split between them")
    s.add_argument("--seeds", type=POSITIVE, default=None, help="seeds per setting (default: the study's own)")
    s.add_argument("--scheduler", default=None, help="run on a Dask cluster at this address (tcp://HOST:PORT)")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("report", parents=[common], help="tables and figures of a finished study folder")
    s.add_argument("dir", help="a study folder holding results.jsonl, or the studies folder (benchmarks/studies): "
                   "every method compared across studies 1 and 7, the front page's table and figure (methods.png)")
    s.add_argument("--figures", default=None, help="folder to write the study's PNG into")
    s.add_argument("--fast-note", action="store_true", help="mark the figures' titles as a smoke test")
    s.set_defaults(func=_cmd_report)
    return p


def _subparsers(parser):
    """name -> subparser of the `minilora` parser."""
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _subcommand_first(argv, parser):
    """argv with the subcommand moved before every option, so options work before or after it:
    `minilora --seed 1 generate` reads as `minilora generate --seed 1`."""
    commands = _subparsers(parser)
    takes_value = {o for sp in (parser, *commands.values()) for a in sp._actions if a.option_strings and a.nargs != 0
                   for o in a.option_strings}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in commands:
            return [token, *argv[:i], *argv[i + 1:]]
        if not token.startswith("-") or token == "--":
            return argv  # a stray word: argparse reports it
        i += 2 if token in takes_value else 1
    return argv


def parse_args(argv=None):
    """The parsed options of a `minilora` command line; SystemExit(2) with a one-line message when they are wrong."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_subcommand_first(argv, parser))
    args.backend = getattr(args, "backend", None)
    args.threads = getattr(args, "threads", DEFAULT_THREADS)
    args.argv = argv
    args.options = {o for a in _subparsers(parser)[args.command]._actions for o in a.option_strings}
    return args


# Library messages start with the setting they are about; the CLI names the option instead.
_OPTION_OF = {"data_file": "--data", "text_file": "--text", "dropout": "--lora-dropout", "init": "--lora-init",
              "run_dir": "--out", "out_dir": "--out", "figures_dir": "--figures", "bases_dir": "--out",
              "workers": "--workers", "seeds": "--seeds"}


def _one_line(message, args):
    """The message on one line, starting with the option it is about when the library named a setting."""
    message = "; ".join(line.strip() for line in str(message).split("\n") if line.strip()).translate(_LINE_BREAKS)
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier():
        option = "--" + head.replace("_", "-")
        if option not in args.options:
            option = _OPTION_OF.get(head)
        if option in args.options:
            return f"{option}: {rest}"
    return message


def _resume_hint(args):
    """What to run after an interruption, and what it will do."""
    run_dir = getattr(args, "run_dir", None)
    if args.command in ("demo", "sweep"):
        return "run the same command again to resume: " + shlex.join(["minilora", *args.argv])
    argv, skip = [], False
    for token in args.argv:  # the same options, less --overwrite and any earlier --resume
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif token != "--overwrite" and not token.startswith("--resume="):
            argv.append(token)
    ckpt = os.path.join(run_dir, "checkpoint.npz") if run_dir else None
    if ckpt is None or not os.path.exists(ckpt):
        from .runs import is_run_dir

        if run_dir and is_run_dir(run_dir):  # a log, no checkpoint: nothing to continue from
            return "nothing was saved; to start over: " + shlex.join(["minilora", *argv, "--overwrite"])
        return "nothing was saved; run the same command again to start over"
    try:
        from .checkpoint import load_checkpoint

        meta = load_checkpoint(ckpt)[1]
        step, steps = int(meta["step"]), int(meta["train"]["steps"])
    except (ValueError, KeyError, TypeError):
        step = steps = None
    if step is not None and step == steps:
        what = f"training had finished (step {step} of {steps}), so resuming only scores the run and saves it"
    elif step is not None:
        what = f"resuming continues from step {step} of {steps}"
    else:
        what = "resuming continues from its checkpoint"
    return f"{what}; to resume: " + shlex.join(["minilora", *argv, "--resume", run_dir])


def _interrupted(args, error):
    """The one line Ctrl-C (or SIGTERM) prints, and the exit code a shell expects (130, or 143)."""
    from .sweep import SweepInterrupted
    from .train import Interrupted

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C cannot cut this line short
    try:
        if isinstance(error, SweepInterrupted):
            what, code = signal.Signals(error.signum).name, error.exit_code
            where = (f"{error.kept} of the {error.total} cells to run finished and are kept in {error.path}, "
                     f"{error.total - error.kept} left")
        elif isinstance(error, Interrupted):
            what = signal.Signals(error.signum).name
            where = (f"after step {error.step}, checkpoint saved" if error.step is not None and error.checkpoint
                     else "at once, nothing saved since the last checkpoint")
            code = error.exit_code
        else:
            what, where, code = "SIGINT", "at once, nothing saved since the last checkpoint", 130
        print(f"minilora {args.command}: interrupted ({what}) {where}; {_resume_hint(args)}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigterm_interrupts():
    """For the whole command, SIGTERM stops it as Ctrl-C does (one line, exit 143), not silently.

    train() and run_sweep() put their own handlers in place while they run; outside them (loading,
    scoring before and after training) SIGTERM raises train.Interrupted where the command is.
    """
    from .train import Interrupted

    def handler(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv=None):
    """Run one `minilora` command; returns the exit code (2: bad input, 1: failure, 130 / 143: interrupted)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or the help)
        return e.code
    from .backend import BackendError
    from .sweep import WorkerLost
    from .train import TrainingDiverged

    try:
        with _sigterm_interrupts():
            if args.threads is not None:
                from threadpoolctl import threadpool_limits

                with threadpool_limits(limits=args.threads, user_api="blas"):
                    return args.func(args)
            return args.func(args)
    except KeyboardInterrupt as e:  # train.Interrupted and sweep.SweepInterrupted too: SIGINT or SIGTERM
        return _interrupted(args, e)
    except (ValueError, BackendError, TrainingDiverged, WorkerLost, OSError, MemoryError) as e:
        message = str(e) or type(e).__name__
        if isinstance(e, MemoryError):
            message = "out of memory: the settings ask for more memory than this machine has"
        option, path = None, getattr(e, "filename", None) if isinstance(e, OSError) else None
        if path:
            option = _option_of_path(args, path)
        elif isinstance(e, OSError) and e.errno in _DISK_FULL and getattr(args, "out", None):
            option, path = "--out", args.out  # a write to an open file names none: the command's output did
        if option is not None:  # a file or folder the command line named: say which, in words
            from .outputs import os_error_reason

            message = f"{option}: cannot use {str(path)!r}: {os_error_reason(e, path)}"
        print(f"minilora {args.command}: error: {_one_line(message, args)}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) or option is not None else 1


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# the options (argparse dest -> as the user types it) whose values are paths
_PATH_OPTIONS = {"out": "--out", "checkpoint": "--checkpoint", "adapter": "--adapter", "data": "--data",
                 "text": "--text", "tokenizer": "--tokenizer", "resume": "--resume", "figures": "--figures",
                 "run": "run", "dir": "dir", "logs": "logs"}


def _option_of_path(args, filename):
    """The option whose path an OSError's file is, lies in or beside (a temporary file named after it); or None."""
    failed = os.path.abspath(os.fspath(filename))
    for dest, option in _PATH_OPTIONS.items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str) or not value:
                continue
            given = os.path.abspath(value)
            if (failed == given or failed.startswith(given + os.sep) or given.startswith(failed + os.sep)
                    or (os.path.dirname(failed) == os.path.dirname(given)
                        and os.path.basename(given) in os.path.basename(failed))):
                return option
    return None


if __name__ == "__main__":
    sys.exit(main())
