"""MkDocs hooks (mkdocs.yml: ``hooks``): the specification, ALGORITHM.md at the repository root,
becomes the page ``algorithm.md``, and links to it from other pages point there. Any other link out of
``docs/`` stays as written, so that ``mkdocs build --strict`` fails on it. In the API reference, the
docstrings' reST roles (``:func:`x```, rendered by mkdocstrings as ``:func:<code>x</code>``) lose
their role name."""

from __future__ import annotations

import pathlib
import posixpath
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = "ALGORITHM.md"
PAGE = "algorithm.md"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|math|obj):(?=<code>)")


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=(ROOT / SPEC).read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        target = posixpath.normpath(posixpath.join(here, match.group(1)))
        if target == f"../{SPEC}":  # docs/x.md -> ../ALGORITHM.md: the generated page
            return f"]({posixpath.relpath(PAGE, here or '.')}{match.group(2) or ''})"
        return match.group(0)

    return LINK.sub(rewrite, markdown)


def on_page_content(html, page, config, files):
    return ROLE.sub("", html) if page.file.src_uri == "api.md" else html
