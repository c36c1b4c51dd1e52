#!/usr/bin/env python
"""Accuracy of every inference variant (precision x channels-last x torch.compile) against fp32.

Two modes, each one run over all variants:

    # a trained model on its test split: PQ per variant and the panoptic pixels that change
    python tools/precision_accuracy.py pq --config-file configs/quickstart.yaml \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth

    # random weights at a fixed input size: max differences of the class and mask outputs
    python tools/precision_accuracy.py outputs --config-file configs/R50.yaml --height 800 --width 1333

Variants are chosen as in tools/benchmark_inference.py (``--precision``, ``--compile``,
``--channels-last``, or ``--variants``); "fp32" (eager) is always run first, as the reference.

``pq``: Detectron2's ``inference_on_dataset`` with the config's evaluator (COCOPanopticEvaluator)
on ``DATASETS.TEST[0]``. A pixel "changes" when it does not lie in a pair of segments of the two
outputs matched one to one (greedily by shared pixels, same category; void matches void), so a
changed category, a split, a merge or a moved boundary all count.

``outputs``: the class logits of every location-decoder query (last layer), and the thing
masks of EVERY query (the thing mask decoder is run once more on all queries, so the variants'
masks stay aligned whatever their top-k) and the stuff masks. Masks are the decoders' raw ReLU
outputs ("mask logits", thresholded at TEST.MASK_THRESHOLD by the merging); also reported: the
fraction of mask pixels whose side of that threshold flips.
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: benchmark_inference
import benchmark_inference as bench  # noqa: E402

from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.engine import build_evaluator  # noqa: E402
from panoptic_segformer.modeling.precision import PRECISIONS  # noqa: E402
from panoptic_segformer.predictor import load_weights  # noqa: E402

logger = logging.getLogger("panoptic_segformer.precision_accuracy")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("pq", "outputs"))
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: the config's)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: as the benchmark")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--channels-last", choices=("off", "on", "both"), default="off")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="explicit PRECISION[+cl][+compile] names")
    parser.add_argument("--height", type=int, default=800, help="outputs mode: input height")
    parser.add_argument("--width", type=int, default=1333, help="outputs mode: input width")
    parser.add_argument("--seed", type=int, default=0, help="outputs mode: seed of the random weights")
    parser.add_argument("--output-dir", default=None, help="pq mode: evaluator output (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


# ------------------------------------------------------------------ panoptic pixel changes
def matched_pixels(id_a: torch.Tensor, seg_a: List[Dict], id_b: torch.Tensor, seg_b: List[Dict]) -> int:
    """Pixels of two panoptic outputs that lie in one-to-one matched segment pairs.

    Pairs (segment of a, segment of b) of the same category are matched greedily by their
    number of shared pixels, largest first, each segment at most once; void (id 0) matches void.

    Args:
        id_a, id_b: (H, W) integer id maps, 0 = void; seg_a, seg_b: their segments_info.
    """
    if id_a.shape != id_b.shape:
        raise ValueError(f"id maps differ in size: {tuple(id_a.shape)} vs {tuple(id_b.shape)}")
    cat_a = {0: -1, **{s["id"]: s["category_id"] for s in seg_a}}
    cat_b = {0: -1, **{s["id"]: s["category_id"] for s in seg_b}}
    a, b = id_a.long().flatten().cpu(), id_b.long().flatten().cpu()
    pairs, counts = torch.unique(torch.stack([a, b], 1), dim=0, return_counts=True)
    used_a, used_b, matched = set(), set(), 0
    for (i, j), n in sorted(zip(pairs.tolist(), counts.tolist()), key=lambda x: -x[1]):
        if i in used_a or j in used_b or cat_a[i] != cat_b[j]:
            continue
        used_a.add(i)
        used_b.add(j)
        matched += n
    return matched


class PanopticRecorder(DatasetEvaluator):
    """Keeps every image's panoptic output (id map on the CPU, segments) by image id."""

    def reset(self):
        self.outputs = {}

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            id_map, segments = out["panoptic_seg"]
            self.outputs[x["image_id"]] = (id_map.cpu(), segments)

    def evaluate(self):
        return {}


def pq_mode(args, cfg, base) -> Tuple[Dict, Dict]:
    import tempfile

    dataset = cfg.DATASETS.TEST[0]
    models = bench.variant_models(base, args.variants)
    results, reference = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            recorder = PanopticRecorder()
            evaluator = build_evaluator(cfg, dataset, os.path.join(args.output_dir or tmp, name))
            loader = build_detection_test_loader(cfg, dataset)
            metrics = inference_on_dataset(model, loader, DatasetEvaluators([evaluator, recorder]))
            pq = metrics["panoptic_seg"]
            row = {key: float(pq[key]) for key in ("PQ", "PQ_th", "PQ_st")}
            if reference is None:
                reference = recorder.outputs
            else:
                total = changed = 0
                for image_id, (id_ref, seg_ref) in reference.items():
                    id_map, segments = recorder.outputs[image_id]
                    total += id_ref.numel()
                    changed += id_ref.numel() - matched_pixels(id_ref, seg_ref, id_map, segments)
                row["changed_pixels_pct"] = 100 * changed / total
                row["delta_PQ"] = row["PQ"] - results[next(iter(results))]["PQ"]
            row["fallback"] = bench.fallbacks(model)
            results[name] = row
            logger.info(f"{name}: {row}")
            del model
    return {"dataset": dataset, "images": len(reference)}, results


# ------------------------------------------------------------------ raw network outputs
def record_outputs(model) -> Dict:
    """Wrap ``_locate`` and ``_decode_masks`` of ``model`` to record, on every forward, the
    last layer's class logits (B, Q, K_th) and the thing masks of all Q queries and the stuff
    masks, as float32."""
    record = {}
    locate, decode = model._locate, model._decode_masks

    def _locate(enc):
        loc = locate(enc)
        record["class_logits"] = loc["pred_logits"][-1].float()
        record["hidden"] = loc["hidden"]
        return loc

    def _decode_masks(thing_queries, thing_query_mask, enc):
        every = decode(record["hidden"], None, enc)  # all queries: aligned across variants
        record["thing_masks"] = every["thing_out"]["masks"].float()
        if every["stuff_out"] is not None:
            record["stuff_masks"] = every["stuff_out"]["masks"].float()
        return decode(thing_queries, thing_query_mask, enc)

    model._locate, model._decode_masks = _locate, _decode_masks
    return record


def outputs_mode(args, cfg, base) -> Tuple[Dict, Dict]:
    inputs = bench.make_inputs(argparse.Namespace(image=None, height=args.height, width=args.width, batch_size=1), cfg.INPUT.FORMAT)
    threshold = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.MASK_THRESHOLD
    models = bench.variant_models(base, args.variants)
    results, reference = {}, None
    for name, model in models.items():
        record = record_outputs(model)
        with torch.no_grad():
            model(inputs)  # a compiled variant compiles, then runs the compiled graphs
        out = {k: v for k, v in record.items() if k != "hidden"}
        if reference is None:
            reference = out
            results[name] = {f"max_abs_{k}": float(v.abs().max()) for k, v in out.items()}
        else:
            row = {}
            for key, ref in reference.items():
                diff = (out[key] - ref).abs()
                row[f"max_diff_{key}"] = float(diff.max())
                row[f"mean_diff_{key}"] = float(diff.mean())
                if key.endswith("masks"):
                    flips = (out[key] > threshold) != (ref > threshold)
                    row[f"flipped_pct_{key}"] = 100 * float(flips.float().mean())
            results[name] = row
        results[name]["fallback"] = bench.fallbacks(model)
        logger.info(f"{name}: {results[name]}")
        del model, record
    return {"height": args.height, "width": args.width, "seed": args.seed}, results


def format_table(info, results) -> str:
    names = list(results)
    keys = [k for k in {k: None for r in list(results.values())[1:] for k in r} if k != "fallback"]
    if not keys:
        keys = [k for k in next(iter(results.values())) if k != "fallback"]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [", ".join(f"{k}: {v}" for k, v in info.items()), "".ljust(34) + "".join(n.rjust(width) for n in names)]
    for key in keys:
        cells = "".join(
            (f"{results[n][key]:>{width}.4g}" if key in results[n] else "-".rjust(width)) for n in names
        )
        lines.append(f"{key:<34}{cells}")
    if "max_abs_class_logits" in results[names[0]]:
        ref = results[names[0]]
        lines.append("fp32 magnitudes: " + ", ".join(f"{k} {v:.4g}" for k, v in ref.items() if k.startswith("max_abs")))
    for n in names:
        if results[n]["fallback"]:
            lines.append(f"{n}: ran eagerly in {', '.join(results[n]['fallback'])} (compilation failed)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="panoptic_segformer")
    setup_logger(name="detectron2")
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, args.device)
    cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    names = args.variants or bench.variant_list(
        args.precision or bench.default_precisions(device), args.channels_last, args.compile
    )
    try:
        for name in names:
            bench.parse_variant(name)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    args.variants = ["fp32"] + [n for n in names if n != "fp32"]  # the reference first
    if args.mode == "outputs":
        torch.manual_seed(args.seed)
    base = build_model(cfg)
    base.eval()
    if args.mode == "pq":
        if not cfg.MODEL.WEIGHTS:
            print("pq mode needs trained weights: --opts MODEL.WEIGHTS model_final.pth", file=sys.stderr)
            return 2
        load_weights(base, cfg.MODEL.WEIGHTS)
        info, results = pq_mode(args, cfg, base)
    else:
        load_weights(base, cfg.MODEL.WEIGHTS)
        info, results = outputs_mode(args, cfg, base)
    info = {"config": args.config_file, "weights": cfg.MODEL.WEIGHTS or "random", **info}
    print(json.dumps({**info, "variants": results}) if args.json else format_table(info, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
