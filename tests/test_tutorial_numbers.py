"""The study numbers a tutorial quotes are the committed studies' numbers.

A tutorial's prose says what the full-mode run and the studies give (its fast-mode run, which the tests make,
shows little), so it quotes results as `mean ± sd`. Each such number must be one that `minilora report` prints
for a committed study (benchmarks/studies/NAME/results.jsonl): when a study is rerun, the tutorials that quote
it fail here until their prose is brought up to date.
"""

import functools
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py"))
               + glob.glob(os.path.join(ROOT, "tutorials", "solutions", "[0-9][0-9]_*_solutions.py")))
QUOTED = re.compile(r"\d+\.\d+ ± \d+\.\d+")


@functools.lru_cache(maxsize=None)
def printed_by_the_reports():
    from minilora.report import report

    return "\n".join(report(os.path.dirname(path))[0]
                     for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "studies", "*", "results.jsonl"))))


def prose(path):
    """The comment lines of a percent-format script (its markdown cells and comments), not its code."""
    return "\n".join(line for line in open(path, encoding="utf-8").read().splitlines() if line.lstrip().startswith("#"))


def test_every_mean_and_spread_a_tutorial_quotes_is_printed_by_a_committed_study_report():
    quoted = {(os.path.relpath(path, ROOT), number) for path in FILES for number in QUOTED.findall(prose(path))}
    assert quoted, "no tutorial quotes a study number: the check would check nothing"
    printed = printed_by_the_reports()
    missing = sorted(q for q in quoted if q[1] not in printed)
    assert not missing, f"quoted, but no committed study's report prints them: {missing}"
