"""The official-compatible inference mode (MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT, issue 13).

The official computation of the pieces the mode changes is rebuilt here from the facts of the
official code (SPEC §6, §4.2, mmcv 1.3.4), without the official code: its resize (mmcv
``imrescale``: size rule + ``cv2.resize`` bilinear), its normalisation (mmcv ``imnormalize``), one
unpadded image at a time, the mask tails upsampling the coarse levels to the *unpadded* stride-8
size, and the stride-8 masks resized straight to the original size before the merging loop.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, requires_detectron2
from test_meta_arch import build, permissive, small_cfg, synthetic_input

pytestmark = requires_detectron2

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def compat_model(seed=3, **head):
    cfg = small_cfg(**head)
    cfg.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT = True
    return permissive(build(cfg, seed=seed).eval())


# --------------------------------------------------------------------------- resize
def _mmcv_size(h, w, short=800, long=1333):
    """mmcv 1.3.4 rescale_size((w, h), (long, short)) -> (new_h, new_w)."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def test_official_resize_size_rule_and_pixels():
    import cv2
    from detectron2.data import transforms as T

    from panoptic_segformer.data import CV2ResizeTransform, MMCVRescale, build_test_resize

    aug = build_test_resize(800, 1333, official=True)
    assert isinstance(aug, MMCVRescale)
    # the two COCO sample sizes (the long side binds for the second one)
    assert aug.get_output_shape(427, 640) == (800, 1199) == _mmcv_size(427, 640)
    assert aug.get_output_shape(360, 640) == (750, 1333) == _mmcv_size(360, 640)
    # the rules agree but for float rounding at .5 when the long side binds (88 of 653,800 sizes
    # from 100 to 1500 px): 105 x 310 -> 105 * 1333 / 310 = 451.5; 149 x 298 -> 666.5
    assert aug.get_output_shape(105, 310) == (452, 1333) != T.ResizeShortestEdge.get_output_shape(105, 310, 800, 1333)
    assert aug.get_output_shape(149, 298) == (666, 1333) != T.ResizeShortestEdge.get_output_shape(149, 298, 800, 1333)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (61, 90, 3), dtype=np.uint8)
    tfm = build_test_resize(80, 200, official=True).get_transform(image)
    assert isinstance(tfm, CV2ResizeTransform) and (tfm.new_h, tfm.new_w) == _mmcv_size(61, 90, 80, 200) == (80, 118)
    out = tfm.apply_image(image)
    assert np.array_equal(out, cv2.resize(image, (118, 80), interpolation=cv2.INTER_LINEAR))
    # Detectron2's resize gives the same size but PIL's pixels
    d2 = build_test_resize(80, 200, official=False).get_transform(image)
    d2_out = d2.apply_image(image)
    assert d2_out.shape == out.shape and not np.array_equal(d2_out, out)
    # segmentation maps are resized with nearest; a short side of 0 leaves the image alone
    seg = rng.integers(0, 5, (61, 90), dtype=np.uint8)
    assert np.array_equal(tfm.apply_segmentation(seg), cv2.resize(seg, (118, 80), interpolation=cv2.INTER_NEAREST))
    assert isinstance(MMCVRescale(0, 0).get_transform(image), T.NoOpTransform)
    with pytest.raises(ValueError, match="expects an image of size"):
        tfm.apply_image(image[:60])
    with pytest.raises(ValueError, match="short <= long"):
        MMCVRescale(800, 600)


def test_configs_choose_the_resize():
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config
    from panoptic_segformer.data import MMCVRescale, PanopticDatasetMapper
    from panoptic_segformer.predictor import Predictor

    names = ["R50_12ep", "R50", "R101", "PVTv2-B5", "Swin-L"]  # the official releases
    for name in names:
        cfg, base = get_cfg(), get_cfg()
        add_panoptic_segformer_config(cfg)
        add_panoptic_segformer_config(base)
        cfg.merge_from_file(str(REPO_ROOT / "configs" / f"{name}_official.yaml"))
        base.merge_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
        assert cfg.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT and not base.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT
        base.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT = True
        assert cfg.dump() == base.dump(), name  # nothing else changes
    mapper = PanopticDatasetMapper(cfg, False)
    assert [type(a) for a in mapper.augmentations.augs] == [MMCVRescale]
    cfg = small_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT = True
    assert isinstance(Predictor(cfg).aug, MMCVRescale)


# --------------------------------------------------------------------------- normalisation, no padding
def test_official_normalisation_is_bitwise():
    import cv2

    model = compat_model()
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    (got,), sizes, batch = model.preprocess_image([{"image": image}])
    assert sizes == [(37, 53)] and batch == (37, 53)  # no padding at all
    # mmcv imnormalize_: float32 image, cv2.subtract(mean as float64), cv2.multiply(1 / std in float64)
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy()).astype(np.float32)
    cv2.subtract(hwc, np.float64(MEAN).reshape(1, -1), hwc)
    cv2.multiply(hwc, 1 / np.float64(STD).reshape(1, -1), hwc)
    assert torch.equal(got, torch.from_numpy(hwc).permute(2, 0, 1))


def test_backbone_sees_the_unpadded_image_one_at_a_time():
    model = compat_model()
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    a, b = synthetic_input(100, 70, with_targets=False), synthetic_input(61, 90, seed=1, with_targets=False)
    with torch.no_grad():
        model([a, b])
        model.official_compat = False
        model([a, b])
    # official-compatible: one call per image at its own size; default: padded to 32, grouped by size
    assert seen == [(1, 3, 100, 70), (1, 3, 61, 90), (1, 3, 128, 96), (1, 3, 64, 96)]


# --------------------------------------------------------------------------- mask decoders, merging
def _official_tail_mask(tail, query, memory, sizes):
    """The official AttentionTail mask (mask_head L190-270) of (B, N, C) queries on the memory of
    unpadded levels ``sizes``: heads-last logits, per-level Linear+ReLU, the coarse levels'
    head features upsampled to ``sizes[0]``, concatenated, Linear(3h -> 1)+ReLU."""
    b, n, c = query.shape
    h = tail.n_heads
    q = tail.q(query).view(b, n, h, c // h).transpose(1, 2)
    k = tail.k(memory).view(b, -1, h, c // h).transpose(1, 2)
    attn = ((q @ k.transpose(-1, -2)) * (c // h) ** -0.5).permute(0, 2, 3, 1)  # (B, N, S, h)
    feats, start = [], 0
    for lvl, (hl, wl) in enumerate(sizes):
        f = F.relu(F.linear(attn[:, :, start : start + hl * wl], tail.level_proj[lvl].weight, tail.level_proj[lvl].bias))
        start += hl * wl
        if lvl:
            f = f.permute(0, 1, 3, 2).reshape(b * n, h, hl, wl)
            f = F.interpolate(f, size=sizes[0], mode="bilinear", align_corners=False)
            f = f.permute(0, 2, 3, 1).reshape(b, n, -1, h)
        feats.append(f)
    mask = F.relu(F.linear(torch.cat(feats, -1), tail.mask_proj.weight, tail.mask_proj.bias))
    return mask.view(b, n, *sizes[0])


def _crop_memory(memory, padded, valid):
    """(1, S_padded, C) -> (1, S_valid, C): each level's valid top-left block."""
    parts, start = [], 0
    for (hp, wp), (h, w) in zip(padded, valid):
        parts.append(memory[0, start : start + hp * wp].view(hp, wp, -1)[:h, :w].reshape(h * w, -1))
        start += hp * wp
    return torch.cat(parts)[None]


def _official_merge(masks, labels, probs, is_thing, thresh):
    """The official merging loop (panformer_head L1138-1204), on masks at the original size."""
    m = masks
    binary = m > 0.5
    scores = probs * ((m * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1)) ** 2
    cat = torch.zeros(m.shape[-2:], dtype=torch.long)
    inst = torch.zeros(m.shape[-2:], dtype=torch.long)
    next_id = 1
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if scores[i] < thresh["score"][bool(is_thing[i])]:
            continue
        area = int(binary[i].sum())
        inter = int((binary[i] & (cat > 0)).sum())
        if area == 0 or inter / area > thresh["overlap"][bool(is_thing[i])]:
            continue
        free = binary[i] & (cat == 0)
        cat[free] = int(labels[i]) + 1
        if is_thing[i]:
            inst[free] = next_id
            next_id += 1
    return cat, inst


def test_compat_mode_computes_the_official_tail_masks_and_merge():
    """An image whose level sizes are not exact halvings (100 x 70: 13x9, 7x5, 4x3): the tails
    upsample to the unpadded stride-8 size like the official code, the stride-8 masks are resized
    straight to the output size and merged by the official loop."""
    model = compat_model()
    model.merge_kwargs.update(thing_score_thresh=0.05, stuff_score_thresh=0.05, thing_overlap_thresh=0.4,
                              stuff_overlap_thresh=0.2)
    model.mask_threshold = model.merge_kwargs["mask_threshold"] = 0.5
    for dec in (model.head.thing_mask_decoder, model.head.stuff_mask_decoder):  # masks that pass the 0.5 threshold
        dec.tail.mask_proj.weight.data *= 30
        dec.tail.mask_proj.bias.data.fill_(0.3)
    x = synthetic_input(100, 70, with_targets=False)
    x["height"], x["width"] = 150, 105  # the original size
    valid = [(math.ceil(100 / s), math.ceil(70 / s)) for s in (8, 16, 32)]
    tails, post = [], []
    for dec in (model.head.thing_mask_decoder, model.head.stuff_mask_decoder):
        dec.tail.register_forward_hook(lambda m, i, o: tails.append((m, i[0], i[1], o[1])))
    original_post = model._postprocess
    model._postprocess = lambda *a: post.append(a) or original_post(*a)

    with torch.no_grad():
        (out,) = model([x])
        for tail, query, memory, mask in tails:
            assert tuple(mask.shape[-2:]) == valid[0]
            torch.testing.assert_close(mask, _official_tail_mask(tail, query, memory, valid), atol=1e-5, rtol=1e-5)
        masks, labels, probs, num_things = post[0][:4]
        assert torch.equal(masks, torch.cat([tails[0][3][0], tails[1][3][0]]))  # nothing cropped
        full = F.interpolate(masks[None], size=(150, 105), mode="bilinear", align_corners=False)[0]
        is_thing = torch.arange(len(labels)) < num_things
        thresh = {"score": {True: 0.05, False: 0.05}, "overlap": {True: 0.4, False: 0.2}}
        cat, inst = _official_merge(full, labels, probs, is_thing, thresh)
        id_map, segments = out["panoptic_seg"]
        assert {s["isthing"] for s in segments} == {True, False}
        by_id = {s["id"]: s for s in segments}
        got_cat = torch.zeros_like(cat)
        for sid, s in by_id.items():
            got_cat[id_map == sid] = s["category_id"] + 1
        assert torch.equal(got_cat, cat)
        assert len({int(i) for i in inst.unique()} - {0}) == sum(s["isthing"] for s in segments)

        # the test can fail: the default mode upsamples the coarse levels on the padded grid
        # (16x12 -> exactly 8x6 -> 4x3), which is not the official map on the valid area
        tails.clear()
        model.official_compat = False
        model([x])
        tail, query, memory, mask = tails[0]
        padded = [tuple(hw) for hw in (mask.shape[-2:], (8, 6), (4, 3))]
        ref = _official_tail_mask(tail, query, _crop_memory(memory, padded, valid), valid)
        assert not torch.allclose(mask[..., : valid[0][0], : valid[0][1]], ref, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- end to end
def test_compat_output_does_not_depend_on_caller_padding():
    """An image gives the same output alone, in a batch with other sizes and whatever
    SIZE_DIVISIBILITY says: nothing is padded at official-compatible inference."""
    small = synthetic_input(72, 100, with_targets=False)
    large = synthetic_input(150, 170, seed=1, with_targets=False)
    odd = synthetic_input(61, 90, seed=2, with_targets=False)
    results = []
    for divisibility, batch in ((32, [small]), (32, [large, small, odd]), (128, [odd, small])):
        model = compat_model(SIZE_DIVISIBILITY=divisibility)
        with torch.no_grad():
            outs = model(batch)
        results.append(outs[[x is small for x in batch].index(True)]["panoptic_seg"])
    alone = results[0]
    assert {s["isthing"] for s in alone[1]} == {True, False}
    for id_map, segments in results[1:]:
        assert torch.equal(id_map, alone[0]) and segments == alone[1]
    # and the mode matters: the default (padded) mode gives another result for this image
    model = compat_model()
    model.official_compat = False
    with torch.no_grad():
        default = model([small])[0]["panoptic_seg"]
    assert not torch.equal(default[0], alone[0])
