"""Open every page of a built site in headless Chromium (Playwright) and list what is wrong with each.

    python docs/_ext/site_browser.py build/site-smoke --screenshots figures   # and figures/site_*.png (SCREENSHOTS)

For every page: no console error and no uncaught exception; every image loaded (naturalWidth > 0); every
internal link resolves (the file exists and, for a #fragment, the target page has that id); the maths has
been typeset (every math element holds MathJax output, and no raw $...$ is left in the text); and on a
notebook page, every code cell that prints at its top level shows an output, and no cell shows an error.
No noise: no output shows a warning ("Warning", as in TqdmWarning or FutureWarning) or a progress bar (tqdm's
"%|" or "it/s]"), and no text on the page holds an absolute path of the machine that built it (the clone,
the Python environment, the temporary folder). What fits, at the site's width and a phone's (FIT_FACTS): every
code cell, output and code block inside its column; an output whole inside its cell (wrapped, never scrolling
sideways); code reaching past its cell only inside a scroll container in it; nothing clipped; every figure
inside its column; no page scrolling sideways.

tests/test_site.py builds the smoke site and asserts that this finds nothing. Chromium is Debian's
(/usr/bin/chromium): Playwright's own browser download does not work on these machines.
"""

import argparse
import functools
import http.server
import os
import re
import sys
import threading
import urllib.parse

CHROMIUM = os.environ.get("MINILORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# the committed screenshots (figures/site_*.png): {label: (page, what to scroll to: a CSS selector, or None for the
# top)}, each of the viewport at the site's width. The tutorial's shows a cell that prints and the figure it draws.
SCREENSHOTS = {"front": ("index.html", None),
               "tutorial": ("tutorials/03_lora_by_hand.html", "div.cell:has(div.cell_output img)"),
               "api": ("api/minilora.peft_io.html", None)}

# runs in the page once it has loaded and MathJax has finished: everything the checks need, as JSON
PAGE_FACTS = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const images = Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
  const math = Array.from(document.querySelectorAll('.math'));
  const untypeset = math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80));
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, mjx-container, .math, .highlight, .cell_input').forEach(e => e.remove());
  const text = body.textContent;
  const cells = Array.from(document.querySelectorAll('div.cell')).map(c => {
    const input = c.querySelector('.cell_input');
    const output = c.querySelector('.cell_output');
    return {source: input ? input.textContent : '', output: output ? output.textContent.trim().length + output.querySelectorAll('img').length : 0,
            error: !!c.querySelector('.output.traceback, .output.error'), printed: output ? output.textContent : ''};
  });
  const all = document.body.cloneNode(true);
  all.querySelectorAll('script, style').forEach(e => e.remove());
  return {images, links, math: math.length, untypeset, text, cells, all: all.textContent};
}
"""
# runs in the page at each viewport (VIEWPORTS): what does not fit its column, as a list of problems. The rules:
# - a box is a code cell's input, its output (MyST-NB's div.cell_input, div.cell_output), or a code block of the
#   prose (div.highlight-*); its column is the page's article. Every box lies inside its column.
# - an output fits its box entirely: no element of it reaches past the box, and none scrolls sideways (outputs
#   wrap their lines, docs/_static/minilora.css), so every character of a result is on the screen.
# - code keeps its lines: an element of a code box may reach past the box only inside a scroll container
#   (overflow-x auto or scroll: Furo's pre) that lies inside the box itself, so a reader scrolls to it.
# - nothing in a box is clipped: an element that hides its overflow (overflow-x hidden or clip) holds nothing
#   wider than itself, for that would be cut off with no way to see it.
# - every figure (an img in the article) lies inside the column, and the page never scrolls sideways.
# One pixel of slack for rounding. Problems name the element and the text it starts with.
FIT_FACTS = r"""
() => {
  const SLACK = 1, problems = [];
  const column = document.querySelector('article[role=main]') || document.body;
  const col = column.getBoundingClientRect();
  const what = e => e.tagName.toLowerCase() + (typeof e.className === 'string' && e.className ? '.' + e.className.trim().split(/\s+/).join('.') : '')
                    + ' ' + JSON.stringify((e.textContent || e.getAttribute('src') || '').trim().slice(0, 50));
  const past = (r, box) => r.width > 0 && (r.right > box.right + SLACK || r.left < box.left - SLACK);
  const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
  const BOX = 'div.cell_input, div.cell_output, div[class*="highlight-"]';
  const boxes = Array.from(column.querySelectorAll(BOX)).filter(b => !b.parentElement.closest(BOX));
  for (const box of boxes) {
    const r = box.getBoundingClientRect();
    if (r.width === 0) continue;  // hidden (a folded cell)
    const output = box.matches('div.cell_output');
    if (past(r, col)) problems.push(`a ${output ? 'cell output' : 'code cell'} is wider than its column (${Math.round(r.width)} px in ${Math.round(col.width)}): ${what(box)}`);
    for (const e of [box, ...box.querySelectorAll('*')]) {
      const style = getComputedStyle(e);
      if (['hidden', 'clip'].includes(style.overflowX) && e.scrollWidth > e.clientWidth + SLACK)
        problems.push(`clipped: ${e.scrollWidth} px of content in ${e.clientWidth}: ${what(e)}`);
      if (output && e.scrollWidth > e.clientWidth + SLACK && scrolls(e))
        problems.push(`an output scrolls sideways (${e.scrollWidth} px in ${e.clientWidth}), instead of wrapping: ${what(e)}`);
      if (e === box) continue;
      let scroller = null;
      for (let a = e.parentElement; a && a !== box.parentElement; a = a.parentElement) { if (scrolls(a)) { scroller = a; break; } }
      if ((output || !scroller) && past(e.getBoundingClientRect(), r))
        problems.push(`an element of a ${output ? 'cell output' : 'code cell'} reaches past it: ${what(e)}`);
    }
  }
  for (const img of column.querySelectorAll('img')) {
    const r = img.getBoundingClientRect();
    if (past(r, col)) problems.push(`a figure is wider than its column (${Math.round(r.width)} px in ${Math.round(col.width)}): ${what(img)}`);
  }
  const page = document.documentElement;
  if (page.scrollWidth > page.clientWidth + SLACK) problems.push(`the page scrolls sideways (${page.scrollWidth} px in ${page.clientWidth})`);
  return problems;
}
"""
VIEWPORTS = {"site": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
RAW_MATH = re.compile(r"\$[^\s$][^$\n]{0,200}?\$|\\\(|\\\[")
PROGRESS_BAR = re.compile(r"\d%\||it/s\]|s/it\]")  # tqdm's "100%|####| 16/16 [00:00<00:00, 2976.13it/s]"


def machine_paths():
    """The absolute folders of the machine that builds the site: none of them may show on a page."""
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return sorted({root, os.path.realpath(root), sys.prefix, os.path.realpath(tempfile.gettempdir()), "/tmp/"})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(site):
    """Serve the folder on 127.0.0.1 on a free port; returns (server, base URL). Call server.shutdown()."""
    handler = functools.partial(_QuietHandler, directory=site)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def pages(site):
    """Every HTML page of the site, as paths relative to it."""
    found = []
    for folder, _, files in os.walk(site):
        found += [os.path.relpath(os.path.join(folder, f), site) for f in files if f.endswith(".html")]
    return sorted(found)


def _ids(path, cache={}):
    if path not in cache:
        html = open(path, encoding="utf-8", errors="replace").read()
        cache[path] = set(re.findall(r'\sid="([^"]+)"', html))
    return cache[path]


def link_problem(site, base, href):
    """Why an internal link does not resolve, or None (external links are not followed: the site is offline)."""
    if not href.startswith(base):
        return None
    parsed = urllib.parse.urlparse(href)
    path = os.path.join(site, urllib.parse.unquote(parsed.path[1:]))
    if path.endswith("/") or os.path.isdir(path):
        path = os.path.join(path, "index.html")
    if not os.path.isfile(path):
        return f"link to a missing file: {href}"
    if parsed.fragment and path.endswith(".html") and urllib.parse.unquote(parsed.fragment) not in _ids(path):
        return f"link to a missing anchor: {href}"
    return None


def notebook_problems(cells):
    problems = []
    for cell in cells:
        if cell["error"]:
            problems.append(f"a code cell shows an error: {cell['source'][:80]!r}")
        if re.search(r"^print\(", cell["source"], re.M) and not cell["output"]:
            problems.append(f"a code cell that prints has no output: {cell['source'][:80]!r}")
    if cells and not any(c["output"] for c in cells):
        problems.append("a notebook page with no output at all")
    for cell in cells:
        for noise in sorted({m.group(0) for m in re.finditer(r"\w*Warning\b", cell["printed"])}):
            problems.append(f"an output shows a warning ({noise}): {cell['source'][:60]!r}")
        if PROGRESS_BAR.search(cell["printed"]):
            problems.append(f"an output shows a progress bar: {cell['source'][:60]!r}")
    return problems


def path_problems(text, paths):
    """Each absolute folder of the build machine (paths) that text names."""
    return [f"an absolute path of the build machine: {text[max(0, i - 40):i + len(p) + 40]!r}"
            for p in paths for i in [text.find(p.rstrip("/") + "/")] if i >= 0]


def check_site(site, screenshots=None, only=None, paths=None):
    """{page: [problems]} for every page of the built site (only pages with problems are listed).

    screenshots: a folder to write SCREENSHOTS into (site_front.png, site_tutorial.png, site_api.png: the
      viewport at the site's width, 1280 x 900).
    only: a list of pages to check instead of all of them.
    paths: the absolute folders no page may name (machine_paths() unless given).
    """
    from playwright.sync_api import sync_playwright

    site = os.path.abspath(site)
    paths = machine_paths() if paths is None else paths
    if not os.path.isfile(os.path.join(site, "index.html")):
        raise FileNotFoundError(f"site: expected a built site with index.html, got {site}")
    server, base = serve(site)
    report = {}
    try:
        with sync_playwright() as p:
            # scroll bars shown (Playwright hides them by default): a screenshot shows that a code line goes on
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, ignore_default_args=["--hide-scrollbars"])
            context = browser.new_context(viewport=VIEWPORTS["site"])
            page = context.new_page()
            for name in only or pages(site):
                problems = []

                def on_console(message, problems=problems):
                    if message.type == "error":
                        where = (message.location or {}).get("url", "")
                        problems.append(f"console error: {message.text}" + (f" ({where})" if where else ""))

                def on_error(error, problems=problems):
                    problems.append(f"uncaught exception: {error}")

                page.on("console", on_console)
                page.on("pageerror", on_error)
                page.goto(base + name, wait_until="load")
                facts = page.evaluate(PAGE_FACTS)
                problems += [f"image not loaded: {i['src']}" for i in facts["images"] if not i["ok"]]
                problems += sorted({pr for pr in (link_problem(site, base, h) for h in facts["links"]) if pr})
                problems += [f"maths not typeset: {t!r}" for t in facts["untypeset"]]
                problems += [f"raw maths left in the text: {m.group(0)!r}" for m in RAW_MATH.finditer(facts["text"])]
                problems += notebook_problems(facts["cells"])
                problems += path_problems(facts["all"], paths)
                if screenshots:
                    for label, (target, scroll_to) in SCREENSHOTS.items():
                        if name == target:
                            os.makedirs(screenshots, exist_ok=True)
                            if scroll_to:
                                page.evaluate("s => document.querySelector(s).scrollIntoView({block: 'start', behavior: 'instant'})",
                                              scroll_to)
                            page.screenshot(path=os.path.join(screenshots, f"site_{label}.png"), full_page=False)
                            page.evaluate("() => window.scrollTo({top: 0, behavior: 'instant'})")
                for label, viewport in VIEWPORTS.items():  # the site's width first: the page loaded at it
                    page.set_viewport_size(viewport)
                    problems += [f"at the {label}'s width ({viewport['width']} px): {p}" for p in page.evaluate(FIT_FACTS)]
                page.set_viewport_size(VIEWPORTS["site"])
                if problems:
                    report[name] = problems
                page.remove_listener("console", on_console)
                page.remove_listener("pageerror", on_error)
            browser.close()
    finally:
        server.shutdown()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", help="a built site, e.g. build/site")
    parser.add_argument("--screenshots", help="folder for the screenshots: site_front.png, site_tutorial.png, "
                        "site_api.png")
    args = parser.parse_args(argv)
    report = check_site(args.site, args.screenshots)
    for name, problems in report.items():
        for problem in problems:
            print(f"{name}: {problem}")
    n = len(pages(os.path.abspath(args.site)))
    print(f"{n - len(report)} pages passed, {len(report)} failed")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main())
