"""Worker processes that never outlive the process that started them."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor

from mcf.data.core.workers import die_with_parent

__all__ = ["die_with_parent", "shutdown", "worker_pool"]


def _worker_init() -> None:
    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else None)  # a converter killed with -9 leaves no orphans
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
