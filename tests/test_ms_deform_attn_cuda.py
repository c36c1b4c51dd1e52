"""GPU tests of the CUDA kernels of multi-scale deformable attention (MSDA).

Everything here compares ``ms_deform_attn(..., backend="compiled")`` on CUDA with the
pure-PyTorch ``F.grid_sample`` reference ``ms_deform_attn_pytorch``.  The module is skipped
as a whole unless a CUDA device is visible AND ``panoptic_segformer._C`` was built with the
CUDA kernels (``_C.cuda_compiled()``).  Importing it never fails: on a machine without a GPU
or without the extension every test shows as skipped.

Tolerances (u = unit roundoff: 2^-24 float32, 2^-11 float16, 2^-8 bfloat16):

* float32: forward within 1e-5 absolute (task requirement).  Gradients are sums of up to
  ~10^3 products reordered by atomics on both sides (our kernel and grid_sample's backward),
  so they agree to ~sqrt(n)*u relative to their magnitude; we allow 1e-4 * max(1, max|ref|),
  which any indexing or formula bug (O(1) relative error) still exceeds by orders of magnitude.
* float16 / bfloat16: the inputs are rounded to the low precision once, and the reference is
  computed in float32 from *those same rounded values*.  The kernel reads the same rounded
  numbers, accumulates in float32 and rounds each result once, so elementwise
        |kernel - ref| <= u * |ref| + (float32 accumulation noise).
  The noise term is taken as 2e-5 * max|ref| (forward) / 1e-4 * max|ref| (gradients), as for
  float32 above.  Accumulating in half precision instead would give errors of ~sqrt(#terms)*u
  relative, i.e. several u, and fail this bound; so the test also checks the fp32 accumulation.
* float64: ``torch.autograd.gradcheck`` (finite differences) on small shapes, with locations
  kept away from integer pixel coordinates where bilinear sampling has kinks.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def _cuda_kernels_status():
    """(available, reason) without ever raising."""
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA device visible"
    except Exception as e:  # pragma: no cover - broken CUDA install
        return False, f"torch.cuda.is_available() failed: {e}"
    try:
        from panoptic_segformer import _C
    except Exception as e:
        return False, f"panoptic_segformer._C is not importable: {e}"
    try:
        if not bool(_C.cuda_compiled()):
            return False, "panoptic_segformer._C was built without the CUDA kernels"
    except Exception as e:
        return False, f"panoptic_segformer._C.cuda_compiled() failed: {e}"
    return True, ""


_AVAILABLE, _REASON = _cuda_kernels_status()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_REASON)

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


# --------------------------------------------------------------------------- helpers
def _api():
    from panoptic_segformer.layers import ms_deform_attn, ms_deform_attn_pytorch

    return ms_deform_attn, ms_deform_attn_pytorch


def _ops():
    import panoptic_segformer.layers  # noqa: F401  (loads _C and registers the ops)

    return torch.ops.panoptic_segformer


def make_levels(shapes, device="cuda"):
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def make_inputs(shapes, n=2, lq=7, m=2, d=32, p=4, dtype=torch.float32, lo=-0.1, hi=1.1, seed=0):
    """Random problem on CUDA; locations uniform in [lo, hi] (so some fall outside the map)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, s = make_levels(shapes)
    n_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    locs = torch.rand(n, lq, m, n_levels, p, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    logits = torch.randn(n, lq, m, n_levels * p, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1).view(n, lq, m, n_levels, p)
    cast = lambda t: t.to(device="cuda", dtype=dtype).contiguous()  # noqa: E731
    return cast(value), spatial_shapes, level_start_index, cast(locs), cast(weights)


def run_both(value, spatial_shapes, level_start_index, locs, weights, grad_output=None, ref_dtype=None):
    """Forward (+ backward when grad_output is given) of the compiled op and of the reference.

    The reference runs in ``ref_dtype`` (default: the inputs' dtype) on the *same* values
    (up-cast exactly from the inputs).  Returns (out, ref, grads, ref_grads)."""
    ms_deform_attn, ms_deform_attn_pytorch = _api()
    ref_dtype = ref_dtype or value.dtype
    leaves = [t.detach().clone().requires_grad_(grad_output is not None) for t in (value, locs, weights)]
    out = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend="compiled")
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_(grad_output is not None) for t in (value, locs, weights)]
    ref = ms_deform_attn_pytorch(ref_leaves[0], spatial_shapes, level_start_index, ref_leaves[1], ref_leaves[2])
    grads = ref_grads = None
    if grad_output is not None:
        grads = torch.autograd.grad(out, leaves, grad_output)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_output.to(ref_dtype))
    return out, ref, grads, ref_grads


def assert_close_abs(actual, expected, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.3e}"


def assert_close_scaled(actual, expected, rel, what):
    """max|a - b| <= rel * max(1, max|b|)"""
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    assert_close_abs(actual, expected, rel * scale, what)


def assert_rounding_bound(actual, expected32, u, noise_rel, what):
    """Elementwise |a - b| <= u * |b| + noise_rel * max|b|  (b: float32 reference)."""
    assert actual.shape == expected32.shape, what
    a = actual.double()
    b = expected32.double()
    if b.numel() == 0:
        return
    bound = u * b.abs() + noise_rel * max(1.0, b.abs().max().item())
    excess = (a - b).abs() - bound
    worst = excess.max().item()
    assert worst <= 0, (
        f"{what}: error exceeds u*|ref| + {noise_rel:g}*max|ref| by {worst:.3e} "
        f"(max abs error {(a - b).abs().max().item():.3e}, max|ref| {b.abs().max().item():.3e})"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


LEVELS_4 = [(12, 17), (6, 9), (3, 5), (2, 3)]  # non-square, odd sizes


# --------------------------------------------------------------------------- float32
@pytest.mark.parametrize("d", [30, 32, 64, 257, 1025])
def test_float32_forward_backward_matches_reference(d):
    n_lq = 5 if d > 256 else 9
    value, shapes, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=n_lq, m=2, d=d, p=3, seed=d)
    grad_output = torch.randn(2, n_lq, 2 * d, device="cuda", generator=None)
    out, ref, grads, ref_grads = run_both(value, shapes, starts, locs, weights, grad_output)
    assert out.dtype == torch.float32 and out.shape == (2, n_lq, 2 * d)
    assert out.abs().max().item() > 0, "compiled op returned all zeros"
    assert_close_abs(out, ref, 1e-5, f"forward D={d}")
    for name, g, rg in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close_scaled(g, rg, 1e-4, f"{name} D={d}")


def test_float32_batch_entries_independent():
    """Batch 2 with different contents: each entry equals the op run on it alone."""
    ms_deform_attn, _ = _api()
    value, shapes, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=11, m=3, d=16, p=2, seed=1)
    both = ms_deform_attn(value, shapes, starts, locs, weights, backend="compiled")
    for i in range(2):
        alone = ms_deform_attn(value[i : i + 1], shapes, starts, locs[i : i + 1], weights[i : i + 1], backend="compiled")
        assert_close_abs(both[i : i + 1], alone, 0.0, f"batch entry {i}")
    assert (both[0] - both[1]).abs().max().item() > 1e-3, "batch entries should differ"


@pytest.mark.parametrize(
    "shapes",
    [
        [(7, 3)],  # single non-square level
        [(1, 1), (2, 9)],  # 1x1 level and a wide level
        [(13, 21), (25, 42)],  # levels in non-decreasing order of size are fine too
    ],
)
def test_float32_level_layouts(shapes):
    value, ss, starts, locs, weights = make_inputs(shapes, n=2, lq=6, m=2, d=30, p=4, seed=3)
    grad_output = torch.randn(2, 6, 60, device="cuda")
    out, ref, grads, ref_grads = run_both(value, ss, starts, locs, weights, grad_output)
    assert_close_abs(out, ref, 1e-5, f"forward {shapes}")
    for g, rg in zip(grads, ref_grads):
        assert_close_scaled(g, rg, 1e-4, f"backward {shapes}")


def test_float32_borders_and_outside():
    """Locations exactly on 0 / 1, on pixel centres, at x = -1 and x = W (pixel units) and far outside.

    The gradient w.r.t. the location jumps where a pixel coordinate is an integer (the bilinear
    cell changes; x = -1 and x = W are where the sample enters / leaves the map).  There a
    one-ulp difference in computing x could legitimately flip the cell, so grad_sampling_locations
    is compared only at the other points; output, grad_value and grad_attention_weights are
    continuous and compared everywhere."""
    shapes = [(5, 8), (3, 4)]
    value, ss, starts, _, _ = make_inputs(shapes, n=1, lq=1, m=1, d=33, p=1, seed=4)
    special, smooth = [], []
    for h, w in shapes:
        xs_kink = (0.5 / w, 1 - 0.5 / w, -0.5 / w, (w + 0.5) / w)  # x = 0, W - 1, -1, W
        ys_kink = (0.5 / h, 1 - 0.5 / h, -0.5 / h, (h + 0.5) / h)
        for x in (0.0, 1.0, 0.5, -0.25, 1.3, -3.0, 7.0) + xs_kink:
            for y in (0.0, 1.0, 0.37, -2.0, 5.0) + ys_kink:
                special.append((x, y))
                smooth.append(x not in xs_kink and y not in ys_kink)
    k = len(special)
    # one query per special point, sampled at both levels with one point each
    pts = torch.tensor(special, dtype=torch.float64)
    locs = pts.view(1, k, 1, 1, 1, 2).expand(1, k, 1, 2, 1, 2).contiguous().to("cuda", torch.float32)
    weights = torch.rand(1, k, 1, 2, 1, dtype=torch.float64).to("cuda", torch.float32)
    grad_output = torch.randn(1, k, 33, device="cuda")
    out, ref, grads, ref_grads = run_both(value, ss, starts, locs, weights, grad_output)
    assert_close_abs(out, ref, 1e-5, "forward at borders")
    assert_close_scaled(grads[0], ref_grads[0], 1e-4, "grad_value at borders")
    assert_close_scaled(grads[2], ref_grads[2], 1e-4, "grad_attention_weights at borders")
    keep = torch.tensor(smooth, device="cuda")
    assert_close_scaled(grads[1][:, keep], ref_grads[1][:, keep], 1e-4, "grad_sampling_locations at borders")
    # entirely outside the map: exactly zero output and zero location / weight gradients
    far = torch.tensor([[-3.0, 0.5], [0.5, 5.0], [7.0, 7.0]], device="cuda")
    locs_far = far.view(1, 3, 1, 1, 1, 2).expand(1, 3, 1, 2, 1, 2).contiguous()
    out_far, _, grads_far, _ = run_both(
        value, ss, starts, locs_far, torch.ones(1, 3, 1, 2, 1, device="cuda"), torch.ones(1, 3, 33, device="cuda")
    )
    assert out_far.abs().max().item() == 0
    assert grads_far[0].abs().max().item() == 0
    assert grads_far[1].abs().max().item() == 0
    assert grads_far[2].abs().max().item() == 0


def test_float32_lq_one_and_empty():
    ms_deform_attn, _ = _api()
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=1, m=4, d=8, p=4, seed=5)
    grad_output = torch.randn(2, 1, 32, device="cuda")
    out, ref, grads, ref_grads = run_both(value, ss, starts, locs, weights, grad_output)
    assert out.shape == (2, 1, 32)
    assert_close_abs(out, ref, 1e-5, "Lq=1")
    for g, rg in zip(grads, ref_grads):
        assert_close_scaled(g, rg, 1e-4, "Lq=1 backward")

    # Lq = 0 and N = 0: correct empty shapes, no launch, gradients of the right shape
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=3, m=4, d=8, p=4, seed=5)
    for n, lq in ((2, 0), (0, 3)):
        v = value[:n].detach().clone().requires_grad_(True)
        lo = locs[:n, :lq].detach().clone().requires_grad_(True)
        w = weights[:n, :lq].detach().clone().requires_grad_(True)
        out = ms_deform_attn(v, ss, starts, lo, w, backend="compiled")
        assert out.shape == (n, lq, 32)
        out.sum().backward()
        assert v.grad.shape == v.shape and (v.grad == 0).all()
        assert lo.grad.shape == lo.shape and w.grad.shape == w.shape


def test_float32_benchmark_shapes():
    """Encoder (Lq = S ~ 22.2k) and decoder (Lq = 300) shapes of an 800x1333 image, 1e-5 abs."""
    levels = [(100, 167), (50, 84), (25, 42), (13, 21)]
    ms_deform_attn, ms_deform_attn_pytorch = _api()
    ss, starts, s = make_levels(levels)
    g = torch.Generator(device="cuda").manual_seed(6)
    value = torch.randn(1, s, 8, 32, device="cuda", generator=g)
    for lq in (300, s):
        locs = torch.rand(1, lq, 8, 4, 4, 2, device="cuda", generator=g)
        weights = torch.randn(1, lq, 8, 16, device="cuda", generator=g).softmax(-1).view(1, lq, 8, 4, 4)
        out = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
        ref = ms_deform_attn_pytorch(value, ss, starts, locs, weights)
        err = (out - ref).abs().max().item()
        if err > 1e-5:
            # Diagnose: at W = 167 an fp32 pixel coordinate resolves only ~1e-5 px, so both
            # sides are compared with a float64 reference computed from the same inputs.
            ref64 = ms_deform_attn_pytorch(value.double(), ss, starts, locs.double(), weights.double())
            pytest.fail(
                f"benchmark shape Lq={lq}: max |compiled - grid_sample fp32| = {err:.3e} > 1e-5; "
                f"vs float64: compiled {(out.double() - ref64).abs().max().item():.3e}, "
                f"grid_sample fp32 {(ref.double() - ref64).abs().max().item():.3e}"
            )


def test_float32_side_stream_and_repeatable():
    """Runs on the current (non-default) stream; forward is deterministic."""
    ms_deform_attn, _ = _api()
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=33, m=2, d=32, p=4, seed=7)
    expected = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """The device guard makes tensors on cuda:1 work while cuda:0 is current."""
    ms_deform_attn, ms_deform_attn_pytorch = _api()
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=1, lq=5, m=2, d=32, p=2, seed=8)
    args = [t.to("cuda:1") for t in (value, ss, starts, locs, weights)]
    with torch.cuda.device(0):
        out = ms_deform_attn(*args, backend="compiled")
    assert out.device == torch.device("cuda:1")
    assert_close_abs(out, ms_deform_attn_pytorch(*args), 1e-5, "cuda:1")


# --------------------------------------------------------------------------- float16 / bfloat16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [30, 32, 64, 257])
def test_low_precision_matches_fp32_reference(dtype, d):
    u = UNIT_ROUNDOFF[dtype]
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=8, m=2, d=d, p=4, dtype=dtype, seed=10 + d)
    grad_output = torch.randn(2, 8, 2 * d, device="cuda").to(dtype)
    out, ref, grads, ref_grads = run_both(value, ss, starts, locs, weights, grad_output, ref_dtype=torch.float32)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_rounding_bound(out, ref, u, 2e-5, f"{dtype} forward D={d}")
    for name, g, rg in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), grads, ref_grads):
        assert g.dtype == dtype
        assert_rounding_bound(g, rg, u, 1e-4, f"{dtype} {name} D={d}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_value_with_float32_locations(dtype):
    """The kernels also accept float32 locations/weights with a half/bf16 value (AMP keeps
    locations in float32; rounding them to bf16 would move samples by up to ~W*2^-9 pixels).
    Called through the raw op, since the Python layer requires one dtype."""
    ops = _ops()
    _, ms_deform_attn_pytorch = _api()
    u = UNIT_ROUNDOFF[dtype]
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=2, lq=8, m=2, d=32, p=4, seed=20)
    value_lp = value.to(dtype)
    out = ops.ms_deform_attn_forward(value_lp, ss, starts, locs, weights)
    assert out.dtype == dtype
    v32 = value_lp.float().requires_grad_(True)
    l32 = locs.clone().requires_grad_(True)
    w32 = weights.clone().requires_grad_(True)
    ref = ms_deform_attn_pytorch(v32, ss, starts, l32, w32)
    assert_rounding_bound(out, ref, u, 2e-5, f"{dtype} value + fp32 locations forward")
    grad_output = torch.randn_like(ref).to(dtype)
    g_value, g_locs, g_weights = ops.ms_deform_attn_backward(value_lp, ss, starts, locs, weights, grad_output)
    assert g_value.dtype == dtype and g_locs.dtype == torch.float32 and g_weights.dtype == torch.float32
    r_value, r_locs, r_weights = torch.autograd.grad(ref, (v32, l32, w32), grad_output.float())
    assert_rounding_bound(g_value, r_value, u, 1e-4, "grad_value")
    assert_close_scaled(g_locs, r_locs, 1e-4, "grad_sampling_locations (float32)")
    assert_close_scaled(g_weights, r_weights, 1e-4, "grad_attention_weights (float32)")


# --------------------------------------------------------------------------- float64 gradcheck
@pytest.mark.parametrize("d", [4, 33])
def test_float64_gradcheck(d):
    ms_deform_attn, ms_deform_attn_pytorch = _api()
    shapes = [(6, 4), (3, 2)]
    value, ss, starts, locs, weights = make_inputs(shapes, n=2, lq=2, m=2, d=d, p=2, dtype=torch.float64, seed=30)
    # keep pixel coordinates at least 1e-3 from integers (kinks of bilinear sampling)
    for lvl, (h, w) in enumerate(shapes):
        for k, size in ((0, w), (1, h)):
            pix = locs[:, :, :, lvl, :, k] * size - 0.5
            frac = pix - pix.floor()
            pix = pix.floor() + frac.clamp(0.01, 0.99)
            locs[:, :, :, lvl, :, k] = (pix + 0.5) / size
    value.requires_grad_(True)
    locs.requires_grad_(True)
    weights.requires_grad_(True)
    # forward agrees with the reference in float64
    out = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
    assert_close_abs(out, ms_deform_attn_pytorch(value, ss, starts, locs, weights), 1e-10, "float64 forward")

    def fn(v, lo, w):
        return ms_deform_attn(v, ss, starts, lo, w, backend="compiled")

    assert torch.autograd.gradcheck(fn, (value, locs, weights), eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-12)


# --------------------------------------------------------------------------- errors raise
def test_invalid_inputs_raise_not_zeros():
    ms_deform_attn, _ = _api()
    ops = _ops()
    value, ss, starts, locs, weights = make_inputs(LEVELS_4, n=1, lq=4, m=2, d=8, p=2, seed=40)

    # Python layer: bad sizes are a ValueError naming the argument
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, ss[:, :1].expand(-1, 2).contiguous(), starts, locs, weights, backend="compiled")

    # kernel-side backstop checks (bypassing the Python layer): RuntimeError, never zeros
    with pytest.raises(RuntimeError, match="spatial_shapes"):
        ops.ms_deform_attn_forward(value, ss.cpu(), starts, locs, weights)
    with pytest.raises(RuntimeError, match="level_start_index"):
        ops.ms_deform_attn_forward(value, ss, starts.int(), locs, weights)
    strided = torch.empty(*value.shape[:3], 2 * value.shape[3], device="cuda")[..., ::2]
    strided.copy_(value)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ms_deform_attn_forward(strided, ss, starts, locs, weights)
    with pytest.raises(RuntimeError, match="sampling_locations"):
        ops.ms_deform_attn_forward(value, ss, starts, locs.double(), weights.double())
    with pytest.raises(RuntimeError, match="attention_weights"):
        ops.ms_deform_attn_forward(value, ss, starts, locs, weights[..., :1].contiguous())
    with pytest.raises(RuntimeError, match="value"):
        ops.ms_deform_attn_forward(value.int(), ss, starts, locs, weights)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.ms_deform_attn_backward(value, ss, starts, locs, weights, torch.zeros(1, 4, 15, device="cuda"))

    # and a valid call does produce the (non-zero) result
    out = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
    assert out.abs().max().item() > 0


def test_inconsistent_levels_raise_in_kernel():
    """spatial_shapes that index past value (bypassing Python validation) trip a device-side
    assert, i.e. a CUDA error that raises, instead of an out-of-bounds access or zeros.  Run in
    a subprocess because a device-side assert leaves that process's CUDA context unusable."""
    code = textwrap.dedent(
        """
        import os, sys, torch, panoptic_segformer.layers  # noqa: F401
        ops = torch.ops.panoptic_segformer
        value = torch.randn(1, 10, 1, 4, device="cuda")
        ss = torch.tensor([[4, 5]], device="cuda")          # 20 tokens > S = 10
        starts = torch.zeros(1, dtype=torch.long, device="cuda")
        locs = torch.full((1, 2, 1, 1, 1, 2), 0.9, device="cuda")
        w = torch.ones(1, 2, 1, 1, 1, device="cuda")
        try:
            out = ops.ms_deform_attn_forward(value, ss, starts, locs, w)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED:", str(e).splitlines()[0], flush=True)
            os._exit(0)  # skip teardown of the now-broken CUDA context
        print("NO ERROR", out, flush=True)
        os._exit(1)
        """
    )
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "RAISED" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- 64-bit indexing
def test_64bit_indexing():
    """value with more than 2^31 elements: a level starting beyond element 2^31 is read and
    its gradient written at the right place (32-bit offsets would wrap around)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    ms_deform_attn, ms_deform_attn_pytorch = _api()
    m, d = 1, 256
    big = (2**23 // 256 + 2, 256)  # 8,390,656 tokens x 256 channels > 2^31 elements
    small = (3, 5)
    ss, starts, s = make_levels([big, small])
    assert s * m * d > 2**31
    value = torch.zeros(1, s, m, d, device="cuda", dtype=torch.float16)
    s0 = big[0] * big[1]
    g = torch.Generator(device="cuda").manual_seed(50)
    value[:, s0:] = torch.randn(1, s - s0, m, d, device="cuda", generator=g).half()
    lq = 4
    locs = torch.rand(1, lq, m, 2, 2, 2, device="cuda", generator=g).half()
    weights = torch.rand(1, lq, m, 2, 2, device="cuda", generator=g).half()
    weights[:, :, :, 0] = 0  # only the small level (beyond 2^31) contributes
    value.requires_grad_(True)
    out = ms_deform_attn(value, ss, starts, locs, weights, backend="compiled")
    ss_small, starts_small, _ = make_levels([small])
    v_small = value.detach()[:, s0:].float().requires_grad_(True)
    ref = ms_deform_attn_pytorch(
        v_small, ss_small, starts_small, locs[:, :, :, 1:].float().contiguous(), weights[:, :, :, 1:].float().contiguous()
    )
    assert_rounding_bound(out, ref, UNIT_ROUNDOFF[torch.float16], 2e-5, "forward beyond 2^31")
    grad_output = torch.randn(1, lq, m * d, device="cuda", generator=g).half()
    (g_value,) = torch.autograd.grad(out, value, grad_output)
    (r_value,) = torch.autograd.grad(ref, v_small, grad_output.float())
    assert_rounding_bound(g_value[:, s0:], r_value, UNIT_ROUNDOFF[torch.float16], 1e-4, "grad_value beyond 2^31")
    assert g_value[:, :s0].abs().max().item() == 0
