"""Dataset mapper for COCO-format panoptic data (Detectron2 dicts with ``pan_seg_file_name``).

Training targets follow SPEC §5.0 and Appendix A:

* augmentation: the DETR recipe by default (``INPUT.DATASET_MAPPER_NAME = "panoptic_detr"``),
  large-scale jitter as an option (``"panoptic_lsj"``);
* every non-crowd segment becomes one target; crowd segments are dropped entirely (neither
  positive nor ignored);
* a segment whose mask has no pixel left after the transforms (e.g. cropped away) is dropped.
  The official code (mmdet 2.12, SPEC §10.16) keeps a segment while its clipped *box* is
  non-empty, even with an all-zero mask; we filter on the mask on purpose, so no positive ever
  has an empty mask target;
* thing boxes are recomputed from the transformed masks (SPEC Appendix A allows either).
"""
import copy
import logging
import math
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from .test_resize import build_test_augmentation

__all__ = [
    "RandomChoiceAugmentation",
    "build_detr_augmentation",
    "build_lsj_augmentation",
    "PanopticDatasetMapper",
    "read_image_file",
    "rgb2id",
]

logger = logging.getLogger(__name__)


class RandomChoiceAugmentation(T.Augmentation):
    """With probability ``prob`` apply the augmentations ``first`` in sequence, else ``second``.

    Each branch is an :class:`~detectron2.data.transforms.AugmentationList`, so a later
    augmentation of a branch sees the output of the earlier ones (needed by resize → crop →
    resize).
    """

    def __init__(self, first: List[T.Augmentation], second: List[T.Augmentation], prob: float = 0.5):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.first = T.AugmentationList(first)
        self.second = T.AugmentationList(second)
        self.prob = prob

    def __call__(self, aug_input) -> T.Transform:
        branch = self.first if self._rand_range() < self.prob else self.second
        return branch(aug_input)

    def __repr__(self):
        return f"RandomChoiceAugmentation(p={self.prob}: {self.first} | {self.second})"


def _flip_augmentation(cfg) -> List[T.Augmentation]:
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be none/horizontal/vertical, got {cfg.INPUT.RANDOM_FLIP!r}")
    return [T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                         vertical=cfg.INPUT.RANDOM_FLIP == "vertical")]


def build_detr_augmentation(cfg) -> List[T.Augmentation]:
    """DETR-style training augmentation (SPEC §7 / Appendix A).

    Flip, then with probability 0.5 either ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN)``
    or ``ResizeShortestEdge(DETR_CROP.PRE_RESIZE_SHORTEST, DETR_CROP.PRE_RESIZE_MAX)`` +
    ``RandomCrop("absolute_range", DETR_CROP.SIZE)`` + the same final resize. Without
    ``DETR_CROP.ENABLED`` it is flip + resize.
    """
    resize = T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    augs = _flip_augmentation(cfg)
    crop = cfg.INPUT.DETR_CROP
    if not crop.ENABLED:
        return augs + [resize]
    if len(crop.SIZE) != 2 or crop.SIZE[0] > crop.SIZE[1]:
        raise ValueError(f"INPUT.DETR_CROP.SIZE must be (min, max), got {crop.SIZE}")
    crop_branch = [
        T.ResizeShortestEdge(crop.PRE_RESIZE_SHORTEST, crop.PRE_RESIZE_MAX, "choice"),
        T.RandomCrop("absolute_range", tuple(crop.SIZE)),
        resize,
    ]
    return augs + [RandomChoiceAugmentation([resize], crop_branch, prob=0.5)]


def build_lsj_augmentation(cfg) -> List[T.Augmentation]:
    """Large-scale jitter: flip, ``ResizeScale(MIN_SCALE, MAX_SCALE)`` of an IMAGE_SIZE square,
    and a ``FixedSizeCrop`` to IMAGE_SIZE² (padding the image with 128 and the panoptic PNG with
    255, i.e. segment id 0xFFFFFF, which matches no segment)."""
    size = cfg.INPUT.LSJ.IMAGE_SIZE
    return _flip_augmentation(cfg) + [
        T.ResizeScale(cfg.INPUT.LSJ.MIN_SCALE, cfg.INPUT.LSJ.MAX_SCALE, size, size),
        T.FixedSizeCrop(crop_size=(size, size)),
    ]


MAPPER_AUGMENTATIONS: Dict[str, Callable] = {
    "panoptic_detr": build_detr_augmentation,
    "panoptic_lsj": build_lsj_augmentation,
}


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes of 16/32-bit gray images


def read_image_file(file_name: str, image_format: str, what: str = "image", max_size: int = 0) -> np.ndarray:
    """``detection_utils.read_image`` (EXIF orientation applied, converted to ``image_format``)
    with errors that name the file, and 16-bit gray images scaled to 8 bits (value / 257)
    instead of saturated by PIL's conversion. (PIL already reads 16-bit colour PNGs as 8-bit.)

    ``max_size > 0`` lets a JPEG decode at a reduced scale (1/2, 1/4 or 1/8) that stays at least
    as large as the image shrunk to a longer side of ``max_size``, so a caller that shrinks it
    anyway never holds the full-size pixels; other formats decode at full size.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: the file exists but cannot be decoded (corrupt or truncated).
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            scale = max_size / max(image.size) if max_size > 0 else 1.0
            if scale < 1.0:  # a no-op except for JPEG
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            image = ImageOps.exif_transpose(image)
            if image.mode in _HIGH_DEPTH_MODES:
                scaled = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
            return utils.convert_PIL_to_numpy(image, image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} file not found: {file_name}") from e
    except Exception as e:  # PIL raises several types for broken files
        raise OSError(f"cannot read {what} file {file_name}: {type(e).__name__}: {e}") from e


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 panoptic PNG → (h, w) int64 segment ids (COCO: R + 256 G + 256² B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class PanopticDatasetMapper:
    """Map a Detectron2 panoptic dataset dict to the model's input.

    Output dict (all input keys are passed through):

    * ``image``: uint8 tensor (3, h, w) in ``INPUT.FORMAT`` after the transforms;
    * ``instances`` (training only): ``Instances((h, w))`` with ``gt_classes`` (G,) int64
      contiguous ids, ``gt_masks`` (G, h, w) bool and ``gt_boxes`` (G, 4) ``Boxes`` xyxy from
      the masks; G may be 0 (image without non-crowd segments);
    * ``height``/``width``: the original image size.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List, image_format: str):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[PanopticDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if is_train:
            name = cfg.INPUT.DATASET_MAPPER_NAME
            if name not in MAPPER_AUGMENTATIONS:
                raise ValueError(
                    f"INPUT.DATASET_MAPPER_NAME={name!r} is not one of {sorted(MAPPER_AUGMENTATIONS)}"
                )
            augs = MAPPER_AUGMENTATIONS[name](cfg)
        else:
            augs = build_test_augmentation(cfg)
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_file(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:  # test time: image only, as detectron2's DatasetMapper
            return dataset_dict

        pan_file: Optional[str] = dataset_dict.get("pan_seg_file_name")
        if pan_file is None:
            raise ValueError(
                f"dataset dict of {dataset_dict['file_name']} has no 'pan_seg_file_name'; "
                "PanopticDatasetMapper needs COCO-format panoptic annotations"
            )
        pan_rgb = read_image_file(pan_file, "RGB", what="panoptic PNG")
        if pan_rgb.shape[:2] != (dataset_dict["height"], dataset_dict["width"]):
            raise ValueError(
                f"panoptic PNG {pan_file} has size {pan_rgb.shape[:2]} but image "
                f"{dataset_dict['file_name']} has size {(dataset_dict['height'], dataset_dict['width'])}"
            )
        pan = rgb2id(transforms.apply_segmentation(pan_rgb))

        segments = [s for s in dataset_dict["segments_info"] if not s.get("iscrowd", 0)]
        h, w = image.shape[:2]
        instances = Instances((h, w))
        if segments:
            seg_ids = torch.as_tensor([s["id"] for s in segments], dtype=torch.int64)
            masks = torch.from_numpy(pan)[None] == seg_ids[:, None, None]  # (G, h, w)
            keep = masks.flatten(1).any(1)
            classes = torch.as_tensor([s["category_id"] for s in segments], dtype=torch.int64)
            masks, classes = masks[keep], classes[keep]
        else:
            masks = torch.zeros((0, h, w), dtype=torch.bool)
            classes = torch.zeros((0,), dtype=torch.int64)
        instances.gt_classes = classes
        instances.gt_masks = masks
        instances.gt_boxes = BitMasks(masks).get_bounding_boxes() if len(masks) else Boxes(torch.zeros(0, 4))
        dataset_dict["instances"] = instances
        return dataset_dict
