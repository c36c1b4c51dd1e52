"""Config keys of Panoptic SegFormer (defaults follow ../shared/docs/SPEC.md, the official R50 recipe)."""
import logging
from typing import Optional, Sequence

import torch

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

logger = logging.getLogger(__name__)


def add_panoptic_segformer_config(cfg):
    """Add every Panoptic SegFormer hyper-parameter to a Detectron2 config, in place.

    Class counts are not here on purpose: they come from the training dataset's metadata.
    """
    m = cfg.MODEL.PANOPTIC_SEGFORMER = CN()
    m.IN_FEATURES = ["res3", "res4", "res5"]  # backbone maps at strides 8/16/32
    m.HIDDEN_DIM = 256
    m.NUM_FEATURE_LEVELS = 4  # the 3 projected maps + one 3x3 stride-2 conv on the last raw map
    m.NECK_NUM_GROUPS = 32
    m.SIZE_DIVISIBILITY = 32
    # inference exactly as the official test pipeline (the *_official.yaml configs): images one at a
    # time without padding, resized with cv2 by mmcv's imrescale rule (README, "Using the official weights")
    m.OFFICIAL_COMPAT = False
    # deformable encoder and location decoder
    m.NHEADS = 8
    m.ENC_LAYERS = 6
    m.DEC_LAYERS = 6
    m.DIM_FEEDFORWARD = 1024
    m.DROPOUT = 0.1
    m.ENC_N_POINTS = 4
    m.DEC_N_POINTS = 4
    m.NUM_QUERIES = 300
    # mask decoders (operate on the 3 finest levels)
    m.THING_MASK_DECODER_LAYERS = 4
    m.STUFF_MASK_DECODER_LAYERS = 6
    m.MASK_DECODER_MLP_RATIO = 4
    # losses (SPEC §5)
    m.CLASS_WEIGHT = 2.0
    m.BBOX_WEIGHT = 5.0
    m.GIOU_WEIGHT = 2.0
    m.MASK_WEIGHT = 2.0  # Dice
    m.STUFF_CLASS_WEIGHT = 4.0  # focal presence loss of stuff queries (2.0 doubled in the official code)
    m.FOCAL_ALPHA = 0.25
    m.FOCAL_GAMMA = 2.0
    # Hungarian matching of the location decoder
    m.MATCHER = CN()
    m.MATCHER.COST_CLASS = 2.0
    m.MATCHER.COST_BBOX = 5.0
    m.MATCHER.COST_GIOU = 2.0
    # second matching, among the selected thing queries, for thing masks
    m.MASK_MATCHER = CN()
    m.MASK_MATCHER.COST_CLASS = 4.0
    m.MASK_MATCHER.COST_BBOX = 5.0
    m.MASK_MATCHER.COST_GIOU = 2.0
    m.MASK_MATCHER.COST_DICE = 2.0
    # inference: mask-wise merging (SPEC §6)
    m.TEST = CN()
    m.TEST.PANOPTIC_ON = True
    m.TEST.INSTANCE_ON = False
    m.TEST.SEMANTIC_ON = False
    m.TEST.NUM_THING_CANDIDATES = 100  # top-k (query, class) pairs
    m.TEST.MASK_THRESHOLD = 0.5  # on the raw (ReLU) mask values
    m.TEST.THING_SCORE_THRESH = 0.25
    m.TEST.STUFF_SCORE_THRESH = 0.25
    m.TEST.THING_OVERLAP_THRESH = 0.4
    m.TEST.STUFF_OVERLAP_THRESH = 0.2
    # autocast dtype of the network stages at inference: "fp32", "bf16" or "fp16"
    # (merging and mask resizing stay float32; see panoptic_segformer/modeling/precision.py)
    m.TEST.PRECISION = "fp32"

    # weights files that need full unpickling (.pkl, .pyth, .pth with objects) run code when
    # loaded: refused unless this is True (train_net.py / demo.py: --trust-checkpoint)
    cfg.MODEL.TRUST_CHECKPOINT = False

    # timm backbones (PVTv2, Swin): weights come from a local file, never downloaded
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "pvt_v2_b0"  # a timm model name
    cfg.MODEL.TIMM.OUT_INDICES = [1, 2, 3]  # stages at strides 8/16/32
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.1
    cfg.MODEL.TIMM.PRETRAINED = ""  # path to a local timm state dict ("" = random init)

    # data
    # COCO-format panoptic datasets given by paths, "NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON"
    # (train_net.py --dataset), registered before the loaders are built; name them in DATASETS.TRAIN/TEST
    cfg.DATASETS.COCO_PANOPTIC = []
    cfg.INPUT.DATASET_MAPPER_NAME = "panoptic_detr"  # or "panoptic_lsj"
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = True
    cfg.INPUT.DETR_CROP.PRE_RESIZE_SHORTEST = [400, 500, 600]
    cfg.INPUT.DETR_CROP.PRE_RESIZE_MAX = 4200
    cfg.INPUT.DETR_CROP.SIZE = [384, 600]  # RandomCrop "absolute_range"
    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0

    # PNG of PQ / PQ_th / PQ_st after each evaluation (TEST.EVAL_PERIOD and the final one), relative
    # to OUTPUT_DIR; "" = none
    cfg.TEST.LEARNING_CURVE = ""

    # solver (SPEC §7)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.LR_MULTIPLIER_KEYS = ["backbone", "sampling_offsets", "reference_points"]
    cfg.SOLVER.LR_MULTIPLIER = 0.1
    cfg.SOLVER.AMP.PRECISION = "float16"  # or "bfloat16"


# minimum value of each integer size (MODEL.PANOPTIC_SEGFORMER.<key>); 0 layers is a valid ablation
_MIN_SIZES = {
    "HIDDEN_DIM": 2, "NHEADS": 1, "NUM_FEATURE_LEVELS": 1, "NECK_NUM_GROUPS": 1,
    "SIZE_DIVISIBILITY": 0, "ENC_LAYERS": 0, "DEC_LAYERS": 1, "DIM_FEEDFORWARD": 1,
    "ENC_N_POINTS": 1, "DEC_N_POINTS": 1, "NUM_QUERIES": 1, "THING_MASK_DECODER_LAYERS": 0,
    "STUFF_MASK_DECODER_LAYERS": 1, "MASK_DECODER_MLP_RATIO": 1, "TEST.NUM_THING_CANDIDATES": 1,
}


def check_panoptic_segformer_config(cfg) -> None:
    """Raise ValueError naming the key when a MODEL.PANOPTIC_SEGFORMER size or ratio cannot
    build a model (e.g. ``NUM_QUERIES -3``, ``HIDDEN_DIM`` not divisible by ``NHEADS``)."""
    m = cfg.MODEL.PANOPTIC_SEGFORMER

    def get(key):
        node = m
        for part in key.split("."):
            node = node[part]
        return node

    def fail(key, problem):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.{key} = {get(key)!r}: {problem}")

    for key, minimum in _MIN_SIZES.items():
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail(key, f"must be an int >= {minimum}")
    if m.HIDDEN_DIM % 2:
        fail("HIDDEN_DIM", "must be even (sine position encoding)")
    for key in ("NHEADS", "NECK_NUM_GROUPS"):
        if m.HIDDEN_DIM % get(key):
            fail(key, f"must divide HIDDEN_DIM = {m.HIDDEN_DIM}")
    if m.NUM_FEATURE_LEVELS < len(m.IN_FEATURES):
        fail("NUM_FEATURE_LEVELS", f"must be >= the {len(m.IN_FEATURES)} IN_FEATURES {list(m.IN_FEATURES)}")
    if not 0.0 <= m.DROPOUT < 1.0:
        fail("DROPOUT", "must be in [0, 1)")


def get_panoptic_segformer_cfg(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None) -> CN:
    """A Detectron2 config with the Panoptic SegFormer keys, ``config_file`` and then ``opts`` merged.

    Args:
        config_file: YAML file to merge.
        opts: "KEY VALUE" pairs merged last, as a flat list (e.g. ``["MODEL.WEIGHTS", "x.pth"]``).
        device: overrides MODEL.DEVICE when given. Otherwise a CUDA MODEL.DEVICE falls back to
            "cpu", with a warning, when CUDA is not available.

    Returns:
        the config, not frozen (callers may still set keys).
    """
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if device:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE} but CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    return cfg
