"""Issue 27, "settings that overflow": every float option of every command, at its extremes.

The float options are found from the parser itself, so a new one without a case here fails
test_every_float_option_has_a_case. Each is tried at the extremes of float32 and float64 (the largest
and the smallest positive normal and subnormal numbers, 0, -0, a negative number, inf, nan) and just
inside and just outside its bound (bounds.py, or the LoRA scale's for --alpha). Each value gives either
a one-line refusal that names the option (exit 2) or a run that completes with finite results, and
never a RuntimeWarning: a warning is an error in these tests (an overflow that only warns is the class
of bug this file is about). The library entry points the CLI calls refuse exactly the same values in
the same words, from Python and from a sweep's cell.
"""

import json
import math
import os
import warnings

import numpy as np
import pytest

from minilora import bounds, cli, evaluation, ops, optim, sampling, sweep, tasks
from minilora.checkpoint import load_checkpoint
from minilora.methods import lora
from minilora.model import ModelConfig
from minilora.train import TrainConfig

F32, F64 = np.finfo(np.float32), np.finfo(np.float64)
EXTREMES = [0.0, -0.0, -1.0, 1.0, float(F64.smallest_subnormal), float(F32.smallest_subnormal), float(F32.tiny),
            float(F64.tiny), float(F32.max), float(F64.max), -float(F64.max), math.inf, -math.inf, math.nan]
RANK = 4  # --alpha's cases: the bound is on alpha / r
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]


def _near(x):
    """x and its two float64 neighbours: just inside and just outside a bound at x."""
    return [x, float(np.nextafter(x, -math.inf)), float(np.nextafter(x, math.inf))] if math.isfinite(x) else []


def _values(*ends):
    seen, out = set(), []
    for v in EXTREMES + [x for end in ends for x in _near(end)]:
        if repr(v) not in seen:  # repr keeps -0.0 apart from 0.0
            seen.add(repr(v))
            out.append(v)
    return out


def _is_float_type(parse):
    for text in ("0.5", "1e-3", "1", "2", "100", "1e4"):
        try:
            if isinstance(parse(text), float):
                return True
        except Exception:
            continue
    return False


def float_options():
    """(command, option) -> argparse action, for every option of every command that parses a float."""
    found = {}
    for command, sub in cli._subparsers(cli.build_parser()).items():
        for a in sub._actions:
            if a.option_strings and a.type is not None and _is_float_type(a.type):
                found[(command, a.option_strings[0])] = a
    return found


def _alpha_ok(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0 and lora.MIN_SCALE <= v / RANK <= lora.MAX_SCALE


# (command, option) -> (what the run needs besides the option, its expected refusal test, the values tried)
def _bounded(b):
    return (lambda v: b.problem(v) is None), _values(b.low, b.high)


CASES = {
    ("pretrain", "--lr"): ("pretrain", *_bounded(bounds.LR)),
    ("pretrain", "--dropout"): ("pretrain", *_bounded(bounds.DROPOUT)),
    ("generate", "--temperature"): ("generate", *_bounded(bounds.TEMPERATURE)),
    ("finetune", "--lr"): ("finetune", *_bounded(bounds.LR)),
    ("finetune", "--lora-dropout"): ("finetune", *_bounded(bounds.DROPOUT)),
    ("finetune", "--alpha"): ("finetune", _alpha_ok, _values(lora.MIN_SCALE * RANK, lora.MAX_SCALE * RANK)),
}


def test_every_float_option_has_a_case():
    options = float_options()
    assert set(options) == set(CASES), "a float option without a case here (or a case for no option)"
    for key, action in options.items():
        assert action.type is not float, f"{key}: a bare float type admits inf, nan and every overflow"
    for command, sub in cli._subparsers(cli.build_parser()).items():  # no float read as a string
        for a in sub._actions:
            if isinstance(a.default, float) and not isinstance(a.default, bool):
                assert (command, a.option_strings[0]) in options, (command, a.option_strings)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained base and ten records to fine-tune on (one held out)."""
    d = tmp_path_factory.mktemp("floats")
    tasks.save_jsonl(tasks.make_instruction_records("subject", 10, seed=1), str(d / "records.jsonl"))
    (d / "text.txt").write_text("the cat sleeps. a dog runs.\n" * 40)  # pretrain's cases: no toy corpus to build
    assert cli.main(["pretrain", "--out", str(d / "base"), "--steps", "2", "--eval-every", "2",
                     "--batch-size", "2", *TINY, "--context-length", "128"]) == 0  # a record fits
    return d


@pytest.fixture
def short_corpus_loss(monkeypatch):
    """Fine-tuning's forgetting score on 20 corpus sentences instead of 1000: the same code, less of it."""
    full = evaluation.corpus_val_data
    monkeypatch.setattr(evaluation, "corpus_val_data", lambda tokenizer: full(tokenizer, 20))


def _argv(kind, base, out):
    return {
        "pretrain": ["pretrain", "--text", str(base / "text.txt"), "--out", str(out), "--overwrite", "--steps", "2",
                     "--eval-every", "2",
                     "--batch-size", "2", *TINY, "--context-length", "32"],
        "generate": ["generate", "--checkpoint", str(base / "base"), "--max-new-tokens", "3", "--top-k", "5"],
        "finetune": ["finetune", "--checkpoint", str(base / "base"), "--data", str(base / "records.jsonl"),
                     "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--rank", str(RANK),
                     "--out", str(out), "--overwrite"],
    }[kind]


def _all_finite(run):
    params, meta, arrays = load_checkpoint(run / "checkpoint.npz")
    for name, a in {**params, **arrays}.items():
        if a.dtype.kind == "f":
            assert np.isfinite(a).all(), name
    losses = [r["train_loss"] for r in map(json.loads, open(run / "log.jsonl")) if "train_loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    if (run / "summary.json").exists():
        s = json.load(open(run / "summary.json"))
        for key in ("val_loss_before", "val_loss_after", "final_train_loss", "metric"):
            assert math.isfinite(s[key]), key


@pytest.mark.parametrize("command, option, value",
                         [(c, o, v) for (c, o), (_, _, values) in CASES.items() for v in values],
                         ids=lambda x: repr(x) if isinstance(x, float) else str(x))
def test_an_extreme_value_is_refused_in_one_line_or_runs_finite(base, short_corpus_loss, tmp_path, capsys,
                                                                command, option, value):
    kind, accepted, _ = CASES[(command, option)]
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an overflow that only warns fails here
        # OPTION=VALUE: argparse reads a separate "-1e+308" or "-inf" as an option of its own
        rc = cli.main([*_argv(kind, base, run), f"{option}={value!r}"])
    out, err = capsys.readouterr()
    if accepted(value):
        assert rc == 0, err
        if kind == "generate":
            assert out.strip()
        else:
            _all_finite(run)
    else:
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{option}: expected" in err and "got" in err, err
        action = float_options()[(command, option)]
        if hasattr(action.type, "bound"):  # the library's own words: the bound is declared once
            assert action.type.bound.problem(value) in err
        assert not run.exists()  # refused before any work


# The library entry points, called from Python and from a sweep's cells: the same bound, the same words.
LOGITS = np.array([[3.0, 1.0, -2.0]], np.float32)


def _cell(**kw):
    sweep.check_cells([sweep.Cell("floats", **kw)])


LIBRARY = [
    (bounds.LR, "lr", lambda v: TrainConfig(lr=v, min_lr=0.0)),
    (bounds.LR, "lr", lambda v: _cell(lr=v)),
    (bounds.GRAD_CLIP, "grad_clip", lambda v: TrainConfig(grad_clip=v)),
    (bounds.DROPOUT, "dropout", lambda v: ModelConfig(dropout=v)),
    (bounds.DROPOUT, "model.dropout", lambda v: ModelConfig.from_dict({**ModelConfig().to_dict(), "dropout": v})),
    (bounds.DROPOUT, "dropout", lambda v: lora.LoraConfig(dropout=v)),
    (bounds.DROPOUT, "p", lambda v: ops.dropout_forward(np.ones((2, 3), np.float32), v, np.random.default_rng(0))),
    (bounds.TEMPERATURE, "temperature", lambda v: sampling.pick_next(LOGITS, v, rng=np.random.default_rng(0))),
    # a batch so large that round(replay * B) < B for every replay < 1 (B < 2^53 rounds 1 - 2^-53 up to 1)
    (bounds.REPLAY, "replay", lambda v: _cell(replay=v, batch_size=2 ** 53)),
]


@pytest.mark.parametrize("bound, name, build", LIBRARY, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(LIBRARY)])
def test_the_library_refuses_exactly_what_the_cli_refuses(bound, name, build):
    for v in _values(bound.low, bound.high):
        problem = bound.problem(v)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            if problem is None:
                build(v)
            else:
                with pytest.raises(ValueError) as e:
                    build(v)
                assert str(e.value) == f"{name}: {problem}", v


def test_a_temperature_anywhere_in_range_samples_exactly():
    """The shift by the row max makes the division exact: tiny T is argmax (ties drawn at random), huge T uniform."""
    rng = np.random.default_rng(0)
    rows = np.repeat(np.array([[2.0, 2.0, -1.0]], np.float32), 400, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for t in (float(F64.smallest_subnormal), 1e-300, float(F32.tiny)):
            got = sampling.pick_next(rows, t, rng=rng)
            assert set(got.tolist()) == {0, 1}  # the two largest, each sometimes; never the third
            assert (sampling.pick_next(np.repeat(LOGITS, 50, axis=0), t, rng=rng) == 0).all()
        counts = np.bincount(sampling.pick_next(np.repeat(LOGITS * 10, 3000, axis=0), float(F64.max), rng=rng),
                             minlength=3)
    assert (abs(counts - 1000) < 150).all(), counts  # uniform: 1000 each, sd 26
    # what the shift avoids: dividing the raw logits by a subnormal temperature overflows
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        LOGITS.astype(np.float64) / float(F64.smallest_subnormal)


def test_weight_decay_and_min_lr_are_bounded_by_the_learning_rate():
    TrainConfig(lr=0.1, weight_decay=10.0)  # lr * wd = 1: the decay zeroes the matrices, finite
    with pytest.raises(ValueError, match=r"^weight_decay: expected a decay rate in \[0, 10\] \(at most 1 / lr"):
        TrainConfig(lr=0.1, weight_decay=float(np.nextafter(10.0, math.inf)))
    TrainConfig(lr=1e-30, min_lr=1e-31, weight_decay=1 / 1e-30)  # the smallest rate the CLI takes, and its lr / 10
    TrainConfig(min_lr=0.0)
    TrainConfig(min_lr=float(F32.tiny))
    for bad in (float(F32.smallest_subnormal), float(F64.tiny), 1.0):
        with pytest.raises(ValueError, match=r"^min_lr: expected 0 or a rate in \["):
            TrainConfig(lr=1e-3, min_lr=bad)


def test_adam_eps_is_a_normal_number_of_the_parameters_dtype():
    def step(dtype, eps):
        params = {"W": np.array([[0.5, -0.5]], dtype)}
        state = optim.adamw_init(params, ["W"])
        optim.adamw_step(params, {"W": np.array([[0.0, 1.0]], dtype)}, state, 1e-3, eps=eps)  # one gradient is 0
        return params["W"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert np.isfinite(step(np.float32, float(F32.tiny))).all()
        assert np.isfinite(step(np.float64, 1e-300)).all()  # normal in float64
        assert step(np.float32, optim.EPS_MAX)[0, 0] == np.float32(0.5)
    for bad in (1e-300, float(F32.smallest_subnormal), 0.0, -1.0, math.nan, math.inf, 1e31):
        with pytest.raises(ValueError, match=r"^eps: expected a number in \[1\.17549e-38, 1e\+30\] for float32"):
            step(np.float32, bad)
    # what the bound prevents: eps = 1e-300 is 0 in float32, and a zero gradient's step is 0 / 0
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.float32(0.0) / (np.sqrt(np.float32(0.0)) + np.float32(1e-300)))


def test_the_smallest_clip_norm_clips_the_largest_gradient_into_a_normal_float32():
    # 1000 tensors, each one |g| just under where g * g (a tensor's sum of squares, in float32) overflows
    grads = {f"g{i}": np.full((1,), 1.8e19, np.float32) for i in range(1000)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        norm = float(optim.clip_grad_norm(grads, bounds.GRAD_CLIP.low))
    g = np.concatenate(list(grads.values()))
    assert math.isfinite(norm) and np.abs(g).min() >= F32.tiny  # normal float32 numbers, not subnormals
    assert float(np.linalg.norm(g.astype(np.float64))) == pytest.approx(bounds.GRAD_CLIP.low, rel=1e-5)
    with pytest.raises(ValueError, match=r"^max_norm: expected 0 or a max gradient norm >= 1e-12"):
        optim.clip_grad_norm(grads, 1e-13)


@pytest.fixture(scope="module")
def peft_folder(base):
    pytest.importorskip("safetensors")
    run, out = base / "lora", base / "exported"
    assert cli.main(["finetune", "--checkpoint", str(base / "base"), "--data", str(base / "records.jsonl"),
                     "--steps", "1", "--batch-size", "2", "--out", str(run)]) == 0
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    return out / "adapter"


@pytest.mark.parametrize("key, value, refused", [
    ("lora_alpha", 16.0, None),
    ("lora_alpha", 1e30, "lora_alpha: expected alpha / r in"),  # folded into B: was an overflow warning
    ("lora_alpha", 1e-300, "lora_alpha: expected alpha / r in"),  # was a B of zeros, silently
    ("lora_alpha", -1.0, "lora_alpha: expected a positive number"),
    ("lora_alpha", "16", "lora_alpha: expected a finite number"),  # was a TypeError's traceback
    ("alpha_pattern", {"attn.c_attn": 1e308}, "alpha_pattern: transformer.h.0.attn.c_attn: expected alpha / r"),
    ("lora_dropout", 1.0, "lora_dropout: expected a probability in [0, 1)"),
    ("lora_dropout", float(np.nextafter(1.0, 0.0)), None),
])
def test_an_adapter_config_float_is_checked_like_the_option(base, peft_folder, tmp_path, capsys, key, value,
                                                             refused):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(peft_folder, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rc = cli.main(["generate", "--checkpoint", str(base / "base"), "--adapter", str(folder),
                       "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    if refused is None:
        assert rc == 0, err
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("minilora generate: error: "
                                                                                  "--adapter: "), err
        assert f"adapter_config.json: {refused}" in err, err


def test_the_bounds_module_declares_each_bound_once():
    """The CLI's types hold the library's Bound objects themselves, not copies of their numbers."""
    options = float_options()
    assert options[("pretrain", "--lr")].type.bound is bounds.LR is options[("finetune", "--lr")].type.bound
    assert options[("pretrain", "--dropout")].type.bound is bounds.DROPOUT
    assert options[("finetune", "--lora-dropout")].type.bound is bounds.DROPOUT
    assert options[("generate", "--temperature")].type.bound is bounds.TEMPERATURE
    src = open(os.path.join(os.path.dirname(cli.__file__), "cli.py")).read()
    assert "1e-30" not in src and "MAX_LR" not in src
