# %% [markdown]
# # 07. Targets, format, merging and compute: solutions to the exercises
#
# Each section answers one exercise at the end of
# `tutorials/07_targets_format_and_compute.py` and **asserts** the answer. Try the
# exercise before reading its solution. Like the tutorial, this file uses tutorial
# 02's model from `$MINILORA_RUNS/pretrain` (pretraining it first, about a minute
# on 2 cores, if it is missing), and honours MINILORA_FAST (a few steps of a tiny
# model: a smoke test) and MINILORA_FIGURES. In full mode it trains 13 short LoRA
# runs, about 2,000 steps in all: a few minutes on 2 cores.
#
# The setup repeats the tutorial's helpers (a solutions file runs on its own).

# %%
import os
from dataclasses import replace

import numpy as np
from matplotlib.figure import Figure

from minilora import corpus, model, plot, tasks
from minilora.methods import lora
from minilora.evaluation import exact_match
from minilora.finetune import DEFAULT_LR, FinetuneConfig, setup_strategy
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.sweep import Cell, splits
from minilora.train import train
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""
RUNS = os.environ.get("MINILORA_RUNS", "runs")
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))

STEPS = 3 if FAST else 150
RANK = 8
LR = DEFAULT_LR["lora"]
QKVO, MLP, ALL = ("q", "k", "v", "o"), ("fc", "proj"), ("q", "k", "v", "o", "fc", "proj")
train_records, val_records, test_records = splits(
    Cell(study="07", n_train=64 if FAST else 2000, n_val=8 if FAST else 64, n_test=8 if FAST else 100))


def finetune_lora(targets, seed, steps=STEPS, lr=LR, rank=RANK, start=None, batches=None):
    """LoRA on the 'subject' task, as in the tutorial; batches: a batch source (default tasks.RecordBatches)."""
    config = FinetuneConfig(method="lora", lora=lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets),
                            seed=seed)
    tc = replace(config.train, steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(20, max(1, steps // 10)),
                 eval_every=steps, seed=seed, checkpoint_seconds=0)
    params, ft_mc, trainable = setup_strategy(base, mc, tok, config)
    if start is not None:
        params.update({n: start[0][n].copy() for n in trainable})
    train(params, trainable, ft_mc, batches or tasks.RecordBatches(train_records, tok, tc.batch_size, mc.context_length), tc)
    return params, ft_mc, trainable


def rendered_arrays(records, renders):
    """x, y, mask (B, T) for records, record b's prompt written by renders[b]; the mask is on the response only.

    Exercise 7.5's mixed batches need one format per record; a batch in one format
    is tasks.instruction_batch(..., render=...).
    """
    rows = [(tok.encode(render(r["instruction"], r["input"])), tok.encode(r["output"] + "\n"))
            for r, render in zip(records, renders)]
    T = max(len(p) + len(o) for p, o in rows) - 1
    x = np.full((len(rows), T), corpus.NEWLINE_ID, np.int64)
    y, mask = x.copy(), np.zeros((len(rows), T), np.float32)
    for b, (p, o) in enumerate(rows):
        ids = np.concatenate([p, o])
        x[b, :len(ids) - 1], y[b, :len(ids) - 1] = ids[:-1], ids[1:]
        mask[b, len(p) - 1:len(ids) - 1] = 1.0
    return x, y, mask


def response_loss(params, config, records, render=tasks.format_prompt):
    x, y, mask = tasks.instruction_batch(records, tok, config.context_length, render=render)
    return model.loss_and_grads(params, config, {"x": x, "y": y, "mask": mask})[0]


def exact_match_rendered(params, config, records, render):
    return exact_match(params, config, tok, records, render=render)[0]


FORMATS = {
    "as trained": tasks.format_prompt,
    '"### Answer" header': lambda ins, inp: f"### Instruction\n{ins}\n\n### Input\n{inp}\n\n### Answer\n",
    "no blank lines": lambda ins, inp: f"### Instruction\n{ins}\n### Input\n{inp}\n### Response\n",
    "lower-case headers": lambda ins, inp: f"### instruction\n{ins}\n\n### input\n{inp}\n\n### response\n",
    '"##" headers': lambda ins, inp: f"## Instruction\n{ins}\n\n## Input\n{inp}\n\n## Response\n",
    '"Key: value" lines': lambda ins, inp: f"Instruction: {ins}\nInput: {inp}\nResponse: ",
    "a space after the header": lambda ins, inp: tasks.format_prompt(ins, inp) + " ",
}

# %% [markdown]
# ## Exercise 7.1: break the format your own way
#
# The model is the tutorial's section-2 model, made the same way: `STEPS` steps on
# q, k, v, o (seed 0), then twice as many more. `### Sentence` renames the header of
# the *input*; `### Answer` renames the one the answer follows directly. A natural
# prediction: both cost something, since neither string was ever in a training
# prompt, and the response header costs more, since it is the cue that the answer
# starts now. The cell measures both next to the format as trained, and asserts only
# the first half: each rename costs exact match and raises the loss on the correct
# answer. Which of the two costs more it prints.

# %%
FORMATS['"### Sentence" header'] = lambda ins, inp: f"### Instruction\n{ins}\n\n### Sentence\n{inp}\n\n### Response\n"
start = finetune_lora(QKVO, 0)
baseline = finetune_lora(QKVO, 100, steps=2 * STEPS, start=start)  # seed 100: new batches, as in the tutorial
measured = {}
for name in ("as trained", '"### Sentence" header', '"### Answer" header'):
    measured[name] = (exact_match_rendered(*baseline[:2], test_records, FORMATS[name]),
                      response_loss(*baseline[:2], test_records, FORMATS[name]))
    print(f"{name:24s} exact match {measured[name][0]:.3f}   loss on the correct answer {measured[name][1]:.3f}")
costlier = max(('"### Sentence" header', '"### Answer" header'), key=lambda n: measured[n][1])
print(f"the rename that raises the loss more: {costlier}")
if not FAST:
    # each renamed header costs exact match and raises the loss on the correct answer
    for name in ('"### Sentence" header', '"### Answer" header'):
        assert measured[name][0] < measured["as trained"][0] and measured[name][1] > measured["as trained"][1]

# %% [markdown]
# When the printed rename is `### Sentence` (it was in our full-mode run), the
# "nearest header matters most" guess is refuted: the model also relies on
# `### Input` to find the sentence it copies the subject from. A header is not just
# a cue for *when* to answer but a landmark for *where* to look.

# %% [markdown]
# ## Exercise 7.2: equal parameters instead of equal rank
#
# A LoRA pair on a (d, k) matrix trains r (d + k) numbers, so the count is linear in
# r: per unit of rank, L x sum over targets of (d + k). With C = 128, F = 512 and
# L = 2: q, k, v, o give 2 x 4 x 256 = 2,048 per rank (16,384 at r = 8); fc, proj give
# 2 x 2 x 640 = 2,560 per rank, so r = 6 (15,360) comes closest; all six give 4,608
# per rank, so r = 4 (18,432) beats r = 3 (13,824). The cell derives the same from the
# shapes (for whatever model is loaded), checks it against `lora.add_lora`'s real
# counts, and trains both.

# %%
def per_rank(targets):
    """Adapter numbers per unit of rank: L * sum of (d + k) over the target matrices."""
    return mc.n_layers * sum(sum(model.param_shapes(mc)[f"h.0.{lora.TARGETS[t]}.W"]) for t in targets)


def adapter_count(targets, rank):
    params, _ = lora.add_lora(base, mc, lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets))
    return model.count_params(params, lora.lora_names(params))


goal = adapter_count(QKVO, RANK)
equal_rank = {"MLP fc,proj": MLP, "all six": ALL}
ranks = {name: int(max(1, round(goal / per_rank(t)))) for name, t in equal_rank.items()}
for name, targets in equal_rank.items():
    best = min(range(1, 4 * RANK), key=lambda r: abs(adapter_count(targets, r) - goal))  # brute force, real counts
    assert ranks[name] == best and adapter_count(targets, best) == best * per_rank(targets)
    print(f"{name}: r = {best} gives {adapter_count(targets, best):,} numbers (q,k,v,o at r = {RANK}: {goal:,})")
if not FAST:
    assert ranks == {"MLP fc,proj": 6, "all six": 4} and goal == 16_384

runs = {}  # (targets, lr, rank) -> (params, config, trainable), seed 0; exercise 7.3 reuses them
runs[QKVO, LR, RANK] = start  # the exercise 7.1 start: q,k,v,o, STEPS steps, seed 0, lr LR
rows = {"attention q,k,v,o": (QKVO, RANK), **{n: (t, ranks[n]) for n, t in equal_rank.items()}}
for name, (targets, rank) in rows.items():
    if (targets, LR, rank) not in runs:
        runs[targets, LR, rank] = finetune_lora(targets, 0, rank=rank)
    p, c, tr = runs[targets, LR, rank]
    print(f"{name:18s} r = {rank}: {model.count_params(p, tr):6,d} numbers   "
          f"val exact match {exact_match(p, c, tok, val_records)[0]:.3f}   val response loss "
          f"{response_loss(p, c, val_records):.3f}   (one seed)")
    assert model.count_params(p, tr) == adapter_count(targets, rank)

# %% [markdown]
# One seed of a short run cannot rank three settings whose section-1 spreads
# overlap: the printed numbers answer "what happened here", and section 1's way
# (several seeds, mean ± sd, the 2-se rule) is how to answer "which is better".

# %% [markdown]
# ## Exercise 7.3: a learning rate for each target set
#
# For each target set, two runs (3e-3, 1e-2), one seed, scored on the **validation**
# records only: choosing on the test records would make the test score part of the
# tuning, and it would no longer estimate how the chosen setting does on new data.
# The q,k,v,o run at 3e-3 is the one exercise 7.2 already trained.

# %%
GRID = (3e-3, 1e-2)
TARGET_SETS = {"attention q,k,v,o": QKVO, "MLP fc,proj": MLP, "all six": ALL}
val_loss, chosen = {}, {}
for name, targets in TARGET_SETS.items():
    for lr in GRID:
        if (targets, lr, RANK) not in runs:
            runs[targets, lr, RANK] = finetune_lora(targets, 0, lr=lr)
        val_loss[name, lr] = response_loss(*runs[targets, lr, RANK][:2], val_records)
    chosen[name] = min(GRID, key=lambda lr: val_loss[name, lr])
    print(f"{name:18s} " + "   ".join(f"lr {lr:g}: val response loss {val_loss[name, lr]:.3f}" for lr in GRID)
          + f"   -> chosen {chosen[name]:g}")
    assert val_loss[name, chosen[name]] == min(val_loss[name, lr] for lr in GRID)
order_default = sorted(TARGET_SETS, key=lambda n: val_loss[n, LR])
order_tuned = sorted(TARGET_SETS, key=lambda n: val_loss[n, chosen[n]])
print(f"order by validation loss at lr {LR:g} for all: {order_default}")
print(f"order with each set's chosen lr:           {order_tuned}")
assert set(order_tuned) == set(TARGET_SETS)

# %% [markdown]
# Whether the order changed is printed above; with one seed per cell, read a change
# as "the learning rate matters as much as the targets at this budget", not as a
# new winner. To claim one, repeat the chosen settings over seeds as section 1 does.

# %% [markdown]
# ## Exercise 7.4: when merging pays for itself
#
# `lora.merge` computes W + s (B A) per adapted matrix: the product B A, (out, r) @
# (r, in), is 2 out r in FLOPs (the scaling and the addition are out x in each, small
# beside it and not counted, as elsewhere). Summed over the adapted matrices that is
# 2 r x (the adapted weights), once. Unmerged, every token pays 2 r (in + out) per
# adapted matrix. So merging has paid for itself after
#
#     tokens = sum(out in) / sum(in + out)
#
# tokens, whatever r: about out in / (in + out) per matrix, 64 for a 128 x 128 one.
# With the six targets of our model the cell prints the total.

# %%
merge_flops = 2 * RANK * mc.n_layers * sum(int(np.prod(model.param_shapes(mc)[f"h.0.{lora.TARGETS[t]}.W"]))
                                           for t in ALL)
per_token = 2 * RANK * mc.n_layers * sum(sum(model.param_shapes(mc)[f"h.0.{lora.TARGETS[t]}.W"]) for t in ALL)
# the tutorial's forward_flops adapter term, for one token: 2 N r (d + k) per adapter
shapes = {t: model.param_shapes(mc)[f"h.0.{lora.TARGETS[t]}.W"] for t in lora.TARGETS}
tutorial_adapter_term = 2 * 1 * mc.n_layers * sum(RANK * sum(shapes[t]) for t in ALL)
assert per_token == tutorial_adapter_term
break_even = merge_flops / per_token
print(f"merge: {merge_flops:,} FLOPs once; unmerged: {per_token:,} extra FLOPs per token; "
      f"break-even after {break_even:.1f} tokens")
if not FAST:
    assert merge_flops == 6_291_456 and per_token == 73_728 and 85 < break_even < 86

adapted, amc = lora.add_lora(base, mc, lora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=ALL))
rng = np.random.default_rng(0)
for n in lora.lora_names(adapted):  # B = 0 at init would make the check trivial
    adapted[n] = rng.standard_normal(adapted[n].shape).astype(np.float32) * 0.1
merged, _ = lora.merge(adapted, amc)
s = amc.lora.scale
for prefix in (f"h.{i}.{lora.TARGETS[t]}" for i in range(mc.n_layers) for t in ALL):
    mine = base[prefix + ".W"] + s * (adapted[prefix + ".lora_B"] @ adapted[prefix + ".lora_A"])
    assert np.array_equal(merged[prefix + ".W"], mine)
print(f"lora.merge equals W + s B A (s = {s:g}) for all {mc.n_layers * len(ALL)} adapted matrices, exactly")

# %% [markdown]
# So a merged model is cheaper as soon as it has served about a hundred tokens: one
# reply. Merging is free in practice; the reason to stay unmerged is not compute but
# flexibility (one base serving many adapters, or training on).

# %% [markdown]
# ## Exercise 7.5: train on the formats users will type
#
# The batch source below renders each record with a format drawn from a training
# list, and masks exactly what `tasks.instruction_batch` masks: the targets that
# are response tokens. The first check: with the list holding only
# `tasks.format_prompt`, it builds exactly `instruction_batch`'s arrays.
#
# Prediction: the breaks in the training list recover most of their loss (they are
# now part of the format); the format as trained may lose a little (the adapters
# now serve four formats with the same steps); breaks kept out of training move
# less predictably, since the model has learned that headers vary, but not how.

# %%
class MixedFormatBatches:
    """Instruction batches whose prompts are written by a format drawn at random per record."""

    def __init__(self, records, batch_size, renders):
        self.records, self.batch_size, self.renders = records, batch_size, list(renders)

    def sample(self, rng):
        chosen = [self.records[i] for i in rng.choice(len(self.records), self.batch_size, replace=False)]
        which = rng.integers(len(self.renders), size=self.batch_size)
        x, y, mask = rendered_arrays(chosen, [self.renders[w] for w in which])
        return {"x": x, "y": y, "mask": mask}


one = MixedFormatBatches(train_records, 16, [tasks.format_prompt]).sample(np.random.default_rng(1))
picked = [train_records[i] for i in np.random.default_rng(1).choice(len(train_records), 16, replace=False)]
for got, want in zip((one["x"], one["y"], one["mask"]), tasks.instruction_batch(picked, tok, mc.context_length)):
    assert np.array_equal(got, want)
print("with one format, the mixed batches equal instruction_batch's exactly")

TRAINED_ON = ["as trained", '"### Answer" header', '"Key: value" lines', "a space after the header"]
mixed = finetune_lora(QKVO, 100, steps=2 * STEPS, start=start,
                      batches=MixedFormatBatches(train_records, 16, [FORMATS[n] for n in TRAINED_ON]))
table = {}
for name, render in FORMATS.items():
    table[name] = {label: (exact_match_rendered(*m[:2], test_records, render),
                           response_loss(*m[:2], test_records, render))
                   for label, m in (("one format", baseline), ("mixed formats", mixed))}
print(f"{'format at test time':26s} {'in training':>11s}   one format: EM, loss   mixed formats: EM, loss")
for name, r in table.items():
    one, mix = r["one format"], r["mixed formats"]
    print(f"{name:26s} {'yes' if name in TRAINED_ON else 'no':>11s}   {one[0]:.3f}, {one[1]:.3f}"
          f"           {mix[0]:.3f}, {mix[1]:.3f}")
held_out = [n for n in table if n not in TRAINED_ON]
for label in ("one format", "mixed formats"):
    print(f"{label:13s}: mean exact match {np.mean([table[n][label][0] for n in TRAINED_ON[1:]]):.3f} on the "
          f"trained-on breaks, {np.mean([table[n][label][0] for n in held_out]):.3f} on the held-out ones")
# the trained-on breaks the one-format model could not read (their loss over twice the format's as trained)
hard = [n for n in TRAINED_ON[1:] if table[n]["one format"][1] > 2 * table["as trained"]["one format"][1]]
print("trained-on breaks the one-format model failed at:", hard)
if not FAST:
    # each of them now costs less loss on the correct answer
    assert hard and all(table[n]["mixed formats"][1] < table[n]["one format"][1] for n in hard)

# %%
fig = Figure(figsize=(10, 4.5), layout="constrained")
ax = fig.add_subplot()
names = list(table)
yy = np.arange(len(names))
ax.barh(yy - 0.2, [table[n]["one format"][0] for n in names], 0.4, color="C0", label="trained on one format")
ax.barh(yy + 0.2, [table[n]["mixed formats"][0] for n in names], 0.4, color="C1",
        label=f"trained on {len(TRAINED_ON)} formats (marked *)")
ax.set_yticks(yy, [f"{n} *" if n in TRAINED_ON else n for n in names], fontsize=8)
ax.invert_yaxis()
ax.set_xlim(0, 1)
ax.set_xlabel(f"test exact match ({len(test_records)} records)")
ax.grid(True, axis="x", alpha=0.3)
ax.legend(fontsize=8, loc="lower right")
ax.set_title(f"Exercise 7.5: training on varied formats, {STEPS} + {2 * STEPS} steps, LoRA q,k,v,o{NOTE}",
             fontsize=10)
path = os.path.join(FIGURES, "07_solution_mixed_formats.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# Read the table against the prediction. What the assert checks is the part that
# holds: the trained-on breaks the one-format model could not read (in our full-mode
# run, `Key: value` lines and a space after the header) now cost about as much loss
# as the others. The rest is one seed of one run each, so read it as a first look.
# In our full-mode run (2026-12-01, 1 BLAS thread) the price was larger than
# predicted: the format as trained lost exact match, the `### Answer` header, which
# the one-format model already read well, gained nothing, and the held-out breaks
# lost too. With the same number of steps spread over four formats, the adapters
# learned each one less well; more steps, or a larger rank, is the next thing to try
# (an earlier version of this code, on another base, gained on the held-out rows:
# at one seed, this comparison is not stable). The held-out `### Sentence` is the
# row to watch: renaming the input header removes the landmark the model uses to
# find the sentence (exercise 7.1), and varying the *response* side of the format
# in training does not supply it.
