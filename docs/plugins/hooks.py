"""MkDocs hooks: fill each ``<!-- generated: NAME [ARGS] -->`` marker from the code (generate.py).

Loaded through ``hooks:`` in mkdocs.yml, with this folder on ``sys.path`` while it is imported.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import generate

MARKER = re.compile(r"^<!-- generated: ([\w-]+)((?: [\w.-]+)*) -->$", re.MULTILINE)


@cache
def _rendered(name: str, args: tuple[str, ...]) -> str:
    return generate.render(name, *args)


def fill(markdown: str) -> str:
    """The page with every marker replaced by the section it names."""
    return MARKER.sub(lambda m: _rendered(m.group(1), tuple(m.group(2).split())), markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return fill(markdown)
