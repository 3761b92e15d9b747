"""Remote webdataset shards (``pipe:`` commands, fsspec URLs), streamed by the PyTorch loader.

A remote shard cannot be read by offset, so it is read front to back (the local indexer's header
checks, :func:`~mcf.data.tar_index.stream_samples`; nothing extracted to disk). The epoch's shard
sequence is that of local shards (shards shuffled per ``(seed, epoch)``, :class:`ShardSampler`),
but each rank takes a contiguous ``N // world_size``
of it (dealing every shard's samples over the ranks, as local shards do, would stream every shard on
every rank), and then:

* the rank's batches are split into ``S = max(1, data.num_workers)`` contiguous runs, one per
  *stream* (DataLoader worker); the DataLoader takes batches from the streams in turn, so batch
  ``t`` of the epoch is batch ``t // S`` of stream ``t % S``;
* a stream reads its run in windows of ``data.shuffle_buffer`` samples (rounded to whole batches),
  holds one window's encoded bytes (the bounded shuffle buffer) and emits it in an order drawn from
  ``(seed, epoch, the window's first position)``;
* a sample that fails to decode, or is missing because its shard broke off (a truncated shard, a
  failed command, a network error), is replaced by another sample of the same window drawn from
  ``(seed, epoch, index, attempt)`` and counted, like every other source's bad samples.

So the order depends on the world size, the batch size and ``data.num_workers`` (with one rank and at
most one worker it is exactly the local shards' order): a resumed run must keep all three (checked),
and it then continues exactly, each stream re-reading at most its current window (and skipping up to
one shard's samples to reach it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mcf.data.core.decode import BadImage, decode_rgb, max_file_bytes
from mcf.data.core.source import MAX_ATTEMPTS
from mcf.data.core.tar_index import TarDamage, stream_samples
from mcf.data.core.transforms import PretrainTransform, normalize_batch, sample_rng
from mcf.data.core.workers import worker_init
from mcf.data.formats.shards import STREAM_STALL_S, ShardSampler, StreamedShards, open_stream
from mcf.data.loaders.base import PretrainLoader, shutdown_workers
from mcf.errors import DataError

log = logging.getLogger(__name__)


class _Reader:
    """Samples of one stream, read shard by shard; keeps the current shard open between windows."""

    def __init__(self, urls: list[str], max_bytes: int | None = None, stall_s: float = STREAM_STALL_S):
        self.urls, self.max_bytes, self.stall_s = urls, max_bytes, stall_s
        self._at: tuple[int, int] | None = None  # (shard, next sample) of the open stream
        self._ctx: contextlib.ExitStack | None = None
        self._gen: Iterator[bytes] | None = None

    def _open(self, shard: int) -> None:
        self.close()
        self._ctx = contextlib.ExitStack()
        try:
            f = self._ctx.enter_context(open_stream(self.urls[shard], self.stall_s))
            self._gen = stream_samples(f, self.max_bytes)
        except (DataError, OSError) as e:
            log.warning("shard %s: %s", self.urls[shard], e)
            self._gen = iter(())
        self._at = (shard, 0)

    def _next(self) -> bytes | None:
        try:
            data = next(self._gen)
        except StopIteration:
            return None
        except TarDamage as e:
            log.warning("shard %s broke off: %s", self.urls[self._at[0]], e)
            self._gen = iter(())
            return None
        self._at = (self._at[0], self._at[1] + 1)
        return data

    def read(self, shard: int, first: int, stop: int) -> list[bytes | None]:
        """Samples ``first..stop-1`` of ``shard`` (None where the shard ended early)."""
        if self._at != (shard, first):
            self._open(shard)
            for _ in range(first):
                if self._next() is None:
                    break
        out: list[bytes | None] = []
        for _ in range(first, stop):
            out.append(self._next() if self._at == (shard, first + len(out)) else None)
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
        self._ctx, self._gen, self._at = None, None, None


class StreamPlan:
    """Which batches each stream makes (see the module docstring); numpy only, pickled into workers."""

    def __init__(self, sampler: ShardSampler, batch_size: int, num_batches: int, streams: int, window: int):
        self.sampler, self.batch_size, self.num_batches, self.streams = sampler, batch_size, num_batches, streams
        self.window = max(batch_size, window // batch_size * batch_size)
        q, r = divmod(num_batches, streams)
        self.first_batch = [w * q + min(w, r) for w in range(streams + 1)]  # stream w: batches [first[w], first[w+1])

    def delivered(self, stream: int, position: int) -> int:
        """Batches of ``stream`` among the first ``position`` batches of the epoch."""
        return position // self.streams + (1 if stream < position % self.streams else 0)

    def pieces(self, epoch: int, a: int, b: int) -> list[tuple[int, int, int]]:
        """``(shard, first sample, stop)`` runs covering rank positions ``a..b-1`` (before the window shuffle)."""
        order, cum = self.sampler._shard_order(epoch)
        g0 = self.sampler.rank * self.sampler.per_rank
        out = []
        g, end = g0 + a, g0 + b
        while g < end:
            k = int(np.searchsorted(cum, g, side="right")) - 1
            stop = min(end, int(cum[k + 1]))
            out.append((int(order[k]), g - int(cum[k]), stop - int(cum[k])))
            g = stop
        return out

    def windows(self, stream: int, skip_batches: int) -> Iterator[tuple[int, int, int]]:
        """``(first position, stop, outputs to drop)`` of the windows ``stream`` still has to emit."""
        lo, hi = self.first_batch[stream] * self.batch_size, self.first_batch[stream + 1] * self.batch_size
        skip = skip_batches * self.batch_size
        first = lo + skip // self.window * self.window
        drop = skip - (first - lo)
        for a in range(first, hi, self.window):
            yield a, min(a + self.window, hi), drop
            drop = 0


class _StreamBatches(torch.utils.data.IterableDataset):
    """One epoch's batches from ``position`` on; each DataLoader worker runs one stream."""

    def __init__(
        self,
        plan: StreamPlan,
        urls: list[str],
        transform: PretrainTransform,
        seed: int,
        max_pixels: int,
        epoch: int,
        position: int,
        stall_s: float = STREAM_STALL_S,
    ):
        super().__init__()
        self.plan, self.urls, self.transform, self.seed, self.max_pixels = plan, urls, transform, seed, max_pixels
        self.epoch, self.position, self.stall_s = epoch, position, stall_s

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        k = 0 if info is None else info.id
        stream = (self.position + k) % self.plan.streams  # the stream whose turn follows `position`
        reader = _Reader(self.urls, max_file_bytes(self.max_pixels), self.stall_s)
        try:
            yield from self._stream(stream, reader)
        finally:
            reader.close()

    def _stream(self, stream: int, reader: _Reader) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``stream``: (uint8 images, failed attempts, first bad sample id, sample ids)."""
        plan, epoch, bs = self.plan, self.epoch, self.plan.batch_size
        start = plan.sampler.start
        base = plan.sampler.rank * plan.sampler.per_rank
        for a, b, drop in plan.windows(stream, plan.delivered(stream, self.position)):
            ids: list[int] = []
            data: list[bytes | None] = []
            for shard, m0, m1 in plan.pieces(epoch, a, b):
                ids.extend(range(int(start[shard]) + m0, int(start[shard]) + m1))
                data.extend(reader.read(shard, m0, m1))
            perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, base + a, 0x77696E64]).permutation(b - a)
            for q0 in range(drop, b - a, bs):
                slots = perm[q0 : q0 + bs]
                out = [self._sample(ids, data, int(j)) for j in slots]
                yield (
                    torch.from_numpy(np.stack([o[0] for o in out])),
                    torch.tensor([o[1] for o in out]),
                    torch.tensor([o[2] for o in out]),
                    torch.tensor([ids[int(j)] for j in slots]),
                )

    def _sample(self, ids: list[int], data: list[bytes | None], j: int) -> tuple[np.ndarray, int, int]:
        """Window slot ``j``, or a substitute drawn from the window when it is bad:
        ``(uint8 image, failed attempts, first bad sample id or -1)``."""
        sid, n_bad, first_bad = ids[j], 0, -1
        cand = j
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                img = decode_rgb(data[cand] or b"", self.max_pixels)
                return (
                    self.transform.apply_uint8(
                        img, self.transform.params(*img.size, seed=self.seed, epoch=self.epoch, index=sid)
                    ),
                    n_bad,
                    first_bad,
                )
            except BadImage:
                n_bad += 1
                first_bad = ids[cand] if first_bad < 0 else first_bad
                cand = int(sample_rng(self.seed, self.epoch, sid, attempt).integers(len(ids)))
        raise DataError(
            f"{MAX_ATTEMPTS} samples in a row failed to decode in the shuffle window of sample {sid}: "
            "the shards are mostly unreadable or missing"
        )


class ShardStreamLoader(PretrainLoader):
    """PyTorch loader over remote shards (see the module docstring); a fresh DataLoader per iteration."""

    kind = "torch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.dataset, StreamedShards):
            raise TypeError("ShardStreamLoader reads StreamedShards")
        self.streams = max(1, self.cfg.num_workers)
        self.shard_sampler = ShardSampler(
            self.dataset.shard_counts(),
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            window=self.cfg.shuffle_buffer,
        )
        self.plan = StreamPlan(
            self.shard_sampler, self.batch_size, self.num_batches, self.streams, self.cfg.shuffle_buffer
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "streams": self.streams}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("world_size", "batch_size"):  # the per-rank ranges and the streams' runs depend on both
            if k in d and int(d[k]) != getattr(self, k):
                raise DataError(
                    f"streamed shards resume only with the same {k}: the checkpoint has {d[k]}, this run "
                    f"{getattr(self, k)} (local shards and the other sources can change it)"
                )
        if "streams" in d and int(d["streams"]) != self.streams:
            raise DataError(
                f"streamed shards resume exactly only with the same data.num_workers: the checkpoint used "
                f"{max(1, int(d['streams']))} stream(s), this run {self.streams}; set data.num_workers={d['streams']}"
            )
        super().load_state_dict(d)

    def _batches(self, epoch, offset):
        position = offset // self.global_batch  # this rank's batches of the epoch (same world and batch size: checked)
        ds = _StreamBatches(
            self.plan, list(self.dataset.spec.urls), self.transform, self.seed, self.dataset.max_pixels, epoch,
            position, self.cfg.stream_stall_s,
        )
        nw = self.cfg.num_workers
        self.close()
        if nw == 0:
            batches: Any = iter(ds)
        else:
            batches = self._it = iter(torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=nw,
                persistent_workers=False,
                prefetch_factor=self.cfg.prefetch,
                worker_init_fn=worker_init,
                pin_memory=self.device.type == "cuda",
            ))
        nb = self.device.type == "cuda"
        try:
            for imgs, n_bad, bad_idx, idx in batches:
                yield (
                    normalize_batch(imgs.to(self.device, non_blocking=nb)),
                    n_bad.numpy(),
                    bad_idx.numpy(),
                    idx.numpy(),
                )
        except DataError as e:  # re-raised from a worker with its traceback in the message: keep the last line
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def close(self) -> None:
        """Shut down the workers of the epoch being streamed, if any."""
        it, self._it = getattr(self, "_it", None), None
        if it is not None:
            shutdown_workers(it)
