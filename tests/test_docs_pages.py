"""The site's pages (docs/) say what the code and the benchmarks say: the checks that moved with the text
from README.md when it became a front page (issue 22).

The study pages' tables and figures are not written by hand: the `{study}` directive makes them from the
committed results.jsonl at build time (tests/test_site.py checks the built pages). What is written by hand,
the prose around them, must quote the report's numbers as the report prints them.
"""

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
RESULTS = json.load(open(os.path.join(ROOT, "benchmarks", "results.json")))


def page(name):
    return open(os.path.join(DOCS, name), encoding="utf-8").read()


def committed_studies():
    return sorted(os.path.basename(os.path.dirname(p))
                  for p in glob.glob(os.path.join(ROOT, "benchmarks", "studies", "*", "results.jsonl")))


def test_the_pages_speak_to_a_reader_not_to_the_project():
    """README's rule (tests/test_readme.py), on the pages its text moved to."""
    for path in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True):
        text = open(path, encoding="utf-8").read().lower()
        for words in ("the seed", "seed section", "seed's", "earlier round", "this round", "was not lent", "demo_run",
                      "demo_times"):
            assert words not in text, (os.path.relpath(path, ROOT), words)


def test_the_demo_page_quotes_the_benchmark_results():
    demo = page("demo.md")
    pre = RESULTS["pretrain"]
    for number in (f"{pre['val_loss']:.4f}", f"{pre['floor']:.4f}", f"{pre['bigram_loss']:.4f}",
                   f"{pre['wall_s']:.0f} s", f"{RESULTS['pretrain_gap_percent']:.2f}%",
                   f"{RESULTS['demo_wall_s']:.0f} s", f"{100 * RESULTS['grammatical_fraction']:.0f}% of 200"):
        assert number in demo, number
    for row in RESULTS["rows"]:
        line = next(l for l in demo.splitlines() if l.startswith(f"| {row['task']} | {row['method'].replace('lora', 'LoRA')}"))
        for number in (f"{row['trainable_params']:,}", f"{row['metric']:.3f}", f"{row['val_loss_after']:.4f}"):
            assert number in line, (row["task"], row["method"], number)
    assert f"{100 * RESULTS['lora_over_full_metric']:.1f}%" in demo
    assert f"{100 * RESULTS['lora_trainable_fraction']:.2f}%" in demo


def test_every_figure_a_page_shows_is_committed():
    shown = 0
    for path in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True):
        for figure in re.findall(r"\]\(((?:\.\./)+figures/[^)]+\.png)\)", open(path, encoding="utf-8").read()):
            with open(os.path.normpath(os.path.join(os.path.dirname(path), figure)), "rb") as f:
                assert f.read(4) == b"\x89PNG", (path, figure)
            shown += 1
    assert shown >= 4


def test_every_committed_study_has_a_page_made_from_its_results_whose_prose_quotes_the_report():
    from minilora.report import report

    studies = committed_studies()
    assert studies, "no committed study results"
    for study in studies:
        text = page(os.path.join("studies", f"{study}.md"))
        assert f"```{{study}} {study}\n```" in text, f"docs/studies/{study}.md does not make its tables with {{study}}"
        prose = text.split("```{study}")[0]
        assert not re.search(r"^\|.*\|\s*$", prose, re.M), f"docs/studies/{study}.md: a hand-written table; the report makes them"
        printed, figures = report(os.path.join(ROOT, "benchmarks", "studies", study))
        quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+", prose)
        for number in quoted:
            assert number in printed, f"docs/studies/{study}.md quotes {number}, which the report does not print"
        for name in figures:  # the regenerate command writes figures/NAME; the committed one is there
            with open(os.path.join(ROOT, "figures", name), "rb") as f:
                assert f.read(4) == b"\x89PNG", name
    index = page(os.path.join("studies", "index.md"))
    assert all(f"\n{s}\n" in index for s in studies), "docs/studies/index.md lists every study"


def test_the_tutorials_page_lists_every_tutorial_with_its_measured_full_mode_time():
    times = json.load(open(os.path.join(ROOT, "benchmarks", "tutorial_times.json")))
    tutorials = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))
    assert sorted(times["seconds"]) == tutorials, "benchmarks/tutorial_times.py ran every tutorial"
    section = page(os.path.join("tutorials", "index.md"))
    for name in tutorials:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        exercises = len(re.findall(r"^# ### Exercise ", open(os.path.join(ROOT, "tutorials", name)).read(), re.M))
        assert f"| {exercises} |" in row, (name, exercises)
        assert row.endswith(f"| {times['seconds'][name]:.0f} s |"), (name, times["seconds"][name])
        assert times["seconds"][name] < 300, f"{name}: over 5 minutes in full mode"
    assert f"{times['threads']} BLAS thread" in section and times["date"] in section


def test_the_hardware_page_holds_the_speed_and_memory_tables_of_the_committed_benchmarks():
    import importlib
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # memory.py imports speed.py as a sibling script
    try:
        speed, memory = importlib.import_module("speed"), importlib.import_module("memory")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    text = page("hardware.md")
    for bench in (speed, memory):
        result = json.load(open(os.path.join(ROOT, "benchmarks", bench.__name__ + ".json")))
        assert bench.markdown_table(result) in text, f"docs/hardware.md: the table of benchmarks/{bench.__name__}.json"
        assert set(result["configs"]["default"]["strategies"] if bench is speed else result["strategies"]) == set(
            bench.STRATEGIES), f"benchmarks/{bench.__name__}.json: a method not measured"


def test_the_hardware_page_holds_the_memory_wall_tables_of_the_committed_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_wall", os.path.join(ROOT, "benchmarks", "memory_wall.py"))
    wall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wall)
    result = json.load(open(os.path.join(ROOT, "benchmarks", "memory_wall.json")))
    assert wall.tables(result) in page("hardware.md"), "docs/hardware.md: the tables of benchmarks/memory_wall.json"
    cells = {(c["size"], c["method"], c["checkpoint_activations"]): c for c in result["cells"]}
    # the must-show: at XL full fine-tuning refused by the plan, LoRA and QLoRA measured
    assert "refused" in cells["gpt2-xl", "full", False] and "refused" in cells["gpt2-xl", "full", True]
    for method in ("lora", "qlora"):
        assert "measured" in cells["gpt2-xl", method, False], method
    for c in result["cells"]:
        if "measured" in c:
            assert c["measured"]["tracemalloc_peak"] <= 1.10 * c["plan_total"], (c["size"], c["method"])


def test_the_front_page_shows_every_method_in_the_figure_the_studies_make(tmp_path):
    """docs/index.md's figure is figures/methods.png, as `minilora report benchmarks/studies --figures figures`
    draws it from the committed studies 1 and 7: one row per fine-tuning method of minilora.methods (all but the
    head-only baseline, which has no `subject` run), every text on the canvas,
    and the committed PNG the size that command writes (its pixels depend on the machine's fonts)."""
    import numpy as np
    from matplotlib.image import imread

    from minilora import cli, methods
    from minilora.plot import texts_outside
    from minilora.report import summary

    assert "](../figures/methods.png)" in page("index.md")
    assert "`minilora report benchmarks/studies --figures\nfigures`" in page("index.md")
    text, figures = summary(os.path.join(ROOT, "benchmarks", "studies"))
    fig = figures["methods.png"]
    # the fine-tuning methods (study 1's): every method but the head-only baseline, which runs on `kind` only
    tuned = tuple(n for n, m in methods.METHODS.items() if not m.needs_head)
    assert len(tuned) == 7 and texts_outside(fig) == []  # draws it
    rows = {tuple(t.get_text() for t in ax.get_yticklabels()) for ax in fig.axes}  # the right column shares them
    assert len(fig.axes) == 4 and rows - {()} == {tuned}, rows
    assert cli.main(["report", os.path.join(ROOT, "benchmarks", "studies"), "--figures", str(tmp_path)]) == 0
    made, committed = imread(tmp_path / "methods.png"), imread(os.path.join(ROOT, "figures", "methods.png"))
    assert made.shape == committed.shape
    assert np.abs(made - committed).mean() < 0.02, "figures/methods.png is not what the studies draw now: redraw it"
