"""Every tutorial opens as a notebook and runs as one: jupytext converts the percent-format
script, nbclient executes it cell by cell in a fresh Jupyter kernel (fast mode).

This tests the claim "the tutorials open in Jupyter", which running them as plain scripts
(tests/test_tutorials.py) does not: a notebook has no __file__, runs each cell in one
long-lived kernel, and starts in the notebook's folder.
"""

import glob
import os

import pytest

import clients

jupytext = clients.require("jupytext", reason="the test extras install jupytext")
nbclient = clients.require("nbclient", reason="the test extras install nbclient")
clients.require("ipykernel", reason="the test extras install ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_runs_as_a_notebook(path, tmp_path, monkeypatch):
    clients.require_for(path)  # tutorial 08 needs transformers and peft
    notebook = jupytext.read(path)  # the percent format, read as jupytext does when Jupyter opens the file
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and kinds.count("code") >= 3, kinds
    # the kernel inherits this process's environment: fast mode, figures and runs in tmp_path
    for name, value in {"MINILORA_FAST": "1", "MINILORA_FIGURES": str(tmp_path / "figures"),
                        "MINILORA_RUNS": str(tmp_path / "runs"), "MPLBACKEND": "Agg",
                        "MINILORA_BACKEND": "numpy", "MINILORA_STUDIES": os.path.join(ROOT, "benchmarks", "studies"),
                        "OPENBLAS_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, on any error
    ran = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in ran), "every code cell ran"
    errors = [out for cell in ran for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    prefix = os.path.basename(path)[:3]
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs and all(name.startswith(prefix) for name in pngs), pngs
