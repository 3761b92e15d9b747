"""The pre-training loader's interface, :class:`PretrainLoader`; its PyTorch (:mod:`~mcf.data.loaders.torch_loader`),
DALI (:mod:`~mcf.data.loaders.dali_loader`) and remote-shard (:mod:`~mcf.data.loaders.shard_stream`)
implementations, built by :func:`mcf.data.loaders.factory.build_pretrain_loader`.

Both yield float32 ``(B, 3, S, S)`` ImageNet-normalised batches on ``device`` with exactly
``batch_size`` samples on every rank (the partial last batch is dropped; a bad sample is replaced
by a valid one), both draw the crop/flip from ``(seed, epoch, index)``, and both save/restore their
position as a *global* sample count (see :class:`PretrainLoader`), so a resumed run continues with
exactly the batches it would have produced, or, on another number of ranks, with the rest of the
epoch re-split over the new ranks.

Bad data never kills a worker: unreadable and undecodable files are substituted and counted in the
workers (:mod:`mcf.data.core.source`); the main process raises :class:`~mcf.errors.DataError` past
``data.max_bad_fraction`` or when every candidate of a sample failed. Worker processes ignore the
stop signals, die with the process that started them, and are shut down by :meth:`close` (bounded:
a stuck worker is killed), which the trainer calls on every exit path and an ``atexit`` hook calls
for any loader still open.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.data.core.config import DataConfig
from mcf.data.core.sampler import DistributedSampler
from mcf.data.core.source import MAX_ATTEMPTS, SampleSource
from mcf.data.core.transforms import PretrainTransform
from mcf.data.core.workers import auto_num_workers, kill_after
from mcf.data.formats.datasets import EncodedImageDataset
from mcf.errors import DataError

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

# The bad-sample threshold: checked from this many samples seen on, against a one-sided 99 % lower
# confidence bound of the bad fraction (Wilson score), so one early bad file in a large, nearly clean
# folder (1 of 40 seen, 2.5 % > 1 %) does not stop the run, while a folder that is really worse than
# data.max_bad_fraction is stopped as soon as the samples seen show it with 99 % confidence.
MIN_SAMPLES_FOR_BAD_CHECK = 32
BAD_FRACTION_Z = 2.326  # one-sided 99 % normal quantile


def bad_fraction_lower_bound(bad: int, seen: int, z: float = BAD_FRACTION_Z) -> float:
    """Wilson score lower bound of the bad fraction after ``bad`` of ``seen`` samples; > 0 whenever bad > 0."""
    if seen <= 0 or bad <= 0:
        return 0.0
    p, n = bad / seen, seen
    centre = p + z * z / (2 * n)
    spread = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max((centre - spread) / (1 + z * z / n), 0.0)


class PretrainLoader:
    """Iterates this rank's batches of one epoch; see the module docstring.

    **Position.** ``offset`` counts the samples of ``epoch`` consumed by *all* ranks together: the
    epoch's order (:mod:`mcf.data.core.sampler`) has been consumed up to position ``offset``, and every
    batch delivered on every rank advances it by ``batch_size · world_size``. ``state_dict()`` saves
    ``{epoch, offset}`` with the loader's shape and its counters; ``load_state_dict()`` continues from
    there with this loader's own ``world_size`` and ``batch_size``, which may differ from the ones
    that wrote it: the rest of the epoch is re-split over this run's ranks, none repeated, none
    skipped (what a finished epoch leaves over — fewer samples than one more global batch — is left
    out, as in an uninterrupted epoch). Every source's loader keeps this contract, so the trainer
    resumes any of them on any number of ranks: a source whose order is not a permutation of indices
    (e.g. shards) must still count consumed samples globally and be able to continue from the count.

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
        if hasattr(dataset, "make_sampler"):  # shards: their own epoch order (mcf.data.formats.shards.ShardSampler)
            self.sampler = dataset.make_sampler(rank=rank, world_size=world_size, seed=seed, window=cfg.shuffle_buffer)
        else:
            self.sampler = DistributedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed)
        self.source = SampleSource(dataset, transform, seed)
        self.num_batches = self.sampler.per_rank // batch_size
        if self.num_batches == 0:
            raise DataError(
                f"{len(dataset)} samples give no full batch of {batch_size} per rank on {world_size} rank(s); use more "
                "data or a smaller batch"
            )
        self.epoch = 0
        self.offset = 0  # samples of ``epoch`` consumed by all ranks together
        self.bad_samples = 0
        self.samples_seen = 0
        self.bad_examples: list[str] = []  # names of the first bad samples met
        self._bad_indices: list[int] = []
        self._record = SampleRecorder.from_env(rank, world_size)

    def __len__(self) -> int:
        """Batches per rank in a whole epoch."""
        return self.num_batches

    @property
    def global_batch(self) -> int:
        """Samples one batch on every rank consumes from the epoch."""
        return self.batch_size * self.world_size

    def batches_left(self, offset: int | None = None) -> int:
        """Batches per rank from ``offset`` (default: the current position) to the end of the epoch."""
        return self.sampler.share(self.offset if offset is None else offset) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at offset 0, the current one resumes."""
        if int(epoch) != self.epoch:
            self.epoch, self.offset = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``offset`` (the position, any world size), the shape that wrote them
        (``world_size``, ``batch_size``, informative), what must match to resume (``seed``,
        ``num_samples``), and this rank's counters."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "bad_samples": self.bad_samples,
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a saved position; the saving run's world size and batch size may differ.

        Accepts the earlier per-rank format (``position`` = batches of this rank), converted with the
        ``batch_size`` and ``world_size`` it was written with.

        Raises:
            DataError: another seed or data set size (the epoch's order would differ), or an offset
                outside the epoch.
        """
        for k in ("seed", "num_samples"):
            mine = len(self.dataset) if k == "num_samples" else getattr(self, k)
            if k in d and int(d[k]) != mine:
                raise DataError(
                    f"cannot resume the data stream: the checkpoint has data {k}={d[k]}, this run has {mine}"
                )
        offset = int(d["offset"]) if "offset" in d else int(d["position"]) * int(d["batch_size"]) * int(d["world_size"])
        if not 0 <= offset <= len(self.dataset):
            raise DataError(f"saved data offset {offset} outside 0..{len(self.dataset)}")
        self.epoch, self.offset = int(d["epoch"]), offset
        self.bad_samples = int(d.get("bad_samples", 0))
        self.samples_seen = int(d.get("samples_seen", 0))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.batches_left() == 0:  # a finished epoch iterated again restarts it
            self.offset = 0
        _OPEN.add(self)
        try:
            for images, n_bad, bad_idx, idx in self._batches(self.epoch, self.offset):
                if self._record is not None:
                    self._record(self.epoch, self.offset, idx)
                self.offset += self.global_batch
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

    def _batches(self, epoch: int, offset: int) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's batches of ``epoch`` from global position ``offset`` to the end of the epoch:
        (images on device, failed attempts, first bad index, the batch's dataset indices)."""
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
        if self.samples_seen < MIN_SAMPLES_FOR_BAD_CHECK or self.bad_samples <= f * self.samples_seen:
            return
        low = bad_fraction_lower_bound(self.bad_samples, self.samples_seen)
        if low > f:
            raise DataError(
                f"{self.bad_samples} of {self.samples_seen} samples seen on rank {self.rank} failed to decode or read "
                f"({self.bad_samples / self.samples_seen:.1%}; with 99% confidence at least {low:.2%} of the data set, "
                f"above data.max_bad_fraction={f:.1%}; the check starts at {MIN_SAMPLES_FOR_BAD_CHECK} samples seen); "
                f"e.g. {', '.join(self._example(j) for j in self._bad_indices[:3]) or 'n/a'} "
                "(run `mcf data verify` on the data set)"
            )

    def _example(self, index: int) -> str:
        """A bad sample's name and why it is bad (read again here), for an error message."""
        return f"{self.dataset.name(index)} ({self.source.reason(index, getattr(self, 'rejected', ()))})"


class SampleRecorder:
    """Test hook: with ``$MCF_RECORD_SAMPLES=DIR`` every batch delivered appends one ``epoch offset
    index`` line per sample to ``DIR/samples_rank{rank}of{world}_{pid}.txt``: the batch's global
    offset and the dataset index each sample was produced for, as the worker returned it with the
    image (a bad sample's substitute is not recorded). Off (None) otherwise."""

    ENV = "MCF_RECORD_SAMPLES"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> SampleRecorder | None:
        folder = os.environ.get(cls.ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"samples_rank{rank}of{world_size}_{os.getpid()}.txt")

    def __call__(self, epoch: int, offset: int, indices: np.ndarray) -> None:
        with open(self.path, "a") as f:
            f.writelines(f"{epoch} {offset} {int(i)}\n" for i in np.asarray(indices).reshape(-1))


def shutdown_workers(it: Any) -> None:
    """Shut down the workers of a DataLoader iterator: its orderly shutdown, bounded (5 s, then
    SIGKILL: the workers ignore the SIGTERM it would fall back to). No-op without workers."""
    with kill_after(getattr(it, "_workers", ())):
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


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
