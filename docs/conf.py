"""Sphinx configuration of the minilora site (the pages themselves are in this folder; _ext/minilora_site.py
makes the ones that come from the repository).

    full build:   sphinx-build -b html docs build/site                    (every tutorial in full mode)
    smoke build:  MINILORA_FAST=1 sphinx-build -b html docs build/site-smoke   (fast mode, for CI)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "minilora"
author = "the minilora authors"
copyright = "2026, the minilora authors"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.viewcode", "sphinx.ext.mathjax", "sphinxcontrib.bibtex",
              "minilora_site"]

# the papers: one bibliography (references.md), cited as {cite:t}`key` ("Hu et al. [2021]") or {cite:p}`key`
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# the tutorials are percent-format scripts, read through jupytext (minilora_site.read_tutorial) and executed
nb_custom_formats = {".py": ["minilora_site.read_tutorial", {}, False]}
nb_execution_mode = "cache"  # executed once per change of their code; the cache path depends on the mode
nb_execution_timeout = 900  # seconds per cell: tutorial 05's longest cell trains for about two minutes
nb_execution_raise_on_error = True  # a tutorial that fails fails the build
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

exclude_patterns = ["_build", "_ext", "conf.py", "_generated", "**/.ipynb_checkpoints"]

autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # a default shows as written (root=_PACKAGE_ROOT), not as the builder's path
autodoc_default_options = {"undoc-members": False}

html_theme = "furo"
html_title = "minilora"
html_theme_options = {}
html_static_path = ["_static"]  # minilora_site adds MathJax's folder
html_css_files = ["minilora.css"]  # outputs wrap, figures fit their column (docs/_static/minilora.css)
html_favicon = "_static/favicon.svg"
html_show_sourcelink = False

# the docstrings are plain text (docs/_ext/minilora_site.py reads them as reST): `name` there is code, as in
# the Markdown pages, and "--out" stays two hyphens (smart quotes and ellipses only, no dashes)
default_role = "code"
smartquotes_action = "qe"
