"""Capture for inference engines: steps are the engine's, not the root module's forwards.

An engine (vLLM today) runs the model inside scheduled steps and also outside them (memory
profiling, compile warm-up, padding batches). :class:`EngineCapture` is the engine-neutral part
of an integration: a manual-step :class:`~ilstore.capture.Capture` that records only between
:meth:`~EngineCapture.begin_engine_step` and :meth:`~EngineCapture.end_engine_step`, which an
integration calls from wherever its engine starts and finishes a step.

Example:
    >>> import torch, tempfile
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> cap = EngineCapture(model, {"output_dir": tempfile.mkdtemp(), "log_step_ids": []}, manual_step=True)
    >>> _ = model(torch.ones(1, 4))        # warm-up outside any engine step: not recorded
    >>> cap.begin_engine_step()
    >>> _ = model(torch.ones(1, 4))        # engine step 0
    >>> cap.end_engine_step()
    >>> cap.close()
    >>> import ilstore
    >>> with ilstore.open_run(cap.run_dir) as run:
    ...     run.steps()
    [0]
"""

from __future__ import annotations

from typing import Any

from .capture import Capture

__all__ = ["EngineCapture"]


class EngineCapture(Capture):
    """A manual-step capture whose hooks record only while an engine step is live.

    In manual-step mode a plain :class:`~ilstore.capture.Capture` would log the engine's model
    runs outside scheduled steps as step 0. An integration calls :meth:`begin_engine_step` when
    a real step starts and :meth:`end_engine_step` when it ends; between steps the hooks return
    at once. Create it with ``manual_step=True``, as a :class:`~ilstore.capture.Capture`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause()  # nothing is recorded until the first real engine step

    @property
    def live(self) -> bool:
        """True between :meth:`begin_engine_step` and :meth:`end_engine_step`."""
        return not self.paused

    def begin_engine_step(self) -> None:
        """Let the hooks record: the engine starts a step."""
        self.resume()

    def end_engine_step(self) -> None:
        """Close the current step (if one is live) and advance to the next.

        A live, logged step in which no hooked module ran (a model run compiled or in CUDA graphs)
        is counted for the run's manifest (``"warnings"``); the Python warning is given for the
        first such step only: an engine runs many."""
        if not self.paused:
            if self._step is None and self._sink is not None and self.config.logs_step(self.step_index):
                self._warn_no_hooks(say=self._hookless_count == 0)
            self.pause()
            self.step()

    def record_call(self, name: str, **values: Any) -> bool:
        """Record ``values`` as one call of a module named ``name`` in the live step.

        For what an engine knows about a step and no module sees, e.g. the batch composition
        (:mod:`ilstore.integrations.vllm_batch`): the call goes through the hooks' own path, so
        it is selected by ``module_call_match`` like a module of that name, written by every
        backend as the inputs of a call (keyword arguments ``values``; its output is None), and
        listed among the step's calls. Use a name no module of the model has.

        Returns:
            True when recorded; False when no step is live, the step is not logged, or
            ``module_call_match`` does not select ``name``.
        """
        if not self.live or not self.config.module_may_match(name):
            return False
        selected = self.config.selected_calls(name)
        self._pre(name, selected, None, (), values)  # type: ignore[arg-type]  # no module object: not used
        self._post(name, None, (), values, None)  # type: ignore[arg-type]
        step = self._step
        return step is not None and step.logging

    def _close(self, status: str, error: str | None = None) -> None:
        """Stop recording, then close as :meth:`Capture.close <ilstore.capture.Capture.close>` does."""
        self.pause()
        super()._close(status, error)
