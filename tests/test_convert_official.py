"""Conversion of official (mmdet 2.12) Panoptic SegFormer checkpoints.

The official state dict is generated here from the official module definitions (SPEC Appendix B;
mmcv 1.3.4 ``BaseTransformerLayer`` / ``FFN`` / ``MultiheadAttention`` naming, mmdet's torchvision-
style ``ResNet`` and ``ChannelMapper``, the official ``MaskHead``), independently of this
project's modules, and filled with random values.
"""
import importlib.util

import pytest
import torch

from conftest import REPO_ROOT, requires_detectron2

pytestmark = requires_detectron2

D, HEADS, LEVELS, POINTS, FFN, QUERIES = 256, 8, 4, 4, 1024, 300
THINGS, STUFF = 80, 53
# SPEC §8.1: all parameters of the released R50 model, zero-weighted heads included
OFFICIAL_R50_PARAMS = 51_271_900


def _linear(prefix, out_f, in_f):
    return {f"{prefix}.weight": (out_f, in_f), f"{prefix}.bias": (out_f,)}


def _norm(prefix, n=D):
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _bn(prefix, n):
    return {**_norm(prefix, n), f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,),
            f"{prefix}.num_batches_tracked": ()}


def _msda(prefix):
    return {
        **_linear(f"{prefix}.sampling_offsets", HEADS * LEVELS * POINTS * 2, D),
        **_linear(f"{prefix}.attention_weights", HEADS * LEVELS * POINTS, D),
        **_linear(f"{prefix}.value_proj", D, D),
        **_linear(f"{prefix}.output_proj", D, D),
    }


def _ffn(prefix):
    return {**_linear(f"{prefix}.layers.0.0", FFN, D), **_linear(f"{prefix}.layers.1", D, FFN)}


def _mask_attention(prefix, with_value):
    names = ("q", "k", "v", "proj") if with_value else ("q", "k")
    shapes = {}
    for n in names:
        shapes.update(_linear(f"{prefix}.{n}", D, D))
    for lvl in (1, 2, 3):
        shapes.update(_linear(f"{prefix}.linear_l{lvl}.0", HEADS, HEADS))
    shapes.update(_linear(f"{prefix}.linear.0", 1, 3 * HEADS))
    return shapes


def _mask_head(prefix, num_blocks, self_attn):
    shapes = {}
    for i in range(num_blocks):
        b = f"{prefix}.blocks.{i}"
        shapes.update({**_norm(f"{b}.head_norm1"), **_norm(f"{b}.head_norm2")})
        shapes.update(_mask_attention(f"{b}.attn", True))
        shapes.update({**_linear(f"{b}.mlp.fc1", 4 * D, D), **_linear(f"{b}.mlp.fc2", D, 4 * D)})
        if self_attn:
            shapes.update({**_linear(f"{b}.self_attention.qkv", 3 * D, D), **_linear(f"{b}.self_attention.proj", D, D)})
            shapes.update(_norm(f"{b}.norm3"))
    shapes.update(_mask_attention(f"{prefix}.attnen", False))
    return shapes


def _box_mlp(prefix):
    return {**_linear(f"{prefix}.0", D, D), **_linear(f"{prefix}.2", D, D), **_linear(f"{prefix}.4", 4, D)}


def official_r50_shapes():
    """{official key: shape} of the released R50 model."""
    s = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            s[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            s[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            s[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            s.update({**_bn(f"{p}.bn1", planes), **_bn(f"{p}.bn2", planes), **_bn(f"{p}.bn3", planes * 4)})
            if b == 0:
                s[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                s.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    for i, c in enumerate((512, 1024, 2048)):
        s[f"neck.convs.{i}.conv.weight"] = (D, c, 1, 1)
        s.update(_norm(f"neck.convs.{i}.gn"))
    s["neck.extra_convs.0.conv.weight"] = (D, 2048, 3, 3)
    s.update(_norm("neck.extra_convs.0.gn"))

    h = "bbox_head"
    s[f"{h}.transformer.level_embeds"] = (LEVELS, D)
    s.update(_linear(f"{h}.transformer.reference_points", 2, D))
    for i in range(6):
        e = f"{h}.transformer.encoder.layers.{i}"
        s.update({**_msda(f"{e}.attentions.0"), **_ffn(f"{e}.ffns.0")})
        s.update({**_norm(f"{e}.norms.0"), **_norm(f"{e}.norms.1")})
        d = f"{h}.transformer.decoder.layers.{i}"
        s.update({f"{d}.attentions.0.attn.in_proj_weight": (3 * D, D), f"{d}.attentions.0.attn.in_proj_bias": (3 * D,)})
        s.update(_linear(f"{d}.attentions.0.attn.out_proj", D, D))
        s.update({**_msda(f"{d}.attentions.1"), **_ffn(f"{d}.ffns.0")})
        s.update({**_norm(f"{d}.norms.0"), **_norm(f"{d}.norms.1"), **_norm(f"{d}.norms.2")})
        s.update({**_linear(f"{h}.cls_branches.{i}", THINGS, D), **_box_mlp(f"{h}.reg_branches.{i}")})
        s.update(_linear(f"{h}.cls_stuff_branches.{i}", 1, D))
    for i in range(4):  # zero-weighted heads of the thing mask decoder
        s.update({**_box_mlp(f"{h}.reg_branches2.{i}"), **_linear(f"{h}.cls_thing_branches.{i}", THINGS, D)})
    s[f"{h}.query_embedding.weight"] = (QUERIES, 2 * D)
    s[f"{h}.stuff_query.weight"] = (STUFF, 2 * D)
    s.update(_mask_head(f"{h}.things_mask_head", 4, self_attn=False))
    s.update(_mask_head(f"{h}.stuff_mask_head", 6, self_attn=True))
    return s


def official_r50_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in official_r50_shapes().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def test_generated_layout_matches_the_official_parameter_count():
    shapes = official_r50_shapes()
    n = sum(
        torch.Size(s).numel()
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n == OFFICIAL_R50_PARAMS


@pytest.fixture(scope="module")
def r50_model():
    from test_model_r50 import build_r50, r50_cfg

    return build_r50(r50_cfg())


def test_convert_loads_strictly_and_values_land(r50_model):
    from panoptic_segformer.checkpoint import compare_with_model, convert_official_state_dict

    official = official_r50_state_dict()
    converted = convert_official_state_dict(official)
    assert compare_with_model(converted, r50_model) == ([], [], [])
    r50_model.load_state_dict(converted, strict=True)
    head, bb = r50_model.head, r50_model.backbone
    o = official
    thing_block = head.thing_mask_decoder.blocks[0].attn
    official_level1 = o["bbox_head.things_mask_head.blocks.0.attn.linear_l1.0.weight"]
    assert torch.equal(thing_block.level_proj[0].weight, official_level1)
    assert torch.equal(thing_block.mask_proj.bias, o["bbox_head.things_mask_head.blocks.0.attn.linear.0.bias"])
    assert torch.equal(
        head.stuff_mask_decoder.tail.level_proj[2].weight, o["bbox_head.stuff_mask_head.attnen.linear_l3.0.weight"]
    )
    # stuff queries: (content | pos) in both codes
    content, pos = head.stuff_queries.weight.split(D, -1)
    assert torch.equal(content, o["bbox_head.stuff_query.weight"][:, :D])
    assert torch.equal(pos, o["bbox_head.stuff_query.weight"][:, D:])
    # thing queries: (pos | content) in both codes
    assert torch.equal(head.location_decoder.query_embedding.weight, o["bbox_head.query_embedding.weight"])
    # post-norms in operation order; the last one closes the FFN
    dec = head.location_decoder.layers[3]
    assert torch.equal(dec.norm2.weight, o["bbox_head.transformer.decoder.layers.3.norms.1.weight"])
    assert torch.equal(dec.ffn.norm.bias, o["bbox_head.transformer.decoder.layers.3.norms.2.bias"])
    official_dec = "bbox_head.transformer.decoder.layers.3.attentions"
    assert torch.equal(dec.self_attn.in_proj_weight, o[f"{official_dec}.0.attn.in_proj_weight"])
    assert torch.equal(dec.cross_attn.sampling_offsets.bias, o[f"{official_dec}.1.sampling_offsets.bias"])
    enc = head.encoder.layers[5]
    assert torch.equal(enc.ffn.norm.weight, o["bbox_head.transformer.encoder.layers.5.norms.1.weight"])
    assert torch.equal(enc.ffn.linear2.weight, o["bbox_head.transformer.encoder.layers.5.ffns.0.layers.1.weight"])
    assert torch.equal(head.location_decoder.box_heads[5][4].bias, o["bbox_head.reg_branches.5.4.bias"])
    # backbone: FrozenBN running stats and the projection shortcut
    assert torch.equal(bb.res4[2].conv2.norm.running_var, o["backbone.layer3.2.bn2.running_var"])
    assert torch.equal(bb.stem.conv1.norm.running_mean, o["backbone.bn1.running_mean"])
    assert torch.equal(bb.res5[0].shortcut.norm.weight, o["backbone.layer4.0.downsample.1.weight"])
    assert torch.equal(r50_model.neck.extra_convs[0].norm.bias, o["neck.extra_convs.0.gn.bias"])
    assert not any("reg_branches2" in k or "cls_thing_branches" in k or "num_batches" in k for k in converted)


def test_compare_reports_missing_unexpected_and_mismatched(r50_model):
    from panoptic_segformer.checkpoint import compare_with_model, convert_official_state_dict

    official = official_r50_state_dict()
    del official["bbox_head.stuff_mask_head.attnen.q.bias"]
    official["bbox_head.unknown.weight"] = torch.zeros(3)
    official["bbox_head.cls_branches.0.weight"] = torch.zeros(81, D)  # a checkpoint with 81 thing classes
    missing, unexpected, mismatched = compare_with_model(convert_official_state_dict(official), r50_model)
    assert missing == ["head.stuff_mask_decoder.tail.q.bias"]
    assert unexpected == ["head.unknown.weight"]
    assert mismatched == [("head.location_decoder.class_heads.0.weight", (81, D), (THINGS, D))]


def _tool():
    path = REPO_ROOT / "tools" / "convert_official_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_a_weights_only_checkpoint_and_refuses_mismatches(tmp_path, r50_model):
    from panoptic_segformer.checkpoint import SafeCheckpointer

    tool = _tool()
    official = official_r50_state_dict(seed=1)
    del official["neck.convs.1.gn.weight"]
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    meta = {"mmcv_version": "1.3.4", "CLASSES": ("person", "wall"), "epoch": 24}
    torch.save({"meta": meta, "state_dict": official}, src)
    args = [str(src), str(dst), "--config-file", str(REPO_ROOT / "configs" / "R50.yaml")]
    assert tool.main(args) == 1
    assert not dst.exists()
    assert tool.main(args + ["--allow-missing"]) == 0
    checkpointer = SafeCheckpointer(r50_model)  # torch.load(weights_only=True)
    checkpointer.load(str(dst))
    assert checkpointer.incompatible.missing_keys == ["neck.convs.1.norm.weight"]
    assert not checkpointer.incompatible.unexpected_keys
    assert torch.equal(r50_model.head.level_embeds, official["bbox_head.transformer.level_embeds"])


def test_tool_on_random_bytes_and_non_finite_weights(tmp_path, capsys):
    tool = _tool()
    args = ["--config-file", str(REPO_ROOT / "configs" / "R50.yaml")]
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(1, 256)) * 40)
    with pytest.raises(SystemExit, match="not a checkpoint") as info:
        tool.main([str(noise), str(tmp_path / "out.pth"), *args])
    assert "--trust" not in str(info.value)  # trusting a random file would not help
    official = official_r50_state_dict(seed=2)
    official["bbox_head.cls_branches.2.bias"].fill_(float("nan"))
    src = tmp_path / "nan.pth"
    torch.save({"state_dict": official}, src)
    with pytest.raises(SystemExit, match=r"cls_branches\.2\.bias \(80 NaN"):
        tool.main([str(src), str(tmp_path / "out.pth"), *args])
    assert not (tmp_path / "out.pth").exists()


def test_non_resnet_backbone_needs_the_timm_backbone():
    from panoptic_segformer.checkpoint import convert_official_state_dict

    with pytest.raises(ValueError, match="not a ResNet"):
        convert_official_state_dict({"backbone.patch_embed1.proj.weight": torch.zeros(1)})


def _pvt_v2_b0_official_shapes():
    """Official PVTv2-B0 detection backbone (easymd pvt_v2.py, original PVTv2 naming)."""
    dims, ratios, srs, depths = (32, 64, 160, 256), (8, 8, 4, 4), (8, 4, 2, 1), (2, 2, 2, 2)
    s, prev = {}, 3
    for i, (c, r, sr, depth) in enumerate(zip(dims, ratios, srs, depths), start=1):
        k = 7 if i == 1 else 3
        s.update({f"patch_embed{i}.proj.weight": (c, prev, k, k), f"patch_embed{i}.proj.bias": (c,)})
        s.update(_norm(f"patch_embed{i}.norm", c))
        for j in range(depth):
            b = f"block{i}.{j}"
            s.update({**_norm(f"{b}.norm1", c), **_norm(f"{b}.norm2", c)})
            s.update({**_linear(f"{b}.attn.q", c, c), **_linear(f"{b}.attn.kv", 2 * c, c)})
            s.update(_linear(f"{b}.attn.proj", c, c))
            if sr > 1:
                s.update({f"{b}.attn.sr.weight": (c, c, sr, sr), f"{b}.attn.sr.bias": (c,)})
                s.update(_norm(f"{b}.attn.norm", c))
            s.update({**_linear(f"{b}.mlp.fc1", r * c, c), **_linear(f"{b}.mlp.fc2", c, r * c)})
            s.update({f"{b}.mlp.dwconv.dwconv.weight": (r * c, 1, 3, 3), f"{b}.mlp.dwconv.dwconv.bias": (r * c,)})
        s.update(_norm(f"norm{i}", c))
        prev = c
    return s


def _swin_t_official_shapes():
    """Official Swin-T detection backbone (easymd swin.py): downsample at the end of stages 0-2,
    one output norm ``norm{i}`` per output stage 1-3."""
    heads, depths, window = (3, 6, 12, 24), (2, 2, 6, 2), 7
    s = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,), **_norm("patch_embed.norm", 96)}
    for i, (h, depth) in enumerate(zip(heads, depths)):
        c = 96 * 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            s.update({**_norm(f"{b}.norm1", c), **_norm(f"{b}.norm2", c)})
            s[f"{b}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, h)
            s[f"{b}.attn.relative_position_index"] = (window**2, window**2)
            s.update({**_linear(f"{b}.attn.qkv", 3 * c, c), **_linear(f"{b}.attn.proj", c, c)})
            s.update({**_linear(f"{b}.mlp.fc1", 4 * c, c), **_linear(f"{b}.mlp.fc2", c, 4 * c)})
        if i < 3:
            s[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            s.update(_norm(f"layers.{i}.downsample.norm", 4 * c))
        if i > 0:
            s.update(_norm(f"norm{i}", c))
    return s


@pytest.mark.parametrize(
    "model_name, shapes",
    [("pvt_v2_b0", _pvt_v2_b0_official_shapes), ("swin_tiny_patch4_window7_224", _swin_t_official_shapes)],
)
def test_timm_backbones_go_through_timm_filters(model_name, shapes):
    from torch import nn

    from panoptic_segformer.checkpoint import convert_official_state_dict
    from panoptic_segformer.modeling.backbone.timm_backbone import TimmBackbone

    g = torch.Generator().manual_seed(0)
    official = {f"backbone.{k}": torch.randn(s, generator=g) for k, s in shapes().items()}
    holder = nn.ModuleDict({"backbone": TimmBackbone(model_name=model_name, out_indices=(1, 2, 3))})
    converted = convert_official_state_dict(official, timm_backbone=holder["backbone"])
    holder.load_state_dict(converted, strict=True)
    body = holder["backbone"].body
    if model_name.startswith("swin"):
        assert torch.equal(holder["backbone"].out_norms[0].weight, official["backbone.norm1.weight"])
        # the original Swin downsamples at the end of a stage, timm at the start of the next one
        reduction = official["backbone.layers.2.downsample.reduction.weight"]
        assert torch.equal(body.layers[3].downsample.reduction.weight, reduction)
    else:
        dwconv = official["backbone.block3.1.mlp.dwconv.dwconv.weight"]
        assert torch.equal(body.stages[2].blocks[1].mlp.dwconv.weight, dwconv)
        assert torch.equal(body.stages[3].norm.bias, official["backbone.norm4.bias"])
