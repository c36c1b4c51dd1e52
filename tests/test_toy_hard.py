"""The "hard" toy style: thing colours independent of class, occluding instances of one class,
irregular stuff borders, fast generation; registered in its own folder."""
import json
import time

import numpy as np
import pytest
from conftest import requires_detectron2
from PIL import Image
from scipy import ndimage

pytestmark = requires_detectron2


def _load(split_dir):
    info = json.loads((split_dir / "panoptic.json").read_text())
    for ann in info["annotations"]:
        rgb = np.asarray(Image.open(split_dir / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
        image = np.asarray(Image.open(split_dir / "images" / ann["file_name"]).convert("RGB"))
        yield image, rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ann["segments_info"]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from panoptic_segformer.data.toy_dataset import generate_toy_split

    root = tmp_path_factory.mktemp("toys")
    start = time.perf_counter()
    generate_toy_split(str(root / "hard"), 20, seed=3, style="hard")
    seconds = time.perf_counter() - start
    generate_toy_split(str(root / "easy"), 20, seed=3)
    return root / "hard", root / "easy", seconds


def test_twenty_hard_images_take_seconds(splits):
    assert splits[2] < 10.0


def _colour_range_per_class(split_dir):
    """{thing category: max over RGB of the range of the instances' median interior colour}."""
    colours = {}
    for image, ids, segments in _load(split_dir):
        for seg in segments:
            if seg["category_id"] > 3:  # stuff
                continue
            inner = ndimage.binary_erosion(ids == seg["id"], iterations=3)
            if inner.sum() >= 20:
                colours.setdefault(seg["category_id"], []).append(np.median(image[inner], axis=0))
    return {c: float(np.ptp(np.stack(v), axis=0).max()) for c, v in colours.items()}


def test_thing_colours_do_not_follow_the_class(splits):
    hard, easy = _colour_range_per_class(splits[0]), _colour_range_per_class(splits[1])
    assert len(hard) == 3 and all(r > 120 for r in hard.values()), hard
    assert all(r < 120 for r in easy.values()), easy  # the check tells the styles apart


def _same_class_contacts(split_dir):
    """Number of images with two instances of one thing class that touch or occlude each other."""
    count = 0
    for _image, ids, segments in _load(split_dir):
        things = [s for s in segments if s["category_id"] <= 3]
        count += any(a["category_id"] == b["category_id"]
                     and (ndimage.binary_dilation(ids == a["id"]) & (ids == b["id"])).any()
                     for i, a in enumerate(things) for b in things[i + 1:])
    return count


def test_instances_of_one_class_touch_and_occlude(splits):
    assert _same_class_contacts(splits[0]) >= 10


def _stuff_border_line_residual(split_dir):
    """Median over images of the RMS distance (px) of stuff/stuff border pixels to their best line."""
    residuals = []
    for _image, ids, segments in _load(split_dir):
        stuff = {s["id"] for s in segments if s["category_id"] > 3}
        a, b = ids[:, :-1], ids[:, 1:]
        ys, xs = np.nonzero(np.isin(a, list(stuff)) & np.isin(b, list(stuff)) & (a != b))
        if len(xs) < 10:
            continue
        pts = np.stack([xs, ys], 1).astype(np.float64)
        pts -= pts.mean(0)
        residuals.append(np.sqrt(np.linalg.eigvalsh(pts.T @ pts / len(pts))[0]))
    return float(np.median(residuals))


def test_stuff_borders_are_not_straight(splits):
    assert _stuff_border_line_residual(splits[1]) < 2.0  # the easy style: one straight cut
    assert _stuff_border_line_residual(splits[0]) > 5.0


def test_hard_style_registers_in_its_own_folder(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from panoptic_segformer.data import register_toy_panoptic

    prefix = f"hardtoy_{tmp_path.name}"
    assert register_toy_panoptic(str(tmp_path), prefix=prefix, num_images={"val": 2}, style="hard") == [
        f"{prefix}_train", f"{prefix}_val"]
    assert MetadataCatalog.get(f"{prefix}_val").image_root == str(tmp_path / "hard-v1" / "val" / "images")
    assert len(DatasetCatalog.get(f"{prefix}_val")) == 2
    with pytest.raises(ValueError, match="unknown toy style 'odd'"):
        register_toy_panoptic(str(tmp_path), prefix=f"{prefix}_odd", style="odd")
