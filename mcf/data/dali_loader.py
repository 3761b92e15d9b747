"""The NVIDIA DALI implementation of :class:`~mcf.data.loader.PretrainLoader`.

Graph: a parallel ``external_source`` (``batch=True, batch_info=True``; Python workers started with
``spawn``, each opening its own LMDB environment) reads the encoded bytes in our sampler's order,
validates them (bad samples substituted and counted, exotic formats re-encoded, see
:func:`mcf.data.decode.prepare_for_dali`, so a file DALI cannot decode never reaches the decoder)
and computes each sample's crop box and flip from ``(seed, epoch, index)``; then
``decoders.image`` (``device="mixed"`` = nvJPEG on a GPU, ``"cpu"`` otherwise) -> ``resize`` of the
crop box to ``S x S`` (linear, antialiased) -> ``crop_mirror_normalize`` to float32 NCHW.

The same external source serves image folders and LMDBs: DALI's ``fn.readers.file`` (sharded with
``stick_to_shard=True``) would feed undecodable files straight to the decoder, where one error
stops the pipeline, and its shuffle cannot be resumed mid-epoch at an exact sample.

Verified here on DALI's CPU pipeline only (``device_id=None``). The ``"mixed"`` decoder and the
GPU output copy (``feed_ndarray`` into a CUDA tensor) are written to DALI's documented API but could
not be run on this CPU-only machine; unit tests cover only the choice of decoder device.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from mcf.data.loader import PretrainLoader, stop_signals_ignored
from mcf.data.source import DaliBatchSource
from mcf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mcf.errors import DataError


def decoder_device(device: torch.device) -> str:
    """``"mixed"`` (nvJPEG, output on the GPU) for a CUDA device, ``"cpu"`` otherwise."""
    return "mixed" if torch.device(device).type == "cuda" else "cpu"


def pipeline_device_id(device: torch.device) -> int | None:
    """DALI's ``device_id``: the CUDA ordinal, or None for a CPU-only pipeline."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _to_torch(tl: Any, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) -> a torch tensor on ``device``."""
    t = tl.as_tensor()
    if type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t)).to(device)


class DaliPretrainLoader(PretrainLoader):
    """DALI pipeline over :class:`~mcf.data.source.DaliBatchSource`; see the module docstring."""

    kind = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipe = None
        self._src: DaliBatchSource | None = None
        self._consumed = 0

    def _build(self, epoch: int, offset: int) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        self.close()
        nw = self.cfg.num_workers
        self._src = DaliBatchSource(self.source, self.sampler, self.batch_size, epoch, offset)
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, nw),
            device_id=pipeline_device_id(self.device),
            seed=self.seed & 0x7FFFFFFF,
            prefetch_queue_depth=self.cfg.prefetch,
            py_num_workers=max(1, nw),
            py_start_method="spawn",
        )
        s = self.transform.img_size
        parallel = {"parallel": True, "prefetch_queue_depth": self.cfg.prefetch} if nw > 0 else {}
        with pipe:
            data, roi0, roi1, mirror, n_bad, bad_idx, idx = fn.external_source(
                source=self._src,
                num_outputs=7,
                batch=True,
                batch_info=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.INT64, types.INT64],
                **parallel,
            )
            images = fn.decoders.image(data, device=decoder_device(self.device), output_type=types.RGB)
            images = fn.resize(
                images,
                size=[s, s],
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
        self._pipe, self._consumed = pipe, 0

    def _next_position(self) -> tuple[int, int] | None:
        return None if self._src is None else self._src.position(self._consumed)

    def _batches(self, epoch, offset):
        # The stream continues across epochs; rebuild only when the caller jumped elsewhere.
        if self._pipe is None or self._next_position() != (epoch, offset):
            self._build(epoch, offset)
        for _ in range(self.batches_left(offset)):
            try:
                images, n_bad, bad_idx, idx = self._pipe.run()
            except RuntimeError as e:  # an error raised in the Python source arrives wrapped
                self.close()
                if "DataError" in str(e):
                    raise DataError(str(e).split("DataError:", 1)[-1].strip().splitlines()[0]) from None
                raise
            self._consumed += 1
            yield (_to_torch(images, self.device), np.array(n_bad.as_tensor()), np.array(bad_idx.as_tensor()),
                   np.array(idx.as_tensor()))

    def close(self) -> None:
        """Stop the pipeline and its Python workers."""
        if self._pipe is not None:
            del self._pipe
            self._pipe = None
            self._src = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def smoke_test(device: torch.device) -> None:
    """Run a one-image DALI pipeline on ``device``; raises if DALI cannot work here."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buf, format="JPEG")
    sample = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=pipeline_device_id(device))
    with pipe:
        data = fn.external_source(source=lambda: [sample], batch=True)
        pipe.set_outputs(fn.decoders.image(data, device=decoder_device(device), output_type=types.RGB))
    pipe.build()
    (out,) = pipe.run()
    if tuple(out.as_tensor().shape()) != (1, 8, 8, 3):
        raise RuntimeError(f"DALI smoke test produced shape {out.as_tensor().shape()}")
    del pipe
