"""The API reference renders every docstring (issue 29): the site's hook (docs/_ext/minilora_site.py,
plain_text_to_rest) turns the package's plain-text docstrings into reST that docutils reads without an error
or a warning, formulas and tables staying preformatted, lists staying lists.

This parses the docstrings with docutils alone, in seconds; the smoke build (`sphinx-build -W`, in
tests/test_site.py) checks the same through autodoc. Skipped where the docs extra is not installed.
"""

import importlib
import inspect
import io
import os
import pkgutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))

docutils_core = pytest.importorskip("docutils.core")
pytest.importorskip("sphinx")
from docutils import nodes  # noqa: E402
from sphinx.util.docstrings import prepare_docstring  # noqa: E402

import minilora  # noqa: E402


def _docstrings():
    """(name, docstring) for every module of the package and every public function and class it defines."""
    found = []
    for info in pkgutil.walk_packages(minilora.__path__, "minilora."):
        module = importlib.import_module(info.name)
        if module.__doc__:
            found.append((info.name, module.__doc__))
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__:
                found.append((f"{info.name}.{name}", obj.__doc__))
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") and inspect.isfunction(value) and value.__doc__:
                        found.append((f"{info.name}.{name}.{member}", value.__doc__))
    return found


def _parse(text):
    """(doctree, what docutils reported at level warning or above)."""
    stream = io.StringIO()
    tree = docutils_core.publish_doctree(text, settings_overrides={"warning_stream": stream, "report_level": 2,
                                                                   "halt_level": 5})
    return tree, stream.getvalue()


def test_every_docstring_of_the_package_is_valid_rest():
    from minilora_site import plain_text_to_rest

    docstrings = _docstrings()
    assert len(docstrings) > 200
    problems = []
    for name, doc in docstrings:
        tree, report = _parse("\n".join(plain_text_to_rest(prepare_docstring(doc))))
        if report:
            problems.append(f"{name}: {report.strip()}")
        body = [line for line in doc.expandtabs().splitlines()[1:] if line.strip()]
        if "." in name[len("minilora."):] and body and min(len(l) - len(l.lstrip()) for l in body) == 0 \
                and not inspect.ismodule(sys.modules.get(name)):
            # a line at column 0 in an indented docstring: a "\n" written unescaped (the body would be one quote)
            problems.append(f"{name}: a line of the docstring starts at column 0 (an unescaped '\\n'?)")
        # it opens with its one-line summary, as a paragraph of its own (what the API index shows)
        summary = prepare_docstring(doc)[0].replace("`", "").replace("\\", "")
        first = tree.children[0] if tree.children else None
        if not isinstance(first, nodes.paragraph) or not first.astext().startswith(summary):
            problems.append(f"{name}: does not open with its summary {summary!r}: {first and first.astext()[:80]!r}")
    assert not problems, "\n".join(problems)


def test_formulas_and_tables_stay_preformatted_and_lists_stay_lists():
    from minilora_site import plain_text_to_rest

    doc = """Attention, per head:
        S = q k^T / sqrt(hs)        (B, NH, T, T)
        P = softmax(S)
    The cache holds P.

    Inputs:
    - q, k, v: (B, T, C), with
      C = NH * hs
    - n_heads: NH
    Returns out and |x| for x_.

    Layout of the file

        "param.<name>"   every parameter
                         as an array
    """
    tree, report = _parse("\n".join(plain_text_to_rest(prepare_docstring(doc))))
    assert not report, report
    blocks = [b.astext() for b in tree.findall(nodes.literal_block)]
    assert blocks == ["S = q k^T / sqrt(hs)        (B, NH, T, T)\nP = softmax(S)",
                      '"param.<name>"   every parameter\n                 as an array'], blocks
    items = [i.astext() for i in tree.findall(nodes.list_item)]
    assert items == ["q, k, v: (B, T, C), with\nC = NH * hs", "n_heads: NH"], items
    paragraphs = [p.astext() for p in tree.findall(nodes.paragraph) if not isinstance(p.parent, nodes.list_item)]
    # '::' shows as ':' after a word and not at all after a space; '|' and a trailing '_' stay text
    assert paragraphs == ["Attention, per head:", "The cache holds P.", "Inputs:", "Returns out and |x| for x_.",
                          "Layout of the file"], paragraphs
    assert not list(tree.findall(nodes.block_quote)) and not list(tree.findall(nodes.definition_list))
