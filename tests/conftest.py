"""Suite-wide guard: the committed figures are never written by the tests or by fast mode."""

import hashlib
import pathlib

import pytest

FIGURES = pathlib.Path(__file__).resolve().parents[1] / "figures"


def _hashes():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(FIGURES.glob("*.png"))}


@pytest.fixture(scope="session", autouse=True)
def committed_figures_stay_unchanged():
    before = _hashes()
    yield
    after = _hashes()
    assert after == before, f"the test run changed or added committed figures: {sorted(set(after.items()) ^ set(before.items()))}"
