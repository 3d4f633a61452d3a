"""Errors raised by the comparer; all are :class:`ilstore.errors.IlstoreError` subclasses.

The CLI turns every one of them into exit status 2 ("the user must fix something").
"""

from __future__ import annotations

from ilstore.errors import IlstoreError, RunNotFoundError

__all__ = ["CompareError", "OptionError", "AmbiguousRunError", "NameMapError", "RunNotFoundError"]


class CompareError(IlstoreError):
    """The comparison cannot run as asked (see the subclasses)."""


class OptionError(CompareError):
    """A bad option value (a malformed ``steps``, a bad ``modules`` regex, a negative tolerance).

    The message speaks of the option (``"steps: ..."``); a command line maps :attr:`option` to
    its own flag.

    Attributes:
        option: the :class:`~ilstore_compare.options.CompareOptions` field at fault.
        detail: what is wrong with it and how to fix it.
    """

    def __init__(self, option: str, detail: str) -> None:
        self.option = option
        self.detail = detail
        super().__init__(f"{option}: {detail}")


class AmbiguousRunError(CompareError):
    """A directory given as a run holds several runs; the message lists them.

    Attributes:
        runs: the run directories found inside.
    """

    def __init__(self, directory: object, runs: list[str]) -> None:
        self.directory = str(directory)
        self.runs = list(runs)
        listing = "\n".join(f"  - {r}" for r in self.runs)
        super().__init__(f"{self.directory}: holds {len(self.runs)} runs; pass one of them:\n{listing}")


class NameMapError(CompareError):
    """A name-mapping file (``--map``) is unreadable or malformed; the message names the file and rule."""
