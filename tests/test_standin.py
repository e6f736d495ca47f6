"""The stand-in behaves as CuPy does where it matters, and the backend registry uses it.

If these fail, every other stand-in test proves nothing: they check that the
stand-in refuses what CuPy refuses, computes what NumPy computes, and counts
every trip to the host.
"""

import numpy as np
import pytest

import standin as sp
from minilora import backend


def dev(a):
    return sp.asarray(np.asarray(a))


REFUSED = {
    "np.asarray": lambda x: np.asarray(x),
    "np.array": lambda x: np.array(x),
    "__array__": lambda x: x.__array__(),
    "device + host": lambda x: x + np.ones(3),
    "host + device": lambda x: np.ones(3) + x,
    "host += device": lambda x: np.ones((2, 3)).__iadd__(x),
    "ufunc(device, host)": lambda x: np.maximum(x, np.ones(3)),
    "host @ device": lambda x: np.ones((3, 2)) @ x,
    "host table[device ids]": lambda x: np.ones((5, 2))[dev([0, 1])],
    "device[host ids]": lambda x: x[np.array([0, 1])],
    "device[...] = host": lambda x: x.__setitem__(0, np.ones(3)),
    "concatenate(device, host)": lambda x: np.concatenate([x, np.ones((2, 3))]),
    "xp.where(host, ...)": lambda x: sp.where(np.ones((2, 3), bool), x, 0.0),
    "host-only function": lambda x: np.nditer(x),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_cupy_refuses_raises_type_error(name):
    x = dev(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError):
        REFUSED[name](x)


def test_arithmetic_ufuncs_and_functions_stay_on_the_device_and_match_numpy():
    a = np.random.default_rng(0).standard_normal((2, 3))
    x = dev(a)
    cases = {
        "x * 2 + 1": (lambda v: v * 2 + 1, lambda v: v * 2 + 1),
        "np.float32 scalar": (lambda v: np.float32(2.0) * v, lambda v: np.float32(2.0) * v),
        "x @ x.T": (lambda v: v @ v.T, lambda v: v @ v.T),
        "np.exp": (np.exp, np.exp),
        "xp.tanh": (sp.tanh, np.tanh),
        "sum(axis)": (lambda v: v.sum(axis=-1, keepdims=True), lambda v: v.sum(axis=-1, keepdims=True)),
        "where": (lambda v: sp.where(v > 0, v, -sp.inf), lambda v: np.where(v > 0, v, -np.inf)),
        "triu": (lambda v: sp.triu(sp.ones((3, 3), dtype=bool), k=1), lambda v: np.triu(np.ones((3, 3), bool), k=1)),
        "transpose/reshape": (lambda v: v.reshape(3, 2).transpose(1, 0), lambda v: v.reshape(3, 2).transpose(1, 0)),
        "astype": (lambda v: v.astype(np.float32), lambda v: v.astype(np.float32)),
        "fancy index": (lambda v: v[sp.arange(2), dev([2, 0])], lambda v: v[np.arange(2), np.array([2, 0])]),
        "np.zeros_like": (np.zeros_like, np.zeros_like),
        "broadcast_to": (lambda v: sp.broadcast_to(v[0], (4, 3)), lambda v: np.broadcast_to(v[0], (4, 3))),
        "concatenate": (lambda v: sp.concatenate([v, v], axis=1), lambda v: np.concatenate([v, v], axis=1)),
    }
    for name, (on_device, on_host) in cases.items():
        out = on_device(x)
        assert isinstance(out, sp.ndarray), name
        np.testing.assert_array_equal(out.get(), on_host(a), err_msg=name)


def test_reductions_and_scalar_indexing_give_0d_device_arrays():
    x = dev(np.arange(6.0).reshape(2, 3))
    for r in (x.sum(), x.max(), x[1, 2], np.sum(x)):
        assert isinstance(r, sp.ndarray) and r.shape == ()


def test_in_place_operators_write_through_views():
    x = dev(np.zeros((2, 3)))
    x[0] += 1.0
    x[:, 1] *= 5.0
    x += dev(np.ones(3))
    np.testing.assert_array_equal(x.get(), [[2, 6, 2], [1, 1, 1]])


def test_upload_copies_host_memory():
    a = np.zeros(3)
    x = sp.asarray(a)
    x += 1.0
    assert a.sum() == 0.0  # device memory never aliases the host array


def test_every_trip_to_the_host_is_counted_with_its_caller():
    x = dev(np.arange(4.0))
    with sp.count_transfers() as t:
        float(x.sum()), int(x[0]), x.get(), sp.asnumpy(x), x[1].item(), bool(x[3])
        backend.to_numpy(x)
    assert t.to_host == 7
    assert all(w.startswith("tests/test_standin.py:") for w in t.where("to_host")), t.where()
    with sp.count_transfers() as t:
        y = x * 2.0 + sp.exp(x)  # nothing leaves the device
        sp.asarray(np.ones(2))
    assert t.to_host == 0 and t.to_device == 1 and isinstance(y, sp.ndarray)


def test_backend_registry_knows_the_stand_in():
    x = dev(np.ones((2, 2)))
    assert backend.array_module(x) is sp
    assert backend.array_module(np.ones(2), x) is sp  # any device array wins, as cupy.get_array_module
    assert backend.array_module(np.ones(2)) is np
    assert backend.get_backend("standin") is sp
    assert backend.is_device(sp) and not backend.is_device(np)
    moved = backend.to_device(np.arange(3.0), sp)
    assert isinstance(moved, sp.ndarray) and backend.to_device(moved, sp) is moved
    host = backend.to_numpy(moved)
    assert type(host) is np.ndarray and backend.to_device(moved, np).tolist() == [0.0, 1.0, 2.0]


def test_scatter_add_on_the_stand_in_sums_repeated_rows():
    target = sp.zeros((4, 2))
    backend.scatter_add(target, dev([1, 3, 1, 1]), sp.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(target.get(), [[0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


def test_two_device_backends_never_mix_silently():
    class Other:
        pass

    backend.register_backend("other", object(), Other, None)
    try:
        with pytest.raises(TypeError, match="one device backend"):
            backend.array_module(dev([1.0]), Other())
    finally:
        backend.unregister_backend("other")
    with pytest.raises(ValueError, match="built-in"):
        backend.register_backend("cupy", sp, sp.ndarray, sp.scatter_add)
