"""Mask-wise merging of thing and stuff candidates into a panoptic id map (SPEC §6 steps 5-9).

Every candidate i has a raw mask m_i (ReLU output, not a probability), a class probability p_i,
a category and a thing/stuff flag. With b_i = [m_i > t]:

    q_i = sum(m_i · b_i) / (sum(b_i) + 1)        mask quality (note the +1)
    s_i = p_i · q_i^2                             score

Candidates are visited by descending score. A candidate is dropped if its score is below its
kind's score threshold, if its binary mask is empty, or if more than its kind's overlap
threshold of its mask is already painted; otherwise its still-empty pixels are painted.

The statistics of all candidates are gathered without a host sync, streaming over the
candidates (a batched version allocates N×H×W temporaries, which dominates the time on CPU); the
scores are sorted once, and the greedy loop costs one host sync per candidate that passes its
score threshold.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_wise_merging", "merge_candidates", "resize_masks"]

# exact candidate pre-filter slack against float rounding of bilinear resizing (merge_candidates)
_PREFILTER_SLACK = 1e-4


def resize_masks(masks: Tensor, size) -> Tensor:
    """(N, h, w) -> (N, *size), bilinear, align_corners=False; empty N allowed."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    return F.interpolate(masks[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def merge_candidates(
    masks: Tensor,
    labels: Tensor,
    probs: Tensor,
    is_thing: Tensor,
    out_size: Tuple[int, int],
    *,
    mask_threshold: float = 0.5,
    thing_score_thresh: float = 0.25,
    stuff_score_thresh: float = 0.25,
    **overlap_thresholds,
) -> Tuple[Tensor, List[Dict]]:
    """Resize the stride-8 candidates of one image to ``out_size`` and merge them (SPEC §6).

    The eager model and the runner of exported models (:mod:`panoptic_segformer.export`) both
    end with this. Candidates that cannot pass are dropped before resizing, which leaves the
    result unchanged: bilinear resizing is a convex combination, so a resized mask never exceeds
    the max m of its stride-8 map; its quality q is below m, so its score p * q**2 is below
    p * m**2 and its area is empty when m <= mask_threshold.

    Args:
        masks: (N, h8, w8) raw masks of the valid stride-8 area of the image.
        labels: (N,) contiguous ids; probs: (N,) class probabilities; is_thing: (N,) bool.
        out_size: (height, width) of the id map.
        the thresholds: as :func:`mask_wise_merging` (``thing_overlap_thresh``,
            ``stuff_overlap_thresh`` passed on).

    Returns:
        (int32 (height, width) id map, segments_info), as :func:`mask_wise_merging`.
    """
    peak = masks.flatten(1).amax(1) if masks.numel() else masks.new_zeros(len(masks))
    thresh = torch.where(is_thing, thing_score_thresh, stuff_score_thresh)
    keep = (peak > mask_threshold) & (probs * peak.square() * (1 + _PREFILTER_SLACK) >= thresh)
    keep = keep.nonzero().squeeze(1)
    return mask_wise_merging(
        resize_masks(masks[keep], out_size), labels[keep], probs[keep], is_thing[keep],
        mask_threshold=mask_threshold, thing_score_thresh=thing_score_thresh,
        stuff_score_thresh=stuff_score_thresh, **overlap_thresholds,
    )


def mask_wise_merging(
    masks: Tensor,
    labels: Tensor,
    probs: Tensor,
    is_thing: Tensor,
    *,
    mask_threshold: float = 0.5,
    thing_score_thresh: float = 0.25,
    stuff_score_thresh: float = 0.25,
    thing_overlap_thresh: float = 0.4,
    stuff_overlap_thresh: float = 0.2,
) -> Tuple[Tensor, List[Dict]]:
    """Merge candidate masks into a panoptic segmentation.

    Args:
        masks: (N, H, W) float raw masks at the output resolution.
        labels: (N,) int64 contiguous category ids (thing ids for things, stuff ids for stuff).
        probs: (N,) float class probabilities.
        is_thing: (N,) bool.
        mask_threshold: binarisation threshold on the raw mask values.
        thing_score_thresh, stuff_score_thresh: minimum score p·q² (a score equal to the
            threshold is kept).
        thing_overlap_thresh, stuff_overlap_thresh: a candidate is dropped when
            |mask ∩ painted| / |mask| is strictly greater than this.
    Returns:
        id_map: (H, W) int32 on the masks' device, 0 = void, segment ids 1, 2, ... in painting
            order.
        segments_info: one dict per segment, in id order: {"id", "category_id", "isthing",
            "score"}. Each accepted thing is a new segment; all accepted candidates of one stuff
            category share one segment (its score is the first one's).
    Ties in score keep the input order.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    num = masks.shape[0]
    for name, t in (("labels", labels), ("probs", probs), ("is_thing", is_thing)):
        if t.shape != (num,):
            raise ValueError(f"{name} must have shape ({num},) like masks, got {tuple(t.shape)}")
    if is_thing.dtype != torch.bool:
        raise ValueError(f"is_thing must be bool, got {is_thing.dtype}")
    height, width = masks.shape[-2:]
    id_map = torch.zeros((height, width), dtype=torch.int32, device=masks.device)
    if num == 0:
        return id_map, []

    areas, mass = [], []
    binary = torch.empty((height, width), dtype=torch.bool, device=masks.device)
    inside = torch.empty_like(masks[0])  # m · [m > t]
    for mask in masks:
        torch.gt(mask, mask_threshold, out=binary)
        areas.append(binary.sum(dtype=torch.int32))
        mass.append(torch.mul(mask, binary, out=inside).sum(dtype=torch.float32))
    area, mass = torch.stack(areas), torch.stack(mass)
    quality = mass / (area + 1)
    scores = probs.to(quality) * quality.square()
    is_thing = is_thing.to(masks.device)
    score_thresh = torch.where(is_thing, thing_score_thresh, stuff_score_thresh)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[((scores >= score_thresh) & (area > 0))[order]]
    table = torch.stack(
        [order, area[order].long(), labels[order].to(order.device), is_thing[order].long()], 1
    ).tolist()
    kept_scores = scores[order].tolist()

    empty = torch.ones((height, width), dtype=torch.bool, device=masks.device)
    segments_info: List[Dict] = []
    stuff_segment: Dict[int, int] = {}
    for (i, mask_area, label, thing), score in zip(table, kept_scores):
        free = torch.gt(masks[i], mask_threshold, out=binary).logical_and_(empty)
        num_free = int(free.sum(dtype=torch.int32))
        overlap_thresh = thing_overlap_thresh if thing else stuff_overlap_thresh
        if (mask_area - num_free) / mask_area > overlap_thresh or num_free == 0:
            continue
        if thing or label not in stuff_segment:
            segment_id = len(segments_info) + 1
            segments_info.append(
                {"id": segment_id, "category_id": label, "isthing": bool(thing), "score": score}
            )
            if not thing:
                stuff_segment[label] = segment_id
        else:
            segment_id = stuff_segment[label]
        id_map.masked_fill_(free, segment_id)
        empty.masked_fill_(free, False)
    return id_map, segments_info
