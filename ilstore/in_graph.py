"""Capture points traced into compiled graphs (config ``in_graph: true``).

Without ``in_graph`` ilstore's hooks are opaque to torch.compile: every hooked call is a graph
break and runs eagerly (:func:`ilstore.capture._opaque`). With it, each hook is a few lines that
dynamo traces: they collect the tensors of a call's inputs or outputs and pass them to one custom
op, ``ilstore::tap``, declared with an *ordered side effect*
(``torch.library._register_effectful_op``): the compiler neither removes the op nor reorders it
against the other taps, the graph stays whole (``fullgraph=True`` works) and the tensors the op
receives are the ones the compiled code computed. The op's implementation runs in Python at that
point of the compiled program and hands the tensors to the same bookkeeping the eager hooks use
(call counters, selection, steps, records), so a run is keyed exactly like an eager one.

What a tap carries: the tensors, the capture's token (an int, a constant in the graph) and one
string naming the module, the kind (``inputs``, ``outputs``, or the step markers ``root_pre`` /
``root_post``) and each tensor's path. Only dense strided tensors are tapped; anything else in a
call (Python values, sparse or quantized tensors) is not recorded in this mode. Containers are
rebuilt from the paths: positions become tuples, names dicts, so the keys equal the eager run's.
With ``log_post_fwd_inputs`` an outputs tap carries the call's arguments after its outputs, tapped
again at the call's end, so in-place changes show as in an eager run. Tapped tensors are detached:
autograd never sees the op (a backward through the compiled model needs no formula for it).

**CUDA graphs.** Kernels launched while a CUDA graph is captured run only when it is replayed,
and Python does not run then. A tap reached while the current stream is capturing therefore
allocates a static buffer per tensor and records ``buffer.copy_(tensor)`` into the graph; the
taps of that capture are kept on the ``torch.cuda.CUDAGraph`` object, in order. After every
``CUDAGraph.replay()`` (ilstore wraps ``capture_begin`` and ``replay`` of the class once, the
first time an in-graph capture is created with CUDA available) the buffers are handed to the
bookkeeping in that order, step markers included, so each replay of a graph of the whole forward
becomes one step. The copies to the host are queued on the stream after the replay, so the next
replay cannot overwrite a buffer before it is read. The same logic runs on CPU in the tests
through :func:`_capture_begin` / :func:`_replayed` with a stand-in graph object.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["InGraph", "OP_NAME"]

OP_NAME = "ilstore::tap"

# Separators inside a tap's description string: fields, paths, path components. Control
# characters, so no module name or dict key of a real model contains them.
_FIELD, _PATH, _PART = "\x1d", "\x1e", "\x1f"
_MAX_DEPTH = 32

_live: dict[int, Callable[[], InGraph | None]] = {}  # token -> weak reference to a capture's InGraph
_tokens = itertools.count(1)
_local = threading.local()  # .taps: the list of the CUDA graph being captured on this thread


def _target(token: int) -> InGraph | None:
    """The live capture a tap belongs to, or None once it was closed (its graphs still run their taps)."""
    ref = _live.get(token)
    return ref() if ref is not None else None


def _tap_impl(xs: list[torch.Tensor], after: torch.Tensor, token: int, desc: str) -> torch.Tensor:
    target = _target(token)
    if target is not None:  # else the capture was closed; its graphs still run their taps
        if _capturing():
            _record_into_graph(xs, token, desc)
        else:
            target.deliver(desc, xs)
    return after.new_empty(0)


def _tap_fake(xs: list[torch.Tensor], after: torch.Tensor, token: int, desc: str) -> torch.Tensor:
    return after.new_empty(0)


def _define_op() -> Any:
    try:
        return torch.ops.ilstore.tap
    except AttributeError:
        pass
    op = torch.library.custom_op(OP_NAME, mutates_args=())(_tap_impl)
    op.register_fake(_tap_fake)
    # Never dead code, though a tap's result is only the next tap's argument (see InGraph).
    torch.fx.node.has_side_effect(torch.ops.ilstore.tap.default)
    return torch.ops.ilstore.tap


# -- CUDA graphs ---------------------------------------------------------------------------------

def _capturing() -> bool:
    override = getattr(_local, "capturing", None)
    if override is not None:  # the CPU tests' stand-in for a stream capture
        return bool(override)
    return _patched and torch.cuda.is_current_stream_capturing()  # _patched: CUDA is available


def _record_into_graph(xs: list[torch.Tensor], token: int, desc: str) -> None:
    taps = getattr(_local, "taps", None)
    if taps is None:
        raise RuntimeError("ilstore: a CUDA graph is being captured outside torch.cuda.CUDAGraph.capture_begin, so "
                           "ilstore cannot drain its taps after replays; capture graphs with torch.cuda.graph(...)")
    buffers = [torch.empty_like(x) for x in xs]
    for buf, x in zip(buffers, xs, strict=True):
        buf.copy_(x)  # recorded into the graph: runs on every replay
    taps.append((token, desc, buffers))


def _capture_begin(graph: Any) -> None:
    """A CUDA graph capture starts on this thread: the taps met until its end belong to ``graph``.

    The live captures' writers are drained first: a writer thread that waits on a copy's CUDA
    event while a stream is captured (in the default "global" error mode) invalidates the capture.
    """
    for ref in list(_live.values()):
        target = ref()
        if target is not None and not target.capture._closed:
            target.capture.flush()
    _local.taps = graph._ilstore_taps = []


def _capture_end(graph: Any) -> None:
    _local.taps = None


def _replayed(graph: Any) -> None:
    """``graph`` was just replayed: hand its static buffers to their captures, in capture order."""
    for token, desc, buffers in getattr(graph, "_ilstore_taps", ()):
        target = _target(token)
        if target is not None:
            target.deliver(desc, buffers)


_patched = False


def _patch_cuda_graphs() -> None:
    """Wrap ``torch.cuda.CUDAGraph``'s capture and replay once per process (see the module doc)."""
    global _patched
    if _patched or not torch.cuda.is_available():
        return
    _patched = True
    cls = torch.cuda.CUDAGraph
    begin, end, replay = cls.capture_begin, cls.capture_end, cls.replay

    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        _capture_begin(self)
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            _capture_end(self)
            raise

    def capture_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return end(self, *args, **kwargs)
        finally:
            _capture_end(self)

    def replay_and_drain(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = replay(self, *args, **kwargs)
        _replayed(self)
        return out

    cls.capture_begin, cls.capture_end, cls.replay = capture_begin, capture_end, replay_and_drain  # type: ignore[method-assign]


# -- the traced side ------------------------------------------------------------------------------

def _tappable(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized


def _leaves(value: Any, prefix: str, xs: list[torch.Tensor], paths: list[str], depth: int) -> None:
    """Collect the tensors in ``value`` with their paths (components joined by ``_PART``)."""
    if isinstance(value, torch.Tensor):
        if _tappable(value):
            # Detached: the tap only reads values, so autograd must not see it (a training step
            # through the compiled model would need a gradient formula for the op otherwise).
            xs.append(value.detach() if value.requires_grad else value)
            paths.append(prefix)
        return
    if value is None or isinstance(value, (bool, int, float, str)) or depth >= _MAX_DEPTH:
        return  # None first: dynamo (torch 2.11) cannot trace dataclasses.is_dataclass(None)
    sep = prefix + _PART if prefix else ""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _leaves(v, sep + str(k), xs, paths, depth + 1)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _leaves(v, sep + str(i), xs, paths, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _leaves(getattr(value, f.name), sep + f.name, xs, paths, depth + 1)


# -- the host side --------------------------------------------------------------------------------

def _rebuild(paths: Sequence[tuple[str, ...]], xs: Sequence[torch.Tensor]) -> Any:
    """A value with the tensors at their paths: digit keys make tuples (gaps None), others dicts."""
    root: dict[str, Any] = {}
    for path, x in zip(paths, xs, strict=True):
        if not path:
            return x
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = x
    return _freeze(root)


def _freeze(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return tuple(_freeze(node.get(str(i))) for i in range(max(int(k) for k in node) + 1))
    return {k: _freeze(v) for k, v in node.items()}


def _split_inputs(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rebuilt inputs: positional arguments (digit keys) and keyword arguments (the others)."""
    if not isinstance(value, dict):
        return (value, {}) if isinstance(value, tuple) else ((), {})
    positional = {k: v for k, v in value.items() if k.isdigit()}
    args = _freeze(positional) if positional else ()
    return args, {k: v for k, v in value.items() if not k.isdigit()}


#: A parsed tap description: module name, kind, the tensors' paths and, for an outputs tap that
#: carries the post-forward inputs too, the number of outputs and the inputs' paths.
_Parsed = tuple[str, str, list[tuple[str, ...]], tuple[int, list[tuple[str, ...]]] | None]


class InGraph:
    """The in-graph hooks of one :class:`~ilstore.capture.Capture` and the delivery of its taps."""

    def __init__(self, capture: Any) -> None:  # an ilstore.capture.Capture (which imports this module)
        self.capture = capture
        self.token = next(_tokens)
        self.op = _define_op()
        self.selected: dict[str, frozenset[int] | None] = {}
        # Program order: each tap takes the previous tap's (empty) result and returns a new one,
        # so the compiler can neither drop a tap nor run it before an earlier one (inductor
        # schedules independent side-effecting ops in any order it likes).
        self.chain: list[torch.Tensor] = [torch.empty(0)]
        self._parsed: dict[tuple[str, int], _Parsed] = {}
        _live[self.token] = weakref.ref(self)
        _patch_cuda_graphs()

    def close(self) -> None:
        _live.pop(self.token, None)

    # hooks (traced by dynamo: plain containers, constant strings, one op call each)
    def pre_hook(self, name: str, selected: frozenset[int] | None) -> Callable[..., None]:
        self.selected[name] = selected
        op, token, chain, head = self.op, self.token, self.chain, name + _FIELD + "inputs" + _FIELD
        log_inputs = self.capture.config.log_inputs  # post-forward inputs are tapped by the post hook

        def pre(module: Any, args: Any, kwargs: Any) -> None:
            xs: list[torch.Tensor] = []
            paths: list[str] = []
            if log_inputs:
                _leaves(args, "", xs, paths, 0)
                _leaves(kwargs, "", xs, paths, 0)
            chain[0] = op(xs, chain[0], token, head + _PATH.join(paths))

        return pre

    def post_hook(self, name: str) -> Callable[..., None]:
        op, token, chain, head = self.op, self.token, self.chain, name + _FIELD + "outputs" + _FIELD
        log_outputs = self.capture.config.log_outputs
        log_post_inputs = self.capture.config.log_post_fwd_inputs

        def post(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            xs: list[torch.Tensor] = []
            paths: list[str] = []
            if log_outputs:
                _leaves(output, "", xs, paths, 0)
            desc = head + _PATH.join(paths)
            if log_post_inputs:
                # The arguments again, as the call left them (in-place changes included), in the
                # same tap: a later kernel may reuse their buffers before another tap would run.
                n_out = len(xs)
                in_paths: list[str] = []
                _leaves(args, "", xs, in_paths, 0)
                _leaves(kwargs, "", xs, in_paths, 0)
                desc = desc + _FIELD + str(n_out) + _FIELD + _PATH.join(in_paths)
            chain[0] = op(xs, chain[0], token, desc)

        return post

    def root_hooks(self) -> tuple[Callable[..., None], Callable[..., None]]:
        """The step markers, around the root's forward: never traced.

        ``torch.compile(model)`` runs the root's hooks as frames of their own, outside the
        forward's graph: traced, each would be a graph of one op (``torch._dynamo.explain``
        counts them as breaks). Run eagerly they still reach the op, so under a CUDA graph
        capture the markers are recorded with the other taps and every replay is one step.
        A model called from inside a larger compiled function would break that function's
        graph here: use ``manual_step=True`` there (no root hooks).
        """
        op, token, chain = self.op, self.token, self.chain
        begin, end = _FIELD + "root_pre" + _FIELD, _FIELD + "root_post" + _FIELD

        def root_pre(module: Any, args: Any) -> None:
            chain[0] = op([], chain[0], token, begin)

        def root_post(module: Any, args: Any, output: Any) -> None:
            chain[0] = op([], chain[0], token, end)

        disable = torch.compiler.disable
        return disable(root_pre), disable(root_post)

    # delivery (plain Python, at the tap's place in the compiled program or after a graph replay)
    def _parse(self, desc: str, n: int) -> _Parsed:
        key = (desc, n)  # "" is one root tensor's path, or no tensor at all: the count tells
        parsed = self._parsed.get(key)
        if parsed is None:
            name, kind, joined, *post = desc.split(_FIELD)
            if post:  # an outputs tap that carries the post-forward inputs after the outputs
                n_out = int(post[0])
                parsed = (name, kind, _paths(joined, n_out), (n_out, _paths(post[1], n - n_out)))
            else:
                parsed = (name, kind, _paths(joined, n), None)
            self._parsed[key] = parsed
        return parsed

    def deliver(self, desc: str, xs: Sequence[torch.Tensor]) -> None:
        cap = self.capture
        if cap._closed:
            return
        name, kind, paths, post = self._parse(desc, len(xs))
        if kind == "inputs":
            args, kwargs = _split_inputs(_rebuild(paths, xs)) if xs else ((), {})
            cap._pre(name, self.selected.get(name), None, args, kwargs)
        elif kind == "outputs":
            if post is None:
                cap._post(name, None, None, None, _rebuild(paths, xs) if xs else None)
            else:
                n_out, in_paths = post
                outs, ins = xs[:n_out], xs[n_out:]
                inputs = _split_inputs(_rebuild(in_paths, ins)) if ins else ((), {})
                cap._post(name, None, None, None, _rebuild(paths, outs) if outs else None, post_inputs=inputs)
        elif kind == "root_pre":
            cap._root_pre(None, None)
        elif kind == "root_post":
            cap._root_post(None, None, _COMPLETED)


def _paths(joined: str, n: int) -> list[tuple[str, ...]]:
    return [tuple(p.split(_PART)) if p else () for p in joined.split(_PATH)] if n else []


_COMPLETED = object()  # a root_post tap means the forward reached its end: the step completed
