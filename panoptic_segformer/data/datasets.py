"""Registration of COCO-format panoptic datasets (PNG + JSON) with Detectron2.

The metadata follows Detectron2's "standard" panoptic rule (``coco_panoptic_standard``):

* the contiguous id of a category is its position in the JSON's ``categories`` list;
* ``thing_classes``/``stuff_classes`` (and the colour lists) both list ALL category names, so that
  the Visualizer can index either list with any contiguous id;
* ``thing_dataset_id_to_contiguous_id`` holds the thing categories only and
  ``stuff_dataset_id_to_contiguous_id`` the stuff categories only; together they cover
  ``[0, num_categories)``.

The model derives its thing/stuff class counts and the thing/stuff split from these two maps.
"""
import functools
import json
import os
from typing import Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "adopt_coco_panoptic_datasets",
    "panoptic_metadata_from_categories",
    "load_panoptic_json",
    "register_panoptic_dataset",
    "register_coco_panoptic_sample",
]


def panoptic_metadata_from_categories(categories: List[Dict]) -> Dict:
    """Build Detectron2 standard panoptic metadata from a COCO panoptic ``categories`` list.

    Args:
        categories: dicts with ``id``, ``name``, ``isthing`` and optionally ``color`` (RGB).

    Returns:
        dict with thing_classes, stuff_classes, thing_colors, stuff_colors,
        thing_dataset_id_to_contiguous_id, stuff_dataset_id_to_contiguous_id.
    """
    if not categories:
        raise ValueError("panoptic categories list is empty")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids in panoptic categories: {sorted(ids)}")
    names = [c["name"] for c in categories]
    colors = [list(c.get("color", [0, 0, 0])) for c in categories]
    thing_map, stuff_map = {}, {}
    for i, c in enumerate(categories):
        if "isthing" not in c:
            raise ValueError(f"category {c['id']} ({c['name']!r}) has no 'isthing' field")
        (thing_map if c["isthing"] else stuff_map)[c["id"]] = i
    return {
        "thing_classes": names,
        "stuff_classes": list(names),
        "thing_colors": colors,
        "stuff_colors": [list(c) for c in colors],
        "thing_dataset_id_to_contiguous_id": thing_map,
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


def load_panoptic_json(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    metadata: Dict,
    sem_seg_root: Optional[str] = None,
) -> List[Dict]:
    """Load a COCO panoptic JSON into Detectron2 dataset dicts.

    Unlike ``detectron2.data.datasets.load_coco_panoptic_json`` the image file name is taken from
    the JSON's ``images`` list (any extension), and ``height``/``width`` are filled in.

    Returns:
        list of dicts with file_name, image_id, height, width, pan_seg_file_name,
        segments_info (category_id converted to a contiguous id, ``isthing`` added) and, when
        ``sem_seg_root`` is given, sem_seg_file_name.
    """
    with PathManager.open(json_file) as f:
        info = json.load(f)
    images = {int(im["id"]): im for im in info["images"]}
    thing_map = metadata["thing_dataset_id_to_contiguous_id"]
    stuff_map = metadata["stuff_dataset_id_to_contiguous_id"]
    ret = []
    for ann in info["annotations"]:
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{json_file}: annotation for unknown image id {image_id}")
        im = images[image_id]
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cat = seg["category_id"]
            if cat in thing_map:
                seg["category_id"], seg["isthing"] = thing_map[cat], True
            elif cat in stuff_map:
                seg["category_id"], seg["isthing"] = stuff_map[cat], False
            else:
                raise ValueError(
                    f"{json_file}: segment {seg.get('id')} of {ann.get('file_name')} (image {image_id}) "
                    f"has category id {cat}, which is not one of the {len(thing_map) + len(stuff_map)} "
                    "categories of the dataset metadata"
                )
            segments.append(seg)
        record = {
            "file_name": os.path.join(image_root, im["file_name"]),
            "image_id": image_id,
            "height": int(im["height"]),
            "width": int(im["width"]),
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        }
        if sem_seg_root is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        ret.append(record)
    if not ret:
        raise ValueError(f"{json_file} has no annotations")
    return ret


def register_panoptic_dataset(
    name: str,
    *,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    categories: List[Dict],
    instances_json: Optional[str] = None,
    sem_seg_root: Optional[str] = None,
    prepare: Optional[Callable[[], None]] = None,
) -> None:
    """Register a COCO-format panoptic dataset ``name`` (no-op if already registered).

    Args:
        categories: the COCO panoptic ``categories`` list, in contiguous-id order.
        instances_json: optional COCO instances JSON of the thing segments (COCOEvaluator).
        sem_seg_root: optional folder of semantic PNGs with contiguous ids and 255 = ignore
            (SemSegEvaluator); named like the panoptic PNGs.
        prepare: optional callable run before loading, e.g. to generate the files.
    """
    if name in DatasetCatalog.list():
        return
    metadata = panoptic_metadata_from_categories(categories)

    def _load():
        if prepare is not None:
            prepare()
        return load_panoptic_json(panoptic_json, image_root, panoptic_root, metadata, sem_seg_root)

    DatasetCatalog.register(name, _load)
    extra = {"sem_seg_root": sem_seg_root} if sem_seg_root is not None else {}
    MetadataCatalog.get(name).set(
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        json_file=instances_json,
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        **extra,
        **metadata,
    )


def adopt_coco_panoptic_datasets(names: Optional[List[str]] = None) -> List[str]:
    """Load already registered COCO-format panoptic datasets with :func:`load_panoptic_json`.

    Detectron2's builtin ``coco_2017_{train,val,val_100}_panoptic`` (the names our COCO configs
    use) load through ``load_coco_panoptic_json``, which fails with a bare ``KeyError: 77`` on an
    unknown category id; ours names the file, the segment and the id. Only datasets whose
    metadata has ``panoptic_json``, ``panoptic_root``, ``image_root`` and both id maps are
    adopted; their metadata is unchanged.

    Args:
        names: the datasets to adopt; default: every registered ``coco_*_panoptic`` dataset.

    Returns:
        the adopted names.
    """
    if names is None:
        names = [n for n in DatasetCatalog.list() if n.startswith("coco_") and n.endswith("_panoptic")]
    needed = ("panoptic_json", "panoptic_root", "image_root",
              "thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")
    adopted = []
    for name in names:
        meta = MetadataCatalog.get(name).as_dict()
        if not all(k in meta for k in needed):
            continue
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(
            load_panoptic_json, meta["panoptic_json"], meta["image_root"], meta["panoptic_root"], meta))
        adopted.append(name)
    return adopted


def register_coco_panoptic_sample(root: str, name: str = "coco_panoptic_sample") -> str:
    """Register ``../shared/data/coco_panoptic_sample`` (2 COCO val images) under ``name``.

    Categories come from its ``panoptic_coco_categories.json``. Returns ``name``.
    """
    cat_file = os.path.join(root, "panoptic_coco_categories.json")
    if not os.path.isfile(cat_file):
        raise FileNotFoundError(f"COCO panoptic sample categories not found: {cat_file}")
    with open(cat_file) as f:
        categories = json.load(f)
    register_panoptic_dataset(
        name,
        image_root=os.path.join(root, "images"),
        panoptic_root=os.path.join(root, "panoptic"),
        panoptic_json=os.path.join(root, "panoptic_examples.json"),
        categories=categories,
    )
    return name
