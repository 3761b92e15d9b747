"""Alignment NMEs and parsing F1 against values computed by hand."""

import math

import pytest
import torch

from mcf.downstream.metrics import (
    ConfusionMatrix,
    alignment_metrics,
    box_diag,
    box_size,
    inter_ocular,
    nme,
    parsing_metrics,
    point_errors,
)


def test_nme_diag_and_box_by_hand():
    # one image, 2 points; errors 3-4-5 → 5 and 0 → mean 2.5; box 30 x 40: diag 50, sqrt(w h) = sqrt(1200)
    gt = torch.tensor([[[10.0, 10.0], [20.0, 20.0]]])
    pred = torch.tensor([[[13.0, 14.0], [20.0, 20.0]]])
    box = torch.tensor([[0.0, 0.0, 30.0, 40.0]])
    assert point_errors(pred, gt).tolist() == [2.5]
    assert box_diag(box).tolist() == [50.0]
    assert box_size(box).item() == pytest.approx(math.sqrt(1200))
    m = alignment_metrics(pred, gt, box)
    assert m["nme_diag"] == pytest.approx(2.5 / 50)
    assert m["nme_box"] == pytest.approx(2.5 / math.sqrt(1200))
    assert "nme_inter_ocular" not in m  # not a 68-point set


def test_nme_inter_ocular_uses_outer_eye_corners_and_averages_images():
    gt = torch.zeros(2, 68, 2)
    gt[:, 36] = torch.tensor([0.0, 0.0])
    gt[:, 45] = torch.tensor([40.0, 0.0])  # inter-ocular 40
    pred = gt.clone()
    pred[0] += torch.tensor([4.0, 0.0])  # image 0: every point 4 px off → NME 0.1
    # image 1: exact → 0; dataset NME = mean over images = 0.05
    assert inter_ocular(gt).tolist() == [40.0, 40.0]
    assert nme(pred, gt, inter_ocular(gt)).tolist() == pytest.approx([0.1, 0.0])
    assert alignment_metrics(pred, gt, None)["nme_inter_ocular"] == pytest.approx(0.05)


def test_f1_accumulates_pixels_over_the_dataset():
    classes = ("background", "skin", "hair")
    cm = ConfusionMatrix(3)
    # image 1: truth [0 1 1 2], pred [0 1 2 2]; image 2: truth [1 1], pred [1 0]
    cm.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    cm.update(torch.tensor([[1, 0]]), torch.tensor([[1, 1]]))
    # skin: TP 2, FP 0, FN 2 → F1 4/6; hair: TP 1, FP 1, FN 0 → 2/3
    m = parsing_metrics(cm, classes)
    assert m["f1/skin"] == pytest.approx(4 / 6)
    assert m["f1/hair"] == pytest.approx(2 / 3)
    assert "f1/background" not in m
    assert m["mean_f1"] == pytest.approx((4 / 6 + 2 / 3) / 2)  # hair included
    assert m["mean_f1_no_hair"] == pytest.approx(4 / 6)


def test_f1_ignore_index_and_absent_class():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 1, 0]), torch.tensor([1, 255, 0]))
    f1 = cm.f1()
    assert f1[1].item() == 1.0
    assert math.isnan(f1[2].item())  # neither predicted nor present
    m = parsing_metrics(cm, ("background", "skin", "hair"))
    assert m["mean_f1"] == 1.0  # NaN classes are left out of the mean
