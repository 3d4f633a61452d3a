from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
VLLM_DUMP = FIXTURES / "vllm_pr_dump"
VLLM_RUN = VLLM_DUMP / "e9d340f1-195b-4b59-b707-d34544334ca1"


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def fixture_model() -> torch.nn.Module:
    """The model that wrote tests/fixtures/vllm_pr_dump, with its shipped weights."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    record = json.loads((VLLM_DUMP / "run_record.json").read_text())
    cfg = {k: v for k, v in record["llama_config"].items() if k not in ("attn_implementation", "dtype", "device", "init")}
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(str(VLLM_DUMP / "tiny_llama_weights.safetensors")))
    return model.eval()


def fixture_inputs() -> list[torch.Tensor]:
    record = json.loads((VLLM_DUMP / "run_record.json").read_text())
    return [torch.tensor(s["input_ids"]) for s in record["steps"]]


class Thrice(torch.nn.Module):
    """A root that calls the same Linear three times per forward (for call selectors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.other = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.lin(self.lin(self.lin(x))))
