"""Location decoder: Deformable-DETR decoder with iterative box refinement, its thing queries
and its per-layer class and box heads (SPEC §2, §3)."""

import math

import torch
from torch import nn

from detectron2.config import configurable

from ..layers import MSDeformAttn
from .feed_forward import PostNormFeedForward

__all__ = ["LocationDecoder", "LocationDecoderLayer", "inverse_sigmoid"]


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class LocationDecoderLayer(nn.Module):
    """Post-norm layer: self-attention -> LN -> MSDA cross-attention -> LN -> FFN -> LN.

    Self-attention uses q = k = content + pos and v = content, with dropout on the attention
    weights and on its output; MSDA is queried with content + pos.
    """

    def __init__(self, d_model=256, n_heads=8, n_levels=4, n_points=4, dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = PostNormFeedForward(d_model, dim_feedforward, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            tgt, query_pos: (B, Q, C) content and positional parts of the queries.
            reference_points: (B, Q, L, 2 or 4), already scaled to [0, 1] of each padded map.
            memory: (B, S, C).
        Returns:
            (B, Q, C).
        """
        q = tgt + query_pos
        attn = self.self_attn(q, q, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm2(tgt + self.dropout2(attn)))


def _box_head(d_model):
    return nn.Sequential(
        nn.Linear(d_model, d_model),
        nn.ReLU(),
        nn.Linear(d_model, d_model),
        nn.ReLU(),
        nn.Linear(d_model, 4),
    )


class LocationDecoder(nn.Module):
    """Thing queries through ``num_layers`` deformable decoder layers with box refinement.

    Layer l predicts ``box_l = sigmoid(box_heads[l](h_l) + inverse_sigmoid(ref_l))`` (only
    (cx, cy) get the offset while ``ref_0`` is 2-d) and ``ref_{l+1} = box_l.detach()``. Boxes
    are (cx, cy, w, h) normalised to the valid image; MSDA receives them times the valid ratios.

    Attributes:
        query_embedding: (num_queries, 2 * d_model); first half = query pos, second = content.
        reference_points: Linear(d_model, 2) giving the initial refs from the query pos.
    """

    @configurable
    def __init__(
        self,
        num_classes,
        num_queries=300,
        num_layers=6,
        d_model=256,
        n_heads=8,
        n_levels=4,
        n_points=4,
        dim_feedforward=1024,
        dropout=0.1,
    ):
        """
        Args:
            num_classes: thing classes K (sigmoid logits, no "no-object" class).
            num_queries: Q.
            num_layers: decoder layers; each has its own class and box head.
            d_model, n_heads, n_levels, n_points, dim_feedforward, dropout: as the encoder's.
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.d_model = d_model
        self.n_levels = n_levels
        self.query_embedding = nn.Embedding(num_queries, 2 * d_model)
        self.reference_points = nn.Linear(d_model, 2)
        self.layers = nn.ModuleList(
            LocationDecoderLayer(d_model, n_heads, n_levels, n_points, dim_feedforward, dropout)
            for _ in range(num_layers)
        )
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(_box_head(d_model) for _ in range(num_layers))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, num_classes):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "num_classes": num_classes,
            "num_queries": m.NUM_QUERIES,
            "num_layers": m.DEC_LAYERS,
            "d_model": m.HIDDEN_DIM,
            "n_heads": m.NHEADS,
            "n_levels": m.NUM_FEATURE_LEVELS,
            "n_points": m.DEC_N_POINTS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dropout": m.DROPOUT,
        }

    def reset_parameters(self):
        """SPEC §3 init: Xavier on the layers' matrices then MSDA init; Xavier + zero bias for
        ``reference_points``; N(0, 1) queries; prior-0.01 class bias; zero last box layer, and
        bias[2:] = -2 on the first box head only."""
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.layers.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.query_embedding.weight)
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_bias)
        for head in self.box_heads:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        nn.init.constant_(self.box_heads[0][-1].bias[2:], -2.0)

    def forward(self, memory, spatial_shapes, level_start_index, valid_ratios, padding_mask=None):
        """
        Args:
            memory: (B, S, C) encoder output.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64.
            valid_ratios: (B, L, 2) (valid_w / W_l, valid_h / H_l).
            padding_mask: (B, S) bool, True = padded token, or None.

        Returns:
            dict with
              pred_logits: (num_layers, B, Q, K) raw class logits,
              pred_boxes: (num_layers, B, Q, 4) sigmoid (cx, cy, w, h) of the valid image,
              hidden: (B, Q, C) output of the last layer.
        """
        if memory.dim() != 3 or memory.shape[-1] != self.d_model:
            raise ValueError(f"memory must be (B, S, {self.d_model}), got {tuple(memory.shape)}")
        b = memory.shape[0]
        if tuple(valid_ratios.shape) != (b, self.n_levels, 2):
            raise ValueError(f"valid_ratios must be (B={b}, L={self.n_levels}, 2), got {tuple(valid_ratios.shape)}")
        # reference points and boxes in float32 at least (also under autocast), as MSDA's locations
        coord_dtype = torch.promote_types(memory.dtype, torch.float32)
        valid_ratios = valid_ratios.to(coord_dtype)
        query_pos, tgt = self.query_embedding.weight.to(memory.dtype).split(self.d_model, -1)
        query_pos = query_pos.expand(b, -1, -1)
        tgt = tgt.expand(b, -1, -1)
        ref = self.reference_points(query_pos).to(coord_dtype).sigmoid()  # (B, Q, 2)
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)

        logits, boxes = [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            scale = valid_ratios if ref.shape[-1] == 2 else ratios4
            tgt = layer(
                tgt,
                query_pos,
                ref[:, :, None] * scale[:, None],
                memory,
                spatial_shapes,
                level_start_index,
                padding_mask,
            )
            delta = box_head(tgt)
            if ref.shape[-1] == 2:
                box = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()
            else:
                box = (delta + inverse_sigmoid(ref)).sigmoid()
            logits.append(class_head(tgt))
            boxes.append(box)
            ref = box.detach()
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes), "hidden": tgt}
