"""Text out of the model: greedy decoding, or sampling with temperature and top-k.

One decode loop serves both. Prompts of equal length run together as one batch,
so there is no padding and every row sees exactly the positions it would see
alone. There is no key/value cache: each new token re-runs the forward pass
over the sequence so far (the last context_length tokens). At this model's size
that is fast enough, and it keeps one forward function for training and for
decoding.

The tokens stay on the device while they are chosen: argmax there, and for
sampling the Gumbel-max trick, argmax(z / temperature + g) with g ~ Gumbel(0, 1)
drawn on the host from the caller's generator and sent over. What comes back to
the host is one (b, N) block of tokens per batch, plus one yes/no every
STOP_CHECK_EVERY tokens to see whether every row has stopped.

z is each row's logits less their maximum, so the division is exact at any
finite temperature (bounds.TEMPERATURE): from the smallest subnormal, where
every token but the likeliest gets probability 0, to the largest float64.
"""

import numpy as np

from .backend import array_module, to_device, to_numpy
from .bounds import TEMPERATURE
from .model import next_token_logits, real_context

STOP_CHECK_EVERY = 8


def pick_next(logits, temperature=0.0, top_k=None, rng=None):
    """One token per row from logits (B, V), on the logits' device.

    temperature 0 means greedy (argmax); top_k keeps only the k largest logits.
    rng (a numpy Generator) is required when temperature > 0, so every sample
    can be repeated. Returns (B,) token ids of the logits' module.
    """
    xp = array_module(logits)
    TEMPERATURE.check(temperature)
    if temperature == 0:
        return logits.argmax(axis=-1)
    if rng is None:
        raise ValueError("rng: expected a numpy.random.Generator to sample with temperature > 0, got None")
    # softmax(z / T) = softmax((z - max z) / T): shifted, every logit is <= 0, so any T > 0 can only send one
    # to -inf (probability 0, as exp(-huge) is anyway), never to +inf (bounds.TEMPERATURE)
    z = logits.astype(xp.float64)
    z = z - z.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):  # the -inf just described is the exact answer, not an overflow
        z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = xp.sort(z, axis=-1)[:, -top_k][:, None]  # the k-th largest of each row
        z = xp.where(z < kth, -xp.inf, z)
    # argmax(z + g), g ~ Gumbel(0, 1), is a sample from softmax(z)
    g = to_device(rng.gumbel(size=z.shape), xp)
    return (z + g).argmax(axis=-1)


def decode(params, config, prompts, max_new_tokens, temperature=0.0, top_k=None, rng=None, stop_id=None,
           batch_size=128):
    """Continue every prompt, greedily (temperature 0) or by sampling.

    Inputs:
    - params, config: the model and the ModelConfig it came with
    - prompts: a list of (T0,) token-id arrays, each with at least one token
    - max_new_tokens: at most this many tokens per prompt
    - temperature, top_k, rng: see pick_next
    - stop_id: a row ends at this token, which is not part of its output

    Returns a list of (N_i,) int64 host arrays, the new tokens of each prompt, in order.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    TEMPERATURE.check(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer, got {top_k!r}")
    xp = array_module(params["wte"])
    results = [None] * len(prompts)
    context = real_context(params, config)  # the last tokens the model reads: context_length (less P: peft_positions)
    by_length = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts: expected at least one token to start from, got an empty prompt at {i}")
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        for j in range(0, len(rows), batch_size):
            chunk = rows[j:j + batch_size]
            ids = to_device(np.stack([np.asarray(prompts[i], dtype=np.int64) for i in chunk]), xp)  # (b, T0)
            new = []
            for step in range(max_new_tokens):
                logits = next_token_logits(params, config, ids[:, -context:])  # (b, V)
                nxt = pick_next(logits, temperature, top_k, rng).astype(ids.dtype)
                new.append(nxt)
                ids = xp.concatenate([ids, nxt[:, None]], axis=1)
                if stop_id is not None and (step + 1) % STOP_CHECK_EVERY == 0:
                    if bool((xp.stack(new, axis=1) == stop_id).any(axis=1).all()):  # every row has stopped
                        break
            new = to_numpy(xp.stack(new, axis=1))  # (b, steps): one transfer per batch
            for k, i in enumerate(chunk):
                row = new[k]
                stops = np.flatnonzero(row == stop_id) if stop_id is not None else []
                results[i] = row[: stops[0]] if len(stops) else row
    return results
