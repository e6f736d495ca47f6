"""Issue 19, classes 1 and 2: files from disk are untrusted; non-finite values are found and named.

Every member below is a file a careless or hostile user could hand over. Each is refused with a
ValueError (validate.FileError) whose message names the file and the field, never a TypeError,
KeyError or AttributeError, and never loaded silently.
"""

import json
import re

import numpy as np
import pytest

from minilora import cli, model, runs
from minilora.methods import lora
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.train import TrainConfig, check_resume, divergence_cause, load_resume, train
from minilora.validate import FileError, read_jsonl

TINY = model.ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, context_length=16)


def _raw(path, arrays, meta):
    """A file written without save_checkpoint (no seal): meta as given, arrays as given."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload["meta.json"] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **payload)
    return str(path)


def _model_file(tmp_path, name="m.npz", **meta):
    params = model.init_params(TINY, 0)
    path = str(tmp_path / name)
    save_checkpoint(path, params, {"kind": "pretrain", "model": TINY.to_dict(), **meta})
    return path, params


def _edit(path, out, edit_meta=None, edit_arrays=None, keep_seal=True):
    """Copy a saved file with its meta.json or arrays edited (the seal kept as it was unless keep_seal=False)."""
    with np.load(path, allow_pickle=False) as f:
        contents = {k: f[k] for k in f.files}
    meta = json.loads(contents.pop("meta.json").item())
    if not keep_seal:
        meta.pop("sha256")
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(contents)
    return _raw(out, contents, meta)


@pytest.mark.parametrize("meta, field", [
    ([1, 2], "meta.json"),  # a list
    ("just a string", "meta.json"),
    ({"kind": "pretrain"}, "meta.json: model"),  # no model config
    ({"kind": "pretrain", "model": [16, 2]}, "meta.json: model"),  # a list, not an object
    ({"kind": "pretrain", "model": {**TINY.to_dict(), "n_kv_heads": 2}}, "unknown ['n_kv_heads']"),
    ({"kind": "pretrain", "model": {**TINY.to_dict(), "n_heads": "2"}}, "model.n_heads"),
    ({"kind": "pretrain", "model": {**TINY.to_dict(), "dropout": "0.1"}}, "model.dropout"),
    ({"kind": "pretrain", "model": {**TINY.to_dict(), "lora": [8]}}, "lora"),
    ({"kind": "pretrain", "model": {**TINY.to_dict(), "lora": {"rank": 2, "targets": "qv"}}}, "lora.targets"),
    ({"kind": 7, "model": TINY.to_dict()}, "meta.json: kind"),
])
def test_a_model_files_metadata_is_checked_field_by_field(tmp_path, meta, field):
    path = _raw(tmp_path / "bad.npz", {f"param.{n}": a for n, a in model.init_params(TINY, 0).items()}, meta)
    with pytest.raises(FileError) as e:
        runs.load_model(path)
    assert str(e.value).startswith(path) and field in str(e.value) and "\n" not in str(e.value)


def test_an_edited_config_that_still_fits_the_shapes_is_refused_by_the_seal(tmp_path):
    path, _ = _model_file(tmp_path)
    runs.load_model(path)  # as written: loads

    def heads(meta):
        meta["model"]["n_heads"] = 4  # 16 / 4 still divides: every shape still fits, but it is another model

    for edited in (_edit(path, tmp_path / "heads.npz", heads),
                   _edit(path, tmp_path / "w.npz", edit_arrays=lambda c: c.update({"param.wte": c["param.wte"] * 2})),
                   _edit(path, tmp_path / "step.npz", lambda m: m.update(note="hand-edited"))):
        with pytest.raises(FileError, match="changed after it was saved"):
            runs.load_model(edited)
    with pytest.raises(FileError, match="seal"):  # a file not written by save_checkpoint
        runs.load_model(_edit(path, tmp_path / "unsealed.npz", keep_seal=False))


def _adapter_run(tmp_path):
    base = model.init_params(TINY, 0)
    params, config = lora.add_lora(base, TINY, lora.LoraConfig(rank=2, targets=("q", "v")))
    names = lora.lora_names(params)
    path = str(tmp_path / "adapter.npz")
    lora.save_adapter(path, params, names, config, base)
    base_path = str(tmp_path / "base.npz")
    save_checkpoint(base_path, base, {"kind": "pretrain", "model": TINY.to_dict()})
    return base, params, config, names, path, base_path


@pytest.mark.parametrize("extra", ["wte", "h.0.attn.q.W", "ln_f.g", "prompt", "h.0.attn.k.lora_A"])
def test_an_adapter_may_only_add_adapter_names(tmp_path, extra):
    base, params, config, names, _, base_path = _adapter_run(tmp_path)
    shape = params[extra].shape if extra in params else (4, 16) if extra == "prompt" else (2, 16)
    hostile = {**{n: params[n] for n in names}, extra: np.full(shape, 7.0, np.float32)}
    path = str(tmp_path / "hostile.npz")
    # written by save_checkpoint, so the seal is right: only the names check stands between it and the base
    save_checkpoint(path, hostile, {"kind": lora.ADAPTER_KIND, "model": config.to_dict(),
                                    "base_fingerprint": lora.base_fingerprint(base)})
    with pytest.raises(FileError, match=f"expected only adapter names.*{extra}") as e:
        runs.load_model(base_path, adapter=path)
    assert e.value.source == "adapter"


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("base_fingerprint"), "base_fingerprint"),
    (lambda m: m.update(base_fingerprint=12), "base_fingerprint"),
    (lambda m: m.update(kind="pretrain"), "kind"),
    (lambda m: m["model"].update(lora=None), "model.lora"),
    (lambda m: m["model"]["lora"].update(rank=3), "expected every adapter"),  # other shapes than the arrays
    (lambda m: m["model"]["lora"].update(alpha=1e300), "alpha"),
])
def test_an_adapters_metadata_is_checked(tmp_path, edit, field):
    *_, path, base_path = _adapter_run(tmp_path)
    bad = _edit(path, tmp_path / "bad.npz", edit, keep_seal=False)
    with pytest.raises(FileError, match=field):
        runs.load_model(base_path, adapter=bad)
    # through the CLI: one line, naming --adapter (not --checkpoint)
    assert cli.main(["generate", "--checkpoint", base_path, "--adapter", bad, "--max-new-tokens", "2"]) == 2


def _resume_file(tmp_path):
    params = model.init_params(TINY, 0)
    data = np.arange(300) % TINY.vocab_size

    class Windows:
        def sample(self, rng):
            s = rng.integers(0, len(data) - 17, 2)[:, None] + np.arange(16)
            return {"x": data[s], "y": data[s + 1]}

    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_every=4)
    train(params, list(params), TINY, Windows(), config, run_dir=tmp_path / "run",
          meta={"kind": "pretrain", "model": TINY.to_dict()})
    return str(tmp_path / "run" / "checkpoint.npz"), config, params, Windows()


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(step="20"), "meta.json: step"),
    (lambda m: m.update(step=-1), "meta.json: step"),
    (lambda m: m.update(step=10 ** 9), "meta.json: step"),
    (lambda m: m.update(rng="garbage"), "meta.json: rng"),
    (lambda m: m.update(rng={"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}), "meta.json: rng"),
    (lambda m: m.update(train="x"), "meta.json: train"),
    (lambda m: m["train"].update(steps="4"), "train.steps"),
    (lambda m: m["train"].update(momentum=0.9), "unknown ['momentum']"),
    (lambda m: m.pop("train"), "meta.json: train"),
])
def test_a_resume_checkpoints_training_state_is_checked(tmp_path, edit, field):
    ckpt, config, params, batches = _resume_file(tmp_path)
    bad = _edit(ckpt, tmp_path / "bad.npz", edit, keep_seal=False)
    with pytest.raises(FileError, match=re.escape(field)):
        check_resume(bad, config)
    with pytest.raises(FileError, match=re.escape(field)):
        train(params, list(params), TINY, batches, config, resume=bad)


@pytest.mark.parametrize("name, value", [("param.h.0.attn.q.W", np.nan), ("param.wpe", np.inf),
                                         ("opt.m.wte", np.nan), ("opt.v.ln_f.g", -np.inf)])
def test_a_non_finite_value_in_a_checkpoint_is_refused_and_named(tmp_path, name, value):
    ckpt, config, params, batches = _resume_file(tmp_path)

    def poison(contents):
        contents[name] = contents[name].copy()
        contents[name].flat[3] = value

    bad = _edit(ckpt, tmp_path / "nan.npz", edit_arrays=poison, keep_seal=False)
    short = name.removeprefix("param.")
    with pytest.raises(FileError, match=f"NaN or inf in .*{short}"):
        load_resume(bad)
    if name.startswith("param."):
        with pytest.raises(FileError, match=f"NaN or inf in parameter {short}"):
            runs.load_model(bad)
        assert cli.main(["evaluate", bad]) == 2  # never "loss: nan" with exit 0


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_a_checkpoint_of_another_dtype_is_refused(tmp_path, dtype):
    params = {n: a.astype(dtype) for n, a in model.init_params(TINY, 0).items()}
    path = str(tmp_path / "half.npz")
    save_checkpoint(path, params, {"kind": "pretrain", "model": TINY.to_dict()})
    with pytest.raises(FileError, match=f"float32 or float64.*{np.dtype(dtype).name}"):
        runs.load_model(path)


def test_training_checks_the_base_and_the_settings_before_blaming_the_learning_rate():
    params = model.init_params(TINY, 0)
    params["h.0.attn.q.W"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"params: .*h\.0\.attn\.q\.W \(NaN or inf\).*before any training step"):
        train(params, ["wte"], TINY, None, TrainConfig(steps=2, batch_size=2, warmup_steps=0))
    half = {n: a.astype(np.float16) for n, a in model.init_params(TINY, 0).items()}
    with pytest.raises(ValueError, match=r"float16"):
        train(half, list(half), TINY, None, TrainConfig(steps=2, batch_size=2, warmup_steps=0))
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0)
    # what divergence_cause says, most specific first
    assert "base model is broken" in divergence_cause(params, ["wte"], TINY, config, 5)
    good = model.init_params(TINY, 0)
    assert "first step" in divergence_cause(good, list(good), TINY, config, 0)
    adapted, lcfg = lora.add_lora(good, TINY, lora.LoraConfig(rank=1, alpha=1000.0))
    assert "LoRA scale" in divergence_cause(adapted, lora.lora_names(adapted), lcfg, config, 3)
    assert "lower learning rate" in divergence_cause(good, list(good), TINY, config, 3)


@pytest.mark.parametrize("build, option", [
    (lambda: TrainConfig(lr=1e30), "lr"),
    (lambda: TrainConfig(lr=1e-3, min_lr=1.0), "min_lr"),
    (lambda: TrainConfig(steps=5, warmup_steps=6), "warmup_steps"),
    (lambda: TrainConfig(beta2=1.0), "beta2"),
    (lambda: lora.LoraConfig(rank=8, alpha=1e300), "alpha"),
    (lambda: lora.LoraConfig(rank=8, alpha=1e-300), "alpha"),
    (lambda: lora.LoraConfig(rank=1, alpha=1e5, rslora=True), "alpha"),
])
def test_settings_whose_arithmetic_overflows_are_bounded_and_named(build, option):
    with pytest.raises(ValueError, match=f"^{option}: "):
        build()


def test_a_torn_last_line_of_a_log_is_dropped_and_any_other_bad_line_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"meta": {}}\n{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo')
    assert read_jsonl(log) == [{"meta": {}}, {"step": 1, "train_loss": 2.0}]
    for text, line in (('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n', 2), ('{"step": 1}\n[1, 2]\n', 2),
                       ('"a string"\n', 1)):
        log.write_text(text)
        with pytest.raises(FileError, match=f"line {line}"):
            read_jsonl(log)


def test_a_sealed_file_round_trips_and_the_seal_never_reaches_the_caller(tmp_path):
    path, params = _model_file(tmp_path, step=3)
    saved, meta, _ = load_checkpoint(path)
    assert "sha256" not in meta and meta["step"] == 3
    assert all(np.array_equal(saved[n], params[n]) for n in params)
