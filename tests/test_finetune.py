"""Strategies as (extra parameters, trainable names), the parameter report, fine-tuning on user data."""

import numpy as np
import pytest

from minilora import corpus, evaluation, finetune, methods, model, tasks, tokenizer
from minilora.methods import lora, prefix, qlora
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig
from minilora.train import TrainConfig, train

TINY = ModelConfig(context_length=128, d_model=16, n_heads=2, n_layers=2, d_ff=32)
CHAR = tokenizer.CharTokenizer()
# the methods that run on a generative task: all but the head alone (a linear probe, tests/test_head.py)
GENERATIVE = [m for m in finetune.METHODS if not methods.method(m).needs_head]


def _copy(params):
    return {n: p.copy() for n, p in params.items()}


@pytest.mark.parametrize("method", finetune.METHODS)
@pytest.mark.parametrize("n_classes", [None, 3])
def test_a_strategy_is_extra_parameters_and_trainable_names(method, n_classes):
    base = model.init_params(TINY, 0)
    before = _copy(base)
    task = "kind" if methods.method(method).needs_head else "subject"  # the head alone: no generative task
    params, config, trainable = finetune.setup_strategy(base, TINY, CHAR, finetune.FinetuneConfig(method=method,
                                                                                                  task=task),
                                                        n_classes)
    # the config describes the params whole: adapter settings exactly when the method has adapters
    assert (config.lora is not None) == (methods.method(method).adapter_config is not None)
    head = {"cls.W", "cls.b"} if n_classes else set()
    adapters = set(lora.adapter_names(config)) if config.lora is not None else set()
    prefixes = set(prefix.prefix_names(config))  # every layer's prefix_k, prefix_v (none unless method prefix)
    assert bool(prefixes) == (method == "prefix")
    expected = {"full": set(base) | head, "prompt": {"prompt"} | head,
                "prefix": prefixes | head}.get(method, adapters | head)
    assert trainable == expected
    added = {"full": set(), "prompt": {"prompt"}, "prefix": prefixes}.get(method, adapters) | head
    if method == "qlora":  # every block linear's W is stored as its NF4 record instead
        stored = {n for n in base if n.startswith("h.") and n.endswith(".W")}
        assert len(stored) == 6 * TINY.n_layers and not stored & set(params)
        added |= {f"{n[:-2]}.{s}" for n in stored for s in qlora.SUFFIXES}
    assert set(params) - set(base) == added
    if method in ("lora", "dora", "qlora"):
        assert len({n for n in adapters if n.endswith((".lora_A", ".lora_B"))}) == 2 * 4 * TINY.n_layers
        assert len(adapters) == (3 if method == "dora" else 2) * 4 * TINY.n_layers  # DoRA adds m per target
    if method == "full":
        params["wte"] += 1.0  # full fine-tuning trains copies: the pretrained weights stay as they were
    for name in base:
        assert np.array_equal(base[name], before[name])


def test_trainable_report_matches_the_lora_formula():
    config = ModelConfig()  # d_model 128, 2 layers
    base = model.init_params(config, 0)
    params, adapted, trainable = finetune.setup_strategy(base, config, CHAR, finetune.FinetuneConfig(method="lora"))
    report = lora.count_report(params, trainable, adapted)
    n = 2 * 4 * 8 * (128 + 128)  # layers x targets x r (d + k)
    assert f"trainable params: {n:,} || all params: {model.count_params(base) + n:,}" in report
    assert "r (d + k) = 8 x (128 + 128) = 2,048 per adapted matrix (16,384 for W itself), 8 matrices" in report
    assert n / model.count_params(base) < 0.05  # the budget: at most 5% of full fine-tuning


def test_finetune_on_users_instruction_file_leaves_the_base_untouched(tmp_path):
    records = tasks.make_instruction_records("plural", 40, seed=1)
    tasks.save_jsonl(records, tmp_path / "mine.jsonl")
    base = model.init_params(TINY, 0)
    before = _copy(base)
    val = CHAR.encode(corpus.make_text(20, 5))
    for method in GENERATIVE:
        config = finetune.FinetuneConfig(method=method, data_file=str(tmp_path / "mine.jsonl"),
                                         train=TrainConfig(steps=3, batch_size=4, warmup_steps=1, lr=1e-3))
        params, _, trainable, s = finetune.finetune(base, TINY, CHAR, config, run_dir=tmp_path / method, val_data=val)
        assert 0.0 <= s["metric"] <= 1.0 and s["trainable_params"] == model.count_params(params, trainable)
        assert s["optimizer_state_bytes"] == 2 * 4 * s["trainable_params"]  # AdamW: two float32 moments each
        assert np.isfinite(s["val_loss_before"]) and np.isfinite(s["val_loss_after"])
        for name in base:
            assert np.array_equal(base[name], before[name]), (method, name)


def test_finetune_classification_from_a_users_file(tmp_path):
    records = [{"text": t, "label": lab} for t, lab in
               [("good day.", "pos"), ("bad day.", "neg")] * 10]
    tasks.save_jsonl(records, tmp_path / "cls.jsonl")
    config = finetune.FinetuneConfig(method="lora", task="kind", data_file=str(tmp_path / "cls.jsonl"),
                                     train=TrainConfig(steps=2, batch_size=4, warmup_steps=1))
    params, _, trainable, s = finetune.finetune(model.init_params(TINY, 0), TINY, CHAR, config)
    assert params["cls.W"].shape == (2, TINY.d_model)  # the labels found in the file: neg, pos
    assert {"cls.W", "cls.b"} <= trainable


def test_malformed_user_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    config = finetune.FinetuneConfig(data_file=str(path))
    with pytest.raises(ValueError, match="line 2"):
        finetune.load_records(config, CHAR)


def test_lora_dropout_uses_the_rng():
    base = model.init_params(TINY, 0)
    config = finetune.FinetuneConfig(method="lora", lora=LoraConfig(dropout=0.5))
    params, adapted, trainable = finetune.setup_strategy(base, TINY, CHAR, config)
    for name in trainable:
        if name.endswith("lora_B"):
            params[name] = np.random.default_rng(0).standard_normal(params[name].shape).astype(np.float32)
    x, y, mask = tasks.instruction_batch(tasks.make_instruction_records("subject", 4, 0), CHAR, 128)
    batch = {"x": x, "y": y, "mask": mask}
    losses = {model.loss_and_grads(params, adapted, batch, trainable, np.random.default_rng(s), train=True)[0]
              for s in (0, 1)}
    assert len(losses) == 2
    eval_losses = {model.loss_and_grads(params, adapted, batch)[0] for _ in range(2)}
    assert len(eval_losses) == 1


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="method: expected one of"):
        finetune.FinetuneConfig(method="adapter")
    with pytest.raises(ValueError, match="task: expected one of"):
        finetune.FinetuneConfig(task="translate")


def test_exact_match_scores_greedy_decoding():
    base = model.init_params(TINY, 0)
    records = tasks.make_instruction_records("subject", 6, 0)
    acc, preds = evaluation.exact_match(base, TINY, CHAR, records, max_new_tokens=3)
    assert acc == 0.0 and len(preds) == 6 and all(isinstance(p, str) and len(p) <= 3 for p in preds)


@pytest.mark.parametrize("method", GENERATIVE)
def test_every_strategy_can_fit_a_small_batch(method):
    # the machinery learns: each strategy alone drives the loss on 4 fixed examples well down
    x, y, mask = tasks.instruction_batch(tasks.make_instruction_records("subject", 4, 0), CHAR, 128)
    # weights 10x GPT-2's init, closer to a trained model's: at std 0.02 attention is near
    # uniform and tiny, and a frozen model barely responds to its prompt or adapters
    base = {n: p * 10.0 if p.ndim == 2 else p for n, p in model.init_params(TINY, 0).items()}
    lr = {"full": 3e-3, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2, "prompt": 1e-1, "prefix": 1e-1, "ia3": 3e-1}[method]
    config = finetune.FinetuneConfig(method=method, train=TrainConfig(steps=80, batch_size=4, lr=lr, min_lr=lr,
                                                                      warmup_steps=0, weight_decay=0.0))
    params, ft_config, trainable = finetune.setup_strategy(base, TINY, CHAR, config)

    class SameBatch:
        def sample(self, rng):
            return {"x": x, "y": y, "mask": mask}

    history, _ = train(params, trainable, ft_config, SameBatch(), config.train)
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    # in front of a random frozen model a soft prompt can shift the output distribution
    # (toward the characters the four answers share) but hardly pick an answer per example
    assert last < (0.95 if method == "prompt" else 0.5) * first, (method, first, last)
