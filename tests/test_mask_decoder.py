import math

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_detectron2

pytestmark = requires_detectron2

C, HEADS = 32, 4


def _decoder(num_layers=2, self_attn=False, dtype=torch.float64):
    from panoptic_segformer.modeling.mask_decoder import MaskDecoder

    torch.manual_seed(0)
    return MaskDecoder(num_layers, d_model=C, n_heads=HEADS, self_attn=self_attn).to(dtype)


# ----------------------------------------------------------------------------------------------
# Hand-written reference in the layout of the official code: heads-last logits, per-level
# Linear+ReLU on 8 channels, upsample all channels, concatenate, Linear(3h -> 1)+ReLU, plain
# softmax over every token. Unpadded inputs only.
def _ref_attention(mod, query, memory, sizes, with_value):
    b, n, c = query.shape
    h = mod.n_heads
    split = lambda x: x.view(b, -1, h, c // h).transpose(1, 2)  # noqa: E731
    logits = (split(mod.q(query)) @ split(mod.k(memory)).transpose(-1, -2)) * (c // h) ** -0.5
    a = logits.permute(0, 2, 3, 1)  # (B, N, S, h)
    feats, start = [], 0
    for lvl, (hl, wl) in enumerate(sizes):
        f = F.relu(F.linear(a[:, :, start : start + hl * wl], mod.level_proj[lvl].weight, mod.level_proj[lvl].bias))
        start += hl * wl
        if lvl > 0:
            f = f.permute(0, 1, 3, 2).reshape(b * n, h, hl, wl)
            f = F.interpolate(f, size=sizes[0], mode="bilinear", align_corners=False)
            f = f.permute(0, 2, 3, 1).reshape(b, n, -1, h)
        feats.append(f)
    mask = F.relu(F.linear(torch.cat(feats, -1), mod.mask_proj.weight, mod.mask_proj.bias)).view(b, n, *sizes[0])
    if not with_value:
        return None, mask
    out = (logits.softmax(-1) @ split(mod.v(memory))).transpose(1, 2).reshape(b, n, c)
    return mod.proj(out), mask


def _ref_decoder(dec, query, pos, memory, sizes):
    masks, queries = [], []
    for blk in dec.blocks:
        x = query if pos is None else query + pos
        if blk.self_attn:
            b, n, c = x.shape
            qkv = blk.self_attention.qkv(x).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
            att = ((qkv[0] @ qkv[1].transpose(-1, -2)) * (c // HEADS) ** -0.5).softmax(-1) @ qkv[2]
            x = F.layer_norm(
                x + blk.self_attention.proj(att.transpose(1, 2).reshape(b, n, c)),
                (c,),
                blk.norm3.weight,
                blk.norm3.bias,
                1e-6,
            )
        out, mask = _ref_attention(blk.attn, x, memory, sizes, True)
        x = F.layer_norm(x + out, (C,), blk.head_norm1.weight, blk.head_norm1.bias, 1e-6)
        mlp = blk.mlp.fc2(F.gelu(blk.mlp.fc1(x)))
        query = F.layer_norm(x + mlp, (C,), blk.head_norm2.weight, blk.head_norm2.bias, 1e-6)
        masks.append(mask)
        queries.append(query)
    _, final = _ref_attention(dec.tail, query if pos is None else query + pos, memory, sizes, False)
    return final, masks, queries


def _inputs(sizes, b=2, n=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in sizes)
    return (
        torch.randn(b, n, C, generator=g, dtype=dtype),
        torch.randn(b, n, C, generator=g, dtype=dtype),
        torch.randn(b, s, C, generator=g, dtype=dtype),
        torch.tensor(sizes, dtype=torch.long),
    )


# ----------------------------------------------------------------------------------------------
def test_parameter_counts():
    from panoptic_segformer.modeling.mask_decoder import MaskDecoder

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    things = MaskDecoder(4)
    stuff = MaskDecoder(6, self_attn=True)
    assert count(things.blocks[0]) == 790_001
    assert count(things.tail) == 131_825
    assert count(things) == 3_291_829
    assert count(stuff.blocks[0]) == 1_053_681
    assert count(stuff) == 6_453_911


def test_init():
    from panoptic_segformer.modeling.mask_decoder import MaskDecoder

    torch.manual_seed(0)
    dec = MaskDecoder(1, self_attn=True)
    for name, p in dec.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape
            assert p.abs().max() <= math.sqrt(6 / (fan_in + fan_out)), name
    # biases keep PyTorch's default (non-zero) init; qkv have biases
    blk = dec.blocks[0]
    for lin in (blk.attn.q, blk.attn.k, blk.attn.v, blk.self_attention.qkv, dec.tail.q):
        assert lin.bias is not None and torch.any(lin.bias != 0)
    assert all(m.eps == 1e-6 for m in dec.modules() if isinstance(m, torch.nn.LayerNorm))
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.fc1.out_features == 4 * 256


@pytest.mark.parametrize("self_attn", [False, True])
@pytest.mark.parametrize("sizes", [[(6, 8), (3, 4), (2, 2)], [(7, 5), (4, 3), (2, 2)]])
def test_matches_reference(self_attn, sizes):
    dec = _decoder(num_layers=2, self_attn=self_attn)
    query, pos, memory, shapes = _inputs(sizes)
    pos = pos if self_attn else None
    final, masks, queries = _ref_decoder(dec, query, pos, memory, sizes)
    out = dec(
        query, pos, memory, shapes, shapes[None].expand(2, 3, 2), torch.zeros(2, memory.shape[1], dtype=torch.bool)
    )
    assert out["masks"].shape == (2, 5, *sizes[0])
    torch.testing.assert_close(out["masks"], final, atol=1e-10, rtol=1e-10)
    assert len(out["aux_masks"]) == len(out["aux_queries"]) == 2
    for got, exp in zip(out["aux_masks"] + out["aux_queries"], masks + queries):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)
    # without masks / valid sizes (the official call) the result is the same
    torch.testing.assert_close(dec(query, pos, memory, shapes, None)["masks"], final, atol=1e-10, rtol=1e-10)
    assert torch.all(final >= 0) and torch.any(final > 0)


def _pad(memory, valid, padded, g):
    """(1, S_valid, C) memory of `valid` level sizes -> (1, S_padded, C) with garbage + mask."""
    parts, masks, start = [], [], 0
    for (h, w), (hp, wp) in zip(valid, padded):
        lvl = memory[0, start : start + h * w].T.reshape(C, h, w)
        start += h * w
        big = torch.randn(C, hp, wp, generator=g, dtype=memory.dtype) * 100
        big[:, :h, :w] = lvl
        m = torch.ones(hp, wp, dtype=torch.bool)
        m[:h, :w] = False
        parts.append(big.flatten(1).T)
        masks.append(m.flatten())
    return torch.cat(parts)[None], torch.cat(masks)[None]


@pytest.mark.parametrize("self_attn", [False, True])
def test_padding_invariance(self_attn):
    """An image alone equals the same image padded with garbage in a batch of 2 (valid area),
    including padded queries with garbage (excluded as self-attention keys)."""
    dec = _decoder(num_layers=2, self_attn=self_attn)
    g = torch.Generator().manual_seed(3)
    # padded level sizes are exact halvings (size divisibility 32 on the image), like the alone ones
    valid, padded = [(8, 12), (4, 6), (2, 3)], [(12, 16), (6, 8), (3, 4)]
    query, pos, memory, _ = _inputs(valid, b=1, n=3, seed=1)
    pos = pos if self_attn else None
    other_q, other_pos, other_mem, shapes = _inputs(padded, b=1, n=5, seed=2)
    other_pos = other_pos if self_attn else None
    alone = dec(query, pos, memory, torch.tensor(valid), None)
    other_alone = dec(other_q, other_pos, other_mem, shapes, None)

    mem_p, mask_p = _pad(memory, valid, padded, g)
    q_p = torch.cat([query, 100 * torch.randn(1, 2, C, generator=g, dtype=query.dtype)], 1)
    batch_pos = None if pos is None else torch.cat([torch.cat([pos, torch.randn_like(pos[:, :2])], 1), other_pos])
    query_pad = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    valid_sizes = torch.tensor([valid, padded])
    args = (torch.cat([q_p, other_q]), batch_pos, torch.cat([mem_p, other_mem]), shapes)
    kwargs = dict(memory_padding_mask=torch.cat([mask_p, torch.zeros_like(mask_p)]), query_padding_mask=query_pad)
    batch = dec(*args, valid_sizes, **kwargs)

    h0, w0 = valid[0]
    torch.testing.assert_close(batch["masks"][0, :3, :h0, :w0], alone["masks"][0], atol=1e-10, rtol=0)
    torch.testing.assert_close(batch["masks"][1], other_alone["masks"][0], atol=1e-10, rtol=0)
    pad0 = torch.ones(padded[0], dtype=torch.bool)
    pad0[:h0, :w0] = False
    assert torch.all(batch["masks"][0][:, pad0] == 0) and torch.all(batch["aux_masks"][0][0][:, pad0] == 0)
    for j in range(2):
        torch.testing.assert_close(batch["aux_masks"][j][0, :3, :h0, :w0], alone["aux_masks"][j][0], atol=1e-10, rtol=0)
        torch.testing.assert_close(batch["aux_queries"][j][0, :3], alone["aux_queries"][j][0], atol=1e-10, rtol=0)
        torch.testing.assert_close(batch["aux_queries"][j][1], other_alone["aux_queries"][j][0], atol=1e-10, rtol=0)

    # the test can fail: without edge replication of coarse levels the border reads garbage
    leaky = dec(*args, None, **kwargs)
    assert not torch.allclose(leaky["masks"][0, :3, :h0, :w0], alone["masks"][0], atol=1e-3)


def test_padded_memory_excluded_from_softmax():
    dec = _decoder(num_layers=1)
    query, _, memory, shapes = _inputs([(4, 4), (2, 2), (1, 1)], b=1)
    mask = torch.zeros(1, memory.shape[1], dtype=torch.bool)
    mask[0, -5:] = True  # the whole level 1 and 2 (edge replication keeps them out of the mask too)
    out = dec(query, None, memory, shapes, torch.tensor([[[4, 4], [0, 0], [0, 0]]]), mask)
    changed = memory.clone()
    changed[0, -5:] = 1e3
    out2 = dec(query, None, changed, shapes, torch.tensor([[[4, 4], [0, 0], [0, 0]]]), mask)
    torch.testing.assert_close(out["aux_queries"][0], out2["aux_queries"][0], atol=1e-10, rtol=0)
    assert not torch.allclose(dec(query, None, changed, shapes, None)["aux_queries"][0], out["aux_queries"][0])


def test_fully_padded_rows_stay_finite_and_gradients_flow():
    dec = _decoder(num_layers=1, self_attn=True, dtype=torch.float32)
    query, pos, memory, shapes = _inputs([(4, 4), (2, 2), (1, 1)], dtype=torch.float32)
    query.requires_grad_(True)
    memory.requires_grad_(True)
    mem_mask = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    mem_mask[1] = True
    q_mask = torch.zeros(2, 5, dtype=torch.bool)
    q_mask[1] = True
    valid_sizes = torch.tensor([[[4, 4], [2, 2], [1, 1]], [[0, 0], [0, 0], [0, 0]]])
    out = dec(query, pos, memory, shapes, valid_sizes, mem_mask, q_mask)
    loss = out["masks"].sum() + sum(m.sum() for m in out["aux_masks"]) + out["aux_queries"][-1].sum()
    loss.backward()
    assert torch.isfinite(loss)
    # nothing is detached: the mask losses reach the queries and the memory
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
    assert torch.isfinite(memory.grad).all() and memory.grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in dec.parameters())


def test_bad_input():
    dec = _decoder(num_layers=1)
    query, _, memory, shapes = _inputs([(4, 4), (2, 2), (1, 1)])
    with pytest.raises(ValueError, match="tokens"):
        dec(query, None, memory[:, :-1], shapes, None)
    with pytest.raises(ValueError, match="spatial_shapes"):
        dec(query, None, memory, shapes[:2], None)
    with pytest.raises(ValueError, match="valid_sizes"):
        dec(query, None, memory, shapes, torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_padding_mask"):
        dec(query, None, memory, shapes, None, torch.zeros(2, memory.shape[1]))
    with pytest.raises(ValueError, match="query_pos"):
        dec(query, query[:, :2], memory, shapes, None)
    with pytest.raises(ValueError, match="query must"):
        dec(query[..., :8], None, memory, shapes, None)
    with pytest.raises(ValueError, match="query_padding_mask"):
        dec(query, None, memory, shapes, None, None, torch.zeros(2, 4, dtype=torch.bool))


def test_from_config():
    from detectron2.config import get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config
    from panoptic_segformer.modeling.mask_decoder import MaskDecoder

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    things, stuff = MaskDecoder(cfg, stuff=False), MaskDecoder(cfg, stuff=True)
    assert len(things.blocks) == 4 and not things.blocks[0].self_attn and things.n_levels == 3
    assert len(stuff.blocks) == 6 and stuff.blocks[0].self_attn


@pytest.mark.parametrize("self_attn", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_no_queries(self_attn, padded):
    """A batch without queries gives empty (B, 0, H_0, W_0) masks and still a (zero) gradient
    everywhere, with and without padding (edge replication gathers an empty channel dim)."""
    dec = _decoder(num_layers=2, self_attn=self_attn, dtype=torch.float32).train()
    _, _, memory, shapes = _inputs([(4, 4), (2, 2), (1, 1)], dtype=torch.float32)
    valid_sizes, mem_mask, q_mask = shapes[None].expand(2, 3, 2), None, None
    if padded:
        valid_sizes = torch.tensor([[[4, 4], [2, 2], [1, 1]], [[3, 2], [2, 1], [1, 1]]])
        mem_mask = torch.zeros(2, memory.shape[1], dtype=torch.bool)
        mem_mask[1, :16] = ((torch.arange(4)[:, None] >= 3) | (torch.arange(4)[None, :] >= 2)).flatten()
        q_mask = torch.zeros(2, 0, dtype=torch.bool)
    pos = torch.zeros(2, 0, C) if self_attn else None
    out = dec(torch.zeros(2, 0, C), pos, memory, shapes, valid_sizes, mem_mask, q_mask)
    assert out["masks"].shape == (2, 0, 4, 4) and out["aux_queries"][0].shape == (2, 0, C)
    assert [tuple(m.shape) for m in out["aux_masks"]] == [(2, 0, 4, 4)] * 2
    (out["masks"].sum() + sum(m.sum() for m in out["aux_masks"])).backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in dec.parameters())
