"""The site's Sphinx extension: every page that comes from the repository is made here, at build time.

- The two builds. `MINILORA_FAST=1` makes the smoke build: the tutorials run in fast mode, their figures go
  to figures/fast/, and every page carries a banner saying so. Without it, the full build. Each mode keeps
  its own execution cache (build/jupyter_cache/MODE-HASH), so a prose edit re-executes nothing; a change
  to the package's source (HASH) starts a new cache and re-reads every page.
- The tutorials and their solutions are linked into docs/tutorials/ (symlinks: the .py files stay the only
  source) and read through jupytext by `read_tutorial`, which adds one hidden cell (KERNEL_SETUP) that shows,
  under the cell that saved it, every figure a tutorial writes (the tutorials only write PNGs), and runs the
  tutorial from the repository's root with no progress bars, so no page shows a bar, a warning or a path of
  the build machine.
- `{study} NAME`: a study's tables and figure, made from its committed results.jsonl by minilora.report, the
  command that regenerates them, and a link to the results file.
- The API reference: one autodoc page per module of the package, so a new module gets its page, and an
  index (`{api-index}`) of every module with its one-line summary. The docstrings are plain text;
  `plain_text_to_rest` makes them valid reST (indented blocks literal, lists with their blank lines).
- Paper links: the bibliography is docs/references.bib (sphinxcontrib-bibtex, docs/references.md); a paper
  the prose names as authors and year ("Dettmers et al. 2023", as the tutorials do) links to its entry.
- Links between tutorials: a Markdown link to a tutorial's file (the Exercises link their solutions) goes to
  its page, through the symlinks (`SymlinkedDocLinks`).
- Code links: an inline literal in the prose that names a minilora object (`lora.lora_linear_forward`) or a
  file (`minilora/lora.py`, `tutorials/03_lora_by_hand.py`, `benchmarks/studies/rank/results.jsonl`) becomes
  a link to its API entry, its source page (viewcode), its tutorial page or its study page.
- MathJax 3 is installed from the npm registry into build/ and copied into the site's _static: the site
  never fetches anything, so it works offline.
"""

import glob
import itertools
import os
import pkgutil
import re
import shutil
import subprocess

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")
STUDIES = os.path.join(ROOT, "benchmarks", "studies")
MATHJAX_VERSION = "3.2.2"
SMOKE_BANNER = ("Smoke build: the tutorials ran in fast mode (a few steps, tiny data), so their numbers and "
                "figures are a test that the code runs, not results.")


def site_mode():
    """'smoke' when MINILORA_FAST=1 (the tutorials' own switch), else 'full'."""
    return "smoke" if os.environ.get("MINILORA_FAST") == "1" else "full"


# the hidden first cell of every tutorial page. The tutorials save their figures and do not display them: show
# each one under the cell that saved it. They run from the repository's root, as `python tutorials/NN_x.py` does,
# so the paths they print are the repository's (figures/fast/..., build/site-runs/...), not the build machine's.
# Nothing a reader should not see reaches the page: no progress bar (conf: TQDM_DISABLE, HF_HUB_DISABLE_PROGRESS_BARS)
# and not the two warnings the site's kernel would print, neither of them the tutorials' doing: tqdm.auto's
# TqdmWarning (the kernel has no ipywidgets, so the text bar, off, is the one wanted) and transformers'
# FutureWarning on is_gradient_checkpointing, a deprecated property PEFT reads when it wraps a model; nor
# bitsandbytes' logged warning, where it is installed (PEFT imports it), that it could not fetch a CPU kernel from
# the Hub (the site builds offline). A figure whose text does not fit on its canvas (a title cut off at the PNG's
# edge, which no browser check can see) fails the build, naming the text.
KERNEL_SETUP = '''\
import logging as _logging
import os as _os
import warnings as _warnings

_os.chdir(_os.environ["MINILORA_SITE_ROOT"])
for _name in ("MINILORA_RUNS", "MINILORA_FIGURES", "MINILORA_STUDIES"):
    if _os.path.abspath(_os.environ[_name]).startswith(_os.getcwd() + _os.sep):
        _os.environ[_name] = _os.path.relpath(_os.environ[_name])
_warnings.filterwarnings("ignore", message="IProgress not found")
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

import IPython.display as _display
import minilora.plot as _plot

_save_figure = _plot.save_figure


def _save_and_show(fig, path, *args, **kwargs):
    _cut = _plot.texts_outside(fig)
    if _cut:
        raise ValueError(f"{path}: text cut off at the figure's edge: {_cut}")
    _save_figure(fig, path, *args, **kwargs)
    _display.display(_display.Image(filename=str(path)))


_plot.save_figure = _save_and_show
'''


def read_tutorial(text):
    """A percent-format tutorial as a notebook (jupytext), with the hidden setup cell first (KERNEL_SETUP)."""
    import jupytext
    import nbformat

    notebook = jupytext.reads(text, fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_SETUP, metadata={"tags": ["remove-cell"]}))
    return notebook


def _sync_links(pattern, folder, depth):
    """Symlink every file matching pattern into folder (relative links, depth levels up); drop stale ones."""
    os.makedirs(folder, exist_ok=True)
    wanted = {os.path.basename(p): p for p in sorted(glob.glob(pattern))}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.islink(path) and name not in wanted:
            os.remove(path)
    for name, source in wanted.items():
        link = os.path.join(folder, name)
        target = os.path.join(*[os.pardir] * depth, os.path.relpath(source, ROOT))
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)


def _write_if_changed(path, text):
    """Write text to path unless it holds it already (an unchanged file is not read again)."""
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def api_modules():
    """The package's modules as names below minilora ('bridge', 'methods.lora', ...), sorted."""
    import minilora

    return sorted(m.name[len("minilora."):] for m in pkgutil.walk_packages(minilora.__path__, "minilora."))


def module_summary(name):
    """The first paragraph of minilora.NAME's docstring, on one line (its page opens with it)."""
    import importlib

    doc = importlib.import_module(f"minilora.{name}").__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _api_pages():
    """docs/api/minilora.MODULE.rst for every module of the package."""
    folder = os.path.join(DOCS, "api")
    names = api_modules()
    for old in glob.glob(os.path.join(folder, "minilora.*.rst")):
        if os.path.basename(old)[len("minilora."):-len(".rst")] not in names:
            os.remove(old)
    for name in names:
        title = f"``minilora.{name}``"
        _write_if_changed(os.path.join(folder, f"minilora.{name}.rst"),
                          f"{title}\n{'=' * len(title)}\n\n.. highlight:: text\n\n"  # the docstrings' blocks are not Python
                          f".. automodule:: minilora.{name}\n   :members:\n")


def _vendor_mathjax(build):
    """The folder whose mathjax/ holds MathJax 3's es5 build, installed from the npm registry on first use."""
    base = os.path.join(build, "mathjax", MATHJAX_VERSION)
    static = os.path.join(base, "static")
    if os.path.exists(os.path.join(static, "mathjax", "tex-chtml.js")):
        return static
    if shutil.which("npm") is None:
        raise RuntimeError("the site serves MathJax itself and installs it with npm: install Node.js and npm "
                           "(Debian: apt-get install -y npm), then build again")
    os.makedirs(base, exist_ok=True)
    subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", base,
                    f"mathjax@{MATHJAX_VERSION}"], check=True)
    es5 = os.path.join(base, "node_modules", "mathjax", "es5")
    shutil.rmtree(static, ignore_errors=True)
    shutil.copytree(es5, os.path.join(static, "mathjax"))
    return static


def _package_fingerprint():
    """A hash of the package's source (minilora.methods too) and of KERNEL_SETUP. The execution cache is keyed
    on the notebooks' code cells only, so a change to the library would otherwise keep outputs that the new code
    no longer gives."""
    import hashlib

    import minilora

    digest = hashlib.sha256(KERNEL_SETUP.encode())  # and of the hidden cell every tutorial runs first
    for path in sorted(glob.glob(os.path.join(os.path.dirname(minilora.__file__), "**", "*.py"), recursive=True)):
        digest.update(open(path, "rb").read())
    return digest.hexdigest()[:12]


def _config_inited(app, config):
    mode = site_mode()
    fingerprint = _package_fingerprint()
    config.site_mode = f"{mode}-{fingerprint}"  # a config value that re-reads every page when it changes
    # the kernels that execute the tutorials inherit this environment; MINILORA_SITE_WORK moves the runs, the
    # execution cache and MathJax's install out of build/ (benchmarks/site_time.py times a build from nothing)
    build = os.environ.get("MINILORA_SITE_WORK", os.path.join(ROOT, "build"))
    env = {"MINILORA_RUNS": os.path.join(build, "site-runs", mode),
           "MINILORA_FIGURES": os.path.join(ROOT, "figures", "fast") if mode == "smoke"
           else os.path.join(build, "site-figures"),
           "MINILORA_STUDIES": STUDIES, "MPLBACKEND": "Agg", "MINILORA_SITE_ROOT": ROOT,
           # no progress bar on a page: tqdm's default (train.py's bar is off already, not being on a terminal)
           # and the Hugging Face libraries' own bars (tutorial 08's "Loading weights", "Writing model shards")
           "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    os.environ.update(env)
    config.nb_execution_cache_path = os.path.join(build, "jupyter_cache", f"{mode}-{fingerprint}")
    if mode == "smoke":
        config.html_theme_options = {**config.html_theme_options, "announcement": SMOKE_BANNER}
    config.html_static_path = [*config.html_static_path, _vendor_mathjax(build)]
    config.mathjax_path = "mathjax/tex-chtml.js"
    _sync_links(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py"), os.path.join(DOCS, "tutorials"), 2)
    _sync_links(os.path.join(ROOT, "tutorials", "solutions", "[0-9][0-9]_*_solutions.py"),
                os.path.join(DOCS, "tutorials", "solutions"), 3)
    _api_pages()


def committed_studies():
    """The names of the studies with a committed results.jsonl."""
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(STUDIES, "*", "results.jsonl")))


class StudyDirective(SphinxDirective):
    """```{study} NAME```: the study's report (tables, figure) from its committed results, and how to redo it."""

    required_arguments = 1

    def run(self):
        from minilora.plot import save_figure, texts_outside
        from minilora.report import report

        name = self.arguments[0]
        results = os.path.join(STUDIES, name, "results.jsonl")
        if not os.path.exists(results):
            raise self.error(f"study: expected a committed {os.path.relpath(results, ROOT)}, found none")
        for path in glob.glob(os.path.join(STUDIES, "*", "results.jsonl")):  # rank reads forgetting's too
            self.env.note_dependency(path)
        text, figures = report(os.path.join(STUDIES, name))
        heading, _, body = text.partition("\n\n")
        # a norm's bars (||dW||) inside a table cell would end the cell: escape them, as GFM tables allow
        body = "\n".join(line.replace("||", r"\|\|") if line.startswith("| ") else line for line in body.splitlines())
        lines = [f"**From `benchmarks/studies/{name}/results.jsonl`** ({heading.lstrip('# ')}), by "
                 f"`minilora report`:", "", body, ""]
        folder = os.path.join(self.env.srcdir, "_generated", "studies")
        os.makedirs(folder, exist_ok=True)
        for figure_name, figure in figures.items():
            cut = texts_outside(figure)
            if cut:
                raise self.error(f"study {name}: {figure_name}: text cut off at the figure's edge: {cut}")
            save_figure(figure, os.path.join(folder, figure_name))
            lines += [f"![{name}: the report's figure](/_generated/studies/{figure_name})", ""]
        here = os.path.dirname(self.env.doc2path(self.env.docname))
        lines += ["Regenerate the records, then these tables and the figure (into `figures/`):", "",
                  "```bash", f"minilora sweep {name} --out benchmarks/studies/{name} --workers 2",
                  f"minilora report benchmarks/studies/{name} --figures figures", "```", "",
                  f"The records, one JSON line per cell: {{download}}`results.jsonl <{os.path.relpath(results, here)}>`."]
        return self.parse_text_to_nodes("\n".join(lines))


class ApiIndexDirective(SphinxDirective):
    """```{api-index}```: every module of the package, linked to its page, with its one-line summary."""

    def run(self):
        items = nodes.bullet_list(classes=["api-index"])
        for name in api_modules():
            ref = addnodes.pending_xref("", nodes.literal(text=f"minilora.{name}"), refdomain="std", reftype="doc",
                                        reftarget=f"/api/minilora.{name}", refexplicit=True, refdoc=self.env.docname)
            summary = nodes.paragraph("", "", ref, nodes.Text(" \N{EM DASH} "))
            for i, part in enumerate(re.split(r"`+([^`]+)`+", module_summary(name))):
                summary += nodes.literal(text=part) if i % 2 else nodes.Text(part)
            items += nodes.list_item("", summary)
        for path in glob.glob(os.path.join(os.path.dirname(__import__("minilora").__file__), "**", "*.py"),
                              recursive=True):
            self.env.note_dependency(path)  # a summary edited re-reads the index
        return [items]


class SymlinkedDocLinks(SphinxPostTransform):
    """A Markdown link from one tutorial to another's file (`[their page](solutions/01_x_solutions.py)`, as the
    Exercises sections link their solutions) goes to that page. The link is relative to the tutorial, so it
    works in Jupyter and on GitHub too; Sphinx resolves it through the symlink (docs/tutorials/ -> tutorials/)
    to a path outside the source folder, which names no document: this maps it back, before MyST resolves it."""

    default_priority = 8  # before MyST's reference resolver (9)

    def run(self, **kwargs):
        by_real_path = {os.path.splitext(os.path.realpath(self.env.doc2path(d)))[0]: d for d in self.env.all_docs}
        for ref in self.document.findall(addnodes.pending_xref):
            target = ref.get("reftarget", "")
            if ref.get("reftype") == "myst" and target not in self.env.all_docs and target in by_real_path:
                ref["reftarget"] = by_real_path[target]


class CodeLinks(SphinxPostTransform):
    """Inline literals that name minilora code, a tutorial or a study's results become links to their pages."""

    default_priority = 900
    builders = ("html", "dirhtml")

    MODULE_FILE = re.compile(r"^(?:minilora/)?(\w+)\.py$")
    TUTORIAL_FILE = re.compile(r"^tutorials/((?:solutions/)?\d\d_\w+)\.py$")
    RESULTS_FILE = re.compile(r"^benchmarks/studies/(\w+)/results\.jsonl$")
    DOTTED = re.compile(r"^((?:minilora\.)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\))?$")

    def run(self, **kwargs):
        import minilora

        modules = {m.name for m in pkgutil.iter_modules(minilora.__path__)}  # files named in the prose: top level
        objects = self.env.get_domain("py").objects
        for literal in list(self.document.findall(nodes.literal)):
            if isinstance(literal.parent, (nodes.reference, nodes.literal_block, nodes.title)):
                continue
            target = self._target(literal.astext().strip(), modules, objects)
            if target:
                uri, anchor = target
                refuri = self.app.builder.get_relative_uri(self.env.docname, uri) + (f"#{anchor}" if anchor else "")
                literal.replace_self(nodes.reference("", "", literal.deepcopy(), refuri=refuri, internal=True))

    def _target(self, text, modules, objects):
        m = self.MODULE_FILE.match(text)
        if m and m.group(1) in modules and (text.startswith("minilora/") or "/" not in text):
            return f"_modules/minilora/{m.group(1)}", None
        m = self.TUTORIAL_FILE.match(text)
        if m and f"tutorials/{m.group(1)}" in self.env.all_docs:
            return f"tutorials/{m.group(1)}", None
        m = self.RESULTS_FILE.match(text)
        if m and f"studies/{m.group(1)}" in self.env.all_docs:
            return f"studies/{m.group(1)}", None
        m = self.DOTTED.match(text)
        if m and "." in m.group(1):
            dotted = m.group(1)
            for full in ([dotted] if dotted.startswith("minilora.") else [f"minilora.{dotted}", f"minilora.methods.{dotted}"]):
                if full in objects:
                    return objects[full].docname, objects[full].node_id
        return None


# "Liu et al. 2022" names two papers: the words just before it say which
PAPER_CONTEXT = {"liu2022ptuningv2": "P-tuning", "liu2022ia3": "IA3"}


def paper_mentions():
    """[(regex, [keys])]: how prose names each paper of docs/references.bib ("Hu et al. 2021", "Li & Liang 2021",
    "Kalajdzievski (2023)"), with the keys of the papers it may name."""
    from pybtex.database import parse_file

    named = {}
    for key, entry in parse_file(os.path.join(DOCS, "references.bib")).entries.items():
        surnames = [" ".join(p.last_names) for p in entry.persons["author"]]
        year = entry.fields["year"]
        who = (re.escape(surnames[0]) if len(surnames) == 1 else
               rf"{re.escape(surnames[0])} (?:&|and) {re.escape(surnames[1])}" if len(surnames) == 2 else
               rf"{re.escape(surnames[0])}\s+et\s+al\.")
        named.setdefault(rf"\b{who},?\s+(?:\({year}\)|{year})", []).append(key)
    return [(re.compile(pattern), keys) for pattern, keys in named.items()]


def _ancestors(node):
    while node.parent is not None:
        node = node.parent
        yield node


class PaperLinks(SphinxPostTransform):
    """A paper named in the prose as authors and year ("Dettmers et al. 2023", in a tutorial's markdown) becomes
    a link to its entry in the bibliography, as a {cite:t} citation in the Markdown pages is."""

    default_priority = 905
    builders = ("html", "dirhtml")

    def run(self, **kwargs):
        domain = self.env.get_domain("cite")
        entries = {c.key: (c.bibliography_key.docname, c.citation_id, c.entry) for c in domain.citations}
        if not entries:
            return
        mentions = paper_mentions()
        for element in list(self.document.findall(nodes.TextElement)):  # MyST keeps each line a Text of its own
            if isinstance(element, (nodes.literal, nodes.literal_block, nodes.raw)):
                continue
            for i in range(len(element.children) - 1, 0, -1):  # by position: Text nodes compare as strings
                if isinstance(element.children[i], nodes.Text) and isinstance(element.children[i - 1], nodes.Text):
                    joined = nodes.Text(str(element.children[i - 1]) + str(element.children[i]))
                    joined.parent = element
                    element.children[i - 1:i + 1] = [joined]
        for text in list(self.document.findall(nodes.Text)):
            if text.parent is None or isinstance(text.parent, (nodes.reference, nodes.literal, nodes.literal_block,
                                                               nodes.title, nodes.citation, nodes.raw)):
                continue
            value, pieces, at = str(text), [], 0
            found = sorted((m.start(), m.end(), keys) for pattern, keys in mentions for m in pattern.finditer(value))
            for start, end, keys in found:
                if start < at:
                    continue
                if len(keys) > 1:  # the paper whose name comes last before the mention, in its paragraph
                    paragraph = next((a for a in _ancestors(text) if isinstance(a, nodes.paragraph)), text.parent)
                    before = "".join(str(t) for t in itertools.takewhile(lambda t: t is not text,
                                                                         paragraph.findall(nodes.Text)))
                    before += value[:start]
                    keys = sorted((before.rfind(PAPER_CONTEXT.get(k, "\0")), k) for k in keys)
                    keys = [keys[-1][1]] if keys[-1][0] >= 0 else []
                if not keys or keys[0] not in entries:
                    continue
                docname, anchor, entry = entries[keys[0]]
                refuri = self.app.builder.get_relative_uri(self.env.docname, docname) + f"#{anchor}"
                pieces += [nodes.Text(value[at:start]),
                           nodes.reference("", value[start:end], refuri=refuri, internal=True,
                                           reftitle=entry.fields.get("title", "").replace("{", "").replace("}", ""))]
                at = end
            if pieces:
                parent = text.parent
                where = next(i for i, child in enumerate(parent.children) if child is text)
                pieces.append(nodes.Text(value[at:]))
                for piece in pieces:
                    piece.parent = parent
                parent.children[where:where + 1] = pieces


INLINE_LITERAL = re.compile(r"(``.+?``|`[^`]+`)")
LIST_ITEM = re.compile(r"^(\s*)(- |\d+\. )")


def _escape_text(line):
    """Outside inline literals, '|' (as in |a - n|) and a word's trailing '_' stay text, not substitutions or links."""
    parts = INLINE_LITERAL.split(line)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", parts[i].replace("|", "\\|"))
    return "".join(parts)


def plain_text_to_rest(lines):
    """The docstrings are plain text in the CS231n shape: the same text as valid reST, saying the same thing.

    - A block indented under a line (a formula, a table of names, a file layout, an example) is preformatted:
      it becomes a literal block (the line above it gets '::', shown as ':' or not at all), so it keeps its
      lines and columns instead of being reflowed into a block quote.
    - A '- x: ...' (or '1. ...') list gets the blank lines reST wants before and after it; a line under an
      item's text continues the item.
    - Outside literal blocks and inline literals, '|' and a word's trailing '_' are escaped.
    """
    out = []
    literal = None  # inside a literal block: the indentation it must stay right of
    items = []  # (marker, text) indentations of each list item we are in, the innermost last
    last = 0  # the indentation of the text we are in (a paragraph's, or a list item's text)

    def blank_line():
        if out and out[-1].strip():
            out.append("")

    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if literal is not None:
            if indent > literal:
                out.append(line)
                continue
            literal = None
            blank_line()
        item = LIST_ITEM.match(line)
        sibling = False  # a next item of the list we are in
        if items and indent < items[-1][1]:  # left of an item's text: that item (and maybe its list) is over
            popped = []
            while items and indent < items[-1][1]:
                popped.append(items.pop())
            sibling = bool(item) and popped[-1][0] == indent
            if not sibling:
                blank_line()
        if item:
            if not sibling:  # a list, or a list inside an item, starts after a blank line
                blank_line()
            items.append((indent, indent + len(item.group(2))))
            last = items[-1][1]
        elif indent > (items[-1][1] if items else last):
            # an indented block: preformatted; the line above opens it with '::'
            above = max(i for i, text in enumerate(out) if text.strip())
            if not out[above].endswith("::"):
                out[above] += ":" if out[above].endswith(":") else " ::"
            blank_line()
            out.append(line)
            literal = items[-1][1] if items else last
            continue
        else:
            last = indent
        out.append(_escape_text(line))
    return out


def _plain_text_docstrings(app, what, name, obj, options, lines):
    lines[:] = plain_text_to_rest(lines)


def _check_every_study_has_a_page(app, env):
    missing = [s for s in committed_studies() if f"studies/{s}" not in env.all_docs]
    if missing:
        raise RuntimeError(f"docs/studies: every committed study needs a page; missing {missing}")


def setup(app):
    app.add_config_value("site_mode", "full", "env")
    app.connect("config-inited", _config_inited)
    app.connect("autodoc-process-docstring", _plain_text_docstrings)
    app.connect("env-updated", lambda app, env: _check_every_study_has_a_page(app, env))
    app.add_directive("study", StudyDirective)
    app.add_directive("api-index", ApiIndexDirective)
    app.add_post_transform(SymlinkedDocLinks)
    app.add_post_transform(CodeLinks)
    app.add_post_transform(PaperLinks)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
