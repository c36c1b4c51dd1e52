"""Modeling: backbones, neck, transformer pieces, losses, merging and the meta-architecture.

Importing this package registers ``PanopticSegFormer`` in ``META_ARCH_REGISTRY`` and the timm
backbones in ``BACKBONE_REGISTRY``.
"""
from . import backbone  # noqa: F401  (registers build_timm_backbone)
from .head import PanopticSegFormerHead
from .merging import mask_wise_merging
from .meta_arch import PanopticSegFormer

__all__ = ["PanopticSegFormer", "PanopticSegFormerHead", "mask_wise_merging"]
