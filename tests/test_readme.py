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


def test_the_front_page_quotes_the_benchmarks_it_names():
    """The headline numbers come from benchmarks/results.json and speed.json (the demo page holds the rest:
    tests/test_docs_pages.py)."""
    pre = RESULTS["pretrain"]
    for number in (f"{pre['val_loss']:.4f}", f"{pre['floor']:.4f}", f"{RESULTS['pretrain_gap_percent']:.2f}%",
                   f"{100 * RESULTS['lora_trainable_fraction']:.2f}%"):
        assert number in README, number
    speed = json.loads((ROOT / "benchmarks" / "speed.json").read_text())
    assert f"{speed['configs']['bench']['strategies']['full']['minilora_over_torch']:.2f} × PyTorch eager" in README
    quiet = json.loads((ROOT / "benchmarks" / "speed_2026-11-29.json").read_text())  # the earlier, quiet run
    assert f"and {quiet['configs']['bench']['strategies']['full']['minilora_over_torch']:.2f} × on a quiet" in README


def test_the_method_table_is_the_studies_and_the_benchmarks():
    """Every method's row, as report.method_summary makes it from the committed studies (forgetting, kind) and the
    step time and memory benchmarks (speed.json, memory.json): no number typed by hand, none missing."""
    from minilora import methods
    from minilora.report import method_summary

    table, rows = method_summary(str(ROOT / "benchmarks" / "studies"))
    # the head alone (a linear probe, `kind` only) has no row yet: the kind study has not been rerun with it, and
    # method_summary makes rows of the forgetting study's methods (issue 31); this list says so: it must empty
    awaiting_rerun = ["head"]
    assert [r[0] for r in rows] == [m for m in methods.METHODS if m not in awaiting_rerun], \
        "a method without a row in the comparison"
    assert all("-" not in (r[5], r[6], r[7]) for r in rows), "a row without its kind score, step time or memory"
    assert table in README


def test_the_memory_wall_numbers_are_the_benchmarks():
    """README's memory-wall sentence is benchmarks/memory_wall.json's: XL's full step refused by the plan, LoRA's
    and QLoRA's measured peaks and their ratio to the plan, as printed."""
    wall = json.loads((ROOT / "benchmarks" / "memory_wall.json").read_text())
    xl = {c["method"]: c for c in wall["cells"] if c["size"] == "gpt2-xl" and not c["checkpoint_activations"]}
    gib = 2 ** 30
    assert "refused" in xl["full"] and "measured" not in xl["full"]
    assert f"One full step plans {xl['full']['plan_total'] / gib:.2f} GiB" in README
    assert f"(AdamW's moments alone {xl['full']['plan']['optimizer'] / gib:.2f})" in README
    lora, qlora = xl["lora"]["measured"], xl["qlora"]["measured"]
    assert f"LoRA holds {lora['tracemalloc_peak'] / gib:.2f} GiB and QLoRA {qlora['tracemalloc_peak'] / gib:.2f} GiB" \
        in README
    ratios = " and ".join(f"{m['tracemalloc_over_plan']:.3f}" for m in (lora, qlora))
    assert f"measured, {ratios} × their plans" in README.replace("\n  ", " "), ratios
    assert f"`python benchmarks/memory_wall.py`, {wall['date'][:10]}" in README.replace("\n  ", " ")


def test_the_gpt2_small_table_is_the_benchmarks_numbers():
    """docs/hf.md's GPT-2-small rows are benchmarks/gpt2_small.json's, as printed."""
    bench = json.loads((ROOT / "benchmarks" / "gpt2_small.json").read_text())
    hf_page = (ROOT / "docs" / "hf.md").read_text()
    assert bench["size"] == "gpt2-small" and bench["params"] > 124_000_000
    for strategy in ("full", "lora"):
        s = bench["strategies"][strategy]
        memory = s["memory"]
        cells = [f"{s['step_s']['minilora']:.2f} s", f"{s['step_s']['torch']:.2f} s",
                 f"{memory['formula_total'] / 2 ** 20:,.0f} MiB", f"{memory['peak_total'] / 2 ** 20:,.0f} MiB"]
        row = " | ".join(cells)
        assert row in hf_page, row


def test_the_site_build_times_are_the_benchmarks():
    """README's full-build times are benchmarks/site_time.json's (a full build, timed from nothing, of every tutorial
    there is now), with the load it ran under."""
    full = json.loads((ROOT / "benchmarks" / "site_time.json").read_text())["full"]
    assert full["mode"] == "full" and full["threads"] == 1
    assert full["tutorials"] == len(list((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))), "time the build again"
    assert f"{full['tutorials']} tutorials and their solutions" in README
    load = full["load_clean_build"]
    if load["mean_1min"] > 1.5:  # more than the build's own kernel: the README says so
        assert f"other jobs running: load {load['mean_1min']:.1f} on average" in README
    else:
        assert "idle" in README.split("min from nothing**")[1][:200]
    assert f"**{round(full['clean_build_s'] / 60)} min from nothing** on {full['date']}" in README
    assert f"**{round(full['rebuild_after_prose_edit_s'])} s** for a rebuild" in README
    for shot in ("site_front.png", "site_tutorial.png", "site_api.png"):  # site_browser.SCREENSHOTS
        assert f"(figures/{shot})" in README
    assert "`python docs/_ext/site_browser.py build/site-smoke --screenshots figures`" in README


def test_the_benchmark_met_the_issues_targets():
    assert RESULTS["pretrain"]["val_loss"] <= 1.05 * RESULTS["pretrain"]["floor"]
    assert RESULTS["pretrain"]["wall_s"] <= 180
    assert RESULTS["lora_over_full_metric"] >= 0.95 and RESULTS["lora_trainable_fraction"] <= 0.05
    assert RESULTS["demo_wall_s"] <= 600


def test_every_figure_the_readme_shows_is_committed():
    for path in re.findall(r"\]\((figures/[^)]+\.png)\)", README):
        assert (ROOT / path).read_bytes()[:4] == b"\x89PNG", path


def test_every_study_number_on_the_front_page_is_the_reports_of_the_study_it_links():
    """Each headline names its study's page; its mean ± spread numbers are that study's report, as printed
    (the full tables are on the study pages, made from results.jsonl: tests/test_docs_pages.py)."""
    from minilora.report import report

    sections = [README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
                for title in ("What it finds", "Which method learns what, at equal cost")]
    bullets = [b for section in sections for b in re.split(r"\n(?=- )", section)]
    quoted = 0
    for bullet in bullets:
        numbers = re.findall(r"\d+\.\d+ ± \d+\.\d+", bullet)
        studies = re.findall(r"\(docs/studies/(\w+)\.md\)", bullet)
        if numbers:
            assert studies, f"a headline quotes {numbers} but links no study page"
            printed = "\n".join(report(str(ROOT / "benchmarks" / "studies" / s))[0] for s in studies)
            for number in numbers:
                assert number in printed, (studies, number)
            quoted += len(numbers)
    assert quoted >= 4


def test_the_readme_is_a_front_page_whose_links_resolve():
    # 165: the method comparison's table joined the front page (issue 21); the site holds the rest
    assert len(README.splitlines()) <= 165, f"README has {len(README.splitlines())} lines; the site holds the rest"
    for link in re.findall(r"\]\(((?:docs|figures)/[^)#]+)\)", README):
        assert (ROOT / link).is_file(), link
    for page in ("docs/story.md", "docs/tutorials/index.md", "docs/studies/index.md", "docs/demo.md"):
        assert f"]({page})" in README, page
    assert "sphinx-build -b html docs build/site " in README and "MINILORA_FAST=1 sphinx-build" in README


def test_the_gpt2_small_profile_and_ratios_in_the_hardware_page_are_the_benchmarks():
    """docs/hardware.md's op-by-op tables are benchmarks/gpt2_profile.json's as its --table prints them, and its
    ratio table is benchmarks/gpt2_small.json's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpt2_profile", ROOT / "benchmarks" / "gpt2_profile.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    page = (ROOT / "docs" / "hardware.md").read_text()
    assert prof.tables(json.loads((ROOT / "benchmarks" / "gpt2_profile.json").read_text())) in page
    bench = json.loads((ROOT / "benchmarks" / "gpt2_small.json").read_text())
    for strategy, label in (("full", "full fine-tuning"), ("lora", "LoRA")):
        s = bench["strategies"][strategy]["step_s"]
        row = f"| {label} | {s['minilora']:.2f} s | {s['torch']:.2f} s | {s['minilora'] / s['torch']:.2f} |"
        assert row in page, row
