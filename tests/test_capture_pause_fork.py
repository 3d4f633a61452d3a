"""A paused capture with automatic steps, and a capture inherited by a forked process.

* ``pause()`` around a forward (an engine's warm-up) makes that forward neither logged nor
  counted (docs/capture.md): no step of its own, no empty step written, no warning that hooks
  did not fire.
* A process forked while a capture is open (``os.fork``, multiprocessing's fork start method,
  data loader workers) gets a capture that records nothing and never writes to the parent's run
  (not at a step end, a flush or close), and says so once; the parent's run is whole.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ilstore


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def _cfg(out: Path, **extra: object) -> dict[str, object]:
    return {"output_dir": str(out), "run_id": "r", "log_step_ids": [], **extra}


def _tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("async_writes", [True, False])
def test_a_paused_forward_is_neither_logged_nor_counted(tmp_path: Path, async_writes: bool) -> None:
    model = _model()
    x = torch.ones(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "step 0 ended and no hooked module ran"
        with ilstore.capture(model, _cfg(tmp_path, async_writes=async_writes)) as cap:
            cap.pause()
            model(x)
            model(x)
            cap.resume()
            model(x)
            assert cap.step_index == 1
            cap.pause()
            model(x)
            cap.resume()
            model(x * 2)
            assert cap.step_index == 2
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1]
        assert [c.module for c in run.calls(0)] == ["0", "1"]
        assert torch.equal(run.load(ilstore.TensorKey(1, "0", 0, "inputs", ("0",))), x * 2)


class _Midway(nn.Module):
    """Calls ``a``, then ``between`` (capture methods' names), then ``b``, then ``after``."""

    def __init__(self, between: tuple[str, ...], after: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.cap: ilstore.Capture | None = None
        self.between, self.after = between, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.cap is not None
        x = self.a(x)
        for name in self.between:
            getattr(self.cap, name)()
        x = self.b(x)
        for name in self.after:
            getattr(self.cap, name)()
        return x


def test_pausing_inside_a_forward_keeps_that_step(tmp_path: Path) -> None:
    model = _Midway(("pause",), ("resume",))
    with ilstore.capture(model, _cfg(tmp_path)) as cap:
        model.cap = cap
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0, 1]
        assert [c.module for c in run.calls(1)] == ["a"]


needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")


def _in_child(body: object) -> int:
    """Run ``body()`` in a forked child; its exit status (0: every assertion held)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            body()  # type: ignore[operator]
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_fork
@pytest.mark.parametrize("backend", ["pt", "safetensors", "hdf5"])
@pytest.mark.parametrize("async_writes", [True, False])
def test_a_forked_child_never_writes_to_the_parents_run(tmp_path: Path, backend: str, async_writes: bool) -> None:
    model = _model()
    x = torch.ones(1, 4)
    cap = ilstore.capture(model, _cfg(tmp_path, backend=backend, async_writes=async_writes))
    model(x)
    assert cap.run_dir is not None
    cap.flush()
    before = _tree(cap.run_dir)

    def child() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model(x * 3)  # the model runs as it would without a capture
            model(x)
            cap.resume()  # stays quiet
            cap.flush()
            cap.close()
        assert torch.equal(out, nn.functional.relu(model[0](x * 3)))
        forked = [w for w in seen if "was forked from the one capturing run" in str(w.message)]
        assert len(forked) == 1, [str(w.message) for w in seen]
        assert str(os.getppid()) in str(forked[0].message)
        assert _tree(cap.run_dir) == before  # nothing written by the child

    assert _in_child(child) == 0
    assert _tree(cap.run_dir) == before
    model(x * 2)  # the parent goes on capturing, step 1
    cap.close()
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete"
        assert run.steps() == [0, 1]
        assert torch.equal(run.load(ilstore.TensorKey(1, "0", 0, "inputs", ("0",))), x * 2)


@needs_fork
def test_a_child_forked_inside_the_with_block_leaves_the_run_open(tmp_path: Path) -> None:
    """The child leaves the ``with`` block (closing its copy) and exits; the parent's run is
    still running, then closed by the parent as complete."""
    model = _model()
    with ilstore.capture(model, _cfg(tmp_path, backend="pt")) as cap:
        model(torch.ones(1, 4))
        assert cap.run_dir is not None
        manifest = cap.run_dir / "ilstore.json"
        cap.flush()

        def child() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cap.__exit__(None, None, None)  # what leaving the with block does in the child
            assert json.loads(manifest.read_text())["status"] == "running"

        assert _in_child(child) == 0
        assert json.loads(manifest.read_text())["status"] == "running"
        model(torch.ones(1, 4))
    with ilstore.open_run(cap.run_dir) as run:
        assert run.status == "complete" and run.steps() == [0, 1]


@needs_fork
def test_a_capture_made_in_the_child_records_there(tmp_path: Path) -> None:
    model = _model()
    with ilstore.capture(model, _cfg(tmp_path / "parent")):
        model(torch.ones(1, 4))

        def child() -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "ilstore: this process .* was forked", ilstore.IlstoreWarning)
                with ilstore.capture(model, _cfg(tmp_path / "child")) as mine:
                    model(torch.ones(1, 4))
            with ilstore.open_run(mine.run_dir) as run:
                assert run.steps() == [0] and run.status == "complete"

        assert _in_child(child) == 0


def test_a_forward_that_began_paused_stays_unrecorded_after_a_resume_inside_it(tmp_path: Path) -> None:
    """A resume inside a paused forward takes effect at the next forward (before, the forward's
    second half opened a step that the next forward was merged into)."""
    model = _Midway(("resume",))
    with ilstore.capture(model, _cfg(tmp_path)) as cap:
        model.cap = cap
        cap.pause()
        model(torch.ones(1, 2))  # began paused: not recorded, not counted, even after the resume
        assert cap.step_index == 0
        model(torch.ones(1, 2))
    with ilstore.open_run(cap.run_dir) as run:
        assert run.steps() == [0]
        assert [(c.module, c.call) for c in run.calls(0)] == [("a", 0), ("b", 0)]


@needs_fork
def test_a_child_forked_while_a_native_library_loads_can_load_it() -> None:
    """The writer thread loads the statistics kernel under a lock at a capture's first record; a
    child forked meanwhile got the lock held and waited forever at its first statistics."""
    import signal

    from ilstore._stats_kernel import LIBRARY

    LIBRARY._lock.acquire()  # as if another thread were loading it at the fork
    loaded, failed = LIBRARY._lib, LIBRARY._failed
    LIBRARY._lib, LIBRARY._failed = None, False  # not loaded yet: load() takes the lock
    try:
        def child() -> None:
            signal.alarm(20)  # before the fix: blocked in load() for good (SIGALRM ends the child)
            LIBRARY.load()
            signal.alarm(0)

        assert _in_child(child) == 0
    finally:
        LIBRARY._lib, LIBRARY._failed = loaded, failed
        LIBRARY._lock.release()


_NORMAL_EXIT_CHILD = r"""
import os, sys, warnings
import torch
import ilstore

warnings.simplefilter("ignore")
backend, out = sys.argv[1], sys.argv[2]
lin = torch.nn.Linear(512, 8)  # bodies of 512 KB: written past what the child's HDF5 knew of the file
cap = ilstore.capture(torch.nn.Sequential(lin), {"output_dir": out, "run_id": "r", "backend": backend,
                                                 "log_step_ids": [], "async_writes": False}, manual_step=True)
lin(torch.full((256, 512), 0.0))
go, done = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(done)
    os.read(go, 1)  # the parent has written more of the open step meanwhile
    sys.exit(0)  # a normal exit: the interpreter and the libraries (HDF5 closes its files) clean up
os.close(go)
for i in range(1, 5):
    lin(torch.full((256, 512), float(i)))
os.write(done, b"x")
os.waitpid(pid, 0)
for i in range(5, 8):
    lin(torch.full((256, 512), float(i)))
cap.close()
with ilstore.open_run(cap.run_dir) as run:
    assert run.status == "complete" and run.steps() == [0], (run.status, run.steps())
    got = [run.load(ilstore.TensorKey(0, "0", i, "inputs", ("0",)))[0, 0].item() for i in range(8)]
    assert got == [float(i) for i in range(8)], got
print("ok")
"""


@needs_fork
@pytest.mark.parametrize("backend", ["pt", pytest.param("safetensors", marks=pytest.mark.slow),  # ~5 s each
                                     pytest.param("hdf5", marks=pytest.mark.slow)])
def test_a_child_that_exits_normally_leaves_the_parents_open_step_whole(tmp_path: Path, backend: str) -> None:
    """Before, an hdf5 child's normal exit let HDF5 close its copy of the parent's open step
    file, cutting it to its length at the fork: the run's step lost the calls written since."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _NORMAL_EXIT_CHILD, backend, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
