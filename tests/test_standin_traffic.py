"""Host-device traffic, counted by the stand-in: a training step brings back only its loss,
and sampling and evaluation cross once per batch, not once per token.

A conversion to the host (float(x), int(x), .get(), ...) on a GPU is a copy
plus a synchronisation: the host waits for every queued kernel. One per step
is the price of logging the loss; one per tensor, or per generated token,
serialises the GPU. The ops therefore check ids, targets and masks on the host
before they move (model.py), clipping keeps its norm on the device (optim.py),
and decoding chooses tokens on the device (sampling.py).
"""

import numpy as np
import pytest

import standin as sp
from minilora import corpus, evaluation, model, ops, optim, sampling, tasks, tokenizer
from minilora.methods import lora
from minilora.model import ModelConfig

CHAR = tokenizer.CharTokenizer()

CONFIG = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
B, T = 3, 8

def dev(a):
    return sp.asarray(np.asarray(a))


def _counted(fn):
    with sp.count_transfers() as t:
        fn()
    return t


def _ids(seed=0, shape=(B, T), high=11):
    return np.random.default_rng(seed).integers(0, high, shape)


def _n(*shape, seed=0):
    return dev(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


SILENT_OPS = {
    "linear": lambda: ops.linear_backward(_n(B, T, 5), ops.linear_forward(_n(B, T, 4), _n(5, 4), _n(5))[1]),
    "layer_norm": lambda: ops.layer_norm_backward(_n(B, T, 4), ops.layer_norm_forward(_n(B, T, 4), _n(4), _n(4))[1]),
    "gelu": lambda: ops.gelu_backward(_n(B, T, 4), ops.gelu_forward(_n(B, T, 4))[1]),
    "softmax": lambda: ops.softmax_backward(_n(B, T, 4), ops.softmax_forward(_n(B, T, 4))[1]),
    "attention": lambda: ops.attention_backward(_n(B, T, 4), ops.attention_forward(_n(B, T, 4), _n(B, T, 4),
                                                                                   _n(B, T, 4), 2)[1]),
    "dropout (mask)": lambda: ops.dropout_backward(_n(B, T, 4), ops.dropout_forward(
        _n(B, T, 4), 0.5, mask=dev(np.ones((B, T, 4), bool)))[1]),
    "lora_linear": lambda: lora.lora_linear_backward(_n(B, T, 5), lora.lora_linear_forward(
        _n(B, T, 4), _n(5, 4), _n(5), _n(2, 4), _n(5, 2), 2.0)[1]),
    "embedding backward": lambda: ops.embedding_backward(_n(B, T, 4), (dev(_ids()), (11, 4))),
    "cross_entropy backward": lambda: ops.cross_entropy_backward(1.0, (
        _n(B * T, 11), _n(B * T), dev(_ids().reshape(-1)), _n(B * T), dev(np.float32(B * T)), (B, T, 11))),
}


@pytest.mark.parametrize("op", list(SILENT_OPS))
def test_ops_make_no_host_sync(op):
    t = _counted(SILENT_OPS[op])
    assert t.to_host == 0, t.events


def test_embedding_forward_makes_no_host_sync():
    ids, wte = dev(_ids()), _n(11, 4)
    t = _counted(lambda: ops.embedding_forward(ids, wte))
    assert t.to_host == 0, t.events


def test_cross_entropy_forward_makes_no_host_sync():
    logits, targets, mask = _n(B, T, 11), dev(_ids()), dev(np.ones((B, T), np.float32))
    t = _counted(lambda: ops.cross_entropy_forward(logits, targets, mask))
    assert t.to_host == 0, t.events


def test_clip_grad_norm_makes_no_host_sync():
    grads = {f"g{i}": _n(4, 4, seed=i) for i in range(5)}
    t = _counted(lambda: optim.clip_grad_norm(grads, 0.1))
    assert t.to_host == 0, t.events


def test_adamw_step_makes_no_host_sync():
    params = {f"p{i}": _n(4, 4, seed=i) for i in range(5)}
    grads = {n: _n(4, 4, seed=10 + i) for i, n in enumerate(params)}
    state = optim.adamw_init(params, list(params))
    t = _counted(lambda: optim.adamw_step(params, grads, state, 1e-3, weight_decay=0.1))
    assert t.to_host == 0 and t.to_device == 0, t.events


def _setup(name):
    params = model.init_params(CONFIG, 0)
    config = CONFIG
    if name == "lora":
        params, config = lora.add_lora(params, CONFIG, lora.LoraConfig(rank=2, alpha=4.0))
        trainable = set(lora.lora_names(params))
    elif name == "classifier":
        params = model.add_head(params, 3)
        trainable = set(params)
    else:
        trainable = set(params)
    return model.params_to(params, sp), trainable, config


@pytest.mark.parametrize("name", ["full", "lora", "classifier"])
def test_a_training_step_brings_back_only_the_loss(name):
    params, trainable, config = _setup(name)
    state = optim.adamw_init(params, trainable)
    x = _ids(1)
    batch = ({"x": x, "last": np.full(B, T - 1), "labels": np.arange(B) % 3} if name == "classifier"
             else {"x": x, "y": _ids(2), "mask": np.ones((B, T), np.float32)})

    def step():
        loss, grads = model.loss_and_grads(params, config, batch, trainable)
        optim.clip_grad_norm(grads, 1.0)
        optim.adamw_step(params, grads, state, 1e-3, weight_decay=0.1)

    step()  # warm: nothing is created lazily, but count a steady-state step
    t = _counted(step)
    assert t.to_host == 1, t.events  # float(loss)
    assert t.to_device <= 3, t.events  # the batch's x, y, mask (or last, labels): per batch, never per tensor


def _decode_counts(fn):
    """to_host crossings of a decoder at 3 and at 6 new tokens."""
    return [_counted(lambda n=n: fn(n)).to_host for n in (3, 6)]


@pytest.fixture(scope="module")
def device_params():
    return model.params_to(model.init_params(CONFIG, 0), sp)


PROMPTS = [list(_ids(3, (4,))), list(_ids(4, (4,))), list(_ids(5, (3,)))]  # two batches: lengths 4 and 3


def test_greedy_decoding_crosses_per_batch_not_per_token(device_params):
    short, long = _decode_counts(lambda n: sampling.decode(device_params, CONFIG, PROMPTS, n))
    assert short == long, f"{short} crossings for 3 tokens, {long} for 6"


def test_sampling_crosses_per_batch_not_per_token(device_params):
    short, long = _decode_counts(lambda n: sampling.decode(device_params, CONFIG, PROMPTS, n, 1.0, 5,
                                                           np.random.default_rng(0)))
    assert short == long, f"{short} crossings for 3 tokens, {long} for 6"


def _val_counts(fn):
    """to_host crossings of an evaluation at 2 and at 4 batches."""
    return [_counted(lambda k=k: fn(k)).to_host for k in (2, 4)]


def test_validation_loss_crosses_a_fixed_number_of_times_per_batch(device_params):
    data = _ids(5, (200,))
    # windows start every T/2 = 4 tokens: 48 windows, in batches of 24 and of 12
    two, four = _val_counts(lambda k: evaluation.strided_val_loss(device_params, CONFIG, data,
                                                                       batch_size=48 // k))
    assert four == 2 * two and two > 0


def test_validation_loss_crosses_once_per_batch(device_params):
    data = _ids(5, (200,))
    t = _counted(lambda: evaluation.strided_val_loss(device_params, CONFIG, data, batch_size=24))
    assert t.to_host == 2, t.events  # two batches, one loss each


def test_classification_accuracy_crosses_a_fixed_number_of_times_per_batch():
    mc = ModelConfig(context_length=128, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    params = model.params_to(model.add_head(model.init_params(mc, 0), len(tasks.CLASS_NAMES)), sp)
    records = tasks.task_splits("kind", 4, 12, 0)[1]
    two, four = [_counted(lambda k=k: evaluation.classification_accuracy(params, mc, CHAR, records, batch_size=12 // k))
                 .to_host for k in (2, 4)]
    assert four == 2 * two and two > 0


def test_exact_match_decodes_through_decode():
    # exact_match's traffic is decode's (above) plus nothing per record
    mc = ModelConfig(context_length=128, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    params = model.params_to(model.init_params(mc, 0), sp)
    records = tasks.task_splits("subject", 4, 3, 0)[1]
    prompts = [CHAR.encode(tasks.format_prompt(r["instruction"], r.get("input", "")))
               for r in records]
    n = max(len(r["output"]) for r in records) + 1 + 4  # exact_match's default
    decode = _counted(lambda: sampling.decode(params, mc, prompts, n, stop_id=corpus.NEWLINE_ID))
    match = _counted(lambda: evaluation.exact_match(params, mc, CHAR, records))
    assert match.to_host == decode.to_host
