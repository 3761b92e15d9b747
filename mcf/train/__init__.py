"""Pre-training: the DeepSpeed trainer behind ``mcf pretrain`` and its components.

``REQUEUE_EXIT_CODE`` is the exit status of a run stopped by SIGTERM/SIGUSR1 after it wrote a
checkpoint: a scheduler wrapper requeues the job on it and ``--resume auto`` continues.
Heavy modules (deepspeed, mlflow) are imported lazily by the components that need them.
"""

from mcf.train.signals import REQUEUE_EXIT_CODE

__all__ = ["REQUEUE_EXIT_CODE"]
