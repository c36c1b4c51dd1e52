"""Hungarian matching between thing queries and ground-truth things (SPEC §5.1-§5.3).

The same class serves both matchings of the model:

* the location matching (focal 2.0 + L1 5.0 + GIoU 2.0), run on every location-decoder layer;
* the mask matching among the queries selected by the first one (focal 4.0 + L1 5.0 + GIoU 2.0 +
  Dice 2.0), whose Dice cost compares the stride-8 thing masks with the GT masks resized to them.

Costs are built on the predictions' device, moved to the CPU once per image and solved with
``scipy.optimize.linear_sum_assignment``. The returned indices live on the CPU.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_cost", "dice_cost", "resize_mask_targets"]

MASK_STRIDE = 8  # the mask decoders predict at stride 8 of the padded batch


def focal_cost(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """Focal classification cost of mmdet's ``FocalLossCost`` (unweighted).

    Args:
        logits: (Q, K) raw class logits.
        labels: (G,) int64 class indices in [0, K).
    Returns:
        (Q, G): pos - neg evaluated at each GT's class, with p = sigmoid(logits) and
        pos = -alpha (1-p)^gamma log(p + eps), neg = -(1-alpha) p^gamma log(1-p + eps).
    """
    prob = logits.sigmoid()
    neg = -(1 - prob + eps).log() * (1 - alpha) * prob.pow(gamma)
    pos = -(prob + eps).log() * alpha * (1 - prob).pow(gamma)
    return pos[:, labels] - neg[:, labels]


def dice_cost(pred_masks: Tensor, gt_masks: Tensor, eps: float = 1e-3) -> Tensor:
    """Squared-denominator Dice cost of the official ``DiceCost`` (unweighted, no sigmoid).

    Args:
        pred_masks: (Q, h, w) raw (ReLU) predicted masks.
        gt_masks: (G, h, w) soft GT masks already resized to (h, w).
    Returns:
        (Q, G): 1 - 2 sum(p g) / (sum(p^2) + eps + sum(g^2) + eps).
    """
    p = pred_masks.flatten(1)
    g = gt_masks.flatten(1).to(p.dtype)
    numerator = 2 * p @ g.t()
    denominator = (p * p).sum(-1)[:, None] + (g * g).sum(-1)[None, :] + 2 * eps
    return 1 - numerator / denominator


def resize_mask_targets(
    masks: Tensor, grid_size: Tuple[int, int], upsample: int = 1, stride: int = MASK_STRIDE
) -> Tensor:
    """Resize padded GT masks onto the pixel grid of the stride-8 mask predictions.

    The predictions of a batch padded to (Hp, Wp) have (h, w) = (ceil(Hp/8), ceil(Wp/8)) pixels,
    which cover (8h, 8w) input pixels. The masks are zero-padded to that footprint (a no-op when
    the batch is padded to a multiple of 8) and then resized bilinearly, align_corners=False and
    without re-binarising (SPEC §5.3, soft targets), to (upsample·h, upsample·w).

    Args:
        masks: (G, Hp, Wp) {0, 1} masks, padded to the batch's padded image size.
        grid_size: (h, w) of the stride-8 predictions.
        upsample: 1 for the matching cost (stride 8), 2 for the Dice loss (stride 4).
    Returns:
        (G, upsample·h, upsample·w) float masks.
    """
    if masks.ndim != 3:
        raise ValueError(f"GT masks must have shape (G, Hp, Wp), got {tuple(masks.shape)}")
    h, w = grid_size
    hp, wp = masks.shape[-2:]
    if (hp + stride - 1) // stride != h or (wp + stride - 1) // stride != w:
        raise ValueError(
            f"GT masks of padded size {(hp, wp)} do not match stride-{stride} predictions of size "
            f"{(h, w)}: expected ceil(Hp/{stride}), ceil(Wp/{stride}) = "
            f"{((hp + stride - 1) // stride, (wp + stride - 1) // stride)}"
        )
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, upsample * h, upsample * w))
    if (hp, wp) != (stride * h, stride * w):
        masks = F.pad(masks, (0, stride * w - wp, 0, stride * h - hp))
    return F.interpolate(
        masks[None], size=(upsample * h, upsample * w), mode="bilinear", align_corners=False
    )[0]


class HungarianMatcher:
    """One-to-one assignment of queries to GT things minimising a weighted sum of costs.

    cost = cost_class · focal + cost_bbox · L1(cxcywh) + cost_giou · (-GIoU) + cost_dice · Dice.
    The L1 and GIoU costs compare boxes normalised by the valid image size (GIoU is invariant to
    the per-axis scaling to pixels that the official code applies).
    """

    def __init__(
        self,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        cost_dice: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        if min(cost_class, cost_bbox, cost_giou, cost_dice) < 0:
            raise ValueError("matching cost weights must be non-negative")
        if cost_class == cost_bbox == cost_giou == cost_dice == 0:
            raise ValueError("all matching cost weights are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self):
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, cost_dice={self.cost_dice})"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor,
        target: Dict[str, Tensor],
        masks: Optional[Tensor] = None,
    ) -> Tensor:
        """Weighted cost of one image.

        Args:
            logits: (Q, K) class logits; boxes: (Q, 4) sigmoid cxcywh; masks: (Q, h, w) or None.
            target: {"labels": (G,), "boxes": (G, 4), "masks": (G, Hp, Wp) when cost_dice > 0}.
        Returns:
            (Q, G) cost on the predictions' device.
        """
        labels, tgt_boxes = target["labels"], target["boxes"]
        cost = self.cost_class * focal_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        if self.cost_bbox:
            cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes.to(boxes.dtype), p=1)
        if self.cost_giou:
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
            cost = cost - self.cost_giou * giou
        if self.cost_dice:
            gt_masks = resize_mask_targets(target["masks"], masks.shape[-2:])
            cost = cost + self.cost_dice * dice_cost(masks, gt_masks)
        return cost

    @torch.no_grad()
    def __call__(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Dict[str, Tensor]],
        masks: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match each image's queries to its GT things.

        Args:
            logits: (B, Q, K) raw class logits.
            boxes: (B, Q, 4) sigmoid (cx, cy, w, h), normalised by each valid image size.
            targets: B dicts with "labels" (G,) int64 in [0, K), "boxes" (G, 4) normalised
                cxcywh and, when cost_dice > 0, "masks" (G, Hp, Wp) padded to the batch size.
            masks: (B, Q, h, w) stride-8 predicted masks, required when cost_dice > 0.
            query_padding_mask: (B, Q) bool, True = padded query slot that must stay unmatched.
        Returns:
            B pairs (pred_idx, gt_idx) of CPU int64 tensors of length G, pred_idx ascending.
        """
        self._check_inputs(logits, boxes, targets, masks, query_padding_mask)
        indices = []
        for b, target in enumerate(targets):
            num_gt = target["labels"].shape[0]
            cost = self.cost_matrix(
                logits[b], boxes[b], target, None if masks is None else masks[b]
            ).cpu()
            query_ids = torch.arange(cost.shape[0])
            if query_padding_mask is not None:
                query_ids = query_ids[~query_padding_mask[b].cpu()]
                cost = cost[query_ids]
            if num_gt > cost.shape[0]:
                raise ValueError(
                    f"image {b} has {num_gt} ground-truth things but only {cost.shape[0]} "
                    "queries to match them to; raise MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES"
                )
            if num_gt == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if not torch.isfinite(cost).all():
                raise ValueError(f"matching cost of image {b} has NaN/Inf entries")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((query_ids[torch.as_tensor(rows, dtype=torch.int64)],
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def _check_inputs(self, logits, boxes, targets, masks, query_padding_mask):
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (B, Q, K), got {tuple(logits.shape)}")
        bs, num_queries = logits.shape[:2]
        if boxes.shape != (bs, num_queries, 4):
            raise ValueError(f"boxes must have shape {(bs, num_queries, 4)}, got {tuple(boxes.shape)}")
        if len(targets) != bs:
            raise ValueError(f"got {len(targets)} targets for a batch of {bs} images")
        if query_padding_mask is not None and query_padding_mask.shape != (bs, num_queries):
            raise ValueError(
                f"query_padding_mask must have shape {(bs, num_queries)}, "
                f"got {tuple(query_padding_mask.shape)}"
            )
        if self.cost_dice:
            if masks is None:
                raise ValueError("cost_dice > 0 needs the predicted masks (B, Q, h, w)")
            if masks.ndim != 4 or masks.shape[:2] != (bs, num_queries):
                raise ValueError(
                    f"masks must have shape ({bs}, {num_queries}, h, w), got {tuple(masks.shape)}"
                )
        for b, t in enumerate(targets):
            num_gt = t["labels"].shape[0]
            if t["labels"].ndim != 1 or t["boxes"].shape != (num_gt, 4):
                raise ValueError(
                    f"target {b}: labels must be (G,) and boxes (G, 4), got "
                    f"{tuple(t['labels'].shape)} and {tuple(t['boxes'].shape)}"
                )
            if self.cost_dice and t["masks"].shape[0] != num_gt:
                raise ValueError(
                    f"target {b}: {t['masks'].shape[0]} masks for {num_gt} labels"
                )
