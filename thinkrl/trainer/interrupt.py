"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM, and the fault points tests crash at.

A signal can arrive anywhere: mid-generation, between ``loss.backward()`` and
``optimizer.step()``, halfway through writing a checkpoint. Saving there would save a
state that belongs to no step: the weights after an update under the name of the step
before it (so a resume applies that update twice), or a step whose batch was drawn but
never trained on (so a resume skips it). So the handler only records the request;
the loop looks at it where a step has just completed (its metrics written) and saves
that step under its own name before it exits. A second signal aborts at once
(``KeyboardInterrupt``) and saves nothing: the last checkpoint written stays the last
good one, since every checkpoint is written aside and renamed into place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped at a step boundary on a signal; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Context manager: while active, SIGINT and SIGTERM set :attr:`signum` instead of
    raising; a second one raises ``KeyboardInterrupt``. Outside the main thread (where
    Python cannot install handlers) it does nothing and signals behave as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without saving")
        self.signum = signum
        log.warning(
            "%s: stopping after the current step, which will be saved; send it again to abort without saving",
            self.name,
        )

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def failpoint(name: str, step: int) -> None:
    """A named point where the crash tests strike; free unless ``THINKRL_FAILPOINT`` is set.

    ``THINKRL_FAILPOINT=NAME:STEP:SIGNAL`` (e.g. ``save:3:KILL``) sends this process
    SIG<SIGNAL> when it reaches point NAME during step STEP. The points: ``generate``
    (before a step's first generation), ``train`` (gradients computed, the optimizer not
    yet stepped), ``save`` (a checkpoint written aside, not yet renamed into place) and
    ``commit`` (renamed, ``checkpoints/latest`` not yet updated)."""
    spec = os.environ.get("THINKRL_FAILPOINT")
    if not spec:
        return
    where, at, sig = spec.split(":")
    if where == name and int(at) == step:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
