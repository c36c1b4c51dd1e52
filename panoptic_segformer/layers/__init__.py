"""Layers: the multi-scale deformable attention op (compiled + PyTorch reference) and module."""
from .ms_deform_attn import compiled_available, ms_deform_attn, ms_deform_attn_pytorch
from .ms_deform_attn_module import MSDeformAttn

__all__ = ["MSDeformAttn", "compiled_available", "ms_deform_attn", "ms_deform_attn_pytorch"]
