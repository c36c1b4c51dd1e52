"""PanopticDatasetMapper: transforms keep image, masks, boxes and classes aligned; crowd and
vanished segments are dropped; empty images pass; broken files are named in the error."""
import numpy as np
import pytest
import torch
from conftest import requires_detectron2
from PIL import Image

pytestmark = requires_detectron2

H, W = 40, 60
# segment id -> (colour in the image, contiguous class, iscrowd, region [y0, y1, x0, x1))
SEGMENTS = {
    7: ((200, 30, 30), 0, 0, (5, 25, 4, 20)),  # thing "A"
    9: ((30, 200, 30), 1, 0, (10, 30, 40, 56)),  # thing "B"
    11: ((30, 30, 200), 0, 1, (30, 38, 22, 34)),  # crowd thing
    300: ((90, 90, 90), 3, 0, None),  # stuff: everything else
}


def _write_sample(tmp_path, segments=SEGMENTS):
    """Image whose colour encodes the segment, and its panoptic PNG (R + 256 G + 256² B ids)."""
    ids = np.full((H, W), 300, np.int64)
    for seg_id, (_, _, _, box) in segments.items():
        if box is not None:
            y0, y1, x0, x1 = box
            ids[y0:y1, x0:x1] = seg_id
    image = np.zeros((H, W, 3), np.uint8)
    for seg_id, (colour, _, _, _) in segments.items():
        image[ids == seg_id] = colour
    pan = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    img_file, pan_file = tmp_path / "img.png", tmp_path / "pan.png"
    Image.fromarray(image).save(img_file)
    Image.fromarray(pan).save(pan_file)
    info = [
        {"id": i, "category_id": c, "iscrowd": crowd, "isthing": c < 3}
        for i, (_, c, crowd, _) in segments.items()
    ]
    return {"file_name": str(img_file), "image_id": 1, "pan_seg_file_name": str(pan_file),
            "segments_info": info}


def _mapper(augs, is_train=True):
    from panoptic_segformer.data import PanopticDatasetMapper

    return PanopticDatasetMapper(is_train=is_train, augmentations=augs, image_format="RGB")


def _by_class_colour(out):
    """{colour tuple: (class, mask, box)} from the mapper output, using the image under each mask."""
    image = out["image"].permute(1, 2, 0).numpy()
    inst = out["instances"]
    ret = {}
    for cls, mask, box in zip(inst.gt_classes.tolist(), inst.gt_masks.numpy(), inst.gt_boxes.tensor.tolist()):
        colours = np.unique(image[mask].reshape(-1, 3), axis=0)
        assert len(colours) == 1, "a mask covers pixels of several segments"
        ret[tuple(colours[0].tolist())] = (cls, mask, box)
    return ret


def _colour(seg_id):
    return SEGMENTS[seg_id][0]


def test_identity_mapping_drops_crowd_and_keeps_alignment(tmp_path):
    out = _mapper([])(_write_sample(tmp_path))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert (out["height"], out["width"]) == (H, W)
    inst = out["instances"]
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (3, H, W)
    assert inst.gt_classes.dtype == torch.int64
    segs = _by_class_colour(out)
    assert _colour(11) not in segs  # crowd dropped: no target ...
    assert not inst.gt_masks[:, 30:38, 22:34].any()  # ... and its pixels belong to no mask
    assert segs[_colour(7)][0] == 0 and segs[_colour(9)][0] == 1 and segs[_colour(300)][0] == 3
    assert segs[_colour(7)][2] == [4, 5, 20, 25]  # xyxy from the mask, exclusive max
    assert segs[_colour(9)][2] == [40, 10, 56, 30]
    assert segs[_colour(300)][2] == [0, 0, W, H]


def test_horizontal_flip_keeps_masks_boxes_and_classes_aligned(tmp_path):
    from detectron2.data import transforms as T

    out = _mapper([T.RandomFlip(prob=1.0, horizontal=True)])(_write_sample(tmp_path))
    segs = _by_class_colour(out)
    # x' = W - x: [4, 20) -> [40, 56), [40, 56) -> [4, 20)
    assert segs[_colour(7)][0] == 0 and segs[_colour(7)][2] == [40, 5, 56, 25]
    assert segs[_colour(9)][0] == 1 and segs[_colour(9)][2] == [4, 10, 20, 30]
    assert segs[_colour(7)][1][5:25, 40:56].all() and segs[_colour(7)][1].sum() == 20 * 16


def test_crop_drops_vanished_segments_and_shifts_boxes(tmp_path):
    from detectron2.data import transforms as T

    # keep x in [10, 35), y in [0, 40): thing B (x >= 40) vanishes entirely
    out = _mapper([T.CropTransform(10, 0, 25, 40)])(_write_sample(tmp_path))
    assert out["image"].shape == (3, 40, 25)
    segs = _by_class_colour(out)
    assert _colour(9) not in segs
    assert sorted(v[0] for v in segs.values()) == [0, 3]
    assert segs[_colour(7)][2] == [0, 5, 10, 25]  # clipped to the crop
    assert out["instances"].gt_masks.shape == (2, 40, 25)


def test_resize_keeps_alignment(tmp_path):
    from detectron2.data import transforms as T

    out = _mapper([T.ResizeTransform(H, W, 2 * H, 2 * W, Image.NEAREST)])(_write_sample(tmp_path))
    segs = _by_class_colour(out)
    assert segs[_colour(7)][2] == [8, 10, 40, 50]
    assert segs[_colour(9)][2] == [80, 20, 112, 60]


def _cfg(**input_overrides):
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.DETR_CROP.PRE_RESIZE_SHORTEST = [40, 50, 60]
    cfg.INPUT.DETR_CROP.PRE_RESIZE_MAX = 400
    cfg.INPUT.DETR_CROP.SIZE = [24, 36]
    for k, v in input_overrides.items():
        setattr(cfg.INPUT, k, v)
    return cfg


@pytest.mark.parametrize("mapper_name", ["panoptic_detr", "panoptic_lsj"])
def test_random_pipelines_keep_targets_consistent(tmp_path, mapper_name):
    """Random flips/resizes/crops: masks are disjoint, each covers one segment's colour in the
    image (interior of the resized image), classes follow the colour, boxes enclose the masks."""
    from detectron2.data import transforms as T
    from detectron2.structures import BitMasks

    from panoptic_segformer.data import PanopticDatasetMapper

    cfg = _cfg(DATASET_MAPPER_NAME=mapper_name)
    cfg.INPUT.LSJ.IMAGE_SIZE = 64
    cfg.INPUT.LSJ.MIN_SCALE, cfg.INPUT.LSJ.MAX_SCALE = 0.6, 1.5  # keep the tiny segments visible
    mapper = PanopticDatasetMapper(cfg, True)
    if mapper_name == "panoptic_lsj":
        assert any(isinstance(a, T.FixedSizeCrop) for a in mapper.augmentations.augs)
    sample = _write_sample(tmp_path)
    colour_to_class = {c: cls for c, cls, crowd, _ in SEGMENTS.values() if not crowd}
    sizes = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(sample)
        image = out["image"].permute(1, 2, 0).numpy().astype(np.int64)
        inst = out["instances"]
        sizes.add(tuple(out["image"].shape[1:]))
        masks = inst.gt_masks
        assert masks.shape[1:] == out["image"].shape[1:]
        assert masks.sum(0).max() <= 1, "masks overlap"
        assert masks.flatten(1).any(1).all(), "an empty mask was kept"
        assert torch.equal(inst.gt_boxes.tensor, BitMasks(masks).get_bounding_boxes().tensor)
        for cls, mask in zip(inst.gt_classes.tolist(), masks.numpy()):
            colour = np.median(image[mask], axis=0)
            nearest = min(colour_to_class, key=lambda c: np.abs(np.array(c) - colour).sum())
            assert np.abs(np.array(nearest) - colour).sum() < 60
            assert colour_to_class[nearest] == cls
    if mapper_name == "panoptic_lsj":
        assert sizes == {(64, 64)}
    else:
        assert len(sizes) > 1, "augmentation never changed the size"


def test_detr_augmentation_branches():
    from detectron2.data import transforms as T

    from panoptic_segformer.data import RandomChoiceAugmentation, build_detr_augmentation

    augs = build_detr_augmentation(_cfg(RANDOM_FLIP="horizontal"))
    assert isinstance(augs[0], T.RandomFlip)
    choice = augs[1]
    assert isinstance(choice, RandomChoiceAugmentation) and choice.prob == 0.5
    assert [type(a) for a in choice.first.augs] == [T.ResizeShortestEdge]
    assert [type(a) for a in choice.second.augs] == [T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge]
    assert choice.second.augs[1].crop_type == "absolute_range"
    assert choice.second.augs[1].crop_size == (24, 36)
    cfg = _cfg(RANDOM_FLIP="none")
    cfg.INPUT.DETR_CROP.ENABLED = False
    assert [type(a) for a in build_detr_augmentation(cfg)] == [T.ResizeShortestEdge]
    with pytest.raises(ValueError, match="prob"):
        RandomChoiceAugmentation([], [], prob=1.5)


def test_random_choice_follows_probability():
    from detectron2.data import transforms as T

    from panoptic_segformer.data import RandomChoiceAugmentation

    image = np.zeros((20, 30, 3), np.uint8)
    for prob, expected in [(1.0, (10, 15)), (0.0, (40, 60))]:
        aug = RandomChoiceAugmentation([T.Resize((10, 15))], [T.Resize((40, 60))], prob=prob)
        inp = T.AugInput(image.copy())
        aug(inp)
        assert inp.image.shape[:2] == expected


def test_unknown_mapper_name_is_an_error():
    from panoptic_segformer.data import PanopticDatasetMapper

    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME"):
        PanopticDatasetMapper(_cfg(DATASET_MAPPER_NAME="nope"), True)


def test_image_without_segments_passes(tmp_path):
    sample = _write_sample(tmp_path)
    sample["segments_info"] = []
    out = _mapper([])(sample)
    inst = out["instances"]
    assert len(inst) == 0 and inst.gt_masks.shape == (0, H, W) and inst.gt_boxes.tensor.shape == (0, 4)


def test_only_crowd_segments_gives_empty_targets(tmp_path):
    sample = _write_sample(tmp_path)
    for s in sample["segments_info"]:
        s["iscrowd"] = 1
    assert len(_mapper([])(sample)["instances"]) == 0


def test_test_mode_returns_image_only(tmp_path):
    from detectron2.data import transforms as T

    out = _mapper([T.ResizeShortestEdge(80, 200)], is_train=False)(_write_sample(tmp_path))
    assert out["image"].shape == (3, 80, 120) and "instances" not in out
    assert (out["height"], out["width"]) == (H, W)


def test_missing_files_are_named(tmp_path):
    sample = _write_sample(tmp_path)
    missing = dict(sample, file_name=str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        _mapper([])(missing)
    missing_png = dict(sample, pan_seg_file_name=str(tmp_path / "nope.png"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        _mapper([])(missing_png)


def test_corrupt_files_are_named(tmp_path):
    sample = _write_sample(tmp_path)
    bad_img = tmp_path / "corrupt.jpg"
    bad_img.write_bytes(b"this is not an image")
    with pytest.raises(OSError, match="corrupt.jpg"):
        _mapper([])(dict(sample, file_name=str(bad_img)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(sample["pan_seg_file_name"], "rb").read()[:60])
    with pytest.raises(OSError, match="truncated.png"):
        _mapper([])(dict(sample, pan_seg_file_name=str(truncated)))


def test_panoptic_png_of_wrong_size_is_an_error(tmp_path):
    sample = _write_sample(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png"):
        _mapper([])(dict(sample, pan_seg_file_name=str(tmp_path / "small.png")))
