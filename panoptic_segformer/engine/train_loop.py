"""Pieces of the training loop: data loaders, DDP wrapping and the (AMP) step loop."""
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer, create_ddp_model
from detectron2.utils import comm

from ..data import PanopticDatasetMapper
from .amp import AutocastTrainer, amp_dtype

__all__ = ["build_train_loader", "build_test_loader", "wrap_ddp", "build_train_loop"]


def build_train_loader(cfg):
    """Detectron2's train loader with :class:`PanopticDatasetMapper` (augmentation chosen by
    ``INPUT.DATASET_MAPPER_NAME``: "panoptic_detr" or "panoptic_lsj")."""
    return build_detection_train_loader(cfg, mapper=PanopticDatasetMapper(cfg, True))


def build_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader with :class:`PanopticDatasetMapper` in test mode: the image
    resized by :func:`~panoptic_segformer.data.build_test_augmentation` (the official resize
    under ``MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT``)."""
    return build_detection_test_loader(cfg, dataset_name, mapper=PanopticDatasetMapper(cfg, False))


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel when there are several processes, on CUDA (one device per
    process) or CPU (gloo; ``device_ids=None``). ``find_unused_parameters`` is on because a batch
    without any thing (or stuff) target leaves a mask decoder out of the loss."""
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).device.type == "cuda"
    return create_ddp_model(
        model,
        broadcast_buffers=False,
        device_ids=[comm.get_local_rank()] if on_cuda else None,
        find_unused_parameters=True,
    )


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """:class:`AutocastTrainer` in ``SOLVER.AMP.PRECISION`` when ``SOLVER.AMP.ENABLED``,
    otherwise Detectron2's ``SimpleTrainer``."""
    if cfg.SOLVER.AMP.ENABLED:
        return AutocastTrainer(
            model, data_loader, optimizer,
            device_type=torch.device(cfg.MODEL.DEVICE).type,
            precision=amp_dtype(cfg.SOLVER.AMP.PRECISION),
        )
    return SimpleTrainer(model, data_loader, optimizer)
