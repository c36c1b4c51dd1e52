"""Optimizer of SPEC §7: AdamW with substring-matched lr multipliers and full-model clipping."""
import itertools
import logging
from typing import Dict, List, Sequence, Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["get_param_groups", "add_full_model_gradient_clipping", "build_optimizer"]

logger = logging.getLogger(__name__)


def get_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    lr_multiplier_keys: Sequence[str],
    lr_multiplier: float,
) -> List[Dict]:
    """Two parameter groups, as mmcv's ``DefaultOptimizerConstructor`` with ``custom_keys``:

    * parameters whose full name contains any of ``lr_multiplier_keys`` (e.g. "backbone",
      "sampling_offsets", "reference_points"): ``lr = base_lr * lr_multiplier``;
    * all others: ``lr = base_lr``.

    Every group has the same ``weight_decay`` (no special case for norms, biases or embeddings,
    SPEC §7). Frozen parameters are skipped and shared parameters appear once. Empty groups are
    omitted. Each group carries ``"name"`` ("lr_mult" / "base") for logging.
    """
    seen = set()
    scaled, base = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (scaled if any(k in name for k in lr_multiplier_keys) else base).append(p)
    groups = []
    if base:
        groups.append({"name": "base", "params": base, "lr": base_lr, "weight_decay": weight_decay})
    if scaled:
        groups.append({"name": "lr_mult", "params": scaled, "lr": base_lr * lr_multiplier,
                       "weight_decay": weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def add_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], clip_norm: float,
                                     norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """Subclass of ``optim_cls`` whose ``step`` first clips the global gradient norm of ALL its
    parameters (every group together) to ``clip_norm``, like DETR's ``clip_grad_norm_``.

    Under AMP, ``GradScaler.step`` unscales the gradients before it calls ``step``, so the clip
    sees true gradient magnitudes.
    """
    if clip_norm <= 0:
        raise ValueError(f"gradient clip value must be > 0, got {clip_norm}")

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optim_cls.__name__ + "WithFullModelClip"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`get_param_groups`, with gradient clipping from
    ``SOLVER.CLIP_GRADIENTS``: ``CLIP_TYPE == "full_model"`` clips the global L2 norm of the whole
    model at ``CLIP_VALUE``; "value"/"norm" use Detectron2's per-parameter clipping."""
    groups = get_param_groups(
        model,
        cfg.SOLVER.BASE_LR,
        cfg.SOLVER.WEIGHT_DECAY,
        list(cfg.SOLVER.LR_MULTIPLIER_KEYS),
        cfg.SOLVER.LR_MULTIPLIER,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    logger.info(
        "Optimizer %s: %s", optim_cls.__name__,
        ", ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['lr']:g})" for g in groups),
    )
    return optim_cls(groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
