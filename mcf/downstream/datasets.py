"""Face alignment and face parsing datasets, read in their benchmarks' own on-disk layouts.

Alignment (:func:`open_alignment`) — ``sample = (PIL RGB image, points [K, 2] float (x, y) in image
pixels, box [4] x1, y1, x2, y2)``; ``subsets`` names boolean masks over a test split (AFLW-Frontal,
300W common/challenging) that are scored separately:

* **AFLW-19** (``DIR/AFLWinfo_release.mat`` + images under ``DIR/data/flickr/`` or ``DIR/flickr/``),
  the CCL release: ``data`` N×38 (x1..x19, y1..y19), ``bbox`` N×4 (left, right, top, bottom),
  ``mask_new`` N×19, ``nameList`` N×1 cell, ``ra`` 1×N (1-based permutation). Train = ``ra[:20000]``,
  test = ``ra[20000:]`` (AFLW-Full, 4386 faces); ``test_frontal`` = the test faces with all 19
  points visible (AFLW-Frontal, 1314). The box is the benchmark's: NME_diag/NME_box use it.
* **300W, HRNet's annotation files** (what FaRL reads; farl/datasets/ibug300w.py):
  ``DIR/face_landmarks_300w_{train,valid_common,valid_challenge}.csv`` (image path, scale,
  centre x, centre y, 68 × (x, y)) with the images under ``DIR/{afw,helen,lfpw,ibug}``. As FaRL
  does, 2 is subtracted from every coordinate and the box is the centre ± 100 × scale.
* **300W, iBUG ``.pts`` files**: ``DIR/{afw,helen,lfpw,ibug}`` as the archives unpack; train = afw +
  helen/trainset + lfpw/trainset (3148), ``test_common`` = helen/testset + lfpw/testset (554),
  ``test_challenging`` = ibug (135), ``test_full`` (= ``test``) = both (689): HRNet's and FaRL's
  subsets. The box is the points' bounding box.
* **WFLW, HRNet's annotation files** (what FaRL reads; farl/datasets/wflw.py): ``DIR/face_landmarks_wflw_
  {train,test,test_<subset>}.csv`` (image path, scale, centre x, centre y, 98 × (x, y); no offset) with
  the images under ``DIR/WFLW_images``. ``test`` (2500 faces) carries the six subsets (``largepose``,
  ``expression``, ``illumination``, ``makeup``, ``occlusion``, ``blur``) as masks, matched by image
  and points; ``test_<subset>`` is one subset alone. The box is the centre ± 100 × scale.
* **Any iBUG ``.pts`` folders** (x first): ``DIR/train`` and ``DIR/test`` (any nesting).

Parsing (:func:`open_parsing`) — ``sample = (PIL RGB image, label map uint8 [H, W])`` and
``align_points(i)`` (``[5, 2]`` or None):

* **LaPa**: ``DIR/{train,val,test}/{images/*.jpg, labels/*.png, landmarks/*.txt}``, 11 classes
  (:data:`mcf.downstream.metrics.LAPA_CLASSES`). Labels are single-channel PNGs; the 106-point
  landmarks give FaRL's 5 alignment points (indices 104, 105, 54, 84, 90).
* **CelebAMask-HQ**: ``DIR/CelebA-HQ-img/{i}.jpg``, ``DIR/CelebAMask-HQ-mask-anno/{i // 2000}/
  {i:05d}_{part}.png``, ``DIR/CelebA-HQ-to-CelebA-mapping.txt`` (in the CelebAMask-HQ archive) and
  ``DIR/list_eval_partition.txt``, which is **CelebA's** file (from the CelebA release, not in the
  CelebAMask-HQ archive; 0 train, 1 val, 2 test). The 18 part masks are painted in FaRL's order
  (:data:`~mcf.downstream.metrics.CELEBAMASK_FARL_PARTS`, default) or the release's g_mask.py
  order (``order='release'``); later parts overwrite earlier ones. The image is resized to the
  mask's 512 px (a 2×2 mean for the 1024-px originals, what OpenCV's linear resize does at ½).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mcf.downstream.metrics import CELEBAMASK_CLASSES, CELEBAMASK_FARL_CLASSES, LAPA_CLASSES
from mcf.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")
AFLW_TRAIN_SIZE = 20000  # ra[:20000] train, the rest test (the benchmark's split)
LAPA_ALIGN_POINTS = (
    104,
    105,
    54,
    84,
    90,
)  # eye centres, nose tip, mouth corners of the 106 (farl/datasets/prepare.py)
HRNET_300W_CSV = {
    "train": "face_landmarks_300w_train.csv",
    "common": "face_landmarks_300w_valid_common.csv",
    "challenging": "face_landmarks_300w_valid_challenge.csv",
}
HRNET_COORD_OFFSET = 2.0  # farl/datasets/ibug300w.py subtracts 2.0 from HRNet's landmarks and box centres
# One ibug file is named with a space in the archive; HRNet's CSV spells it without (farl/datasets/ibug300w.py).
HRNET_PATH_FIXES = {"ibug/image_092_01.jpg": "ibug/image_092 _01.jpg"}
SPLITS_300W = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "test_common": ("helen/testset", "lfpw/testset"),
    "test_challenging": ("ibug",),
}
SUBSETS_300W = ("common", "challenging")
TEST_SPLITS_300W = ("test", "test_full", "test_common", "test_challenging")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """A label PNG as one channel ``[H, W]`` uint8 (what FaRL's ``cv2.IMREAD_GRAYSCALE`` gives for grey labels).

    Grey, palette and 16-bit PNGs are read as their values; an RGB(A) PNG is accepted when its colour
    channels are equal (a grey map saved as RGB) and refused otherwise, since no single channel holds
    the labels.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
            mode = im.mode
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read label map {path}: {e}") from None
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not ((rgb == rgb[..., :1]).all()):
            raise DataError(f"{path}: a {mode} label map with differing channels; labels must be single-channel")
        arr = rgb[..., 0]
    if arr.size and int(arr.max()) >= num_classes:
        raise DataError(f"{path}: label {int(arr.max())} outside the {num_classes} classes")
    return arr.astype(np.uint8)


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
    """Base: ``num_points``, ``__len__``, ``__getitem__ -> (image, points [K, 2], box [4])``, and
    ``subsets``: name → boolean mask over the items, scored separately."""

    num_points: int
    name: str
    subsets: dict[str, np.ndarray]

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
            raise DataError(f"{root}: no AFLWinfo_release.mat (the AFLW-19 annotations)")
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
            raise DataError(
                f"{mat}: inconsistent annotation arrays (data {self.data.shape}, bbox {self.bbox.shape}, {n} names, "
                "ra not a permutation)"
            )
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
        self.subsets = {"frontal": self.frontal} if split == "test" else {}

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


def _is_300w(root: Path) -> bool:
    return all((root / d).is_dir() for d in ("afw", "helen", "lfpw", "ibug"))


def _300w_membership(groups: list[list], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Concatenated groups → one boolean mask per group name."""
    sizes = [len(g) for g in groups]
    out, start = {}, 0
    for name, n in zip(names, sizes):
        mask = np.zeros(sum(sizes), dtype=bool)
        mask[start : start + n] = True
        out[name], start = mask, start + n
    return out


class PtsFolder(AlignmentDataset):
    """Images with iBUG ``.pts`` files next to them: ``train/`` + ``test/`` folders, or the 300W layout."""

    name = "pts"

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        self.subsets = {}
        if (root / "train").is_dir() and (root / "test").is_dir():
            if split not in ("train", "test", "test_full"):
                raise DataError(f"{root}: train/ + test/ .pts folders have train and test splits, got {split!r}")
            self.items = _find_pts(
                [root / ("train" if split == "train" else "test")]
            )  # test_full: the 300w protocol's name
        elif _is_300w(root):
            if split not in ("train", *TEST_SPLITS_300W):
                raise DataError(f"300W splits are train, {', '.join(TEST_SPLITS_300W)}; got {split!r}")
            parts = ("test_common", "test_challenging") if split in ("test", "test_full") else (split,)
            dirs = [root / d for p in parts for d in SPLITS_300W[p]]
            missing = [str(d) for d in dirs if not d.is_dir()]
            if missing:
                raise DataError(f"300W layout incomplete: missing {missing}")
            groups = [_find_pts([root / d for d in SPLITS_300W[p]]) for p in parts]
            self.items = [pair for g in groups for pair in g]
            if len(parts) == 2:
                self.subsets = _300w_membership(groups, SUBSETS_300W)
        else:
            raise DataError(
                f"{root}: expected train/ and test/ folders of images with .pts files, the 300W layout "
                "(afw, helen, lfpw, ibug), or HRNet's face_landmarks_300w_*.csv"
            )
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


def read_hrnet_csv(
    path: Path, num_points: int = 68, offset: float = HRNET_COORD_OFFSET
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """HRNet's 300W / WFLW CSV → ``[(image path, points [K, 2], box x1 y1 x2 y2)]`` in FaRL's coordinates
    (``offset`` subtracted: 2 for 300W, 0 for WFLW)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines()[1:], start=2):  # first line: the header
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(",")
        try:
            scale, cx, cy = (float(v) for v in fields[1:4])
            pts = np.array([float(v) for v in fields[4:]], dtype=np.float64).reshape(num_points, 2) - offset
        except ValueError as e:
            raise DataError(
                f"{path}:{n}: not an HRNet row (image, scale, centre x, centre y, {num_points} points): {e}"
            ) from None
        cx, cy, half = cx - offset, cy - offset, 100.0 * scale  # the box side is 200 × scale
        rows.append(
            (
                HRNET_PATH_FIXES.get(fields[0], fields[0]),
                pts,
                np.array([cx - half, cy - half, cx + half, cy + half]),
            )
        )
    return rows


class Face300WCSV(AlignmentDataset):
    """300W through HRNet's annotation CSVs (see the module docstring)."""

    name = "300w"
    num_points = 68

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        if split not in ("train", *TEST_SPLITS_300W):
            raise DataError(f"300W splits are train, {', '.join(TEST_SPLITS_300W)}; got {split!r}")
        names = {"train": ("train",), "test_common": ("common",), "test_challenging": ("challenging",)}.get(
            split, SUBSETS_300W
        )
        groups = []
        for name in names:
            f = self.root / HRNET_300W_CSV[name]
            if not f.is_file():
                raise DataError(f"{self.root}: HRNet's {f.name} is missing (300W split {split!r})")
            groups.append(read_hrnet_csv(f))
        self.rows = [r for g in groups for r in g]
        if not self.rows:
            raise DataError(f"{self.root}: no faces in the 300W {split} split")
        missing = [p for p, _, _ in self.rows if not (self.root / p).is_file()]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} 300W images missing, e.g. {missing[:3]}")
        self.subsets = _300w_membership(groups, SUBSETS_300W) if len(names) == 2 else {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, pts, box = self.rows[i]
        return _open_rgb(self.root / path), pts.copy(), box.copy()


WFLW_CSV = "face_landmarks_wflw_{}.csv"
WFLW_IMAGES = "WFLW_images"
# FaRL's trainers/wflw_farl.yaml evaluation sets, in the order of its table.
WFLW_SUBSETS = ("largepose", "expression", "illumination", "makeup", "occlusion", "blur")


class WFLW(AlignmentDataset):
    """WFLW through HRNet's annotation CSVs (see the module docstring)."""

    name = "wflw"
    num_points = 98

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        splits = ("train", "test", *(f"test_{s}" for s in WFLW_SUBSETS))
        if split not in splits:
            raise DataError(f"WFLW splits are {', '.join(splits)}; got {split!r}")
        self.rows = self._read(split)
        if not self.rows:
            raise DataError(f"{self.root}: no faces in the WFLW {split} split")
        missing = [p for p, _, _ in self.rows if not (self.root / WFLW_IMAGES / p).is_file()]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} WFLW images missing under {WFLW_IMAGES}, e.g. {missing[:3]}")
        self.subsets: dict[str, np.ndarray] = {}
        if split == "test":
            key = {self._key(r): i for i, r in enumerate(self.rows)}
            for sub in WFLW_SUBSETS:
                if not (self.root / WFLW_CSV.format(f"test_{sub}")).is_file():
                    continue  # a subset file absent: that subset is not scored
                mask = np.zeros(len(self.rows), dtype=bool)
                for r in self._read(f"test_{sub}"):
                    if self._key(r) not in key:
                        raise DataError(f"{self.root}: a {sub} face ({r[0]}) is not in the WFLW test split")
                    mask[key[self._key(r)]] = True
                self.subsets[sub] = mask

    def _read(self, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        f = self.root / WFLW_CSV.format(split)
        if not f.is_file():
            raise DataError(f"{self.root}: HRNet's {f.name} is missing (WFLW split {split!r})")
        return read_hrnet_csv(f, num_points=98, offset=0.0)

    @staticmethod
    def _key(row) -> tuple[str, float, float]:
        """FaRL's sample name: the image and the points' mean (one image holds several faces)."""
        cx, cy = row[1].mean(0)
        return row[0], round(float(cx), 3), round(float(cy), 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, pts, box = self.rows[i]
        return _open_rgb(self.root / WFLW_IMAGES / path), pts.copy(), box.copy()


def open_alignment(root: str | Path, split: str) -> AlignmentDataset:
    """AFLW-19 when ``AFLWinfo_release.mat`` is in ``root``, HRNet's 300W CSVs when present, else ``.pts`` folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"alignment data folder not found: {root}")
    if (root / "AFLWinfo_release.mat").is_file():
        return AFLW19(root, split)
    if (root / HRNET_300W_CSV["train"]).is_file():
        return Face300WCSV(root, split)
    if (root / WFLW_CSV.format("train")).is_file():
        return WFLW(root, split)
    return PtsFolder(root, split)


class ParsingDataset:
    """Base: ``classes``, ``__len__``, ``__getitem__ -> (image, label uint8 [H, W])``, ``align_points(i)``."""

    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        raise NotImplementedError

    def align_points(self, i: int) -> np.ndarray | None:
        """``[5, 2]`` (eyes, nose tip, mouth corners) for FaRL's similarity alignment, or None."""
        return None


def read_lapa_landmarks(path: Path) -> np.ndarray:
    """A LaPa ``landmarks/*.txt`` (``106`` then 106 lines ``x y``) → ``[106, 2]``."""
    try:
        vals = [float(v) for v in path.read_text().split()]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read LaPa landmarks: {e}") from None
    if len(vals) != 213 or vals[0] != 106:
        raise DataError(f"{path}: expected '106' and 106 x y pairs, got {len(vals)} numbers")
    pts = np.array(vals[1:], dtype=np.float64).reshape(106, 2)
    five = pts[list(LAPA_ALIGN_POINTS)]
    if not np.isfinite(pts).all() or not ((five - five.mean(0)) ** 2).sum() > 0:
        raise DataError(
            f"{path}: landmarks not finite, or the 5 alignment points {list(LAPA_ALIGN_POINTS)} coincide"
        )
    return pts


class LaPa(ParsingDataset):
    classes = LAPA_CLASSES
    name = "lapa"

    def __init__(self, root: str | Path, split: str = "train", landmarks: bool = True):
        d = Path(root) / split
        if not (d / "images").is_dir() or not (d / "labels").is_dir():
            raise DataError(
                f"{root}: LaPa split '{split}' needs {d}/images and {d}/labels "
                "(and landmarks/ for the aligned protocol)"
            )
        images = {p.stem: p for p in sorted((d / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTS}
        labels = {p.stem: p for p in sorted((d / "labels").glob("*.png"))}
        if images.keys() != labels.keys():
            diff = sorted(images.keys() ^ labels.keys())
            raise DataError(f"{d}: images and labels differ for {len(diff)} names, e.g. {diff[:3]}")
        if not images:
            raise DataError(f"{d}: no images")
        self.items = [(images[k], labels[k]) for k in sorted(images)]
        self.landmarks: list[np.ndarray] | None = None
        if landmarks:
            files = [d / "landmarks" / f"{p.stem}.txt" for p, _ in self.items]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise DataError(
                    f"{d}/landmarks: {len(missing)} landmark files missing, e.g. {missing[:3]} "
                    "(the aligned protocol needs them; --crop resize does not)"
                )
            self.landmarks = [read_lapa_landmarks(f) for f in files]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, lab = self.items[i]
        image, label = _open_rgb(img), read_label(lab, len(self.classes))
        if label.shape != (image.height, image.width):
            raise DataError(
                f"{lab}: label map {label.shape[1]}x{label.shape[0]} differs from its image's "
                f"{image.width}x{image.height}"
            )
        return image, label

    def align_points(self, i: int) -> np.ndarray | None:
        return None if self.landmarks is None else self.landmarks[i][list(LAPA_ALIGN_POINTS)]


class CelebAMaskHQ(ParsingDataset):
    name = "celebamask_hq"
    SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
    ORDERS = {"farl": CELEBAMASK_FARL_CLASSES, "release": CELEBAMASK_CLASSES}

    def __init__(self, root: str | Path, split: str = "train", order: str = "farl"):
        root = Path(root)
        if split not in self.SPLIT_IDS:
            raise DataError(f"CelebAMask-HQ split must be train, val or test, got {split!r}")
        if order not in self.ORDERS:
            raise DataError(f"CelebAMask-HQ paint order must be farl or release, got {order!r}")
        self.classes = self.ORDERS[order]
        if not (root / "CelebA-HQ-img").is_dir():
            raise DataError(f"{root}: no CelebA-HQ-img/ (the CelebAMask-HQ layout)")
        mapping, partition = root / "CelebA-HQ-to-CelebA-mapping.txt", root / "list_eval_partition.txt"
        if not mapping.is_file():
            raise DataError(f"{root}: CelebAMask-HQ needs {mapping.name} (in the CelebAMask-HQ archive)")
        if not partition.is_file():
            raise DataError(
                f"{root}: CelebAMask-HQ needs list_eval_partition.txt, which comes from CelebA "
                "(Eval/list_eval_partition.txt of the CelebA release), not from the CelebAMask-HQ archive"
            )
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

    def label(self, idx: int) -> np.ndarray | None:
        """The painted label map of image ``idx`` (None when it has no part file)."""
        anno = self.root / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
        label = None
        for c, part in enumerate(self.classes[1:], start=1):
            f = anno / f"{idx:05d}_{part}.png"
            if f.is_file():
                try:
                    with Image.open(f) as im:
                        m = np.asarray(im.convert("L")) > 0  # FaRL: cv2.IMREAD_GRAYSCALE, > 0
                except (OSError, ValueError) as e:
                    raise DataError(f"cannot read part mask {f}: {e}") from None
                if label is None:
                    label = np.zeros(m.shape, dtype=np.uint8)
                elif m.shape != label.shape:
                    raise DataError(f"{f}: mask {m.shape} differs from the other parts' {label.shape}")
                label[m] = c
        return label

    def __getitem__(self, i: int):
        idx = self.ids[i]
        label = self.label(idx)
        image = _open_rgb(self.root / "CelebA-HQ-img" / f"{idx}.jpg")
        if label is None:
            label = np.zeros((image.height // 2, image.width // 2), dtype=np.uint8)
        h, w = label.shape
        if image.size == (2 * w, 2 * h):
            image = image.reduce(
                2
            )  # 2×2 mean = cv2.resize(INTER_LINEAR) at exactly ½ (farl/datasets/celebamask_hq.py)
        elif image.size != (w, h):
            image = image.resize((w, h), Image.BILINEAR)
        return image, label


def open_parsing(root: str | Path, split: str, *, landmarks: bool = True, order: str = "farl") -> ParsingDataset:
    """LaPa (``train/images``) or CelebAMask-HQ (``CelebA-HQ-img``), by layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"parsing data folder not found: {root}")
    if (root / "CelebA-HQ-img").is_dir():
        return CelebAMaskHQ(root, split, order)
    if (root / "train" / "images").is_dir() or (root / split / "images").is_dir():
        return LaPa(root, split, landmarks)
    raise DataError(
        f"{root}: expected the LaPa layout (train/val/test with images, labels, landmarks) or CelebAMask-HQ "
        "(CelebA-HQ-img, CelebAMask-HQ-mask-anno)"
    )


def detect_protocol(task: str, root: str | Path) -> str:
    """The benchmark a data folder holds, by its layout: ``aflw19``, ``wflw`` or ``300w``; ``lapa`` or
    ``celebamask_hq``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{task} data folder not found: {root}")
    if task == "alignment":
        if (root / "AFLWinfo_release.mat").is_file():
            return "aflw19"
        return "wflw" if (root / WFLW_CSV.format("train")).is_file() else "300w"
    return "celebamask_hq" if (root / "CelebA-HQ-img").is_dir() else "lapa"
