"""Training losses of the fine-tuning tasks.

Alignment, FaRL's (``farl/experiments/face_alignment/task.py`` with ``loss_weights: coord_l1_loss 1.0,
heatmap_ce_loss 1.0``, ``heatmap_size 128``, ``heatmap_radius 5.0`` in every ``trainers/*_farl.yaml``):

* ``coord``: the **Euclidean** distance between predicted and true points in the crop's ``[0, 1]``
  coordinates, averaged over the points (FaRL names it ``coord_l1_loss``; it is an L2 norm per point,
  not an L1 of the coordinates);
* ``heatmap``: binary cross-entropy with logits between the predicted heatmap logits, resized bilinearly
  to 128 × 128, and Gaussian targets drawn there (:func:`point_heatmaps`), averaged over pixels and points.

Both are means over the batch. ``l1`` (mcf's light head) is the mean absolute coordinate error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FARL_HEATMAP_SIZE = 128
FARL_HEATMAP_RADIUS = 5.0


def point_heatmaps(
    points: torch.Tensor, size: int = FARL_HEATMAP_SIZE, radius: float = FARL_HEATMAP_RADIUS
) -> torch.Tensor:
    """``[N, K, 2]`` points in [0, 1] → ``[N, K, size, size]`` targets: FaRL's ``points2heatmap`` with the
    ``gaussian_awing`` kernel, ``exp(−8 r² / radius²)`` (σ = radius / 4) at the pixel centres within
    ``radius`` pixels of the point (``X = x · size − ½``), 0 elsewhere."""
    p = points.detach().float() * size - 0.5  # (N, K, 2) heatmap px
    grid = torch.arange(size, device=p.device, dtype=p.dtype)
    dx = grid.view(1, 1, 1, size) - p[..., 0, None, None]  # (N, K, 1, S)
    dy = grid.view(1, 1, size, 1) - p[..., 1, None, None]  # (N, K, S, 1)
    r2 = dx * dx + dy * dy  # (N, K, S, S)
    return torch.where(r2 <= radius * radius, torch.exp(-8.0 * r2 / (radius * radius)), torch.zeros_like(r2))


def coord_distance_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-image mean Euclidean point distance (FaRL's ``coord_l1_loss``)."""
    return (pred.float() - target.float()).norm(dim=-1).mean()


def heatmap_bce_loss(
    logits: torch.Tensor,
    target_points: torch.Tensor,
    size: int = FARL_HEATMAP_SIZE,
    radius: float = FARL_HEATMAP_RADIUS,
) -> torch.Tensor:
    """FaRL's ``heatmap_ce_loss``: BCE with logits of the ``size``-px resized logits against
    :func:`point_heatmaps`."""
    resized = F.interpolate(logits.float(), (size, size), mode="bilinear", align_corners=False)
    return F.binary_cross_entropy_with_logits(resized, point_heatmaps(target_points, size, radius))


def farl_alignment_loss(points: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``coord + heatmap`` (weights 1 and 1), FaRL's alignment objective."""
    return coord_distance_loss(points, target) + heatmap_bce_loss(logits, target)


def alignment_loss(output, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The training loss of a landmark model's training-mode ``output`` against ``target`` (``[N, K, 2]`` in
    [0, 1]): ``farl`` needs ``(points, heatmap logits)`` (:class:`~mcf.downstream.heads.HeatmapLandmarkModel`);
    ``l1`` takes points (or the points of such a pair)."""
    if loss == "farl":
        if not isinstance(output, tuple):
            raise ValueError("the farl alignment loss needs a heatmap head (--head uper)")
        return farl_alignment_loss(output[0], output[1], target)
    if loss == "l1":
        points = output[0] if isinstance(output, tuple) else output
        return F.l1_loss(points.float(), target.float())
    raise ValueError(f"alignment loss must be farl or l1, got {loss!r}")
