"""Deformable transformer encoder over the multi-scale feature sequence (SPEC §1.4)."""

import torch
from torch import nn

from detectron2.config import configurable

from ..layers import MSDeformAttn
from .feed_forward import PostNormFeedForward

__all__ = ["DeformableEncoder", "DeformableEncoderLayer", "encoder_reference_points"]


def encoder_reference_points(spatial_shapes, valid_ratios, num_tokens=None):
    """Pixel centres of every token, normalised to the valid area of its own level, then
    scaled by the valid ratios of every level (so they are fractions of each padded map).

    Args:
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each padded level.
        valid_ratios: (B, L, 2), (valid_w / W_l, valid_h / H_l).
        num_tokens: S = sum_l H_l * W_l if known (avoids a device-to-host sync).

    Returns:
        (B, S, L, 2) reference points (x, y).
    """
    device, dtype = valid_ratios.device, valid_ratios.dtype
    spatial_shapes = spatial_shapes.to(device)
    sizes = spatial_shapes.prod(1)
    if num_tokens is None:
        num_tokens = int(sizes.sum())
    token = torch.arange(num_tokens, device=device)
    starts = sizes.cumsum(0) - sizes
    level = (token[:, None] >= starts[None, :]).sum(1) - 1  # (S,); no searchsorted: ONNX has none
    local = token - starts[level]
    width = spatial_shapes[level, 1]
    hw = spatial_shapes[level].to(dtype)  # (S, 2) as (H, W)
    centre_x = (local % width).to(dtype) + 0.5
    centre_y = torch.div(local, width, rounding_mode="floor").to(dtype) + 0.5
    # normalise by the valid size of the token's own level: (B, S)
    ref_x = centre_x / (valid_ratios[:, level, 0] * hw[:, 1])
    ref_y = centre_y / (valid_ratios[:, level, 1] * hw[:, 0])
    ref = torch.stack([ref_x, ref_y], -1)  # (B, S, 2)
    return ref[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: MSDA self-attention -> dropout -> add -> LN; FFN (ReLU) -> add -> LN."""

    def __init__(self, d_model=256, n_heads=8, n_levels=4, n_points=4, dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = PostNormFeedForward(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2). Returns (B, S, C)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.ffn(self.norm1(src + self.dropout1(attn)))


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers, no final norm.

    Attention keys at padded positions are zeroed inside MSDA, and reference points cover the
    valid area only, so the output at valid tokens does not depend on padding.
    """

    @configurable
    def __init__(self, num_layers=6, d_model=256, n_heads=8, n_levels=4, n_points=4, dim_feedforward=1024, dropout=0.1):
        """
        Args:
            num_layers: number of encoder layers.
            d_model: channels C.
            n_heads, n_levels, n_points: MSDA heads, feature levels L and points per level.
            dim_feedforward: FFN hidden size.
            dropout: after the attention, inside and after the FFN.
        """
        super().__init__()
        self.n_levels = n_levels
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, n_heads, n_levels, n_points, dim_feedforward, dropout)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "num_layers": m.ENC_LAYERS,
            "d_model": m.HIDDEN_DIM,
            "n_heads": m.NHEADS,
            "n_levels": m.NUM_FEATURE_LEVELS,
            "n_points": m.ENC_N_POINTS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dropout": m.DROPOUT,
        }

    def reset_parameters(self):
        """Xavier-uniform on every matrix, then the MSDA-specific init (SPEC §1.4, §9.3)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask=None):
        """
        Args:
            src: (B, S, C) flattened features of all levels, finest first.
            pos: (B, S, C) sine encoding + level embedding.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64.
            valid_ratios: (B, L, 2) (valid_w / W_l, valid_h / H_l).
            padding_mask: (B, S) bool, True = padded token, or None.

        Returns:
            memory: (B, S, C).
        """
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(f"src must be (B, S, {self.d_model}), got {tuple(src.shape)}")
        if pos.shape != src.shape:
            raise ValueError(f"pos must have the shape of src {tuple(src.shape)}, got {tuple(pos.shape)}")
        b, s, _ = src.shape
        if tuple(valid_ratios.shape) != (b, self.n_levels, 2):
            raise ValueError(f"valid_ratios must be (B={b}, L={self.n_levels}, 2), got {tuple(valid_ratios.shape)}")
        # float32 at least: in bfloat16 the points of a 168-wide level would be off by up to 0.6 px
        coord_dtype = torch.promote_types(src.dtype, torch.float32)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios.to(coord_dtype), num_tokens=s)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src
