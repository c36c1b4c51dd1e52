"""Backbone pretraining on crops of the training set's things: a stand-in for ImageNet
pretraining where no weights can be downloaded (the quickstart).

Every Panoptic SegFormer recipe starts from an ImageNet-pretrained backbone. Trained from random
init, detection training teaches the backbone to find and outline objects, but only slowly to
tell them apart by shape: on the hard toy data the quickstart found 88 % of the things after
1200 iterations and named about a third of them, chance for 3 shapes
(``tools/diagnose_things.py``). A few minutes of plain image classification on the thing crops
of the training split (each ground-truth thing box with a margin, resized to a random size of
``sizes``, flipped at random) gives the backbone those features first. The result is a checkpoint
with ``backbone.*`` weights only, loaded as ``MODEL.WEIGHTS``; the rest of the model starts from
random init as before.
"""
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_backbone

from ..data.panoptic_dataset_mapper import read_image_file

__all__ = ["thing_crops", "pretrain_backbone"]

logger = logging.getLogger(__name__)


def thing_crops(dataset_dicts: Sequence[Dict], image_format: str, thing_ids: Sequence[int],
                margin: float = 0.25) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Crops of the non-crowd things of ``dataset_dicts`` (Detectron2 panoptic dicts).

    Args:
        thing_ids: the contiguous ids of the thing classes; crop k gets label
            ``thing_ids.index(category_id)``.
        margin: added on each side, as a fraction of the box's longer side.

    Returns:
        crops: (3, h, w) uint8 tensors in ``image_format``; labels: (N,) int64 in [0, K_th).
    """
    index = {c: i for i, c in enumerate(thing_ids)}
    crops, labels = [], []
    for d in dataset_dicts:
        things = [s for s in d["segments_info"] if s["category_id"] in index and not s.get("iscrowd", 0)]
        if not things:
            continue
        image = torch.from_numpy(np.array(read_image_file(d["file_name"], image_format))).permute(2, 0, 1)
        h, w = image.shape[1:]
        for s in things:
            x, y, bw, bh = s["bbox"]
            m = margin * max(bw, bh)
            x0, y0 = max(0, int(x - m)), max(0, int(y - m))
            x1, y1 = min(w, int(np.ceil(x + bw + m))), min(h, int(np.ceil(y + bh + m)))
            if x1 > x0 and y1 > y0:
                crops.append(image[:, y0:y1, x0:x1].clone())  # not a view: the image is freed
                labels.append(index[s["category_id"]])
    return crops, torch.tensor(labels, dtype=torch.int64)


class _CropClassifier(nn.Module):
    """The backbone, global average pooling of its coarsest map, a linear class head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.feature = max(shapes, key=lambda k: shapes[k].stride)
        self.head = nn.Linear(shapes[self.feature].channels, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[self.feature].mean((2, 3)))


def pretrain_backbone(cfg, dataset_name: Optional[str] = None, steps: int = 1000, batch_size: int = 32,
                      lr: float = 1e-3, sizes: Sequence[int] = (32, 48, 64), seed: int = 0,
                      log_period: int = 100) -> Dict[str, torch.Tensor]:
    """Train ``build_backbone(cfg)`` (every stage, whatever ``MODEL.BACKBONE.FREEZE_AT``) as a
    thing classifier on the crops of ``dataset_name`` (default ``DATASETS.TRAIN[0]``) with AdamW.

    Returns:
        the backbone state dict under ``backbone.`` keys, as a model checkpoint's "model".
    Raises:
        ValueError: bad ``steps`` / ``batch_size`` / ``sizes``, or a dataset without things.
    """
    if steps < 1 or batch_size < 1 or not sizes or min(sizes) < 32:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and sizes >= 32 px, got {steps}, {batch_size}, {list(sizes)}")
    name = dataset_name or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if not name:
        raise ValueError("no dataset: give dataset_name or set DATASETS.TRAIN")
    meta = MetadataCatalog.get(name)
    thing_ids = sorted(getattr(meta, "thing_dataset_id_to_contiguous_id", {}).values())
    crops, labels = thing_crops(DatasetCatalog.get(name), cfg.INPUT.FORMAT, thing_ids)
    if not crops:
        raise ValueError(f"dataset {name!r} has no thing segments to pretrain on")
    counts = labels.bincount(minlength=len(thing_ids)).tolist()
    logger.info(f"backbone pretraining on {len(crops)} thing crops of {name!r} (per class {counts}), {steps} steps of {batch_size}")

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _CropClassifier(build_backbone(cfg), len(thing_ids)).to(cfg.MODEL.DEVICE).train()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=cfg.MODEL.DEVICE).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=cfg.MODEL.DEVICE).view(3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start, seen, right = time.perf_counter(), 0, 0
    for step in range(1, steps + 1):
        size = int(rng.choice(sizes))
        idx = rng.integers(len(crops), size=batch_size)
        batch = torch.stack([
            F.interpolate(crops[i][None].float(), (size, size), mode="bilinear", align_corners=False)[0] for i in idx
        ]).to(cfg.MODEL.DEVICE)
        flip = torch.from_numpy(rng.random(batch_size) < 0.5).to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        target = labels[idx].to(batch.device)
        logits = model((batch - mean) / std)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += batch_size
        right += int((logits.argmax(1) == target).sum())
        if step % log_period == 0 or step == steps:
            logger.info(
                f"step {step}/{steps}  loss {loss.item():.3f}  train accuracy {right / seen:.1%} "
                f"(last {seen} crops)  {time.perf_counter() - start:.0f} s"
            )
            seen = right = 0
    return {f"backbone.{k}": v.detach().cpu() for k, v in model.backbone.state_dict().items()}
