"""The deformable attention op in standard ONNX ops (GridSample, opset >= 16), for ONNX Runtime.

``torch.onnx.export`` maps ``panoptic_segformer::ms_deform_attn_forward`` to this function
(``custom_translation_table``). It computes what ``ms_deform_attn_pytorch`` computes: per level,
the level's slice of ``value`` reshaped to (N*M, D, H_l, W_l) is sampled by GridSample
(bilinear, zeros padding, align_corners=0) at ``2 * loc - 1``; the samples of all levels are
weighted by ``attention_weights`` and summed. H_l, W_l and the level starts are read from the
``spatial_shapes`` / ``level_start_index`` inputs at run time, so image sizes stay dynamic; the
number of levels, heads, channels and points are static (weight shapes).
"""
from onnxscript import opset18 as op

__all__ = ["ms_deform_attn_onnx"]


def _i64(*values):
    return op.Constant(value_ints=list(values))


def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations
    (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M*D)."""
    _, _, m, d = value.shape
    n_levels, n_points = sampling_locations.shape[3], sampling_locations.shape[4]
    n_lq = op.Shape(sampling_locations, start=0, end=2)  # [N, Lq]
    v = op.Transpose(value, perm=[0, 2, 3, 1])  # (N, M, D, S)
    two = op.CastLike(op.Constant(value_float=2.0), sampling_locations)
    one = op.CastLike(op.Constant(value_float=1.0), sampling_locations)
    # (N, Lq, M, L, P, 2) -> (N, M, L, Lq, P, 2), in [-1, 1]
    grids = op.Transpose(op.Sub(op.Mul(sampling_locations, two), one), perm=[0, 2, 3, 1, 4, 5])
    samples = []
    for lvl in range(n_levels):
        start = op.Gather(level_start_index, _i64(lvl))  # [start]
        hw = op.Reshape(op.Gather(spatial_shapes, _i64(lvl), axis=0), _i64(2))  # [H, W]
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        part = op.Slice(v, start, end, _i64(3))  # (N, M, D, H*W)
        img = op.Reshape(part, op.Concat(_i64(-1, d), hw, axis=0))  # (N*M, D, H, W)
        grid = op.Gather(grids, _i64(lvl), axis=2)  # (N, M, 1, Lq, P, 2)
        grid = op.Reshape(grid, op.Concat(_i64(-1), op.Gather(n_lq, _i64(1)), _i64(n_points, 2), axis=0))
        samples.append(op.GridSample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=0))
    stacked = op.Concat(*samples, axis=-1)  # (N*M, D, Lq, L*P)
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    w = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    w = op.Reshape(w, op.Concat(_i64(-1, 1), op.Gather(n_lq, _i64(1)), _i64(n_levels * n_points), axis=0))
    w = op.CastLike(w, stacked)
    out = op.ReduceSum(op.Mul(stacked, w), _i64(-1), keepdims=0)  # (N*M, D, Lq)
    out = op.Reshape(out, op.Concat(op.Gather(n_lq, _i64(0)), _i64(m * d, -1), axis=0))  # (N, M*D, Lq)
    return op.Transpose(out, perm=[0, 2, 1])
