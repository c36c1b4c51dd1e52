"""PanopticSegFormerCriterion: every loss term against a direct hand computation (SPEC §5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_detectron2

pytestmark = requires_detectron2

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion, dice_loss  # noqa: E402
from panoptic_segformer.modeling.matcher import HungarianMatcher  # noqa: E402

EPS = 1e-6


def _criterion():
    return PanopticSegFormerCriterion(
        matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        mask_matcher=HungarianMatcher(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_dice=2.0),
    )


def _focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def _giou(a, b):
    """GIoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


# ---------------------------------------------------------------- location losses
def _location_case():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 2, 3, 2, generator=g) * 0.5).requires_grad_()
    cx = torch.tensor([[[0.2, 0.5, 0.8], [0.3, 0.6, 0.9]], [[0.25, 0.55, 0.75], [0.35, 0.65, 0.85]]])
    boxes = torch.stack([cx, torch.full_like(cx, 0.5), torch.full_like(cx, 0.2), torch.full_like(cx, 0.3)], -1)
    boxes.requires_grad_()
    targets = [
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.81, 0.45, 0.25, 0.3], [0.19, 0.5, 0.2, 0.35]]),
         "stuff_labels": torch.tensor([1])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.58, 0.55, 0.2, 0.2]]),
         "stuff_labels": torch.zeros(0, dtype=torch.int64)},
    ]
    # expected matches (query, gt) per image: L1 on cx dominates every other cost here
    matches = [[(0, 1), (2, 0)], [(1, 0)]]
    return logits, boxes, targets, matches


def test_location_losses_by_hand():
    logits, boxes, targets, matches = _location_case()
    losses, indices = _criterion().location_losses(logits, boxes, targets)
    n_th, n_st = 3.0, 1.0
    r_th = n_th / (n_th + n_st)
    assert [(i.tolist(), j.tolist()) for i, j in indices] == [
        ([q for q, _ in m], [g for _, g in m]) for m in matches
    ]
    for layer in range(2):
        focal = l1 = giou = 0.0
        for b in range(2):
            pos = {q: targets[b]["labels"][g].item() for q, g in matches[b]}
            for q in range(3):
                for k in range(2):
                    focal += _focal(logits[layer, b, q, k].item(), pos.get(q) == k)
            for q, g in matches[b]:
                pred, gt = boxes[layer, b, q].tolist(), targets[b]["boxes"][g].tolist()
                l1 += sum(abs(x - y) for x, y in zip(pred, gt))
                giou += 1 - _giou(pred, gt)
        assert losses[f"loss_cls_d{layer}"].item() == pytest.approx(2.0 * r_th * focal / n_th, rel=1e-5)
        assert losses[f"loss_bbox_d{layer}"].item() == pytest.approx(5.0 * r_th * l1 / n_th, rel=1e-5)
        assert losses[f"loss_giou_d{layer}"].item() == pytest.approx(2.0 * r_th * giou / n_th, rel=1e-5)
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0


def test_location_losses_keys_and_last_layer_indices():
    logits, boxes, targets, _ = _location_case()
    logits6 = logits.detach().repeat(3, 1, 1, 1)
    boxes6 = boxes.detach().repeat(3, 1, 1, 1)
    boxes6[-1, 0, :, 0] = torch.tensor([0.8, 0.5, 0.2])  # last layer swaps queries 0 and 2 of image 0
    losses, indices = _criterion().location_losses(logits6, boxes6, targets)
    assert set(losses) == {f"loss_{n}_d{i}" for n in ("cls", "bbox", "giou") for i in range(6)}
    assert indices[0][0].tolist() == [0, 2] and indices[0][1].tolist() == [0, 1]


# ---------------------------------------------------------------- mask losses
HP = WP = 16  # padded batch size -> stride-8 grid 2 x 2, stride-4 grid 4 x 4


def _top():
    m = torch.zeros(HP, WP)
    m[:8] = 1.0
    return m


def _bottom():
    return 1.0 - _top()


TOP8 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the stride-8 picture of _top()


def _mask_case():
    thing_masks = torch.zeros(2, 2, 2, 2)
    thing_masks[0, 0] = 1 - TOP8  # slot 0 of image 0 predicts the bottom half
    thing_masks[0, 1] = TOP8
    thing_masks[1, 0] = 1.0  # constant
    thing_masks[1, 1] = TOP8  # padded slot that would match best: must be ignored
    thing_masks.requires_grad_()
    thing_query_mask = torch.tensor([[False, False], [False, True]])
    selected_logits = torch.tensor([[[-3.0, 3.0], [3.0, -3.0]], [[3.0, -3.0], [3.0, -3.0]]])
    half = [[0.5, 0.25, 1.0, 0.5], [0.5, 0.75, 1.0, 0.5]]
    selected_boxes = torch.tensor([[half[1], half[0]], [half[0], half[0]]])
    stuff_masks = torch.full((2, 2, 2, 2), 50.0)  # absent classes: ignored by the Dice loss
    stuff_masks[0, 1] = 1.0
    stuff_masks.requires_grad_()
    stuff_logits = [torch.tensor([[0.3, -0.2], [1.0, -1.5]], requires_grad=True),
                    torch.tensor([[-0.7, 0.4], [0.1, 0.2]], requires_grad=True)]
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor(half), "masks": torch.stack([_top(), _bottom()]),
         "stuff_labels": torch.tensor([1]), "stuff_masks": _bottom()[None]},
        {"labels": torch.tensor([0]), "boxes": torch.tensor(half[:1]), "masks": _top()[None],
         "stuff_labels": torch.zeros(0, dtype=torch.int64), "stuff_masks": torch.zeros(0, HP, WP)},
    ]
    thing_out = {"masks": thing_masks, "aux_masks": [0.5 * thing_masks]}
    stuff_out = {"masks": stuff_masks, "aux_masks": [stuff_masks, 2.0 * stuff_masks]}
    return thing_out, thing_query_mask, selected_logits, selected_boxes, stuff_out, stuff_logits, targets


def test_mask_losses_by_hand():
    case = _mask_case()
    losses = _criterion().mask_losses(*case)
    n_th, n_st = 3.0, 1.0
    r_th, r_st = 0.75, 0.25
    # TOP8 upsampled x2 (bilinear, align_corners=False) has rows [1, .75, .25, 0]; the GT top half
    # at stride 4 has rows [1, 1, 0, 0]: sum pg = 4·1.75 = 7, sum p^2 = 4·1.625 = 6.5, sum g^2 = 8.
    # image 0 matches slot 0 <-> bottom and slot 1 <-> top (the same numbers by symmetry);
    # image 1 slot 0 is constant 1: sum pg = 8, sum p^2 = 16.
    tail = 2 * (1 - 14 / (6.5 + 8 + 2 * EPS)) + (1 - 16 / (16 + 8 + 2 * EPS))
    assert losses["loss_mask_things"].item() == pytest.approx(2.0 * r_th * tail / n_th, rel=1e-5)
    # block 0 masks are halved: sum pg / 2, sum p^2 / 4
    block = 2 * (1 - 7 / (6.5 / 4 + 8 + 2 * EPS)) + (1 - 8 / (4 + 8 + 2 * EPS))
    assert losses["loss_mask_things_d0"].item() == pytest.approx(2.0 * r_th * block / n_th, rel=1e-5)
    # stuff: only (image 0, class 1) is present: constant 1 against the bottom half
    stuff = 1 - 16 / (16 + 8 + 2 * EPS)
    assert losses["loss_mask_stuff"].item() == pytest.approx(2.0 * r_st * stuff / n_st, rel=1e-5)
    assert losses["loss_mask_stuff_d0"].item() == pytest.approx(2.0 * r_st * stuff / n_st, rel=1e-5)
    stuff2 = 1 - 32 / (64 + 8 + 2 * EPS)
    assert losses["loss_mask_stuff_d1"].item() == pytest.approx(2.0 * r_st * stuff2 / n_st, rel=1e-5)
    present = [[0, 1], [0, 0]]
    for j, logits in enumerate(case[5]):
        focal = sum(_focal(logits[b, k].item(), present[b][k]) for b in range(2) for k in range(2))
        assert losses[f"loss_cls_stuff_d{j}"].item() == pytest.approx(4.0 * r_st * focal / n_st, rel=1e-5)
    assert set(losses) == {"loss_mask_things", "loss_mask_things_d0", "loss_mask_stuff", "loss_mask_stuff_d0",
                           "loss_mask_stuff_d1", "loss_cls_stuff_d0", "loss_cls_stuff_d1"}
    sum(losses.values()).backward()
    assert case[0]["masks"].grad[1, 1].abs().sum() == 0  # the padded slot gets no gradient
    assert case[4]["masks"].grad[0, 1].abs().sum() > 0
    assert case[4]["masks"].grad[1].abs().sum() == 0  # absent stuff classes: no Dice gradient


def test_dice_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.5], [0.0, 2.0]]])
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])
    # sum pg = 1 + 0.5 + 1 = 2.5; sum p^2 = 5.25; sum g^2 = 2.25
    assert dice_loss(pred, gt).item() == pytest.approx(1 - 5.0 / (5.25 + EPS + 2.25 + EPS), rel=1e-6)


def test_dice_loss_upsamples_predictions_non_trivially():
    """A non-constant stride-8 mask against bilinear F.interpolate as the reference."""
    g = torch.Generator().manual_seed(1)
    crit = _criterion()
    masks = torch.rand(1, 1, 3, 5, generator=g)
    gt = (torch.rand(1, 24, 40, generator=g) > 0.5).float()
    pred4 = torch.nn.functional.interpolate(masks, size=(6, 10), mode="bilinear", align_corners=False)[0]
    gt4 = torch.nn.functional.interpolate(gt[None], size=(6, 10), mode="bilinear", align_corners=False)[0]
    expected = 1 - 2 * (pred4 * gt4).sum() / ((pred4 ** 2).sum() + EPS + (gt4 ** 2).sum() + EPS)
    from panoptic_segformer.modeling.matcher import resize_mask_targets
    got = crit._dice(masks, torch.tensor([0]), torch.tensor([0]), resize_mask_targets(gt, (3, 5), 2), 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- balance and normalisation
def test_balance_ratios_and_clamping():
    t = [{"labels": torch.zeros(3, dtype=torch.int64), "stuff_labels": torch.zeros(1, dtype=torch.int64)},
         {"labels": torch.zeros(2, dtype=torch.int64)}]
    assert PanopticSegFormerCriterion.balance_ratios(t, "cpu") == (5.0, 1.0, 5 / 6, 1 / 6)
    none = [{"labels": torch.zeros(0, dtype=torch.int64), "stuff_labels": torch.zeros(0, dtype=torch.int64)}]
    assert PanopticSegFormerCriterion.balance_ratios(none, "cpu") == (1.0, 1.0, 0.5, 0.5)
    # a dataset without stuff classes has no stuff keys: thing losses keep their full weight
    things_only = [{"labels": torch.zeros(3, dtype=torch.int64)}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    assert PanopticSegFormerCriterion.balance_ratios(things_only, "cpu") == (3.0, 1.0, 1.0, 0.0)


def test_counts_are_averaged_over_processes(monkeypatch):
    from panoptic_segformer.modeling import criterion as mod

    monkeypatch.setattr(mod.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(mod.dist, "all_reduce", lambda t: t.add_(torch.tensor([5.0, 3.0])))
    t = [{"labels": torch.zeros(3, dtype=torch.int64), "stuff_labels": torch.zeros(1, dtype=torch.int64)}]
    assert PanopticSegFormerCriterion.num_targets(t, "cpu") == (4.0, 2.0)


# ---------------------------------------------------------------- edge cases
def _empty_batch(with_stuff):
    targets = []
    for _ in range(2):
        t = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, HP, WP)}
        if with_stuff:
            t["stuff_labels"] = torch.tensor([0])
            t["stuff_masks"] = _top()[None]
        targets.append(t)
    return targets


def test_batch_without_things_keeps_losses_finite_and_connected():
    targets = _empty_batch(with_stuff=True)
    crit = _criterion()
    logits = torch.randn(6, 2, 4, 3, requires_grad=True)
    boxes = torch.rand(6, 2, 4, 4).mul(0.5).add(0.25).requires_grad_()
    loc, indices = crit.location_losses(logits, boxes, targets)
    assert all(i.numel() == 0 and j.numel() == 0 for i, j in indices)
    assert all(torch.isfinite(v) for v in loc.values())
    assert all(loc[f"loss_{n}_d{i}"].item() == 0 for n in ("bbox", "giou") for i in range(6))
    assert all(loc[f"loss_cls_d{i}"].item() > 0 for i in range(6))  # all-background focal loss

    thing_masks = torch.zeros(2, 0, 2, 2, requires_grad=True)
    stuff_masks = torch.rand(2, 2, 2, 2, requires_grad=True)
    stuff_logits = [torch.randn(2, 2, requires_grad=True) for _ in range(3)]
    masks = crit.mask_losses(
        {"masks": thing_masks, "aux_masks": [thing_masks * 1.0] * 4}, torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 0, 3), torch.zeros(2, 0, 4),
        {"masks": stuff_masks, "aux_masks": [stuff_masks * 1.0] * 3}, stuff_logits, targets,
    )
    assert masks["loss_mask_things"].item() == 0 and masks["loss_mask_things"].requires_grad
    assert set(masks) >= {f"loss_mask_things_d{j}" for j in range(4)}
    # deviation (d): the stuff presence loss is computed although the batch has no thing query
    assert all(masks[f"loss_cls_stuff_d{j}"].item() > 0 for j in range(3))
    assert masks["loss_mask_stuff"].item() > 0
    total = sum(loc.values()) + sum(masks.values())
    assert torch.isfinite(total)
    total.backward()
    assert boxes.grad is not None and thing_masks.grad is not None
    assert all(s.grad is not None for s in stuff_logits)


def test_images_without_stuff():
    targets = _empty_batch(with_stuff=False)
    for t in targets:
        t["stuff_labels"] = torch.zeros(0, dtype=torch.int64)
        t["stuff_masks"] = torch.zeros(0, HP, WP)
    stuff_masks = torch.rand(2, 2, 2, 2, requires_grad=True)
    masks = _criterion().mask_losses(
        {"masks": torch.zeros(2, 0, 2, 2), "aux_masks": []}, torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 0, 3), torch.zeros(2, 0, 4),
        {"masks": stuff_masks, "aux_masks": []}, [torch.zeros(2, 2, requires_grad=True)], targets,
    )
    assert masks["loss_mask_stuff"].item() == 0 and masks["loss_mask_stuff"].requires_grad
    # all 4 presence logits are negatives: 4 · (1-α)·0.5^2·log 2, / n_st = 1, × 4.0 × r_st = 0.5
    expected = 4 * 0.75 * 0.25 * math.log(2) * 4.0 * 0.5
    assert masks["loss_cls_stuff_d0"].item() == pytest.approx(expected, rel=1e-5)
    # no stuff decoder at all (dataset without stuff classes)
    masks = _criterion().mask_losses(
        {"masks": torch.zeros(2, 0, 2, 2), "aux_masks": []}, torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 0, 3), torch.zeros(2, 0, 4), None, [], targets,
    )
    assert set(masks) == {"loss_mask_things"}


def test_bad_targets_raise():
    logits, boxes, targets, _ = _location_case()
    targets[1]["labels"] = torch.tensor([2])
    with pytest.raises(ValueError, match=r"target 'labels' holds class 2, outside \[0, 2\)"):
        _criterion().location_losses(logits, boxes, targets)
    case = list(_mask_case())
    case[6][0]["stuff_labels"] = torch.tensor([1, 1])
    case[6][0]["stuff_masks"] = torch.stack([_bottom(), _bottom()])
    with pytest.raises(ValueError, match="appears more than once"):
        _criterion().mask_losses(*case)
    case[6][0]["stuff_masks"] = _bottom()[None]
    with pytest.raises(ValueError, match="1 stuff_masks for 2 stuff_labels"):
        _criterion().mask_losses(*case)
    case = list(_mask_case())
    case[6][0]["stuff_labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match="'stuff_labels' holds class 5"):
        _criterion().mask_losses(*case)
    case = list(_mask_case())
    with pytest.raises(ValueError, match="thing masks must be"):
        _criterion().mask_losses(case[0], torch.zeros(2, 3, dtype=torch.bool), *case[2:])


def test_from_config():
    from detectron2.config import get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    crit = PanopticSegFormerCriterion(cfg)
    assert crit.mask_matcher.cost_class == 4.0 and crit.mask_matcher.cost_dice == 2.0
    assert crit.matcher.cost_class == 2.0 and crit.matcher.cost_dice == 0.0
    assert (crit.class_weight, crit.bbox_weight, crit.giou_weight, crit.mask_weight,
            crit.stuff_class_weight) == (2.0, 5.0, 2.0, 2.0, 4.0)


def test_padded_size_not_a_multiple_of_8_stays_aligned():
    # a 12 x 12 padded batch has a 2 x 2 stride-8 grid covering 16 x 16 pixels; the GT covers
    # exactly the first stride-8 cell, i.e. 2 x 2 stride-4 pixels (resizing 12 -> 4 directly
    # would give 3 x 3)
    gt = torch.zeros(1, 12, 12)
    gt[0, :8, :8] = 1.0
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.33, 0.33, 0.66, 0.66]]), "masks": gt}]
    masks = torch.ones(1, 1, 2, 2)
    losses = _criterion().mask_losses(
        {"masks": masks, "aux_masks": []}, torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1, 1),
        torch.tensor([[[0.33, 0.33, 0.66, 0.66]]]), None, [], targets,
    )
    # no stuff keys (dataset without stuff) -> r_th = 1; constant 1 over 16 px against 4 GT px
    assert losses["loss_mask_things"].item() == pytest.approx(2.0 * (1 - 8 / (16 + 4 + 2 * EPS)), rel=1e-6)


def test_dice_on_a_padded_batch_equals_the_unpadded_image():
    """With valid_sizes, the x2 upsampling clamps at the image border as the (unpadded) official
    code does, and the padded area stays out of the Dice sums."""
    torch.manual_seed(0)
    h8, w8, pad = 3, 5, 2  # valid stride-8 grid and extra padded cells
    gt = (torch.rand(1, 8 * h8, 8 * w8) > 0.5).float()
    box = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    masks = torch.rand(1, 1, h8, w8) + 0.2
    crit = _criterion()

    def loss(mask_map, gt_map, **kw):
        targets = [{"labels": torch.tensor([0]), "boxes": box, "masks": gt_map}]
        out = crit.mask_losses({"masks": mask_map, "aux_masks": []}, torch.zeros(1, 1, dtype=torch.bool),
                               torch.zeros(1, 1, 1), box[None], None, [], targets, **kw)
        return out["loss_mask_things"]

    unpadded = loss(masks, gt)
    padded_masks = F.pad(masks, (0, pad, 0, pad))  # the mask decoder zeroes padded positions
    padded_gt = F.pad(gt, (0, 8 * pad, 0, 8 * pad))
    valid = torch.tensor([[h8, w8]])
    torch.testing.assert_close(loss(padded_masks, padded_gt, valid_sizes=valid), unpadded)
    assert not torch.allclose(loss(padded_masks, padded_gt), unpadded)  # the border effect it removes
