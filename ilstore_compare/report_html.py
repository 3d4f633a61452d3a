"""The HTML report: the :mod:`.report_outline` (with the plot of error along execution order) in
one self-contained file (inline CSS and SVG; no script, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from tabulate import tabulate

from .report_outline import Block, Figure, Heading, Notes, Table, Text, outline
from .result import CompareResult

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #212121; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f5f5f5; }
.verdict { font-size: 1.2em; font-weight: bold; padding: 0.5em; border-radius: 4px; }
.match { background: #e8f5e9; } .mismatch { background: #ffebee; }
.incomplete, .empty { background: #fff8e1; }
.note { color: #6d4c41; }
"""


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return str(tabulate(rows, headers=list(headers), tablefmt="html", disable_numparse=True))


def _html(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return [f"<h{block.level}>{escape(block.text)}</h{block.level}>"]
    if isinstance(block, Text):
        css = f' class="{block.style} {block.css}"' if block.style else ""
        return [f"<p{css}>{escape(block.text)}</p>"]
    if isinstance(block, Notes):
        return [f'<p class="note">note: {escape(note)}</p>' for note in block.items]
    if isinstance(block, Table):
        return [_table(block.rows, block.headers)]
    assert isinstance(block, Figure)
    return [f"<h2>{escape(block.title)}</h2>", block.markup()] if "html" in block.formats else []


def render_html(result: CompareResult, verbose: bool = False) -> str:
    """Render the report as one self-contained HTML page.

    Args:
        result: what :func:`ilstore_compare.compare` returned.
        verbose: list every tensor (default: only those that differ or are one-sided, at most
            :data:`~ilstore_compare.report_outline.BRIEF_LIMIT`).
    """
    title = f"ilstore compare: {result.dir1} vs {result.dir2}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for block in outline(result, verbose):
        out += _html(block)
    out.append("</body></html>")
    return "\n".join(out) + "\n"
