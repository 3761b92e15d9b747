"""Per-sample fetching shared by both loaders: read, validate, substitute bad samples, augment.

A bad sample at position ``index`` of ``epoch`` -- undecodable, or unreadable: any error reading it
(:data:`READ_ERRORS`) -- is replaced by the sample at ``sample_rng(seed, epoch, index,
attempt).integers(n)`` for ``attempt = 1, 2, ...`` -- a fixed function of the position, so every
loader and every resume makes the same substitution -- and each failed attempt is counted. The
crop/flip are those of the position ``(seed, epoch, index)``.

Nothing here raises for bad data, so no worker process ever dies of it: when all
:data:`MAX_ATTEMPTS` candidates fail, the sample is a blank placeholder with ``n_bad ==
MAX_ATTEMPTS`` and the loader, in the main process, stops the run (:class:`~mcf.errors.DataError`).

Numpy/PIL/lmdb only: :class:`DaliBatchSource` is pickled into DALI's spawned workers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
from PIL import Image

from mcf.data.core.decode import BadImage, decode_rgb, prepare_for_dali
from mcf.data.core.sampler import DistributedSampler
from mcf.data.core.transforms import PretrainTransform, SampleParams, sample_rng
from mcf.data.core.workers import worker_init
from mcf.errors import DataError

MAX_ATTEMPTS = 16


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading one sample may raise that makes it a bad sample: a decode failure, any I/O
    error, a record missing from an LMDB (DataError) or an LMDB read error."""
    errors: tuple[type[BaseException], ...] = (BadImage, OSError, DataError)
    try:
        import lmdb

        errors += (lmdb.Error,)
    except ImportError:
        pass
    return errors


READ_ERRORS = _read_errors()

# What a sample whose every candidate failed decodes to (DALI needs a valid image); the loader
# raises before such a batch is used.
_PLACEHOLDER = io.BytesIO()
Image.new("RGB", (8, 8)).save(_PLACEHOLDER, format="PNG")
PLACEHOLDER_PNG = _PLACEHOLDER.getvalue()


class SampleSource:
    """Fetches augmented samples by ``(epoch, index)`` from an encoded-image dataset."""

    def __init__(self, dataset: Any, transform: PretrainTransform, seed: int, max_attempts: int = MAX_ATTEMPTS):
        self.dataset, self.transform, self.seed, self.max_attempts = dataset, transform, seed, max_attempts

    def _candidates(self, epoch: int, index: int):
        yield index
        n = len(self.dataset)
        for attempt in range(1, self.max_attempts):
            yield int(sample_rng(self.seed, epoch, index, attempt).integers(n))

    def _fetch(
        self,
        epoch: int,
        index: int,
        decode: Callable[[bytes], Any],
        rejected: Collection[int] = (),
    ) -> tuple[Any, int, int, int]:
        """``(decoded, failed attempts, first bad index or -1, index used or -1)``; ``decoded`` is
        None when all :attr:`max_attempts` candidates failed. ``rejected`` indices count as bad."""
        n_bad, first_bad = 0, -1
        for j in self._candidates(epoch, index):
            try:
                if j in rejected:
                    raise BadImage("rejected by DALI's decoder")
                return decode(self.dataset.read_bytes(j)), n_bad, first_bad, j
            except READ_ERRORS:
                n_bad += 1
                first_bad = j if first_bad < 0 else first_bad
        return None, n_bad, first_bad, -1

    def reason(self, index: int, rejected: Collection[int] = ()) -> str:
        """Why sample ``index`` is bad (it is read and decoded again; for error messages)."""
        if index in rejected:
            return "rejected by DALI's decoder"
        try:
            decode_rgb(self.dataset.read_bytes(index), self.dataset.max_pixels)
        except READ_ERRORS as e:
            return str(e) or type(e).__name__
        return "decodes now"

    def params(self, epoch: int, index: int, width: int, height: int) -> SampleParams:
        return self.transform.params(width, height, seed=self.seed, epoch=epoch, index=index)

    def torch_sample(self, epoch: int, index: int) -> tuple[np.ndarray, int, int]:
        """``(uint8 (3, S, S) augmented image, failed attempts, first bad index or -1)``; the loader
        normalises whole batches (:func:`~mcf.data.core.transforms.normalize_batch`)."""
        mp = self.dataset.max_pixels
        img, n_bad, first_bad, _ = self._fetch(epoch, index, lambda b: decode_rgb(b, mp))
        if img is None:
            s = self.transform.img_size
            return np.zeros((3, s, s), dtype=np.uint8), n_bad, first_bad
        return self.transform.apply_uint8(img, self.params(epoch, index, *img.size)), n_bad, first_bad

    def dali_sample(
        self,
        epoch: int,
        index: int,
        rejected: Collection[int] = (),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, int]:
        """``(encoded uint8 bytes, roi_start [y, x], roi_end [y, x], mirror, failed, first bad, index
        used)``; the indices in ``rejected`` (files DALI's decoder failed on) count as bad."""
        mp = self.dataset.max_pixels
        prepared, n_bad, first_bad, used = self._fetch(epoch, index, lambda b: prepare_for_dali(b, mp), rejected)
        data, h, w = prepared if prepared is not None else (PLACEHOLDER_PNG, 8, 8)
        p = self.params(epoch, index, w, h)
        x0, y0, x1, y1 = p.box
        return (
            np.frombuffer(data, dtype=np.uint8),
            np.array([y0, x0], dtype=np.float32),
            np.array([y1, x1], dtype=np.float32),
            np.array(int(p.flip), dtype=np.int32),
            n_bad,
            first_bad,
            used,
        )


class TorchSampleDataset:
    """Map-style dataset for ``torch.utils.data.DataLoader``: indexed by ``(epoch, index)`` pairs
    (what :class:`DistributedSampler` yields), so persistent workers need no epoch broadcast."""

    def __init__(self, source: SampleSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int, int, int]:
        """``(uint8 image, failed attempts, first bad index or -1, index)``."""
        epoch, index = key
        return (*self.source.torch_sample(epoch, index), index)


class DaliBatchSource:
    """The callable of DALI's parallel ``external_source`` (``batch=True, batch_info=True``).

    It is a pure function of the iteration number: the stream starts at global position
    ``start_offset`` of epoch ``base_epoch`` and runs through that epoch's remaining batches, then
    through whole epochs ``base_epoch + 1, …`` from offset 0, so it crosses epoch boundaries without
    a pipeline reset and prefetching never stalls; the loader counts what it consumed to know the
    ``(epoch, offset)`` of the next output. Batch indices are computed from the sampler's order per
    batch (O(batch) memory in each worker).

    Outputs (per sample): encoded bytes (uint8), roi_start and roi_end ([y, x] float32), mirror
    (int32), failed decode attempts (int32), the first bad dataset index (int64, -1 if none) and the
    sample's dataset index (int64). ``rejected``: dataset indices DALI's decoder failed on,
    substituted like undecodable files.

    Unpickled in a spawned DALI worker, it first runs :func:`~mcf.data.core.workers.worker_init` there
    (stop signals ignored, killed with its parent).
    """

    def __init__(
        self,
        source: SampleSource,
        sampler: DistributedSampler,
        batch_size: int,
        base_epoch: int,
        start_offset: int,
        rejected: Collection[int] = frozenset(),
    ):
        self.source, self.sampler, self.batch_size = source, sampler, batch_size
        self.base_epoch, self.start_offset = base_epoch, start_offset
        self.rejected = frozenset(rejected)
        self.step = batch_size * sampler.world_size  # global samples per batch
        self.first = sampler.share(start_offset) // batch_size  # batches left in the base epoch
        self.per_epoch = sampler.per_rank // batch_size
        self._owner = os.getpid()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() != self._owner:  # a DALI worker process (a copy within the owner is not one)
            worker_init()

    def position(self, iteration: int) -> tuple[int, int]:
        """``(epoch, global offset)`` of the stream's batch ``iteration``."""
        if iteration < self.first:
            return self.base_epoch, self.start_offset + iteration * self.step
        epochs, b = divmod(iteration - self.first, self.per_epoch)
        return self.base_epoch + 1 + epochs, b * self.step

    def batch_indices(self, iteration: int) -> tuple[int, np.ndarray]:
        """``(epoch, dataset indices)`` of batch ``iteration`` of the stream."""
        epoch, offset = self.position(iteration)
        return epoch, self.sampler.take(epoch, offset, 0, self.batch_size)

    def __call__(self, batch_info) -> tuple[list[np.ndarray], ...]:
        it = batch_info if isinstance(batch_info, int) else batch_info.iteration
        epoch, idx = self.batch_indices(it)
        cols: tuple[list, ...] = ([], [], [], [], [], [], [])
        for i in idx.tolist():
            data, r0, r1, flip, n_bad, first_bad, _ = self.source.dali_sample(epoch, i, self.rejected)
            values = (
                data, r0, r1, flip, np.array(n_bad, np.int32), np.array(first_bad, np.int64), np.array(i, np.int64),
            )
            for col, v in zip(cols, values):
                col.append(v)
        return cols
