"""Pre-training: the DeepSpeed trainer behind ``mcf pretrain`` and its components.

``REQUEUE_EXIT_CODE`` is the exit status of a run stopped by SIGTERM/SIGUSR1 after it wrote a
checkpoint: a scheduler wrapper requeues the job on it and ``--resume auto`` continues.
``STALL_EXIT_CODE`` is the exit status of a rank whose step stalled past ``train.step_timeout_s``
(:mod:`mcf.train.watchdog`): no new checkpoint; a requeued job resumes from the last one.
Heavy modules (deepspeed, mlflow) are imported lazily by the components that need them.
"""

from mcf.train.signals import REQUEUE_EXIT_CODE
from mcf.train.watchdog import STALL_EXIT_CODE

__all__ = ["REQUEUE_EXIT_CODE", "STALL_EXIT_CODE"]
