#!/usr/bin/env python
"""Where a trained model loses thing PQ: finding the things, or naming them.

    python tools/diagnose_things.py --config-file configs/quickstart.yaml \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Every ground-truth thing (crowd regions skipped) of ``DATASETS.TEST[0]`` (or ``--dataset``) is
compared with the model's thing candidates: the top-k (query, class) pairs with their masks,
before the merging drops or overlaps them (the model's ``instances`` output). Per thing:

- **found**: some candidate mask has IoU >= ``--iou`` with it, whatever the candidate's class;
- **named**: the highest-scoring of those candidates has the thing's class;
- **found with its class**: a candidate of the thing's class has IoU >= ``--iou``.

A model that finds its things but does not name them (found high, named near 1 / K_th) is limited
by classification, not by masks or matching. The report splits the counts by thing area (the
dataset's area terciles) and ends with the confusion matrix of the named class. ``--json`` also
writes the figures to a file.
"""
import argparse
import importlib.util
import json
import logging
import os
import sys
from typing import Dict, List, Sequence

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.data import register_datasets_from_cfg  # noqa: E402
from panoptic_segformer.data.panoptic_dataset_mapper import read_image_file, rgb2id  # noqa: E402
from panoptic_segformer.predictor import Predictor  # noqa: E402

logger = logging.getLogger("panoptic_segformer.diagnose_things")


def match_things(gt_masks: torch.Tensor, gt_labels: torch.Tensor, masks: torch.Tensor,
                 labels: torch.Tensor, scores: torch.Tensor, iou_thresh: float = 0.5) -> List[Dict]:
    """Best candidates of each ground-truth thing of one image.

    Args:
        gt_masks: (G, H, W) bool; gt_labels: (G,) contiguous ids.
        masks: (N, H, W) bool candidate masks; labels: (N,) contiguous ids; scores: (N,).

    Returns:
        G dicts: area, label, found (bool), named (bool), named_label (the class of the
        highest-scoring found candidate, -1 when none), best_iou (any class) and
        class_iou (best IoU among candidates of the thing's class, 0 when none).
    """
    if gt_masks.shape[1:] != masks.shape[1:]:
        raise ValueError(f"ground truth {tuple(gt_masks.shape)} and candidate masks {tuple(masks.shape)} differ in size")
    g, n = gt_masks.shape[0], masks.shape[0]
    gt = gt_masks.flatten(1).float()
    pred = masks.flatten(1).float()
    inter = gt @ pred.T  # (G, N)
    union = gt.sum(1, keepdim=True) + pred.sum(1)[None] - inter
    iou = inter / union.clamp(min=1)
    records = []
    for i in range(g):
        found = iou[i] >= iou_thresh  # (N,), empty without candidates
        same = labels == gt_labels[i]
        named_label = int(labels[torch.where(found, scores, scores.new_tensor(-float("inf"))).argmax()]) if found.any() else -1
        records.append({
            "area": int(gt[i].sum()),
            "label": int(gt_labels[i]),
            "found": bool(found.any()),
            "named": named_label == int(gt_labels[i]),
            "named_label": named_label,
            "best_iou": float(iou[i].max()) if n else 0.0,
            "class_iou": float((iou[i] * same).max()) if n else 0.0,
        })
    return records


def summarise(records: Sequence[Dict], iou_thresh: float, class_names: Sequence[str]) -> Dict:
    """Fractions found / named / found with its class, overall and per area tercile, and the
    confusion matrix (rows: true class, columns: named class, last column: not found).

    ``class_names``: the names of the contiguous ids (``records``' labels index them)."""
    if not records:
        raise ValueError("no ground-truth things to diagnose")
    areas = np.array([r["area"] for r in records])
    bounds = [0, *np.quantile(areas, [1 / 3, 2 / 3]).round().astype(int).tolist(), int(areas.max()) + 1]

    def fractions(rs):
        return {
            "things": len(rs),
            "found": float(np.mean([r["found"] for r in rs])),
            "named": float(np.mean([r["named"] for r in rs])),
            "named_if_found": float(np.mean([r["named"] for r in rs if r["found"]])) if any(r["found"] for r in rs) else 0.0,
            "found_with_class": float(np.mean([r["class_iou"] >= iou_thresh for r in rs])),
            "mean_best_iou": float(np.mean([r["best_iou"] for r in rs])),
        }

    k = len(class_names)
    confusion = np.zeros((k, k + 1), np.int64)
    for r in records:
        confusion[r["label"], r["named_label"] if r["named_label"] >= 0 else k] += 1
    by_area = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rs = [r for r in records if lo <= r["area"] < hi]
        if rs:
            by_area[f"{lo}-{hi - 1} px"] = fractions(rs)
    return {"iou": iou_thresh, "all": fractions(records), "by_area": by_area,
            "confusion": confusion.tolist(), "class_names": list(class_names)}


def format_report(summary: Dict) -> str:
    names = summary["class_names"]
    conf = np.array(summary["confusion"])
    used = [i for i in range(len(names)) if conf[i].sum() or conf[:, i].sum()]  # classes seen
    lines = [f"things: found = a candidate mask with IoU >= {summary['iou']}; named = the best-scoring found candidate has the right class",
             f"{'':>16} {'things':>7} {'found':>7} {'named':>7} {'named|found':>12} {'found w/ class':>15} {'mean IoU':>9}"]
    for key, f in [("all", summary["all"]), *summary["by_area"].items()]:
        lines.append(f"{key:>16} {f['things']:>7} {f['found']:>7.1%} {f['named']:>7.1%} {f['named_if_found']:>12.1%} "
                     f"{f['found_with_class']:>15.1%} {f['mean_best_iou']:>9.3f}")
    lines.append("confusion (rows: true class; columns: named class, then not found)")
    header = " ".join(f"{names[i][:10]:>10}" for i in used)
    lines.append(f"{'':>12} {header} {'not found':>10}")
    for i in used:
        row = conf[i]
        lines.append(f"{names[i][:12]:>12} " + " ".join(f"{row[j]:>10}" for j in used) + f" {row[-1]:>10}")
    return "\n".join(lines)


def _gt_things(record: Dict):
    """(G, H, W) bool masks and (G,) contiguous ids of the non-crowd things of a dataset dict."""
    ids = rgb2id(read_image_file(record["pan_seg_file_name"], "RGB", what="panoptic PNG"))
    segs = [s for s in record["segments_info"] if s.get("isthing") and not s.get("iscrowd", 0)]
    masks = torch.from_numpy(np.stack([ids == s["id"] for s in segs])) if segs else torch.zeros(0, *ids.shape, dtype=torch.bool)
    return masks, torch.tensor([s["category_id"] for s in segs], dtype=torch.int64)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", help="a registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--max-images", type=int, default=0, help="0 = all")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    setup_logger(name="panoptic_segformer")
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts + ["MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "True"])
    register_datasets_from_cfg(cfg)  # datasets given by paths (DATASETS.COCO_PANOPTIC), as train_net

    name = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not name:
        raise SystemExit("no dataset: give --dataset or set DATASETS.TEST")
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit("MODEL.WEIGHTS is empty: give trained weights (--opts MODEL.WEIGHTS FILE)")
    predictor = Predictor(cfg)
    dicts = DatasetCatalog.get(name)
    if args.max_images > 0:
        dicts = dicts[: args.max_images]
    records = []
    for i, d in enumerate(dicts):
        gt_masks, gt_labels = _gt_things(d)
        inst = predictor(read_image_file(d["file_name"], "BGR"))["instances"].to("cpu")
        records += match_things(gt_masks, gt_labels, inst.pred_masks, inst.pred_classes, inst.scores, args.iou)
        if (i + 1) % 50 == 0:
            logger.info(f"{i + 1}/{len(dicts)} images")
    meta = MetadataCatalog.get(name)
    summary = summarise(records, args.iou, meta.stuff_classes)  # names of all contiguous ids
    summary["dataset"], summary["images"] = name, len(dicts)
    print(f"{name}: {len(dicts)} images")
    print(format_report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
