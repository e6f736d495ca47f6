"""Every tutorial ends with exercises, and every exercise has a solution that runs and asserts.

Each tutorial's last markdown cell is `## Exercises`, with at least three numbered
exercises: `### Exercise N.k` headings (tutorials 01-05), or a numbered list
`k. **Title.** ...` (tutorial 06). Its solutions live in
`tutorials/solutions/NN_<stem>_solutions.py`, one `## Exercise N.k` (or
`## Exercise k`) section per exercise, and each section asserts its answer; the Exercises section links
them with a Markdown link (`[their page](solutions/NN_<stem>_solutions.py)`), the solutions' page on the site.
The solutions are run as scripts
and as notebooks, as a learner runs them: in fast mode here (seconds each), in
full mode under `pytest -m slow`.
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
STUDIES = os.path.join(ROOT, "benchmarks", "studies")  # the committed results tutorial 06 reads (a non-editable install has none)
SOLUTIONS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "solutions", "[0-9][0-9]_*_solutions.py")))


def solution_path(tutorial):
    stem = os.path.splitext(os.path.basename(tutorial))[0]
    return os.path.join(ROOT, "tutorials", "solutions", f"{stem}_solutions.py")


def tutorial_number(path):
    return int(os.path.basename(path)[:2])


def exercise_numbers(tutorial):
    """The numbers ("N.k") of the exercises in the tutorial's Exercises section, in order, and the section."""
    text = open(tutorial, encoding="utf-8").read()
    start = text.find("\n# ## Exercises\n")
    assert start >= 0, f"{os.path.basename(tutorial)} has no '## Exercises' section"
    section = text[start:]
    assert "\n# %%\n" not in section, "the Exercises section must be the tutorial's last cell (no code after it)"
    # one style in every tutorial: "### Exercise N.k (kind): title"
    headings = re.findall(r"^# ### Exercise (\d+\.\d+) \([^)]+\): \S", section, flags=re.M)
    return headings, section


def solution_sections(solution):
    """{exercise number "N.k": the text of its section} of a solutions file."""
    text = open(solution, encoding="utf-8").read()
    parts = re.split(r"^# ## Exercise (\d+\.\d+):", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def fast_env(tmp_path):
    return {**os.environ, "MINILORA_FAST": "1", "MINILORA_FIGURES": str(tmp_path / "figures"),
            "MINILORA_RUNS": str(tmp_path / "runs"), "MPLBACKEND": "Agg", "MINILORA_BACKEND": "numpy",
            "MINILORA_STUDIES": STUDIES}


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=os.path.basename)
def test_tutorial_ends_with_numbered_exercises_and_their_solutions(tutorial):
    numbers, section = exercise_numbers(tutorial)
    n = tutorial_number(tutorial)
    assert len(numbers) >= 3, f"at least three exercises, got {numbers}"
    assert numbers == [f"{n}.{k}" for k in range(1, len(numbers) + 1)], numbers  # 2.1, 2.2, ... in order
    solution = solution_path(tutorial)
    assert os.path.exists(solution), f"no solutions file {os.path.relpath(solution, ROOT)}"
    # a Markdown link relative to the tutorial: on the site, the solutions' page; in Jupyter or on GitHub, the file
    link = f"](solutions/{os.path.basename(solution)})"
    assert link in section.replace("\n# ", " "), f"the Exercises section links its solutions' page: [...]{link[1:]}"
    sections = solution_sections(solution)
    assert list(sections) == numbers, f"solution sections {list(sections)} != exercises {numbers}"
    for number, body in sections.items():
        # a solution that only prints is a defect: every section asserts its answer
        assert re.search(r"^\s*assert ", body, flags=re.M), f"the solution of exercise {number} asserts nothing"


def test_solutions_and_tutorials_match_one_to_one():
    assert SOLUTIONS and set(SOLUTIONS) == {solution_path(t) for t in TUTORIALS}


@pytest.mark.parametrize("solution", SOLUTIONS, ids=os.path.basename)
def test_solution_is_percent_format(solution):
    text = open(solution, encoding="utf-8").read()
    assert text.startswith("# %% [markdown]\n# # "), "a solutions file opens with a markdown cell and a title"
    assert re.search(r"^# %%$", text, flags=re.M) and "MINILORA_FAST" in text


@pytest.mark.parametrize("solution", SOLUTIONS, ids=os.path.basename)
def test_solution_runs_in_fast_mode(solution, tmp_path):
    clients.require_for(solution)  # tutorial 08's solutions need transformers and peft
    proc = subprocess.run([sys.executable, solution], env=fast_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{os.path.basename(solution)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    prefix = os.path.basename(solution)[:3]
    pngs = [p.name for p in (tmp_path / "figures").glob("*.png")]
    assert all(name.startswith(prefix) for name in pngs), pngs


@pytest.mark.parametrize("solution", SOLUTIONS, ids=os.path.basename)
def test_solution_runs_as_a_notebook(solution, tmp_path, monkeypatch):
    clients.require_for(solution)
    # as tests/test_notebooks.py does for the tutorials: jupytext reads the percent format,
    # nbclient runs it cell by cell in a fresh kernel, in fast mode
    jupytext = clients.require("jupytext", reason="the test extras install jupytext")
    nbclient = clients.require("nbclient", reason="the test extras install nbclient")
    clients.require("ipykernel", reason="the test extras install ipykernel")
    notebook = jupytext.read(solution)
    for name, value in {**fast_env(tmp_path), "OPENBLAS_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "every code cell ran"


@pytest.fixture(scope="module")
def full_mode_runs(tmp_path_factory):
    """One runs folder for every full-mode solution, so the full model is pretrained once, not four times."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.slow
@pytest.mark.parametrize("solution", SOLUTIONS, ids=os.path.basename)
def test_solution_full_mode_claims_hold(solution, tmp_path, full_mode_runs):
    clients.require_for(solution)
    # full mode: the solutions' `if not FAST` asserts (the answers that need real training) run here
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_FAST"}
    env.update({"MINILORA_FIGURES": str(tmp_path / "figures"), "MINILORA_RUNS": str(full_mode_runs),
                "MPLBACKEND": "Agg", "MINILORA_BACKEND": "numpy", "MINILORA_STUDIES": STUDIES})
    proc = subprocess.run([sys.executable, solution], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{os.path.basename(solution)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
