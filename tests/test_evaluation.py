"""Evaluation path: build_evaluator dispatch, and PQ = 100 when the prediction is the ground truth."""
import numpy as np
import pytest
import torch
from conftest import COCO_SAMPLE, requires_coco_sample, requires_detectron2
from PIL import Image

pytestmark = requires_detectron2


def _cfg(tmp_path, panoptic=True, instance=False, semantic=False):
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = panoptic, instance, semantic
    return cfg


def _gt_as_prediction(d, drop_segment=None):
    """Model-style output built from the GT PNG: panoptic_seg (int32 ids, 0 = void; crowd
    segments left void), segments_info with contiguous category ids, plus instances / sem_seg."""
    rgb = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    pan = np.zeros(ids.shape, np.int32)
    info = []
    for s in d["segments_info"]:
        if s.get("iscrowd", 0) or s["id"] == drop_segment:
            continue
        new_id = len(info) + 1
        pan[ids == s["id"]] = new_id
        info.append({"id": new_id, "category_id": s["category_id"], "isthing": s["isthing"], "score": 1.0})
    return {"panoptic_seg": (torch.from_numpy(pan), info)}


@requires_coco_sample
def test_coco_sample_pq_is_100_for_ground_truth(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOPanopticEvaluator

    from panoptic_segformer.data import register_coco_panoptic_sample
    from panoptic_segformer.engine import build_evaluator

    name = register_coco_panoptic_sample(str(COCO_SAMPLE))
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 2 and any(s["iscrowd"] for d in dicts for s in d["segments_info"])
    evaluator = build_evaluator(_cfg(tmp_path), name)
    assert isinstance(evaluator, COCOPanopticEvaluator)

    evaluator.reset()
    for d in dicts:
        evaluator.process([d], [_gt_as_prediction(d)])
    res = evaluator.evaluate()["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res[key] == pytest.approx(100.0), key

    # dropping one GT segment from the prediction must cost PQ: the check can fail
    evaluator.reset()
    victim = next(s["id"] for s in dicts[0]["segments_info"] if not s["iscrowd"])
    evaluator.process([dicts[0]], [_gt_as_prediction(dicts[0], drop_segment=victim)])
    evaluator.process([dicts[1]], [_gt_as_prediction(dicts[1])])
    assert evaluator.evaluate()["panoptic_seg"]["PQ"] < 100.0


def test_toy_all_evaluators_are_perfect_on_ground_truth(tmp_path):
    """PQ, mIoU and mask AP are all 100 on the toy val split when predictions are the GT."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import DatasetEvaluators
    from detectron2.structures import BitMasks, Instances

    from panoptic_segformer.data import register_toy_panoptic
    from panoptic_segformer.engine import build_evaluator

    register_toy_panoptic(str(tmp_path / "toy"), prefix="toyeval", num_images={"train": 2, "val": 4})
    dicts = DatasetCatalog.get("toyeval_val")
    evaluator = build_evaluator(_cfg(tmp_path, instance=True, semantic=True), "toyeval_val")
    assert isinstance(evaluator, DatasetEvaluators) and len(evaluator._evaluators) == 3
    evaluator.reset()
    num_classes = 6
    for d in dicts:
        out = _gt_as_prediction(d)
        pan, info = out["panoptic_seg"]
        logits = torch.zeros(num_classes, *pan.shape)
        things = [s for s in info if s["isthing"]]
        for s in info:
            logits[s["category_id"]][pan == s["id"]] = 1.0
        inst = Instances(tuple(pan.shape))
        masks = torch.stack([pan == s["id"] for s in things])
        inst.pred_masks = masks
        inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
        inst.scores = torch.ones(len(things))
        inst.pred_classes = torch.tensor([s["category_id"] for s in things])
        out.update(sem_seg=logits, instances=inst)
        evaluator.process([d], [out])
    res = evaluator.evaluate()
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)


def test_build_evaluator_errors(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from panoptic_segformer.engine import build_evaluator

    if "psf_not_panoptic" not in DatasetCatalog.list():
        DatasetCatalog.register("psf_not_panoptic", lambda: [])
        MetadataCatalog.get("psf_not_panoptic").set(evaluator_type="coco")
    with pytest.raises(NotImplementedError, match="psf_not_panoptic"):
        build_evaluator(_cfg(tmp_path), "psf_not_panoptic")
    if COCO_SAMPLE.is_dir():
        from panoptic_segformer.data import register_coco_panoptic_sample

        name = register_coco_panoptic_sample(str(COCO_SAMPLE))
        with pytest.raises(ValueError, match="json_file"):
            build_evaluator(_cfg(tmp_path, instance=True), name)
        with pytest.raises(ValueError, match="sem_seg_file_name"):
            build_evaluator(_cfg(tmp_path, semantic=True), name)
    import panoptic_segformer.data  # noqa: F401  (registers toy_panoptic_val; nothing generated)

    with pytest.raises(ValueError, match="all of"):
        build_evaluator(_cfg(tmp_path, panoptic=False), "toy_panoptic_val")


def test_instance_ap_when_stuff_categories_come_first(tmp_path):
    """Thing contiguous ids need not start at 0: box AP is 100 for a prediction equal to the GT."""
    import json

    from detectron2.structures import Boxes, Instances

    from panoptic_segformer.data import register_panoptic_dataset
    from panoptic_segformer.engine.evaluation import PanopticCOCOEvaluator

    cats = [
        {"id": 1, "name": "sky", "isthing": 0},
        {"id": 2, "name": "car", "isthing": 1},
        {"id": 3, "name": "road", "isthing": 0},
        {"id": 4, "name": "dog", "isthing": 1},
    ]
    box = [2.0, 3.0, 10.0, 8.0]  # x, y, w, h
    instances = {
        "images": [{"id": 1, "width": 32, "height": 32, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": box, "area": 80.0, "iscrowd": 0}
        ],
        "categories": [c for c in cats if c["isthing"]],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    name = f"stuff_first_{tmp_path.name}"
    register_panoptic_dataset(
        name, image_root=str(tmp_path), panoptic_root=str(tmp_path),
        panoptic_json=str(tmp_path / "panoptic.json"), categories=cats,
        instances_json=str(tmp_path / "instances.json"),
    )
    evaluator = PanopticCOCOEvaluator(name, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    pred = Instances((32, 32))
    pred.pred_boxes = Boxes(torch.tensor([[2.0, 3.0, 12.0, 11.0]]))
    pred.scores = torch.tensor([0.9])
    pred.pred_classes = torch.tensor([3])  # "dog": contiguous id 3, the second thing
    evaluator.process([{"image_id": 1}], [{"instances": pred}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP-dog"] == pytest.approx(100.0)


def _tiny_panoptic_dataset(tmp_path, name, categories, segments, id_map):
    """One 8x8 image: a panoptic PNG of ``id_map`` (segment ids) and its JSON ``segments``."""
    import json

    from panoptic_segformer.data import register_panoptic_dataset

    (tmp_path / "pan").mkdir()
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pan" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.jpg")
    info = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}],
        "categories": categories,
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(info))
    register_panoptic_dataset(name, image_root=str(tmp_path), panoptic_root=str(tmp_path / "pan"),
                              panoptic_json=str(tmp_path / "panoptic.json"), categories=categories)
    return name


def _evaluate(tmp_path, name, prediction):
    from test_predictor import ListHandler

    from detectron2.data import DatasetCatalog

    from panoptic_segformer.engine import build_evaluator

    evaluator = build_evaluator(_cfg(tmp_path), name)
    evaluator.reset()
    evaluator.process(DatasetCatalog.get(name), [prediction])
    with ListHandler("panoptic_segformer.engine.evaluation") as log:
        return evaluator.evaluate()["panoptic_seg"], log.messages


def test_pq_of_ground_truth_without_non_crowd_segments_is_nan_with_a_note(tmp_path):
    """panopticapi divides by the number of counted categories: 0 here (ZeroDivisionError)."""
    cats = [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]
    id_map = np.zeros((8, 8), np.int64)
    id_map[2:6, 2:6] = 5
    crowd = [{"id": 5, "category_id": 1, "iscrowd": 1, "area": 16, "bbox": [2, 2, 4, 4]}]
    name = _tiny_panoptic_dataset(tmp_path, f"only_crowd_{tmp_path.name}", cats, crowd, id_map)
    nothing = {"panoptic_seg": (torch.zeros(8, 8, dtype=torch.int32), [])}
    res, log = _evaluate(tmp_path, name, nothing)
    assert all(np.isnan(res[k]) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"))
    assert any("All, Things, Stuff is NaN" in m and "crowd" in m for m in log)


def test_pq_of_a_things_only_dataset(tmp_path):
    """No stuff category at all: the Stuff group is empty, things are scored as usual."""
    cats = [{"id": 1, "name": "car", "isthing": 1}]
    id_map = np.zeros((8, 8), np.int64)
    id_map[:, 4:] = 3
    car = [{"id": 3, "category_id": 1, "iscrowd": 0, "area": 32, "bbox": [4, 0, 4, 8]}]
    name = _tiny_panoptic_dataset(tmp_path, f"things_only_{tmp_path.name}", cats, car, id_map)
    pred = torch.zeros(8, 8, dtype=torch.int32)
    pred[:, 4:] = 1
    res, log = _evaluate(tmp_path, name, {"panoptic_seg": (pred, [
        {"id": 1, "category_id": 0, "isthing": True, "score": 1.0}])})
    assert res["PQ"] == pytest.approx(100.0) and res["PQ_th"] == pytest.approx(100.0)
    assert np.isnan(res["PQ_st"]) and any("Stuff is NaN" in m for m in log)


def test_unknown_category_names_file_segment_and_id(tmp_path):
    """Also for Detectron2's builtin coco_*_panoptic names (KeyError: 77 from its loader)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_panoptic

    from panoptic_segformer.data import adopt_coco_panoptic_datasets

    cats = [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]
    id_map = np.full((8, 8), 4, np.int64)
    seg = [{"id": 4, "category_id": 77, "iscrowd": 0, "area": 64, "bbox": [0, 0, 8, 8]}]
    name = _tiny_panoptic_dataset(tmp_path, f"unknown_cat_{tmp_path.name}", cats, seg, id_map)
    message = r"panoptic\.json: segment 4 of a\.png \(image 1\) has category id 77"
    with pytest.raises(ValueError, match=message):
        DatasetCatalog.get(name)
    builtin_style = f"coco_{tmp_path.name}_panoptic"
    meta = MetadataCatalog.get(name).as_dict()
    register_coco_panoptic(builtin_style, {k: meta[k] for k in meta if k.endswith(("classes", "colors", "contiguous_id"))},
                           meta["image_root"], meta["panoptic_root"], meta["panoptic_json"], None)
    assert adopt_coco_panoptic_datasets([builtin_style]) == [builtin_style]
    with pytest.raises(ValueError, match=message):
        DatasetCatalog.get(builtin_style)
    assert adopt_coco_panoptic_datasets([name + "_none"]) == []  # no such metadata: left alone
