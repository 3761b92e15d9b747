"""The PyTorch implementation of :class:`~mcf.data.loaders.base.PretrainLoader`:
``torch.utils.data.DataLoader`` workers running :class:`~mcf.data.core.source.TorchSampleDataset`.
"""

from __future__ import annotations

import numpy as np
import torch

from mcf.data.core.source import TorchSampleDataset
from mcf.data.core.transforms import normalize_batch
from mcf.data.core.workers import worker_init
from mcf.data.loaders.base import PretrainLoader, shutdown_workers


def _collate(items: list[tuple[np.ndarray, int, int, int]]) -> tuple[torch.Tensor, ...]:
    imgs = torch.from_numpy(np.stack([it[0] for it in items]))  # (B, 3, S, S)
    return imgs, *(torch.tensor([it[k] for it in items]) for k in (1, 2, 3))


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

    def _batches(self, epoch, offset):
        self.sampler.set_epoch(epoch)
        self.sampler.set_offset(offset)
        nb = self.device.type == "cuda"
        for imgs, n_bad, bad_idx, idx in self._loader:  # uint8 from the workers, normalised here on the device
            yield normalize_batch(imgs.to(self.device, non_blocking=nb)), n_bad.numpy(), bad_idx.numpy(), idx.numpy()

    def close(self) -> None:
        """Shut the persistent workers down (see :func:`shutdown_workers`)."""
        loader = getattr(self, "_loader", None)
        if loader is not None and loader._iterator is not None:
            it, loader._iterator = loader._iterator, None
            shutdown_workers(it)
