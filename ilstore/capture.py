"""Capture: forward hooks that snapshot module inputs/outputs and hand them to a store writer.

Hooks never return a value, so they cannot replace a module's arguments or outputs; they only
read tensors (statistics) and copy them (snapshots). The one exception is replay
(``replay_from``): there the pre-hook of a selected call returns the reference's inputs, by design
(:mod:`ilstore.replay`). Only modules that some
``module_call_match`` pattern can select get hooks; with ``enabled: false`` none do.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import Config, load_config
from .device_stats import DeferredStats
from .errors import IlstoreError, StoreError
from .keys import CallKey
from .layout import ModuleLayout, module_layout
from .manifest import MANIFEST_NAME, new_manifest
from .pipeline import RecordSink, SyncSink, ThreadedSink, WriterFailed
from .records import Deduper, TensorPolicy, _encodable, build_record
from .replay import CallReplay, ReplaySource, open_reference, rng_marker
from .store.base import StepInfo
from .store.ranks import rank_run_dir, write_ranks_manifest
from .store.registry import get_backend, open_run

if TYPE_CHECKING:
    from .in_graph import InGraph

__all__ = ["Capture", "capture", "IlstoreWarning"]

_log = logging.getLogger(__name__)


class IlstoreWarning(UserWarning):
    """Capture could not do what was asked (compiled model, hooks that never fired...)."""


#: The captures that may write (open, enabled), for :func:`_forked_child`.
_WRITING: weakref.WeakSet[Capture] = weakref.WeakSet()


def _forked_child() -> None:
    """In a process just forked (``os.fork``, multiprocessing's fork start method, a data loader's
    workers) from one that captures: every capture it inherited goes quiet for good. The run
    belongs to the parent, whose writer thread does not exist here; a write, a step end or a
    close from the child would interleave with the parent's in the same files. The inherited
    writer is kept referenced and never used; its ``forked()`` keeps what it holds open from
    reaching the run when the child ends (an hdf5 step file, which HDF5 closes at exit)."""
    for cap in list(_WRITING):
        cap._orphan()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


@dataclass
class _Frame:
    """One call of a hooked module in progress: its key, whether it is selected, its arguments."""

    call: CallKey
    take: bool
    args: Any = None
    kwargs: Any = None
    replay: CallReplay | None = None


#: What the pre-hook of a call that begins paused pushes where a call of the same module is still
#: open (re-entrant, or cut by the pause): that call's post-hook pops this, even after a resume
#: inside it, and not the open call's frame (whose outputs it would otherwise record as its own).
#: Shared and never changed: ``take`` is False, so the post-hook writes nothing for it.
_MUTED = _Frame(CallKey(-1, -1, "", -1), take=False)


@dataclass(slots=True)
class _StepState:
    """What one step accumulates: created when the step starts, dropped when it ends."""

    logging: bool  # whether config.log_step_ids selects this step
    counters: dict[str, int] = field(default_factory=dict)  # module name -> calls started so far
    frames: dict[str, list[_Frame]] = field(default_factory=dict)  # module name -> calls in progress
    starts: list[CallKey] = field(default_factory=list)  # selected calls, in start order
    ends: list[CallKey] = field(default_factory=list)  # selected calls, in end order
    open: list[_Frame] = field(default_factory=list)  # selected calls in progress (replay: containers)
    fired: bool = False  # some hooked module ran in this step
    graph_breaks: int = -1  # torch.compile's count of graph breaks at disabled functions when the step began


def _agree_run_id(config: Config) -> Config:
    """All ranks use rank 0's run id (each rank may have generated its own UUID)."""
    box = [config.run_id]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] == config.run_id:
        return config
    return load_config(config, run_id=box[0])


#: With ``async_writes: true`` and a writer that borrows bodies, write a record with stored bodies
#: from the model's own CPU tensors before the hook returns whenever nothing is queued for the
#: writer thread (:meth:`ThreadedSink.write_lent`: no snapshot, no second pass over the bytes;
#: turned off for the run when those writes are slow, e.g. a disk that throttles its writers).
_ASYNC_LENDS = True

#: The manifest's ``"warnings"`` (:meth:`Capture._manifest_warnings`): at most this many lines,
#: naming at most :data:`_HOOKLESS_SHOWN` of the steps in which no hooked module ran.
_WARNINGS_KEPT = 20
_HOOKLESS_SHOWN = 10


def _tensor_policy(config: Config) -> TensorPolicy:
    return TensorPolicy(store_bodies=config.mode == "tensors", max_numel=config.max_tensor_size,
                        device_ok=config.logs_device)


def _opaque(hook: Any, skip_in_graph: bool = False) -> Any:
    """The hook as torch.compile sees it: one opaque call, never traced.

    Inside a compiled region dynamo would otherwise trace ilstore's own bookkeeping, guard on it
    (a recompilation per module name and call counter) and break graphs wherever it meets
    something untraceable. Disabled, each hook is a graph break that runs eagerly on the values
    the compiled pieces computed. With ``skip_in_graph`` (compilers that allow no graph break,
    e.g. vLLM's ``fullgraph=True``), a traced hook does nothing at all instead, so calls inside
    compiled regions are not recorded (as with CUDA graph replays).

    Every hook goes through one disabled function (:func:`_eager_caller`), made once per process:
    ``torch.compiler.disable`` of each hook cost ~10-30 us per hook at every capture's set-up
    (a model of a hundred modules: a few ms).
    """
    if "torch._dynamo" not in sys.modules:
        # Nobody has compiled anything yet: importing dynamo only to wrap the hooks would add a
        # second or more to every capture's set-up. Attach the capture after torch.compile(...)
        # (docs/capture.md); Capture warns when dynamo appears later.
        return hook
    eager = _eager_caller()
    callback = _eval_frame_callback()

    def step_aside(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced (dynamo answers True): a graph break, or nothing with skip
            return None if skip_in_graph else eager(hook, *args, **kwargs)
        # Run eagerly. Outside any compiled code dynamo evaluates no frame and the hook needs no
        # hiding: called directly, it skips disable's wrapper (~5 us a call with cold caches).
        # Inside a compiled function's eager parts dynamo would compile the hook's frames.
        if callback is not None and callback() is None:
            return hook(*args, **kwargs)
        return eager(hook, *args, **kwargs)

    return step_aside


def _call(hook: Any, *args: Any, **kwargs: Any) -> Any:
    """``hook(*args, **kwargs)``: what :func:`_eager_caller` disables."""
    return hook(*args, **kwargs)


#: :func:`_call` disabled for dynamo (recursively: nothing it calls is compiled), made at the first
#: :func:`_opaque` that needs it.
_EAGER: Any = None


def _eager_caller() -> Any:
    """``torch.compiler.disable(_call, recursive=True)``, made once (two threads making it at
    once make two equivalent ones)."""
    global _EAGER
    eager = _EAGER
    if eager is None:
        eager = _EAGER = torch.compiler.disable(_call, recursive=True)
    return eager


def _eval_frame_callback() -> Any:
    """torch's getter of dynamo's frame-evaluation callback (None: no dynamo frame evaluation is
    active), or None when this torch has none."""
    getter = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", None)
    return getter if callable(getter) else None


_DISABLED_BREAK = "torch.compiler.disable"


def _hook_graph_breaks() -> int:
    """How many graph breaks at disabled functions torch.compile has counted so far (-1: dynamo not loaded)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return -1
    breaks = utils.counters.get("graph_break", {})
    return sum(n for reason, n in breaks.items() if _DISABLED_BREAK in reason)


def _hooks_unguarded() -> bool:
    """Whether compiled code can hide new hooks: dynamo is loaded (an eager process imports
    nothing here) and reuses the code it compiled without checking the modules' hooks (torch's
    default ``torch._dynamo.config.skip_nnmodule_hook_guards = True``; with ``False`` it
    recompiles when they change). Then a capture attached after a compiled forward would record
    nothing unless that code is discarded (:meth:`Capture._discard_compiled_code`)."""
    if "torch._dynamo" not in sys.modules:
        return False
    config = sys.modules.get("torch._dynamo.config")
    return not (config is not None and getattr(config, "skip_nnmodule_hook_guards", True) is False)


def _compiled_forwards(model: nn.Module) -> dict[Any, str] | None:
    """The ``forward`` code objects of ``model``'s modules (each class once) that dynamo holds
    compiled code for, with the code dynamo made to resume them after graph breaks (which it
    reuses when it recompiles the forward), each with the name of a module it belongs to; None
    where this torch does not tell (its private cache API changed)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries
        from torch._dynamo.resume_execution import ContinueExecutionCache

        resumes = ContinueExecutionCache.cache
    except Exception:  # noqa: BLE001 - another torch
        return None
    found: dict[Any, str] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        code = getattr(getattr(type(module), "forward", None), "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        try:
            if not entries(code):
                continue
            stack = [code]
            while stack:  # the forward, then its resume functions (and theirs)
                here = stack.pop()
                if here not in found:
                    found[here] = name or "the model"
                    stack.extend((resumes.get(here) or {}).values())
        except Exception:  # noqa: BLE001
            return None
    return found


def _discard(codes: dict[Any, str]) -> None:
    """Discard dynamo's compiled code of ``codes``: they are compiled again at their next call."""
    from torch._C._dynamo.eval_frame import reset_code

    for code in codes:
        reset_code(code)


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper or was compiled in place (``module.compile()``)."""
    return isinstance(getattr(module, "_orig_mod", None), nn.Module) or \
        getattr(module, "_compiled_call_impl", None) is not None


def model_info(model: nn.Module) -> dict[str, str]:
    """What the manifest records about the model: its class and architecture name.

    The architecture is the Hugging Face config's first ``architectures`` entry when the model
    has one, else the class name (vLLM's model classes carry Hugging Face's names); the class's
    module tells engines apart (``transformers.models...`` vs ``vllm.model_executor...``).
    """
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):  # torch.compile's wrapper
        model = orig
    cls = type(model)
    archs = getattr(getattr(model, "config", None), "architectures", None)
    arch = archs[0] if isinstance(archs, (list, tuple)) and archs and isinstance(archs[0], str) else cls.__name__
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "architecture": arch}


#: The file of torch's module call machinery (``Module._call_impl`` and its ``inner``): a frame of
#: it stays on the stack for the whole of the call whose hooks it runs (see :func:`_call_frame`).
_CALL_FILE = nn.Module._call_impl.__code__.co_filename
_CALL_FRAME_SEARCH = 32  # frames looked through above a root pre-hook for it


def _call_frame(skip: int) -> Any:
    """The frame of torch's call machinery that runs the hook calling this (``skip`` frames up:
    the hook itself and ilstore's own wrappers are passed over), or None when none is near.

    That frame is on the stack from the root's pre-hooks until its forward hooks, and gone once
    the call has ended, returned or raised: :meth:`Capture._root_call_gone` looks for it."""
    try:
        frame: Any = sys._getframe(skip + 1)
    except ValueError:
        return None
    for _ in range(_CALL_FRAME_SEARCH):
        if frame is None:
            return None
        if frame.f_code.co_filename == _CALL_FILE:
            return frame
        frame = frame.f_back
    return None


def _rng_devices() -> set[torch.device]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {torch.device("cuda", torch.cuda.current_device())}
    return set()


def _dist_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Capture:
    """A capture attached to one model; use :func:`capture` to create it.

    Attributes:
        config: the resolved :class:`~ilstore.config.Config`.
        model: the root module.
        manual_step: steps advance only on :meth:`step`.
        run_dir: the run directory, or None when capture is disabled.
        step_index: the current step (advances on every root forward, logged or not, or on
            every :meth:`step` call in manual mode).
        rank, world_size: this process's place under ``torch.distributed`` (0 and 1 outside
            it, and when capture is disabled).
        hooked_modules: names of the modules that have hooks.
        error: what stopped the capture (``on_error: "warn"``), or None.

    A root forward interrupted by Ctrl-C (``KeyboardInterrupt``; also ``SystemExit``: torch runs
    the forward hooks that end a step after an ``Exception`` only) is treated as a forward that
    raised, once the capture sees it, at the next root forward or at :meth:`close`: its step is
    abandoned (no completed step; listed as incomplete when records of it were written) and
    ``step_index`` moves past it, so the next forward is a step of its own. A forward that began
    paused and was interrupted no longer holds the capture paused.
    """

    def __init__(self, model: nn.Module, config: Any = None, *, manual_step: bool = False,
                 in_compiled: str = "break") -> None:
        self.config: Config = load_config(config)
        self.model = model
        self.manual_step = manual_step
        if in_compiled not in ("break", "skip"):
            raise ValueError(f"in_compiled must be 'break' or 'skip', got {in_compiled!r}")
        self._skip_in_graph = in_compiled == "skip"
        self._opaque_hooks = "torch._dynamo" in sys.modules  # see _opaque
        self.step_index = 0
        self.run_dir: Path | None = None
        self.rank, self.world_size = 0, 1
        self.hooked_modules: list[str] = []
        self.error: Exception | None = None
        self._policy = _tensor_policy(self.config)
        self._lend_policy: TensorPolicy | None = None  # async writes: the policy of a lent record
        self._handles: list[Any] = []
        self._sink: RecordSink | None = None
        self._dedup: Deduper | None = None
        self._closed = False
        self._paused = False
        self._paused_roots = 0  # nesting depth of root forwards that began paused (not steps)
        self._ran_paused = False  # a hooked module ran paused in this step: hooks do fire (_warn_no_hooks)
        self._forked_from: int | None = None  # the parent's pid, in a forked child (see _orphan)
        self._inherited: Any = None  # in a forked child: the parent's sink, kept and never used
        self._fork_warned = False
        self._parent_pid = os.getpid()
        self._in_root = 0  # nesting depth of root forwards (automatic steps)
        # The outermost root forward in progress (began or paused): the frame of torch's call
        # machinery running it, to tell a root forward interrupted by Ctrl-C (its forward hooks
        # never ran) from a nested one (see _root_pre). None: none in progress, or not known.
        self._root_call: Any = None
        self._root_thread: int | None = None  # the thread whose stack holds _root_call
        self._stray_warned = False
        self._compile_warned = False
        # What the capture warned about, kept for the run's manifest ("warnings", _manifest_warnings):
        # each distinct message once, and the steps that ended with no hooked module run.
        self._warnings: list[str] = []
        self._hookless_steps: list[int] = []
        self._hookless_count = 0
        # Compiled models (see _discard_compiled_code): whether compiled code could hide the hooks
        # (then the model's is discarded again at close), forwards of the torch.compile wrapper
        # seen while recording, and whether any of this capture's hooks ran at all.
        self._watch_compiled = False
        self._compiled_calls = 0
        self._hooks_ran = False
        self._step: _StepState | None = None  # the open step, if any
        self._replay: ReplaySource | None = None
        self._in_graph: InGraph | None = None  # config in_graph: the traced hooks (ilstore.in_graph)
        self._layouts: dict[str, ModuleLayout] = {}  # module name -> its parallel layout rules (ilstore.layout)
        # mode "stats": statistics of device tensors read back once per step (ilstore.device_stats);
        # the records waiting for them, in order, handed to the writer once they are filled
        self._deferred: DeferredStats | None = None
        self._held: list[Any] = []
        self._held_resolves = 0  # DeferredStats.resolves when the last held record was held
        if not self.config.enabled:
            return
        cfg = self.config
        backend = get_backend(cfg.backend)  # load_config validated the name and options
        self.rank, self.world_size = _dist_info()
        if self.world_size > 1:
            cfg = self.config = _agree_run_id(cfg)
            if cfg.dedup:
                # Collectives (all_reduce, broadcast, ...) change tensors in place without bumping
                # their version counter: a layer's all-reduced output would be stored as the partial
                # sum its submodule returned (tests/test_multirank.py). The manifest's config says so.
                _log.info("ilstore: de-duplication is off under torch.distributed (world size %d): collectives "
                          "change tensors in place without bumping their version counter", self.world_size)
                cfg = self.config = load_config(cfg, dedup=False)
        self.run_dir = cfg.run_dir
        # One process writes the documented tree at the run directory's top; under
        # torch.distributed each rank writes its own sub-run, rank_<r>/, so nothing collides.
        rank_dir = rank_run_dir(self.run_dir, self.rank, self.world_size)
        if (rank_dir / MANIFEST_NAME).exists():
            raise StoreError(f"{self.run_dir}: a run already exists there; choose another run_id or output_dir "
                             "(ilstore never overwrites a run)")
        if not self._policy.store_bodies:  # a bad ILSTORE_DEVICE_STATS_BYTES fails here, before anything is written
            self._deferred = DeferredStats()
            if self._deferred.limit > 0:
                self._policy = replace(self._policy, deferred=self._deferred)
        if cfg.replay_from is not None:  # a bad reference fails here, before anything is written
            self._replay = open_reference(cfg.replay_from, open_run)
        writer = None
        try:
            writer = backend.writer(rank_dir, cfg.backend_options)
            manifest = new_manifest(backend.name, cfg.to_dict(), rank=self.rank, world_size=self.world_size)
            manifest["model"] = model_info(model)
            if self._replay is not None:
                manifest["replayed_from"] = self._replay.describe()
            try:
                if self.world_size > 1 and self.rank == 0:
                    write_ranks_manifest(self.run_dir, backend=backend.name, world_size=self.world_size,
                                         config=cfg.to_dict())
                writer.open(manifest)
            except OSError as exc:
                error = StoreError(f"{self.run_dir}: cannot create the run directory: {exc}")
                self._discard_setup(writer, error)
                self._fail(error)
                return
            # Compiled code reuses its buffers in place without bumping version counters, so a
            # tensor's identity says nothing there: in_graph runs are never de-duplicated.
            self._dedup = Deduper() if cfg.dedup and not cfg.in_graph else None
            if cfg.in_graph:
                from .in_graph import InGraph

                self._in_graph = InGraph(self)
                self._opaque_hooks = True  # nothing to warn about: the hooks are meant to be traced
            if cfg.async_writes:
                self._sink = ThreadedSink(writer, int(cfg.max_pending_mb * 2**20))
                if _ASYNC_LENDS and getattr(writer, "borrows_bodies", False) is True and self._policy.store_bodies:
                    # while nothing is queued, a record is written from the model's own CPU
                    # tensors before the hook returns (ThreadedSink.write_lent)
                    self._lend_policy = replace(self._policy, borrow=True)
                    self._sink.lending = True
            else:
                self._sink = SyncSink(writer)
                if getattr(writer, "borrows_bodies", False) is True:  # written inline, before the hook returns
                    self._policy = replace(self._policy, borrow=True)
                    writer.lent = True
            _WRITING.add(self)
            self._attach()
        except BaseException as exc:
            self._discard_setup(writer, exc)
            raise

    def _discard_setup(self, writer: Any, exc: BaseException) -> None:
        """The capture could not be set up (a module that takes no hooks, e.g. a ScriptModule;
        a run directory that cannot be written; Ctrl-C): leave nothing behind. The hooks
        attached so far are removed, and the run's files that are open (step journal,
        statistics table, the reference of a replay) are closed: the run, if its manifest
        could be written, is closed as ``failed`` with the error. Nothing is raised from here."""
        if self._closed:
            return
        self._closed = True
        _WRITING.discard(self)
        self._detach()
        self._record_warnings(writer)  # (those given before the set-up failed)
        sink, self._sink = self._sink, None
        try:
            if sink is not None:
                sink.close("failed", error=f"{type(exc).__name__}: {exc}")
            elif writer is not None:
                writer.close("failed", f"{type(exc).__name__}: {exc}")
        except Exception as close_exc:  # e.g. the directory it could not create: nothing to close
            _log.debug("ilstore: closing the run %s after a failed set-up: %s", self.run_dir, close_exc)
        self._close_parts()

    def _close_parts(self) -> None:
        """Close what the capture holds besides its sink: the in_graph taps, the replay reference,
        the device buffer of deferred statistics."""
        if self._deferred is not None:
            self._deferred.release()
        in_graph, self._in_graph = self._in_graph, None
        replay, self._replay = self._replay, None
        try:
            if in_graph is not None:
                in_graph.close()
        finally:
            if replay is not None:
                replay.close()

    # -- hook management --------------------------------------------------------------------
    def _attach(self) -> None:
        model = self.model
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):  # torch.compile's wrapper: hook the eager model, under its names
            model = orig
        has_children = next(model.children(), None) is not None
        root = self.config.capture_root if self.config.capture_root is not None else not has_children
        for name, module in model.named_modules():
            name = _encodable(name)  # a lone surrogate (add_module("m\ud800")): no backend writes it
            if module is model:
                if not root:
                    continue
                selected: frozenset[int] | None = None  # the root's own calls: every one, under the name ""
            elif not self.config.module_may_match(name):
                continue
            else:
                selected = self.config.selected_calls(name)
                if selected is not None and not selected:
                    continue
            skip = self._skip_in_graph
            if self._in_graph is not None:  # traced into compiled graphs (ilstore.in_graph)
                pre, post = self._in_graph.pre_hook(name, selected), self._in_graph.post_hook(name)
            else:
                pre, post = _opaque(partial(self._pre, name, selected), skip), _opaque(partial(self._post, name), skip)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
            self.hooked_modules.append(name)
            rules = module_layout(module)
            if rules is not None:
                self._layouts[name] = rules
        if not self.hooked_modules:
            if self.config.module_call_match is not None and has_children:
                why = f"module_call_match {list(self.config.module_call_match)} matches no module of the model"
            else:
                why = "the model has no submodules and capture_root is false"
            self._warn(f"ilstore: {why}; nothing will be captured", stacklevel=3)
        if not self.manual_step:
            # The step opens before the root's own capture hook (prepend) and ends after it.
            skip = self._skip_in_graph
            if self._in_graph is not None:
                root_pre, root_post = self._in_graph.root_hooks()
            else:
                root_pre, root_post = _opaque(self._root_pre, skip), _opaque(self._root_post, skip)
            self._handles.append(model.register_forward_pre_hook(root_pre, prepend=True))
            self._handles.append(model.register_forward_hook(root_post, always_call=True))
        if model is not self.model:
            # The wrapper's own hooks run eagerly, around the compiled code: they count its
            # forwards, so a capture whose hooks never fire inside does not close silently.
            self._handles.append(self.model.register_forward_pre_hook(_opaque(self._count_compiled_call, True)))
        self._discard_compiled_code()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _discard_compiled_code(self) -> None:
        """At attach: let the new hooks take effect in code torch.compile compiled before them.

        With torch's default ``torch._dynamo.config.skip_nnmodule_hook_guards = True`` dynamo
        does not check a module's hooks before it reuses compiled code: a model (or a submodule,
        or the model inside a ``torch.compile`` wrapper) that already ran compiled keeps running
        the code compiled without ilstore's hooks, and the capture would record nothing. So the
        code dynamo compiled for the ``forward`` of the model's modules (and what resumes them
        after graph breaks) is discarded, with a warning, and compiled again at the next forward,
        hooks included; other compiled code of the process is left alone. Where this torch's
        cache cannot be read, a model holding a compiled module gets ``torch.compiler.reset()``
        (all of the process's compiled code). Nothing is done for an eager process (dynamo not
        loaded), for a model dynamo compiled nothing for, or when dynamo guards on hooks.
        """
        self._watch_compiled = _hooks_unguarded()
        if self._watch_compiled:
            self._discard_model_code(
                "ilstore: torch.compile compiled this model's code before the capture attached (%s), and dynamo does "
                "not check hooks before reusing it (torch._dynamo.config.skip_nnmodule_hook_guards): it would run "
                "without the capture's hooks and record nothing. ilstore discards it (%s): it is recompiled at its "
                "next forward, hooks included (run %s)", logging.WARNING)

    def _discard_capture_code(self) -> None:
        """At close: drop the code torch.compile compiled for the model with this capture's hooks
        in it (their graph breaks or taps), so the model runs the code it runs without capture
        again, and a later capture records (see :meth:`_discard_compiled_code`). Logged; never raises."""
        watch, self._watch_compiled = self._watch_compiled, False
        if watch and not torch.compiler.is_compiling():
            self._discard_model_code(
                "ilstore: discarding the code torch.compile compiled with the hooks of the capture (%s; %s): the "
                "model is recompiled without them at its next forward (run %s)", logging.INFO)

    def _discard_model_code(self, message: str, level: int) -> None:
        try:
            codes = _compiled_forwards(self.model)
            if codes is None:  # this torch's cache cannot be read: all of it, if the model is compiled
                compiled = [name or "the model" for name, m in self.model.named_modules() if _is_compiled(m)]
                if compiled:
                    _log.log(level, message, "compiled: " + ", ".join(compiled[:3]),
                             "torch.compiler.reset(), all compiled code of the process", self.run_dir)
                    torch.compiler.reset()
            elif codes:
                names = list(dict.fromkeys(codes.values()))
                _log.log(level, message, "the forward of " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""),
                         "that code only", self.run_dir)
                _discard(codes)
        except Exception as exc:  # never stop the model for this; _warn_hooks_never_ran reports what it misses
            _log.warning("ilstore: could not discard the compiled code of the model: %s", exc)

    def _count_compiled_call(self, module: nn.Module, args: Any) -> None:
        """Pre-hook of the ``torch.compile`` wrapper (eager, around the compiled code)."""
        if not (self._closed or self._paused):
            self._compiled_calls += 1

    def _warn_hooks_never_ran(self) -> None:
        """At close: the compiled model ran and none of the capture's hooks did."""
        if self._compiled_calls and not self._hooks_ran and self.hooked_modules and self._forked_from is None:
            self._warn(f"ilstore: the compiled model ran {self._compiled_calls} forward(s) during the capture and "
                       "none of the capture's hooks fired: it ran code compiled without them, and nothing of those "
                       f"forwards was recorded in run {self.run_dir}. Attach the capture before the first compiled "
                       "forward, or set torch._dynamo.config.skip_nnmodule_hook_guards = False "
                       "(docs/compiled.md).", stacklevel=3)

    # -- what the run says it missed -----------------------------------------------------------
    def _warn(self, message: str, stacklevel: int) -> None:
        """Warn (:class:`~ilstore.errors.IlstoreWarning`, ``stacklevel`` as the caller's own) and keep
        ``message`` for the run's manifest."""
        warnings.warn(message, IlstoreWarning, stacklevel=stacklevel + 1)
        self._keep_warning(message)

    def _keep_warning(self, message: str) -> None:
        """Keep ``message`` for the run's manifest (``"warnings"``) without warning again (an
        integration that warned before the capture existed); each distinct message once."""
        message = message.removeprefix("ilstore: ")
        if message not in self._warnings:
            self._warnings.append(message)

    def _manifest_warnings(self) -> list[str]:
        """The manifest's ``"warnings"``: what the capture warned about that bears on what the run
        holds, in order, at most :data:`_WARNINGS_KEPT` (then a line counting the rest)."""
        said = list(self._warnings)
        if self._hookless_count:
            shown = ", ".join(map(str, self._hookless_steps))
            more = f", ... ({self._hookless_count} in all)" if self._hookless_count > len(self._hookless_steps) else ""
            said.append(f"no hooked module ran in {self._hookless_count} step(s) ({shown}{more}): nothing of them was "
                        "recorded; the model may run compiled or in CUDA graphs, where hooks do not fire")
        if len(said) > _WARNINGS_KEPT:
            said = said[:_WARNINGS_KEPT - 1] + [f"... and {len(said) - _WARNINGS_KEPT + 1} more warning(s), in the "
                                                "capturing process's output"]
        return said

    def _record_warnings(self, writer: Any = None) -> None:
        """Put :meth:`_manifest_warnings` in the manifest the writer (the sink's, else ``writer``)
        writes at close (when any)."""
        said = self._manifest_warnings()
        writer = self._sink.writer if self._sink is not None else writer
        if said and writer is not None:
            writer.manifest["warnings"] = said  # (the writer saves its manifest at close only)

    # -- steps --------------------------------------------------------------------------------
    def _begin_step(self) -> _StepState:
        step = self._step = _StepState(self.config.logs_step(self.step_index))
        self._ran_paused = False
        step.graph_breaks = _hook_graph_breaks()
        if not self._opaque_hooks and "torch._dynamo" in sys.modules and not torch.compiler.is_compiling():
            self._opaque_hooks = True  # warn once
            self._warn("ilstore: torch.compile was first used after this capture was attached, so its hooks are "
                       "not opaque to dynamo: a compiled forward traces ilstore's own code (recompilations, "
                       "slow compiles). Attach the capture after calling torch.compile(...).", stacklevel=4)
        return step

    def _warn_graph_breaks(self, step: _StepState) -> None:
        """torch.compile compiled this step with ilstore's hooks in it: say what that cost, once."""
        if self._compile_warned or step.graph_breaks < 0:
            return
        added = _hook_graph_breaks() - step.graph_breaks
        if added > 0:
            self._compile_warned = True
            self._warn(f"ilstore: torch.compile split the model's graphs at ilstore's hooks {added} time(s) while "
                       f"compiling step {self.step_index}: each hooked call runs outside the compiled graphs "
                       "(fewer fusions, more compiled pieces). The values recorded are those the compiled "
                       "pieces computed. Hook fewer modules (module_call_match) to split less.", stacklevel=4)

    def _end_step(self, completed: bool = True) -> None:
        """Close the open step: hand it to the writer, or (a forward that raised) abandon it."""
        step = self._step
        if step is None:
            return
        self._step = None
        self._warn_graph_breaks(step)
        if self._dedup is not None:
            self._dedup.clear()
        if self._replay is not None:
            self._replay.end_step()
        if self._held:
            self._release_held()
        if completed and step.logging and self._sink is not None:
            self._sink.end_step(StepInfo(self.step_index, step.starts, step.ends))
            if not step.fired:
                self._warn_no_hooks()

    def _warn_no_hooks(self, say: bool = True) -> None:
        """The step ends and no hooked module ran in it: warn (``say``) and count it for the manifest."""
        # Paused, or hooks ran paused in this step: they do fire, the capture was told not to record.
        if self.hooked_modules and not self._paused and not self._ran_paused:
            if say:
                warnings.warn(f"ilstore: step {self.step_index} ended and no hooked module ran; the model may run "
                              "compiled or in CUDA graphs, where hooks do not fire", IlstoreWarning, stacklevel=3)
            self._hookless_count += 1  # for the manifest: one line for them all (_manifest_warnings)
            if len(self._hookless_steps) < _HOOKLESS_SHOWN:
                self._hookless_steps.append(self.step_index)

    def _root_pre(self, module: nn.Module | None, args: Any) -> None:
        self._hooks_ran = True
        if (self._in_root or self._paused_roots) and self._root_call_gone():
            self._end_interrupted_root()  # the last root forward never returned: this one is not nested in it
        if self._paused_roots or (self._paused and self._in_root == 0):
            # A forward that began paused (a warm-up run) is not a step: not logged, not counted.
            # A step that calls made outside a forward opened stays open for the next forward.
            if not self._paused_roots and module is not None:
                self._root_call, self._root_thread = _call_frame(1), threading.get_ident()
            self._paused_roots += 1
            if self._forked_from is not None:
                self._warn_forked()
            return
        if self._in_root == 0:
            if self._step is None:  # else: calls made outside a forward opened it
                self._begin_step()
            if module is not None:  # a hook (in_graph delivers its markers with None: not known)
                self._root_call, self._root_thread = _call_frame(1), threading.get_ident()
        self._in_root += 1

    def _root_call_gone(self) -> bool:
        """Whether the root forward in progress has ended without its forward hooks running.

        torch runs ``always_call`` forward hooks when the forward raises an ``Exception``, not
        when a ``BaseException`` passes through it (``KeyboardInterrupt`` from Ctrl-C,
        ``SystemExit``; ``Module._call_impl`` catches ``Exception``): such a forward leaves the
        capture inside it. Its call frame (:func:`_call_frame`) is then no longer on the stack;
        a nested root forward runs above it. Walks the stack, so only called when a root
        forward is in progress (nested root forwards are rare). Unknown frame: False (nested).

        The frame is looked for on the stack of the thread that began the call: a root forward
        that another thread runs meanwhile (a model called from two threads at once) is nested
        in it, as before, while that thread is still inside the call.
        """
        frame = self._root_call
        if frame is None:
            return False
        f: Any
        if self._root_thread == threading.get_ident():
            f = sys._getframe(1)
        else:
            f = sys._current_frames().get(self._root_thread) if self._root_thread is not None else None
        while f is not None:
            if f is frame:
                return False
            f = f.f_back
        return True

    def _end_interrupted_root(self) -> None:
        """The root forward in progress was interrupted (Ctrl-C inside it, see
        :meth:`_root_call_gone`): end it as its forward hooks would have for a forward that
        raised. Its step is abandoned: never handed to the writer as ended, so it is no
        completed step (readers list it under ``incomplete_steps()`` when records of it were
        written, as the step of a forward that raised an exception; a crash-safe journal line is
        written only for completed steps), and the step counter advances past it: the next root
        forward is the next step. A forward that began paused ends, still no step."""
        self._root_call = None
        if self._paused_roots:
            self._paused_roots = 0
            return
        self._in_root = 0
        if self._step is not None:
            try:
                self._end_step(completed=False)
            except Exception as exc:
                self._fail(exc)
            finally:  # (Ctrl-C again while its statistics were read back: still over)
                self.step_index += 1

    def _root_post(self, module: nn.Module | None, args: Any, output: Any) -> None:
        if self._paused_roots:
            self._paused_roots -= 1
            if not self._paused_roots:
                self._root_call = None
            return
        self._in_root = max(0, self._in_root - 1)
        if self._in_root == 0:
            self._root_call = None
        if self._in_root == 0 and self._step is not None:
            # A forward that raised (always_call hooks run while the exception is handled)
            # abandons its step: never marked complete, its partial data ignored by readers.
            raised = output is None and sys.exc_info()[0] is not None
            try:
                self._end_step(completed=not raised)
            except Exception as exc:
                self._fail(exc)
            finally:  # also past Ctrl-C while the step's statistics were read back: the step is over
                self.step_index += 1

    # -- failures -------------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        """Capture could not write (disk full, unwritable directory, a bug): stop capturing.

        Either way the hooks are removed, the run is closed as ``failed`` with the error and
        everything already written stays (:attr:`error` keeps the first failure; a later
        :meth:`close` changes nothing). With the default ``on_error: "warn"`` the model keeps
        running untouched and one error is logged; with ``"raise"`` the exception then
        propagates into the model's forward.
        """
        if self.error is None:
            self.error = exc
            if self.config.on_error != "raise":
                _log.error("ilstore: capture stopped at step %d, the model keeps running: %s (run %s)",
                           self.step_index, exc, self.run_dir)
            self._stop(exc)
        if self.config.on_error == "raise":
            if isinstance(exc, IlstoreError):
                raise exc
            raise WriterFailed(f"{self.run_dir}: capture failed at step {self.step_index}: {exc}") from exc

    def _stop(self, exc: Exception) -> None:
        """The rest of :meth:`_fail`: detach, close the run as ``failed``, release the reference.
        Paused for good: calls that reach the capture without a hook (an engine's
        ``record_call``) record nothing more."""
        self._detach()
        self._paused = True
        self._step = None
        self._root_call = None
        self._closed = True
        _WRITING.discard(self)
        if self._sink is not None:
            if self._held:
                try:
                    self._release_held()
                except Exception as held_exc:  # the device or the writer failed
                    _log.error("ilstore: %d record(s) of the last step waiting for their statistics could not be "
                               "written: %s", len(self._held), held_exc)
                    self._held = []
                    if self._deferred is not None:
                        self._deferred.discard()
            self._record_warnings()
            try:
                self._sink.close("failed", error=str(exc))
            except Exception as close_exc:  # the disk may still be full
                if close_exc.__cause__ is None or close_exc.__cause__ is not exc.__cause__:
                    # (not the writer's failure that stopped the capture, raised again by the
                    # sink once it had written the manifest as failed)
                    _log.error("ilstore: could not finalise the run manifest: %s", close_exc)
        try:
            self._close_parts()
        except Exception as close_exc:
            _log.error("ilstore: could not close the replay reference: %s", close_exc)

    def step(self) -> int:
        """Manual stepping: end the current step and start the next; returns the new index.

        Raises:
            StoreError: when the capture was not created with ``manual_step=True`` (steps then
                follow root forwards).
        """
        if not self.manual_step:
            raise StoreError("step() is for manual stepping; create the capture with manual_step=True "
                             "(otherwise every forward of the root module is one step)")
        if self._closed:  # (failed, or closed): the steps go on uncaptured
            self.step_index += 1
            return self.step_index
        if self._step is None and self._sink is not None and self.config.logs_step(self.step_index):
            self._warn_no_hooks()  # manual steps open at the first hook: none ran in this one
        try:
            self._end_step()
        except Exception as exc:
            self._fail(exc)
        finally:  # also past Ctrl-C while the step's statistics were read back: the step is over
            self._ran_paused = False
            self.step_index += 1
        return self.step_index

    # -- hooks --------------------------------------------------------------------------------
    def _write(self, call: CallKey, kind: str, value: Any, kwargs: Any = None,
               replay: dict[str, Any] | None = None) -> None:
        assert self._sink is not None
        known = self._replay.known_stats if self._replay is not None else None
        sink, lend = self._sink, self._lend_policy
        lent = lend is not None and sink.lends()
        policy = lend if lend is not None and lent else self._policy
        record = build_record(call, kind, value, policy, kwargs, self._dedup, known)
        rules = self._layouts.get(call.module)
        if rules is not None:
            rules.apply(kind, record.tensor_nodes(), self.rank, self.world_size)
        if replay is not None and isinstance(record.structure, dict):
            record.structure["replay"] = replay  # the call's replay metadata (docs/replay.md)
        deferred = self._deferred
        if deferred is not None and (deferred.unresolved or self._held):
            if self._held and deferred.resolves != self._held_resolves:
                # read back since the last of them was held (a stash filled up): they are complete
                self._write_held()
            if deferred.unresolved:  # statistics pending: held, in order, until read back
                self._held.append(record)
                self._held_resolves = deferred.resolves
                return
        if lent:
            sink.write_lent(record)
        else:
            sink.write(record)

    def _release_held(self) -> None:
        """Read back the statistics still pending (one synchronisation per device) and hand the
        records held for them to the writer, in order."""
        if self._deferred is not None:
            self._deferred.resolve()  # raises: the records stay held (and a failing capture drops them)
        self._write_held()

    def _write_held(self) -> None:
        """Hand the held records, complete, to the writer, in order."""
        held, self._held = self._held, []
        assert self._sink is not None
        for record in held:
            self._sink.write(record)

    def pause(self) -> None:
        """Stop recording until :meth:`resume`; calls in between are neither logged nor counted.

        For engines that run the model outside real steps (memory profiling, warm-up): pause
        capture around those runs. The hooks stay attached and return at once.
        """
        self._paused = True

    def resume(self) -> None:
        """Record again after :meth:`pause` (not in a process forked from the capturing one: see
        :meth:`_orphan`)."""
        if self._forked_from is not None:
            self._warn_forked()
            return
        if self._closed:  # a closed (or failed) capture records nothing more
            return
        self._paused = False

    def _orphan(self) -> None:
        """In a forked child (:func:`_forked_child`): stop for good, writing nothing; the parent
        still writes and closes the run. The model keeps running untouched (hooks return at once)."""
        if self._closed or self._sink is None:
            return
        self._forked_from = self._parent_pid
        self._inherited, self._sink = self._sink, None  # no step end, flush or close reaches it
        try:
            self._inherited.writer.forked()  # nothing of it reaches the run when this process ends
        except Exception as exc:  # never raised into the fork
            _log.warning("ilstore: in the forked process %d, the run %s may be touched at its exit: %s",
                         os.getpid(), self.run_dir, exc)
        self._paused, self._step, self._in_root, self._paused_roots, self._root_call = True, None, 0, 0, None

    def _warn_forked(self) -> None:
        if not self._fork_warned:
            self._fork_warned = True
            warnings.warn(f"ilstore: this process ({os.getpid()}) was forked from the one capturing run "
                          f"{self.run_dir} (pid {self._forked_from}); the capture records nothing here and the run is "
                          "written and closed by that process. To capture in this process, attach a capture "
                          "here (a run_id of its own).", IlstoreWarning, stacklevel=3)

    @property
    def paused(self) -> bool:
        return self._paused

    def _pre(self, name: str, selected: frozenset[int] | None, module: nn.Module, args: Any,
             kwargs: Any) -> tuple[Any, Any] | None:
        self._hooks_ran = True
        if self._paused or self._paused_roots:  # a forward that began paused stays unrecorded to its end
            if self._forked_from is not None:
                self._warn_forked()
            else:
                self._ran_paused = True
                step = self._step
                if step is not None:
                    stack = step.frames.get(name)
                    if stack:  # a call of this module is open: this call's post-hook pops _MUTED, not its frame
                        stack.append(_MUTED)
            return None
        try:
            return self._pre_impl(name, selected, args, kwargs)
        except Exception as exc:
            self._fail(exc)
            return None

    def _post(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any,
              post_inputs: tuple[Any, Any] | None = None) -> None:
        if self._paused or self._paused_roots:
            step = self._step
            if step is not None:
                self._cut(step, name)
            return
        try:
            self._post_impl(name, output, post_inputs)
        except Exception as exc:
            self._fail(exc)

    def _pre_impl(self, name: str, selected: frozenset[int] | None, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        step = self._step
        if step is None:
            if not self.manual_step and self.config.calls_outside_forward == "ignore":
                if not self._stray_warned:
                    self._stray_warned = True
                    self._warn(f"ilstore: {name} was called outside a forward of the root module; such calls are "
                               "not logged (calls_outside_forward: ignore)", stacklevel=2)
                return None
            # Manual stepping: the step opens at its first call. Automatic stepping: a call made
            # outside any root forward (the encoder generate() runs itself) opens the step that
            # the next root forward continues and ends.
            step = self._begin_step()
        step.fired = True
        if not step.logging:
            return None
        idx = step.counters.get(name, 0)
        step.counters[name] = idx + 1
        call = CallKey(self.rank, self.step_index, name, idx)
        take = selected is None or idx in selected
        frame = _Frame(call, take)
        fed = None
        if take:
            if self._replay is not None:
                fed = self._replay_call(step, frame, args, kwargs)
                if fed is not None:
                    args, kwargs = fed
            step.starts.append(call)
            if self.config.log_inputs:
                self._write(call, "inputs", tuple(args), kwargs)
            if self.config.log_post_fwd_inputs:
                frame.args, frame.kwargs = args, kwargs
        step.frames.setdefault(name, []).append(frame)
        return fed

    def _replay_call(self, step: _StepState, frame: _Frame, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """Replay: the reference's inputs for this call, or None to run it on its live inputs."""
        assert self._replay is not None
        if step.open:
            step.open[-1].replay.container = True  # type: ignore[union-attr]
        new_args, new_kwargs, info = self._replay.feed(frame.call, tuple(args), dict(kwargs))
        info.marker = rng_marker(_rng_devices())
        frame.replay = info
        step.open.append(frame)
        return (new_args, new_kwargs) if info.replaced else None

    def _post_impl(self, name: str, output: Any, post_inputs: tuple[Any, Any] | None = None) -> None:
        """A call ends: record its outputs and, with ``log_post_fwd_inputs``, its arguments as the
        call left them: ``post_inputs`` (args, kwargs) where they were tapped again at the call's
        end (``in_graph``), else the objects its pre-hook saw (in eager code the same objects,
        changed in place by the call, if at all)."""
        step = self._step
        if step is None:
            return
        stack = step.frames.get(name)
        if not stack:
            return
        frame = stack.pop()
        if not frame.take:
            return
        replay = None
        if frame.replay is not None:
            if step.open and step.open[-1] is frame:
                step.open.pop()
            frame.replay.finish(_rng_devices())
            replay = frame.replay.metadata()
        if self.config.log_outputs:
            self._write(frame.call, "outputs", output, replay=replay)
        if self.config.log_post_fwd_inputs:
            args, kwargs = post_inputs if post_inputs is not None else (frame.args, frame.kwargs)
            self._write(frame.call, "post_fwd_inputs", tuple(args), kwargs)
        step.ends.append(frame.call)

    def _cut(self, step: _StepState, name: str) -> None:
        """A call of ``name`` ends paused: drop what its pre-hook pushed (its frame, when the call
        began before the pause: it keeps its inputs and gets no outputs; ``_MUTED``, when it began
        paused too), so the calls still open keep their own frames (each post-hook pops exactly
        what its pre-hook pushed, paused or not)."""
        stack = step.frames.get(name)
        if not stack:
            return
        frame = stack.pop()
        if frame.replay is not None and step.open and step.open[-1] is frame:
            step.open.pop()

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self, status: str = "complete") -> None:
        """Remove the hooks, finish an open step (manual mode) and finalise the run (in a forked
        child: only remove the hooks)."""
        self._close(status)

    def _close(self, status: str, error: str | None = None) -> None:
        """:meth:`close`; ``error``: the manifest's ``"error"`` of a run closed as ``failed``."""
        if self._closed:
            return
        self._closed = True
        _WRITING.discard(self)
        self._detach()
        if self._forked_from is not None:
            return
        if self._in_graph is not None:
            self._in_graph.close()  # no tap reaches the capture from here (_close_parts forgets it)
        self._warn_hooks_never_ran()
        self._discard_capture_code()
        if self._sink is not None:
            if isinstance(self._sink, ThreadedSink):
                self._sink.closing()  # the step end below starts no writer thread
            try:
                if (self._in_root or self._paused_roots) and self._root_call_gone():
                    self._end_interrupted_root()  # Ctrl-C in the last forward: its step is not completed here
                if self._step is not None and (self.manual_step or status == "complete"):
                    self._end_step()
                if self._held:  # a step left open (closed as not complete): its records as before
                    self._release_held()
            except Exception as exc:
                self._fail_in_close(exc)
                return
            self._record_warnings()
            try:
                self._sink.close(status, error)
            except Exception as exc:
                self._fail_in_close(exc)
        self._close_parts()

    def _fail_in_close(self, exc: Exception) -> None:
        """:meth:`_fail` for a failure inside :meth:`close`: the run is closed as ``failed`` (with
        the error and the warnings) before an ``on_error: "raise"`` capture raises; the capture is
        closed already, and nothing else would close the run (it would stay ``running``, read as
        killed)."""
        self._fail(exc)

    def flush(self) -> None:
        """Wait until everything captured so far is written (asynchronous writes only)."""
        if self._held and not self._closed:
            self._release_held()
        if isinstance(self._sink, ThreadedSink):
            self._sink.flush()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # The block raised: the run is closed as failed, with that exception as its error, and
        # a failure to close it (a full disk) is logged, never raised in place of the block's own.
        try:
            self._close("failed", f"{exc_type.__name__}: {exc}" if self.error is None else None)
        except Exception as close_exc:
            _log.error("ilstore: could not close the run after the capture's block raised %s: %s (run %s)",
                       exc_type.__name__, close_exc, self.run_dir)

    def __repr__(self) -> str:
        return f"<Capture run_dir={self.run_dir} step={self.step_index} modules={len(self.hooked_modules)}>"


def capture(model: nn.Module, config: Any = None, *, manual_step: bool = False, in_compiled: str = "break") -> Capture:
    """Attach capture to ``model``: every forward of ``model`` is one step.

    Args:
        model: the root module; it is not logged itself, its submodules are.
        config: a dict, JSON text, a path, a :class:`Config`, or None for ``$ILSTORE_CONFIG``
            (or the defaults).
        manual_step: steps advance only on :meth:`Capture.step` (for engines whose step is not
            one root forward).
        in_compiled: what a hook does when torch.compile traces the model: ``"break"`` (the
            default) runs it eagerly at a graph break, so compiled models are captured in full;
            ``"skip"`` makes it vanish from compiled graphs (for ``fullgraph=True`` compilation,
            where a graph break is an error; calls inside compiled regions are then not recorded).

    Returns:
        A :class:`Capture`; use it as a context manager or call ``close()``.

    Example:
        >>> import torch, tempfile
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with capture(model, {"output_dir": tempfile.mkdtemp(), "run_id": "demo"}) as cap:
        ...     _ = model(torch.ones(1, 4))
        >>> sorted(p.name for p in (cap.run_dir / "step_0").iterdir())
        ['0', '1', 'module_calls.txt']
    """
    return Capture(model, config, manual_step=manual_step, in_compiled=in_compiled)
