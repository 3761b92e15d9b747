"""Crops, alignments and augmentations of the fine-tuning tasks, built on :mod:`mcf.downstream.warp`.

Every sample goes into a ``frame``-px frame (FaRL: 512) by one 3×3 matrix (source px → frame px):
a box crop (alignment; stretched to the square frame as FaRL does, or squared), FaRL's 5-point
similarity (LaPa) or a plain resize (CelebAMask-HQ, LaPa's ``resize`` option); training draws a random
rotation/scale/shift about the frame centre on top; an optional tanh warp follows; the network sees the
frame sampled at ``size`` px. Landmarks go through the same map and predictions come back through its
inverse, so NMEs are measured in the original image's pixels; parsing logits are warped back onto the
original label map before the argmax. Randomness is a pure function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mcf.downstream.warp import (
    FARL_FRAME,
    about_centre,
    box_matrix,
    fit_similarity,
    resize_matrix,
    template_points,
    to_frame,
    warp_to_frame,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY, as py-blueprint RandomGray uses


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, 0x646F776E])


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → ``[3, H, W]`` float32 in [0, 1]."""
    return (
        torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    )


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [0, 1] → ImageNet mean/std, mcf's pre-training normalisation (FaRL normalises with
    CLIP's statistics inside its backbone: each encoder gets the statistics it was pre-trained with)."""
    mean = torch.from_numpy(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Augment:
    """Random rotation / scale / shift about the frame centre (FaRL's ``UpdateRandomTransformMatrix``).

    ``rotate`` (degrees) and ``scale`` are half-widths of uniform draws, or standard deviations when
    ``rotate_normal`` / ``scale_normal``; the drawn scale is added to the crop's own zoom (``1 / context``);
    ``shift`` is a fraction of the frame side, uniform per axis.
    """

    rotate: float = 15.0
    scale: float = 0.1
    shift: float = 0.05
    rotate_normal: bool = False
    scale_normal: bool = False

    def draw(self, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """(angle degrees, scale offset, shift x, shift y as fractions of the side)."""
        dx, dy = rng.uniform(-self.shift, self.shift, 2)
        angle = rng.normal(0.0, self.rotate) if self.rotate_normal else rng.uniform(-self.rotate, self.rotate)
        ds = rng.normal(0.0, self.scale) if self.scale_normal else rng.uniform(-self.scale, self.scale)
        return float(angle), float(ds), float(dx), float(dy)


@dataclass(frozen=True)
class Photometric:
    """FaRL's colour augmentations on the warped image in [0, 1] (py-blueprint 0.0.1 augmenters, the values
    of FaRL's ``augmenters/train.yaml``): a black occlusion box (alignment only), noise blended with
    probability ``noise_p``, grey with probability ``gray_p``, gamma √x / x / x² (one third each), a box
    blur of up to ``blur`` × the side."""

    occlusion: bool = False
    noise_p: float = 0.0
    gray_p: float = 0.1  # RandomGray(gray_ratio=0.1)
    gamma: bool = True
    blur: float = 0.01  # RandomBlur(scale=0.01)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        _, h, w = x.shape
        if self.occlusion:  # RandomOcclusion(h_min=0.2, h_max=0.8, w_delta=0.2)
            rh = rng.uniform(0.2, 0.8)
            rw = rh - 0.2 + 0.4 * rng.uniform()
            cx, cy = int((w - 1) * rng.uniform()), int((h - 1) * rng.uniform())
            dw, dh = int(w / 2 * rw), int(h / 2 * rh)
            x = x.clone()
            x[
                :,
                max(0, cy - dh // 2) : min(h - 1, cy + dh // 2) + 1,
                max(0, cx - dw // 2) : min(w - 1, cx + dw // 2) + 1,
            ] = 0
        if self.noise_p > 0 and rng.uniform() < self.noise_p:  # Maybe(0.5, NoiseFusion): alpha ~ U(0, 0.5)
            alpha = 0.5 * rng.uniform()
            x = (1 - alpha) * x + alpha * torch.from_numpy(rng.uniform(size=x.shape).astype(np.float32))
        if rng.uniform() < self.gray_p:
            g = sum(c * wt for c, wt in zip(x, GRAY_WEIGHTS))
            x = g.expand(3, h, w).clone()
        if self.gamma:
            x = x.clamp(0, 1)
            g = rng.integers(-1, 2)
            x = x.sqrt() if g == -1 else (x * x if g == 1 else x)
        k = int((h + w) / 2 * rng.uniform(0.0, self.blur))
        if k > 1:  # OpenCV blur: k×k mean, anchor at k // 2, reflect-101 border
            left = k // 2
            padded = F.pad(x.clamp(0, 1)[None], (left, k - 1 - left, left, k - 1 - left), mode="reflect")
            x = F.avg_pool2d(padded, k, stride=1)[0]
        return x


@dataclass(frozen=True)
class AlignmentTransform:
    """Face crop: the box × ``context`` onto the frame (FaRL: ``context`` = 1 / ``scale_mu``: 1.0 on AFLW-19,
    1.25 on 300W and WFLW), jittered and recoloured when training. ``stretch``: the box's width and height
    scaled apart onto the square frame (FaRL); otherwise the square of its longer side.

    Returns the normalised image ``[3, S, S]``, the points in the frame scaled to ``[0, 1]``
    (``(X + ½) / frame``, FaRL's ``normalize_points``) and the 3×3 source → frame matrix.
    """

    size: int
    context: float = 1.25
    augment: Augment | None = None
    color: Photometric | None = None
    frame: int = FARL_FRAME
    warp_factor: float = 0.0
    stretch: bool = False

    def matrix(self, box: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        base = box_matrix(box, self.frame, self.stretch)
        angle, ds, dx, dy = (
            self.augment.draw(rng) if self.augment is not None and rng is not None else (0.0, 0.0, 0.0, 0.0)
        )
        return about_centre(self.frame, angle, 1.0 / self.context + ds, (dx * self.frame, dy * self.frame)) @ base

    def __call__(
        self, image: Image.Image, pts: np.ndarray, box: np.ndarray, rng: np.random.Generator | None = None
    ):
        m = self.matrix(box, rng)
        x = warp_to_frame(image_tensor(image), m, self.size, self.frame, self.warp_factor)
        if self.color is not None and rng is not None:
            x = self.color(x, rng)
        target = (to_frame(pts, m, self.frame, self.warp_factor) + 0.5) / self.frame
        return normalize(x), target.float(), m


@dataclass(frozen=True)
class ParsingTransform:
    """Face parsing input: ``crop='align'`` maps the 5 alignment points onto FaRL's template (LaPa),
    ``'resize'`` resizes the whole image onto the frame (CelebAMask-HQ; LaPa's plain-resize option);
    then the random rotation/scale/shift and the tanh warp (``warp_factor``; FaRL LaPa: 0.8).

    Returns the normalised image ``[3, S, S]``, the label map in the frame ``[S, S]`` int64 (nearest,
    0 outside the image) and the 3×3 source → frame matrix (without the random part, for evaluation).
    """

    size: int
    crop: Literal["align", "resize"] = "resize"
    augment: Augment | None = None
    color: Photometric | None = None
    frame: int = FARL_FRAME
    warp_factor: float = 0.0

    def base_matrix(self, width: int, height: int, align_points: np.ndarray | None) -> np.ndarray:
        if self.crop == "resize":
            return resize_matrix(width, height, self.frame)
        if align_points is None:
            raise ValueError("crop='align' needs the 5 alignment points")
        return fit_similarity(align_points, template_points(self.frame))

    def __call__(
        self,
        image: Image.Image,
        label: np.ndarray,
        align_points: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ):
        base = self.base_matrix(image.width, image.height, align_points)
        m = base
        if self.augment is not None and rng is not None:
            angle, ds, dx, dy = self.augment.draw(rng)
            m = about_centre(self.frame, angle, 1.0 + ds, (dx * self.frame, dy * self.frame)) @ base
        x = warp_to_frame(image_tensor(image), m, self.size, self.frame, self.warp_factor)
        lab = warp_to_frame(
            torch.from_numpy(label.astype(np.float32))[None],
            m,
            self.size,
            self.frame,
            self.warp_factor,
            mode="nearest",
        )
        if self.color is not None and rng is not None:
            x = self.color(x, rng)
        return normalize(x), lab[0].round().long(), base
