"""Data worker processes: how many per rank, and their lifecycle.

* :func:`auto_num_workers` derives ``data.num_workers: auto`` from the CPUs this process may run
  on (its affinity mask) and the ranks that share them on this node.
* :func:`worker_init` runs first in every worker process (DataLoader workers, DALI's spawned source
  workers, ``build-lmdb``'s process pool): it ignores the pre-emption signals (only the trainer's
  main process acts on them) and asks the kernel to kill the worker when its parent dies, so a
  parent killed with SIGKILL or crashing never leaves workers behind.
* :func:`kill_after` bounds an orderly shutdown: a worker still alive after it is killed with
  SIGKILL (workers ignore SIGTERM, so ``terminate()`` would not stop them).

Standard library only (and :mod:`mcf.threads`, which shares the CPU count with the trainer's threads): DALI's
spawned workers import this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mcf.threads import available_cpus, cpus_per_rank

# The cap of ``num_workers: auto``. A PIL worker decodes and resizes ~700 face crops/s and an H100
# step wants ~1.5-2k images/s per GPU, so ~3 workers keep a GPU fed; 16 leaves 5x headroom for
# larger source images and slower storage. More costs memory (every DataLoader worker holds a
# copy-on-write image of the trainer and ``prefetch`` batches) and start-up time, and an 8-GPU
# node then runs 8 x 16 = 128 workers, about the cores of a typical 2-socket GPU node.
AUTO_WORKERS_CAP = 16

# Pre-emption signals: slurm delivers them to every process of a job step, but only the trainer's
# main process acts on them (checkpoint at the step boundary, exit 3). A worker killed by one would
# crash the run before that checkpoint, so workers ignore them. An ignored disposition survives
# fork and exec (DALI's spawned workers); a Python handler does not.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def auto_num_workers(env: Mapping[str, str] | None = None, cpus: int | None = None) -> tuple[int, str]:
    """``data.num_workers: auto``: ``(workers per rank, one-line derivation)``.

    The rank's CPUs minus one for its main process (which runs the training loop and feeds the
    accelerator), at most :data:`AUTO_WORKERS_CAP`, at least 1 when the process may use more than
    one CPU; 0 (decode in the main process) on a single CPU.
    """
    env = os.environ if env is None else env
    cpus = available_cpus() if cpus is None else cpus
    per_rank, how = cpus_per_rank(env, cpus)
    if cpus <= 1:
        return 0, f"{how}: a single CPU, decoding in the main process"
    n = min(AUTO_WORKERS_CAP, max(1, per_rank - 1))
    return n, f"{how} = {per_rank} per rank, minus 1 for the main process, at least 1, at most {AUTO_WORKERS_CAP}"


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), and
    exit at once if the parent is already gone (it may have died before this call). Elsewhere a
    no-op. Call it from the worker's main thread, first thing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def worker_init(*_: Any) -> None:
    """First call in a data worker process (also usable as a DataLoader ``worker_init_fn``): ignore
    the stop signals, die with the parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    import multiprocessing

    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else None)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Processes started inside this block inherit SIG_IGN for the stop signals (main thread only;
    a stop signal arriving within the block itself is dropped, and the launchers re-send it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def kill_after(procs: Iterable[Any], timeout: float = 5.0) -> Iterator[None]:
    """Bound an orderly shutdown of the ``multiprocessing`` processes ``procs`` run inside the block:
    those still alive ``timeout`` seconds in are killed (SIGKILL), so the block cannot hang on a
    stuck worker; those alive when the block ends are killed and joined too."""
    procs = list(procs)

    def kill() -> None:
        for p in procs:
            if p.is_alive():
                p.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        kill()
        for p in procs:
            p.join(timeout)
