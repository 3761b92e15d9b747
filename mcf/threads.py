"""CPU threads per rank: OpenMP/intra-op threads from the cores available to this rank.

torchrun sets ``OMP_NUM_THREADS=1`` for several ranks; the deepspeed launcher sets nothing (unless
``--bind_cores_to_rank``), so every rank starts one thread per core of the node: 2 CPU ranks ran
the demo ~15× slower than under torchrun, and on a GPU node the ranks' threads fight the loader
workers. :func:`set_cpu_threads` runs before torch is imported (``mcf.cli.main``), whichever
launcher started the process:

* ``OMP_NUM_THREADS`` already set (by the user, torchrun or a launcher's binding) is kept;
* else this rank's share of the CPUs, :func:`cpus_per_rank` (the same count ``data.num_workers:
  auto`` starts from): a launcher that starts a node's ranks from one process (torchrun:
  ``LOCAL_WORLD_SIZE``; deepspeed: ``LOCAL_SIZE``) shares its affinity mask among them, which also
  holds when that launcher runs inside one srun task (``pretrain_deepspeed.sbatch``: the task's
  ``SLURM_CPUS_PER_TASK`` is the launcher's, not each rank's); a rank that srun started itself gets
  ``SLURM_CPUS_PER_TASK``; else the mask is shared by slurm's tasks on the node, or is this rank's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THREADS_ENV = "OMP_NUM_THREADS"
_choice: tuple[int, str] | None = None


def _int(env: Mapping[str, str], key: str) -> int | None:
    try:
        v = int(env[key])
    except (KeyError, ValueError):
        return None
    return v if v > 0 else None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this job step on this node: SLURM_NTASKS_PER_NODE, else this node's entry of
    SLURM_STEP_TASKS_PER_NODE (``"4(x2),3"`` = 4 on nodes 0-1, 3 on node 2; SLURM_NODEID picks)."""
    n = _int(env, "SLURM_NTASKS_PER_NODE")
    if n:
        return n
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    try:
        for part in spec.split(","):
            count, _, rep = part.partition("(x")
            counts += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
    except ValueError:
        return None
    node = _int(env, "SLURM_NODEID") or 0
    return counts[node] if node < len(counts) and counts[node] > 0 else None


def cpus_per_rank(env: Mapping[str, str], cpus: int) -> tuple[int, str]:
    """The CPUs one rank of this node may use, and how that was derived.

    Args:
        env: the environment (``os.environ``).
        cpus: CPUs in this process's affinity mask (``len(os.sched_getaffinity(0))``).

    A launcher that starts a node's ranks from one process (torchrun: LOCAL_WORLD_SIZE; the deepspeed
    launcher: LOCAL_SIZE) hands them all the same mask, so it is shared among them (inside one srun
    task: that task's SLURM_CPUS_PER_TASK, when the mask is wider, is what they share). Under srun,
    SLURM_CPUS_PER_TASK is each task's own allocation; otherwise, if the mask is narrower than the
    job's CPUs on this node (SLURM_CPUS_ON_NODE) slurm bound the task to its share already, and if
    not, the mask is shared by the step's tasks on this node.
    """
    in_slurm = "SLURM_STEP_ID" in env or "SLURM_PROCID" in env
    per_task = _int(env, "SLURM_CPUS_PER_TASK") if in_slurm else None
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        local = _int(env, key)
        if local:
            if per_task and per_task < cpus:  # the launcher is one srun task: its CPUs, whatever the mask says
                return max(1, per_task // local), (
                    f"SLURM_CPUS_PER_TASK={per_task} of {cpus} CPUs in the affinity mask / {local} local ranks ({key})"
                )
            return max(1, cpus // local), f"{cpus} CPUs in the affinity mask / {local} local ranks ({key})"
    if in_slurm:
        if per_task:
            return min(cpus, per_task), f"SLURM_CPUS_PER_TASK={per_task}, {cpus} CPUs in the affinity mask"
        on_node = _int(env, "SLURM_CPUS_ON_NODE")
        if on_node and cpus < on_node:
            return cpus, f"{cpus} CPUs in the affinity mask (slurm bound this task; SLURM_CPUS_ON_NODE={on_node})"
        tasks = _slurm_tasks_on_node(env)
        if tasks:
            return max(1, cpus // tasks), f"{cpus} CPUs in the affinity mask / {tasks} slurm tasks on this node"
    return cpus, f"{cpus} CPUs in the affinity mask, 1 rank on this node"


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask: taskset, cgroups cpusets, slurm binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def set_cpu_threads() -> tuple[int, str]:
    """Set ``OMP_NUM_THREADS`` for this rank (see the module doc) and, if torch is imported already,
    its intra-op threads. Returns (threads, why), also kept for :func:`describe`."""
    global _choice
    env = os.environ
    if env.get(THREADS_ENV, "").strip():
        try:
            threads = max(int(env[THREADS_ENV]), 1)
        except ValueError:
            threads = 0
        why = f"{THREADS_ENV}={env[THREADS_ENV]} from the environment; {available_cpus()} CPUs in the affinity mask"
    else:
        threads, how = cpus_per_rank(env, available_cpus())
        env[THREADS_ENV] = str(threads)
        why = f"{how}; {THREADS_ENV} was unset"
    if "torch" in sys.modules and threads > 0:
        sys.modules["torch"].set_num_threads(threads)
    _choice = (threads, why)
    return _choice


def describe() -> str:
    """The choice for a start-up log line, e.g. ``4 CPU threads per rank (16 CPUs in the affinity mask / 4 local
    ranks (LOCAL_WORLD_SIZE); OMP_NUM_THREADS was unset)``."""
    import torch

    if _choice is None:
        return f"{torch.get_num_threads()} CPU threads per rank"
    return f"{torch.get_num_threads()} CPU threads per rank ({_choice[1]})"
