"""Backbones: timm PVTv2 / Swin wrapped as Detectron2 backbones (ResNet is Detectron2's own)."""
from .timm_backbone import TimmBackbone, build_timm_backbone, load_timm_checkpoint

__all__ = ["TimmBackbone", "build_timm_backbone", "load_timm_checkpoint"]
