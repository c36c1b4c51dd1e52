"""The compiled CPU multi-scale deformable attention op against the grid_sample reference."""
import warnings

import pytest
import torch

from panoptic_segformer.layers import ms_deform_attn, ms_deform_attn_pytorch

msda_mod = __import__("panoptic_segformer.layers.ms_deform_attn", fromlist=["_C"])
_C = msda_mod._C
requires_ext = pytest.mark.skipif(_C is None, reason="panoptic_segformer._C not built (pip install -e .)")

ENCODER_HW = [(100, 167), (50, 84), (25, 42), (13, 21)]


def make_inputs(hw, n=1, m=2, d=4, lq=3, p=2, dtype=torch.float64, seed=0, lo=-0.1, hi=1.1, grad=False):
    """Random MSDA inputs: value (N,S,M,D), shapes (L,2), starts (L,), locs (N,Lq,M,L,P,2), weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(areas, 0) - areas
    s, n_levels = int(areas.sum()), len(hw)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64).to(dtype)
    locs = (lo + (hi - lo) * torch.rand(n, lq, m, n_levels, p, 2, generator=g, dtype=torch.float64)).to(dtype)
    weights = torch.rand(n, lq, m, n_levels, p, generator=g, dtype=torch.float64)
    weights = (weights / weights.sum((-1, -2), keepdim=True)).to(dtype)
    if grad:
        for t in (value, locs, weights):
            t.requires_grad_(True)
    return value, shapes, starts, locs, weights


def _grads(fn, value, shapes, starts, locs, weights, grad_out):
    value, locs, weights = (t.detach().clone().requires_grad_(True) for t in (value, locs, weights))
    out = fn(value, shapes, starts, locs, weights)
    out.backward(grad_out)
    return out.detach(), value.grad, locs.grad, weights.grad


def _compiled(*args):
    return ms_deform_attn(*args, backend="compiled")


def _assert_fwd_bwd_match(inputs, atol=1e-10, seed=1):
    out_ref = ms_deform_attn_pytorch(*inputs)
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=out_ref.dtype)
    ref = _grads(ms_deform_attn_pytorch, *inputs, g)
    got = _grads(_compiled, *inputs, g)
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


CASES = {
    "two_levels_nonsquare": dict(hw=[(6, 4), (3, 2)]),
    "single_level": dict(hw=[(5, 7)]),
    "four_levels": dict(hw=[(9, 13), (5, 7), (3, 4), (1, 2)], p=3),
    "d30": dict(hw=[(6, 4), (3, 5)], d=30),
    "d64": dict(hw=[(6, 4), (3, 5)], d=64, m=1),
    "d257": dict(hw=[(4, 3), (2, 2)], d=257, m=1, lq=2),
    "lq1": dict(hw=[(6, 4), (3, 2)], lq=1),
    "batch2": dict(hw=[(6, 4), (3, 2)], n=2, m=3, lq=4),
    "far_outside": dict(hw=[(6, 4), (3, 2)], lo=-1.5, hi=2.5, lq=6),
}


@requires_ext
@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_forward_and_grads_match_reference(case):
    _assert_fwd_bwd_match(make_inputs(**CASES[case]))


@requires_ext
def test_batch_items_are_independent():
    value, shapes, starts, locs, weights = make_inputs([(6, 4), (3, 2)], n=2, lq=5)
    out = _compiled(value, shapes, starts, locs, weights)
    for i in range(2):
        one = _compiled(value[i : i + 1], shapes, starts, locs[i : i + 1], weights[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], one, atol=0, rtol=0)
    assert not torch.allclose(out[0], out[1])


@requires_ext
def test_borders_pixel_centres_and_edges():
    """Locations exactly on 0 and 1, on pixel centres (i+0.5)/W and edges i/W, at x_pix = -1
    and x_pix = W exactly, and beyond.  Output, grad_value and grad_weights (continuous in the
    location) equal grid_sample's to 1e-10.  grad_locations jumps where a pixel coordinate is
    an integer; there it must be one of the two one-sided derivatives (which one depends on
    the rounding of loc*W - 0.5); elsewhere it also matches to 1e-10."""
    hw = [(4, 5), (2, 3)]
    value, shapes, starts, _, _ = make_inputs(hw, m=1, d=3)
    special = []
    for h, w in hw:
        xs = [0.0, 1.0, -0.5 / w, (w + 0.5) / w, -0.25, 1.25] + [(i + 0.5) / w for i in range(w)] + [i / w for i in range(w + 1)]
        ys = [0.0, 1.0, -0.5 / h, (h + 0.5) / h] + [(i + 0.5) / h for i in range(h)] + [i / h for i in range(h + 1)]
        special.append(torch.cartesian_prod(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)))
    lq = min(len(s) for s in special)
    locs = torch.stack([s[:lq] for s in special], 1).view(1, lq, 1, len(hw), 1, 2).contiguous()
    weights = torch.full((1, lq, 1, len(hw), 1), 0.5, dtype=torch.float64)
    g = torch.randn(1, lq, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _grads(_compiled, value, shapes, starts, locs, weights, g)
    ref = _grads(ms_deform_attn_pytorch, value, shapes, starts, locs, weights, g)
    for i in (0, 1, 3):  # output, grad_value, grad_weights
        torch.testing.assert_close(got[i], ref[i], atol=1e-10, rtol=0)
    right = _grads(ms_deform_attn_pytorch, value, shapes, starts, locs + 1e-9, weights, g)[2]
    left = _grads(ms_deform_attn_pytorch, value, shapes, starts, locs - 1e-9, weights, g)[2]
    one_sided = torch.minimum((got[2] - right).abs(), (got[2] - left).abs())
    assert one_sided.max() < 1e-6
    pix = locs * shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2) - 0.5
    smooth = (pix - pix.round()).abs() > 1e-6  # per coordinate
    assert smooth.sum() > 100 and (~smooth).sum() > 50
    torch.testing.assert_close(got[2][smooth], ref[2][smooth], atol=1e-10, rtol=0)


@requires_ext
def test_gradcheck_small():
    inputs = make_inputs([(6, 4), (3, 2)], m=2, d=3, lq=2, p=2, lo=0.02, hi=0.98, grad=True)
    value, shapes, starts, locs, weights = inputs
    assert torch.autograd.gradcheck(
        lambda v, l, w: _compiled(v, shapes, starts, l, w), (value, locs, weights), eps=1e-6, atol=1e-7
    )


@requires_ext
def test_gradcheck_d30():
    value, shapes, starts, locs, weights = make_inputs([(5, 3), (2, 4)], m=1, d=30, lq=2, p=1, grad=True)
    assert torch.autograd.gradcheck(lambda v, l, w: _compiled(v, shapes, starts, l, w), (value, locs, weights))


@requires_ext
@pytest.mark.parametrize("isa", ["baseline", "auto"])
def test_kernel_variants_agree(isa):
    inputs = make_inputs([(9, 13), (5, 7)], m=2, d=37, lq=5, p=3, dtype=torch.float32)
    try:
        _C.set_cpu_kernel_isa(isa)
        got = _grads(_compiled, *inputs, torch.ones(1, 5, 74))
    finally:
        _C.set_cpu_kernel_isa("auto")
    ref = _grads(ms_deform_attn_pytorch, *inputs, torch.ones(1, 5, 74))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@requires_ext
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_reduced_precision_forward(dtype, tol):
    """bf16/fp16 inputs, float accumulation: error is that of rounding the inputs and the output."""
    inputs = make_inputs([(9, 13), (5, 7)], m=2, d=32, lq=20, p=4, dtype=dtype, lo=0.0, hi=1.0)
    out = _compiled(*inputs)
    assert out.dtype == dtype
    ref = ms_deform_attn_pytorch(*(t.double() if t.is_floating_point() else t for t in inputs))
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    grads = _grads(_compiled, *inputs, torch.ones(out.shape, dtype=dtype))
    ref_grads = _grads(ms_deform_attn_pytorch, *(t.double() if t.is_floating_point() else t for t in inputs),
                       torch.ones(out.shape, dtype=torch.float64))
    torch.testing.assert_close(grads[1].double(), ref_grads[1], atol=tol, rtol=tol)  # grad_value
    torch.testing.assert_close(grads[3].double(), ref_grads[3], atol=10 * tol, rtol=tol)  # grad_weights


@requires_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_value_with_float32_locations(dtype):
    """AMP layout: 16-bit value, float32 locations/weights; output in the value's dtype."""
    value, shapes, starts, locs, weights = make_inputs([(9, 13), (5, 7)], m=2, d=16, lq=6, dtype=torch.float32)
    value16 = value.to(dtype).requires_grad_(True)
    locs = locs.requires_grad_(True)
    out = _compiled(value16, shapes, starts, locs, weights)
    assert out.dtype == dtype
    ref = ms_deform_attn_pytorch(value16.float(), shapes, starts, locs, weights)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    out.float().sum().backward()
    assert value16.grad.dtype == dtype and locs.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="attention_weights"):
        _compiled(value16, shapes, starts, locs, weights.to(dtype))


@requires_ext
def test_encoder_shape_float32():
    """Benchmark encoder shape (S = Lq ~ 22.2k, 8 heads x 32 ch, 4 points): forward within
    1e-5 absolute; gradients on a 2000-query subset (same value) within float32 tolerances."""
    value, shapes, starts, locs, weights = make_inputs(
        ENCODER_HW, m=8, d=32, lq=22223, p=4, dtype=torch.float32, lo=-0.05, hi=1.05
    )
    with torch.no_grad():
        out = _compiled(value, shapes, starts, locs, weights)
        ref = ms_deform_attn_pytorch(value, shapes, starts, locs, weights)
    assert (out - ref).abs().max().item() <= 1e-5
    del ref
    # Gradients on a 2000-query subset, against the float64 reference on the same float32
    # inputs.  The kernel computes pixel coordinates in double, so it is ~30x closer to the
    # float64 result than the float32 reference is (whose 2*loc-1 moves samples by ~1e-7 * W px).
    sub = (value, shapes, starts, locs[:, :2000].contiguous(), weights[:, :2000].contiguous())
    g = torch.randn(1, 2000, 256, generator=torch.Generator().manual_seed(2))
    got = _grads(_compiled, *sub, g)
    ref = _grads(ms_deform_attn_pytorch, *(t.double() if t.is_floating_point() else t for t in sub), g.double())
    torch.testing.assert_close(got[0].double(), ref[0], atol=1e-6, rtol=0)  # output
    torch.testing.assert_close(got[1].double(), ref[1], atol=1e-5, rtol=1e-5)  # grad_value
    # grad_locations (|.| up to ~700: scaled by W, H) jumps across pixel lines: skip coordinates
    # within 1e-4 pixel of one, where rounding may pick the other one-sided derivative
    pix = sub[3].double() * shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2) - 0.5
    far = (pix - pix.round()).abs() > 1e-4
    assert far.float().mean() > 0.99
    torch.testing.assert_close(got[2].double()[far], ref[2][far], atol=5e-4, rtol=1e-6)
    torch.testing.assert_close(got[3].double(), ref[3], atol=2e-5, rtol=1e-6)  # grad_weights (|.| ~ 25)


@requires_ext
def test_non_contiguous_and_int32_inputs_are_accepted():
    value, shapes, starts, locs, weights = make_inputs([(6, 4), (3, 2)], m=2, d=4, lq=3)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    assert not value_nc.is_contiguous()
    out = ms_deform_attn(value_nc, shapes.int(), starts.int(), locs, weights, backend="compiled")
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, locs, weights), atol=1e-12, rtol=0)


@requires_ext
def test_empty_queries():
    value, shapes, starts, locs, weights = make_inputs([(6, 4)], lq=0)
    assert _compiled(value, shapes, starts, locs, weights).shape == (1, 0, 8)


@requires_ext
def test_double_backward_raises_clearly():
    value, shapes, starts, locs, weights = make_inputs([(6, 4)], lq=2, grad=True)
    out = _compiled(value, shapes, starts, locs, weights)
    (gv,) = torch.autograd.grad(out.sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gv.sum().backward()


# ------------------------------------------------------------------ backend selection
def test_invalid_backend_name():
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(*make_inputs([(6, 4)]), backend="cuda")


def test_pytorch_backend_never_needs_extension(monkeypatch):
    monkeypatch.setattr(msda_mod, "_C", None)
    inputs = make_inputs([(6, 4), (3, 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs, backend="pytorch")
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))


def test_auto_falls_back_with_one_warning_and_compiled_raises(monkeypatch):
    monkeypatch.setattr(msda_mod, "_C", None)
    monkeypatch.setattr(msda_mod, "_warned", set())
    inputs = make_inputs([(6, 4), (3, 2)])
    with pytest.warns(UserWarning, match="PyTorch"):
        out = ms_deform_attn(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)  # second call: no warning
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    with pytest.raises(RuntimeError, match="compiled"):
        ms_deform_attn(*inputs, backend="compiled")


@requires_ext
def test_auto_uses_compiled_kernel_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(msda_mod, "_pytorch_impl", lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*make_inputs([(6, 4)]))
    assert not calls and out.shape == (1, 3, 8)
    assert not _C.cuda_compiled() or torch.cuda.is_available() or True  # built flag is a bool either way
    assert isinstance(_C.cuda_compiled(), bool)


# ------------------------------------------------------------------ invalid arguments
def _replace(i, fn):
    def mutate(args):
        args = list(args)
        args[i] = fn(args[i])
        return args

    return mutate


INVALID = {
    "value_rank": (_replace(0, lambda v: v[0]), ValueError, "value"),
    "value_not_tensor": (_replace(0, lambda v: v.tolist()), TypeError, "value"),
    "value_integer": (_replace(0, lambda v: v.long()), TypeError, "value"),
    "shapes_rank": (_replace(1, lambda s: s.flatten()), ValueError, "spatial_shapes"),
    "shapes_width3": (_replace(1, lambda s: torch.cat([s, s[:, :1]], 1)), ValueError, "spatial_shapes"),
    "shapes_float": (_replace(1, lambda s: s.double()), TypeError, "spatial_shapes"),
    "shapes_inconsistent_with_S": (_replace(1, lambda s: s + 1), ValueError, "spatial_shapes"),
    "shapes_nonpositive": (_replace(1, lambda s: s * torch.tensor([[1, 0], [1, 1]])), ValueError, "spatial_shapes"),
    "starts_wrong_values": (_replace(2, lambda t: t + 1), ValueError, "level_start_index"),
    "starts_wrong_length": (_replace(2, lambda t: t[:1]), ValueError, "level_start_index"),
    "starts_float": (_replace(2, lambda t: t.float()), TypeError, "level_start_index"),
    "locs_rank": (_replace(3, lambda t: t[0]), ValueError, "sampling_locations"),
    "locs_levels": (_replace(3, lambda t: t[:, :, :, :1]), ValueError, "sampling_locations"),
    "locs_heads": (_replace(3, lambda t: t[:, :, :1]), ValueError, "sampling_locations"),
    "locs_last_dim": (_replace(3, lambda t: torch.cat([t, t[..., :1]], -1)), ValueError, "sampling_locations"),
    "locs_batch": (_replace(3, lambda t: torch.cat([t, t], 0)), ValueError, "sampling_locations"),
    "locs_dtype": (_replace(3, lambda t: t.float()), TypeError, "sampling_locations"),
    "weights_rank": (_replace(4, lambda t: t.flatten(-2)), ValueError, "attention_weights"),
    "weights_points": (_replace(4, lambda t: t[..., :1]), ValueError, "attention_weights"),
    "weights_dtype": (_replace(4, lambda t: t.float()), TypeError, "attention_weights"),
    "weights_not_tensor": (_replace(4, lambda t: 0.5), TypeError, "attention_weights"),
    "locs_on_meta_device": (_replace(3, lambda t: t.to("meta")), ValueError, "sampling_locations"),
    "value_on_meta_device": (_replace(0, lambda t: t.to("meta")), ValueError, "value is on meta .*no data"),
    "shapes_on_meta_device": (_replace(1, lambda t: t.to("meta")), ValueError, "spatial_shapes is on meta .*no data"),
    "starts_on_meta_device": (_replace(2, lambda t: t.to("meta")), ValueError, "level_start_index is on meta"),
}


@pytest.mark.parametrize("backend", ["pytorch", "auto"])
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_argument_raises_naming_it(case, backend):
    mutate, exc, name = INVALID[case]
    args = mutate(make_inputs([(6, 4), (3, 2)], lq=2))
    with pytest.raises(exc, match=name):
        ms_deform_attn(*args, backend=backend)


@requires_ext
def test_direct_op_call_with_bad_levels_raises_not_crashes():
    value, shapes, starts, locs, weights = make_inputs([(6, 4), (3, 2)], lq=2)
    with pytest.raises(RuntimeError, match="exceeds S"):
        torch.ops.panoptic_segformer.ms_deform_attn_forward(value, shapes * 4, starts, locs, weights)
    with pytest.raises(RuntimeError, match="exceeds S"):
        torch.ops.panoptic_segformer.ms_deform_attn_backward(
            value, shapes, starts + 100, locs, weights, torch.zeros(1, 2, 8, dtype=torch.float64)
        )


OP_ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


@requires_ext
@pytest.mark.parametrize("op,which", [("forward", i) for i in range(5)] + [("backward", i) for i in range(6)])
def test_direct_op_with_one_meta_argument_raises_naming_it(op, which):
    """The dispatcher sends a call with any meta argument to the fake kernel, which used to
    return uninitialised memory on value's device; now it raises like the C++ kernels.
    (which: index of the meta argument; 5 is grad_output, which only the backward has.)"""
    args = list(make_inputs([(6, 4), (3, 2)], lq=2)) + [torch.zeros(1, 2, 8, dtype=torch.float64)]
    args[which] = args[which].to("meta")
    fn = getattr(torch.ops.panoptic_segformer, f"ms_deform_attn_{op}")
    name = "spatial_shapes must be on meta" if which == 0 else (OP_ARGS + ("grad_output",))[which] + " must be on cpu"
    with pytest.raises(RuntimeError, match=f"ms_deform_attn_{op}: {name} \\(the device of value\\)"):
        fn(*(args if op == "backward" else args[:5]))


@requires_ext
def test_direct_op_on_all_meta_inputs_gives_shapes():
    args = [t.to("meta") for t in make_inputs([(6, 4), (3, 2)], m=2, d=4, lq=3)]
    out = torch.ops.panoptic_segformer.ms_deform_attn_forward(*args)
    assert out.device.type == "meta" and out.shape == (1, 3, 8) and out.dtype == torch.float64
    grads = torch.ops.panoptic_segformer.ms_deform_attn_backward(*args, torch.empty(1, 3, 8, device="meta",
                                                                                     dtype=torch.float64))
    assert [tuple(g.shape) for g in grads] == [tuple(args[0].shape), tuple(args[3].shape), tuple(args[4].shape)]
    assert all(g.device.type == "meta" for g in grads)


@requires_ext
def test_api_on_all_meta_inputs_gives_shapes():
    args = [t.to("meta") for t in make_inputs([(6, 4), (3, 2)], m=2, d=4, lq=3)]
    out = ms_deform_attn(*args)
    assert out.device.type == "meta" and out.shape == (1, 3, 8)
    with pytest.raises(ValueError, match="reads spatial_shapes"):
        ms_deform_attn(*args, backend="pytorch")


def _wrapping_levels():
    """Level table whose H*W products wrap around in int64 to a consistent-looking S = 6."""
    value, _, _, locs, weights = make_inputs([(6, 4), (3, 2)], lq=2)
    shapes = torch.tensor([[2**32, 2**32], [2, 3]])  # 2^64 wraps to 0 in int64
    starts = torch.tensor([0, 0])
    return value[:, :6].contiguous(), shapes, starts, locs, weights


@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_spatial_shapes_whose_area_overflows_int64_are_rejected_with_the_sizes(backend):
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\] = \(4294967296, 4294967296\): "
                                         r"H\*W = 18446744073709551616 overflows int64"):
        ms_deform_attn(*_wrapping_levels(), backend=backend)


def test_spatial_shapes_whose_total_overflows_int64_are_rejected():
    value, _, _, locs, weights = make_inputs([(6, 4), (3, 2), (1, 1)], lq=2)
    shapes = torch.tensor([[2**31, 2**31]] * 3)  # each 2^62 fits, the sum does not
    starts = torch.tensor([0, 2**62, 2**63 - 1])
    with pytest.raises(ValueError, match=r"sum\(H\*W\) = 13835058055282163712 overflows int64"):
        ms_deform_attn(value, shapes, starts, locs, weights)


@requires_ext
def test_direct_op_area_overflow_is_rejected_before_any_allocation():
    """h, w <= S with h*w wrapping to 0 passed the old check; then value.contiguous() tried to
    allocate the expanded 2^40-token value.  Now the product is checked first."""
    value = torch.zeros(1, 1, 1, 1).expand(1, 2**40, 1, 1)  # no memory behind the 2^40 tokens
    shapes = torch.tensor([[2**40, 2**40]])
    locs, weights = torch.zeros(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1)
    for fn, extra in ((torch.ops.panoptic_segformer.ms_deform_attn_forward, ()),
                      (torch.ops.panoptic_segformer.ms_deform_attn_backward, (torch.zeros(1, 1, 1),))):
        with pytest.raises(RuntimeError, match=r"spatial_shapes\[0\] = \(1099511627776, 1099511627776\): "
                                               r"H\*W overflows int64"):
            fn(value, shapes, torch.tensor([0]), locs, weights, *extra)


@requires_ext
def test_benchmark_script_json_smoke():
    """tools/benchmark_ms_deform_attn.py runs every available CPU kernel variant and grid_sample in
    float32 and bfloat16 and prints one JSON object (decoder case only)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "benchmark_ms_deform_attn.py"
    res = subprocess.run(
        [sys.executable, str(script), "--cases", "decoder", "--repeats", "1", "--no-memory", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    report = json.loads(res.stdout.strip().splitlines()[-1])
    rows = report["results"]
    kernels = {r["kernel"] for r in rows}
    assert "baseline" in kernels and "grid_sample" in kernels and _C.cpu_kernel_isa() in kernels
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["lq"] == 300 and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
