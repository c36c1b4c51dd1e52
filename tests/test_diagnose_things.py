"""Tests of tools/diagnose_things.py: per-thing found / named on hand-built masks, the summary."""

import importlib.util

import pytest
import torch

from conftest import REPO_ROOT

pytest.importorskip(
    "detectron2", reason="detectron2 not installed (install it from its official source)"
)

_spec = importlib.util.spec_from_file_location("psf_diagnose_things", REPO_ROOT / "tools" / "diagnose_things.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

NAMES = ["square", "disc", "stripes"]  # contiguous ids 0, 1 (things) and 2 (stuff)


def _box(y0, y1, x0, x1, size=(20, 20)):
    m = torch.zeros(size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _two_things():
    gt = torch.stack([_box(0, 10, 0, 10), _box(10, 20, 10, 20)])  # 100 px each
    return gt, torch.tensor([0, 1])


def test_found_named_and_class_iou():
    gt, gt_labels = _two_things()
    # thing 0: found twice, the better-scoring candidate has the wrong class;
    # thing 1: one candidate of its class covering 40 of its pixels (IoU 0.4), so not found
    masks = torch.stack([gt[0], gt[0], _box(10, 14, 10, 20)])
    labels = torch.tensor([1, 0, 1])
    scores = torch.tensor([0.9, 0.5, 0.8])
    r0, r1 = diag.match_things(gt, gt_labels, masks, labels, scores)
    assert (r0["found"], r0["named"], r0["named_label"]) == (True, False, 1)
    assert r0["best_iou"] == pytest.approx(1.0) and r0["class_iou"] == pytest.approx(1.0)
    assert (r1["found"], r1["named"], r1["named_label"]) == (False, False, -1)
    assert r1["best_iou"] == pytest.approx(0.4) and r1["class_iou"] == pytest.approx(0.4)
    assert (r0["area"], r1["area"]) == (100, 100)

    # the same candidates with the scores swapped: thing 0 is now named
    r0, _ = diag.match_things(gt, gt_labels, masks, labels, torch.tensor([0.5, 0.9, 0.8]))
    assert (r0["named"], r0["named_label"]) == (True, 0)
    # a lower IoU threshold finds thing 1 too
    _, r1 = diag.match_things(gt, gt_labels, masks, labels, scores, iou_thresh=0.3)
    assert (r1["found"], r1["named"]) == (True, True)


def test_no_candidates_finds_nothing():
    gt, gt_labels = _two_things()
    empty = torch.zeros(0, 20, 20, dtype=torch.bool)
    records = diag.match_things(gt, gt_labels, empty, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert [(r["found"], r["named_label"], r["best_iou"]) for r in records] == [(False, -1, 0.0)] * 2


def test_mask_sizes_must_agree():
    gt, gt_labels = _two_things()
    with pytest.raises(ValueError, match="differ in size"):
        diag.match_things(gt, gt_labels, torch.zeros(1, 10, 10, dtype=torch.bool), torch.tensor([0]), torch.tensor([1.0]))


def test_summary_fractions_confusion_and_report():
    gt, gt_labels = _two_things()
    masks = torch.stack([gt[0], gt[0], _box(10, 14, 10, 20)])
    records = diag.match_things(gt, gt_labels, masks, torch.tensor([1, 0, 1]), torch.tensor([0.9, 0.5, 0.8]))
    s = diag.summarise(records, 0.5, NAMES)
    assert s["all"]["things"] == 2
    assert s["all"]["found"] == pytest.approx(0.5)
    assert s["all"]["named"] == 0.0 and s["all"]["named_if_found"] == 0.0
    assert s["all"]["found_with_class"] == pytest.approx(0.5)
    assert s["all"]["mean_best_iou"] == pytest.approx(0.7)
    # rows: true class; columns: named class, then "not found"
    assert s["confusion"] == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert sum(f["things"] for f in s["by_area"].values()) == 2
    report = diag.format_report(s)
    assert "square" in report and "disc" in report and "stripes" not in report  # only classes seen
    with pytest.raises(ValueError, match="no ground-truth things"):
        diag.summarise([], 0.5, NAMES)
