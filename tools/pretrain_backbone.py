#!/usr/bin/env python
"""Pretrain the backbone as a classifier of the training set's thing crops, for a model trained
without downloadable ImageNet weights (the quickstart; see
``panoptic_segformer/engine/backbone_pretraining.py``).

    python tools/pretrain_backbone.py --config-file configs/quickstart.yaml \
        --output output/quickstart/backbone_pretrained.pth
    python train_net.py --config-file configs/quickstart.yaml \
        MODEL.WEIGHTS output/quickstart/backbone_pretrained.pth

The crops come from ``DATASETS.TRAIN[0]`` (``--opts`` overrides it, and datasets given by paths in
``DATASETS.COCO_PANOPTIC`` are registered as train_net does). The output holds the backbone's
weights only (a ``{"model": {"backbone.*": ...}}`` checkpoint, loadable with
``weights_only=True``); it is written atomically, so an interrupted run leaves no partial file.
"""
import argparse
import importlib.util
import os
import sys

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer.checkpoint import atomic_write  # noqa: E402
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.data import register_datasets_from_cfg  # noqa: E402
from panoptic_segformer.engine.backbone_pretraining import pretrain_backbone  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="FILE", help="the checkpoint to write (.pth)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    setup_logger(name="panoptic_segformer")
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts)
    register_datasets_from_cfg(cfg)  # datasets given by paths; importing .data registered the toy ones
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    state = pretrain_backbone(cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=cfg.SEED)
    atomic_write(args.output, lambda f: torch.save({"model": state}, f))
    print(f"backbone weights: {args.output}")
    return args.output


if __name__ == "__main__":
    main()
