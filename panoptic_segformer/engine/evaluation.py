"""Evaluators for Panoptic SegFormer outputs on COCO-format panoptic datasets."""
import logging
import math
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

__all__ = ["PanopticCOCOEvaluator", "PanopticQualityEvaluator", "PanopticSemSegEvaluator", "build_evaluator"]

logger = logging.getLogger(__name__)

_GROUPS = {None: "All", True: "Things", False: "Stuff"}  # panopticapi's isthing argument


class PanopticQualityEvaluator(COCOPanopticEvaluator):
    """COCOPanopticEvaluator (PQ, SQ, RQ) that survives a group without any segment to count.

    panopticapi averages over the categories that have at least one true positive, false
    positive or false negative, and divides by their number: with none it raises
    ``ZeroDivisionError`` (ground truth without a single non-crowd segment and no counted
    prediction, or the Stuff group of a things-only dataset). Here such a group (All, Things or
    Stuff) gets PQ = SQ = RQ = NaN, undefined rather than 0, and a warning says why.
    """

    def evaluate(self):
        from panopticapi.evaluation import PQStat

        empty_groups = []
        pq_average = PQStat.pq_average

        def pq_average_or_nan(stat, categories, isthing):
            try:
                return pq_average(stat, categories, isthing)
            except ZeroDivisionError:
                empty_groups.append(_GROUPS[isthing])
                return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}, {}

        PQStat.pq_average = pq_average_or_nan  # only for this call: panopticapi has no hook
        try:
            results = super().evaluate()
        finally:
            PQStat.pq_average = pq_average
        if empty_groups:
            logger.warning(
                f"Panoptic quality of {', '.join(empty_groups)} is NaN (undefined): no category of "
                "that group has a ground-truth segment (crowd segments do not count) or a counted "
                "prediction in the evaluated images"
            )
        return results


class PanopticCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator (mask/box AP of the things) for standard panoptic metadata.

    The standard metadata numbers things and stuff in one contiguous range, so thing ids need not
    be 0..K-1 (they are not when stuff categories come before a thing). COCOEvaluator requires
    that, so predictions and its metadata use each thing's rank among the things instead. The
    per-category AP table is labelled with the thing names alone.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        thing_map = self._metadata.thing_dataset_id_to_contiguous_id
        self._thing_ids = sorted(thing_map.values())  # contiguous ids of the things, in rank order
        self._thing_rank = {c: r for r, c in enumerate(self._thing_ids)}
        ranked = {d: self._thing_rank[c] for d, c in thing_map.items()}
        self._metadata = Metadata(**{**self._metadata.as_dict(), "thing_dataset_id_to_contiguous_id": ranked})

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction in self._predictions[start:]:
            for instance in prediction.get("instances", []):
                instance["category_id"] = self._thing_rank[instance["category_id"]]

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if class_names is not None:
            class_names = [class_names[i] for i in self._thing_ids]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


class PanopticSemSegEvaluator(SemSegEvaluator):
    """SemSegEvaluator over ALL panoptic categories (things and stuff).

    With Detectron2's standard panoptic metadata ``stuff_dataset_id_to_contiguous_id`` holds the
    stuff categories only, so the stock evaluator fails to encode a predicted thing label. Here
    the contiguous → dataset id map is the union of the thing and stuff maps. ``stuff_classes``
    already lists every category name (standard metadata rule).
    """

    def __init__(self, dataset_name: str, **kwargs):
        super().__init__(dataset_name, **kwargs)
        meta = MetadataCatalog.get(dataset_name)
        joint = {**meta.thing_dataset_id_to_contiguous_id, **meta.stuff_dataset_id_to_contiguous_id}
        if sorted(joint.values()) != list(range(len(meta.stuff_classes))):
            raise ValueError(
                f"{dataset_name}: thing+stuff contiguous ids must cover [0, {len(meta.stuff_classes)}) "
                "(standard panoptic metadata)"
            )
        self._contiguous_id_to_dataset_id = {v: k for k, v in joint.items()}


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """Evaluators for ``dataset_name``, by its metadata ``evaluator_type`` and the switches
    ``MODEL.PANOPTIC_SEGFORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``.

    For ``coco_panoptic_seg``: PanopticQualityEvaluator (PQ), plus COCOEvaluator (mask/box AP, needs
    the metadata ``json_file`` of COCO instances) and PanopticSemSegEvaluator (mIoU, needs
    ``sem_seg_file_name`` in the dataset dicts) when those outputs are enabled.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = getattr(meta, "evaluator_type", None)
    if evaluator_type != "coco_panoptic_seg":
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} of evaluator_type {evaluator_type!r}; "
            "Panoptic SegFormer evaluates COCO-format panoptic datasets ('coco_panoptic_seg')"
        )
    switches = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    evaluators = []
    if switches.PANOPTIC_ON:
        evaluators.append(PanopticQualityEvaluator(dataset_name, output_folder))
    if switches.INSTANCE_ON:
        if not getattr(meta, "json_file", None):
            raise ValueError(
                f"TEST.INSTANCE_ON needs a COCO instances json: dataset {dataset_name!r} has no "
                "metadata 'json_file'"
            )
        evaluators.append(PanopticCOCOEvaluator(dataset_name, output_dir=output_folder))
    if switches.SEMANTIC_ON:
        if "sem_seg_file_name" not in DatasetCatalog.get(dataset_name)[0]:
            raise ValueError(
                f"TEST.SEMANTIC_ON needs semantic PNGs: the dicts of {dataset_name!r} have no "
                "'sem_seg_file_name'"
            )
        evaluators.append(PanopticSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if not evaluators:
        raise ValueError("all of MODEL.PANOPTIC_SEGFORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON are off")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
