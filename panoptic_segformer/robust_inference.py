"""Inference over many inputs where one bad input costs only itself (used by ``demo/demo.py``):
per-input predictions when a batch fails, a bound on the size of what is predicted and drawn,
and video frames read past the ones that cannot be decoded."""
import logging
from typing import Callable, List, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = ["VideoFrames", "fit_size", "fit_within", "predict_each"]

logger = logging.getLogger(__name__)


def predict_each(predictor: Callable, images: Sequence[np.ndarray], **kwargs) -> List[Union[dict, Exception]]:
    """``predictor(images)`` as one batch; if that raises, each image alone, so that the result
    holds the output of every image that works and the exception of every one that does not."""
    try:
        return list(predictor(list(images), **kwargs))
    except Exception as e:  # any failure: find out which image(s) it comes from
        if len(images) == 1:
            return [e]
    results = []
    for image in images:
        try:
            results.append(predictor([image], **kwargs)[0])
        except Exception as e:  # any failure of this input: reported by the caller, by name
            results.append(e)
    return results


def fit_size(height: int, width: int, max_size: int) -> Tuple[int, int]:
    """(height, width) scaled down, keeping the aspect ratio, so that the longer side is at most
    ``max_size`` (each side at least 1); unchanged when it already fits or ``max_size <= 0``."""
    scale = max_size / max(height, width, 1) if max_size > 0 else 1.0
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_within(image: np.ndarray, max_size: int) -> np.ndarray:
    """``image`` (H, W, C) shrunk to :func:`fit_size` with area interpolation."""
    height, width = fit_size(*image.shape[:2], max_size)
    if (height, width) == image.shape[:2]:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


class VideoFrames:
    """The (frame number, frame) of an opened ``cv2.VideoCapture``, skipping the frames that
    cannot be decoded.

    A failed read does not end the stream: OpenCV goes on with the next frame. The stream ends
    after the container's frame count (``CAP_PROP_FRAME_COUNT``) of reads, or after
    ``max_consecutive_failures`` failed reads in a row (the end of a stream of unknown length,
    e.g. a webcam, or a file broken beyond repair). After iterating, ``decoded`` counts the
    frames yielded and ``lost`` the frames that could not be read: with a known frame count,
    every frame of it that was not decoded; otherwise the failed reads followed by a good frame.
    """

    def __init__(self, capture, max_consecutive_failures: int = 10):
        self.capture = capture
        self.total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)  # 0: unknown
        self.max_consecutive_failures = max_consecutive_failures
        self.decoded = 0
        self.lost = 0
        self.lost_at: List[int] = []  # read numbers of the failures followed by a good frame

    def __iter__(self):
        reads, failed_in_row = 0, []
        while not self.total or reads < self.total:
            ok, frame = self.capture.read()
            reads += 1
            if not ok or frame is None:
                failed_in_row.append(reads - 1)
                if len(failed_in_row) >= self.max_consecutive_failures:
                    break
                continue
            if failed_in_row:
                logger.warning(f"frame(s) {failed_in_row} cannot be decoded: skipped")
                self.lost_at += failed_in_row
                failed_in_row = []
            self.decoded += 1
            yield reads - 1, frame
        self.lost = max(self.total - self.decoded, 0) if self.total else len(self.lost_at)
