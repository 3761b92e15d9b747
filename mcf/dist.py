"""The one place that asks torch.distributed about ranks; models and losses take them as arguments."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mcf import errors
from mcf.errors import UserError

T = TypeVar("T")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient flows back)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def _error_class(name: str) -> type[UserError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError


def rank0_decides(decide: Callable[[], T]) -> T:
    """Run ``decide()`` on rank 0 only and give every rank its result, or raise its user error on all.

    For start-up checks that read shared files (the run lock, which checkpoint to resume): one rank
    reads, so a 1,000-rank job does not hit the file system 1,000 times, and all ranks stop together
    when the answer is an error. Without a process group (one rank) it is just ``decide()``.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # a user error, or a bug: either way the other ranks must not wait forever
            box[0] = ("error", type(e).__name__, str(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        cls = _error_class(box[0][1])
        raise (
            cls(box[0][2]) if cls is not UserError or box[0][1] == "UserError" else RuntimeError(f"rank 0: {box[0][2]}")
        )
    return box[0][1]


def gather_errors(error: str | None) -> list[tuple[int, str]]:
    """Every rank's error message (rank, message) after a step each rank did on its own (a collective)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [(0, error)] if error else []
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    return [(r, e) for r, e in enumerate(everyone) if e]
