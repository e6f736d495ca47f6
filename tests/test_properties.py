"""Properties that must hold for every input, not just the ones we thought of (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import corpus, ops, optim, tasks, tokenizer
from minilora.methods import lora
from minilora.methods.lora import LoraConfig, merge, unmerge
from minilora.model import ModelConfig

FAST = settings(max_examples=40, deadline=None)
finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@FAST
@given(st.text(alphabet=corpus.VOCAB, max_size=200))
def test_tokenizer_roundtrip(text):
    tok = tokenizer.CharTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text


@FAST
@given(st.lists(st.lists(finite, min_size=6, max_size=6), min_size=1, max_size=4),
       finite)
def test_softmax_is_a_distribution_and_ignores_a_shift(rows, shift):
    x = np.array(rows)
    p, _ = ops.softmax_forward(x)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert (p >= 0).all()
    np.testing.assert_allclose(ops.softmax_forward(x + shift)[0], p, rtol=1e-9, atol=1e-15)


@FAST
@given(st.integers(0, 200), st.integers(1, 50), st.integers(0, 50))
def test_lr_schedule_stays_between_min_and_max(step, total_extra, warmup):
    total = warmup + total_extra
    lr = optim.lr_at(step, 1e-3, warmup, total, 1e-4)
    assert 0.0 < lr <= 1e-3 + 1e-15
    if step >= warmup:
        assert lr >= 1e-4 - 1e-15
        assert optim.lr_at(step + 1, 1e-3, warmup, total, 1e-4) <= lr + 1e-15  # never rises after warmup


@FAST
@given(st.lists(finite, min_size=1, max_size=20), st.floats(0.01, 10))
def test_clipping_never_leaves_a_norm_above_the_maximum(values, max_norm):
    grads = {"a": np.array(values), "b": np.array(values[::-1]) * 2.0}
    before = np.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    returned = optim.clip_grad_norm(grads, max_norm)
    after = np.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    assert np.isclose(returned, before)
    assert after <= max_norm * (1 + 1e-9)
    if before <= max_norm:
        assert after == before  # small gradients are left alone


@FAST
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_merge_then_unmerge_gives_back_W(d_out, d_in, r, seed, rslora):
    rng = np.random.default_rng(seed)
    cfg = LoraConfig(rank=r, alpha=2.0 * r, rslora=rslora, targets=("q",))  # the config describes the adapters
    params = {"h.0.attn.q.W": rng.standard_normal((d_out, d_in)),
              "h.0.attn.q.lora_A": rng.standard_normal((r, d_in)),
              "h.0.attn.q.lora_B": rng.standard_normal((d_out, r))}
    config = ModelConfig(vocab_size=2, context_length=2, d_model=2, n_heads=1, n_layers=1, d_ff=2, lora=cfg)
    merged, merged_config = merge(params, config)
    x = rng.standard_normal((3, d_in))
    y_unmerged, _ = lora.lora_linear_forward(x, params["h.0.attn.q.W"], None, params["h.0.attn.q.lora_A"],
                                            params["h.0.attn.q.lora_B"], cfg.scale)
    np.testing.assert_allclose(x @ merged["h.0.attn.q.W"].T, y_unmerged, rtol=1e-10, atol=1e-10)
    adapters = {n: p for n, p in params.items() if "lora" in n}
    back, _ = unmerge(merged, merged_config, adapters, cfg)
    np.testing.assert_allclose(back["h.0.attn.q.W"], params["h.0.attn.q.W"], rtol=1e-12, atol=1e-12)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=12)


@FAST
@given(st.lists(st.tuples(words, words, words), min_size=1, max_size=4), st.booleans())
def test_loss_mask_covers_exactly_the_response(triples, train_on_prompt):
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in triples]
    tok = tokenizer.CharTokenizer()
    x, y, mask = tasks.instruction_batch(records, tok, 256, train_on_prompt)
    for b, r in enumerate(records):
        prompt = tasks.format_prompt(r["instruction"], r["input"])
        full = prompt + r["output"] + "\n"
        counted = tok.decode(y[b][mask[b] == 1.0])
        assert counted == (full[1:] if train_on_prompt else r["output"] + "\n")
