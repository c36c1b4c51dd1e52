"""mask_wise_merging (SPEC §6 steps 5-9) on hand-built masks with exactly known results."""
import pytest
import torch

from panoptic_segformer.modeling.merging import mask_wise_merging

H, W = 4, 6


def _mask(value, rows, cols):
    """A (H, W) mask equal to `value` on rows x cols (slices) and 0 elsewhere."""
    m = torch.zeros(H, W)
    m[rows, cols] = value
    return m


def _merge(cands, **kw):
    """cands: list of (mask, label, prob, is_thing)."""
    masks = torch.stack([c[0] for c in cands])
    labels = torch.tensor([c[1] for c in cands], dtype=torch.int64)
    probs = torch.tensor([c[2] for c in cands], dtype=torch.float32)
    is_thing = torch.tensor([c[3] for c in cands], dtype=torch.bool)
    return mask_wise_merging(masks, labels, probs, is_thing, **kw)


def test_score_order_paints_best_first_and_overlap_leaves_only_free_pixels():
    # q = 1·n/(n+1). A: 2x2 of 1.0, p=1 -> q=4/5, s=0.64. B: 2x3 of 1.0, p=0.9 -> q=6/7, s≈0.661.
    a = _mask(1.0, slice(0, 2), slice(0, 2))
    b = _mask(1.0, slice(0, 2), slice(1, 4))  # overlaps A in 2 of its 6 pixels
    id_map, info = _merge([(a, 3, 1.0, True), (b, 5, 0.9, True)], thing_overlap_thresh=0.5)
    # B is painted first (higher score) -> id 1; A then has 2/4 = 0.5 overlap (not > 0.5): id 2
    expected = torch.tensor(
        [[2, 1, 1, 1, 0, 0],
         [2, 1, 1, 1, 0, 0],
         [0, 0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert id_map.dtype == torch.int32
    assert torch.equal(id_map, expected)
    assert [s["id"] for s in info] == [1, 2]
    assert [s["category_id"] for s in info] == [5, 3]
    assert [s["isthing"] for s in info] == [True, True]
    assert info[0]["score"] == pytest.approx(0.9 * (6 / 7) ** 2, rel=1e-6)
    assert info[1]["score"] == pytest.approx(0.64, rel=1e-6)


def test_thing_overlap_threshold_is_strict_and_separate_from_stuff():
    base = _mask(1.0, slice(0, 4), slice(0, 2))  # 8 px, painted first (p=1)
    # 8-px candidates overlapping `base` in 2 px (0.25) and 4 px (0.5)
    th_25 = _mask(1.0, slice(0, 4), slice(1, 3))
    th_25[0:2, 1] = 0
    th_25[0:2, 3] = 1.0
    assert (th_25 > 0.5).sum() == 8 and ((th_25 > 0.5) & (base > 0.5)).sum() == 2
    cands = [(base, 0, 1.0, True), (th_25, 1, 0.9, True)]
    _, info = _merge(cands)  # thing overlap 0.25 <= 0.4: kept
    assert [s["category_id"] for s in info] == [0, 1]
    # the same candidate as stuff: 0.25 > 0.2 -> dropped
    _, info = _merge([(base, 0, 1.0, True), (th_25, 1, 0.9, False)])
    assert [s["category_id"] for s in info] == [0]
    # exactly at the threshold is kept, just above is dropped
    _, info = _merge(cands, thing_overlap_thresh=0.25)
    assert len(info) == 2
    _, info = _merge(cands, thing_overlap_thresh=0.24)
    assert len(info) == 1


def test_score_thresholds_per_kind_and_equality_kept():
    # 3 px of 1.0 -> q = 3/4, s = p · 9/16
    m1 = _mask(1.0, slice(0, 1), slice(0, 3))
    m2 = _mask(1.0, slice(2, 3), slice(0, 3))
    cands = [(m1, 0, 0.5, True), (m2, 0, 0.5, False)]  # both s = 0.28125
    _, info = _merge(cands, thing_score_thresh=0.3, stuff_score_thresh=0.25)
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, False)]
    _, info = _merge(cands, thing_score_thresh=0.25, stuff_score_thresh=0.3)
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, True)]
    _, info = _merge(cands, thing_score_thresh=0.28125, stuff_score_thresh=0.28125)
    assert len(info) == 2  # s == threshold is kept


def test_plus_one_in_quality_denominator():
    # 3 px of 1.0 and p = 0.5: q = 3/(3+1) -> s = 0.28125 (without the +1 it would be 0.5)
    m = _mask(1.0, slice(0, 1), slice(0, 3))
    _, info = _merge([(m, 2, 0.5, True)], thing_score_thresh=0.0)
    assert info[0]["score"] == pytest.approx(0.28125, abs=1e-7)
    _, info = _merge([(m, 2, 0.5, True)], thing_score_thresh=0.3)
    assert info == []


def test_quality_uses_mask_values_inside_the_binary_mask_only():
    # values 0.8 on 4 px, 0.4 (below t) on 8 px: q = 3.2 / 5 = 0.64, s = 0.64^2
    m = _mask(0.4, slice(0, 2), slice(0, 6))
    m[0, 0:4] = 0.8
    id_map, info = _merge([(m, 1, 1.0, True)], thing_score_thresh=0.0)
    assert info[0]["score"] == pytest.approx(0.64 ** 2, rel=1e-6)
    assert torch.equal(id_map, (m > 0.5).int())


def test_binarisation_is_strictly_greater_than_threshold():
    m = _mask(0.5, slice(0, 2), slice(0, 2))
    m[3, 5] = 0.75
    id_map, info = _merge([(m, 1, 1.0, True)], thing_score_thresh=0.0)
    assert id_map.sum() == 1 and id_map[3, 5] == 1


def test_area_zero_is_skipped_even_with_zero_thresholds():
    empty = _mask(0.5, slice(0, 4), slice(0, 6))  # nothing > 0.5: area 0, score 0
    one = _mask(1.0, slice(0, 1), slice(0, 1))
    id_map, info = _merge(
        [(empty, 0, 1.0, False), (one, 1, 1.0, True)], thing_score_thresh=0.0, stuff_score_thresh=0.0
    )
    assert [s["category_id"] for s in info] == [1]
    assert id_map.sum() == 1


def test_thing_instances_get_their_own_ids_and_stuff_one_segment_per_class():
    t1 = _mask(1.0, slice(0, 1), slice(0, 2))
    t2 = _mask(1.0, slice(0, 1), slice(3, 5))  # same class as t1
    s1 = _mask(1.0, slice(2, 3), slice(0, 6))
    s2 = _mask(1.0, slice(3, 4), slice(0, 6))  # same stuff class as s1, disjoint
    s3 = _mask(1.0, slice(1, 2), slice(0, 6))  # other stuff class with the same numeric label as t1
    cands = [(t1, 7, 1.0, True), (t2, 7, 0.99, True), (s1, 0, 0.98, False), (s2, 0, 0.97, False),
             (s3, 7, 0.96, False)]
    # scores: stuff 6 px -> q = 6/7 (s ≈ 0.72, 0.71, 0.71) before things 2 px -> q = 2/3 (≈ 0.44)
    id_map, info = _merge(cands)
    expected = torch.tensor(
        [[3, 3, 0, 4, 4, 0],
         [2, 2, 2, 2, 2, 2],
         [1, 1, 1, 1, 1, 1],
         [1, 1, 1, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(id_map, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [
        (1, 0, False), (2, 7, False), (3, 7, True), (4, 7, True)
    ]
    # the merged stuff segment keeps its first candidate's score
    assert info[0]["score"] == pytest.approx(0.98 * (6 / 7) ** 2, rel=1e-6)


def test_ties_keep_input_order_and_ids_follow_painting_order():
    a = _mask(1.0, slice(0, 1), slice(0, 2))
    b = _mask(1.0, slice(1, 2), slice(0, 2))
    id_map, info = _merge([(a, 1, 0.8, True), (b, 2, 0.8, True)])
    assert [s["category_id"] for s in info] == [1, 2]
    assert id_map[0, 0] == 1 and id_map[1, 0] == 2


def test_empty_and_all_dropped_inputs():
    id_map, info = mask_wise_merging(
        torch.zeros(0, H, W), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
        torch.zeros(0, dtype=torch.bool),
    )
    assert info == [] and id_map.shape == (H, W) and id_map.dtype == torch.int32
    id_map, info = _merge([(_mask(1.0, slice(0, 1), slice(0, 1)), 0, 0.1, True)])
    assert info == [] and id_map.sum() == 0


def test_bad_input_raises():
    masks = torch.zeros(2, H, W)
    with pytest.raises(ValueError, match="masks must have shape"):
        mask_wise_merging(torch.zeros(H, W), torch.zeros(2, dtype=torch.int64), torch.zeros(2),
                          torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="probs"):
        mask_wise_merging(masks, torch.zeros(2, dtype=torch.int64), torch.zeros(3),
                          torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_thing must be bool"):
        mask_wise_merging(masks, torch.zeros(2, dtype=torch.int64), torch.zeros(2),
                          torch.zeros(2, dtype=torch.int64))


def _reference_merging(masks, labels, probs, is_thing, t=0.5, ths=(0.25, 0.25), ovs=(0.4, 0.2)):
    """Straight per-candidate transcription of SPEC §6 steps 5-9 (the official loop)."""
    binary = masks > t
    area = binary.sum((1, 2)).float()
    scores = probs * ((masks * binary).sum((1, 2)) / (area + 1)) ** 2
    canvas = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    stuff, next_id = {}, 1
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        thing = bool(is_thing[i])
        if scores[i] < (ths[0] if thing else ths[1]) or area[i] == 0:
            continue
        inter = (binary[i] & (canvas > 0)).sum().item()
        if inter / area[i].item() > (ovs[0] if thing else ovs[1]):
            continue
        paint = binary[i] & (canvas == 0)
        key = int(labels[i])
        if thing or key not in stuff:
            sid, next_id = next_id, next_id + 1
            if not thing:
                stuff[key] = sid
        else:
            sid = stuff[key]
        canvas[paint] = sid
    return canvas


def test_matches_a_plain_transcription_on_random_smooth_masks():
    g = torch.Generator().manual_seed(0)
    n = 40
    low = (torch.rand(n, 1, 6, 8, generator=g) * 3 - 2).clamp(min=0)  # sparse blobs
    masks = torch.nn.functional.interpolate(low, size=(48, 64), mode="bilinear", align_corners=False)[:, 0]
    labels = torch.randint(0, 4, (n,), generator=g)
    probs = torch.rand(n, generator=g)
    is_thing = torch.rand(n, generator=g) < 0.6
    id_map, info = mask_wise_merging(masks, labels, probs, is_thing, thing_score_thresh=0.1,
                                     stuff_score_thresh=0.1)
    ref = _reference_merging(masks, labels, probs, is_thing, ths=(0.1, 0.1))
    assert len(info) > 3
    assert torch.equal(id_map, ref)
    assert sorted(torch.unique(id_map[id_map > 0]).tolist()) == [s["id"] for s in info]


def test_half_precision_masks_give_the_same_result():
    g = torch.Generator().manual_seed(3)
    low = (torch.rand(12, 1, 4, 6, generator=g) * 3 - 1.5).clamp(min=0)
    masks = torch.nn.functional.interpolate(low, size=(32, 48), mode="bilinear", align_corners=False)[:, 0]
    masks = masks.half().float()  # values exactly representable in half precision
    labels = torch.randint(0, 3, (12,), generator=g)
    probs = torch.rand(12, generator=g).half().float()
    is_thing = torch.arange(12) < 8
    ref_map, ref_info = mask_wise_merging(masks, labels, probs, is_thing, thing_score_thresh=0.05)
    half_map, half_info = mask_wise_merging(masks.half(), labels, probs.half(), is_thing, thing_score_thresh=0.05)
    assert len(ref_info) >= 2
    assert torch.equal(ref_map, half_map)
    assert [s["category_id"] for s in ref_info] == [s["category_id"] for s in half_info]
