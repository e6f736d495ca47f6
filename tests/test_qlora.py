"""QLoRA's op pairs (minilora/qlora.py): LoRA on a frozen NF4 linear.

The dequantized W is a constant, so the float64 finite-difference checks perturb x, A and B only; the
forward must equal LoRA's on deq(Q_W), the cache must hold codes and no float (out, in) array, and
merging gives a plain float model computing the same function."""

import numpy as np
import pytest

from minilora import backend, gradcheck, ops
from minilora.methods import lora, nf4, qlora

OUT, IN, R = 12, 16, 3  # 192 weights: blocks of 32 (the test's block size) divide it


def _layer(rng, dtype=np.float64):
    W = (0.3 * rng.standard_normal((OUT, IN))).astype(np.float32)
    q = nf4.quantize_nf4(W, block_size=32)
    b = rng.standard_normal(OUT).astype(dtype)
    A = rng.standard_normal((R, IN)).astype(dtype)
    B = rng.standard_normal((OUT, R)).astype(dtype)  # B != 0: dA is not identically zero
    return W, q, b, A, B


def _on(xp, q):
    return {k: backend.to_device(v, xp) for k, v in q.items()}


def test_qlora_forward_is_lora_on_the_dequantized_weight(xp):
    rng = np.random.default_rng(0)
    W, q, b, A, B = _layer(rng)
    x = rng.standard_normal((2, 5, IN))
    W_deq = nf4.dequantize_nf4(q, (OUT, IN), np.float64, block_size=32)
    ref, _ = lora.lora_linear_forward(x, W_deq, b, A, B, 0.7)
    dev = [backend.to_device(a, xp) for a in (x, b, A, B)]
    y, cache = qlora.qlora_linear_forward(dev[0], _on(xp, q), (OUT, IN), dev[1], dev[2], dev[3], 0.7,
                                          block_size=32)
    np.testing.assert_allclose(backend.to_numpy(y), ref, rtol=1e-13, atol=1e-13)
    # the dequantization error is there (deq(Q_W) != W), the shape of the codes says 4 bits a weight
    assert 0 < np.abs(W_deq - W).max() <= 0.16 * np.abs(W).max()
    assert cache[0][0]["codes"].shape == (OUT * IN // 2,)


def _float_matrices_in(obj, shape):
    if isinstance(obj, dict):
        return [m for v in obj.values() for m in _float_matrices_in(v, shape)]
    if isinstance(obj, (tuple, list)):
        return [m for o in obj for m in _float_matrices_in(o, shape)]
    kind = getattr(getattr(obj, "dtype", None), "kind", None)
    return [obj] if kind == "f" and tuple(obj.shape) == shape else []


def test_cache_keeps_codes_not_the_dequantized_weight():
    rng = np.random.default_rng(1)
    _, q, b, A, B = _layer(rng)
    x = rng.standard_normal((4, IN))
    _, cache = qlora.qlora_linear_forward(x, q, (OUT, IN), b, A, B, 0.5, block_size=32)
    assert _float_matrices_in(cache, (OUT, IN)) == []  # no float (out, in) W kept for the backward
    _, cache = qlora.nf4_linear_forward(x, q, (OUT, IN), b, block_size=32)
    assert _float_matrices_in(cache, (OUT, IN)) == [] and not any(c is x for c in cache)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_linear_gradients_match_finite_differences(xp, dropout):
    """float64, every coordinate of x, A and B; W's codes are constants (nothing to differentiate)."""
    rng = np.random.default_rng(2)
    _, q, b, A, B = _layer(rng)
    x = rng.standard_normal((2, 3, IN))
    mask = (rng.random(x.shape) > dropout).astype(np.float64) / (1 - dropout) if dropout else None
    dev = {n: backend.to_device(a, xp) for n, a in {"x": x, "A": A, "B": B}.items()}
    qd, bd = _on(xp, q), backend.to_device(b, xp)
    m = None if mask is None else backend.to_device(mask, xp)

    def forward(x, A, B):
        return qlora.qlora_linear_forward(x, qd, (OUT, IN), bd, A, B, 0.6, dropout, dropout_mask=m, block_size=32)

    results = gradcheck.check_op("qlora_linear", forward, qlora.qlora_linear_backward, dev,
                                 {"x": 0, "A": 1, "B": 2}, rng)
    assert len(results) == 3
    for r in results:
        assert r.error <= gradcheck.TOLERANCE, r


def test_nf4_linear_gradient_matches_finite_differences(xp):
    rng = np.random.default_rng(3)
    _, q, b, _, _ = _layer(rng)
    x = backend.to_device(rng.standard_normal((5, IN)), xp)
    qd, bd = _on(xp, q), backend.to_device(b, xp)
    results = gradcheck.check_op("nf4_linear", lambda x: qlora.nf4_linear_forward(x, qd, (OUT, IN), bd, 32),
                                 qlora.nf4_linear_backward, {"x": x}, {"x": 0}, rng)
    assert results[0].error <= gradcheck.TOLERANCE, results[0]


def test_no_input_grad_skips_dx():
    rng = np.random.default_rng(4)
    _, q, b, A, B = _layer(rng)
    x = rng.standard_normal((4, IN))
    y, cache = qlora.qlora_linear_forward(x, q, (OUT, IN), b, A, B, 0.5, block_size=32)
    dx, dA, dB = qlora.qlora_linear_backward(np.ones_like(y), cache, input_grad=False)
    full = qlora.qlora_linear_backward(np.ones_like(y), cache)
    assert dx is None
    np.testing.assert_array_equal(dA, full[1])
    np.testing.assert_array_equal(dB, full[2])


def test_quantize_linears_replaces_W_and_says_which_layer_does_not_divide():
    rng = np.random.default_rng(5)
    params = {"wte": rng.standard_normal((7, 8)).astype(np.float32),
              "h.0.attn.q.W": rng.standard_normal((8, 8)).astype(np.float32),
              "h.0.mlp.fc.W": rng.standard_normal((12, 8)).astype(np.float32)}
    out = qlora.quantize_linears(params, ["h.0.attn.q"], block_size=32)
    assert "h.0.attn.q.W" not in out and out["wte"] is params["wte"] and "h.0.attn.q.W" in params
    assert sorted(n for n in out if n.startswith("h.0.attn.q")) == sorted(qlora.quantized_names("h.0.attn.q"))
    with pytest.raises(ValueError, match=r"^block_size: expected a divisor of the number of weights 96, got 64 "
                                         r"\(h\.0\.mlp\.fc\.W, shape \(12, 8\)\)$"):
        qlora.quantize_linears(params, ["h.0.mlp.fc"], block_size=64)


def test_merge_is_the_dequantized_weight_plus_the_update():
    rng = np.random.default_rng(6)
    W, q, b, A, B = _layer(rng, np.float32)
    params = {"wte": np.zeros((3, IN), np.float32), "h.0.attn.q.b": b, "h.0.attn.q.lora_A": A,
              "h.0.attn.q.lora_B": B, **{f"h.0.attn.q.nf4.{f}": v for f, v in q.items()}}
    merged = qlora.merge_weights(params, ["h.0.attn.q"], {"h.0.attn.q": (OUT, IN)}, 0.5, block_size=32)
    assert sorted(merged) == ["h.0.attn.q.W", "h.0.attn.q.b", "wte"]
    assert merged["h.0.attn.q.W"].dtype == np.float32
    x = rng.standard_normal((6, IN)).astype(np.float32)
    y_q, _ = qlora.qlora_linear_forward(x, q, (OUT, IN), b, A, B, 0.5, block_size=32)
    y_m, _ = ops.linear_forward(x, merged["h.0.attn.q.W"], b)
    np.testing.assert_allclose(y_m, y_q, rtol=1e-5, atol=1e-5)
    # the merged W keeps the quantization error: it is not W + s B A
    assert np.abs(merged["h.0.attn.q.W"] - (W + 0.5 * B @ A)).max() > 1e-3


def test_stored_bits_per_param_of_quantized_linears():
    rng = np.random.default_rng(7)
    params = {"h.0.mlp.fc.W": rng.standard_normal((512, 128)).astype(np.float32),
              "h.0.attn.q.W": rng.standard_normal((128, 128)).astype(np.float32)}
    shapes = {"h.0.mlp.fc": (512, 128), "h.0.attn.q": (128, 128)}
    out = qlora.quantize_linears(params, list(shapes))
    bits = qlora.bits_per_param(out, list(shapes), shapes)
    assert 4.127 <= bits <= 4.2


def test_shared_input_qkv_equals_three_separate_qlora_linears(xp):
    rng = np.random.default_rng(8)
    layers = [_layer(rng) for _ in range(3)]
    x = rng.standard_normal((2, 4, IN))
    dev = lambda a: backend.to_device(a, xp)  # noqa: E731
    xd = dev(x)
    shared_layers = [(_on(xp, q), (OUT, IN), dev(b), dev(A), dev(B)) for _, q, b, A, B in layers]
    ys, cache = qlora.qlora_shared_input_forward(xd, shared_layers, 0.4, block_size=32)
    douts = [dev(rng.standard_normal(y.shape)) for y in ys]
    dx, dAs, dBs = qlora.qlora_shared_input_backward(douts, cache)
    dx_sum = 0
    for (q, shape, b, A, B), y, dout, dA, dB in zip(shared_layers, ys, douts, dAs, dBs):
        y1, c1 = qlora.qlora_linear_forward(xd, q, shape, b, A, B, 0.4, block_size=32)
        dx1, dA1, dB1 = qlora.qlora_linear_backward(dout, c1)
        for a, ref in ((y, y1), (dA, dA1), (dB, dB1)):
            np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(ref), rtol=1e-12, atol=1e-12)
        dx_sum = dx_sum + backend.to_numpy(dx1)
    np.testing.assert_allclose(backend.to_numpy(dx), dx_sum, rtol=1e-12, atol=1e-12)
    assert _float_matrices_in(cache, (OUT, IN)) == []


# the whole model under QLoRA

from minilora import finetune, methods, model  # noqa: E402
from minilora.model import ModelConfig  # noqa: E402
from minilora.tokenizer import CharTokenizer  # noqa: E402

SMALL = ModelConfig(vocab_size=11, context_length=7, d_model=16, n_heads=2, n_layers=2, d_ff=40)


def _qlora_model(dtype=np.float64, absmax_code="linear"):
    base = model.init_params(SMALL, seed=0, dtype=dtype)
    settings = qlora.QLoraConfig(absmax_code=absmax_code)  # LoRA's default settings, and the absmax's code
    params, config, trainable = finetune.setup_strategy(base, SMALL, CharTokenizer(),
                                                        finetune.FinetuneConfig(method="qlora", lora=settings))
    rng = np.random.default_rng(1)
    for n in trainable:  # away from B = 0
        params[n] = (params[n] + 0.1 * rng.standard_normal(params[n].shape)).astype(dtype)
    x = rng.integers(0, SMALL.vocab_size, (3, SMALL.context_length))
    return base, params, config, trainable, {"x": x, "y": np.roll(x, -1, axis=1)}


def test_the_qlora_model_holds_and_caches_no_float_block_weight():
    base, params, config, trainable, batch = _qlora_model()
    w_shapes = {s for n, s in model.param_shapes(SMALL).items() if n.startswith("h.") and n.endswith(".W")}
    assert not any(n.startswith("h.") and n.endswith(".W") for n in params)
    assert params["wte"] is base["wte"] and params["wte"].dtype == np.float64  # embeddings stay float
    _, cache = model.forward(params, config, batch["x"], trainable=trainable)
    for shape in w_shapes:
        assert _float_matrices_in(cache, shape) == [], shape  # no dequantized W kept for the backward


def test_each_linear_is_dequantized_for_its_own_products_only(monkeypatch):
    """One dequantization per linear in the forward and one per dx in the backward: the base is never
    dequantized whole. Block 0's q, k, v need no dx (nothing below them trains): 12 + 9 calls."""
    _, params, config, trainable, batch = _qlora_model()
    calls, real = [], nf4.dequantize_nf4

    def counted(q, shape, *args, **kwargs):
        calls.append(tuple(shape))
        return real(q, shape, *args, **kwargs)

    monkeypatch.setattr(nf4, "dequantize_nf4", counted)
    model.loss_and_grads(params, config, batch, trainable)
    assert len(calls) == 12 + 9


def test_merged_qlora_model_computes_the_same_loss():
    _, params, config, trainable, batch = _qlora_model()
    loss, _ = model.loss_and_grads(params, config, batch, trainable)
    merged, merged_config = methods.method("qlora").merge(params, config)
    assert merged_config.lora is None
    assert set(merged) == set(model.param_shapes(SMALL))  # a plain float model
    merged_loss, _ = model.loss_and_grads(merged, merged_config, batch, set())
    assert merged_loss == pytest.approx(loss, rel=1e-12)


def test_qlora_count_report_counts_weights_and_stored_bits():
    base = model.init_params(ModelConfig(), seed=0)
    params, config, trainable = finetune.setup_strategy(base, ModelConfig(), CharTokenizer(),
                                                          finetune.FinetuneConfig(method="qlora"))
    report = lora.count_report(params, trainable, config)
    n = 2 * 4 * 8 * (128 + 128)
    assert f"trainable params: {n:,} || all params: {model.count_params(base) + n:,}" in report
    assert "NF4 base: 12 block linears, 393,216 weights in 202,896 bytes = 4.128 bits each" in report


@pytest.mark.parametrize("make, message", [
    (lambda: qlora.QLoraConfig(block_size=63), "block_size: expected an even number"),
    (lambda: qlora.QLoraConfig(absmax_block_size=0), "absmax_block_size: expected a positive integer, got 0"),
    (lambda: qlora.QLoraConfig(absmax_code="int8"), "absmax_code: expected one of linear, dynamic, got 'int8'"),
    (lambda: qlora.as_lora(model.init_params(SMALL), SMALL),
     "config: expected the config of a QLoRA model (a QLoraConfig in config.lora), got None"),
    (lambda: qlora.add_qlora(model.init_params(SMALL), SMALL, lora.LoraConfig()),
     "qlora_config: expected a QLoraConfig, got a LoraConfig"),
    (lambda: methods.method("qlora").check(ModelConfig(d_model=8, n_heads=2, d_ff=12), finetune.FinetuneConfig(
        method="qlora", lora=lora.LoraConfig(rank=2)), 10),
     "block_size: expected a divisor of the number of weights 96, got 64 (h.0.mlp.fc.W, shape (12, 8))"),
    (lambda: methods.method("qlora").merge(model.init_params(SMALL), SMALL),
     "config: expected the config of a QLoRA model (a QLoraConfig in config.lora), got None"),
])
def test_bad_qlora_settings_are_one_clear_line(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("absmax_code", nf4.ABSMAX_CODES)
def test_as_lora_is_the_same_function_on_the_dequantized_base_and_the_config_says_the_code(absmax_code):
    """qlora.as_lora, what the export writes: the LoRA model on W = deq(Q_W) computes the QLoRA loss exactly (the
    same float32 W, widened; the same adapters), and the config's dict names a non-default absmax code only."""
    _, params, config, trainable, batch = _qlora_model(absmax_code=absmax_code)
    loss, _ = model.loss_and_grads(params, config, batch, trainable)
    as_lora, lora_config = qlora.as_lora(params, config)
    assert type(lora_config.lora) is lora.LoraConfig and lora_config.lora.scale == config.lora.scale
    assert set(as_lora) == set(model.param_shapes(SMALL)) | {n for n in params if ".lora_" in n}
    assert np.array_equal(as_lora["h.0.attn.q.W"], nf4.dequantize_nf4(qlora.quantized_record(params, "h.0.attn.q"),
                                                                      as_lora["h.0.attn.q.W"].shape,
                                                                      absmax_code=absmax_code))
    assert model.loss_and_grads(as_lora, lora_config, batch, trainable)[0] == pytest.approx(loss, rel=1e-13)
    d = config.to_dict()["lora"]
    assert ("absmax_code" in d) is (absmax_code != "linear")
    assert ModelConfig.from_dict(config.to_dict()) == config
