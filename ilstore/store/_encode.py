"""Storing any torch dtype in a format that knows only some of them, bit-exactly.

A file format that lacks a dtype (safetensors has no complex128; numpy, and so HDF5, has no
bfloat16 or float8) gets the tensor in one of two reversible encodings, and the true dtype is
recorded beside it:

* ``"real"``: a complex tensor as its real view (:func:`torch.view_as_real`, a trailing
  dimension of 2), readable as (real, imaginary) pairs by any tool;
* ``"bits"``: the raw bits as the unsigned integer type of the same width (``uint8`` for
  float8, ``uint16`` for bfloat16...).

Both are views, so encoding copies nothing and decoding gives back the exact bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ENCODINGS", "encode", "decode"]

#: The encodings :func:`encode` may choose; ``""`` means "stored as is".
ENCODINGS = ("", "real", "bits")

_UINT = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def encode(tensor: torch.Tensor, supported: Callable[[torch.dtype], bool]) -> tuple[torch.Tensor, str]:
    """A view of ``tensor`` in a dtype the format supports, and the encoding used.

    Args:
        tensor: a contiguous CPU tensor.
        supported: whether the target format can hold a dtype as is.

    Returns:
        ``(view, encoding)`` with ``encoding`` one of :data:`ENCODINGS`.

    Raises:
        TypeError: no encoding fits (a dtype wider than 8 bytes that is not complex).

    Example:
        >>> encode(torch.ones(2, dtype=torch.bfloat16), lambda d: d != torch.bfloat16)[1]
        'bits'
    """
    if supported(tensor.dtype):
        return tensor, ""
    if tensor.is_complex():
        real = torch.view_as_real(tensor)
        if supported(real.dtype):
            return real, "real"
    bits = _UINT.get(tensor.element_size())
    if bits is None or not supported(bits):
        raise TypeError(f"cannot store {tensor.dtype}: no raw-bits type of {tensor.element_size()} bytes")
    return tensor.view(bits), "bits"


def decode(stored: torch.Tensor, encoding: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode`; raises ValueError when ``stored`` cannot be decoded."""
    if encoding == "":
        return stored
    if encoding == "real":
        if stored.dim() == 0 or stored.shape[-1] != 2:
            raise ValueError(f"a complex tensor stored as its real view needs a trailing dimension of 2, "
                             f"got shape {list(stored.shape)}")
        out = torch.view_as_complex(stored.contiguous())
        if out.dtype != dtype:
            raise ValueError(f"the real view of {out.dtype} cannot hold {dtype}")
        return out
    if encoding == "bits":
        if stored.element_size() != torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"raw bits of {stored.dtype} cannot hold {dtype} (different widths)")
        return stored.view(dtype)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
