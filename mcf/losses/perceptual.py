"""Perceptual loss: MSE between normalised teacher features of the rebuilt and the original image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the teacher lives in mcf.models, which imports this module
    from mcf.models.teacher import PerceptualTeacher


class PerceptualLoss(nn.Module):
    """``Σ_b MSE(norm(T_b(resize(rebuilt))), norm(T_b(resize(original))))`` over teacher blocks b.

    As released: both images are resized to the teacher's input size with nearest interpolation,
    features are the blocks' token outputs ``[N, 1 + L, D]`` L2-normalised along the token axis
    (dim 1), and the original's features carry no gradient. ``norm="feature"`` normalises along D
    and ``resize="bilinear"`` interpolates instead (options beyond the paper).
    """

    def __init__(
        self, teacher: PerceptualTeacher, layers: tuple[int, ...] = (2, 5, 8, 11), norm: str = "token",
        resize: str = "nearest",
    ):
        super().__init__()
        depth = len(teacher.model.blocks)
        if max(layers) >= depth:
            raise ValueError(f"perceptual layers {layers} exceed the teacher's {depth} blocks")
        self.teacher = teacher
        self.layers = tuple(layers)
        self.norm_dim = 1 if norm == "token" else -1
        self.resize = resize

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        size = self.teacher.img_size
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        if self.resize == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, rebuilt: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        dtype = next(self.teacher.parameters()).dtype
        with torch.no_grad():
            targets = self.teacher.features(self._prepare(original.to(dtype)), self.layers)
        preds = self.teacher.features(self._prepare(rebuilt.to(dtype)), self.layers)
        loss = rebuilt.new_zeros((), dtype=torch.float32)
        for p, t in zip(preds, targets):
            loss = loss + F.mse_loss(
                F.normalize(p.float(), dim=self.norm_dim), F.normalize(t.float(), dim=self.norm_dim)
            )
        return loss
