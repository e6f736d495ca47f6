# %% [markdown]
# # 04. Prompt tuning, the data format, and classification: solutions to the exercises
#
# Each section answers one exercise at the end of
# `tutorials/04_prompt_tuning_and_classification.py` and asserts the answer. The
# pretrained model comes from the shared place the tutorials use,
# `$MINILORA_RUNS/pretrain`. Exercise 4.4 fine-tunes for a few steps in fast mode and
# 300 in full mode; the claim that needs real training is asserted in full mode only.

# %%
import dataclasses
import os

import numpy as np

from minilora import corpus, model, tasks
from minilora.methods import lora
from minilora.evaluation import strided_val_loss
from minilora.finetune import FinetuneConfig, finetune, setup_strategy
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))

# %% [markdown]
# ## Exercise 4.1: what each strategy trains, by hand
#
# K = 3 classes; the head is W_cls (K, C) and b_cls (K,): K C + K numbers, trained
# under every strategy.
#
#     full     every parameter of the model + K C + K
#     lora     8 L r C (q, k, v, o, r = 8; exercise 3.1) + K C + K
#     prompt   P C (P = 16) + K C + K
#
# For the full-mode model (C = 128, L = 2): head 387, LoRA 16,384 + 387 = 16,771,
# prompt 2,048 + 387 = 2,435.

# %%
K, C, L, P, r = len(tasks.CLASS_NAMES), mc.d_model, mc.n_layers, 16, 8
head = K * C + K
by_hand = {"full": model.count_params(base) + head, "lora": 8 * L * r * C + head, "prompt": P * C + head}
for method, expected in by_hand.items():
    cfg = FinetuneConfig(method=method, task="kind", lora=lora.LoraConfig(rank=r, alpha=2.0 * r), n_prompt=P)
    params, _, trainable = setup_strategy(base, mc, tok, cfg, n_classes=K)
    counted = model.count_params(params, trainable)
    print(f"{method:6s} by hand {expected:>9,}   counted {counted:>9,}")
    assert counted == expected
if not FAST:
    assert (by_hand["lora"], by_hand["prompt"]) == (16_771, 2_435)

# %% [markdown]
# ## Exercise 4.2: which targets the loss counts
#
# A record becomes the tokens of prompt + output + end, of length n_tok; the row has
# n_tok - 1 (input, target) pairs. By default only the response is counted: the output
# and its end marker, len(output) + 1 targets. With `train_on_prompt=True` every real
# target counts, n_tok - 1 (the first token is never a target: nothing predicts it).
# Padding is never counted. The end marker "~" instead of "\n" changes which
# character is counted last, not how many.

# %%
records, _ = tasks.task_splits("subject", 4, 0, seed=0)
for train_on_prompt in (False, True):
    for end in ("\n", "~"):
        _, y, mask = tasks.instruction_batch(records, tok, mc.context_length, train_on_prompt, end)
        for b, rec in enumerate(records):
            n_tok = len(tasks.format_prompt(rec["instruction"], rec["input"]) + rec["output"] + end)
            expected = n_tok - 1 if train_on_prompt else len(rec["output"]) + 1
            assert mask[b].sum() == expected, (train_on_prompt, end, b)
            assert tok.decode(y[b][mask[b] == 1]).endswith(rec["output"] + end)
        print(f"train_on_prompt={train_on_prompt!s:5s} end={end!r:5s} counted targets per row: {mask.sum(1)}")

# %% [markdown]
# ## Exercise 4.3: the batch gradient is not the mean of per-example gradients
#
# The loss divides by the number of counted tokens of the whole batch, M = sum_b M_b:
#
#     L = sum_b sum_t m_bt l_bt / M = sum_b (M_b / M) L_b,   L_b = sum_t m_bt l_bt / M_b
#
# so dL = sum_b (M_b / M) dL_b: **a weighted mean, each example weighted by its
# counted tokens**. It equals the plain mean only when every M_b is the same. Checked
# on the soft prompt in float64 (one parameter, the shared P vectors).

# %%
prompted = model.params_to({**base, "prompt": base["wte"][:4].copy()}, np, dtype=np.float64)
records, _ = tasks.task_splits("subject", 6, 0, seed=3)
x, y, mask = tasks.instruction_batch(records, tok, mc.context_length)
counts = mask.sum(1).astype(np.float64)
print("counted tokens per example:", counts)
assert len(set(counts)) > 1  # different lengths, or the two means would coincide
mask64 = mask.astype(np.float64)
_, g_batch = model.loss_and_grads(prompted, mc, {"x": x, "y": y, "mask": mask64}, {"prompt"})
per_example = [model.loss_and_grads(prompted, mc, {"x": x[b:b + 1], "y": y[b:b + 1], "mask": mask64[b:b + 1]},
                                    {"prompt"})[1]["prompt"] for b in range(len(records))]
weighted = sum(c * g for c, g in zip(counts, per_example)) / counts.sum()
plain = sum(per_example) / len(per_example)
err_w = np.abs(weighted - g_batch["prompt"]).max() / np.abs(g_batch["prompt"]).max()
err_p = np.abs(plain - g_batch["prompt"]).max() / np.abs(g_batch["prompt"]).max()
print(f"relative difference from the batch gradient: weighted mean {err_w:.1e}, plain mean {err_p:.1e}")
assert err_w < 1e-10 and err_p > 1e-3

# %% [markdown]
# ## Exercise 4.4: forgetting, with W bitwise unchanged
#
# Train LoRA on "kind" (classification). Three ways to measure the corpus loss after:
#
# - **adapters attached**: the model the task was trained with. Its next-token
#   predictions go through W + s B A, and nothing in a classification loss (which
#   reads cls.W, never the LM head) holds them in place, so they drift: forgetting.
# - **adapters detached** (drop lora_A / lora_B, config.lora = None): this is the
#   pretrained model, bit for bit, so its loss equals the loss before exactly.
# - **merged** (`lora.merge`): the same function as attached, so the same loss up to
#   float32 rounding.
#
# "Forgetting" under LoRA is a property of the adapted model, undone by detaching.

# %%
_, val_text = corpus.train_val_text(0, 50 if FAST else 200, seed=PretrainConfig().data_seed)
val_data = tok.encode(val_text)
steps = 4 if FAST else 300
config = FinetuneConfig(method="lora", task="kind", n_train=64 if FAST else 2000, n_test=16 if FAST else 300)
config.train.steps, config.train.warmup_steps, config.train.eval_every = steps, 1 if FAST else 20, steps
params, ft_config, _, summary = finetune(base, mc, tok, config, None, val_data)
before = strided_val_loss(base, mc, val_data)
attached = strided_val_loss(params, ft_config, val_data)
names = set(lora.lora_names(params))
detached = strided_val_loss({n: a for n, a in params.items() if n not in names},
                            dataclasses.replace(ft_config, lora=None), val_data)
merged_params, merged_config = lora.merge(params, ft_config)
merged = strided_val_loss(merged_params, merged_config, val_data)
print(f"accuracy {summary['metric_before']:.3f} -> {summary['metric']:.3f}")
print(f"corpus loss: before {before:.4f}, attached {attached:.4f}, detached {detached:.4f}, merged {merged:.4f}")
assert detached == before  # exactly: the pretrained weights were never written
assert abs(merged - attached) < 1e-3
assert attached != before  # a few steps already move the predictions
if not FAST:
    assert summary["metric"] > summary["metric_before"]
    assert attached > before + 0.1  # the adapted model forgets, though W never changed
