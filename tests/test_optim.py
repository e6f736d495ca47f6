"""AdamW, clipping and the schedule, each checked against numbers worked out by hand."""

import math

import numpy as np
import pytest

from minilora.optim import (
    adamw_init,
    adamw_step,
    clip_grad_norm,
    lr_at,
    optimizer_state_bytes,
    state_from_arrays,
    state_to_arrays,
)


def test_init_keeps_moments_for_trainable_names_only():
    params = {"W": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32), "lora_A": np.ones((2, 4), np.float32)}
    state = adamw_init(params, ["lora_A"])
    assert state["step"] == 0
    assert set(state["m"]) == {"lora_A"} and set(state["v"]) == {"lora_A"}
    assert state["m"]["lora_A"].shape == (2, 4) and state["m"]["lora_A"].dtype == np.float32
    assert (state["m"]["lora_A"] == 0).all() and (state["v"]["lora_A"] == 0).all()
    assert optimizer_state_bytes(state) == 2 * 2 * 4 * 4  # m and v, 8 float32 each


def test_init_rejects_unknown_and_empty_trainable():
    params = {"W": np.ones((2, 2))}
    with pytest.raises(ValueError, match="trainable.*unknown.*'nope'"):
        adamw_init(params, ["W", "nope"])
    with pytest.raises(ValueError, match="trainable"):
        adamw_init(params, [])
    with pytest.raises(ValueError, match="trainable.*string"):
        adamw_init(params, "W")


def test_two_adamw_steps_match_hand_computation():
    # A 1-D parameter so weight decay is not involved; lr, betas as in the defaults.
    p = np.array([1.0, -2.0])
    params = {"b": p}
    state = adamw_init(params, ["b"])
    lr, b1, b2, eps = 0.1, 0.9, 0.95, 1e-8
    g1 = np.array([0.5, -1.0])
    g2 = np.array([-0.25, 2.0])

    adamw_step(params, {"b": g1}, state, lr)
    # step 1: m = 0.1 g1, v = 0.05 g1^2; m_hat = g1, v_hat = g1^2, so the update is lr * sign(g1) (up to eps)
    m1 = 0.1 * g1
    v1 = 0.05 * g1**2
    expected1 = np.array([1.0, -2.0]) - lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    np.testing.assert_allclose(expected1, [0.9, -1.9], rtol=0, atol=1e-8)  # the sign-step claim
    assert params["b"] is p  # updated in place
    np.testing.assert_allclose(params["b"], expected1, rtol=0, atol=1e-12)

    adamw_step(params, {"b": g2}, state, lr)
    m2 = 0.9 * m1 + 0.1 * g2  # [0.02, 0.11]
    v2 = 0.95 * v1 + 0.05 * g2**2  # [0.015, 0.2475]
    np.testing.assert_allclose(m2, [0.02, 0.11], rtol=0, atol=1e-15)
    np.testing.assert_allclose(v2, [0.015, 0.2475], rtol=0, atol=1e-15)
    m_hat = m2 / (1 - 0.9**2)  # / 0.19
    v_hat = v2 / (1 - 0.95**2)  # / 0.0975
    expected2 = expected1 - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(state["m"]["b"], m2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(state["v"]["b"], v2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(params["b"], expected2, rtol=0, atol=1e-12)
    assert state["step"] == 2


def test_weight_decay_applies_to_matrices_and_skips_vectors():
    W = np.full((2, 2), 2.0)
    g_ln = np.full(2, 3.0)
    params = {"W": W.copy(), "ln.g": g_ln.copy()}
    state = adamw_init(params, ["W", "ln.g"])
    zero = {"W": np.zeros((2, 2)), "ln.g": np.zeros(2)}
    # Zero gradients: the Adam term is 0 / (0 + eps) = 0, only the decay moves p.
    adamw_step(params, zero, state, lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(params["W"], 2.0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-15)  # 1.9
    np.testing.assert_array_equal(params["ln.g"], g_ln)


def test_float32_parameters_stay_float32():
    params = {"W": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    state = adamw_init(params, ["W", "b"])
    grads = {"W": np.full((3, 2), 0.1, np.float32), "b": np.full(2, -0.1, np.float32)}
    adamw_step(params, grads, state, lr=1e-2, weight_decay=0.1)
    for name in params:
        assert params[name].dtype == np.float32
        assert state["m"][name].dtype == np.float32 and state["v"][name].dtype == np.float32
    assert not np.allclose(params["W"], 1.0)  # it did move


def test_step_rejects_gradient_for_frozen_name():
    params = {"W": np.ones((2, 2)), "lora_A": np.ones((1, 2))}
    state = adamw_init(params, ["lora_A"])
    with pytest.raises(ValueError, match="grads.*'W'"):
        adamw_step(params, {"W": np.ones((2, 2))}, state, lr=0.1)
    assert state["step"] == 0
    with pytest.raises(ValueError, match=r"grads\['lora_A'\].*\(1, 2\)"):
        adamw_step(params, {"lora_A": np.ones((2, 1))}, state, lr=0.1)


def test_clip_scales_norm_5_down_to_1():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0, 0.0]])}  # global norm sqrt(9 + 16) = 5
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(5.0, abs=1e-12)
    np.testing.assert_allclose(grads["a"], [0.6], atol=1e-15)
    np.testing.assert_allclose(grads["b"], [[0.8, 0.0]], atol=1e-15)
    after = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    assert after == pytest.approx(1.0, abs=1e-12)


def test_clip_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4], np.float32)}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(0.5, abs=1e-7)
    np.testing.assert_array_equal(grads["a"], np.array([0.3, 0.4], np.float32))
    assert grads["a"].dtype == np.float32
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


def test_lr_schedule_hand_values():
    kw = dict(max_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert lr_at(0, **kw) == pytest.approx(1e-4, abs=1e-18)  # max_lr * 1/10
    assert lr_at(4, **kw) == pytest.approx(5e-4, abs=1e-18)
    assert lr_at(9, **kw) == pytest.approx(1e-3, abs=1e-18)  # end of warmup: the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3, abs=1e-18)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(5.5e-4, abs=1e-18)  # cosine midpoint: (max + min) / 2
    # a quarter of the way: min + 0.5 (max - min)(1 + cos(pi/4))
    assert lr_at(35, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.sqrt(0.5)), abs=1e-18)
    assert lr_at(110, **kw) == pytest.approx(1e-4, abs=1e-18)
    assert lr_at(500, **kw) == pytest.approx(1e-4, abs=1e-18)
    assert lr_at(0, 1.0, 0, 4) == 1.0  # no warmup: start at the peak


def test_lr_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 1e-3, 20, 10)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, 1e-3, 0, 10, min_lr=1e-2)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1e-3, 0, 10)


def test_state_arrays_roundtrip():
    params = {"W": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    state = adamw_init(params, ["W"])
    adamw_step(params, {"W": np.full((2, 3), 0.5, np.float32)}, state, lr=0.1)
    arrays = state_to_arrays(state)
    assert set(arrays) == {"opt.step", "opt.m.W", "opt.v.W"}
    arrays["unrelated"] = np.zeros(1)  # other checkpoint entries are ignored
    restored = state_from_arrays(arrays, params)
    assert restored["step"] == 1
    np.testing.assert_array_equal(restored["m"]["W"], state["m"]["W"])
    np.testing.assert_array_equal(restored["v"]["W"], state["v"]["W"])
    assert restored["m"]["W"] is not state["m"]["W"]
    with pytest.raises(ValueError, match=r"opt.m.W.*\(2, 3\)"):
        state_from_arrays({**arrays, "opt.m.W": np.zeros((3, 2))}, params)


def test_adamw_step_in_scratch_buffers_gives_the_formulas_numbers():
    from minilora import optim

    # adamw_step computes in two scratch arrays (out=); the same operations in the same order as the
    # formulas written with a temporary per operator give the same float32 numbers, bit for bit
    rng = np.random.default_rng(0)
    p = {"W": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    ref = {n: a.copy() for n, a in p.items()}
    m = {n: np.zeros_like(a) for n, a in p.items()}
    v = {n: np.zeros_like(a) for n, a in p.items()}
    state = optim.adamw_init(p, list(p))
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    for t in range(1, 4):
        g = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in p.items()}
        optim.adamw_step(p, g, state, lr, weight_decay=wd)
        for n in ref:
            m[n] = b1 * m[n] + (1.0 - b1) * g[n]
            v[n] = b2 * v[n] + (1.0 - b2) * (g[n] * g[n])
            if ref[n].ndim >= 2:
                ref[n] = ref[n] * (1.0 - lr * wd)
            ref[n] = ref[n] - lr * (m[n] / (1.0 - b1**t)) / (np.sqrt(v[n] / (1.0 - b2**t)) + eps)
    for n in p:
        assert np.array_equal(p[n], ref[n]), n
