"""FaRL's protocols as FaRL's released code runs them (github.com/FacePerceiver/FaRL, read, not copied):
its scorers' formulas re-stated here independently and compared with mcf's metrics on shared predictions,
its heatmap head, targets and alignment loss, stretched boxes, WFLW, CelebAMask-HQ's column names, the
best/last report, train_data_ratio, the frozen backbone and the memory check."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import simpson
from tolerances import assert_close_scaled

from mcf.downstream import memory
from mcf.downstream import synthetic as S
from mcf.downstream.datasets import WFLW, WFLW_SUBSETS, detect_protocol
from mcf.downstream.heads import (
    HeatmapLandmarkModel,
    UPerParsingModel,
    farl_blocks,
    heatmap_points,
    param_groups_lrd,
)
from mcf.downstream.losses import alignment_loss, coord_distance_loss, point_heatmaps
from mcf.downstream.metrics import (
    CELEBAMASK_FARL_CLASSES,
    ConfusionMatrix,
    add_percent,
    alignment_metrics,
    parsing_metrics,
)
from mcf.downstream.protocols import PROTOCOLS, format_best_last, is_better, paper_row
from mcf.downstream.warp import box_matrix, to_frame
from mcf.downstream.weights import build_encoder, load_encoder_weights
from mcf.errors import ConfigError, DataError

# ---- FaRL's scorers, re-stated from farl/experiments/face_alignment/scorer.py and face_parsing/scorer.py ----


def farl_nme(gt: np.ndarray, pred: np.ndarray, unit: np.ndarray) -> float:
    """NME.evaluate per sample (norm over the last axis / unit_dist, mean over points), summed, / count."""
    total = 0.0
    for g, p, u in zip(gt, pred, unit):
        total += (np.linalg.norm(g - p, axis=-1) / u).mean()
    return total / len(gt)


def farl_unit_landmarks(gt: np.ndarray, left: list[int], right: list[int]) -> np.ndarray:
    """NormalizeByLandmarks: distance between the means of the left and right ids."""
    return np.array([np.linalg.norm(g[left].mean(0) - g[right].mean(0)) for g in gt])


def farl_unit_box(box_yxyx: np.ndarray) -> np.ndarray:
    """NormalizeByBox on FaRL's (y1, x1, y2, x2) boxes: sqrt(h * w)."""
    return np.array([math.sqrt((y2 - y1) * (x2 - x1)) for y1, x1, y2, x2 in box_yxyx])


def farl_unit_diag(box_yxyx: np.ndarray) -> np.ndarray:
    return np.array([math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2) for y1, x1, y2, x2 in box_yxyx])


def farl_auc_fr(nmes: np.ndarray, threshold: float, step: float = 0.0001) -> tuple[float, float]:
    """AUC_FR.finalize_evaluation: sorted NMEs, CED by count_nonzero on arange(0, t + step, step), Simpson / t."""
    nmes = np.sort(nmes)
    xaxis = list(np.arange(0.0, threshold + step, step))
    ced = [float(np.count_nonzero([nmes <= x])) / len(nmes) for x in xaxis]
    return simpson(ced, x=xaxis) / threshold, 1.0 - ced[-1]


def farl_per_image(gt, pred, unit) -> np.ndarray:
    return np.array([(np.linalg.norm(g - p, axis=-1) / u).mean() for g, p, u in zip(gt, pred, unit)])


def farl_f1(labels: list[np.ndarray], preds: list[np.ndarray], n: int) -> np.ndarray:
    """F1Score: summed bincount histograms, 2·diag / (colsum + rowsum)."""
    hist = np.zeros((n, n), dtype=np.int64)
    for a, b in zip(labels, preds):
        hist += np.bincount(n * a.reshape(-1).astype(np.int64) + b.reshape(-1), minlength=n * n).reshape(n, n)
    return 2 * np.diag(hist) / (hist.sum(0) + hist.sum(1))


def _shared_alignment(k: int, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(50, 250, (n, k, 2))
    pred = gt + rng.normal(0, rng.uniform(0.5, 12, (n, 1, 1)), (n, k, 2))
    x1, y1 = rng.uniform(20, 60, n), rng.uniform(20, 60, n)
    w, h = rng.uniform(150, 230, n), rng.uniform(120, 260, n)  # non-square boxes
    return gt, pred, np.stack([x1, y1, x1 + w, y1 + h], 1)


def test_alignment_metrics_agree_with_farls_scorer_per_subset():
    """NME (inter-ocular, inter-pupil, box, diag) per subset and AUC/FR, on the same predictions, for the
    98- (WFLW), 68- (300W) and 19-point (AFLW-19) sets."""
    eyes = {
        98: ([60], [72], [96], [97]),
        68: ([36], [45], list(range(36, 42)), list(range(42, 48))),
        19: ([6], [11], [7], [10]),
    }
    for k, (ol, or_, pl, pr) in eyes.items():
        gt, pred, box = _shared_alignment(k, seed=k)
        subsets = {"all": np.ones(len(gt), bool), "odd": np.arange(len(gt)) % 2 == 1, "first": np.arange(len(gt)) < 7}
        for name, sel in subsets.items():
            g, p, b = gt[sel], pred[sel], box[sel]
            yxyx = b[:, [1, 0, 3, 2]]
            ours = alignment_metrics(
                torch.from_numpy(p),
                torch.from_numpy(g),
                torch.from_numpy(b),
                0.1 if k == 98 else 0.07,
                "inter_ocular" if k == 98 else "box",
            )
            io = farl_unit_landmarks(g, ol, or_)
            assert ours["nme_inter_ocular"] == pytest.approx(farl_nme(g, p, io), rel=1e-12)
            assert ours["nme_inter_pupil"] == pytest.approx(farl_nme(g, p, farl_unit_landmarks(g, pl, pr)), rel=1e-12)
            assert ours["nme_box"] == pytest.approx(farl_nme(g, p, farl_unit_box(yxyx)), rel=1e-12)
            assert ours["nme_diag"] == pytest.approx(farl_nme(g, p, farl_unit_diag(yxyx)), rel=1e-12)
            if k == 98:
                auc, fr = farl_auc_fr(farl_per_image(g, p, io), 0.1)
                assert (ours["auc_inter_ocular_10"], ours["fr_inter_ocular_10"]) == pytest.approx((auc, fr), abs=1e-12)
                assert 0 < auc < 1 and 0 < fr < 1, (name, auc, fr)  # the test's errors straddle the threshold
            else:
                auc, fr = farl_auc_fr(farl_per_image(g, p, farl_unit_box(yxyx)), 0.07)
                assert (ours["auc_box_7"], ours["fr_box_7"]) == pytest.approx((auc, fr), abs=1e-12)


def test_parsing_f1_agrees_with_farls_scorer_per_class():
    rng = np.random.default_rng(3)
    n = len(CELEBAMASK_FARL_CLASSES)
    labels = [rng.integers(0, n, (int(h), int(w))) for h, w in rng.integers(20, 50, (5, 2))]
    preds = [np.where(rng.uniform(size=a.shape) < 0.7, a, rng.integers(0, n, a.shape)) for a in labels]
    cm = ConfusionMatrix(n)
    for a, b in zip(labels, preds):
        cm.update(torch.from_numpy(b), torch.from_numpy(a))
    ours = parsing_metrics(cm, CELEBAMASK_FARL_CLASSES)
    theirs = farl_f1(labels, preds, n)
    for i, name in enumerate(CELEBAMASK_FARL_CLASSES[1:], start=1):
        assert ours[f"f1/{name}"] == pytest.approx(theirs[i], rel=1e-12)
    assert ours["mean_f1"] == pytest.approx(theirs[1:].mean(), rel=1e-12)  # fg_mean: hair included


def test_celebamask_columns_are_printed_in_farls_naming():
    """FaRL's scorer (scorers/celebm.yaml) names its labels, in farl/datasets/celebamask_hq.py's paint order,
    background, neck, face, cloth, rr, lr, rb, lb, re, le, ...: the release's l_eye mask is its 're'. The
    printed L-Eye column must be FaRL's 'le', i.e. the release's r_eye mask, and so on for brows and ears."""
    farl_names = [
        "background",
        "neck",
        "face",
        "cloth",
        "rr",
        "lr",
        "rb",
        "lb",
        "re",
        "le",
        "nose",
        "imouth",
        "llip",
        "ulip",
        "hair",
        "glass",
        "hat",
        "earr",
        "neckl",
    ]
    assert len(farl_names) == len(CELEBAMASK_FARL_CLASSES)
    release_of = dict(zip(farl_names, CELEBAMASK_FARL_CLASSES))
    metrics = {f"f1/{c}": (i + 1) / 100 for i, c in enumerate(CELEBAMASK_FARL_CLASSES[1:])} | {"mean_f1": 0.5}
    headers, values = paper_row("celebamask_hq", metrics)
    row = dict(zip(headers, values))
    column_of = {
        "L-Eye": "le",
        "R-Eye": "re",
        "L-Brow": "lb",
        "R-Brow": "rb",
        "L-Ear": "lr",
        "R-Ear": "rr",
        "Face": "face",
        "Hair": "hair",
        "Glasses": "glass",
        "Neck": "neck",
    }
    for header, farl in column_of.items():
        assert row[header] == f"{100 * metrics['f1/' + release_of[farl]]:.2f}", header
    assert headers[:5] == ["Face", "Nose", "Glasses", "L-Eye", "R-Eye"] and headers[-1] == "Mean"


# ---- head, targets, loss ----


def test_heatmap_targets_and_points_as_farl_draws_and_reads_them():
    pts = torch.tensor([[[0.3, 0.6], [0.71, 0.205]]], dtype=torch.float64)  # (1, 2, 2) in [0, 1]
    hm = point_heatmaps(pts, size=32, radius=5.0)
    assert hm.shape == (1, 2, 32, 32)
    for k in range(2):  # p2i 'gaussian_awing' with reduce max on a zero background, pixel by pixel
        px, py = pts[0, k, 0].item() * 32 - 0.5, pts[0, k, 1].item() * 32 - 0.5
        for y in range(32):
            for x in range(32):
                r = math.hypot(x - px, y - py)
                want = math.exp(-r * r * 16 / 2 / 25) if r <= 5.0 else 0.0
                assert hm[0, k, y, x].item() == pytest.approx(want, abs=1e-6)
    # heatmap2points: weighted mean of pixel indices, then (i + 0.5) / size
    w = torch.rand(2, 3, 8, 6)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(6.0), indexing="ij")
    s = w.sum((2, 3))
    want = torch.stack([((xx * w).sum((2, 3)) / s + 0.5) / 6, ((yy * w).sum((2, 3)) / s + 0.5) / 8], -1)
    assert_close_scaled(heatmap_points(w), want, depth=2)  # two fp32 sums (weights, weighted indices) and a divide


def test_alignment_loss_is_euclidean_distance_plus_heatmap_bce():
    target = torch.tensor([[[0.5, 0.5]]])
    pred = target + torch.tensor([[[0.03, 0.04]]])
    assert coord_distance_loss(pred, target).item() == pytest.approx(0.05, rel=1e-6)  # not the L1's 0.035
    logits = torch.randn(1, 1, 16, 16)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.nn.functional.interpolate(logits, (128, 128), mode="bilinear", align_corners=False),
        point_heatmaps(target, 128, 5.0),
    )
    assert alignment_loss((pred, logits), target, "farl").item() == pytest.approx(0.05 + bce.item(), rel=1e-6)
    assert alignment_loss(pred, target, "l1").item() == pytest.approx(0.035, rel=1e-6)
    with pytest.raises(ValueError, match="heatmap head"):
        alignment_loss(pred, target, "farl")


def test_farl_blocks_scale_with_depth():
    assert (
        farl_blocks(12) == (3, 5, 7, 11) and farl_blocks(24) == (7, 11, 15, 23) and farl_blocks(32) == (8, 14, 20, 31)
    )
    assert farl_blocks(4) == (0, 1, 2, 3) and farl_blocks(6) == (1, 2, 3, 5)
    for d in range(4, 40):
        b = farl_blocks(d)
        assert len(b) == 4 and list(b) == sorted(set(b)) and b[-1] == d - 1


def test_uper_models_shapes_and_every_trainable_parameter_gets_a_gradient():
    enc = build_encoder(load_encoder_weights("random"), 64)  # tiny ViT, 4×4 patch grid
    lm = HeatmapLandmarkModel(enc, 7)
    assert lm.backbone.out_indices == farl_blocks(enc.depth)
    points, logits = lm.train()(torch.randn(2, 3, 64, 64))
    assert points.shape == (2, 7, 2) and logits.shape == (2, 7, 16, 16)  # stride 4 (FaRL: 4× its 16-px grid)
    alignment_loss((points, logits), torch.rand(2, 7, 2), "farl").backward()
    missing = [n for n, p in lm.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing
    assert lm.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7, 2)
    seg = UPerParsingModel(build_encoder(load_encoder_weights("random"), 64), 11)
    assert seg.train()(torch.randn(2, 3, 64, 64)).shape == (2, 11, 64, 64)


def test_frozen_backbone_is_out_of_the_optimizer_in_eval_mode_and_unchanged():
    enc = build_encoder(load_encoder_weights("random"), 64)
    model = HeatmapLandmarkModel(enc, 5)
    model.backbone.freeze()
    model.train()
    assert not model.backbone.training and not model.backbone.encoder.training and model.head.training
    groups = param_groups_lrd(model, enc.depth, 1e-5, 1.0)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.backbone.parameters())
    assert all(id(p) in in_opt for p in model.head.parameters())
    feats = model.backbone(torch.randn(2, 3, 64, 64))
    assert all(f.grad_fn is None for f in feats)  # no graph kept through the encoder
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.conv_seg.weight.clone()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    alignment_loss(model(torch.randn(2, 3, 64, 64)), torch.rand(2, 5, 2), "farl").backward()
    opt.step()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(head_before, model.head.conv_seg.weight)


# ---- geometry ----


def test_non_square_boxes_are_stretched_onto_the_frame_as_farl_does():
    box = np.array([100.0, 40.0, 200.0, 170.0])  # 100 wide, 130 tall
    corners = np.array([[100.0, 40.0], [200.0, 170.0]])
    stretched = to_frame(corners, box_matrix(box, 512, stretch=True)).numpy()
    np.testing.assert_allclose(stretched, [[-0.5, -0.5], [511.5, 511.5]], atol=1e-9)  # both axes fill the frame
    square = to_frame(corners, box_matrix(box, 512)).numpy()
    np.testing.assert_allclose(square[:, 1], [-0.5, 511.5], atol=1e-9)  # the longer side fills it
    assert square[0, 0] > 0 and square[1, 0] < 511  # the shorter one does not: the aspect ratio is kept
    assert all(PROTOCOLS[p].box_stretch and PROTOCOLS[p].head == "uper" for p in PROTOCOLS)


# ---- WFLW ----


def test_wflw_layout_splits_and_subsets(tmp_path):
    root = S.write_wflw(tmp_path / "wflw", num_train=4, num_test=7)
    assert detect_protocol("alignment", root) == "wflw"
    train, test = WFLW(root, "train"), WFLW(root, "test")
    assert len(train) == 4 and len(test) == 7 and train.num_points == 98
    assert list(test.subsets) == list(WFLW_SUBSETS)
    assert test.subsets["largepose"].tolist() == [True, False, False, False, False, False, True]
    assert test.subsets["blur"].tolist() == [True, False, False, False, False, True, False]
    one = WFLW(root, "test_blur")
    assert len(one) == 2 and not one.subsets
    image, pts, box = test[0]
    assert pts.shape == (98, 2) and box[2] - box[0] == pytest.approx(box[3] - box[1])  # HRNet: centre ± 100·scale
    with pytest.raises(DataError, match="WFLW splits"):
        WFLW(root, "val")
    (root / "face_landmarks_wflw_test.csv").unlink()
    with pytest.raises(DataError, match="face_landmarks_wflw_test.csv is missing"):
        WFLW(root, "test")


def test_wflw_row_columns_in_the_papers_order():
    m = add_percent(
        {
            "nme_inter_ocular": 0.0396,
            "fr_inter_ocular_10": 0.0164,
            "auc_inter_ocular_10": 0.6114,
            **{f"{s}/nme_inter_ocular": 0.01 * (i + 1) for i, s in enumerate(WFLW_SUBSETS)},
        }
    )
    headers, values = paper_row("wflw", m)
    assert headers == [
        "NME_io Full",
        "NME_io Large pose",
        "NME_io Expression",
        "NME_io Illumination",
        "NME_io Make-up",
        "NME_io Occlusion",
        "NME_io Blur",
        "FR_io@10 Full",
        "AUC_io@10 Full",
    ]
    assert values == ["3.960", "1.000", "2.000", "3.000", "4.000", "5.000", "6.000", "1.64", "61.14"]
    assert paper_row("wflw", add_percent({"nme_inter_ocular": 0.05}), "test_blur")[1][6] == "5.000"


# ---- best / last ----


def test_best_epoch_by_the_full_metric_and_both_rows_printed():
    ev = [
        {"epoch": 1, "metrics": add_percent({"nme_diag": 0.012})},
        {"epoch": 2, "metrics": add_percent({"nme_diag": 0.009})},
        {"epoch": 3, "metrics": add_percent({"nme_diag": 0.009})},  # a tie keeps the earlier epoch
        {"epoch": 4, "metrics": add_percent({"nme_diag": float("nan")})},
        {"epoch": 5, "metrics": add_percent({"nme_diag": 0.010})},
    ]
    best = None
    for r in ev:
        if is_better("aflw19", r["metrics"], best["metrics"] if best else None):
            best = r
    assert best["epoch"] == 2
    assert is_better("lapa", {"mean_f1": 0.9}, {"mean_f1": 0.8}) and not is_better(
        "lapa", {"mean_f1": 0.7}, {"mean_f1": 0.8}
    )
    text = format_best_last("aflw19", best, ev[-1])
    assert "| best (epoch 2, min nme_diag; the paper's column) | 0.900 |" in text
    assert "| last (epoch 5) | 1.000 |" in text


# ---- low data, memory ----


def test_train_data_ratio_draws_a_fixed_subset(tmp_path):
    from mcf.downstream.datasets import AFLW19
    from mcf.downstream.finetune import train_subset

    base = AFLW19(S.write_aflw19(tmp_path / "aflw", num_images=3, num_test=2), "train")
    a, b = train_subset(base, 0.001, seed=0), train_subset(base, 0.001, seed=0)
    assert len(a) == 20 and list(a.indices) == list(b.indices) and list(a.indices) == sorted(a.indices)
    assert list(train_subset(base, 0.001, seed=1).indices) != list(a.indices)
    assert train_subset(base, 1.0, 0) is base
    np.testing.assert_array_equal(a[3][1], base[int(a.indices[3])][1])
    with pytest.raises(ConfigError, match="train_data_ratio"):
        _cfg(tmp_path, train_data_ratio=0.0)


def _cfg(tmp_path, **kw):
    from mcf.downstream.finetune import FinetuneConfig

    data = tmp_path / "wflw_cfg"
    if not data.exists():
        S.write_wflw(data, num_train=4, num_test=2)
    return FinetuneConfig(task="alignment", data=str(data), pretrained="random", img_size=64, **kw)


def test_memory_estimate_counts_what_autograd_saves():
    """The meta-device count against the tensors a real forward saves (same model, same input): an upper
    bound (meta runs attention's math path, which keeps the probabilities the fused kernels do not)."""
    enc = build_encoder(load_encoder_weights("random"), 64)
    for model in (HeatmapLandmarkModel(enc, 5), UPerParsingModel(build_encoder(load_encoder_weights("random"), 64), 4)):
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t, seen=seen, params=params):
            if t.untyped_storage().data_ptr() not in params:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(torch.randn(2, 3, 64, 64))
        real = sum(seen.values())
        est = memory.activation_bytes(model, (2, 3, 64, 64))
        assert real <= est <= 1.45 * real, (real, est)


def test_memory_check_picks_micro_batch_and_accumulation_or_says_what_fits(tmp_path, monkeypatch):
    from mcf.downstream.finetune import _build, plan_batch

    cfg = _cfg(tmp_path)
    model = _build(cfg)[0]
    est = memory.estimate(model, 64, 1, ema=True, bf16=False)
    room = int(memory.PROCESS_OVERHEAD + memory.HEADROOM * (est.state_bytes + 4.5 * est.activation_bytes_per_sample))
    monkeypatch.setattr(memory, "available", lambda device: room)  # room for 4 samples, not 5
    batch, accum, note = plan_batch(cfg, model, 1, torch.device("cpu"), 1000)
    assert (batch, accum) == (4, 10) and "keeps the global batch" in note  # the protocol's 40 = 4 × 10
    explicit = _cfg(tmp_path, batch_size=8)
    with pytest.raises(ConfigError, match=r"not enough memory for batch 8 .*--batch-size 4 --grad-accum 2"):
        plan_batch(explicit, model, 1, torch.device("cpu"), 1000)
    monkeypatch.setattr(memory, "available", lambda device: 10)
    with pytest.raises(ConfigError, match="smallest micro-batch"):
        plan_batch(cfg, model, 1, torch.device("cpu"), 1000)
    assert plan_batch(_cfg(tmp_path, memory_check=False, batch_size=8), model, 1, torch.device("cpu"), 1000)[:2] == (
        8,
        1,
    )


def test_farl_pyramid_strides_for_patch_16_8_and_4():
    """FaRL's fpns for patch 16 (deconv-BN-GELU-deconv, deconv, identity, max-pool) and 8 (deconv, identity,
    max-pools 2 and 4); patch 4 by the same rule: every level at strides 4, 8, 16, 32 of a 64-px input."""
    from mcf.downstream.heads import FaRLPyramid

    for patch in (16, 8, 4):
        pyr = FaRLPyramid(8, patch).eval()
        g = 64 // patch
        outs = pyr([torch.randn(1, 8, g, g) for _ in range(4)])
        assert [o.shape[-1] for o in outs] == [16, 8, 4, 2], patch
    kinds = [type(m).__name__ for m in FaRLPyramid(8, 16).fpns]
    assert kinds == ["Sequential", "ConvTranspose2d", "Identity", "MaxPool2d"]
    assert [type(m).__name__ for m in FaRLPyramid(8, 16).fpns[0]] == [
        "ConvTranspose2d",
        "BatchNorm2d",
        "GELU",
        "ConvTranspose2d",
    ]


@pytest.mark.parametrize("benchmark", ["aflw19", "300w", "wflw", "lapa", "celebamask_hq"])
def test_synthetic_recipe_writes_each_benchmark_in_its_layout(tmp_path, benchmark, capsys):
    """The README's one-command recipe: the folder it writes is recognised as that benchmark's protocol and
    opens as its train and test splits."""
    from mcf.downstream.finetune import FinetuneConfig, _build

    root = tmp_path / benchmark
    assert S.main([benchmark, str(root), "--images", "6", "--size", "32"]) == 0
    task = "parsing" if benchmark in ("lapa", "celebamask_hq") else "alignment"
    assert detect_protocol(task, root) == benchmark
    assert f"mcf finetune {task} --data {root}" in capsys.readouterr().out
    _, train, test, _, _ = _build(FinetuneConfig(task=task, data=str(root), pretrained="random", img_size=32))
    assert len(train) >= 1 and len(test) >= 1
    with pytest.raises(SystemExit):
        S.main([benchmark, str(root)])  # not over an existing folder


def test_wflw_subset_columns_equal_scoring_each_subset_file_alone(tmp_path):
    """FaRL scores each WFLW subset as its own evaluation set (test_<subset>.csv); mcf scores the subsets as
    masks over one pass of the test split. Same model, same faces: the same numbers."""
    from mcf.downstream.finetune import TaskData, evaluate_alignment
    from mcf.downstream.transforms import AlignmentTransform

    root = S.write_wflw(tmp_path / "wflw", num_train=2, num_test=7, size=48)
    torch.manual_seed(0)
    model = HeatmapLandmarkModel(build_encoder(load_encoder_weights("random"), 32), 98).eval()
    t = AlignmentTransform(32, 1.25, stretch=True)

    def score(split):
        return evaluate_alignment(
            model,
            TaskData("alignment", WFLW(root, split), t, 0, False),
            3,
            torch.device("cpu"),
            torch.float32,
            0.1,
            "inter_ocular",
        )

    full = score("test")
    for sub in WFLW_SUBSETS:
        alone = score(f"test_{sub}")
        for k in ("nme_inter_ocular", "nme_inter_pupil", "auc_inter_ocular_10", "fr_inter_ocular_10"):
            # fp32 network outputs differ in the last bits with the batch's make-up: ~100 fp32 epsilons
            assert full[f"{sub}/{k}"] == pytest.approx(alone[k], rel=1e-5, abs=1e-9), (sub, k)
    assert full["blur/nme_inter_ocular"] != full["largepose/nme_inter_ocular"]


def test_head_and_loss_options_resolve_and_bad_pairs_are_one_line(tmp_path, capsys):
    """Presets: FaRL's head and loss; --head light keeps mcf's head with its L1 loss; the new flags come from
    FinetuneConfig's field metadata (declared once)."""
    from mcf.cli import main

    cfg = _cfg(tmp_path)
    assert (cfg.protocol, cfg.head, cfg.loss, cfg.box_stretch, cfg.eval_every) == ("wflw", "uper", "farl", True, 1)
    light = _cfg(tmp_path, head="light", box_stretch=False)
    assert (light.head, light.loss, light.box_stretch) == ("light", "l1", False)
    with pytest.raises(ConfigError, match="needs heatmaps"):
        _cfg(tmp_path, head="light", loss="farl")
    with pytest.raises(ConfigError, match="loss must be one of farl, l1"):
        _cfg(tmp_path, loss="ce")
    with pytest.raises(SystemExit):
        main(["finetune", "alignment", "--help"])
    text = capsys.readouterr().out
    for flag in ("--head", "--loss", "--no-box-stretch", "--eval-every", "--train-data-ratio", "--freeze-backbone",
                 "--grad-accum", "--no-memory-check"):
        assert flag in text, flag
    assert main(["finetune", "alignment", "--data", cfg.data, "--pretrained", "random", "--head", "light",
                 "--loss", "farl", "--output-dir", str(tmp_path / "o")]) == 2
    assert "needs heatmaps" in capsys.readouterr().err


def test_batchnorm_runs_with_bf16_weights_and_fp32_statistics_as_deepspeed_leaves_them():
    """DeepSpeed's bf16 casts the parameters, not the buffers: torch's CPU BatchNorm refuses the mix. The heads'
    BatchNorm computes in fp32 and updates the fp32 statistics exactly as an fp32 BatchNorm would."""
    from mcf.downstream.heads import BatchNorm2d

    torch.manual_seed(0)
    ref, bn = torch.nn.BatchNorm2d(6), BatchNorm2d(6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-0.5, 0.5)
    bn.load_state_dict(ref.state_dict())
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()  # buffers stay fp32
    x = torch.randn(4, 6, 5, 5).bfloat16()
    y = bn.train()(x)
    want = ref.train()(x.float())
    assert y.dtype == torch.bfloat16
    # bf16 weights and bf16 output: two roundings to bf16 (the statistics are fp32), 2 eps(bf16) of max|y| each
    assert_close_scaled(y.float(), want, dtype=torch.bfloat16, depth=2, k=2)
    assert_close_scaled(bn.running_mean, ref.running_mean, depth=2)  # fp32 reductions over 100 values, in another order
    assert_close_scaled(bn.running_var, ref.running_var, depth=2)
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 1
    assert_close_scaled(bn.eval()(x).float(), ref.eval()(x.float()), dtype=torch.bfloat16, depth=2, k=2)
    with pytest.raises(RuntimeError):  # what torch's own BatchNorm does in that state
        torch.nn.BatchNorm2d.forward(bn.train(), x)
