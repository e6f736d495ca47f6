"""Text out of the model: greedy decoding, or sampling with temperature and top-k.

One decode loop serves both. Prompts of equal length run together as one batch,
so there is no padding and every row sees exactly the positions it would see
alone. There is no key/value cache: each new token re-runs the forward pass
over the sequence so far (the last context_length tokens). At this model's size
that is fast enough, and it keeps one forward function for training and for
decoding. Each step moves one (B, V) block of logits to the host: one transfer
per generated position per batch, never one per row.
"""

import numpy as np

from .backend import to_numpy
from .model import next_token_logits


def sample_next(logits, temperature=0.0, top_k=None, rng=None):
    """One token per row from host logits (B, V).

    temperature 0 means greedy (argmax); top_k keeps only the k largest logits.
    rng (a numpy Generator) is required when temperature > 0, so every sample
    can be repeated. Returns (B,) int64 token ids.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    if rng is None:
        raise ValueError("rng: expected a numpy.random.Generator to sample with temperature > 0, got None")
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    z = logits / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def decode(params, config, prompts, max_new_tokens, temperature=0.0, top_k=None, rng=None, stop_id=None,
           batch_size=128):
    """Continue every prompt, greedily (temperature 0) or by sampling.

    Inputs:
    - params, config: the model and the ModelConfig it came with
    - prompts: a list of (T0,) token-id arrays, each with at least one token
    - max_new_tokens: at most this many tokens per prompt
    - temperature, top_k, rng: see sample_next
    - stop_id: a row ends at this token, which is not part of its output

    Returns a list of (N_i,) int64 arrays, the new tokens of each prompt, in order.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer, got {top_k!r}")
    results = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts: expected at least one token to start from, got an empty prompt at {i}")
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        for j in range(0, len(rows), batch_size):
            chunk = rows[j:j + batch_size]
            ids = np.stack([np.asarray(prompts[i], dtype=np.int64) for i in chunk])  # (b, T0)
            new = []
            done = np.zeros(len(chunk), bool)
            for _ in range(max_new_tokens):
                logits = to_numpy(next_token_logits(params, config, ids[:, -config.context_length:]))  # (b, V)
                nxt = sample_next(logits, temperature, top_k, rng)
                new.append(nxt)
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                if stop_id is not None:
                    done |= nxt == stop_id
                    if done.all():
                        break
            new = np.stack(new, axis=1)  # (b, steps)
            for k, i in enumerate(chunk):
                row = new[k]
                stops = np.flatnonzero(row == stop_id) if stop_id is not None else []
                results[i] = row[: stops[0]] if len(stops) else row
    return results
