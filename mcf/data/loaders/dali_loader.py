"""The NVIDIA DALI implementation of :class:`~mcf.data.loaders.base.PretrainLoader`.

Graph (:func:`build_pipeline`): a parallel ``external_source`` (``batch=True, batch_info=True``;
Python workers started with ``spawn``, each opening its own LMDB environment) reads the encoded
bytes in our sampler's order, validates them (bad samples substituted and counted, exotic formats
re-encoded, see :func:`mcf.data.core.decode.prepare_for_dali`, so a file DALI cannot decode should never
reach the decoder) and computes each sample's crop box and flip from ``(seed, epoch, index)``; then
``decoders.image`` (``device="mixed"`` = nvJPEG on a GPU, ``"cpu"`` otherwise) -> ``resize`` of the
crop box to ``S x S`` (linear, antialiased) -> ``crop_mirror_normalize`` to float32 NCHW.
:mod:`mcf.data.loaders.dali_check` runs this same graph on known images at start-up.

The same external source serves image folders and LMDBs: DALI's ``fn.readers.file`` (sharded with
``stick_to_shard=True``) would feed undecodable files straight to the decoder, where one error
stops the pipeline, and its shuffle cannot be resumed mid-epoch at an exact sample.

A file that passes our checks but that DALI's decoder still rejects (nvJPEG is stricter than
libjpeg on some damaged files) fails its batch: the loader then decodes each sample of that batch
alone through the same graph, adds the ones that fail to the source's ``rejected`` set (from then
on they are bad samples, substituted and counted like undecodable files), and rebuilds the
pipeline at the same batch. A failure that no single sample explains is a
:class:`~mcf.errors.DataError` naming the batch.

Worker processes: started with the stop signals ignored, killed by the kernel when the trainer
dies (:func:`mcf.data.core.workers.worker_init`), and killed after a bounded wait on :meth:`close`.

Verified here on DALI's CPU pipeline only (``device_id=None``). The ``"mixed"`` decoder and the
GPU output copy (``feed_ndarray`` into a CUDA tensor) are written to DALI's documented API but could
not be run on this CPU-only machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mcf.data.core.source import DaliBatchSource
from mcf.data.core.transforms import IMAGENET_MEAN, IMAGENET_STD
from mcf.data.core.workers import kill_after, stop_signals_ignored
from mcf.data.loaders.base import PretrainLoader
from mcf.errors import DataError

logger = logging.getLogger(__name__)

def decoder_device(device: torch.device) -> str:
    """``"mixed"`` (nvJPEG, output on the GPU) for a CUDA device, ``"cpu"`` otherwise."""
    return "mixed" if torch.device(device).type == "cuda" else "cpu"


def pipeline_device_id(device: torch.device) -> int | None:
    """DALI's ``device_id``: the CUDA ordinal, or None for a CPU-only pipeline."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def to_torch(tl: Any, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) -> a torch tensor on ``device``."""
    t = tl.as_tensor()
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t)).to(device)


def build_pipeline(
    source: Callable[[Any], tuple[list[np.ndarray], ...]],
    *,
    batch_size: int,
    device: torch.device,
    img_size: int,
    num_workers: int = 0,
    prefetch: int = 2,
    seed: int = 0,
):
    """The loader's DALI graph over ``source`` (a batch-mode ``external_source`` callable taking a
    ``BatchInfo`` and returning the seven columns of :class:`~mcf.data.core.source.DaliBatchSource`).

    ``num_workers`` > 0 runs ``source`` in that many spawned Python workers (it must be picklable
    and importable); 0 calls it in this process. Outputs: images (float32 ``(B, 3, S, S)``,
    ImageNet-normalised, on ``device``), failed attempts, first bad index and dataset index per sample.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=max(1, num_workers),
        device_id=pipeline_device_id(device),
        seed=seed & 0x7FFFFFFF,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(1, num_workers),
        py_start_method="spawn",
    )
    parallel = {"parallel": True, "prefetch_queue_depth": prefetch} if num_workers > 0 else {}
    with pipe:
        data, roi0, roi1, mirror, n_bad, bad_idx, idx = fn.external_source(
            source=source,
            num_outputs=7,
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.INT64, types.INT64],
            **parallel,
        )
        images = fn.decoders.image(data, device=decoder_device(device), output_type=types.RGB)
        images = fn.resize(
            images,
            size=[img_size, img_size],
            roi_start=roi0,
            roi_end=roi1,
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        images = fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[v * 255 for v in IMAGENET_STD],
        )
        pipe.set_outputs(images, n_bad, bad_idx, idx)
    with stop_signals_ignored():  # the spawned source workers must not die of a pre-emption signal
        pipe.build()
    return pipe


def close_pipeline(pipe: Any, timeout: float = 5.0) -> None:
    """Stop ``pipe`` and its Python workers: DALI's orderly close, bounded by ``timeout`` seconds
    after which a worker still alive is killed (they ignore SIGTERM, DALI's last resort)."""
    pool = getattr(pipe, "_py_pool", None)
    procs = list(getattr(getattr(pool, "pool", None), "_processes", None) or [])
    with kill_after(procs, timeout):
        if pool is not None:
            pool.close()
        shutdown = getattr(pipe, "_shutdown", None)  # what Pipeline.__del__ calls; now, not at garbage collection
        if shutdown is not None:
            shutdown()


class FixedBatch:
    """An inline ``external_source`` callable that always returns the same columns."""

    def __init__(self, cols: tuple[list[np.ndarray], ...]):
        self.cols = cols

    def __call__(self, batch_info: Any) -> tuple[list[np.ndarray], ...]:
        return self.cols


def sample_columns(samples: list[tuple]) -> tuple[list[np.ndarray], ...]:
    """Per-sample tuples ``(data, roi0, roi1, mirror, n_bad, first_bad, index)`` -> the seven columns."""
    return (
        [s[0] for s in samples],
        [s[1] for s in samples],
        [s[2] for s in samples],
        [s[3] for s in samples],
        [np.array(s[4], np.int32) for s in samples],
        [np.array(s[5], np.int64) for s in samples],
        [np.array(s[6], np.int64) for s in samples],
    )


def first_line(e: BaseException) -> str:
    """The informative first line of an exception's message (DALI puts a header line first)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # DALI: "Critical error in pipeline:" then the operator's message
        if not ln.endswith(":"):
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


class DaliPretrainLoader(PretrainLoader):
    """DALI pipeline over :class:`~mcf.data.core.source.DaliBatchSource`; see the module docstring."""

    kind = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipe = None
        self._src: DaliBatchSource | None = None
        self._consumed = 0
        self.rejected: set[int] = set()  # dataset indices DALI's decoder failed on

    def _build(self, epoch: int, offset: int) -> None:
        self.close()
        self._src = DaliBatchSource(self.source, self.sampler, self.batch_size, epoch, offset, self.rejected)
        self._pipe = build_pipeline(
            self._src,
            batch_size=self.batch_size,
            device=self.device,
            img_size=self.transform.img_size,
            num_workers=self.cfg.num_workers,
            prefetch=self.cfg.prefetch,
            seed=self.seed,
        )
        self._consumed = 0

    def _next_position(self) -> tuple[int, int] | None:
        return None if self._src is None else self._src.position(self._consumed)

    def _batches(self, epoch, offset):
        # The stream continues across epochs; rebuild only when the caller jumped elsewhere.
        if self._pipe is None or self._next_position() != (epoch, offset):
            self._build(epoch, offset)
        while self.batches_left(offset) > 0:
            try:
                images, n_bad, bad_idx, idx = self._pipe.run()
            except Exception as e:  # DALI wraps every error (decoder, Python source) in a RuntimeError
                self._recover(epoch, offset, e)
                continue
            self._consumed += 1
            offset += self.global_batch
            yield (to_torch(images, self.device), np.array(n_bad.as_tensor()), np.array(bad_idx.as_tensor()),
                   np.array(idx.as_tensor()))

    def _recover(self, epoch: int, offset: int, error: Exception) -> None:
        """The batch at global ``offset`` of ``epoch`` failed in the pipeline: find the samples DALI's
        decoder rejects, mark them bad, rebuild at the same batch; raise if no sample explains the failure.
        Terminates: every retry follows a strict growth of the finite ``rejected`` set."""
        src, consumed = self._src, self._consumed
        self.close()
        if "DataError:" in str(error):  # raised by the source itself (not for bad data: e.g. a damaged LMDB)
            raise DataError(str(error).rsplit("DataError:", 1)[-1].strip().splitlines()[0]) from None
        found = self._find_rejected(src, consumed) if src is not None else []
        if not found:
            raise DataError(
                f"DALI failed on the batch at sample {offset} of epoch {epoch} and no single sample of it explains the "
                f"failure ({first_line(error)}); use --loader torch"
            ) from None
        self.rejected.update(found)
        names = ", ".join(self.dataset.name(j) for j in found[:3])
        logger.warning(
            "DALI's decoder rejects %d file(s) that pass mcf's checks; they count as bad samples: %s", len(found), names
        )
        self._build(epoch, offset)

    def _find_rejected(self, src: DaliBatchSource, iteration: int) -> list[int]:
        """Dataset indices that fail alone in the loader's graph, among the samples (substitutes
        included) of batch ``iteration`` of ``src``, or of the batches DALI was preparing after it
        when that one holds none."""
        found: list[int] = []
        holder, pipe = FixedBatch(()), None
        try:
            for it in range(iteration, iteration + 1 + self.cfg.prefetch):
                epoch, idx = src.batch_indices(it)
                for i in idx:
                    while True:  # a rejected sample's substitute may be rejected too
                        sample = self.source.dali_sample(epoch, int(i), self.rejected.union(found))
                        if sample[6] < 0:  # every candidate failed: the placeholder, which decodes
                            break
                        holder.cols = sample_columns([sample])
                        pipe = pipe or build_pipeline(
                            holder, batch_size=1, device=self.device, img_size=self.transform.img_size, prefetch=1
                        )
                        try:
                            pipe.run()
                            break
                        except Exception:
                            found.append(int(sample[6]))
                            close_pipeline(pipe)  # a fresh one for the next: never blame a sample for another's failure
                            pipe = None
                if found:
                    break
        finally:
            if pipe is not None:
                close_pipeline(pipe)
        return found

    def close(self) -> None:
        """Stop the pipeline and its Python workers (the loader can be iterated again afterwards)."""
        pipe, self._pipe, self._src = self._pipe, None, None
        if pipe is not None:
            close_pipeline(pipe)
