"""GPT-2 small as a named size, and its benchmark script, checked at a tiny size (never timed here)."""

import importlib.util
import json
import math
import os

import pytest
from clients import require

from minilora.model import SIZES, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpt2_small_size_has_gpt2_smalls_parameters_less_the_key_biases():
    torch, transformers = require("torch"), require("transformers")
    with torch.device("meta"):  # shapes only, nothing allocated
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    theirs = sum(p.numel() for p in m.parameters())  # the tied head counted once
    c = SIZES["gpt2-small"]
    ours = sum(math.prod(s) for s in param_shapes(c).values())
    assert theirs == 124_439_808
    assert ours == theirs - c.n_layers * c.d_model  # minilora drops the key bias, (C,) per block


def test_the_benchmark_runs_at_a_tiny_size_and_reports_memory_per_strategy(tmp_path, monkeypatch):
    require("torch")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpt2_small", os.path.join(ROOT, "benchmarks", "gpt2_small.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "g.json"
    result = bench.main(["--size", "default", "--batch", "2", "--tokens", "16", "--repeats", "1", "--threads", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for strategy in ("full", "lora"):
        r = result["strategies"][strategy]
        assert set(r["step_s"]) == {"minilora", "torch"} and all(t > 0 for t in r["step_s"].values())
        m = r["memory"]
        c = SIZES["default"]
        # the cached probabilities are (B, NH, T, T) float32 per layer, exactly
        assert m["attention_probabilities"] == c.n_layers * 2 * c.n_heads * 16 * 16 * 4
        assert m["formula_total"] == m["weights"] + m["trainable_params"] * 4 * 3 + m["activations"]
        assert m["peak_step_tracemalloc"] > m["gradients"]  # the step allocates at least its gradients
    assert result["strategies"]["lora"]["memory"]["optimizer"] < result["strategies"]["full"]["memory"]["optimizer"]
