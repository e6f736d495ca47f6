"""The real clients some tests drive (torch, transformers, peft, safetensors, tokenizers): skipped where a user has
not installed them, run in CI's second environment.

A user's `pip install '.[test]'` (the README's test command) installs none of them, so the tests that compare with
PyTorch, transformers or PEFT skip there, saying why. .ci/run runs that command exactly as written, in the
environment it makes, with MINILORA_CLIENT_SKIPS naming a file: conftest.py writes there the node id of every
test skipped for a missing client. Then .ci/run makes a second environment with tutorial 08's one install line
and runs exactly those tests in it, with MINILORA_REQUIRE_CLIENTS=1, so that a missing client fails them
instead of skipping them quietly.
"""

import importlib
import os

import pytest

# tutorial 08's one install line (tests/test_tutorials.py checks the tutorial says so; .ci/run runs it)
TUTORIAL_08_INSTALL = "pip install torch==2.13.0 && pip install '.[huggingface]'"
# every skip of a missing client says this, so conftest.py can list those tests for CI's second environment
SKIP_TAG = "CI installs it"


def require(name, reason=None):
    """The imported module `name`; pytest.skip when it is missing, unless MINILORA_REQUIRE_CLIENTS=1."""
    if os.environ.get("MINILORA_REQUIRE_CLIENTS") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"MINILORA_REQUIRE_CLIENTS=1 but {name} cannot be imported ({e})", pytrace=False)
    return pytest.importorskip(name, reason=reason or f"{name} is not installed ({SKIP_TAG})")


def require_for(path):
    """Skip (or fail, in CI) a tutorial or solutions file that imports torch, transformers or peft, where one is
    missing: tutorial 08 drives the real Hugging Face clients."""
    import re

    text = open(path, encoding="utf-8").read()
    if re.search(r"^import (transformers|peft|torch)\b", text, flags=re.M):
        for name in ("torch", "transformers", "peft", "safetensors", "tokenizers"):
            require(name, reason=f"{os.path.basename(path)} needs {name} ({TUTORIAL_08_INSTALL}; {SKIP_TAG})")
