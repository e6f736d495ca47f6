"""The real clients some tests drive (torch, transformers, peft, jupytext, ...): skipped where a user has not
installed them, a failure in CI.

A user's `pip install '.[test]'` installs no torch, so the tests that compare with PyTorch, transformers
or PEFT skip there, saying why. .ci/run installs them and sets MINILORA_REQUIRE_CLIENTS=1, so in CI a missing
client fails its tests instead of skipping them quietly.
"""

import importlib
import os

import pytest


def require(name, reason=None):
    """The imported module `name`; pytest.skip when it is missing, unless MINILORA_REQUIRE_CLIENTS=1."""
    if os.environ.get("MINILORA_REQUIRE_CLIENTS") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"MINILORA_REQUIRE_CLIENTS=1 but {name} cannot be imported ({e})", pytrace=False)
    return pytest.importorskip(name, reason=reason or f"{name} is not installed (CI installs it)")


def require_for(path):
    """Skip (or fail, in CI) a tutorial or solutions file that imports torch, transformers or peft, where one is
    missing: tutorial 08 drives the real Hugging Face clients."""
    import re

    text = open(path, encoding="utf-8").read()
    if re.search(r"^import (transformers|peft|torch)\b", text, flags=re.M):
        for name in ("torch", "transformers", "peft", "safetensors", "tokenizers"):
            require(name, reason=f"{os.path.basename(path)} needs {name} (pip install torch transformers peft)")
