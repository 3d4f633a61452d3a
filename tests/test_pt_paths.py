"""The pt reader's call directories, named by module_calls.txt, stay inside the run: the names
it takes without resolving them again (plain names, no symbolic link) and the ones it checks in
full (links, separators, '..')."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import ilstore


def _run(out_dir: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with torch.no_grad(), ilstore.capture(model, {"output_dir": str(out_dir), "run_id": "r"}) as cap:
        model(torch.randn(2, 4))
    assert cap.run_dir is not None
    return cap.run_dir


def test_plain_names_are_the_resolved_directories(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    with ilstore.open_run(run_dir) as run:
        dirs = run._dirs_of(0)
        assert [p.name for p in dirs.values()] == ["0", "1"]
        assert all(p == p.resolve() and p.parent == (run_dir / "step_0").resolve() for p in dirs.values())
        assert run.load(ilstore.TensorKey(0, "0", 0, "outputs")).shape == (2, 4)


@pytest.mark.parametrize("name", ["../../outside", "0/../../..", "a\0b"])
def test_names_that_leave_the_step_are_refused(tmp_path: Path, name: str) -> None:
    run_dir = _run(tmp_path / "run")
    order = run_dir / "step_0" / "module_calls.txt"
    order.write_text(f"{name}\n1\n")
    with pytest.raises(ilstore.StoreError), ilstore.open_run(run_dir) as run:
        for key in run.keys(0):
            run.load(key)


def test_a_linked_call_directory_leading_outside_is_refused(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run")
    outside = tmp_path / "outside"
    shutil.move(run_dir / "step_0" / "0", outside)
    (run_dir / "step_0" / "0").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ilstore.UnsafePathError, match="outside the run directory"), ilstore.open_run(run_dir) as run:
        run.keys(0)


def test_a_linked_call_directory_inside_the_run_resolves(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run")
    step = run_dir / "step_0"
    shutil.move(step / "0", step / "real0")
    (step / "0").symlink_to(step / "real0", target_is_directory=True)
    with ilstore.open_run(run_dir) as run:
        assert run._dirs_of(0)[next(iter(run._dirs_of(0)))] == (step / "real0").resolve()
        assert run.load(ilstore.TensorKey(0, "0", 0, "outputs")).shape == (2, 4)
