"""NaN and Inf through the compiled op, every CPU kernel variant, against the grid_sample reference.

What the reference (``ms_deform_attn_pytorch``: F.grid_sample(bilinear, zeros,
align_corners=False) times the weight, CPU, float32/float64) does, measured:

- a NaN or +-Inf location coordinate makes the sample NaN (so the output row is NaN), gives no
  grad_value, NaN grad_weight, NaN d/d(other coordinate) and 0 (NaN if a or grad_output is not
  finite) d/d(that coordinate);
- so does a finite coordinate whose 2*loc or loc*W overflows the dtype (float32: |loc| * max(2, W)
  > 3.4e38); a huge coordinate that does not overflow (1e20) is simply outside the map: 0;
- a sample outside the map is 0, so a NaN/Inf weight on it gives NaN (0 * Inf);
- NaN/Inf in value or grad_output follow IEEE arithmetic (0 * Inf = NaN at zero-weight corners).

The float16/bfloat16 F.grid_sample CPU kernel turns a NaN coordinate into a pixel index
(undefined behaviour: NaN grad_value at pixel 0), so reduced dtypes are compared with the float32
reference on the same (upcast) values.
"""
import math

import pytest
import torch

from panoptic_segformer.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch

from test_ms_deform_attn_cpu import _C, make_inputs, requires_ext  # noqa: E402

NAN, INF = math.nan, math.inf


def _available_isas():
    if _C is None:
        return []
    found = []
    for isa in ("baseline", "avx2", "avx512"):
        try:
            _C.set_cpu_kernel_isa(isa)
        except RuntimeError:
            continue
        found.append(isa)
    _C.set_cpu_kernel_isa("auto")
    return found


ISAS = _available_isas() or ["baseline"]


def _grads(fn, value, shapes, starts, locs, weights, grad_out):
    value, locs, weights = (t.detach().clone().requires_grad_(True) for t in (value, locs, weights))
    out = fn(value, shapes, starts, locs, weights)
    out.backward(grad_out)
    return out.detach(), value.grad, locs.grad, weights.grad


def _compiled_with(isa):
    def run(*args):
        _C.set_cpu_kernel_isa(isa)
        try:
            return ms_deform_attn(*args, backend="compiled")
        finally:
            _C.set_cpu_kernel_isa("auto")

    return run


def assert_same_nonfinite(got, ref, atol, what):
    """Same NaN positions, same +Inf and -Inf positions, finite entries within atol (+ atol * |ref|)."""
    got = got.to(ref.dtype)
    for name, mask in (("NaN", torch.isnan), ("+Inf", lambda t: t == INF), ("-Inf", lambda t: t == -INF)):
        assert torch.equal(mask(got), mask(ref)), f"{what}: {name} at {mask(got).nonzero().tolist()}, " \
                                                  f"reference at {mask(ref).nonzero().tolist()}"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


def _check_against_reference(inputs, grad_out, atol, isas=ISAS):
    ref = _grads(ms_deform_attn_pytorch, *inputs, grad_out)
    for isa in isas:
        got = _grads(_compiled_with(isa), *inputs, grad_out)
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
            assert_same_nonfinite(a, b, atol, f"{isa} {name}")
    return ref


def _one_level_case(locs_xy, weights=None, value_edit=None, grad_edit=None, dtype=torch.float64):
    """One 3x4 level, one head, D = 3, one query, P = len(locs_xy) points."""
    p = len(locs_xy)
    value, shapes, starts, _, _ = make_inputs([(3, 4)], m=1, d=3, lq=1, p=p, dtype=dtype, seed=4)
    locs = torch.tensor(locs_xy, dtype=dtype).view(1, 1, 1, 1, p, 2)
    w = torch.tensor(weights if weights is not None else [0.5] * p, dtype=dtype).view(1, 1, 1, 1, p)
    if value_edit is not None:
        value_edit(value)
    g = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=dtype)
    if grad_edit is not None:
        grad_edit(g)
    return (value, shapes, starts, locs, w), g


INSIDE = (0.4, 0.5)
ON_PIXEL = (1.5 / 4, 1.5 / 3)  # pixel centre (1, 1): three corners with weight 0
HAND_CASES = {
    "nan_x": dict(locs_xy=[(NAN, 0.5), INSIDE]),
    "nan_y": dict(locs_xy=[INSIDE, (0.4, NAN)]),
    "nan_both": dict(locs_xy=[(NAN, NAN)]),
    "pos_inf_x": dict(locs_xy=[(INF, 0.5), INSIDE]),
    "neg_inf_y": dict(locs_xy=[(0.4, -INF), INSIDE]),
    "nan_x_y_outside": dict(locs_xy=[(NAN, 7.0)]),
    "huge_finite_outside": dict(locs_xy=[(1e20, 0.5), (-1e20, 0.5), (0.4, 1e300)]),
    "float32_overflowing_coordinate": dict(locs_xy=[(1e38, 0.5), INSIDE], dtype=torch.float32),
    "float32_2loc_overflows": dict(locs_xy=[(0.4, 3e38)], dtype=torch.float32),
    "nan_weight_inside": dict(locs_xy=[INSIDE, ON_PIXEL], weights=[NAN, 0.5]),
    "nan_weight_outside": dict(locs_xy=[(1.5, 0.5), INSIDE], weights=[NAN, 0.5]),
    "inf_weight_inside": dict(locs_xy=[INSIDE], weights=[INF]),
    "inf_weight_on_pixel_centre": dict(locs_xy=[ON_PIXEL], weights=[INF]),
    "neg_inf_weight_outside": dict(locs_xy=[(-0.5, 0.5)], weights=[-INF]),
    "nan_value_at_a_used_corner": dict(locs_xy=[INSIDE], value_edit=lambda v: v[0, 5, 0].fill_(NAN)),
    "inf_value_at_zero_weight_corner": dict(locs_xy=[ON_PIXEL], value_edit=lambda v: v[0, 6, 0].fill_(INF)),
    "inf_value_unused": dict(locs_xy=[ON_PIXEL], value_edit=lambda v: v[0, 11, 0].fill_(INF)),
    "nan_grad_output": dict(locs_xy=[INSIDE, (1.5, 0.5)], grad_edit=lambda g: g[0, 0, 1].fill_(NAN)),
    "inf_grad_output_outside": dict(locs_xy=[(-0.7, 0.5), ON_PIXEL], grad_edit=lambda g: g[0, 0, 0].fill_(INF)),
    "zero_weight_nan_location": dict(locs_xy=[(NAN, 0.5)], weights=[0.0]),
}


@requires_ext
@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_hand_built_nonfinite_case_matches_reference(case):
    inputs, g = _one_level_case(**HAND_CASES[case])
    atol = 1e-5 if inputs[0].dtype == torch.float32 else 1e-12
    _check_against_reference(inputs, g, atol)


@requires_ext
def test_nan_location_gives_nan_output_not_a_skipped_sample():
    """The original failure: the kernel skipped the NaN sample and returned the finite sum of the others."""
    inputs, g = _one_level_case([(NAN, 0.5), INSIDE])
    for isa in ISAS:
        out, grad_value, grad_locs, grad_weights = _grads(_compiled_with(isa), *inputs, g)
        assert torch.isnan(out).all(), isa
        assert torch.isnan(grad_weights[..., 0]).all() and torch.isfinite(grad_weights[..., 1]).all()
        # d/dx of a NaN-x sample is 0 (its corners are all masked), d/dy is NaN
        assert grad_locs[..., 0, 0].item() == 0.0 and math.isnan(grad_locs[..., 0, 1].item())
        assert torch.isfinite(grad_value).all()


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_nonfinite_inputs_match_reference(dtype):
    """NaN/Inf/0 sprinkled into value, weights and grad_output, NaN/Inf/huge into locations, with
    exact pixel coordinates in a third of the cases, two levels, D = 19 (vector body + tail)."""
    specials_loc = [NAN, INF, -INF, 1e30, -1e30, 3e38, 1e37, 0.0]
    specials = [NAN, INF, -INF, 0.0]
    for seed in range(24):
        gen = torch.Generator().manual_seed(seed)
        inputs = make_inputs([(5, 4), (3, 2)], m=2, d=19, lq=3, p=2, dtype=dtype, seed=seed, lo=-0.3, hi=1.3)
        value, shapes, starts, locs, weights = inputs
        if seed % 3 == 0:
            locs[..., 0] = (torch.randint(-1, 6, locs[..., 0].shape, generator=gen).to(dtype) + 0.5) / 4
        g = torch.randn(1, 3, 38, generator=gen, dtype=dtype)
        for t, pool in ((value, specials), (locs, specials_loc), (weights, specials), (g, specials)):
            flat = t.view(-1)
            for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = pool[
                    int(torch.randint(0, len(pool), (1,), generator=gen))
                ]
        _check_against_reference(inputs, g, 1e-5 if dtype == torch.float32 else 1e-10)


@requires_ext
@pytest.mark.parametrize("layout", ["bfloat16", "float16", "bfloat16_value_float32_locations"])
def test_reduced_precision_nonfinite_matches_float32_reference(layout):
    value_dtype = torch.float16 if layout == "float16" else torch.bfloat16
    loc_dtype = torch.float32 if layout.endswith("float32_locations") else value_dtype
    for seed in range(8):
        gen = torch.Generator().manual_seed(100 + seed)
        value, shapes, starts, locs, weights = make_inputs(
            [(5, 4), (3, 2)], m=2, d=19, lq=3, p=2, dtype=torch.float32, seed=seed, lo=-0.3, hi=1.3
        )
        g = torch.randn(1, 3, 38, generator=gen)
        for t in (value, locs, weights, g):
            flat = t.view(-1)
            for special in (NAN, INF, -INF)[: 1 + seed % 3]:
                flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = special
        value, g = value.to(value_dtype), g.to(value_dtype)
        locs, weights = locs.to(loc_dtype), weights.to(loc_dtype)
        ref = _grads(ms_deform_attn_pytorch, value.float(), shapes, starts, locs.float(), weights.float(), g.float())
        for isa in ISAS:
            got = _grads(_compiled_with(isa), value, shapes, starts, locs, weights, g)
            for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
                assert_same_nonfinite(a.float(), b, 5e-2, f"{layout} {isa} {name}")


@requires_ext
def test_float16_location_that_overflows_float16_is_nan():
    """2*loc - 1 overflows float16 for loc > 32752: F.grid_sample in float16 returns NaN there."""
    value, shapes, starts, _, _ = make_inputs([(3, 4)], m=1, d=3, lq=1, p=2, dtype=torch.float16)
    locs = torch.tensor([40000.0, 0.5, 0.4, 0.5], dtype=torch.float16).view(1, 1, 1, 1, 2, 2)
    weights = torch.full((1, 1, 1, 1, 2), 0.5, dtype=torch.float16)
    ref = ms_deform_attn_pytorch(value, shapes, starts, locs, weights)
    assert torch.isnan(ref).all()
    for isa in ISAS:
        assert torch.isnan(_compiled_with(isa)(value, shapes, starts, locs, weights)).all()


@requires_ext
def test_msdeformattn_nan_query_gives_nan_rows_like_the_reference():
    """A NaN query makes its sampling offsets and weights NaN: its output row is NaN with the
    compiled backend as with backend="pytorch", the other rows stay finite and equal."""
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    hw = [(6, 8), (3, 4)]
    shapes = torch.tensor(hw)
    starts = torch.tensor([0, 48])
    query = torch.randn(2, 5, 32)
    query[1, 3, 7] = NAN
    ref_points = torch.rand(2, 5, 2, 2)
    value = torch.randn(2, 60, 32)
    outs = {}
    for backend in ("compiled", "pytorch"):
        module.backend = backend
        q = query.clone().requires_grad_(True)
        v = value.clone().requires_grad_(True)
        out = module(q, ref_points, v, shapes, starts)
        out.sum().backward()
        outs[backend] = (out.detach(), q.grad, v.grad)
    out, q_grad, v_grad = outs["compiled"]
    assert torch.isnan(out[1, 3]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, [0, 1, 2, 4]]).all()
    for a, b in zip(outs["compiled"], outs["pytorch"]):
        assert_same_nonfinite(a, b, 1e-5, "MSDeformAttn")


requires_cuda_kernels = pytest.mark.skipif(
    _C is None or not _C.cuda_compiled() or not torch.cuda.is_available(),
    reason="needs a GPU and the extension built with the CUDA kernels",
)


@requires_cuda_kernels
@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_cuda_hand_built_nonfinite_case_matches_cpu_reference(case):
    """The CUDA kernels follow the same rules (the CPU reference's: CUDA F.grid_sample itself
    turns some NaN/Inf coordinates into pixel indices)."""
    inputs, g = _one_level_case(**HAND_CASES[case])
    ref = _grads(ms_deform_attn_pytorch, *inputs, g)
    value, shapes, starts, locs, weights = (t.cuda().detach().clone() for t in inputs)
    for t in (value, locs, weights):
        t.requires_grad_(True)
    out = ms_deform_attn(value, shapes, starts, locs, weights, backend="compiled")
    out.backward(g.cuda())
    atol = 1e-5 if inputs[0].dtype == torch.float32 else 1e-12
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                          (out.detach(), value.grad, locs.grad, weights.grad), ref):
        assert_same_nonfinite(a.cpu(), b, atol, f"cuda {name}")
