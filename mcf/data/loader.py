"""The pre-training loader: one interface, a PyTorch and a DALI implementation.

Both yield float32 ``(B, 3, S, S)`` ImageNet-normalised batches on ``device`` with exactly
``batch_size`` samples on every rank (the partial last batch is dropped; a bad sample is replaced
by a valid one), both draw the crop/flip from ``(seed, epoch, index)``, and both save/restore their
position in batches, so a resumed run continues with exactly the batches it would have produced.

Bad data never kills a worker: unreadable and undecodable files are substituted and counted in the
workers (:mod:`mcf.data.source`); the main process raises :class:`~mcf.errors.DataError` past
``data.max_bad_fraction`` or when every candidate of a sample failed. Worker processes ignore the
stop signals, die with the process that started them, and are shut down by :meth:`close` (bounded:
a stuck worker is killed), which the trainer calls on every exit path and an ``atexit`` hook calls
for any loader still open.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mcf.data.config import DataConfig
from mcf.data.datasets import EncodedImageDataset, open_dataset
from mcf.data.index import IndexOptions
from mcf.data.sampler import DistributedSampler
from mcf.data.shards import StreamedShards
from mcf.data.source import MAX_ATTEMPTS, SampleSource, TorchSampleDataset
from mcf.data.transforms import PretrainTransform, build_transform, normalize_batch
from mcf.data.workers import auto_num_workers, kill_after, worker_init
from mcf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Loaders whose workers may be running; closed at interpreter exit. Registered after torch's own
# exit hook, so it runs before it (atexit is LIFO) while the DataLoader can still shut its workers
# down, and before multiprocessing's, which would wait forever on workers that ignore SIGTERM.
_OPEN: weakref.WeakSet[PretrainLoader] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        try:
            loader.close()
        except Exception as e:  # interpreter shutdown: report, never hang or mask the exit status
            logger.warning("closing a %s loader at exit failed: %s", loader.kind, e)

# The bad-sample threshold is checked only after this many samples, so one early bad file does not
# stop a run whose overall fraction is tiny.
MIN_SAMPLES_FOR_BAD_CHECK = 32


class PretrainLoader:
    """Iterates this rank's batches of one epoch; see the module docstring.

    Attributes:
        bad_samples: cumulative count of failed decodes on this rank.
        samples_seen: cumulative count of samples delivered on this rank.
        kind: ``"torch"`` or ``"dali"``.
    """

    kind = "base"

    def __init__(
        self,
        dataset: EncodedImageDataset,
        transform: PretrainTransform,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        cfg = dataclasses.replace(cfg, num_workers=resolve_num_workers(cfg, rank))  # "auto" -> a count
        self.dataset, self.transform, self.cfg = dataset, transform, cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = torch.device(device)
        if hasattr(dataset, "make_sampler"):  # shards: their own epoch order (mcf.data.shards.ShardSampler)
            self.sampler = dataset.make_sampler(rank=rank, world_size=world_size, seed=seed, window=cfg.shuffle_buffer)
        else:
            self.sampler = DistributedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed)
        self.source = SampleSource(dataset, transform, seed)
        self.num_batches = self.sampler.per_rank // batch_size
        if self.num_batches == 0:
            raise DataError(
                f"{len(dataset)} samples give no full batch of {batch_size} per rank on {world_size} rank(s); use more data or a smaller batch"
            )
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already delivered
        self.bad_samples = 0
        self.samples_seen = 0
        self.bad_examples: list[str] = []  # names of the first bad samples met
        self._bad_indices: list[int] = []

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at batch 0, the current one resumes."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "bad_samples": self.bad_samples,
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("seed", "batch_size", "world_size", "num_samples"):
            mine = len(self.dataset) if k == "num_samples" else getattr(self, k)
            if k in d and int(d[k]) != mine:
                raise DataError(f"cannot resume the data stream exactly: the checkpoint has {k}={d[k]}, this run has {mine}")
        if not 0 <= int(d["position"]) <= self.num_batches:
            raise DataError(f"saved data position {d['position']} outside 0..{self.num_batches}")
        self.epoch, self.position = int(d["epoch"]), int(d["position"])
        self.bad_samples = int(d.get("bad_samples", 0))
        self.samples_seen = int(d.get("samples_seen", 0))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.position >= self.num_batches:  # a finished epoch iterated again restarts it
            self.position = 0
        _OPEN.add(self)
        try:
            for images, n_bad, bad_idx in self._batches(self.epoch, self.position):
                self.position += 1
                self._account(n_bad, bad_idx)
                yield images
        except DataError:
            self.close()  # the run stops: release the workers now
            raise

    def close(self) -> None:
        """Release workers/pipelines (the loader can still be iterated again afterwards)."""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter shutdown modules may be half gone; the atexit hook ran first
            pass

    def _batches(self, epoch: int, position: int) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Batches ``position..`` of ``epoch``: (images on device, failed attempts, first bad index)."""
        raise NotImplementedError

    def _account(self, n_bad: np.ndarray, bad_idx: np.ndarray) -> None:
        n_bad, bad_idx = np.asarray(n_bad).reshape(-1), np.asarray(bad_idx).reshape(-1)
        self.samples_seen += self.batch_size
        nb = int(n_bad.sum())
        if nb:
            self.bad_samples += nb
            for j in bad_idx:
                if j >= 0 and len(self.bad_examples) < 5:
                    self.bad_examples.append(self.dataset.name(int(j)))
                    self._bad_indices.append(int(j))
        exhausted = np.flatnonzero(n_bad >= MAX_ATTEMPTS)
        if exhausted.size:  # that sample is a blank placeholder: never train on it
            j = int(bad_idx[exhausted[0]])
            raise DataError(
                f"{MAX_ATTEMPTS} samples in a row failed to decode or read on rank {self.rank}, starting at "
                f"{self._example(j)}: the data set is mostly unreadable (run `mcf data verify` on it)"
            )
        f = self.cfg.max_bad_fraction
        if self.samples_seen >= MIN_SAMPLES_FOR_BAD_CHECK and self.bad_samples > f * self.samples_seen:
            raise DataError(
                f"{self.bad_samples} of {self.samples_seen} samples seen on rank {self.rank} failed to decode or read "
                f"({self.bad_samples / self.samples_seen:.1%} > data.max_bad_fraction={f:.1%}); "
                f"e.g. {', '.join(self._example(j) for j in self._bad_indices[:3]) or 'n/a'} "
                "(run `mcf data verify` on the data set)"
            )

    def _example(self, index: int) -> str:
        """A bad sample's name and why it is bad (read again here), for an error message."""
        return f"{self.dataset.name(index)} ({self.source.reason(index, getattr(self, 'rejected', ()))})"


def _collate(items: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    imgs = torch.from_numpy(np.stack([it[0] for it in items]))  # (B, 3, S, S)
    return imgs, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


class TorchPretrainLoader(PretrainLoader):
    """``torch.utils.data.DataLoader`` with PIL decoding; persistent workers, pinned memory on GPU.
    Workers hand over uint8 batches; normalisation runs on the batch, on the device."""

    kind = "torch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nw = self.cfg.num_workers
        self._loader = torch.utils.data.DataLoader(
            TorchSampleDataset(self.source),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=nw,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=nw > 0,
            prefetch_factor=self.cfg.prefetch if nw > 0 else None,
            worker_init_fn=worker_init if nw > 0 else None,
        )

    def _batches(self, epoch, position):
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(position * self.batch_size)
        nb = self.device.type == "cuda"
        for imgs, n_bad, bad_idx in self._loader:  # uint8 from the workers, normalised here on the device
            yield normalize_batch(imgs.to(self.device, non_blocking=nb)), n_bad.numpy(), bad_idx.numpy()

    def close(self) -> None:
        """Shut the persistent workers down (see :func:`shutdown_workers`)."""
        loader = getattr(self, "_loader", None)
        if loader is not None and loader._iterator is not None:
            it, loader._iterator = loader._iterator, None
            shutdown_workers(it)


def shutdown_workers(it: Any) -> None:
    """Shut down the workers of a DataLoader iterator: its orderly shutdown, bounded (5 s, then
    SIGKILL: the workers ignore the SIGTERM it would fall back to). No-op without workers."""
    with kill_after(getattr(it, "_workers", ())):
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


DaliCheck = Callable[[torch.device, PretrainTransform], None]
_DALI_CHECKED: dict[tuple[Any, ...], str | None] = {}


def _default_dali_check(device: torch.device, transform: PretrainTransform) -> None:
    from mcf.data.dali_check import check_dali

    check_dali(device, transform)


def dali_check_failure(
    device: torch.device,
    transform: PretrainTransform,
    check: DaliCheck | None = None,
) -> str | None:
    """Why DALI cannot serve ``transform`` on ``device`` (one line), or None when its start-up check
    (:mod:`mcf.data.dali_check`, or ``check``) passes; cached per device, transform and check."""
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


_WORKERS_LOGGED = False


def resolve_num_workers(cfg: DataConfig, rank: int) -> int:
    """``cfg.num_workers``, with ``"auto"`` derived from the CPUs of this rank (logged once, rank 0)."""
    global _WORKERS_LOGGED
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    n, how = auto_num_workers()
    if rank == 0 and not _WORKERS_LOGGED:
        logger.info("data: num_workers=auto -> %d per rank (%s)", n, how)
        _WORKERS_LOGGED = True
    return n


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
            (default :func:`mcf.data.dali_check.check_dali`); for tests.

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
    transform = build_transform(size, random_resized_crop=cfg.random_resized_crop, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    device = torch.device(device)
    kind = cfg.loader
    streamed = isinstance(dataset, StreamedShards)
    if streamed and kind == "dali":
        raise DataError("remote shards (pipe:, URLs) are streamed by the PyTorch loader only: use --loader torch (or auto)")
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
        from mcf.data.shard_stream import ShardStreamLoader

        cls: type[PretrainLoader] = ShardStreamLoader
    elif kind == "dali":
        from mcf.data.dali_loader import DaliPretrainLoader

        cls = DaliPretrainLoader
    else:
        cls = TorchPretrainLoader
    loader = cls(dataset, transform, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device)
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
