"""Panoptic SegFormer (Li et al., CVPR 2022) as a Detectron2 project.

The deformable attention op (``panoptic_segformer.layers``) needs only PyTorch; everything else
needs Detectron2, so the config and the model registrations are imported only where it exists.
"""
import importlib.util

__all__ = []
if importlib.util.find_spec("detectron2") is not None:
    from . import modeling  # noqa: F401  (registers the meta-arch and the timm backbones)
    from .config import add_panoptic_segformer_config, get_panoptic_segformer_cfg

    __all__ = ["add_panoptic_segformer_config", "get_panoptic_segformer_cfg"]
