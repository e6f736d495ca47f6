"""Fine-tuning data: instruction and classification tasks, JSON-lines files, batches with loss masks.

An instruction example is rendered in the format of the fine-tuning post,

    ### Instruction
    Name the subject.

    ### Input
    the red cat chases two mice.

    ### Response
    cat

followed by a newline after the response: the model learns to emit "\\n" when it
is done, and greedy decoding stops there. The loss is taken only on the
response and that newline; the prompt is context, not something to imitate.

Tasks built from the toy language of corpus.py:
- "subject" (generative): copy the subject noun as written ("cat", "mice").
- "plural" (generative): the plural of the subject noun ("cat" -> "cats", "mouse" -> "mice").
- "kind" (classification): is the subject an animal, a person or a thing?
A model pretrained on plain sentences has never seen the format or the questions,
so it cannot do any of them until it is fine-tuned.

Positions are tokens of the run's tokenizer (the tokenizer argument), which
for the character tokenizer are characters. Dimensions: B batch, T time (tokens).
"""

import json

import numpy as np

from minilora.corpus import NEWLINE_ID, sample_sentences
from minilora.tokenizer import single_token_id

# Short instructions keep the longest example (longest sentence, output "children")
# inside the 128-character pretraining context: the prompt template alone is 43
# characters, and test_tasks checks the fit.
GENERATIVE_TASKS = {
    "subject": "Name the subject.",
    "plural": "Pluralize the subject.",
}
CLASS_NAMES = ("animal", "person", "thing")
TASKS = (*GENERATIVE_TASKS, "kind")

# Required and optional string fields of a JSON-lines record, by kind of file.
_FIELDS = {
    "instruction": (("instruction", "output"), ("input",)),
    "classification": (("text", "label"), ()),
}


def format_prompt(instruction, input_text=""):
    """The prompt up to and including "### Response\\n"; an empty input drops the Input section.

    Inputs:
    - instruction: str, the task description.
    - input_text: str, the example input ("" for none, as in Alpaca).

    Returns:
    - prompt: str. The full training text is prompt + output + "\\n".
    """
    for name, value in (("instruction", instruction), ("input_text", input_text)):
        if not isinstance(value, str):
            raise ValueError(f"format_prompt: {name} must be a str, got {type(value).__name__}")
    prompt = f"### Instruction\n{instruction}\n\n"
    if input_text:
        prompt += f"### Input\n{input_text}\n\n"
    return prompt + "### Response\n"


def _check_task(task, valid, where):
    if task not in valid:
        raise ValueError(f"{where}: task must be one of {list(valid)}, got {task!r}")


def _record(task, derivation):
    """The record a task makes from one sentence's derivation (see corpus.sample_sentences)."""
    subject = derivation["subject"]
    if task == "kind":
        return {"text": derivation["text"], "label": subject["kind"]}
    output = subject["word"] if task == "subject" else subject["plural_noun"]
    return {"instruction": GENERATIVE_TASKS[task], "input": derivation["text"], "output": output}


def make_instruction_records(task, n, seed):
    """
    Inputs:
    - task: a key of GENERATIVE_TASKS.
    - n: number of records.
    - seed: int for numpy.random.default_rng.

    Returns:
    - records: list of n dicts with str values "instruction", "input", "output".
    """
    _check_task(task, GENERATIVE_TASKS, "make_instruction_records")
    return [_record(task, d) for d in sample_sentences(n, np.random.default_rng(seed))]


def make_classification_records(n, seed):
    """
    Inputs:
    - n: number of records.
    - seed: int for numpy.random.default_rng.

    Returns:
    - records: list of n dicts with str values "text" (a sentence) and "label" (a CLASS_NAMES entry).
    """
    return [_record("kind", d) for d in sample_sentences(n, np.random.default_rng(seed))]


def task_splits(task, n_train, n_test, seed=0):
    """Training and test records whose test sentences never occur in the training set.

    The two splits come from independent streams, SeedSequence(seed).spawn(2).
    Short sentences are common enough to be drawn into both, so test sentences
    already in the training set are dropped and more are drawn: the test set
    measures generalisation to unseen sentences, and is therefore slightly
    richer in long sentences than the language itself.

    Inputs:
    - task: one of TASKS ("subject", "plural" or "kind").
    - n_train, n_test: number of records in each split.
    - seed: int.

    Returns:
    - (train_records, test_records): lists of dicts, as make_instruction_records
      or make_classification_records return.
    """
    _check_task(task, TASKS, "task_splits")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"task_splits: {name} must be an int >= 0, got {n!r}")
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train = sample_sentences(n_train, train_rng)
    seen = {d["text"] for d in train}
    test = []
    drawn = 0
    while len(test) < n_test:
        # A language too small to supply unseen sentences would loop forever; stop instead.
        if drawn > 100 * n_test + 10_000:
            raise ValueError(
                f"task_splits: found only {len(test)} of n_test={n_test} sentences outside the "
                f"{n_train} training sentences after drawing {drawn}; ask for fewer")
        batch = sample_sentences(n_test - len(test), test_rng)
        drawn += len(batch)
        test += [d for d in batch if d["text"] not in seen]
    return [_record(task, d) for d in train], [_record(task, d) for d in test]


def _check_record_fields(record, kind, tokenizer):
    """Return a description of what is wrong with a record, or None if it is well formed.

    Every value must be text the run's tokenizer can encode (tokenizer.problem).
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    required, optional = _FIELDS[kind]
    missing = [k for k in required if k not in record]
    if missing:
        return f"missing key(s) {missing}; a {kind} record has {list(required)} and optionally {list(optional)}"
    extra = [k for k in record if k not in required + optional]
    if extra:
        return f"unexpected key(s) {extra}; a {kind} record has {list(required)} and optionally {list(optional)}"
    for key, value in record.items():
        if not isinstance(value, str):
            return f"key {key!r} must hold a string, got {type(value).__name__} {value!r:.40}"
        problem = tokenizer.problem(value)
        if problem is not None:
            return f"key {key!r} has {problem}"
    if kind == "instruction" and "\n" in record["output"]:
        return "key 'output' holds a newline, but a newline ends the response (it is the stop token)"
    return None


def record_positions(record, kind, tokenizer):
    """How many positions of the context a record takes: the tokens the model reads.

    An instruction record is trained on the tokens of prompt, then of output,
    then the one end token, shifted by one, so the model reads
    len(encode(prompt)) + len(encode(output)) positions; a classification
    record reads the tokens of its text. (The character tokenizer: characters.)
    """
    if kind == "instruction":
        prompt = format_prompt(record["instruction"], record.get("input", ""))
        return len(tokenizer.encode(prompt)) + len(tokenizer.encode(record["output"]))
    return len(tokenizer.encode(record["text"]))


def _fit_problem(record, kind, tokenizer, context_length, n_prompt=0):
    """What keeps a record from fitting the context (with n_prompt soft-prompt vectors before it), or None."""
    n = record_positions(record, kind, tokenizer)
    if kind == "classification" and n == 0:
        return "key 'text' is empty; a classifier needs at least one token to read"
    if n_prompt + n > context_length:
        what = ("the prompt template, instruction, input and output" if kind == "instruction" else "its text")
        prompt = f" after {n_prompt} soft-prompt vectors" if n_prompt else ""
        return (f"the record takes {n} positions ({what}){prompt}, more than the model's "
                f"context_length {context_length}{' - ' + str(n_prompt) if n_prompt else ''}; shorten it")
    return None


def check_records_fit(records, kind, tokenizer, context_length, n_prompt=0, where="records"):
    """Raise ValueError naming the first record (where[i]) that does not fit the context; see _fit_problem."""
    for i, record in enumerate(records):
        problem = _fit_problem(record, kind, tokenizer, context_length, n_prompt)
        if problem is not None:
            raise ValueError(f"{where}[{i}]: {problem}")


def load_jsonl(path, kind, tokenizer, context_length=None, n_prompt=0):
    """Read fine-tuning records from a JSON-lines file, one JSON object per line.

    Inputs:
    - path: str or os.PathLike of a UTF-8 file (a byte-order mark at its start is
      allowed). Lines end at "\\n" only: U+2028 and U+2029 are valid inside a
      JSON string, so they do not split a line.
    - kind: "instruction" (keys "instruction", "output" and optional "input") or
      "classification" (keys "text", "label"). All values are strings.
    - tokenizer: the run's tokenizer; every value must be text it can encode,
      and a record's positions are its tokens
    - context_length: when given, every record must fit it (after n_prompt
      soft-prompt vectors), so a record too long fails here, named by its line,
      before any training.

    Returns:
    - records: list of dicts; instruction records always have "input" ("" if absent).
      Blank lines are skipped.
    Raises ValueError naming the file and line of the first bad record.
    """
    if kind not in _FIELDS:
        raise ValueError(f"load_jsonl: kind must be one of {list(_FIELDS)}, got {kind!r}")
    from .validate import read_input  # read once: a pipe or FIFO cannot be read again to hash it

    data, _ = read_input(path, "load_jsonl")
    try:
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"load_jsonl: cannot read path {str(path)!r} as UTF-8 text: {e}") from e
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"load_jsonl: {str(path)!r} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from e
        except RecursionError as e:
            raise ValueError(f"{where}: not a record: nested too deeply") from e
        problem = _check_record_fields(record, kind, tokenizer)
        if problem is None and context_length is not None:
            problem = _fit_problem(record, kind, tokenizer, context_length, n_prompt)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if kind == "instruction":
            record.setdefault("input", "")
        records.append(record)
    if not records:
        raise ValueError(f"load_jsonl: {str(path)!r} has no records; expected one JSON object per line")
    return records


def save_jsonl(records, path):
    """Write records (a list of dicts) to path, one JSON object per line."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"save_jsonl: records[{i}] must be a dict, got {type(record).__name__}")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def _check_batch_args(records, context_length, where):
    if not isinstance(records, (list, tuple)) or not records:
        raise ValueError(f"{where}: records must be a non-empty list of dicts, got {records!r:.60}")
    if not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise ValueError(f"{where}: context_length must be an int >= 1, got {context_length!r}")


def _check_batch_record(record, kind, i, where, tokenizer):
    problem = _check_record_fields(record, kind, tokenizer)
    if problem is not None:
        raise ValueError(f"{where}: records[{i}]: {problem}")


def instruction_batch(records, tokenizer, context_length, train_on_prompt=False, end="\n", render=format_prompt):
    """Next-token inputs, targets and loss mask for a batch of instruction records.

    Each example is the tokens of the prompt, then of the output, then the one
    token of end, of length L <= context_length + 1. The prompt is encoded on
    its own, as decoding will read it, so a merge of a BPE tokenizer never
    straddles the prompt and the response.
    Row b holds x[b, t] = tokens[t] and y[b, t] = tokens[t + 1] for t < L - 1, then padding
    (NEWLINE_ID = 0, an id in every vocabulary, with mask 0). T is the longest L in the batch
    minus 1, so a batch of short examples costs less than a full context.

    Inputs:
    - records: list of B dicts with "instruction", "output" and optional "input".
    - tokenizer: the run's tokenizer (encode(str) -> int array).
    - context_length: the model's maximum T.
    - train_on_prompt: if True the mask covers every real target, prompt included.
    - end: the text that ends a response, one token of the tokenizer ("\\n" by
      default; a character that never occurs in the corpus, such as "~", makes
      the response unlike corpus text).
    - render: render(instruction, input) -> the prompt; format_prompt by default
      (tutorial 07 passes broken formats to measure what the format is worth).

    Returns a tuple of:
    - x: int64 array of shape (B, T), input tokens.
    - y: int64 array of shape (B, T), target tokens.
    - mask: float32 array of shape (B, T), 1.0 where y is a response token (output or
      its final "\\n"), 0.0 on prompt targets and padding.
    """
    _check_batch_args(records, context_length, "instruction_batch")
    end_id = single_token_id(tokenizer, end, "end")
    examples = []
    for i, record in enumerate(records):
        _check_batch_record(record, "instruction", i, "instruction_batch", tokenizer)
        prompt = tokenizer.encode(render(record["instruction"], record.get("input", "")))
        tokens = np.concatenate([prompt, tokenizer.encode(record["output"]), [end_id]])
        if len(tokens) > context_length + 1:
            raise ValueError(
                f"instruction_batch: records[{i}] is {len(tokens)} tokens (prompt {len(prompt)} "
                f"tokens + output + end), more than context_length + 1 = {context_length + 1}")
        examples.append((tokens, len(prompt)))
    B, T = len(examples), max(len(tokens) for tokens, _ in examples) - 1
    x = np.full((B, T), NEWLINE_ID, dtype=np.int64)
    y = np.full((B, T), NEWLINE_ID, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.float32)
    for b, (tokens, prompt_length) in enumerate(examples):
        n = len(tokens) - 1
        x[b, :n] = tokens[:-1]
        y[b, :n] = tokens[1:]
        # y[b, t] = tokens[t + 1] is a response token when t + 1 >= prompt_length.
        first = 0 if train_on_prompt else prompt_length - 1
        mask[b, first:n] = 1.0
    return x, y, mask


def classification_batch(records, tokenizer, context_length, class_names=CLASS_NAMES):
    """Right-padded inputs, the position to classify at, and label indices.

    A causal model has read the whole text only at its last token, so the
    classifier head reads the hidden state at index last[b].

    Inputs:
    - records: list of B dicts with "text" (1 to context_length tokens) and "label".
    - tokenizer: the run's tokenizer (encode(str) -> int array).
    - context_length: the model's maximum T.
    - class_names: sequence of label names; a label's index in it is its class id.

    Returns a tuple of:
    - x: int64 array of shape (B, T), T the longest text, padded with NEWLINE_ID.
    - last: int64 array of shape (B,), index of each row's last real token.
    - labels: int64 array of shape (B,), class ids.
    """
    _check_batch_args(records, context_length, "classification_batch")
    class_names = list(class_names)
    rows, labels = [], []
    for i, record in enumerate(records):
        _check_batch_record(record, "classification", i, "classification_batch", tokenizer)
        if record["label"] not in class_names:
            raise ValueError(f"classification_batch: records[{i}] has label {record['label']!r}; "
                             f"expected one of {class_names}")
        tokens = tokenizer.encode(record["text"])
        if not 1 <= len(tokens) <= context_length:
            raise ValueError(f"classification_batch: records[{i}] text is {len(tokens)} tokens; "
                             f"expected 1 to context_length = {context_length}")
        rows.append(tokens)
        labels.append(class_names.index(record["label"]))
    x = np.full((len(rows), max(len(t) for t in rows)), NEWLINE_ID, dtype=np.int64)
    for b, tokens in enumerate(rows):
        x[b, :len(tokens)] = tokens
    last = np.array([len(t) - 1 for t in rows], dtype=np.int64)
    return x, last, np.array(labels, dtype=np.int64)


class RecordBatches:
    """The fine-tuning batch source: B records drawn without replacement, as a batch.

    batches.sample(rng) returns {"x", "y", "mask"} for instruction records
    (class_names None) or {"x", "last", "labels"} for classification, encoded
    by tokenizer (the run's).
    """

    def __init__(self, records, tokenizer, batch_size, context_length, class_names=None, train_on_prompt=False,
                 end="\n"):
        self.records, self.batch_size, self.context_length = records, batch_size, context_length
        self.class_names, self.train_on_prompt, self.end = class_names, train_on_prompt, end
        self.tokenizer = tokenizer

    def sample(self, rng):
        chosen = [self.records[i] for i in rng.choice(len(self.records), self.batch_size, replace=False)]
        if self.class_names:
            x, last, labels = classification_batch(chosen, self.tokenizer, self.context_length, self.class_names)
            return {"x": x, "last": last, "labels": labels}
        x, y, mask = instruction_batch(chosen, self.tokenizer, self.context_length, self.train_on_prompt, self.end)
        return {"x": x, "y": y, "mask": mask}
