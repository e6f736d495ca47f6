"""The suite passes on any machine: no test compares a float32 result made elsewhere bit for bit.

A float32 number is bit-reproducible only on the machine and library build that made it (tests/tolerance.py says
why). These checks read tests/ itself and keep three doors shut:

- a float literal with 8 or more significant digits (a number copied from a run) appears only inside a call that
  compares with a tolerance (pytest.approx, isclose, allclose, assert_close);
- nothing hashes numbers (json.dumps, repr, str or .tobytes() of a result) to compare fingerprints: hashes are of
  files' bytes only;
- a test that reads committed numbers from tests/data/ compares them with tests/tolerance.py, and is marked
  `kernel`, so that CI runs it again under other BLAS kernels (.ci/run).

Each check is also run on a planted offender, so that it is seen to fail.
"""

import ast
import glob
import os
import re

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
TOLERANT_CALLS = {"approx", "isclose", "allclose", "assert_allclose", "assert_close", "differences"}
HASHED_NUMBERS = {"dumps", "repr", "str", "tobytes", "hex"}


def _name(func):
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _significant_digits(x):
    mantissa = repr(abs(x)).lower().split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0"))


def copied_floats(source):
    """Line numbers of float literals with >= 8 significant digits (float32 holds 7 to 8) outside a tolerant comparison."""
    tree = ast.parse(source)
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in TOLERANT_CALLS:
            inside.update(id(n) for n in ast.walk(node))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and id(node) not in inside
            and _significant_digits(node.value) >= 8]


def hashed_numbers(source):
    """Line numbers of hashlib calls whose argument is built from numbers (json.dumps, repr, str, tobytes)."""
    tree = ast.parse(source)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "hashlib"
            and any(isinstance(n, ast.Call) and _name(n.func) in HASHED_NUMBERS
                    for arg in node.args for n in ast.walk(arg))]


def untolerant_reference_reads(source):
    """Why a module that reads tests/data/ breaks the rule: it must import tests/tolerance.py and be marked kernel."""
    if not re.search(r"""["']data["']|tests/data/""", source):
        return []
    why = []
    if not re.search(r"^from tolerance import|^import tolerance", source, flags=re.M):
        why.append("reads tests/data/ without tests/tolerance.py")
    if "pytestmark = pytest.mark.kernel" not in source:
        why.append("reads tests/data/ but is not marked kernel")
    return why


def _test_modules():
    paths = sorted(glob.glob(os.path.join(TESTS, "*.py")))
    assert len(paths) > 40  # the suite itself, not an empty glob
    return [(os.path.basename(p), open(p, encoding="utf-8").read()) for p in paths]


@pytest.mark.parametrize("check", [copied_floats, hashed_numbers, untolerant_reference_reads])
def test_no_test_compares_a_number_made_elsewhere_bit_for_bit(check):
    offenders = {name: found for name, source in _test_modules() if name != "test_portable.py"
                 for found in [check(source)] if found}
    assert not offenders, offenders


def test_each_check_fails_on_a_planted_offender():
    assert copied_floats("assert loss == 4.551457881927\n") == [1]
    assert copied_floats("assert loss == pytest.approx(4.551457881927, rel=1e-5)\nx = 0.5\n") == []
    assert hashed_numbers("d = hashlib.sha256(json.dumps(numbers).encode()).hexdigest()\n") == [1]
    assert hashed_numbers("d = hashlib.sha256(a.tobytes()).hexdigest()\n") == [1]
    assert hashed_numbers("d = hashlib.sha256(open(p, 'rb').read()).hexdigest()\n") == []
    planted = 'REF = json.load(open(os.path.join(HERE, "data", "x.json")))\nassert got == REF\n'
    assert untolerant_reference_reads(planted) == ["reads tests/data/ without tests/tolerance.py",
                                                   "reads tests/data/ but is not marked kernel"]


def test_the_kernel_marked_tests_are_the_ones_ci_runs_under_other_kernels():
    marked = sorted(name for name, source in _test_modules() if "pytest.mark.kernel" in source)
    assert {"test_method_seam.py", "test_sweep.py", "test_faults.py", "test_train.py"} <= set(marked), marked
    ci = open(os.path.join(os.path.dirname(TESTS), ".ci", "run"), encoding="utf-8").read()
    for core in ("Prescott", "Sandybridge", "Haswell"):
        assert core in ci
    assert "kernel_tests=\"kernel and not slow\"" in ci and ci.count("-m \"$kernel_tests\"") == 2
