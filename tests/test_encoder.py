import math

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_detectron2

pytestmark = requires_detectron2

C = 32  # small d_model for speed; 4 heads of 8 channels


def _flatten_levels(maps):
    """maps: list of (B, C, H_l, W_l) -> (B, S, C), spatial_shapes, level_start_index."""
    shapes = torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long)
    sizes = shapes.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), shapes, start


def _pad_levels(maps, padded_sizes, generator):
    """Put each (B, C, h, w) map into the top-left corner of garbage of size padded_sizes[l]."""
    out, masks = [], []
    for m, (hp, wp) in zip(maps, padded_sizes):
        b, c, h, w = m.shape
        big = torch.randn(b, c, hp, wp, generator=generator, dtype=m.dtype) * 100
        big[:, :, :h, :w] = m
        mask = torch.ones(b, hp, wp, dtype=torch.bool)
        mask[:, :h, :w] = False
        out.append(big)
        masks.append(mask)
    return out, masks


def _valid_token_index(valid_sizes, padded_sizes):
    idx, start = [], 0
    for (h, w), (hp, wp) in zip(valid_sizes, padded_sizes):
        rows = torch.arange(h)[:, None] * wp + torch.arange(w)[None]
        idx.append(rows.flatten() + start)
        start += hp * wp
    return torch.cat(idx)


def test_parameter_counts():
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    enc = DeformableEncoder()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(enc.layers[0].self_attn) == 230_272
    assert count(enc.layers[0]) == 756_864
    assert count(enc) == 4_541_184
    assert len(enc.layers) == 6


def test_init():
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=2)
    for layer in enc.layers:
        # the MSDA init survives the Xavier pass over the whole encoder
        assert torch.all(layer.self_attn.sampling_offsets.weight == 0)
        assert torch.all(layer.self_attn.attention_weights.weight == 0)
        assert torch.all(layer.self_attn.attention_weights.bias == 0)
        assert layer.self_attn.sampling_offsets.bias.abs().max() == 4  # (p + 1) for the 4th point
        for lin in (layer.ffn.linear1, layer.ffn.linear2):
            fan_out, fan_in = lin.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert layer.norm1.eps == 1e-5
        assert [m.p for m in (layer.dropout1, layer.ffn.dropout1, layer.ffn.dropout2)] == [0.1, 0.1, 0.1]


def test_reference_points():
    from panoptic_segformer.modeling.encoder import encoder_reference_points

    shapes = torch.tensor([[2, 4], [1, 3]])
    ratios = torch.tensor([[[0.5, 1.0], [2 / 3, 1.0]], [[1.0, 0.5], [1.0, 1.0]]])
    ref = encoder_reference_points(shapes, ratios)
    assert ref.shape == (2, 11, 2, 2)
    for b in range(2):
        token = 0
        for lvl, (h, w) in enumerate(shapes.tolist()):
            for i in range(h):
                for j in range(w):
                    x = (j + 0.5) / (ratios[b, lvl, 0] * w)
                    y = (i + 0.5) / (ratios[b, lvl, 1] * h)
                    for other in range(2):
                        expected = torch.stack([x * ratios[b, other, 0], y * ratios[b, other, 1]])
                        torch.testing.assert_close(ref[b, token, other], expected)
                    token += 1


def test_layer_is_post_norm_with_pos_on_query_only():
    from panoptic_segformer.modeling.encoder import DeformableEncoder, encoder_reference_points

    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=1, d_model=C, n_heads=4, n_levels=2, dim_feedforward=16).eval()
    layer = enc.layers[0]
    for p in layer.self_attn.parameters():  # move away from the zero init
        p.data.normal_(0, 0.2)
    src, shapes, start = _flatten_levels([torch.randn(2, C, 4, 5), torch.randn(2, C, 2, 3)])
    pos = torch.randn_like(src)
    ratios = torch.ones(2, 2, 2)
    ref = encoder_reference_points(shapes, ratios)
    x = src + layer.self_attn(src + pos, ref, src, shapes, start, None)
    x = F.layer_norm(x, (C,), layer.norm1.weight, layer.norm1.bias, 1e-5)
    y = x + layer.ffn.linear2(F.relu(layer.ffn.linear1(x)))
    expected = F.layer_norm(y, (C,), layer.ffn.norm.weight, layer.ffn.norm.bias, 1e-5)
    torch.testing.assert_close(enc(src, pos, shapes, start, ratios), expected)


def test_padding_invariance():
    """An image alone and padded with garbage inside a batch of 2 gives the same valid memory."""
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=2, d_model=C, n_heads=4, dim_feedforward=64).double().eval()
    for layer in enc.layers:  # random offsets so samples reach the border of the valid area
        layer.self_attn.sampling_offsets.weight.data.normal_(0, 0.5)
        layer.self_attn.attention_weights.weight.data.normal_(0, 0.5)

    valid = [(5, 6), (3, 3), (2, 2), (1, 1)]
    padded = [(8, 10), (4, 5), (2, 3), (1, 2)]
    img = [torch.randn(1, C, h, w, generator=g, dtype=torch.float64) for h, w in valid]
    img_pos = [torch.randn(1, C, h, w, generator=g, dtype=torch.float64) for h, w in valid]
    other = [torch.randn(1, C, h, w, generator=g, dtype=torch.float64) for h, w in padded]
    other_pos = [torch.randn(1, C, h, w, generator=g, dtype=torch.float64) for h, w in padded]

    def run(maps, pos_maps, ratios, masks):
        src, shapes, start = _flatten_levels(maps)
        pos, _, _ = _flatten_levels(pos_maps)
        mask = None if masks is None else torch.cat([m.flatten(1) for m in masks], 1)
        return enc(src, pos, shapes, start, ratios, mask)

    alone = run(img, img_pos, torch.ones(1, 4, 2, dtype=torch.float64), None)
    other_alone = run(other, other_pos, torch.ones(1, 4, 2, dtype=torch.float64), None)

    img_p, masks = _pad_levels(img, padded, g)
    pos_p, _ = _pad_levels(img_pos, padded, g)
    ratios = torch.tensor([[w / wp, h / hp] for (h, w), (hp, wp) in zip(valid, padded)], dtype=torch.float64)
    batch = run(
        [torch.cat([a, b]) for a, b in zip(img_p, other)],
        [torch.cat([a, b]) for a, b in zip(pos_p, other_pos)],
        torch.stack([ratios, torch.ones_like(ratios)]),
        [torch.cat([m, torch.zeros_like(m)]) for m in masks],
    )
    idx = _valid_token_index(valid, padded)
    torch.testing.assert_close(batch[0, idx], alone[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(batch[1], other_alone[0], atol=1e-9, rtol=0)
    # the test can fail: without the padding mask the garbage leaks into valid tokens
    leaky = run(img_p, pos_p, ratios[None], None)
    assert not torch.allclose(leaky[0, idx], alone[0], atol=1e-3)


def test_dropout_only_in_training():
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    enc = DeformableEncoder(num_layers=1, d_model=C, n_heads=4, n_levels=1, dim_feedforward=16)
    src, shapes, start = _flatten_levels([torch.randn(1, C, 3, 3)])
    args = (src, torch.zeros_like(src), shapes, start, torch.ones(1, 1, 2))
    assert not torch.equal(enc.train()(*args), enc(*args))
    assert torch.equal(enc.eval()(*args), enc(*args))


def test_bad_input():
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    enc = DeformableEncoder(num_layers=1, d_model=C, n_heads=4, n_levels=1, dim_feedforward=16)
    src, shapes, start = _flatten_levels([torch.randn(1, C, 3, 3)])
    with pytest.raises(ValueError, match="src"):
        enc(src[..., :8], src[..., :8], shapes, start, torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="pos"):
        enc(src, src[:, :4], shapes, start, torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="valid_ratios"):
        enc(src, src, shapes, start, torch.ones(1, 2, 2))


def test_from_config():
    from detectron2.config import get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config
    from panoptic_segformer.modeling.encoder import DeformableEncoder

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS = 2
    enc = DeformableEncoder(cfg)
    assert len(enc.layers) == 2 and enc.layers[0].self_attn.n_levels == 4
