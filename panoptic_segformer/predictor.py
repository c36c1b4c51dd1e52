"""Batched inference: load a config and its weights once, then predict on numpy images.

``Predictor`` is the programmatic entry point used by ``demo/demo.py``. Unlike Detectron2's
``DefaultPredictor`` it takes a list of images and runs them through the model ``batch_size`` at
a time; every image is resized to the test scale (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, with
the official resize under ``MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT``) and
its outputs come back at its original size, in Detectron2's format (``panoptic_seg``, optionally
``instances`` and ``sem_seg``).

Faster inference: ``precision="bf16"`` (CPUs with AVX512-BF16 / AMX, GPUs) or ``"fp16"`` (GPUs)
runs the network under autocast, ``compile=True`` compiles its stages with ``torch.compile``
and ``channels_last=True`` stores the backbone's convolution weights channels-last
(see :func:`prepare_for_inference`).
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from .checkpoint import SafeCheckpointer
from .compile import compile_stages
from .data.test_resize import build_test_resize
from .modeling.precision import check_precision

__all__ = ["Predictor", "load_weights", "prepare_for_inference"]

logger = logging.getLogger(__name__)

ImageArray = np.ndarray  # (H, W, 3) uint8


def load_weights(model: nn.Module, weights: str, *, trust_pickle: bool = False) -> None:
    """Load ``weights`` (a path or URL, "" = keep the random init) into ``model``, with warnings.

    Warns loudly when ``weights`` is empty or when the checkpoint leaves parameters of the model
    uninitialised (e.g. an ImageNet backbone file given as MODEL.WEIGHTS): such a model gives
    meaningless predictions. Loading follows :class:`~panoptic_segformer.checkpoint.SafeCheckpointer`
    (``trust_pickle`` allows files that need full unpickling; NaN / Inf weights are refused).
    """
    if not weights:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model keeps its RANDOM initialisation and its predictions "
            "are meaningless. Real use needs trained weights (MODEL.WEIGHTS /path/to/model.pth)."
        )
        return
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")
    checkpointer = SafeCheckpointer(model, trust_pickle=trust_pickle)
    checkpointer.load(weights)
    missing = checkpointer.incompatible.missing_keys if checkpointer.incompatible else []
    if missing:
        n_params = len(model.state_dict())
        logger.warning(
            f"{len(missing)} of {n_params} model tensors are not in {weights} and keep their random "
            f"initialisation (first: {missing[0]}); predictions will not be meaningful."
        )


def prepare_for_inference(
    model: nn.Module,
    *,
    precision: Optional[str] = None,
    compile: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """Set up ``model`` (in place) for fast inference and return it.

    Args:
        precision: "fp32", "bf16" or "fp16": the autocast dtype of the network stages
            (``model.precision``); None keeps the model's own (``TEST.PRECISION``). Checked
            against the model's device (:func:`~.modeling.precision.check_precision`).
        compile: ``torch.compile`` the stages (:func:`~.compile.compile_stages`); the first
            call at each new input size compiles (minutes on a CPU), and a stage that cannot
            compile runs eagerly after one warning. With ``official_compat`` (every image at its
            own unpadded size) a warning says that new sizes recompile.
        channels_last: store the backbone's 4-d weights channels-last, so its convolutions run
            in oneDNN's preferred layout (helps bf16 on CPU).

    Raises:
        TypeError: ``precision`` given for a model without a ``precision`` attribute.
    """
    if precision is not None:
        if not hasattr(model, "precision"):
            raise TypeError(f"{type(model).__name__} has no 'precision' attribute; it cannot run in {precision!r}")
        device = getattr(model, "device", None) or next(model.parameters()).device
        check_precision(precision, device)
        model.precision = precision
    if channels_last:
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise TypeError(f"{type(model).__name__} has no 'backbone' to make channels-last")
        backbone.to(memory_format=torch.channels_last)
    if compile:
        if getattr(model, "official_compat", False):
            logger.warning(
                "compile with MODEL.PANOPTIC_SEGFORMER.OFFICIAL_COMPAT: every image runs at its own "
                "unpadded size, so compiled stages recompile for new sizes and, past torch's "
                "recompile limit, run eagerly; compilation pays off only for inputs of few sizes"
            )
        compile_stages(model)
    return model


class Predictor:
    """Run a Panoptic SegFormer model (or any Detectron2 model) on numpy images, in batches.

    Build it from a config, ``Predictor(cfg, batch_size=2)``, which builds the model, loads
    ``cfg.MODEL.WEIGHTS`` once and puts the model in eval mode on ``cfg.MODEL.DEVICE``; or from
    parts, ``Predictor(model=m, metadata=md, min_size_test=800, max_size_test=1333)``.

    Call it with a list of (H, W, 3) uint8 arrays (BGR by default, as ``cv2.imread`` gives) or
    with one array; it returns one output dict per image (a dict for a single array):

    - ``"panoptic_seg"``: ``(id_map int32 (H, W), segments_info)`` with ``id``, ``category_id``
      (contiguous), ``isthing`` and ``score`` per segment; id 0 is void;
    - ``"instances"`` / ``"sem_seg"`` when the model's config enables them.

    Outputs stay on the model's device and are at each image's original (H, W).
    """

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        metadata,
        min_size_test: int,
        max_size_test: int,
        model_input_format: str = "RGB",
        batch_size: int = 1,
        official_resize: bool = False,
        precision: Optional[str] = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        """
        Args:
            model: a Detectron2 model in eval mode, taking a list of dicts with "image" (uint8
                (3, H, W) in ``model_input_format``), "height" and "width".
            metadata: the dataset ``Metadata`` of the model's contiguous ids, used to draw the
                outputs (from a config: that of DATASETS.TRAIN[0], else DATASETS.TEST[0]).
            min_size_test, max_size_test: test-time ResizeShortestEdge; 0 = no resizing.
            model_input_format: "RGB" or "BGR", the channel order the model expects.
            batch_size: images per forward pass.
            official_resize: resize as the official test pipeline (mmcv's size rule, OpenCV
                bilinear) instead of Detectron2's ``ResizeShortestEdge`` (PIL bilinear).
            precision, compile, channels_last: see :func:`prepare_for_inference` (precision None
                keeps the model's, from a config ``MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION``).
        """
        if model_input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"model_input_format must be 'RGB' or 'BGR', got {model_input_format!r}"
            )
        self.model = prepare_for_inference(
            model, precision=precision, compile=compile, channels_last=channels_last
        )
        self.metadata = metadata
        self.model_input_format = model_input_format
        self.batch_size = _check_batch_size(batch_size)
        self.aug = build_test_resize(min_size_test, max_size_test, official_resize)

    @classmethod
    def from_config(
        cls,
        cfg,
        *,
        batch_size: int = 1,
        trust_checkpoint: bool = False,
        precision: Optional[str] = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        # registers the project's datasets (the package itself registers the model)
        from . import data  # noqa: F401

        cfg = cfg.clone()
        model = build_model(cfg)
        model.eval()
        load_weights(model, cfg.MODEL.WEIGHTS, trust_pickle=trust_checkpoint or cfg.MODEL.get("TRUST_CHECKPOINT", False))
        # the training set's metadata defines the model's contiguous ids (and so the drawing)
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        return {
            "model": model,
            "metadata": MetadataCatalog.get(names[0] if names else "__unused"),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "model_input_format": cfg.INPUT.FORMAT,
            "batch_size": batch_size,
            "official_resize": bool(cfg.MODEL.get("PANOPTIC_SEGFORMER", {}).get("OFFICIAL_COMPAT", False)),
            "precision": precision,
            "compile": compile,
            "channels_last": channels_last,
        }

    def __call__(
        self,
        images: Union[ImageArray, Sequence[ImageArray]],
        *,
        format: str = "BGR",
        batch_size: Optional[int] = None,
    ) -> Union[Dict, List[Dict]]:
        """
        Args:
            images: one (H, W, 3) uint8 array, or a sequence of them (sizes may differ), or an
                (N, H, W, 3) array.
            format: channel order of ``images``, "BGR" (OpenCV) or "RGB" (PIL).
            batch_size: overrides the predictor's batch size for this call.

        Returns:
            a list of output dicts, one per image in order; a single dict for a single (H, W, 3)
            array.
        """
        if format not in ("RGB", "BGR"):
            raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
        single = isinstance(images, np.ndarray) and images.ndim == 3
        if single:
            images = [images]
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        inputs = [self._preprocess(img, i, format) for i, img in enumerate(images)]
        outputs = []
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                outputs.extend(self.model(inputs[start : start + batch_size]))
        return outputs[0] if single else outputs

    def _preprocess(self, image, index: int, format: str) -> Dict:
        if not isinstance(image, np.ndarray):
            raise TypeError(f"images[{index}] is a {type(image).__name__}; expected a numpy array")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"images[{index}] has shape {tuple(image.shape)}; expected (H, W, 3) color images"
            )
        if image.dtype != np.uint8:
            raise TypeError(f"images[{index}] has dtype {image.dtype}; expected uint8 (0-255)")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"images[{index}] is empty: shape {tuple(image.shape)}")
        if format != self.model_input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size
