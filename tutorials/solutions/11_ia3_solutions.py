# %% [markdown]
# # 11. IA3, by hand: solutions to the exercises
#
# Each section answers one exercise at the end of `tutorials/11_ia3.py` and asserts
# the answer. The pretrained model comes from the shared place the tutorials use,
# `$MINILORA_RUNS/pretrain`. Nothing here trains, so fast and full mode differ only
# in the model's size.

# %%
import os
from dataclasses import replace

import numpy as np

from minilora import model
from minilora.backend import limit_blas_threads
from minilora.methods import ia3, lora
from minilora.pretrain import PretrainConfig, load_or_pretrain

limit_blas_threads()  # 1 BLAS thread, as the minilora command runs (MINILORA_THREADS=2 on an idle machine)

FAST = os.environ.get("MINILORA_FAST") == "1"
RUNS = os.environ.get("MINILORA_RUNS", "runs")
rng = np.random.default_rng(0)
base, mc, _, tok = load_or_pretrain(PretrainConfig.fast() if FAST else PretrainConfig(), os.path.join(RUNS, "pretrain"))
ids = tok.encode("the red cat chases two mice.\nmy dog ")[None, :]


def trained_ia3(params, config, seed=0):
    """params with IA3 vectors away from ones, as after training."""
    scaled, scaled_config = ia3.add_ia3(params, config)
    r = np.random.default_rng(seed)
    for n in lora.adapter_names(scaled_config):
        scaled[n] = (1.0 + 0.3 * r.standard_normal(scaled[n].shape)).astype(scaled[n].dtype)
    return scaled, scaled_config


# %% [markdown]
# ## Exercise 11.1: IA3 at 7B
#
# - IA3: L (2C + F) = 32 x (2 x 4096 + 11008) = 32 x 19,200 = **614,400** numbers.
# - LoRA, r = 8 on q and v (both 4096 x 4096): 2 L r (C + C) = 2 x 32 x 8 x 8192 = **4,194,304**.
# - AdamW: 8 bytes per trained number, **4,915,200** and **33,554,432** bytes (4.7 MiB and 32 MiB).
#
# IA3 trains 6.8 times fewer numbers than even this small LoRA. On the tutorial's model
# the count is L (2C + F) too.

# %%
C, F, L = 4096, 11008, 32
n_ia3, n_lora = L * (2 * C + F), 2 * L * 8 * (C + C)
print(f"7B: IA3 {n_ia3:,} ({8 * n_ia3:,} B of AdamW state), LoRA r=8 on q, v {n_lora:,} ({8 * n_lora:,} B); "
      f"{n_lora / n_ia3:.1f}x")
assert (n_ia3, n_lora, 8 * n_ia3, 8 * n_lora) == (614_400, 4_194_304, 4_915_200, 33_554_432)
scaled, smc = ia3.add_ia3(base, mc)
counted = model.count_params(scaled, lora.adapter_names(smc))
print(f"the tutorial's model: counted {counted:,} = L (2C + F) = {mc.n_layers * (2 * mc.d_model + mc.d_ff):,}")
assert counted == mc.n_layers * (2 * mc.d_model + mc.d_ff)

# %% [markdown]
# ## Exercise 11.2: the bias in the merge
#
# The scaled value is l_v * (a W_v^T + b_v) = a (diag(l_v) W_v)^T + l_v * b_v. A merge that
# scales only the rows of W_v keeps b_v where l_v * b_v belongs, so every value is off by
# (1 - l_v) * b_v, and the logits with it, by an amount that grows with b_v and with how far
# l_v moved from 1. The key needs no such care here: this model's key has no bias (it would
# not change the softmax), and in GPT-2, where it has one, the key bias is scaled as well.
# In float64, so that the right merge agrees to round-off and the wrong one stands out:

# %%
base64 = model.params_to(base, np, np.float64)
scaled64, smc64 = trained_ia3(base64, mc)
right, right_config = ia3.merge(scaled64, smc64)
wrong = dict(right)
for i in range(mc.n_layers):
    wrong[f"h.{i}.attn.v.b"] = scaled64[f"h.{i}.attn.v.b"]  # the bias left unscaled
reference = model.next_token_logits(scaled64, smc64, ids)
right_gap = np.abs(model.next_token_logits(right, right_config, ids) - reference).max()
wrong_gap = np.abs(model.next_token_logits(wrong, right_config, ids) - reference).max()
print(f"max |logits - scaled model's|: ia3.merge {right_gap:.1e}, rows of W only {wrong_gap:.1e}")
assert "h.0.attn.k.b" not in base and np.abs(base64["h.0.attn.v.b"]).max() > 0
assert right_gap < 1e-10 < 1e-4 * wrong_gap

# %% [markdown]
# ## Exercise 11.3: unmerge
#
# Merging multiplied W's rows (k, v) or columns (proj) by l, so unmerging divides them
# again: W = diag(1 / l) W' and b = b' / l for k and v, W = W' diag(1 / l) for proj. That
# is exact while every l_i != 0. If l_i = 0, row i of W' (or column i) is all zeros: W's
# row is multiplied away and no division brings it back. PEFT divides by l + 1e-8 so
# nothing is inf or nan, and gives back a zero row instead of W's: hence its warning
# that IA3's unmerge "can be inaccurate".

# %%
def my_unmerge(merged, merged_config, vectors, scaled_config, eps=0.0):
    """The scaled model back from the merged one and its vectors (eps: PEFT's 1e-8 guard)."""
    out = dict(merged)
    for prefix in lora.adapted_layers(merged_config, scaled_config):
        l = vectors[f"{prefix}.ia3_l"] + eps
        if prefix.endswith("mlp.proj"):
            out[prefix + ".W"] = merged[prefix + ".W"] / l[None, :]  # columns
        else:
            out[prefix + ".W"] = merged[prefix + ".W"] / l[:, None]  # rows
            if prefix + ".b" in merged:
                out[prefix + ".b"] = merged[prefix + ".b"] / l
    out.update(vectors)
    return out, replace(merged_config, lora=scaled_config)


scaled, smc = trained_ia3(base, mc)
vectors = {n: scaled[n] for n in lora.adapter_names(smc)}
merged, merged_config = ia3.merge(scaled, smc)
back, back_config = my_unmerge(merged, merged_config, vectors, smc.lora)
assert back_config == smc and set(back) == set(scaled)
worst = max(np.abs(back[n] - base[n]).max() / max(np.abs(base[n]).max(), 1e-12) for n in base)
print(f"unmerged: worst relative difference from the base weights {worst:.1e} (float32 rounding)")
assert worst < 1e-6

vectors_zero = dict(vectors)
vectors_zero["h.0.attn.v.ia3_l"] = vectors["h.0.attn.v.ia3_l"].copy()
vectors_zero["h.0.attn.v.ia3_l"][0] = 0.0
zeroed = {**scaled, **vectors_zero}
merged0, merged0_config = ia3.merge(zeroed, smc)
assert not merged0["h.0.attn.v.W"][0].any()  # row 0 multiplied away
back0, _ = my_unmerge(merged0, merged0_config, vectors_zero, smc.lora, eps=1e-8)
row0, rest = back0["h.0.attn.v.W"][0], back0["h.0.attn.v.W"][1:]
print(f"with l_v[0] = 0: unmerged row 0 is {np.abs(row0).max():.1f} everywhere, the base's row had "
      f"|W| up to {np.abs(base['h.0.attn.v.W'][0]).max():.3f}")
assert not row0.any() and np.abs(base["h.0.attn.v.W"][0]).max() > 0
np.testing.assert_allclose(rest, base["h.0.attn.v.W"][1:], rtol=1e-5, atol=1e-7)  # the other rows come back
