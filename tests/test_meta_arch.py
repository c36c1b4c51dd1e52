"""End-to-end tests of the PanopticSegFormer meta-architecture (issue 3).

Most tests use a small but real model: a Detectron2 ResNet-18 backbone and a narrow head
(64 channels, 1 encoder layer, 2 location-decoder layers, 2+2 mask blocks, 20 queries) on
images of 64-160 px, for a toy dataset with 3 thing and 2 stuff classes whose contiguous ids
are interleaved (things 0, 2, 4; stuff 1, 3) so that the thing/stuff index mapping is exercised.
"""
import math

import pytest
import torch

from conftest import requires_detectron2

pytestmark = requires_detectron2

TOY = "psf_test_toy_3th_2st"
TOY_THING_IDS = [0, 2, 4]  # contiguous ids of the 3 thing classes
TOY_STUFF_IDS = [1, 3]


def _register_toy():
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(TOY)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        names = ["circle", "sky", "square", "grass", "triangle"]
        meta.set(
            thing_classes=names,
            stuff_classes=names,
            thing_dataset_id_to_contiguous_id={11: 0, 13: 2, 15: 4},
            stuff_dataset_id_to_contiguous_id={12: 1, 14: 3},
        )


def small_cfg(**head):
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    _register_toy()
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "PanopticSegFormer"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATASETS.TRAIN = (TOY,)
    m = cfg.MODEL.PANOPTIC_SEGFORMER
    m.HIDDEN_DIM = 64
    m.NECK_NUM_GROUPS = 8
    m.NHEADS = 4
    m.ENC_LAYERS = 1
    m.DEC_LAYERS = 2
    m.DIM_FEEDFORWARD = 128
    m.ENC_N_POINTS = 2
    m.DEC_N_POINTS = 2
    m.NUM_QUERIES = 20
    m.THING_MASK_DECODER_LAYERS = 2
    m.STUFF_MASK_DECODER_LAYERS = 2
    m.TEST.NUM_THING_CANDIDATES = 10
    for k, v in head.items():
        setattr(m, k, v)
    return cfg


def build(cfg, seed=0):
    from detectron2.modeling import build_model

    import panoptic_segformer.modeling.meta_arch  # noqa: F401  (registers the meta-arch)

    torch.manual_seed(seed)
    return build_model(cfg)


def synthetic_input(h=96, w=128, seed=0, with_targets=True):
    """An image with 2 stuff regions (top: "sky" id 1, bottom: "grass" id 3) and 3 things."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, h, w)
    image[:, : h // 2] = torch.tensor([90.0, 140.0, 230.0])[:, None, None]
    image[:, h // 2 :] = torch.tensor([60.0, 170.0, 60.0])[:, None, None]
    boxes = [
        (w * 0.1, h * 0.15, w * 0.4, h * 0.55),
        (w * 0.5, h * 0.5, w * 0.8, h * 0.9),
        (w * 0.2, h * 0.6, w * 0.35, h * 0.85),
    ]
    colours = [(250.0, 30.0, 30.0), (240.0, 240.0, 20.0), (20.0, 20.0, 20.0)]
    masks = [torch.zeros(h, w, dtype=torch.bool) for _ in range(5)]
    masks[3][: h // 2] = True
    masks[4][h // 2 :] = True
    for j, ((x0, y0, x1, y1), c) in enumerate(zip(boxes, colours)):
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        image[:, y0:y1, x0:x1] = torch.tensor(c)[:, None, None]
        for m in masks:
            m[y0:y1, x0:x1] = False
        masks[j][y0:y1, x0:x1] = True
        boxes[j] = (x0, y0, x1, y1)
    image = (image + torch.randint(-10, 10, (3, h, w), generator=g)).clamp(0, 255).to(torch.uint8)
    out = {"image": image, "height": h, "width": w}
    if with_targets:
        inst = Instances((h, w))
        inst.gt_classes = torch.tensor([0, 2, 4, 1, 3])
        inst.gt_masks = torch.stack(masks)
        inst.gt_boxes = Boxes(torch.tensor(boxes + [(0, 0, w, h // 2), (0, h // 2, w, h)], dtype=torch.float32))
        out["instances"] = inst
    return out


def permissive(model):
    """Merging thresholds that let random-weight masks through, so outputs are non-empty."""
    model.merge_kwargs.update(
        thing_score_thresh=0.0, stuff_score_thresh=0.0, thing_overlap_thresh=1.0, stuff_overlap_thresh=1.0
    )
    model.mask_threshold = model.merge_kwargs["mask_threshold"] = 0.0
    return model


def check_panoptic(out, height, width, thing_ids, stuff_ids):
    pan, segments = out["panoptic_seg"]
    assert pan.dtype == torch.int32 and tuple(pan.shape) == (height, width)
    ids = set(torch.unique(pan).tolist()) - {0}
    assert ids == {s["id"] for s in segments}
    for s in segments:
        assert set(s) >= {"id", "category_id", "isthing", "score"}
        assert s["category_id"] in (thing_ids if s["isthing"] else stuff_ids)


# --------------------------------------------------------------------------- units
def test_metadata_split_and_head_sizes():
    from detectron2.data import MetadataCatalog

    from panoptic_segformer.modeling.meta_arch import thing_stuff_ids_from_metadata

    _register_toy()
    assert thing_stuff_ids_from_metadata(MetadataCatalog.get(TOY)) == (TOY_THING_IDS, TOY_STUFF_IDS)
    # Mask2Former-style metadata lists every class in the stuff map: things are not stuff
    meta = MetadataCatalog.get("psf_test_all_in_stuff")
    meta.set(thing_dataset_id_to_contiguous_id={5: 0}, stuff_dataset_id_to_contiguous_id={5: 0, 7: 1, 9: 2})
    assert thing_stuff_ids_from_metadata(meta) == ([0], [1, 2])
    with pytest.raises(ValueError, match="no thing classes"):
        thing_stuff_ids_from_metadata(MetadataCatalog.get("psf_test_no_metadata"))
    stuff_only = MetadataCatalog.get("psf_test_stuff_only")
    stuff_only.set(thing_dataset_id_to_contiguous_id={}, stuff_dataset_id_to_contiguous_id={3: 0, 4: 1})
    with pytest.raises(ValueError, match="'psf_test_stuff_only' has no thing classes"):
        thing_stuff_ids_from_metadata(stuff_only)
    # no (or an empty) stuff map: a things-only dataset
    things_only = MetadataCatalog.get("psf_test_things_only_split")
    things_only.set(thing_dataset_id_to_contiguous_id={5: 1, 3: 0})
    assert thing_stuff_ids_from_metadata(things_only) == ([0, 1], [])

    model = build(small_cfg())
    assert model.head.location_decoder.class_heads[0].out_features == 3
    assert model.head.stuff_queries.weight.shape == (2, 128)
    assert model.thing_ids.tolist() == TOY_THING_IDS and model.stuff_ids.tolist() == TOY_STUFF_IDS


def test_separated_metadata_is_rejected():
    """Detectron2's "separated" metadata gives stuff its own id space with a "things" class 0."""
    import detectron2.data.datasets  # noqa: F401  (registers the builtin metadata)
    from detectron2.data import MetadataCatalog

    from panoptic_segformer.modeling.meta_arch import thing_stuff_ids_from_metadata

    match = "coco_2017_train_panoptic, not coco_2017_train_panoptic_separated"
    with pytest.raises(ValueError, match=match):
        thing_stuff_ids_from_metadata(MetadataCatalog.get("coco_2017_train_panoptic_separated"))
    standard = thing_stuff_ids_from_metadata(MetadataCatalog.get("coco_2017_train_panoptic"))
    assert [len(ids) for ids in standard] == [80, 53]
    # by hand: contiguous 0 is stuff dataset id 0 ("things") but thing dataset id 5
    meta = MetadataCatalog.get("psf_test_separated_by_hand")
    meta.set(thing_dataset_id_to_contiguous_id={5: 0, 6: 1}, stuff_dataset_id_to_contiguous_id={0: 0, 9: 1})
    with pytest.raises(ValueError, match="contiguous id 0 is stuff dataset id 0 but thing dataset id 5"):
        thing_stuff_ids_from_metadata(meta)


def test_level_masks_by_hand():
    model = build(small_cfg())
    # a 100 x 70 image in a batch padded to 128 x 96: levels 16x12, 8x6, 4x3, 2x2
    masks, valid = model.level_masks([(100, 70), (128, 96)], [(16, 12), (8, 6), (4, 3), (2, 2)])
    assert valid[0].tolist() == [[13, 9], [7, 5], [4, 3], [2, 2]]
    assert valid[1].tolist() == [[16, 12], [8, 6], [4, 3], [2, 2]]
    expected0 = torch.ones(16, 12, dtype=torch.bool)
    expected0[:13, :9] = False
    assert torch.equal(masks[0][0], expected0)
    assert not masks[0][1].any() and not masks[3].any()
    assert masks[1][0, 6, :5].tolist() == [False] * 5 and masks[1][0, 7].all() and masks[1][0, :, 5].all()


def test_prepare_targets_by_hand():
    model = build(small_cfg())
    x = synthetic_input(96, 128)
    # a second "sky" segment: stuff segments of one class are merged into one target
    from detectron2.structures import Boxes, Instances

    base = x["instances"]
    extra = torch.zeros(1, 96, 128, dtype=torch.bool)
    extra[0, 0, :4] = True
    inst = Instances((96, 128))
    inst.gt_classes = torch.cat([base.gt_classes, torch.tensor([1])])
    inst.gt_masks = torch.cat([base.gt_masks, extra])
    inst.gt_boxes = Boxes(torch.cat([base.gt_boxes.tensor, torch.tensor([[0.0, 0.0, 4.0, 1.0]])]))
    x["instances"] = inst
    (t,) = model.prepare_targets([x], [(96, 128)], (128, 160))
    assert t["labels"].tolist() == [0, 1, 2]  # contiguous 0, 2, 4 -> thing index 0, 1, 2
    assert t["stuff_labels"].tolist() == [0, 1]  # contiguous 1, 3 -> stuff index 0, 1
    x0, y0, x1, y1 = inst.gt_boxes.tensor[0].tolist()
    expected = torch.tensor([(x0 + x1) / 2 / 128, (y0 + y1) / 2 / 96, (x1 - x0) / 128, (y1 - y0) / 96])
    assert torch.allclose(t["boxes"][0], expected)
    assert t["masks"].shape == (3, 128, 160) and t["masks"].dtype == torch.float32
    assert torch.equal(t["masks"][:, :96, :128], inst.gt_masks[:3].float()) and t["masks"][:, 96:].sum() == 0
    sky = inst.gt_masks[3] | inst.gt_masks[5]
    assert torch.equal(t["stuff_masks"][0, :96, :128], sky.float())
    assert torch.equal(t["stuff_masks"][1, :96, :128], inst.gt_masks[4].float())
    # an id that is neither thing nor stuff is an error naming the ids
    inst.gt_classes[0] = 7
    with pytest.raises(ValueError, match="neither thing nor stuff"):
        model.prepare_targets([x], [(96, 128)], (128, 160))


def test_backbone_groups_are_padding_invariant():
    model = build(small_cfg()).eval()
    small = synthetic_input(70, 100, with_targets=False)
    large = synthetic_input(150, 90, seed=1, with_targets=False)
    with torch.no_grad():
        images, sizes, batch = model.preprocess_image([small, large])
        assert batch == (160, 128)
        both = model._backbone_features(images, sizes, batch)
        images1, sizes1, batch1 = model.preprocess_image([small])
        alone = model._backbone_features(images1, sizes1, batch1)
    for a, b, s in zip(alone, both, (8, 16, 32)):
        assert b.shape[-2:] == (160 // s, 128 // s)
        assert torch.equal(b[0, :, : a.shape[-2], : a.shape[-1]], a[0])
        assert b[0, :, a.shape[-2] :].abs().sum() == 0 and b[0, :, :, a.shape[-1] :].abs().sum() == 0


def test_bad_input_errors():
    model = build(small_cfg()).eval()
    with pytest.raises(ValueError, match="empty"):
        model([])
    with pytest.raises(ValueError, match="image 0"):
        model([{"image": torch.zeros(1, 64, 64, dtype=torch.uint8)}])
    model.train()
    with pytest.raises(ValueError, match="instances"):
        model([synthetic_input(with_targets=False)])


# --------------------------------------------------------------------------- inference
@pytest.mark.parametrize("flags", [(True, False, False), (True, True, True)])
def test_output_format_batches_of_1_and_2(flags):
    model = build(small_cfg()).eval()
    model.panoptic_on, model.instance_on, model.semantic_on = flags
    permissive(model)
    a = synthetic_input(96, 128, with_targets=False)
    a["height"], a["width"] = 150, 200  # output at another (original) size
    b = synthetic_input(64, 160, seed=1, with_targets=False)
    with torch.no_grad():
        out1 = model([a])
        out2 = model([a, b])
    assert len(out1) == 1 and len(out2) == 2
    for out, (h, w) in zip(out1 + out2, [(150, 200), (150, 200), (64, 160)]):
        check_panoptic(out, h, w, TOY_THING_IDS, TOY_STUFF_IDS)
        assert len(out["panoptic_seg"][1]) > 0
        if model.instance_on:
            inst = out["instances"]
            assert inst.image_size == (h, w) and len(inst) == 10
            assert inst.pred_masks.shape == (10, h, w) and inst.pred_masks.dtype == torch.bool
            assert set(inst.pred_classes.tolist()) <= set(TOY_THING_IDS)
            box = inst.pred_boxes.tensor
            assert ((box >= 0) & (box <= torch.tensor([w, h, w, h]))).all()
            assert (inst.scores >= 0).all()
        if model.semantic_on:
            sem = out["sem_seg"]
            assert sem.shape == (5, h, w) and (sem >= 0).all() and (sem <= 1).all()
        else:
            assert "sem_seg" not in out and "instances" not in out


@pytest.mark.parametrize("backbone_config", [None, "PVTv2-B0.yaml"])
def test_padding_invariance(backbone_config):
    """An image gives the same panoptic output alone and in a batch of 2 with a larger image,
    with a convolutional (ResNet-18) and a transformer (timm PVTv2-B0) backbone."""
    cfg = small_cfg()
    if backbone_config:
        from conftest import REPO_ROOT

        cfg.merge_from_file(str(REPO_ROOT / "configs" / backbone_config))
        cfg.DATASETS.TRAIN = (TOY,)
    model = permissive(build(cfg, seed=3).eval())
    small = synthetic_input(72, 100, with_targets=False)
    large = synthetic_input(150, 170, seed=1, with_targets=False)
    with torch.no_grad():
        alone = model([small])[0]["panoptic_seg"]
        batched = model([small, large])[0]["panoptic_seg"]
    assert {s["isthing"] for s in alone[1]} == {True, False}  # things and stuff painted
    assert torch.equal(alone[0], batched[0])
    assert len(alone[1]) == len(batched[1])
    for s, t in zip(alone[1], batched[1]):
        for k in ("id", "category_id", "isthing"):
            assert s[k] == t[k]
        assert math.isclose(s["score"], t["score"], rel_tol=1e-4, abs_tol=1e-6)


def test_merge_prefilter_is_exact():
    """Candidates dropped before resizing could not have produced a segment."""
    from panoptic_segformer.modeling.merging import mask_wise_merging

    model = build(small_cfg())
    model.merge_kwargs.update(thing_score_thresh=0.3, stuff_score_thresh=0.2)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 9, 11, generator=g) * 1.4
    masks[3] = 0.4  # never above the mask threshold
    probs = torch.rand(12, generator=g)
    labels = torch.tensor([0, 2, 4, 0, 2, 4, 0, 2, 1, 3, 1, 3])
    is_thing = torch.arange(12) < 8
    got = model._merge(masks, labels, probs, is_thing, (37, 45))
    full = torch.nn.functional.interpolate(masks[None], size=(37, 45), mode="bilinear", align_corners=False)[0]
    ref = mask_wise_merging(full, labels, probs, is_thing, **model.merge_kwargs)
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1]
    assert len(ref[1]) > 0


# --------------------------------------------------------------------------- training
LOSS_KEYS_FMT = ["loss_cls_d{l}", "loss_bbox_d{l}", "loss_giou_d{l}"]


def expected_loss_keys(dec_layers, thing_blocks, stuff_blocks):
    keys = {f.format(l=l) for f in LOSS_KEYS_FMT for l in range(dec_layers)}
    keys |= {"loss_mask_things", "loss_mask_stuff"}
    keys |= {f"loss_mask_things_d{j}" for j in range(thing_blocks)}
    keys |= {f"loss_mask_stuff_d{j}" for j in range(stuff_blocks)}
    keys |= {f"loss_cls_stuff_d{j}" for j in range(stuff_blocks)}
    return keys


def test_one_training_step_losses_and_gradients():
    model = build(small_cfg()).train()
    losses = model([synthetic_input(96, 128), synthetic_input(64, 112, seed=1)])
    assert set(losses) == expected_loss_keys(2, 2, 2)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 100
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    # the stem and res2 are frozen (FREEZE_AT = 2)
    frozen = [p for n, p in model.named_parameters() if n.startswith(("backbone.stem", "backbone.res2"))]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_batch_without_things_trains():
    """A stuff-only image and an image without any segment: finite losses, every parameter reached."""
    model = build(small_cfg()).train()
    x = synthetic_input(64, 96)
    keep = x["instances"].gt_classes % 2 == 1  # stuff only
    x["instances"] = x["instances"][keep]
    empty = synthetic_input(64, 64, seed=2)
    empty["instances"] = empty["instances"][torch.zeros(5, dtype=torch.bool)]
    losses = model([x, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls_stuff_d1"] > 0  # deviation (d): computed without thing queries
    assert losses["loss_mask_things"] == 0 and losses["loss_cls_d1"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def segment_ious(panoptic, instances):
    """For each GT segment, the IoU of the best predicted segment of the same category and kind."""
    pan, segments = panoptic
    ious = []
    for c, gt in zip(instances.gt_classes.tolist(), instances.gt_masks):
        best = 0.0
        for s in segments:
            if s["category_id"] == c and s["isthing"] == (c in TOY_THING_IDS):
                pred = pan == s["id"]
                best = max(best, ((pred & gt).sum() / (pred | gt).sum()).item())
        ious.append(best)
    return ious


def test_thirty_steps_reduce_the_loss_and_sixty_overfit_one_image():
    """30 AdamW steps on one synthetic image cut the total loss; after 60 the default-threshold
    panoptic output recovers every GT segment (3 things, 2 stuff) with its category."""
    torch.manual_seed(0)
    model = build(small_cfg(DROPOUT=0.0)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=1e-4)
    x = synthetic_input(64, 96)
    history = []
    for _ in range(60):
        losses = model([x])
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(total.item())
    assert sum(history[27:30]) / 3 < 0.6 * sum(history[:3]) / 3, history
    assert history[-1] < history[29], history
    model.eval()
    with torch.no_grad():
        (out,) = model([synthetic_input(64, 96, with_targets=False)])
    ious = segment_ious(out["panoptic_seg"], x["instances"])
    assert min(ious) > 0.5, (ious, out["panoptic_seg"][1])
    assert len(out["panoptic_seg"][1]) == 5  # no spurious segment either


def test_three_things_two_stuff_trains_and_infers():
    model = build(small_cfg())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses = model([synthetic_input(64, 96)])
    sum(losses.values()).backward()
    opt.step()
    model.eval()
    permissive(model)
    with torch.no_grad():
        (out,) = model([synthetic_input(64, 96, with_targets=False)])
    check_panoptic(out, 64, 96, TOY_THING_IDS, TOY_STUFF_IDS)
    cats = {(s["category_id"], s["isthing"]) for s in out["panoptic_seg"][1]}
    assert cats and all((c in TOY_THING_IDS) == isthing for c, isthing in cats)


THINGS_ONLY = "psf_test_toy_things_only"


def test_things_only_dataset_trains_and_infers():
    """No stuff map in the metadata: no stuff branch is built, thing losses get their full weight
    (r_th = 1), one training step reaches every parameter and inference paints things only."""
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get(THINGS_ONLY).set(thing_dataset_id_to_contiguous_id={11: 0, 13: 1, 15: 2})
    cfg = small_cfg()
    cfg.DATASETS.TRAIN = (THINGS_ONLY,)
    model = build(cfg).train()
    assert model.head.num_stuff_classes == 0 and model.stuff_ids.numel() == 0
    assert not any(n.startswith("head.stuff") for n, _ in model.named_parameters())
    x = synthetic_input(64, 96)
    x["instances"] = x["instances"][:3]  # the 3 things
    x["instances"].gt_classes = torch.tensor([0, 1, 2])
    losses = model([x])
    keys = {f.format(l=l) for f in LOSS_KEYS_FMT for l in range(2)}
    assert set(losses) == keys | {"loss_mask_things", "loss_mask_things_d0", "loss_mask_things_d1"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    targets = model.prepare_targets([x], [(64, 96)], (64, 96))
    assert set(targets[0]) == {"labels", "boxes", "masks"}
    assert model.criterion.balance_ratios(targets, "cpu")[2:] == (1.0, 0.0)

    model.eval()
    permissive(model)
    model.semantic_on = model.instance_on = True
    with torch.no_grad():
        (out,) = model([synthetic_input(64, 96, with_targets=False)])
    check_panoptic(out, 64, 96, [0, 1, 2], [])
    assert out["panoptic_seg"][1] and all(s["isthing"] for s in out["panoptic_seg"][1])
    assert out["sem_seg"].shape == (3, 64, 96) and len(out["instances"]) == 10  # NUM_THING_CANDIDATES
