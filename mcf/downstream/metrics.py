"""Benchmark metrics of face alignment and face parsing.

Alignment (per image, then averaged over the test set; reported as fractions, ×100 for "%"):

* ``nme_diag``: mean point-to-point error / the diagonal of the face box, ``sqrt(w² + h²)``
  (AFLW-19 "NME_diag", as FaRL and the MCF paper report it; all 19 points, visibility ignored).
* ``nme_box``: mean error / ``sqrt(w · h)`` of the face box (AFLW-19 "NME_box", the CCL protocol).
* ``nme_inter_ocular``: mean error / the distance between the outer eye corners (300W / iBUG 68
  points 37 and 46, 1-based: indices 36 and 45).

Parsing (LaPa / CelebAMask-HQ): one confusion matrix accumulated over **all pixels of all test
images** (not averaged per image), per-class ``F1 = 2·TP / (2·TP + FP + FN)``. Background (class 0)
is not a reported class. ``mean_f1`` averages the non-background classes with **hair included**
(LaPa paper and FaRL tables); ``mean_f1_no_hair`` also drops hair, for the papers that do.
"""

from __future__ import annotations

import numpy as np
import torch

# 68-point iBUG outer eye corners (0-based)
IBUG68_OUTER_EYES = (36, 45)

LAPA_CLASSES = ("background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye", "nose", "upper_lip", "inner_mouth",
                "lower_lip", "hair")
# CelebAMask-HQ: label i+1 is CELEBAMASK_PARTS[i], painted in this order (later parts overwrite), as the
# dataset's own g_mask.py does; 0 = background.
CELEBAMASK_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip", "hair",
                    "hat", "ear_r", "neck_l", "neck", "cloth")
CELEBAMASK_CLASSES = ("background", *CELEBAMASK_PARTS)


def point_errors(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``[N, K, 2]`` x2 → ``[N]`` mean Euclidean error per image, in the coordinates' unit."""
    return (pred.float() - gt.float()).norm(dim=-1).mean(dim=-1)


def box_diag(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes ``x1, y1, x2, y2`` → ``[N]`` diagonals ``sqrt(w² + h²)``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w * w + h * h).sqrt()


def box_size(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes ``x1, y1, x2, y2`` → ``[N]`` ``sqrt(w · h)``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w * h).clamp(min=0).sqrt()


def inter_ocular(gt: torch.Tensor, eyes: tuple[int, int] = IBUG68_OUTER_EYES) -> torch.Tensor:
    """``[N, K, 2]`` → ``[N]`` distance between the outer eye corners of the ground truth."""
    return (gt[:, eyes[0]].float() - gt[:, eyes[1]].float()).norm(dim=-1)


def nme(pred: torch.Tensor, gt: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-image normalised mean error."""
    return point_errors(pred, gt) / norm.float().clamp(min=1e-12)


def alignment_metrics(pred: torch.Tensor, gt: torch.Tensor, boxes: torch.Tensor | None) -> dict[str, float]:
    """The NMEs that apply: box-normalised ones when ``boxes`` is given, inter-ocular for 68 points."""
    out: dict[str, float] = {}
    if boxes is not None:
        out["nme_diag"] = float(nme(pred, gt, box_diag(boxes)).mean())
        out["nme_box"] = float(nme(pred, gt, box_size(boxes)).mean())
    if gt.shape[1] == 68:
        out["nme_inter_ocular"] = float(nme(pred, gt, inter_ocular(gt)).mean())
    return out


class ConfusionMatrix:
    """Pixel confusion counts accumulated over a dataset: ``m[true, pred]`` (int64)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.m = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target``: integer label maps of the same shape (any batch layout)."""
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        idx = target[keep] * self.num_classes + pred[keep]
        self.m += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def f1(self) -> torch.Tensor:
        """``[C]`` per-class F1 (NaN for a class absent from both prediction and truth)."""
        tp = self.m.diag().double()
        fp = self.m.sum(0).double() - tp
        fn = self.m.sum(1).double() - tp
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


def parsing_metrics(cm: ConfusionMatrix, class_names: tuple[str, ...], hair: str = "hair") -> dict[str, float]:
    """``f1/<class>`` for every non-background class, ``mean_f1`` (hair included) and ``mean_f1_no_hair``."""
    f1 = cm.f1()
    out = {f"f1/{name}": float(f1[i]) for i, name in enumerate(class_names) if i > 0}
    vals = np.array([out[f"f1/{n}"] for n in class_names[1:]])
    out["mean_f1"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    no_hair = np.array([out[f"f1/{n}"] for n in class_names[1:] if n != hair])
    out["mean_f1_no_hair"] = float(np.nanmean(no_hair)) if np.isfinite(no_hair).any() else float("nan")
    return out
