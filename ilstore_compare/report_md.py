"""The markdown report (the default): the :mod:`.report_outline` in GitHub-flavoured markdown."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from ilstore.keys import printable

from .report_outline import BRIEF_LIMIT, Block, Figure, Heading, Notes, Table, Text, outline
from .result import CompareResult

__all__ = ["render_markdown", "BRIEF_LIMIT"]


def _cell(value: Any) -> Any:
    """A table cell: ``|`` escaped (it would split the row), as in :func:`_safe`."""
    return _safe(value).replace("|", "\\|") if isinstance(value, str) else value


#: ``<`` where it would open an HTML tag, a comment or a declaration.
_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def _safe(text: str) -> str:
    """Text from the runs (module names, reprs) shown as written: control characters as their
    escapes (a newline would end a row or a paragraph, an ESC colour the terminal), and a ``<``
    that would open an HTML tag backslash-escaped (``\\<script>`` renders as ``<script>``)."""
    return _TAG.sub(r"\\<", printable(text))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return str(tabulate([[_cell(v) for v in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True))


def _lines(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + _safe(block.text)]
    if isinstance(block, Text):
        text = _safe(block.text)  # (module names in the text)
        return [f"**{text}**" if block.style == "verdict" else text]
    if isinstance(block, Notes):
        return [f"> note: {_safe(note)}" for note in block.items]
    if isinstance(block, Table):
        return [_table(block.rows, block.headers)]
    assert isinstance(block, Figure)
    return ["## " + block.title, "", block.markup()]


def render_markdown(result: CompareResult, verbose: bool = False) -> str:
    """Render the report as GitHub-flavoured markdown.

    Args:
        result: what :func:`ilstore_compare.compare` returned.
        verbose: list every tensor (default: only those that differ or are one-sided, at most
            :data:`BRIEF_LIMIT`).
    """
    out: list[str] = []
    for block in outline(result, verbose):
        if isinstance(block, Figure) and "md" not in block.formats:
            continue
        out += _lines(block) + [""]
    return "\n".join(out).rstrip() + "\n"
