"""HungarianMatcher, its cost terms and the GT-mask resizing (SPEC §5.1-§5.3)."""
import math

import pytest
import torch

from panoptic_segformer.modeling.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    denormalize_cxcywh_boxes,
    normalize_xyxy_boxes,
)
from panoptic_segformer.modeling.matcher import (
    HungarianMatcher,
    dice_cost,
    focal_cost,
    resize_mask_targets,
)


def _box(cx, cy=0.5, w=0.1, h=0.1):
    return [cx, cy, w, h]


def test_focal_cost_formula_by_hand():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.0]])
    labels = torch.tensor([1, 1, 0])
    cost = focal_cost(logits, labels, alpha=0.25, gamma=2.0)
    for q in range(2):
        for g, k in enumerate(labels.tolist()):
            p = 1 / (1 + math.exp(-logits[q, k].item()))
            pos = -0.25 * (1 - p) ** 2 * math.log(p + 1e-12)
            neg = -0.75 * p ** 2 * math.log(1 - p + 1e-12)
            assert cost[q, g].item() == pytest.approx(pos - neg, rel=1e-5)


def test_cost_matrix_is_the_weighted_sum_of_hand_computed_terms():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=3.0)
    logits = torch.tensor([[0.5, -0.5]])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4]])  # xyxy (0.3, 0.3, 0.7, 0.7)
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.2]])}  # (0.4,0.4,0.8,0.6)
    cost = matcher.cost_matrix(logits, boxes, target)
    # IoU: inter 0.3·0.2 = 0.06, union 0.16 + 0.08 - 0.06 = 0.18; hull 0.5·0.4 = 0.2
    giou = 0.06 / 0.18 - (0.2 - 0.18) / 0.2
    l1 = 0.1 + 0.0 + 0.0 + 0.2
    cls = focal_cost(logits, target["labels"])[0, 0].item()
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx(2.0 * cls + 5.0 * l1 - 3.0 * giou, rel=1e-5)


def test_optimal_assignment_differs_from_greedy():
    # 1-d L1 costs: greedy would take (q1, g1) = 0.05 first and end at 0.25; the optimum is 0.15
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    boxes = torch.tensor([[_box(0.40), _box(0.50), _box(0.95)]])
    logits = torch.zeros(1, 3, 2)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([_box(0.60), _box(0.45)])}]
    (pred_idx, gt_idx), = matcher(logits, boxes, targets)
    assert pred_idx.tolist() == [0, 1] and gt_idx.tolist() == [1, 0]
    assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
    assert pred_idx.device.type == "cpu"


def test_batch_indices_are_per_image_and_pred_idx_ascending():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    boxes = torch.tensor([[_box(0.9), _box(0.1), _box(0.5), _box(0.3)],
                          [_box(0.2), _box(0.4), _box(0.6), _box(0.8)]])
    targets = [
        {"labels": torch.tensor([0, 0, 0]), "boxes": torch.tensor([_box(0.1), _box(0.9), _box(0.52)])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([_box(0.79)])},
    ]
    out = matcher(torch.zeros(2, 4, 2), boxes, targets)
    assert out[0][0].tolist() == [0, 1, 2] and out[0][1].tolist() == [1, 0, 2]
    assert out[1][0].tolist() == [3] and out[1][1].tolist() == [0]


def test_class_cost_decides_between_identical_boxes():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    boxes = torch.tensor([[_box(0.5), _box(0.5)]])
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([_box(0.5), _box(0.5)])}]
    (pred_idx, gt_idx), = matcher(logits, boxes, targets)
    assert gt_idx.tolist() == [1, 0]


def test_query_padding_mask_excludes_slots_and_keeps_original_indices():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    boxes = torch.tensor([[_box(0.5), _box(0.2), _box(0.9)]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([_box(0.5)])}]
    padding = torch.tensor([[True, False, False]])  # the perfect query is a padded slot
    (pred_idx, gt_idx), = matcher(torch.zeros(1, 3, 1), boxes, targets, query_padding_mask=padding)
    assert pred_idx.tolist() == [1]
    with pytest.raises(ValueError, match="1 ground-truth things but only 0 queries"):
        matcher(torch.zeros(1, 3, 1), boxes, targets, query_padding_mask=torch.ones(1, 3, dtype=torch.bool))


def test_more_gts_than_queries_and_empty_targets():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    boxes = torch.tensor([[_box(0.5)]])
    too_many = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([_box(0.5), _box(0.2)])}]
    with pytest.raises(ValueError, match="has 2 ground-truth things but only 1 queries"):
        matcher(torch.zeros(1, 1, 1), boxes, too_many)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    (pred_idx, gt_idx), = matcher(torch.zeros(1, 1, 1), boxes, empty)
    assert pred_idx.numel() == 0 and gt_idx.numel() == 0 and pred_idx.dtype == torch.int64


def test_bad_inputs_raise():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    t = [{"labels": torch.tensor([0]), "boxes": torch.tensor([_box(0.5)])}]
    with pytest.raises(ValueError, match="boxes must have shape"):
        matcher(torch.zeros(1, 2, 1), torch.zeros(1, 3, 4), t)
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2"):
        matcher(torch.zeros(2, 1, 1), torch.rand(2, 1, 4), t)
    with pytest.raises(ValueError, match="NaN/Inf"):
        matcher(torch.full((1, 1, 1), float("nan")), torch.tensor([[_box(0.5)]]), t)
    with pytest.raises(ValueError, match="needs the predicted masks"):
        HungarianMatcher(1.0, 1.0, 1.0, cost_dice=1.0)(torch.zeros(1, 1, 1), torch.tensor([[_box(0.5)]]), t)
    with pytest.raises(ValueError, match="all matching cost weights are 0"):
        HungarianMatcher(0.0, 0.0, 0.0)


def test_dice_cost_by_hand():
    pred = torch.tensor([[[1.0, 0.5], [0.0, 2.0]]])  # (1, 2, 2)
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    cost = dice_cost(pred, gt)
    # sum p^2 = 5.25; gt0: pg = 1.5, g^2 = 2; gt1: pg = 2, g^2 = 1
    assert cost[0, 0].item() == pytest.approx(1 - 3.0 / (5.25 + 2 + 0.002), rel=1e-6)
    assert cost[0, 1].item() == pytest.approx(1 - 4.0 / (5.25 + 1 + 0.002), rel=1e-6)


def test_resize_mask_targets_aligns_padding_with_the_stride8_grid():
    # padded size 12 x 20 -> stride-8 grid 2 x 3 covering 16 x 24 input pixels
    masks = torch.zeros(1, 12, 20)
    masks[0, 0:8, 0:8] = 1.0  # exactly the first stride-8 cell
    at8 = resize_mask_targets(masks, (2, 3))
    assert torch.equal(at8, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    at4 = resize_mask_targets(masks, (2, 3), upsample=2)
    expected = torch.zeros(1, 4, 6)
    expected[0, :2, :2] = 1.0
    assert torch.equal(at4, expected)
    # soft (not re-binarised) bilinear values: a 2-px stripe downsampled by 4
    soft = torch.zeros(1, 16, 16)
    soft[0, :, 2] = 1.0
    out = resize_mask_targets(soft, (2, 2), upsample=2)  # 4 x 4, samples at x = 1.5, 5.5, ...
    assert out[0, 0].tolist() == [0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="do not match stride-8 predictions"):
        resize_mask_targets(masks, (3, 3))


def test_dice_cost_is_used_for_mask_matching():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0, cost_dice=1.0)
    gt = torch.zeros(2, 16, 16)
    gt[0, :8] = 1.0  # top half
    gt[1, 8:] = 1.0  # bottom half
    pred = torch.zeros(1, 2, 2, 2)
    pred[0, 0, 1] = 1.0  # query 0 predicts the bottom half
    pred[0, 1, 0] = 1.0
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.rand(2, 4) * 0.5 + 0.25, "masks": gt}]
    (pred_idx, gt_idx), = matcher(torch.zeros(1, 2, 1), torch.rand(1, 2, 4) * 0.5 + 0.25, targets, masks=pred)
    assert pred_idx.tolist() == [0, 1] and gt_idx.tolist() == [1, 0]


def test_box_conversions():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    norm = normalize_xyxy_boxes(xyxy, (100, 50))  # (h, w)
    assert torch.allclose(norm, torch.tensor([[0.4, 0.4, 0.4, 0.4]]))
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    back = denormalize_cxcywh_boxes(torch.tensor([[0.4, 0.4, 0.4, 0.4], [0.9, 0.5, 0.4, 2.0]]), (100, 50))
    assert torch.allclose(back, torch.tensor([[10.0, 20.0, 30.0, 60.0], [35.0, 0.0, 50.0, 100.0]]))
    with pytest.raises(ValueError, match="boxes must have shape"):
        normalize_xyxy_boxes(torch.zeros(4), (10, 10))
