#!/usr/bin/env python
"""Convert a released checkpoint of the official Panoptic SegFormer (mmdet 2.12 layout) into a
``{"model": state_dict}`` .pth of tensors that ``DetectionCheckpointer`` / ``Predictor`` load with
``torch.load(weights_only=True)``.

    python tools/convert_official_checkpoint.py panoptic_segformer_r50_2x.pth R50_official.pth \
        --config-file configs/R50_official.yaml

Run the converted weights with the release's ``configs/*_official.yaml`` (``MODEL.PANOPTIC_SEGFORMER.
OFFICIAL_COMPAT``): inference then follows the official test pipeline exactly (README, "Using the
official weights"); the plain configs pad images and do not reproduce the official outputs.

The model of ``--config-file`` is built (random weights, on the CPU, class counts from the
metadata of DATASETS.TRAIN[0]) and every converted tensor must match one of its parameters or
buffers in name and shape, and fill all of them; otherwise the tool lists the problems and exits
with status 1 without writing (``--allow-missing`` writes the matching tensors anyway).
The mapping itself is :mod:`panoptic_segformer.checkpoint.official`.
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detectron2.data.datasets  # noqa: E402,F401  (registers the builtin metadata, e.g. COCO panoptic)
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.checkpoint import (  # noqa: E402
    CheckpointError,
    atomic_write,
    check_finite,
    compare_with_model,
    convert_official_state_dict,
    load_checkpoint_file,
)
from panoptic_segformer.modeling.backbone.timm_backbone import TimmBackbone  # noqa: E402

logger = logging.getLogger("convert_official_checkpoint")

_MAX_LISTED = 20


def load_official(path: str, trust: bool) -> dict:
    """The ``state_dict`` of an mmcv checkpoint (or a bare state dict) at ``path``, read with the
    project's loading policy (``--trust`` allows full unpickling); NaN / Inf weights are refused."""
    try:
        ckpt = load_checkpoint_file(path, trust=trust, opt_in="--trust")
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SystemExit(f"{path} does not hold a state dict of tensors (expected an mmcv checkpoint)")
        check_finite(state, path)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(str(e))
    return state


def _listing(title, items):
    shown = "\n  ".join(str(i) for i in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {title}:\n  {shown}{more}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.pth written by mmcv)")
    parser.add_argument("output", help="converted checkpoint to write ({'model': state_dict})")
    parser.add_argument(
        "--config-file",
        default=str(Path(__file__).resolve().parents[1] / "configs" / "R50.yaml"),
        help="config of the target model",
    )
    parser.add_argument("--trust", action="store_true",
                        help="allow full unpickling when torch.load(weights_only=True) refuses the input")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write the matching tensors even if some are missing, unexpected or mis-shaped")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="convert_official_checkpoint")
    setup_logger(name="panoptic_segformer")

    # random init only: nothing is read from MODEL.WEIGHTS or a backbone checkpoint
    cfg = get_panoptic_segformer_cfg(
        args.config_file, list(args.opts) + ["MODEL.WEIGHTS", "", "MODEL.TIMM.PRETRAINED", ""], device="cpu"
    )
    model = build_model(cfg)
    state = load_official(args.input, args.trust)
    backbone = model.backbone if isinstance(model.backbone, TimmBackbone) else None
    converted = convert_official_state_dict(state, timm_backbone=backbone)

    missing, unexpected, mismatched = compare_with_model(converted, model)
    problems = [
        _listing(title, items)
        for title, items in (
            ("model tensors missing from the checkpoint", missing),
            ("converted keys the model does not have", unexpected),
            ("shape mismatches (key, checkpoint, model)", mismatched),
        )
        if items
    ]
    for p in problems:
        logger.error(p)
    if problems and not args.allow_missing:
        logger.error(f"not written: {args.output} (the checkpoint does not match {args.config_file}; "
                     "--allow-missing writes the matching tensors)")
        return 1
    bad = set(unexpected) | {k for k, _, _ in mismatched}
    model_state = {k: v.contiguous() for k, v in converted.items() if k not in bad}
    atomic_write(args.output, lambda f: torch.save({"model": model_state}, f))
    logger.info(f"wrote {len(model_state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
