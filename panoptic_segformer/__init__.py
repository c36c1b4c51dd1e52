"""Panoptic SegFormer (Li et al., CVPR 2022) as a Detectron2 project."""
from .config import add_panoptic_segformer_config
from . import modeling  # noqa: F401  (registers the meta-arch and backbones)

__all__ = ["add_panoptic_segformer_config"]
