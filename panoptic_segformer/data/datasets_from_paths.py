"""COCO-format panoptic datasets given by paths in the config (``DATASETS.COCO_PANOPTIC``).

Each entry is ``"NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON"``; ``train_net.py --dataset`` appends
one. :func:`register_datasets_from_cfg` registers them (categories from the JSON) so that
``DATASETS.TRAIN``/``DATASETS.TEST`` can name them, without Python code.
"""
import json
import os
from typing import Dict, List, NamedTuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .datasets import register_panoptic_dataset

__all__ = ["PanopticDatasetSpec", "parse_dataset_spec", "register_dataset_spec", "register_datasets_from_cfg"]


class PanopticDatasetSpec(NamedTuple):
    """A dataset name and its absolute image folder, panoptic PNG folder and panoptic JSON."""

    name: str
    image_root: str
    panoptic_root: str
    panoptic_json: str


def parse_dataset_spec(spec: str) -> PanopticDatasetSpec:
    """Parse ``"NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON"`` and check that the paths exist.

    Raises:
        ValueError: not 4 non-empty fields separated by ``:``.
        FileNotFoundError: a folder or the JSON is missing (named in the message).
    """
    fields = spec.split(":")
    if len(fields) != 4 or not all(fields):
        raise ValueError(
            f"dataset spec {spec!r}: expected NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON "
            f"(4 non-empty fields separated by ':'), got {len(fields)} field(s)"
        )
    name, image_root, panoptic_root, panoptic_json = fields
    for what, path, check in (("image folder", image_root, os.path.isdir),
                              ("panoptic PNG folder", panoptic_root, os.path.isdir),
                              ("panoptic JSON", panoptic_json, os.path.isfile)):
        if not check(path):
            raise FileNotFoundError(f"dataset {name!r}: {what} not found: {path}")
    return PanopticDatasetSpec(name, *(os.path.abspath(p) for p in fields[1:]))


def register_dataset_spec(spec: PanopticDatasetSpec) -> None:
    """Register ``spec.name`` with the categories of its JSON (no-op if registered with the same paths).

    Raises:
        ValueError: the name is already registered with other paths (or by another source), or
            the JSON is not valid or has no usable ``categories`` (the message names the JSON).
    """
    if spec.name in DatasetCatalog.list():
        meta = MetadataCatalog.get(spec.name).as_dict()
        registered = tuple(os.path.abspath(meta[k]) if k in meta else None
                           for k in ("image_root", "panoptic_root", "panoptic_json"))
        if registered != tuple(spec[1:]):
            raise ValueError(
                f"dataset {spec.name!r} is already registered with image_root, panoptic_root, "
                f"panoptic_json = {registered}, not {tuple(spec[1:])}: choose another name"
            )
        return
    categories = _read_categories(spec)
    try:
        register_panoptic_dataset(
            spec.name, image_root=spec.image_root, panoptic_root=spec.panoptic_root,
            panoptic_json=spec.panoptic_json, categories=categories,
        )
    except (KeyError, ValueError) as e:  # a category without id, name or isthing; duplicate ids
        raise ValueError(f"dataset {spec.name!r}: {spec.panoptic_json}: invalid 'categories': {e}") from e


def _read_categories(spec: PanopticDatasetSpec) -> List[Dict]:
    """The ``categories`` list of ``spec.panoptic_json``; ValueError naming the file if there is none."""
    where = f"dataset {spec.name!r}: {spec.panoptic_json}"
    try:
        with open(spec.panoptic_json) as f:
            info = json.load(f)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    categories = info.get("categories") if isinstance(info, dict) else None
    if not categories:
        raise ValueError(f"{where} has no 'categories' (COCO panoptic: a list, each with 'isthing')")
    return categories


def register_datasets_from_cfg(cfg) -> List[str]:
    """Register every ``cfg.DATASETS.COCO_PANOPTIC`` entry; returns their names."""
    specs = [parse_dataset_spec(s) for s in cfg.DATASETS.COCO_PANOPTIC]
    for spec in specs:
        register_dataset_spec(spec)
    return [s.name for s in specs]
