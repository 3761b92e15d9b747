"""Tiny synthetic datasets written in the exact on-disk layouts of AFLW-19, iBUG ``.pts`` folders,
LaPa and CelebAMask-HQ — for tests and smoke runs where the real benchmarks are not available.

Each image is a random-coloured ellipse "face" on noise; landmarks are drawn as bright dots and
parsing labels are concentric regions, so a head can learn them in a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mcf.downstream.datasets import AFLW_TRAIN_SIZE, write_pts


def _face(rng: np.random.Generator, size: int, num_points: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """(image, points [K, 2], box x1, y1, x2, y2)."""
    img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    r = rng.uniform(0.25, 0.32) * size
    box = np.array([cx - r, cy - r, cx + r, cy + r])
    d.ellipse(tuple(box), fill=tuple(int(v) for v in rng.integers(100, 200, 3)))
    t = np.linspace(0, 2 * np.pi, num_points, endpoint=False) + rng.uniform(0, 0.3)
    rad = r * (0.35 + 0.4 * (np.arange(num_points) % 3) / 2)
    pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
    for x, y in pts:
        d.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(255, 255, 255))
    return img, pts, box


def write_aflw19(root: str | Path, num_images: int = 6, num_test: int = 4, size: int = 64, seed: int = 0) -> Path:
    """``root/AFLWinfo_release.mat`` + ``root/data/flickr/…``. The .mat has ``20000 + num_test`` rows
    (the benchmark's split is ``ra[:20000]``); rows reuse ``num_images`` image files."""
    import scipy.io

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "data" / "flickr" / "0").mkdir(parents=True, exist_ok=True)
    faces = []
    for i in range(num_images):
        img, pts, box = _face(rng, size, 19)
        img.save(root / "data" / "flickr" / "0" / f"image{i:05d}.jpg", quality=95)
        faces.append((pts, box))
    n = AFLW_TRAIN_SIZE + num_test
    which = np.arange(n) % num_images
    data = np.zeros((n, 38))
    bbox = np.zeros((n, 4))
    for i in range(num_images):
        pts, (x1, y1, x2, y2) = faces[i]
        data[which == i] = np.concatenate([pts[:, 0], pts[:, 1]])
        bbox[which == i] = [x1, x2, y1, y2]  # left, right, top, bottom
    names = np.empty((n, 1), dtype=object)
    for j in range(n):
        names[j, 0] = f"0/image{which[j]:05d}.jpg"
    mask = np.ones((n, 19), dtype=np.uint8)
    mask[-1, 3] = 0  # one test face not frontal
    ra = (rng.permutation(n) + 1).reshape(1, n).astype(np.float64)
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), {"data": data, "bbox": bbox, "mask_new": mask, "nameList": names, "ra": ra})
    return root


def write_pts_folders(root: str | Path, num_train: int = 6, num_test: int = 3, size: int = 64, num_points: int = 68, seed: int = 0) -> Path:
    """``root/{train,test}/<subset>/imageN.png`` with ``imageN.pts`` beside each (iBUG format, x first)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", num_train), ("test", num_test)):
        d = root / split / "subset"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, pts, _ = _face(rng, size, num_points)
            img.save(d / f"image{i:04d}.png")
            write_pts(d / f"image{i:04d}.pts", pts)
    return root


def _parsing_sample(rng: np.random.Generator, w: int, h: int, num_classes: int) -> tuple[Image.Image, np.ndarray]:
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
    label = Image.new("L", (w, h), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(label)
    cx, cy = rng.uniform(0.45, 0.55) * w, rng.uniform(0.45, 0.55) * h
    for c in range(1, num_classes):
        r = (1 - (c - 1) / num_classes) * 0.45 * min(w, h)
        colour = tuple(int(v) for v in (np.array([37, 91, 173]) * c) % 256)
        di.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        dl.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c)
    return img, np.asarray(label, dtype=np.uint8)


def write_lapa(root: str | Path, num_train: int = 6, num_test: int = 2, size: tuple[int, int] = (72, 64), seed: int = 0) -> Path:
    """``root/{train,val,test}/{images/*.jpg, labels/*.png, landmarks/*.txt}`` with 11 classes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", num_train), ("val", num_test), ("test", num_test)):
        for sub in ("images", "labels", "landmarks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _parsing_sample(rng, size[0], size[1], 11)
            name = f"{split}_{i:04d}"
            img.save(root / split / "images" / f"{name}.jpg", quality=95)
            Image.fromarray(lab).save(root / split / "labels" / f"{name}.png")
            pts = rng.uniform(0, min(size), (106, 2))
            (root / split / "landmarks" / f"{name}.txt").write_text("106\n" + "\n".join(f"{x:.2f} {y:.2f}" for x, y in pts) + "\n")
    return root


def write_celebamask_hq(root: str | Path, num_images: int = 6, size: int = 64, seed: int = 0) -> Path:
    """The official CelebAMask-HQ layout (images 2× the masks), CelebA's partition file included:
    images 0..n-3 train, n-2 val, n-1 test."""
    from mcf.downstream.metrics import CELEBAMASK_PARTS

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    mapping, partition = ["idx         orig_idx    orig_file"], []
    for i in range(num_images):
        img, lab = _parsing_sample(rng, size, size, 6)
        img.resize((2 * size, 2 * size)).save(root / "CelebA-HQ-img" / f"{i}.jpg", quality=95)
        anno = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        anno.mkdir(parents=True, exist_ok=True)
        for c in range(1, 6):
            if (lab == c).any():
                Image.fromarray(((lab == c) * 255).astype(np.uint8)).save(anno / f"{i:05d}_{CELEBAMASK_PARTS[c - 1]}.png")
        orig = f"{100000 + 7 * i:06d}.jpg"
        mapping.append(f"{i} {100000 + 7 * i - 1} {orig}")
        partition.append(f"{orig} {0 if i < num_images - 2 else (1 if i == num_images - 2 else 2)}")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(mapping) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root
