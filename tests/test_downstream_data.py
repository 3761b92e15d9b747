"""The benchmark layouts (AFLW-19 .mat, iBUG .pts, 300W, LaPa, CelebAMask-HQ) and the task transforms."""

import numpy as np
import pytest
import torch
from tolerances import assert_close_scaled

from mcf.downstream import datasets as D
from mcf.downstream import synthetic as S
from mcf.downstream.transforms import AlignmentTransform, Augment, ParsingTransform, sample_rng
from mcf.downstream.warp import from_frame, to_frame
from mcf.errors import DataError


def test_pts_roundtrip_x_first(tmp_path):
    pts = np.array([[1.5, 2.25], [30.0, 4.0]])
    D.write_pts(tmp_path / "a.pts", pts)
    text = (tmp_path / "a.pts").read_text().splitlines()
    assert (
        text[:3] == ["version: 1", "n_points: 2", "{"]
        and text[3].split() == ["1.500000", "2.250000"]
        and text[-1] == "}"
    )
    np.testing.assert_allclose(D.read_pts(tmp_path / "a.pts"), pts)


def test_pts_folders_train_test_and_300w_layout(tmp_path):
    S.write_pts_folders(tmp_path / "p", num_train=3, num_test=2)
    train, test = D.open_alignment(tmp_path / "p", "train"), D.open_alignment(tmp_path / "p", "test")
    assert (len(train), len(test), train.num_points) == (3, 2, 68)
    assert len(D.PtsFolder(tmp_path / "p", "test_full")) == 2  # the 300w protocol's test split name on plain folders
    img, pts, box = train[0]
    assert img.mode == "RGB" and pts.shape == (68, 2)
    np.testing.assert_allclose(box, [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
    # 300W: helen/testset + lfpw/testset + ibug form the test split
    root = tmp_path / "300w"
    for sub in ("afw", "helen/trainset", "helen/testset", "lfpw/trainset", "lfpw/testset", "ibug"):
        (root / sub).mkdir(parents=True)
        img.save(root / sub / "x.jpg")
        D.write_pts(root / sub / "x.pts", pts)
    assert len(D.PtsFolder(root, "train")) == 3 and len(D.PtsFolder(root, "test")) == 3
    with pytest.raises(DataError):
        D.open_alignment(tmp_path, "train")  # no layout


def test_aflw19_mat_layout_split_and_boxes(tmp_path):
    S.write_aflw19(tmp_path / "aflw", num_images=3, num_test=4)
    import scipy.io

    info = scipy.io.loadmat(str(tmp_path / "aflw" / "AFLWinfo_release.mat"))
    ra = info["ra"].reshape(-1).astype(int) - 1
    test = D.AFLW19(tmp_path / "aflw", "test")
    assert len(D.AFLW19(tmp_path / "aflw", "train")) == 20000 and len(test) == 4
    j = ra[20000]  # first test face: its row of the .mat
    img, pts, box = test[0]
    np.testing.assert_allclose(pts[:, 0], info["data"][j, :19])
    np.testing.assert_allclose(pts[:, 1], info["data"][j, 19:])
    left, right, top, bottom = info["bbox"][j]
    np.testing.assert_allclose(box, [left, top, right, bottom])
    # the last row has one invisible point: frontal = all 19 visible
    frontal = D.AFLW19(tmp_path / "aflw", "test_frontal")
    assert len(frontal) == 4 - int(20003 in ra[20000:])
    assert test.frontal.sum() == len(frontal)


def test_lapa_layout_and_mismatch(tmp_path):
    S.write_lapa(tmp_path / "lapa", num_train=2, num_test=1)
    ds = D.open_parsing(tmp_path / "lapa", "train")
    img, lab = ds[0]
    assert ds.classes[10] == "hair" and len(ds.classes) == 11
    assert lab.dtype == np.uint8 and lab.shape == (img.height, img.width) and lab.max() == 10
    (tmp_path / "lapa" / "test" / "labels" / "test_0000.png").unlink()
    with pytest.raises(DataError, match="differ"):
        D.open_parsing(tmp_path / "lapa", "test")


def test_celebamask_hq_layout_and_splits(tmp_path):
    S.write_celebamask_hq(tmp_path / "c", num_images=4, size=32)
    train, test = D.open_parsing(tmp_path / "c", "train"), D.open_parsing(tmp_path / "c", "test")
    assert (len(train), len(test), len(D.CelebAMaskHQ(tmp_path / "c", "val"))) == (2, 1, 1)
    img, lab = test[0]
    assert img.size == (32, 32) and lab.shape == (32, 32)  # image (64 px) resized to the mask
    assert (
        len(train.classes) == 19 and train.classes[1] == "neck" and train.classes[14] == "hair"
    )  # FaRL's order by default
    assert D.CelebAMaskHQ(tmp_path / "c", "train", "release").classes[13] == "hair"
    (tmp_path / "c" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="CelebA"):
        D.CelebAMaskHQ(tmp_path / "c", "train")


def test_alignment_transform_maps_points_and_inverts():
    S_ = 32
    rng = np.random.default_rng(0)
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8))
    pts = np.array([[10.0, 20.0], [50.0, 70.0], [30.0, 40.0]])
    t = AlignmentTransform(S_, augment=Augment())
    x, target, m = t(img, pts, D.points_box(pts), sample_rng(0, 0, 0))
    assert x.shape == (3, S_, S_) and target.shape == (3, 2)
    # [0, 1] of the 512 frame: the target is fp32 (scale, shift, cast)
    assert_close_scaled(target.numpy() * 512 - 0.5, to_frame(pts, m).numpy(), dtype=np.float32, depth=3)
    # fp64 affine there and back (the inverse is a 2x2 solve): a few eps of the coordinates' size
    assert_close_scaled(from_frame(to_frame(pts, m), m).numpy(), pts, dtype=np.float64, depth=4)
    # the eval crop centres the box: its centre maps to the middle of the frame
    _, _, m0 = AlignmentTransform(S_)(img, pts, np.array([0.0, 0.0, 40.0, 40.0]))
    np.testing.assert_allclose(to_frame(np.array([[20.0, 20.0]]), m0).numpy(), [[255.5, 255.5]])


def test_parsing_transform_keeps_labels_nearest():
    from PIL import Image

    lab = np.zeros((40, 50), dtype=np.uint8)
    lab[10:30, 10:40] = 7
    img = Image.new("RGB", (50, 40))
    x, y, m = ParsingTransform(16)(img, lab)
    assert (
        x.shape == (3, 16, 16)
        and y.dtype == torch.int64
        and set(y.unique().tolist()) == {0, 7}
        and m.shape == (3, 3)
    )
    _, y_aug, m_aug = ParsingTransform(16, augment=Augment())(img, lab, None, sample_rng(0, 1, 2))
    assert set(y_aug.unique().tolist()) <= {0, 7}
    np.testing.assert_array_equal(m_aug, m)  # the returned matrix is the un-augmented one, for evaluation
