"""Face alignment and face parsing datasets, read in their benchmarks' own on-disk layouts.

Alignment (:func:`open_alignment`) — ``sample = (PIL RGB image, points [K, 2] float (x, y) in image
pixels, box [4] x1, y1, x2, y2)``:

* **AFLW-19** (``DIR/AFLWinfo_release.mat`` + images under ``DIR/data/flickr/`` or ``DIR/flickr/``),
  the CCL release: ``data`` N×38 (x1..x19, y1..y19), ``bbox`` N×4 (left, right, top, bottom),
  ``mask_new`` N×19, ``nameList`` N×1 cell, ``ra`` 1×N (1-based permutation). Train = ``ra[:20000]``,
  test = ``ra[20000:]`` (AFLW-Full, 4386 faces); ``test_frontal`` = the test faces with all 19
  points visible (AFLW-Frontal, 1314). The box is the benchmark's: NME_diag/NME_box use it.
* **iBUG ``.pts`` folders** (68 points, x first): ``DIR/train`` and ``DIR/test`` (any nesting), or
  the 300W layout ``DIR/{afw,helen,lfpw,ibug}``: train = afw + helen/trainset + lfpw/trainset,
  test = helen/testset + lfpw/testset + ibug (the "full" set). The box is the points' bounding box.

Parsing (:func:`open_parsing`) — ``sample = (PIL RGB image, label map uint8 [H, W])``:

* **LaPa**: ``DIR/{train,val,test}/{images/*.jpg, labels/*.png, landmarks/*.txt}``, 11 classes
  (:data:`mcf.downstream.metrics.LAPA_CLASSES`); the 106-point landmarks are not used.
* **CelebAMask-HQ**: ``DIR/CelebA-HQ-img/{i}.jpg``, ``DIR/CelebAMask-HQ-mask-anno/{i // 2000}/
  {i:05d}_{part}.png``, ``DIR/CelebA-HQ-to-CelebA-mapping.txt`` and CelebA's
  ``DIR/list_eval_partition.txt`` (0 train, 1 val, 2 test: the split everyone uses). The label map
  paints the 18 parts in :data:`mcf.downstream.metrics.CELEBAMASK_PARTS` order; the image is
  resized to the mask's 512 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mcf.downstream.metrics import CELEBAMASK_CLASSES, CELEBAMASK_PARTS, LAPA_CLASSES
from mcf.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")
AFLW_TRAIN_SIZE = 20000  # ra[:20000] train, the rest test (the benchmark's split)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_pts(path: str | Path) -> np.ndarray:
    """An iBUG ``.pts`` file (``version: 1``, ``n_points: K``, ``{``, K lines ``x y``, ``}``) → ``[K, 2]``."""
    text = Path(path).read_text().split("\n")
    try:
        n = int(next(line for line in text if line.strip().startswith("n_points")).split(":")[1])
        start = next(i for i, line in enumerate(text) if line.strip() == "{") + 1
        pts = np.array([[float(v) for v in text[start + i].split()[:2]] for i in range(n)], dtype=np.float64)
    except (StopIteration, ValueError, IndexError) as e:
        raise DataError(f"malformed .pts file {path}: {e}") from None
    return pts


def write_pts(path: str | Path, pts: np.ndarray) -> None:
    lines = ["version: 1", f"n_points: {len(pts)}", "{", *(f"{x:.6f} {y:.6f}" for x, y in pts), "}"]
    Path(path).write_text("\n".join(lines) + "\n")


def points_box(pts: np.ndarray) -> np.ndarray:
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], dtype=np.float64)


class AlignmentDataset:
    """Base: ``num_points``, ``__len__``, ``__getitem__ -> (image, points [K, 2], box [4])``."""

    num_points: int
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        raise NotImplementedError


class AFLW19(AlignmentDataset):
    """AFLW-19 from the CCL ``AFLWinfo_release.mat`` (see the module docstring)."""

    num_points = 19
    name = "aflw19"

    def __init__(self, root: str | Path, split: str = "train"):
        import scipy.io

        root = Path(root)
        mat = root / "AFLWinfo_release.mat"
        if not mat.is_file():
            raise DataError(f"{root}: no AFLWinfo_release.mat")
        self.images_root = next((d for d in (root / "data" / "flickr", root / "flickr") if d.is_dir()), None)
        if self.images_root is None:
            raise DataError(f"{root}: AFLW images not found (expected data/flickr/ or flickr/)")
        try:
            info = scipy.io.loadmat(str(mat))
            self.bbox = np.asarray(info["bbox"], dtype=np.float64)  # (N, 4) left, right, top, bottom
            self.data = np.asarray(info["data"], dtype=np.float64)  # (N, 38) x1..x19, y1..y19
            self.mask = np.asarray(info["mask_new"])  # (N, 19) 1 = visible
            self.names = [str(s[0][0]) for s in info["nameList"]]
            ra = np.asarray(info["ra"]).reshape(-1).astype(np.int64) - 1  # 1-based in the file
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise DataError(f"{mat}: not the AFLW-19 annotation layout ({e})") from None
        n = len(self.names)
        if self.data.shape != (n, 38) or self.bbox.shape != (n, 4) or sorted(ra.tolist()) != list(range(n)):
            raise DataError(f"{mat}: inconsistent annotation arrays (data {self.data.shape}, bbox {self.bbox.shape}, {n} names, ra not a permutation)")
        if n <= AFLW_TRAIN_SIZE:
            raise DataError(f"{mat}: {n} faces, the benchmark split needs more than {AFLW_TRAIN_SIZE}")
        if split == "train":
            self.indices = ra[:AFLW_TRAIN_SIZE]
        elif split == "test":
            self.indices = ra[AFLW_TRAIN_SIZE:]
        elif split == "test_frontal":
            visible = np.all(self.mask == 1, axis=1)
            self.indices = np.array([i for i in ra[AFLW_TRAIN_SIZE:] if visible[i]], dtype=np.int64)
        else:
            raise DataError(f"AFLW-19 split must be train, test or test_frontal, got {split!r}")
        self.frontal = np.all(self.mask[self.indices] == 1, axis=1)  # (len,) AFLW-Frontal membership

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        image = _open_rgb(self.images_root / self.names[j])
        pts = self.data[j].reshape(2, 19).T.copy()  # (19, 2) x, y
        left, right, top, bottom = self.bbox[j]
        return image, pts, np.array([left, top, right, bottom], dtype=np.float64)


def _find_pts(dirs: list[Path]) -> list[tuple[Path, Path]]:
    pairs = []
    for d in dirs:
        for pts in sorted(d.rglob("*.pts")):
            img = next((pts.with_suffix(e) for e in IMAGE_EXTS if pts.with_suffix(e).is_file()), None)
            if img is None:
                raise DataError(f"{pts}: no image next to it (looked for {', '.join(IMAGE_EXTS)})")
            pairs.append((img, pts))
    return pairs


SPLITS_300W = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "test": ("helen/testset", "lfpw/testset", "ibug"),
}


class PtsFolder(AlignmentDataset):
    """Images with iBUG ``.pts`` files next to them (see the module docstring for the split)."""

    name = "pts"

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if split not in ("train", "test"):
            raise DataError(f".pts folders have train and test splits, got {split!r}")
        if (root / "train").is_dir() and (root / "test").is_dir():
            dirs = [root / split]
        elif all((root / d).is_dir() for d in ("afw", "helen", "lfpw", "ibug")):
            dirs = [root / d for d in SPLITS_300W[split]]
            missing = [str(d) for d in dirs if not d.is_dir()]
            if missing:
                raise DataError(f"300W layout incomplete: missing {missing}")
        else:
            raise DataError(f"{root}: expected train/ and test/ folders of images with .pts files, or the 300W layout (afw, helen, lfpw, ibug)")
        self.items = _find_pts(dirs)
        if not self.items:
            raise DataError(f"{root}: no .pts files in the {split} split")
        self.points = [read_pts(p) for _, p in self.items]
        counts = {len(p) for p in self.points}
        if len(counts) != 1:
            raise DataError(f"{root}: .pts files disagree on the number of points {sorted(counts)}")
        self.num_points = counts.pop()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        pts = self.points[i].copy()
        return _open_rgb(self.items[i][0]), pts, points_box(pts)


def open_alignment(root: str | Path, split: str) -> AlignmentDataset:
    """AFLW-19 when ``AFLWinfo_release.mat`` is in ``root``, else iBUG ``.pts`` folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"alignment data folder not found: {root}")
    if (root / "AFLWinfo_release.mat").is_file():
        return AFLW19(root, split)
    return PtsFolder(root, split)


class ParsingDataset:
    """Base: ``classes``, ``__len__``, ``__getitem__ -> (image, label uint8 [H, W])``."""

    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        raise NotImplementedError


class LaPa(ParsingDataset):
    classes = LAPA_CLASSES
    name = "lapa"

    def __init__(self, root: str | Path, split: str = "train"):
        d = Path(root) / split
        if not (d / "images").is_dir() or not (d / "labels").is_dir():
            raise DataError(f"{root}: LaPa split '{split}' needs {d}/images and {d}/labels")
        images = {p.stem: p for p in sorted((d / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTS}
        labels = {p.stem: p for p in sorted((d / "labels").glob("*.png"))}
        if images.keys() != labels.keys():
            diff = sorted(images.keys() ^ labels.keys())
            raise DataError(f"{d}: images and labels differ for {len(diff)} names, e.g. {diff[:3]}")
        if not images:
            raise DataError(f"{d}: no images")
        self.items = [(images[k], labels[k]) for k in sorted(images)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, lab = self.items[i]
        label = np.asarray(Image.open(lab))
        if label.ndim != 2:
            raise DataError(f"{lab}: a label map must be single-channel, got shape {label.shape}")
        if label.max() >= len(self.classes):
            raise DataError(f"{lab}: label {label.max()} outside the {len(self.classes)} LaPa classes")
        return _open_rgb(img), label.astype(np.uint8)


class CelebAMaskHQ(ParsingDataset):
    classes = CELEBAMASK_CLASSES
    name = "celebamask_hq"
    SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if split not in self.SPLIT_IDS:
            raise DataError(f"CelebAMask-HQ split must be train, val or test, got {split!r}")
        mapping, partition = root / "CelebA-HQ-to-CelebA-mapping.txt", root / "list_eval_partition.txt"
        for f in (mapping, partition):
            if not f.is_file():
                raise DataError(f"{root}: CelebAMask-HQ needs {f.name} (the split comes from CelebA's list_eval_partition.txt)")
        part = {}
        for line in partition.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2:
                part[fields[0]] = int(fields[1])
        self.root, self.ids = root, []
        for line in mapping.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and part.get(fields[2]) == self.SPLIT_IDS[split]:
                self.ids.append(int(fields[0]))
        if not self.ids:
            raise DataError(f"{root}: no CelebAMask-HQ images in split '{split}'")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        idx = self.ids[i]
        anno = self.root / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
        label = None
        for c, part in enumerate(CELEBAMASK_PARTS, start=1):
            f = anno / f"{idx:05d}_{part}.png"
            if f.is_file():
                m = np.asarray(Image.open(f).convert("L")) > 0
                if label is None:
                    label = np.zeros(m.shape, dtype=np.uint8)
                label[m] = c
        image = _open_rgb(self.root / "CelebA-HQ-img" / f"{idx}.jpg")
        if label is None:
            label = np.zeros((image.height // 2, image.width // 2), dtype=np.uint8)
        if image.size != (label.shape[1], label.shape[0]):
            image = image.resize((label.shape[1], label.shape[0]), Image.BILINEAR)
        return image, label


def open_parsing(root: str | Path, split: str) -> ParsingDataset:
    """LaPa (``train/images``) or CelebAMask-HQ (``CelebA-HQ-img``), by layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"parsing data folder not found: {root}")
    if (root / "CelebA-HQ-img").is_dir():
        return CelebAMaskHQ(root, split)
    if (root / "train" / "images").is_dir() or (root / split / "images").is_dir():
        return LaPa(root, split)
    raise DataError(f"{root}: expected the LaPa layout (train/val/test with images, labels, landmarks) or CelebAMask-HQ (CelebA-HQ-img, CelebAMask-HQ-mask-anno)")

