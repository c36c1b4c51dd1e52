"""The generated toy panoptic dataset: COCO panoptic format, consistency, determinism,
registration metadata."""
import json
import os

import numpy as np
import pytest
from conftest import requires_detectron2
from PIL import Image
from scipy import ndimage

pytestmark = requires_detectron2


def _rgb2id(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    from panoptic_segformer.data.toy_dataset import ensure_toy_split

    root = tmp_path_factory.mktemp("toy")
    return ensure_toy_split(str(root), "train", num_images=12)


def test_files_match_the_json(toy_split):
    from panoptic_segformer.data import TOY_CATEGORIES

    with open(os.path.join(toy_split, "panoptic.json")) as f:
        data = json.load(f)
    assert data["categories"] == TOY_CATEGORIES
    assert len(data["images"]) == len(data["annotations"]) == 12
    isthing = {c["id"]: c["isthing"] for c in TOY_CATEGORIES}
    touching_pairs = 0
    for im, ann in zip(data["images"], data["annotations"]):
        assert im["id"] == ann["image_id"]
        assert 128 <= im["height"] <= 192 and 128 <= im["width"] <= 192
        image = np.asarray(Image.open(os.path.join(toy_split, "images", im["file_name"])))
        assert image.shape == (im["height"], im["width"], 3) and image.dtype == np.uint8
        ids = _rgb2id(os.path.join(toy_split, "panoptic", ann["file_name"]))
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) == listed, "PNG ids and segments_info differ"
        things = [s for s in ann["segments_info"] if isthing[s["category_id"]]]
        assert len(things) >= 2 and len(things) < len(ann["segments_info"])  # things + stuff
        semseg = np.asarray(Image.open(os.path.join(toy_split, "panoptic_semseg", ann["file_name"])))
        contiguous = {c["id"]: i for i, c in enumerate(TOY_CATEGORIES)}
        for s in ann["segments_info"]:
            m = ids == s["id"]
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum() > 0 and s["iscrowd"] == 0
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (semseg[m] == contiguous[s["category_id"]]).all()
        masks = [ndimage.binary_dilation(ids == s["id"], iterations=1) for s in things]
        touching_pairs += sum((masks[i] & (ids == things[j]["id"])).any()
                              for i in range(len(things)) for j in range(len(things)) if i != j)
    assert touching_pairs >= 4, "things should touch or overlap in several images"


def test_instances_json_matches_panoptic(toy_split):
    from pycocotools import mask as mask_util

    with open(os.path.join(toy_split, "instances.json")) as f:
        inst = json.load(f)
    assert {c["name"] for c in inst["categories"]} == {"square", "disc", "triangle"}
    images = {im["id"]: im for im in inst["images"]}
    ann = inst["annotations"][0]
    ids = _rgb2id(os.path.join(toy_split, "panoptic", images[ann["image_id"]]["file_name"]))
    decoded = mask_util.decode(ann["segmentation"]).astype(bool)
    assert decoded.sum() == ann["area"]
    seg_ids = np.unique(ids[decoded])
    assert len(seg_ids) == 1 and (ids == seg_ids[0]).sum() == ann["area"]


def test_generation_is_deterministic(tmp_path):
    from panoptic_segformer.data.toy_dataset import generate_toy_split

    generate_toy_split(str(tmp_path / "a"), 3, seed=5)
    generate_toy_split(str(tmp_path / "b"), 3, seed=5)
    generate_toy_split(str(tmp_path / "c"), 3, seed=6)
    for name in ("panoptic.json", "images/000002.png", "panoptic/000003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/images/000001.png").read_bytes() != (tmp_path / "c/images/000001.png").read_bytes()


def test_ensure_reuses_an_existing_split(toy_split):
    from panoptic_segformer.data.toy_dataset import ensure_toy_split

    before = os.path.getmtime(os.path.join(toy_split, "panoptic.json"))
    root = os.path.dirname(os.path.dirname(toy_split))
    assert ensure_toy_split(root, "train") == toy_split
    assert os.path.getmtime(os.path.join(toy_split, "panoptic.json")) == before
    with pytest.raises(ValueError, match="unknown toy split"):
        ensure_toy_split(root, "test")


def test_registration_and_standard_metadata(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from panoptic_segformer.data import PanopticDatasetMapper, register_toy_panoptic

    names = register_toy_panoptic(str(tmp_path), prefix="toytest", num_images={"train": 4, "val": 3})
    assert names == ["toytest_train", "toytest_val"]
    assert not (tmp_path / "v1").exists(), "registration must not generate files"
    dicts = DatasetCatalog.get("toytest_val")
    assert len(dicts) == 3 and (tmp_path / "v1" / "val" / "panoptic.json").is_file()
    meta = MetadataCatalog.get("toytest_val")
    names6 = ["square", "disc", "triangle", "stripes", "checker", "speckle"]
    assert meta.thing_classes == names6 and meta.stuff_classes == names6
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert meta.stuff_dataset_id_to_contiguous_id == {4: 3, 5: 4, 6: 5}
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.ignore_label == 255
    assert meta.label_divisor == 1000 and os.path.isfile(meta.json_file)
    d = dicts[0]
    assert {"file_name", "image_id", "height", "width", "pan_seg_file_name", "segments_info",
            "sem_seg_file_name"} <= set(d)
    assert all(s["isthing"] == (s["category_id"] < 3) for s in d["segments_info"])

    out = PanopticDatasetMapper(is_train=True, augmentations=[], image_format="RGB")(d)
    assert len(out["instances"]) == len(d["segments_info"])
    assert sorted(out["instances"].gt_classes.tolist()) == sorted(s["category_id"] for s in d["segments_info"])
    # registering again is a no-op
    assert register_toy_panoptic(str(tmp_path), prefix="toytest") == names


def test_metadata_from_categories_errors():
    from panoptic_segformer.data import panoptic_metadata_from_categories

    with pytest.raises(ValueError, match="empty"):
        panoptic_metadata_from_categories([])
    with pytest.raises(ValueError, match="duplicate"):
        panoptic_metadata_from_categories([{"id": 1, "name": "a", "isthing": 1}] * 2)
    with pytest.raises(ValueError, match="isthing"):
        panoptic_metadata_from_categories([{"id": 1, "name": "a"}])
