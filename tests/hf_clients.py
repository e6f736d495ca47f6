"""The Hugging Face clients (torch, transformers, peft, safetensors, tokenizers) that the bridge is tested against.

Where one is not installed, the tests that need it skip, except under MINILORA_REQUIRE_HF=1 (.ci/run
sets it), where its absence is a failure: in CI these tests always run.
"""

import importlib
import os
import re

import pytest

CLIENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers")


def require(name):
    """The module, or a skip (a failure under MINILORA_REQUIRE_HF=1) when it is not installed."""
    if os.environ.get("MINILORA_REQUIRE_HF") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install torch transformers peft "
                                            f"'.[hf]' to run this)")


def require_for(path):
    """Skip (or fail, in CI) a tutorial or solutions file that imports the clients, where one is missing."""
    text = open(path, encoding="utf-8").read()
    if re.search(r"^import (transformers|peft|torch)\b", text, flags=re.M):
        for name in CLIENTS:
            require(name)
