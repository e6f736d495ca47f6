"""Fuzzing the inputs a user types or hands over (issue 13): every input is either accepted or
rejected with a one-line error (ValueError, or argparse's SystemExit(2) with one line on stderr),
never a traceback.

    load_jsonl        bytes of any kind, and near-valid JSON lines (BOM, CRLF, U+2028, long records)
    CharTokenizer     any text, any ids; encode then decode gives the text back
    load_text_file    bytes of any kind
    the CLI           any mix of subcommands, options and values; any --prompt through `generate`
"""

import contextlib
import io
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import cli
from minilora.corpus import VOCAB, load_text_file
from minilora.tokenizer import CharTokenizer
from minilora.tasks import _FIELDS, load_jsonl

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line(text):
    assert len(text.splitlines()) == 1, text
    return text


# -- load_jsonl ---------------------------------------------------------------------------------

_value = st.one_of(st.text(alphabet=VOCAB + "é\u2028\u2029\x00", max_size=12), st.integers(), st.none(),
                   st.lists(st.integers(), max_size=2))
_key = st.sampled_from(["instruction", "input", "output", "text", "label", "ouput"])
_record = st.dictionaries(_key, _value, max_size=4)
_line = st.one_of(_record.map(lambda r: json.dumps(r, ensure_ascii=False)),
                  _record.map(json.dumps).map(lambda s: s[:len(s) // 2]),  # a torn line
                  st.text(max_size=20), st.just(""), st.just("[1, 2]"), st.just("[" * 3000))


@FAST
@given(lines=st.lists(_line, max_size=5), end=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
       kind=st.sampled_from(list(_FIELDS)), context=st.one_of(st.none(), st.integers(1, 80)),
       n_prompt=st.integers(0, 8))
def test_load_jsonl_accepts_a_valid_file_or_names_the_problem_in_one_line(tmp_path, lines, end, bom, kind, context,
                                                                          n_prompt):
    path = tmp_path / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + end.join(lines).encode("utf-8"))
    try:
        records = load_jsonl(path, kind, CharTokenizer(), context, n_prompt)
    except ValueError as e:
        assert _one_line(str(e)).startswith("load_jsonl: ")
        return
    required, optional = _FIELDS[kind]
    for r in records:
        assert set(required) <= set(r) <= set(required + optional)
        assert all(isinstance(v, str) and set(v) <= set(VOCAB) for v in r.values())


@FAST
@given(data=st.binary(max_size=200))
def test_load_jsonl_and_load_text_file_on_any_bytes(tmp_path, data):
    path = tmp_path / "any"
    path.write_bytes(data)
    for read in (lambda: load_jsonl(path, "instruction", CharTokenizer()), lambda: load_text_file(path)):
        try:
            read()
        except ValueError as e:
            _one_line(str(e))


# -- the tokenizer ------------------------------------------------------------------------------

@FAST
@given(text=st.text(max_size=40))
def test_encode_accepts_exactly_the_vocabulary_and_decode_inverts_it(text):
    tok = CharTokenizer()
    try:
        ids = tok.encode(text)
    except ValueError as e:
        assert not set(text) <= set(VOCAB)
        _one_line(str(e))
        return
    assert set(text) <= set(VOCAB) and tok.decode(ids) == text


@FAST
@given(ids=st.lists(st.integers(-5, 200), max_size=20))
def test_decode_accepts_ids_in_range_or_says_which_is_not(ids):
    try:
        text = CharTokenizer().decode(ids)
    except ValueError as e:
        assert any(not 0 <= i < len(VOCAB) for i in ids)
        _one_line(str(e))
        return
    assert len(text) == len(ids)


# -- the command line ---------------------------------------------------------------------------

_COMMANDS = ["demo", "gradcheck", "pretrain", "generate", "finetune", "evaluate", "merge", "plot"]
_OPTIONS = ["--steps", "--batch-size", "--lr", "--seed", "--rank", "--n-prompt", "--method", "--task", "--out",
            "--resume", "--overwrite", "--num-samples", "--max-new-tokens", "--temperature", "--top-k", "--backend",
            "--threads", "--d-model", "--dropout", "--lora-dropout", "--alpha", "--show", "--groups", "--fast",
            "--prompt", "--data", "--checkpoint-every", "--warmup-steps", "--nope"]
_token = st.one_of(st.sampled_from(_COMMANDS + _OPTIONS), st.sampled_from(["0", "-1", "3", "1e9", "nan", "x", ""]),
                   st.text(alphabet=string.printable + "é\u2028", max_size=6))


@settings(max_examples=200, deadline=None)
@given(argv=st.lists(_token, max_size=7))
def test_any_command_line_parses_or_fails_with_one_line(argv):
    if any(t.startswith("-h") or (t.startswith("--h") and "--help".startswith(t.split("=")[0])) for t in argv):
        return  # help is not an error
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = cli.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            assert _one_line(err.getvalue()).startswith("minilora")
            return
    assert args.command in _COMMANDS and err.getvalue() == ""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "pre"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2", "--d-model", "16",
                     "--n-layers", "1", "--n-heads", "2", "--context-length", "16",
                     "--text", str(_text(tmp_path_factory))]) == 0
    return out


def _text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("a cat sleeps.\n" * 20)
    return path


@FAST
@given(prompt=st.text(max_size=20))
def test_generate_accepts_any_prompt_or_reports_its_real_character(tiny_model, capsys, prompt):
    # --prompt=TEXT: the way to pass any text, one starting with "-" included
    code = cli.main(["generate", "--checkpoint", str(tiny_model), f"--prompt={prompt}", "--max-new-tokens", "1",
                     "--temperature", "0"])
    out, err = capsys.readouterr()
    typed = prompt.replace("\\n", "\n")
    if code == 0:
        assert typed and set(typed) <= set(VOCAB) and out.startswith(typed)
    else:
        assert code == 2 and _one_line(err).startswith("minilora generate: error: --prompt")
        bad = next((c for c in typed if c not in VOCAB), None)
        assert bad is None and not typed or repr(bad)[1:-1] in err
