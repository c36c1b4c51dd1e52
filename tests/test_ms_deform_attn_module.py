"""MSDeformAttn: initialisation (SPEC §9.3), 2-d/4-d references, padding mask, compile/export."""
import math

import pytest
import torch

from panoptic_segformer.layers import MSDeformAttn, ms_deform_attn_pytorch

_C = __import__("panoptic_segformer.layers.ms_deform_attn", fromlist=["_C"])._C
requires_ext = pytest.mark.skipif(_C is None, reason="panoptic_segformer._C not built (pip install -e .)")

HW = [(6, 8), (3, 4), (2, 2)]


def _level_tensors(hw):
    shapes = torch.tensor(hw, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(areas, 0) - areas, int(areas.sum())


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def _inputs(n=2, lq=5, c=32, ref_dim=2, seed=1, hw=HW):
    g = torch.Generator().manual_seed(seed)
    shapes, starts, s = _level_tensors(hw)
    query = torch.randn(n, lq, c, generator=g)
    value = torch.randn(n, s, c, generator=g)
    ref = torch.rand(n, lq, len(hw), ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = 0.05 + 0.3 * ref[..., 2:]
    return query, ref, value, shapes, starts


def _manual(module, query, ref, value, shapes, starts, mask=None):
    """Independent re-derivation of SPEC §9.3 on top of the reference op."""
    n, lq, c = query.shape
    m, lv, p = module.n_heads, module.n_levels, module.n_points
    v = value @ module.value_proj.weight.T + module.value_proj.bias
    if mask is not None:
        v = v * (~mask)[..., None]
    v = v.view(n, -1, m, c // m)
    off = (query @ module.sampling_offsets.weight.T + module.sampling_offsets.bias).view(n, lq, m, lv, p, 2)
    logits = (query @ module.attention_weights.weight.T + module.attention_weights.bias).view(n, lq, m, lv * p)
    w = torch.softmax(logits, -1).view(n, lq, m, lv, p)
    locs = torch.empty_like(off)
    for l_ in range(lv):
        h, wd = shapes[l_].tolist()
        r = ref[:, :, None, l_, None, :]
        if ref.shape[-1] == 2:
            locs[:, :, :, l_] = r + off[:, :, :, l_] / torch.tensor([wd, h], dtype=off.dtype)
        else:
            locs[:, :, :, l_] = r[..., :2] + off[:, :, :, l_] / p * r[..., 2:] * 0.5
    out = ms_deform_attn_pytorch(v, shapes, starts, locs, w)
    return out @ module.output_proj.weight.T + module.output_proj.bias


def test_init_follows_spec():
    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert mod.backend == "auto"
    assert {n for n, _ in mod.named_children()} == {"sampling_offsets", "attention_weights", "value_proj", "output_proj"}
    assert mod.sampling_offsets.weight.shape == (8 * 4 * 4 * 2, 256)
    assert mod.attention_weights.weight.shape == (8 * 4 * 4, 256)
    assert torch.count_nonzero(mod.sampling_offsets.weight) == 0
    assert torch.count_nonzero(mod.attention_weights.weight) == 0
    assert torch.count_nonzero(mod.attention_weights.bias) == 0
    bias = mod.sampling_offsets.bias.view(8, 4, 4, 2)
    unit = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for h in range(8):
        for p in range(4):
            for lvl in range(4):
                torch.testing.assert_close(bias[h, lvl, p], unit[h] * (p + 1), atol=1e-6, rtol=0)
    bound = math.sqrt(6.0 / (256 + 256))
    for lin in (mod.value_proj, mod.output_proj):
        assert torch.count_nonzero(lin.bias) == 0
        assert lin.weight.abs().max() <= bound and lin.weight.std() > 0.5 * bound / math.sqrt(3)


def test_init_bias_for_three_heads_is_scaled_to_unit_max():
    mod = MSDeformAttn(d_model=12, n_levels=2, n_heads=3, n_points=2)
    bias = mod.sampling_offsets.bias.view(3, 2, 2, 2)
    assert torch.allclose(bias[:, :, 0].abs().amax(-1), torch.ones(3, 2))
    angle = 2 * math.pi / 3
    # head 1 points at 120 degrees: (cos, sin) / max(|cos|, |sin|) = (cos/sin, 1); point 1 doubles it
    expected = torch.tensor([math.cos(angle) / math.sin(angle), 1.0]) * 2
    torch.testing.assert_close(bias[1, 0, 1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("backend", ["pytorch", pytest.param("compiled", marks=requires_ext)])
def test_forward_matches_manual_derivation(ref_dim, backend):
    mod = _randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    mod.backend = backend
    args = _inputs(ref_dim=ref_dim)
    out = mod(*args)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, _manual(mod, *args), atol=1e-5, rtol=1e-5)


def test_padding_mask_zeroes_padded_tokens():
    mod = _randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    query, ref, value, shapes, starts = _inputs()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, -6:] = True
    out = mod(query, ref, value, shapes, starts, mask)
    garbage = value.clone()
    garbage[mask] = 1e3
    torch.testing.assert_close(mod(query, ref, garbage, shapes, starts, mask), out)
    torch.testing.assert_close(out, _manual(mod, query, ref, value, shapes, starts, mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, mod(query, ref, value, shapes, starts))


@requires_ext
def test_compiled_and_pytorch_backends_agree_with_gradients():
    mod = _randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)).double()
    args = [t.double() if t.is_floating_point() else t for t in _inputs(ref_dim=4)]
    grads = []
    for backend in ("compiled", "pytorch"):
        mod.backend = backend
        mod.zero_grad()
        query = args[0].clone().requires_grad_(True)
        mod(query, *args[1:]).square().sum().backward()
        grads.append([query.grad] + [p.grad.clone() for p in mod.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("compiled", marks=requires_ext)])
def test_bfloat16_autocast_is_close_to_float32(backend):
    mod = _randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    mod.backend = backend
    args = _inputs(ref_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), mod(*args), atol=5e-2, rtol=5e-2)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="d_model"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="n_points"):
        MSDeformAttn(n_points=0)
    mod = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    query, ref, value, shapes, starts = _inputs()
    with pytest.raises(ValueError, match="reference_points"):
        mod(query, ref[..., :1], value, shapes, starts)
    with pytest.raises(ValueError, match="query"):
        mod(query[..., :16], ref, value, shapes, starts)
    with pytest.raises(ValueError, match="padding_mask"):
        mod(query, ref, value, shapes, starts, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        mod(query, ref, value, shapes, starts, torch.zeros(value.shape[:2]))
    with pytest.raises(ValueError, match="spatial_shapes"):
        mod(query, ref, value, shapes[:2], starts)


@pytest.mark.parametrize("which", ["query", "reference_points", "value", "spatial_shapes", "level_start_index",
                                   "padding_mask"])
def test_meta_input_to_a_real_module_raises_naming_it(which):
    """Used to fail deep inside a projection ("Tensor on device cpu is not on the expected device
    meta!") or with "Cannot copy out of meta tensor"."""
    mod = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    query, ref, value, shapes, starts = _inputs()
    args = dict(query=query, reference_points=ref, value=value, spatial_shapes=shapes, level_start_index=starts,
                padding_mask=torch.zeros(value.shape[:2], dtype=torch.bool))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but the MSDeformAttn parameters are on cpu"):
        mod(**args)


def test_meta_module_with_real_inputs_raises_and_all_meta_gives_shapes():
    mod = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3).to("meta")
    query, ref, value, shapes, starts = _inputs()
    with pytest.raises(ValueError, match="query is on cpu but the MSDeformAttn parameters are on meta"):
        mod(query, ref, value, shapes, starts)
    out = mod(query.to("meta"), ref.to("meta"), value.to("meta"), shapes, starts)
    assert out.device.type == "meta" and out.shape == query.shape


class _Layer(torch.nn.Module):
    """A minimal encoder-style block using MSDeformAttn (residual + norm outside the op)."""

    def __init__(self):
        super().__init__()
        self.attn = _randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, query, ref, value, shapes, starts):
        return self.norm(query + self.attn(query, ref, value, shapes, starts))


@requires_ext
def test_torch_compile_fullgraph_training_step_matches_eager():
    """fullgraph tracing through the op's fake kernel and registered backward (aot_eager: no
    code generation, so it is quick); the inductor test below covers code generation."""
    torch._dynamo.reset()
    layer = _Layer()
    args = _inputs()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    query = args[0].clone().requires_grad_(True)
    out = compiled(query, *args[1:])
    out.square().sum().backward()
    query_e = args[0].clone().requires_grad_(True)
    eager = layer(query_e, *args[1:])
    grads_c = [query.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    eager.square().sum().backward()
    grads_e = [query_e.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@requires_ext
def test_torch_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = _Layer().eval()
    args = _inputs()
    with torch.no_grad():
        eager = layer(*args)
        out = torch.compile(layer, fullgraph=True)(*args)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


@requires_ext
def test_torch_export_matches_eager():
    layer = _Layer().eval()
    args = _inputs()
    ep = torch.export.export(layer, args)
    assert any("ms_deform_attn_forward" in str(node.target) for node in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*args), layer(*args), atol=1e-6, rtol=1e-6)
