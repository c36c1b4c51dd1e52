"""Data: panoptic dataset registration, the toy dataset, the mapper and the test-time resize.

Importing this package registers

* ``toy_panoptic_train`` / ``toy_panoptic_val``, generated into ``$PSF_TOY_ROOT`` or
  ``~/.cache/panoptic_segformer/toy`` on first load, and ``toy_hard_panoptic_train`` /
  ``toy_hard_panoptic_val``, its hard style (toy_hard.py);
* ``coco_panoptic_sample`` (2 COCO val2017 images) when the folder ``$PSF_COCO_SAMPLE`` (default
  ``../shared/data/coco_panoptic_sample`` beside the repository) exists;

and makes Detectron2's builtin ``coco_*_panoptic`` datasets load with the project's loader
(errors that name the file, segment and category id). ``register_datasets_from_cfg`` registers the
datasets given by paths in ``DATASETS.COCO_PANOPTIC`` (``train_net.py --dataset``).
"""
import os
from .datasets import (
    adopt_coco_panoptic_datasets,
    load_panoptic_json,
    panoptic_metadata_from_categories,
    register_coco_panoptic_sample,
    register_panoptic_dataset,
)
from .datasets_from_paths import (
    PanopticDatasetSpec,
    parse_dataset_spec,
    register_dataset_spec,
    register_datasets_from_cfg,
)
from .panoptic_dataset_mapper import (
    PanopticDatasetMapper,
    RandomChoiceAugmentation,
    build_detr_augmentation,
    build_lsj_augmentation,
)
from .test_resize import CV2ResizeTransform, MMCVRescale, build_test_augmentation, build_test_resize
from .toy_dataset import TOY_CATEGORIES, default_toy_root, register_toy_panoptic

register_toy_panoptic()
register_toy_panoptic(prefix="toy_hard_panoptic", style="hard")
adopt_coco_panoptic_datasets()
_COCO_SAMPLE = os.environ.get(
    "PSF_COCO_SAMPLE",
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "coco_panoptic_sample"),
)
if os.path.isdir(_COCO_SAMPLE):
    register_coco_panoptic_sample(os.path.normpath(_COCO_SAMPLE))

__all__ = [
    "CV2ResizeTransform",
    "MMCVRescale",
    "PanopticDatasetMapper",
    "PanopticDatasetSpec",
    "adopt_coco_panoptic_datasets",
    "RandomChoiceAugmentation",
    "TOY_CATEGORIES",
    "build_detr_augmentation",
    "build_lsj_augmentation",
    "build_test_augmentation",
    "build_test_resize",
    "default_toy_root",
    "load_panoptic_json",
    "panoptic_metadata_from_categories",
    "parse_dataset_spec",
    "register_coco_panoptic_sample",
    "register_dataset_spec",
    "register_datasets_from_cfg",
    "register_panoptic_dataset",
    "register_toy_panoptic",
]
