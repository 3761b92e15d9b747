"""Crops and augmentations of the fine-tuning tasks, as explicit 2×3 affine maps.

Each sample is warped by one affine map ``A`` (source pixels → output pixels); landmarks go through
the same map, and predictions go back through its inverse, so NMEs are measured in the original
image's pixels against the benchmark's own boxes. Randomness is a pure function of
``(seed, epoch, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, 0x646F776E])


def similarity(center: tuple[float, float], side: float, out: int, angle_deg: float = 0.0) -> np.ndarray:
    """``[2, 3]`` map taking the square of ``side`` px centred at ``center`` (rotated by ``angle``) to ``out``×``out``."""
    s = out / side
    a = math.radians(angle_deg)
    c, si = s * math.cos(a), s * math.sin(a)
    cx, cy = center
    # rotate/scale about the centre, then move the centre to the output's centre
    return np.array([[c, si, out / 2 - c * cx - si * cy], [-si, c, out / 2 + si * cx - c * cy]], dtype=np.float64)


def invert(a: np.ndarray) -> np.ndarray:
    full = np.vstack([a, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply_points(a: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``[K, 2]`` (x, y) through ``[2, 3]``."""
    return pts @ a[:, :2].T + a[:, 2]


def warp(image: Image.Image, a: np.ndarray, out: int, resample: int = Image.BILINEAR, fill: int | tuple = 0) -> Image.Image:
    inv = invert(a)  # PIL wants output → input
    return image.transform((out, out), Image.AFFINE, data=tuple(inv.reshape(-1)), resample=resample, fillcolor=fill)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → ``[3, H, W]`` float32, ImageNet mean/std (the pre-training normalisation)."""
    x = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Augment:
    """Random similarity jitter: rotation ±``rotate`` degrees, scale in 1 ± ``scale``, shift ±``shift`` of the side."""

    rotate: float = 15.0
    scale: float = 0.1
    shift: float = 0.05

    def draw(self, rng: np.random.Generator) -> tuple[float, float, float, float]:
        return (rng.uniform(-self.rotate, self.rotate), 1 + rng.uniform(-self.scale, self.scale),
                rng.uniform(-self.shift, self.shift), rng.uniform(-self.shift, self.shift))


@dataclass(frozen=True)
class AlignmentTransform:
    """Face crop around the box (side = ``context`` × the box's longer side), jittered when training.

    Returns the normalised image ``[3, S, S]``, the points in the crop scaled to ``[0, 1]`` and the
    affine map (for mapping predictions back).
    """

    size: int
    context: float = 1.25
    augment: Augment | None = None

    def __call__(self, image: Image.Image, pts: np.ndarray, box: np.ndarray, rng: np.random.Generator | None = None):
        x1, y1, x2, y2 = box
        cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1, 1.0) * self.context
        angle = 0.0
        if self.augment is not None and rng is not None:
            angle, s, dx, dy = self.augment.draw(rng)
            cx, cy, side = cx + dx * side, cy + dy * side, side / s
        a = similarity((cx, cy), side, self.size, angle)
        img = warp(image, a, self.size)
        target = apply_points(a, pts) / self.size
        return to_tensor(img), torch.from_numpy(target.astype(np.float32)), a


@dataclass(frozen=True)
class ParsingTransform:
    """Whole image resized to ``S``×``S`` (labels: nearest), then jittered when training.

    Evaluation resizes the logits back to the label map's own size (the exact inverse of the plain
    resize), so F1 is measured at the benchmark's resolution, not at ``S`` px.
    """

    size: int
    augment: Augment | None = None

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None):
        S = self.size
        img = image.resize((S, S), Image.BILINEAR)
        lab = Image.fromarray(label).resize((S, S), Image.NEAREST)
        if self.augment is not None and rng is not None:
            angle, s, dx, dy = self.augment.draw(rng)
            a = similarity((S / 2 + dx * S, S / 2 + dy * S), S / s, S, angle)
            img, lab = warp(img, a, S), warp(lab, a, S, Image.NEAREST, fill=0)
        return to_tensor(img), torch.from_numpy(np.asarray(lab, dtype=np.int64))
