"""Which array module runs the maths: NumPy (default), CuPy, or a registered device backend.

Every op takes its array module from its inputs, `xp = array_module(x)`, so the
same line of code runs on the CPU or on a GPU. Nothing here silently switches
backend because of what happens to be installed: CuPy is used only when asked
for, by an explicit argument or by `MINILORA_BACKEND=cupy`.

A device backend is an array module that looks like NumPy (zeros, exp, where,
...) with its own array type, whose arrays come to the host only through an
explicit `.get()`, plus a scatter-add. CuPy is one, known here by name and
looked up only once something has imported it; `register_backend` adds others
(the tests register a strict CPU stand-in for CuPy, tests/standin.py).
"""

import os
import sys
from dataclasses import dataclass

import numpy

BACKENDS = ("numpy", "cupy")


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


@dataclass(frozen=True)
class DeviceBackend:
    """A device array module and the two things minilora needs beyond the NumPy API.

    - name: what get_backend and MINILORA_BACKEND call it
    - module: the NumPy-like array module (cupy, or a stand-in)
    - array_type: the class of its arrays
    - scatter_add: (target, indices, values) -> None, target[indices[i]] += values[i]
      in place with repeated indices summed (cupyx.scatter_add for CuPy)

    Arrays go to the host with their `.get()` method, as CuPy's do.
    """

    name: str
    module: object
    array_type: type
    scatter_add: object


_REGISTERED = {}  # name -> DeviceBackend, from register_backend


def register_backend(name, module, array_type, scatter_add):
    """Make a device array module known to array_module, to_numpy, to_device,
    scatter_add and get_backend(name). Returns the DeviceBackend."""
    if name in ("numpy", "cupy"):
        raise ValueError(f"name: expected a new backend name, got the built-in {name!r}")
    b = DeviceBackend(name, module, array_type, scatter_add)
    _REGISTERED[name] = b
    return b


def unregister_backend(name):
    """Forget a backend added by register_backend (a no-op when it is not there)."""
    _REGISTERED.pop(name, None)


def _cupy_scatter_add(target, indices, values):
    import cupyx

    cupyx.scatter_add(target, indices, values)


def _device_backends():
    """The device backends in play: the registered ones, and CuPy once imported."""
    found = list(_REGISTERED.values())
    cupy = sys.modules.get("cupy")  # consulted only if something already imported it
    if cupy is not None and hasattr(cupy, "ndarray"):
        found.append(DeviceBackend("cupy", cupy, cupy.ndarray, _cupy_scatter_add))
    return found


def _backend_of(x):
    """The DeviceBackend that owns array x, or None for host data."""
    for b in _device_backends():
        if isinstance(x, b.array_type):
            return b
    return None


def get_backend(name=None):
    """Return the array module to compute with.

    Inputs:
    - name: "numpy", "cupy" or a registered name; None reads the
      MINILORA_BACKEND environment variable and falls back to "numpy".

    Returns the module. Raises ValueError for an unknown name and
    BackendError when CuPy is asked for but is not installed or sees no GPU.
    """
    if name is None:
        name = os.environ.get("MINILORA_BACKEND", "numpy") or "numpy"
    name = name.strip().lower()
    if name in _REGISTERED:
        return _REGISTERED[name].module
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS + tuple(_REGISTERED)}, got {name!r}")
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
    """The module that owns these arrays: a device module if any of them is a
    device array (as cupy.get_array_module), else numpy.

    Raises TypeError when arrays of two different device backends are mixed.
    """
    found = None
    for x in arrays:
        b = _backend_of(x)
        if b is not None:
            if found is not None and b.module is not found.module:
                raise TypeError(f"arrays: expected one device backend, got {found.name} and {b.name} arrays mixed")
            found = b
    return numpy if found is None else found.module


def is_cupy(xp):
    """True when xp is the CuPy module."""
    return getattr(xp, "__name__", "") == "cupy"


def is_device(xp):
    """True when xp is a device module (CuPy or a registered one), not numpy."""
    return any(b.module is xp for b in _device_backends())


def to_numpy(x):
    """A host (NumPy) copy of x; NumPy arrays and scalars pass through.

    A device array comes back through its `.get()`: the one explicit copy
    to the host, counted by the test stand-in.
    """
    if _backend_of(x) is not None:
        return x.get()
    return numpy.asarray(x)


def to_device(x, xp):
    """x as an array of module xp (a no-op when it already is one).

    Between two different device modules the copy goes through the host,
    explicitly.
    """
    if xp is numpy:
        return to_numpy(x)
    target = next((b for b in _device_backends() if b.module is xp), None)
    if target is None:
        raise ValueError(f"xp: expected numpy or a device backend's module, got {xp!r}")
    if isinstance(x, target.array_type):
        return x
    if _backend_of(x) is not None:
        x = to_numpy(x)
    return xp.asarray(x)


def scatter_add(target, indices, values):
    """In place: target[indices[i]] += values[i], with repeated indices summed.

    Inputs:
    - target: (N, C) array
    - indices: (M,) integer array of rows of target
    - values: (M, C) array

    This is the embedding backward: one row of the table per token, added up
    over every position where that token occurred (no one-hot matmul).
    """
    b = _backend_of(target)
    if b is None:
        numpy.add.at(target, indices, values)
    else:
        b.scatter_add(target, indices, values)
    return target


# One BLAS thread by default: two runs side by side then share 2 cores fairly (2.02x one run alone),
# where two 2-thread runs fight for the cores and ran 30x slower (benchmarks/speed.json, "concurrency").
DEFAULT_THREADS = 1


def limit_blas_threads(threads=None):
    """Pin this process's BLAS pool, as the `minilora` command does (its --threads); returns the count.

    threads: None reads $MINILORA_THREADS, else DEFAULT_THREADS. The tutorials call
    this first, so a tutorial computes, and takes the time, that the same work takes
    through the command. Float32 sums depend on the thread count, so two runs agree
    bit for bit only at the same count.
    """
    from threadpoolctl import threadpool_limits

    if threads is None:
        text = os.environ.get("MINILORA_THREADS", str(DEFAULT_THREADS))
        try:
            threads = int(text)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"MINILORA_THREADS: expected a positive integer, got {text!r}")
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    threadpool_limits(limits=threads, user_api="blas")
    return threads
