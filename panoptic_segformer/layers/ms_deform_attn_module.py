"""``MSDeformAttn``: the multi-scale deformable attention layer (SPEC §9.3).

It holds the four projections and forms sampling locations and weights from the query.
It has no dropout and no residual; the calling encoder/decoder layers add those.
"""
import math

import torch
from torch import nn

from .ms_deform_attn import _META_HINT, ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels C of query and value; must be divisible by ``n_heads``.
        n_levels: number of feature levels L.
        n_heads: number of heads M.
        n_points: sampling points P per head and level.

    Attributes:
        backend: passed to :func:`ms_deform_attn` ("auto", "compiled" or "pytorch").
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = "auto"
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """SPEC §9.3 init: radial offset bias (head h at angle 2*pi*h/M, max-abs component 1,
        times p+1 for point p, same on every level); zero attention weights; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2) * scale  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, padding_mask=None):
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) points (x, y) or (N, Lq, L, 4) boxes (cx, cy, w, h),
                normalised to [0, 1] of each level's padded map.
            value: (N, S, C) flattened multi-level features, S = sum_l H_l * W_l.
            spatial_shapes: (L, 2) int64 (H, W) per level.
            level_start_index: (L,) int64.
            padding_mask: (N, S) bool, True = padding (value zeroed there), or None.

        Returns:
            (N, Lq, C).
        """
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be (N, Lq, {self.d_model}), got {_shape(query)}")
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[-1] != self.d_model:
            raise ValueError(f"value must be (N, S, {self.d_model}), got {_shape(value)}")
        n, lq, _ = query.shape
        s = value.shape[1]
        if value.shape[0] != n:
            raise ValueError(f"value batch {value.shape[0]} does not match query batch {n}")
        if (
            not isinstance(reference_points, torch.Tensor)
            or reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != (n, lq, self.n_levels)
            or reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"reference_points must be (N={n}, Lq={lq}, L={self.n_levels}, 2 or 4), got {_shape(reference_points)}"
            )
        if not isinstance(spatial_shapes, torch.Tensor) or tuple(spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(f"spatial_shapes must be ({self.n_levels}, 2), got {_shape(spatial_shapes)}")

        self._check_devices(query, reference_points, value, spatial_shapes, level_start_index, padding_mask)

        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if padding_mask is not None:
            if not isinstance(padding_mask, torch.Tensor) or tuple(padding_mask.shape) != (n, s):
                raise ValueError(f"padding_mask must be (N={n}, S={s}) bool, got {_shape(padding_mask)}")
            if padding_mask.dtype != torch.bool:
                raise TypeError(f"padding_mask must be a bool tensor, got dtype {padding_mask.dtype}")
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, s, m, self.d_model // m)

        offsets = self.sampling_offsets(query).view(n, lq, m, n_levels, n_points, 2)
        logits = self.attention_weights(query).view(n, lq, m, n_levels * n_points)
        weights = logits.softmax(-1, dtype=torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else None)
        weights = weights.view(n, lq, m, n_levels, n_points)

        # Locations and weights stay in float32 for a float16/bfloat16 value (AMP): rounding
        # them to 16 bits would cost up to ~0.1 pixel on a 167-wide level.
        loc_dtype = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        offsets, weights = offsets.to(loc_dtype), weights.to(loc_dtype)
        ref = reference_points.to(loc_dtype)
        if ref.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)
            locs = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locs = ref[:, :, None, :, None, :2] + offsets / n_points * ref[:, :, None, :, None, 2:] * 0.5
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locs, weights, backend=self.backend)
        return self.output_proj(out)

    def _check_devices(self, query, reference_points, value, spatial_shapes, level_start_index, padding_mask):
        """Inputs on the parameters' device (spatial_shapes / level_start_index may stay on the
        CPU); a clear error instead of a device mismatch deep inside a projection."""
        device = self.value_proj.weight.device
        named = [("query", query), ("reference_points", reference_points), ("value", value)]
        if padding_mask is not None:
            named.append(("padding_mask", padding_mask))
        for name, t in named:
            if t.device != device:
                raise ValueError(
                    f"{name} is on {t.device} but the MSDeformAttn parameters are on {device}"
                    f"{_META_HINT * (t.device.type == 'meta' or device.type == 'meta')}"
                )
        for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
            if isinstance(t, torch.Tensor) and t.device.type == "meta" and device.type != "meta":
                raise ValueError(f"{name} is on meta but the MSDeformAttn parameters are on {device}{_META_HINT}")

    def extra_repr(self):
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
