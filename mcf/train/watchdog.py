"""The step watchdog: a rank whose step stalls (a hung loader or file system, a peer that never joins a
collective) ends itself with a message and a stack dump instead of holding its node forever.

A daemon thread checks one deadline per step. The trainer names each phase as it enters it
(``data``, ``forward/backward``, ``sync``, ``optimizer``, ``checkpoint``...); when the deadline passes,
the thread logs the rank, the step and the phase that stalled, dumps every thread's Python stack
(``faulthandler``: the main thread's shows where it is blocked) and ends the process with
:data:`STALL_EXIT_CODE` (``os._exit``: the main thread may be blocked in C code and never return).
The first steps after a start or resume and the slow phases (checkpoints, the monitor's evaluation,
the final save) get the longer ``slow_s`` deadline.

The same thread bounds a stop request (SIGTERM/SIGUSR1, :mod:`mcf.train.signals`): the run
checkpoints at the next step boundary, and when no boundary comes within ``grace_s`` the process
exits with :data:`~mcf.train.signals.REQUEUE_EXIT_CODE` (the last complete checkpoint is the resume
point). The signal is seen through :func:`signal.set_wakeup_fd`, which the C-level handler writes even
while the main thread is blocked and Python handlers cannot run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from mcf.train.signals import REQUEUE_EXIT_CODE, STOP_SIGNALS, StopRequest

log = logging.getLogger(__name__)

STALL_EXIT_CODE = 4
SLOW_FIRST_STEPS = 2  # steps after a start or resume under the slow deadline (compilation, allocator warm-up)


class StepWatchdog:
    """``StepWatchdog(rank, timeout_s, slow_s, grace_s, stop).start()``; then per step ``step(n)`` and
    ``phase(name)``, ``with slow(name):`` around checkpoints and evaluation, ``stopping()`` once the
    step boundary after a stop request is reached, ``close()`` at the end. ``timeout_s = 0`` turns the
    step deadline off, ``grace_s = 0`` the stop grace; with both off no thread is started.

    ``exit`` (``os._exit``) and ``poll_s`` are for tests.
    """

    def __init__(
        self, rank: int, timeout_s: float, slow_s: float, grace_s: float = 0.0, stop: StopRequest | None = None,
        exit: Callable[[int], None] = os._exit, poll_s: float = 0.5,
    ):
        self.rank, self.timeout_s, self.slow_s, self.grace_s = rank, timeout_s, max(slow_s, timeout_s), grace_s
        self.stop, self._exit, self.poll_s = stop, exit, poll_s
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase, self._step, self._since, self._deadline = "start-up", 0, time.monotonic(), None
        self._steps_seen = 0
        self._stop_at: float | None = None  # monotonic time of the first stop signal seen
        self._stopping = False

    # -- the trainer's side -----------------------------------------------------------------------
    def start(self) -> StepWatchdog:
        if self.timeout_s > 0 or (self.grace_s > 0 and self.stop is not None):
            self._thread = threading.Thread(target=self._run, name="mcf-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def step(self, step: int) -> None:
        """Step ``step`` begins: its deadline starts now (slow for the first steps after a start)."""
        self._steps_seen += 1
        slow = self._steps_seen <= SLOW_FIRST_STEPS
        self._set(self._phase, step, self.slow_s if slow else self.timeout_s)

    def phase(self, name: str) -> None:
        """The step enters phase ``name`` (the step's deadline is unchanged)."""
        with self._lock:
            self._phase, self._since = name, time.monotonic()

    @contextlib.contextmanager
    def slow(self, name: str) -> Iterator[None]:
        """A phase with the slow deadline (from now); afterwards the step deadline restarts."""
        previous = self._phase
        self._set(name, self._step, self.slow_s)
        try:
            yield
        finally:
            self._set(previous, self._step, self.timeout_s)

    def stopping(self) -> None:
        """Every rank reached the step boundary after a stop request: the grace period is over."""
        self._stopping = True

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _set(self, phase: str, step: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._phase, self._step, self._since = phase, step, now
            self._deadline = now + seconds if self.timeout_s > 0 else None

    # -- the thread's side ------------------------------------------------------------------------
    def _run(self) -> None:
        wake = self.stop.wakeup_fd if self.stop is not None else None
        while not self._closed.is_set():
            if wake is not None:
                ready, _, _ = select.select([wake], [], [], self.poll_s)
                if ready:
                    self._read_signals(wake)
            elif self._closed.wait(self.poll_s):
                break
            now = time.monotonic()
            if self.stop is not None and self.stop.requested and self._stop_at is None:
                self._stop_at = now  # the Python handler ran before the wakeup byte was read (or no wakeup fd)
            with self._lock:
                phase, step, since, deadline = self._phase, self._step, self._since, self._deadline
            if (
                self._stop_at is not None
                and self.grace_s > 0
                and not self._stopping
                and now > self._stop_at + self.grace_s
            ):
                self._fire(f"no step boundary within train.stop_grace_s={self.grace_s:g} s of the stop signal (step "
                           f"{step}, phase '{phase}' for {now - since:.0f} s): exiting without a new checkpoint",
                           REQUEUE_EXIT_CODE)
                return
            if deadline is not None and now > deadline:
                self._fire(
                    f"step {step} stalled in phase '{phase}' for {now - since:.0f} s (deadline train.step_timeout_s="
                    f"{self.timeout_s:g} s, {self.slow_s:g} s for first steps and checkpoints)",
                    STALL_EXIT_CODE,
                )
                return

    def _read_signals(self, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            return
        if self._stop_at is None and any(b in {int(s) for s in STOP_SIGNALS} for b in data):
            self._stop_at = time.monotonic()
            names = ", ".join(sorted({signal.Signals(b).name for b in data if b in {int(s) for s in STOP_SIGNALS}}))
            log.warning("rank %d: %s received; the step boundary must come within %g s (train.stop_grace_s)",
                        self.rank, names, self.grace_s)

    def _fire(self, why: str, code: int) -> None:
        msg = f"mcf watchdog: rank {self.rank}: {why}; exiting with {code}"
        log.error(msg)
        print(msg, file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(
                file=sys.stderr, all_threads=True
            )  # the main thread's stack: where it is blocked
        except (OSError, ValueError):  # stderr closed or not a real file
            pass
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        self._exit(code)
