from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The pt reader with an empty header cache and a record of the files torch.load read."""
    from ilstore.store import pt

    monkeypatch.setattr(pt, "_KNOWN", {})
    monkeypatch.setattr(pt, "_HEADERS", {})
    loaded: list[Path] = []
    real = pt._torch_load

    def counting(path: Path) -> torch.Tensor:
        loaded.append(path)
        return real(path)

    monkeypatch.setattr(pt, "_torch_load", counting)
    return loaded
