#!/usr/bin/env python
"""Parameter counts per module group and FLOPs (fvcore) of Panoptic SegFormer configs.

    python tools/analyze_model.py --config-file configs/R50.yaml
    python tools/analyze_model.py --all --no-flops
    python tools/analyze_model.py --config-file configs/PVTv2-B0.yaml --height 800 --width 1333

Models are built with random weights on CPU (nothing is downloaded); class counts come from the
metadata of ``DATASETS.TRAIN[0]`` (Detectron2's builtin COCO panoptic metadata needs no images).

Parameter convention: "all" counts every nn.Parameter plus the affine weight/bias of
Detectron2's FrozenBatchNorm2d, which are buffers in Detectron2 but parameters in the official
(mmdet) model, so "all" is comparable with SPEC §8.1. "trainable" counts parameters with
requires_grad. FLOPs follow fvcore: one fused multiply-add = one flop, measured by tracing one
inference at the given size. For the FLOP count the merging score thresholds are raised above 1,
so the greedy painting loop of mask-wise merging (negligible FLOPs; its ``Tensor.view(dtype)``
calls break torch.jit tracing) does not run; the mask scoring before it is still counted.
"""
import argparse
import importlib
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from fvcore.nn.jit_handles import get_shape
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import Backbone, build_model  # noqa: E402

from panoptic_segformer import add_panoptic_segformer_config  # noqa: E402  (registers the model)
from panoptic_segformer.modeling.neck import ChannelMapper  # noqa: E402

GROUPS = (
    "backbone",
    "neck",
    "encoder",
    "location decoder",
    "thing mask decoder",
    "stuff mask decoder",
    "queries & heads",
)
OTHER = "queries & heads"  # level embeddings, query embeddings, reference points, class/box heads


def _transformer_types() -> Dict[str, type]:
    """The head's module classes, if their files exist (imported lazily: other engineers own them)."""
    types = {}
    for module, name in [
        ("encoder", "DeformableEncoder"),
        ("location_decoder", "LocationDecoder"),
        ("mask_decoder", "MaskDecoder"),
    ]:
        try:
            types[name] = getattr(importlib.import_module(f"panoptic_segformer.modeling.{module}"), name)
        except (ImportError, AttributeError):
            continue
    return types


def module_groups(model: nn.Module) -> Dict[str, str]:
    """Maps module names (prefixes of parameter names) to a group of :data:`GROUPS`.

    Groups are found by module type, so the attribute names of the meta-architecture do not
    matter. Inside the location decoder only ``layers`` counts as "location decoder"; its query
    embedding, reference-point Linear and class/box heads go to "queries & heads". A mask decoder
    whose name contains "stuff" is the stuff one. Parameters outside every unit are "queries & heads".
    """
    types = _transformer_types()
    units: Dict[str, str] = {}
    for name, m in model.named_modules():
        if any(name.startswith(u + ".") for u in units if u):
            continue  # inside an already assigned unit
        if isinstance(m, Backbone):
            units[name] = "backbone"
        elif isinstance(m, ChannelMapper):
            units[name] = "neck"
        elif "DeformableEncoder" in types and isinstance(m, types["DeformableEncoder"]):
            units[name] = "encoder"
        elif "LocationDecoder" in types and isinstance(m, types["LocationDecoder"]):
            units[f"{name}.layers"] = "location decoder"
        elif "MaskDecoder" in types and isinstance(m, types["MaskDecoder"]):
            units[name] = "stuff mask decoder" if "stuff" in name.rsplit(".", 1)[-1] else "thing mask decoder"
    return units


def _group_of(param_name: str, units: Dict[str, str]) -> str:
    best, group = -1, OTHER
    for unit, g in units.items():
        if (param_name.startswith(unit + ".") or unit == "") and len(unit) > best:
            best, group = len(unit), g
    return group


def count_parameters(model: nn.Module) -> "OrderedDict[str, Tuple[int, int]]":
    """{group: (all, trainable)} plus "total"; "all" includes FrozenBatchNorm2d weight/bias (see module doc)."""
    units = module_groups(model)
    counts = OrderedDict((g, [0, 0]) for g in GROUPS)
    for name, p in model.named_parameters():
        c = counts[_group_of(name, units)]
        c[0] += p.numel()
        c[1] += p.numel() if p.requires_grad else 0
    for name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            counts[_group_of(name + ".weight", units)][0] += m.weight.numel() + m.bias.numel()
    out = OrderedDict((g, (a, t)) for g, (a, t) in counts.items())
    out["total"] = (sum(a for a, _ in out.values()), sum(t for _, t in out.values()))
    return out


def _ms_deform_attn_flop(inputs, outputs) -> int:
    """Compiled MSDA forward: value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2).

    Per sampled point and channel: 4 bilinear corner multiply-adds + 1 attention-weight one.
    """
    n, _, m, d = get_shape(inputs[0])
    _, lq, _, levels, points, _ = get_shape(inputs[3])
    return n * lq * m * levels * points * d * 5


def _grid_sampler_flop(inputs, outputs) -> int:
    """Bilinear grid_sample (the PyTorch MSDA path): 4 multiply-adds per output element."""
    return 4 * math.prod(get_shape(outputs[0]))


def _sdpa_flop(inputs, outputs) -> int:
    """scaled_dot_product_attention: q (..., L, E), k (..., S, E), v (..., S, Ev): QK^T + AV."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_flop(inputs, outputs) -> int:
    """baddbmm(input, batch1 (b, n, m), batch2 (b, m, p)): b*n*m*p (nn.MultiheadAttention)."""
    b, n, m = get_shape(inputs[1])
    return b * n * m * get_shape(inputs[2])[-1]


# element-wise or indexing ops: no multiply-adds by fvcore's convention
_ZERO_FLOP_OPS = (
    "aten::__or__", "aten::all", "aten::amax", "aten::clamp_min", "aten::cos", "aten::cumsum", "aten::empty_like",
    "aten::flip", "aten::gelu", "aten::log", "aten::lt", "aten::masked_fill_", "aten::minimum", "aten::ne", "aten::pad",
    "aten::pow", "aten::prod", "aten::rsqrt", "aten::searchsorted", "aten::sin", "aten::square", "aten::sum",
    "aten::topk", "aten::where",
)


def count_flops(model: nn.Module, height: int, width: int) -> Tuple["OrderedDict[str, float]", Dict[str, int]]:
    """({group: GFLOPs} plus "other" (glue and post-processing) and "total", {unsupported op: count})."""
    from detectron2.utils.analysis import FlopCountAnalysis

    model.eval()
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    inputs = [{"image": image, "height": height, "width": width}]
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle(
            **{
                "panoptic_segformer::ms_deform_attn_forward": _ms_deform_attn_flop,
                "aten::grid_sampler": _grid_sampler_flop,
                "aten::scaled_dot_product_attention": _sdpa_flop,
                "aten::baddbmm": _baddbmm_flop,
                **{op: None for op in _ZERO_FLOP_OPS},
            }
        )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = analysis.by_module()
        total = analysis.total()
        unsupported = dict(analysis.unsupported_ops())
    units = module_groups(model)
    flops = OrderedDict((g, 0.0) for g in GROUPS)
    for unit, group in units.items():
        flops[group] += by_module.get(f"model.{unit}" if unit else "model", 0)
    # "queries & heads": parameter-owning leaf modules outside every unit (class/box heads, ...)
    for name, m in model.named_modules():
        inside = any(name == u or name.startswith(u + ".") for u in units)
        if name and not inside and next(m.children(), None) is None and any(True for _ in m.parameters(False)):
            flops[OTHER] += by_module.get(f"model.{name}", 0)
    flops["other"] = total - sum(flops.values())
    flops["total"] = total
    return OrderedDict((k, v / 1e9) for k, v in flops.items()), unsupported


def build(config_file: str, opts: List[str]) -> nn.Module:
    """The model of a config on CPU with random weights (MODEL.WEIGHTS is not loaded)."""
    importlib.import_module("panoptic_segformer.data")  # the project's datasets (metadata for class counts)
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.PRETRAINED = ""
    cfg.freeze()
    return build_model(cfg)


def _table(rows: List[Tuple[str, ...]], header: Tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def analyze(config_file: str, opts: List[str], flops: bool, height: int, width: int) -> str:
    if flops:
        opts = list(opts) + [
            "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH", "2.0",
            "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESH", "2.0",
        ]
    model = build(config_file, opts)
    params = count_parameters(model)
    gflops, unsupported = count_flops(model, height, width) if flops else ({}, {})
    header = ("group", "params (all)", "trainable") + ((f"GFLOPs@{height}x{width}",) if flops else ())
    rows = []
    for g in list(GROUPS) + ["other", "total"]:
        a, t = params.get(g, (None, None))
        if a is None and g not in gflops:
            continue
        row = (g, f"{a:,}" if a is not None else "", f"{t:,}" if t is not None else "")
        rows.append(row + ((f"{gflops[g]:.1f}",) if flops else ()))
    text = f"== {config_file} ==\n" + _table(rows, header)
    if unsupported:
        text += "\nops without a FLOP handler (not counted): " + ", ".join(
            f"{k} x{v}" for k, v in sorted(unsupported.items())
        )
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", help="a config of configs/")
    parser.add_argument("--all", action="store_true", help="every model config in configs/ (not Base-*)")
    parser.add_argument("--no-flops", action="store_true", help="parameter counts only")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.all == bool(args.config_file):
        parser.error("give exactly one of --config-file and --all")
    configs = (
        sorted(str(p) for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith("Base-"))
        if args.all
        else [args.config_file]
    )
    failed = []
    for config in configs:
        try:
            print(analyze(config, args.opts, not args.no_flops, args.height, args.width), flush=True)
        except Exception as e:  # one config's failure (e.g. unregistered dataset) must not stop --all
            if not args.all:
                raise
            failed.append(config)
            print(f"== {config} ==\nFAILED: {type(e).__name__}: {e}", flush=True)
        print()
    if failed:
        sys.exit(f"{len(failed)} config(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
