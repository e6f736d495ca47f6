"""An optional, independent cross-check of the whole model against PyTorch autograd.

The same GPT is written again below in a few lines of plain torch (float64) and
differentiated by autograd; the losses and the gradient of every trained name
must match minilora's hand-written backward to ~1e-10 relative. Parameters are
random and far from the 0.02 init (weights std 0.3, LayerNorm gains 1 + 0.2
noise, random biases), so no term is negligible. Skipped when torch is absent.
"""

import math
from dataclasses import replace

import numpy as np
import pytest

import clients

torch = clients.require("torch")
F = torch.nn.functional

from minilora import model  # noqa: E402
from minilora.methods import lora, prompt  # noqa: E402
from minilora.model import ModelConfig  # noqa: E402

CONFIG = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
B, T = 3, 8
RTOL = 1e-10  # float64; the gradients differ only by summation order


def random_params(config, seed=0):
    """Random float64 parameters with every term alive (not the 0.02 GPT-2 init)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in model.param_shapes(config).items():
        if name.endswith(".g"):
            params[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".b"):
            params[name] = 0.1 * rng.standard_normal(shape)
        else:
            params[name] = 0.3 * rng.standard_normal(shape)
    return params


def randomise(params, names, seed):
    """A new dict with the named arrays replaced by random non-zero values."""
    rng = np.random.default_rng(seed)
    return {**params, **{n: 0.3 * rng.standard_normal(params[n].shape) for n in names}}


def batch(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CONFIG.vocab_size, (B, T))
    y = rng.integers(0, CONFIG.vocab_size, (B, T))
    mask = (rng.random((B, T)) < 0.6).astype(np.float64)
    mask[0, -1] = 1.0  # at least one counted position
    return x, y, mask


def to_torch(params):
    return {n: torch.tensor(p, dtype=torch.float64, requires_grad=True) for n, p in params.items()}


def torch_linear(P, prefix, x, scale):
    """y = x (W + s B A)^T + b, in the unmerged form; the key has no bias."""
    y = F.linear(x, P[prefix + ".W"], P.get(prefix + ".b"))
    if prefix + ".lora_A" in P:
        y = y + scale * F.linear(F.linear(x, P[prefix + ".lora_A"]), P[prefix + ".lora_B"])
    return y


def torch_forward(P, config, ids, scale=None):
    """Final hidden states (B, T, C) of the real tokens, written from the GPT definition."""
    C, NH = config.d_model, config.n_heads
    hs = C // NH
    nb, nt = ids.shape
    x = P["wte"][ids] + P["wpe"][:nt]  # learned positions 0..T-1 for the real tokens
    n_prompt = 0
    if "prompt" in P:  # soft prompt: prepended, no position embedding
        n_prompt = P["prompt"].shape[0]
        x = torch.cat([P["prompt"].expand(nb, -1, -1), x], dim=1)
    L = x.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(config.n_layers):
        p = f"h.{i}."
        a = F.layer_norm(x, (C,), P[p + "ln_1.g"], P[p + "ln_1.b"], eps=1e-5)
        q, k, v = (torch_linear(P, p + f"attn.{n}", a, scale).view(nb, L, NH, hs).transpose(1, 2) for n in "qkv")
        s = q @ k.transpose(-1, -2) / math.sqrt(hs)
        s = s.masked_fill(~causal, float("-inf"))
        y = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(nb, L, C)
        x = x + torch_linear(P, p + "attn.o", y, scale)
        m = F.layer_norm(x, (C,), P[p + "ln_2.g"], P[p + "ln_2.b"], eps=1e-5)
        f = F.gelu(torch_linear(P, p + "mlp.fc", m, scale), approximate="tanh")
        x = x + torch_linear(P, p + "mlp.proj", f, scale)
    h = F.layer_norm(x, (C,), P["ln_f.g"], P["ln_f.b"], eps=1e-5)
    return h[:, n_prompt:]


def torch_lm_loss(P, config, x, y, mask, scale=None):
    h = torch_forward(P, config, torch.as_tensor(x), scale)
    logits = h @ P["wte"].T  # LM head tied to wte
    nll = F.cross_entropy(logits.reshape(-1, config.vocab_size), torch.as_tensor(y).reshape(-1), reduction="none")
    m = torch.as_tensor(mask).reshape(-1)
    return (nll * m).sum() / m.sum()


def assert_close(name, ours, ref):
    ref = ref.detach().numpy()
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs torch {ref.shape}"
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300)
    assert err < RTOL, f"{name}: relative error {err:.2e} against torch"
    assert np.abs(ref).max() > 1e-6, f"{name}: torch gradient is ~0, the check would be vacuous"


def check_lm(params, trainable, lora_config=None):
    """Loss and the gradients of `trainable` agree with torch; returns minilora's grads."""
    x, y, mask = batch()
    config = CONFIG if lora_config is None else replace(CONFIG, lora=lora_config)
    loss, grads = model.loss_and_grads(params, config, {"x": x, "y": y, "mask": mask}, trainable=trainable)
    P = to_torch(params)
    ref = torch_lm_loss(P, CONFIG, x, y, mask, None if lora_config is None else lora_config.scale)
    ref.backward()
    assert abs(loss - ref.item()) <= RTOL * abs(ref.item()), f"loss {loss!r} vs torch {ref.item()!r}"
    assert set(grads) == set(trainable)
    for name in trainable:
        assert_close(name, grads[name], P[name].grad)
    return grads


def test_full_model_loss_and_every_gradient():
    params = random_params(CONFIG)
    assert "h.0.attn.k.b" not in params
    check_lm(params, set(params))


def test_lora_on_all_six_targets():
    cfg = lora.LoraConfig(rank=2, alpha=3.0, targets=("q", "k", "v", "o", "fc", "proj"))
    params, adapted = lora.add_lora(random_params(CONFIG), CONFIG, cfg, seed=2)
    names = lora.lora_names(params)
    assert len(names) == 2 * 6 * CONFIG.n_layers
    params = randomise(params, names, seed=3)  # B = 0 at init would make dA vanish
    grads = check_lm(params, set(names), cfg)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in grads)
    # the merged form W + s B A gives the same loss as the unmerged one
    x, y, mask = batch()
    merged, _ = lora.merge(params, adapted)
    with torch.no_grad():
        ref = torch_lm_loss(to_torch(params), CONFIG, x, y, mask, cfg.scale).item()
        ref_merged = torch_lm_loss(to_torch(merged), CONFIG, x, y, mask).item()
    assert abs(ref - ref_merged) <= RTOL * abs(ref), f"unmerged {ref!r} vs merged {ref_merged!r}"


def test_prompt_tuning():
    params = prompt.add_prompt(random_params(CONFIG), 3, init="random", seed=4)
    params = randomise(params, ["prompt"], seed=5)
    # T = context_length real tokens plus 3 prompt vectors: the prompt takes no position
    assert T == CONFIG.context_length
    check_lm(params, {"prompt"})


def test_classification_head_all_params():
    params = model.add_head(random_params(CONFIG), 3, seed=6)
    params = randomise(params, ["cls.W", "cls.b"], seed=7)
    rng = np.random.default_rng(8)
    x = rng.integers(0, CONFIG.vocab_size, (B, T))
    last = np.array([T - 1, 2, 5])
    labels = np.array([0, 2, 1])
    loss, grads = model.loss_and_grads(params, CONFIG, {"x": x, "last": last, "labels": labels},
                                       trainable=set(params))
    logits = model.class_logits(params, CONFIG, x, last)
    P = to_torch(params)
    h = torch_forward(P, CONFIG, torch.as_tensor(x))
    ref_logits = F.linear(h[torch.arange(B), torch.as_tensor(last)], P["cls.W"], P["cls.b"])
    ref = F.cross_entropy(ref_logits, torch.as_tensor(labels))
    ref.backward()
    assert_close("logits", np.asarray(logits), ref_logits)
    assert abs(loss - ref.item()) <= RTOL * abs(ref.item()), f"loss {loss!r} vs torch {ref.item()!r}"
    assert set(grads) == set(params)
    for name in params:
        assert_close(name, grads[name], P[name].grad)
