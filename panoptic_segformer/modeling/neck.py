"""Projection of the backbone maps to the transformer width (mmdet's ``ChannelMapper``, SPEC §1.2).

Padding-aware: GroupNorm statistics are taken over the valid (unpadded) pixels of each image only,
and the extra stride-2 level reads zeros outside the valid area, so an image gives the same
output whether it is alone or inside a padded batch (SPEC deviation (g)).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelMapper", "MaskedGroupNorm", "masked_group_norm"]


def masked_group_norm(
    x: Tensor,
    mask: Optional[Tensor],
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm whose per-(image, group) mean and variance use the valid pixels only.

    Args:
        x: (B, C, H, W) features.
        mask: (B, H, W) bool, True = padded pixel; None means no padding (plain GroupNorm).
        num_groups: number of channel groups; must divide C.
        weight, bias: (C,) affine parameters or None.
        eps: added to the (biased) variance, as in ``nn.GroupNorm``.

    Returns:
        (B, C, H, W) normalised features. Values at padded pixels are normalised with the
        statistics of the valid ones and carry no meaning.
    """
    if x.dim() != 4:
        raise ValueError(f"masked_group_norm expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C % num_groups != 0:
        raise ValueError(f"masked_group_norm: num_groups={num_groups} does not divide C={C}")
    if mask is None:
        return F.group_norm(x, num_groups, weight, bias, eps)
    if mask.shape != (B, H, W) or mask.dtype != torch.bool:
        raise ValueError(
            f"masked_group_norm: mask must be bool of shape {(B, H, W)} matching x, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    # statistics in float32 at least, so half-precision inputs do not lose the variance
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.reshape(B, C, H * W).to(stat_dtype)
    valid = (~mask).reshape(B, H * W, 1).to(stat_dtype)
    per_group = C // num_groups
    count = (valid.sum(dim=1) * per_group).clamp_min(1.0)  # (B, 1)
    # two passes (mean, then centred squares), each a batched matrix-vector product with the valid mask
    mean = torch.bmm(xf, valid).view(B, num_groups, per_group).sum(-1) / count  # (B, G)
    mean_c = mean.repeat_interleave(per_group, dim=1).unsqueeze(-1)  # (B, C, 1)
    var = torch.bmm((xf - mean_c).square_(), valid).view(B, num_groups, per_group).sum(-1) / count
    scale = torch.rsqrt(var + eps).repeat_interleave(per_group, dim=1)  # (B, C)
    if weight is not None:
        scale = scale * weight.to(stat_dtype)
    shift = -mean_c.squeeze(-1) * scale
    if bias is not None:
        shift = shift + bias.to(stat_dtype)
    out = torch.addcmul(shift.unsqueeze(-1), xf, scale.unsqueeze(-1))  # x * scale + shift, per channel
    return out.view(B, C, H, W).to(x.dtype)


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and init) whose statistics skip padded pixels."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, C, H, W); mask: (B, H, W) bool, True = padded, or None."""
        return masked_group_norm(x, mask, self.num_groups, self.weight, self.bias, self.eps)


class _ConvNorm(nn.Module):
    """Conv2d without bias followed by a padding-aware GroupNorm, no activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = MaskedGroupNorm(num_groups, out_channels)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, x: Tensor, out_mask: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W'); out_mask: (B, H', W') of the output."""
        return self.norm(self.conv(x), out_mask)


class ChannelMapper(nn.Module):
    """Maps backbone levels to ``out_channels`` and adds coarser levels (SPEC §1.2).

    Each input level: 1x1 conv (no bias) + GroupNorm. Extra level 0: 3x3 stride-2 conv
    (no bias) on the *raw* last input + GroupNorm; extra level i > 0: the same on extra level
    i-1. No activation anywhere. Conv weights are Xavier-uniform, GroupNorm weight 1 / bias 0.

    Parameter names: ``convs.{i}.conv.weight``, ``convs.{i}.norm.{weight,bias}``,
    ``extra_convs.{j}.conv.weight``, ``extra_convs.{j}.norm.{weight,bias}`` (the official
    checkpoints call the norms ``gn``).
    """

    def __init__(
        self, in_channels: List[int], out_channels: int = 256, num_extra_levels: int = 1, num_groups: int = 32
    ):
        """
        Args:
            in_channels: channels of each input level, finest first.
            out_channels: channels of every output level.
            num_extra_levels: number of stride-2 levels appended after the inputs.
            num_groups: GroupNorm groups.
        """
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("ChannelMapper needs at least one input level")
        if num_extra_levels < 0:
            raise ValueError(f"ChannelMapper: num_extra_levels must be >= 0, got {num_extra_levels}")
        if out_channels % num_groups != 0:
            raise ValueError(f"ChannelMapper: num_groups={num_groups} does not divide out_channels={out_channels}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_extra_levels = num_extra_levels
        self.convs = nn.ModuleList(_ConvNorm(c, out_channels, 1, 1, num_groups) for c in in_channels)
        self.extra_convs = nn.ModuleList(
            _ConvNorm(in_channels[-1] if j == 0 else out_channels, out_channels, 3, 2, num_groups)
            for j in range(num_extra_levels)
        )

    @property
    def num_levels(self) -> int:
        return len(self.in_channels) + self.num_extra_levels

    def forward(self, features: List[Tensor], masks: List[Tensor]) -> List[Tensor]:
        """
        Args:
            features: ``len(in_channels)`` maps (B, C_i, H_i, W_i), finest first.
            masks: one (B, H_l, W_l) bool mask per OUTPUT level (True = padded), i.e.
                ``len(features) + num_extra_levels`` masks; the extra levels' sizes must be what
                the 3x3 stride-2 conv gives (ceil-halving).

        Returns:
            ``num_levels`` maps (B, out_channels, H_l, W_l). Values at padded positions are unspecified.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"ChannelMapper expects {len(self.in_channels)} feature maps, got {len(features)}")
        if len(masks) != self.num_levels:
            raise ValueError(
                f"ChannelMapper expects one mask per output level ({self.num_levels}: {len(features)} inputs + "
                f"{self.num_extra_levels} extra), got {len(masks)}"
            )
        for i, (f, m, c) in enumerate(zip(features, masks, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"ChannelMapper: feature {i} must be (B, {c}, H, W), got {tuple(f.shape)}")
            if m.shape != (f.shape[0],) + f.shape[2:]:
                raise ValueError(
                    f"ChannelMapper: mask {i} has shape {tuple(m.shape)}, feature {i} needs "
                    f"{(f.shape[0],) + tuple(f.shape[2:])}"
                )
        outs = [conv(f, m) for conv, f, m in zip(self.convs, features, masks)]
        x, x_mask = features[-1], masks[len(features) - 1]
        for j, conv in enumerate(self.extra_convs):
            # zero the padded area so the conv sees what its own zero padding gives an unpadded image
            x = x.masked_fill(x_mask.unsqueeze(1), 0.0)
            out_mask = masks[len(features) + j]
            expected = (x.shape[0], (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)
            if out_mask.shape != expected:
                raise ValueError(
                    f"ChannelMapper: mask of extra level {j} has shape {tuple(out_mask.shape)}, expected {expected}"
                )
            x = conv(x, out_mask)
            outs.append(x)
            x_mask = out_mask
        return outs
