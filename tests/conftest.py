"""Backend fixtures: every test that takes `xp` runs on NumPy, on the CPU stand-in
for CuPy (tests/standin.py), and on CuPy itself where CuPy and a GPU are there.

On a GPU machine, set MINILORA_REQUIRE_CUPY=1 (benchmarks/gpu_check.sh does) so
that a broken CuPy install fails the CuPy tests instead of skipping them.
"""

import os
import signal

import numpy
import pytest

import clients
import standin  # registers the "standin" backend

# A job started in the background of a non-interactive shell (`cmd &` in a script, as some CI runners and
# nohup do) inherits SIGINT as ignored, and Python then never installs its Ctrl-C handler. The tests that
# check what Ctrl-C does send SIGINT to this process and to children; give both the terminal's behaviour.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _record_client_skip(report):
    """With MINILORA_CLIENT_SKIPS=FILE, append to FILE the node id of a test, or of a whole module, skipped for a
    missing real client (tests/clients.py): .ci/run runs exactly those again in an environment that has them."""
    path = os.environ.get("MINILORA_CLIENT_SKIPS")
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if path and report.skipped and clients.SKIP_TAG in reason:
        with open(path, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")


def pytest_runtest_logreport(report):  # a test that skips when it runs (clients.require inside it)
    _record_client_skip(report)


def pytest_collectreport(report):  # a module that skips as it is collected (clients.require at its top)
    _record_client_skip(report)


BACKEND_NAMES = ("numpy", "standin", "cupy")
DEVICE_NAMES = ("standin", "cupy")


def _cupy():
    """(cupy module, None) when CuPy can compute here, else (None, why not)."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy is not importable ({e}); install minilora[cuda12] or [cuda13] on a GPU machine"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        return None, f"CuPy is installed but CUDA is not usable ({e})"
    if n < 1:
        return None, "CuPy is installed but no GPU is visible"
    return cupy, None


def backend_module(name):
    """The array module for a backend name, skipping (or failing, see above) when CuPy cannot run."""
    if name == "numpy":
        return numpy
    if name == "standin":
        return standin
    cupy, reason = _cupy()
    if cupy is None:
        if os.environ.get("MINILORA_REQUIRE_CUPY") == "1":
            pytest.fail(f"MINILORA_REQUIRE_CUPY=1 but {reason}")
        pytest.skip(reason)
    return cupy


@pytest.fixture(params=BACKEND_NAMES)
def xp(request):
    """numpy, the stand-in, or cupy."""
    return backend_module(request.param)


@pytest.fixture(params=DEVICE_NAMES)
def device_xp(request):
    """A device module only: the stand-in or cupy."""
    return backend_module(request.param)


FIGURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures")


def _figure_hashes():
    import glob
    import hashlib

    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(FIGURES, "*.png")))}


@pytest.fixture(scope="session", autouse=True)
def committed_figures_stay_unchanged():
    """Suite-wide guard: the committed figures are never written by the tests or by fast mode."""
    before = _figure_hashes()
    yield
    after = _figure_hashes()
    assert after == before, f"the test run changed or added committed figures: {sorted(set(after) ^ set(before))}"


def tiny_pretrained_run(tmp_path_factory, n_layers=1):
    """A run folder pretrained for 2 steps by `minilora pretrain` (d_model 16, 2 heads, context 128): the base
    the command-line tests of a module fine-tune, plan or export from (make it once per module)."""
    from minilora import cli

    out = tmp_path_factory.mktemp("pre") / "pretrain"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                     "--d-model", "16", "--n-layers", str(n_layers), "--n-heads", "2",
                     "--context-length", "128"]) == 0
    return out
