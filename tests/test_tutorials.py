"""The tutorials run end to end (in fast mode) and stay in the percent format.

Each tutorial is executed as a plain script, the way a reader runs it, with
MINILORA_FAST=1 (a few training steps, tiny data) and its figures and runs
redirected to a temporary folder, so the committed figures are never touched.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

import clients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))


def test_the_tutorials_are_numbered_in_order():
    names = [os.path.basename(p) for p in TUTORIALS]
    assert len(names) >= 5, names
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, len(names) + 1)], names


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_is_percent_format(path):
    text = open(path, encoding="utf-8").read()
    markdown = re.findall(r"^# %% \[markdown\]$", text, flags=re.M)
    code = re.findall(r"^# %%$", text, flags=re.M)
    assert text.startswith("# %% [markdown]\n# # "), "a tutorial opens with a markdown cell and a title"
    assert len(markdown) >= 3 and len(code) >= 3, (len(markdown), len(code))
    assert "MINILORA_FAST" in text and "MINILORA_FIGURES" in text


def test_tutorial_08_gives_the_one_install_line_that_ci_runs():
    """The tutorial that needs torch, transformers and peft says how to install them in one line, before its
    first code cell; the extra it names exists, and .ci/run makes the clients' environment with that line."""
    text = open(os.path.join(ROOT, "tutorials", "08_from_minilora_to_hugging_face.py"), encoding="utf-8").read()
    before_code = text.split("\n# %%\n", 1)[0]
    assert f"#     {clients.TUTORIAL_08_INSTALL}\n" in before_code and "CPU-only build" in before_code
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    extra = re.search(r"^huggingface = \[(.*)\]$", pyproject, flags=re.M).group(1)  # tomllib is 3.11+
    assert {"torch", "transformers", "peft"} <= {re.split(r"[<>=\[]", d.strip(' "'))[0] for d in extra.split(",")}
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "tutorial_08_install" in ci


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_runs_in_fast_mode(path, tmp_path):
    clients.require_for(path)  # tutorial 08 needs transformers and peft
    figures = tmp_path / "figures"
    env = {**os.environ, "MINILORA_FAST": "1", "MINILORA_FIGURES": str(figures),
           "MINILORA_RUNS": str(tmp_path / "runs"), "MPLBACKEND": "Agg", "MINILORA_BACKEND": "numpy",
           "MINILORA_STUDIES": os.path.join(ROOT, "benchmarks", "studies")}
    proc = subprocess.run([sys.executable, path], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{os.path.basename(path)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    prefix = os.path.basename(path)[:3]
    assert pngs and all(name.startswith(prefix) for name in pngs), pngs


def test_fast_mode_from_the_repository_root_leaves_the_committed_figures_alone(tmp_path):
    import hashlib

    def hashes():
        return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
                for p in sorted(glob.glob(os.path.join(ROOT, "figures", "*.png")))}

    before = hashes()
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_FIGURES"}
    env.update({"MINILORA_FAST": "1", "MINILORA_RUNS": str(tmp_path / "runs"), "MPLBACKEND": "Agg"})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorials", "01_ops_by_hand.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hashes() == before
    assert glob.glob(os.path.join(ROOT, "figures", "fast", "01_*.png"))  # fast mode wrote its own copies


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_full_mode_claims_hold(path, tmp_path):
    clients.require_for(path)
    # full mode: the tutorials' `if not FAST` asserts (the claims that need real training) run here
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_FAST"}
    env.update({"MINILORA_FIGURES": str(tmp_path / "figures"), "MINILORA_RUNS": str(tmp_path / "runs"),
                "MPLBACKEND": "Agg", "MINILORA_BACKEND": "numpy",
                "MINILORA_STUDIES": os.path.join(ROOT, "benchmarks", "studies")})
    proc = subprocess.run([sys.executable, path], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{os.path.basename(path)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
