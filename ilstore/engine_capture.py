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
        """Close the current step (if one is live) and advance to the next."""
        if not self.paused:
            self.pause()
            self.step()

    def close(self, status: str = "complete") -> None:
        """Stop recording, then close as :meth:`Capture.close <ilstore.capture.Capture.close>` does."""
        self.pause()
        super().close(status)
