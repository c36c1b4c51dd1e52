"""PVTv2 and Swin backbones from ``timm`` as Detectron2 ``Backbone``s (SPEC §1.1).

The timm model keeps its own parameter names (the classifier head and, for Swin, the final norm
are pruned), so timm checkpoints and the original PVTv2 / Swin releases load through timm's own
key remapping. Weights are read from a local file only.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.models import pvt_v2 as timm_pvt_v2
from timm.models import swin_transformer as timm_swin
from torch import Tensor, nn

__all__ = ["TimmBackbone", "build_timm_backbone", "load_timm_checkpoint"]

logger = logging.getLogger(__name__)

_FAMILIES = {
    timm_pvt_v2.PyramidVisionTransformerV2: timm_pvt_v2,
    timm_swin.SwinTransformer: timm_swin,
}


def _shifted_window_mask(
    height: int, width: int, window: Sequence[int], shift: Sequence[int], device, dtype
) -> Tensor:
    """Attention mask of shifted windows on a (height, width) map already padded to window multiples.

    After the cyclic shift, the last ``window`` rows (cols) hold up to three regions that were
    not adjacent before the shift: [.., H-window), [H-window, H-shift), [H-shift, H). Tokens of
    different regions must not attend to each other.

    Returns:
        (num_windows, window_h*window_w, window_h*window_w) with 0 (same region) or -100.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - window[0]).long() + (rows >= height - shift[0]).long()
    col_region = (cols >= width - window[1]).long() + (cols >= width - shift[1]).long()
    region = row_region[:, None] * 3 + col_region[None, :]  # (H, W)
    region = region.view(height // window[0], window[0], width // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])  # (nW, N)
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, -100.0)


class _PadThenShiftSwinBlock(timm_swin.SwinTransformerBlock):
    """timm's Swin block with the detection-style window attention of the official backbone.

    The official (mmdet) Swin pads the map to window multiples *before* the cyclic shift, so the
    rows/cols wrapped around by the shift always land in the masked border region. timm rolls the
    unpadded map and pads afterwards; when the map is not a window multiple, the wrapped rows/cols
    then share a region with the last real ones and the bottom/right tokens attend to the top/left
    ones. Only ``_attn`` differs; parameters and everything else are timm's.
    """

    def _attn(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        window, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        shifted = any(shift)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = _shifted_window_mask(Hp, Wp, window, shift, x.device, x.dtype)
        windows = timm_swin.window_partition(x, window).view(-1, window[0] * window[1], C)
        windows = self.attn(windows, mask=mask).view(-1, window[0], window[1], C)
        x = timm_swin.window_reverse(windows, window, Hp, Wp)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous()


def load_timm_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local state dict into a (pruned) timm PVTv2 / Swin model.

    Accepts a plain state dict or one nested under ``"model"`` / ``"state_dict"``, in timm's key
    layout or the original PVTv2 / Swin one (remapped by timm's ``checkpoint_filter_fn``).
    Classifier-head and final-norm keys are ignored; every other missing or unexpected key is
    logged. The file is read with the project's safe policy (``load_checkpoint_file``: tensors
    only, no opt-in here) and NaN / Inf weights are refused. Raises FileNotFoundError for a
    missing file and ValueError when no key matches.
    """
    from ...checkpoint.loading import check_finite, load_checkpoint_file  # the package imports this module

    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.TIMM.PRETRAINED: no such checkpoint file: {path!r}")
    state = load_checkpoint_file(path, opt_in=None)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {path!r} does not hold a state dict (got {type(state).__name__})")
    check_finite(state, f"MODEL.TIMM.PRETRAINED {path}")
    family = _FAMILIES[type(model)]
    state = family.checkpoint_filter_fn(state, model)
    own = model.state_dict()
    ignored = [k for k in state if k not in own and (k.startswith("head.") or k.startswith("norm."))]
    state = {k: v for k, v in state.items() if k not in ignored}
    if not any(k in own for k in state):
        raise ValueError(
            f"Checkpoint {path!r} does not match {type(model).__name__}: none of its {len(state)} keys "
            f"(e.g. {sorted(state)[:3]}) is a parameter of the model"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in dict(model.named_parameters())]
    if missing:
        logger.warning(f"{path}: {len(missing)} parameters not in the checkpoint (left at init): {missing}")
    if result.unexpected_keys:
        logger.warning(f"{path}: {len(result.unexpected_keys)} unused keys: {result.unexpected_keys}")
    logger.info(f"Loaded {len(state) - len(result.unexpected_keys)} tensors into the backbone from {path}")


class TimmBackbone(Backbone):
    """A timm PVTv2 or Swin model returning ``res{log2(stride)}`` maps, e.g. res3/res4/res5.

    Input: (B, 3, H, W) normalised RGB of any size (Swin pads it to a multiple of its patch size;
    every stage gives ceil-halved sizes). Output: {"res3": (B, C3, H/8, W/8), "res4": ..., "res5": ...}.
    Submodules: ``body`` (the timm model) and, for Swin, ``out_norms`` (one LayerNorm per output,
    as the official detection backbone has).
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        out_indices: Sequence[int] = (1, 2, 3),
        drop_path_rate: float = 0.1,
        pretrained: str = "",
        in_chans: int = 3,
    ):
        """
        Args:
            model_name: a timm PVTv2 (``pvt_v2_b0``...) or Swin (``swin_large_patch4_window7_224``...) name.
            out_indices: stages to return (1, 2, 3 = strides 8, 16, 32).
            drop_path_rate: stochastic depth, linear over all blocks.
            pretrained: local checkpoint path, "" for random init.
            in_chans: input channels.
        """
        super().__init__()
        if not model_name.startswith(("pvt_v2", "swin")):
            raise ValueError(
                f"MODEL.TIMM.NAME must be a timm PVTv2 (pvt_v2_*) or Swin (swin_*) model, got {model_name!r}"
            )
        is_swin = model_name.startswith("swin")
        # Swin: any input size (masks built per forward), windows of 7 with shifts even on maps smaller than
        # the pretraining size, as the official detection backbone does
        extra = dict(strict_img_size=False, always_partition=True) if is_swin else {}
        self.body = timm.create_model(
            model_name, pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate, **extra
        )
        num_stages = len(self.body.feature_info)
        self.out_indices = sorted(out_indices)
        if not self.out_indices or not all(0 <= i < num_stages for i in self.out_indices):
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES must be stage indices in [0, {num_stages}), got {list(out_indices)}"
            )
        self.body.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        info = [self.body.feature_info[i] for i in self.out_indices]
        self._out_features = [f"res{int(math.log2(d['reduction']))}" for d in info]
        self._out_feature_channels = {n: d["num_chs"] for n, d in zip(self._out_features, info)}
        self._out_feature_strides = {n: d["reduction"] for n, d in zip(self._out_features, info)}
        self.out_norms: Optional[nn.ModuleList] = None
        self._patch_size = 1
        if is_swin:
            for module in self.body.modules():
                if type(module) is timm_swin.SwinTransformerBlock:
                    module.__class__ = _PadThenShiftSwinBlock
            self.out_norms = nn.ModuleList(nn.LayerNorm(d["num_chs"]) for d in info)
            self._patch_size = self.body.patch_embed.patch_size[0]
        if pretrained:
            load_timm_checkpoint(self.body, pretrained)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {
            "model_name": cfg.MODEL.TIMM.NAME,
            "out_indices": tuple(cfg.MODEL.TIMM.OUT_INDICES),
            "drop_path_rate": cfg.MODEL.TIMM.DROP_PATH_RATE,
            "pretrained": cfg.MODEL.TIMM.PRETRAINED,
            "in_chans": input_shape.channels,
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: (B, C, H, W) -> {name: (B, C_l, ceil(H/s_l), ceil(W/s_l))}."""
        if x.dim() != 4:
            raise ValueError(f"TimmBackbone expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        p = self._patch_size
        if p > 1 and (x.shape[2] % p or x.shape[3] % p):
            x = F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p))
        feats: List[Tensor] = self.body.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        if self.out_norms is not None:
            feats = [norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, f in zip(self.out_norms, feats)]
        return dict(zip(self._out_features, feats))


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """Builds ``cfg.MODEL.TIMM.NAME`` as a Detectron2 backbone (weights from cfg.MODEL.TIMM.PRETRAINED)."""
    return TimmBackbone(cfg, input_shape)
