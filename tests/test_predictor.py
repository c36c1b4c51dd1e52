"""Tests of panoptic_segformer.predictor: preprocessing, batching, weight loading (stub model),
and batched vs one-at-a-time prediction with the real model."""

import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from conftest import COCO_SAMPLE, REPO_ROOT, requires_coco_sample

pytest.importorskip(
    "detectron2", reason="detectron2 not installed (install it from its official source)"
)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from panoptic_segformer import add_panoptic_segformer_config  # noqa: E402
from panoptic_segformer.predictor import Predictor, load_weights  # noqa: E402


@META_ARCH_REGISTRY.register()
class StubPanopticModel(nn.Module):
    """Stands in for PanopticSegFormer in tests of the code around the model.

    Records every batch it receives. For an image it returns a stuff segment (id 1, contiguous
    category 80) on the left half and a thing segment (id 2, category 0, score 0.3) on the right
    half, the thing only when 0.3 >= MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH.
    """

    calls = []  # per forward: list of (image dtype, (C, H, W), height, width)

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.thing_thresh = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH
        self.instance_on = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON
        self.semantic_on = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON
        self.received = []  # the image tensors of the last call

    def forward(self, batched_inputs):
        StubPanopticModel.calls.append(
            [
                (x["image"].dtype, tuple(x["image"].shape), x["height"], x["width"])
                for x in batched_inputs
            ]
        )
        self.received = [x["image"] for x in batched_inputs]
        outputs = []
        for x in batched_inputs:
            h, w = x["height"], x["width"]
            id_map = torch.ones(h, w, dtype=torch.int32)
            segments = [{"id": 1, "category_id": 80, "isthing": False, "score": 0.9}]
            if 0.3 >= self.thing_thresh:
                id_map[:, w // 2 :] = 2
                segments.append({"id": 2, "category_id": 0, "isthing": True, "score": 0.3})
            out = {"panoptic_seg": (id_map, segments)}
            if self.instance_on:
                inst = Instances((h, w))
                inst.pred_masks = (id_map == 2)[None]
                inst.pred_boxes = Boxes(torch.tensor([[w / 2, 0.0, w, h]]))
                inst.scores = torch.tensor([0.3])
                inst.pred_classes = torch.tensor([0])
                out["instances"] = inst
            if self.semantic_on:
                sem = torch.zeros(133, h, w)
                sem[80] = 1.0
                out["sem_seg"] = sem
            outputs.append(out)
        return outputs


def stub_cfg(**overrides):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "StubPanopticModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.FORMAT = "RGB"  # as the project's configs
    cfg.DATASETS.TRAIN = ("coco_2017_train_panoptic",)
    cfg.DATASETS.TEST = ("coco_2017_val_panoptic",)
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 1000
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


class ListHandler(logging.Handler):
    """Collects the messages of one logger (Detectron2's setup_logger stops propagation)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.messages = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_resize_channel_order_and_original_size():
    StubPanopticModel.calls.clear()
    predictor = Predictor(stub_cfg())
    bgr = np.zeros((40, 80, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    bgr[..., 2] = 200  # red
    out = predictor(bgr)  # a single array gives a single dict
    assert isinstance(out, dict)
    # shortest edge 40 -> 32, keeping the aspect ratio: 32 x 64; the output is at 40 x 80
    assert StubPanopticModel.calls == [[(torch.uint8, (3, 32, 64), 40, 80)]]
    image = predictor.model.received[0]
    assert image[0].float().mean() == 200 and image[2].float().mean() == 10  # RGB for the model
    assert out["panoptic_seg"][0].shape == (40, 80)
    # an RGB input is not flipped
    predictor(bgr, format="RGB")
    assert predictor.model.received[0][0].float().mean() == 10


def test_batches_of_batch_size_in_order():
    StubPanopticModel.calls.clear()
    predictor = Predictor(stub_cfg(), batch_size=2)
    images = [np.full((32 + 8 * i, 48, 3), i, np.uint8) for i in range(5)]
    outs = predictor(images)
    assert [len(c) for c in StubPanopticModel.calls] == [2, 2, 1]
    assert [o["panoptic_seg"][0].shape[0] for o in outs] == [32, 40, 48, 56, 64]
    StubPanopticModel.calls.clear()
    predictor(images, batch_size=4)
    assert [len(c) for c in StubPanopticModel.calls] == [4, 1]
    assert predictor([]) == []


def test_min_size_zero_means_no_resize():
    StubPanopticModel.calls.clear()
    predictor = Predictor(stub_cfg(**{"INPUT.MIN_SIZE_TEST": 0}))
    predictor([np.zeros((37, 53, 3), np.uint8)])
    assert StubPanopticModel.calls == [[(torch.uint8, (3, 37, 53), 37, 53)]]


@pytest.mark.parametrize(
    "image, error, words",
    [
        (np.zeros((8, 8), np.uint8), ValueError, ["images[1]", "(8, 8)", "(H, W, 3)"]),
        (np.zeros((8, 8, 4), np.uint8), ValueError, ["images[1]", "(8, 8, 4)"]),
        (np.zeros((8, 8, 3), np.float32), TypeError, ["images[1]", "float32", "uint8"]),
        (np.zeros((0, 8, 3), np.uint8), ValueError, ["images[1]", "empty"]),
        ([[1, 2, 3]], TypeError, ["images[1]", "list"]),
    ],
)
def test_bad_images_are_named(image, error, words):
    predictor = Predictor(stub_cfg())
    with pytest.raises(error) as e:
        predictor([np.zeros((8, 8, 3), np.uint8), image])
    for word in words:
        assert word in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(stub_cfg(), batch_size=0)
    predictor = Predictor(stub_cfg())
    with pytest.raises(ValueError, match="format"):
        predictor([np.zeros((8, 8, 3), np.uint8)], format="YUV")
    with pytest.raises(ValueError, match="batch_size"):
        predictor([np.zeros((8, 8, 3), np.uint8)], batch_size=-1)


def test_weights_loaded_once_safely(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"weight": torch.tensor([1.0, 2.0, 3.0])}, "iteration": 7}, path)
    predictor = Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(path)}))
    assert predictor.model.weight.tolist() == [1.0, 2.0, 3.0]
    assert not predictor.model.training

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(tmp_path / "missing.pth")}))


class _NotATensor:
    def __init__(self):
        self.value = 1


def test_checkpoint_with_objects_needs_trust(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"weight": torch.tensor([4.0, 5.0, 6.0])}, "extra": _NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(path)}))
    predictor = Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(path)}), trust_checkpoint=True)
    assert predictor.model.weight.tolist() == [4.0, 5.0, 6.0]
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"weight": np.zeros(3)}}))
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(pkl)}))


def test_malicious_pickle_runs_no_code_unless_the_config_trusts_it(tmp_path):
    from test_checkpoint import write_malicious_pickle

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pkl"
    write_malicious_pickle(evil, marker)
    with pytest.raises(RuntimeError, match="MODEL.TRUST_CHECKPOINT"):
        Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(evil)}))
    assert not marker.exists()
    # the config key is the documented opt-in: then the file is unpickled (and its code runs)
    with pytest.raises(Exception):
        Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(evil), "MODEL.TRUST_CHECKPOINT": True}))
    assert marker.exists()


def test_empty_random_and_non_finite_weights_are_refused_with_a_message(tmp_path):
    from panoptic_segformer.checkpoint import CorruptCheckpointError, NonFiniteCheckpointError

    empty, noise, nan = tmp_path / "empty.pth", tmp_path / "noise.pth", tmp_path / "nan.pth"
    empty.write_bytes(b"")
    noise.write_bytes(bytes(range(1, 256)) * 8)
    torch.save({"model": {"weight": torch.full((3,), float("nan"))}}, nan)
    for path, error, text in [
        (empty, CorruptCheckpointError, "empty"),
        (noise, CorruptCheckpointError, "not a checkpoint"),
        (nan, NonFiniteCheckpointError, r"weight \(3 NaN, 0 Inf of 3 values\)"),
    ]:
        with pytest.raises(error, match=text):
            Predictor(stub_cfg(**{"MODEL.WEIGHTS": str(path)}))


def test_random_weights_and_partial_checkpoints_warn(tmp_path):
    model = StubPanopticModel(stub_cfg())
    with ListHandler("panoptic_segformer.predictor") as log:
        load_weights(model, "")
    assert any("RANDOM" in m and "trained weights" in m for m in log.messages)

    path = tmp_path / "other.pth"
    torch.save({"model": {"something_else": torch.zeros(1)}}, path)
    with ListHandler("panoptic_segformer.predictor") as log:
        load_weights(model, str(path))
    assert any("1 of 1 model tensors" in m and "weight" in m for m in log.messages)


# --------------------------------------------------------------------------- real model


def small_model_cfg(**extra):
    """configs/R50.yaml on CPU with random weights, shrunk so that a test takes seconds."""
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "R50.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TEST",
            160,
            "INPUT.MAX_SIZE_TEST",
            256,
            "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS",
            1,
            "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS",
            2,
            "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES",
            30,
            "MODEL.PANOPTIC_SEGFORMER.THING_MASK_DECODER_LAYERS",
            1,
            "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS",
            1,
            "MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THING_CANDIDATES",
            20,
        ]
        + [v for kv in extra.items() for v in kv]
    )
    return cfg


def sample_images():
    from detectron2.data.detection_utils import read_image

    return [
        read_image(str(p), format="BGR") for p in sorted((COCO_SAMPLE / "images").glob("*.jpg"))
    ]


@requires_coco_sample
def test_batch_of_two_equals_one_at_a_time():
    torch.manual_seed(0)
    # With random weights the thing masks are ~0 and the first stuff mask covers the image at
    # the default settings; these settings give several segments of partial masks per image,
    # so that the comparison means something.
    t = "MODEL.PANOPTIC_SEGFORMER.TEST."
    cfg = small_model_cfg(
        **{
            t + "THING_SCORE_THRESH": 0.0,
            t + "STUFF_SCORE_THRESH": 0.0,
            t + "THING_OVERLAP_THRESH": 1.0,
            t + "STUFF_OVERLAP_THRESH": 1.0,
            t + "MASK_THRESHOLD": 1.5,
        }
    )
    predictor = Predictor(cfg, batch_size=2)
    first, second = sample_images()
    # 427x640 -> 160x240 and 360x400 -> 160x178 at the test scale: padded to 160x256 and
    # 160x192, so the second image is padded further inside the batch than alone
    images = [first, second[:, :400]]
    batched = predictor(images)
    single = [predictor([img], batch_size=1)[0] for img in images]
    for b, s, img in zip(batched, single, images):
        (b_map, b_info), (s_map, s_info) = b["panoptic_seg"], s["panoptic_seg"]
        assert b_map.shape == s_map.shape == img.shape[:2]
        assert len(s_info) >= 3
        assert [(x["id"], x["category_id"], x["isthing"]) for x in b_info] == [
            (x["id"], x["category_id"], x["isthing"]) for x in s_info
        ]
        np.testing.assert_allclose(
            [x["score"] for x in b_info], [x["score"] for x in s_info], rtol=1e-4
        )
        # float sums may differ between batch shapes: allow a handful of boundary pixels
        assert (b_map != s_map).float().mean() < 1e-3
