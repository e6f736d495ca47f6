import importlib.util

import numpy as np
import pytest

from minilora import backend


def test_numpy_is_the_default(monkeypatch):
    monkeypatch.delenv("MINILORA_BACKEND", raising=False)
    assert backend.get_backend() is np
    monkeypatch.setenv("MINILORA_BACKEND", "numpy")
    assert backend.get_backend() is np


def test_unknown_backend_is_named(monkeypatch):
    with pytest.raises(ValueError, match="backend: expected one of .*got 'torch'"):
        backend.get_backend("torch")
    monkeypatch.setenv("MINILORA_BACKEND", "jax")
    with pytest.raises(ValueError, match="got 'jax'"):
        backend.get_backend()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cupy_without_cupy_is_one_clear_error(monkeypatch):
    with pytest.raises(backend.BackendError, match="CuPy is not installed"):
        backend.get_backend("cupy")
    monkeypatch.setenv("MINILORA_BACKEND", "cupy")
    with pytest.raises(backend.BackendError, match="pip install"):
        backend.get_backend()


def test_array_module_of_numpy_arrays():
    assert backend.array_module(np.ones(3)) is np


def test_scatter_add_sums_repeated_rows():
    target = np.zeros((4, 2))
    backend.scatter_add(target, np.array([1, 3, 1, 1]), np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(target, [[0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


def test_to_numpy_and_to_device_roundtrip():
    x = np.arange(3.0)
    assert backend.to_numpy(x) is x or np.array_equal(backend.to_numpy(x), x)
    assert backend.to_device(x, np) is x


def test_limit_blas_threads_pins_the_pool_as_the_command_does(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from minilora.backend import DEFAULT_THREADS, limit_blas_threads

    def blas_threads():
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    with threadpool_limits(limits=None):  # restores this process's pool afterwards
        monkeypatch.delenv("MINILORA_THREADS", raising=False)
        assert limit_blas_threads() == DEFAULT_THREADS == blas_threads()
        monkeypatch.setenv("MINILORA_THREADS", "2")
        assert limit_blas_threads() == 2 == blas_threads()
        for bad in ("0", "two"):
            monkeypatch.setenv("MINILORA_THREADS", bad)
            with pytest.raises(ValueError, match="MINILORA_THREADS: expected a positive integer"):
                limit_blas_threads()
        with pytest.raises(ValueError, match="threads: expected a positive integer"):
            limit_blas_threads(0)


def test_every_tutorial_and_solution_pins_its_blas_threads_first():
    import glob
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    scripts = glob.glob(str(root / "tutorials" / "[0-9][0-9]_*.py")) + glob.glob(str(root / "tutorials" / "solutions" / "*.py"))
    assert scripts
    for path in scripts:
        assert "\nlimit_blas_threads()" in pathlib.Path(path).read_text(), path
