"""Input feeds for the benchmarks: synthetic JPEG files, the paper's PIL DataLoader, mcf's loader.

The paper's feed is a plain ``torch.utils.data.DataLoader`` over PIL images with torchvision
transforms (resize, flip, to-tensor, normalise), as the release's ``util/datasets.py`` did; mcf's
feed is :func:`mcf.data.build_pretrain_loader` (DALI when it works here, else its PyTorch loader).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_jpeg_folder(root: str | os.PathLike, count: int, size: int = 256, unique: int = 64, seed: int = 0) -> Path:
    """``count`` JPEG files (``size``², quality 90) under ``root/images``: ``unique`` distinct smooth
    images with noise (natural-image-like entropy, not zeros), linked to reach ``count``.

    Reuses an existing folder with at least ``count`` files.
    """
    from PIL import Image

    folder = Path(root) / "images"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    unique = max(1, min(unique, count))
    originals = []
    for i in range(unique):
        low = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(size, size, 3))
        path = folder / f"{i:07d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        originals.append(path)
    for i in range(unique, count):
        link = folder / f"{i:07d}.jpg"
        if not link.exists():
            os.link(originals[i % unique], link)
    return folder


class PaperImageDataset(torch.utils.data.Dataset):
    """The release's feed: PIL open → RGB → Resize(S, S) → RandomHorizontalFlip → ToTensor → Normalize."""

    def __init__(self, folder: str | os.PathLike, img_size: int, length: int | None = None):
        from torchvision import transforms

        self.files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not self.files:
            raise FileNotFoundError(f"no images under {folder}")
        self.length = length or len(self.files)
        self.transform = transforms.Compose([
            transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i % len(self.files)]) as img:
            return self.transform(img.convert("RGB"))


def paper_loader(folder: str | os.PathLike, img_size: int, batch_size: int, workers: int, device: torch.device,
                 length: int | None = None) -> torch.utils.data.DataLoader:
    """The release's DataLoader: shuffled, pinned on a GPU, partial batch dropped, workers not persistent."""
    return torch.utils.data.DataLoader(PaperImageDataset(folder, img_size, length), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)


def paper_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless batches from ``loader`` copied to ``device`` the way the release did (non_blocking)."""
    while True:
        for images in loader:
            yield images.to(device, non_blocking=True)


def tensor_loader(batch_size: int, img_size: int, batches: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    """Compute-only paper feed: a plain DataLoader over in-memory random images (no decoding)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch_size * batches, 3, img_size, img_size, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data), batch_size=batch_size, shuffle=True, drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )


def tensor_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    while True:
        for (images,) in loader:
            yield images.to(device, non_blocking=True)


def staged_batches(
    batch_size: int, img_size: int, device: torch.device, batches: int = 2, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Compute-only mcf feed: batches already on ``device``, rotated (no host work per step)."""
    g = torch.Generator().manual_seed(seed)
    staged = [torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device) for _ in range(batches)]
    return itertools.cycle(staged)


def mcf_loader(
    path: str | os.PathLike, img_size: int, batch_size: int, workers: int, device: torch.device, loader: str = "auto",
    prefetch: int = 2,
) -> tuple[Any, str]:
    """mcf's pre-training loader on ``path`` (``loader``: auto | dali | torch) and the kind it chose."""
    from mcf.data import DataConfig, build_pretrain_loader

    cfg = DataConfig(path=str(path), loader=loader, num_workers=workers, prefetch=prefetch)
    ld = build_pretrain_loader(
        cfg, img_size=img_size, batch_size=batch_size, rank=0, world_size=1, seed=0, device=device
    )
    return ld, ld.kind


def mcf_batches(loader: Any) -> Iterator[torch.Tensor]:
    """Endless batches from an mcf loader, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader
