"""The README says what the code and the benchmark say: its commands, its numbers, its figures."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = json.loads((ROOT / "benchmarks" / "results.json").read_text())


def _setup_commands():
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_exactly_two_setup_commands_and_ci_runs_both_as_written():
    import subprocess
    import sys

    demo, tests = _setup_commands()
    assert "\n" not in demo and "\n" not in tests
    assert demo.endswith("pip install . && minilora demo")
    assert tests.endswith("pip install '.[test]' && python -m pytest")
    # each makes its own virtual environment, so neither depends on the other having run
    venvs = [re.match(r"python3 -m venv (\S+) && \. \1/bin/activate && ", c).group(1) for c in (demo, tests)]
    assert venvs[0] != venvs[1]
    # CI runs what the README says, read from it, not a copy
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py test" in ci and "readme_command.py demo" in ci and "git status --porcelain" in ci
    for which, expected in (("demo", demo), ("test", tests)):
        printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), which],
                                 capture_output=True, text=True, check=True).stdout
        assert printed == expected + "\n"


def test_readme_speaks_to_a_reader_not_to_the_project():
    """No word a newcomer cannot know (issue 17): the post is named as the post, and no project history."""
    text = README.lower()
    for words in ("the seed", "seed section", "seed's", "earlier round", "this round", "was not lent", "demo_run", "demo_times"):
        assert words not in text, words


def test_readme_quotes_the_benchmark_results():
    pre = RESULTS["pretrain"]
    for number in (f"{pre['val_loss']:.4f}", f"{pre['floor']:.4f}", f"{pre['bigram_loss']:.4f}",
                   f"{pre['wall_s']:.0f} s", f"{RESULTS['pretrain_gap_percent']:.2f}%",
                   f"{RESULTS['demo_wall_s']:.0f} s", f"{100 * RESULTS['grammatical_fraction']:.0f}% of 200"):
        assert number in README, number
    for row in RESULTS["rows"]:
        line = next(l for l in README.splitlines() if l.startswith(f"| {row['task']} | {row['method'].replace('lora', 'LoRA')}"))
        for number in (f"{row['trainable_params']:,}", f"{row['metric']:.3f}", f"{row['val_loss_after']:.4f}"):
            assert number in line, (row["task"], row["method"], number)
    assert f"{100 * RESULTS['lora_over_full_metric']:.1f}%" in README
    assert f"{100 * RESULTS['lora_trainable_fraction']:.2f}%" in README


def test_the_benchmark_met_the_issues_targets():
    assert RESULTS["pretrain"]["val_loss"] <= 1.05 * RESULTS["pretrain"]["floor"]
    assert RESULTS["pretrain"]["wall_s"] <= 180
    assert RESULTS["lora_over_full_metric"] >= 0.95 and RESULTS["lora_trainable_fraction"] <= 0.05
    assert RESULTS["demo_wall_s"] <= 600


def test_every_figure_the_readme_shows_is_committed():
    for path in re.findall(r"\]\((figures/[^)]+\.png)\)", README):
        assert (ROOT / path).read_bytes()[:4] == b"\x89PNG", path


def test_readme_quotes_every_committed_study_as_the_report_prints_it():
    from minilora.report import report

    studies = sorted(p.parent for p in (ROOT / "benchmarks" / "studies").glob("*/results.jsonl"))
    assert studies, "no committed study results"
    for study in studies:
        text, figs = report(str(study))
        rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
        assert rows, study.name
        for line in rows:
            assert line in README, f"{study.name}: README lacks the report's row {line!r}"
        for name in figs:
            assert (ROOT / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
            assert f"figures/{name}" in README, name


def test_readme_lists_every_tutorial_with_its_measured_full_mode_time():
    times = json.loads((ROOT / "benchmarks" / "tutorial_times.json").read_text())
    tutorials = sorted(p.name for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
    assert sorted(times["seconds"]) == tutorials, "benchmarks/tutorial_times.py ran every tutorial"
    section = README.split("## Tutorials", 1)[1].split("\n## ", 1)[0]
    for name in tutorials:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        exercises = len(re.findall(r"^# ### Exercise ", (ROOT / "tutorials" / name).read_text(), re.M))
        assert f"| {exercises} |" in row, (name, exercises)
        assert row.endswith(f"| {times['seconds'][name]:.0f} s |"), (name, times["seconds"][name])
        assert times["seconds"][name] < 180, f"{name}: over 3 minutes in full mode"
    assert f"{times['threads']} BLAS thread" in section and times["date"] in section
