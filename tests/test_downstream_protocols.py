"""FaRL's protocols, piece by piece: 5-point alignment, the tanh warp and its inverse, labels warped into
the frame and back, CelebAMask-HQ paint orders, 300W subsets, inter-pupil NME, units, the AFLW-19 crop,
the protocol presets and the printed row (the end-to-end runs are in test_downstream_finetune.py)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_close_scaled

from mcf.downstream import datasets as D
from mcf.downstream import synthetic as S
from mcf.downstream.metrics import (
    CELEBAMASK_FARL_PARTS,
    CELEBAMASK_PARTS,
    add_percent,
    alignment_metrics,
    auc_fr,
    eye_distance,
    parsing_metrics,
)
from mcf.downstream.transforms import AlignmentTransform, ParsingTransform
from mcf.downstream.warp import (
    about_centre,
    box_matrix,
    fit_similarity,
    from_frame,
    tanh_unwarp,
    tanh_warp,
    template_points,
    to_frame,
    warp_from_frame,
)
from mcf.errors import ConfigError, DataError


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def test_fit_similarity_recovers_a_known_transform():
    known = _similarity(23.0, 4.7, -310.0, 95.0)  # image px → frame px
    tmpl = template_points()
    image_pts = (np.linalg.inv(known) @ np.c_[tmpl, np.ones(5)].T).T[:, :2]
    # fp64 least squares on 5 exact correspondences: a few eps of the matrix's largest entry (the shift)
    assert_close_scaled(fit_similarity(image_pts, tmpl), known, dtype=np.float64, depth=8)
    # FaRL's template: 196/316/256/220/292 px of a 512 frame, written as p/256 - 1 and placed at (p + 1) * 511 / 2
    np.testing.assert_allclose(tmpl[0], [195.6171875, 225.55859375])
    np.testing.assert_allclose(template_points(256)[2], [(256 / 256) * 255 / 2, (286 / 256) * 255 / 2])
    # least squares, no reflection: a mirrored face is fitted by a rotation, not a flip
    mirrored = tmpl * [-1, 1]
    m = fit_similarity(mirrored, tmpl)
    assert np.linalg.det(m[:2, :2]) > 0


def test_lapa_alignment_recovers_the_synthetic_similarity(tmp_path):
    root = S.write_lapa(tmp_path / "lapa", num_train=3, num_test=1)
    truth = json.loads((root / "synthetic_transforms.json").read_text())
    ds = D.LaPa(root, "train")
    for i in range(len(ds)):
        pts = ds.align_points(i)
        np.testing.assert_allclose(pts, ds.landmarks[i][[104, 105, 54, 84, 90]])
        m = fit_similarity(pts, template_points())
        known = np.array(truth[f"train/train_{i:04d}"])
        np.testing.assert_allclose(m, known, rtol=1e-4, atol=1e-3)  # landmarks are written with 6 decimals
    # the aligned frame puts the eye labels where FaRL's template has the eyes
    img, lab = ds[0]
    _, frame_lab, _ = ParsingTransform(128, "align")(img, lab, ds.align_points(0))
    for cls, eye in ((4, template_points()[0]), (5, template_points()[1])):
        ys, xs = np.nonzero(frame_lab.numpy() == cls)
        centroid = (np.array([xs.mean(), ys.mean()]) + 0.5) * 512 / 128 - 0.5
        assert np.abs(centroid - eye).max() < 8, (cls, centroid, eye)  # 8 frame px = 2 px at 128


def test_lapa_needs_landmarks_only_for_the_aligned_protocol(tmp_path):
    root = S.write_lapa(tmp_path / "lapa", num_train=2, num_test=1)
    (root / "test" / "landmarks" / "test_0000.txt").unlink()
    with pytest.raises(DataError, match="landmark"):
        D.LaPa(root, "test")
    assert D.LaPa(root, "test", landmarks=False).align_points(0) is None
    (root / "train" / "landmarks" / "train_0000.txt").write_text("106\n1 2\n")
    with pytest.raises(DataError, match="106"):
        D.LaPa(root, "train")
    (root / "train" / "landmarks" / "train_0000.txt").write_text(
        "106\n" + "5 5\n" * 106
    )  # no similarity from one point
    with pytest.raises(DataError, match="coincide"):
        D.LaPa(root, "train")
    Image.new("L", (10, 10)).save(root / "val" / "labels" / "val_0000.png")
    with pytest.raises(DataError, match="differs"):
        D.LaPa(root, "val", landmarks=False)[0]


def test_tanh_warp_and_its_inverse_on_a_grid():
    k = 0.8  # FaRL's LaPa warp factor
    u = torch.linspace(-3.0, 3.0, 1201, dtype=torch.float64)
    w = tanh_warp(u, k)
    assert (w.abs() < 1).all() and torch.equal(w[u.abs() <= 1 - k], u[u.abs() <= 1 - k])  # the centre is kept
    assert (w.diff() > 0).all()  # monotone
    torch.testing.assert_close(tanh_unwarp(w, k), u, rtol=0, atol=1e-9)
    v = torch.linspace(-0.999, 0.999, 999, dtype=torch.float64)
    torch.testing.assert_close(tanh_warp(tanh_unwarp(v, k), k), v, rtol=0, atol=1e-12)
    # 2-D: points → frame → points through a similarity and the warp, as an image grid
    m = _similarity(-12.0, 3.0, 40.0, -20.0)
    ys, xs = torch.meshgrid(torch.arange(0, 200, 7.0), torch.arange(0, 180, 7.0), indexing="ij")
    pts = torch.stack([xs, ys], -1).double()
    torch.testing.assert_close(from_frame(to_frame(pts, m, 512, k), m, 512, k), pts, rtol=0, atol=1e-7)
    assert torch.equal(tanh_warp(u, 0.0), u)


def _near_boundary(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3×3 neighbourhood holds more than one label."""
    p = np.pad(label, 1, mode="edge")
    out = np.zeros(label.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= p[1 + dy : 1 + dy + label.shape[0], 1 + dx : 1 + dx + label.shape[1]] != label
    return out


@pytest.mark.parametrize("crop,warp", [("align", 0.0), ("align", 0.8), ("resize", 0.0), ("resize", 0.8)])
def test_labels_warped_into_the_frame_and_back_return_to_their_pixels(tmp_path, crop, warp):
    """Forward warp (nearest) then the evaluation's inverse warp of one-hot logits: every pixel comes back to its
    label, except next to a label boundary (tolerance: 1 px), and at most 2 % of those pixels differ."""
    root = S.write_lapa(tmp_path / "lapa", num_train=1, num_test=2, size=(72, 64))
    ds = D.LaPa(root, "test")
    for i in range(len(ds)):
        img, lab = ds[i]
        t = ParsingTransform(96, crop, warp_factor=warp)
        _, frame_lab, m = t(img, lab, ds.align_points(i))
        onehot = torch.nn.functional.one_hot(frame_lab, 11).permute(2, 0, 1).float()
        back = warp_from_frame(onehot, m, lab.shape, 512, warp).argmax(0).numpy()
        wrong = back != lab
        assert not (wrong & ~_near_boundary(lab)).any(), (
            f"{crop} {warp}: {np.argwhere(wrong & ~_near_boundary(lab))[:5]}"
        )
        assert wrong.mean() <= 0.02
        if crop == "align" and warp == 0:  # the face is enlarged in the frame and nothing is squeezed: exact
            assert not wrong.any()


def test_evaluation_scores_at_the_original_resolution_after_the_inverse_warp(tmp_path):
    """A model that outputs the frame's true one-hot labels scores F1 ≈ 1 on the original label maps
    (aligned + tanh warp; the squeezed border loses a few boundary pixels): the logits are warped back
    before the argmax."""
    from mcf.downstream.finetune import TaskData, evaluate_parsing

    root = S.write_lapa(tmp_path / "lapa", num_train=1, num_test=2, size=(72, 64))
    base = D.LaPa(root, "test")
    t = ParsingTransform(96, "align", warp_factor=0.8)
    frames = [
        torch.nn.functional.one_hot(t(*base[i], base.align_points(i))[1], 11).permute(2, 0, 1).float()
        for i in range(len(base))
    ]

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x):
            out = torch.stack(frames[self.i : self.i + len(x)])
            self.i += len(x)
            return out * 10.0

    m = evaluate_parsing(
        Oracle(), TaskData("parsing", base, t, 0, False), base.classes, 1, torch.device("cpu"), torch.float32
    )
    assert m["mean_f1"] > 0.999 and m["mean_f1_percent"] == pytest.approx(100 * m["mean_f1"])


def test_label_pngs_are_read_single_channel(tmp_path):
    lab = np.array([[0, 1], [2, 10]], dtype=np.uint8)
    Image.fromarray(lab).save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(lab[..., None], 3, axis=2)).save(tmp_path / "rgb_grey.png")
    pal = Image.fromarray(lab, mode="L").convert("P")
    pal.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, 5)])
    pal.save(tmp_path / "palette.png")
    for name in ("grey", "rgb_grey", "palette"):
        got = D.read_label(tmp_path / f"{name}.png", 11)
        assert got.ndim == 2 and got.dtype == np.uint8
        np.testing.assert_array_equal(got, lab, err_msg=name)
    Image.fromarray(np.stack([lab, lab * 2, lab], axis=2)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="single-channel"):
        D.read_label(tmp_path / "colour.png", 11)
    with pytest.raises(DataError, match="outside"):
        D.read_label(tmp_path / "grey.png", 10)


def test_celebamask_hq_paint_orders_on_overlapping_parts(tmp_path):
    root = S.write_celebamask_hq(tmp_path / "c", num_images=3, size=48)
    farl, release = D.CelebAMaskHQ(root, "train"), D.CelebAMaskHQ(root, "train", "release")
    assert farl.classes[1:] == CELEBAMASK_FARL_PARTS and release.classes[1:] == CELEBAMASK_PARTS
    anno = root / "CelebAMask-HQ-mask-anno" / "0"
    mask = {
        p: np.asarray(Image.open(anno / f"00000_{p}.png")) > 0
        for p in CELEBAMASK_PARTS
        if (anno / f"00000_{p}.png").is_file()
    }
    _, lf = farl[0]
    _, lr = release[0]
    names_f, names_r = np.array(farl.classes)[lf], np.array(release.classes)[lr]
    # later overwrites earlier: FaRL paints glasses, necklaces and hair late; the release paints eyes, neck, cloth late
    cases = (
        ("l_eye", "eye_g", "l_eye", ()),
        ("neck", "neck_l", "neck", ("cloth",)),
        ("neck", "hair", "neck", ("neck_l", "cloth")),
    )
    for under, over, release_winner, excluded in cases:
        both = mask[under] & mask[over]
        for p in excluded:  # parts that win over both in one of the orders
            both &= ~mask[p]
        assert both.any(), (under, over)
        assert set(names_f[both]) == {over}, (under, over, set(names_f[both]))
        assert set(names_r[both]) == {release_winner}, (under, over, set(names_r[both]))
    # the mean F1 averages FaRL's 18 foreground classes
    from mcf.downstream.metrics import ConfusionMatrix

    cm = ConfusionMatrix(19)
    cm.update(torch.from_numpy(lf.astype(np.int64)), torch.from_numpy(lf.astype(np.int64)))
    m = parsing_metrics(cm, farl.classes)
    assert len([k for k in m if k.startswith("f1/")]) == 18 and m["mean_f1"] == 1.0


@pytest.mark.parametrize("csv", [False, True])
def test_300w_subsets(tmp_path, csv):
    root = S.write_300w(tmp_path / "300w", per_folder=2, size=48, csv=csv)
    kind = D.Face300WCSV if csv else D.PtsFolder
    sizes = {s: len(kind(root, s)) for s in ("train", "test_common", "test_challenging", "test_full", "test")}
    assert sizes == {"train": 6, "test_common": 4, "test_challenging": 2, "test_full": 6, "test": 6}
    full = kind(root, "test_full")
    assert {k: v.tolist() for k, v in full.subsets.items()} == {
        "common": [True] * 4 + [False] * 2,
        "challenging": [False] * 4 + [True] * 2,
    }
    assert isinstance(D.open_alignment(root, "train"), kind)
    if csv:  # FaRL subtracts 2 from HRNet's coordinates: the same points as the .pts files
        pts_full = D.PtsFolder(root, "test_full")
        for i in range(len(full)):
            np.testing.assert_allclose(full[i][1], pts_full[i][1], atol=1e-5)
            box, pbox = full[i][2], pts_full[i][2]
            side = max(pbox[2] - pbox[0], pbox[3] - pbox[1])  # the CSV's square: centre ± 100 × scale
            np.testing.assert_allclose(
                box, [*((pbox[:2] + pbox[2:]) / 2 - side / 2), *((pbox[:2] + pbox[2:]) / 2 + side / 2)], atol=1e-3
            )
    with pytest.raises(DataError, match="300W splits"):
        kind(root, "test_private")


def test_inter_pupil_and_inter_ocular_nme_by_hand():
    gt = torch.zeros(1, 68, 2)
    gt[0, 36:42] = torch.tensor(
        [[0.0, 0.0], [2.0, -1.0], [4.0, -1.0], [6.0, 0.0], [4.0, 1.0], [2.0, 1.0]]
    )  # left eye, centre (3, 0)
    gt[0, 42:48] = gt[0, 36:42] + torch.tensor(
        [40.0, 0.0]
    )  # right eye, centre (43, 0): pupils 40 apart, corners 0 ↔ 46
    pred = gt + torch.tensor([2.0, 0.0])
    assert eye_distance(gt, tuple(range(36, 42)), tuple(range(42, 48))).item() == pytest.approx(40.0)
    m = alignment_metrics(pred, gt, None)
    assert m["nme_inter_pupil"] == pytest.approx(2 / 40) and m["nme_inter_ocular"] == pytest.approx(2 / 46)
    g19 = torch.zeros(1, 19, 2)
    g19[0, 6], g19[0, 7], g19[0, 10], g19[0, 11] = (
        torch.tensor([0.0, 0]),
        torch.tensor([5.0, 0]),
        torch.tensor([25.0, 0]),
        torch.tensor([30.0, 0]),
    )
    m19 = alignment_metrics(g19 + 1.0, g19, None)  # every point off by sqrt(2)
    assert m19["nme_inter_ocular"] == pytest.approx(math.sqrt(2) / 30) and m19["nme_inter_pupil"] == pytest.approx(
        math.sqrt(2) / 20
    )


def test_units_fraction_and_percent_are_both_written_and_named_apart():
    gt = torch.zeros(2, 19, 2)
    pred = gt + torch.tensor([0.3, 0.4])  # error 0.5 px on a 50-px box diagonal → 1 %
    box = torch.tensor([[0.0, 0.0, 30.0, 40.0]] * 2)
    m = add_percent(
        {**alignment_metrics(pred, gt, box, 0.07), "frontal/nme_diag": 0.0123, "mean_f1": 0.9396, "f1/skin": 0.9}
    )
    assert m["nme_diag"] == pytest.approx(0.01) and m["nme_diag_percent"] == pytest.approx(1.0)
    assert m["frontal/nme_diag_percent"] == pytest.approx(1.23) and m["mean_f1_percent"] == pytest.approx(93.96)
    assert "f1/skin_percent" not in m and not any(k.endswith("_percent_percent") for k in m)
    assert m["auc_box_7_percent"] == pytest.approx(100 * m["auc_box_7"])


def test_auc_and_failure_rate_as_farl():
    nmes = torch.tensor([0.0, 0.0, 0.1, 0.1])  # half at 0, half beyond the 7 % threshold
    auc, fr = auc_fr(nmes, 0.07)
    assert fr == pytest.approx(0.5) and auc == pytest.approx(0.5, abs=2e-3)
    auc1, fr1 = auc_fr(torch.full((5,), 0.035), 0.07)  # all at half the threshold
    assert fr1 == 0.0 and auc1 == pytest.approx(0.5, abs=2e-3)


def test_aflw19_crop_is_the_square_box_at_scale_one_and_context_is_an_option():
    box = np.array([100.0, 50.0, 300.0, 250.0])  # a 200-px square
    corners = np.array([[100.0, 50.0], [300.0, 250.0]])
    np.testing.assert_allclose(
        to_frame(corners, AlignmentTransform(64, context=1.0).matrix(box)).numpy(), [[-0.5, -0.5], [511.5, 511.5]]
    )
    wide = to_frame(
        corners, AlignmentTransform(64, context=1.25).matrix(box)
    ).numpy()  # FaRL's scale_mu 0.8 about the centre
    np.testing.assert_allclose(
        wide, [[255.5 - 256 * 0.8, 255.5 - 256 * 0.8], [255.5 + 256 * 0.8, 255.5 + 256 * 0.8]]
    )
    np.testing.assert_allclose(box_matrix(box) @ [200, 150, 1], [255.5, 255.5, 1])
    rotated = about_centre(512, 90.0) @ [255.5, 0, 1]
    assert_close_scaled(rotated, [511.0, 255.5, 1], dtype=np.float64, depth=2)  # cos 90° = 6e-17, not 0


def test_protocol_presets_resolve_and_flags_override(tmp_path):
    from mcf.downstream.finetune import FinetuneConfig, per_rank_batch, step_lr_at

    aflw = S.write_aflw19(tmp_path / "aflw", num_images=2, num_test=2, size=32)
    lapa = S.write_lapa(tmp_path / "lapa", num_train=1, num_test=1)
    celeb = S.write_celebamask_hq(tmp_path / "c", num_images=3, size=32)
    a = FinetuneConfig(task="alignment", data=str(aflw), pretrained="random")
    assert (
        a.protocol,
        a.context,
        a.epochs,
        a.lr,
        a.backbone_lr,
        a.weight_decay,
        a.img_size,
        a.ema_decay,
        a.lr_milestones,
    ) == ("aflw19", 1.0, 150, 1e-2, 1e-4, 1e-5, 448, 0.999, (200,))
    assert (
        a.crop == "box"
        and a.warp_factor == 0.0
        and a.warmup_steps == 0
        and per_rank_batch(a, 8) == 5
        and per_rank_batch(a, 1) == 40
    )
    w = FinetuneConfig(task="alignment", data=str(tmp_path), pretrained="random")
    assert (w.protocol, w.context, w.epochs, w.test_split) == ("300w", 1.25, 250, "test_full")
    assert FinetuneConfig(task="alignment", data=str(aflw), pretrained="random", context=1.25).context == 1.25
    p = FinetuneConfig(task="parsing", data=str(lapa), pretrained="random")
    assert (p.protocol, p.crop, p.warp_factor, p.epochs, p.lr, p.frame) == ("lapa", "align", 0.8, 300, 1e-3, 512)
    r = FinetuneConfig(
        task="parsing", data=str(lapa), pretrained="random", crop="resize", warp_factor=0.0, epochs=2
    )
    assert (r.crop, r.warp_factor, r.epochs) == ("resize", 0.0, 2)
    c = FinetuneConfig(task="parsing", data=str(celeb), pretrained="random")
    assert (c.protocol, c.crop, c.warp_factor, c.paint_order) == ("celebamask_hq", "resize", 0.0, "farl")
    with pytest.raises(ConfigError, match="protocol"):
        FinetuneConfig(task="parsing", data=str(lapa), pretrained="random", protocol="aflw19")
    with pytest.raises(ConfigError, match="align"):
        FinetuneConfig(task="parsing", data=str(celeb), pretrained="random", crop="align")
    with pytest.raises(ConfigError, match="warp_factor"):
        FinetuneConfig(task="parsing", data=str(lapa), pretrained="random", warp_factor=1.5)
    with pytest.raises(DataError):
        FinetuneConfig(task="parsing", data=str(tmp_path / "missing"), pretrained="random")
    # FaRL's MultiStepLR: constant, × 0.1 from epoch 200 (here 3 steps per epoch)
    lrs = [step_lr_at(s, peak=1e-2, warmup=0, milestones=(600,), gamma=0.1) for s in (0, 599, 600, 749)]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])


def test_backbone_lr_applies_to_the_whole_encoder():
    from mcf.downstream.heads import LandmarkModel, param_groups_lrd
    from mcf.downstream.weights import build_encoder, load_encoder_weights

    enc = build_encoder(load_encoder_weights("random"))
    model = LandmarkModel(enc, 19)
    groups = param_groups_lrd(model, enc.depth, 1e-5, 1.0, encoder_lr_scale=0.01)
    by_name = {id(p): g for g in groups for p in g["params"]}
    assert by_name[id(enc.blocks[0].attn.qkv.weight)]["lr_scale"] == pytest.approx(0.01)
    assert by_name[id(enc.norm.weight)]["lr_scale"] == pytest.approx(
        0.01
    )  # FaRL's backbone lr covers the final norm
    assert by_name[id(model.head.out.weight)]["lr_scale"] == 1.0


def test_paper_rows_print_percent_in_the_tables_columns():
    from mcf.downstream.protocols import format_row, paper_row

    m = add_percent({"nme_diag": 0.00932, "frontal/nme_diag": 0.00801, "nme_box": 0.0131, "auc_box_7": 0.8129})
    headers, values = paper_row("aflw19", m)
    assert headers == ["NME_diag Full", "NME_diag Frontal", "NME_box Full", "AUC_box@7 Full"]
    assert values == ["0.932", "0.801", "1.310", "81.29"]
    lapa = {
        f"f1/{k}": 0.9
        for k in (
            "skin",
            "hair",
            "left_eye",
            "right_eye",
            "upper_lip",
            "inner_mouth",
            "lower_lip",
            "nose",
            "left_eyebrow",
            "right_eyebrow",
        )
    } | {"mean_f1": 0.9396}
    headers, values = paper_row("lapa", lapa)
    assert headers[0] == "Skin" and headers[-1] == "Mean" and values[-1] == "93.96" and len(values) == 11
    assert paper_row("300w", add_percent({"nme_inter_ocular": 0.0293}))[1][:2] == ["2.930", "n/a"]
    assert "NME, FR, AUC in %" in format_row("aflw19", m) and "F1 ×100" in format_row("lapa", lapa)
    # a run on one subset fills that subset's columns only
    assert paper_row("aflw19", add_percent({"nme_diag": 0.008}), "test_frontal")[1] == [
        "n/a",
        "0.800",
        "n/a",
        "n/a",
    ]
    assert paper_row("300w", add_percent({"nme_inter_ocular": 0.05}), "test_challenging")[1][:3] == [
        "n/a",
        "n/a",
        "5.000",
    ]
