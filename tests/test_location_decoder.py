import math

import pytest
import torch

from conftest import requires_detectron2

pytestmark = requires_detectron2

C = 32  # small d_model; 4 heads


def _small(num_classes=3, num_queries=5, num_layers=3, n_levels=2, dtype=torch.float32):
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    torch.manual_seed(0)
    dec = LocationDecoder(num_classes, num_queries, num_layers, C, 4, n_levels, 4, 64).to(dtype)
    return dec.eval()


def _memory(sizes, batch=1, dtype=torch.float32, generator=None):
    shapes = torch.tensor(sizes, dtype=torch.long)
    n = shapes.prod(1)
    start = torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]])
    return torch.randn(batch, int(n.sum()), C, dtype=dtype, generator=generator), shapes, start


def test_parameter_counts():
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    dec = LocationDecoder(num_classes=80)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dec.layers[0]) == 1_020_544
    assert count(dec.layers) == 6_123_264
    assert count(dec.class_heads) == 123_360
    assert count(dec.box_heads) == 795_672
    assert tuple(dec.query_embedding.weight.shape) == (300, 512)
    assert count(dec.reference_points) == 514
    assert count(dec) == 6_123_264 + 123_360 + 795_672 + 153_600 + 514


def test_init():
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    torch.manual_seed(0)
    dec = LocationDecoder(num_classes=7, num_layers=3)
    prior = -math.log(99)
    for head in dec.class_heads:
        assert torch.allclose(head.bias, torch.full((7,), prior))
    for i, head in enumerate(dec.box_heads):
        assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
        assert torch.all(head[-1].weight == 0)
        expected = torch.tensor([0.0, 0.0, -2.0, -2.0]) if i == 0 else torch.zeros(4)
        assert torch.equal(head[-1].bias, expected)
    assert torch.all(dec.reference_points.bias == 0)
    bound = math.sqrt(6 / (256 + 2))  # Xavier-uniform of Linear(256, 2)
    assert dec.reference_points.weight.abs().max() <= bound
    # N(0, 1) query embedding
    assert abs(dec.query_embedding.weight.std().item() - 1) < 0.05
    for layer in dec.layers:
        assert torch.all(layer.cross_attn.attention_weights.weight == 0)
        assert torch.all(layer.cross_attn.sampling_offsets.weight == 0)
        assert layer.self_attn.dropout == 0.1
        assert [m.p for m in (layer.dropout1, layer.dropout2, layer.ffn.dropout1, layer.ffn.dropout2)] == [0.1] * 4


def test_inverse_sigmoid():
    from panoptic_segformer.modeling.location_decoder import inverse_sigmoid

    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0], dtype=torch.float64)
    big = math.log(1 / 1e-5)
    expected = torch.tensor([-big, -big, math.log(1 / 3), 0.0, big, big], dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x), expected)


def test_shapes_and_first_layer_boxes():
    """At init the first box head outputs (0, 0, -2, -2): box_0 = (ref_0, sigmoid(-2), sigmoid(-2))."""
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    torch.manual_seed(0)
    dec = LocationDecoder(
        num_classes=3, num_queries=5, num_layers=2, d_model=C, n_heads=4, n_levels=2, dim_feedforward=64
    ).eval()
    memory, shapes, start = _memory([(4, 6), (2, 3)], batch=2)
    out = dec(memory, shapes, start, torch.ones(2, 2, 2))
    assert out["pred_logits"].shape == (2, 2, 5, 3)
    assert out["pred_boxes"].shape == (2, 2, 5, 4)
    assert out["hidden"].shape == (2, 5, C)
    ref0 = dec.reference_points(dec.query_embedding.weight[:, :C]).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][0, :, :, :2], ref0.expand(2, -1, -1))
    torch.testing.assert_close(out["pred_boxes"][0, :, :, 2:], torch.full((2, 5, 2), 1 / (1 + math.exp(2))))
    # later heads start at zero too: boxes do not move after layer 0
    torch.testing.assert_close(out["pred_boxes"][1], out["pred_boxes"][0])
    # class logits of the last layer come from `hidden`
    torch.testing.assert_close(out["pred_logits"][-1], dec.class_heads[-1](out["hidden"]))


def test_box_refinement_refs_detached_and_4d():
    dec = _small(num_layers=3)
    for head in dec.box_heads:  # leave the zero init so the refinement is visible
        torch.nn.init.normal_(head[-1].weight, std=0.1)
    seen = []
    for layer in dec.layers:
        layer.cross_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
    memory, shapes, start = _memory([(4, 6), (2, 3)], batch=2)
    ratios = torch.tensor([[[1.0, 0.5], [1.0, 0.5]], [[0.75, 1.0], [2 / 3, 1.0]]])
    out = dec(memory, shapes, start, ratios)
    boxes = out["pred_boxes"].detach()

    assert seen[0].shape == (2, 5, 2, 2)
    ref0 = dec.reference_points(dec.query_embedding.weight[:, :C]).sigmoid().detach()
    torch.testing.assert_close(seen[0], ref0[None, :, None] * ratios[:, None])
    for lvl in (1, 2):
        assert seen[lvl].shape == (2, 5, 2, 4)
        expected = boxes[lvl - 1][:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
        torch.testing.assert_close(seen[lvl], expected)

    # box_l = sigmoid(delta_l + inverse_sigmoid(box_{l-1})), all four coordinates
    from panoptic_segformer.modeling.location_decoder import inverse_sigmoid

    # layer 2 box from its head on layer-2 hidden state (= `hidden`, the last layer)
    delta = dec.box_heads[2](out["hidden"]).detach()
    torch.testing.assert_close(boxes[2], (delta + inverse_sigmoid(boxes[1])).sigmoid())

    # refs are detached: box head 0 gets gradient only from layer 0's boxes
    grads = torch.autograd.grad(
        out["pred_boxes"][1:].sum(), list(dec.box_heads[0].parameters()), allow_unused=True, retain_graph=True
    )
    assert all(g is None or torch.all(g == 0) for g in grads)
    grads = torch.autograd.grad(out["pred_boxes"][0].sum(), list(dec.box_heads[0].parameters()), retain_graph=True)
    assert any(torch.any(g != 0) for g in grads)
    # the initial refs are not detached: reference_points learns from layer 0
    grad = torch.autograd.grad(out["pred_boxes"][0].sum(), dec.reference_points.weight)[0]
    assert torch.any(grad != 0)


def test_padding_invariance():
    """Same logits/boxes/hidden for an image alone and padded with garbage in a batch of 2."""
    dec = _small(num_layers=2, dtype=torch.float64)
    for layer in dec.layers:
        layer.cross_attn.sampling_offsets.weight.data.normal_(0, 0.5)
        layer.cross_attn.attention_weights.weight.data.normal_(0, 0.5)
    for head in dec.box_heads:
        torch.nn.init.normal_(head[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    valid, padded = [(5, 6), (3, 3)], [(8, 10), (4, 5)]
    img = [torch.randn(C, h, w, generator=g, dtype=torch.float64) for h, w in valid]
    other, shapes, start = _memory(padded, dtype=torch.float64, generator=g)

    flat = torch.cat([m.flatten(1).T for m in img])
    alone = dec(flat[None], torch.tensor(valid), torch.tensor([0, 30]), torch.ones(1, 2, 2, dtype=torch.float64))
    other_alone = dec(other, shapes, start, torch.ones(1, 2, 2, dtype=torch.float64))

    big, masks = [], []
    for m, (hp, wp) in zip(img, padded):
        p = torch.randn(C, hp, wp, generator=g, dtype=torch.float64) * 100
        p[:, : m.shape[1], : m.shape[2]] = m
        mask = torch.ones(hp, wp, dtype=torch.bool)
        mask[: m.shape[1], : m.shape[2]] = False
        big.append(p.flatten(1).T)
        masks.append(mask.flatten())
    memory = torch.stack([torch.cat(big), other[0]])
    mask = torch.stack([torch.cat(masks), torch.zeros_like(torch.cat(masks))])
    ratios = torch.tensor([[w / wp, h / hp] for (h, w), (hp, wp) in zip(valid, padded)], dtype=torch.float64)
    batch = dec(memory, shapes, start, torch.stack([ratios, torch.ones_like(ratios)]), mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batch[key][:, 0], alone[key][:, 0], atol=1e-9, rtol=0)
        torch.testing.assert_close(batch[key][:, 1], other_alone[key][:, 0], atol=1e-9, rtol=0)
    torch.testing.assert_close(batch["hidden"], torch.cat([alone["hidden"], other_alone["hidden"]]), atol=1e-9, rtol=0)


def test_dropout_only_in_training():
    dec = _small(num_layers=1)
    memory, shapes, start = _memory([(3, 3), (2, 2)])
    args = (memory, shapes, start, torch.ones(1, 2, 2))
    assert torch.equal(dec(*args)["hidden"], dec(*args)["hidden"])
    dec.train()
    assert not torch.equal(dec(*args)["hidden"], dec(*args)["hidden"])


def test_bad_input():
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    dec = _small(num_layers=1)
    memory, shapes, start = _memory([(3, 3), (2, 2)])
    with pytest.raises(ValueError, match="memory"):
        dec(memory[..., :8], shapes, start, torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="valid_ratios"):
        dec(memory, shapes, start, torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match="num_classes"):
        LocationDecoder(0)


def test_from_config():
    from detectron2.config import get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config
    from panoptic_segformer.modeling.location_decoder import LocationDecoder

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES = 10
    cfg.MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS = 2
    dec = LocationDecoder(cfg, num_classes=5)
    assert dec.num_queries == 10 and len(dec.layers) == 2 and dec.class_heads[0].out_features == 5


def test_layer_order_and_query_roles():
    """Post-norm self-attn (q = k = content + pos, v = content) -> MSDA (query content + pos) -> FFN."""
    import torch.nn.functional as F

    dec = _small(num_layers=1)
    layer = dec.layers[0]
    for p in layer.cross_attn.parameters():
        p.data.normal_(0, 0.2)
    memory, shapes, start = _memory([(4, 6), (2, 3)], batch=2)
    g = torch.Generator().manual_seed(0)
    tgt, pos = torch.randn(2, 5, C, generator=g), torch.randn(2, 5, C, generator=g)
    ref = torch.rand(2, 5, 2, 4, generator=g)

    w_q, w_k, w_v = layer.self_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.self_attn.in_proj_bias.chunk(3)
    heads = lambda x: x.view(2, 5, 4, C // 4).transpose(1, 2)  # noqa: E731
    q, k, v = heads(F.linear(tgt + pos, w_q, b_q)), heads(F.linear(tgt + pos, w_k, b_k)), heads(F.linear(tgt, w_v, b_v))
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(C // 4)).softmax(-1) @ v
    x = tgt + layer.self_attn.out_proj(att.transpose(1, 2).reshape(2, 5, C))
    x = layer.norm1(x)
    x = layer.norm2(x + layer.cross_attn(x + pos, ref, memory, shapes, start, None))
    expected = layer.ffn.norm(x + layer.ffn.linear2(F.relu(layer.ffn.linear1(x))))
    torch.testing.assert_close(layer(tgt, pos, ref, memory, shapes, start, None), expected)
