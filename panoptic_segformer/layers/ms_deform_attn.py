"""Multi-scale deformable attention (MSDA): functional API, validation and custom-op glue.

Shapes used throughout (SPEC §9.3):

- ``value``               (N, S, M, D)        S = sum_l H_l * W_l, M heads, D channels per head
- ``spatial_shapes``      (L, 2) int64        (H_l, W_l) per level
- ``level_start_index``   (L,)   int64        [0, H_0 W_0, H_0 W_0 + H_1 W_1, ...]
- ``sampling_locations``  (N, Lq, M, L, P, 2) normalised to [0, 1], x then y
- ``attention_weights``   (N, Lq, M, L, P)
  (locations and weights share one dtype: that of value, or float32 for a float16/bfloat16 value)
- output                  (N, Lq, M * D)

Sampling is exactly ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``: the pixel coordinate is ``x = loc_x * W - 0.5``.

The compiled kernels live in the extension ``panoptic_segformer._C``, which registers the
operators ``torch.ops.panoptic_segformer.ms_deform_attn_forward`` / ``..._backward``.  This
module adds their fake (meta) implementations and autograd formula with ``torch.library``,
so ``torch.compile(fullgraph=True)`` and ``torch.export`` can trace through them.
"""
import warnings

import torch
import torch.nn.functional as F

try:
    from panoptic_segformer import _C
except ImportError as e:  # extension not built: the PyTorch path still works
    _C = None
    _C_IMPORT_ERROR = e
else:
    _C_IMPORT_ERROR = None

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "compiled_available"]

_BACKENDS = ("auto", "compiled", "pytorch")
# dtypes the compiled kernels accept, per device type
_COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_REDUCED = (torch.float16, torch.bfloat16)
_warned = set()


def compiled_available(device_type="cpu"):
    """True when the compiled op was built and supports ``device_type`` ("cpu" or "cuda")."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.cuda_compiled())
    return False


def _unavailable_reason(device_type, dtype):
    if _C is None:
        return f"the extension panoptic_segformer._C is not built ({_C_IMPORT_ERROR})"
    if not compiled_available(device_type):
        return f"the extension was built without {device_type} kernels"
    if dtype not in _COMPILED_DTYPES.get(device_type, ()):
        return f"the compiled kernels do not support dtype {dtype}"
    return None


# --------------------------------------------------------------------------- validation
def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_rank(name, t, rank, layout):
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-d {layout}, got shape {tuple(t.shape)}")


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validate ranks, sizes, dtypes and devices; return (spatial_shapes, level_start_index) as int64."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(names, args):
        _check_tensor(name, t)
    _check_rank("value", value, 4, "(N, S, M, D)")
    _check_rank("spatial_shapes", spatial_shapes, 2, "(L, 2)")
    _check_rank("level_start_index", level_start_index, 1, "(L,)")
    _check_rank("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)")
    _check_rank("attention_weights", attention_weights, 5, "(N, Lq, M, L, P)")

    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    loc_dtypes = (value.dtype, torch.float32) if value.dtype in _REDUCED else (value.dtype,)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in loc_dtypes:
            allowed = " or ".join(str(d) for d in loc_dtypes)
            raise TypeError(f"{name} must have dtype {allowed} (value is {value.dtype}), got {t.dtype}")
    if attention_weights.dtype != sampling_locations.dtype:
        raise TypeError(
            f"attention_weights ({attention_weights.dtype}) and sampling_locations "
            f"({sampling_locations.dtype}) must share one dtype"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an int64 tensor, got dtype {t.dtype}")
    spatial_shapes = spatial_shapes.long()
    level_start_index = level_start_index.long()

    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")

    n, s, m, _ = value.shape
    n_levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must have shape (L, 2) as (H, W), got {tuple(spatial_shapes.shape)}")
    if n_levels == 0:
        raise ValueError("spatial_shapes must describe at least one level, got L = 0")
    if level_start_index.shape[0] != n_levels:
        raise ValueError(
            f"level_start_index must have L = {n_levels} entries (one per level of spatial_shapes), "
            f"got {level_start_index.shape[0]}"
        )
    ls = sampling_locations.shape
    if ls[0] != n or ls[2] != m or ls[3] != n_levels or ls[5] != 2:
        raise ValueError(
            f"sampling_locations must have shape (N={n}, Lq, M={m}, L={n_levels}, P, 2), got {tuple(ls)}"
        )
    if tuple(attention_weights.shape) != tuple(ls[:5]):
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {tuple(ls[:5])} matching "
            f"sampling_locations, got {tuple(attention_weights.shape)}"
        )
    if not torch.compiler.is_compiling():
        _check_level_values(spatial_shapes, level_start_index, s)
    return spatial_shapes, level_start_index


def _check_level_values(spatial_shapes, level_start_index, s):
    """Value checks (one small host copy): positive sizes, sum H*W == S, contiguous level starts."""
    shapes = spatial_shapes.detach().cpu()
    starts = level_start_index.detach().cpu()
    if bool((shapes <= 0).any()):
        raise ValueError(f"spatial_shapes must be positive (H, W) pairs, got {shapes.tolist()}")
    areas = shapes[:, 0] * shapes[:, 1]
    total = int(areas.sum())
    if total != s:
        raise ValueError(
            f"spatial_shapes {shapes.tolist()} cover sum(H*W) = {total} tokens but value has S = {s}"
        )
    expected = torch.cumsum(areas, 0) - areas
    if not torch.equal(starts, expected):
        raise ValueError(
            f"level_start_index must be {expected.tolist()} for spatial_shapes {shapes.tolist()}, "
            f"got {starts.tolist()}"
        )


# --------------------------------------------------------------------------- reference path
def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Pure-PyTorch MSDA built on ``F.grid_sample``; shapes as in the module docstring.

    Works on any device and dtype and supports double backward, but materialises an
    (N*M, D, Lq, L*P) tensor, so it is slow and memory-hungry.  Returns (N, Lq, M*D).
    """
    spatial_shapes, level_start_index = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return _pytorch_impl(value, spatial_shapes, sampling_locations, attention_weights)


def _pytorch_impl(value, spatial_shapes, sampling_locations, attention_weights):
    if sampling_locations.dtype != value.dtype:  # float16/bfloat16 value with float32 locations
        out = _pytorch_impl(value.to(sampling_locations.dtype), spatial_shapes, sampling_locations, attention_weights)
        return out.to(value.dtype)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (part, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        img = part.permute(0, 2, 3, 1).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    stacked = torch.cat(samples, dim=-1)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- compiled path
if _C is not None:
    _fwd_op = torch.ops.panoptic_segformer.ms_deform_attn_forward
    _bwd_op = torch.ops.panoptic_segformer.ms_deform_attn_backward

    @torch.library.register_fake("panoptic_segformer::ms_deform_attn_forward")
    def _fwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("panoptic_segformer::ms_deform_attn_backward")
    def _bwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        return (torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights))

    def _fwd_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _fwd_backward(ctx, grad_output):
        value, shapes, starts, locs, weights = ctx.saved_tensors
        g_value, g_locs, g_weights = _bwd_op(value, shapes, starts, locs, weights, grad_output.contiguous())
        return g_value, None, None, g_locs, g_weights

    def _bwd_setup_context(ctx, inputs, output):
        pass

    def _bwd_backward(ctx, *grads):
        raise RuntimeError(
            "double backward through the compiled ms_deform_attn is not supported; "
            'use backend="pytorch" for higher-order gradients'
        )

    torch.library.register_autograd(
        "panoptic_segformer::ms_deform_attn_forward", _fwd_backward, setup_context=_fwd_setup_context
    )
    torch.library.register_autograd(
        "panoptic_segformer::ms_deform_attn_backward", _bwd_backward, setup_context=_bwd_setup_context
    )


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend="auto"):
    """Multi-scale deformable attention; returns (N, Lq, M*D).

    Args:
        value: (N, S, M, D) float tensor.
        spatial_shapes: (L, 2) int64, (H, W) of each level.
        level_start_index: (L,) int64, first token of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2), normalised [0, 1], x then y; the dtype of
            value, or float32 when value is float16/bfloat16 (keeps sub-pixel precision).
        attention_weights: (N, Lq, M, L, P), the dtype of sampling_locations.
        backend: "auto" (compiled kernel when built for this device and dtype, else the
            PyTorch path with a one-time warning), "compiled" (raise if unavailable) or
            "pytorch" (``F.grid_sample`` reference).

    Raises:
        TypeError / ValueError naming the offending argument for malformed input;
        RuntimeError for backend="compiled" when the kernel is unavailable.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    spatial_shapes, level_start_index = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if backend == "pytorch":
        return _pytorch_impl(value, spatial_shapes, sampling_locations, attention_weights)
    reason = _unavailable_reason(value.device.type, value.dtype)
    if reason is not None:
        if backend == "compiled":
            raise RuntimeError(f'ms_deform_attn backend="compiled" is unavailable: {reason}')
        key = (value.device.type, value.dtype)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"ms_deform_attn: {reason}; using the slower PyTorch (grid_sample) path", stacklevel=2)
        return _pytorch_impl(value, spatial_shapes, sampling_locations, attention_weights)
    device = value.device
    if device.type == "cpu" and sampling_locations.dtype != value.dtype:
        # float16/bfloat16 value with float32 locations: the CPU kernel wants one dtype, and
        # rounding the locations would cost sub-pixel precision, so compute in float32
        out = ms_deform_attn(value.float(), spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
        return out.to(value.dtype)
    return _fwd_op(
        value.contiguous(),
        spatial_shapes.to(device).contiguous(),
        level_start_index.to(device).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
