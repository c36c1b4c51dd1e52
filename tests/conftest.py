"""Shared test helpers: optional dependencies and the COCO panoptic sample from ../shared.

``PSF_STRICT_SKIPS=1`` (set by ``.ci/run``) fails the run when Detectron2 is missing or when any
test is skipped for a reason other than a missing GPU, so that CI cannot stay green by skipping.
"""
import importlib.util
import os
import re
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "coco_panoptic_sample"

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
STRICT_SKIPS = os.environ.get("PSF_STRICT_SKIPS") == "1"
_GPU_REASON = re.compile(r"\b(CUDA|GPUs?)\b")

if not HAS_DETECTRON2:
    if STRICT_SKIPS:
        raise pytest.UsageError("PSF_STRICT_SKIPS=1 but detectron2 is not installed (run scripts/setup.sh)")
    warnings.warn("detectron2 is not installed: every test that needs it is SKIPPED", stacklevel=1)

requires_detectron2 = pytest.mark.skipif(
    not HAS_DETECTRON2, reason="detectron2 not installed (install it from its official source)"
)
requires_coco_sample = pytest.mark.skipif(
    not COCO_SAMPLE.is_dir(), reason=f"COCO panoptic sample not found at {COCO_SAMPLE}"
)


def pytest_report_header(config):
    from panoptic_segformer.env_info import environment_report

    return f"environment: {environment_report()}"


_non_gpu_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not _GPU_REASON.search(reason):
            _non_gpu_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if STRICT_SKIPS and _non_gpu_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if STRICT_SKIPS and _non_gpu_skips:
        terminalreporter.section("PSF_STRICT_SKIPS: tests skipped for a reason other than a missing GPU")
        for line in _non_gpu_skips:
            terminalreporter.line(line)
