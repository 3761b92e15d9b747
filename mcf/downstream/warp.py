"""Face frames: the map that puts a face into FaRL's 512-px frame, FaRL's RoI tanh-warp, and
resampling between an image and its frame in both directions.

Coordinates are pixel coordinates with pixel centres at integers (pixel ``i`` spans ``[i - ½, i + ½]``),
as in OpenCV and FaRL. A *frame* is a ``frame × frame`` square (FaRL: 512 px). A sample enters it by
a 3×3 affine ``matrix`` (source px → frame px: a box crop, a 5-point similarity, or a plain resize),
optionally followed by the tanh warp. The network sees the frame sampled at ``size`` px; FaRL warps
to 512 px and its backbone resizes to 448 (bilinear, ``align_corners=False``), which is the same map
with two interpolations instead of one.

The tanh warp is FaRL's (``GetTransformMap`` / ``GetInvertedTransformMap`` of py-blueprint 0.0.1,
``make_tanh_warp_grid`` / ``make_inverted_tanh_warp_grid`` in facer's transform.py; Lin et al., "Face
Parsing with RoI Tanh-Warping", CVPR 2019): per axis, on ``u = X / frame · 2 − 1``, the central
``|u| ≤ 1 − k`` is kept and the rest of the plane is squeezed into the border by a tanh, so the whole
image lands in the frame with the face at full resolution. (It is Cartesian, per axis; the polar
variant of Lin et al. 2021 is not what FaRL's LaPa configs use.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FARL_FRAME = 512  # farl/datasets/prepare.py: LaPa aligned into (512, 512); every FaRL augmenter warps to [512, 512]
# FaRL's five-point face template (left eye, right eye, nose tip, left and right mouth corner), written as
# 512-px positions / 256 - 1 and placed at (p + 1) * (frame - 1) / 2: py-blueprint GetFaceAlignMatrix and
# facer transform.py _standard_face_pts / get_face_align_matrix (target_face_scale 1.0).
FARL_TEMPLATE_UNIT = (
    np.array([[196.0, 226.0], [316.0, 226.0], [256.0, 286.0], [220.0, 360.4], [292.0, 360.4]]) / 256.0 - 1.0
)
# FaRL's arctanh clamp (py-blueprint _safe_arctanh): the inverse warp of a frame border pixel stays finite.
ATANH_CLAMP = 0.999


def template_points(frame: int = FARL_FRAME) -> np.ndarray:
    """``[5, 2]`` FaRL's template in a ``frame``-px frame (frame 512: left eye at (195.6, 225.6))."""
    return (FARL_TEMPLATE_UNIT + 1.0) * (frame - 1) / 2.0


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) ``dst ≈ M · src``.

    ``src``, ``dst``: ``[N, 2]``, N ≥ 2. Returns ``[3, 3]``. Written with complex numbers: the linear
    part ``z = a + ib`` minimising ``Σ |d − z·s|²`` over centred points is ``Σ conj(s)·d / Σ |s|²``
    (the estimate of skimage's ``SimilarityTransform`` that FaRL uses, for non-reflected points).
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = float((s * s).sum())
    if not var > 0:
        raise ValueError("similarity from coincident points")
    a = float((s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum()) / var
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / var
    lin = np.array([[a, -b], [b, a]])
    t = mu_d - lin @ mu_s
    return np.array([[a, -b, t[0]], [b, a, t[1]], [0.0, 0.0, 1.0]])


def box_matrix(box: np.ndarray, frame: int = FARL_FRAME, stretch: bool = False) -> np.ndarray:
    """``[3, 3]``: the box (x1, y1, x2, y2) onto the frame.

    ``stretch=False``: the square of the box's longer side, centred on the box (the aspect ratio kept).
    ``stretch=True``: the box itself, its width and height scaled apart onto the square frame, as FaRL's
    ``UpdateCropAndResizeMatrix`` does under every alignment protocol (identical for a square box; an
    AFLW-19 box 1.3:1 comes out 1.3× taller). The edges go to the frame's pixel edges
    (``x → (x − x1) / w · frame − ½``, ``align_corners=False``).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if stretch:
        w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    else:
        w = h = max(x2 - x1, y2 - y1, 1e-6)
    sx, sy = frame / w, frame / h
    return np.array([[sx, 0.0, -(cx - w / 2) * sx - 0.5], [0.0, sy, -(cy - h / 2) * sy - 0.5], [0.0, 0.0, 1.0]])


def resize_matrix(width: int, height: int, frame: int = FARL_FRAME) -> np.ndarray:
    """``[3, 3]``: the whole ``width × height`` image resized onto the frame (``align_corners=False``; the aspect
    ratio is not kept)."""
    sx, sy = frame / width, frame / height
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def about_centre(
    frame: int, angle_deg: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """``[3, 3]`` frame → frame: rotate by ``angle`` and scale about the frame centre, then shift (px).

    FaRL's ``_compose_rotate_and_scale`` with ``from_center = to_center = ((frame − 1) / 2, ·)``:
    ``X' = s·R(θ)·(X − c) + c + shift``; ``scale > 1`` zooms in.
    """
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    m = (frame - 1) / 2.0
    return np.array([[c, -s, m - c * m + s * m + shift[0]], [s, c, m - s * m - c * m + shift[1]], [0.0, 0.0, 1.0]])


def tanh_warp(u: torch.Tensor, k: float) -> torch.Tensor:
    """Normalised frame coordinates (``u ∈ ℝ``; the frame is ``[−1, 1]``) → warped, inside ``(−1, 1)``.
    ``k`` ∈ [0, 1] is the warp factor: 0 = no warp, 1 = tanh over the whole frame."""
    if k <= 0:
        return u
    lo = 1.0 - k
    out = lo + k * torch.tanh((u.abs() - lo) / k)
    return torch.where(u.abs() > lo, out.copysign(u), u)


def tanh_unwarp(v: torch.Tensor, k: float) -> torch.Tensor:
    """Inverse of :func:`tanh_warp` (the tanh argument clamped to ±0.999 as FaRL does, so the border stays finite)."""
    if k <= 0:
        return v
    lo = 1.0 - k
    out = lo + k * torch.atanh(((v.abs() - lo) / k).clamp(max=ATANH_CLAMP))
    return torch.where(v.abs() > lo, out.copysign(v), v)


def _affine(pts: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` through ``[3, 3]`` (or ``[B, 3, 3]`` with ``pts`` ``[B, ..., 2]``)."""
    lin, t = matrix[..., :2, :2], matrix[..., :2, 2]
    if matrix.ndim == 3:
        shape = pts.shape
        flat = pts.reshape(shape[0], -1, 2)
        return (flat @ lin.transpose(1, 2) + t[:, None]).reshape(shape)
    return pts @ lin.T + t


def to_frame(pts, matrix, frame: int = FARL_FRAME, warp_factor: float = 0.0) -> torch.Tensor:
    """Source px ``[..., 2]`` → frame px (affine, then the tanh warp). float64."""
    pts, matrix = torch.as_tensor(pts, dtype=torch.float64), torch.as_tensor(matrix, dtype=torch.float64)
    x = _affine(pts, matrix)
    if warp_factor > 0:
        x = (tanh_warp(x / frame * 2 - 1, warp_factor) + 1) / 2 * frame
    return x


def from_frame(pts, matrix, frame: int = FARL_FRAME, warp_factor: float = 0.0) -> torch.Tensor:
    """Frame px ``[..., 2]`` → source px (inverse of :func:`to_frame`). float64."""
    pts, matrix = torch.as_tensor(pts, dtype=torch.float64), torch.as_tensor(matrix, dtype=torch.float64)
    if warp_factor > 0:
        pts = (tanh_unwarp(pts / frame * 2 - 1, warp_factor) + 1) / 2 * frame
    return _affine(pts, torch.linalg.inv(matrix))


def _pixel_grid(h: int, w: int) -> torch.Tensor:
    """``[h, w, 2]`` (x, y) pixel centres, float64."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1)


def _sample(src: torch.Tensor, xy: torch.Tensor, mode: str) -> torch.Tensor:
    """``src [N, C, H, W]`` at source px ``xy [N, h, w, 2]`` (zeros outside) → ``[N, C, h, w]``."""
    H, W = src.shape[-2:]
    scale = torch.tensor([2.0 / W, 2.0 / H], dtype=torch.float64)
    grid = ((xy + 0.5) * scale - 1).to(src.dtype)  # align_corners=False: pixel i ↔ (2i + 1) / W − 1
    return F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_to_frame(
    image: torch.Tensor,
    matrix,
    size: int,
    frame: int = FARL_FRAME,
    warp_factor: float = 0.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """``image [C, H, W]`` → its frame sampled at ``size`` px, ``[C, size, size]`` (zeros outside the image).

    Output pixel ``i`` is frame position ``(i + ½) · frame / size − ½`` (the frame resized to ``size``).
    """
    out = _pixel_grid(size, size)
    frame_xy = (out + 0.5) * (frame / size) - 0.5
    src_xy = from_frame(frame_xy, matrix, frame, warp_factor)  # (size, size, 2)
    return _sample(image[None], src_xy[None], mode)[0]


def warp_from_frame(
    maps: torch.Tensor,
    matrix,
    out_hw: tuple[int, int],
    frame: int = FARL_FRAME,
    warp_factor: float = 0.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """``maps [C, S, S]`` in the frame (sampled at S px) → the source image's ``[C, H, W]``; zeros where the
    frame does not reach. Used to bring logits back to the original image before the argmax (FaRL's
    ``GetInvertedTransformMap`` + ``TransformByMap(bilinear)``)."""
    size = maps.shape[-1]
    frame_xy = to_frame(_pixel_grid(*out_hw), matrix, frame, warp_factor)  # (H, W, 2)
    s_xy = (frame_xy + 0.5) * (size / frame) - 0.5
    return _sample(maps[None], s_xy[None], mode)[0]
