"""Resuming on another number of ranks: the batch policy, and the per-rank state of the new ranks.

A checkpoint records the shape of the run that wrote it (ranks ``W``, micro-batch ``B``,
accumulation ``A``; the global batch ``G = B·A·W``). A run resumed on ``W' != W`` ranks follows
``train.elastic``:

- ``keep_global_batch`` (default): ``accum_steps`` becomes ``G / (B'·W')`` (``B'`` = this run's
  ``train.batch_size``), so the optimizer sees the same batch and the lr schedule (in steps, peak
  from ``G``) stays exactly the one of the interrupted run; a ``G`` that ``B'·W'`` does not divide is
  refused with the sizes that would work.
- ``keep_micro_batch``: ``batch_size`` and ``accum_steps`` as configured; the global batch changes to
  ``B'·A'·W'``, and with it the steps per epoch, the step of a sample, and (unless ``optim.lr`` is
  set) the peak lr (``blr·G'/256``). The step counter and the optimizer state continue.
- ``refuse``: resuming on another number of ranks is an error (the interrupted run continues only
  as it was).

Per-rank state cannot be carried over rank by rank when the ranks change: the new ranks take the
data position (a global sample count, the same on every old rank), the metric sums and the
bad-sample counts of all old ranks on rank 0, and fresh random streams (masks, torch, numpy,
python) drawn from ``(seed, rank, step)``. The model, the optimizer (moments and step counts) and
the EMA target continue exactly; see :mod:`mcf.train.checkpoint` for how DeepSpeed's partitions are
re-split.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcf.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_RNG_TAG = 0x656C6173  # "elas": the fresh streams after a world-size change


@dataclass(frozen=True)
class RunShape:
    """Ranks, micro-batch and accumulation of a run."""

    world_size: int
    batch_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps

    @classmethod
    def of_checkpoint(cls, mcf_state: dict[str, Any]) -> RunShape:
        """The shape recorded in ``mcf_state.pt`` (its ``world_size`` and resolved config)."""
        t = mcf_state["config"]["train"]
        return cls(int(mcf_state["world_size"]), int(t["batch_size"]), int(t["accum_steps"]))

    def __str__(self) -> str:
        return (
            f"{self.world_size} rank(s) x batch {self.batch_size} x accum {self.accum_steps} "
            f"= global batch {self.global_batch}"
        )


def plan_accum_steps(policy: str, saved: RunShape, batch_size: int, accum_steps: int, world_size: int) -> int:
    """``train.accum_steps`` for this run, resuming a checkpoint of shape ``saved`` on ``world_size`` ranks.

    Raises:
        CheckpointError: ``policy == "refuse"`` and the number of ranks changed.
        ConfigError: ``keep_global_batch`` and ``batch_size · world_size`` does not divide the global batch.
    """
    if saved.world_size == world_size:
        return accum_steps
    where = f"the checkpoint was written by {saved}, this run has {world_size} rank(s)"
    if policy == "refuse":
        raise CheckpointError(f"{where} and train.elastic=refuse: resume on {saved.world_size} rank(s), or set "
                              "train.elastic=keep_global_batch (or keep_micro_batch)")
    if policy == "keep_micro_batch":
        new = RunShape(world_size, batch_size, accum_steps)
        log.warning("resuming on %d rank(s) with train.elastic=keep_micro_batch: %s becomes %s", world_size, saved, new)
        return accum_steps
    per_step = batch_size * world_size
    if saved.global_batch % per_step:
        fits = [b for b in range(1, saved.global_batch + 1) if saved.global_batch % (b * world_size) == 0]
        near = sorted(
            {max((b for b in fits if b < batch_size), default=0), min((b for b in fits if b > batch_size), default=0)}
            - {0}
        )
        hint = (
            " or ".join(f"train.batch_size={b} (accum_steps {saved.global_batch // (b * world_size)})" for b in near)
            + " keeps it"
            if near
            else f"no batch size keeps it on {world_size} rank(s)"
        )
        raise ConfigError(
            f"cannot keep the global batch {saved.global_batch} on {world_size} rank(s) with train.batch_size="
            f"{batch_size} ({saved.global_batch} is not a multiple of {per_step}): {hint}; or set "
            "train.elastic=keep_micro_batch to change the global batch"
        )
    accum = saved.global_batch // per_step
    log.info("resuming on %d rank(s) (was %s): train.accum_steps %d -> %d keeps the global batch %d", world_size, saved,
             accum_steps, accum, saved.global_batch)
    return accum


def resplit_rank_state(old: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The run state of new rank ``rank`` from the state files of all old ranks (``rank_NNNNN.pt``).

    The data position and ``steps_since_log`` are the same on every old rank (taken from rank 0);
    metric sums and the loader's sample counters are summed into new rank 0 (the logged totals are
    all-reduced sums, so they continue); random states are left out (see :func:`reseed`).
    """
    first = old[0]
    loader = dict(first["loader"])
    for key in ("bad_samples", "samples_seen"):
        loader[key] = sum(int(s["loader"].get(key, 0)) for s in old) if rank == 0 else 0
    acc = torch.stack([s["acc"] for s in old]).sum(0) if rank == 0 else torch.zeros_like(first["acc"])
    return {"loader": loader, "acc": acc, "steps_since_log": int(first["steps_since_log"])}


def reseed(seed: int, rank: int, step: int, mask_gen: torch.Generator) -> None:
    """Fresh random streams for ``rank`` after a world-size change, a function of ``(seed, rank, step)``."""
    s0, s1, s2 = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, rank, step, _RNG_TAG]).generate_state(
        3, np.uint64
    )
    mask_gen.manual_seed(int(s0))
    torch.manual_seed(int(s1))
    np.random.seed(int(s2) & 0xFFFF_FFFF)
    random.seed(int(s2))
