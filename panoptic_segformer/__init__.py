"""Panoptic SegFormer (Li et al., CVPR 2022) as a Detectron2 project."""
from .config import add_panoptic_segformer_config

__all__ = ["add_panoptic_segformer_config"]
