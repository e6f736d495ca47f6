"""The tokenizer comes with the model: the character one, a BPE tokenizer.json, and the runs that carry them.

The BPE tokenizer is trained here, with the `tokenizers` library (the extra minilora[hf]; skipped where it is not
installed, a failure in CI), on the toy corpus: nothing is downloaded.
"""

import ast
import hashlib
import json
import os
import pathlib
import sys

import numpy as np
import pytest

import clients
from minilora import cli, corpus, evaluation, model, plot, runs, tasks
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.finetune import FinetuneConfig, check_settings
from minilora.tokenizer import BPETokenizer, CharTokenizer, make_tokenizer, single_token_id, tokenizer_from_meta

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128"]
LIBRARY = pathlib.Path(__file__).resolve().parent.parent / "minilora"


def train_bpe(path, vocab_size=300, n_sentences=400):
    """A byte-level BPE (GPT-2's kind) trained on toy-corpus text, saved as a tokenizer.json at path."""
    tokenizers = clients.require("tokenizers")
    Tokenizer, decoders, models = tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models
    pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus.make_text(n_sentences, 0)], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _one_line(err):
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- the one module that makes tokenizers ---------------------------------------------------------------------

def test_no_library_module_but_the_tokenizers_own_constructs_a_tokenizer():
    makers = {"CharTokenizer", "BPETokenizer"}
    found = []
    for path in sorted(LIBRARY.glob("*.py")):
        if path.name == "tokenizer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in makers:
                    found.append(f"{path.name}:{node.lineno} calls {name}")
            if isinstance(node, ast.ImportFrom) and any(a.name in makers for a in node.names):
                found.append(f"{path.name}:{node.lineno} imports a tokenizer class")
    assert found == []
    # and the check sees a construction where there is one
    assert any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "CharTokenizer"
               for n in ast.walk(ast.parse((LIBRARY / "tokenizer.py").read_text())))


def test_the_default_model_has_the_character_tokenizers_vocabulary():
    assert model.ModelConfig().vocab_size == CharTokenizer.vocab_size == len(corpus.VOCAB)


# --- the BPE tokenizer ------------------------------------------------------------------------------------------

def test_bpe_round_trips_text_and_describes_its_file(bpe_file):
    tok = BPETokenizer.from_file(bpe_file)
    assert tok.vocab_size == 300
    text = corpus.make_text(30, 7) + "~ ### Response\nchildren\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1 and len(ids) < len(text)  # merges: fewer tokens than characters
    assert tok.decode(ids) == text
    assert tok.describe() == {"kind": "bpe", "file": "tokenizer.json", "vocab_size": 300,
                              "sha256": hashlib.sha256(bpe_file.read_bytes()).hexdigest()}
    lengths = tok.token_lengths()
    assert lengths.shape == (300,) and int(lengths[ids].sum()) == len(text)


def test_bpe_files_are_written_into_a_run_folder_and_read_back(bpe_file, tmp_path):
    tok = make_tokenizer(str(bpe_file))
    tok.save(tmp_path)
    tok.save(tmp_path)  # the same file again: nothing to do
    back = tokenizer_from_meta({"tokenizer": tok.describe()}, tmp_path)
    assert back.sha256 == tok.sha256 and back.encode("the cat.\n").tolist() == tok.encode("the cat.\n").tolist()
    other = BPETokenizer.from_file(train_bpe(tmp_path / "other.json", vocab_size=280))
    with pytest.raises(ValueError, match="holds another tokenizer"):
        other.save(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "other.json").read_bytes())
    with pytest.raises(ValueError, match="is not the tokenizer it was trained with"):
        tokenizer_from_meta({"tokenizer": tok.describe()}, tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json' is missing"):
        tokenizer_from_meta({"tokenizer": tok.describe()}, tmp_path)


def test_a_character_tokenizer_writes_nothing_and_an_absent_record_means_it(tmp_path):
    tok = CharTokenizer()
    tok.save(tmp_path)
    assert os.listdir(tmp_path) == [] and tok.describe() == {"kind": "char"}
    assert isinstance(tokenizer_from_meta({}, tmp_path), CharTokenizer)
    with pytest.raises(ValueError, match="not one minilora knows"):
        tokenizer_from_meta({"tokenizer": {"kind": "wordpiece"}}, tmp_path)


def test_a_file_that_is_no_tokenizer_is_one_line_naming_the_option(tmp_path):
    clients.require("tokenizers")  # without it the refusal names the extra instead (the test below)
    bad = tmp_path / "tok.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"^--tokenizer: '.*tok.json' is not a tokenizers tokenizer.json") as e:
        make_tokenizer(str(bad))
    assert "\n" not in str(e.value)


def test_a_missing_tokenizer_file_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"^--tokenizer: cannot read '.*missing.json'") as e:
        make_tokenizer(str(tmp_path / "missing.json"))
    assert "\n" not in str(e.value)


def test_without_the_tokenizers_package_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(ValueError, match=r"^tokenizer: .*install it with pip install 'minilora\[hf\]'$"):
        BPETokenizer(b"{}")
    with pytest.raises(ValueError, match=r"^--tokenizer: .*pip install 'minilora\[hf\]'$"):
        make_tokenizer(str(tmp_path / "tokenizer.json"))


def test_end_markers_and_stop_tokens_are_one_token_of_the_runs_tokenizer(bpe_file):
    char, bpe = CharTokenizer(), BPETokenizer.from_file(bpe_file)
    assert single_token_id(char, "\n", "end") == corpus.NEWLINE_ID
    assert single_token_id(bpe, "\n", "end") == bpe.encode("\n")[0]
    with pytest.raises(ValueError, match=r"end_marker: expected text that the run's tokenizer \(char\) encodes to "
                                         r"exactly one token, got 'ab' \(2 tokens\)"):
        check_settings(model.ModelConfig(), char, FinetuneConfig(end_marker="ab"), [{}] * 16, [])
    with pytest.raises(ValueError, match=r"end_marker: .*\(char\).*got 'é' \(0 tokens\)"):
        check_settings(model.ModelConfig(), char, FinetuneConfig(end_marker="é"), [{}] * 16, [])


def test_instruction_batches_encode_prompt_and_response_apart(bpe_file):
    tok = BPETokenizer.from_file(bpe_file)
    records = tasks.make_instruction_records("subject", 6, 0)
    x, y, mask = tasks.instruction_batch(records, tok, 128, end="\n")
    for b, r in enumerate(records):
        prompt = tok.encode(tasks.format_prompt(r["instruction"], r["input"]))
        counted = y[b][mask[b] == 1]
        assert tok.decode(counted) == r["output"] + "\n"  # the response and its one end token, nothing else
        assert x[b][:len(prompt)].tolist() == prompt.tolist()
        assert tasks.record_positions(r, "instruction", tok) == int((mask[b] > 0).sum()) + len(prompt) - 1


def test_loss_per_character_is_total_nats_over_total_characters(bpe_file):
    tok = BPETokenizer.from_file(bpe_file)
    config = model.ModelConfig(vocab_size=tok.vocab_size, context_length=16, d_model=16, n_heads=2, n_layers=1,
                               d_ff=32)
    params = model.init_params(config, 0)
    data = tok.encode(corpus.make_text(20, 3))
    per_token = evaluation.strided_val_loss(params, config, data)
    per_char = evaluation.strided_val_loss(params, config, data, token_lengths=tok.token_lengths())
    # the counted targets: the second half of every window (starts every T/2 tokens)
    T, half = 16, 8
    counted = np.concatenate([data[s + half + 1:s + T + 1] for s in range(0, len(data) - T - 1, half)])
    n_chars = len(tok.decode(counted))
    assert n_chars > len(counted)  # BPE tokens hold more than one character on average
    np.testing.assert_allclose(per_char * n_chars, per_token * len(counted), rtol=1e-6)
    char_config = model.ModelConfig(context_length=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    char_params, char_data = model.init_params(char_config, 0), CharTokenizer().encode(corpus.make_text(20, 3))
    assert evaluation.strided_val_loss(char_params, char_config, char_data) == evaluation.strided_val_loss(
        char_params, char_config, char_data, token_lengths=CharTokenizer().token_lengths())


# --- runs carry their tokenizer: the CLI end to end -------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_run(bpe_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    text = folder / "corpus.txt"
    text.write_text(corpus.make_text(300, 1))
    run = folder / "pretrain"
    assert cli.main(["pretrain", "--text", str(text), "--tokenizer", str(bpe_file), "--out", str(run),
                     "--steps", "4", "--eval-every", "2", "--batch-size", "4", *TINY]) == 0
    return run


def test_pretraining_with_a_bpe_file_keeps_it_in_the_run_folder(bpe_run, bpe_file, capsys):
    assert (bpe_run / "tokenizer.json").read_bytes() == bpe_file.read_bytes()
    params, meta, _ = load_checkpoint(bpe_run / "checkpoint.npz")
    assert meta["tokenizer"]["kind"] == "bpe" and meta["model"]["vocab_size"] == 300
    assert params["wte"].shape == (300, 16)  # the vocabulary comes from the tokenizer
    loaded, config, _, tok = runs.load_model(bpe_run)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == config.vocab_size == 300


def test_pretrain_reports_nats_per_token_and_per_character(bpe_file, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.make_text(300, 2))
    assert cli.main(["pretrain", "--text", str(text), "--tokenizer", str(bpe_file), "--out", str(tmp_path / "r"),
                     "--steps", "2", "--batch-size", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "nats/token (" in out and "nats/char, 300 tokens)" in out and "character bigram" in out
    assert "tokenizer: " + str(tmp_path / "r" / "tokenizer.json") in out


def test_finetune_generate_and_evaluate_a_bpe_run_through_the_cli(bpe_run, tmp_path, capsys):
    records = tasks.make_instruction_records("subject", 40, seed=3)
    tasks.save_jsonl(records, tmp_path / "my.jsonl")
    run = tmp_path / "ft"
    assert cli.main(["finetune", "--checkpoint", str(bpe_run), "--data", str(tmp_path / "my.jsonl"),
                     "--method", "lora", "--steps", "3", "--batch-size", "4", "--out", str(run)]) == 0
    assert (run / "tokenizer.json").read_bytes() == (bpe_run / "tokenizer.json").read_bytes()
    assert load_checkpoint(run / "checkpoint.npz")[1]["tokenizer"]["kind"] == "bpe"
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "the red ", "--max-new-tokens", "8",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the red ") and len(out) > len("the red \n")
    assert cli.main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "nats/token (" in out and "nats/char)" in out and "exact match on 4 held-out records" in out
    assert cli.main(["evaluate", str(run), "--data", str(tmp_path / "my.jsonl")]) == 0
    assert "exact match on 40 records of " in capsys.readouterr().out
    # the base with the adapter: the base's tokenizer comes along
    assert cli.main(["generate", "--checkpoint", str(bpe_run), "--adapter", str(run), "--prompt", "a ",
                     "--max-new-tokens", "4"]) == 0
    assert cli.main(["merge", str(run), "--out", str(tmp_path / "merged" / "merged.npz")]) == 0
    _, _, meta, tok = runs.load_model(tmp_path / "merged" / "merged.npz")
    assert meta["tokenizer"]["kind"] == "bpe" and isinstance(tok, BPETokenizer)


def test_resuming_a_bpe_run_keeps_its_tokenizer(bpe_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("checkpoint.npz", "tokenizer.json"):
        (run / name).write_bytes((bpe_run / name).read_bytes())
    argv = ["pretrain", "--resume", str(run), "--eval-every", "2", "--batch-size", "4",
            "--text", str(bpe_run.parent / "corpus.txt"), *TINY]
    # issue 19: more steps than the run had is refused (its learning-rate schedule spans its steps)
    assert cli.main([*argv, "--steps", "6"]) == 2
    assert "steps 4 in the checkpoint, 6 now" in capsys.readouterr().err
    assert cli.main([*argv, "--steps", "4"]) == 0  # the same run, at its last step: its tokenizer is kept
    meta = load_checkpoint(run / "checkpoint.npz")[1]
    assert meta["step"] == 4 and meta["tokenizer"]["kind"] == "bpe"


def test_a_vocabulary_mismatch_is_refused_in_one_line_with_nothing_written(bpe_run, tmp_path, capsys):
    params, meta, _ = load_checkpoint(bpe_run / "checkpoint.npz")
    bad = tmp_path / "bad"
    bad.mkdir()
    # the weights have 300 rows, the checkpoint says its ids are characters (96)
    save_checkpoint(bad / "checkpoint.npz", params, {**meta, "tokenizer": {"kind": "char"}})
    with pytest.raises(ValueError, match=r"the tokenizer \(char\) has 96 tokens but the weights have vocab_size 300"):
        runs.load_model(bad)
    out = tmp_path / "ft"
    for argv in (["finetune", "--checkpoint", str(bad), "--steps", "1", "--out", str(out)],
                 ["generate", "--checkpoint", str(bad)], ["evaluate", str(bad)],
                 ["merge", str(bad), "--out", str(tmp_path / "m.npz")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "has 96 tokens but the weights have vocab_size 300" in err, argv
    assert not out.exists() and not (tmp_path / "m.npz").exists()
    assert sorted(os.listdir(bad)) == ["checkpoint.npz"]


def test_a_bpe_run_without_its_tokenizer_file_is_refused_in_one_line(bpe_run, tmp_path, capsys):
    run = tmp_path / "lost"
    run.mkdir()
    (run / "checkpoint.npz").write_bytes((bpe_run / "checkpoint.npz").read_bytes())
    assert cli.main(["generate", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and err.startswith("minilora generate: error: --checkpoint: ") and "is missing" in err


def test_a_checkpoint_written_before_tokenizers_were_recorded_loads_as_characters(tmp_path, capsys):
    from minilora.pretrain import PretrainConfig, load_or_pretrain, pretrain

    config = PretrainConfig.fast()
    config.train.steps = 2
    run = tmp_path / "old"
    pretrain(config, run_dir=str(run))
    params, meta, arrays = load_checkpoint(run / "checkpoint.npz")
    assert meta["tokenizer"] == {"kind": "char"}
    old = {k: v for k, v in meta.items() if k != "tokenizer"}
    save_checkpoint(run / "checkpoint.npz", params, old, arrays)  # as written before this change
    _, _, _, tok = runs.load_model(run)
    assert isinstance(tok, CharTokenizer)
    assert cli.main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 0
    # it is reused as the finished character run it is (its missing tokenizer read as characters)
    _, _, summary, tok = load_or_pretrain(config, str(run))
    assert summary is None and isinstance(tok, CharTokenizer)
    # issue 19: more steps is another run (the learning-rate schedule spans the steps), refused unless overwritten
    config.train.steps = 3
    with pytest.raises(ValueError, match="holds another pretraining run"):
        load_or_pretrain(config, str(run))


def test_the_run_files_include_the_tokenizer(bpe_run):
    assert "tokenizer.json" in runs.RUN_FILES  # --overwrite removes a replaced run's tokenizer too
    log = [json.loads(line) for line in open(bpe_run / "log.jsonl")]
    assert log[0]["meta"]["tokenizer"]["kind"] == "bpe"
    # a BPE run's curves are per token: `plot` draws no per-character floor beside them
    header = {"kind": "pretrain", "corpus": "toy grammar", "floor": 0.532}
    assert plot.toy_corpus_floor([{"meta": header}]) == 0.532  # a log from before tokenizers were recorded
    assert plot.toy_corpus_floor([{"meta": {**header, "tokenizer": {"kind": "char"}}}]) == 0.532
    assert plot.toy_corpus_floor([{"meta": {**header, "tokenizer": log[0]["meta"]["tokenizer"]}}]) is None


def test_a_bpe_run_on_the_toy_corpus_meets_the_floor_per_character(bpe_file, tmp_path):
    from minilora.pretrain import PretrainConfig, pretrain

    config = PretrainConfig.fast()
    config.train.steps = 2
    tok = make_tokenizer(str(bpe_file))
    _, s = pretrain(config, run_dir=str(tmp_path / "r"), tokenizer=tok)
    assert s["floor"] == corpus.entropy_per_char() and s["bigram_loss"] is not None
    # more characters than tokens: the same total nats spread over more characters
    assert 0 < s["val_loss_per_char"] < s["val_loss"]
    assert load_checkpoint(tmp_path / "r" / "checkpoint.npz")[1]["model"]["vocab_size"] == tok.vocab_size
