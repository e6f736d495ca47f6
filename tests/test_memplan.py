"""The memory plan (minilora/memplan.py) holds to what the code holds: the caches it walks, the peak
tracemalloc measures; and finetune refuses, in one line and before any work, a run that cannot fit."""

import importlib.util
import math
import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from minilora import cli, memfit, memplan, model
from minilora.backend import DEFAULT_THREADS
from minilora.methods import nf4
from conftest import tiny_pretrained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("full", "lora", "qlora", "dora", "prompt", "prefix", "ia3")
SMALL = model.ModelConfig(vocab_size=300, context_length=96, d_model=64, n_heads=4, n_layers=2, d_ff=256)
B, T = 8, 48
# the plan may lie below the measured peak by at most this share (what the plan leaves out: Python
# objects, small temporaries of the ops), and above it by at most 10% (the bound)
BELOW, ABOVE = 0.06, 1.10


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wall():
    return _load("memory_wall")


def _cache_bytes(cache, params):
    """Bytes of the distinct buffers in a nested cache (benchmarks/memory.py's walk: each view's base once),
    parameters left out, a checkpointed block counted by the input it keeps."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # memory.py imports speed.py as a sibling
    try:
        memory = _load("memory")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))

    def unwrap(item):
        if isinstance(item, (tuple, list)):
            return [unwrap(i) for i in item]
        if isinstance(item, dict):
            return {k: unwrap(v) for k, v in item.items()}
        if isinstance(item, model.BlockCheckpoint):  # what it holds is the block's input
            return item.x
        return item

    return memory.cache_bytes(unwrap(cache), {id(memory._root(p)) for p in params.values()})


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_the_activations_the_plan_counts_are_the_caches_the_forward_keeps(wall, method, ckpt):
    if ckpt and not memfit.checkpointing_available():
        pytest.skip("activation checkpointing is not in this model yet")
    params, cfg, trainable = wall.random_model(SMALL, method)
    batch = wall.make_batch(SMALL, B, T)
    kwargs = {"checkpoint_activations": True} if ckpt else {}
    _, cache = model.forward(params, cfg, batch["x"], trainable=trainable, **kwargs)
    assert memplan.plan(SMALL, method, B, T, ckpt).forward_cache == _cache_bytes(cache, params)


def test_gpt2_sizes_have_gpt2s_shapes_and_parameter_counts():
    counts = {name: sum(math.prod(s) for s in model.param_shapes(c).values()) for name, c in memplan.SIZES.items()}
    # GPT-2 without the key biases (model.param_shapes): 124M, 355M, 774M, 1558M less L x C
    assert counts == {"gpt2-small": 124_430_592, "gpt2-medium": 354_798_592, "gpt2-large": 773_984_000,
                      "gpt2-xl": 1_557_534_400}
    assert memplan.SIZES["gpt2-small"] is model.SIZES["gpt2-small"]
    xl = memplan.SIZES["gpt2-xl"]
    assert (xl.n_layers, xl.d_model, xl.n_heads, xl.d_ff, xl.vocab_size, xl.context_length) == \
        (48, 1600, 25, 6400, 50257, 1024)


def test_at_xl_full_fine_tuning_passes_24_gib_and_lora_and_qlora_fit():
    xl = memplan.SIZES["gpt2-xl"]
    full, lora, qlora = (memplan.plan(xl, m, 1, 256) for m in ("full", "lora", "qlora"))
    n = 1_557_534_400
    assert full.terms["weights"] == full.terms["gradients"] == 4 * n and full.terms["optimizer"] == 8 * n
    assert full.total > 22 * 2**30  # the machine's 24 GiB less 2 of headroom
    assert lora.total < 8 * 2**30 and qlora.total < 3 * 2**30
    # QLoRA's block linears as NF4: 4 bits, an int8 absmax per 64, a float32 scale per 256 absmax, a mean
    linears = 48 * (4 * 1600 * 1600 + 2 * 1600 * 6400)
    nf4_bytes = 48 * sum(m // 2 + m // 64 + 4 * -(-(m // 64) // 256) + 4
                         for m in [1600 * 1600] * 4 + [1600 * 6400] * 2)
    adapters = 48 * 4 * 8 * (1600 + 1600) * 4
    assert qlora.terms["weights"] == 4 * (n - linears) + nf4_bytes + adapters
    assert 8 * nf4_bytes / linears == pytest.approx(4 + 8 / nf4.BLOCK_SIZE + 32 / (64 * 256), abs=1e-3)
    assert lora.terms["optimizer"] == qlora.terms["optimizer"] == 2 * adapters


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_the_plan_is_within_10_percent_of_the_measured_peak(wall, method, ckpt):
    if ckpt and not memfit.checkpointing_available():
        pytest.skip("activation checkpointing is not in this model yet")
    p = memplan.plan(SMALL, method, B, T, ckpt)
    measured = wall.measure_step(SMALL, method, B, T, ckpt)["tracemalloc_peak"]
    assert (1 - BELOW) * measured <= p.total <= ABOVE * measured, (p.phase, p.total, measured)


def test_checkpointing_plans_less_than_keeping_every_activation():
    for method in METHODS:
        plain, ckpt = (memplan.plan(SMALL, method, B, T, c) for c in (False, True))
        assert ckpt.total < plain.total, method
    small = memplan.SIZES["gpt2-small"]
    assert memplan.plan(small, "lora", 8, 1024, True).total < 0.5 * memplan.plan(small, "lora", 8, 1024).total


def test_sizes_parse_with_their_units_and_bad_ones_name_the_option():
    assert memfit.parse_size("50MB") == 50 * 10**6 and memfit.parse_size("2GiB") == 2 * 2**30
    assert memfit.parse_size("1024") == 1024 and memfit.parse_size("1.5 kib") == 1536
    for bad in ("", "-3MB", "0", "12 parsecs", "MB"):
        with pytest.raises(ValueError, match="--memory-limit: expected a positive size"):
            memfit.parse_size(bad)


def test_the_plan_refuses_bad_arguments_in_one_line():
    with pytest.raises(ValueError, match="batch: expected a positive integer, got 0"):
        memplan.plan(SMALL, "lora", 0, 8)
    with pytest.raises(ValueError, match="context: expected at most the model's context_length=96, got 97"):
        memplan.plan(SMALL, "lora", 1, 97)
    with pytest.raises(ValueError, match="method: expected one of"):
        memplan.plan(SMALL, "nope", 1, 8)


def test_memory_prints_every_term_and_whether_it_fits(capsys):
    assert cli.main(["memory", "--size", "gpt2-xl", "--method", "full", "--memory-limit", "22GiB"]) == 0
    out = capsys.readouterr().out
    for term in memplan.TERMS + ("total",):
        assert f"\n  {term} " in out, term
    assert "does not fit" in out and "would fit: --method lora, --method qlora" in out
    assert cli.main(["memory", "--size", "gpt2-xl", "--method", "qlora", "--memory-limit", "24GiB"]) == 0
    assert "fits: " in capsys.readouterr().out
    assert cli.main(["memory", "--method", "lora"]) == 2
    assert "--size, --run: expected exactly one, got neither" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return tiny_pretrained_run(tmp_path_factory, n_layers=1)


def test_memory_plans_a_runs_model(pretrained, capsys):
    assert cli.main(["memory", "--run", str(pretrained), "--method", "lora", "--batch", "4", "--context", "64",
                     "--memory-limit", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "1 layers, d_model 16" in out and "fits: " in out


def test_finetune_refuses_a_run_that_cannot_fit_in_one_line_before_any_work(pretrained, tmp_path, capsys,
                                                                             monkeypatch, request):
    from minilora import finetune as finetune_module
    from minilora.runs import load_model

    # the command's thread count throughout: the plan counts a buffer per CPU thread where an op splits its
    # work over them (threads.py), and the command pins DEFAULT_THREADS
    request.addfinalizer(threadpool_limits(DEFAULT_THREADS, user_api="blas").restore_original_limits)

    def work(*args, **kwargs):
        raise AssertionError("fine-tuning started although the plan does not fit")

    monkeypatch.setattr(finetune_module, "finetune", work)
    params, model_config, _, tokenizer = load_model(str(pretrained))
    config = finetune_module.FinetuneConfig(method="full")
    config.train.batch_size = 16
    data = finetune_module.load_data(model_config, tokenizer, config)
    full = finetune_module.memory_plan(model_config, tokenizer, config, data)
    lora = finetune_module.memory_plan(model_config, tokenizer, finetune_module.FinetuneConfig(method="lora"), data)
    assert lora.total < full.total
    limit = (lora.total + full.total) // 2  # full does not fit; LoRA at the same batch does
    run = tmp_path / "run"
    monkeypatch.setenv(memfit.LIMIT_ENV, str(limit))
    code = cli.main(["finetune", "--checkpoint", str(pretrained), "--method", "full", "--batch-size", "16",
                     "--steps", "2", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"minilora finetune: error: one full step (batch 16, context {full.context}) needs " in err
    assert f"set by {memfit.LIMIT_ENV}; its largest term is {full.largest()} " in err
    options = err.strip().split("would fit: ")[1].split(", ")
    assert "--method lora" in options, err
    for option in options:  # every option it names was checked by the plan
        flags = option.split()
        change = {"method": flags[flags.index("--method") + 1]} if "--method" in flags else {}
        c = finetune_module.FinetuneConfig(method=change.get("method", "full"),
                                           checkpoint_activations="--checkpoint-activations" in flags)
        c.train.batch_size = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 16
        assert finetune_module.memory_plan(model_config, tokenizer, c, data).total <= limit, option
    assert not run.exists()  # nothing was written


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_the_plan_holds_for_the_same_step_on_device_arrays(wall, method, ckpt):
    """What benchmarks/gpu_check.sh checks on a GPU (the plan against CuPy's pool high-water mark), run here on
    the CPU stand-in for CuPy: device arrays, with host memory underneath that tracemalloc sees."""
    import standin

    p = memplan.plan(SMALL, method, B, T, ckpt, cpu_threads=1)  # device arrays: no loop splits over CPU threads
    measured = wall.measure_step(SMALL, method, B, T, ckpt, xp=standin)["tracemalloc_peak"]
    assert (1 - BELOW) * measured <= p.total <= ABOVE * measured, (p.phase, p.total, measured)


def test_the_gpu_table_reads_the_pools_peak_against_the_plan(wall):
    cells = [{"size": "gpt2-small", "method": "lora", "checkpoint_activations": False, "plan_total": 2 ** 30,
              "measured": {"device_peak": 2 ** 30 + 2 ** 24, "device_over_plan": 1.016, "step_s": 0.5}},
             {"size": "gpt2-xl", "method": "full", "checkpoint_activations": True, "plan_total": 2 ** 35,
              "refused": "..."}]
    table = wall.gpu_table({"cells": cells})
    assert "| gpt2-small | lora | off | 1.00 | 1.02 | 1.016 | 0.50 |" in table
    assert "| gpt2-xl | full | on | 32.00 | refused by the plan |  |  |" in table


def test_ia3_with_query_factors_is_planned_as_the_forward_keeps_it(wall):
    """Ia3Config(queries=True) (a PEFT IA3 adapter read in): q's unscaled output is kept too, N C more a block."""
    from minilora.finetune import FinetuneConfig
    from minilora.methods import ia3, lora

    settings = FinetuneConfig(method="ia3", lora=ia3.Ia3Config(queries=True))
    params, cfg = ia3.add_ia3(model.init_params(SMALL, 0), SMALL, ia3.Ia3Config(queries=True))
    trainable = set(lora.adapter_names(cfg))
    _, cache = model.forward(params, cfg, wall.make_batch(SMALL, B, T)["x"], trainable=trainable)
    planned = memplan.plan(SMALL, "ia3", B, T, settings=settings).forward_cache
    assert planned == _cache_bytes(cache, params)
    assert planned - memplan.plan(SMALL, "ia3", B, T).forward_cache == 4 * SMALL.n_layers * B * T * SMALL.d_model
