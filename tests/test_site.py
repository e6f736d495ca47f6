"""The site (issue 22): the smoke build, served on 127.0.0.1 and opened page by page in headless Chromium.

The checks themselves are docs/_ext/site_browser.py's (console errors, images, internal links, typeset
maths, the code cells' outputs, noise, and what fits its column); here they must find nothing on any page, and
they must find each planted fault on a broken page.

What fits (site_browser.FIT_FACTS, on every page, at the site's width, 1280 px, and a phone's, 390 px, scroll
bars shown as on a desktop): every code cell, cell output and code block lies inside the page's column. An
output fits its cell whole: no element of it reaches past the cell and none scrolls sideways (outputs wrap their
lines, docs/_static/minilora.css), so no result hides past the edge. Code keeps its lines, so a code line longer
than the column may reach past its cell only inside a scroll container (overflow-x auto or scroll) that itself
lies inside the cell: the reader scrolls to it, and the scroll bar shows that it goes on. Clipped is never
allowed: an element that hides its overflow (overflow-x hidden or clip) with content wider than itself, cut off
with no way to see it. Every figure lies inside the column, and no page scrolls sideways. A figure's own text cut
off at its canvas edge is inside the PNG, beyond the browser: the smoke build fails on it when the figure is saved
(minilora_site.KERNEL_SETUP, minilora.plot.texts_outside).

Noise: no output shows a warning (`Warning`, as in TqdmWarning), where a library's warning lands; the prose may
name one (minilora.bounds explains when NumPy gives a RuntimeWarning), so the word alone is not noise there. No
text anywhere on a page holds an absolute path of the build machine, and no output a tqdm bar.

The screenshots (figures/site_*.png: the front page, tutorial 03 at a cell with its output and figure, and
minilora.peft_io's API page) come from this build, in Chromium: `python docs/_ext/site_browser.py build/site-smoke
--screenshots figures`, and the test takes them too, into build/site-smoke-screenshots. Building the site takes minutes, so these tests are marked `site` and left out of
the default run; `.ci/run` runs them with `python -m pytest -m site tests/test_site.py`. Where Sphinx,
Playwright or Chromium is missing they skip, except in CI (CI=true), where they fail.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "build", "site-smoke")  # the smoke build's documented folder (its cache is beside it)
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))

pytestmark = pytest.mark.site


def _require(ok, what):
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the browser test, but {what}: .ci/run installs the docs extra and chromium")
        pytest.skip(what)


def _browser():
    for module in ("sphinx", "myst_nb", "jupytext", "playwright"):
        try:
            __import__(module)
        except ImportError:
            _require(False, f"{module} is not installed (pip install '.[docs]')")
    import site_browser

    _require(os.path.exists(site_browser.CHROMIUM), f"no Chromium at {site_browser.CHROMIUM} (apt-get install chromium)")
    return site_browser


@pytest.fixture(scope="module")
def smoke_site():
    _browser()
    env = {**os.environ, "MINILORA_FAST": "1", "MPLBACKEND": "Agg", "PYTHONPATH": ROOT}
    # -W: a warning (a docstring docutils cannot read, a broken reference) fails the build, as an error does;
    # --keep-going reports every one of them before it fails
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "docs", SMOKE],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"the smoke build failed (warnings are errors):\n{done.stderr[-4000:]}"
    return SMOKE


def test_every_page_of_the_smoke_site_passes_in_chromium(smoke_site):
    site_browser = _browser()
    shots = os.path.join(ROOT, "build", "site-smoke-screenshots")
    shutil.rmtree(shots, ignore_errors=True)
    report = site_browser.check_site(smoke_site, screenshots=shots)
    assert not report, "\n".join(f"{page}: {p}" for page, problems in report.items() for p in problems)
    assert sorted(os.listdir(shots)) == sorted(f"site_{label}.png" for label in site_browser.SCREENSHOTS)
    for name in os.listdir(shots):
        with open(os.path.join(shots, name), "rb") as f:
            assert f.read(4) == b"\x89PNG", name


def test_the_smoke_site_has_every_page_and_says_it_is_a_smoke_build(smoke_site):
    from minilora_site import SMOKE_BANNER, committed_studies

    import minilora

    expected = [f"tutorials/{os.path.basename(p)[:-3]}.html" for p in
                glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py"))]
    expected += [f"tutorials/solutions/{os.path.basename(p)[:-3]}.html" for p in
                 glob.glob(os.path.join(ROOT, "tutorials", "solutions", "[0-9][0-9]_*_solutions.py"))]
    expected += [f"studies/{s}.html" for s in committed_studies()]
    expected += [f"api/minilora.{os.path.basename(p)[:-3]}.html" for p in
                 glob.glob(os.path.join(os.path.dirname(minilora.__file__), "[a-z]*.py"))]
    assert len(expected) >= 7 + 7 + 6 + 15
    pages = _browser().pages(smoke_site)
    assert not set(expected) - set(pages), sorted(set(expected) - set(pages))
    for page in pages:
        html = open(os.path.join(smoke_site, page), encoding="utf-8").read()
        assert SMOKE_BANNER in html, f"{page} has no smoke-build banner"
        assert "<script src=\"http" not in html and "cdn" not in html.lower(), f"{page} loads a script from the network"
    assert os.path.isfile(os.path.join(smoke_site, "_static", "mathjax", "tex-chtml.js")), "MathJax is served by the site"
    # the smoke build's figures go to the fast folder (its tutorials ran with MINILORA_FAST=1)
    assert glob.glob(os.path.join(ROOT, "figures", "fast", "0[1-7]_*.png"))


def _text(html_text):
    """The words of some HTML: tags dropped, entities read, curly quotes straight, white space single."""
    import html

    text = html.unescape(re.sub(r"<[^>]+>", "", html_text)).replace("`", "")
    return re.sub(r"\s+", " ", text.translate(str.maketrans("\u2018\u2019\u201c\u201d", "''\"\""))).strip()


def test_the_api_reference_opens_each_module_with_its_summary(smoke_site):
    from minilora_site import api_modules, module_summary

    index = open(os.path.join(smoke_site, "api", "index.html"), encoding="utf-8").read()
    shown = _text(index)
    for name in api_modules():
        summary = _text(module_summary(name))
        assert f'href="minilora.{name}.html"' in index, f"the API index does not link minilora.{name}"
        assert f"minilora.{name} \N{EM DASH} {summary}" in shown, f"the API index does not show minilora.{name}'s summary"
        page = open(os.path.join(smoke_site, "api", f"minilora.{name}.html"), encoding="utf-8").read()
        first = re.search(r"</h1>\s*<p[^>]*>(.*?)</p>", page, re.S)
        assert first and _text(first.group(1)) == summary, (name, first and first.group(1)[:200])
        assert "<blockquote>" not in page, f"minilora.{name}: a docstring's indented block became a block quote"


def test_every_paper_the_pages_name_links_to_the_bibliography(smoke_site):
    from minilora_site import paper_mentions

    references = open(os.path.join(smoke_site, "references.html"), encoding="utf-8").read()
    entries = re.findall(r'<div class="citation" id="([^"]+)"', references)
    assert len(entries) == 9, entries
    for entry in re.findall(r'<div class="citation" id="[^"]+".*?</div>', references, re.S):
        assert re.search(r'href="https://arxiv\.org/abs/\d{4}\.\d{5}"', entry), f"no arXiv abstract link: {entry[:200]}"
    linked = set()
    for page in _browser().pages(smoke_site):
        if page.startswith(("_modules/", "genindex", "search")) or page == "references.html":
            continue
        html_text = open(os.path.join(smoke_site, page), encoding="utf-8").read()
        linked |= set(re.findall(r'href="(?:\.\./)*references\.html#([^"]+)"', html_text))
        unlinked = _text(re.sub(r"<a [^>]*>.*?</a>", "", html_text, flags=re.S))
        for pattern, keys in paper_mentions():
            found = pattern.search(unlinked)
            assert not found, f"{page} names {keys} as {found.group(0)!r} without a link to the bibliography"
    assert set(entries) <= linked, f"papers no page cites: {set(entries) - linked}"


NO_FAVICON = '<link rel="icon" href="data:,">'  # else Chromium asks for /favicon.ico, a 404 on the first page
def _table_rows(html_text):
    """Every table row of an HTML page, as a tuple of its cells' text."""
    import html
    import re

    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html_text, re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        rows.append(tuple(html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells))
    return rows


def test_the_study_pages_show_the_reports_tables_and_link_their_results(smoke_site):
    from minilora_site import committed_studies

    from minilora.report import report

    for study in committed_studies():
        html_text = open(os.path.join(smoke_site, "studies", f"{study}.html"), encoding="utf-8").read()
        shown = set(_table_rows(html_text))
        text, _ = report(os.path.join(ROOT, "benchmarks", "studies", study))
        rows = [tuple(c.strip() for c in line.strip()[2:-2].split(" | "))
                for line in text.splitlines() if line.startswith("| ") and "---" not in line]
        assert rows, study
        missing = [row for row in rows if row not in shown]
        assert not missing, (study, missing[:3])
        assert "_downloads/" in html_text and "results.jsonl" in html_text, f"{study}: no link to its results file"


def test_the_tutorials_link_to_the_code_they_explain(smoke_site):
    html_text = open(os.path.join(smoke_site, "tutorials", "03_lora_by_hand.html"), encoding="utf-8").read()
    assert 'href="../api/minilora.finetune.html#minilora.finetune.finetune"' in html_text
    story = open(os.path.join(smoke_site, "story.html"), encoding="utf-8").read()
    assert 'href="_modules/minilora/' in story and 'href="tutorials/03_lora_by_hand.html"' in story
    api = open(os.path.join(smoke_site, "api", "minilora.methods.lora.html"), encoding="utf-8").read()
    assert "../_modules/minilora/methods/lora.html#lora_linear_forward" in api, "the API entry links to its source"


BROKEN_PAGE = f"""<!doctype html><html><head><title>broken</title>{NO_FAVICON}</head><body>
<p>Raw maths: $W' = W + BA$ never typeset.</p>
<img src="missing.png">
<a href="nowhere.html">a dead link</a> <a href="index.html#no-such-anchor">a dead anchor</a>
<div class="cell"><div class="cell_input"><pre>print("hello")</pre></div></div>
<div class="cell"><div class="cell_input"><pre>import tqdm</pre></div><div class="cell_output"><pre>/opt/env/tqdm/auto.py:21:
TqdmWarning: IProgress not found
Loading weights: 100%|##########| 16/16 [00:00&lt;00:00, 2976.13it/s]</pre></div></div>
<p>wrote /tmp/build-1234/figures/fast/03_lora.png</p>
<script>console.error("planted error")</script>
</body></html>"""


PNG_1PX = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5"
           "ErkJggg==")
LONG = "x" * 300  # wider than any column, at 13 px a character
FITS_PAGE = f"""<!doctype html><html><head>{NO_FAVICON}<link rel="stylesheet" href="minilora.css"></head><body>
<article role="main" style="width: 340px; margin: 0 auto">
<div class="cell"><div class="cell_input"><div class="highlight"><pre style="overflow: auto">print("{LONG}")</pre></div></div>
<div class="cell_output"><pre>a long output wraps: {LONG}</pre><img src="{PNG_1PX}" style="width: 100%"></div></div>
<div class="highlight-bash"><pre style="overflow: auto">a code block that scrolls inside itself: {LONG}</pre></div>
</article></body></html>"""
CLIPPED_PAGE = f"""<!doctype html><html><head>{NO_FAVICON}</head><body style="margin: 0">
<article role="main" style="width: 340px">
<div class="cell"><div class="cell_input"><pre style="overflow: auto">print(1)</pre></div>
<div class="cell_output"><pre style="overflow: auto; white-space: pre">an output that scrolls: {LONG}</pre></div></div>
<div class="highlight-python"><pre style="overflow: hidden; white-space: pre">clipped = "{LONG}"</pre></div>
<div class="highlight-text"><div style="width: 900px">spills out of its block</div></div>
<div class="cell"><div class="cell_input" style="width: 500px"><pre style="overflow: auto">print(2)</pre></div>
<div class="cell_output"><pre>2</pre></div></div>
<img src="{PNG_1PX}" style="width: 500px" alt="too wide">
</article></body></html>"""


def test_the_checks_find_every_planted_fault(tmp_path):
    site_browser = _browser()
    (tmp_path / "index.html").write_text(BROKEN_PAGE)
    (tmp_path / "good.html").write_text(f"<!doctype html><html><head>{NO_FAVICON}</head><body><p>fine, $5 only once; "
                                        "a RuntimeWarning named in prose is no noise, nor is /tmp in a sentence</p>"
                                        "<a href='index.html'>home</a></body></html>")
    (tmp_path / "fits.html").write_text(FITS_PAGE)
    (tmp_path / "clipped.html").write_text(CLIPPED_PAGE)
    shutil.copy(os.path.join(ROOT, "docs", "_static", "minilora.css"), tmp_path / "minilora.css")
    report = site_browser.check_site(str(tmp_path), paths=["/tmp/", "/opt/env"])
    assert site_browser.machine_paths() and all(os.path.isabs(p) for p in site_browser.machine_paths())
    problems = "\n".join(report["index.html"])
    for expected in ("console error: planted error", "image not loaded", "missing file", "missing anchor",
                     "raw maths left in the text", "a code cell that prints has no output",
                     "an output shows a warning (TqdmWarning)", "an output shows a progress bar",
                     "an absolute path of the build machine: ", "/tmp/build-1234/figures"):
        assert expected in problems, (expected, problems)
    assert "good.html" not in report, report.get("good.html")
    # the site's CSS wraps the output and keeps the figure in its column; the code scrolls inside its cell
    assert "fits.html" not in report, report.get("fits.html")
    clipped = "\n".join(report["clipped.html"])
    for width in ("site's width (1280 px)", "phone's width (390 px)"):  # widths of text: the machine's fonts
        for expected in (r'an output scrolls sideways \(\d+ px in 340\), instead of wrapping: pre "an output that scrolls',
                         r'clipped: \d+ px of content in 340: pre "clipped = \\"xxx',
                         'an element of a code cell reaches past it: div "spills out of its block"',
                         re.escape('a code cell is wider than its column (500 px in 340): div.cell_input "print(2)"'),
                         re.escape("a figure is wider than its column (500 px in 340): img")):
            assert re.search(f"^at the {re.escape(width)}: {expected}", clipped, re.M), (width, expected, clipped)
    assert re.search(r"^at the phone's width \(390 px\): the page scrolls sideways \(900 px in \d+\)", clipped, re.M)
