"""Experiments as grids of cells: each cell one fine-tuning run, evaluated as it trains.

A cell is a method and its settings (learning rate, seed, rank, alpha, rsLoRA,
DoRA's detached norm, targets, prompt length and init, steps, dataset size, batch size, replay
fraction, end marker, base model). `run_cell` fine-tunes the pretrained base
with the one training loop and, every `eval_every` steps (and at step 0):

    val_metric    the task metric on a validation split (never the test split)
    corpus_loss   the pretraining-corpus loss of the model as it now is
    forgetting    corpus_loss minus the base model's
    delta         ||Delta W||_F / ||W||_F per linear (full: W - W0; LoRA: s B A; DoRA: W' - W0)

and at the end the test metric (reported, never used to choose anything) and,
for full fine-tuning, the singular values of every Delta W. Every record also
names what made it: `code`, the last commit that changed minilora/ (with
"+dirty" when minilora/ had uncommitted changes; None outside a git checkout),
and `base_fingerprint`, the hash of the base weights it started from
(methods.base_fingerprint), so rows of one table can be shown to share both.
A cell whose loss stops being finite is a result too (a rate too large, which
the studies' rate ladders need to see): its record holds the step-0
evaluation, no test metric, and `diverged`, the error's message.

`run_sweep` runs a list of cells in worker processes, with the BLAS threads
split between them so N workers on N cores never oversubscribe, and appends
one JSON line per finished cell to DIR/results.jsonl. A rerun skips the cells
already there, so an interrupted sweep resumes. Any concurrent.futures
Executor works, a Dask cluster's included (sweep.dask_executor).

Stopping cleanly: one sweep holds a study folder at a time (lock.py). Each
local worker writes its own cell's line the moment the cell is done, so a
finished cell is kept whatever happens to the parent afterwards. Workers
ignore Ctrl-C (the terminal sends it to the whole process group); the parent
takes SIGINT or SIGTERM, tells the workers to stop (they exit within 0.2 s,
never in the middle of a line) and raises SweepInterrupted. A worker whose
parent is gone (SIGKILL) notices within 0.2 s and exits too.
"""

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache, partial

import numpy as np

from . import corpus, lock, tasks
from .bounds import REPLAY
from .evaluation import corpus_val_data, strided_val_loss
from . import methods
from .finetune import DEFAULT_LR, FinetuneConfig, score, setup_strategy
from .methods.lora import TARGETS, settings_class
from .model import ModelConfig
from .pretrain import PretrainConfig, load_or_pretrain
from .train import Interrupted, TrainConfig, TrainingDiverged, train
from .validate import FileError, field, read_jsonl

# the pretrained bases a cell can start from: name -> how to pretrain it
BASES = {
    "tiny": PretrainConfig.fast(),  # for tests only
    "small": replace(PretrainConfig(), model=ModelConfig(d_model=64, n_heads=4, n_layers=2, d_ff=256)),
    "default": PretrainConfig(),
    "large": replace(PretrainConfig(), model=ModelConfig(d_model=192, n_heads=4, n_layers=3, d_ff=768)),
}
REPLAY_TEXT_SENTENCES = 5_000  # pretraining-corpus text that replay batches are cut from


@dataclass(frozen=True)
class Cell:
    study: str  # which study the cell belongs to (a name, also part of its key)
    method: str = "lora"  # a name of methods.METHODS: full | lora | dora | prompt
    task: str = "subject"
    lr: float = DEFAULT_LR["lora"]  # LoRA's default, chosen by the forgetting study
    seed: int = 0  # adapters / prompt init, batches, the split
    steps: int = 200
    batch_size: int = 16
    n_train: int = 2000  # training records
    n_val: int = 64  # validation records: what learning rates are chosen on
    n_test: int = 200  # test records: reported, never chosen on
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple = ("q", "k", "v", "o")
    n_prompt: int = 16
    prompt_init: str = "vocab"
    replay: float = 0.0  # fraction of each batch that is pretraining text
    end_marker: str = "\n"  # the character that ends a response
    base: str = "default"  # a key of BASES
    eval_every: int = 25
    corpus_sentences: int = 200  # validation sentences the corpus loss (forgetting) is measured on
    detach_norm: bool = False  # DoRA: the backward treats the row norm as a constant (a later field: see key)
    n_prefix: int = 16  # prefix tuning: keys and values per attention layer (a later field: see key)

    def key(self):
        """A string that names the cell exactly: equal settings, equal key.

        Every field of the first grid is always in it; a field added since (KEY_FIELDS lists the
        first ones) only when it differs from its default, so adding a setting leaves the key of
        every finished cell, and so the runner's memory of it, unchanged.
        """
        defaults = {f.name: f.default for f in fields(self)}
        d = {k: v for k, v in asdict(self).items() if k in KEY_FIELDS or v != defaults[k]}
        return json.dumps(d, sort_keys=True)

    def finetune_config(self):
        # the method's own adapter settings class (DoraConfig for dora), with its variant's fields
        settings = settings_class(self.method)
        variant = {f: getattr(self, f) for f in getattr(settings, "FLAGS", {})}
        for cls in methods.ADAPTER_CONFIGS.values():
            for f in getattr(cls, "FLAGS", {}):
                if cls is not settings and getattr(self, f) != getattr(Cell, f):
                    raise ValueError(f"{f}: expected method {cls.method!r} (a {cls.label} setting), "
                                     f"got method {self.method!r}")
        lora = settings(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), rslora=self.rslora,
                        **variant)
        tc = TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, min_lr=self.lr / 10,
                         warmup_steps=min(20, self.steps // 10), weight_decay=0.0, eval_every=self.eval_every,
                         seed=self.seed)
        return FinetuneConfig(method=self.method, task=self.task, n_train=self.n_train, n_test=self.n_test,
                              lora=lora, n_prompt=self.n_prompt, prompt_init=self.prompt_init, n_prefix=self.n_prefix,
                              end_marker=self.end_marker, train=tc, seed=self.seed)


# the fields Cell had when results were first recorded: always part of a key (see Cell.key)
KEY_FIELDS = ("study", "method", "task", "lr", "seed", "steps", "batch_size", "n_train", "n_val", "n_test", "rank",
              "alpha", "rslora", "targets", "n_prompt", "prompt_init", "replay", "end_marker", "base", "eval_every",
              "corpus_sentences")


def splits(cell):
    """(train, validation, test) records: three disjoint sets of sentences."""
    train_records, held = tasks.task_splits(cell.task, cell.n_train, cell.n_val + 2 * cell.n_test, cell.seed)
    text = "text" if cell.task == "kind" else "input"
    val = held[:cell.n_val]
    seen = {r[text] for r in val}
    test = [r for r in held[cell.n_val:] if r[text] not in seen][:cell.n_test]
    return train_records, val, test


def replay_rows(fraction, batch_size):
    """round(fraction * batch_size), the corpus rows of a batch; ValueError unless a task row is left."""
    n = int(round(REPLAY.check(fraction) * batch_size))
    if not 0 <= n < batch_size:
        raise ValueError(f"replay: expected a fraction that leaves at least one task row in a batch of "
                         f"{batch_size}, got {fraction}")
    return n


class ReplayBatches:
    """Instruction batches with a fraction of pretraining windows mixed in.

    round(fraction * B) rows of every batch are windows of corpus text, every
    target counted (the pretraining loss); the rest are instruction records
    with their response mask. Both kinds have the instruction rows' length T.
    """

    def __init__(self, records, tokenizer, batch_size, context_length, corpus_data, fraction, end="\n"):
        self.n_replay = replay_rows(fraction, batch_size)
        self.records = tasks.RecordBatches(records, tokenizer, batch_size - self.n_replay, context_length, end=end)
        self.data = corpus_data

    def sample(self, rng):
        batch = self.records.sample(rng)
        if not self.n_replay:
            return batch
        T = batch["x"].shape[1]
        starts = rng.integers(0, len(self.data) - T - 1, self.n_replay)
        idx = starts[:, None] + np.arange(T)[None, :]  # (R, T)
        return {"x": np.concatenate([batch["x"], self.data[idx]]),
                "y": np.concatenate([batch["y"], self.data[idx + 1]]),
                "mask": np.concatenate([batch["mask"], np.ones(idx.shape, batch["mask"].dtype)])}


def delta_norms(params, config, base):
    """||Delta W||_F / ||W0||_F for every base linear, Delta W as the pair that computes it says
    (methods.LinearPair.delta): W - W0 for a plain linear, s B A for a LoRA one."""
    out = {}
    for i in range(config.n_layers):
        for t, layer in TARGETS.items():
            prefix = f"h.{i}.{layer}"
            delta = methods.linear_pair(config, prefix).delta(params, config, base, prefix)
            out[prefix] = float(np.linalg.norm(delta) / np.linalg.norm(base[prefix + ".W"]))
    return out


def _evaluate(params, config, tokenizer, base, val, class_names, end, corpus_data, corpus_before):
    """What a cell logs at each evaluation."""
    loss = strided_val_loss(params, config, corpus_data)
    return {"val_metric": score(params, config, tokenizer, val, class_names, end), "corpus_loss": loss,
            "forgetting": loss - corpus_before, "delta": delta_norms(params, config, base)}


_BASE_CACHE = {}


def load_base(name, bases_dir):
    """The pretrained base `name` as (params, config, tokenizer) (pretrained into bases_dir/name on first use,
    then reused).

    Sweeps of several studies share bases_dir: the one that finds a base missing pretrains it while
    holding its folder's lock, and the others wait for it (lock.py).
    """
    if name not in BASES:
        raise ValueError(f"base: expected one of {sorted(BASES)}, got {name!r}")
    if (name, bases_dir) not in _BASE_CACHE:
        with lock.hold(os.path.join(bases_dir, name), "bases_dir", wait=float("inf")):
            params, config, _, tokenizer = load_or_pretrain(BASES[name], os.path.join(bases_dir, name))
        _BASE_CACHE[(name, bases_dir)] = (params, config, tokenizer)
    return _BASE_CACHE[(name, bases_dir)]


def run_cell(cell, bases_dir, threads=None):
    """Fine-tune one cell from its base; returns its result record (a JSON-able dict)."""
    if threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads, user_api="blas"):
            return run_cell(cell, bases_dir)
    base, model_config, tokenizer = load_base(cell.base, bases_dir)
    record, _, _ = run_cell_on(cell, base, model_config, tokenizer)
    return record


def run_cell_on(cell, base, model_config, tokenizer):
    """Fine-tune one cell from the given base model (its params, config and tokenizer; cell.base is not read).

    Returns (record, params, config): the result record run_cell writes, and the
    fine-tuned parameters with their ModelConfig (tutorial 06 runs cells live on
    tutorial 02's model this way).
    """
    t0 = time.perf_counter()
    config = cell.finetune_config()
    train_records, val, test = splits(cell)
    class_names = list(tasks.CLASS_NAMES) if cell.task == "kind" else None
    params, ft_config, trainable = setup_strategy(base, model_config, tokenizer, config,
                                                  len(class_names) if class_names else None)
    T = model_config.context_length
    if cell.replay:
        if class_names:
            raise ValueError("replay: expected a generative task (a classification batch has no next tokens)")
        replay_text, _ = corpus.train_val_text(REPLAY_TEXT_SENTENCES, 0, seed=1)
        batches = ReplayBatches(train_records, tokenizer, cell.batch_size, T, tokenizer.encode(replay_text),
                                cell.replay, cell.end_marker)
    else:
        batches = tasks.RecordBatches(train_records, tokenizer, cell.batch_size, T, class_names, end=cell.end_marker)
    corpus_data = corpus_val_data(tokenizer, cell.corpus_sentences)
    corpus_before = strided_val_loss(base, model_config, corpus_data)
    evaluate = partial(_evaluate, config=ft_config, tokenizer=tokenizer, base=base, val=val,
                       class_names=class_names, end=cell.end_marker, corpus_data=corpus_data,
                       corpus_before=corpus_before)
    evals = [{"step": 0, **evaluate(params)}]
    try:
        history, _ = train(params, trainable, ft_config, batches, config.train, evaluate=evaluate,
                           desc=f"{cell.study} {cell.method}")
    except TrainingDiverged as e:  # a rate too large is a result of the grid (studies.diverged), not a failure
        record = {"key": cell.key(), "cell": asdict(cell), "evals": evals, "corpus_before": corpus_before,
                  "train_loss": [], "test_metric": None, "diverged": str(e),
                  "trainable_params": int(sum(params[n].size for n in trainable)),
                  "wall_s": time.perf_counter() - t0, "blas_threads": _blas_threads(), "code": code_version(),
                  "base_fingerprint": methods.base_fingerprint(base)}
        return record, params, ft_config
    keys = ("val_metric", "corpus_loss", "forgetting", "delta")
    evals += [{"step": r["step"], "train_loss": r["train_loss"], **{k: r[k] for k in keys}}
              for r in history if "val_metric" in r]
    record = {"key": cell.key(), "cell": asdict(cell), "evals": evals, "corpus_before": corpus_before,
              "train_loss": [r["train_loss"] for r in history],
              "test_metric": score(params, ft_config, tokenizer, test, class_names, cell.end_marker),
              "trainable_params": int(sum(params[n].size for n in trainable))}
    if cell.method == "full":
        record["singular_values"] = {
            prefix: np.linalg.svd(params[prefix + ".W"] - base[prefix + ".W"], compute_uv=False).tolist()
            for prefix in delta_norms(params, ft_config, base)}
    record["wall_s"] = time.perf_counter() - t0
    record["blas_threads"] = _blas_threads()
    record["code"] = code_version()
    record["base_fingerprint"] = methods.base_fingerprint(base)
    return record, params, ft_config


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@lru_cache(maxsize=4)
def code_version(root=_PACKAGE_ROOT):
    """The version of the code that ran: the last commit that changed minilora/ in the checkout at root (the
    package's parent folder; commits to docs or results alone leave it unchanged), with "+dirty" if minilora/
    has uncommitted changes; None when root is not the top of a git checkout (a non-editable install) or git
    is missing."""

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None
        last = git("log", "-1", "--format=%H", "--", "minilora").stdout.strip()
        dirty = git("status", "--porcelain", "--", "minilora").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (last or None) and last + ("+dirty" if dirty else "")


def _blas_threads():
    """The BLAS threads this process computes with now (None if threadpoolctl sees no BLAS)."""
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=None)


def read_results(path):
    """The records of a results.jsonl, one per distinct cell (the first of any repeated key).

    A last line cut short by an interruption is ignored; any other bad line, or a
    record whose key, cell, evals or test_metric is missing or of the wrong type,
    is a FileError naming the file and line. Counting lines would count a cell
    twice if it was ever appended twice; counting keys cannot.
    """
    records, seen = [], set()
    for i, r in enumerate(read_jsonl(path, "study results")):
        where = f"record {i + 1}"
        key = field(r, "key", path, "str", where)
        cell = field(r, "cell", path, "dict", where)
        for name, kind in (("study", "str"), ("method", "str"), ("lr", "number"), ("seed", "int"),
                           ("steps", "int")):
            field(cell, name, path, kind, f"{where}: cell")
        field(r, "wall_s", path, "number", where, optional=True)
        field(r, "code", path, "str", where, optional=True)
        field(r, "base_fingerprint", path, "str", where, optional=True)
        evals = field(r, "evals", path, "list", where)
        if not evals:
            raise FileError(path, "expected at least one evaluation, got none", f"{where}: evals")
        for j, e in enumerate(evals):
            for name in ("val_metric", "forgetting"):
                field(e, name, path, "number", f"{where}: evals[{j}]")
        field(r, "test_metric", path, "number", where, optional=True)
        field(r, "diverged", path, "str", where, optional=True)
        if key not in seen:
            seen.add(key)
            records.append(r)
    return records


_APPENDING = threading.Lock()  # a worker stops (watchdog) only between appends, never in one


def _append(path, record):
    """One line per finished cell, on disk before the cell is reported (lock.append_line)."""
    with _APPENDING:
        lock.append_line(path, json.dumps(record))


def _limit_threads(threads):
    """A worker process's BLAS pool: `threads` threads (set before any NumPy work)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def _watch_parent(parent_pid, stop):
    """A worker's watchdog thread: exit when the parent asks (stop) or is gone (killed, even by SIGKILL)."""
    while not stop.wait(0.2) and os.getppid() == parent_pid:
        pass
    with _APPENDING:  # a line being written is finished first
        os._exit(1)


def _worker_init(threads, parent_pid, stop):
    """Set up a local worker: ignore Ctrl-C (the parent handles it), watch the parent, limit BLAS threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    lock.forget_inherited()  # the study folder's lock belongs to the parent
    threading.Thread(target=_watch_parent, args=(parent_pid, stop), daemon=True).start()
    _limit_threads(threads)


def run_cell_into(path, cell, bases_dir, threads=None):
    """run_cell, then append its record to path at once (a local worker's task); returns the record."""
    record = run_cell(cell, bases_dir, threads)
    _append(path, record)
    return record


class SweepInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a sweep. Attributes: signum, kept (cells of this call in results.jsonl),
    total (cells this call was to run), path (results.jsonl), exit_code (128 + signum)."""

    def __init__(self, signum, kept, total, path):
        self.signum, self.kept, self.total, self.path = signum, kept, total, path
        self.exit_code = 128 + int(signum)
        super().__init__(f"{signal.Signals(signum).name}: {kept} of {total} cells finished, kept in {path}")

    def __reduce__(self):
        return (SweepInterrupted, (self.signum, self.kept, self.total, self.path))


class WorkerLost(RuntimeError):
    """A worker process died (killed from outside, out of memory); the finished cells are kept."""


def check_cells(cells):
    """Raise ValueError, naming the setting, unless every cell's settings are valid (before any work)."""
    for c in cells:
        if not isinstance(c, Cell):
            raise ValueError(f"cells: expected Cell objects, got {type(c).__name__}")
        if c.base not in BASES:
            raise ValueError(f"base: expected one of {sorted(BASES)}, got {c.base!r}")
        c.finetune_config()  # every fine-tuning setting's own checks
        replay_rows(c.replay, c.batch_size)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM interrupts like SIGINT (a KeyboardInterrupt in the main thread) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_sweep(cells, out_dir, workers=1, executor=None, bases_dir=None, threads=None, on_result=None):
    """Run every cell not yet in out_dir/results.jsonl; returns the records of this call.

    Inputs:
    - cells: a list of Cell
    - workers: worker processes when no executor is given; each gets
      threads = max(1, cores // workers) BLAS threads
    - executor: any concurrent.futures.Executor (e.g. dask_executor(...)); cells
      are submitted to it as run_cell(cell, bases_dir, threads)
    - bases_dir: where pretrained bases live (default out_dir/../bases)
    - on_result(record, done, total): called as each cell finishes

    Every cell is checked before out_dir is claimed. Raises lock.FolderInUse
    when another sweep holds out_dir, SweepInterrupted after SIGINT / SIGTERM
    (every finished cell is in results.jsonl; a rerun runs the rest), and
    WorkerLost when a local worker died.
    """
    check_cells(cells)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    lock.check_folder_name(out_dir, "out_dir")
    with lock.hold(out_dir, "out_dir"), _signals_interrupt():
        return _run_sweep(cells, out_dir, workers, executor, bases_dir, threads, on_result)


def _run_sweep(cells, out_dir, workers, executor, bases_dir, threads, on_result):
    """run_sweep with out_dir's lock held."""
    path = os.path.join(out_dir, "results.jsonl")
    bases_dir = bases_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)), "bases")
    done = {r["key"] for r in read_results(path)}
    todo, seen = [], set()
    for c in cells:
        if c.key() not in done and c.key() not in seen:
            todo.append(c)
            seen.add(c.key())
    if not todo:
        return []
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // max(1, workers))
    results = []

    def kept():
        keys = {r["key"] for r in read_results(path)}
        return sum(c.key() in keys for c in todo)

    own = executor is None
    stop = None
    try:
        for name in sorted({c.base for c in todo}):
            load_base(name, bases_dir)  # pretrain each base once, here, before the workers start
        if own:
            # fork where there is one (fast, and a worker's parent is this process: the watchdog's test)
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            stop = context.Event()
            executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                           initargs=(threads, os.getpid(), stop))
            futures = [executor.submit(run_cell_into, path, c, bases_dir, threads) for c in todo]
        else:
            futures = [executor.submit(run_cell, c, bases_dir, threads) for c in todo]
        for f in as_completed(futures):
            record = f.result()
            if not own:
                _append(path, record)
            results.append(record)
            if on_result is not None:
                on_result(record, len(results), len(todo))
    except KeyboardInterrupt as e:  # SIGINT, SIGTERM (_signals_interrupt), or train's Interrupted for a base
        if stop is not None:
            stop.set()
        if own and executor is not None:  # a worker may be writing its last cell: count once they have stopped
            executor.shutdown(wait=True, cancel_futures=True)
            executor = None
        raise SweepInterrupted(getattr(e, "signum", signal.SIGINT), kept(), len(todo), path) from None
    except BrokenProcessPool as e:
        raise WorkerLost(f"a worker process died ({e}); the {kept()} finished cells of {len(todo)} are kept in "
                         f"{path}; run the same sweep again to run the others") from None
    except BaseException:  # a cell's error: the other workers stop now rather than finish their cells
        if stop is not None:
            stop.set()
        raise
    finally:
        if own and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return results


def dask_executor(scheduler):
    """A concurrent.futures Executor on a Dask cluster (the optional extra `minilora[dist]`).

    scheduler: a distributed.Client, a LocalCluster, or an address "tcp://HOST:PORT".
    """
    try:
        from distributed import Client
    except ImportError as e:
        raise ValueError("scheduler: running on a Dask cluster needs the 'dist' extra: "
                         "pip install 'minilora[dist]'") from e
    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    return client.get_executor()
