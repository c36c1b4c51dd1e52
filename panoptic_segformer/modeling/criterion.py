"""Losses of Panoptic SegFormer (SPEC §5), split in the two steps the model runs them in.

1. :meth:`PanopticSegFormerCriterion.location_losses`: Hungarian matching and focal + L1 + GIoU
   on every location-decoder layer. The last layer's matching selects the thing queries that go
   into the thing mask decoder.
2. :meth:`PanopticSegFormerCriterion.mask_losses`: second matching among the selected queries
   (with a Dice cost), Dice losses of every thing and stuff mask-decoder block and tail at
   stride 4, and the focal presence loss of the stuff queries (fixed assignment: stuff query k
   is stuff class k).

Every returned loss is already multiplied by its weight and by the things/stuff balance ratio
r_th = n_th / (n_th + n_st) or r_st = n_st / (n_th + n_st) (SPEC §5.5), so the total loss is the
plain sum of the values. n_th and n_st are the numbers of thing and stuff GT segments in the
batch, averaged over processes and clamped to at least 1.

Deliberate deviations from the official code (SPEC, last section): the stuff presence loss is
computed even when the batch has no thing query (d); the query filter is the plain one-to-one
Hungarian it effectively is, and more GTs than queries is a clear error (e). GT masks, padded to
the batch, are zero-padded to the footprint of the stride-8 prediction grid before resizing, so
targets and predictions stay aligned when the padded size is not a multiple of 8.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy
from .matcher import HungarianMatcher, resize_mask_targets
from .padding import edge_replicate_index

__all__ = ["PanopticSegFormerCriterion", "dice_loss"]

Indices = List[Tuple[Tensor, Tensor]]


def dice_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-mask V-Net Dice loss, no sigmoid (the masks are ReLU outputs).

    Args:
        pred: (M, H, W) predicted masks; target: (M, H, W) soft targets.
    Returns:
        (M,): 1 - 2 sum(p g) / ((sum(p^2) + eps) + (sum(g^2) + eps)).
    """
    p = pred.flatten(1)
    g = target.flatten(1)
    numerator = 2 * (p * g).sum(-1)
    denominator = ((p * p).sum(-1) + eps) + ((g * g).sum(-1) + eps)
    return 1 - numerator / denominator


def _zero_loss(pred: Tensor) -> Tensor:
    """A 0 that depends on the predictions, so that every parameter stays in the graph (DDP)."""
    return pred.sum() * 0.0


class PanopticSegFormerCriterion(nn.Module):
    """Matching and losses of Panoptic SegFormer; see the module docstring for the two steps.

    Targets, one dict per image:
        "labels": (G,) int64 thing class in [0, K_th); "boxes": (G, 4) cxcywh normalised by the
        valid image size; "masks": (G, Hp, Wp) float {0, 1} padded to the batch's padded size;
        "stuff_labels": (G_st,) int64 stuff class in [0, K_st), each class at most once;
        "stuff_masks": (G_st, Hp, Wp) float. The two stuff keys are absent for a dataset
        without stuff classes (then r_th = 1).
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        mask_matcher: HungarianMatcher,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 2.0,
        stuff_class_weight: float = 4.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            matcher: location matching (SPEC §5.1); mask_matcher: mask matching (SPEC §5.3).
            class_weight, bbox_weight, giou_weight: location-decoder focal / L1 / GIoU weights.
            mask_weight: weight of every Dice term, things and stuff.
            stuff_class_weight: weight of the stuff presence focal loss (4.0 in the official code).
        """
        super().__init__()
        self.matcher = matcher
        self.mask_matcher = mask_matcher
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.mask_weight = mask_weight
        self.stuff_class_weight = stuff_class_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        alpha, gamma = m.FOCAL_ALPHA, m.FOCAL_GAMMA
        return {
            "matcher": HungarianMatcher(
                cost_class=m.MATCHER.COST_CLASS,
                cost_bbox=m.MATCHER.COST_BBOX,
                cost_giou=m.MATCHER.COST_GIOU,
                focal_alpha=alpha,
                focal_gamma=gamma,
            ),
            "mask_matcher": HungarianMatcher(
                cost_class=m.MASK_MATCHER.COST_CLASS,
                cost_bbox=m.MASK_MATCHER.COST_BBOX,
                cost_giou=m.MASK_MATCHER.COST_GIOU,
                cost_dice=m.MASK_MATCHER.COST_DICE,
                focal_alpha=alpha,
                focal_gamma=gamma,
            ),
            "class_weight": m.CLASS_WEIGHT,
            "bbox_weight": m.BBOX_WEIGHT,
            "giou_weight": m.GIOU_WEIGHT,
            "mask_weight": m.MASK_WEIGHT,
            "stuff_class_weight": m.STUFF_CLASS_WEIGHT,
            "focal_alpha": alpha,
            "focal_gamma": gamma,
        }

    # ------------------------------------------------------------------ normalisation
    @staticmethod
    def num_targets(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> Tuple[float, float]:
        """(n_th, n_st): GT thing and stuff counts, averaged over processes, clamped to >= 1."""
        counts = torch.tensor(
            [
                sum(t["labels"].shape[0] for t in targets),
                sum(t["stuff_labels"].shape[0] for t in targets if "stuff_labels" in t),
            ],
            dtype=torch.float,
            device=device,
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            dist.all_reduce(counts)
            counts = counts / world_size
        n_th, n_st = counts.clamp(min=1).tolist()
        return n_th, n_st

    @classmethod
    def balance_ratios(cls, targets: Sequence[Dict[str, Tensor]], device: torch.device):
        """(n_th, n_st, r_th, r_st) of SPEC §5.5; (n_th, 1, 1, 0) when no target has stuff keys
        (a dataset without stuff classes), so thing losses keep their full weight."""
        n_th, n_st = cls.num_targets(targets, device)
        if not any("stuff_labels" in t for t in targets):
            return n_th, n_st, 1.0, 0.0
        return n_th, n_st, n_th / (n_th + n_st), n_st / (n_th + n_st)

    # ------------------------------------------------------------------ step 1
    def location_losses(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: Sequence[Dict[str, Tensor]]
    ) -> Tuple[Dict[str, Tensor], Indices]:
        """Focal + L1 + GIoU on every location-decoder layer (SPEC §5.1-§5.2).

        Args:
            pred_logits: (Ld, B, Q, K_th) raw class logits of the Ld decoder layers.
            pred_boxes: (Ld, B, Q, 4) sigmoid cxcywh normalised by each valid image size.
            targets: B dicts, see the class docstring.
        Returns:
            losses: "loss_cls_d{l}", "loss_bbox_d{l}", "loss_giou_d{l}" for l in [0, Ld),
                already weighted and multiplied by r_th.
            indices: the last layer's matching, B pairs (pred_idx, gt_idx) of CPU int64 tensors,
                pred_idx ascending: the thing queries to run the thing mask decoder on.
        """
        if pred_logits.ndim != 4 or pred_boxes.ndim != 4 or pred_boxes.shape[-1] != 4:
            raise ValueError(
                "pred_logits must be (Ld, B, Q, K) and pred_boxes (Ld, B, Q, 4), got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}"
            )
        if pred_logits.shape[:3] != pred_boxes.shape[:3]:
            raise ValueError(
                f"pred_logits {tuple(pred_logits.shape)} and pred_boxes {tuple(pred_boxes.shape)} "
                "disagree on (Ld, B, Q)"
            )
        self._check_labels(targets, "labels", pred_logits.shape[-1])
        n_th, _, r_th, _ = self.balance_ratios(targets, pred_logits.device)
        losses = {}
        indices = []
        for layer, (logits, boxes) in enumerate(zip(pred_logits, pred_boxes)):
            indices = self.matcher(logits, boxes, targets)
            cls_loss, l1_loss, giou_loss = self._location_layer_losses(
                logits, boxes, targets, indices, n_th
            )
            losses[f"loss_cls_d{layer}"] = cls_loss * (self.class_weight * r_th)
            losses[f"loss_bbox_d{layer}"] = l1_loss * (self.bbox_weight * r_th)
            losses[f"loss_giou_d{layer}"] = giou_loss * (self.giou_weight * r_th)
        return losses, indices

    def _location_layer_losses(
        self, logits: Tensor, boxes: Tensor, targets, indices: Indices, n_th: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Unweighted focal (sum / n_th), L1 (sum / n_th) and GIoU (sum of 1-GIoU / n_th)."""
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        batch_idx, query_idx = batch_idx.to(device), query_idx.to(device)
        tgt_labels = torch.cat([t["labels"][tgt.to(device)] for t, (_, tgt) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][tgt.to(device)] for t, (_, tgt) in zip(targets, indices)])

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, tgt_labels] = 1.0
        cls_loss = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        ) / n_th

        src_boxes = boxes[batch_idx, query_idx]
        tgt_boxes = tgt_boxes.to(src_boxes.dtype)
        l1_loss = (src_boxes - tgt_boxes).abs().sum() / n_th
        if src_boxes.shape[0] == 0:
            giou_loss = _zero_loss(src_boxes)
        else:
            giou_loss = generalized_box_iou_loss(
                box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes), reduction="sum"
            ) / n_th
        return cls_loss, l1_loss, giou_loss

    # ------------------------------------------------------------------ step 2
    def mask_losses(
        self,
        thing_out: Dict[str, object],
        thing_query_mask: Tensor,
        selected_logits: Tensor,
        selected_boxes: Tensor,
        stuff_out: Optional[Dict[str, object]],
        stuff_logits: Sequence[Tensor],
        targets: Sequence[Dict[str, Tensor]],
        valid_sizes: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Dice losses of both mask decoders and the stuff presence loss (SPEC §5.3-§5.4).

        Args:
            thing_out: the thing MaskDecoder's output on the selected queries: "masks"
                (B, N, h, w) tail masks at stride 8 of the padded batch, "aux_masks" list of
                (B, N, h, w) block masks.
            thing_query_mask: (B, N) bool, True = padded slot (image with fewer selected queries).
            selected_logits: (B, N, K_th) last-layer class logits of the selected queries.
            selected_boxes: (B, N, 4) their last-layer boxes.
            stuff_out: the stuff MaskDecoder's output, "masks" (B, K_st, h, w) and "aux_masks";
                None when the dataset has no stuff classes.
            stuff_logits: one (B, K_st) presence logit tensor per stuff block.
            targets: B dicts, see the class docstring.
            valid_sizes: (B, 2) int64 valid (h, w) of each image on the stride-8 grid, or None
                (unpadded). The official code never pads, so its x2 upsampling clamps at the
                image border: with it, masks are edge-replicated inside the valid area before
                upsampling and the padded stride-4 area is left out of the Dice sums.
        Returns:
            "loss_mask_things", "loss_mask_things_d{j}" (one per thing block), and, with stuff,
            "loss_mask_stuff", "loss_mask_stuff_d{j}", "loss_cls_stuff_d{j}" (one per stuff
            block); weighted and multiplied by r_th / r_st.
        """
        thing_masks: Tensor = thing_out["masks"]
        bs, num_slots = thing_query_mask.shape
        if thing_masks.ndim != 4 or thing_masks.shape[:2] != (bs, num_slots):
            raise ValueError(
                f"thing masks must be ({bs}, {num_slots}, h, w) like thing_query_mask, "
                f"got {tuple(thing_masks.shape)}"
            )
        grid = tuple(thing_masks.shape[-2:])
        n_th, n_st, r_th, r_st = self.balance_ratios(targets, thing_masks.device)
        losses = {}

        # things: second matching among the selected queries, then Dice on every block
        indices = self.mask_matcher(
            selected_logits, selected_boxes, targets, masks=thing_masks,
            query_padding_mask=thing_query_mask,
        )
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        slot_idx = torch.cat([src for src, _ in indices])
        batch_idx, slot_idx = batch_idx.to(thing_masks.device), slot_idx.to(thing_masks.device)
        gt_masks = torch.cat([  # (M, 2h, 2w), resized before gathering: cheaper than full size
            resize_mask_targets(t["masks"], grid, upsample=2)[tgt.to(t["masks"].device)]
            for t, (_, tgt) in zip(targets, indices)
        ]).to(thing_masks.device)
        weight = self.mask_weight * r_th
        valid = None if valid_sizes is None else valid_sizes.to(thing_masks.device)[batch_idx]
        losses["loss_mask_things"] = self._dice(thing_masks, batch_idx, slot_idx, gt_masks, n_th, valid) * weight
        for j, aux in enumerate(thing_out["aux_masks"]):
            losses[f"loss_mask_things_d{j}"] = self._dice(aux, batch_idx, slot_idx, gt_masks, n_th, valid) * weight

        if stuff_out is None:
            return losses
        # stuff: fixed assignment, query k <-> stuff class k
        stuff_masks: Tensor = stuff_out["masks"]
        num_stuff = stuff_masks.shape[1]
        if stuff_masks.shape[0] != bs or tuple(stuff_masks.shape[-2:]) != grid:
            raise ValueError(
                f"stuff masks must be ({bs}, K_st, {grid[0]}, {grid[1]}), got {tuple(stuff_masks.shape)}"
            )
        self._check_labels(targets, "stuff_labels", num_stuff)
        for b, t in enumerate(targets):
            if "stuff_labels" in t and t["stuff_masks"].shape[0] != t["stuff_labels"].shape[0]:
                raise ValueError(f"target {b}: {t['stuff_masks'].shape[0]} stuff_masks for "
                                 f"{t['stuff_labels'].shape[0]} stuff_labels")
        empty_labels = torch.zeros(0, dtype=torch.int64, device=stuff_masks.device)
        class_idx = [t.get("stuff_labels", empty_labels).to(stuff_masks.device) for t in targets]
        batch_idx = torch.cat([torch.full_like(c, b) for b, c in enumerate(class_idx)])
        class_idx = torch.cat(class_idx)
        present = torch.zeros((bs, num_stuff), device=stuff_masks.device)
        present.index_put_((batch_idx, class_idx), torch.ones_like(class_idx, dtype=present.dtype),
                           accumulate=True)
        if present.numel() and present.max().item() > 1:
            raise ValueError("a stuff class appears more than once in an image's stuff_labels; "
                             "merge same-class stuff segments into one target")
        gt_stuff = [resize_mask_targets(t["stuff_masks"], grid, upsample=2).to(stuff_masks.device)
                    for t in targets if "stuff_labels" in t]
        gt_stuff = torch.cat(gt_stuff) if gt_stuff else stuff_masks.new_zeros((0, 2 * grid[0], 2 * grid[1]))
        weight = self.mask_weight * r_st
        valid = None if valid_sizes is None else valid_sizes.to(stuff_masks.device)[batch_idx]
        losses["loss_mask_stuff"] = self._dice(stuff_masks, batch_idx, class_idx, gt_stuff, n_st, valid) * weight
        for j, aux in enumerate(stuff_out["aux_masks"]):
            losses[f"loss_mask_stuff_d{j}"] = self._dice(aux, batch_idx, class_idx, gt_stuff, n_st, valid) * weight
        for j, logits in enumerate(stuff_logits):
            if logits.shape != (bs, num_stuff):
                raise ValueError(f"stuff_logits[{j}] must be ({bs}, {num_stuff}), got {tuple(logits.shape)}")
            focal = sigmoid_focal_loss(
                logits, present.to(logits.dtype), alpha=self.focal_alpha, gamma=self.focal_gamma,
                reduction="sum",
            )
            losses[f"loss_cls_stuff_d{j}"] = focal / n_st * (self.stuff_class_weight * r_st)
        return losses

    @staticmethod
    def _dice(masks: Tensor, batch_idx: Tensor, slot_idx: Tensor, gt: Tensor, norm: float,
              valid: Optional[Tensor] = None) -> Tensor:
        """Sum of the Dice losses of the matched (stride-8) masks, upsampled x2, / norm.

        valid: (M, 2) valid stride-8 (h, w) of each matched mask's image, or None.
        """
        pred = masks[batch_idx, slot_idx]
        if pred.shape[0] == 0:
            return _zero_loss(masks)
        if valid is None:
            pred = F.interpolate(pred[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
            return dice_loss(pred, gt).sum() / norm
        num, h, w = pred.shape
        pred = pred.flatten(1).gather(1, edge_replicate_index(valid, h, w)).view(num, h, w)
        pred = F.interpolate(pred[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
        inside_rows = torch.arange(2 * h, device=pred.device)[None] < 2 * valid[:, :1]  # (M, 2h)
        inside_cols = torch.arange(2 * w, device=pred.device)[None] < 2 * valid[:, 1:]  # (M, 2w)
        inside = (inside_rows[:, :, None] & inside_cols[:, None, :]).to(pred.dtype)
        return dice_loss(pred * inside, gt * inside).sum() / norm

    @staticmethod
    def _check_labels(targets, key: str, num_classes: int):
        labels = [t[key] for t in targets if key in t]
        if not labels:
            return
        labels = torch.cat([lab.reshape(-1) for lab in labels])
        if labels.numel() == 0:
            return
        if labels.dtype != torch.int64:
            raise ValueError(f"target '{key}' must be int64, got {labels.dtype}")
        lo, hi = labels.aminmax()
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"target '{key}' holds class {lo if lo < 0 else hi}, outside [0, {num_classes})"
            )
