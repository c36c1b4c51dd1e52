"""Optimizer of SPEC §7: AdamW with substring-matched lr multipliers and full-model clipping;
every step first checks that the gradients are finite (``non_finite.py``)."""
import logging
from typing import Dict, List, Sequence, Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

from .non_finite import non_finite_gradient_error

__all__ = [
    "add_full_model_gradient_clipping",
    "add_non_finite_gradient_check",
    "build_optimizer",
    "get_param_groups",
]

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
    omitted. Each group carries ``"name"`` ("lr_mult" / "base") for logging and, as PyTorch's own
    named-parameter groups, ``"param_names"`` (used to name a non-finite gradient).
    """
    seen = set()
    scaled, base = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (scaled if any(k in name for k in lr_multiplier_keys) else base).append((name, p))
    groups = []
    for group_name, members, lr in (("base", base, base_lr), ("lr_mult", scaled, base_lr * lr_multiplier)):
        if members:
            groups.append({"name": group_name, "params": [p for _, p in members],
                           "param_names": [n for n, _ in members], "lr": lr,
                           "weight_decay": weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def add_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], clip_norm: float,
                                     norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """Subclass of ``optim_cls`` whose ``step`` first clips the global gradient norm of ALL its
    parameters (every group together) to ``clip_norm``, like DETR's ``clip_grad_norm_``.

    Under AMP, ``GradScaler.step`` unscales the gradients before it calls ``step``, so the clip
    sees true gradient magnitudes. A non-finite global norm raises
    :class:`~panoptic_segformer.engine.NonFiniteTrainingError` before anything is scaled or
    stepped (the check reuses the norm the clip computes: no extra pass over the gradients).
    """
    if clip_norm <= 0:
        raise ValueError(f"gradient clip value must be > 0, got {clip_norm}")

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            try:  # raises before scaling any gradient when the norm is NaN / Inf
                torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type, error_if_nonfinite=True)
            except RuntimeError as e:
                if "non-finite" not in str(e):
                    raise
                raise non_finite_gradient_error(self, _total_norm(params, norm_type)) from None
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optim_cls.__name__ + "WithFullModelClip"
    return FullModelGradientClippingOptimizer


def _total_norm(params, norm_type: float) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)


def add_non_finite_gradient_check(optim_cls: Type[torch.optim.Optimizer],
                                  norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """Subclass of ``optim_cls`` whose ``step`` raises ``NonFiniteTrainingError`` (naming the
    culprit) instead of stepping when the global gradient norm is NaN / Inf; for optimizers
    without full-model clipping, which computes that norm itself. Costs one norm per step."""

    class NonFiniteGradientCheckOptimizer(optim_cls):
        def step(self, closure=None):
            total_norm = _total_norm([p for g in self.param_groups for p in g["params"]], norm_type)
            if not torch.isfinite(total_norm):
                raise non_finite_gradient_error(self, total_norm)
            return super().step(closure=closure)

    NonFiniteGradientCheckOptimizer.__name__ = optim_cls.__name__ + "WithNonFiniteCheck"
    return NonFiniteGradientCheckOptimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`get_param_groups`, with gradient clipping from
    ``SOLVER.CLIP_GRADIENTS``: ``CLIP_TYPE == "full_model"`` clips the global L2 norm of the whole
    model at ``CLIP_VALUE``; "value"/"norm" use Detectron2's per-parameter clipping. Either way
    a step with a NaN / Inf gradient raises ``NonFiniteTrainingError`` before it changes anything."""
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
        optim_cls = add_non_finite_gradient_check(maybe_add_gradient_clipping(cfg, optim_cls))
    logger.info(
        "Optimizer %s: %s", optim_cls.__name__,
        ", ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['lr']:g})" for g in groups),
    )
    return optim_cls(groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
