"""CPU threads per rank: OpenMP/intra-op threads from the cores available to this rank.

torchrun sets ``OMP_NUM_THREADS=1`` for several ranks; the deepspeed launcher sets nothing (unless
``--bind_cores_to_rank``), so every rank starts one thread per core of the node: 2 CPU ranks ran
the demo ~15× slower than under torchrun, and on a GPU node the ranks' threads fight the loader
workers. :func:`set_cpu_threads` runs before torch is imported (``mcf.cli.main``), whichever
launcher started the process:

* ``OMP_NUM_THREADS`` already set (by the user, torchrun or a launcher's binding) is kept;
* else ``cores // ranks on this node``, at least 1, where cores are those this process may run on
  (``os.sched_getaffinity``; under srun at most ``SLURM_CPUS_PER_TASK``, which slurm already
  counts per task) and the ranks per node come from ``LOCAL_WORLD_SIZE`` (torchrun),
  ``LOCAL_SIZE`` (deepspeed) or ``SLURM_NTASKS_PER_NODE``/``SLURM_TASKS_PER_NODE`` (srun).
"""

from __future__ import annotations

import os
import re
import sys

THREADS_ENV = "OMP_NUM_THREADS"
_choice: tuple[int, str] | None = None


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask; a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Ranks on this node, from the launcher's environment (1 when started alone)."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    # "4(x2),3": which group this node is in is not known here; take the first count
    m = re.match(r"(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    if m and "SLURM_PROCID" in env:
        return max(int(m.group(1)), 1)
    return 1


def set_cpu_threads() -> tuple[int, str]:
    """Set ``OMP_NUM_THREADS`` for this rank (see the module doc) and, if torch is imported already,
    its intra-op threads. Returns (threads, why), also kept for :func:`describe`."""
    global _choice
    env = os.environ
    cores = cores_available()
    if env.get(THREADS_ENV, "").strip():
        try:
            threads = max(int(env[THREADS_ENV]), 1)
        except ValueError:
            threads = 0
        why = f"{THREADS_ENV}={env[THREADS_ENV]} from the environment; {cores} cores available"
    else:
        if "SLURM_PROCID" in env and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
            cores = min(cores, int(env["SLURM_CPUS_PER_TASK"]))  # slurm's count is per task already
            local = 1
        else:
            local = local_world_size()
        threads = max(cores // local, 1)
        env[THREADS_ENV] = str(threads)
        why = f"{cores} cores available / {local} rank(s) on this node; {THREADS_ENV} was unset"
    if "torch" in sys.modules and threads > 0:
        sys.modules["torch"].set_num_threads(threads)
    _choice = (threads, why)
    return _choice


def describe() -> str:
    """The choice for a start-up log line, e.g. ``4 CPU threads per rank (16 cores available / 4 rank(s) ...)``."""
    import torch

    if _choice is None:
        return f"{torch.get_num_threads()} CPU threads per rank"
    return f"{torch.get_num_threads()} CPU threads per rank ({_choice[1]})"
