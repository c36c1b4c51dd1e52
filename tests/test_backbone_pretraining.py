"""Backbone pretraining on thing crops (engine/backbone_pretraining.py, tools/pretrain_backbone.py):
the crops and labels of hand-built records, the checkpoint it writes and its loading into the
whole model, errors."""
import importlib.util
import uuid

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, requires_detectron2
from PIL import Image

pytestmark = requires_detectron2

CONFIG = str(REPO_ROOT / "configs" / "quickstart.yaml")


def _record(tmp_path, segments, size=(40, 50)):
    image = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(*size, 3)
    path = tmp_path / f"{uuid.uuid4().hex}.png"
    Image.fromarray(image).save(path)
    return {"file_name": str(path), "segments_info": segments}, image


def test_crops_and_labels(tmp_path):
    from panoptic_segformer.engine.backbone_pretraining import thing_crops

    segments = [
        {"category_id": 7, "bbox": [10, 20, 8, 4], "iscrowd": 0},   # thing 7 -> label 1
        {"category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 0},     # thing 2 -> label 0, clipped at 0
        {"category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 1},   # crowd: skipped
        {"category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 0},   # stuff: skipped
    ]
    record, image = _record(tmp_path, segments)
    crops, labels = thing_crops([record, {**record, "segments_info": segments[2:]}], "RGB", thing_ids=[2, 7])
    assert labels.tolist() == [1, 0]
    # margin 0.25 of the longer side (8 -> 2 px) on each side: x 8..20, y 18..26
    assert torch.equal(crops[0], torch.from_numpy(image[18:26, 8:20]).permute(2, 0, 1))
    # margin 1 px, clipped at the image border: x 0..5, y 0..5
    assert torch.equal(crops[1], torch.from_numpy(image[0:5, 0:5]).permute(2, 0, 1))
    assert all(c.dtype == torch.uint8 for c in crops)


def test_pretrained_backbone_checkpoint_loads_into_the_model(tmp_path):
    import panoptic_segformer  # noqa: F401  (registers the meta-architecture)
    from detectron2.modeling import build_model

    from panoptic_segformer.checkpoint import SafeCheckpointer
    from panoptic_segformer.config import get_panoptic_segformer_cfg
    from panoptic_segformer.data import register_toy_panoptic

    names = register_toy_panoptic(str(tmp_path / "toy"), prefix=f"toypre{uuid.uuid4().hex[:6]}",
                                  num_images={"train": 6, "val": 1}, style="hard")
    spec = importlib.util.spec_from_file_location("psf_pretrain", REPO_ROOT / "tools" / "pretrain_backbone.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "sub" / "backbone.pth"
    tool.main(["--config-file", CONFIG, "--output", str(out), "--steps", "4", "--batch-size", "4",
               "--opts", "DATASETS.TRAIN", f"('{names[0]}',)", "MODEL.DEVICE", "cpu"])
    state = torch.load(out, weights_only=True)["model"]
    assert state and all(k.startswith("backbone.") for k in state)

    cfg = get_panoptic_segformer_cfg(CONFIG, ["DATASETS.TRAIN", f"('{names[0]}',)"], device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = SafeCheckpointer(model)
    checkpointer.load(str(out))
    after = model.state_dict()
    assert set(state) <= set(after)
    for k, v in state.items():
        assert torch.equal(after[k], v)
    # the backbone changed (its conv weights were trained); nothing else was touched
    assert not torch.equal(before["backbone.stem.conv1.weight"], after["backbone.stem.conv1.weight"])
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("backbone."))
    assert not [k for k in checkpointer.incompatible.missing_keys if k.startswith("backbone.")]


def test_bad_arguments_and_a_dataset_without_things(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from panoptic_segformer.config import get_panoptic_segformer_cfg
    from panoptic_segformer.engine.backbone_pretraining import pretrain_backbone

    cfg = get_panoptic_segformer_cfg(CONFIG, [], device="cpu")
    with pytest.raises(ValueError, match="steps >= 1"):
        pretrain_backbone(cfg, steps=0)
    with pytest.raises(ValueError, match="sizes >= 32"):
        pretrain_backbone(cfg, sizes=(16,))
    record, _ = _record(tmp_path, [{"category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 0}])
    name = f"stuff_only_{uuid.uuid4().hex[:6]}"
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={1: 0})
    with pytest.raises(ValueError, match="no thing segments"):
        pretrain_backbone(cfg, dataset_name=name, steps=1)
