"""What one training step holds (benchmarks/step_peak.py): its tracemalloc peak stays within 1.10 x of
weights + gradients + AdamW + the activations the forward keeps + the largest single op's transient,
with and without activation checkpointing, and checkpointing keeps less."""

import importlib
import os
import sys

import pytest

from minilora import methods, ops
from minilora.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(vocab_size=2000, context_length=128, d_model=128, n_heads=4, n_layers=3, d_ff=512)


@pytest.fixture(scope="module")
def step_peak():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # step_peak.py imports speed.py as a sibling script
    try:
        return importlib.import_module("step_peak")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("name", [m for m in methods.METHODS if not methods.method(m).needs_head])  # an LM step
def test_a_step_holds_what_its_terms_add_up_to(step_peak, name, checkpoint):
    row = step_peak.measure(name, CONFIG, 2, checkpoint)
    assert row["ratio"] <= 1.10, row


@pytest.mark.parametrize("name", ["full", "lora"])
def test_a_step_never_holds_the_whole_logits(step_peak, name, monkeypatch):
    # chunks of 64 tokens (two 0.5 MB buffers) of the 256 tokens' (B, T, V) logits (2 x 128 x 2000 float32, 2 MB)
    monkeypatch.setattr(ops, "LOSS_CHUNK_BYTES", 2 * 64 * 2000 * 4)
    row = step_peak.measure(name, CONFIG, 2)
    logits = 2 * 128 * 2000 * 4
    dwte = 2000 * 128 * 4 if name == "full" else 0  # full fine-tuning's head forms dwte, a gradient, in the op
    assert row["transient"] < logits + dwte, row  # the unchunked loss held the logits twice over


def test_checkpointing_keeps_less(step_peak):
    plain, kept = (step_peak.measure("lora", CONFIG, 2, c) for c in (False, True))
    assert kept["kept"] < plain["kept"] / 2 and kept["peak"] < plain["peak"]
