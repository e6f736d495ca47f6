"""How good is a model? The scores both phases use.

    strided_val_loss          nats per token on a token stream (pretraining, forgetting), or per character
    exact_match               greedy answers to instruction records, compared whole
    classification_accuracy   argmax of the head against the labels
    corpus_val_data           the toy corpus's validation stream, made the one way
"""

import numpy as np

from . import corpus, tasks
from .backend import to_numpy
from .model import class_logits, loss_and_grads, real_context
from .sampling import decode
from .tokenizer import single_token_id

# the pretraining validation split of the toy corpus (PretrainConfig's defaults); forgetting is measured on it
VAL_SENTENCES = 1_000
VAL_SEED = 0


def corpus_val_data(tokenizer, n_sentences=VAL_SENTENCES, seed=VAL_SEED):
    """Token ids (N,) of the toy corpus's validation text (the one pretraining validates on), by the run's tokenizer."""
    _, val_text = corpus.train_val_text(0, n_sentences, seed)
    return tokenizer.encode(val_text)


def strided_val_loss(params, config, data, batch_size=64, token_lengths=None, context=None):
    """Mean loss per token over a token stream, each counted once, with context; or per character.

    Windows of T = context_length start every T//2 tokens, and only the last
    T//2 positions of each window are counted (the loss mask), so every counted
    token sees at least T/2 tokens before it (T - T//2, one more for odd T). Every target from position T/2 to
    the end of the last whole window is counted exactly once (the first T/2
    and the last few, under T/2, are not). For the character tokenizer a token
    is a character: when T/2 exceeds the longest sentence, every prediction
    conditions on its whole sentence so far, and the loss a perfect model gets
    here is the exact entropy floor.

    token_lengths: None for nats per token; or tokenizer.token_lengths(), the
    (V,) characters each token stands for, for nats per character: the total
    nats of the counted targets over the total characters of the same targets,
    the unit the entropy floor is in.

    context: the window T; default the most real tokens the model reads (model.real_context: context_length,
    less a soft prompt's or prefix's P under PEFT's positions).
    """
    T = real_context(params, config) if context is None else context
    half = T // 2
    starts = np.arange(0, len(data) - T - 1, half)
    if len(starts) == 0:
        raise ValueError(f"data: expected a validation stream longer than context_length + 1 = {T + 1} tokens, "
                         f"got {len(data)}")
    mask = np.zeros((1, T), np.float32)
    mask[:, T - half:] = 1.0  # the last half: windows step by half, so no target is counted twice
    total, count = 0.0, 0.0
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        idx = s[:, None] + np.arange(T)[None, :]  # (b, T)
        m = np.broadcast_to(mask, idx.shape)
        loss, _ = loss_and_grads(params, config, {"x": data[idx], "y": data[idx + 1], "mask": m})
        n = float(m.sum())
        total += loss * n
        # the mean over the counted targets times their count is their total; divide by tokens or characters
        count += n if token_lengths is None else float((token_lengths[data[idx + 1]] * m).sum())
    return total / count


def exact_match(params, config, tokenizer, records, max_new_tokens=None, end="\n", render=tasks.format_prompt):
    """Greedy-decode every record's prompt; the fraction whose response equals the output exactly.

    The model is params, config and tokenizer (the run's). Decoding stops at
    the token of `end`, the text fine-tuning taught to end a response (one
    token of the tokenizer). render(instruction, input) writes the prompt
    (tasks.format_prompt, the format trained on, by default).

    max_new_tokens defaults to the longest reference output's tokens plus its
    end token and a margin of 4, so no reference is too long to be matched.

    Returns (accuracy, predictions as strings).
    """
    stop_id = single_token_id(tokenizer, end, "end")
    prompts = [tokenizer.encode(render(r["instruction"], r.get("input", ""))) for r in records]
    outputs = [len(tokenizer.encode(r["output"])) for r in records]  # tokens of each reference
    if max_new_tokens is None:
        max_new_tokens = max(outputs) + 1 + 4
    limit = real_context(params, config)  # context_length, less P virtual tokens' positions (peft_positions)
    room = "context_length" if limit == config.context_length else "context_length - P"
    for r, p, n in zip(records, prompts, outputs):
        if len(p) + n + 1 > limit + 1:
            raise ValueError(f"records: the record {r!r:.80} needs {len(p) + n + 1} tokens, "
                             f"more than the {room} + 1 = {limit + 1} the model reads")
    outs = decode(params, config, prompts, max_new_tokens, stop_id=stop_id)
    preds = [tokenizer.decode(o) for o in outs]
    acc = float(np.mean([p == r["output"] for p, r in zip(preds, records)]))
    return acc, preds


def classification_accuracy(params, config, tokenizer, records, class_names=tasks.CLASS_NAMES, batch_size=256):
    """Fraction of records whose argmax class is the label (texts encoded by the run's tokenizer)."""
    correct = 0
    for i in range(0, len(records), batch_size):
        x, last, labels = tasks.classification_batch(records[i:i + batch_size], tokenizer, config.context_length,
                                                     class_names)
        logits = to_numpy(class_logits(params, config, x, last))  # one transfer per batch
        correct += int((logits.argmax(axis=-1) == labels).sum())
    return correct / len(records)
