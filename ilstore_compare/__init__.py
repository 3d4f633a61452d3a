"""ilstore_compare: compare two ilstore runs, each in any backend.

Tensors pair by (rank, step, module, call, inputs/outputs, path), whatever their device; each
pair is checked elementwise (``|a - b| <= atol + rtol * |b|``, dir2 is the reference), the
earliest module call whose outputs differ is located, and a markdown, JSON or HTML report is
rendered. See ``docs/compare.md``.

Example:
    >>> import tempfile, torch, ilstore, ilstore_compare
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> runs = []
    >>> for _ in range(2):
    ...     with ilstore.capture(model, {"output_dir": tempfile.mkdtemp()}) as cap:
    ...         _ = model(torch.ones(1, 4))
    ...     runs.append(cap.run_dir)
    >>> result = ilstore_compare.compare(*runs)
    >>> result.exit_code, result.summary.matched
    (0, 2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ilstore._lazy import lazy_names

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .engine import compare
    from .errors import AmbiguousRunError, CompareError, NameMapError, OptionError
    from .mapping import NameMap
    from .options import CompareOptions
    from .result import CallResult, CompareResult, Divergence, Summary, TensorResult

__all__ = ["compare", "CompareResult", "CompareOptions", "TensorResult", "CallResult", "Divergence", "Summary",
           "NameMap", "CompareError", "OptionError", "AmbiguousRunError", "NameMapError"]

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so
#: ``ilstore-compare --help`` and the command line's option checks do not import torch.
_LAZY = {
    "compare": "engine", "CompareOptions": "options", "NameMap": "mapping",
    **{name: "errors" for name in ("CompareError", "OptionError", "AmbiguousRunError", "NameMapError")},
    **{name: "result" for name in ("CompareResult", "TensorResult", "CallResult", "Divergence", "Summary")},
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
