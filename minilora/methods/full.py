"""Full fine-tuning, and the plain linear pair that is every method's base path.

Full fine-tuning adds no parameter and trains every name: W, b, LayerNorms, embeddings.

The causal attention pair (ops.attention) is likewise every block's attention unless a prefix is present.

The plain pair is ops.linear, y = x @ W.T + b, for every linear that no adapter computes. Whether it
is trained is read from `trainable`: a frozen one (neither W nor b trainable) keeps no input in its
cache and its backward forms no dW, only the dx that the layers below need, or nothing at all when
nothing below is trained either. That is the structural contract a frozen weight has under every
method: one frozen pair, with no dW line.
"""

from .. import ops
from . import AttentionPair, LinearPair, Method, register


def _trained(trainable, prefix):
    return prefix + ".W" in trainable or prefix + ".b" in trainable


def plain_forward(params, prefix, x, settings, train, rng, trainable):
    """y = x @ W.T + b; trainable given and neither W nor b in it: the cache keeps no input."""
    frozen = trainable is not None and not _trained(trainable, prefix)
    return ops.linear_forward(x, params[prefix + ".W"], params.get(prefix + ".b"), frozen=frozen)


def plain_backward(dout, cache, prefix, trainable, input_grad):
    """(dx or None, {"W": dW, "b": db}); dW, db only when trainable, dx only when input_grad."""
    wanted = _trained(trainable, prefix)
    if not (wanted or input_grad):
        return None, {}  # frozen, and nothing below needs its dx: no product at all
    dx, dW, db = ops.linear_backward(dout, cache, param_grads=wanted, input_grad=input_grad)
    return dx, {"W": dW, "b": db}


def plain_delta(params, config, base, prefix):
    """W - W0: what training changed in the linear's own weight (zero when it was frozen)."""
    return params[prefix + ".W"] - base[prefix + ".W"]


PLAIN = LinearPair("plain", plain_forward, plain_backward, delta=plain_delta)


def causal_forward(params, prefix, q, k, v, config):
    """ops.attention: causal self-attention of the block's own q, k, v (no parameter of its own)."""
    return ops.attention_forward(q, k, v, config.n_heads)


def causal_backward(dout, cache, prefix, trainable, input_grad):
    """((dq, dk, dv), {}), or (None, {}) when nothing below needs them: no product at all."""
    return (ops.attention_backward(dout, cache) if input_grad else None), {}


CAUSAL = AttentionPair("causal", causal_forward, causal_backward)


def setup(base_params, model_config, config, tokenizer=None):
    """Copies of every base array (the base itself is never written), all trainable."""
    params = {n: p.copy() for n, p in base_params.items()}
    return params, model_config, set(params)


def _gradcheck_setup(params, config, rng):
    return params, config, set(params)


FULL = register(Method("full", "train every weight", 3e-4, setup, study_lrs=(1e-4, 3e-4, 1e-3, 3e-3),
                       gradcheck_setup=_gradcheck_setup, color="tab:blue"), pair=PLAIN, attention=CAUSAL)
