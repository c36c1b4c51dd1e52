"""Renaming of the official Panoptic SegFormer checkpoints (mmdet 2.12 / mmcv 1.3.4 layout,
SPEC Appendix B) to the parameter names of :class:`PanopticSegFormer`.

Only names change; every tensor is copied as is (same shape, same layout). In particular both
query embeddings keep their halves: ``query_embedding`` is (pos | content) in both codes and
``stuff_query`` is (content | pos) in both codes (SPEC §10 item 14). Class order needs no
permutation with Detectron2's COCO panoptic metadata: both number the 80 thing classes, then the
53 stuff classes, in category-id order.

Official -> ours (``bbox_head.`` -> ``head.``):

==============================================================  ==============================================
``transformer.level_embeds``                                    ``level_embeds``
``transformer.reference_points``                                ``location_decoder.reference_points``
``query_embedding`` / ``cls_branches.i`` / ``reg_branches.i``   ``location_decoder.query_embedding`` /
                                                                ``.class_heads.i`` / ``.box_heads.i``
``stuff_query`` / ``cls_stuff_branches.i``                      ``stuff_queries`` / ``stuff_class_heads.i``
``transformer.encoder.layers.i.attentions.0``                   ``encoder.layers.i.self_attn``
``transformer.decoder.layers.i.attentions.0.attn``              ``location_decoder.layers.i.self_attn``
``transformer.decoder.layers.i.attentions.1``                   ``location_decoder.layers.i.cross_attn``
``...ffns.0.layers.0.0`` / ``...ffns.0.layers.1``               ``...ffn.linear1`` / ``...ffn.linear2``
``...norms.j`` (post-norms in operation order; the last one     ``...norm{j+1}``, last: ``...ffn.norm``
follows the FFN)
``things_mask_head`` / ``stuff_mask_head``                      ``thing_mask_decoder`` / ``stuff_mask_decoder``
``..._mask_head.attnen``                                        ``..._mask_decoder.tail``
``...attn.linear_l{l+1}.0`` / ``...attn.linear.0``              ``...attn.level_proj.{l}`` / ``...attn.mask_proj``
``reg_branches2.*``, ``cls_thing_branches.*``                   dropped (zero-weighted, deviation (a))
==============================================================  ==============================================

Neck: ``neck.{convs,extra_convs}.i.gn`` -> ``neck.{convs,extra_convs}.i.norm``.

ResNet (mmdet, torchvision naming) -> Detectron2 ``ResNet`` with FrozenBN: ``conv1`` / ``bn1`` ->
``stem.conv1`` / ``stem.conv1.norm``; ``layer{s}.b.conv{j}`` / ``bn{j}`` -> ``res{s+1}.b.conv{j}`` /
``conv{j}.norm``; ``downsample.0`` / ``downsample.1`` -> ``shortcut`` / ``shortcut.norm``;
``num_batches_tracked`` is dropped (FrozenBN keeps running_mean / running_var only).

PVTv2 / Swin backbones: the official keys go through timm's own ``checkpoint_filter_fn`` (as
:func:`~panoptic_segformer.modeling.backbone.timm_backbone.load_timm_checkpoint` does) into
``backbone.body``; the Swin output norms ``norm{i}`` become ``backbone.out_norms.{k}`` (k = position
of stage i in the output stages).
"""
import logging
import re
from typing import Dict, List, Optional, Tuple

import torch
from timm.models import swin_transformer as timm_swin
from torch import nn

from ..modeling.backbone.timm_backbone import _FAMILIES, TimmBackbone

__all__ = ["convert_official_state_dict", "compare_with_model", "DROPPED_PREFIXES"]

logger = logging.getLogger(__name__)

# heads the project does not build: their losses are weighted 0 and they are unused at test (deviation (a))
DROPPED_PREFIXES = ("bbox_head.reg_branches2.", "bbox_head.cls_thing_branches.")

_TRANSFORMER_LAYER = r"(?:encoder|location_decoder)\.layers\.\d+\."
_NUM_POST_NORMS = {"encoder": 2, "location_decoder": 3}

# applied in order, each to the result of the previous ones (keys without the "bbox_head." prefix)
_HEAD_RULES: List[Tuple[str, str]] = [
    (r"^transformer\.level_embeds$", "level_embeds"),
    (r"^transformer\.reference_points\.", "location_decoder.reference_points."),
    (r"^transformer\.encoder\.", "encoder."),
    (r"^transformer\.decoder\.", "location_decoder."),
    (r"^query_embedding\.", "location_decoder.query_embedding."),
    (r"^cls_branches\.", "location_decoder.class_heads."),
    (r"^reg_branches\.", "location_decoder.box_heads."),
    (r"^stuff_query\.", "stuff_queries."),
    (r"^cls_stuff_branches\.", "stuff_class_heads."),
    (rf"^({_TRANSFORMER_LAYER})attentions\.0\.attn\.", r"\1self_attn."),  # decoder: nn.MultiheadAttention
    (rf"^(encoder\.layers\.\d+\.)attentions\.0\.", r"\1self_attn."),  # encoder: MSDA
    (rf"^(location_decoder\.layers\.\d+\.)attentions\.1\.", r"\1cross_attn."),
    (rf"^({_TRANSFORMER_LAYER})ffns\.0\.layers\.0\.0\.", r"\1ffn.linear1."),
    (rf"^({_TRANSFORMER_LAYER})ffns\.0\.layers\.1\.", r"\1ffn.linear2."),
    (r"^things_mask_head\.", "thing_mask_decoder."),
    (r"^stuff_mask_head\.", "stuff_mask_decoder."),
    (r"^(\w+_mask_decoder\.)attnen\.", r"\1tail."),
    (r"^(\w+_mask_decoder\..*)\.linear\.0\.", r"\1.mask_proj."),
]

_RESNET_RULES: List[Tuple[str, str]] = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
]


def _apply(rules: List[Tuple[str, str]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _head_key(key: str) -> str:
    key = _apply(_HEAD_RULES, key)
    key = re.sub(r"\.linear_l(\d+)\.0\.", lambda m: f".level_proj.{int(m.group(1)) - 1}.", key)
    # mmcv post-norms are numbered in operation order; the last one closes the FFN
    m = re.match(r"^(encoder|location_decoder)(\.layers\.\d+\.)norms\.(\d+)\.(.*)$", key)
    if m:
        stack, layer, j, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        norm = "ffn.norm" if j == _NUM_POST_NORMS[stack] - 1 else f"norm{j + 1}"
        key = f"{stack}{layer}{norm}.{rest}"
    return "head." + key


def _resnet_key(key: str) -> str:
    key = re.sub(r"^layer(\d+)\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    return "backbone." + _apply(_RESNET_RULES, key)


def _convert_timm_backbone(state: Dict[str, torch.Tensor], backbone: TimmBackbone) -> Dict[str, torch.Tensor]:
    """Official PVTv2 / Swin keys (without ``backbone.``) -> ``backbone.body.*`` / ``backbone.out_norms.*``."""
    out = {}
    if isinstance(backbone.body, timm_swin.SwinTransformer):
        for k in [k for k in state if re.match(r"^norm\d+\.", k)]:
            stage = int(re.match(r"^norm(\d+)\.", k).group(1))
            if stage not in backbone.out_indices:
                raise ValueError(f"official Swin output norm {k!r} is for stage {stage}, "
                                 f"but the model outputs stages {backbone.out_indices}")
            out[f"backbone.out_norms.{backbone.out_indices.index(stage)}.{k.split('.', 1)[1]}"] = state.pop(k)
    state = _FAMILIES[type(backbone.body)].checkpoint_filter_fn(state, backbone.body)
    out.update({f"backbone.body.{k}": v for k, v in state.items()})
    return out


def convert_official_state_dict(
    state_dict: Dict[str, torch.Tensor], timm_backbone: Optional[TimmBackbone] = None
) -> Dict[str, torch.Tensor]:
    """Rename an official Panoptic SegFormer state dict (``backbone.``, ``neck.``, ``bbox_head.``)
    to this project's names.

    Args:
        state_dict: the ``state_dict`` entry of an official checkpoint.
        timm_backbone: the model's :class:`TimmBackbone`, required when the checkpoint's backbone
            is not a ResNet (PVTv2 / Swin go through timm's checkpoint filter, which needs it).

    Returns:
        the renamed state dict. The zero-weighted heads and ``num_batches_tracked`` are dropped
        (logged); keys outside ``backbone.`` / ``neck.`` / ``bbox_head.`` are kept unchanged so
        that :func:`compare_with_model` reports them as unexpected.
    """
    out: Dict[str, torch.Tensor] = {}
    dropped = {k for k in state_dict if k.startswith(DROPPED_PREFIXES)}
    if dropped:
        logger.info(
            f"dropping {len(dropped)} tensors of the zero-weighted heads reg_branches2 / cls_thing_branches "
            "(not built by this project, deviation (a))"
        )
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    is_resnet = any(k.startswith("layer1.") for k in backbone)
    if backbone and not is_resnet:
        if timm_backbone is None:
            raise ValueError("the checkpoint's backbone is not a ResNet (no backbone.layer1.*): converting a "
                             "PVTv2 / Swin backbone needs the model's TimmBackbone (timm_backbone=...)")
        out.update(_convert_timm_backbone(backbone, timm_backbone))
    n_tracked = 0
    for k, v in state_dict.items():
        if k in dropped:
            continue
        if k.endswith(".num_batches_tracked"):
            n_tracked += 1
        elif k.startswith("backbone."):
            if is_resnet:
                out[_resnet_key(k[len("backbone."):])] = v
        elif k.startswith("neck."):
            out[re.sub(r"\.gn\.", ".norm.", k)] = v
        elif k.startswith("bbox_head."):
            out[_head_key(k[len("bbox_head."):])] = v
        else:
            out[k] = v
    if n_tracked:
        logger.info(f"dropping {n_tracked} BatchNorm num_batches_tracked counters (FrozenBN has none)")
    return out


def compare_with_model(state_dict: Dict[str, torch.Tensor], model: nn.Module):
    """Check a converted state dict against ``model.state_dict()``.

    Returns:
        (missing, unexpected, mismatched): model keys absent from ``state_dict``; keys of
        ``state_dict`` that the model lacks; and ``(key, checkpoint shape, model shape)`` for
        keys whose shapes differ. All sorted.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    return missing, unexpected, mismatched
