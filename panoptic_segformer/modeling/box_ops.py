"""Box conversions and pairwise GIoU used by matching, losses and inference.

Boxes predicted by the location decoder are (cx, cy, w, h) normalised by the *valid* (unpadded)
image size, SPEC §3. The pairwise GIoU and the format conversions are torchvision's.
"""
from typing import Tuple

from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "normalize_xyxy_boxes",
    "denormalize_cxcywh_boxes",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x1, y1, x2, y2)."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x1, y1, x2, y2) -> (..., 4) (cx, cy, w, h)."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def normalize_xyxy_boxes(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Absolute (G, 4) xyxy boxes of an image of valid size (h, w) -> (G, 4) cxcywh in [0, 1].

    This is the box target format of the criterion (SPEC §5.1: normalised by ``img_shape``).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (G, 4), got {tuple(boxes.shape)}")
    h, w = image_size
    scale = boxes.new_tensor([w, h, w, h])
    return box_xyxy_to_cxcywh(boxes / scale)


def denormalize_cxcywh_boxes(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """(N, 4) cxcywh normalised by a valid size (h, w) -> (N, 4) absolute xyxy clipped to it."""
    h, w = image_size
    xyxy = box_cxcywh_to_xyxy(boxes) * boxes.new_tensor([w, h, w, h])
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(min=0, max=w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(min=0, max=h)
    return xyxy
