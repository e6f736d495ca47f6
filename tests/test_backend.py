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
