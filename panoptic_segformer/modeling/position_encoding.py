"""Sine positional encoding of a padded feature map (SPEC §1.3)."""

import math

import torch
from torch import nn

from detectron2.config import configurable

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """2-d sine/cosine encoding of the valid (unpadded) area, normalised to its size.

    Row and column coordinates are cumulative counts of valid pixels, shifted by ``offset``
    and normalised to ``[0, scale]`` by the count at the last row/column. Channel ``2i`` of each
    half holds ``sin(coord / temperature^(2i / num_pos_feats))`` and channel ``2i + 1`` the
    cosine at the same frequency; the output is ``[pos_y, pos_x]``.

    Positions inside the valid area do not depend on how much padding surrounds it; values
    at padded positions are unspecified.
    """

    @configurable
    def __init__(
        self,
        num_pos_feats=128,
        temperature=10000,
        normalize=True,
        scale=2 * math.pi,
        offset=-0.5,
        eps=1e-6,
    ):
        """
        Args:
            num_pos_feats: channels per axis (even); the output has ``2 * num_pos_feats``.
            temperature: base of the frequency progression.
            normalize: scale coordinates to ``[0, scale]`` by the valid extent of each row/column.
            scale: upper end of the normalised range.
            offset: added to the 1-based cumulative coordinate before normalising.
            eps: added to the normaliser.
        """
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be a positive even int, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    @classmethod
    def from_config(cls, cfg):
        return {"num_pos_feats": cfg.MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM // 2}

    def forward(self, mask):
        """
        Args:
            mask: (B, H, W) bool, True = padded position.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32.
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.dtype != torch.bool:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (B, H, W) bool tensor (True = padding), got {got}")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        # channels 2i (sin) and 2i + 1 (cos) share the frequency temperature^(-2i / num_pos_feats)
        two_i = torch.arange(0, self.num_pos_feats, 2, dtype=torch.float32, device=mask.device)
        period = self.temperature ** (two_i / self.num_pos_feats)
        arg = torch.stack([y_embed, x_embed], 1)[:, :, None] / period[:, None, None]  # (B, 2, F/2, H, W)
        # (B, 2 [y, x], F/2, 2 [sin, cos], H, W) is already the channel order [pos_y, pos_x], interleaved
        pos = torch.stack([arg.sin(), arg.cos()], 3)
        return pos.flatten(1, 3)

    def extra_repr(self):
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}, "
            f"scale={self.scale:.4f}, offset={self.offset}, eps={self.eps}"
        )
