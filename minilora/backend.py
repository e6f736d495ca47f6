"""Which array module runs the maths: NumPy (default) or CuPy (on request).

Every op takes its array module from its inputs, `xp = array_module(x)`, so the
same line of code runs on the CPU or on a GPU. Nothing here silently switches
backend because of what happens to be installed: CuPy is used only when asked
for, by an explicit argument or by `MINILORA_BACKEND=cupy`.
"""

import os
import sys

import numpy

BACKENDS = ("numpy", "cupy")


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


def get_backend(name=None):
    """Return the array module to compute with.

    Inputs:
    - name: "numpy" or "cupy"; None reads the MINILORA_BACKEND environment
      variable and falls back to "numpy".

    Returns the module (numpy or cupy). Raises ValueError for an unknown name and
    BackendError when CuPy is asked for but is not installed or sees no GPU.
    """
    if name is None:
        name = os.environ.get("MINILORA_BACKEND", "numpy") or "numpy"
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "numpy":
        return numpy
    try:
        import cupy  # imported lazily: only a GPU user needs it
    except ImportError as e:
        raise BackendError(
            "backend 'cupy' was requested but CuPy is not installed; install the extra "
            "that matches your CUDA, e.g. `pip install 'minilora[cuda12]'`, or use the numpy backend"
        ) from e
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise BackendError(f"backend 'cupy' was requested but CUDA is not usable: {e}") from e
    if n_devices < 1:
        raise BackendError("backend 'cupy' was requested but no GPU is visible")
    return cupy


def array_module(*arrays):
    """The module (numpy or cupy) that owns these arrays.

    CuPy is consulted only if something already imported it, so a NumPy user
    never pays for (or depends on) CuPy.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def is_cupy(xp):
    """True when xp is the CuPy module."""
    return getattr(xp, "__name__", "") == "cupy"


def to_numpy(x):
    """A host (NumPy) copy of x; NumPy arrays and scalars pass through."""
    if hasattr(x, "get") and not isinstance(x, numpy.ndarray):
        return x.get()
    return numpy.asarray(x)


def to_device(x, xp):
    """x as an array of module xp (a no-op when it already is one)."""
    if is_cupy(xp):
        return xp.asarray(x)
    return to_numpy(x)


def scatter_add(target, indices, values):
    """In place: target[indices[i]] += values[i], with repeated indices summed.

    Inputs:
    - target: (N, C) array
    - indices: (M,) integer array of rows of target
    - values: (M, C) array

    This is the embedding backward: one row of the table per token, added up
    over every position where that token occurred (no one-hot matmul).
    """
    xp = array_module(target)
    if is_cupy(xp):
        import cupyx

        cupyx.scatter_add(target, indices, values)
    else:
        numpy.add.at(target, indices, values)
    return target
