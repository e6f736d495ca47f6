"""A strict CPU stand-in for CuPy: device arrays that live in host memory.

CuPy is the GPU half of minilora's promise, but most machines that run the
tests have no GPU. This module is an array library that behaves as CuPy does
wherever that matters to code written for both, so the tests can run minilora
on "device" arrays anywhere:

- `standin.ndarray` wraps a NumPy array (host memory, so no GPU is needed);
  arithmetic, in-place operators, `@`, ufuncs (`np.exp(x)`), indexing, `.T`,
  `.reshape`, `.astype`, `.sum()` ... return stand-in arrays, and reductions
  return 0-d arrays, never Python or NumPy scalars, as in CuPy;
- the module itself is the array namespace (`standin.zeros`, `.exp`, `.where`,
  `.concatenate`, `.get_array_module`, ...), as `cupy` is, and NumPy functions
  called on stand-in arrays dispatch to it (`__array_function__`, as CuPy);
- what CuPy refuses raises TypeError: `np.asarray(x)`, `np.array(x)`,
  `x.__array__()`, and a NumPy ndarray mixed with stand-in arrays in
  arithmetic, ufuncs, functions, or indexing either way (a NumPy table indexed
  by device ids, or device data indexed or assigned with a NumPy array). The
  last two are stricter than CuPy, which may upload a NumPy index silently:
  here every upload is explicit (`standin.asarray`);
- `.get()`, `standin.asnumpy(x)`, `float(x)`, `int(x)`, `bool(x)`, `.item()`,
  `.tolist()`, `repr(x)` and `format(x)` work and are the only ways to the
  host: each is counted, with the line of minilora that asked for it.

    with standin.count_transfers() as t:
        loss, grads = ...
    assert t.to_host == 1, t.events      # events: (kind, what, where)

Importing this module registers it as the device backend "standin" (see
minilora.backend.register_backend): `array_module(x)` returns this module for
its arrays, `to_numpy` uses `.get()`, `to_device(x, standin)` uploads, and
`scatter_add` uses `standin.scatter_add` (CuPy's is `cupyx.scatter_add`).
"""

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy

from minilora import backend

_THIS_FILE = os.path.abspath(__file__)
_SKIP_FILES = {_THIS_FILE, os.path.abspath(backend.__file__)}
_NUMPY_DIR = os.path.dirname(os.path.abspath(numpy.__file__))


# ---------------------------------------------------------------------------
# counting every crossing between host and "device"


@dataclass
class TransferLog:
    """Crossings seen while a count_transfers() block was open.

    to_host: device -> host conversions (get, asnumpy, float, int, bool, item, repr, ...)
    to_device: host -> device uploads of array data (asarray / array of host data)
    events: (kind, what, where) for each, where = "file:line (function)" of the caller
    """

    to_host: int = 0
    to_device: int = 0
    events: list = field(default_factory=list)

    def where(self, kind="to_host"):
        """The caller locations of the crossings of one kind, in order."""
        return [w for k, _, w in self.events if k == kind]


_ACTIVE = []  # the open TransferLogs (nested blocks each see every crossing)
TOTAL = TransferLog()  # every crossing since import


@contextlib.contextmanager
def count_transfers():
    """Count the host/device crossings made inside the block; yields a TransferLog."""
    log = TransferLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


def _caller():
    """file:line (function) of the innermost frame outside this module, backend.py and numpy."""
    f = sys._getframe(2)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name not in _SKIP_FILES and not name.startswith(_NUMPY_DIR):
            short = os.path.join(os.path.basename(os.path.dirname(name)), os.path.basename(name))
            return f"{short}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def _record(kind, what):
    where = _caller()
    for log in (TOTAL, *_ACTIVE):
        setattr(log, kind, getattr(log, kind) + 1)
        log.events.append((kind, what, where))


# ---------------------------------------------------------------------------
# moving values in and out of the wrapper, strictly


def _refuse_host_array(where):
    raise TypeError(
        f"{where}: a numpy.ndarray was mixed with stand-in device arrays; CuPy refuses implicit "
        "host/device mixing. Move it explicitly (xp.asarray / backend.to_device) or keep it on the host.")


def _unwrap(obj, where):
    """Stand-in arrays to their NumPy data; a NumPy ndarray anywhere is a TypeError."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, numpy.ndarray):
        _refuse_host_array(where)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, where) for o in obj)
    return obj  # Python and NumPy scalars, dtypes, slices, None, Ellipsis


def _wrap(result):
    """NumPy results to stand-in arrays; NumPy scalars become 0-d arrays, as in CuPy."""
    if isinstance(result, numpy.ndarray):
        return ndarray(result)
    if isinstance(result, numpy.generic):
        return ndarray(numpy.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, list):
        return [_wrap(r) for r in result]
    return result


def _call(fn, where, args, kwargs):
    """fn on unwrapped arguments; returns the `out=` argument itself when one is given."""
    out = kwargs.get("out")
    a = _unwrap(args, where)
    kw = {k: _unwrap(v, where) for k, v in kwargs.items()}
    result = fn(*a, **kw)
    if out is not None:
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(result)


_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")  # CuPy's message


# ---------------------------------------------------------------------------
# the array type


class ndarray:
    """A device array of the stand-in: NumPy data that refuses to become NumPy implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, data):
        if not isinstance(data, numpy.ndarray):
            raise TypeError(f"data: expected a numpy.ndarray to wrap, got {type(data).__name__}")
        self._a = data

    # what CuPy refuses ------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    # the explicit, counted ways to the host -----------------------------------
    def get(self, stream=None, order="C", out=None):
        """A host copy (NumPy array), as cupy.ndarray.get()."""
        _record("to_host", f"get {self._a.shape}")
        return numpy.array(self._a, order=order, copy=True)

    def item(self, *args):
        _record("to_host", "item")
        return self._a.item(*args)

    def tolist(self):
        _record("to_host", f"tolist {self._a.shape}")
        return self._a.tolist()

    def __float__(self):
        _record("to_host", "float")
        return float(self._a)

    def __int__(self):
        _record("to_host", "int")
        return int(self._a)

    def __complex__(self):
        _record("to_host", "complex")
        return complex(self._a)

    def __bool__(self):
        _record("to_host", "bool")
        return bool(self._a)

    def __repr__(self):
        _record("to_host", "repr")
        return "standin." + repr(self._a)

    def __str__(self):
        _record("to_host", "str")
        return str(self._a)

    def __format__(self, spec):
        _record("to_host", "format")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # protocols: NumPy ufuncs and functions run on the stand-in ---------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs and not isinstance(kwargs["out"], tuple):
            kwargs["out"] = (kwargs["out"],)
        result = _call(getattr(ufunc, method), f"numpy.{ufunc.__name__}", inputs, kwargs)
        return None if method == "at" else result

    def __array_function__(self, func, types, args, kwargs):
        impl = _FUNCTIONS.get(func.__name__)
        if impl is None:
            return NotImplemented  # NumPy then raises TypeError, as it does for CuPy
        return impl(*args, **kwargs)

    # attributes -----------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray(self._a.T))
    real = property(lambda self: ndarray(self._a.real))
    imag = property(lambda self: ndarray(self._a.imag))
    device = property(lambda self: "standin")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    # indexing ---------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "indexing a stand-in array")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "indexing a stand-in array")] = _unwrap(value, "assigning into a stand-in array")


def _operators():
    """+, -, *, /, @, comparisons, and their reflected and in-place forms, through the ufuncs."""
    binary = {"add": numpy.add, "sub": numpy.subtract, "mul": numpy.multiply, "truediv": numpy.true_divide,
              "floordiv": numpy.floor_divide, "mod": numpy.remainder, "pow": numpy.power,
              "matmul": numpy.matmul, "and": numpy.bitwise_and, "or": numpy.bitwise_or,
              "xor": numpy.bitwise_xor, "lshift": numpy.left_shift, "rshift": numpy.right_shift}
    for name, uf in binary.items():
        setattr(ndarray, f"__{name}__", lambda self, other, uf=uf: uf(self, other))
        setattr(ndarray, f"__r{name}__", lambda self, other, uf=uf: uf(other, self))
        setattr(ndarray, f"__i{name}__", lambda self, other, uf=uf: uf(self, other, out=(self,)))
    compare = {"lt": numpy.less, "le": numpy.less_equal, "gt": numpy.greater, "ge": numpy.greater_equal,
               "eq": numpy.equal, "ne": numpy.not_equal}
    for name, uf in compare.items():
        setattr(ndarray, f"__{name}__", lambda self, other, uf=uf: uf(self, other))
    unary = {"neg": numpy.negative, "pos": numpy.positive, "abs": numpy.absolute, "invert": numpy.invert}
    for name, uf in unary.items():
        setattr(ndarray, f"__{name}__", lambda self, uf=uf: uf(self))


_METHODS = ("reshape", "transpose", "astype", "copy", "view", "sum", "mean", "max", "min", "argmax", "argmin",
            "std", "var", "prod", "cumsum", "any", "all", "clip", "ravel", "flatten", "squeeze", "swapaxes",
            "fill", "dot", "take", "repeat", "round", "nonzero", "sort", "argsort", "conj", "diagonal", "trace")


def _methods():
    for name in _METHODS:
        def method(self, *args, _name=name, **kwargs):
            return _call(getattr(self._a, _name), f"ndarray.{_name}", args, kwargs)
        method.__name__ = name
        setattr(ndarray, name, method)


_operators()
_methods()


# ---------------------------------------------------------------------------
# the module namespace, as cupy's

from numpy import (bool_, dtype, e, float16, float32, float64, inf, int8, int16, int32, int64,  # noqa: E402
                   nan, newaxis, pi, uint8, finfo, iinfo, result_type, can_cast, promote_types)

float_ = float64


def get_array_module(*args):
    """This module if any argument is a stand-in array, else numpy (as cupy.get_array_module)."""
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


def asnumpy(a, stream=None, order="C", out=None):
    """A host copy of a (counted); host data passes through (as cupy.asnumpy)."""
    if isinstance(a, ndarray):
        return a.get(order=order)
    return numpy.asarray(a, order=order)


def _contains_device(obj):
    if isinstance(obj, ndarray):
        return True
    return isinstance(obj, (list, tuple)) and any(_contains_device(o) for o in obj)


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A new device array; host data is uploaded (counted), device data copied on the device."""
    if _contains_device(obj):
        return _call(numpy.array, "array", (obj,), dict(dtype=dtype, copy=True, order=order, ndmin=ndmin))
    if isinstance(obj, (numpy.ndarray, list, tuple)):
        _record("to_device", f"upload {numpy.shape(obj)}")
    # always a copy: device memory never aliases a host array
    return ndarray(numpy.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asarray(a, dtype=None, order=None):
    """a as a device array: itself when it already is one (with that dtype), else as array()."""
    if isinstance(a, ndarray) and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, order="K" if order is None else order)


ascontiguousarray = asarray


def scatter_add(a, slices, value):
    """In place: a[slices] += value with repeated indices summed (cupyx.scatter_add)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"a: expected a stand-in array, got {type(a).__name__}")
    numpy.add.at(a._a, _unwrap(slices, "scatter_add indices"), _unwrap(value, "scatter_add values"))


def _creator(name):
    """A function that makes new arrays from shapes and scalars (no data crosses)."""
    fn = getattr(numpy, name)

    def create(*args, **kwargs):
        return _call(fn, name, args, kwargs)

    create.__name__ = name
    return create


def _device_function(name):
    """numpy.<name> on stand-in arrays; a NumPy ndarray among the arguments is a TypeError."""
    fn = getattr(numpy, name)

    def run(*args, **kwargs):
        return _call(fn, f"{__name__}.{name}", args, kwargs)

    run.__name__ = name
    return run


_CREATORS = ("zeros", "ones", "empty", "full", "arange", "eye", "linspace", "tri", "identity")
_DEVICE_FUNCTIONS = (
    # elementwise (ufuncs)
    "exp", "log", "log1p", "expm1", "sqrt", "square", "tanh", "sin", "cos", "abs", "absolute", "sign",
    "maximum", "minimum", "add", "subtract", "multiply", "divide", "true_divide", "negative", "power",
    "floor", "ceil", "isfinite", "isnan", "isinf", "logical_and", "logical_or", "logical_not", "equal",
    "not_equal", "less", "less_equal", "greater", "greater_equal", "matmul",
    # the rest
    "where", "triu", "tril", "concatenate", "stack", "broadcast_to", "zeros_like", "ones_like", "empty_like",
    "full_like", "sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "std", "var", "prod", "cumsum",
    "any", "all", "dot", "einsum", "tensordot", "outer", "transpose", "reshape", "swapaxes", "moveaxis",
    "expand_dims", "squeeze", "repeat", "tile", "take", "take_along_axis", "sort", "argsort", "nonzero",
    "flatnonzero", "clip", "round", "around", "copy", "split", "diag", "allclose", "isclose", "array_equal",
    "searchsorted", "shape", "ndim", "size",
)

for _name in _CREATORS:
    globals()[_name] = _creator(_name)
for _name in _DEVICE_FUNCTIONS:
    globals()[_name] = _device_function(_name)
del _name

# what NumPy functions called on stand-in arrays dispatch to (__array_function__)
_FUNCTIONS = {n: globals()[n] for n in _CREATORS + _DEVICE_FUNCTIONS + ("array", "asarray", "ascontiguousarray")}


BACKEND = backend.register_backend("standin", sys.modules[__name__], ndarray, scatter_add)
