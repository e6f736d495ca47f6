"""Open every page of a built site in headless Chromium (Playwright) and list what is wrong with each.

    python docs/_ext/site_browser.py build/site --screenshots figures   # the full build's committed screenshots

For every page: no console error and no uncaught exception; every image loaded (naturalWidth > 0); every
internal link resolves (the file exists and, for a #fragment, the target page has that id); the maths has
been typeset (every math element holds MathJax output, and no raw $...$ is left in the text); and on a
notebook page, every code cell that prints at its top level shows an output, and no cell shows an error.
No noise: no output shows a warning ("Warning", as in TqdmWarning or FutureWarning) or a progress bar (tqdm's
"%|" or "it/s]"), and no text on the page holds an absolute path of the machine that built it (the clone,
the Python environment, the temporary folder).

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
SCREENSHOTS = {"front": "index.html", "tutorial": "tutorials/03_lora_by_hand.html"}

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

    screenshots: a folder to write site_front.png and site_tutorial.png into (full-page, 1280 wide).
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
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
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
                    for label, target in SCREENSHOTS.items():
                        if name == target:
                            os.makedirs(screenshots, exist_ok=True)
                            page.screenshot(path=os.path.join(screenshots, f"site_{label}.png"), full_page=False)
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
    parser.add_argument("--screenshots", help="folder for site_front.png and site_tutorial.png")
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
