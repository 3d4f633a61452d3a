"""vLLM plug-in: capture a vLLM model's module calls, one step per engine step.

vLLM loads every entry point of the group ``vllm.general_plugins`` in each of its processes
(the front end, the engine core, every worker) before any model exists; ilstore declares
``ilstore = "ilstore.integrations.vllm:register"`` there. :func:`register` reads the capture
config from ``ILSTORE_CONFIG`` (JSON text or a path) and, when it is set and enabled, wraps
three methods of vLLM's model runner classes:

* ``load_model``: once the model is loaded, attach ``ilstore.capture(model, cfg,
  manual_step=True)`` to it and arrange for the capture to be closed at process exit;
* ``execute_model``: a call with scheduled tokens is one engine step; capture hooks record only
  from its start until the step ends, so profiling, warm-up and dummy runs (which vLLM runs
  through ``profile_run`` / ``_dummy_run``, or ``execute_model(dummy_run=True)`` in the V2
  runner, never as a scheduled step) are neither counted nor logged;
* ``sample_tokens``: the step ends when it returns. Whether logits are computed inside
  ``execute_model`` (the V1 runner, which the CPU build uses) or in ``sample_tokens`` (the V2
  runner, and prompt logprobs in V1), ``compute_logits`` lands in the same step as the forward
  whose hidden states it reads. When ``execute_model`` returns an output itself (nothing
  scheduled for sampling: pooling models, a non-last pipeline stage), the step ends there.

Nothing from vLLM is imported at module import time: vLLM is never a dependency of ilstore,
and :func:`register` imports only the runner modules it patches.

Example:
    >>> import os, json  # doctest: +SKIP
    >>> os.environ["ILSTORE_CONFIG"] = json.dumps({"module_call_match": "layers\\\\.0\\\\."})  # doctest: +SKIP
    >>> from vllm import LLM  # the plug-in loads by itself  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import logging
import multiprocessing.util
import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..capture import IlstoreWarning
from ..config import ENV_VAR, Config, load_config
from ..engine_capture import EngineCapture  # it lived here first; still importable from this module
from ..errors import IlstoreError
from .vllm_batch import patch_prepare_inputs

__all__ = ["register", "EngineCapture", "RUNNER_CLASSES"]

_log = logging.getLogger(__name__)

#: The model runner classes whose methods are wrapped, as (module, class). The V1 GPU runner
#: defines execute_model / sample_tokens for itself and the V1 CPU runner (which overrides only
#: load_model); the V2 runner (vllm/v1/worker/gpu/, chosen when Triton is installed or
#: VLLM_USE_V2_MODEL_RUNNER=1) does the same for its CPU subclass. A class that cannot be
#: imported (another vLLM version, another platform) is skipped.
RUNNER_CLASSES: tuple[tuple[str, str], ...] = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
)

_WRAPPED = "__ilstore_wrapped__"  # marks our wrappers so a second register() never wraps twice
_STATE = "_ilstore_capture"  # the runner attribute that holds its EngineCapture
_config: Config | None = None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch the model runners when capture is on.

    Called by vLLM in every process, possibly more than once; it does nothing when
    ``ILSTORE_CONFIG`` is unset or says ``"enabled": false``.

    Raises:
        ConfigError: ``ILSTORE_CONFIG`` is set but invalid (the engine should not start and
            silently capture nothing).
    """
    global _config
    if not os.environ.get(ENV_VAR):
        return
    config = load_config(None)
    if not config.enabled:
        return
    # Pin the run id for the processes vLLM starts after this one (they inherit os.environ):
    # otherwise a config without "run_id" would give each process, each TP rank, its own run.
    os.environ[ENV_VAR] = json.dumps(config.to_dict())
    _config = config
    try:
        _patch_runners()
    except Exception as exc:  # vLLM calls plug-ins unguarded; an internals change must not kill it
        _warn(f"ilstore: could not hook vLLM's model runner ({exc!r}); nothing will be captured")


def _patch_runners() -> None:
    wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "load_model": _wrap_load_model, "execute_model": _wrap_execute_model, "sample_tokens": _wrap_sample_tokens}
    classes = []
    for module_name, class_name in RUNNER_CLASSES:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except Exception as exc:  # absent in this vLLM version or unusable on this platform
            _log.debug("ilstore: skipping %s.%s: %r", module_name, class_name, exc)
    # Patch all three or nothing: a runner with steps that begin but never end would be worse
    # than no capture.
    missing = [name for name in wrappers if not any(name in vars(cls) for cls in classes)]
    if missing:
        raise RuntimeError(f"no model runner class of {[f'{m}.{c}' for m, c in RUNNER_CLASSES]} defines "
                           f"{', '.join(missing)}")
    for cls in classes:
        # Only methods a class defines itself: wrapping inherited ones would wrap them twice.
        for name, wrap in wrappers.items():
            method = vars(cls).get(name)
            if method is not None and not hasattr(method, _WRAPPED):
                setattr(cls, name, wrap(method))
    patch_prepare_inputs(classes, _STATE, _WRAPPED)  # the batch composition record, where a runner allows it


def _mark(wrapper: Callable[..., Any]) -> Callable[..., Any]:
    setattr(wrapper, _WRAPPED, True)
    return wrapper


def _wrap_load_model(load_model: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_model)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        # A subclass's load_model may call its parent's (both wrapped): attach once.
        if _config is not None and getattr(self, _STATE, None) is None:
            setattr(self, _STATE, _attach(self, _config))
        return result

    return _mark(wrapper)


def _wrap_execute_model(execute_model: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(execute_model)
    def wrapper(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        cap: EngineCapture | None = getattr(self, _STATE, None)
        # A step is a call that runs the model for scheduled tokens. Not a step: the V2 runner's
        # own dummy/profiling runs (dummy_run=True), a call with nothing scheduled (returns
        # early, or runs a DP-padding dummy batch), and a nested call during a live step.
        scheduled = getattr(scheduler_output, "total_num_scheduled_tokens", 0) > 0
        if cap is None or cap.live or kwargs.get("dummy_run") or not scheduled:
            return execute_model(self, scheduler_output, *args, **kwargs)
        cap.begin_engine_step()
        try:
            output = execute_model(self, scheduler_output, *args, **kwargs)
        except BaseException:
            cap.end_engine_step()
            raise
        # None means "call sample_tokens next" (vLLM's engine core does exactly that); any other
        # output is final and no sample_tokens call belongs to this step.
        if output is not None:
            cap.end_engine_step()
        return output

    return _mark(wrapper)


def _wrap_sample_tokens(sample_tokens: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(sample_tokens)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        cap: EngineCapture | None = getattr(self, _STATE, None)
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            if cap is not None:
                cap.end_engine_step()

    return _mark(wrapper)


def _attach(runner: Any, config: Config) -> EngineCapture | None:
    model: nn.Module = runner.get_model()
    said: list[str] = []  # the warnings given before the capture exists, for its run's manifest
    compiled = _warn_if_compiled(runner, config.in_graph, said)
    _annotate_layouts(model, said)
    if config.backend == "hdf5" and config.async_writes and config.enabled:
        # Known issue (docs/vllm.md): in vLLM's CPU worker, HDF5 written from ilstore's background
        # writer thread while the model runs corrupted HDF5's state now and then (a failed write
        # "Operation not defined for data type class", a crash at exit), in about 1 run in 5 of
        # the test suite's tiny model; written on the model's thread it never did (0 of 22).
        _warn("ilstore: the hdf5 backend writes synchronously (async_writes=false) inside vLLM: HDF5 written "
              "from a background thread while vLLM's CPU worker runs was seen to fail (see docs/vllm.md)", said)
        config = load_config(config, async_writes=False)
    try:
        # vLLM compiles with fullgraph=True, where a graph break is an error: inside its compiled
        # regions the hooks step aside instead of breaking the graph.
        cap = EngineCapture(model, config, manual_step=True, in_compiled="skip" if compiled else "break")
    except IlstoreError as exc:  # e.g. the run directory already holds a run
        if config.on_error == "raise":
            raise
        _warn(f"ilstore: capture not attached, the model runs without it: {exc}")
        return None
    if cap.run_dir is None:
        return None
    for message in said:
        cap._keep_warning(message)
    # Closing flushes the background writer and marks the run complete. atexit covers the
    # in-process engine and spawned worker processes (they leave through sys.exit); forked ones
    # (VLLM_WORKER_MULTIPROC_METHOD=fork) leave through os._exit after running only
    # multiprocessing's finalizers, so register there too. close() is idempotent.
    atexit.register(cap.close)
    multiprocessing.util.Finalize(None, cap.close, exitpriority=10)
    _log.info("ilstore: capturing %d module(s) of %s into %s", len(cap.hooked_modules), type(model).__name__,
              cap.run_dir)
    return cap


def _annotate_layouts(model: nn.Module, said: list[str] | None = None) -> None:
    """Tensor parallelism: record the layouts of vLLM's parallel layers (docs/parallel.md)."""
    try:
        from .vllm_layout import annotate_model

        annotate_model(model)
    except Exception as exc:  # an internals change must not stop the capture
        _warn(f"ilstore: could not annotate the tensor-parallel layouts ({exc!r}); --unshard will not assemble them",
              said)


def _warn_if_compiled(runner: Any, in_graph: bool = False, said: list[str] | None = None) -> bool:
    """True if vLLM compiles; warns unless the capture's hooks are traced into the graphs (``in_graph``).

    Without ``in_graph`` the hooks step aside inside vLLM's compiled regions (fullgraph, no graph
    break allowed) and do not fire in CUDA graph replays. With it, the taps are part of the graphs
    vLLM compiles, and CUDA graph replays are drained (docs/compiled.md).
    """
    vllm_config = getattr(runner, "vllm_config", None)
    compilation = getattr(vllm_config, "compilation_config", None)
    model_config = getattr(vllm_config, "model_config", None)
    mode = int(getattr(compilation, "mode", 0) or 0)  # CompilationMode.NONE == 0
    cudagraphs = getattr(getattr(compilation, "cudagraph_mode", None), "name", "NONE") != "NONE"
    eager = bool(getattr(model_config, "enforce_eager", False))
    compiled = mode > 0 or cudagraphs or not eager
    if compiled and not in_graph:
        _warn(f"ilstore: vLLM runs this model compiled or with CUDA graphs (enforce_eager={eager}, compilation "
              f"mode={mode}, cudagraphs={cudagraphs}); forward hooks do not fire inside compiled regions or graph "
              "replays, so capture may record nothing or only the modules outside them. Set in_graph: true in the "
              "config to trace the capture into vLLM's compiled graphs, or run with enforce_eager=True "
              "(--enforce-eager), to capture every module.", said)
    return compiled


def _warn(message: str, said: list[str] | None = None) -> None:
    # Both: Python's warnings reach scripts and tests, vLLM's logs reach engine-core processes
    # whose stderr may be the only trace; and the run's manifest, through ``said``.
    warnings.warn(message, IlstoreWarning, stacklevel=3)
    _log.warning(message)
    if said is not None:
        said.append(message)
