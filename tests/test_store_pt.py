"""The ``pt`` backend against the shared conformance suite (ilstore.testing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conftest import native_pt
from ilstore.keys import TensorKey
from ilstore.testing import StoreConformance


class TestPtStore(StoreConformance):
    backend = "pt"

    def native_load(self, run_dir: Path, key: TensorKey, meta: dict[str, Any]) -> torch.Tensor:
        return native_pt(run_dir, key, meta)  # bypass: the JSON files and plain torch.load
