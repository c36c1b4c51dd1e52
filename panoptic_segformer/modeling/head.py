"""The Panoptic SegFormer head: encoder, location decoder, thing and stuff mask decoders.

The head starts after the neck. It takes the projected multi-level maps (strides 8/16/32/64)
with their padding masks, and exposes its stages as separate methods so that the meta-arch
can run the Hungarian matching between the location decoder and the thing mask decoder
(SPEC §5.2), and so that each stage can be timed from outside:

- :meth:`PanopticSegFormerHead.encode`: positional encoding + level embeddings, flattening, the
  deformable encoder (SPEC §1.3-1.4);
- :meth:`PanopticSegFormerHead.locate`: the location decoder (SPEC §3);
- :meth:`PanopticSegFormerHead.decode_masks`: the thing and stuff mask decoders on the memory of
  the 3 finest levels, without positional encoding (SPEC §4), plus the stuff presence logits.
"""
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable

from .encoder import DeformableEncoder
from .location_decoder import LocationDecoder
from .mask_decoder import MaskDecoder
from .position_encoding import PositionEmbeddingSine

__all__ = ["PanopticSegFormerHead"]

# the mask decoders read the strides 8/16/32 only (SPEC §4.1)
NUM_MASK_LEVELS = 3


class PanopticSegFormerHead(nn.Module):
    """Encoder, location decoder, thing/stuff mask decoders, stuff queries and presence heads.

    Shapes: B images, C = ``hidden_dim``, L = ``num_levels`` feature levels, S = sum_l H_l W_l
    tokens, Q = ``num_queries`` thing queries, K_th / K_st thing / stuff classes.
    """

    @configurable
    def __init__(
        self,
        *,
        num_thing_classes: int,
        num_stuff_classes: int,
        hidden_dim: int = 256,
        num_levels: int = 4,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        num_queries: int = 300,
        thing_mask_layers: int = 4,
        stuff_mask_layers: int = 6,
        mask_mlp_ratio: int = 4,
    ):
        super().__init__()
        if num_thing_classes < 1:
            raise ValueError(f"num_thing_classes must be >= 1, got {num_thing_classes}")
        if num_stuff_classes < 0:
            raise ValueError(f"num_stuff_classes must be >= 0, got {num_stuff_classes}")
        if num_levels < NUM_MASK_LEVELS:
            raise ValueError(f"num_levels must be >= {NUM_MASK_LEVELS} (mask decoders read 3 levels), got {num_levels}")
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (sine encoding of y and x), got {hidden_dim}")
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels

        self.level_embeds = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.position_encoding = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, normalize=True)
        self.encoder = DeformableEncoder(
            num_layers=enc_layers,
            d_model=hidden_dim,
            n_heads=nheads,
            n_levels=num_levels,
            n_points=enc_n_points,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        self.location_decoder = LocationDecoder(
            num_thing_classes,
            num_queries=num_queries,
            num_layers=dec_layers,
            d_model=hidden_dim,
            n_heads=nheads,
            n_levels=num_levels,
            n_points=dec_n_points,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        self.thing_mask_decoder = MaskDecoder(
            thing_mask_layers, d_model=hidden_dim, n_heads=nheads, self_attn=False,
            mlp_ratio=mask_mlp_ratio, n_levels=NUM_MASK_LEVELS,
        )
        if num_stuff_classes:  # a dataset without stuff classes has no stuff branch at all
            self.stuff_mask_decoder = MaskDecoder(
                stuff_mask_layers, d_model=hidden_dim, n_heads=nheads, self_attn=True,
                mlp_ratio=mask_mlp_ratio, n_levels=NUM_MASK_LEVELS,
            )
            # first half = content, second half = positional (the reverse of the thing queries, SPEC §2)
            self.stuff_queries = nn.Embedding(num_stuff_classes, 2 * hidden_dim)
            self.stuff_class_heads = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(stuff_mask_layers))
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.normal_(self.level_embeds)
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in self.stuff_class_heads if self.num_stuff_classes else ():
            nn.init.constant_(head.bias, prior_bias)

    @classmethod
    def from_config(cls, cfg, num_thing_classes: int, num_stuff_classes: int):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "num_thing_classes": num_thing_classes,
            "num_stuff_classes": num_stuff_classes,
            "hidden_dim": m.HIDDEN_DIM,
            "num_levels": m.NUM_FEATURE_LEVELS,
            "nheads": m.NHEADS,
            "enc_layers": m.ENC_LAYERS,
            "dec_layers": m.DEC_LAYERS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dropout": m.DROPOUT,
            "enc_n_points": m.ENC_N_POINTS,
            "dec_n_points": m.DEC_N_POINTS,
            "num_queries": m.NUM_QUERIES,
            "thing_mask_layers": m.THING_MASK_DECODER_LAYERS,
            "stuff_mask_layers": m.STUFF_MASK_DECODER_LAYERS,
            "mask_mlp_ratio": m.MASK_DECODER_MLP_RATIO,
        }

    def encode(self, features: List[torch.Tensor], masks: List[torch.Tensor], valid_sizes: torch.Tensor) -> Dict:
        """Flatten the levels and run the deformable encoder.

        Args:
            features: L maps (B, C, H_l, W_l), strides 8, 16, 32, 64.
            masks: L bool maps (B, H_l, W_l), True = padding.
            valid_sizes: (B, L, 2) int64 valid (h, w) of every image on every level.

        Returns:
            dict with memory (B, S, C), spatial_shapes (L, 2) int64 (H_l, W_l),
            level_start_index (L,) int64, valid_ratios (B, L, 2) float32 (w ratio, h ratio),
            padding_mask (B, S) bool, valid_sizes (B, L, 2), level_shapes (the L (H_l, W_l) as
            ints, symbolic under torch.export), num_mask_tokens (int, tokens of the 3 finest levels).
        """
        if len(features) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} feature maps and masks, got {len(features)} and {len(masks)}"
            )
        srcs, poses, pads = [], [], []
        for lvl, (x, m) in enumerate(zip(features, masks)):
            if x.shape[0] != m.shape[0] or x.shape[-2:] != m.shape[-2:]:
                raise ValueError(f"level {lvl}: feature {tuple(x.shape)} and mask {tuple(m.shape)} disagree")
            pos = self.position_encoding(m) + self.level_embeds[lvl].view(1, -1, 1, 1)  # (B, C, H_l, W_l)
            srcs.append(x.flatten(2).transpose(1, 2))
            # in the features' dtype (bf16 under autocast), so src + pos needs no cast in every layer
            poses.append(pos.to(x.dtype).flatten(2).transpose(1, 2))
            pads.append(m.flatten(1))
        src, pos, padding_mask = torch.cat(srcs, 1), torch.cat(poses, 1), torch.cat(pads, 1)
        shapes = [tuple(x.shape[-2:]) for x in features]
        # from scalars, not torch.as_tensor(shapes): under torch.export the sizes stay symbolic
        spatial_shapes = torch.stack(
            [torch.scalar_tensor(v, dtype=torch.long, device=src.device) for hw in shapes for v in hw]
        ).view(-1, 2)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_sizes = valid_sizes.to(src.device)
        # (B, L, 2): valid (w, h) over padded (W_l, H_l), float32 even under autocast
        valid_ratios = valid_sizes.flip(-1).float() / spatial_shapes.flip(-1).float()[None]
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask)
        return {
            "memory": memory,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
            "padding_mask": padding_mask,
            "valid_sizes": valid_sizes,
            "level_shapes": shapes,
            "num_mask_tokens": sum(h * w for h, w in shapes[:NUM_MASK_LEVELS]),
        }

    def locate(self, enc: Dict) -> Dict:
        """The location decoder on the memory of all levels.

        Returns:
            dict with pred_logits (Ld, B, Q, K_th), pred_boxes (Ld, B, Q, 4) normalised
            (cx, cy, w, h) of the valid image, hidden (B, Q, C) the last layer's output.
        """
        return self.location_decoder(
            enc["memory"], enc["spatial_shapes"], enc["level_start_index"], enc["valid_ratios"], enc["padding_mask"]
        )

    def decode_masks(self, thing_queries: torch.Tensor, thing_query_mask: Optional[torch.Tensor], enc: Dict) -> Dict:
        """The thing and stuff mask decoders on the memory of the 3 finest levels.

        Args:
            thing_queries: (B, N, C) location-decoder outputs of the selected thing queries
                (no positional embedding, SPEC §4.1).
            thing_query_mask: (B, N) bool, True = padded query row, or None.
            enc: the output of :meth:`encode`.

        Returns:
            dict with thing_out and stuff_out (the :class:`MaskDecoder` outputs: masks
            (B, N|K_st, H8, W8), aux_masks, aux_queries) and stuff_logits, a list of one
            (B, K_st) presence logit per stuff block (SPEC §4.5). Without stuff classes
            (K_st = 0) stuff_out is None and stuff_logits is empty.
        """
        n3 = enc["num_mask_tokens"]
        memory = enc["memory"][:, :n3]
        memory_padding_mask = enc["padding_mask"][:, :n3]
        spatial_shapes = enc["level_shapes"][:NUM_MASK_LEVELS]
        valid_sizes = enc["valid_sizes"][:, :NUM_MASK_LEVELS]
        thing_out = self.thing_mask_decoder(
            thing_queries, None, memory, spatial_shapes, valid_sizes, memory_padding_mask, thing_query_mask
        )
        if not self.num_stuff_classes:
            return {"thing_out": thing_out, "stuff_out": None, "stuff_logits": []}
        b = memory.shape[0]
        content, pos = self.stuff_queries.weight.unsqueeze(0).expand(b, -1, -1).split(self.hidden_dim, dim=-1)
        stuff_out = self.stuff_mask_decoder(
            content, pos, memory, spatial_shapes, valid_sizes, memory_padding_mask, None
        )
        stuff_logits = [
            head(q).squeeze(-1) for head, q in zip(self.stuff_class_heads, stuff_out["aux_queries"])
        ]
        return {"thing_out": thing_out, "stuff_out": stuff_out, "stuff_logits": stuff_logits}
