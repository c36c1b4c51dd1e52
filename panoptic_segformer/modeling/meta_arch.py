"""``PanopticSegFormer``: the Detectron2 meta-architecture (backbone, neck, head, criterion, merging).

Padding invariance (SPEC deviation (g)): an image gives the same result alone and inside a padded
batch. Convolutional backbones are not padding-invariant, so the backbone runs on groups of
images that share the same padded-to-``size_divisibility`` size (one call in the common case)
and the resulting maps are zero-padded to the batch size. Every later stage is padding-aware
through per-level masks computed from the valid sizes, never by interpolating a mask
(the neck's GroupNorm uses valid pixels only, attentions mask padded tokens, the mask decoders
never read padded tokens inside the valid area).

Official-compatible inference (``official_compat``, ``MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT``):
the official test pipeline runs one image at a time without any padding (``Pad(size_divisor=1)``,
batch size 1, SPEC §6). In this mode inference does the same: a batch runs image by image, each
at its own size, so the backbone never sees padding and the mask decoders upsample the coarse
levels to the unpadded stride-8 size, as the official code does. Training is unaffected.

The forward pass is split into stages that can be timed from outside:
:meth:`_backbone_features`, :meth:`_encode` (neck + encoder), :meth:`_locate`,
:meth:`_decode_masks` and :meth:`_merge`.

Inference precision (``precision``, ``TEST.PRECISION``): in "bf16" / "fp16" the four network
stages run under autocast (see :mod:`.precision` for the dtype of every op); their outputs are
cast to float32 before the top-k selection, and mask resizing and merging run in float32.
Training ignores it (``SOLVER.AMP`` sets the training precision).
"""
import contextlib
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances

from ..config import check_panoptic_segformer_config
from .criterion import PanopticSegFormerCriterion
from .head import PanopticSegFormerHead
from .merging import merge_candidates, resize_masks
from .neck import ChannelMapper
from .precision import autocast, check_precision, precision_dtype

__all__ = ["PanopticSegFormer", "thing_stuff_ids_from_metadata"]

def thing_stuff_ids_from_metadata(metadata) -> Tuple[List[int], List[int]]:
    """Contiguous ids of the thing and the stuff classes, each sorted ascending.

    Thing index i (the location decoder's class i) is contiguous id ``thing_ids[i]``; stuff
    query k is contiguous id ``stuff_ids[k]``. Things and stuff share one contiguous id space, as
    in Detectron2's standard panoptic metadata (e.g. ``coco_2017_train_panoptic``): the stuff ids
    are the stuff map's contiguous ids minus the thing ids, because the stuff map may also list
    the thing classes (as in Mask2Former's metadata, where it covers every class). A dataset
    without ``stuff_dataset_id_to_contiguous_id`` (or with an empty one) has no stuff classes.

    Raises:
        ValueError: no thing class (the location decoder needs at least one), or Detectron2's
            "separated" metadata (``*_panoptic_separated``), whose stuff map has its own id space
            with an extra "things" class: there a contiguous id of the stuff map belongs to a
            different dataset class than the same contiguous id of the thing map.
    """
    thing_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    stuff_map = getattr(metadata, "stuff_dataset_id_to_contiguous_id", None) or {}
    if not thing_map:
        raise ValueError(
            f"metadata {metadata.name!r} has no thing classes (thing_dataset_id_to_contiguous_id is "
            "missing or empty); Panoptic SegFormer needs at least one thing class"
        )
    thing_by_contiguous = {c: d for d, c in thing_map.items()}
    clashes = sorted(
        (d, c) for d, c in stuff_map.items() if c in thing_by_contiguous and thing_by_contiguous[c] != d
    )
    if clashes:
        d, c = clashes[0]
        raise ValueError(
            f"metadata {metadata.name!r}: contiguous id {c} is stuff dataset id {d} but thing dataset id "
            f"{thing_by_contiguous[c]}; things and stuff must share one contiguous id space. This is "
            "Detectron2's 'separated' panoptic metadata (stuff ids with an extra 'things' class 0): use "
            "the standard panoptic datasets instead (e.g. coco_2017_train_panoptic, not "
            "coco_2017_train_panoptic_separated)"
        )
    thing_ids = sorted(set(thing_map.values()))
    stuff_ids = sorted(set(stuff_map.values()) - set(thing_ids))
    return thing_ids, stuff_ids


@META_ARCH_REGISTRY.register()
class PanopticSegFormer(nn.Module):
    """Panoptic SegFormer (Li et al., CVPR 2022).

    Input: a list of dicts with "image" (C, h, w) tensor in ``cfg.INPUT.FORMAT`` (0-255), optional
    "height"/"width" (output size) and, for training, "instances" with ``gt_classes``
    (contiguous ids, things and stuff), ``gt_masks`` (G, h, w) and optionally ``gt_boxes``.

    Output (inference): one dict per image with "panoptic_seg" = (int32 (height, width) id map,
    segments_info) and, behind flags, "instances" and "sem_seg" (see :meth:`_postprocess`).
    Output (training): a dict of weighted scalar losses.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: nn.Module,
        head: PanopticSegFormerHead,
        criterion: nn.Module,
        in_features: Sequence[str],
        thing_ids: Sequence[int],
        stuff_ids: Sequence[int],
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_thing_candidates: int = 100,
        mask_threshold: float = 0.5,
        thing_score_thresh: float = 0.25,
        stuff_score_thresh: float = 0.25,
        thing_overlap_thresh: float = 0.4,
        stuff_overlap_thresh: float = 0.2,
        panoptic_on: bool = True,
        instance_on: bool = False,
        semantic_on: bool = False,
        official_compat: bool = False,
        precision: str = "fp32",
    ):
        """
        Args:
            thing_ids / stuff_ids: contiguous dataset id of each thing / stuff class index.
            size_divisibility: images are padded to a multiple of it; must be a multiple of
                the largest backbone stride. Unused at inference with ``official_compat``.
            num_thing_candidates: top-k (query, class) pairs kept at inference (SPEC §6).
            the thresholds: mask-wise merging (SPEC §6, :func:`mask_wise_merging`).
            official_compat: inference runs image by image without padding, as the official
                test pipeline (see the module docstring).
            precision: "fp32", "bf16" or "fp16", the autocast dtype of the network stages at
                inference (the attribute ``precision`` may be changed later).
        """
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.criterion = criterion
        self.in_features = list(in_features)
        shapes = backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(f"backbone does not output {missing}; it has {sorted(shapes)}")
        self.backbone_strides = [shapes[f].stride for f in self.in_features]
        if size_divisibility <= 0 or size_divisibility % max(self.backbone_strides):
            raise ValueError(
                f"size_divisibility ({size_divisibility}) must be a positive multiple of the largest "
                f"backbone stride ({max(self.backbone_strides)})"
            )
        self.size_divisibility = size_divisibility
        if len(thing_ids) != head.num_thing_classes or len(stuff_ids) != head.num_stuff_classes:
            raise ValueError(
                f"{len(thing_ids)} thing / {len(stuff_ids)} stuff ids for a head with "
                f"{head.num_thing_classes} / {head.num_stuff_classes} classes"
            )
        if set(thing_ids) & set(stuff_ids):
            raise ValueError(f"contiguous ids are both thing and stuff: {sorted(set(thing_ids) & set(stuff_ids))}")
        self.num_classes = max(list(thing_ids) + list(stuff_ids)) + 1
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # the official normalisation (mmcv imnormalize): (x - mean) * float32(1 / std in float64)
        inv_std = (1 / torch.tensor(pixel_std, dtype=torch.float64)).float()
        self.register_buffer("_pixel_inv_std", inv_std.view(-1, 1, 1), False)
        self.register_buffer("thing_ids", torch.as_tensor(thing_ids, dtype=torch.long), False)
        self.register_buffer("stuff_ids", torch.as_tensor(stuff_ids, dtype=torch.long), False)
        # contiguous id -> index among things (>= 0) or stuff (encoded as -1 - index); invalid ids
        # are caught by the is-known table
        class_index = torch.zeros(self.num_classes, dtype=torch.long)
        known = torch.zeros(self.num_classes, dtype=torch.bool)
        class_index[self.thing_ids] = torch.arange(len(thing_ids))
        class_index[self.stuff_ids] = -1 - torch.arange(len(stuff_ids))
        known[self.thing_ids] = True
        known[self.stuff_ids] = True
        self.register_buffer("_class_index", class_index, False)
        self.register_buffer("_class_known", known, False)

        self.num_thing_candidates = num_thing_candidates
        self.mask_threshold = mask_threshold
        self.merge_kwargs = dict(
            mask_threshold=mask_threshold,
            thing_score_thresh=thing_score_thresh,
            stuff_score_thresh=stuff_score_thresh,
            thing_overlap_thresh=thing_overlap_thresh,
            stuff_overlap_thresh=stuff_overlap_thresh,
        )
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.official_compat = official_compat
        precision_dtype(precision)  # rejects an unknown name
        self.precision = precision

    @classmethod
    def from_config(cls, cfg):
        check_panoptic_segformer_config(cfg)
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        thing_ids, stuff_ids = thing_stuff_ids_from_metadata(metadata)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        neck = ChannelMapper(
            [shapes[f].channels for f in m.IN_FEATURES],
            out_channels=m.HIDDEN_DIM,
            num_extra_levels=m.NUM_FEATURE_LEVELS - len(m.IN_FEATURES),
            num_groups=m.NECK_NUM_GROUPS,
        )
        head = PanopticSegFormerHead(cfg, num_thing_classes=len(thing_ids), num_stuff_classes=len(stuff_ids))
        criterion = PanopticSegFormerCriterion(cfg)
        t = m.TEST
        check_precision(t.PRECISION, cfg.MODEL.DEVICE)
        return {
            "backbone": backbone,
            "neck": neck,
            "head": head,
            "criterion": criterion,
            "in_features": m.IN_FEATURES,
            "thing_ids": thing_ids,
            "stuff_ids": stuff_ids,
            "size_divisibility": max(m.SIZE_DIVISIBILITY, backbone.size_divisibility),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_thing_candidates": t.NUM_THING_CANDIDATES,
            "mask_threshold": t.MASK_THRESHOLD,
            "thing_score_thresh": t.THING_SCORE_THRESH,
            "stuff_score_thresh": t.STUFF_SCORE_THRESH,
            "thing_overlap_thresh": t.THING_OVERLAP_THRESH,
            "stuff_overlap_thresh": t.STUFF_OVERLAP_THRESH,
            "panoptic_on": t.PANOPTIC_ON,
            "instance_on": t.INSTANCE_ON,
            "semantic_on": t.SEMANTIC_ON,
            "official_compat": m.OFFICIAL_COMPAT,
            "precision": t.PRECISION,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self.official_compat and not self.training and len(batched_inputs) > 1:
            return [out for x in batched_inputs for out in self.forward([x])]
        images, image_sizes, batch_size = self.preprocess_image(batched_inputs)
        with self._autocast():
            features = self._backbone_features(images, image_sizes, batch_size)
            enc = self._encode(features, image_sizes)
            loc = self._locate(enc)
        if self.training:
            self._check_finite_outputs(loc)
            targets = self.prepare_targets(batched_inputs, image_sizes, batch_size)
            return self._losses(loc, enc, targets)
        return self._inference(loc, enc, batched_inputs, image_sizes)

    def _autocast(self):
        """The autocast region of the network stages at inference; none in training."""
        if self.training:
            return contextlib.nullcontext()
        return autocast(self.precision, self.device)

    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise every image; return them unpadded, their sizes and the padded batch size (H, W)."""
        if not batched_inputs:
            raise ValueError("batched_inputs is empty")
        images = []
        for i, x in enumerate(batched_inputs):
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != self.pixel_mean.shape[0]:
                raise ValueError(f"image {i} must be ({self.pixel_mean.shape[0]}, h, w), got {tuple(img.shape)}")
            images.append((img.to(self.device).float() - self.pixel_mean) * self._pixel_inv_std)
        image_sizes = [tuple(img.shape[-2:]) for img in images]
        d = self._pad_divisor()
        batch_size = (
            max(_ceil_to(h, d) for h, _ in image_sizes),
            max(_ceil_to(w, d) for _, w in image_sizes),
        )
        return images, image_sizes, batch_size

    def _backbone_features(self, images, image_sizes, batch_size) -> List[torch.Tensor]:
        """Backbone maps ``in_features`` as a list of (B, C_l, H / s_l, W / s_l) for the padded batch (H, W).

        Images sharing the same padded size run together; maps of smaller groups are zero-padded.
        A level of stride s of an (h, w) input is (ceil(h / s), ceil(w / s)).
        """
        d = self._pad_divisor()
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, (h, w) in enumerate(image_sizes):
            groups.setdefault((_ceil_to(h, d), _ceil_to(w, d)), []).append(i)
        per_group, order = [], []
        for (gh, gw), idx in groups.items():
            x = ImageList.from_tensors([images[i] for i in idx], d).tensor
            feats = self.backbone(x)
            maps = []
            for f, s in zip(self.in_features, self.backbone_strides):
                y = feats[f]
                if tuple(y.shape[-2:]) != (_ceil_div(gh, s), _ceil_div(gw, s)):
                    raise RuntimeError(
                        f"backbone feature {f!r} (stride {s}) of a {gh}x{gw} input has size "
                        f"{tuple(y.shape[-2:])}, expected {(_ceil_div(gh, s), _ceil_div(gw, s))}"
                    )
                pad_h, pad_w = _ceil_div(batch_size[0], s) - y.shape[-2], _ceil_div(batch_size[1], s) - y.shape[-1]
                maps.append(F.pad(y, (0, pad_w, 0, pad_h)))
            per_group.append(maps)
            order.extend(idx)
        if len(per_group) == 1:
            return per_group[0]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(self.device)
        return [torch.cat(level, 0)[inverse] for level in zip(*per_group)]

    def _pad_divisor(self) -> int:
        """Images are padded to a multiple of this: 1 (no padding) at official-compatible inference."""
        return 1 if self.official_compat and not self.training else self.size_divisibility

    def level_masks(self, image_sizes, level_shapes) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Padding masks of every level from the valid image sizes (interface D).

        Args:
            image_sizes: B valid (h, w) of the input images, as pairs of ints or a (B, 2)
                int64 tensor (the exported network's input, see :mod:`panoptic_segformer.export`).
            level_shapes: L padded (H_l, W_l); the strides of the levels are the backbone
                strides followed by successive doublings (extra levels).

        Returns:
            masks: L bool (B, H_l, W_l), True = padding.
            valid_sizes: (B, L, 2) int64 valid (h_l, w_l) = (ceil(h / s_l), ceil(w / s_l)).
        """
        strides = list(self.backbone_strides)
        while len(strides) < len(level_shapes):
            strides.append(strides[-1] * 2)
        sizes = torch.as_tensor(image_sizes, dtype=torch.long, device=self.device).view(-1, 2)
        valid = torch.stack([torch.div(sizes + (s - 1), s, rounding_mode="floor") for s in strides], 1)
        masks = []
        for lvl, (hl, wl) in enumerate(level_shapes):
            rows = torch.arange(hl, device=self.device)
            cols = torch.arange(wl, device=self.device)
            pad_rows = rows[None, :, None] >= valid[:, lvl, 0, None, None]
            pad_cols = cols[None, None, :] >= valid[:, lvl, 1, None, None]
            masks.append(pad_rows | pad_cols)
        return masks, valid

    def _encode(self, features: List[torch.Tensor], image_sizes) -> Dict:
        """Neck + positional encoding + deformable encoder; see :meth:`PanopticSegFormerHead.encode`."""
        level_shapes = [tuple(f.shape[-2:]) for f in features]
        while len(level_shapes) < self.head.num_levels:
            h, w = level_shapes[-1]
            level_shapes.append(((h + 1) // 2, (w + 1) // 2))  # ceil, also for symbolic sizes
        masks, valid_sizes = self.level_masks(image_sizes, level_shapes)
        feats = self.neck(features, masks)
        return self.head.encode(feats, masks, valid_sizes)

    def _locate(self, enc: Dict) -> Dict:
        return self.head.locate(enc)

    def _decode_masks(self, thing_queries, thing_query_mask, enc) -> Dict:
        return self.head.decode_masks(thing_queries, thing_query_mask, enc)

    # ------------------------------------------------------------------ training
    def prepare_targets(self, batched_inputs, image_sizes, batch_size) -> List[Dict]:
        """Criterion targets (interface I) from each input's "instances".

        Things: labels (index among things), boxes (cx, cy, w, h) / valid image size, masks
        (G, H, W) float padded to the batch. Stuff: one target per stuff class present (several
        segments of the same stuff class are merged), stuff_labels and stuff_masks, absent when
        the dataset has no stuff classes.
        """
        targets = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, image_sizes)):
            if "instances" not in x:
                raise ValueError(f"training input {i} has no 'instances'")
            inst = x["instances"].to(self.device)
            classes = inst.gt_classes.long()
            in_range = (classes >= 0) & (classes < self.num_classes)
            if not (in_range & self._class_known[classes.clamp(0, self.num_classes - 1)]).all():
                raise ValueError(
                    f"input {i}: gt_classes {classes.tolist()} contain ids that are neither thing nor stuff"
                )
            gt_masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            if tuple(gt_masks.shape[-2:]) != (h, w):
                raise ValueError(
                    f"input {i}: gt_masks of size {tuple(gt_masks.shape[-2:])} for an image of size {(h, w)}"
                )
            masks = F.pad(gt_masks.float(), (0, batch_size[1] - w, 0, batch_size[0] - h))
            index = self._class_index[classes]
            is_thing = index >= 0
            if inst.has("gt_boxes"):
                boxes = inst.gt_boxes.tensor.float()
            else:
                boxes = BitMasks(gt_masks.bool()).get_bounding_boxes().tensor.to(self.device)
            boxes = boxes[is_thing]
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=self.device)
            boxes_cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / scale
            stuff_index = -1 - index[~is_thing]
            stuff_labels, inverse = torch.unique(stuff_index, sorted=True, return_inverse=True)
            # union of the segments of each stuff class
            stuff_masks = masks.new_zeros(len(stuff_labels), *batch_size).index_add_(0, inverse, masks[~is_thing])
            stuff_masks = stuff_masks.clamp_(max=1.0)
            target = {"labels": index[is_thing], "boxes": boxes_cxcywh, "masks": masks[is_thing]}
            if len(self.stuff_ids):  # no stuff keys at all for a dataset without stuff classes
                target.update(stuff_labels=stuff_labels, stuff_masks=stuff_masks)
            targets.append(target)
        return targets

    def _check_finite_outputs(self, loc: Dict) -> None:
        """Raise ``NonFiniteTrainingError`` naming the first non-finite parameter when the
        location decoder's logits or boxes hold NaN / Inf (they would reach the matching)."""
        if bool(torch.isfinite(loc["pred_logits"]).all() & torch.isfinite(loc["pred_boxes"]).all()):
            return
        from ..engine.non_finite import non_finite_output_error

        raise non_finite_output_error(self.named_parameters(), "the location decoder's class logits or boxes")

    def _losses(self, loc: Dict, enc: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        losses, indices = self.criterion.location_losses(loc["pred_logits"], loc["pred_boxes"], targets)
        # matched queries of each image, ascending, padded to (B, Nmax) (SPEC §5.2)
        hidden = loc["hidden"]
        b, _, c = hidden.shape
        selected = [torch.sort(pred_idx.to(self.device)).values for pred_idx, _ in indices]
        # N = 0 when no image has things: the thing decoder still runs (empty masks) and stays in the graph
        n_max = max(len(s) for s in selected)
        thing_query_mask = torch.ones(b, n_max, dtype=torch.bool, device=self.device)
        gather_idx = torch.zeros(b, n_max, dtype=torch.long, device=self.device)
        for i, s in enumerate(selected):
            gather_idx[i, : len(s)] = s
            thing_query_mask[i, : len(s)] = False
        thing_queries = hidden.gather(1, gather_idx[..., None].expand(-1, -1, c))
        thing_queries = thing_queries.masked_fill(thing_query_mask[..., None], 0.0)
        last_logits, last_boxes = loc["pred_logits"][-1], loc["pred_boxes"][-1]
        selected_logits = last_logits.gather(1, gather_idx[..., None].expand(-1, -1, last_logits.shape[-1]))
        selected_boxes = last_boxes.gather(1, gather_idx[..., None].expand(-1, -1, 4))
        out = self._decode_masks(thing_queries, thing_query_mask, enc)
        losses.update(
            self.criterion.mask_losses(
                out["thing_out"], thing_query_mask, selected_logits, selected_boxes,
                out["stuff_out"], out["stuff_logits"], targets, valid_sizes=enc["valid_sizes"][:, 0],
            )
        )
        return losses

    # ------------------------------------------------------------------ inference
    def _inference(self, loc: Dict, enc: Dict, batched_inputs, image_sizes) -> List[Dict]:
        """Thing and stuff candidates (:meth:`_candidates`), then per-image post-processing."""
        c = self._candidates(loc, enc)
        k = c["thing_scores"].shape[1]
        s0 = self.backbone_strides[0]  # the mask decoders' stride
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = image_sizes[i]
            h8, w8 = math.ceil(h / s0), math.ceil(w / s0)
            height, width = x.get("height", h), x.get("width", w)
            results.append(
                self._postprocess(
                    torch.cat([c["thing_masks"][i], c["stuff_masks"][i]])[:, :h8, :w8],
                    torch.cat([c["thing_labels"][i], self.stuff_ids]),
                    torch.cat([c["thing_scores"][i], c["stuff_scores"][i]]),
                    k,
                    c["thing_boxes"][i],
                    (height, width),
                )
            )
        return results

    def _candidates(self, loc: Dict, enc: Dict) -> Dict[str, torch.Tensor]:
        """Top-k thing candidates and all stuff queries through the mask decoders (SPEC §6 steps 1-4).

        The network outputs are cast to float32 first: top-k, resizing and merging run in float32.

        Returns:
            dict of float32 tensors of the padded batch (H8, W8 = the stride-8 level):
            thing_masks (B, k, H8, W8) raw, thing_scores (B, k) descending, thing_labels (B, k)
            contiguous ids (int64), thing_boxes (B, k, 4) normalised (cx, cy, w, h),
            stuff_masks (B, K_st, H8, W8) raw and stuff_scores (B, K_st) (class ``stuff_ids``).
        """
        logits = _fp32(loc["pred_logits"][-1])  # (B, Q, K_th)
        b, _, k_th = logits.shape
        scores = logits.sigmoid().flatten(1)  # (B, Q * K_th)
        k = min(self.num_thing_candidates, scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)  # (B, k), descending
        query_idx, thing_labels = top_idx // k_th, top_idx % k_th
        hidden = loc["hidden"]
        thing_queries = hidden.gather(1, query_idx[..., None].expand(-1, -1, hidden.shape[-1]))
        thing_boxes = _fp32(loc["pred_boxes"][-1]).gather(1, query_idx[..., None].expand(-1, -1, 4))
        with self._autocast():
            out = self._decode_masks(thing_queries, None, enc)
        thing_masks = _fp32(out["thing_out"]["masks"])  # (B, k, H8, W8)
        if out["stuff_out"] is None:  # no stuff classes
            stuff_masks = thing_masks.new_zeros(b, 0, *thing_masks.shape[-2:])
            stuff_scores = top_scores.new_zeros(b, 0)
        else:
            stuff_masks = _fp32(out["stuff_out"]["masks"])  # (B, K_st, H8, W8)
            stuff_scores = _fp32(out["stuff_logits"][-1]).sigmoid()  # (B, K_st)
        return {
            "thing_masks": thing_masks,
            "thing_scores": top_scores,
            "thing_labels": self.thing_ids[thing_labels],
            "thing_boxes": thing_boxes,
            "stuff_masks": stuff_masks,
            "stuff_scores": stuff_scores,
        }

    def _postprocess(self, masks, labels, probs, num_things, thing_boxes, out_size) -> Dict:
        """Outputs of one image.

        Args:
            masks: (N, h8, w8) raw tail masks cropped to the valid stride-8 area; the first
                ``num_things`` are thing candidates, the rest stuff queries.
            labels: (N,) contiguous ids; probs: (N,) class probabilities.
            thing_boxes: (num_things, 4) normalised (cx, cy, w, h) of the valid image.
            out_size: (height, width) of the output.

        Returns:
            "panoptic_seg": (int32 (height, width), segments_info) from :func:`mask_wise_merging`;
            "instances" (flag): the thing candidates with pred_masks (mask > threshold),
            pred_boxes rescaled to out_size, scores p * q**2 (SPEC §6 step 7) and pred_classes;
            "sem_seg" (flag): (num_classes, height, width), for class c the max over its
            candidates of p * clamp(mask, 0, 1), computed at stride 8 and resized bilinearly.
        """
        is_thing = torch.arange(len(labels), device=masks.device) < num_things
        result = {}
        if self.panoptic_on:
            result["panoptic_seg"] = self._merge(masks, labels, probs, is_thing, out_size)
        if self.instance_on:
            tm = resize_masks(masks[:num_things], out_size)
            binary = tm > self.mask_threshold
            quality = (tm * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1)
            inst = Instances(out_size)
            inst.pred_masks = binary
            height, width = out_size
            cx, cy, bw, bh = thing_boxes.unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            inst.pred_boxes = Boxes(xyxy * torch.tensor([width, height, width, height], device=xyxy.device))
            inst.pred_boxes.clip(out_size)
            inst.scores = probs[:num_things] * quality**2
            inst.pred_classes = labels[:num_things]
            result["instances"] = inst
        if self.semantic_on:
            weighted = probs[:, None, None] * masks.clamp(0, 1)  # (N, h8, w8)
            sem = weighted.new_zeros(self.num_classes, *masks.shape[-2:])
            sem.scatter_reduce_(0, labels[:, None, None].expand_as(weighted), weighted, "amax")
            result["sem_seg"] = resize_masks(sem, out_size)
        return result

    def _merge(self, masks, labels, probs, is_thing, out_size):
        """Mask-wise merging (SPEC §6) at the output size: :func:`merge_candidates`.

        Args:
            masks: (N, h8, w8) raw masks of the valid stride-8 area; labels, probs, is_thing: (N,).
            out_size: (height, width) of the id map.
        """
        return merge_candidates(masks, labels, probs, is_thing, out_size, **self.merge_kwargs)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """A float16 / bfloat16 tensor (a network output under autocast) as float32; others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _ceil_to(x: int, d: int) -> int:
    return (x + d - 1) // d * d


def _ceil_div(x: int, d: int) -> int:
    return (x + d - 1) // d
