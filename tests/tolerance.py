"""Comparing float32 results with numbers made elsewhere: within a tolerance, never bit for bit.

A float32 run is bit-reproducible only on one machine with one library build and one BLAS thread count: another
CPU's kernel (AVX2 against AVX-512, another OpenBLAS or NumPy) sums in another order and changes the last bits.
So a number committed to the repository, or made on another machine, is compared here with a tolerance, and
every test that does so also shows that a planted one-setting change still fails it.

The default bound, |got - want| <= ATOL + RTOL |want|, with RTOL 1e-5 and ATOL 1e-6, is 84 float32 ulps at the
scale of a loss (eps = 1.19e-7), from what was measured: a few steps of the small runs in test_method_seam.py,
run under OpenBLAS's Prescott, Sandybridge and Haswell kernels beside this machine's SkylakeX, differ by at most
4.8e-7 in a loss (one ulp at 4.5), 2.6e-6 (3.9e-6 relative) in an update's norm and 1.1e-9 in a singular value
of the update; the bound holds each of them with a margin of 2 or more. Discrete values (counts, keys, text, exact
match on a handful of examples) compare exactly.
"""

import math

RTOL = 1e-5
ATOL = 1e-6


def differences(got, want, rtol=RTOL, atol=ATOL, path=""):
    """The places where got and want differ beyond the bound: a list of 'path: got vs want' lines.

    got, want: nested dicts, lists and tuples of numbers, strings, booleans and None, of the same shape.
    Floats (and ints compared with floats) are compared as |got - want| <= atol + rtol |want|; every other leaf
    exactly; dict keys and list lengths exactly."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{path or '.'}: keys {sorted(got) if isinstance(got, dict) else type(got).__name__} "
                    f"vs {sorted(want)}"]
        return [d for k in sorted(want) for d in differences(got[k], want[k], rtol, atol, f"{path}/{k}")]
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return [f"{path or '.'}: {got!r} vs {want!r} (lengths differ)"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, rtol, atol, f"{path}[{i}]")]
    if isinstance(want, float) or (isinstance(got, float) and isinstance(want, int) and not isinstance(want, bool)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return [f"{path or '.'}: {got!r} vs {want!r}"]
        if math.isnan(want) and math.isnan(got):
            return []
        if not abs(got - want) <= atol + rtol * abs(want):
            return [f"{path or '.'}: {got!r} vs {want!r} (differs by {abs(got - want):.3g})"]
        return []
    return [] if got == want and type(got) is type(want) else [f"{path or '.'}: {got!r} vs {want!r}"]


def assert_close(got, want, rtol=RTOL, atol=ATOL):
    """Assert that nested numbers agree within the bound (see differences); the message lists the first few."""
    diffs = differences(got, want, rtol, atol)
    assert not diffs, f"{len(diffs)} values differ beyond rtol {rtol}, atol {atol}:\n" + "\n".join(diffs[:10])
