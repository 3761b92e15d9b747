"""Pre-emption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and exit 3.

The handler only sets a flag; the trainer folds it into its one per-step all-reduce so every rank
stops after the same step, writes the same checkpoint, and exits with :data:`REQUEUE_EXIT_CODE`.
A Python handler runs only when the main thread executes bytecode: ``install()`` also points
:func:`signal.set_wakeup_fd` at a pipe (``wakeup_fd``, its read end), which the C-level handler writes
at once, so the step watchdog (:mod:`mcf.train.watchdog`) sees the signal and bounds the wait for the
boundary (``train.stop_grace_s``) even while the main thread is blocked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import FrameType

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag set by the stop signals; ``install()`` registers the handlers, ``restore()`` undoes it."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self.wakeup_fd: int | None = None  # read end of the wakeup pipe (signal numbers, one byte each)
        self._wakeup_w: int | None = None
        self._previous_wakeup = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        if not self.requested:
            log.warning("received %s: checkpointing at the next step boundary, then exiting with %d",
                        signal.Signals(signum).name, REQUEUE_EXIT_CODE)
        self.requested, self.signum = True, signum

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # the C handler must never block on a full pipe
        self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.wakeup_fd, self._wakeup_w = r, w
        return self

    def restore(self) -> None:
        """Put the previous handlers back — unless a stop was requested: then the signals stay
        ignored, so a repeated signal during the final checkpoint and shutdown cannot turn exit 3
        into a death by signal."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._wakeup_w is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in (self.wakeup_fd, self._wakeup_w):
                with contextlib.suppress(OSError):
                    os.close(fd)  # type: ignore[arg-type]
            self.wakeup_fd = self._wakeup_w = None
