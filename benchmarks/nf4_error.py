"""NF4 against uniform int4 on this model's own pretrained weights, and the bits the NF4 base stores.

    python benchmarks/nf4_error.py [--base default] [--bases-dir benchmarks/studies/bases]
                                   [--out benchmarks/nf4.json] [--figure figures/nf4_error.png]
    python benchmarks/nf4_error.py --fast   # the tiny base, nothing committed is written

QLoRA's argument for NF4 (Dettmers et al. 2023, section 3): pretrained weights
are close to normal, so levels at the normal's quantiles waste fewer codes than
evenly spaced ones. Measured here on every linear of the blocks (the ones the
QLoRA base stores in 4 bits; wte, wpe, LayerNorms and biases stay float32):

- reconstruction error per linear, ||W - deq(quant(W))||_F / ||W||_F, for NF4
  and for uniform symmetric int4 (k / 7, k in -7..7), both with absmax blocks
  of 64 and no double quantization (the levels are the only difference), and
  for NF4 with double quantization (what the QLoRA base stores);
- the same on Gaussian weights of the same shapes (the case NF4 is built for);
- the validation loss per character of the base, float32 against each
  4-bit base (its linears replaced by the dequantized W): what the error costs;
- stored bits per parameter: of the quantized linears (paper: about 4.127),
  and of the whole base model with its float32 embeddings and LayerNorms.

Scores do not depend on the machine's load: this may run anywhere (1 thread).
"""

import argparse
import datetime
import json
import os
import subprocess

import numpy as np

from minilora.methods import nf4
from minilora.evaluation import corpus_val_data, strided_val_loss
from minilora.sweep import load_base


def quantized_linears(params):
    """Names of the linears QLoRA stores in 4 bits: every blocks' W (h.{i}.*.W), not wte."""
    return sorted(n for n in params if n.startswith("h.") and n.endswith(".W"))


def roundtrip(W, kind):
    """deq(quant(W)) for kind nf4 | int4 (absmax blocks of 64, no double quantization) | nf4_dq."""
    if kind == "nf4_dq":
        return nf4.dequantize_nf4(nf4.quantize_nf4(W), W.shape).astype(np.float64)
    levels = nf4.nf4_levels() if kind == "nf4" else nf4.int4_levels()
    codes, absmax = nf4.quantize_blockwise(W, levels, nf4.BLOCK_SIZE)
    return nf4.dequantize_blockwise(codes, absmax, levels, nf4.BLOCK_SIZE).reshape(W.shape)


KINDS = ("nf4", "int4", "nf4_dq")


def rel_error(W, W_hat):
    W = W.astype(np.float64)
    return float(np.linalg.norm(W - W_hat) / np.linalg.norm(W))


def measure(params, config, val_tokens):
    names = quantized_linears(params)
    rng = np.random.default_rng(0)
    per_layer, gaussian = {}, {k: [] for k in KINDS}
    for name in names:
        W = params[name]
        per_layer[name] = {k: rel_error(W, roundtrip(W, k)) for k in KINDS}
        G = (rng.standard_normal(W.shape) * float(W.std())).astype(np.float32)
        for k in KINDS:
            gaussian[k].append(rel_error(G, roundtrip(G, k)))
    n_q = sum(params[n].size for n in names)
    q_bytes = sum(int(v.nbytes) for n in names for v in nf4.quantize_nf4(params[n]).values())
    float_bytes = sum(int(p.nbytes) for n, p in params.items() if n not in names)
    n_all = sum(p.size for p in params.values())
    losses = {"float32": float(strided_val_loss(params, config, val_tokens))}
    for k in KINDS:
        deq = {**params, **{n: roundtrip(params[n], k).astype(np.float32) for n in names}}
        losses[k] = float(strided_val_loss(deq, config, val_tokens))
    # each kind's mean over layers, weighted by the layer's size
    sizes = np.array([params[n].size for n in names], dtype=np.float64)
    mean = {k: float(np.average([per_layer[n][k] for n in names], weights=sizes)) for k in KINDS}
    mean_gauss = {k: float(np.average(gaussian[k], weights=sizes)) for k in KINDS}
    return {
        "quantized_linears": names,
        "rel_error_per_layer": per_layer,
        "rel_error_mean": mean,
        "rel_error_mean_gaussian_same_shapes": mean_gauss,
        "int4_over_nf4_error": mean["int4"] / mean["nf4"],
        "val_loss_per_char": losses,
        "bits_per_param_quantized_linears": 8.0 * q_bytes / n_q,
        "bits_per_param_whole_base": 8.0 * (q_bytes + float_bytes) / n_all,
        "bits_per_param_float32_base": 32.0,
        "n_quantized": int(n_q),
        "n_params": int(n_all),
        "stored_bytes": {"nf4_base": int(q_bytes + float_bytes), "float32_base": int(4 * n_all)},
    }


def figure(params, result, title_note=""):
    """Left: one layer's weights / absmax with both level sets; right: error per layer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    name = result["quantized_linears"][0]
    blocks = params[name].astype(np.float64).reshape(-1, nf4.BLOCK_SIZE)
    normed = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()
    ax.hist(normed, bins=120, color="0.6", density=True, label=f"{name} / its block absmax")
    for lv in nf4.nf4_levels():
        ax.axvline(lv, color="C0", lw=1, ymax=0.5)
    for lv in nf4.int4_levels():
        ax.axvline(lv, color="C3", lw=1, ymin=0.5, ls="--")
    ax.plot([], [], color="C0", label="NF4 levels (16)")
    ax.plot([], [], color="C3", ls="--", label="int4 levels (15)")
    ax.set_xlabel("weight / block absmax (blocks of 64)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("NF4 puts its levels where the weights are")
    names = result["quantized_linears"]
    x = np.arange(len(names))
    for i, (k, label) in enumerate((("nf4", "NF4"), ("int4", "uniform int4"), ("nf4_dq", "NF4 + double quant"))):
        bx.bar(x + (i - 1) * 0.27, [result["rel_error_per_layer"][n][k] for n in names], 0.27, label=label)
    bx.set_xticks(x, [n.replace(".W", "") for n in names], rotation=60, fontsize=7)
    bx.set_ylabel("||W - deq(quant(W))||_F / ||W||_F")
    bx.legend(fontsize=8)
    bx.set_title(f"reconstruction error per linear: int4 / NF4 = {result['int4_over_nf4_error']:.2f}x")
    fig.suptitle(f"NF4 vs uniform int4 on the pretrained base's weights{title_note}")
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--bases-dir", default="benchmarks/studies/bases")
    ap.add_argument("--out", default="benchmarks/nf4.json")
    ap.add_argument("--figure", default="figures/nf4_error.png")
    ap.add_argument("--fast", action="store_true", help="the tiny base; writes under figures/fast and runs/")
    args = ap.parse_args()
    if args.fast:
        args.base, args.bases_dir = "tiny", "runs/bases"
        args.out, args.figure = "runs/nf4_fast.json", "figures/fast/nf4_error.png"
    params, config, tokenizer = load_base(args.base, args.bases_dir)
    result = measure(params, config, corpus_val_data(tokenizer))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "base": args.base,
              "model": config.to_dict(), "block_size": nf4.BLOCK_SIZE,
              "absmax_block_size": nf4.ABSMAX_BLOCK_SIZE, **result}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
    figure(params, result, " (FAST MODE: tiny base)" if args.fast else "").savefig(args.figure, dpi=120)
    print(json.dumps({k: result[k] for k in ("rel_error_mean", "rel_error_mean_gaussian_same_shapes",
                                             "int4_over_nf4_error", "val_loss_per_char",
                                             "bits_per_param_quantized_linears", "bits_per_param_whole_base")},
                     indent=1))


if __name__ == "__main__":
    main()
