"""The exportable network: a normalised, padded image batch in, the merging's candidates out."""
from typing import Tuple

import torch
from torch import nn

from ..modeling.meta_arch import PanopticSegFormer

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "ExportableNetwork"]

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("thing_masks", "thing_scores", "thing_labels", "thing_boxes", "stuff_masks", "stuff_scores")


class ExportableNetwork(nn.Module):
    """The network of a :class:`PanopticSegFormer` without its Python pre- and post-processing.

    Inputs:
        images: (B, 3, H, W) float32, ``(pixel - PIXEL_MEAN) / PIXEL_STD`` in the model's input
            format, zero-padded at the bottom / right; H and W multiples of the model's
            ``size_divisibility``.
        image_sizes: (B, 2) int64, the valid (h, w) of every image.

    Outputs, in :data:`OUTPUT_NAMES` order (those of ``PanopticSegFormer._candidates``), with
    H8, W8 = ceil(H / 8), ceil(W / 8) and k = min(TEST.NUM_THING_CANDIDATES, queries x classes):
    thing_masks (B, k, H8, W8) raw, thing_scores (B, k) descending, thing_labels (B, k) int64
    contiguous ids, thing_boxes (B, k, 4) normalised (cx, cy, w, h) of the valid image,
    stuff_masks (B, K_st, H8, W8) raw, stuff_scores (B, K_st) for the classes ``model.stuff_ids``.

    The eager model gives the same candidates for a batch of images of one padded size (it runs
    its backbone on each group of images of the same padded size); the runner
    (:class:`~.runtime.ExportedModel`) batches images the same way.
    """

    def __init__(self, model: PanopticSegFormer):
        super().__init__()
        if not isinstance(model, PanopticSegFormer):
            raise TypeError(f"can only export a PanopticSegFormer, got {type(model).__name__}")
        if model.official_compat:
            raise ValueError(
                "MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT runs every image unpadded on its own; an exported "
                "network takes a padded batch: export with OFFICIAL_COMPAT False"
            )
        if model.precision != "fp32":
            raise ValueError(
                f"exports are float32; the model's precision is {model.precision!r} "
                "(set MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION fp32)"
            )
        self.model = model

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        m = self.model
        feats = m.backbone(images)
        features = [feats[f] for f in m.in_features]
        enc = m._encode(features, image_sizes)
        candidates = m._candidates(m._locate(enc), enc)
        return tuple(candidates[name] for name in OUTPUT_NAMES)
