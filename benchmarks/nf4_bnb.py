"""minilora's NF4 against bitsandbytes' on the same weights: the 4-bit codes, the absmax, the double quantization.

    python benchmarks/nf4_bnb.py [--base default] [--bases-dir benchmarks/studies/bases] [--out benchmarks/nf4_bnb.json]
    python benchmarks/nf4_bnb.py --fast   # the tiny base and one GPT-2-shaped block; writes runs/nf4_bnb_fast.json

Needs torch and bitsandbytes (`pip install torch==2.13.0 bitsandbytes`); bitsandbytes' CPU backend
quantizes here. For each float32 matrix W (out, in), both sides quantize W flattened row-major in
blocks of 64:

- codes: the fraction of minilora's 4-bit codes (nf4.quantize_nf4) equal to bitsandbytes'
  (functional.quantize_4bit(W, quant_type="nf4", blocksize=64)), after unpacking both (two codes a
  byte, the first in the high nibble, on both sides); also with minilora's earlier rule (the nearest of
  the float64 levels nf4_levels(), not of the float32 table), to show what the table change did.
  At each code that differs: which side's level is nearer to w / absmax in exact arithmetic;
- absmax: whether the float32 absmax are equal; the largest |difference| of the dequantized weights
  with the absmax in float32 (no double quantization);
- double quantization: minilora's linear int8 and dynamic (bitsandbytes' map) codes, and bitsandbytes'
  compress_statistics=True: the fraction of 8-bit absmax codes equal (dynamic vs bitsandbytes; where they
  differ, whose dequantized absmax is nearer the float32 one), the
  largest |absmax error| relative to the largest absmax, and the weights' relative error
  ||W - deq(W)||_F / ||W||_F of each; the largest |difference| of minilora's dynamic dequantized W
  from bitsandbytes'.

Weights: GPT-2 small's block shapes, Gaussian with GPT-2's init std 0.02 (three seeds), and every
block linear of a pretrained minilora base. Scores do not depend on the machine's load.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess

import numpy as np

from minilora.methods import nf4

GPT2_SHAPES = {"c_attn": (2304, 768), "c_proj": (768, 768), "c_fc": (3072, 768), "mlp.c_proj": (768, 3072)}


def bnb_modules():
    """(torch, bitsandbytes.functional), with the Hugging Face Hub offline first: on a CPU with AVX-512 BF16,
    importing bitsandbytes asks the Hub for an optional kernel (`kernels`), which must not touch the network."""
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    import torch
    import bitsandbytes.functional as F

    return torch, F


def unpack_bnb(packed):
    """bitsandbytes' packed uint8 (n / 2, 1) -> codes uint8 (n,): high nibble first (its quantize_4bit's order)."""
    p = np.asarray(packed).reshape(-1)
    codes = np.empty(2 * p.size, dtype=np.uint8)
    codes[0::2] = p >> 4
    codes[1::2] = p & 15
    return codes


def compare(W, torch, F):
    """The comparisons above for one float32 matrix W (out, in); a dict of numbers."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    t = torch.from_numpy(W)
    packed, state = F.quantize_4bit(t, blocksize=nf4.BLOCK_SIZE, quant_type="nf4")
    theirs = unpack_bnb(packed.numpy())
    absmax_b = state.absmax.numpy()
    ours, absmax = nf4.quantize_blockwise(W, nf4.nf4_table(), nf4.BLOCK_SIZE)
    before, _ = nf4.quantize_blockwise(W, nf4.nf4_levels(), nf4.BLOCK_SIZE)  # the earlier rule
    differ = np.flatnonzero(ours != theirs)
    x = W.reshape(-1)[differ].astype(np.float64) / np.repeat(absmax, nf4.BLOCK_SIZE)[differ]
    table = nf4.nf4_table().astype(np.float64)
    d_ours, d_theirs = np.abs(table[ours[differ]] - x), np.abs(table[theirs[differ]] - x)
    deq_ours = nf4.dequantize_blockwise(ours, absmax, table, nf4.BLOCK_SIZE).astype(np.float32)
    deq_theirs = F.dequantize_4bit(packed, state).numpy().reshape(-1)
    out = {
        "n": int(W.size),
        "codes_equal": float(np.mean(ours == theirs)),
        "codes_differ": int(differ.size),
        "codes_equal_with_float64_levels": float(np.mean(before == theirs)),
        "at_differing_codes_minilora_nearer": int((d_ours < d_theirs).sum()),
        "at_differing_codes_bnb_nearer": int((d_ours > d_theirs).sum()),
        "at_differing_codes_tie": int((d_ours == d_theirs).sum()),
        "absmax_equal": bool(np.array_equal(absmax, absmax_b)),
        "max_abs_deq_diff_no_dq": float(np.abs(deq_ours - deq_theirs).max()),
        "max_abs_W": float(np.abs(W).max()),
    }
    # double quantization: linear int8, dynamic (bitsandbytes' map), and bitsandbytes' own
    norm_W = np.linalg.norm(W.astype(np.float64))
    for code in nf4.ABSMAX_CODES:
        q = nf4.quantize_nf4(W, absmax_code=code)
        a_hat = nf4.dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], absmax_code=code)
        deq = nf4.dequantize_nf4(q, W.shape, absmax_code=code)
        out[f"dq_{code}_absmax_max_rel_error"] = float(np.abs(a_hat.astype(np.float64) - absmax).max() / absmax.max())
        out[f"dq_{code}_absmax_mean_rel_error"] = float(np.mean(np.abs(a_hat.astype(np.float64) - absmax)) / absmax.mean())
        out[f"dq_{code}_W_rel_error"] = float(np.linalg.norm((deq - W).astype(np.float64)) / norm_W)
        if code == "dynamic":
            deq_dynamic, q_dynamic, mean_dynamic, a_dynamic = deq, q, q["absmax_mean"], a_hat.astype(np.float64)
    packed2, state2 = F.quantize_4bit(t, blocksize=nf4.BLOCK_SIZE, quant_type="nf4", compress_statistics=True)
    deq_b = F.dequantize_4bit(packed2, state2).numpy()
    a_b = F.dequantize_blockwise(state2.absmax, state2.state2).numpy().astype(np.float64) + float(state2.offset)
    out["dq_bnb_absmax_max_rel_error"] = float(np.abs(a_b - absmax).max() / absmax.max())
    out["dq_bnb_absmax_mean_rel_error"] = float(np.mean(np.abs(a_b - absmax)) / absmax.mean())
    out["dq_bnb_W_rel_error"] = float(np.linalg.norm((deq_b - W).astype(np.float64)) / norm_W)
    codes_b = state2.absmax.numpy()
    out["dq_absmax_codes_equal_dynamic_vs_bnb"] = float(np.mean(q_dynamic["absmax_q"] == codes_b))
    # where the 8-bit codes differ: whose dequantized absmax is nearer the float32 absmax
    d2 = np.flatnonzero(q_dynamic["absmax_q"] != codes_b)
    e_ours, e_theirs = np.abs(a_dynamic[d2] - absmax[d2]), np.abs(a_b[d2] - absmax[d2])
    out["dq_absmax_codes_differ"] = int(d2.size)
    out["at_differing_absmax_codes_minilora_nearer"] = int((e_ours < e_theirs).sum())
    out["at_differing_absmax_codes_bnb_nearer"] = int((e_ours > e_theirs).sum())
    out["dq_mean_equal_dynamic_vs_bnb"] = bool(float(mean_dynamic) == float(state2.offset))
    out["dq_scale2_equal_dynamic_vs_bnb"] = bool(np.array_equal(q_dynamic["absmax_scale"], state2.state2.absmax.numpy()))
    out["dq_max_abs_deq_diff_dynamic_vs_bnb"] = float(np.abs(deq_dynamic - deq_b).max())
    return out


def summary(records):
    """Totals over matrices: codes equal overall (weighted by size), the worst of the maxima, the means of errors."""
    n = sum(r["n"] for r in records)
    s = {"matrices": len(records), "weights": n,
         "codes_equal": sum(r["codes_equal"] * r["n"] for r in records) / n,
         "codes_differ": sum(r["codes_differ"] for r in records),
         "codes_equal_with_float64_levels": sum(r["codes_equal_with_float64_levels"] * r["n"] for r in records) / n}
    for k in ("at_differing_codes_minilora_nearer", "at_differing_codes_bnb_nearer", "at_differing_codes_tie",
              "dq_absmax_codes_differ", "at_differing_absmax_codes_minilora_nearer",
              "at_differing_absmax_codes_bnb_nearer"):
        s[k] = sum(r[k] for r in records)
    s["absmax_equal"] = all(r["absmax_equal"] for r in records)
    for k in records[0]:
        if k.startswith(("max_abs", "dq_max")) or k.endswith("max_rel_error"):
            s[k] = max(r[k] for r in records)
        elif k.endswith(("mean_rel_error", "W_rel_error")) or k == "dq_absmax_codes_equal_dynamic_vs_bnb":
            s[k] = sum(r[k] * r["n"] for r in records) / n
        elif k.startswith("dq_") and k.endswith("vs_bnb"):
            s[k] = sum(bool(r[k]) for r in records)  # how many matrices
    return s


def tables(F):
    """The level table and the dynamic map against bitsandbytes' (on this machine)."""
    bnb_map = F.create_dynamic_map().numpy()
    return {"nf4_table_equal_bnb": bool(np.array_equal(nf4.nf4_table(), F.get_4bit_type("nf4", device="cpu").numpy())),
            "nf4_table_equal_paper": bool(np.array_equal(nf4.nf4_table(), np.array(nf4.PAPER_NF4_LEVELS, np.float32))),
            "nf4_levels_float64_max_diff_from_table": float(np.abs(nf4.nf4_levels() - nf4.nf4_table()).max()),
            "dynamic_map_entries_differing_from_bnb": int((nf4.dynamic_map() != bnb_map).sum()),
            "dynamic_map_max_abs_diff_from_bnb": float(np.abs(nf4.dynamic_map() - bnb_map).max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--bases-dir", default="benchmarks/studies/bases")
    ap.add_argument("--out", default="benchmarks/nf4_bnb.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fast", action="store_true", help="the tiny base and one seed; writes runs/nf4_bnb_fast.json")
    args = ap.parse_args()
    if args.fast:
        args.base, args.bases_dir, args.out, args.seeds = "tiny", "runs/bases", "runs/nf4_bnb_fast.json", 1
    torch, F = bnb_modules()
    torch.set_num_threads(1)
    from minilora.sweep import load_base

    rng = np.random.default_rng(0)
    gpt2 = [compare(0.02 * rng.standard_normal(shape), torch, F) for _ in range(args.seeds)
            for shape in GPT2_SHAPES.values()]
    params, config, _ = load_base(args.base, args.bases_dir)
    names = sorted(n for n in params if n.startswith("h.") and n.endswith(".W"))
    base = {n: compare(params[n], torch, F) for n in names}
    import bitsandbytes

    result = {
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__, "base": args.base, "model": config.to_dict(),
        "tables": tables(F),
        "gpt2_shaped_gaussian": {"shapes": GPT2_SHAPES, "std": 0.02, "seeds": args.seeds, **summary(gpt2)},
        "pretrained_base": {"linears": names, **summary(list(base.values()))},
        "per_matrix_pretrained": base,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("tables", "gpt2_shaped_gaussian", "pretrained_base")}, indent=1))


if __name__ == "__main__":
    main()
