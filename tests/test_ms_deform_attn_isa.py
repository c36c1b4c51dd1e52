"""The CPU kernel variants (baseline, AVX2, AVX-512) against each other, and bfloat16 value tensors.

Tests are generated for the variants this CPU and build have (so none is skipped under CI's
PSF_STRICT_SKIPS), and one test checks that this set follows the CPU flags, so AVX-512 runs
wherever the CPU has it.  `_C.cpu_kernel_isa()` names the default variant ("avx512", "avx2" or
"baseline") and `_C.set_cpu_kernel_isa` forces one.
"""
from pathlib import Path

import pytest
import torch

from panoptic_segformer.layers import ms_deform_attn, ms_deform_attn_pytorch

from test_ms_deform_attn_cpu import _C, make_inputs, requires_ext  # noqa: E402

ALL_ISAS = ("baseline", "avx2", "avx512")


def _supported(isa):
    if _C is None:
        return False
    try:
        _C.set_cpu_kernel_isa(isa)
    except RuntimeError:
        return False
    finally:
        _C.set_cpu_kernel_isa("auto")
    return True


SUPPORTED = [isa for isa in ALL_ISAS if _supported(isa)] or ["baseline"]
VECTOR_ISAS = [isa for isa in SUPPORTED if isa != "baseline"]  # compared with the baseline


def _run(isa, inputs, grad_out):
    """Output and the three gradients of the compiled op with kernel variant `isa`."""
    value, shapes, starts, locs, weights = (t.detach().clone() for t in inputs)
    for t in (value, locs, weights):
        t.requires_grad_(True)
    _C.set_cpu_kernel_isa(isa)
    try:
        out = ms_deform_attn(value, shapes, starts, locs, weights, backend="compiled")
        out.backward(grad_out)
    finally:
        _C.set_cpu_kernel_isa("auto")
    return out.detach(), value.grad, locs.grad, weights.grad


def _border_locations(hw, lq, seed):
    """(1, lq, 1, L, 1, 2) locations on 0 and 1, pixel centres and edges, x = -1 and x = W, beyond."""
    g = torch.Generator().manual_seed(seed)
    per_level = []
    for h, w in hw:
        xs = torch.tensor([0.0, 1.0, -0.5 / w, (w + 0.5) / w, -0.3, 1.4] + [(i + 0.5) / w for i in range(w)]
                          + [i / w for i in range(w + 1)], dtype=torch.float64)
        ys = torch.tensor([0.0, 1.0, -0.5 / h, (h + 0.5) / h] + [i / h for i in range(h + 1)], dtype=torch.float64)
        grid = torch.cartesian_prod(xs, ys)
        per_level.append(grid[torch.randint(0, len(grid), (lq,), generator=g)])
    return torch.stack(per_level, 1).view(1, lq, 1, len(hw), 1, 2)


CASES = {
    "d1": dict(hw=[(6, 4), (3, 2)], d=1),
    "d5": dict(hw=[(6, 4), (3, 2)], d=5, m=3),
    "d17": dict(hw=[(9, 13), (5, 7)], d=17, p=3),
    "d37_four_levels": dict(hw=[(9, 13), (5, 7), (3, 4), (1, 2)], d=37, p=3),
    "d71": dict(hw=[(6, 4), (3, 5)], d=71, m=1),
    "d32_single_level": dict(hw=[(7, 5)], d=32, p=4),
    "d16_batch2": dict(hw=[(6, 4), (3, 2)], d=16, n=2, m=3, lq=7),
    "far_outside": dict(hw=[(6, 4), (3, 2)], d=19, lo=-1.5, hi=2.5, lq=9),
    "lq1": dict(hw=[(6, 4), (3, 2)], d=33, lq=1),
}


def _case_inputs(case, dtype, borders=False):
    kw = dict(m=2, lq=11, p=2, lo=-0.2, hi=1.2)
    kw.update(CASES[case])
    inputs = make_inputs(kw.pop("hw"), dtype=dtype, seed=3, **kw)
    if borders:
        value, shapes, starts, _, _ = make_inputs(CASES[case]["hw"], m=1, d=CASES[case]["d"], lq=12, p=1, dtype=dtype)
        locs = _border_locations(CASES[case]["hw"], 12, seed=5).to(dtype)
        weights = torch.rand(locs.shape[:-1], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        inputs = (value, shapes, starts, locs, weights.to(dtype))
    out_shape = (inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3])
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    return inputs, grad


@requires_ext
def test_kernel_isa_names_override_and_errors():
    default = _C.cpu_kernel_isa()
    assert default == SUPPORTED[-1]  # the widest supported variant by default
    for isa in SUPPORTED:
        _C.set_cpu_kernel_isa(isa)
        assert _C.cpu_kernel_isa() == isa
    _C.set_cpu_kernel_isa("auto")
    assert _C.cpu_kernel_isa() == default
    with pytest.raises(RuntimeError, match="must be 'auto', 'baseline', 'avx2' or 'avx512'"):
        _C.set_cpu_kernel_isa("sse9")
    for isa in set(ALL_ISAS) - set(SUPPORTED):
        with pytest.raises(RuntimeError, match="not available"):
            _C.set_cpu_kernel_isa(isa)
    assert _C.cpu_kernel_isa() == default


@requires_ext
def test_variants_present_follow_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo flags (not Linux x86)")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = ["baseline"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            expected.append("avx512")
    assert SUPPORTED == expected
    assert _C.cpu_kernel_isa() == expected[-1]


@requires_ext
@pytest.mark.parametrize("borders", [False, True], ids=["random", "borders"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_variant_matches_baseline_float32(isa, case, borders):
    """Forward and all gradients within 1e-6 (absolute and relative) of the baseline kernels.
    (Every variant adds in the same order without fused multiply-adds, so they agree exactly.)"""
    inputs, grad = _case_inputs(case, torch.float32, borders)
    ref = _run("baseline", inputs, grad)
    got = _run(isa, inputs, grad)
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{isa} {name}: {m}")


@requires_ext
@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_variant_matches_baseline_float64(isa):
    inputs, grad = _case_inputs("d37_four_levels", torch.float64)
    for a, b in zip(_run(isa, inputs, grad), _run("baseline", inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ bfloat16 value tensors
def _amp_layout(inputs, grad):
    """bfloat16 value and grad_output, float32 locations and weights (the autocast layout)."""
    value, shapes, starts, locs, weights = inputs
    return (value.bfloat16(), shapes, starts, locs, weights), grad.bfloat16()


@requires_ext
@pytest.mark.parametrize("case", ["d5", "d37_four_levels", "d32_single_level", "far_outside"])
@pytest.mark.parametrize("isa", SUPPORTED)
def test_bfloat16_value_equals_float32_kernel_then_rounded(isa, case):
    """A bfloat16 value converts exactly to float32 and the kernels accumulate in float32, so the
    native bfloat16 path gives the float32 kernel's results on value.float(), rounded once to
    bfloat16 (output, grad_value); the float32 grad_locations / grad_weights are identical."""
    inputs, grad = _amp_layout(*_case_inputs(case, torch.float32))
    got = _run(isa, inputs, grad)
    upcast = (inputs[0].float(), *inputs[1:])
    ref = _run(isa, upcast, grad.float())
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == got[3].dtype == torch.float32
    assert torch.equal(got[0], ref[0].bfloat16())
    assert torch.equal(got[1], ref[1].bfloat16())
    assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])


def _abs_problem(inputs, grad):
    """Sums of |terms|: the reference on |value|, |weights| (bilinear weights are >= 0), and the
    grad_value of the reference with |weights|, |grad| (it does not depend on value)."""
    value, shapes, starts, locs, weights = (t.double() if t.is_floating_point() else t for t in inputs)
    out_abs = ms_deform_attn_pytorch(value.abs(), shapes, starts, locs, weights.abs())
    v = value.detach().clone().requires_grad_(True)
    ms_deform_attn_pytorch(v, shapes, starts, locs, weights.abs()).backward(grad.double().abs())
    return out_abs, v.grad


@requires_ext
@pytest.mark.parametrize("layout", ["bfloat16_value", "all_bfloat16"])
@pytest.mark.parametrize("case", ["d5", "d37_four_levels", "d32_single_level", "far_outside"])
@pytest.mark.parametrize("isa", SUPPORTED)
def test_bfloat16_within_derived_bound(isa, case, layout):
    """|out - ref| <= u16 |ref| + (1 + u16) * (n + 2) * u32 * sum|terms| against the float64
    reference on the same (exactly upcast) inputs: u16 = 2^-8 is the unit roundoff of bfloat16
    (8-bit significand; the output is rounded once), u32 = 2^-24 that of float32, in which each of
    the n terms is formed (a * w, then * v: 2 roundings) and summed (n - 1 roundings).  n = 4 L P
    for the output; for grad_value each element sums at most 4 Lq L P contributions c * g."""
    inputs, grad = _amp_layout(*_case_inputs(case, torch.float32))
    if layout == "all_bfloat16":
        inputs = (*inputs[:3], inputs[3].bfloat16(), inputs[4].bfloat16())
    got = _run(isa, inputs, grad)
    value, shapes, starts, locs, weights = (t.double().requires_grad_(True) if t.is_floating_point() else t
                                            for t in inputs)
    ref_out = ms_deform_attn_pytorch(value, shapes, starts, locs, weights)
    ref_out.backward(grad.double())
    ref = (ref_out.detach(), value.grad)
    out_abs, grad_value_abs = _abs_problem(inputs, grad)
    _, lq, _, n_levels, n_points, _ = inputs[3].shape
    u16, u32 = 2.0**-8, 2.0**-24
    for name, a, b, abs_sum, n in (("output", got[0], ref[0], out_abs, 4 * n_levels * n_points),
                                   ("grad_value", got[1], ref[1], grad_value_abs, 4 * lq * n_levels * n_points)):
        bound = u16 * b.abs() + (1 + u16) * (n + 2) * u32 * abs_sum
        err = (a.double() - b).abs()
        assert (err <= bound).all(), f"{isa} {name}: max excess {(err - bound).max().item():.3g}"
        assert err.max() > 0  # the bound is exercised: bfloat16 rounding does happen
