"""Tiny synthetic datasets written in the exact on-disk layouts of AFLW-19, iBUG ``.pts`` folders, 300W
(``.pts`` and HRNet's CSVs), WFLW (HRNet's CSVs), LaPa and CelebAMask-HQ — for tests and smoke runs where the real
benchmarks are not available.

Alignment images are a random-coloured ellipse "face" on noise with the landmarks drawn as bright
dots. A LaPa face is drawn in FaRL's 512-px frame around its 5-point template (eyes, nose, mouth
corners) and put into the image by a random similarity, which ``synthetic_transforms.json`` records
(image px → frame px), so the 5-point alignment can be checked against the truth. CelebAMask-HQ
part masks overlap (glasses over eyes, hair over neck, a necklace over the neck) so the two paint
orders give different label maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mcf.downstream.datasets import (
    AFLW_TRAIN_SIZE,
    HRNET_300W_CSV,
    HRNET_COORD_OFFSET,
    LAPA_ALIGN_POINTS,
    SPLITS_300W,
    WFLW_CSV,
    WFLW_IMAGES,
    WFLW_SUBSETS,
    points_box,
    write_pts,
)
from mcf.downstream.warp import template_points


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
    scipy.io.savemat(
        str(root / "AFLWinfo_release.mat"),
        {"data": data, "bbox": bbox, "mask_new": mask, "nameList": names, "ra": ra},
    )
    return root


def write_pts_folders(
    root: str | Path, num_train: int = 6, num_test: int = 3, size: int = 64, num_points: int = 68, seed: int = 0
) -> Path:
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


def write_300w(root: str | Path, per_folder: int = 2, size: int = 64, seed: int = 0, csv: bool = False) -> Path:
    """The 300W layout ``root/{afw, helen/trainset, helen/testset, lfpw/trainset, lfpw/testset, ibug}`` with
    ``.pts`` files; with ``csv`` also HRNet's ``face_landmarks_300w_*.csv`` (coordinates + 2, the box as
    centre and scale = side / 200)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows: dict[str, list[str]] = {"train": [], "common": [], "challenging": []}
    which = {"train": "train", "test_common": "common", "test_challenging": "challenging"}
    for split, dirs in SPLITS_300W.items():
        for sub in dirs:
            (root / sub).mkdir(parents=True, exist_ok=True)
            for i in range(per_folder):
                img, pts, _ = _face(rng, size, 68)
                name = f"{sub}/image_{i:03d}"
                img.save(root / f"{name}.png")
                write_pts(root / f"{name}.pts", pts)
                box = points_box(pts)
                side = max(box[2] - box[0], box[3] - box[1])  # HRNet's box: a square around the face
                cx, cy = (box[0] + box[2]) / 2 + HRNET_COORD_OFFSET, (box[1] + box[3]) / 2 + HRNET_COORD_OFFSET
                coords = ",".join(f"{v + HRNET_COORD_OFFSET:.6f}" for v in pts.reshape(-1))
                rows[which[split]].append(f"{name}.png,{side / 200:.6f},{cx:.6f},{cy:.6f},{coords}")
    if csv:
        header = "image_name,scale,center_w,center_h," + ",".join(
            f"original_{i}_{a}" for i in range(68) for a in "xy"
        )
        for key, lines in rows.items():
            (root / HRNET_300W_CSV[key]).write_text("\n".join([header, *lines]) + "\n")
    return root


def write_wflw(root: str | Path, num_train: int = 6, num_test: int = 6, size: int = 64, seed: int = 0) -> Path:
    """WFLW as FaRL reads it: ``root/WFLW_images/<event>/*.jpg`` and HRNet's ``face_landmarks_wflw_{train,
    test,test_<subset>}.csv`` (98 points, box = centre ± 100 × scale); test face ``i`` is in subset
    ``WFLW_SUBSETS[i % 6]`` (and face 0 also in ``blur``), so every subset has a face."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / WFLW_IMAGES / "0--Parade").mkdir(parents=True, exist_ok=True)
    header = "image_name,scale,center_w,center_h," + ",".join(f"original_{i}_{a}" for i in range(98) for a in "xy")
    rows: dict[str, list[str]] = {"train": [], "test": [], **{f"test_{s}": [] for s in WFLW_SUBSETS}}
    for split, n in (("train", num_train), ("test", num_test)):
        for i in range(n):
            img, pts, box = _face(rng, size, 98)
            name = f"0--Parade/{split}_{i:04d}.jpg"
            img.save(root / WFLW_IMAGES / name, quality=95)
            side = max(box[2] - box[0], box[3] - box[1])
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            coords = ",".join(f"{v:.6f}" for v in pts.reshape(-1))
            line = f"{name},{side / 200:.6f},{cx:.6f},{cy:.6f},{coords}"
            rows[split].append(line)
            if split == "test":
                rows[f"test_{WFLW_SUBSETS[i % len(WFLW_SUBSETS)]}"].append(line)
                if i == 0:
                    rows["test_blur"].append(line)
    for key, lines in rows.items():
        (root / WFLW_CSV.format(key)).write_text("\n".join([header, *lines]) + "\n")
    return root


# LaPa's synthetic face, drawn in FaRL's 512-px frame: (class, centre, radii) ellipses painted in order.
# Classes: 1 skin, 2/3 eyebrows, 4/5 eyes, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair.
_T = template_points()
LAPA_FACE = (
    (10, (255.5, 250.0), (195.0, 215.0)),
    (1, (255.5, 290.0), (150.0, 175.0)),
    (2, (_T[0, 0], _T[0, 1] - 42), (42.0, 13.0)),
    (3, (_T[1, 0], _T[1, 1] - 42), (42.0, 13.0)),
    (4, tuple(_T[0]), (32.0, 17.0)),
    (5, tuple(_T[1]), (32.0, 17.0)),
    (6, (_T[2, 0], _T[2, 1] - 20), (24.0, 40.0)),
    (9, (255.5, _T[3, 1] + 10), (40.0, 17.0)),
    (7, (255.5, _T[3, 1] - 8), (42.0, 13.0)),
    (8, (255.5, _T[3, 1] + 1), (34.0, 6.0)),
)


def _ellipse(centre, radii, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radii[0] * np.cos(t), centre[1] + radii[1] * np.sin(t)], axis=1)


def _lapa_face(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, np.ndarray, np.ndarray, np.ndarray]:
    """(image, label uint8 [h, w], 106 landmarks, the 3×3 image → frame similarity)."""
    scale = (
        rng.uniform(0.9, 1.1) * 0.38 * min(w, h) / 215.0
    )  # frame px → image px: the hair ellipse fills ~3/4 of the image
    angle = np.deg2rad(rng.uniform(-25, 25))
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    centre = np.array([w / 2, h / 2]) + rng.uniform(-0.06, 0.06, 2) * min(w, h)
    lin = np.array([[c, -s], [s, c]])
    t = centre - lin @ np.array([255.5, 270.0])
    to_image = np.array([[c, -s, t[0]], [s, c, t[1]], [0.0, 0.0, 1.0]])
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
    label = Image.new("L", (w, h), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for cls, ctr, radii in LAPA_FACE:
        poly = _ellipse(ctr, radii) @ lin.T + t
        pts = [tuple(p) for p in poly]
        di.polygon(pts, fill=tuple(int(v) for v in (np.array([37, 91, 173]) * cls) % 256))
        dl.polygon(pts, fill=cls)
    lm = _ellipse((255.5, 290.0), (150.0, 175.0), 106)  # the face contour stands in for the other points
    lm[list(LAPA_ALIGN_POINTS)] = _T
    return img, np.asarray(label, dtype=np.uint8), lm @ lin.T + t, np.linalg.inv(to_image)


def write_lapa(
    root: str | Path, num_train: int = 6, num_test: int = 2, size: tuple[int, int] = (72, 64), seed: int = 0
) -> Path:
    """``root/{train,val,test}/{images/*.jpg, labels/*.png, landmarks/*.txt}`` with 11 classes, the faces
    placed by random similarities (recorded in ``root/synthetic_transforms.json``: name → image → frame)."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(root)
    truth = {}
    for split, n in (("train", num_train), ("val", num_test), ("test", num_test)):
        for sub in ("images", "labels", "landmarks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab, lm, to_frame = _lapa_face(rng, size[0], size[1])
            name = f"{split}_{i:04d}"
            img.save(root / split / "images" / f"{name}.jpg", quality=95)
            Image.fromarray(lab).save(root / split / "labels" / f"{name}.png")
            (root / split / "landmarks" / f"{name}.txt").write_text(
                "106\n" + "\n".join(f"{x:.6f} {y:.6f}" for x, y in lm) + "\n"
            )
            truth[f"{split}/{name}"] = to_frame.tolist()
    (root / "synthetic_transforms.json").write_text(json.dumps(truth, indent=1) + "\n")
    return root


# CelebAMask-HQ parts as (name, centre, radii) in units of the mask side; glasses cover the eyes, hair (minus the
# skin ellipse) reaches over the neck, the necklace lies on the neck, so FaRL's and the release's orders disagree there.
CELEBAMASK_FACE = (
    ("cloth", (0.5, 0.98), (0.48, 0.14)),
    ("neck", (0.5, 0.82), (0.13, 0.16)),
    ("hair", (0.5, 0.42), (0.38, 0.46)),
    ("skin", (0.5, 0.45), (0.27, 0.32)),
    ("l_brow", (0.38, 0.33), (0.07, 0.015)),
    ("r_brow", (0.62, 0.33), (0.07, 0.015)),
    ("l_eye", (0.38, 0.41), (0.06, 0.03)),
    ("r_eye", (0.62, 0.41), (0.06, 0.03)),
    ("eye_g", (0.5, 0.41), (0.22, 0.06)),
    ("nose", (0.5, 0.51), (0.04, 0.07)),
    ("u_lip", (0.5, 0.61), (0.09, 0.02)),
    ("mouth", (0.5, 0.63), (0.07, 0.012)),
    ("l_lip", (0.5, 0.65), (0.09, 0.02)),
    ("neck_l", (0.5, 0.76), (0.12, 0.025)),
)


def write_celebamask_hq(root: str | Path, num_images: int = 6, size: int = 64, seed: int = 0) -> Path:
    """The official CelebAMask-HQ layout (images 2× the masks), CelebA's partition file included:
    images 0..n-3 train, n-2 val, n-1 test. Part masks overlap (see :data:`CELEBAMASK_FACE`); the
    image's colours follow FaRL's paint order."""
    from mcf.downstream.metrics import CELEBAMASK_FARL_PARTS

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    mapping, partition = ["idx         orig_idx    orig_file"], []
    for i in range(num_images):
        anno = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        anno.mkdir(parents=True, exist_ok=True)
        jitter = rng.uniform(-0.03, 0.03, 2)
        masks = {}
        for part, (cx, cy), (rx, ry) in CELEBAMASK_FACE:
            m = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(m)
            x, y = (cx + jitter[0]) * size, (cy + jitter[1]) * size
            draw.ellipse((x - rx * size, y - ry * size, x + rx * size, y + ry * size), fill=255)
            if part == "hair":  # hair around the face, not over it (as annotated); it still reaches over the neck
                (sx, sy), (srx, sry) = CELEBAMASK_FACE[3][1:]
                sx, sy = (sx + jitter[0]) * size, (sy + jitter[1]) * size
                draw.ellipse((sx - srx * size, sy - sry * size, sx + srx * size, sy + sry * size), fill=0)
            m.save(anno / f"{i:05d}_{part}.png")
            masks[part] = np.asarray(m) > 0
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for c, part in enumerate(CELEBAMASK_FARL_PARTS, start=1):
            if part in masks:
                img[masks[part]] = (np.array([37, 91, 173]) * c) % 256
        Image.fromarray(img).resize((2 * size, 2 * size), Image.NEAREST).save(
            root / "CelebA-HQ-img" / f"{i}.jpg", quality=95
        )
        orig = f"{100000 + 7 * i:06d}.jpg"
        mapping.append(f"{i} {100000 + 7 * i - 1} {orig}")
        partition.append(f"{orig} {0 if i < num_images - 2 else (1 if i == num_images - 2 else 2)}")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(mapping) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root


WRITERS = {
    "aflw19": lambda root, n, size: write_aflw19(root, num_images=n, num_test=max(2, n // 2), size=size),
    "300w": lambda root, n, size: write_300w(root, per_folder=max(1, n // 3), size=size, csv=True),
    "wflw": lambda root, n, size: write_wflw(root, num_train=n, num_test=max(6, n // 2), size=size),
    "lapa": lambda root, n, size: write_lapa(root, num_train=n, num_test=max(2, n // 4), size=(size + size // 8, size)),
    "celebamask_hq": lambda root, n, size: write_celebamask_hq(root, num_images=n + 2, size=size),
}


def main(argv: list[str] | None = None) -> int:
    """``python -m mcf.downstream.synthetic BENCHMARK DIR``: a tiny synthetic copy of a benchmark in its own
    layout, to try ``mcf finetune`` end to end before downloading anything."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mcf.downstream.synthetic", description=main.__doc__)
    p.add_argument("benchmark", choices=sorted(WRITERS))
    p.add_argument("root", metavar="DIR")
    p.add_argument("--images", type=int, default=12, help="training images (the test split is smaller)")
    p.add_argument("--size", type=int, default=64, help="image side in px")
    args = p.parse_args(argv)
    if Path(args.root).exists() and any(Path(args.root).iterdir()):
        p.error(f"{args.root} exists and is not empty")
    root = WRITERS[args.benchmark](Path(args.root), args.images, args.size)
    task = "parsing" if args.benchmark in ("lapa", "celebamask_hq") else "alignment"
    print(
        f"wrote a synthetic {args.benchmark} to {root}; try:\n  mcf finetune {task} --data {root} "
        "--pretrained random --epochs 2 --batch-size 4 --img-size 64 --workers 0"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
