# %% [markdown]
# # 05. Hyperparameters and hardware: solutions to the exercises
#
# Each section answers one exercise at the end of
# `tutorials/05_hyperparameters_and_hardware.py` and asserts the answer. The
# pretrained model comes from the shared place the tutorials use,
# `$MINILORA_RUNS/pretrain`. Only exercise 5.3 trains (two LoRA runs of 200 steps in
# full mode, 3 in fast mode); its overfitting claim is asserted in full mode only.

# %%
import os

import numpy as np

from minilora import model, ops, optim, tasks
from minilora.methods import lora
from minilora.finetune import FinetuneConfig, finetune
from minilora.pretrain import PretrainConfig, load_or_pretrain
from minilora.methods.prompt import add_prompt
from minilora.backend import limit_blas_threads

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))
C, F, L, V = mc.d_model, mc.d_ff, mc.n_layers, mc.vocab_size

# %% [markdown]
# ## Exercise 5.1: optimizer state, by hand
#
# AdamW keeps m and v for each trainable number: 2 x 4 = 8 bytes each in float32.
#
#     full           8 x every parameter (425,216 in full mode: 3,401,728 bytes)
#     LoRA r = 8     8 x 8 L r C = 8 x 16,384 = 131,072 bytes
#     prompt P = 16  8 x P C = 8 x 2,048 = 16,384 bytes
#
# At 7B (the tutorial's recipe: 2-byte weights, then 2 + 4 + 8 = 14 bytes per
# trainable number for its gradient, fp32 master copy and moments), LoRA r = 64 on
# q, k, v, o of 32 blocks trains 32 x 4 x 64 x 8192 = 67,108,864 numbers:
# 14 GB + 14 x 67.1 M = 14.94 GB before activations, still far under 80 GB. The rank
# barely matters at that scale: the frozen 2-byte weights dominate.

# %%
lora_params, _ = lora.add_lora(base, mc, lora.LoraConfig(rank=8))
strategies = {  # name: (params, trainable names, trainable count by hand)
    "full": (base, set(base), model.count_params(base)),
    "lora r=8": (lora_params, set(lora.lora_names(lora_params)), 8 * L * 8 * C),
    "prompt P=16": (add_prompt(base, 16), {"prompt"}, 16 * C),
}
for name, (params, trainable, n_by_hand) in strategies.items():
    measured = optim.optimizer_state_bytes(optim.adamw_init(params, trainable))
    print(f"{name:12s} AdamW state by hand {8 * n_by_hand:>10,} B   measured {measured:>10,} B")
    assert measured == 8 * n_by_hand
if not FAST:
    assert model.count_params(base) == 425_216
n_lora_7b = 32 * 4 * lora.lora_param_count(4096, 4096, 64)
gb = (2 * 7_000_000_000 + 14 * n_lora_7b) / 1e9
print(f"7B, LoRA r = 64 on q, k, v, o: {n_lora_7b:,} trainable, {gb:.2f} GB before activations")
assert n_lora_7b == 67_108_864 and abs(gb - 14.94) < 0.01

# %% [markdown]
# ## Exercise 5.2: activations against batch and length
#
# Every cached array of the forward has a batch axis, so activations are
# proportional to B: doubling B should double them **exactly**. Per sequence, most
# caches are (T, C) or (T, F) (linear in T), but attention caches the scores and
# probabilities, (NH, T, T) per layer: quadratic. So act(B, T) = B (a T + b T^2), and
# doubling T multiplies it by between 2 and 4.
#
# With `cache_bytes(cache)` and an empty `seen` the B ratio is a little **under** 2: the caches
# also hold the weight matrices (`linear_forward` keeps W for dx = dout W, layer norm
# keeps g), which do not grow with B, so its "activations" count about 1.5 MiB of
# parameters twice. Seeding `seen` with the parameters' ids removes them, and then
# the ratio is exactly 2 and the a T + b T^2 fit predicts a third length to the byte.

# %%
def cache_bytes(obj, seen=None):
    """The tutorial's: bytes of the distinct arrays inside a nested cache of tuples and lists."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        root = obj if obj.base is None else obj.base
        if id(root) in seen:
            return 0
        seen.add(id(root))
        return root.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(cache_bytes(o, seen) for o in obj)
    return 0


def activations(B, T, exclude_params):
    ids = np.random.default_rng(0).integers(0, V, (B, T))
    _, cache = model.forward(base, mc, ids)
    seen = {id(a if a.base is None else a.base) for a in base.values()} if exclude_params else None
    return cache_bytes(cache, seen)


B0, T0 = (2, 16) if FAST else (8, 32)
with_weights = activations(2 * B0, T0, False) / activations(B0, T0, False)
act = {(B, T): activations(B, T, True) for B, T in ((B0, T0), (2 * B0, T0), (B0, 2 * T0), (B0, 4 * T0))}
ratio_B = act[(2 * B0, T0)] / act[(B0, T0)]
ratio_T = act[(B0, 2 * T0)] / act[(B0, T0)]
print(f"doubling B: x{with_weights:.4f} (tutorial's count, weights included), x{ratio_B:.4f} (weights excluded)")
print(f"doubling T: x{ratio_T:.4f}")
assert with_weights < 2.0 and ratio_B == 2.0 and 2.0 < ratio_T < 4.0
weights_in_caches = activations(B0, T0, False) - act[(B0, T0)]
print(f"weights inside the caches: {weights_in_caches / 2**20:.2f} MiB, the same at any batch "
      f"(all parameters: {4 * model.count_params(base) / 2**20:.2f} MiB)")
assert 0 < weights_in_caches == activations(2 * B0, T0, False) - act[(2 * B0, T0)] <= 4 * model.count_params(base)
# fit act / B = a T + b T^2 on T0 and 2 T0, predict 4 T0 exactly
Ts = np.array([T0, 2 * T0], dtype=np.float64)
a, b = np.linalg.solve(np.stack([Ts, Ts ** 2], 1), np.array([act[(B0, T0)], act[(B0, 2 * T0)]]) / B0)
predicted = B0 * (a * 4 * T0 + b * (4 * T0) ** 2)
print(f"act / B = {a:.0f} T + {b:.0f} T^2 bytes; predicted at T = {4 * T0}: {predicted:,.0f}, "
      f"measured {act[(B0, 4 * T0)]:,}")
assert abs(predicted - act[(B0, 4 * T0)]) < 1.0
# b, bytes per T^2 per sequence: attention caches one float32 (T, T) array per head
# per layer, the probabilities P (the scores S are not kept: softmax's backward needs only P)
print(f"b / (4 NH L) = {b / (4 * mc.n_heads * L):.2f} float32 (T, T) arrays per head per layer")
assert round(b) == 4 * mc.n_heads * L

# %% [markdown]
# ## Exercise 5.3: epochs and overfitting
#
# Same steps (200), same batch (16), two training sets: 16 records (200 epochs, every
# batch is the whole set) and 2000 (1.6 epochs). Prediction: on 16 records the
# training loss goes to nearly 0 (memorised) while the held-out loss stays high; on
# 2000 the two stay close. The measure is the generalisation gap, held-out loss minus
# training loss, both on response tokens.

# %%
def response_loss(params, cfg, records):
    x, y, mask = tasks.instruction_batch(records, tok, mc.context_length)
    return model.loss_and_grads(params, cfg, {"x": x, "y": y, "mask": mask})[0]


steps, n_test = (3, 8) if FAST else (200, 50)
gaps = {}
for n_train in ((16, 64) if FAST else (16, 2000)):
    # finetune scores exact match on its n_test records by decoding, slow for a model that
    # never stops; one is enough, the held-out loss below reads n_test records of the
    # same held-out stream (task_splits draws the training records first, whatever n_test)
    config = FinetuneConfig(method="lora", task="subject", n_train=n_train, n_test=1)
    config.train.steps, config.train.warmup_steps, config.train.eval_every = steps, 1 if FAST else 10, steps
    params, ft_config, _, summary = finetune(base, mc, tok, config, None, None)
    train_records, test_records = tasks.task_splits("subject", n_train, n_test, seed=config.seed)
    train_loss = response_loss(params, ft_config, train_records[:200])
    test_loss = response_loss(params, ft_config, test_records)
    gaps[n_train] = test_loss - train_loss
    epochs = steps * config.train.batch_size / n_train
    print(f"n_train {n_train:5d} ({epochs:6.1f} epochs): train loss {train_loss:.4f}, held-out {test_loss:.4f}, "
          f"gap {gaps[n_train]:+.4f}")
    assert np.isfinite(train_loss) and np.isfinite(test_loss)
if not FAST:
    assert gaps[16] > 1.0 > 0.2 > gaps[2000]  # memorised 16 records; 2000 generalise

# %% [markdown]
# ## Exercise 5.4: the FLOPs of a training step
#
# A linear (N, in) -> (N, out) costs 2 N in out FLOPs forward (a multiply and an add
# per weight per token). Backward: dx = dout W costs the same again, and dW = dout^T x
# the same once more, **only when W is trained**. Per token, over the model's linears
# (N = B T tokens):
#
#     forward  F = 2 N (L (4 C^2 + 2 C F) + C V)      q, k, v, o, fc, proj, and the tied head
#     full     backward 2F   (dx and dW everywhere):    step 3F, the "6 N_params" rule
#     LoRA     backward F    (dx only; no dW, ever)     step 2F + the adapters'
#
# less one detail the count will show: under LoRA nothing below block 0's q, k, v is
# trained (the embeddings are frozen), so their dx is never needed, and the model
# skips it (PyTorch skips it too: no tensor below requires a gradient).
#
# The adapters add 2 N r (in + out) per adapted matrix forward and twice that
# backward: 3 x 2 N r 2C x 4 L in all. The attention products (q k^T and P v, about
# 4 N T C per layer) are not linears and are not counted here. The check instruments
# `ops.linear_forward` and `ops.linear_backward`, as tutorial 03 does.

# %%
calls = []
original_forward, original_backward = ops.linear_forward, ops.linear_backward


def counting_forward(x, W, b=None, **options):
    calls.append(("forward", 2 * (x.size // x.shape[-1]) * W.shape[0] * W.shape[1]))
    return original_forward(x, W, b, **options)


def counting_backward(dout, cache, param_grads=True, input_grad=True):
    W = cache[1]
    n_tokens = dout.size // dout.shape[-1]
    products = int(input_grad) + int(param_grads)  # dx = dout W, and dW = dout^T x when W is trained
    calls.append(("backward", products * 2 * n_tokens * W.shape[0] * W.shape[1]))
    return original_backward(dout, cache, param_grads, input_grad)


B, T, r = (2, 16, 4) if FAST else (16, 128, 8)
ids = np.random.default_rng(0).integers(0, V, (B, T + 1))
lm_batch = {"x": ids[:, :-1], "y": ids[:, 1:]}
adapted, amc = lora.add_lora(base, mc, lora.LoraConfig(rank=r, alpha=2.0 * r), seed=0)
flops = {}
ops.linear_forward, ops.linear_backward = counting_forward, counting_backward
try:
    for name, (params, cfg, trainable) in {"full": (base, mc, set(base)),
                                           "lora": (adapted, amc, set(lora.lora_names(adapted)))}.items():
        calls.clear()
        model.loss_and_grads(params, cfg, lm_batch, trainable)
        flops[name] = {k: sum(f for kind, f in calls if kind == k) for k in ("forward", "backward")}
finally:
    ops.linear_forward, ops.linear_backward = original_forward, original_backward
N = B * T
F_blocks = 2 * N * L * (4 * C * C + 2 * C * F)  # the blocks' linears: these go through ops.linear_forward
# the tied head runs inside ops.tied_head_cross_entropy_forward (in chunks of tokens), which the counters do not
# see: its 2 N C V are added by hand (its dx is in both backwards, its dW in full's only)
F_hand = F_blocks + 2 * N * C * V
adapter_flops = 3 * 2 * N * r * (2 * C) * 4 * L
for name, f in flops.items():
    print(f"{name:4s} linear FLOPs: forward {f['forward']:,}  backward {f['backward']:,}  "
          f"ratio {f['backward'] / f['forward']:.2f}")
assert flops["full"]["forward"] == flops["lora"]["forward"] == F_blocks
# LoRA's backward is F less one thing: nothing below block 0's q, k, v is trained (the
# embeddings are frozen), so the model never computes their dx (nor ln_1's backward)
block0_qkv_dx = 3 * 2 * N * C * C
assert flops["full"]["backward"] == 2 * F_blocks and flops["lora"]["backward"] == F_blocks - block0_qkv_dx
step_ratio = (2 * F_hand - block0_qkv_dx + adapter_flops) / (3 * F_hand)
print(f"a LoRA step costs {step_ratio:.2f} of a full step in linear FLOPs (adapters included)")
assert 0.6 < step_ratio < 0.8  # about two thirds: LoRA saves the dW third of the linears, pays its adapters
