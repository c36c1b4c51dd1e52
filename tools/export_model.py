#!/usr/bin/env python
"""Export a Panoptic SegFormer for deployment (README, "Export and deployment").

    python tools/export_model.py --config-file configs/quickstart.yaml --format onnx \
        --output export/quickstart --opts MODEL.WEIGHTS output/quickstart/model_final.pth

``--format`` takes one or more of torch_export, aoti, onnx (default: all three); each writes its
file into ``--output`` next to ``export_meta.json``. The network runs on a normalised, padded
batch (dynamic batch size and H, W multiples of 32) and returns the thing / stuff candidates;
mask-wise merging stays in Python (``panoptic_segformer.export.merge_outputs``). Check an
export visually with ``demo/demo.py --exported DIR --input img.jpg --output out.png``.
Exports are float32 and run on the CPU (``--device cpu``, the default) or the device exported on.
"""
import argparse
import importlib.util
import logging
import os
import sys

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer import data  # noqa: E402,F401  (registers the project's datasets)
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.export import FORMATS, export_model  # noqa: E402
from panoptic_segformer.predictor import load_weights  # noqa: E402

logger = logging.getLogger("panoptic_segformer.export")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the export(s) to")
    parser.add_argument("--device", default="cpu", help="device of the exported network (default: cpu)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow MODEL.WEIGHTS files that need full unpickling (only from a trusted source)",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="panoptic_segformer")
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, args.device)
    model = build_model(cfg).eval()
    load_weights(model, cfg.MODEL.WEIGHTS, trust_pickle=args.trust_checkpoint)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    metadata = MetadataCatalog.get(names[0]) if names else None
    for fmt in args.format:
        path = export_model(
            model, fmt, os.path.join(args.output, fmt) if len(args.format) > 1 else args.output,
            metadata=metadata, input_format=cfg.INPUT.FORMAT,
            min_size_test=cfg.INPUT.MIN_SIZE_TEST, max_size_test=cfg.INPUT.MAX_SIZE_TEST,
        )
        logger.info(f"{fmt}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
