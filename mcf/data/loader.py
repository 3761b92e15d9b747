"""The pre-training loader: one interface, a PyTorch and a DALI implementation.

Both yield float32 ``(B, 3, S, S)`` ImageNet-normalised batches on ``device`` with exactly
``batch_size`` samples on every rank (the partial last batch is dropped; a bad sample is replaced
by a valid one), both draw the crop/flip from ``(seed, epoch, index)``, and both save/restore their
position in batches, so a resumed run continues with exactly the batches it would have produced.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mcf.data.config import DataConfig
from mcf.data.datasets import EncodedImageDataset, open_dataset
from mcf.data.index import IndexOptions
from mcf.data.sampler import DistributedSampler
from mcf.data.shards import StreamedShards
from mcf.data.source import SampleSource, TorchSampleDataset
from mcf.data.transforms import PretrainTransform, build_transform, normalize_batch
from mcf.errors import DataError

logger = logging.getLogger(__name__)

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
        self.bad_examples: list[str] = []

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
        for images, n_bad, bad_idx in self._batches(self.epoch, self.position):
            self.position += 1
            self._account(n_bad, bad_idx)
            yield images

    def close(self) -> None:
        """Release workers/pipelines (the loader can still be iterated again afterwards)."""

    def _batches(self, epoch: int, position: int) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Batches ``position..`` of ``epoch``: (images on device, failed attempts, first bad index)."""
        raise NotImplementedError

    def _account(self, n_bad: np.ndarray, bad_idx: np.ndarray) -> None:
        self.samples_seen += self.batch_size
        nb = int(np.asarray(n_bad).sum())
        if nb:
            self.bad_samples += nb
            for j in np.asarray(bad_idx).reshape(-1):
                if j >= 0 and len(self.bad_examples) < 5:
                    self.bad_examples.append(self.dataset.name(int(j)))
        f = self.cfg.max_bad_fraction
        if self.samples_seen >= MIN_SAMPLES_FOR_BAD_CHECK and self.bad_samples > f * self.samples_seen:
            raise DataError(
                f"{self.bad_samples} of {self.samples_seen} samples seen on rank {self.rank} failed to decode "
                f"({self.bad_samples / self.samples_seen:.1%} > data.max_bad_fraction={f:.1%}); "
                f"e.g. {', '.join(self.bad_examples[:3]) or 'n/a'} (run `mcf data verify` on the data set)"
            )


def _collate(items: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    imgs = torch.from_numpy(np.stack([it[0] for it in items]))  # (B, 3, S, S)
    return imgs, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


# Pre-emption signals: slurm delivers them to every process of a job step, but only the trainer's
# main process acts on them (checkpoint at the step boundary, exit 3). A worker killed by one would
# crash the run before that checkpoint, so workers ignore them. An ignored disposition survives
# fork and exec (DALI's spawned workers); a Python handler does not.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(*_: Any) -> None:
    """``worker_init_fn``: this worker process ignores SIGTERM and SIGUSR1."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
            worker_init_fn=ignore_stop_signals if nw > 0 else None,
        )

    def _batches(self, epoch, position):
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(position * self.batch_size)
        nb = self.device.type == "cuda"
        for imgs, n_bad, bad_idx in self._loader:  # uint8 from the workers, normalised here on the device
            yield normalize_batch(imgs.to(self.device, non_blocking=nb)), n_bad.numpy(), bad_idx.numpy()

    def close(self) -> None:
        """Stop the persistent workers now. They ignore SIGTERM, so at interpreter exit multiprocessing's
        handler (SIGTERM, then join) would wait on them forever if an error left their iterator alive."""
        it = self._loader._iterator
        if it is not None:
            shutdown = getattr(it, "_shutdown_workers", None)  # only the multi-process iterator has workers
            if shutdown is not None:
                shutdown()
            self._loader._iterator = None


_DALI_OK: dict[str, bool] = {}


def dali_available(device: torch.device) -> bool:
    """Whether DALI imports and a tiny pipeline runs on ``device`` (cached per device type)."""
    key = torch.device(device).type
    if key not in _DALI_OK:
        try:
            from mcf.data.dali_loader import smoke_test

            smoke_test(torch.device(device))
            _DALI_OK[key] = True
        except Exception as e:  # ImportError, no libcuda, a broken install
            logger.info("DALI unavailable on %s (%s: %s)", key, type(e).__name__, e)
            _DALI_OK[key] = False
    return _DALI_OK[key]


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

    Returns:
        A :class:`PretrainLoader` yielding float32 ``(batch_size, 3, S, S)`` tensors on ``device``.

    Raises:
        DataError: missing path, empty data set, no full batch, or too many bad samples.
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
    if kind == "auto":
        kind = "torch" if streamed or not dali_available(device) else "dali"
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
        "data: %s loader (%s), %d samples, %d batches of %d per rank, %dpx",
        loader.kind,
        cfg.loader,
        len(dataset),
        len(loader),
        batch_size,
        size,
    )
    return loader
