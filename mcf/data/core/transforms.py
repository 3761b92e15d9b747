"""The pre-training transform, as released: resize to the input size, random horizontal flip,
ImageNet mean/std; RandomResizedCrop as an option.

Randomness is a pure function of ``(seed, epoch, index)`` (a counter-based numpy generator per
sample), never a global RNG, so both loaders apply the same crop and flip to the same sample and a
resumed run reproduces the uninterrupted one. The parameters are computed here and applied either
with PIL (PyTorch loader) or handed to DALI's ``resize``/``crop_mirror_normalize``.

Imports numpy and PIL only (DALI's spawned source workers import it); torch only inside
:meth:`PretrainTransform.__call__` and :func:`normalize_batch`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def sample_rng(seed: int, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The generator of one sample's randomness; independent of any global state."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, attempt, 0x6D6366])


@dataclass(frozen=True)
class SampleParams:
    """Where to crop (pixel box in the source image, ``x0, y0, x1, y1``) and whether to flip."""

    box: tuple[int, int, int, int]
    flip: bool


@dataclass(frozen=True)
class PretrainTransform:
    """Transform parameters shared by both loaders.

    Args:
        img_size: output side (square), pixels.
        random_resized_crop: sample a crop (torchvision's RandomResizedCrop rule) before resizing;
            otherwise the whole image is resized (the released behaviour).
        crop_scale: area fraction range of the crop.
        crop_ratio: aspect ratio range of the crop.
        hflip: flip horizontally with p=0.5.
    """

    img_size: int
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def params(self, width: int, height: int, *, seed: int, epoch: int, index: int) -> SampleParams:
        """The crop box and flip of sample ``index`` in ``epoch`` for an image of this size."""
        rng = sample_rng(seed, epoch, index)
        flip = bool(self.hflip and rng.random() < 0.5)
        box = (0, 0, width, height)
        if self.random_resized_crop:
            box = self._crop_box(rng, width, height)
        return SampleParams(box=box, flip=flip)

    def _crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                y0 = int(rng.integers(0, height - h + 1))
                x0 = int(rng.integers(0, width - w + 1))
                return (x0, y0, x0 + w, y0 + h)
        # Fallback: the central crop with the ratio clamped into range (as torchvision).
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            w, h = int(round(height * self.crop_ratio[1])), height
        else:
            w, h = width, height
        x0, y0 = (width - w) // 2, (height - h) // 2
        return (x0, y0, x0 + w, y0 + h)

    def apply_uint8(self, img: Image.Image, p: SampleParams) -> np.ndarray:
        """PIL RGB image -> cropped, resized, flipped uint8 ``(3, img_size, img_size)`` array, not
        yet normalised. The PyTorch loader's workers return this (a quarter of float32's bytes to
        move between processes) and normalise whole batches on the device with :func:`normalize_batch`."""
        s = self.img_size
        a = np.asarray(img.resize((s, s), Image.BILINEAR, box=p.box))  # (H, W, 3) uint8
        if p.flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def apply(self, img: Image.Image, p: SampleParams) -> np.ndarray:
        """PIL RGB image -> normalised float32 ``(3, img_size, img_size)`` array."""
        return normalize(self.apply_uint8(img, p))

    def __call__(self, img: Image.Image, *, seed: int = 0, epoch: int = 0, index: int = 0):
        """PIL image -> normalised float32 torch tensor ``(3, img_size, img_size)``."""
        import torch

        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return torch.from_numpy(self.apply(rgb, self.params(*rgb.size, seed=seed, epoch=epoch, index=index)))


def normalize(a: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 3, H, W)`` -> ImageNet-normalised float32: ``(a / 255 - mean) / std``."""
    return np.ascontiguousarray((a.astype(np.float32) / np.float32(255.0) - _MEAN) / _STD, dtype=np.float32)


@functools.cache
def _mean_std(device):
    """ImageNet mean and std as float32 ``(1, 3, 1, 1)`` tensors on ``device``, made once per device
    (a fresh host-to-GPU copy per batch would synchronise the stream)."""
    import torch

    mean, std = (
        torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (IMAGENET_MEAN, IMAGENET_STD)
    )
    return mean, std


def normalize_batch(x, dtype=None):
    """uint8 torch ``(B, 3, H, W)`` -> ImageNet-normalised float32 (or ``dtype``) on x's device;
    the same arithmetic, in the same order and precision, as :func:`normalize`."""
    import torch

    mean, std = _mean_std(x.device)
    y = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return y if dtype is None else y.to(dtype)


def build_transform(
    img_size: int,
    *,
    random_resized_crop: bool = False,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
) -> PretrainTransform:
    """The pre-training transform (see :class:`PretrainTransform`)."""
    if img_size <= 0:
        raise ValueError("img_size must be positive")
    return PretrainTransform(
        img_size=img_size, random_resized_crop=random_resized_crop, crop_scale=tuple(crop_scale), hflip=hflip
    )
