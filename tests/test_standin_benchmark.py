"""benchmarks/gpu_steps.py runs on a CPU-only machine (its GPU columns then say why they are empty),
and its PyTorch model is the same GPT as minilora's."""

import importlib.util
import os

import numpy as np
import pytest

import clients

from minilora import model
from minilora.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_steps", os.path.join(ROOT, "benchmarks", "gpu_steps.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_steps_prints_one_table_on_the_cpu(capsys, monkeypatch):
    gpu_steps = _load()
    monkeypatch.setitem(gpu_steps.CONFIGS, "default", (ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                                                   context_length=16), 2))
    assert gpu_steps.main(["--configs", "default", "--steps", "2", "--max-seconds", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    assert lines[header].split()[-6:] == ["numpy", "ms", "cupy", "ms", "torch-cuda", "ms"]
    row = lines[header + 2].split()
    assert row[0] == "default" and float(row[7]) > 0 and row[8] == "(2)"
    if gpu_steps._cupy()[0] is None:
        assert "cupy: skipped (" in out


def test_the_benchmarks_torch_gpt_is_miniloras_gpt():
    torch = clients.require("torch")
    gpu_steps = _load()
    config = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=2, d_ff=24)
    x, y = gpu_steps._batch(config, 3, 0)
    params, loss_fn = gpu_steps.torch_gpt(torch, config, "cpu")
    ours, _ = model.loss_and_grads(model.init_params(config, 0), config, {"x": x, "y": y})
    np.testing.assert_allclose(loss_fn(torch.as_tensor(x), torch.as_tensor(y)).detach().item(), ours, rtol=1e-5)
    ms, n = gpu_steps.torch_step_time(torch, config, 3, 2, 5.0, device="cpu")
    assert ms > 0 and n == 2
