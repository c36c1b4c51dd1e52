"""The "hard" style of the toy dataset: the same categories and files as toy_dataset.py, but the
class of a thing can only be told by its shape.

* Thing colours and textures (solid, stripes, speckle) are drawn independently of the class.
* 1-2 thing classes per image with 2-4 instances each, mostly placed against an earlier instance,
  so instances of one class touch and occlude each other; sizes vary from 14 to 64 px.
* 2-3 stuff regions (the class gives the texture) with irregular, noise-warped borders.
"""
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

from .toy_dataset import TOY_CATEGORIES, _texture, place_thing, segments_info

__all__ = ["render_hard_toy_image"]


def _thing_pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float fill of one thing: a random colour, solid, striped or speckled."""
    colour = rng.uniform(30, 255, 3).astype(np.float32)
    kind = int(rng.integers(3))
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3)).copy()
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        on = np.floor((xx * np.cos(theta) + yy * np.sin(theta)) / rng.uniform(3, 7)) % 2 == 1
        return np.where(on[..., None], colour, colour * 0.5)
    return np.clip(colour + rng.normal(0.0, 35.0, (h, w, 1)).astype(np.float32), 0, 255)


def _irregular_regions(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """(h, w) int map of ``n`` regions: nearest of ``n`` random seeds under a smooth noise warp."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    seeds = rng.uniform([0, 0], [w, h], size=(n, 2))
    dist = np.stack([np.hypot(xx - sx, yy - sy) for sx, sy in seeds])
    warp = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (n, h, w)), sigma=(0, 6, 6))
    warp *= 0.15 * min(h, w) / (warp.std() + 1e-6)
    return np.argmin(dist + warp, axis=0)


def render_hard_toy_image(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Render one hard toy image.

    Returns:
        image (h, w, 3) uint8 RGB, id map (h, w) int64 (no void), and segments_info (COCO panoptic:
        id, category_id, iscrowd, area, bbox [x, y, w, h]), as ``render_toy_image``.
    """
    things = [c for c in TOY_CATEGORIES if c["isthing"]]
    stuffs = [c for c in TOY_CATEGORIES if not c["isthing"]]
    h, w = (int(v) for v in rng.integers(128, 193, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    n_regions = int(rng.integers(2, min(3, len(stuffs)) + 1))
    chosen = rng.choice(len(stuffs), size=n_regions, replace=False)
    labels = _irregular_regions(rng, h, w, n_regions)
    ids = np.zeros((h, w), np.int64)
    image = np.zeros((h, w, 3), np.float32)
    categories = {}
    for k, ci in enumerate(chosen):
        region = labels == k
        ids[region] = k + 1
        categories[k + 1] = stuffs[ci]["id"]
        image[region] = _texture(rng, stuffs[ci]["name"], h, w)[region]

    classes = rng.choice(len(things), size=int(rng.integers(1, 3)), replace=False)
    plan = [things[ci] for ci in classes for _ in range(int(rng.integers(2, 5)))]
    placed: List[Tuple[int, int]] = []  # (segment id, full area)
    centres: List[Tuple[float, float, float]] = []
    next_id = n_regions + 1
    for planned in plan:
        placement = place_thing(
            rng, ids, placed, centres, next_id, lambda: planned,
            size_range=(14, 64), touch_prob=0.7, dist_range=(0.5, 1.0), grid=(yy, xx),
        )
        if placement is None:
            continue
        cat, mask, ids, (cx, cy, size) = placement
        fill = _thing_pattern(rng, h, w)
        image[mask] = fill[mask] * 0.35  # dark outline
        inner = ndimage.binary_erosion(mask, iterations=2)
        image[inner] = fill[inner]
        categories[next_id] = cat["id"]
        placed.append((next_id, int(mask.sum())))
        centres.append((cx, cy, size))
        next_id += 1
    return np.round(image).astype(np.uint8), ids, segments_info(ids, categories)
