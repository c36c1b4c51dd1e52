"""Inference precision (issue 11): names and device checks, the TEST.PRECISION key, the Predictor
option, and bf16 numerics against fp32 on the small model of test_meta_arch."""
import copy
import importlib.util
import logging

import pytest
import torch

from conftest import REPO_ROOT, requires_detectron2

pytestmark = requires_detectron2

from panoptic_segformer.modeling import precision as P  # noqa: E402


def load_tool(name):
    """A script of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(f"psf_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_and_aliases():
    assert P.precision_dtype("fp32") is torch.float32
    assert P.precision_dtype("bf16") is P.precision_dtype("bfloat16") is torch.bfloat16
    assert P.precision_dtype("fp16") is P.precision_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        P.precision_dtype("int8")


def test_autocast_region():
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 8)
    with P.autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    with P.autocast("bf16", torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16


def test_check_precision(monkeypatch, caplog):
    assert P.check_precision("fp32", "cpu") is torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        P.check_precision("half", "cpu")
    with pytest.raises(RuntimeError, match="meta"):
        P.check_precision("bf16", "meta")
    monkeypatch.setattr(P, "native_cpu_support", lambda dtype: False)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.check_precision("bf16", "cpu") is torch.bfloat16
    assert "no native torch.bfloat16" in caplog.text and "slower" in caplog.text


def test_config_key_reaches_the_model():
    from test_meta_arch import build, small_cfg

    cfg = small_cfg()
    assert cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION == "fp32"
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION = "bf16"
    assert build(cfg).precision == "bf16"
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION = "int8"
    with pytest.raises(ValueError, match="int8"):
        build(cfg)


def _spy_merging(monkeypatch):
    """Record the dtypes of every mask_wise_merging call (the meta-arch merges through merge_candidates)."""
    from panoptic_segformer.modeling import merging

    calls = []
    original = merging.mask_wise_merging

    def spy(masks, labels, probs, is_thing, **kwargs):
        calls.append((masks.dtype, probs.dtype))
        return original(masks, labels, probs, is_thing, **kwargs)

    monkeypatch.setattr(merging, "mask_wise_merging", spy)
    return calls


def test_bf16_against_fp32_on_a_small_model(monkeypatch):
    """bf16 outputs agree with fp32 within a tolerance set by bf16's 8 significant bits.

    bf16 rounds every matmul / conv input and output to 8 bits (relative error up to 2^-9 =
    0.2 %); the small model chains ~30 such roundings (ResNet-18, neck, 1 encoder layer, 2
    decoder layers, 2+2 mask blocks) on activations of magnitude ~1-6, so output errors of a few
    1e-2 are expected: 0.017-0.025 (class logits) and 0.014-0.045 (masks) measured on seeds
    0-2. The tolerances below are over 2x the largest of those (other CPUs pick other oneDNN
    kernels, which round differently); an op that ran at the wrong
    precision or a lost cast shows up as differences of the size of the outputs themselves
    (up to 6 for logits, 3 for masks). Also: the network really ran in bf16, and the merging got
    float32 inputs.
    """
    pa = load_tool("precision_accuracy")
    from test_meta_arch import build, permissive, small_cfg, synthetic_input

    fp32 = permissive(build(small_cfg(), seed=0).eval())
    bf16 = copy.deepcopy(fp32)
    bf16.precision = "bf16"
    ref, out = pa.record_outputs(fp32), pa.record_outputs(bf16)
    backbone_dtypes = []
    bf16.backbone.register_forward_hook(lambda m, i, o: backbone_dtypes.append(o["res3"].dtype))
    merging = _spy_merging(monkeypatch)
    inputs = [synthetic_input(96, 128, seed=0, with_targets=False)]
    with torch.no_grad():
        fp32(inputs)
        result = bf16(inputs)
    assert backbone_dtypes == [torch.bfloat16]
    assert merging == [(torch.float32, torch.float32)] * 2
    assert result[0]["panoptic_seg"][0].shape == (96, 128)
    for key, tol in (("class_logits", 0.06), ("thing_masks", 0.1), ("stuff_masks", 0.1)):
        diff = (out[key] - ref[key]).abs().max().item()
        assert out[key].dtype == torch.float32
        assert 0 < diff < tol, (key, diff)  # > 0: bf16 really ran


def test_predictor_precision_option(monkeypatch):
    from test_meta_arch import small_cfg

    from panoptic_segformer.compile import CompiledForward
    from panoptic_segformer.predictor import Predictor, prepare_for_inference

    cfg = small_cfg()
    predictor = Predictor(cfg, precision="bf16", channels_last=True)
    assert predictor.model.precision == "bf16"
    conv = predictor.model.backbone.stem.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert Predictor(cfg).model.precision == "fp32"  # the config's TEST.PRECISION
    with pytest.raises(ValueError, match="int8"):
        Predictor(cfg, precision="int8")
    with pytest.raises(TypeError, match="no 'precision'"):
        prepare_for_inference(torch.nn.Linear(2, 2), precision="bf16")
    # compile=True wraps every stage's forward (compilation itself is lazy)
    model = Predictor(cfg, compile=True).model
    for name in ("backbone", "neck", "head.encoder", "head.location_decoder"):
        assert isinstance(model.get_submodule(name).forward, CompiledForward), name
    assert not isinstance(model.head.thing_mask_decoder.forward, CompiledForward)
    merging = _spy_merging(monkeypatch)
    image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8).numpy()
    predictor(image)
    assert merging == [(torch.float32, torch.float32)]


def test_changed_pixels_by_hand():
    """tools/precision_accuracy.py: pixels in one-to-one matched segments of the same category."""
    pa = load_tool("precision_accuracy")
    a = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]], dtype=torch.int32)
    seg_a = [{"id": 1, "category_id": 5}, {"id": 2, "category_id": 7}, {"id": 3, "category_id": 7}]
    renumbered = torch.tensor([[4, 4, 9, 9], [4, 4, 9, 9], [0, 0, 1, 1]], dtype=torch.int32)
    seg_r = [{"id": 4, "category_id": 5}, {"id": 9, "category_id": 7}, {"id": 1, "category_id": 7}]
    assert pa.matched_pixels(a, seg_a, renumbered, seg_r) == 12
    relabelled = [dict(s, category_id=8) if s["id"] == 1 else s for s in seg_r]  # segment 3's class
    assert pa.matched_pixels(a, seg_a, renumbered, relabelled) == 10
    merged = a.clone()
    merged[a == 3] = 2  # segments 2 and 3 merged: the smaller part (2 px) has no partner left
    assert pa.matched_pixels(a, seg_a, merged, seg_a[:2]) == 10
    shrunk = a.clone()
    shrunk[0, 0] = 0  # one pixel of segment 1 became void
    assert pa.matched_pixels(a, seg_a, shrunk, seg_a) == 11
    with pytest.raises(ValueError, match="differ in size"):
        pa.matched_pixels(a, seg_a, a[:2], seg_a)


def test_bf16_and_compile_in_the_official_compatible_mode(monkeypatch, caplog):
    """OFFICIAL_COMPAT runs a batch image by image at each image's size: bf16 applies to every
    image (the backbone sees bfloat16, the merging float32), the outputs keep each image's size
    and stay close to fp32's; compile warns that new sizes recompile."""
    from test_official_compat import compat_model
    from test_meta_arch import synthetic_input

    from panoptic_segformer.predictor import prepare_for_inference

    fp32 = compat_model()
    bf16 = prepare_for_inference(copy.deepcopy(fp32), precision="bf16")
    backbone_dtypes = []
    bf16.backbone.register_forward_hook(lambda m, i, o: backbone_dtypes.append(o["res3"].dtype))
    merging = _spy_merging(monkeypatch)
    inputs = [synthetic_input(96, 128, seed=0, with_targets=False), synthetic_input(80, 112, seed=1, with_targets=False)]
    pa = load_tool("precision_accuracy")
    ref, out = pa.record_outputs(fp32), pa.record_outputs(bf16)
    with torch.no_grad():
        fp32(inputs)
        results = bf16(inputs)
    assert backbone_dtypes == [torch.bfloat16] * 2  # one backbone call per image
    assert merging[-2:] == [(torch.float32, torch.float32)] * 2
    assert [r["panoptic_seg"][0].shape for r in results] == [(96, 128), (80, 112)]
    diff = (out["class_logits"] - ref["class_logits"]).abs().max().item()
    assert 0 < diff < 0.06, diff  # the tolerance of test_bf16_against_fp32_on_a_small_model
    with caplog.at_level(logging.WARNING, logger="panoptic_segformer.predictor"):
        prepare_for_inference(compat_model(), compile=True)
    assert "OFFICIAL_COMPAT" in caplog.text and "recompile" in caplog.text
