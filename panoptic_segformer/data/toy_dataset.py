"""A small synthetic panoptic dataset that the project generates itself (COCO panoptic format).

Every image (128-192 px a side) has a textured background of one or two *stuff* regions
("stripes", "checker", "speckle") split by a random straight line, and 2-5 *thing* instances
("square", "disc", "triangle") drawn on top with a dark outline. Instances are often placed next
to an earlier one, so they touch and overlap (the later one occludes); each instance keeps at
least 40% of its area visible. Thing colours depend on the class (with per-instance jitter), so a
small model learns the task in minutes on a CPU.

``style="hard"`` (toy_hard.py, folder ``hard-v1``) makes a harder variant with the same categories:
thing colours and textures independent of the class, several occluding instances per class, varied
sizes and irregular stuff borders.

Files, per split, under ``<root>/<VERSION>/<split>/`` (``<root>/hard-v1/<split>/`` for the hard style):

* ``images/<id>.png``             RGB image
* ``panoptic/<id>.png``           panoptic PNG, segment id = R + 256 G + 256^2 B
* ``panoptic_semseg/<id>.png``    semantic labels (contiguous ids; no void pixels)
* ``panoptic.json``               COCO panoptic JSON (images, annotations, categories)
* ``instances.json``              COCO instances JSON of the things (RLE masks), for COCOEvaluator

Generation is deterministic (seeded per split and image) and atomic: a split is written to a
temporary folder and renamed into place, so concurrent processes never see half a split.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from .datasets import register_panoptic_dataset

__all__ = ["TOY_CATEGORIES", "default_toy_root", "generate_toy_split", "ensure_toy_split",
           "register_toy_panoptic", "render_toy_image"]

VERSION = "v1"
# style -> cache sub-folder; "hard": thing colours independent of class (toy_hard.py)
STYLE_FOLDERS = {"easy": VERSION, "hard": "hard-v1"}
TOY_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "square", "isthing": 1, "color": [220, 50, 50]},
    {"id": 2, "name": "disc", "isthing": 1, "color": [40, 90, 220]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [230, 200, 40]},
    {"id": 4, "name": "stripes", "isthing": 0, "color": [60, 160, 60]},
    {"id": 5, "name": "checker", "isthing": 0, "color": [150, 120, 180]},
    {"id": 6, "name": "speckle", "isthing": 0, "color": [170, 130, 80]},
]
# split -> (number of images, seed)
SPLITS = {"train": (300, 0), "val": (50, 1)}
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_AREA = 80


def default_toy_root() -> str:
    """``$PSF_TOY_ROOT`` if set, else ``~/.cache/panoptic_segformer/toy``."""
    return os.path.expanduser(os.environ.get("PSF_TOY_ROOT", "~/.cache/panoptic_segformer/toy"))


def _texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float texture of a stuff class."""
    base = np.array(next(c["color"] for c in TOY_CATEGORIES if c["name"] == name), np.float32)
    base = np.clip(base + rng.uniform(-20, 20, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if name == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 10)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period
        on = (np.floor(phase) % 2).astype(bool)
    elif name == "checker":
        cell = rng.integers(6, 11)
        on = ((xx // cell + yy // cell) % 2).astype(bool)
    elif name == "speckle":
        noise = rng.normal(0.0, 28.0, (h, w, 1)).astype(np.float32)
        return np.clip(base + noise, 0, 255)
    else:
        raise ValueError(f"unknown stuff texture {name!r}")
    return np.where(on[..., None], base, base * 0.6)


def _shape_mask(name: str, cx: float, cy: float, size: float, angle: float,
                yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean (h, w) mask of a thing shape centred at (cx, cy) with the given size."""
    if name == "square":
        half = size / 2
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    if name == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
    if name == "triangle":
        r = size / np.sqrt(3) * 1.1  # circumradius of an equilateral triangle of side ~1.1*size
        vx = cx + r * np.cos(angle + np.arange(3) * 2 * np.pi / 3)
        vy = cy + r * np.sin(angle + np.arange(3) * 2 * np.pi / 3)
        signs = []
        for i in range(3):
            j = (i + 1) % 3
            signs.append((vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i]))
        s = np.stack(signs)
        return (s >= 0).all(0) | (s <= 0).all(0)
    raise ValueError(f"unknown thing shape {name!r}")


def render_toy_image(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Render one toy image.

    Returns:
        image (h, w, 3) uint8 RGB, id map (h, w) int64 (0 = void, unused here), and
        segments_info (COCO panoptic: id, category_id, iscrowd, area, bbox [x, y, w, h]).
    """
    things = [c for c in TOY_CATEGORIES if c["isthing"]]
    stuffs = [c for c in TOY_CATEGORIES if not c["isthing"]]
    h, w = (int(v) for v in rng.integers(128, 193, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # background: one or two stuff regions split by a random line
    ids = np.zeros((h, w), np.int64)
    image = np.zeros((h, w, 3), np.float32)
    categories = {}
    n_regions = 1 if rng.random() < 0.25 else 2
    chosen = rng.choice(len(stuffs), size=n_regions, replace=False)
    if n_regions == 2:
        theta = rng.uniform(0, 2 * np.pi)
        proj = (xx - w / 2) * np.cos(theta) + (yy - h / 2) * np.sin(theta)
        cut = rng.uniform(-0.25, 0.25) * min(h, w)
        regions = [proj < cut, proj >= cut]
    else:
        regions = [np.ones((h, w), bool)]
    for k, (region, ci) in enumerate(zip(regions, chosen)):
        seg_id = k + 1
        ids[region] = seg_id
        categories[seg_id] = stuffs[ci]["id"]
        image[region] = _texture(rng, stuffs[ci]["name"], h, w)[region]

    # things, painted in order (later ones occlude earlier ones)
    n_things = int(rng.integers(2, 6))
    placed: List[Tuple[int, int]] = []  # (segment id, full area)
    centres: List[Tuple[float, float, float]] = []
    next_id = len(regions) + 1
    for _ in range(n_things):
        placement = place_thing(
            rng, ids, placed, centres, next_id, lambda: things[int(rng.integers(len(things)))],
            size_range=(22, 48), touch_prob=0.6, dist_range=(0.7, 1.05), grid=(yy, xx),
        )
        if placement is None:
            continue
        cat, mask, ids, (cx, cy, size) = placement
        colour = np.clip(np.array(cat["color"], np.float32) + rng.uniform(-30, 30, 3), 0, 255)
        inner = ndimage.binary_erosion(mask, iterations=2)
        image[mask] = colour * 0.35
        image[inner] = colour
        categories[next_id] = cat["id"]
        placed.append((next_id, int(mask.sum())))
        centres.append((cx, cy, size))
        next_id += 1

    return np.round(image).astype(np.uint8), ids, segments_info(ids, categories)


def place_thing(rng, ids, placed, centres, next_id, pick_category, size_range, touch_prob, dist_range, grid):
    """Up to 20 random tries to paint thing ``next_id`` over the (h, w) id map ``ids`` so that
    every earlier thing in ``placed`` [(segment id, full area)] stays visible enough.

    Each try draws a category (``pick_category()``), a size in ``size_range`` and a centre: with
    probability ``touch_prob`` next to an earlier instance of ``centres`` [(cx, cy, size)], at
    ``dist_range`` times the sum of the half sizes (touching / occluding), else anywhere.
    ``grid``: the (yy, xx) pixel coordinates. Returns (category, mask (h, w) bool, new id map,
    (cx, cy, size)), or None when no try worked.
    """
    h, w = ids.shape
    yy, xx = grid
    for _attempt in range(20):
        cat = pick_category()
        size = float(rng.uniform(*size_range))
        if centres and rng.random() < touch_prob:
            px, py, ps = centres[int(rng.integers(len(centres)))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = (ps + size) / 2 * rng.uniform(*dist_range)
            cx, cy = px + dist * np.cos(ang), py + dist * np.sin(ang)
        else:
            cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
        mask = _shape_mask(cat["name"], cx, cy, size, rng.uniform(0, 2 * np.pi), yy, xx)
        if mask.sum() < MIN_VISIBLE_AREA / MIN_VISIBLE_FRACTION:
            continue
        trial = ids.copy()
        trial[mask] = next_id
        if all((trial == sid).sum() >= max(MIN_VISIBLE_AREA, MIN_VISIBLE_FRACTION * area) for sid, area in placed):
            return cat, mask, trial, (cx, cy, size)
    return None


def segments_info(ids: np.ndarray, categories: Dict[int, int]) -> List[Dict]:
    """COCO panoptic segments_info of the (h, w) id map for {segment id: category id}; segments
    with no visible pixel are left out."""
    segments = []
    for seg_id, cat_id in categories.items():
        m = ids == seg_id
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append({
            "id": seg_id, "category_id": cat_id, "iscrowd": 0, "area": area,
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        })
    return segments


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    for c in range(3):
        rgb[..., c] = (ids >> (8 * c)) & 255
    return rgb


def _renderer(style: str):
    """The image renderer of a toy ``style``: "easy" (this module) or "hard" (toy_hard.py)."""
    if style == "easy":
        return render_toy_image
    if style == "hard":
        from .toy_hard import render_hard_toy_image

        return render_hard_toy_image
    raise ValueError(f"unknown toy style {style!r}; expected one of {sorted(STYLE_FOLDERS)}")


def generate_toy_split(out_dir: str, num_images: int, seed: int, style: str = "easy") -> None:
    """Write ``num_images`` toy images of one split into ``out_dir`` (see the module docstring)."""
    from pycocotools import mask as mask_util

    render = _renderer(style)
    for sub in ("images", "panoptic", "panoptic_semseg"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(TOY_CATEGORIES)}
    images, annotations, instances = [], [], []
    for idx in range(num_images):
        rng = np.random.default_rng([seed, idx])
        image, ids, segments = render(rng)
        h, w = ids.shape
        image_id = idx + 1
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(os.path.join(out_dir, "images", name))
        Image.fromarray(_id2rgb(ids)).save(os.path.join(out_dir, "panoptic", name))
        semseg = np.full((h, w), 255, np.uint8)
        for seg in segments:
            semseg[ids == seg["id"]] = contiguous[seg["category_id"]]
            if TOY_CATEGORIES[contiguous[seg["category_id"]]]["isthing"]:
                rle = mask_util.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({
                    "id": len(instances) + 1, "image_id": image_id,
                    "category_id": seg["category_id"], "segmentation": rle,
                    "area": seg["area"], "bbox": seg["bbox"], "iscrowd": 0,
                })
        Image.fromarray(semseg).save(os.path.join(out_dir, "panoptic_semseg", name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    with open(os.path.join(out_dir, "panoptic.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": TOY_CATEGORIES}, f)
    thing_cats = [{k: c[k] for k in ("id", "name")} for c in TOY_CATEGORIES if c["isthing"]]
    with open(os.path.join(out_dir, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": instances, "categories": thing_cats}, f)


def ensure_toy_split(root: str, split: str, num_images: Optional[int] = None, style: str = "easy") -> str:
    """Generate split ``split`` of ``style`` under ``root`` unless it exists; returns the split folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; expected one of {sorted(SPLITS)}")
    default_n, seed = SPLITS[split]
    _renderer(style)  # an unknown style fails before anything is written
    final = os.path.join(root, STYLE_FOLDERS[style], split)
    if os.path.isfile(os.path.join(final, "panoptic.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=os.path.dirname(final))
    try:
        generate_toy_split(tmp, num_images or default_n, seed, style)
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, "panoptic.json")):  # not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def register_toy_panoptic(root: Optional[str] = None, prefix: str = "toy_panoptic",
                          num_images: Optional[Dict[str, int]] = None, style: str = "easy") -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val``; the files are generated on first load.

    Args:
        root: cache folder (default :func:`default_toy_root`).
        num_images: optional {split: count} overriding the default sizes (300 train, 50 val);
            only used when a split is generated.
        style: "easy" (this module; folder ``v1``) or "hard" (toy_hard.py; folder ``hard-v1``).
    """
    _renderer(style)  # an unknown style fails before anything is registered
    root = root or default_toy_root()
    num_images = num_images or {}
    names = []
    for split in SPLITS:
        folder = os.path.join(root, STYLE_FOLDERS[style], split)
        name = f"{prefix}_{split}"
        register_panoptic_dataset(
            name,
            image_root=os.path.join(folder, "images"),
            panoptic_root=os.path.join(folder, "panoptic"),
            panoptic_json=os.path.join(folder, "panoptic.json"),
            categories=TOY_CATEGORIES,
            instances_json=os.path.join(folder, "instances.json"),
            sem_seg_root=os.path.join(folder, "panoptic_semseg"),
            prepare=lambda split=split: ensure_toy_split(root, split, num_images.get(split), style),
        )
        names.append(name)
    return names
