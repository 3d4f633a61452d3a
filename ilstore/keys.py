"""The canonical record key: which tensor of which module call of which step.

Every backend maps :class:`TensorKey` to its own naming (a file name, a safetensors key, an
HDF5 dataset path) and the comparer pairs tensors by it. Its one string form is
``r<rank>/s<step>/<module>/<call>/<kind>[/<path elem>...]`` with every free-text part
percent-encoded, so any module name or dict key round-trips.

Example:
    >>> k = TensorKey(step=0, module="model.layers.0", call=1, kind="outputs", path=("0",))
    >>> str(k)
    'r0/s0/model.layers.0/1/outputs/0'
    >>> TensorKey.parse(str(k)) == k
    True
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = ["KINDS", "CallKey", "TensorKey", "encode_part", "decode_part", "printable"]

#: The sides of a module call that can be captured, in the order they are written.
KINDS = ("inputs", "outputs", "post_fwd_inputs")

# quote() never emits a lone "%", so it can stand for the empty string unambiguously.
_EMPTY = "%"


@functools.lru_cache(maxsize=8192)  # module names and paths repeat every step; quote() is slow
def encode_part(text: str) -> str:
    """Percent-encode one free-text part of a key (no '/' survives)."""
    return quote(text, safe="") if text else _EMPTY


def decode_part(text: str) -> str:
    return "" if text == _EMPTY else unquote(text)


@dataclass(frozen=True, order=True)
class CallKey:
    """One call of one module: (rank, step, module, call)."""

    rank: int
    step: int
    module: str
    call: int

    def tensor(self, kind: str, path: tuple[str, ...] = ()) -> TensorKey:
        return TensorKey(step=self.step, module=self.module, call=self.call, kind=kind, path=path, rank=self.rank)


@dataclass(frozen=True, order=True)
class TensorKey:
    """One captured tensor.

    Attributes:
        step: the step (one root forward, or one manual step).
        module: the dotted module name as ``named_modules()`` gives it.
        call: zero-based call index of the module within the step.
        kind: one of :data:`KINDS`.
        path: position inside the captured structure: positional index, keyword name or
            dict key per nesting level; ``()`` for a single tensor.
        rank: the distributed rank that captured it (0 outside torch.distributed).
    """

    step: int
    module: str
    call: int
    kind: str
    path: tuple[str, ...] = ()
    rank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.path, tuple):
            object.__setattr__(self, "path", tuple(str(p) for p in self.path))

    @property
    def call_key(self) -> CallKey:
        return CallKey(self.rank, self.step, self.module, self.call)

    def __str__(self) -> str:
        parts = [f"r{self.rank}", f"s{self.step}", encode_part(self.module), str(self.call), self.kind]
        parts += [encode_part(p) for p in self.path]
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> TensorKey:
        """Inverse of ``str(key)``; raises ValueError on a malformed key."""
        parts = text.split("/")
        if len(parts) < 5 or not parts[0].startswith("r") or not parts[1].startswith("s"):
            raise ValueError(f"not a record key: {text!r}")
        try:
            rank, step, call = int(parts[0][1:]), int(parts[1][1:]), int(parts[3])
        except ValueError:
            raise ValueError(f"not a record key: {text!r}") from None
        return cls(step=step, module=decode_part(parts[2]), call=call, kind=parts[4],
                   path=tuple(decode_part(p) for p in parts[5:]), rank=rank)

    def display(self) -> str:
        """A short human form: ``model.layers.0#1 outputs[0]``."""
        call = f"#{self.call}" if self.call else ""
        path = "".join(f"[{p}]" for p in self.path)
        rank = f"rank{self.rank} " if self.rank else ""
        return f"{rank}step {self.step} {self.module or '(root)'}{call} {self.kind}{path}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    r"""``text`` for a terminal or a table cell: control characters (a newline, ESC) written as
    their escapes (``\n``, ``\x1b``), so a module name cannot move the cursor, colour the
    terminal or split a row, and ``"a\nb"`` does not look like ``"ab"``.

    Example:
        >>> printable("layers.0\x1b[31m\n")
        'layers.0\\x1b[31m\\n'
    """
    if text.isprintable():
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
