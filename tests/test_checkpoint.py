"""Checkpoints: exact roundtrip, no pickle, atomic writes, clear errors."""

import os

import numpy as np
import pytest

from minilora.checkpoint import check_params_match, load_checkpoint, save_checkpoint
from minilora.optim import adamw_init, adamw_step, state_from_arrays, state_to_arrays


def _params():
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((5, 4)).astype(np.float32),
        "h.0.ln_1.g": np.ones(4, np.float32),
        "h.0.attn.q.lora_A": rng.standard_normal((2, 4)).astype(np.float32),
    }


def test_roundtrip_is_exact(tmp_path):
    params = _params()
    rng = np.random.default_rng(1234)
    rng.standard_normal(3)  # advance it, so the state is not the seed's
    meta = {
        "config": {"n_layer": 1, "d_model": 4, "lora": {"r": 2, "alpha": 4.0, "targets": ["q", "v"]}},
        "step": np.int64(17),  # NumPy scalars are converted
        "big": 2**127 + 3,  # a 128-bit int, like the PCG64 state
        "rng": rng.bit_generator.state,
    }
    extra = {"opt.m.wte": np.arange(20, dtype=np.float32).reshape(5, 4), "tokens": np.arange(7, dtype=np.int64)}
    path = tmp_path / "sub" / "dir" / "ckpt.npz"  # parents are created
    save_checkpoint(path, params, meta, extra)

    loaded, meta2, arrays = load_checkpoint(path)
    assert set(loaded) == set(params)
    for name in params:
        assert loaded[name].dtype == params[name].dtype
        np.testing.assert_array_equal(loaded[name], params[name])
    assert set(arrays) == set(extra)
    assert arrays["tokens"].dtype == np.int64
    np.testing.assert_array_equal(arrays["tokens"], extra["tokens"])
    np.testing.assert_array_equal(arrays["opt.m.wte"], extra["opt.m.wte"])
    assert meta2["config"] == meta["config"]
    assert meta2["step"] == 17 and meta2["big"] == 2**127 + 3
    # the restored generator continues exactly where the saved one was
    resumed = np.random.default_rng()
    resumed.bit_generator.state = meta2["rng"]
    np.testing.assert_array_equal(resumed.standard_normal(4), rng.standard_normal(4))


def test_file_is_plain_npz_without_pickle(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _params(), {"step": 1})
    assert path.exists()  # the name was used as given, no ".npz.npz"
    with np.load(path, allow_pickle=False) as npz:
        assert "meta.json" in npz.files and "param.wte" in npz.files
        assert npz["meta.json"].dtype.kind == "U" and npz["meta.json"].shape == ()


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    params = _params()
    state = adamw_init(params, ["h.0.attn.q.lora_A"])
    adamw_step(params, {"h.0.attn.q.lora_A": np.ones((2, 4), np.float32)}, state, lr=0.1)
    save_checkpoint(tmp_path / "c.npz", params, {"step": state["step"]}, state_to_arrays(state))
    loaded, _, arrays = load_checkpoint(tmp_path / "c.npz")
    restored = state_from_arrays(arrays, loaded)
    assert restored["step"] == 1 and set(restored["m"]) == {"h.0.attn.q.lora_A"}
    np.testing.assert_array_equal(restored["v"]["h.0.attn.q.lora_A"], state["v"]["h.0.attn.q.lora_A"])


@pytest.mark.parametrize("broken", ["savez", "replace"])
def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path, monkeypatch, broken):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _params(), {"step": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if broken == "savez":
        monkeypatch.setattr(np, "savez", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    params = {name: p + 1.0 for name, p in _params().items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, params, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def test_save_rejects_bad_meta_and_names(tmp_path):
    with pytest.raises(ValueError, match="meta.*JSON"):
        save_checkpoint(tmp_path / "c.npz", _params(), {"f": object()})
    with pytest.raises(ValueError, match="meta: expected a dict"):
        save_checkpoint(tmp_path / "c.npz", _params(), [1, 2])
    with pytest.raises(ValueError, match="arrays.*'param.x'"):
        save_checkpoint(tmp_path / "c.npz", _params(), {}, {"param.x": np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(tmp_path / "missing.npz")

    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="meta.json"):
        load_checkpoint(tmp_path / "foreign.npz")

    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single-array"):
        load_checkpoint(tmp_path / "single.npy")

    (tmp_path / "text.npz").write_text("not a zip at all")
    with pytest.raises(ValueError, match="not a minilora checkpoint") as e:
        load_checkpoint(tmp_path / "text.npz")
    assert "pickle" not in str(e.value)

    # issue 13: `--checkpoint my.txt` passed on numpy's advice to load it with allow_pickle; never suggest unpickling
    (tmp_path / "my.txt").write_text("hello\n")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    for name in ("my.txt", "objects.npz"):
        with pytest.raises(ValueError, match="not a .*minilora checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert "allow_pickle" not in str(e.value) and "trust" not in str(e.value) and "\n" not in str(e.value)

    good = tmp_path / "good.npz"
    save_checkpoint(good, _params(), {"step": 1})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_checkpoint(truncated)


def test_check_params_match_lists_every_problem():
    params = {"wte": np.zeros((5, 4)), "wpe": np.zeros((8, 4)), "extra": np.zeros(1)}
    expected = {"wte": (5, 4), "wpe": (16, 4), "ln_f.g": (4,)}
    with pytest.raises(ValueError) as info:
        check_params_match(params, expected, what="ckpt.npz")
    message = str(info.value)
    assert message.startswith("ckpt.npz:")
    assert "missing: ln_f.g" in message
    assert "unexpected: extra" in message
    assert "wpe: expected (16, 4), got (8, 4)" in message
    assert "wte" not in message
    check_params_match({"wte": np.zeros((5, 4))}, {"wte": [5, 4]})  # lists and tuples both accepted
