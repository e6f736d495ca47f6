"""A QLoRA run's NF4 base in bitsandbytes' serialized 4-bit layout, which transformers loads with bitsandbytes.

transformers saves a model quantized with BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4") as a GPT-2 folder whose block linears are stored as
bitsandbytes' Linear4bit: an nn.Linear's (out, in) weight, so GPT-2's Conv1D
(in, out) is transposed, which is minilora's own layout. For each module:

    transformer.h.{i}.attn.c_attn.weight                              uint8 (out * in / 2, 1)  the codes
    transformer.h.{i}.attn.c_attn.weight.absmax                       float32 (out * in / 64,)
    transformer.h.{i}.attn.c_attn.weight.quant_map                    float32 (16,)            the NF4 table
    transformer.h.{i}.attn.c_attn.weight.quant_state.bitsandbytes__nf4
        uint8, the JSON {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [out, in]}

(c_proj, c_fc and mlp.c_proj alike), everything else (wte, wpe, LayerNorms,
biases) as float tensors, and config.json's quantization_config. bitsandbytes
flattens W row-major, codes each block of 64 with 4 bits, and packs two codes a
byte with the first in the high nibble: minilora's nf4.pack_codes, byte for byte.
c_attn's W is [W_q; W_k; W_v], so its codes and absmax are q's, k's and v's one
after the other (each matrix's size is a multiple of the block size, so no block
straddles two of them).

The absmax go out as float32, the values minilora's forward dequantizes with
(mean + code * scale2): no second quantization in the file
(bnb_4bit_use_double_quant false). bitsandbytes' double quantization keeps one
offset per module, and c_attn joins three matrices that minilora centres on
three means, so only this way is the exported function minilora's exactly: the
same codes, the same float32 table and absmax, so bitsandbytes' dequantized W
is minilora's deq(Q_W) bit for bit. The file holds 4 + 32/64 = 4.5 bits per
weight where minilora holds 4.127. Needs safetensors (`pip install 'minilora[hf]'`);
writing needs neither torch nor bitsandbytes.
"""

import json
import os

import numpy as np

from . import hf
from .backend import to_numpy
from .methods import nf4, qlora

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' quantize_4bit accepts
QUANT_STATE = "quant_state.bitsandbytes__nf4"
# GPT-2 module -> the minilora linears whose W it holds, in order of its rows
MODULES = {"attn.c_attn": ("attn.q", "attn.k", "attn.v"), "attn.c_proj": ("attn.o",), "mlp.c_fc": ("mlp.fc",),
           "mlp.c_proj": ("mlp.proj",)}


def quantization_config():
    """config.json's quantization_config: what transformers' BitsAndBytesConfig writes for this file (the
    block size is each module's quant_state's)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def check_exportable(config):
    """Raise ValueError (one line) unless config is a QLoRA model whose block size bitsandbytes reads."""
    settings = config.lora
    if settings is None or settings.method != qlora.QLoraConfig.method:
        got = "a model without adapters" if settings is None else f"a {settings.label} run"
        raise ValueError(f"--bnb-4bit: expected a QLoRA run (its NF4 base is what goes out in 4 bits), got {got}")
    if settings.block_size not in BLOCK_SIZES:
        raise ValueError(f"--bnb-4bit: expected a block size bitsandbytes reads ({', '.join(map(str, BLOCK_SIZES))}),"
                         f" got block_size {settings.block_size}")


def module_tensors(params, config, i, module):
    """name suffix -> array of one GPT-2 module's 4-bit weight, from the QLoRA records of its linears.

    Returns {"": codes uint8 (n / 2, 1), "absmax": float32 (n / 64,), "quant_map": float32 (16,),
    QUANT_STATE: uint8 JSON}, n = out * in of the module's (out, in) weight.
    """
    settings = config.lora
    prefixes = [f"h.{i}.{p}" for p in MODULES[module]]
    records = [{f: to_numpy(a) for f, a in qlora.quantized_record(params, p).items()} for p in prefixes]
    codes = np.concatenate([r["codes"] for r in records])  # q's rows, then k's, then v's: W_c row-major
    absmax = np.concatenate([nf4.dequantize_absmax(r["absmax_q"], r["absmax_scale"], r["absmax_mean"],
                                                   settings.absmax_block_size, settings.absmax_code)
                             for r in records]).astype(np.float32)  # what dequantize_nf4 multiplies by
    rows = _rows(config, module)
    state = {"quant_type": "nf4", "blocksize": settings.block_size, "dtype": "float32",
             "shape": [rows, 2 * codes.size // rows]}
    return {"": codes[:, None], "absmax": absmax, "quant_map": np.array(nf4.nf4_table()),
            QUANT_STATE: np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()}


def _rows(config, module):
    """out of a GPT-2 module's (out, in) weight."""
    C, F = config.d_model, config.d_ff
    return {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": F, "mlp.c_proj": C}[module]


def write_gpt2_nf4(folder, params, config, float_base, eos_token_id=0):
    """Write config.json (with quantization_config) and model.safetensors, the block linears in 4 bits.

    Inputs:
    - folder: an existing, empty folder (hf.write_folder_atomically)
    - params, config: a QLoRA model (its adapters are not written here: bridge writes them as PEFT's)
    - float_base: the same base with every W dequantized (qlora.as_lora's, adapters left out): its other
      tensors are written as they are, and its fingerprint is recorded, as hf.write_gpt2 records it
    Returns the fingerprint.
    """
    check_exportable(config)
    safetensors = hf._safetensors()
    base_config = type(config).from_dict({**config.to_dict(), "lora": None})
    tensors = hf.to_gpt2_tensors(float_base, base_config)
    for i in range(config.n_layers):
        for module in MODULES:
            name = f"transformer.h.{i}.{module}.weight"
            for suffix, array in module_tensors(params, config, i, module).items():
                tensors[name + ("." + suffix if suffix else "")] = np.ascontiguousarray(array)
    fingerprint = hf.weights_fingerprint(float_base)
    gpt2 = hf.gpt2_config(base_config, eos_token_id)
    gpt2["dtype"] = str(tensors["transformer.wte.weight"].dtype)
    gpt2["quantization_config"] = quantization_config()
    with open(os.path.join(folder, hf.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(gpt2, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(folder, hf.WEIGHTS_FILE),
                                metadata={"format": "pt", hf.FINGERPRINT_KEY: fingerprint})
    return fingerprint
