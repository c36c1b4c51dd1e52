"""Shared test helpers: optional dependencies and the COCO panoptic sample from ../shared."""
import importlib.util
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "coco_panoptic_sample"

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
if not HAS_DETECTRON2:
    warnings.warn("detectron2 is not installed: every test that needs it is SKIPPED", stacklevel=1)

requires_detectron2 = pytest.mark.skipif(
    not HAS_DETECTRON2, reason="detectron2 not installed (install it from its official source)"
)
requires_coco_sample = pytest.mark.skipif(
    not COCO_SAMPLE.is_dir(), reason=f"COCO panoptic sample not found at {COCO_SAMPLE}"
)
