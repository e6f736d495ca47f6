"""Text out of the model: sampling with temperature and top-k, and batched greedy decoding.

There is no key/value cache: each new token re-runs the forward pass over the
sequence so far (the last context_length tokens). At this model's size that is
fast enough, and it keeps one forward function for training and for decoding.
"""

import numpy as np

from .backend import to_numpy
from .model import next_token_logits


def sample_next(logits, temperature=1.0, top_k=None, rng=None):
    """One token per row from logits (B, V) on the host.

    temperature 0 means greedy (argmax); top_k keeps only the k largest logits.
    Returns (B,) int64 token ids.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(axis=-1)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: expected a positive integer, got {top_k}")
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    z = logits / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def generate(params, config, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, rng=None,
             lora=None, stop_id=None):
    """Continue one prompt: the generated ids (N,), without the prompt (see generate_many)."""
    return generate_many(params, config, prompt_ids, max_new_tokens, temperature, top_k, rng, lora, stop_id, 1)[0]


def generate_many(params, config, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, rng=None,
                  lora=None, stop_id=None, num_samples=1):
    """Continue one prompt num_samples times, as one batch.

    Inputs:
    - prompt_ids: (T0,) token ids
    - stop_id: a row stops after emitting this token (it is kept in the output)

    Returns a list of num_samples id arrays (N_i,), without the prompt.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64)[None, :]
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids: expected at least one token to start from, got none")
    ids = np.repeat(ids, num_samples, axis=0)  # (S, T0)
    done = np.zeros(num_samples, bool)
    new = []
    for _ in range(max_new_tokens):
        logits = to_numpy(next_token_logits(params, config, ids[:, -config.context_length:], lora))
        nxt = sample_next(logits, temperature, top_k, rng)
        new.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        if stop_id is not None:
            done |= nxt == stop_id
            if done.all():
                break
    new = np.stack(new, axis=1)  # (S, steps)
    out = []
    for row in new:
        stops = np.flatnonzero(row == stop_id) if stop_id is not None else []
        out.append(row[: stops[0] + 1] if len(stops) else row)
    return out


def greedy_decode(params, config, prompts, max_new_tokens, stop_id, lora=None, batch_size=128):
    """Greedy continuations of many prompts, batched by prompt length.

    Prompts of equal length run together, so there is no padding and every
    row sees exactly the positions it would see alone.

    Returns a list of (N_i,) id arrays, each cut before its first stop_id.
    """
    results = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        for j in range(0, len(rows), batch_size):
            chunk = rows[j:j + batch_size]
            ids = np.stack([np.asarray(prompts[i], dtype=np.int64) for i in chunk])
            done = np.zeros(len(chunk), bool)
            new = []
            for _ in range(max_new_tokens):
                logits = to_numpy(next_token_logits(params, config, ids[:, -config.context_length:], lora))
                nxt = logits.argmax(axis=-1)
                new.append(nxt)
                done |= nxt == stop_id
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                if done.all():
                    break
            new = np.stack(new, axis=1)  # (b, steps)
            for k, i in enumerate(chunk):
                row = new[k]
                stops = np.flatnonzero(row == stop_id)
                results[i] = row[: stops[0]] if stops.size else row
    return results
