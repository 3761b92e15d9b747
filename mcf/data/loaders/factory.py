"""The factory of the pre-training loaders: :func:`build_pretrain_loader` picks the DALI, PyTorch or
remote-shard implementation of :class:`~mcf.data.loaders.base.PretrainLoader` for a ``data`` config,
after DALI's start-up check (:mod:`mcf.data.loaders.dali_check`) agreed on every rank.

DALI itself is imported only inside the DALI modules' functions (an optional dependency), so
importing this module never needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from mcf.data.core.config import DataConfig
from mcf.data.core.index import IndexOptions
from mcf.data.core.transforms import PretrainTransform, build_transform
from mcf.data.formats.factory import open_dataset
from mcf.data.formats.shards import StreamedShards
from mcf.data.loaders.base import PretrainLoader
from mcf.data.loaders.dali_check import check_dali
from mcf.data.loaders.dali_loader import DaliPretrainLoader
from mcf.data.loaders.shard_stream import ShardStreamLoader
from mcf.data.loaders.torch_loader import TorchPretrainLoader
from mcf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DaliCheck = Callable[[torch.device, PretrainTransform], None]
_DALI_CHECKED: dict[tuple[Any, ...], str | None] = {}


def _default_dali_check(device: torch.device, transform: PretrainTransform) -> None:
    check_dali(device, transform)


def dali_check_failure(
    device: torch.device,
    transform: PretrainTransform,
    check: DaliCheck | None = None,
) -> str | None:
    """Why DALI cannot serve ``transform`` on ``device`` (one line), or None when its start-up check
    (:mod:`mcf.data.loaders.dali_check`, or ``check``) passes; cached per device, transform and check."""
    check = check or _default_dali_check
    key = (str(torch.device(device)), transform, check)
    if key not in _DALI_CHECKED:
        try:
            check(torch.device(device), transform)
            _DALI_CHECKED[key] = None
        except Exception as e:  # the check's own error, or anything a broken install raises
            _DALI_CHECKED[key] = " ".join(str(e).split())[:300] or type(e).__name__
    return _DALI_CHECKED[key]


def dali_available(device: torch.device) -> bool:
    """Whether the DALI loader passes its start-up check on ``device`` (64 px, the released transform)."""
    return dali_check_failure(device, build_transform(64)) is None


def _agree(failure: str | None, world_size: int) -> str | None:
    """Every rank must use the same loader: the first failing rank's reason, or None if all passed."""
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return failure
    reasons: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(reasons, failure)
    return next((f"on rank {r}: {why}" for r, why in enumerate(reasons) if why), None)


def build_pretrain_loader(
    cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    split: str = "train",
    drop_last: bool = True,
    dali_check: DaliCheck | None = None,
) -> PretrainLoader:
    """The pre-training loader for ``cfg`` (``cfg.loader`` = auto | dali | torch).

    Args:
        cfg: the data section (path, lmdb_keys, loader, workers, transform options).
        img_size: square input side; ``cfg.img_size`` overrides it when set.
        batch_size: per-rank batch size; every batch has exactly this many samples.
        rank, world_size: this rank's share of each epoch.
        seed: order and augmentation seed (the same on every rank).
        device: where batches are delivered.
        split: ``"train"`` or ``"val"`` (datasets with splits, e.g. the built-in faces).
        drop_last: must be True: ranks must agree on the batch size (the contrastive loss gathers).
        dali_check: DALI's start-up check, ``(device, transform) -> None`` raising on failure
            (default :func:`mcf.data.loaders.dali_check.check_dali`); for tests.

    Before DALI is used (``auto`` or ``dali``) its start-up check runs on every rank; if it fails on
    any, ``auto`` falls back to the PyTorch loader on all ranks (one line on rank 0 says why) and
    ``dali`` is an error.

    Returns:
        A :class:`PretrainLoader` yielding float32 ``(batch_size, 3, S, S)`` tensors on ``device``.

    Raises:
        DataError: missing path, empty data set, no full batch, or too many bad samples.
        ConfigError: ``loader: dali`` and DALI fails its start-up check.
    """
    if not drop_last:
        raise ValueError("the pre-training loader always drops the partial last batch (drop_last=True)")
    size = cfg.img_size or img_size
    index = IndexOptions(cache_dir=cfg.index_cache, rank=rank, world_size=world_size, wait_s=cfg.index_wait_s)
    dataset = open_dataset(cfg.path, cfg.lmdb_keys, split=split, max_pixels=cfg.max_image_pixels, index=index)
    transform = build_transform(
        size, random_resized_crop=cfg.random_resized_crop, crop_scale=cfg.crop_scale, hflip=cfg.hflip
    )
    device = torch.device(device)
    kind = cfg.loader
    streamed = isinstance(dataset, StreamedShards)
    if streamed and kind == "dali":
        raise DataError(
            "remote shards (pipe:, URLs) are streamed by the PyTorch loader only: use --loader torch (or auto)"
        )
    if streamed:
        kind = "torch"
    elif kind in ("auto", "dali"):
        failure = _agree(dali_check_failure(device, transform, dali_check), world_size)
        if failure and kind == "dali":
            raise ConfigError(
                f"data.loader=dali, but DALI failed its start-up check ({failure}); use --loader torch or auto"
            )
        if failure:
            if rank == 0:  # DALI not installed is a plain choice; installed and failing deserves a warning
                level = logging.INFO if "No module named" in failure else logging.WARNING
                logger.log(level, "data: DALI failed its start-up check, using the PyTorch loader (%s)", failure)
            kind = "torch"
        else:
            kind = "dali"
    if streamed:
        cls: type[PretrainLoader] = ShardStreamLoader
    elif kind == "dali":
        cls = DaliPretrainLoader
    else:
        cls = TorchPretrainLoader
    loader = cls(
        dataset, transform, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
    )
    logger.info(
        "data: %s loader (%s), %d samples, %d batches of %d per rank, %dpx, %d workers",
        loader.kind,
        cfg.loader,
        len(dataset),
        len(loader),
        batch_size,
        size,
        loader.cfg.num_workers,
    )
    return loader
