"""DALI's start-up check: known JPEGs through the loader's exact graph, compared with the PyTorch loader.

On CUDA the DALI loader decodes with nvJPEG (``mixed``), which no CPU test can run. Before a run
trusts it, :func:`check_dali` decodes a few JPEGs made from real photographs (the built-in faces'
sources in scikit-image: ``astronaut``, ``camera`` and an LFW face, at a few sizes, colour and grey,
4:2:0 and 4:4:4, baseline and progressive) through :func:`mcf.data.loaders.dali_loader.build_pipeline` --
the same operators, decoder device, resize and normalisation as the loader -- with the loader's own
transform (crop box and flip from ``(seed, epoch, index)``), and compares every image with PIL's
decode + the PyTorch loader's transform (:meth:`PretrainTransform.apply`).

Tolerance, in 8-bit levels (normalised difference x std x 255): per image, mean |difference| <=
:data:`MEAN_LEVELS` and 99th percentile <= :data:`P99_LEVELS`. On the CPU (libjpeg-turbo, as PIL)
only the resize filters differ: measured mean <= 0.3 levels, p99 <= 5 (at 32 px, a 5x downscale;
<= 1 from 64 px), max <= 11, over 32-224 px with and without RandomResizedCrop. nvJPEG's IDCT and
chroma upsampling differ from libjpeg's by a level or two per pixel, more at sharp colour edges;
a mean of 3 and a p99 of 16 levels leave room for both, while a real fault -- swapped channels, a
missing flip, a wrong crop, mean/std or layout -- is off by tens of levels. Not yet run on a GPU.

Imports DALI only when a check runs.
"""

from __future__ import annotations

import functools
import io
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from mcf.data.core.decode import decode_rgb, prepare_for_dali
from mcf.data.core.transforms import IMAGENET_STD, PretrainTransform, SampleParams
from mcf.data.loaders.dali_loader import (
    FixedBatch,
    build_pipeline,
    close_pipeline,
    first_line,
    sample_columns,
    to_torch,
)

MEAN_LEVELS = 3.0
P99_LEVELS = 16.0


class DaliCheckError(RuntimeError):
    """DALI cannot be used here; ``str(e)`` says why in one line."""


def _jpeg(a: np.ndarray, size: tuple[int, int], **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).resize(size, Image.BICUBIC).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _photos() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(astronaut RGB, camera grey, an LFW face grey)`` as uint8; a synthetic stand-in without
    scikit-image (smooth colour gradients, edges and noise)."""
    try:
        from skimage import data as skdata

        face = np.asarray(skdata.lfw_subset()[0])
        face = np.clip(face * (255.0 if face.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        return np.asarray(skdata.astronaut(), np.uint8), np.asarray(skdata.camera(), np.uint8), face
    except Exception:  # ImportError, or a wheel without its data files
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:256, 0:256] / 256.0
        rgb = np.stack([np.sin(9 * x), np.cos(7 * y), (x > 0.5) ^ (y > 0.3)], -1) * 100 + 120
        rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
        return rgb, rgb[..., 0].copy(), rgb[64:96, 64:96, 1].copy()


@functools.cache
def reference_jpegs() -> tuple[bytes, ...]:
    """The check's JPEGs (made once per process)."""
    astronaut, camera, face = _photos()
    return (
        _jpeg(astronaut, (160, 128), quality=90),  # 4:2:0 colour
        _jpeg(astronaut[30:230, 130:330], (88, 72), quality=75, progressive=True),  # the face, odd size
        _jpeg(camera, (96, 96), quality=85),  # grey (one component)
        _jpeg(np.stack([face] * 3, -1), (64, 64), quality=95, subsampling=0),  # 4:4:4, grey content in colour
    )


def _sample_params(transform: PretrainTransform, k: int, width: int, height: int) -> SampleParams:
    """The loader's crop box for sample ``k``; the flip alternates when the transform flips."""
    p = transform.params(width, height, seed=0, epoch=0, index=k)
    return replace(p, flip=transform.hflip and k % 2 == 1)


def compare(device: torch.device, transform: PretrainTransform) -> list[tuple[float, float, float]]:
    """Decode the reference JPEGs through the DALI loader's graph on ``device``: per image, the
    ``(mean, 99th percentile, max)`` absolute difference from the PyTorch loader, in 8-bit levels.
    Raises whatever DALI raises."""
    samples, want = [], []
    for k, data in enumerate(reference_jpegs()):
        img = decode_rgb(data)
        p = _sample_params(transform, k, *img.size)
        x0, y0, x1, y1 = p.box
        samples.append((np.frombuffer(prepare_for_dali(data)[0], np.uint8), np.array([y0, x0], np.float32),
                        np.array([y1, x1], np.float32), np.array(int(p.flip), np.int32), 0, -1, k))
        want.append(transform.apply(img, p))  # (3, S, S) float32, normalised
    pipe = build_pipeline(FixedBatch(sample_columns(samples)), batch_size=len(want), device=device,
                          img_size=transform.img_size, prefetch=1)
    try:
        images, *_ = pipe.run()
        got = to_torch(images, device).float().cpu().numpy()  # (B, 3, S, S)
    finally:
        close_pipeline(pipe)
    ref = np.stack(want)
    if got.shape != ref.shape:
        raise DaliCheckError(f"DALI's output has shape {got.shape}, the PyTorch loader's {ref.shape}")
    levels = np.abs(got - ref) * np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1) * 255.0
    return [(float(d.mean()), float(np.percentile(d, 99)), float(d.max())) for d in levels]


def check_dali(device: torch.device, transform: PretrainTransform) -> None:
    """:func:`compare` within the tolerance, or :class:`DaliCheckError` with a one-line reason
    (DALI missing, no GPU decoder, a pipeline error, a mismatch)."""
    try:
        stats = compare(device, transform)
    except DaliCheckError:
        raise
    except Exception as e:  # ImportError (no DALI), no GPU decoder, a broken install, a pipeline error
        raise DaliCheckError(f"{type(e).__name__}: {first_line(e)[:200]}") from None
    for k, (mean, p99, _) in enumerate(stats):
        if not (mean <= MEAN_LEVELS and p99 <= P99_LEVELS):  # also catches NaN
            raise DaliCheckError(
                f"reference JPEG {k} differs from PIL + the PyTorch transform by {mean:.2f} levels mean, {p99:.1f} p99 "
                f"(tolerance {MEAN_LEVELS}, {P99_LEVELS})"
            )
