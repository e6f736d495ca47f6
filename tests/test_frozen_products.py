"""A frozen weight never gets a dW, nor any product of dW's shape: counted for every method.

Every array of a training step is viewed as `Recorded`, an ndarray subclass whose __array_ufunc__ notes
the shape of every matrix product (`@` and xp.matmul are the ufunc np.matmul), so every product the
model, the ops and the methods form is seen. The dimensions are all distinct (C = 16, F = 40, B T = 21,
r = 2), so a product of shape (out, in) or (in, out) of a weight is that weight's gradient or the
(out, in) matrix a method exists to avoid (B A, W + s B A).
"""

import numpy as np
import pytest

from minilora import finetune, methods, model
from minilora.methods.lora import LoraConfig
from minilora.model import ModelConfig
from minilora.tokenizer import CharTokenizer

CONFIG = ModelConfig(vocab_size=11, context_length=7, d_model=16, n_heads=2, n_layers=2, d_ff=40)


class Recorded(np.ndarray):
    shapes = None  # the list products are noted in, set by record()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(a) if isinstance(a, Recorded) else a for a in inputs]
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, Recorded) else o for o in outs)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if ufunc is np.matmul:
            Recorded.shapes.append(np.shape(result if outs is None else kwargs["out"][0]))
        if outs is not None:
            return outs[0] if len(outs) == 1 else outs
        return result.view(Recorded) if isinstance(result, np.ndarray) and result.ndim else result


def products_of_a_step(params, config, trainable, batch):
    """The shapes of every matrix product of one loss_and_grads call (every parameter viewed as Recorded)."""
    Recorded.shapes = []
    viewed = {n: p.view(Recorded) for n, p in params.items()}
    _, grads = model.loss_and_grads(viewed, config, batch, trainable)
    return Recorded.shapes, grads


def _setup(name):
    base = model.init_params(CONFIG, seed=0, dtype=np.float64)
    task = "kind" if methods.method(name).needs_head else "subject"  # the head alone trains nothing on this LM step
    ft = finetune.FinetuneConfig(method=name, task=task, n_prompt=3, n_prefix=3, seed=1)
    if isinstance(ft.lora, LoraConfig):  # IA3 has its own fixed targets (k, v, proj) and no rank
        ft.lora.rank, ft.lora.targets = 2, ("q", "k", "v", "o", "fc")  # mlp.proj stays a plain frozen linear
    params, config, trainable = finetune.setup_strategy(base, CONFIG, CharTokenizer(), ft)
    # a non-zero point: B = 0 at the start would hide nothing here, but is not where training runs
    rng = np.random.default_rng(2)
    for n in trainable:
        params[n] = params[n] + 0.1 * rng.standard_normal(params[n].shape)
    return params, config, trainable


def _batch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, CONFIG.vocab_size, (3, CONFIG.context_length))
    return {"x": x, "y": np.roll(x, -1, axis=1)}


def _weight_shapes(params):
    # from the config, not from params: a QLoRA model holds no float W (its NF4 codes instead)
    shapes = {s for n, s in model.param_shapes(CONFIG).items() if n.startswith("h.") and n.endswith(".W")}
    assert shapes == {(16, 16), (40, 16), (16, 40)}
    return shapes


@pytest.mark.parametrize("name", [m for m in methods.METHODS if m != "full"])
def test_no_product_of_a_frozen_weights_shape(name):
    params, config, trainable = _setup(name)
    assert not any(n.endswith(".W") and n.startswith("h.") for n in trainable)  # every W is frozen
    shapes, grads = products_of_a_step(params, config, trainable, _batch())
    assert set(grads) == set(trainable)
    assert len(shapes) > 10, "the recorder saw no products"
    forbidden = _weight_shapes(params) | {s[::-1] for s in _weight_shapes(params)}
    assert not [s for s in shapes if s in forbidden], f"{name}: a product of a frozen W's shape"


def test_the_recorder_sees_dw_under_full_fine_tuning():
    # the positive control: full fine-tuning forms every dW, and the recorder sees them
    params, config, trainable = _setup("full")
    shapes, _ = products_of_a_step(params, config, trainable, _batch())
    assert _weight_shapes(params) <= set(shapes)
