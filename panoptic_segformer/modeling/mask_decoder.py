"""Mask decoders: queries cross-attend to the 3 finest encoder levels and every attention
layer turns its pre-softmax logits into one mask per query (SPEC §4).

Module names follow the official ``MaskHead`` where they map one to one (``blocks.{i}.attn.
{q,k,v,proj}``, ``head_norm1/2``, ``norm3``, ``mlp.fc1/fc2``, ``self_attention.{qkv,proj}``).
The mask branch is renamed: official ``linear_l{l+1}.0`` = ``level_proj.{l}``, official
``linear.0`` = ``mask_proj``, and the official tail ``attnen`` = ``tail``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from .padding import edge_replicate_index

__all__ = ["MaskDecoder", "MaskDecoderBlock", "MaskAttention", "QuerySelfAttention"]


class _Geometry:
    """Per-forward constants shared by all layers of a mask decoder.

    Attributes:
        sizes: [(H_l, W_l)] of the padded levels, as Python ints.
        edge_index: per coarse level l >= 1, (B, H_l * W_l) int64 flat index that maps every
            position to itself inside the valid area and to the nearest valid row/column
            outside it (edge replication); None when nothing is padded.
        key_mask: (B, 1, S, 1) bool, True = padded memory token excluded from the softmax, or None.
        pad0: (B, 1, H_0, W_0) bool, True = padded position of the mask resolution, or None.
    """

    def __init__(self, sizes, edge_index, key_mask, pad0):
        self.sizes = sizes
        self.edge_index = edge_index
        self.key_mask = key_mask
        self.pad0 = pad0


def _safe_key_mask(mask):
    """(B, S) bool -> (B, S) with rows whose every key is padded left unmasked, so the softmax
    never divides by zero (their output is padding anyway)."""
    if mask is None:
        return None
    return mask & ~mask.all(-1, keepdim=True)


def _upsample(m, size):
    """Bilinear (align_corners=False) resize of (B, N, H, W) to ``size``; N = 0 is allowed."""
    if m.shape[1] == 0:  # F.interpolate rejects empty channels but accepts an empty batch
        return F.interpolate(m.reshape(0, 1, *m.shape[2:]), size=size, mode="bilinear", align_corners=False).view(
            m.shape[0], 0, *size
        )
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


class MaskAttention(nn.Module):
    """Multi-head cross-attention whose pre-softmax logits also give a mask per query.

    Mask branch, for the logits A = Q K^T / sqrt(C / heads) of each head, split by level: per level
    ``relu(Linear(heads -> heads))`` across heads, levels >= 1 upsampled to the first level's
    size (bilinear, align_corners=False), concatenated and reduced by
    ``relu(Linear(levels * heads -> 1))``. The final Linear is applied per level before the
    upsampling (both are linear, so this is the same map) so only one channel per query is
    upsampled. Padded rows/columns of coarse levels are replaced by the nearest valid ones
    before upsampling, so valid outputs never read padded tokens (deviation (g)); padded
    positions of the output are set to 0. With level sizes that are exact halvings of the
    first one (an image padded to a multiple of 32), an image gives the same masks alone
    and padded inside a batch.

    Logits are kept transposed, (B, heads, S, N), so each level is a contiguous block that the
    per-level Linear reads in place. The value sum is ``F.scaled_dot_product_attention`` with
    the key-padding mask: it recomputes Q K^T block by block (a few % more multiply-adds) instead
    of masking, normalising and transposing the materialised logits, which are memory-bound
    passes over (B, heads, S, N); on a CPU this halves the cost of the value path (0.4x in fp32, 0.6x in bf16 at R50 sizes).

    ``with_value=False`` gives the official ``AttentionTail``: only Q, K and the mask branch.
    """

    def __init__(self, d_model=256, n_heads=8, n_levels=3, with_value=True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.n_levels = n_levels
        self.scale = (d_model // n_heads) ** -0.5
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.with_value = with_value
        if with_value:
            self.v = nn.Linear(d_model, d_model)
            self.proj = nn.Linear(d_model, d_model)
        self.level_proj = nn.ModuleList(nn.Linear(n_heads, n_heads) for _ in range(n_levels))
        self.mask_proj = nn.Linear(n_levels * n_heads, 1)

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.n_heads, c // self.n_heads).transpose(1, 2)  # (B, heads, n, C/heads)

    def _mask(self, logits, geometry):
        """logits: (B, heads, S, N). Returns (B, N, H_0, W_0), zero at padded positions."""
        b, h, _, n = logits.shape
        out_size = geometry.sizes[0]
        w_out = self.mask_proj.weight.view(self.n_levels, 1, 1, h)  # slice l multiplies level l
        total, start = None, 0
        for lvl, proj in enumerate(self.level_proj):
            hl, wl = geometry.sizes[lvl]
            # (B, heads, H_l * W_l * N): a strided view of the level's rows, no copy
            a = logits[:, :, start : start + hl * wl].view(b, h, -1)
            start += hl * wl
            feat = torch.baddbmm(proj.bias.view(1, h, 1), proj.weight.expand(b, h, h), a).relu_()
            m = torch.matmul(w_out[lvl], feat).view(b, hl * wl, n)
            if lvl > 0 and geometry.edge_index is not None:
                m = m.gather(1, geometry.edge_index[lvl][:, :, None].expand(b, hl * wl, n))
            m = m.view(b, hl, wl, n).permute(0, 3, 1, 2)  # (B, N, H_l, W_l), channels-last
            if lvl > 0:
                m = _upsample(m, out_size)
            total = m if total is None else total + m
        mask = F.relu(total + self.mask_proj.bias)
        if geometry.pad0 is not None:
            mask = mask.masked_fill(geometry.pad0, 0.0)
        return mask.contiguous()

    def forward(self, query, memory, geometry):
        """
        Args:
            query: (B, N, C) queries (positional part already added).
            memory: (B, S, C) memory of the ``n_levels`` levels, finest first.
            geometry: :class:`_Geometry` of this forward.

        Returns:
            (attention output (B, N, C) or None for the tail, mask (B, N, H_0, W_0)).
        """
        q = self._heads(self.q(query) * self.scale)
        k = self._heads(self.k(memory))
        # transposed logits (B, heads, S, N): every level is one contiguous block per head
        logits = torch.matmul(k, q.transpose(-1, -2))
        mask = self._mask(logits, geometry)
        if not self.with_value:
            return None, mask
        keep = None if geometry.key_mask is None else ~geometry.key_mask.transpose(-1, -2)  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, self._heads(self.v(memory)), attn_mask=keep, scale=1.0)
        return self.proj(out.transpose(1, 2).flatten(2)), mask  # out: (B, heads, N, C / heads)


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among queries with one fused qkv projection."""

    def __init__(self, d_model=256, n_heads=8):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, key_mask=None):
        """x: (B, N, C); key_mask: (B, 1, 1, N) bool, True = padded query ignored as a key."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else ~key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MaskDecoderBlock(nn.Module):
    """Post-norm block: [self-attn -> LN3] -> mask cross-attn -> LN1 -> GELU MLP -> LN2."""

    def __init__(self, d_model=256, n_heads=8, n_levels=3, mlp_ratio=4, self_attn=False):
        super().__init__()
        self.self_attn = self_attn
        if self_attn:
            self.self_attention = QuerySelfAttention(d_model, n_heads)
            self.norm3 = nn.LayerNorm(d_model, eps=1e-6)
        self.attn = MaskAttention(d_model, n_heads, n_levels, with_value=True)
        self.head_norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.mlp = _Mlp(d_model, int(d_model * mlp_ratio))
        self.head_norm2 = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, query, memory, geometry, query_key_mask=None):
        """query: (B, N, C) with pos added; returns (query (B, N, C), mask (B, N, H_0, W_0))."""
        if self.self_attn:
            query = self.norm3(query + self.self_attention(query, query_key_mask))
        attn, mask = self.attn(query, memory, geometry)
        query = self.head_norm1(query + attn)
        query = self.head_norm2(query + self.mlp(query))
        return query, mask


class MaskDecoder(nn.Module):
    """``num_layers`` mask blocks and a Q/K-only tail whose mask is the final one.

    Things: 4 blocks, no self-attention, no query pos. Stuff: 6 blocks with self-attention,
    query pos added before every block and before the tail (into the residual stream).
    Padded memory tokens are excluded from the softmax (deviation (c)); padded queries are
    excluded as self-attention keys.
    """

    @configurable
    def __init__(self, num_layers, d_model=256, n_heads=8, self_attn=False, mlp_ratio=4, n_levels=3):
        """
        Args:
            num_layers: number of blocks (each gives one auxiliary mask).
            d_model: channels C.
            n_heads: attention heads.
            self_attn: add query self-attention to every block (stuff decoder).
            mlp_ratio: MLP hidden size / C.
            n_levels: memory levels used; the first (finest) sets the mask resolution.
        """
        super().__init__()
        self.d_model = d_model
        self.n_levels = n_levels
        self.blocks = nn.ModuleList(
            MaskDecoderBlock(d_model, n_heads, n_levels, mlp_ratio, self_attn) for _ in range(num_layers)
        )
        self.tail = MaskAttention(d_model, n_heads, n_levels, with_value=False)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, stuff):
        """``stuff``: build the stuff decoder (with self-attention) instead of the thing one."""
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "num_layers": m.STUFF_MASK_DECODER_LAYERS if stuff else m.THING_MASK_DECODER_LAYERS,
            "d_model": m.HIDDEN_DIM,
            "n_heads": m.NHEADS,
            "self_attn": stuff,
            "mlp_ratio": m.MASK_DECODER_MLP_RATIO,
            "n_levels": m.NUM_FEATURE_LEVELS - 1,
        }

    def reset_parameters(self):
        """Xavier-uniform on every matrix; biases and LayerNorms keep PyTorch's defaults."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _geometry(self, memory, spatial_shapes, valid_sizes, memory_padding_mask):
        b, s, _ = memory.shape
        # a tensor, or (H, W) pairs of ints (symbolic sizes under torch.export, no data read)
        sizes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
        if len(sizes) != self.n_levels or any(not isinstance(hw, (tuple, list)) or len(hw) != 2 for hw in sizes):
            raise ValueError(f"spatial_shapes must be ({self.n_levels}, 2), got {spatial_shapes!r}")
        sizes = [tuple(hw) for hw in sizes]
        if sum(hl * wl for hl, wl in sizes) != s:
            raise ValueError(f"memory has {s} tokens but spatial_shapes {sizes} give {sum(h * w for h, w in sizes)}")
        if memory_padding_mask is not None and (
            memory_padding_mask.dtype != torch.bool or tuple(memory_padding_mask.shape) != (b, s)
        ):
            raise ValueError(
                f"memory_padding_mask must be (B={b}, S={s}) bool, got "
                f"{tuple(memory_padding_mask.shape)} {memory_padding_mask.dtype}"
            )
        edge_index = None
        if valid_sizes is not None:
            if tuple(valid_sizes.shape) != (b, self.n_levels, 2):
                raise ValueError(f"valid_sizes must be (B={b}, {self.n_levels}, 2), got {tuple(valid_sizes.shape)}")
            valid_sizes = valid_sizes.to(memory.device)
            edge_index = [None] + [
                edge_replicate_index(valid_sizes[:, lvl], *sizes[lvl]) for lvl in range(1, self.n_levels)
            ]
        key_mask = pad0 = None
        if memory_padding_mask is not None:
            key_mask = _safe_key_mask(memory_padding_mask)[:, None, :, None]
            pad0 = memory_padding_mask[:, None, : sizes[0][0] * sizes[0][1]].view(b, 1, *sizes[0])
        return _Geometry(sizes, edge_index, key_mask, pad0)

    def forward(
        self,
        query,
        query_pos,
        memory,
        spatial_shapes,
        valid_sizes,
        memory_padding_mask=None,
        query_padding_mask=None,
    ):
        """
        Args:
            query: (B, N, C).
            query_pos: (B, N, C) or None.
            memory: (B, S, C) encoder memory of the ``n_levels`` finest levels, finest first.
            spatial_shapes: (n_levels, 2) int64 (H_l, W_l) of the padded levels, as a tensor or
                as a sequence of (H_l, W_l) ints.
            valid_sizes: (B, n_levels, 2) int64 valid (h, w) per level and image, or None
                (nothing padded).
            memory_padding_mask: (B, S) bool, True = padded token, or None.
            query_padding_mask: (B, N) bool, True = padded query (only used as self-attention
                keys), or None.

        Returns:
            dict with masks (B, N, H_0, W_0) from the tail, aux_masks: list of ``num_layers``
            (B, N, H_0, W_0) block masks, aux_queries: list of ``num_layers`` (B, N, C) block
            outputs. Masks are non-negative and unbounded (ReLU, no sigmoid), and exactly 0 at
            the padded positions of ``memory_padding_mask``'s first level.
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be (B, N, {self.d_model}), got {tuple(query.shape)}")
        if memory.dim() != 3 or memory.shape[-1] != self.d_model or memory.shape[0] != query.shape[0]:
            raise ValueError(f"memory must be (B={query.shape[0]}, S, {self.d_model}), got {tuple(memory.shape)}")
        if query_pos is not None and query_pos.shape != query.shape:
            raise ValueError(
                f"query_pos must have the shape of query {tuple(query.shape)}, got {tuple(query_pos.shape)}"
            )
        if query_padding_mask is not None and (
            query_padding_mask.dtype != torch.bool or tuple(query_padding_mask.shape) != tuple(query.shape[:2])
        ):
            raise ValueError(f"query_padding_mask must be (B, N) = {tuple(query.shape[:2])} bool")
        geometry = self._geometry(memory, spatial_shapes, valid_sizes, memory_padding_mask)
        query_key_mask = None if query_padding_mask is None else _safe_key_mask(query_padding_mask)[:, None, None, :]

        aux_masks, aux_queries = [], []
        for block in self.blocks:
            q_in = query if query_pos is None else query + query_pos
            query, mask = block(q_in, memory, geometry, query_key_mask)
            aux_masks.append(mask)
            aux_queries.append(query)
        q_in = query if query_pos is None else query + query_pos
        _, mask = self.tail(q_in, memory, geometry)
        return {"masks": mask, "aux_masks": aux_masks, "aux_queries": aux_queries}
