"""Parameter counts against SPEC §8.1 (the released code, without its two x0 branch sets).

"All" counts include the affine weight/bias of Detectron2's FrozenBatchNorm2d (buffers in
Detectron2, parameters in the official mmdet ResNet), as tools/analyze_model.py does.
"""
import importlib.util

import pytest
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from conftest import REPO_ROOT
from panoptic_segformer import add_panoptic_segformer_config
from panoptic_segformer.modeling.neck import ChannelMapper

HAS_META_ARCH = (REPO_ROOT / "panoptic_segformer" / "modeling" / "meta_arch.py").is_file()


def _analyze_model():
    spec = importlib.util.spec_from_file_location("analyze_model", REPO_ROOT / "tools" / "analyze_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(name):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _all_params(module):
    frozen_bn = sum(m.weight.numel() + m.bias.numel() for m in module.modules() if isinstance(m, FrozenBatchNorm2d))
    return sum(p.numel() for p in module.parameters()) + frozen_bn


@pytest.mark.parametrize(
    "config, backbone_params, neck_params",
    [
        ("R50.yaml", 23_508_032, 5_638_144),
        ("R101.yaml", 42_500_160, 5_638_144),
        ("PVTv2-B0.yaml", 3_409_760, 714_752),
        ("PVTv2-B2.yaml", 24_849_856, 1_427_456),
        ("PVTv2-B5.yaml", 81_443_008, 1_427_456),
    ],
)
def test_backbone_and_neck_counts_are_exact(config, backbone_params, neck_params):
    backbone = build_backbone(_cfg(config))
    assert _all_params(backbone) == backbone_params
    neck = ChannelMapper([s.channels for s in backbone.output_shape().values()])
    assert _all_params(neck) == neck_params


def test_resnet_freezes_stem_res2_and_every_batch_norm():
    backbone = build_backbone(_cfg("R50.yaml"))
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    # SPEC §8.1: all 51,271,900 - trainable 50,996,380 = 275,520 frozen = stem + res2 + all BN
    assert _all_params(backbone) - trainable == 275_520
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if n.startswith(("stem.", "res2.")))
    assert backbone.stem.conv1.norm.__class__ is FrozenBatchNorm2d
    assert backbone.res3[0].conv2.stride == (2, 2)  # torchvision style: stride in the 3x3 conv


# SPEC §8.1 components shared by every backbone (no x0 branches); "queries & heads" =
# level_embeds + reference_points (1,538) + thing queries (153,600) + stuff queries (27,136)
# + 6 class heads (123,360, 80 thing classes) + 6 box heads (795,672) + 6 stuff class heads (1,542)
HEAD_GROUPS = {
    "encoder": 4_541_184,
    "location decoder": 6_123_264,
    "thing mask decoder": 3_291_829,
    "stuff mask decoder": 6_453_911,
    "queries & heads": 1_102_848,
}


@pytest.mark.skipif(not HAS_META_ARCH, reason="panoptic_segformer/modeling/meta_arch.py not written yet")
@pytest.mark.parametrize(
    "config, total, trainable",
    [
        ("R50.yaml", 50_659_212, 50_659_212 - 275_520),
        ("PVTv2-B0.yaml", 25_637_548, 25_637_548),
        ("PVTv2-B2.yaml", 47_790_348, 47_790_348),
    ],
)
def test_full_model_totals_match_spec(config, total, trainable):
    tool = _analyze_model()
    model = tool.build(str(REPO_ROOT / "configs" / config), [])  # COCO panoptic metadata: 80 things, 53 stuff
    counts = tool.count_parameters(model)
    assert counts["total"][0] == pytest.approx(total, rel=0.005)
    assert counts["total"][1] == pytest.approx(trainable, rel=0.005)
    for group, expected in HEAD_GROUPS.items():
        assert counts[group][0] == expected, group
    assert counts["total"][0] == sum(a for g, (a, _) in counts.items() if g != "total")


@pytest.mark.skipif(not HAS_META_ARCH, reason="panoptic_segformer/modeling/meta_arch.py not written yet")
def test_flop_count_covers_the_deformable_attention():
    tool = _analyze_model()
    no_painting = ["MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH", "2.0"]
    no_painting += ["MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESH", "2.0"]
    model = tool.build(str(REPO_ROOT / "configs" / "PVTv2-B0.yaml"), no_painting)
    gflops, unsupported = tool.count_flops(model, 96, 128)
    assert not any("ms_deform_attn" in op or "grid_sampler" in op for op in unsupported)
    # encoder: 6 layers x tokens x (MSDA projections 229,376 + FFN 524,288 MACs) + sampling + LayerNorm
    tokens = 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
    linear = 6 * tokens * (229_376 + 524_288) / 1e9
    sampling = 6 * tokens * 8 * 4 * 4 * 32 * 5 / 1e9
    assert gflops["encoder"] >= linear + sampling
    assert gflops["encoder"] == pytest.approx(linear + sampling, rel=0.02)
    assert gflops["total"] == pytest.approx(sum(v for k, v in gflops.items() if k != "total"))
