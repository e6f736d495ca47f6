"""The head alone: a linear probe of the frozen model, the baseline every classification method is read against.

Every method trains the classification head cls.W (K, C), cls.b (K,) on `kind`
(finetune adds it under every method). This one trains nothing else and adds
nothing: the logits are

    logits = h[b, last[b]] @ cls.W.T + cls.b

on the frozen model's last hidden state h, so the only question is what a
linear map can read off the features the pretrained model already computes.
A method that adds vectors and trains the head too is doing something only if
it beats this. Its gradient is the head's own (model.py, the classifier loss);
no block's backward runs a dW, and nothing below the head needs a dx.

A generative task has no head, so there is nothing to train: FinetuneConfig
refuses the pair (Method.needs_head).
"""

from . import Method, register


def _setup(base_params, model_config, config, tokenizer=None):
    """The base arrays, shared (never written): the head that finetune adds is the only trainable name."""
    return dict(base_params), model_config, set()


def _gradcheck_setup(params, config, rng):
    """The model with its head; the classifier check trains cls.W and cls.b (the LM check has nothing to train)."""
    return params, config, set()


HEAD = register(Method("head", "the classification head alone on the frozen model (a linear probe; --task kind)",
                       1e-2, _setup, study_lrs=(), gradcheck_setup=_gradcheck_setup, color="tab:gray",
                       needs_head=True))
