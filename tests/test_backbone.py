"""timm PVTv2 / Swin backbones as Detectron2 backbones (SPEC §1.1)."""
import logging
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from timm.models import swin_transformer as timm_swin

from conftest import REPO_ROOT
from panoptic_segformer import add_panoptic_segformer_config
from panoptic_segformer.modeling.backbone import TimmBackbone
from panoptic_segformer.modeling.backbone.timm_backbone import _PadThenShiftSwinBlock


def _ceil(x, d):
    return -(-x // d)


@pytest.fixture(scope="module")
def pvt_b0():
    torch.manual_seed(0)
    return TimmBackbone(model_name="pvt_v2_b0").eval()


def test_pvt_outputs_any_size_with_ceil_shapes(pvt_b0):
    assert pvt_b0.size_divisibility == 32
    shapes = pvt_b0.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res3": (64, 8),
        "res4": (160, 16),
        "res5": (256, 32),
    }
    with torch.no_grad():
        out = pvt_b0(torch.randn(2, 3, 75, 99))
    for name, spec in shapes.items():
        assert out[name].shape == (2, spec.channels, _ceil(75, spec.stride), _ceil(99, spec.stride))
        assert torch.isfinite(out[name]).all()


def test_build_from_config_via_registry():
    assert "build_timm_backbone" in BACKBONE_REGISTRY
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "PVTv2-B0.yaml"))
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.2
    backbone = build_backbone(cfg)
    assert isinstance(backbone, TimmBackbone)
    assert backbone.body.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # linear over all blocks
    assert not hasattr(backbone.body, "head") or not any(p.numel() for p in backbone.body.head.parameters())


def test_rejects_unsupported_models_and_stages():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME"):
        TimmBackbone(model_name="resnet50")
    with pytest.raises(ValueError, match="MODEL.TIMM.OUT_INDICES"):
        TimmBackbone(model_name="pvt_v2_b0", out_indices=(1, 2, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        TimmBackbone(model_name="pvt_v2_b0")(torch.randn(3, 32, 32))


def _to_original_pvt_layout(state):
    """timm PVTv2 keys -> the original PVTv2 release's (patch_embed1, block1.0, norm1, dwconv.dwconv)."""
    out = {}
    for k, v in state.items():
        k = k.replace("patch_embed.", "patch_embed1.")
        k = re.sub(r"stages\.(\d+)\.downsample", lambda m: f"patch_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}", k)
        k = re.sub(r"stages\.(\d+)\.norm", lambda m: f"norm{int(m.group(1)) + 1}", k)
        out[k.replace("dwconv.", "dwconv.dwconv.")] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_pretrained_loads_from_a_local_file(tmp_path, pvt_b0, layout, caplog):
    state = {k: torch.randn_like(v) for k, v in pvt_b0.body.state_dict().items()}
    if layout == "original":
        state = {"model": _to_original_pvt_layout(state)}
        state["model"]["head.weight"] = torch.zeros(1000, 256)  # classifier: ignored silently
        assert "block1.0.mlp.dwconv.dwconv.weight" in state["model"]
    state_path = tmp_path / "ckpt.pth"
    torch.save(state, state_path)
    with caplog.at_level(logging.WARNING):
        loaded = TimmBackbone(model_name="pvt_v2_b0", pretrained=str(state_path))
    assert not caplog.records
    expected = pvt_b0.body.state_dict()
    state = {k: v for k, v in (state["model"] if layout == "original" else state).items()}
    got = loaded.body.state_dict()
    assert got.keys() == expected.keys()
    flat_new = torch.cat([v.flatten() for v in got.values()])
    flat_src = torch.cat([v.flatten() for k, v in sorted(state.items()) if k != "head.weight"])
    assert torch.equal(flat_new.sort().values, flat_src.sort().values)  # every tensor came from the file


def test_pretrained_reports_missing_and_unexpected_keys(tmp_path, pvt_b0, caplog):
    state = pvt_b0.body.state_dict()
    state.pop("stages.3.norm.weight")
    state["stages.9.extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        TimmBackbone(model_name="pvt_v2_b0", pretrained=str(path))
    text = caplog.text
    assert "stages.3.norm.weight" in text and "stages.9.extra.weight" in text


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        TimmBackbone(model_name="pvt_v2_b0", pretrained=str(tmp_path / "no_such.pth"))
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="does not match"):
        TimmBackbone(model_name="pvt_v2_b0", pretrained=str(path))


def test_swin_output_norms_and_odd_input_size():
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name="swin_tiny_patch4_window7_224", drop_path_rate=0.0).eval()
    assert [tuple(n.normalized_shape) for n in backbone.out_norms] == [(192,), (384,), (768,)]
    blocks = [m for m in backbone.modules() if isinstance(m, timm_swin.SwinTransformerBlock)]
    assert blocks and all(type(b) is _PadThenShiftSwinBlock for b in blocks)
    # shifted windows everywhere, also on maps smaller than the 224-px pretraining grid (official behaviour)
    assert all(b.window_size == (7, 7) and b.shift_size == ((3, 3) if i % 2 else (0, 0))
               for stage in backbone.body.layers for i, b in enumerate(stage.blocks))
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 90, 123))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 192, 12, 16),
        "res4": (1, 384, 6, 8),
        "res5": (1, 768, 3, 4),
    }
    # each output went through its LayerNorm: per-pixel channel mean 0 (weight 1, bias 0 at init)
    assert out["res5"].mean(dim=1).abs().max() < 1e-4


def _swin_block(shift):
    torch.manual_seed(0)
    block = timm_swin.SwinTransformerBlock(
        dim=16, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=shift,
        always_partition=True, dynamic_mask=True,
    ).eval()
    return block


def test_swin_window_attention_equals_timm_on_window_multiples():
    x = torch.randn(2, 14, 21, 16)
    for shift in (0, 3):
        block = _swin_block(shift)
        expected = block._attn(x)
        block.__class__ = _PadThenShiftSwinBlock
        torch.testing.assert_close(block._attn(x), expected, rtol=1e-5, atol=1e-6)


def test_swin_shifted_windows_keep_wrapped_rows_apart_after_padding():
    """Official pad-then-shift: the rows/cols wrapped by the cyclic shift only see each other."""
    block = _swin_block(3)
    block.__class__ = _PadThenShiftSwinBlock
    x = torch.randn(1, 12, 12, 16)  # padded to 14x14 inside the block
    y = x.clone()
    y[:, :3] += 5.0  # change the first 3 rows (wrapped to the bottom by the shift)
    with torch.no_grad():
        a, b = block._attn(x), block._attn(y)
    torch.testing.assert_close(a[:, 3:], b[:, 3:], rtol=0, atol=1e-6)
    z = x.clone()
    z[:, :, :3] -= 4.0  # same for the first 3 columns
    with torch.no_grad():
        c = block._attn(z)
    torch.testing.assert_close(a[:, :, 3:], c[:, :, 3:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, :3], b[:, :3])  # the perturbation does reach its own rows


def test_swin_large_matches_spec_hyper_parameters():
    backbone = TimmBackbone(model_name="swin_large_patch4_window7_224", drop_path_rate=0.3)
    body = backbone.body
    # SPEC §8.1: timm's 196.53M - head (1,537,000) - final norm (3,072) + 3 output norms (5,376)
    assert sum(p.numel() for p in backbone.parameters()) == 194_997_780
    assert body.embed_dim == 192 and [len(s.blocks) for s in body.layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in body.layers] == [6, 12, 24, 48]
    assert body.patch_embed.norm is not None and not hasattr(body, "absolute_pos_embed")
    assert body.layers[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {
        "res3": (384, 8), "res4": (768, 16), "res5": (1536, 32),
    }
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "Swin-L.yaml"))
    assert TimmBackbone.from_config(cfg, ShapeSpec(channels=3)) == {
        "model_name": "swin_large_patch4_window7_224",
        "out_indices": (1, 2, 3),
        "drop_path_rate": 0.3,
        "pretrained": "",
        "in_chans": 3,
    }


def test_swin_loads_the_original_release_layout(tmp_path, caplog):
    """Swin release checkpoints: {"model": ...}, PatchMerging at the END of stage i (timm: start of i+1)."""
    torch.manual_seed(0)
    source = TimmBackbone(model_name="swin_tiny_patch4_window7_224", drop_path_rate=0.0)
    state = {}
    for k, v in source.body.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        state[k] = torch.randn_like(v) if v.is_floating_point() else v
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # buffers of the release: dropped
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    state["norm.weight"], state["norm.bias"] = torch.ones(768), torch.zeros(768)  # final norm: pruned here
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    assert "layers.2.downsample.reduction.weight" in state and "layers.3.downsample.reduction.weight" not in state
    path = tmp_path / "swin_release.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        loaded = TimmBackbone(model_name="swin_tiny_patch4_window7_224", pretrained=str(path))
    assert not caplog.records, caplog.text  # every parameter found, nothing left over
    got = loaded.body.state_dict()
    moved = state["layers.2.downsample.reduction.weight"]
    torch.testing.assert_close(got["layers.3.downsample.reduction.weight"], moved)
    torch.testing.assert_close(got["layers.1.blocks.0.attn.qkv.weight"], state["layers.1.blocks.0.attn.qkv.weight"])
    assert torch.all(loaded.out_norms[0].weight == 1)  # not in classification checkpoints: left at init
