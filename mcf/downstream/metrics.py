"""Benchmark metrics of face alignment and face parsing, as FaRL's scorers compute them.

Alignment (per image, then averaged over the test set; farl/experiments/face_alignment/scorer.py):

* ``nme_diag``: mean point-to-point error / the diagonal of the face box, ``sqrt(w² + h²)``
  (AFLW-19 "NME_diag", as FaRL and the MCF paper report it; all 19 points, visibility ignored).
* ``nme_box``: mean error / ``sqrt(w · h)`` of the face box (AFLW-19 "NME_box", the CCL protocol).
* ``nme_inter_ocular``: mean error / the distance between the outer eye corners (68 points: 36 and
  45, 0-based; AFLW-19: 6 and 11 — FaRL's scorers/ibug300w.yaml and aflw19.yaml).
* ``nme_inter_pupil``: mean error / the distance between the eye centres (68 points: the means of
  36–41 and 42–47; AFLW-19: points 7 and 10).
* ``auc_box_7`` / ``fr_box_7`` (AFLW-19): area under the NME_box cumulative error curve up to 7 %,
  and the share of images above it (FaRL's ``AUC_FR``, step 1e-4, Simpson's rule);
  ``auc_inter_ocular_10`` / ``fr_inter_ocular_10`` (WFLW): the same on NME_inter-ocular up to 10 %.
* WFLW (98 points): inter-ocular = points 60 and 72 (outer eye corners), inter-pupil = 96 and 97
  (FaRL's scorers/wflw.yaml).

Units: every ratio is written twice — ``<name>`` as a **fraction** (0.00932) and ``<name>_percent``
(0.932, the unit of the papers' tables) — so a fraction is never compared with a percentage.

Parsing (LaPa / CelebAMask-HQ): one confusion matrix accumulated over **all pixels of all test
images** (not averaged per image), per-class ``F1 = 2·TP / (2·TP + FP + FN)``. Background (class 0)
is not a reported class. ``mean_f1`` averages the non-background classes with **hair included**
(FaRL's ``fg_mean``: 10 classes on LaPa, 18 on CelebAMask-HQ); ``mean_f1_no_hair`` also drops hair,
for the papers that do.
"""

from __future__ import annotations

import numpy as np
import torch

# 68-point iBUG outer eye corners (0-based)
IBUG68_OUTER_EYES = (36, 45)
# (left, right) index groups; the distance is between the groups' means. FaRL scorers/ibug300w.yaml, aflw19.yaml.
EYE_GROUPS: dict[int, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    68: {"inter_ocular": ((36,), (45,)), "inter_pupil": (tuple(range(36, 42)), tuple(range(42, 48)))},
    19: {"inter_ocular": ((6,), (11,)), "inter_pupil": ((7,), (10,))},
    98: {"inter_ocular": ((60,), (72,)), "inter_pupil": ((96,), (97,))},  # scorers/wflw.yaml
}
AUC_STEP = 1e-4  # FaRL AUC_FR(step=0.0001)

LAPA_CLASSES = (
    "background",
    "skin",
    "left_eyebrow",
    "right_eyebrow",
    "left_eye",
    "right_eye",
    "nose",
    "upper_lip",
    "inner_mouth",
    "lower_lip",
    "hair",
)
# CelebAMask-HQ part files, in the order the release's g_mask.py paints them (later parts overwrite earlier).
CELEBAMASK_PARTS = (
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)
# FaRL's order (farl/datasets/celebamask_hq.py, label_type 'all'): glasses, hats, earrings and necklaces are
# painted last, hair over neck and cloth. The numbers in FaRL's and MCF's tables come from it.
CELEBAMASK_FARL_PARTS = (
    "neck",
    "skin",
    "cloth",
    "l_ear",
    "r_ear",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "nose",
    "mouth",
    "l_lip",
    "u_lip",
    "hair",
    "eye_g",
    "hat",
    "ear_r",
    "neck_l",
)
CELEBAMASK_CLASSES = ("background", *CELEBAMASK_PARTS)
CELEBAMASK_FARL_CLASSES = ("background", *CELEBAMASK_FARL_PARTS)
PERCENT_PREFIXES = ("nme_", "auc_", "fr_", "mean_f1")


def point_errors(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``[N, K, 2]`` x2 → ``[N]`` mean Euclidean error per image, in the coordinates' unit."""
    return (pred.double() - gt.double()).norm(dim=-1).mean(dim=-1)


def box_diag(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes ``x1, y1, x2, y2`` → ``[N]`` diagonals ``sqrt(w² + h²)``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w * w + h * h).sqrt()


def box_size(boxes: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes ``x1, y1, x2, y2`` → ``[N]`` ``sqrt(w · h)``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w * h).clamp(min=0).sqrt()


def eye_distance(gt: torch.Tensor, left: tuple[int, ...], right: tuple[int, ...]) -> torch.Tensor:
    """``[N, K, 2]`` → ``[N]`` distance between the means of two groups of ground-truth points."""
    return (gt[:, list(left)].double().mean(1) - gt[:, list(right)].double().mean(1)).norm(dim=-1)


def inter_ocular(gt: torch.Tensor, eyes: tuple[int, int] = IBUG68_OUTER_EYES) -> torch.Tensor:
    """``[N, K, 2]`` → ``[N]`` distance between the outer eye corners of the ground truth."""
    return eye_distance(gt, (eyes[0],), (eyes[1],))


def nme(pred: torch.Tensor, gt: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-image normalised mean error."""
    return point_errors(pred, gt) / norm.double().clamp(min=1e-12)


def auc_fr(nmes: torch.Tensor, threshold: float, step: float = AUC_STEP) -> tuple[float, float]:
    """Area under the cumulative error curve of ``nmes`` up to ``threshold`` (normalised to 1) and the
    failure rate: FaRL's ``AUC_FR`` (its x axis ``arange(0, threshold + step, step)``, Simpson's rule)."""
    from scipy.integrate import simpson

    errs = np.sort(nmes.double().numpy())
    xs = np.arange(0.0, threshold + step, step)
    ced = np.searchsorted(errs, xs, side="right") / len(errs)  # share of images with NME <= x
    return float(simpson(ced, x=xs) / threshold), float(1.0 - ced[-1])


def add_percent(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus ``<key>_percent = 100 × value`` for every NME, AUC, FR and mean F1 (a ``subset/``
    prefix is kept)."""
    out = dict(metrics)
    for k, v in metrics.items():
        if k.rsplit("/", 1)[-1].startswith(PERCENT_PREFIXES) and not k.endswith("_percent"):
            out[f"{k}_percent"] = 100.0 * v
    return out


def alignment_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    boxes: torch.Tensor | None,
    auc_threshold: float | None = None,
    auc_norm: str = "box",
) -> dict[str, float]:
    """The NMEs that apply (fractions): box-normalised ones when ``boxes`` is given, inter-ocular and
    inter-pupil for 19-, 68- and 98-point sets; ``auc_<auc_norm>_<t>`` / ``fr_<auc_norm>_<t>`` (``t`` the
    threshold in percent) when ``auc_threshold``, on the per-image NMEs of ``auc_norm`` (``box``,
    ``inter_ocular``, ...)."""
    per_image: dict[str, torch.Tensor] = {}
    if boxes is not None:
        per_image["diag"] = nme(pred, gt, box_diag(boxes))
        per_image["box"] = nme(pred, gt, box_size(boxes))
    for name, (left, right) in EYE_GROUPS.get(gt.shape[1], {}).items():
        per_image[name] = nme(pred, gt, eye_distance(gt, left, right))
    out = {f"nme_{k}": float(v.mean()) for k, v in per_image.items()}
    if auc_threshold is not None:
        if auc_norm not in per_image:
            raise ValueError(f"no {auc_norm} NME for {gt.shape[1]} points to take an AUC of")
        t = round(auc_threshold * 100)
        out[f"auc_{auc_norm}_{t}"], out[f"fr_{auc_norm}_{t}"] = auc_fr(per_image[auc_norm], auc_threshold)
    return out


class ConfusionMatrix:
    """Pixel confusion counts accumulated over a dataset: ``m[true, pred]`` (int64)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.m = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target``: integer label maps of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
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
