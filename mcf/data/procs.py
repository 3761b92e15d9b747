"""Worker processes that never outlive the process that started them."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``): a
    converter killed with -9 leaves no orphaned workers. A no-op where prctl is unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init() -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's to handle (it shuts the pool down)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A fork pool whose workers die with this process and leave ^C to it."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init)


def shutdown(pool: ProcessPoolExecutor, *, kill: bool) -> None:
    """Stop ``pool``: wait for its idle workers to exit, or (``kill``, after an error or ^C) cancel
    pending work and kill the workers at once."""
    if not kill:
        pool.shutdown(wait=True)
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)
