"""Datasets given by paths (``DATASETS.COCO_PANOPTIC`` / ``train_net.py --dataset``): parsing,
registration with the JSON's categories, and the errors that name the problem."""
import json

import pytest
from conftest import requires_detectron2

pytestmark = requires_detectron2

CATEGORIES = [{"id": 7, "name": "dot", "isthing": 1, "color": [1, 2, 3]},
              {"id": 9, "name": "sea", "isthing": 0, "color": [4, 5, 6]}]


def _dataset(root):
    (root / "images").mkdir(parents=True)
    (root / "pngs").mkdir()
    ann = {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 5, "category_id": 9}]}
    (root / "p.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 6}],
        "annotations": [ann], "categories": CATEGORIES}))
    return f"{root / 'images'}:{root / 'pngs'}:{root / 'p.json'}"


def test_spec_registers_the_json_categories(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from panoptic_segformer.data import parse_dataset_spec, register_dataset_spec

    name = f"paths_{tmp_path.name}"
    spec = parse_dataset_spec(f"{name}:{_dataset(tmp_path)}")
    assert spec.name == name and spec.panoptic_json == str(tmp_path / "p.json")
    register_dataset_spec(spec)
    register_dataset_spec(spec)  # same paths again: a no-op
    meta = MetadataCatalog.get(name)
    assert meta.thing_dataset_id_to_contiguous_id == {7: 0}
    assert meta.stuff_dataset_id_to_contiguous_id == {9: 1}
    assert meta.evaluator_type == "coco_panoptic_seg"
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == str(tmp_path / "images" / "a.jpg")
    assert record["segments_info"][0]["category_id"] == 1 and not record["segments_info"][0]["isthing"]


@pytest.mark.parametrize("spec", ["only:three:fields", "a:b:c:d:e", "name::b:c"])
def test_malformed_spec_is_an_error(spec):
    from panoptic_segformer.data import parse_dataset_spec

    with pytest.raises(ValueError, match="NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON"):
        parse_dataset_spec(spec)


@pytest.mark.parametrize("missing, what", [("images", "image folder"), ("pngs", "panoptic PNG folder"),
                                           ("p.json", "panoptic JSON")])
def test_missing_path_is_named(tmp_path, missing, what):
    from panoptic_segformer.data import parse_dataset_spec

    paths = _dataset(tmp_path)
    target = tmp_path / missing
    target.unlink() if target.is_file() else target.rmdir()
    with pytest.raises(FileNotFoundError, match=f"{what} not found: {target}"):
        parse_dataset_spec(f"mine:{paths}")


def test_name_registered_with_other_paths_is_an_error(tmp_path):
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config
    from panoptic_segformer.data import register_datasets_from_cfg

    name = f"paths_clash_{tmp_path.name}"
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.DATASETS.COCO_PANOPTIC = [f"{name}:{_dataset(tmp_path / 'one')}"]
    assert register_datasets_from_cfg(cfg) == [name]
    cfg.DATASETS.COCO_PANOPTIC = [f"{name}:{_dataset(tmp_path / 'two')}"]
    with pytest.raises(ValueError, match=f"{name!r} is already registered"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.COCO_PANOPTIC = [f"toy_panoptic_val:{_dataset(tmp_path / 'three')}"]
    with pytest.raises(ValueError, match="'toy_panoptic_val' is already registered"):
        register_datasets_from_cfg(cfg)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    (json.dumps(CATEGORIES), "has no 'categories'"),  # a categories file instead of the dataset JSON
    (json.dumps({"images": [], "annotations": []}), "has no 'categories'"),
    (json.dumps({"categories": [{"id": 7, "name": "dot"}]}), "invalid 'categories'.*no 'isthing'"),
])
def test_unusable_json_is_named_and_registers_nothing(tmp_path, content, problem):
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.data import parse_dataset_spec, register_dataset_spec

    name = f"paths_bad_{tmp_path.name}"
    spec = parse_dataset_spec(f"{name}:{_dataset(tmp_path)}")
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(ValueError, match=f"{name!r}: .*p.json.*{problem}"):
        register_dataset_spec(spec)
    assert name not in DatasetCatalog.list()
