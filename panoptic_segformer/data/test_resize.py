"""Test-time resizing: Detectron2's by default, or the official pipeline's (mmcv ``imrescale``).

Both keep the aspect ratio with a short side of ``INPUT.MIN_SIZE_TEST`` (800) and a long side of
at most ``INPUT.MAX_SIZE_TEST`` (1333), and give the same size for almost every image; they
differ in the pixels:

* default: ``ResizeShortestEdge``, whose uint8 images go through PIL's bilinear filter;
* official (``MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT``): mmdet 2.12's test ``Resize(keep_ratio=True)``
  with ``img_scale=(1333, 800)``, i.e. mmcv 1.3.4 ``imrescale``: scale factor
  ``s = min(long / max(h, w), short / min(h, w))``, new size ``(int(w * s + 0.5), int(h * s + 0.5))``,
  pixels from ``cv2.resize(..., INTER_LINEAR)``.
"""
from typing import List

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["CV2ResizeTransform", "MMCVRescale", "build_test_augmentation", "build_test_resize"]

_CV2_INTERP = {Image.BILINEAR: cv2.INTER_LINEAR, Image.NEAREST: cv2.INTER_NEAREST}


class CV2ResizeTransform(T.ResizeTransform):
    """Detectron2's ``ResizeTransform`` whose images are resized by OpenCV (``cv2.resize``).

    ``interp`` is ``PIL.Image.BILINEAR`` (``INTER_LINEAR``, no antialiasing) or ``PIL.Image.NEAREST``
    (used for segmentation maps). Coordinates scale as in ``ResizeTransform``.
    """

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp=Image.BILINEAR):
        if interp not in _CV2_INTERP:
            raise ValueError(f"CV2ResizeTransform supports PIL BILINEAR and NEAREST only, got {interp!r}")
        super().__init__(h, w, new_h, new_w, interp)

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        """img: (h, w) or (h, w, C) array -> (new_h, new_w[, C]) of the same dtype."""
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"CV2ResizeTransform expects an image of size {(self.h, self.w)}, got {img.shape[:2]}")
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=_CV2_INTERP[self.interp if interp is None else interp])
        return out.reshape(self.new_h, self.new_w, *img.shape[2:])  # cv2 drops a trailing channel of 1


class MMCVRescale(T.Augmentation):
    """Resize keeping the aspect ratio as mmcv 1.3.4 ``imrescale(img, (long, short))`` does
    (module docstring). ``short = 0`` leaves the image unchanged."""

    def __init__(self, short: int, long: int):
        super().__init__()
        if short < 0 or (short > 0 and long < short):
            raise ValueError(f"MMCVRescale needs 0 <= short <= long (or short = 0), got short={short}, long={long}")
        self.short, self.long = short, long

    def get_output_shape(self, h: int, w: int):
        """(new_h, new_w) of an (h, w) image."""
        scale = min(self.long / max(h, w), self.short / min(h, w))
        return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)

    def get_transform(self, image):
        if self.short == 0:
            return T.NoOpTransform()
        h, w = image.shape[:2]
        return CV2ResizeTransform(h, w, *self.get_output_shape(h, w))


def build_test_resize(min_size: int, max_size: int, official: bool) -> T.Augmentation:
    """The test-time resize: short side ``min_size`` (0 = none), long side <= ``max_size``;
    mmcv's rule and OpenCV's pixels when ``official``, else Detectron2's ``ResizeShortestEdge``."""
    if official:
        return MMCVRescale(min_size, max_size)
    return T.ResizeShortestEdge([min_size, min_size], max_size)


def build_test_augmentation(cfg) -> List[T.Augmentation]:
    """Test-time augmentation of a config: the resize chosen by ``MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT``."""
    official = cfg.MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT
    return [build_test_resize(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, official)]
