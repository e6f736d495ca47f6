"""The studies, as named grids of sweep cells (`minilora sweep NAME --out DIR`).

    forgetting   learning versus forgetting: full, LoRA and prompt tuning, 4 learning rates each, 3+ seeds
    format       where forgetting comes from: an end marker unlike corpus text, and replay of corpus text
    rank         intrinsic rank: LoRA r = 1..64, alpha/r against rsLoRA alpha/sqrt(r), each with its own lr sweep
    prompt       prompt tuning, tuned: learning rate x prompt length, then the three inits
    scale        the best prompt setting, LoRA and full at three model sizes
    hyper        the seed's hyperparameter table: epochs on small datasets, batch size, alpha
    qlora        LoRA on the float32 base against LoRA on its NF4 quantization (QLoRA), at one lr
    kind         every method on the classification task, and the head alone (a linear probe): 4 learning rates
                 at seed 0, then more seeds at the best
    budget       score against trainable parameters: prompt and prefix lengths, LoRA's rank, IA3

Which method learns what, at equal cost: the forgetting study is the `subject`
half (every method at its own 4 learning rates, 3 seeds, forgetting at matched
skill); `kind` asks the same of the classification task; `budget` sizes each
method (P prompt vectors, P prefix keys and values per layer, LoRA rank r) at
the learning rate the forgetting study chose for it.

A study that builds on another (format, scale and hyper use the learning rates
the forgetting study chose) reads that study's results from the same parent
folder, and says so when they are missing. Every choice of a learning rate or a
setting is made on the validation metric, never on the test metric.

Rates that bracket: a rate chosen at the edge of its grid says only that the
best rate may lie beyond it. So every setting swept over two or more rates
(forgetting, rank, prompt, kind's first stage) is extended, one step of its
ladder at a time (rate_step), while the chosen rate is the largest or the
smallest tried: until it has a tried neighbour on both sides, or the rate
above it diverged (a diverged rate is tried, recorded as such, and never
chosen), or MAX_EXTENSIONS rates were added. The decision is next_rate, a pure
function of the finished records; rate_extensions turns it into cells, and
`minilora sweep` runs a study's grid again until it stops growing.
"""

import json
import math
import os
from dataclasses import fields, replace

import numpy as np

from . import methods
from .sweep import Cell, read_results

# each method's learning rates for the forgetting study (and prompt's for the prompt study): its own
LRS = {name: m.study_lrs for name, m in methods.METHODS.items() if m.study_lrs}
# Steps per cell. The method comparisons (forgetting, format) train as long as the demo (600 steps,
# evaluated every 50), long enough for every method to reach its plateau; the within-method
# studies (rank, prompt, scale, hyper) use 250 steps (every 25) to afford their larger grids.
LONG_STEPS, LONG_EVAL = 600, 50
STEPS = 250
MATCHED_SKILL = 0.8  # forgetting is compared at the first evaluation with validation exact match >= this


MAX_EXTENSIONS = 4  # rates a setting's ladder may gain beyond its declared grid, both directions together
EXPLODED = 10.0  # a last training loss above this many times the first: the rate diverged, though still finite


def final_val(record):
    return record["evals"][-1]["val_metric"]


def diverged(record):
    """True when the run diverged: the loss stopped being finite (the sweep records the error as "diverged") or
    exploded (its last training loss above EXPLODED times its first)."""
    if record.get("diverged"):
        return True
    losses = record.get("train_loss") or []
    return bool(losses) and (not math.isfinite(losses[-1]) or losses[-1] > EXPLODED * losses[0])


def best_setting(records, match, key):
    """The value of key(cell) whose cells reach the highest mean final validation metric.

    Ties go to the lower mean forgetting. A value any of whose runs diverged is never chosen.
    Returns None when no record matches (or every value diverged).
    """
    groups = {}
    for r in records:
        if match(r["cell"]):
            groups.setdefault(key(r["cell"]), []).append(r)
    groups = {k: rs for k, rs in groups.items() if not any(diverged(r) for r in rs)}
    if not groups:
        return None

    def merit(rs):
        return (np.mean([final_val(r) for r in rs]), -np.mean([r["evals"][-1]["forgetting"] for r in rs]))

    return max(groups, key=lambda k: merit(groups[k]))


def chosen_rate(records):
    """The learning rate the records of one setting choose on validation (best_setting), or None."""
    return best_setting(records, lambda c: True, lambda c: c["lr"])


def rate_ladder(declared, records):
    """Every rate tried or to be tried for one setting: the declared grid and the rates of its records, sorted."""
    return sorted(set(declared) | {r["cell"]["lr"] for r in records})


def rate_step(rates, direction):
    """The rate one step of the ladder beyond its edge: above the largest (direction +1) or below the smallest (-1).

    The step is the ratio the ladder took one rung in from that edge, so a half-decade ladder 1, 3, 10, 30
    goes on as 100, 300 (and 0.3, 0.1 below) and a geometric one by its own ratio; rounded to 3 significant
    digits, so the new rate prints (and keys) as the grid's do. rates: at least 2, sorted ascending.
    """
    if len(rates) < 2:
        raise ValueError(f"rates: expected at least 2 rates to take a ratio from, got {list(rates)}")
    if direction == 1:
        ratio = rates[-2] / rates[-3] if len(rates) > 2 else rates[-1] / rates[-2]
        new = rates[-1] * ratio
    elif direction == -1:
        ratio = rates[2] / rates[1] if len(rates) > 2 else rates[1] / rates[0]
        new = rates[0] / ratio
    else:
        raise ValueError(f"direction: expected +1 (up) or -1 (down), got {direction!r}")
    return float(f"{new:.3g}")


def rate_edge(rates, records):
    """Where the chosen rate lies on a ladder: "largest" or "smallest" tried, or None when a tried rate lies on each
    side of it (bracketed), fewer than 2 rates were tried, or nothing was chosen.

    A diverged rate counts as tried: a chosen rate below one that diverged is bracketed from above.
    """
    rates = sorted(set(rates))
    chosen = chosen_rate(records)
    if len(rates) < 2 or chosen is None:
        return None
    return "largest" if chosen == rates[-1] else "smallest" if chosen == rates[0] else None


def next_rate(declared, records, seeds, cap=MAX_EXTENSIONS):
    """The next learning rate to try for one setting so that its chosen rate is bracketed, or None.

    Inputs:
    - declared: the study's own rates for the setting (its grid)
    - records: the setting's finished records, at the seeds the rate is chosen on
    - seeds: the seeds every rate runs at
    - cap: how many rates beyond the declared ones the ladder may hold

    None when some rate of the ladder has not finished at every seed (wait for it), when the grid has a single
    rate (a fixed rate, nothing to bracket), when the chosen rate has a tried rate on each side, or when the
    ladder already holds `cap` rates beyond the grid. When every rate diverged, the next one is below them all.
    """
    if len(set(declared)) < 2:
        return None
    ladder = rate_ladder(declared, records)
    done = {(r["cell"]["lr"], r["cell"]["seed"]) for r in records}
    if any((lr, s) not in done for lr in ladder for s in seeds):
        return None
    if len(ladder) - len(set(declared)) >= cap:
        return None
    if chosen_rate(records) is None:  # every rate diverged: go lower
        return rate_step(ladder, -1)
    edge = rate_edge(ladder, records)
    return None if edge is None else rate_step(ladder, 1 if edge == "largest" else -1)


def setting_of(key):
    """A cell's key (Cell.key) less its learning rate and seed: the setting a rate ladder belongs to."""
    return json.dumps({k: v for k, v in json.loads(key).items() if k not in ("lr", "seed")}, sort_keys=True)


def rate_extensions(grid, records, cap=MAX_EXTENSIONS):
    """The cells that extend the rate ladders of grid, given the study's finished records.

    grid's cells are grouped by setting (setting_of); a setting with two or more rates is a ladder. For each:
    a cell at every seed of the setting for each rate already added beyond its grid (so the grid only grows,
    and a rerun finds them done), and for the rate next_rate asks for, if any.
    """
    groups = {}
    for c in grid:
        groups.setdefault(setting_of(c.key()), []).append(c)
    out = []
    for setting, cs in groups.items():
        declared = sorted({c.lr for c in cs})
        seeds = sorted({c.seed for c in cs})
        if len(declared) < 2:
            continue
        mine = [r for r in records if r["cell"]["seed"] in seeds and setting_of(r["key"]) == setting]
        rates = [lr for lr in rate_ladder(declared, mine) if lr not in declared]
        new = next_rate(declared, mine, seeds, cap)
        rates += [new] if new is not None else []
        out += [replace(cs[0], lr=lr, seed=s) for lr in rates for s in seeds]
    return out


def rate_settled(declared, records, seeds, cap=MAX_EXTENSIONS):
    """True when a setting's ladder has finished at every seed and next_rate asks for no further rate."""
    done = {(r["cell"]["lr"], r["cell"]["seed"]) for r in records}
    return (all((lr, s) in done for lr in rate_ladder(declared, records) for s in seeds)
            and next_rate(declared, records, seeds, cap) is None)


# the settings a label of a ladder leaves out: always there, or what the ladder is over
_UNLABELLED = ("study", "method", "lr", "seed")


def setting_label(cell):
    """A setting in words: its method and every field that differs from Cell's default ('lora rank=1 rslora=True')."""
    defaults = {f.name: f.default for f in fields(Cell)}
    extra = [f"{k}={cell[k]}" for k in sorted(cell) if k not in _UNLABELLED and k in defaults
             and cell[k] != (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k])
             and k not in ("steps", "eval_every", "task")]
    return " ".join([cell["method"], *extra])


def rate_edges(records):
    """Every setting whose chosen rate is still at an edge of the rates it tried.

    The rate is chosen on the seeds that ran at every tried rate of the setting (all of them in the forgetting
    study; seed 0 in kind, whose seeds 1.. ran at the chosen rate only), as the study chose it. Returns a list of
    (label, chosen rate, "largest" | "smallest", tried rates), in the records' order.
    """
    groups = {}
    for r in records:
        groups.setdefault(setting_of(r["key"]), []).append(r)
    out = []
    for rs in groups.values():
        rates = sorted({r["cell"]["lr"] for r in rs})
        seeds = set.intersection(*({r["cell"]["seed"] for r in rs if r["cell"]["lr"] == lr} for lr in rates))
        pool = [r for r in rs if r["cell"]["seed"] in seeds]
        edge = rate_edge(rates, pool)
        if edge is not None:
            out.append((setting_label(rs[0]["cell"]), chosen_rate(pool), edge, rates))
    return out


def _own_results(out_dir):
    """The study's own finished records (out_dir/results.jsonl; none yet: [])."""
    return read_results(os.path.join(out_dir, "results.jsonl"))


def _results_of(out_dir, study):
    """The records of a sibling study (DIR/../STUDY/results.jsonl), or an error naming the command."""
    path = os.path.join(os.path.dirname(os.path.abspath(out_dir)), study, "results.jsonl")
    records = read_results(path)
    if not records:
        raise ValueError(f"study: this study uses the learning rates chosen by '{study}'; run "
                         f"`minilora sweep {study} --out {os.path.dirname(os.path.abspath(out_dir))}/{study}` "
                         f"first (no results in {path})")
    return records


def best_lr(out_dir, method):
    """The forgetting study's learning rate for method, chosen on the validation metric."""
    records = _results_of(out_dir, "forgetting")
    lr = best_setting(records, lambda c: c["method"] == method, lambda c: c["lr"])
    if lr is None:
        raise ValueError(f"study: the forgetting study has no finished {method} cells yet")
    return lr


def forgetting(out_dir, seeds):
    grid = [Cell("forgetting", method=m, lr=lr, seed=s, steps=LONG_STEPS, eval_every=LONG_EVAL)
            for m in LRS for lr in LRS[m] for s in range(seeds)]
    return grid + rate_extensions(grid, _own_results(out_dir))


FORMATS = {"baseline": ("\n", 0.0), "end marker": ("~", 0.0), "replay 25%": ("\n", 0.25),
           "end marker + replay": ("~", 0.25)}


def format_study(out_dir, seeds):
    return [Cell("format", method=m, lr=best_lr(out_dir, m), seed=s, steps=LONG_STEPS, eval_every=LONG_EVAL,
                 end_marker=end, replay=replay)
            for m in ("full", "lora") for end, replay in FORMATS.values() for s in range(seeds)]


RANKS = (1, 2, 4, 8, 16, 32, 64)
RANK_LRS = (3e-3, 1e-2, 3e-2)


def rank(out_dir, seeds):
    # alpha fixed at 16: standard LoRA scales the update by 16 / r, rsLoRA by 16 / sqrt(r)
    grid = [Cell("rank", method="lora", lr=lr, seed=s, steps=STEPS, rank=r, alpha=16.0, rslora=rs)
            for r in RANKS for rs in (False, True) for lr in RANK_LRS for s in range(seeds)]
    return grid + rate_extensions(grid, _own_results(out_dir))


PROMPT_LENGTHS = (4, 16, 32)


def prompt(out_dir, seeds):
    grid = [Cell("prompt", method="prompt", lr=lr, seed=s, steps=STEPS, n_prompt=p)
            for lr in LRS["prompt"] for p in PROMPT_LENGTHS for s in range(seeds)]
    # the three inits at a setting fixed in advance (lr 1e-1, P = 16; "vocab" is in the grid above)
    inits = [Cell("prompt", method="prompt", lr=1e-1, seed=s, steps=STEPS, n_prompt=16, prompt_init=init)
             for init in ("random", "text") for s in range(seeds)]
    return grid + rate_extensions(grid, _own_results(out_dir)) + inits


def scale(out_dir, seeds):
    records = _results_of(out_dir, "prompt")
    lr, n_prompt = best_setting(records, lambda c: c["prompt_init"] == "vocab", lambda c: (c["lr"], c["n_prompt"]))
    cells = []
    for base in ("small", "default", "large"):
        cells += [Cell("scale", method="prompt", lr=lr, n_prompt=n_prompt, seed=s, steps=STEPS, base=base)
                  for s in range(seeds)]
        cells += [Cell("scale", method=m, lr=best_lr(out_dir, m), seed=s, steps=STEPS, base=base)
                  for m in ("full", "lora") for s in range(seeds)]
    return cells


def hyper(out_dir, seeds):
    lr = best_lr(out_dir, "lora")
    cells = []
    # epochs on a small dataset: 20 passes, evaluated about once per epoch
    for n in (100, 1000):
        per_epoch = max(1, n // 16)
        cells += [Cell("hyper", method="lora", lr=lr, seed=s, n_train=n, steps=20 * per_epoch, eval_every=per_epoch)
                  for s in range(seeds)]
    # batch size at equal examples seen (3,200)
    cells += [Cell("hyper", method="lora", lr=lr, seed=s, batch_size=b, steps=3200 // b, eval_every=800 // b)
              for b in (4, 8, 16, 32) for s in range(seeds)]
    # alpha at fixed rank 8 (the scale s = alpha / 8)
    cells += [Cell("hyper", method="lora", lr=lr, seed=s, steps=STEPS, alpha=a)
              for a in (2.0, 8.0, 16.0, 32.0, 64.0) for s in range(seeds)]
    return cells


# The learning rate the forgetting study chose for LoRA on validation (of 4), for both. QLoRA's own tuning is
# in the forgetting study (4 rates x 3 seeds), whose validation split chose 3e-3 for it as well.
QLORA_LRS = (3e-3,)


def qlora_study(out_dir, seeds):
    """The same LoRA cells on the float32 base and on the NF4 base (QLoRA): what the 4-bit base costs."""
    return [Cell("qlora", method=m, lr=lr, seed=s, steps=LONG_STEPS, eval_every=LONG_EVAL)
            for m in ("lora", "qlora") for lr in QLORA_LRS for s in range(seeds)]


# The linear probe (methods/head.py: the head alone on the frozen model) has no generative task, so no rates in
# the forgetting study; on `kind` it gets a half-decade ladder of its own, which extends itself like the others.
HEAD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
KIND_LRS = {**LRS, "head": HEAD_LRS}  # every method of the kind study and its rates


def kind(out_dir, seeds):
    """Every method on `kind`: its learning rates at seed 0, the best on validation, then seeds 1.. at it.

    A two-stage grid: a method's rate ladder is extended at seed 0 until its chosen rate is bracketed
    (rate_extensions), and its second-stage cells appear once that ladder is settled in
    out_dir/results.jsonl, so `minilora sweep kind` runs the grid again until it stops growing.
    """
    first = [Cell("kind", method=m, task="kind", lr=lr, seed=0, steps=STEPS) for m in KIND_LRS for lr in KIND_LRS[m]]
    done = _own_results(out_dir)
    first += rate_extensions(first, done)
    second = []
    for m in KIND_LRS:
        setting = setting_of(Cell("kind", method=m, task="kind", seed=0, steps=STEPS).key())
        mine = [r for r in done if r["cell"]["seed"] == 0 and setting_of(r["key"]) == setting]
        lr = chosen_rate(mine)
        if rate_settled(KIND_LRS[m], mine, [0]) and lr is not None:
            second += [Cell("kind", method=m, task="kind", lr=lr, seed=s, steps=STEPS) for s in range(1, seeds)]
    return first + second


# the sizes the budget study gives each method (trainable parameters on the default base, L = 2, C = 128)
PROMPT_BUDGET = (4, 16, 32)  # P C: 512, 2,048, 4,096
PREFIX_BUDGET = (1, 4, 16)  # 2 L P C: 512, 2,048, 8,192
RANK_BUDGET = (1, 4, 8)  # LoRA on q, k, v, o: 8 L r C: 2,048, 8,192, 16,384 (alpha = 2 r keeps s = 2)


def budget(out_dir, seeds):
    """Score against trainable parameters: each method at several sizes, at the forgetting study's rate for it."""
    cells = []
    for s in range(seeds):
        cells += [Cell("budget", method="prompt", lr=best_lr(out_dir, "prompt"), seed=s, steps=STEPS, n_prompt=p)
                  for p in PROMPT_BUDGET]
        cells += [Cell("budget", method="prefix", lr=best_lr(out_dir, "prefix"), seed=s, steps=STEPS, n_prefix=p)
                  for p in PREFIX_BUDGET]
        cells += [Cell("budget", method="lora", lr=best_lr(out_dir, "lora"), seed=s, steps=STEPS, rank=r,
                       alpha=2.0 * r) for r in RANK_BUDGET]
        cells += [Cell("budget", method="ia3", lr=best_lr(out_dir, "ia3"), seed=s, steps=STEPS)]
    return cells


STUDIES = {"forgetting": forgetting, "format": format_study, "rank": rank, "prompt": prompt, "scale": scale,
           "hyper": hyper, "qlora": qlora_study, "kind": kind, "budget": budget}
# Studies defined (and tested on fake results, tests/test_sweep.py) whose results.jsonl is not committed yet;
# a test keeps this exact. Every study has its results now.
NOT_YET_RUN = ()
DEFAULT_SEEDS = {"forgetting": 3, "format": 3, "rank": 1, "prompt": 1, "scale": 1, "hyper": 1, "qlora": 3, "kind": 3,
                 "budget": 3}


def committed_results_dir():
    """The folder of the committed study results (benchmarks/studies of a clone), for the tutorials.

    Looked for, in order: $MINILORA_STUDIES; benchmarks/studies under the working
    directory (a script run from the clone's root) or its parent (a notebook opened in
    tutorials/); beside the package (an editable install). A non-editable install
    keeps no copy of the results, hence the search. Raises FileNotFoundError naming
    every place tried.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.environ.get("MINILORA_STUDIES"), os.path.join("benchmarks", "studies"),
                  os.path.join(os.pardir, "benchmarks", "studies"), os.path.join(here, "benchmarks", "studies")]
    tried = [c for c in candidates if c]
    for folder in tried:
        if os.path.isfile(os.path.join(folder, "forgetting", "results.jsonl")):
            return os.path.abspath(folder)
    raise FileNotFoundError("the committed study results: expected benchmarks/studies/*/results.jsonl, found none "
                            f"in {tried}; run from the root of a clone, or set MINILORA_STUDIES to that folder")


def cells(study, out_dir, seeds=None):
    """The cells of a named study (seeds: how many, default DEFAULT_SEEDS[study])."""
    if study not in STUDIES:
        raise ValueError(f"study: expected one of {sorted(STUDIES)}, got {study!r}")
    seeds = DEFAULT_SEEDS[study] if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected a positive integer, got {seeds!r}")
    return STUDIES[study](out_dir, seeds)
