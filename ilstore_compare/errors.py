"""Errors raised by the comparer; all are :class:`ilstore.errors.IlstoreError` subclasses.

The CLI turns every one of them into exit status 2 ("the user must fix something").
"""

from __future__ import annotations

from ilstore.errors import AmbiguousRunError as _CoreAmbiguousRunError
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


class AmbiguousRunError(CompareError, _CoreAmbiguousRunError):
    """A directory given as a run holds several runs; the message lists them (``directory``, ``runs``)."""


class NameMapError(CompareError):
    """A name-mapping file (``--map``) is unreadable or malformed; the message names the file and rule."""
