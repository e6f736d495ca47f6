# %% [markdown]
# # 07. Which matrices to adapt, the data format, merging, and compute
#
# Four claims of the fine-tuning post that the earlier tutorials state but never
# measure, each with a small live experiment you can change:
#
# 1. "LoRA is typically applied to the query, key, value, and output projection
#    matrices": is attention the right place for the adapters, or the MLP, or both?
# 2. "Consistency in formatting matters. The model will learn the format as part of
#    the task": what happens when the test prompts break the format training used?
# 3. "Delta W = BA can be merged back into W, so inference latency is unchanged":
#    timed, unmerged against merged against the base model.
# 4. "Each forward and backward pass involves billions of multiply-accumulate
#    operations": the FLOPs of one of our training steps, counted and timed, then the
#    same count for a 7-billion-parameter model.
#
# **The pretrained model.** This tutorial uses tutorial 02's model, read from
# `runs/pretrain` (or `$MINILORA_RUNS/pretrain`). If it is not there, the setup cell
# pretrains it first, which takes about a minute on 2 cores (67 s in the README; longer on a busy
# machine); later runs reuse it.
#
# **The run.** Everything here must finish in under 3 minutes on 2 cores, so the
# fine-tuning runs are short: the setup cell prints their length, learning rate and
# seeds. They are a live, changeable miniature, not a study: short runs stop in the
# middle of learning, where seeds disagree most, and the text below reads each result
# against its spread.

# %%
import os
import time
from dataclasses import replace

import numpy as np
from matplotlib.figure import Figure
from threadpoolctl import threadpool_info

from minilora import model, optim, plot, tasks
from minilora.methods import lora
from minilora.evaluation import corpus_val_data, exact_match, strided_val_loss
from minilora.finetune import DEFAULT_LR, FinetuneConfig, setup_strategy
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.sweep import Cell, splits
from minilora.train import train
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")

base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                            os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")

STEPS = 3 if FAST else 150  # optimizer steps of every fine-tuning run below
SEEDS = [0] if FAST else [0, 1, 2]
RANK = 8  # the same rank r (and alpha = 2r) for every target set
LR = DEFAULT_LR["lora"]
# train / validation / test records of the "subject" task: three disjoint sets of sentences, split as the studies do
train_records, val_records, test_records = splits(
    Cell(study="07", n_train=64 if FAST else 2000, n_val=8 if FAST else 64, n_test=8 if FAST else 100))
corpus_data = corpus_val_data(tok, 50 if FAST else 200)  # pretraining-corpus text: forgetting is measured on it
corpus_before = strided_val_loss(base, mc, corpus_data)
blas_threads = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=None)
print(f"model: d_model {mc.d_model}, {mc.n_layers} layers, {model.count_params(base):,} parameters; "
      f"BLAS threads {blas_threads}")
print(f"each run: LoRA r = {RANK}, alpha = {2 * RANK}, {STEPS} steps of batch 16, peak lr {LR:g} "
      f"(finetune.DEFAULT_LR['lora']), seeds {SEEDS}")
print(f"records: {len(train_records)} train, {len(val_records)} validation, {len(test_records)} test; "
      f"corpus loss of the base model {corpus_before:.4f} nats/char")

# %% [markdown]
# Two helpers serve every section. `finetune_lora` is `finetune.finetune` cut to
# what this tutorial needs: the strategy (adapters beside the target linears, only
# they trainable), the one training loop, nothing written to disk.
# `response_loss` is the loss the training minimises, measured on held-out records:
# next-token cross-entropy on the response tokens only, in nats per token. Exact
# match is all-or-nothing per record; the loss moves smoothly, so it separates runs
# that exact match cannot yet tell apart. Its `render` argument (the function that
# writes a record's prompt) is what section 2 will change.

# %%
def finetune_lora(targets, seed, steps=STEPS, lr=LR, rank=RANK, start=None):
    """LoRA on the 'subject' task. Returns (params, config, trainable names, seconds).

    start: the (params, config) of an earlier run to continue training (its adapters are copied), or None.
    """
    config = FinetuneConfig(method="lora", lora=lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets),
                            seed=seed)
    tc = replace(config.train, steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(20, max(1, steps // 10)),
                 eval_every=steps, seed=seed, checkpoint_seconds=0)
    params, ft_mc, trainable = setup_strategy(base, mc, tok, config)
    if start is not None:
        params.update({n: start[0][n].copy() for n in trainable})
    batches = tasks.RecordBatches(train_records, tok, tc.batch_size, mc.context_length)
    t0 = time.perf_counter()
    train(params, trainable, ft_mc, batches, tc)
    return params, ft_mc, trainable, time.perf_counter() - t0


def response_loss(params, config, records, render=tasks.format_prompt):
    """Mean cross-entropy (nats per token) on the response tokens (output + '\\n') after render(...)."""
    x, y, mask = tasks.instruction_batch(records, tok, config.context_length, render=render)
    return model.loss_and_grads(params, config, {"x": x, "y": y, "mask": mask})[0]


base_loss = response_loss(base, mc, val_records)
print(f"before fine-tuning: validation response loss {base_loss:.3f} nats/token")

# %% [markdown]
# ## 1. Which matrices to adapt: attention, MLP, or all
#
# Each block has six linears: the attention projections q, k, v, o, all (C, C), and
# the MLP's fc (F, C) and proj (C, F), with F = 4C. The post puts LoRA on the first
# four; the original LoRA paper adapted only q and v; QLoRA and many later recipes
# adapt every linear. Tutorial 06 gives one reason to try the MLP: in the forgetting
# study's committed results, full fine-tuning's updates to the MLP matrices spread
# over more directions than its updates to attention.
#
# At equal rank r the trainable count differs: r (d + k) per matrix, and the MLP
# matrices are wider, so here the MLP pair holds *more* adapter parameters than the
# four attention matrices together (the cell prints the counts and checks them
# against r (d + k)).
#
# **The learning rate** is `finetune.DEFAULT_LR["lora"]` for all three target sets.
# It was chosen on the validation split by the forgetting study (README, study 1) for
# LoRA on **q, k, v, o** after 600 steps, so it is tuned for the attention targets and
# for a longer run, and it may not suit the others; exercise 7.3 asks what a learning
# rate chosen for each target set would change. Each run is scored on the validation
# records: exact match, the response loss, and forgetting (the rise of the loss on
# pretraining-corpus text over the base model's).

# %%
TARGET_SETS = {"attention q,k,v,o": ("q", "k", "v", "o"), "MLP fc,proj": ("fc", "proj"),
               "all six": ("q", "k", "v", "o", "fc", "proj")}
results, trained = {}, {}
for name, targets in TARGET_SETS.items():
    rows = []
    for seed in SEEDS:
        params, ft_mc, trainable, wall = finetune_lora(targets, seed)
        rows.append({"em": exact_match(params, ft_mc, tok, val_records)[0],
                     "loss": response_loss(params, ft_mc, val_records),
                     "forgetting": strided_val_loss(params, ft_mc, corpus_data) - corpus_before, "wall": wall})
        trained[name, seed] = (params, ft_mc)
    n_trainable = model.count_params(params, trainable)
    formula = sum(mc.n_layers * lora.lora_param_count(*model.param_shapes(mc)[f"h.0.{lora.TARGETS[t]}.W"], RANK)
                  for t in targets)
    assert n_trainable == formula  # r (d + k) per adapted matrix, summed
    results[name] = {"trainable": n_trainable, **{k: np.array([r[k] for r in rows]) for k in rows[0]}}


def mean_sd(a):
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else f"{a.mean():.3f}"


print(f"n = {len(SEEDS)} seed(s), mean ± sample sd; validation records: {len(val_records)}")
print(f"{'targets':18s} {'trainable':>9s}  {'val exact match':16s} {'val response loss':18s} "
      f"{'forgetting (nats/char)':22s} {'s per run':>9s}")
for name, r in results.items():
    print(f"{name:18s} {r['trainable']:9,d}  {mean_sd(r['em']):16s} {mean_sd(r['loss']):18s} "
          f"{mean_sd(r['forgetting']):22s} {r['wall'].mean():9.1f}")
if not FAST:  # every target set has started to learn the task: a lower loss than the base model's
    assert all((r["loss"] < base_loss).all() for r in results.values())

# %%
fig = Figure(figsize=(13, 4.2), layout="constrained")
names = list(results)
for ax, key, label in zip(fig.subplots(1, 3), ("em", "loss", "forgetting"),
                          ("validation exact match", "validation response loss (nats/token)",
                           "forgetting: corpus loss rise (nats/char)")):
    means = [results[n][key].mean() for n in names]
    sds = [results[n][key].std(ddof=1) if len(SEEDS) > 1 else 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=sds, capsize=4, color=["C0", "C1", "C2"], alpha=0.7)
    for i, n in enumerate(names):  # each seed as a dot
        ax.plot(np.full(len(SEEDS), i), results[n][key], "k.", markersize=6)
    ax.set_xticks(range(len(names)), [f"{n}\n{results[n]['trainable']:,} params" for n in names], fontsize=8)
    ax.set_ylabel(label)
    ax.grid(True, axis="y", alpha=0.3)
fig.suptitle(f"LoRA r = {RANK} on three target sets, {STEPS} steps at lr {LR:g}, {len(SEEDS)} seed(s) "
             f"(bars: mean ± sd, dots: seeds){NOTE}", fontsize=10)
path = os.path.join(FIGURES, "07_targets.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# How to read the table: with n = 3 seeds, a difference of means is only worth
# reading when it is large against its standard error, se = sqrt(sd_a^2 / n +
# sd_b^2 / n). The cell below prints every pair, with the rough rule |difference| >
# 2 se marking a gap that stands out from the seed-to-seed noise (with three seeds
# even that rule is generous; more seeds would make it firmer).

# %%
n_seeds = len(SEEDS)
apart = []
for key in ("em", "loss", "forgetting"):
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = results[a][key].mean() - results[b][key].mean()
            if n_seeds < 2:
                print(f"{key:10s} {a:18s} - {b:18s} = {diff:+.3f}   (one seed: no spread to compare with)")
                continue
            se = np.sqrt((results[a][key].var(ddof=1) + results[b][key].var(ddof=1)) / n_seeds)
            verdict = "apart" if abs(diff) > 2 * se else "within the noise"
            apart += [f"{key} {a} vs {b}"] if verdict == "apart" else []
            print(f"{key:10s} {a:18s} - {b:18s} = {diff:+.3f} ± {se:.3f} (se): {verdict}")
if n_seeds > 1:
    print(f"pairs apart by more than 2 se: {apart if apart else 'none'}")

# %% [markdown]
# Before reading anything into it, three things about this run:
#
# - It is short. The forgetting study's LoRA runs on q, k, v, o at this learning
#   rate (600 steps) first reached 0.8 validation exact match at step 350 ± 50
#   (README, study 1), and section 2 below shows the same model going on learning
#   after the section-1 budget. A short run is scored in the middle of learning,
#   which favours whatever learns fastest, not whatever ends best, so the ranking at
#   this budget may not be the ranking at the end (exercise 7.3 varies the learning
#   rate; try `STEPS = 600` if you have the minutes).
# - The comparison is at equal *rank*, not at equal parameter count: with F = 4C the
#   MLP's adapters hold more parameters than attention's at the same r (exercise 7.2
#   equalises them).
# - In full mode (150 steps, 3 seeds, the committed figure `figures/07_targets.png`)
#   the validation exact match is about 0.14 for attention, 0.10 for the MLP and 0.11
#   for all six, with response losses near 0.6 nats per token and the seeds' spread
#   as wide as the gaps. In fast mode (3 steps, one seed, a tiny model) every row
#   prints 0.000 and every difference is zero: the run works, nothing more.
#
# The post's sentence describes a convention, not a law. The LoRA paper adapted
# only attention matrices (at a fixed parameter budget on GPT-3 it found spreading
# the rank over W_q and W_v, or all four, better than one matrix) and left the MLP
# to future work; QLoRA (Dettmers et al., 2023) found adapters on every linear layer
# necessary to match full fine-tuning. What our model does at this budget is the
# table above, whichever way it falls.

# %% [markdown]
# ## 2. The format is part of what the model learned
#
# Every training record was rendered by `tasks.format_prompt`:
#
#     ### Instruction
#     Name the subject.
#
#     ### Input
#     the red cat chases two mice.
#
#     ### Response
#     cat
#
# The test below keeps the records (the same held-out sentences, the same answers)
# and changes only how the prompt is written: one header renamed, the blank lines
# removed, the headers in lower case, `##` instead of `###`, a colon delimiter
# instead of header lines, one space after the response header. The model must
# first have learned the task, so the cell continues the section-1 run on q, k, v,
# o (seed 0) for twice as many steps again, a new warmup and cosine (it prints the
# validation exact match before and after). `evaluation.exact_match` and
# `tasks.instruction_batch` take the prompt renderer as their `render` argument.

# %%
FORMATS = {
    "as trained": tasks.format_prompt,
    '"### Answer" header': lambda ins, inp: f"### Instruction\n{ins}\n\n### Input\n{inp}\n\n### Answer\n",
    "no blank lines": lambda ins, inp: f"### Instruction\n{ins}\n### Input\n{inp}\n### Response\n",
    "lower-case headers": lambda ins, inp: f"### instruction\n{ins}\n\n### input\n{inp}\n\n### response\n",
    '"##" headers': lambda ins, inp: f"## Instruction\n{ins}\n\n## Input\n{inp}\n\n## Response\n",
    '"Key: value" lines': lambda ins, inp: f"Instruction: {ins}\nInput: {inp}\nResponse: ",
    "a space after the header": lambda ins, inp: tasks.format_prompt(ins, inp) + " ",
}


FORMAT_STEPS = 3 if FAST else 2 * STEPS
fmt_params, fmt_mc, _, _ = finetune_lora(TARGET_SETS["attention q,k,v,o"], SEEDS[0] + 100, steps=FORMAT_STEPS,
                                         start=trained["attention q,k,v,o", SEEDS[0]])  # seed: new batches
fmt_val = exact_match(fmt_params, fmt_mc, tok, val_records)[0]
print(f"LoRA q,k,v,o, seed {SEEDS[0]}: validation exact match {results['attention q,k,v,o']['em'][0]:.3f} after "
      f"{STEPS} steps, {fmt_val:.3f} after {FORMAT_STEPS} more")
if not FAST:
    assert fmt_val > results["attention q,k,v,o"]["em"][0]  # still learning after the section-1 budget
fmt_results = {}
for name, render in FORMATS.items():
    em, preds = exact_match(fmt_params, fmt_mc, tok, test_records, render=render)
    fmt_results[name] = {"em": em, "loss": response_loss(fmt_params, fmt_mc, test_records, render), "pred": preds[0]}
print(f"test records: {len(test_records)}; first record: {test_records[0]['input']!r} -> {test_records[0]['output']!r}")
print(f"{'format at test time':26s} {'exact match':>11s} {'response loss':>14s}   first answer")
for name, r in fmt_results.items():
    print(f"{name:26s} {r['em']:11.3f} {r['loss']:14.3f}   {r['pred']!r}")
broken = {n: r for n, r in fmt_results.items() if n != "as trained"}
drops = {n: fmt_results["as trained"]["em"] - r["em"] for n, r in broken.items()}
print(f"exact match lost: least under {min(drops, key=drops.get)} ({min(drops.values()):+.3f}), "
      f"most under {max(drops, key=drops.get)} ({max(drops.values()):+.3f})")
if not FAST:
    # the format as trained is the easiest to answer: every change raises the loss on the correct answer
    assert all(r["loss"] > fmt_results["as trained"]["loss"] for r in broken.values())

# %%
fig = Figure(figsize=(11, 4.2), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
fnames = list(fmt_results)
colors = ["C2"] + ["C3"] * (len(fnames) - 1)
ax1.barh(fnames, [fmt_results[n]["em"] for n in fnames], color=colors)
ax1.set_xlabel(f"test exact match ({len(test_records)} records)")
ax1.set_xlim(0, 1)
ax2.barh(fnames, [fmt_results[n]["loss"] for n in fnames], color=colors)
ax2.set_xlabel("loss on the correct answer (nats/token)")
ax2.set_yticks(range(len(fnames)), [""] * len(fnames))
for ax in (ax1, ax2):
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
fig.suptitle(f"Trained on one prompt format, tested on others (LoRA q,k,v,o, {STEPS} + {FORMAT_STEPS} steps, "
             f"seed {SEEDS[0]}){NOTE}",
             fontsize=10)
path = os.path.join(FIGURES, "07_format.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# The model never saw a rule such as "answer after the Response header"; it saw
# thousands of prompts written one way, and what it learned is tied to that exact
# character sequence. The loss on the correct answer rises under every change (the
# cell asserts it in full mode): the format is part of the learned task. How much
# each change costs is in the table and the line under it: some changes the model
# shrugs off and some it does not, and which ones is itself a result, of what the
# pretraining text and the training prompts had in common. Compare the last row,
# one added space, with the others: a change a reader would not notice is still a
# different character sequence.
#
# In full mode (`figures/07_format.png`, seed 0) the test exact match is 0.80 as
# trained, between about 0.66 and 0.74 under the changed headers and the missing
# blank lines, and about 0.12 and 0.15 under the "Key: value" lines and the added
# space. In fast mode the model has not learned the task at all, so every format
# prints 0.000 and the table shows nothing about formats.
#
# The practical rule: render training and inference prompts with one function
# (here `tasks.format_prompt` serves both `instruction_batch` and `exact_match`),
# and, when users will type their own prompts, train on the variations they will
# type.

# %% [markdown]
# ## 3. Merging: the latency of the base model
#
# Unmerged, an adapted linear computes y = x W^T + b + s (x A^T) B^T: two extra thin
# products per adapter, on every forward. `lora.merge` folds s B A into W once; the
# merged model has exactly the base model's parameter names and shapes, so its
# forward runs the same operations. The cell below checks both, then times
# `model.next_token_logits` (one forward, what each decoding step calls) for the
# base model, the unmerged section-1 models (q, k, v, o, and all six), and the
# merged all-six model: the same input for all, the median of repeats that
# alternate between the models so all of them see the same machine load. Times depend
# on the machine and on what else runs on it; the cell prints the BLAS threads.

# %%
def forward_flops(c, B, T, targets=(), rank=RANK):
    """FLOPs (multiply-add = 2) of one forward of B x T tokens: linears, tied head, attention, adapters."""
    shapes = {t: model.param_shapes(c)[f"h.0.{lora.TARGETS[t]}.W"] for t in lora.TARGETS}  # (out, in)
    N = B * T
    linears = 2 * N * c.n_layers * sum(d * k for d, k in shapes.values()) + 2 * N * c.vocab_size * c.d_model
    attention = c.n_layers * 2 * 2 * B * T * T * c.d_model  # q k^T and P v, the whole T x T square
    adapters = 2 * N * c.n_layers * sum(rank * sum(shapes[t]) for t in targets)  # 2 N r (d + k) per adapter
    return linears, attention, adapters


all_params, all_mc = trained["all six", SEEDS[0]]
merged, merged_mc = lora.merge(all_params, all_mc)
assert {n: p.shape for n, p in merged.items()} == {n: p.shape for n, p in base.items()} and merged_mc == mc
variants = {"base": (base, mc), "LoRA q,k,v,o unmerged": trained["attention q,k,v,o", SEEDS[0]],
            "LoRA all six unmerged": (all_params, all_mc), "LoRA all six merged": (merged, merged_mc)}
shapes = {"one prompt (1 x 96)": (1, 96), "a batch (16 x 128)": (16, mc.context_length)}
repeats = 3 if FAST else 25
latency = {}
for shape_name, (B, T) in shapes.items():
    ids = np.random.default_rng(0).integers(0, mc.vocab_size, (B, T))
    logits = {name: model.next_token_logits(p, c, ids) for name, (p, c) in variants.items()}  # also a warm-up
    diff = np.abs(logits["LoRA all six merged"] - logits["LoRA all six unmerged"]).max()
    print(f"{shape_name}: max |merged - unmerged logits| = {diff:.1e} "
          f"(largest |logit| {np.abs(logits['LoRA all six unmerged']).max():.1f})")
    assert diff <= 1e-5 * np.abs(logits["LoRA all six unmerged"]).max() + 1e-6  # float32 rounding, no more
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (p, c) in variants.items():
            t0 = time.perf_counter()
            model.next_token_logits(p, c, ids)
            times[name].append(time.perf_counter() - t0)
    latency[shape_name] = {name: float(np.median(t)) for name, t in times.items()}
print(f"median of {repeats} forwards, BLAS threads {blas_threads}")
for shape_name, (B, T) in shapes.items():
    lin, att, _ = forward_flops(mc, B, T)
    for name, t in latency[shape_name].items():
        targets = TARGET_SETS["attention q,k,v,o"] if "q,k,v,o" in name else \
            TARGET_SETS["all six"] if "unmerged" in name else ()
        extra = forward_flops(mc, B, T, targets)[2] / (lin + att)
        print(f"  {shape_name:20s} {name:24s} {1000 * t:7.2f} ms   x{t / latency[shape_name]['base']:.2f} of base   "
              f"(adapter FLOPs +{100 * extra:.1f}%)")
if not FAST:  # medians of interleaved repeats: the merged model costs what the base costs
    assert all(lat["LoRA all six merged"] < 1.3 * lat["base"] for lat in latency.values())

# %%
fig = Figure(figsize=(10, 3.8), layout="constrained")
axes = fig.subplots(1, len(shapes))
for ax, (shape_name, lat) in zip(axes, latency.items()):
    vnames = list(lat)
    ax.barh(vnames, [1000 * lat[v] for v in vnames], color=["C7", "C1", "C3", "C2"])
    ax.set_xlabel("forward time (ms, median)")
    ax.set_title(shape_name, fontsize=9)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
axes[1].set_yticks(range(len(variants)), [""] * len(variants))
fig.suptitle(f"Unmerged adapters cost extra on every forward; merged, the model costs what the base costs "
             f"({blas_threads} BLAS thread(s)){NOTE}", fontsize=10)
path = os.path.join(FIGURES, "07_merge_latency.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# Compare the last two columns: the measured overhead of the unmerged models
# against the adapters' share of the FLOPs. Besides arithmetic, each adapter adds
# calls (two small matrix products, reshapes) whose fixed cost weighs most at small
# sizes, and a single prompt is small. Merging removes them all, at the price of one
# (out, in) product per adapted matrix, once (exercise 7.4 finds when that has paid
# for itself). Keep the adapters unmerged while training (W must stay frozen, and
# `lora.unmerge` takes the update back out) or to serve many adapters over one base;
# merge to deploy one.

# %% [markdown]
# ## 4. Compute: FLOPs per training step
#
# Count a multiply-add as 2 FLOPs and count only the matrix products (layer norms,
# GELU, softmax and AdamW are elementwise and not counted, as in
# `benchmarks/speed.py`). For N = B T tokens:
#
# - a linear with W (out, in): forward 2 N out in; the tied head: 2 N V C;
# - attention: q k^T and P v, each 2 B T^2 C per layer (the whole T x T square:
#   `ops.attention_forward` computes it all and masks the future with -inf, and
#   PyTorch's and llm.c's counts do the same);
# - **full fine-tuning's backward is 2x its forward**: every product y = x W^T needs
#   dx = dy W *and* dW = dy^T x, each as large as the forward;
# - **LoRA's backward is less**: a frozen W gets no dW, so its linears cost 1x the
#   forward (dx only), attention still 2x (dq, dk and dv are all needed to reach the
#   adapters below), and each adapter's own four thin products 2x its forward.
#
# The cell below counts one step at B = 16, T = 128, times it (loss, backward,
# gradient clipping, AdamW: the median of a few steps after a warm-up) and divides.
# It also measures what this CPU does on one large matrix product, the best case
# a model's step can approach.

# %%
def step_flops(c, B, T, targets=None, rank=RANK):
    """FLOPs of one training step: (forward, backward). targets None: full fine-tuning; else LoRA on them."""
    lin, att, adapters = forward_flops(c, B, T, targets or (), rank)
    if targets is None:
        return lin + att, 2 * (lin + att)
    return lin + att + adapters, lin + 2 * att + 2 * adapters


def time_steps(runs, repeats):
    """Median seconds of one step (loss and gradients, clipping, AdamW) for each of
    runs = {name: (params, config, trainable)}, the runs' steps alternating so all see the same load."""
    states = {name: optim.adamw_init(p, tr) for name, (p, c, tr) in runs.items()}
    times = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, (params, config, trainable) in runs.items():
            t0 = time.perf_counter()
            _, grads = model.loss_and_grads(params, config, batch, trainable)
            optim.clip_grad_norm(grads, 1.0)
            optim.adamw_step(params, grads, states[name], 1e-4)
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


B, T = 16, mc.context_length
rng = np.random.default_rng(0)
batch = {"x": rng.integers(0, mc.vocab_size, (B, T)), "y": rng.integers(0, mc.vocab_size, (B, T)),
         "mask": np.ones((B, T), np.float32)}
qkvo = TARGET_SETS["attention q,k,v,o"]
lora_params, lora_mc = lora.add_lora(base, mc, lora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=qkvo))
full_params = {n: p.copy() for n, p in base.items()}
seconds = time_steps({"full": (full_params, mc, set(full_params)),
                      "LoRA q,k,v,o": (lora_params, lora_mc, set(lora.lora_names(lora_params)))},
                     2 if FAST else 11)
compute = {}
for name, targets in (("full", None), ("LoRA q,k,v,o", qkvo)):
    fwd, bwd = step_flops(mc, B, T, targets)
    compute[name] = {"fwd": fwd, "bwd": bwd, "s": seconds[name], "gflops": (fwd + bwd) / seconds[name] / 1e9}
n = 512 if FAST else 1024
a = rng.standard_normal((n, n), dtype=np.float32)
gemm = []
for _ in range(10):
    t0 = time.perf_counter()
    a @ a
    gemm.append(time.perf_counter() - t0)
peak = 2 * n**3 / min(gemm) / 1e9
print(f"one step, B = {B}, T = {T} ({B * T:,} tokens), BLAS threads {blas_threads}, median of interleaved steps; "
      f"one {n}^3 matrix product: {peak:.1f} GFLOP/s")
for name, r in compute.items():
    total = r["fwd"] + r["bwd"]
    print(f"  {name:13s} forward {r['fwd'] / 1e9:5.2f} + backward {r['bwd'] / 1e9:5.2f} = {total / 1e9:5.2f} GFLOP "
          f"({total / 2e9:.2f} billion multiply-adds)   {1000 * r['s']:6.1f} ms   {r['gflops']:5.1f} GFLOP/s "
          f"({100 * r['gflops'] / peak:.0f}% of the product's rate)")
flop_ratio = sum(step_flops(mc, B, T, qkvo)) / sum(step_flops(mc, B, T))
time_ratio = compute["LoRA q,k,v,o"]["s"] / compute["full"]["s"]
print(f"LoRA / full: {flop_ratio:.2f} of the FLOPs, {time_ratio:.2f} of the time")
assert compute["full"]["bwd"] == 2 * compute["full"]["fwd"]
assert compute["LoRA q,k,v,o"]["bwd"] < compute["full"]["bwd"]
if not FAST:
    assert compute["full"]["fwd"] + compute["full"]["bwd"] > 1e9  # billions, even for this tiny model

# %% [markdown]
# Even our model of a few hundred thousand parameters takes billions of
# multiply-adds per step: FLOPs grow with parameters *times tokens*, and a step
# reads thousands of tokens. LoRA saves only the dW products (the printed ratio of
# FLOPs), because the forward and the backward through the frozen weights are still
# needed to reach the adapters. The time ratio follows it only roughly: the thin
# adapter products run further from the machine's peak, and on a shared machine one
# measurement moves with the load (on an idle one, `benchmarks/speed.json` records
# the ratio for this model as `lora_over_full`, and the README quotes it).
# LoRA's big savings are memory (tutorial 05), not compute.
#
# ## The same count at 7 billion parameters
#
# For a large model the linears dominate, and the count above collapses to the
# well-known rule: forward 2 N_params FLOPs per token, backward 4 N_params (full) or
# about 2 N_params (LoRA: dx only), so a step costs about **6 N_params x tokens**
# for full fine-tuning and about 4 N_params x tokens with LoRA. The cell below applies
# it to a 7-billion-parameter model (32 blocks of width 4096) on a batch of
# 16 sequences of 512 tokens (the post's batch sizes are 4 to 32), prints how much
# the attention term the rule leaves out would add, and divides by two rates: what
# our step achieved on this CPU (above), and a data-centre GPU at an assumed
# utilisation.

# %%
N_PARAMS, LAYERS, WIDTH = 7e9, 32, 4096
SEQ, SEQ_LEN = 16, 512
tokens = SEQ * SEQ_LEN
attention_share = (LAYERS * 4 * SEQ_LEN * WIDTH) / (2 * N_PARAMS)  # attention FLOPs / linear FLOPs, per token
GPU_PEAK, GPU_UTILISATION = 989e12, 0.4  # NVIDIA H100 SXM, dense BF16 (datasheet); an assumed 40% of it
cpu_rate = compute["full"]["gflops"] * 1e9
rates = {f"this CPU ({compute['full']['gflops']:.0f} GFLOP/s, measured above)": cpu_rate,
         f"one H100 GPU (assumed {GPU_UTILISATION:.0%} of {GPU_PEAK / 1e12:.0f} TFLOP/s)": GPU_PEAK * GPU_UTILISATION}
print(f"7B step: {SEQ} x {SEQ_LEN} = {tokens:,} tokens; the attention term the rule leaves out adds "
      f"{100 * attention_share:.1f}% more")
hours = {}
for method, per_token in (("full", 6), ("LoRA", 4)):
    flops = per_token * N_PARAMS * tokens
    for where, rate in rates.items():
        hours[method, where] = flops / rate / 3600
        print(f"  {method:4s} {flops:.2e} FLOP per step on {where}: {3600 * hours[method, where]:10,.1f} s per step, "
              f"{1 / hours[method, where]:9,.2f} steps per hour")
cpu, gpu = rates
print(f"1,000 full fine-tuning steps: {1000 * hours['full', cpu] / 24:,.0f} days on this CPU, "
      f"{1000 * hours['full', gpu]:.1f} hours on the GPU")
assert 1 / hours["full", cpu] < 10 < 1000 < 1 / hours["full", gpu]  # a few steps per hour against thousands

# %%
fig = Figure(figsize=(10, 4), layout="constrained")
ax = fig.add_subplot()
labels = [f"{m}, {w.split(' (')[0]}" for m, w in hours]
per_hour = [1 / h for h in hours.values()]
ax.barh(labels, per_hour, color=["C3", "C2", "C3", "C2"])
ax.set_xscale("log")
ax.set_xlim(min(per_hour) / 3, max(per_hour) * 10)
ax.set_xlabel(f"training steps per hour, 7B model, {tokens:,} tokens per step (log scale)")
for i, v in enumerate(per_hour):
    ax.annotate(f" {v:,.0f}" if v >= 10 else f" {v:.2g}", (v, i), va="center", fontsize=9)
ax.invert_yaxis()
ax.grid(True, axis="x", alpha=0.3)
ax.set_title(f"Why CPUs are not practical: 7B training steps per hour at 6 N (full) or 4 N (LoRA) FLOPs per "
             f"token,\nat this CPU's measured rate and at an assumed GPU rate{NOTE}", fontsize=10)
path = os.path.join(FIGURES, "07_flops_7b.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# The CPU that ran each of section 1's fine-tuning runs in the seconds printed
# there would need the printed thousands of seconds for *one* step of a 7B model,
# while the GPU runs thousands of steps in an hour. That, and no special ability, is why training happens on GPUs
# and TPUs: the count of multiply-adds is fixed by the model and the tokens, and only
# the rate can change. (The GPU line is an assumption, not a measurement: the peak
# is NVIDIA's datasheet figure for dense BF16, and real runs reach a fraction of it.)
#
# ## Exercises
#
# Solutions, [on their page](solutions/07_targets_format_and_compute_solutions.py), one
# section per exercise, each asserting its answer; run it like this file. Try each
# exercise before reading its solution.
#
# ### Exercise 7.1 (run and read): break the format your own way
#
# Before running anything, write down what you expect exact match and the loss on
# the correct answer to be when the Input header becomes `### Sentence`
# (instruction, sentence and answers unchanged). Add it to `FORMATS`, run section 2,
# and compare with your guess and with the renamed *response* header. Which header
# matters more: the one right before the answer, or the one before the sentence the
# answer is copied from?
#
# ### Exercise 7.2 (predict, then run): equal parameters instead of equal rank
#
# At r = 8 the MLP pair holds more adapter parameters than q, k, v, o. Derive the
# rank for fc, proj whose count, r (d + k) summed over the adapted matrices, comes
# closest to the attention count at r = 8, and the rank for all six likewise.
# Predict whether section 1's ranking changes at equal parameters, then train both
# (one seed, `STEPS` steps) and compare with section 1's attention row.
#
# ### Exercise 7.3 (change a hyperparameter): a learning rate for each target set
#
# The learning rate was tuned for q, k, v, o over 600 steps. Train each target set
# at 3e-3 and at 1e-2 for `STEPS` steps (one seed) and choose, for each, the rate
# with the lower validation response loss, on the validation records only. Does a
# learning rate per target set change which set comes first? Why must the test
# records stay out of this choice?
#
# ### Exercise 7.4 (derive, then check): when merging pays for itself
#
# Merging costs one product s B A per adapted matrix; an unmerged model pays
# 2 r (in + out) extra FLOPs per token and adapted matrix, on every forward. Derive
# the FLOPs of `lora.merge` for our model with the six targets, and the number of
# tokens after which merging has cost less than the unmerged forwards would. Check
# your merge count against `forward_flops`'s adapter term, and check `lora.merge`'s
# result against your own W + s B A.
#
# ### Exercise 7.5 (derive and implement): train on the formats users will type
#
# Section 2's rule says: if users will write prompts their own way, train on the
# variations. Write a batch source (an object with `sample(rng)` returning
# `{"x", "y", "mask"}`, like `tasks.RecordBatches`) that renders each training
# record with a format drawn at random from a training list (the format as trained
# and three of section 2's breaks), keeping the loss mask on the response tokens
# only. Continue the same `STEPS`-step start as section 2 for the same steps with it,
# then redo section 2's table, plus a break kept out of the training list. Predict
# first: which rows improve, and what happens to the held-out break?
