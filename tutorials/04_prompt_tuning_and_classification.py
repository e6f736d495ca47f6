# %% [markdown]
# # 04. Prompt tuning, the data format, and classification
#
# The third strategy updates **no weight at all**. Prompt tuning puts P trainable
# vectors, a *soft prompt*, before the embedded input and trains only them; the
# whole pretrained model stays frozen. It is the most parameter-efficient strategy
# (P x C numbers) but can only steer the model through its input, so it tends to
# underperform on tasks that need deeper adaptation.
#
# This tutorial also covers how fine-tuning data is formatted (and which tokens the
# loss counts), and the discriminative case: a classification head on the last
# token, trained under all three strategies.
#
# **This tutorial fine-tunes tutorial 02's pretrained model**, saved in `runs/pretrain`
# (shared by tutorials 03 to 11). Run tutorial 02 first; if the model is missing, the
# first code cell pretrains it there and says so (67 s with 2 threads in
# `benchmarks/results.json`, the demo's pretraining on this config).

# %%
import os

import numpy as np

from minilora import corpus, gradcheck, model, plot, tasks
from minilora.methods import prompt
from minilora.finetune import FinetuneConfig, finetune
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
# fast mode is a smoke test: its figures go to figures/fast/, never over the committed ones
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join("figures", "fast") if FAST else "figures")
NOTE = "\n[fast mode: a smoke test, not a result]" if FAST else ""  # in every figure title
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)


base, mc, pretrained_now, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(),
                                            os.path.join(RUNS, "pretrain"))
print(f"tutorial 02's model was missing: pretrained it now in {pretrained_now['wall_s']:.0f} s" if pretrained_now
      else f"loaded tutorial 02's model from {os.path.join(RUNS, 'pretrain')}")
base_copy = {n: a.copy() for n, a in base.items()}

# %% [markdown]
# ## Soft prompts
#
# The prompt is one parameter, `prompt` of shape (P, C). `model.forward` builds
#
# $$x = [\text{prompt}_1, \dots, \text{prompt}_P,\ \text{wte}[\text{id}_1] + \text{wpe}[0], \dots, \text{wte}[\text{id}_T] + \text{wpe}[T-1]]$$
#
# Positions (see `minilora/methods/prompt.py`): the prompt vectors get **no** position
# embedding (they are free vectors and can learn any position signal), and the real
# tokens keep positions 0..T-1, exactly as in pretraining. The prompt's own output
# states are dropped before the head, so the output still has T rows and the loss
# never counts a virtual position.
#
# Backward: the P vectors are shared by every row of the batch, so their gradient is
# the gradient arriving at the first P positions, summed over the batch. The cell
# below checks the output shape, that the gradient dict holds only `prompt`, and the
# gradient itself against finite differences (float64, tiny model).

# %%
P = 4
prompted = prompt.add_prompt(base, P, init="vocab", seed=0)
ids = tok.encode("the red cat chases two mice.")[None, :]
h, _ = model.forward(prompted, mc, ids)
print(f"prompt {prompted['prompt'].shape}, input {ids.shape} -> hidden states {h.shape}")
assert h.shape == (1, ids.shape[1], mc.d_model)
_, grads = model.loss_and_grads(prompted, mc, {"x": ids[:, :-1], "y": ids[:, 1:]}, {"prompt"})
print("gradients computed:", sorted(grads))
assert set(grads) == {"prompt"}

cfg, tiny = gradcheck.tiny_model(rng)
tiny_prompted = prompt.add_prompt(tiny, 3, init="random", seed=1)
tiny_prompted["prompt"] = 0.5 * rng.standard_normal(tiny_prompted["prompt"].shape)
xt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
yt = rng.integers(0, cfg.vocab_size, (3, cfg.context_length))
res = gradcheck.check_model("prompt", lambda p, tr: model.loss_and_grads(p, cfg, {"x": xt, "y": yt}, tr),
                            tiny_prompted, {"prompt"}, rng)
print(f"d loss / d prompt: rel error {res[0].error:.1e}")
assert res[0].passed

# %% [markdown]
# ## Data format
#
# Fine-tuning needs structured prompt-response pairs, formatted the same way every
# time: the model learns the format as part of the task. For instructions
# (`tasks.format_prompt`):
#
#     ### Instruction
#     <task description>
#
#     ### Input
#     <example input>
#
#     ### Response
#     <expected output>
#
# followed by a newline, so the model learns to stop. The cell below prints one
# record of the "subject" task as a JSON-lines record and as the text the model
# reads.

# %%
records, _ = tasks.task_splits("subject", 4, 0, seed=0)
record = records[0]
print(record)
print("-" * 40)
print(tasks.format_prompt(record["instruction"], record["input"]) + record["output"])
print("-" * 40)

# %% [markdown]
# ## The loss mask: only the response counts
#
# `tasks.instruction_batch` returns inputs x, next-token targets y and a mask that is
# 1 only where the target is a response token (the output and its newline). The
# prompt is context, not something to imitate; padding is masked too. The loss is
#
# $$L = -\frac{\sum_t m_t \log p(y_t \mid x_{\le t})}{\sum_t m_t}.$$
#
# The cell below decodes the targets the mask selects, and asserts they are exactly
# the response.

# %%
x, y, mask = tasks.instruction_batch(records, tok, mc.context_length)
print(f"x, y, mask: {x.shape}; counted targets per row: {mask.sum(axis=1)}")
for b in range(len(records)):
    counted = tok.decode(y[b][mask[b] == 1])
    print(f"row {b}: counted targets = {counted!r}")
    assert counted == records[b]["output"] + "\n"
row = "".join("^" if m else " " for m in mask[0])
text = tok.decode(y[0]).replace("\n", "/")
print("targets of row 0 ('/' is a newline) and the mask (^):")
print(text[-40:])
print(row[-40:])

# %% [markdown]
# ## Classification: a head on the last token
#
# For a discriminative task the output is a label, and the loss is cross-entropy
# over the K classes. The "kind" task labels each sentence by its subject: animal,
# person or thing. A causal model has read the whole sentence only at its **last**
# character, so the head reads the hidden state there:
#
# $$\text{logits}_b = h[b, \text{last}_b]\, W_\text{cls}^\top + b_\text{cls}, \qquad W_\text{cls}\ (K, C),\ b_\text{cls}\ (K,)$$
#
# Rows are right-padded to a common length; `last` points at each row's last real
# token. Because attention is causal, padding after `last` cannot change h there. The
# cell below asserts that a row's logits are identical alone and inside a padded
# batch.

# %%
cls_records, _ = tasks.task_splits("kind", 4, 0, seed=1)
with_head = model.add_head(base, len(tasks.CLASS_NAMES), seed=0)
xc, last, labels = tasks.classification_batch(cls_records, tok, mc.context_length)
print(cls_records[0], "-> label id", labels[0], "last index", last[0], "of padded length", xc.shape[1])
logits_batch = model.class_logits(with_head, mc, xc, last)
short = int(np.argmin(last))
alone = xc[short:short + 1, : last[short] + 1]
logits_alone = model.class_logits(with_head, mc, alone, last[short:short + 1])
print(f"row {short}: padded {np.asarray(logits_batch[short]).round(5)}, alone {np.asarray(logits_alone[0]).round(5)}")
assert np.allclose(logits_batch[short], logits_alone[0], atol=1e-6)

# %% [markdown]
# The head is trainable under every strategy (it is new: the pretrained model has no
# classes). The cell below checks the classifier's gradients, for the soft prompt
# and the head together, against finite differences.

# %%
tiny_cls = model.add_head(tiny_prompted, 3, seed=2)
tiny_cls["cls.b"] = 0.4 * rng.standard_normal(3)
last_t = rng.integers(1, cfg.context_length, 3)
labels_t = rng.integers(0, 3, 3)
res = gradcheck.check_model(
    "prompt + head", lambda p, tr: model.loss_and_grads(p, cfg, {"x": xt, "last": last_t, "labels": labels_t}, tr),
    tiny_cls, {"prompt", "cls.W", "cls.b"}, rng)
for r_ in res:
    print(f"d loss / d {r_.argument:7s} rel error {r_.error:.1e}")
    assert r_.passed

# %% [markdown]
# ## Three strategies on classification
#
# Same task, same steps, same loop; only the trainable names differ:
#
#     full     every weight + head
#     lora     adapters on q, k, v, o + head
#     prompt   16 soft-prompt vectors + head
#
# Each run reports held-out accuracy before (a random head: about chance, 1/3) and
# after, and the pretraining-corpus loss before and after (forgetting). With LoRA
# and prompt tuning the shared weights are bitwise unchanged: the corpus loss then
# measures how the adapted model's next-token predictions drift, and a
# classification objective (which never reads the LM head) does not constrain them.
#
# **What the full run gives.** In full mode (600 steps on 2,000 examples, the
# committed figure `figures/04_classification_comparison.png`) full fine-tuning and
# LoRA reach a held-out accuracy of 1.000 and prompt tuning 0.513, with a forgetting
# of +4.291, +3.522 and +0.601 nats per token. **In fast mode** (4 steps on a tiny
# model and data) all three print the same accuracy before and after: the head has
# not moved yet, and nothing about the strategies can be read from it.

# %%
_, val_text = corpus.train_val_text(0, 50 if FAST else 200, seed=PretrainConfig().data_seed)
val_data = tok.encode(val_text)
steps = 4 if FAST else 600
rows, logs = [], {}
for method in ("full", "lora", "prompt"):
    config = FinetuneConfig(method=method, task="kind", n_train=64 if FAST else 2000, n_test=16 if FAST else 300)
    config.train.steps = steps
    config.train.warmup_steps = 1 if FAST else 20
    config.train.eval_every = steps
    run_dir = os.path.join(RUNS, f"04-finetune-kind-{method}")
    *_, summary = finetune(base, mc, tok, config, run_dir, val_data)
    rows.append(summary)
    logs[method] = plot.read_log(os.path.join(run_dir, "log.jsonl"))
    print(f"[{method}] accuracy {summary['metric_before']:.3f} -> {summary['metric']:.3f}; "
          f"corpus loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}; "
          f"{summary['trainable_params']:,} trainable; {summary['wall_s']:.0f} s")
by = {r["method"]: r for r in rows}
assert by["prompt"]["trainable_params"] < by["lora"]["trainable_params"] < by["full"]["trainable_params"]
for name in base:
    assert np.array_equal(base[name], base_copy[name])  # no strategy wrote into the pretrained W
if not FAST:
    assert all(r["metric"] > r["metric_before"] for r in rows)
    # the post: prompt tuning "tends to underperform on tasks that require deeper adaptation"
    assert by["prompt"]["metric"] <= by["full"]["metric"]

# %% [markdown]
# The cell above printed each strategy's forgetting. Whatever LoRA and prompt tuning
# change, they change only while their extra parameters are attached: the pretrained
# W is bit-identical after all three runs (asserted above; full fine-tuning trained
# a copy), so detaching the adapters or the prompt gives back the pretrained model
# exactly. Full fine-tuning has no such undo: its new weights are the model.
#
# ## Figures

# %%
fig = plot.plot_comparison(
    rows, metric_label="accuracy, held-out (chance = 1/3)",
    title="Classification ('kind', last-token head): what is trained, how well, what is forgotten" + NOTE)
path = os.path.join(FIGURES, "04_classification_comparison.png")
plot.save_figure(fig, path)
print("wrote", path)
fig = plot.plot_loss_curves(logs, smooth=0.8, ylabel="loss (nats per example)",
                            title="Classification loss (cross-entropy over 3 classes) per step" + NOTE)
fig.axes[0].axhline(np.log(3), color="0.5", linestyle=":", label="ln 3 (chance)")
fig.axes[0].legend(fontsize=8)
path = os.path.join(FIGURES, "04_classification_loss.png")
plot.save_figure(fig, path)
print("wrote", path)

# %% [markdown]
# ## Exercises
#
# From "run and read" to "derive and implement". Each says what to write, what to
# predict **before** running, and how to check. The solutions, which run and assert
# their answers, are on [their page](solutions/04_prompt_tuning_and_classification_solutions.py).
#
# ### Exercise 4.1 (compute by hand): what each strategy trains
#
# On "kind" (K = 3 classes), write on paper the trainable count of full fine-tuning,
# LoRA (r = 8 on q, k, v, o) and prompt tuning (P = 16), each with its head, for this
# tutorial's model (C = 128, L = 2 in full mode). Then check each against
# `model.count_params(params, trainable)` with `params, _, trainable =
# finetune.setup_strategy(base, mc, tok, FinetuneConfig(method=..., task="kind", ...),
# n_classes=3)`. Which strategy's count does the head dominate?
#
# ### Exercise 4.2 (run and read): which targets the loss counts
#
# For four "subject" records, predict the number of counted targets per row of
# `tasks.instruction_batch(records, tok, mc.context_length, train_on_prompt, end)` in
# the four cases train_on_prompt in {False, True} and end in {"\n", "~"}, as a formula
# in len(output) and the length of the formatted text. Check with `mask.sum(1)`. Why is
# the first token of a row never a target?
#
# ### Exercise 4.3 (derive, then check): the batch gradient
#
# The loss divides by the number of counted tokens in the whole batch. Derive how the
# gradient of a batch relates to the gradients of its examples taken one at a time
# (each a batch of one row). Is it their mean? Check on the soft prompt, in float64
# (`model.params_to(prompted, np, dtype=np.float64)`), with six "subject" records of
# different output lengths: compare the batch gradient with the plain mean of the six
# per-example gradients, and with the mean weighted as you derived.
#
# ### Exercise 4.4 (predict, then check): forgetting with W unchanged
#
# Fine-tune LoRA on "kind" for 300 steps (`finetune(base, mc, tok, config, None,
# val_data)`). Predict the corpus loss (`strided_val_loss`) of three models against
# the loss before: (a) the fine-tuned model, adapters attached; (b) the same
# parameters with the adapters dropped (`lora_A` and `lora_B` removed, and
# `dataclasses.replace(config, lora=None)`); (c) the merged model (`lora.merge`).
# Which of them can differ from the pretrained model's loss, and which must equal it
# exactly? How can a method that never writes W "forget"?
