"""Logging of the ``mcf`` commands: one stream, rank 0 at INFO, other ranks only warnings, and the
start-up chatter of third-party libraries kept out.

* Ranks come from the launcher's environment (``RANK``, else ``SLURM_PROCID``), so this works
  before any process group exists; with several ranks each line names its rank.
* DeepSpeed announces the accelerator it detected on every import in every process (a WARNING on a
  machine without GPU, "Setting accelerator to CPU ..."). Commands that touch no accelerator
  (``mcf export``, ``mcf data``) must not print it, and a training run says which device it uses in
  its own start-up line on rank 0; so these records are dropped.
* MLflow logs its database migrations and experiment creation at INFO on the first run.
"""

from __future__ import annotations

import logging
import os

DATE_FORMAT = "%H:%M:%S"
# Records of these loggers below WARNING are start-up noise (creating the sqlite store, running its
# migrations, creating the experiment); warnings and errors still show.
QUIET_BELOW_WARNING = ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic", "mlflow.system_metrics")


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, deepspeed, srun), else (0, 1)."""
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
    try:
        return int(rank), int(world)
    except ValueError:
        return 0, 1


class _DropAcceleratorBanner(logging.Filter):
    """Drops DeepSpeed's accelerator-detection records ("Setting accelerator to CPU ...",
    "Setting ds_accelerator to cpu (auto detect)")."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Setting accelerator to") or msg.startswith("Setting ds_accelerator to"))


def quiet_third_party() -> None:
    """Install the filters above (idempotent; before or after the libraries are imported)."""
    ds = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger (deepspeed.utils.logging), not propagated
    if not any(isinstance(f, _DropAcceleratorBanner) for f in ds.filters):
        ds.addFilter(_DropAcceleratorBanner())
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging() -> None:
    """Configure the root logger for an ``mcf`` command on this rank (see the module docstring)."""
    rank, world = launcher_rank()
    where = f" [rank {rank}]" if world > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s", datefmt=DATE_FORMAT)
    quiet_third_party()
