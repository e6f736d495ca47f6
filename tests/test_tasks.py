import json

import numpy as np
import pytest

from minilora.corpus import GRAMMAR, NEWLINE_ID, longest_sentence_length
from minilora.tokenizer import CharTokenizer
from minilora.tasks import (
    CLASS_NAMES, GENERATIVE_TASKS, TASKS, classification_batch, format_prompt, instruction_batch,
    RecordBatches, load_jsonl, make_classification_records, make_instruction_records, save_jsonl,
    task_splits,
)

TOKENIZER = CharTokenizer()


def test_prompt_format_is_exact():
    assert format_prompt("Name the subject.", "the cat runs.") == (
        "### Instruction\nName the subject.\n\n### Input\nthe cat runs.\n\n### Response\n")
    assert format_prompt("Say hi.") == "### Instruction\nSay hi.\n\n### Response\n"
    with pytest.raises(ValueError, match="input_text must be a str, got int"):
        format_prompt("Say hi.", 3)


def test_instruction_records_answer_their_task():
    subject = make_instruction_records("subject", 200, seed=0)
    plural = make_instruction_records("plural", 200, seed=0)
    plurals = {s: p for s, p, _, _ in GRAMMAR.nouns} | {p: p for _, p, _, _ in GRAMMAR.nouns}
    for s, p in zip(subject, plural):
        assert s["input"] == p["input"]
        assert s["instruction"] == GENERATIVE_TASKS["subject"] and p["instruction"] == GENERATIVE_TASKS["plural"]
        assert s["output"] in s["input"].split(" ")[1:3]
        assert p["output"] == plurals[s["output"]]
    assert {"mice", "children"} <= {r["output"] for r in make_instruction_records("plural", 2000, seed=1)}


def test_records_are_deterministic_per_seed():
    assert make_instruction_records("plural", 50, seed=4) == make_instruction_records("plural", 50, seed=4)
    assert make_instruction_records("plural", 50, seed=4) != make_instruction_records("plural", 50, seed=5)
    assert make_classification_records(50, seed=4) == make_classification_records(50, seed=4)


def test_classification_records_label_the_subject_kind():
    kinds = {s: k for s, p, k, _ in GRAMMAR.nouns} | {p: k for s, p, k, _ in GRAMMAR.nouns}
    records = make_classification_records(300, seed=0)
    assert {r["label"] for r in records} == set(CLASS_NAMES)
    for r in records:
        words = r["text"].split(" ")
        subject = words[1] if words[1] in kinds else words[2]  # after the determiner and any adjective
        assert r["label"] == kinds[subject]


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['subject', 'plural'\], got 'kind'"):
        make_instruction_records("kind", 3, seed=0)
    with pytest.raises(ValueError, match=r"\['subject', 'plural', 'kind'\], got 'verb'"):
        task_splits("verb", 3, 3)


@pytest.mark.parametrize("task", TASKS)
def test_task_splits_test_sentences_are_unseen(task):
    train, test = task_splits(task, 3000, 500, seed=0)
    assert len(train) == 3000 and len(test) == 500
    key = "text" if task == "kind" else "input"
    assert not {r[key] for r in train} & {r[key] for r in test}
    assert task_splits(task, 3000, 500, seed=0) == (train, test)


def test_longest_example_fits_the_pretraining_context():
    # The model is pretrained with 128-character windows; fine-tuning examples must fit one.
    longest_output = max(len(p) for _, p, _, _ in GRAMMAR.nouns)
    longest_prompt = max(len(format_prompt(i, "x" * longest_sentence_length())) for i in GENERATIVE_TASKS.values())
    assert longest_prompt + longest_output + 1 <= 128 + 1


def test_instruction_batch_mask_covers_exactly_the_response():
    records = make_instruction_records("plural", 8, seed=3) + [
        {"instruction": "Say hi.", "output": "hi"}]  # no input: Alpaca-style prompt
    x, y, mask = instruction_batch(records, TOKENIZER, context_length=128)
    full = [format_prompt(r["instruction"], r.get("input", "")) + r["output"] + "\n" for r in records]
    B, T = x.shape
    assert (B, T) == (9, max(len(f) for f in full) - 1) and T < 128
    assert x.dtype == y.dtype == np.int64 and mask.dtype == np.float32
    for b, (r, text) in enumerate(zip(records, full)):
        n = len(text) - 1
        assert TOKENIZER.decode(x[b, :n]) == text[:-1] and TOKENIZER.decode(y[b, :n]) == text[1:]
        assert TOKENIZER.decode(y[b][mask[b] == 1.0]) == r["output"] + "\n"
        assert (x[b, n:] == NEWLINE_ID).all() and (mask[b, n:] == 0).all()
    assert set(np.unique(mask)) == {0.0, 1.0}


def test_train_on_prompt_masks_every_real_target():
    records = make_instruction_records("subject", 5, seed=0)
    x, y, mask = instruction_batch(records, TOKENIZER, 128, train_on_prompt=True)
    for b, r in enumerate(records):
        text = format_prompt(r["instruction"], r["input"]) + r["output"] + "\n"
        assert TOKENIZER.decode(y[b][mask[b] == 1.0]) == text[1:]


def test_a_batch_in_another_prompt_format_masks_the_same_responses():
    records = make_instruction_records("subject", 4, seed=1)

    def render(instruction, input_text):
        return f"Instruction: {instruction}\nInput: {input_text}\nResponse: "

    x, y, mask = instruction_batch(records, TOKENIZER, 128, render=render)
    for b, r in enumerate(records):
        text = render(r["instruction"], r["input"]) + r["output"] + "\n"
        assert TOKENIZER.decode(x[b, :len(text) - 1]) == text[:-1]
        assert TOKENIZER.decode(y[b][mask[b] == 1.0]) == r["output"] + "\n"


def test_instruction_batch_rejects_a_too_long_example():
    records = [{"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "Say hi.", "input": "x" * 100, "output": "hi"}]
    with pytest.raises(ValueError, match=r"records\[1\] is 153 tokens.*context_length \+ 1 = 65"):
        instruction_batch(records, TOKENIZER, context_length=64)


def test_classification_batch_points_at_the_last_character():
    records = make_classification_records(6, seed=2)
    x, last, labels = classification_batch(records, TOKENIZER, 128)
    assert x.shape == (6, max(len(r["text"]) for r in records))
    assert x.dtype == last.dtype == labels.dtype == np.int64
    for b, r in enumerate(records):
        assert last[b] == len(r["text"]) - 1
        assert TOKENIZER.decode(x[b, :last[b] + 1]) == r["text"]
        assert CLASS_NAMES[labels[b]] == r["label"]
        assert (x[b, last[b] + 1:] == NEWLINE_ID).all()


def test_classification_batch_rejects_unknown_label():
    with pytest.raises(ValueError, match=r"records\[1\] has label 'plant'; expected one of \['animal'"):
        classification_batch([{"text": "a", "label": "thing"}, {"text": "b", "label": "plant"}], TOKENIZER, 8)
    with pytest.raises(ValueError, match=r"records\[0\]: missing key\(s\) \['label'\]"):
        classification_batch([{"text": "a"}], TOKENIZER, 8)


def test_jsonl_roundtrip_and_default_input(tmp_path):
    path = tmp_path / "data.jsonl"
    records = make_instruction_records("subject", 5, seed=0)
    save_jsonl(records, path)
    assert load_jsonl(path, "instruction", TOKENIZER) == records
    path.write_text('\n{"instruction": "Say hi.", "output": "hi"}\n\n')
    assert load_jsonl(path, "instruction", TOKENIZER) == [{"instruction": "Say hi.", "output": "hi", "input": ""}]


@pytest.mark.parametrize("line, problem", [
    ('{"instruction": "a", "output": "b"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"instruction": "a"}', r"missing key\(s\) \['output'\]"),
    ('{"instruction": "a", "output": "b", "ouput": "c"}', r"unexpected key\(s\) \['ouput'\]"),
    ('{"instruction": "a", "output": 3}', "key 'output' must hold a string, got int"),
    ('{"instruction": "a", "output": "caf\\u00e9"}', "outside the vocabulary"),
    ('{"instruction": "a", "output": "two\\nlines"}', "stop token"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl' line 3: .*{problem}"):
        load_jsonl(path, "instruction", TOKENIZER)


def test_jsonl_rejects_empty_file_wrong_kind_and_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl' has no records"):
        load_jsonl(path, "classification", TOKENIZER)
    with pytest.raises(ValueError, match=r"kind must be one of \['instruction', 'classification'\], got 'labels'"):
        load_jsonl(path, "labels", TOKENIZER)
    with pytest.raises(ValueError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl", "instruction", TOKENIZER)
    path.write_text(json.dumps({"text": "the cat runs.", "label": "animal"}) + "\n")
    assert load_jsonl(path, "classification", TOKENIZER) == [{"text": "the cat runs.", "label": "animal"}]


def test_record_batches_draw_distinct_records_and_pick_the_head():
    records = make_instruction_records("subject", 20, seed=0)
    batch = RecordBatches(records, TOKENIZER, 5, 128).sample(np.random.default_rng(0))
    assert set(batch) == {"x", "y", "mask"} and batch["x"].shape[0] == 5
    inputs = [TOKENIZER.decode(row).split("### Input\n")[1].split("\n")[0] for row in batch["x"]]
    assert len(set(inputs)) == 5  # drawn without replacement
    cls = RecordBatches(make_classification_records(20, seed=0), TOKENIZER, 4, 128, list(CLASS_NAMES))
    assert set(cls.sample(np.random.default_rng(0))) == {"x", "last", "labels"}


def test_jsonl_accepts_a_byte_order_mark_and_windows_line_ends(tmp_path):
    # issue 13: a UTF-8 BOM at the start of a file was rejected where it could be read
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" b'{"instruction": "Say hi.", "output": "hi"}\r\n'
                     b'{"instruction": "Go.", "output": "ok"}\r\n')
    assert [r["output"] for r in load_jsonl(path, "instruction", TOKENIZER)] == ["hi", "ok"]


def test_jsonl_reads_a_raw_line_separator_inside_a_string_as_json(tmp_path):
    # issue 13: a raw U+2028 inside a JSON string (valid JSON) split the line: "Unterminated string"
    path = tmp_path / "sep.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": "x\u2028y", "output": "b"}\n'
                    '{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sep.jsonl' line 2: key 'input' has 1 distinct character\(s\) outside the vocabulary") as e:
        load_jsonl(path, "instruction", TOKENIZER)
    assert "\\u2028" in str(e.value) and "Unterminated" not in str(e.value)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\u2029}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="sep.jsonl' line 2: not valid JSON"):  # outside a string it is no JSON
        load_jsonl(path, "instruction", TOKENIZER)


def test_a_record_too_long_for_the_context_is_named_by_its_line(tmp_path):
    # issue 13: an over-long instruction failed at step 4, named by its place in a random batch
    path = tmp_path / "long.jsonl"
    short = {"instruction": "Say hi.", "output": "hi"}
    save_jsonl([short, short, {"instruction": "Say hi.", "input": "x" * 40, "output": "hi"}, short], path)
    assert len(load_jsonl(path, "instruction", TOKENIZER)) == 4  # without a context, no length limit
    with pytest.raises(ValueError, match=r"long.jsonl' line 3: the record takes 92 positions .* context_length 64"):
        load_jsonl(path, "instruction", TOKENIZER, context_length=64)
    with pytest.raises(ValueError, match=r"line 1: .*after 40 soft-prompt vectors"):
        load_jsonl(path, "instruction", TOKENIZER, context_length=64, n_prompt=40)
    cls = tmp_path / "cls.jsonl"
    save_jsonl([{"text": "the cat runs.", "label": "animal"}, {"text": "", "label": "thing"}], cls)
    with pytest.raises(ValueError, match="cls.jsonl' line 2: key 'text' is empty"):
        load_jsonl(cls, "classification", TOKENIZER, context_length=64)
