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
    "meta": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_REDUCED = (torch.float16, torch.bfloat16)
_warned = set()


def compiled_available(device_type="cpu"):
    """True when the compiled op was built and supports ``device_type`` ("cpu", "cuda", or "meta":
    output shapes only)."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.cuda_compiled())
    return device_type == "meta"  # shapes only, from the fake kernel


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
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}{_META_HINT * _is_meta(t, value)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        # may stay on the CPU (moved to value's device here); a meta tensor has no values to read
        if t.device.type == "meta" and value.device.type != "meta":
            raise ValueError(f"{name} is on meta but value is on {value.device}{_META_HINT}")

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
    if not torch.compiler.is_compiling() and "meta" not in (spatial_shapes.device.type, level_start_index.device.type):
        _check_level_values(spatial_shapes, level_start_index, s)
    return spatial_shapes, level_start_index


_META_HINT = (
    " (a meta tensor has a shape but no data: move every input to one real device, or all of them to meta"
    " for shape inference)"
)
_INT64_MAX = 2**63 - 1


def _is_meta(*tensors):
    return any(t.device.type == "meta" for t in tensors)


def _check_level_values(spatial_shapes, level_start_index, s):
    """Value checks (one small host copy): positive sizes, sum H*W == S, contiguous level starts."""
    shapes = spatial_shapes.detach().cpu().tolist()
    starts = level_start_index.detach().cpu().tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive (H, W) pairs, got {shapes}")
    # Python ints: exact even where int64 arithmetic would wrap
    areas = [h * w for h, w in shapes]
    for lvl, ((h, w), area) in enumerate(zip(shapes, areas)):
        if area > _INT64_MAX:
            raise ValueError(f"spatial_shapes[{lvl}] = ({h}, {w}): H*W = {area} overflows int64")
    total = sum(areas)
    if total > _INT64_MAX:
        raise ValueError(f"spatial_shapes {shapes}: sum(H*W) = {total} overflows int64")
    if total != s:
        raise ValueError(f"spatial_shapes {shapes} cover sum(H*W) = {total} tokens but value has S = {s}")
    expected = [sum(areas[:lvl]) for lvl in range(len(areas))]
    if starts != expected:
        raise ValueError(f"level_start_index must be {expected} for spatial_shapes {shapes}, got {starts}")


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
    if spatial_shapes.device.type == "meta":
        raise ValueError("the PyTorch path reads spatial_shapes, so it must hold data: pass it on the CPU" + _META_HINT)
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
def _check_op_args(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output=None):
    """Checks of the C++ kernels (devices, ranks, dtypes, sizes) for the fake kernels; RuntimeError."""
    named = [("value", value), ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
             ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)]
    if grad_output is not None:
        named.append(("grad_output", grad_output))
    for name, t in named:
        if t.device != value.device:
            raise RuntimeError(f"{op}: {name} must be on {value.device} (the device of value), got {t.device}")
    for name, t, rank, layout in (("value", value, 4, "(N, S, M, D)"), ("spatial_shapes", spatial_shapes, 2, "(L, 2)"),
                                  ("level_start_index", level_start_index, 1, "(L,)"),
                                  ("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)"),
                                  ("attention_weights", attention_weights, 5, "(N, Lq, M, L, P)")):
        if t.dim() != rank:
            raise RuntimeError(f"{op}: {name} must be {rank}-d {layout}, got shape {tuple(t.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise RuntimeError(f"{op}: {name} must be int64, got {t.dtype}")
    if value.dtype not in _COMPILED_DTYPES["cpu"]:
        raise RuntimeError(f"{op}: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    loc_dtypes = (value.dtype, torch.float32) if value.dtype in _REDUCED else (value.dtype,)
    if sampling_locations.dtype not in loc_dtypes or attention_weights.dtype != sampling_locations.dtype:
        raise RuntimeError(
            f"{op}: sampling_locations and attention_weights must share one dtype, that of value ({value.dtype})"
            f"{' or float32' if value.dtype in _REDUCED else ''}; got {sampling_locations.dtype} and "
            f"{attention_weights.dtype}"
        )
    n, _, m, d = value.shape
    n_levels = spatial_shapes.shape[0]
    ls = sampling_locations.shape
    torch._check(spatial_shapes.shape[1] == 2 and level_start_index.shape[0] == n_levels,
                 lambda: f"{op}: spatial_shapes must be (L, 2) and level_start_index (L,), got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    torch._check(ls[0] == n and ls[2] == m and ls[3] == n_levels and ls[5] == 2,
                 lambda: f"{op}: sampling_locations must be (N={n}, Lq, M={m}, L={n_levels}, P, 2), got {tuple(ls)}")
    torch._check(tuple(attention_weights.shape) == tuple(ls[:5]),
                 lambda: f"{op}: attention_weights must be (N, Lq, M, L, P) = {tuple(ls[:5])}, got "
                         f"{tuple(attention_weights.shape)}")
    if grad_output is not None:
        if grad_output.dtype != value.dtype:
            raise RuntimeError(f"{op}: grad_output must have the dtype of value ({value.dtype}), got {grad_output.dtype}")
        torch._check(tuple(grad_output.shape) == (n, ls[1], m * d),
                     lambda: f"{op}: grad_output must be (N, Lq, M*D) = {(n, ls[1], m * d)}, got "
                             f"{tuple(grad_output.shape)}")


if _C is not None:
    _fwd_op = torch.ops.panoptic_segformer.ms_deform_attn_forward
    _bwd_op = torch.ops.panoptic_segformer.ms_deform_attn_backward

    # The fake kernels give output shapes under torch.compile / torch.export (fake tensors) and
    # for meta tensors.  The dispatcher also routes a call to them when any one argument is a
    # meta tensor, so they check what the C++ kernels check and raise like them.
    @torch.library.register_fake("panoptic_segformer::ms_deform_attn_forward")
    def _fwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        _check_op_args("panoptic_segformer::ms_deform_attn_forward", *args)
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("panoptic_segformer::ms_deform_attn_backward")
    def _bwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        _check_op_args("panoptic_segformer::ms_deform_attn_backward", *args, grad_output=grad_output)
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
    return _fwd_op(
        value.contiguous(),
        spatial_shapes.to(device).contiguous(),
        level_start_index.to(device).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
