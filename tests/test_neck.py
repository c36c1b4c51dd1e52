"""ChannelMapper and the padding-aware GroupNorm (SPEC §1.2, deviation (g))."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panoptic_segformer.modeling.neck import ChannelMapper, MaskedGroupNorm, masked_group_norm


def _pad_mask(batch, padded_hw, valid_hws):
    """(B, H, W) bool, True outside each image's valid (h, w)."""
    H, W = padded_hw
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    vh = torch.tensor([h for h, _ in valid_hws]).view(batch, 1, 1)
    vw = torch.tensor([w for _, w in valid_hws]).view(batch, 1, 1)
    return (rows >= vh) | (cols >= vw)


def test_masked_group_norm_equals_group_norm_without_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64) * 3 + 1
    gn = nn.GroupNorm(8, 64).double()
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    expected = gn(x)
    no_pad = torch.zeros(2, 5, 7, dtype=torch.bool)
    torch.testing.assert_close(masked_group_norm(x, no_pad, 8, gn.weight, gn.bias), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(masked_group_norm(x, None, 8, gn.weight, gn.bias), expected, rtol=0, atol=1e-12)


def test_masked_group_norm_valid_area_equals_group_norm_of_the_crop():
    torch.manual_seed(1)
    weight, bias = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    crops = [torch.randn(1, 32, 4, 6, dtype=torch.float64), torch.randn(1, 32, 7, 3, dtype=torch.float64)]
    padded = torch.full((2, 32, 7, 6), 1e3, dtype=torch.float64)  # large padding values would skew plain GN
    padded[0, :, :4, :6] = crops[0]
    padded[1, :, :7, :3] = crops[1]
    mask = _pad_mask(2, (7, 6), [(4, 6), (7, 3)])
    out = MaskedGroupNorm(4, 32).double()
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    y = out(padded, mask)
    for b, (h, w) in enumerate([(4, 6), (7, 3)]):
        ref = F.group_norm(crops[b], 4, weight, bias, 1e-5)[0]
        torch.testing.assert_close(y[b, :, :h, :w], ref, rtol=0, atol=1e-10)
    # plain GroupNorm over the padded map would not give the crop's result
    plain = F.group_norm(padded, 4, weight, bias, 1e-5)
    assert not torch.allclose(plain[0, :, :4, :6], F.group_norm(crops[0], 4, weight, bias, 1e-5)[0], atol=1e-3)


def test_masked_group_norm_half_precision_keeps_float32_statistics():
    torch.manual_seed(2)
    x = torch.randn(1, 32, 6, 6) * 100 + 50
    mask = _pad_mask(1, (6, 6), [(5, 4)])
    ref = masked_group_norm(x, mask, 8)
    y = masked_group_norm(x.to(torch.bfloat16), mask, 8)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float()[:, :, :5, :4], ref[:, :, :5, :4], atol=0.05, rtol=0.02)


def test_masked_group_norm_rejects_bad_input():
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="does not divide"):
        masked_group_norm(x, None, 5)
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_group_norm(x, torch.zeros(1, 4, 5, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_group_norm(x, torch.zeros(1, 4, 4), 8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        masked_group_norm(torch.randn(32, 4, 4), None, 8)


@pytest.mark.parametrize(
    "in_channels, expected",
    [
        ([512, 1024, 2048], 5_638_144),  # ResNet-50/101 (SPEC §8.1)
        ([64, 160, 256], 714_752),  # PVTv2-B0
        ([128, 320, 512], 1_427_456),  # PVTv2-B2/B5
        ([384, 768, 1536], 4_229_120),  # Swin-L
    ],
)
def test_parameter_count_matches_spec(in_channels, expected):
    assert sum(p.numel() for p in ChannelMapper(in_channels).parameters()) == expected


def test_structure_names_and_init():
    neck = ChannelMapper([8, 16, 32], out_channels=64, num_extra_levels=1, num_groups=32)
    names = {n: tuple(p.shape) for n, p in neck.named_parameters()}
    assert names == {
        "convs.0.conv.weight": (64, 8, 1, 1),
        "convs.0.norm.weight": (64,),
        "convs.0.norm.bias": (64,),
        "convs.1.conv.weight": (64, 16, 1, 1),
        "convs.1.norm.weight": (64,),
        "convs.1.norm.bias": (64,),
        "convs.2.conv.weight": (64, 32, 1, 1),
        "convs.2.norm.weight": (64,),
        "convs.2.norm.bias": (64,),
        "extra_convs.0.conv.weight": (64, 32, 3, 3),  # on the raw last input, not the projected one
        "extra_convs.0.norm.weight": (64,),
        "extra_convs.0.norm.bias": (64,),
    }
    for conv in [c.conv for c in neck.convs] + [c.conv for c in neck.extra_convs]:
        assert conv.bias is None and conv.stride == (conv.kernel_size[0] // 2 + 1,) * 2
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    for norm in [c.norm for c in neck.convs] + [c.norm for c in neck.extra_convs]:
        assert norm.num_groups == 32 and torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_forward_matches_a_hand_computed_reference():
    torch.manual_seed(3)
    neck = ChannelMapper([8, 16], out_channels=32, num_extra_levels=2, num_groups=4).double()
    for p in neck.parameters():
        nn.init.normal_(p)
    feats = [torch.randn(2, 8, 8, 10, dtype=torch.float64), torch.randn(2, 16, 4, 5, dtype=torch.float64)]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in [(8, 10), (4, 5), (2, 3), (1, 2)]]
    outs = neck(feats, masks)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 3), (2, 32, 1, 2)]

    def gn(x, norm):
        return F.group_norm(x, 4, norm.weight, norm.bias, 1e-5)

    ref0 = gn(F.conv2d(feats[0], neck.convs[0].conv.weight), neck.convs[0].norm)
    ref2 = gn(F.conv2d(feats[1], neck.extra_convs[0].conv.weight, stride=2, padding=1), neck.extra_convs[0].norm)
    ref3 = gn(F.conv2d(ref2, neck.extra_convs[1].conv.weight, stride=2, padding=1), neck.extra_convs[1].norm)
    torch.testing.assert_close(outs[0], ref0, rtol=0, atol=1e-10)
    torch.testing.assert_close(outs[2], ref2, rtol=0, atol=1e-10)
    torch.testing.assert_close(outs[3], ref3, rtol=0, atol=1e-10)


def test_padding_does_not_change_valid_outputs():
    """An image alone (unpadded) and inside a padded batch with garbage padding: same valid outputs."""
    torch.manual_seed(4)
    neck = ChannelMapper([8, 16, 24], out_channels=32, num_extra_levels=1, num_groups=8).double()
    valid = [(13, 17), (7, 9), (4, 5), (2, 3)]  # ceil-halvings of the stride-8 size
    padded = [(16, 24), (8, 12), (4, 6), (2, 3)]
    alone = [torch.randn(1, c, h, w, dtype=torch.float64) for c, (h, w) in zip([8, 16, 24], valid)]
    batch = []
    for f, (h, w) in zip(alone, padded):
        x = torch.randn(2, f.shape[1], h, w, dtype=torch.float64) * 50 + 7  # garbage in the padded area
        x[0, :, : f.shape[2], : f.shape[3]] = f[0]
        batch.append(x)
    alone_masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in valid]
    batch_masks = [_pad_mask(2, hw, [v, hw]) for hw, v in zip(padded, valid)]
    out_alone = neck(alone, alone_masks)
    out_batch = neck(batch, batch_masks)
    for a, b, (h, w) in zip(out_alone, out_batch, valid):
        torch.testing.assert_close(b[:1, :, :h, :w], a, rtol=0, atol=1e-10)


def test_bad_input_is_named():
    neck = ChannelMapper([8, 16], out_channels=32, num_groups=8)
    feats = [torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)]
    masks = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)]
    with pytest.raises(ValueError, match="one mask per output level"):
        neck(feats, masks)
    extra = torch.zeros(1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        neck(feats[:1], masks + [extra])
    with pytest.raises(ValueError, match=r"feature 1 must be \(B, 16, H, W\)"):
        neck([feats[0], torch.randn(1, 12, 2, 2)], masks + [extra])
    with pytest.raises(ValueError, match="mask 0 has shape"):
        neck(feats, [torch.zeros(1, 4, 5, dtype=torch.bool), masks[1], extra])
    with pytest.raises(ValueError, match="extra level 0"):
        neck(feats, masks + [torch.zeros(1, 2, 2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="does not divide"):
        ChannelMapper([8], out_channels=30, num_groups=8)


def test_masked_group_norm_gradients():
    torch.manual_seed(5)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    mask = _pad_mask(2, (3, 4), [(2, 3), (3, 4)])
    assert torch.autograd.gradcheck(lambda *a: masked_group_norm(a[0], mask, 2, a[1], a[2]), (x, weight, bias))
    # padded inputs get no gradient through the statistics of valid outputs
    masked_group_norm(x, mask, 2, weight, bias)[0, :, :2, :3].sum().backward()
    assert torch.all(x.grad[0, :, 2:] == 0) and torch.all(x.grad[0, :, :, 3:] == 0)
