"""The layers above the ops on device arrays: model, LoRA, prompt, head, optimizer,
checkpoints, the training loop, fine-tuning, sampling and evaluation.

Each runs on NumPy and on each backend of the `xp` fixture from the same host
weights and data, and must agree. Tolerances:

    one loss or gradient, float64:  rtol 1e-10, atol 1e-12
    one loss or gradient, float32:  rtol 1e-4,  atol 1e-5
    losses after a few training steps (float32):  rtol 1e-3

(On the stand-in the numbers are identical: it computes with NumPy.)
"""

import numpy as np
import pytest

from minilora import backend, checkpoint, corpus, evaluation, finetune, gradcheck, model, optim, runs, sampling, \
    tasks, tokenizer
from minilora.methods import dora, lora, prompt, qlora
from minilora.model import ModelConfig
from minilora.pretrain import PretrainConfig, pretrain
from minilora.train import TrainConfig

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}
CONFIG = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
B, T, K = 3, 8, 3
STRATEGIES = ("full", "lora", "dora", "qlora", "prompt", "classifier")


def host(a):
    return backend.to_numpy(a)


def random_params(dtype, seed=0):
    """Random weights with every term alive (not the 0.02 init), plus adapters, a prompt and a head."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in model.param_shapes(CONFIG).items():
        scale = 0.2 if name.endswith((".g", ".b")) else 0.3
        params[name] = (1.0 if name.endswith(".g") else 0.0) + scale * rng.standard_normal(shape)
    params = model.add_head(params, K, seed=1)
    params = {n: p.astype(dtype) for n, p in params.items()}
    return params


def strategy(name, dtype, xp):
    """(params on xp, trainable names, loss function of (params, trainable)) for one strategy."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, CONFIG.vocab_size, (B, T))
    y = rng.integers(0, CONFIG.vocab_size, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(dtype)
    mask[:, -1] = 1.0
    last, labels = rng.integers(1, T, B), rng.integers(0, K, B)
    params = random_params(dtype)
    config = CONFIG
    if name == "lora":
        lcfg = lora.LoraConfig(rank=2, alpha=3.0, targets=tuple(lora.TARGETS))
        params, config = lora.add_lora(params, CONFIG, lcfg, seed=2)
        for n in lora.lora_names(params):
            params[n] = (0.5 * rng.standard_normal(params[n].shape)).astype(dtype)  # B != 0
        trainable = set(lora.lora_names(params))
    elif name == "dora":
        dcfg = dora.DoraConfig(rank=2, alpha=3.0, targets=tuple(lora.TARGETS))
        params, config = dora.add_dora(params, CONFIG, dcfg, seed=2)
        trainable = set(lora.adapter_names(config))
        for n in trainable:  # B != 0, and m away from the row norms
            params[n] = (params[n] * (1.0 + 0.2 * rng.standard_normal(params[n].shape)) if n.endswith("vector")
                         else 0.5 * rng.standard_normal(params[n].shape)).astype(dtype)
    elif name == "qlora":
        # adapters on q, k, v (their shared form) and fc; o and proj are frozen NF4 linears (the nf4 pair)
        qcfg = qlora.QLoraConfig(rank=2, alpha=3.0, targets=("q", "k", "v", "fc"))
        params, config = qlora.add_qlora(params, CONFIG, qcfg, seed=2)
        trainable = set(lora.adapter_names(config))
        for n in trainable:  # B != 0
            params[n] = (0.5 * rng.standard_normal(params[n].shape)).astype(dtype)
    elif name == "prompt":
        params = prompt.add_prompt(params, 3, init="random", seed=3)
        trainable = {"prompt"}
    else:
        trainable = set(params) - {"cls.W", "cls.b"} if name == "full" else {"cls.W", "cls.b", "ln_f.g"}
    params = model.params_to(params, xp)
    batch = {"x": x, "last": last, "labels": labels} if name == "classifier" else {"x": x, "y": y, "mask": mask}

    def loss_fn(p, tr):
        return model.loss_and_grads(p, config, batch, tr)

    return params, trainable, loss_fn


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_loss_and_grads_match_numpy(xp, name, dtype):
    ref_params, trainable, ref_fn = strategy(name, dtype, np)
    params, _, fn = strategy(name, dtype, xp)
    ref_loss, ref_grads = ref_fn(ref_params, trainable)
    loss, grads = fn(params, trainable)
    assert isinstance(loss, float) and set(grads) == trainable
    np.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    for n, g in grads.items():
        assert backend.array_module(g) is xp and g.dtype == dtype, n
        np.testing.assert_allclose(host(g), ref_grads[n], **TOL[dtype], err_msg=n)


@pytest.mark.parametrize("name", STRATEGIES)
def test_model_gradients_on_device_match_finite_differences(device_xp, name):
    """float64, 3 sampled coordinates of every trainable tensor, perturbed on the device."""
    params, trainable, fn = strategy(name, np.float64, device_xp)
    _, grads = fn(params, trainable)
    rng = np.random.default_rng(0)
    for n in sorted(trainable):
        g = host(grads[n]).reshape(-1)
        live = np.flatnonzero(np.abs(g) >= 1e-3 * np.abs(g).max())
        coords = rng.choice(live, size=min(3, live.size), replace=False)
        num = gradcheck.numerical_gradient_sampled(lambda: fn(params, ())[0], params[n], coords)
        err = gradcheck.rel_error(g[coords], num)
        assert err <= gradcheck.TOLERANCE, f"{name} d/d{n}: rel error {err:.2e}"


def test_gradcheck_check_model_runs_on_device_arrays():
    import standin

    params, trainable, fn = strategy("lora", np.float64, standin)
    results = gradcheck.check_model("lora", fn, params, trainable, np.random.default_rng(0))
    assert all(r.passed for r in results)


def test_adamw_and_clipping_match_numpy(xp):
    ref_params, trainable, ref_fn = strategy("lora", np.float32, np)
    params, _, fn = strategy("lora", np.float32, xp)
    ref_state, state = optim.adamw_init(ref_params, trainable), optim.adamw_init(params, trainable)
    for step in range(3):
        for p, f, s in ((ref_params, ref_fn, ref_state), (params, fn, state)):
            _, grads = f(p, trainable)
            optim.clip_grad_norm(grads, 0.5)
            optim.adamw_step(p, grads, s, 1e-2, weight_decay=0.1)
    for n in trainable:
        assert backend.array_module(params[n]) is xp
        np.testing.assert_allclose(host(params[n]), ref_params[n], rtol=1e-3, atol=1e-5, err_msg=n)
    back = optim.state_from_arrays(optim.state_to_arrays(state), params)
    assert back["step"] == 3
    for n in trainable:
        assert backend.array_module(back["m"][n]) is xp
        np.testing.assert_array_equal(host(back["v"][n]), host(state["v"][n]))


def test_checkpoint_of_device_params_round_trips(xp, tmp_path):
    params = model.params_to(random_params(np.float32), xp)
    path = str(tmp_path / "c.npz")
    checkpoint.save_checkpoint(path, params, {"model": CONFIG.to_dict()})
    saved, meta, _ = checkpoint.load_checkpoint(path)
    assert meta["model"] == CONFIG.to_dict()
    back = model.params_to(saved, xp)
    for n, p in params.items():
        assert type(saved[n]) is np.ndarray and backend.array_module(back[n]) is xp
        np.testing.assert_array_equal(host(back[n]), host(p))


def test_lora_add_merge_unmerge_and_adapter_files_on_device(xp, tmp_path):
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    base = model.params_to(random_params(np.float32), xp)
    params, config = lora.add_lora(base, CONFIG, lcfg, seed=0)
    names = lora.lora_names(params)
    assert all(backend.array_module(params[n]) is xp for n in names)
    assert all(not host(params[n]).any() for n in names if n.endswith("lora_B"))  # B = 0 at init
    rng = np.random.default_rng(1)
    for n in names:
        params[n] = backend.to_device(rng.standard_normal(params[n].shape).astype(np.float32), xp)
    merged, merged_config = lora.merge(params, config)
    ref, _ = lora.merge({n: host(p) for n, p in params.items()}, config)
    for n, p in merged.items():
        assert backend.array_module(p) is xp, n
        np.testing.assert_allclose(host(p), ref[n], **TOL[np.float32], err_msg=n)
    unmerged, _ = lora.unmerge(merged, merged_config, {n: params[n] for n in names}, lcfg)
    for n, p in unmerged.items():
        np.testing.assert_allclose(host(p), host(params[n]), rtol=1e-4, atol=1e-5, err_msg=n)
    path = str(tmp_path / "adapter.npz")
    lora.save_adapter(path, params, names, config, base)
    loaded, loaded_config, _ = lora.load_adapter(path, base, CONFIG)
    assert loaded_config == config
    for n in names:
        assert backend.array_module(loaded[n]) is xp
        np.testing.assert_array_equal(host(loaded[n]), host(params[n]))


def test_prompt_and_head_are_created_on_the_params_device(xp):
    params = model.params_to(random_params(np.float32), xp)
    for init in ("vocab", "random", "text"):
        p = prompt.add_prompt(params, 4, init=init, seed=0, init_ids=[1, 2])
        assert backend.array_module(p["prompt"]) is xp and p["prompt"].dtype == np.float32
    headed = model.add_head({n: v for n, v in params.items() if not n.startswith("cls.")}, 4)
    assert backend.array_module(headed["cls.W"], headed["cls.b"]) is xp


def test_a_short_pretraining_run_matches_numpy(xp, tmp_path):
    config = PretrainConfig.fast()
    config.train.steps = 4
    _, ref = pretrain(config, run_dir=str(tmp_path / "np"), backend="numpy")
    params, summary = pretrain(config, run_dir=str(tmp_path / "xp"), backend=xp.__name__)
    assert all(backend.array_module(p) is xp for p in params.values())
    np.testing.assert_allclose(summary["val_loss"], ref["val_loss"], rtol=1e-3)
    loaded, _, _, _ = runs.load_model(str(tmp_path / "xp"), xp)
    for n, p in loaded.items():
        np.testing.assert_array_equal(host(p), host(params[n]))


@pytest.fixture(scope="module")
def pretrained_tiny():
    """A tiny pretrained model on the host (a few steps: the point is the code path, not the skill)."""
    import tempfile

    config = PretrainConfig.fast()
    config.model = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=128)
    config.train.steps = 3
    with tempfile.TemporaryDirectory() as d:
        params, _ = pretrain(config, run_dir=d, backend="numpy")
    return params, config.model


@pytest.mark.parametrize("method,task", [("full", "subject"), ("lora", "subject"), ("prompt", "subject"),
                                         ("lora", "kind"), ("dora", "subject"),
                                         ("prefix", "subject")])
def test_finetuning_matches_numpy(xp, pretrained_tiny, method, task):
    base, mc = pretrained_tiny
    train = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=3, weight_decay=0.0)

    def run(module):
        cfg = finetune.FinetuneConfig(method=method, task=task, n_train=16, n_test=8, n_prompt=4, n_prefix=3,
                                      train=train)
        params, _, trainable, summary = finetune.finetune(model.params_to(base, module), mc, tokenizer.CharTokenizer(), cfg)
        assert all(backend.array_module(params[n]) is module for n in trainable)
        return summary

    ref, got = run(np), run(xp)
    np.testing.assert_allclose(got["final_train_loss"], ref["final_train_loss"], rtol=1e-3)
    assert abs(got["metric"] - ref["metric"]) <= 1 / 8  # at most one test record may flip on a near-tie


def test_sampling_and_decoding_match_numpy(xp, pretrained_tiny):
    base, mc = pretrained_tiny
    params = model.params_to(base, xp)
    tok = tokenizer.CharTokenizer()
    prompts = [tok.encode(p) for p in ("the ", "the ", "a cat ", "the dog ", "a cow ")]
    for temperature, top_k in ((0.0, None), (1.0, 5)):
        ref = sampling.decode(base, mc, prompts, 6, temperature, top_k, np.random.default_rng(0),
                              stop_id=corpus.NEWLINE_ID)
        got = sampling.decode(params, mc, prompts, 6, temperature, top_k, np.random.default_rng(0),
                              stop_id=corpus.NEWLINE_ID)
        assert [r.tolist() for r in got] == [r.tolist() for r in ref]


def test_evaluation_matches_numpy(xp, pretrained_tiny):
    base, mc = pretrained_tiny
    params = model.params_to(base, xp)
    tok = tokenizer.CharTokenizer()
    val = tok.encode(corpus.train_val_text(10, 20, 1)[1])
    np.testing.assert_allclose(evaluation.strided_val_loss(params, mc, val, batch_size=8),
                               evaluation.strided_val_loss(base, mc, val, batch_size=8), rtol=1e-5)
    records = tasks.task_splits("subject", 4, 6, 0)[1]
    assert evaluation.exact_match(params, mc, tok, records) == evaluation.exact_match(base, mc, tok, records)
    headed_np = model.add_head(base, len(tasks.CLASS_NAMES), seed=0)
    headed = model.params_to(headed_np, xp)
    crecords = tasks.task_splits("kind", 4, 10, 0)[1]
    assert evaluation.classification_accuracy(headed, mc, tok, crecords, batch_size=4) == \
        evaluation.classification_accuracy(headed_np, mc, tok, crecords, batch_size=4)
