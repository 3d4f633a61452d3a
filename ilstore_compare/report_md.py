"""The markdown report (the default): the :mod:`.report_outline` in GitHub-flavoured markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from .report_outline import BRIEF_LIMIT, Block, Figure, Heading, Notes, Table, Text, outline
from .result import CompareResult

__all__ = ["render_markdown", "BRIEF_LIMIT"]


def _cell(value: Any) -> Any:
    return value.replace("|", "\\|") if isinstance(value, str) else value


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return str(tabulate([[_cell(v) for v in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True))


def _lines(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + block.text]
    if isinstance(block, Text):
        return [f"**{block.text}**" if block.style == "verdict" else block.text]
    if isinstance(block, Notes):
        return [f"> note: {note}" for note in block.items]
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
